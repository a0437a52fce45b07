//! The benchmarks' network: three namespaces joined by veth pairs, and a guard that removes them
//! (and every process started in them) whatever happens.
//!
//! `<prefix>-c` client 198.18.0.1 (`c0`) ─veth─ (`i0`) `<prefix>-i` ingress 198.18.0.2 |
//! 198.18.1.1 (`i1`) ─veth─ (`d0`) `<prefix>-d` dataplane 198.18.1.2. The dataplane routes
//! 198.18.0.0/24 back through the ingress; with [`Topology::forward`] the client routes
//! 198.18.1.0/24 through the ingress too, and the ingress forwards IP.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xtask::exec;

/// The ingress namespace's address on the client link.
pub(crate) const INGRESS: &str = "198.18.0.2";
/// The dataplane namespace's address.
pub(crate) const DP: &str = "198.18.1.2";

/// The names of the three namespaces, and whether the ingress routes between the other two.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Topology {
    pub client: &'static str,
    pub ingress: &'static str,
    pub dataplane: &'static str,
    /// The client routes 198.18.1.0/24 via the ingress, which forwards IP (a "direct" path).
    pub forward: bool,
}

impl Topology {
    fn namespaces(&self) -> [&'static str; 3] {
        [self.client, self.ingress, self.dataplane]
    }

    /// Removes the namespaces, if they exist.
    fn delete(&self) {
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }

    /// Creates the namespaces (replacing any left over), links, addresses and routes.
    pub(crate) fn create(&self) -> anyhow::Result<()> {
        self.delete();
        for ns in self.namespaces() {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (c, i, d) = (self.client, self.ingress, self.dataplane);
        ip(&["link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "i0", "netns", i])?;
        ip(&["link", "add", "i1", "netns", i, "type", "veth", "peer", "name", "d0", "netns", d])?;
        for (ns, dev, addr) in [
            (c, "c0", "198.18.0.1/24"),
            (i, "i0", "198.18.0.2/24"),
            (i, "i1", "198.18.1.1/24"),
            (d, "d0", "198.18.1.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        if self.forward {
            ip(&["-n", c, "route", "add", "198.18.1.0/24", "via", "198.18.0.2"])?;
        }
        ip(&["-n", d, "route", "add", "198.18.0.0/24", "via", "198.18.1.1"])?;
        if self.forward {
            exec(nsexec(i).args(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))?;
        }
        // The connecting sides open tens of thousands of short connections over a run (the idle
        // flows, the connection rate), each leaving a TIME_WAIT socket for 60 s: a wide port
        // range, and TIME_WAIT reuse for new outgoing connections. In the ingress namespace the
        // kernel's range stops at 32767: zone-ingress's packet splice takes its own source ports
        // above it (its default, `--packet-ports`), HAProxy and nginx connect from the kernel's.
        for (ns, range) in [(c, "1024 65535"), (i, "1024 32767")] {
            exec(nsexec(ns).args([
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.ip_local_port_range={range}"),
                "net.ipv4.tcp_tw_reuse=1",
            ]))?;
        }
        Ok(())
    }
}

/// Processes and namespaces to remove, whatever happens: on drop, every child still held is
/// stopped ([`kill`]) and the namespaces are deleted. SIGINT and SIGTERM only set a flag, which
/// [`Guard::check`] turns into an error, so the drop still runs.
pub(crate) struct Guard {
    topology: Topology,
    children: Vec<Child>,
    stop: Arc<AtomicBool>,
}

impl Guard {
    /// A guard for `topology` (not created yet); registers the SIGINT/SIGTERM flag.
    pub(crate) fn new(topology: Topology) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, Arc::clone(&stop))?;
        }
        Ok(Self { topology, children: Vec::new(), stop })
    }

    /// Fails once SIGINT or SIGTERM arrived.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Takes `child` into the guard's care; returns its PID (for [`stop`]).
    pub(crate) fn adopt(&mut self, child: Child) -> u32 {
        let pid = child.id();
        self.children.push(child);
        pid
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            kill(c);
        }
        self.topology.delete();
    }
}

/// SIGTERM, then SIGKILL if `child` has not exited within 5 s; reaps it.
pub(crate) fn kill(child: &mut Child) {
    // SAFETY: signalling a child we spawned, by PID.
    unsafe { libc::kill(libc::pid_t::try_from(child.id()).unwrap_or(0), libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `ip <args>` (stdout discarded), failing on a non-zero exit.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    exec(Command::new("ip").args(args).stdout(Stdio::null()))
}

/// `ip netns exec <ns>`, to append a command to.
pub(crate) fn nsexec(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    c
}

/// Starts `args` in `ns` with stdout and stderr to `log`, held by `guard`; returns its PID.
pub(crate) fn spawn(guard: &mut Guard, ns: &str, args: &[&str], log: &Path) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log)?;
    let child = nsexec(ns)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("spawning {args:?}"))?;
    Ok(guard.adopt(child))
}

/// Stops the child `pid` of `guard` ([`kill`]), if it holds it.
pub(crate) fn stop(guard: &mut Guard, pid: u32) {
    if let Some(i) = guard.children.iter().position(|c| c.id() == pid) {
        let mut c = guard.children.remove(i);
        kill(&mut c);
    }
}

/// Waits until something accepts TCP on `addr` inside `ns` (bounded).
pub(crate) fn wait_port(ns: &str, addr: &str, port: u16) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let ok = nsexec(ns)
            .args(["bash", "-c", &format!("exec 3<>/dev/tcp/{addr}/{port}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr}:{port} in {ns}")
}

/// Median, min and max of `v` (`None` when empty).
pub(crate) fn median(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = if v.len() % 2 == 1 { v[v.len() / 2] } else { f64::midpoint(v[v.len() / 2 - 1], v[v.len() / 2]) };
    Some((mid, v[0], v[v.len() - 1]))
}
