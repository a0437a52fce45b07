//! Raw TCP helpers for the scripted splice tests (`tests/splice_cases.rs`, `vectors.rs`,
//! `concurrency.rs`): probe ClientHellos with any SNI, sockets with chosen buffer sizes,
//! resets, bounded reads, and what the tests observe about the daemon and the kernel (open fds,
//! BPF map entries, kernel memory, `dmesg`).
//!
//! Nothing here changes the behaviour of the other harness modules.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, IntoRawFd},
    process::Command,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

use crate::{netns::Netns, stream::Gen};

/// A probe ClientHello record carrying `sni` verbatim (no hostname syntax check: Kuma's tag
/// SNIs such as `backend{mesh=default}` are not DNS names).
pub fn probe(sni: &str) -> Vec<u8> {
    zone_ingress::client_hello::build_client_hello(Some(sni.as_bytes()), 0)
}

/// A probe ClientHello carrying `sni`, padded by about `padding` bytes.
pub fn probe_padded(sni: &str, padding: usize) -> Vec<u8> {
    zone_ingress::client_hello::build_client_hello(Some(sni.as_bytes()), padding)
}

/// A probe ClientHello with raw SNI bytes (NUL, over-long names).
pub fn probe_bytes(sni: &[u8]) -> Vec<u8> {
    zone_ingress::client_hello::build_client_hello(Some(sni), 0)
}

/// A probe ClientHello without a `server_name` extension.
pub fn probe_without_sni() -> Vec<u8> {
    zone_ingress::client_hello::build_client_hello(None, 0)
}

/// `n` deterministic pseudo-random bytes (the `stream::Gen` sequence for `seed`).
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Gen::new(seed).fill(&mut v);
    v
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Socket options applied before connect/listen (so that window scaling follows them).
#[derive(Clone, Copy, Debug, Default)]
pub struct SockOpts {
    pub rcvbuf: Option<u32>,
    pub sndbuf: Option<u32>,
    pub nodelay: bool,
}

impl SockOpts {
    pub fn nodelay() -> Self {
        Self { nodelay: true, ..Self::default() }
    }

    /// Small buffers both ways (the kernel doubles the value) and TCP_NODELAY.
    pub fn small_buffers(bytes: u32) -> Self {
        Self { rcvbuf: Some(bytes), sndbuf: Some(bytes), nodelay: true }
    }
}

fn new_socket(addr: SocketAddr, opts: SockOpts) -> io::Result<TcpSocket> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(b) = opts.rcvbuf {
        s.set_recv_buffer_size(b)?;
    }
    if let Some(b) = opts.sndbuf {
        s.set_send_buffer_size(b)?;
    }
    Ok(s)
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// Connects from `ns` to `addr` (socket created in the namespace, connected on the current
/// runtime), bounded by 5 s.
pub async fn connect(ns: &Netns, addr: SocketAddr, opts: SockOpts) -> io::Result<TcpStream> {
    let sock = ns.run(|| new_socket(addr, opts))?;
    let stream =
        tokio::time::timeout(Duration::from_secs(5), sock.connect(addr)).await.map_err(|_| timed_out("connect"))??;
    if opts.nodelay {
        stream.set_nodelay(true)?;
    }
    Ok(stream)
}

/// `n` unconnected sockets created in `ns` (one namespace switch for all of them).
pub fn sockets(ns: &Netns, addr: SocketAddr, n: usize, opts: SockOpts) -> io::Result<Vec<TcpSocket>> {
    ns.run(|| (0..n).map(|_| new_socket(addr, opts)).collect())
}

/// A listener in `ns` with the given options (inherited by accepted sockets) and backlog.
/// Must be called inside a tokio runtime.
pub fn listen(ns: &Netns, addr: SocketAddr, opts: SockOpts, backlog: i32) -> TcpListener {
    let l = ns
        .run(|| -> io::Result<std::net::TcpListener> {
            let s = new_socket(addr, opts)?;
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            let fd = s.into_raw_fd();
            // SAFETY: `fd` is a bound socket we own; from_raw_fd takes ownership below.
            let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            // SAFETY: plain syscall on an fd we own.
            if unsafe { libc::listen(l.as_raw_fd(), backlog) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(l)
        })
        .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", ns.name));
    l.set_nonblocking(true).expect("nonblocking");
    TcpListener::from_std(l).expect("tokio listener")
}

fn setsockopt_int(fd: i32, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: `v` lives across the call and its size is passed.
    let r = unsafe { libc::setsockopt(fd, level, name, (&raw const v).cast(), size_of::<i32>() as libc::socklen_t) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `SO_LINGER {1, 0}`: the next close sends RST.
pub fn set_linger_zero(s: &impl AsRawFd) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `l` lives across the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `TCP_CORK`: hold partial segments (so that a FIN sent while corked rides on the data).
pub fn set_cork(s: &impl AsRawFd, on: bool) -> io::Result<()> {
    setsockopt_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CORK, i32::from(on))
}

/// `shutdown(SHUT_WR)` right now (no flush of a userspace buffer: there is none on a raw
/// `TcpStream`).
pub fn shutdown_write(s: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a live fd.
    if unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Waits (polling every 2 ms, at most `timeout`) until every byte written to `s` has been
/// acknowledged (`SIOCOUTQ` is 0): a FIN sent after that goes out alone, on no data segment.
pub async fn wait_all_acked(s: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if queued == 0 {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(timed_out(&format!("acknowledgement of {queued} queued bytes")));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// How a read loop ended.
#[derive(Debug)]
pub enum End {
    /// Clean EOF (FIN).
    Eof,
    /// A read error (e.g. `ConnectionReset`).
    Error(io::Error),
    /// Neither within the time limit.
    TimedOut,
    /// Stopped after `max` bytes without seeing the end.
    Limit,
}

impl End {
    pub fn is_eof(&self) -> bool {
        matches!(self, Self::Eof)
    }

    pub fn is_reset(&self) -> bool {
        matches!(self, Self::Error(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

/// Reads until EOF, an error, `max` bytes or `timeout` (overall), returning what was read.
pub async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R, max: usize, timeout: Duration) -> (Vec<u8>, End) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        if out.len() >= max {
            return (out, End::Limit);
        }
        let want = buf.len().min(max - out.len()).max(1);
        match tokio::time::timeout_at(deadline, r.read(&mut buf[..want])).await {
            Err(_) => return (out, End::TimedOut),
            Ok(Ok(0)) => return (out, End::Eof),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (out, End::Error(e)),
        }
    }
}

/// Reads exactly `n` bytes within `timeout`.
pub async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, n: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    tokio::time::timeout(timeout, r.read_exact(&mut v)).await.map_err(|_| timed_out("read_exact"))??;
    Ok(v)
}

/// Writes all of `data` within `timeout`.
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8], timeout: Duration) -> io::Result<()> {
    tokio::time::timeout(timeout, w.write_all(data)).await.map_err(|_| timed_out("write_all"))?
}

/// Accepts one connection within `timeout`.
pub async fn accept(l: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    let (s, _) = tokio::time::timeout(timeout, l.accept()).await.map_err(|_| timed_out("accept"))??;
    Ok(s)
}

/// Where the first byte differs, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Panics with the first differing offset unless `got == want`.
#[track_caller]
pub fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        panic!(
            "{what}: {} bytes received, {} expected, first difference at byte {:?} (SHA-256 {} vs {})",
            got.len(),
            want.len(),
            first_difference(got, want),
            hex(&sha256(got)),
            hex(&sha256(want))
        );
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The daemon's log.

/// Log lines containing every needle.
pub fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines().filter(|l| needles.iter().all(|n| l.contains(n))).collect()
}

/// The `connection closed` / `connection rejected` access line of the client at `client`
/// (its local address as the daemon saw it), polled for up to `timeout`.
pub fn wait_access_line(
    log_path: &std::path::Path,
    client: SocketAddr,
    what: &str,
    timeout: Duration,
) -> Option<String> {
    let needle = format!("client={client} ");
    let end = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if let Some(l) =
            log.lines().find(|l| l.contains(what) && (l.contains(&needle) || l.ends_with(&format!("client={client}"))))
        {
            return Some(l.to_owned());
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of `key=` in a tracing text line (quotes removed).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if let Some(q) = rest.strip_prefix('"') {
        return q.find('"').map(|e| &q[..e]);
    }
    Some(rest.split_whitespace().next().unwrap_or(""))
}

// ---------------------------------------------------------------------------------------------
// The daemon process and its BPF maps.

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// IDs of the BPF maps process `pid` holds an fd of (from `/proc/<pid>/fdinfo`).
pub fn bpf_map_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return ids };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        if let Some(id) = text.lines().find_map(|l| l.strip_prefix("map_id:")).and_then(|v| v.trim().parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| format!("running bpftool: {e} (install it with `cargo xtask setup`)"))?;
    if !out.status.success() {
        return Err(format!("bpftool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("bpftool {} printed no JSON: {e}", args.join(" ")))
}

/// The id of the map called `name` held by process `pid` (so that other daemons running on the
/// machine at the same time do not count).
pub fn daemon_map_id(pid: u32, name: &str) -> Result<u32, String> {
    for id in bpf_map_ids(pid) {
        let v = bpftool_json(&["map", "show", "id", &id.to_string()])?;
        if v.get("name").and_then(serde_json::Value::as_str) == Some(name) {
            return Ok(id);
        }
    }
    Err(format!("process {pid} holds no BPF map named {name}"))
}

/// Entries of map `id` (`bpftool -j map dump id <id>`: a JSON array).
pub fn map_entries(id: u32) -> Result<usize, String> {
    let v = bpftool_json(&["map", "dump", "id", &id.to_string()])?;
    v.as_array().map(Vec::len).ok_or_else(|| format!("bpftool map dump id {id}: not a JSON array: {v}"))
}

/// Raises this process's soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer / in-pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0, "getrlimit");
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim),
            0,
            "setrlimit: {}",
            io::Error::last_os_error()
        );
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// Kernel memory.

/// `/proc/meminfo` in bytes by key.
pub fn meminfo() -> HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kb: u64 = v.split_whitespace().next()?.parse().ok()?;
            Some((k.to_owned(), kb * 1024))
        })
        .collect()
}

/// One sample of kernel memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemSample {
    /// Since the start of the sampling.
    pub at: Duration,
    /// `Slab` of /proc/meminfo.
    pub slab: u64,
    /// Memory neither free nor user-owned: MemTotal − MemFree − Buffers − Cached − SwapCached −
    /// AnonPages. Covers slab, page tables, kernel stacks and pages held by the kernel outside
    /// any counter, such as the payload pages of skbs waiting in a psock queue.
    pub kernel: u64,
    /// `TCP: ... mem <pages>` of /proc/net/sockstat, in bytes.
    pub tcp_mem: u64,
}

impl MemSample {
    pub fn take(at: Duration) -> Self {
        let m = meminfo();
        let g = |k: &str| m.get(k).copied().unwrap_or(0);
        let kernel = g("MemTotal")
            .saturating_sub(g("MemFree"))
            .saturating_sub(g("Buffers"))
            .saturating_sub(g("Cached"))
            .saturating_sub(g("SwapCached"))
            .saturating_sub(g("AnonPages"));
        let tcp_mem = sockstat_tcp_mem_pages(&std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default()) * 4096;
        Self { at, slab: g("Slab"), kernel, tcp_mem }
    }
}

/// Kernel memory growth over `base` that lasted three consecutive samples: other processes move
/// these counters for an instant; a queue that holds memory holds it longer. 0 with fewer than
/// three samples.
pub fn lasting_growth(samples: &[MemSample], base: &MemSample) -> u64 {
    let growth: Vec<u64> = samples.iter().map(|s| s.kernel.saturating_sub(base.kernel)).collect();
    growth.windows(3).map(|w| w.iter().copied().min().unwrap_or(0)).max().unwrap_or(0)
}

/// The `mem` pages of the `TCP:` line of a sockstat text.
pub fn sockstat_tcp_mem_pages(text: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter().position(|x| *x == "mem").and_then(|i| w.get(i + 1)).and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `/proc/net/sockstat` as seen from `ns`.
pub fn sockstat(ns: &Netns) -> String {
    ns.command("cat")
        .arg("/proc/net/sockstat")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `ss -Htn <args>` in `ns` for the TCP sockets with local or remote port `port` (`args` may add
/// columns and a state filter).
pub fn ss_port(ns: &Netns, args: &[&str], port: u16) -> String {
    ns.command("ss")
        .arg("-Htn")
        .args(args)
        .arg(format!("( sport = :{port} or dport = :{port} )"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `ss -tanmi` in `ns` (TCP sockets with their states, queues and memory), for failure reports.
pub fn ss(ns: &Netns) -> String {
    ns.command("ss").arg("-tanmi").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

pub fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

// ---------------------------------------------------------------------------------------------
// dmesg.

/// The kernel log, one line per entry. `Err` with a clear message when it cannot be read.
pub fn dmesg() -> Result<Vec<String>, String> {
    let out = Command::new("dmesg").output().map_err(|e| format!("cannot run dmesg: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "dmesg is not readable ({}): {} — the kernel-warning check needs it (root, kernel.dmesg_restrict)",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}

/// Names whose appearance in a splat ties it to the splice path.
pub const SPLICE_KERNEL_SYMBOLS: [&str; 8] =
    ["sk_psock", "skmsg", "tcp_bpf", "sock_map", "sockmap", "sk_skb", "bpf_sk_redirect", "sk_msg"];

/// Kernel splats (`WARNING:`, `BUG:`, oopses) that are new since `before` and mention the
/// splice path in their first line or their call trace (the 60 lines after it).
pub fn new_splice_splats(before: &[String], after: &[String]) -> Vec<String> {
    let old: HashSet<&String> = before.iter().collect();
    let mut out = Vec::new();
    for (i, line) in after.iter().enumerate() {
        if old.contains(line) {
            continue;
        }
        let splat =
            ["WARNING:", "BUG:", "Oops", "general protection fault", "kernel BUG"].iter().any(|k| line.contains(k));
        if !splat {
            continue;
        }
        let window: Vec<&String> = after[i..after.len().min(i + 60)].iter().collect();
        if window.iter().any(|l| SPLICE_KERNEL_SYMBOLS.iter().any(|s| l.contains(s))) {
            out.push(window.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n"));
        }
    }
    out
}
