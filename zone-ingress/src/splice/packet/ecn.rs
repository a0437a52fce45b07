//! Asking the backend for ECN when the client leg has it (docs/design.md#ecn).
//!
//! The listener accepts ECN from a client that asks for it (Linux's default), but a connect
//! asks for it only under `net.ipv4.tcp_ecn=1`, which Linux does not set: an ECN-asking client
//! would have ECN on its leg alone, and such a flow cannot be forwarded at packet level. The
//! kernel has no socket option for it, but TCP asks a cgroup's sock_ops program whether a socket
//! about to send its SYN needs ECN (`BPF_SOCK_OPS_NEEDS_ECN`). The daemon attaches
//! `packet_ecn` to its own cgroup (v2) and lists, for the length of a connect, the backend
//! socket whose client leg has ECN; the program answers yes for those sockets only.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    programs::{CgroupAttachMode, SockOps},
};
use tracing::warn;
use zone_ingress_ebpf::packet as abi;

use crate::{ebpf::Object, sys, sys::bpf::BpfMap};

/// The attached program and its map.
pub(super) struct EcnAsk {
    asks: BpfMap<u64, u8>,
}

impl EcnAsk {
    /// Loads `packet_ecn` and attaches it to this process's cgroup (v2). The link lives as
    /// long as `object`: it is detached when the daemon exits.
    ///
    /// # Errors
    /// No cgroup v2 hierarchy, or the kernel refused the program or the attachment.
    pub(super) fn attach(object: &Object) -> anyhow::Result<(Self, PathBuf)> {
        let (dir, cgroup) = open_own_cgroup().context("opening this process's cgroup (v2)")?;
        let asks: HashMap<MapData, u64, u8> = object.take_map(abi::ECN_ASK)?;
        let asks = BpfMap::new(asks.map().fd().as_fd().try_clone_to_owned()?);
        let mut ebpf = object.lock();
        let prog: &mut SockOps = ebpf
            .program_mut(abi::ECN_PROG)
            .with_context(|| format!("{} missing from the eBPF object", abi::ECN_PROG))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {}", abi::ECN_PROG))?;
        // A link (Linux ≥ 5.7), which runs beside whatever else the cgroup runs (the kernel
        // takes no mode flag for links): the program answers for its own sockets only.
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {} to {}", abi::ECN_PROG, cgroup.display()))?;
        Ok((Self { asks }, cgroup))
    }

    /// Makes the connect of `socket` (not yet connected) ask for ECN, until the returned guard
    /// drops: keep it until the connect has returned.
    ///
    /// # Errors
    /// The socket's cookie could not be read, or the map refused the entry.
    pub(super) fn ask(&self, socket: BorrowedFd<'_>) -> io::Result<Asking<'_>> {
        let cookie = sys::socket_cookie(socket)?;
        self.asks.insert(&cookie, &1)?;
        Ok(Asking { asks: &self.asks, cookie })
    }
}

/// A socket listed in `PKT_ECN_ASK`; dropping it removes the entry.
pub struct Asking<'a> {
    asks: &'a BpfMap<u64, u8>,
    cookie: u64,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        // The map is an LRU: an entry that could not be removed is evicted in time.
        let _ = self.asks.remove(&self.cookie);
    }
}

/// This process's cgroup directory in the cgroup v2 hierarchy, opened, and its path. Where no
/// cgroup2 file system in this mount namespace shows it (none mounted: `ip netns exec` mounts
/// a fresh /sys; or a mounted subtree without it), one is mounted on a directory of its own for
/// as long as the open takes.
fn open_own_cgroup() -> io::Result<(File, PathBuf)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = cgroups.lines().find_map(|l| l.strip_prefix("0::")).ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no `0::` line in /proc/self/cgroup (cgroup v1 only)")
    })?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(path) = cgroup_path(rel, &mounts)
        && let Ok(dir) = File::open(&path)
    {
        return Ok((dir, path));
    }
    let mount = private_dir()?;
    let opened = mount_cgroup2(&mount).and_then(|()| {
        let dir = File::open(mount.join(rel.trim_start_matches('/')));
        // Detached at once: the open directory keeps its file system alive.
        // SAFETY: a NUL-terminated path; no pointer is kept.
        if unsafe { libc::umount2(sys::c_path(&mount)?.as_ptr(), libc::MNT_DETACH) } != 0 {
            warn!(dir = %mount.display(), error = %io::Error::last_os_error(), "unmounting the cgroup2 file system mounted there failed");
        }
        dir.map(|d| (d, PathBuf::from(format!("cgroup2:{rel}"))))
    });
    if let Err(e) = std::fs::remove_dir(&mount) {
        warn!(dir = %mount.display(), error = %e, "removing a directory of the daemon's failed");
    }
    opened
}

/// A new directory only this process uses, under /run (else the temporary directory).
fn private_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let base = Path::new("/run");
    let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
    let mut random = [0u8; 8];
    // SAFETY: writes at most `random.len()` bytes into `random`.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != random.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let dir = base.join(format!("zone-ingress-cgroup2.{:016x}", u64::from_ne_bytes(random)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// `mount -t cgroup2 none <at>`.
fn mount_cgroup2(at: &Path) -> io::Result<()> {
    let target = sys::c_path(at)?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The directory of cgroup `rel` (the `0::` path of /proc/self/cgroup) under a cgroup2 mount
/// of `mounts` (/proc/self/mountinfo: the mounted subtree's root in the 4th field, the mount
/// point in the 5th, the type after the ` - ` separator) whose subtree holds it.
fn cgroup_path(rel: &str, mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let (fields, rest) = l.split_once(" - ")?;
        if rest.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = fields.split_whitespace().skip(3);
        let (root, point) = (fields.next()?, fields.next()?);
        // Below the root ("/" itself is the empty prefix), at a path component's boundary.
        let below = rel.strip_prefix(root.trim_end_matches('/'))?;
        (below.is_empty() || below.starts_with('/')).then(|| Path::new(point).join(below.trim_start_matches('/')))
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::cgroup_path;

    const MOUNTS: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - tmpfs tmpfs rw,mode=755
33 25 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
34 25 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
";

    #[test]
    fn cgroup_of_a_service_under_a_hybrid_hierarchy() {
        assert_eq!(
            cgroup_path("/system.slice/zone-ingress.service", MOUNTS).as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/system.slice/zone-ingress.service"))
        );
        assert_eq!(cgroup_path("/", MOUNTS).as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn cgroup_under_a_mounted_subtree() {
        // A container runtime without a cgroup namespace mounts its own subtree.
        let mounts = "40 30 0:29 /lxc/c1 /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_path("/lxc/c1/app", mounts).as_deref(), Some(Path::new("/sys/fs/cgroup/app")));
        assert_eq!(cgroup_path("/lxc/c1", mounts).as_deref(), Some(Path::new("/sys/fs/cgroup")));
        // Outside the subtree (or a sibling sharing its prefix): not under this mount.
        assert_eq!(cgroup_path("/lxc/c10", mounts), None);
        assert_eq!(cgroup_path("/other", mounts), None);
    }

    #[test]
    fn no_cgroup2_mount() {
        assert_eq!(cgroup_path("/", MOUNTS.lines().next().unwrap_or_default()), None);
    }
}
