//! The daemon as a real process inside the ingress namespace, with its config files and log.

use std::{
    ffi::OsString,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// Where the daemon binary is (set by `cargo xtask test`/`demo`).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ZONE_INGRESS_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/zone-ingress")
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "zi-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // ZI_KEEP_SCRATCH=1 keeps configs and daemon logs for a failing test's post-mortem.
        if std::env::var_os("ZI_KEEP_SCRATCH").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A ZoneIngress resource listening on `addr:port`.
pub fn zone_ingress_yaml(address: &str, port: u16, admin_port: u16) -> String {
    format!(
        "type: ZoneIngress\nname: zi-test\nnetworking:\n  address: {address}\n  port: {port}\n  advertisedAddress: 198.18.100.1\n  advertisedPort: {port}\n  admin:\n    port: {admin_port}\n"
    )
}

/// A running daemon. Stopped with SIGTERM (then SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub scratch: Scratch,
}

impl Daemon {
    /// Starts `zone-ingress run` in `ns` with the given files and extra flags; waits for "ready".
    pub fn start(ns: &Netns, zone_ingress: &str, dataplanes: &str, args: &[&str]) -> Self {
        Self::start_logged(ns, zone_ingress, dataplanes, args, "info")
    }

    /// [`Daemon::start`] with `RUST_LOG=log_filter` (`ZI_TEST_LOG`, when set, wins).
    pub fn start_logged(ns: &Netns, zone_ingress: &str, dataplanes: &str, args: &[&str], log_filter: &str) -> Self {
        let scratch = Scratch::new("daemon");
        let zi = scratch.write("zoneingress.yaml", zone_ingress);
        let dps = scratch.write("dataplanes.yaml", dataplanes);
        Self::spawn(ns, scratch, &zi, &dps, args, log_filter)
    }

    pub fn start_files(ns: &Netns, scratch: Scratch, zi: &Path, dps: &Path, args: &[&str]) -> Self {
        Self::spawn(ns, scratch, zi, dps, args, "info")
    }

    fn spawn(ns: &Netns, scratch: Scratch, zi: &Path, dps: &Path, args: &[&str], log_filter: &str) -> Self {
        let mut all: Vec<OsString> = vec!["--dataplane-file".into(), zi.into(), "--dataplanes".into(), dps.into()];
        all.extend(args.iter().map(OsString::from));
        let mut d = Self::launch(ns, scratch, &all, log_filter);
        d.expect_ready(Duration::from_secs(20));
        d
    }

    /// Starts `zone-ingress run ARGS` in `ns` as given (no input flags added) and returns at
    /// once, without waiting for "ready".
    pub fn launch(ns: &Netns, scratch: Scratch, args: &[OsString], log_filter: &str) -> Self {
        let bin = binary();
        assert!(bin.exists(), "daemon binary {} missing: run through `cargo xtask test`", bin.display());
        Self::launch_under(ns, scratch, &[bin.to_str().expect("utf-8 path")], args, log_filter)
    }

    /// [`Daemon::launch`] with a command line of its own before `run ARGS`: a wrapper and the
    /// daemon's path (`setpriv ... /path/to/zone-ingress`).
    pub fn launch_under(ns: &Netns, scratch: Scratch, argv: &[&str], args: &[OsString], log_filter: &str) -> Self {
        let log = scratch.0.join("daemon.log");
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log fd");
        let (program, rest) = argv.split_first().expect("a program");
        let child = ns
            .command(program)
            .args(rest)
            .arg("run")
            .args(args)
            .env("RUST_LOG", std::env::var("ZI_TEST_LOG").unwrap_or_else(|_| log_filter.to_owned()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn daemon");
        Self { child: Some(child), log, scratch }
    }

    /// Panics unless the daemon logs " ready " within `timeout` and is still running then.
    pub fn expect_ready(&mut self, timeout: Duration) {
        // The line `... app: ready listen=...` (not "already in use", say), from a live process.
        if !self.wait_log(" ready ", timeout) {
            panic!("daemon did not become ready:\n{}", self.log_text());
        }
        if self.exited().is_some() {
            panic!("daemon exited right after getting ready:\n{}", self.log_text());
        }
    }

    /// The exit status, once the daemon has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (bounded) for the daemon to exit on its own; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the log for `needle` (bounded by `timeout`).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Polls until `needle` appears at least `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.log_text().matches(needle).count() >= n {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the daemon (by its PID).
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(libc::pid_t::try_from(c.id()).expect("pid"), sig) };
        }
    }

    /// SIGTERM and wait (bounded); returns the exit status.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take()?;
        wait_or_kill(&mut child, timeout)
    }
}

/// Waits for `child` to exit, at most `timeout`; then kills it (our own child, by its PID) and
/// returns `None`.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
    }
}
