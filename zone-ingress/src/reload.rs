//! Hot reload of the two inputs: the ZoneIngress file and the Dataplane inventory.
//!
//! Both are watched (inotify, through `notify`, on their directories so that editors' and
//! Kubernetes' rename-into-place updates are seen, and on those directories' parents so that a
//! directory replaced whole is seen too) and re-read on SIGHUP. A burst of changes is applied
//! once the files have been quiet and unchanged for a moment ([`Fingerprint`]); a file being
//! written in place is not read half-way (write to a temporary file and rename it into place
//! to make an update atomic). A reload runs the same loading and validation as startup
//! ([`crate::config::load_inputs`]):
//!
//! - invalid: every problem is logged as at startup, the running configuration stays, and the
//!   failure shows in `zone_ingress_config_reloads_total{result="failure"}`,
//!   `envoy_control_plane_connected_state` (0 until a valid load) and `/config_dump`;
//! - valid: a new [`Snapshot`] is built and installed in one atomic swap. New connections route
//!   with it at once; established flows keep running whatever happened to their route or
//!   endpoint (both sockets belong to them, nothing in the table refers back to them). A changed
//!   listener address is bound first (a failure rejects the whole reload) and then replaces the
//!   old listening sockets, which closes only those.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    config::{self, Diagnostic, Sources, load_inputs},
    server::{self, Ingress, Snapshot},
};

/// Why a reload was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The files do not pass validation.
    #[error("{} configuration problem(s)", .0.len())]
    Invalid(Vec<Diagnostic>),
    /// The new listener address could not be bound.
    #[error("binding the new listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What an applied reload changed.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    /// Version of the installed snapshot; `None` when nothing changed.
    pub version: Option<u64>,
    /// The admin address the new ZoneIngress asks for.
    pub admin_port: u16,
}

/// Loads the inputs again and applies them to a running ingress.
#[derive(Debug, Clone)]
pub struct Reloader {
    /// Where the inputs come from.
    pub sources: Sources,
    /// Listener sockets per bind (`--listeners`).
    pub listeners: usize,
}

impl Reloader {
    /// Re-reads both inputs and applies them (module docs). `trigger` is logged.
    ///
    /// # Errors
    /// The inputs are invalid or the new listener cannot be bound; the running configuration
    /// is unchanged and the failure is recorded.
    pub fn reload(&self, ingress: &Arc<Ingress>, trigger: &str) -> Result<Applied, ReloadError> {
        let result = self.try_reload(ingress, trigger);
        // A load's parse trees are gone: hand their pages back (a large inventory's are hundreds
        // of MiB) rather than keep them for the next reload.
        crate::sys::trim_heap();
        match result {
            Ok(applied) => Ok(applied),
            Err(e) => {
                let mut errors: Vec<String> = Vec::new();
                match &e {
                    ReloadError::Invalid(problems) => {
                        for p in problems {
                            error!("{p}");
                            errors.push(p.to_string());
                        }
                    }
                    ReloadError::Bind { .. } => {
                        error!("{e}");
                        errors.push(e.to_string());
                    }
                }
                error!(trigger, "{e}; configuration rejected, the running configuration stays");
                ingress.record_update(trigger, Err(errors));
                Err(e)
            }
        }
    }

    fn try_reload(&self, ingress: &Arc<Ingress>, trigger: &str) -> Result<Applied, ReloadError> {
        let inputs = load_inputs(&self.sources).map_err(ReloadError::Invalid)?;
        for w in &inputs.warnings {
            warn!("{w}");
        }
        let zi = inputs.zone_ingress;
        let admin_port = zi.admin_port;
        let current = ingress.snapshot();
        let unchanged = current.zone_ingress.as_ref() == Some(&zi) && *current.inventory == inputs.inventory;
        let new_addr = zi.listen_addr();
        let rebind = !unchanged && ingress.listener_addr() != Some(new_addr) && !ingress.listener_drained();
        // Bind before anything changes: a failure leaves everything as it was.
        let listeners = if rebind {
            Some(
                server::bind(new_addr, self.listeners, ingress.options.limits.keepalive, ingress.options.listener_mss)
                    .map_err(|source| ReloadError::Bind { addr: new_addr, source })?,
            )
        } else {
            None
        };
        let version = if unchanged {
            info!(trigger, version = current.version, "configuration unchanged");
            None
        } else {
            let snapshot = Snapshot::build(&ingress.metrics, Some(zi), inputs.inventory, &self.sources.zone);
            if let Some(sni) = &ingress.options.plaintext_route
                && snapshot.table.lookup(sni).is_err()
            {
                warn!(sni, "--plaintext-route no longer matches any route: plaintext connections will be rejected");
            }
            let routes = snapshot.table.len();
            let dataplanes = snapshot.dataplanes;
            let version = ingress.install(snapshot);
            info!(trigger, version, routes, dataplanes, "configuration reloaded");
            Some(version)
        };
        if let Some(listeners) = listeners {
            let old = ingress.listener_addr();
            ingress.start_listeners(listeners);
            ingress.metrics.listener_rebinds.fetch_add(1, Ordering::Relaxed);
            info!(old = ?old, new = %new_addr, "listener rebound; established flows keep running");
        } else if ingress.listener_drained() {
            ingress.set_listener_addr(new_addr);
        }
        ingress.record_update(trigger, Ok(inputs.warnings.iter().map(ToString::to_string).collect()));
        Ok(Applied { version, admin_port })
    }
}

/// The inputs' file watch. inotify watches an inode, not a path: a directory replaced whole
/// (`rm -rf inv; mkdir inv`, `mv inv.new inv`, a ConfigMap volume's swap) would leave the watch
/// on the old one for good. So the parent of every watched directory is watched too (its
/// entries appearing or moving are changes), and [`Watcher::rearm`], called before each reload,
/// moves a watch to the directory that now has its path. Dropping it stops watching.
pub struct Watcher {
    inner: notify::RecommendedWatcher,
    /// Watched directory → the identity it had when its watch was set (`None`: not set, e.g. it
    /// did not exist).
    armed: BTreeMap<PathBuf, Option<Identity>>,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher").field("armed", &self.armed).finish_non_exhaustive()
    }
}

/// What tells a directory from the one that had its path before: device, inode and birth time
/// (a directory deleted and created again often gets its inode number back).
type Identity = (u64, u64, Option<SystemTime>);

fn identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok().filter(std::fs::Metadata::is_dir)?;
    Some((m.dev(), m.ino(), m.created().ok()))
}

/// Directory → file names of interest in it (`None`: every YAML file, for an inventory dir).
type Interest = BTreeMap<PathBuf, Option<Vec<OsString>>>;

/// Watches the inputs; each relevant change sends `()` on `tx` (a full channel means a reload
/// is already pending, which covers this change too).
///
/// # Errors
/// The watch could not be set up (inotify limits, a vanished directory).
pub fn watch(sources: &Sources, tx: mpsc::Sender<()>) -> notify::Result<Watcher> {
    let mut dirs: Interest = BTreeMap::new();
    let mut add_file = |path: &Path| {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
            let e = dirs.entry(dir.to_path_buf()).or_insert_with(|| Some(Vec::new()));
            if let Some(names) = e {
                names.push(name.to_owned());
            }
        }
    };
    add_file(&sources.dataplane_file);
    if sources.dataplanes.is_dir() {
        let abs = std::path::absolute(&sources.dataplanes).unwrap_or_else(|_| sources.dataplanes.clone());
        dirs.insert(abs, None);
    } else {
        add_file(&sources.dataplanes);
    }
    // The parents of the watched directories: an event there on a watched directory's own path
    // means it was replaced (or removed, or created).
    let parents: BTreeSet<PathBuf> = dirs.keys().filter_map(|d| d.parent().map(Path::to_path_buf)).collect();
    let filter = dirs.clone();
    let inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // Reads (our own reloads among them) must not trigger reloads.
        let relevant_kind = matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Modify(_)
                | EventKind::Remove(_)
                | EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
        if relevant_kind && event.paths.iter().any(|p| filter.contains_key(p) || concerns(&filter, p)) {
            let _ = tx.try_send(());
        }
    })?;
    let mut watcher = Watcher { inner, armed: BTreeMap::new() };
    for parent in parents.iter().filter(|p| !dirs.contains_key(*p)) {
        // Best effort: `/` or an unreadable parent only loses the directory-swap detection.
        match watcher.inner.watch(parent, RecursiveMode::NonRecursive) {
            Ok(()) => {}
            Err(e) => {
                warn!(dir = %parent.display(), error = %e, "cannot watch a parent of the configuration; a replaced directory is seen on SIGHUP only")
            }
        }
    }
    for dir in dirs.keys() {
        watcher.inner.watch(dir, RecursiveMode::NonRecursive)?;
        watcher.armed.insert(dir.clone(), identity(dir));
        info!(dir = %dir.display(), "watching for configuration changes");
    }
    Ok(watcher)
}

impl Watcher {
    /// Moves the watch of every directory that was replaced (or created) since it was set to
    /// the directory now at its path. Cheap when nothing changed: one `stat` per directory.
    pub fn rearm(&mut self) {
        for (dir, armed) in &mut self.armed {
            let now = identity(dir);
            if now == *armed {
                continue;
            }
            // The old watch went with the old directory (or will, once it is deleted).
            let _ = self.inner.unwatch(dir);
            if now.is_none() {
                warn!(dir = %dir.display(), "a watched configuration directory is gone; watching its parent for it to come back");
                *armed = None;
                continue;
            }
            match self.inner.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    info!(dir = %dir.display(), "configuration directory replaced; watching the new one");
                    *armed = now;
                }
                Err(e) => warn!(dir = %dir.display(), error = %e, "cannot watch the replaced configuration directory"),
            }
        }
    }
}

/// Input files' sizes and modification times, to tell a file still being written from a
/// settled one.
#[derive(Debug, PartialEq, Eq)]
pub struct Fingerprint {
    files: Vec<(PathBuf, u64, Option<SystemTime>)>,
    /// The inventory is a directory without a YAML file.
    empty_dir: bool,
}

impl Fingerprint {
    /// The current state of every input file (the YAML files of an inventory directory).
    #[must_use]
    pub fn read(sources: &Sources) -> Self {
        let mut files = vec![sources.dataplane_file.clone()];
        let mut empty_dir = false;
        if sources.dataplanes.is_dir() {
            // The files the loader reads (an unreadable directory: the load reports it).
            if let Ok(yaml) = config::yaml_files(&sources.dataplanes) {
                empty_dir = yaml.is_empty();
                files.extend(yaml);
            }
        } else {
            files.push(sources.dataplanes.clone());
        }
        let files = files
            .into_iter()
            .map(|f| {
                let m = std::fs::metadata(&f).ok();
                let len = m.as_ref().map_or(u64::MAX, std::fs::Metadata::len);
                let modified = m.and_then(|m| m.modified().ok());
                (f, len, modified)
            })
            .collect();
        Self { files, empty_dir }
    }

    /// Some input is empty: a file (a writer that truncated it may not have written yet) or the
    /// inventory directory (one replaced by `rm -rf; mkdir; cp` may not be filled yet).
    #[must_use]
    pub fn has_empty_input(&self) -> bool {
        self.empty_dir || self.files.iter().any(|(_, len, _)| *len == 0)
    }
}

/// An event on `path` concerns the inputs: one of the watched files, a YAML file of a watched
/// inventory directory, or a Kubernetes-style `..data` symlink swap in either.
fn concerns(dirs: &BTreeMap<PathBuf, Option<Vec<OsString>>>, path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return false };
    let Some(names) = dirs.get(dir) else { return false };
    if name.to_string_lossy().starts_with("..") {
        return true;
    }
    match names {
        Some(names) => names.iter().any(|n| n == name),
        None => {
            let n = name.to_string_lossy();
            !n.starts_with('.') && (n.ends_with(".yaml") || n.ends_with(".yml"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to 3 s for a change notification.
    fn changed(rx: &mut mpsc::Receiver<()>) -> bool {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < end {
            if rx.try_recv().is_ok() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// A directory deleted and created again (which usually gets its inode number back) is
    /// watched again after `rearm`: a later write in it is seen.
    #[test]
    fn a_recreated_inventory_directory_is_watched_again() {
        let root = std::env::temp_dir().join(format!("zi-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let inv = root.join("inv");
        std::fs::create_dir_all(&inv).expect("mkdir");
        std::fs::write(root.join("zi.yaml"), "x").expect("write");
        std::fs::write(inv.join("a.yaml"), "a").expect("write");
        let sources = Sources { dataplane_file: root.join("zi.yaml"), dataplanes: inv.clone(), ..Sources::default() };
        let (tx, mut rx) = mpsc::channel(1);
        let mut watcher = watch(&sources, tx).expect("watch");
        std::fs::write(inv.join("a.yaml"), "b").expect("rewrite");
        assert!(changed(&mut rx), "a write in the directory");
        std::fs::remove_dir_all(&inv).expect("rm -rf");
        std::fs::create_dir(&inv).expect("mkdir again");
        assert!(changed(&mut rx), "the directory replaced (seen through its parent)");
        watcher.rearm();
        // Let the events of the swap arrive, then forget them.
        std::thread::sleep(std::time::Duration::from_millis(300));
        while rx.try_recv().is_ok() {}
        std::fs::write(inv.join("c.yaml"), "c").expect("write in the new directory");
        assert!(changed(&mut rx), "a write in the new directory after rearm");
        drop(watcher);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn only_input_files_concern_a_reload() {
        let mut dirs = BTreeMap::new();
        dirs.insert(PathBuf::from("/etc/zi"), Some(vec![OsString::from("zoneingress.yaml")]));
        dirs.insert(PathBuf::from("/etc/zi/dps"), None);
        assert!(concerns(&dirs, Path::new("/etc/zi/zoneingress.yaml")));
        assert!(concerns(&dirs, Path::new("/etc/zi/..data")));
        assert!(!concerns(&dirs, Path::new("/etc/zi/other.yaml")));
        assert!(concerns(&dirs, Path::new("/etc/zi/dps/backend.yml")));
        assert!(!concerns(&dirs, Path::new("/etc/zi/dps/.backend.yaml.swp")));
        assert!(!concerns(&dirs, Path::new("/etc/zi/dps/readme.txt")));
        assert!(!concerns(&dirs, Path::new("/tmp/zoneingress.yaml")));
    }
}
