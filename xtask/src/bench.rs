//! `cargo xtask bench`: zone-ingress side by side with direct routing, HAProxy (with and without
//! splice(2)) and nginx stream + ssl_preread, in one run, interleaved round by round.
//!
//! Topology (`crate::netns`; namespaces created here, removed at the end, even when interrupted):
//! `zib-c` client 198.18.0.1 ─veth─ `zib-i` ingress 198.18.0.2 | 198.18.1.1 ─veth─ `zib-d`
//! dataplane 198.18.1.2. The ingress namespace also forwards IP, which is the "direct" path.
//! Every system under test listens on 198.18.0.2:10001; one runs at a time.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::{Value, json};
use xtask::{exec, output};

use crate::netns::{DP, Guard, INGRESS, Topology, median, nsexec, spawn, stop, wait_port};

const NET: Topology = Topology { client: "zib-c", ingress: "zib-i", dataplane: "zib-d", forward: true };
const LISTEN_PORT: u16 = 10001;
const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const TLS_PORT: u16 = 8443;
const HOLD_PORT: u16 = 9000;
const HASH_PORT: u16 = 7000;

/// Debian packages of the peers and load generators.
pub(crate) const BENCH_PACKAGES: &[&str] = &["iperf3", "haproxy", "nginx", "libnginx-mod-stream", "sockperf"];

#[derive(Debug, Parser)]
pub(crate) struct Options {
    /// Every path once, briefly, with byte checks (what the test suite runs).
    #[arg(long)]
    pub quick: bool,
    /// Rounds (each runs every system once per metric, in rotating order).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per throughput / latency / connection-rate measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Idle flows for the memory-per-flow figure. The descriptor hard limit of these machines
    /// (20,000, and no CAP_SYS_RESOURCE to raise it) keeps it under 10,000: every proxy holds
    /// two sockets per flow.
    #[arg(long, default_value_t = 9_900)]
    pub flows: usize,
    /// Only these systems (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Only these measurements (comma-separated: integrity, bulk, latency, conn, idle); the
    /// others' columns show "–". For a quick look at one figure; a published table has them all.
    #[arg(long, value_delimiter = ',', value_parser = ["integrity", "bulk", "latency", "conn", "idle"])]
    pub phases: Vec<String>,
    /// Instead: the XDP guard's drop rate against nftables, and its cost on passing traffic
    /// (`bench_xdp.rs`).
    #[arg(long)]
    pub xdp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Direct,
    ZiPacket,
    ZiKernel,
    ZiUserspace,
    Haproxy,
    HaproxySplice,
    Nginx,
}

impl System {
    const ALL: [Self; 7] = [
        Self::Direct,
        Self::ZiPacket,
        Self::ZiKernel,
        Self::ZiUserspace,
        Self::Haproxy,
        Self::HaproxySplice,
        Self::Nginx,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::ZiPacket => "zone-ingress packet",
            Self::ZiKernel => "zone-ingress kernel",
            Self::ZiUserspace => "zone-ingress userspace",
            Self::Haproxy => "haproxy",
            Self::HaproxySplice => "haproxy splice",
            Self::Nginx => "nginx ssl_preread",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::ZiPacket => "zi-packet",
            Self::ZiKernel => "zi-kernel",
            Self::ZiUserspace => "zi-userspace",
            Self::Haproxy => "haproxy",
            Self::HaproxySplice => "haproxy-splice",
            Self::Nginx => "nginx",
        }
    }
}

/// What a plaintext connection is routed to during one phase.
#[derive(Clone, Copy)]
enum Phase {
    Iperf,
    Sockperf,
    Tls,
    Hold,
    Hash,
}

impl Phase {
    fn plaintext_port(self) -> u16 {
        match self {
            Self::Iperf => IPERF_PORT,
            Self::Sockperf => SOCKPERF_PORT,
            Self::Tls => TLS_PORT,
            Self::Hold => HOLD_PORT,
            Self::Hash => HASH_PORT,
        }
    }

    fn plaintext_service(self) -> &'static str {
        match self {
            Self::Iperf => "iperf",
            Self::Sockperf => "sockperf",
            Self::Tls => "bench",
            Self::Hold => "hold",
            Self::Hash => "hash",
        }
    }
}

/// FNV-1a-64, for the MeshService SNI of the TLS service (docs/design.md#sni-formats).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn tls_sni() -> String {
    format!("a{:016x}.bench.{TLS_PORT}.default.ms", fnv1a64(b"bench;default;"))
}

struct Ctx {
    dir: PathBuf,
    daemon: PathBuf,
    benchtool: PathBuf,
}

/// Starts `system` configured for `phase`; returns the PIDs to stop and to measure.
fn start_system(guard: &mut Guard, ctx: &Ctx, system: System, phase: Phase) -> anyhow::Result<Vec<u32>> {
    let log = ctx.dir.join(format!("{}.log", system.key()));
    let backend = format!("{DP}:{}", phase.plaintext_port());
    let pids = match system {
        System::Direct => Vec::new(),
        System::ZiPacket | System::ZiKernel | System::ZiUserspace => {
            let args = zi_args(ctx, system, phase);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            vec![spawn(guard, NET.ingress, &args, &log)?]
        }
        System::Haproxy | System::HaproxySplice => {
            let cfg = ctx.dir.join(format!("{}.cfg", system.key()));
            std::fs::write(&cfg, haproxy_config(system == System::HaproxySplice, &backend))?;
            vec![spawn(guard, NET.ingress, &["haproxy", "-db", "-f", cfg.to_str().context("path")?], &log)?]
        }
        System::Nginx => {
            let cfg = ctx.dir.join("nginx.conf");
            std::fs::write(&cfg, nginx_config(&ctx.dir, &backend))?;
            vec![spawn(guard, NET.ingress, &["nginx", "-c", cfg.to_str().context("path")?, "-g", "daemon off;"], &log)?]
        }
    };
    if system != System::Direct {
        wait_port(NET.client, INGRESS, LISTEN_PORT)
            .with_context(|| format!("{} did not start; see {}", system.name(), log.display()))?;
    }
    Ok(pids)
}

/// The last lines of `system`'s log, for an error report (CI shows nothing else of it).
fn log_tail(ctx: &Ctx, system: System) -> String {
    let log = ctx.dir.join(format!("{}.log", system.key()));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(12)..].join("\n");
    format!("{} (last lines of {}):\n{tail}", system.name(), log.display())
}

/// The daemon's command line for `system` (one of the zone-ingress modes) in `phase`.
fn zi_args(ctx: &Ctx, system: System, phase: Phase) -> Vec<String> {
    let mode = match system {
        System::ZiPacket => "packet",
        System::ZiKernel => "kernel",
        _ => "userspace",
    };
    let dir = |f: &str| ctx.dir.join(f).display().to_string();
    let mut args = vec![
        ctx.daemon.display().to_string(),
        "run".into(),
        "--dataplane-file".into(),
        dir("zoneingress.yaml"),
        "--dataplanes".into(),
        dir("dataplanes.yaml"),
    ];
    args.extend(["--splice", mode, "--plaintext-route"].map(String::from));
    args.push(format!("{}{{mesh=default}}", phase.plaintext_service()));
    // `--access-log off`: like the peers' configurations, which log nothing per connection.
    args.extend(
        ["--drain-time", "0s", "--max-connections-per-cluster", "100000", "--access-log", "off"].map(String::from),
    );
    args
}

/// The configurations of every system in the bulk phase, for the report.
fn configurations(ctx: &Ctx, systems: &[System]) -> Vec<(&'static str, String)> {
    let backend = format!("{DP}:{IPERF_PORT}");
    systems
        .iter()
        .filter_map(|&s| match s {
            System::Direct => None,
            System::ZiPacket | System::ZiKernel | System::ZiUserspace => {
                Some((s.name(), zi_args(ctx, s, Phase::Iperf).join(" ")))
            }
            System::Haproxy | System::HaproxySplice => {
                Some((s.name(), haproxy_config(s == System::HaproxySplice, &backend)))
            }
            System::Nginx => Some((s.name(), nginx_config(&ctx.dir, &backend))),
        })
        .collect()
}

/// The configuration a competent operator would write for an SNI router on 2 cores.
fn haproxy_config(splice: bool, plaintext_backend: &str) -> String {
    // maxpipes: HAProxy reserves two descriptors per pipe (default maxconn/4 pipes) and refuses
    // to start above the 20,000-descriptor hard limit; 40 pipes cover every concurrent splice here.
    let (splice, pipes) = if splice { ("    option splice-auto\n", "    maxpipes 40\n") } else { ("", "") };
    format!(
        "global\n    nbthread 2\n    maxconn 9950\n{pipes}    tune.bufsize 65536\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n{splice}\n\
frontend zi\n    bind {INGRESS}:{LISTEN_PORT}\n    tcp-request inspect-delay 5s\n    tcp-request content accept if {{ req.ssl_hello_type 1 }}\n    tcp-request content accept if {{ req.len gt 0 }}\n\
    use_backend tls if {{ req.ssl_sni -m str {sni} }}\n    use_backend hold if {{ req.ssl_sni -m str hold{{mesh=default}} }}\n    default_backend plain\n\n\
backend tls\n    server dp {DP}:{TLS_PORT}\n\nbackend hold\n    server dp {DP}:{HOLD_PORT}\n\nbackend plain\n    server dp {plaintext_backend}\n",
        sni = tls_sni()
    )
}

fn nginx_config(dir: &Path, plaintext_backend: &str) -> String {
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes 2;\nworker_rlimit_nofile 20000;\npid {pid};\nerror_log {err} warn;\n\
events {{ worker_connections 19000; }}\n\
stream {{\n  map $ssl_preread_server_name $up {{\n    {sni} {DP}:{TLS_PORT};\n    \"hold{{mesh=default}}\" {DP}:{HOLD_PORT};\n    default {plaintext_backend};\n  }}\n\
  server {{\n    listen {INGRESS}:{LISTEN_PORT} reuseport;\n    ssl_preread on;\n    preread_timeout 5s;\n    proxy_pass $up;\n    proxy_connect_timeout 5s;\n  }}\n}}\n",
        pid = dir.join("nginx.pid").display(),
        err = dir.join("nginx-error.log").display(),
        sni = tls_sni()
    )
}

fn write_inputs(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("zoneingress.yaml"),
        format!(
            "type: ZoneIngress\nname: zi-bench\nnetworking:\n  address: {INGRESS}\n  port: {LISTEN_PORT}\n  advertisedAddress: 198.18.100.1\n  advertisedPort: {LISTEN_PORT}\n  admin:\n    port: 9901\n"
        ),
    )?;
    let mut dps = String::from(
        "type: Dataplane\nmesh: default\nname: bench-dp\nnetworking:\n  address: 198.18.1.2\n  inbound:\n",
    );
    for (svc, port) in [
        ("iperf", IPERF_PORT),
        ("sockperf", SOCKPERF_PORT),
        ("bench", TLS_PORT),
        ("hold", HOLD_PORT),
        ("hash", HASH_PORT),
    ] {
        let _ = write!(dps, "  - port: {port}\n    tags:\n      kuma.io/service: {svc}\n");
    }
    std::fs::write(dir.join("dataplanes.yaml"), dps)?;
    Ok(())
}

/// Busy and total jiffies of the whole machine (all CPUs; softirq and kernel threads included).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// USER_HZ: jiffies per second in /proc/stat.
fn user_hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

fn target(system: System, port: u16) -> (String, u16) {
    if system == System::Direct { (DP.to_owned(), port) } else { (INGRESS.to_owned(), LISTEN_PORT) }
}

/// utime + stime of `pid` in clock ticks (fields 14 and 15 of `/proc/PID/stat`), 0 if gone.
fn stat_cpu_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Counted from after the command name, which may contain spaces.
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// CPU seconds (user + system) used so far by `pid` and its descendants.
fn tree_cpu_s(pid: u32) -> f64 {
    let mut total = 0u64;
    let mut stack = vec![pid];
    let children = |p: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect()
    };
    while let Some(p) = stack.pop() {
        total += stat_cpu_ticks(&p.to_string());
        stack.extend(children(p));
    }
    total as f64 / user_hz()
}

/// CPU seconds (user + system) used so far by the kernel's worker threads (`kworker/*`, which
/// run the psock workers of a sockmap splice, and `ksoftirqd/*`). Threads that ended since an
/// earlier reading drop out, so a difference can undercount slightly.
fn kernel_workers_cpu_s() -> f64 {
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !(comm.starts_with("kworker") || comm.starts_with("ksoftirqd")) {
            continue;
        }
        total += stat_cpu_ticks(pid);
    }
    total as f64 / user_hz()
}

/// One iperf3 run: Gbit/s, busy core-seconds of the machine and of the proxy's own processes.
fn iperf(system: System, pids: &[u32], streams: u32, reverse: bool, opts: &Options) -> anyhow::Result<Value> {
    let (host, port) = target(system, IPERF_PORT);
    let mut cmd = nsexec(NET.client);
    cmd.args(["iperf3", "-J", "-c", &host, "-p", &port.to_string(), "-P", &streams.to_string()]);
    cmd.args(["-t", &(if opts.quick { 1 } else { opts.seconds }).to_string()]);
    if reverse {
        cmd.arg("-R");
    }
    let relayed0 = relayed_bytes(system);
    let own0: f64 = pids.iter().map(|p| tree_cpu_s(*p)).sum();
    let kw0 = kernel_workers_cpu_s();
    let (b0, _) = cpu_jiffies();
    let t0 = Instant::now();
    let out = cmd.output()?;
    let wall = t0.elapsed().as_secs_f64();
    let (b1, _) = cpu_jiffies();
    let kw1 = kernel_workers_cpu_s();
    let own1: f64 = pids.iter().map(|p| tree_cpu_s(*p)).sum();
    let relayed1 = relayed_bytes(system);
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 via {}: {e}", system.name());
    }
    let sent = v["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    let received = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let gbps = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
    if received <= 0.0 {
        bail!("iperf3 via {}: no bytes received", system.name());
    }
    if sent <= 0.0 {
        bail!("iperf3 via {}: nothing sent", system.name());
    }
    let busy_cs = (b1 - b0) as f64 / user_hz();
    let mut v = json!({"gbps": gbps, "busy_core_s": busy_cs, "bytes": received, "wall_s": wall, "proxy_cpu_s": own1 - own0, "kworker_cpu_s": (kw1 - kw0).max(0.0),
              "gbps_per_busy_core": gbps / (busy_cs / wall).max(1e-9),
              "cpu_s_per_gb": busy_cs / (received / 1e9)});
    if let (Some(r0), Some(r1)) = (relayed0, relayed1) {
        // The share of the bytes that the daemon relayed while a direction was held.
        v["relayed_share"] = json!(((r1 - r0) / received).clamp(0.0, 1.0));
    }
    Ok(v)
}

/// 64 MiB each way with SHA-256 checks (the tests' protocol): the path moves bytes unchanged.
fn integrity(ctx: &Ctx, system: System) -> anyhow::Result<Value> {
    let (host, port) = target(system, HASH_PORT);
    let out = output(nsexec(NET.client).args([
        ctx.benchtool.to_str().context("path")?,
        "hash-client",
        &format!("{host}:{port}"),
        &(64u64 << 20).to_string(),
    ]))?;
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("")).context("hash-client output")?;
    if v["up_ok"] != json!(true) || v["down_ok"] != json!(true) {
        bail!("bytes changed through {}: {v}", system.name());
    }
    Ok(v)
}

/// sockperf ping-pong, 64-byte messages: full-RTT percentiles in µs.
fn sockperf(system: System, opts: &Options) -> anyhow::Result<Value> {
    let (host, port) = target(system, SOCKPERF_PORT);
    let secs = if opts.quick { 1 } else { opts.seconds };
    let out = output(nsexec(NET.client).args([
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &host,
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-m",
        "64",
        "--full-rtt",
    ]))?;
    let pct = |p: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    let (Some(p50), Some(p99)) = (pct("50.000"), pct("99.000")) else {
        bail!("sockperf via {} printed no percentiles:\n{out}", system.name());
    };
    Ok(json!({"rtt_p50_us": p50, "rtt_p99_us": p99}))
}

/// New TLS connections per second with a Kuma SNI and a reply from the dataplane.
fn conn_rate(ctx: &Ctx, system: System, pids: &[u32], opts: &Options) -> anyhow::Result<Value> {
    let (host, port) = target(system, TLS_PORT);
    let secs = if opts.quick { 1 } else { opts.seconds };
    let pki = ctx.dir.join("pki");
    let own0: f64 = pids.iter().map(|p| tree_cpu_s(*p)).sum();
    let kw0 = kernel_workers_cpu_s();
    let (busy0, _) = cpu_jiffies();
    let out = output(nsexec(NET.client).args([
        ctx.benchtool.to_str().context("path")?,
        "conn-rate",
        &format!("{host}:{port}"),
        &tls_sni(),
        &secs.to_string(),
        "16",
        "--pki",
        pki.to_str().context("path")?,
    ]))?;
    let kw1 = kernel_workers_cpu_s();
    let own1: f64 = pids.iter().map(|p| tree_cpu_s(*p)).sum();
    let (busy1, _) = cpu_jiffies();
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("")).context("conn-rate output")?;
    let ok = v["ok"].as_f64().unwrap_or(0.0);
    if ok <= 0.0 {
        bail!("no TLS connection succeeded via {}", system.name());
    }
    // The handshake's duration without queueing: one connection at a time, for a second.
    let one = output(nsexec(NET.client).args([
        ctx.benchtool.to_str().context("path")?,
        "conn-rate",
        &format!("{host}:{port}"),
        &tls_sni(),
        "1",
        "1",
        "--pki",
        pki.to_str().context("path")?,
    ]))?;
    let one: Value = serde_json::from_str(one.lines().last().unwrap_or("")).context("conn-rate output")?;
    Ok(json!({"conn_per_s": ok / v["seconds"].as_f64().unwrap_or(1.0), "errors": v["errors"],
              "proxy_cpu_us_per_conn": (own1 - own0) / ok * 1e6, "kworker_cpu_us_per_conn": (kw1 - kw0).max(0.0) / ok * 1e6,
              "machine_cpu_us_per_conn": (busy1 - busy0) as f64 / user_hz() / ok * 1e6,
              "handshake_p50_us": one["p50_us"], "handshake_p99_us": one["p99_us"]}))
}

fn meminfo_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// RSS (kB) of `pid` and all its descendants.
fn tree_rss_kb(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    while let Some(p) = stack.pop() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        total += status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        stack.extend(procs.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
    }
    total
}

/// How long the idle flows stay idle before memory is read: long enough for the packet splice's
/// to go dormant (2 s without a packet) and for the kernel to free what their records' rewrite
/// left to an RCU grace period; shorter in a quick run, which checks behaviour only.
const IDLE_BEFORE_READING: Duration = Duration::from_secs(10);
const IDLE_BEFORE_READING_QUICK: Duration = Duration::from_secs(4);

/// RSS and Slab growth with `n` idle flows through `system`.
fn idle_flows(
    guard: &mut Guard,
    ctx: &Ctx,
    system: System,
    pids: &[u32],
    (n, idle): (usize, Duration),
) -> anyhow::Result<Value> {
    let before = established(NET.dataplane, HOLD_PORT);
    if before > 0 {
        bail!("{before} idle flows of the previous system are still open at the dataplane");
    }
    let rss0: u64 = pids.iter().map(|p| tree_rss_kb(*p)).sum();
    let slab0 = meminfo_kb("Slab:");
    // Direct routing: the client holds its flows to the dataplane itself (the forwarded path),
    // which gives the Slab of the client's and the dataplane's sockets alone.
    let target =
        if system == System::Direct { format!("{DP}:{HOLD_PORT}") } else { format!("{INGRESS}:{LISTEN_PORT}") };
    let mut child = nsexec(NET.client)
        .args([ctx.benchtool.to_str().context("path")?, "hold-client", &target, &n.to_string(), "hold{mesh=default}"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    {
        use std::io::BufRead as _;
        let stdout = child.stdout.take().context("stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
    }
    guard.check()?;
    let v: Value = serde_json::from_str(line.trim()).context("hold-client output")?;
    let opened = v["held"].as_u64().unwrap_or(0);
    // A flow counts once the proxy has connected it to the dataplane: wait (bounded) until the
    // dataplane holds as many connections as the client opened.
    let end = Instant::now() + Duration::from_secs(30);
    let mut flows = established(NET.dataplane, HOLD_PORT);
    while flows < opened && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        flows = established(NET.dataplane, HOLD_PORT);
    }
    // Idle flows: read once they have been idle a while (the packet splice's go dormant after
    // 2 s without a packet), the same wait for every system.
    std::thread::sleep(idle);
    let rss1: u64 = pids.iter().map(|p| tree_rss_kb(*p)).sum();
    let slab1 = meminfo_kb("Slab:");
    drop(child.stdin.take());
    let _ = child.wait();
    if flows == 0 || flows != opened {
        bail!("{} connected {flows} of the {opened} idle flows the client opened ({n} asked)", system.name());
    }
    // The next system starts from zero (checked at its start).
    let end = Instant::now() + Duration::from_secs(30);
    while established(NET.dataplane, HOLD_PORT) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(json!({"flows": flows, "rss_kb": rss1, "rss_per_flow_b": (rss1 as f64 - rss0 as f64) * 1024.0 / flows as f64,
              "slab_per_flow_b": (slab1.saturating_sub(slab0) * 1024) as f64 / flows as f64}))
}

/// Established TCP connections in `ns` whose local port is `port`.
fn established(ns: &str, port: u16) -> u64 {
    nsexec(ns)
        .args(["ss", "-Htn", "state", "established", &format!("( sport = :{port} )")])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() as u64)
        .unwrap_or(0)
}

pub(crate) fn bench(opts: &Options) -> anyhow::Result<()> {
    if opts.xdp {
        return crate::bench_xdp::bench(opts);
    }
    let pkgs = crate::setup::Options {
        packages: BENCH_PACKAGES.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    };
    crate::setup::setup(&pkgs)?;
    exec(xtask::cargo().args(xtask::BUILD_RELEASE))?;
    let dir = xtask::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let ctx = Ctx {
        dir: dir.clone(),
        daemon: xtask::target_dir().join("release/zone-ingress"),
        benchtool: xtask::target_dir().join("release/benchtool"),
    };
    write_inputs(&dir)?;
    let mut guard = Guard::new(NET)?;
    // Every system under test inherits this (soft raised to hard). These machines cap the hard
    // limit at 20,000 descriptors, which bounds the idle-flow figure below 10,000 flows (two
    // sockets per flow in every proxy).
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit with valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
    NET.create()?;
    let pki = dir.join("pki");
    let _ = std::fs::remove_dir_all(&pki);
    let tool = ctx.benchtool.to_str().context("path")?.to_owned();
    let pki_s = pki.to_str().context("path")?.to_owned();
    spawn(
        &mut guard,
        NET.dataplane,
        &["iperf3", "-s", "-B", DP, "-p", &IPERF_PORT.to_string()],
        &dir.join("iperf3-server.log"),
    )?;
    spawn(
        &mut guard,
        NET.dataplane,
        &["sockperf", "server", "--tcp", "-i", DP, "-p", &SOCKPERF_PORT.to_string()],
        &dir.join("sockperf-server.log"),
    )?;
    spawn(
        &mut guard,
        NET.dataplane,
        &[&tool, "tls-server", &format!("{DP}:{TLS_PORT}"), &tls_sni(), "--pki", &pki_s],
        &dir.join("tls-server.log"),
    )?;
    spawn(
        &mut guard,
        NET.dataplane,
        &[&tool, "hold-server", &format!("{DP}:{HOLD_PORT}")],
        &dir.join("hold-server.log"),
    )?;
    spawn(
        &mut guard,
        NET.dataplane,
        &[&tool, "hash-server", &format!("{DP}:{HASH_PORT}")],
        &dir.join("hash-server.log"),
    )?;
    for port in [IPERF_PORT, SOCKPERF_PORT, TLS_PORT, HOLD_PORT, HASH_PORT] {
        wait_port(NET.ingress, DP, port)?;
    }
    let systems: Vec<System> = System::ALL
        .into_iter()
        .filter(|s| opts.systems.is_empty() || opts.systems.iter().any(|n| n == s.key()))
        .collect();
    let rounds = if opts.quick { 1 } else { opts.rounds.max(1) };
    let phase = |name: &str| opts.phases.is_empty() || opts.phases.iter().any(|p| p == name);
    let mut samples: BTreeMap<(System, &'static str), Vec<Value>> = BTreeMap::new();
    let bulk = [("bulk_1_fwd", 1, false), ("bulk_1_rev", 1, true), ("bulk_4_fwd", 4, false), ("bulk_4_rev", 4, true)];
    for round in 0..rounds {
        // Rotate the order each round so no system always runs first (warm caches, thermal).
        let mut order = systems.clone();
        let shift = round % order.len().max(1);
        order.rotate_left(shift);
        for &system in &order {
            eprintln!("bench: round {}/{rounds}: {}", round + 1, system.name());
            if round == 0 && phase("integrity") {
                let pids = start_system(&mut guard, &ctx, system, Phase::Hash)?;
                guard.check()?;
                samples.entry((system, "integrity")).or_default().push(integrity(&ctx, system)?);
                pids.iter().for_each(|p| stop(&mut guard, *p));
            }
            if phase("bulk") {
                let pids = start_system(&mut guard, &ctx, system, Phase::Iperf)?;
                for (name, streams, rev) in bulk {
                    guard.check()?;
                    let sample =
                        iperf(system, &pids, streams, rev, opts).map_err(|e| e.context(log_tail(&ctx, system)))?;
                    samples.entry((system, name)).or_default().push(sample);
                }
                pids.iter().for_each(|p| stop(&mut guard, *p));
            }
            if phase("latency") {
                let pids = start_system(&mut guard, &ctx, system, Phase::Sockperf)?;
                guard.check()?;
                samples.entry((system, "latency")).or_default().push(sockperf(system, opts)?);
                pids.iter().for_each(|p| stop(&mut guard, *p));
            }
            if phase("conn") {
                let pids = start_system(&mut guard, &ctx, system, Phase::Tls)?;
                guard.check()?;
                samples.entry((system, "conn_rate")).or_default().push(conn_rate(&ctx, system, &pids, opts)?);
                if let Some(h) = handoff_histogram(system, &pids) {
                    samples.entry((system, "handoff")).or_default().push(h);
                }
                pids.iter().for_each(|p| stop(&mut guard, *p));
            }
        }
    }
    let (flows, idle) = if opts.quick { (200, IDLE_BEFORE_READING_QUICK) } else { (opts.flows, IDLE_BEFORE_READING) };
    for &system in systems.iter().filter(|_| phase("idle")) {
        guard.check()?;
        let pids = start_system(&mut guard, &ctx, system, Phase::Hold)?;
        samples.entry((system, "idle_flows")).or_default().push(idle_flows(
            &mut guard,
            &ctx,
            system,
            &pids,
            (flows, idle),
        )?);
        pids.iter().for_each(|p| stop(&mut guard, *p));
    }
    let mut report = report(&systems, &samples, opts);
    let configs = configurations(&ctx, &systems);
    report.0.push_str("\n## Configurations (bulk phase; the other phases change only the plaintext backend's port)\n");
    for (name, text) in &configs {
        let _ = write!(report.0, "\n{name}:\n\n```\n{}\n```\n", text.trim_end());
    }
    if let Value::Object(o) = &mut report.1 {
        o.insert(
            "configurations".into(),
            configs
                .iter()
                .map(|(n, t)| ((*n).to_owned(), Value::String(t.clone())))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
    }
    std::fs::write(dir.join("report.md"), &report.0)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&report.1)?)?;
    std::fs::write(dir.join("chart.svg"), chart(&report.1))?;
    #[expect(clippy::print_stdout, reason = "the report is the command's output")]
    {
        println!("{}", report.0);
    }
    eprintln!("bench: wrote {0}/report.md, {0}/report.json, {0}/chart.svg", dir.display());
    Ok(())
}

/// The handoff-latency histogram from the daemon's admin endpoint, if it serves one.
fn handoff_histogram(system: System, _pids: &[u32]) -> Option<Value> {
    if !matches!(system, System::ZiPacket | System::ZiKernel | System::ZiUserspace) {
        return None;
    }
    let body = zi_metrics()?;
    let sum = prom_value(&body, "zone_ingress_handoff_duration_seconds_sum")?;
    let count = prom_value(&body, "zone_ingress_handoff_duration_seconds_count")?;
    (count > 0.0).then(|| json!({"handoff_mean_us": sum / count * 1e6, "connections": count}))
}

/// The daemon's `/stats/prometheus` page.
fn zi_metrics() -> Option<String> {
    output(nsexec(NET.ingress).args([
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/9901; printf 'GET /stats/prometheus HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3",
    ]))
    .ok()
}

/// The value of the unlabelled sample `name` on a Prometheus page.
fn prom_value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Bytes the kernel path's monitor relayed so far (held directions), for zone-ingress kernel.
fn relayed_bytes(system: System) -> Option<f64> {
    (system == System::ZiKernel)
        .then(|| zi_metrics().and_then(|b| prom_value(&b, "zone_ingress_splice_relayed_bytes_total")))
        .flatten()
}

/// Median/min/max of `field` over the samples of (system, metric).
fn stat(
    samples: &BTreeMap<(System, &'static str), Vec<Value>>,
    s: System,
    metric: &str,
    field: &str,
) -> Option<(f64, f64, f64)> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|((sys, m), _)| *sys == s && *m == metric)
        .flat_map(|(_, v)| v.iter().filter_map(|x| x[field].as_f64()))
        .collect();
    median(v)
}

fn report(
    systems: &[System],
    samples: &BTreeMap<(System, &'static str), Vec<Value>>,
    opts: &Options,
) -> (String, Value) {
    let mut md = String::new();
    let mut js = serde_json::Map::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(
        md,
        "Machine: Linux {} · {cpus} CPUs · {} rounds · {} · medians (min–max); ratios are to direct routing in the same run.\n",
        kernel.trim(),
        if opts.quick { 1 } else { opts.rounds },
        if opts.quick {
            "quick (1 s per measurement)".to_owned()
        } else {
            format!("{} s per measurement", opts.seconds)
        }
    );
    let direct = |metric: &str, field: &str| stat(samples, System::Direct, metric, field).map(|m| m.0);
    md.push_str("| system | 1 stream Gbit/s | 1 stream rev | 4 streams | 4 streams rev | Gbit/s per busy core | CPU s per GB | proxy process CPU s | kernel workers CPU s | relayed share | RTT p50 µs (added) | RTT p99 µs | new TLS conn/s | conn errors | TLS handshake p50 µs (one at a time) | proxy CPU µs per conn | kernel workers µs per conn | machine CPU µs per conn | handoff µs | RSS B/flow | Slab B/flow (beyond direct) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for &s in systems {
        let cell = |metric: &str, field: &str, ratio_to_direct: bool| -> String {
            match stat(samples, s, metric, field) {
                None => "–".into(),
                Some((m, lo, hi)) => {
                    let ratio = if ratio_to_direct && s != System::Direct {
                        direct(metric, field).map(|d| format!(" **{:.2}×**", m / d)).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    format!("{m:.2} ({lo:.2}–{hi:.2}){ratio}")
                }
            }
        };
        let added = match (stat(samples, s, "latency", "rtt_p50_us"), direct("latency", "rtt_p50_us")) {
            (Some((m, lo, hi)), Some(d)) if s != System::Direct => format!("{m:.1} ({lo:.1}–{hi:.1}) +{:.1}", m - d),
            (Some((m, lo, hi)), _) => format!("{m:.1} ({lo:.1}–{hi:.1})"),
            _ => "–".into(),
        };
        // The proxy's own kernel memory per flow: the client's and the dataplane's sockets are
        // in direct routing's figure too.
        let slab = match (stat(samples, s, "idle_flows", "slab_per_flow_b"), direct("idle_flows", "slab_per_flow_b")) {
            (Some((m, lo, hi)), Some(d)) if s != System::Direct => format!("{m:.0} ({lo:.0}–{hi:.0}) +{:.0}", m - d),
            (Some((m, lo, hi)), _) => format!("{m:.0} ({lo:.0}–{hi:.0})"),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {added} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {slab} |",
            s.name(),
            cell("bulk_1_fwd", "gbps", true),
            cell("bulk_1_rev", "gbps", true),
            cell("bulk_4_fwd", "gbps", true),
            cell("bulk_4_rev", "gbps", true),
            cell("bulk_1_fwd", "gbps_per_busy_core", false),
            cell("bulk_1_fwd", "cpu_s_per_gb", false),
            cell("bulk_1_fwd", "proxy_cpu_s", false),
            cell("bulk_1_fwd", "kworker_cpu_s", false),
            cell("bulk_1_fwd", "relayed_share", false),
            cell("latency", "rtt_p99_us", false),
            cell("conn_rate", "conn_per_s", true),
            cell("conn_rate", "errors", false),
            cell("conn_rate", "handshake_p50_us", false),
            cell("conn_rate", "proxy_cpu_us_per_conn", false),
            cell("conn_rate", "kworker_cpu_us_per_conn", false),
            cell("conn_rate", "machine_cpu_us_per_conn", false),
            cell("handoff", "handoff_mean_us", false),
            cell("idle_flows", "rss_per_flow_b", false),
        );
        let per: serde_json::Map<String, Value> = samples
            .iter()
            .filter(|((sys, _), _)| *sys == s)
            .map(|((_, m), v)| ((*m).to_owned(), Value::Array(v.clone())))
            .collect();
        js.insert(s.key().to_owned(), Value::Object(per));
    }
    let _ = writeln!(
        md,
        "\nBulk: iperf3 through the plaintext route (`--plaintext-route`, HAProxy/nginx default backend). CPU: busy core-seconds of the whole machine (softirq and kernel workers included) during the 1-stream run; proxy process CPU: user+system seconds of the proxy's own processes in that run (for zone-ingress the daemon; the kernel's splice work is in the machine column); kernel workers CPU: the same for every `kworker` and `ksoftirqd` thread (a sockmap splice's psock workers run there; softirq work done inside a process's system call counts to that process); relayed share: the part of the 1-stream bytes that zone-ingress kernel relayed itself while a direction was held (backpressure), the rest went through the sk_skb redirect. Per-connection logging: none for any system (the HAProxy and nginx configurations have no access log; zone-ingress runs with `--access-log off`). Latency: sockperf ping-pong, 64 B, full RTT. Connections: rustls clients (16 concurrent), full mTLS handshake with a MeshService SNI and a 2-byte reply; TLS handshake p50: the same, one connection at a time for 1 s, connect to reply; proxy CPU per conn: the proxy's own user+system CPU over the run divided by the connections it carried, kernel workers the same for `kworker`/`ksoftirqd` (for direct routing: the forwarding's softirq work where it lands there); machine CPU per conn: busy core-time of the whole machine over the run (clients, dataplane, proxy, softirq) divided by the connections. Idle flows: {} per system; Slab beyond direct: less the client's and the dataplane's sockets (direct routing holds the same flows without a proxy).",
        if opts.quick { 200 } else { opts.flows }
    );
    (md, Value::Object(js))
}

/// A bar chart (SVG) of 1-stream throughput and CPU seconds per GB per system.
fn chart(js: &Value) -> String {
    let Some(obj) = js.as_object() else { return String::new() };
    let med = |v: &Value, metric: &str, field: &str| -> f64 {
        median(v[metric].as_array().map(|a| a.iter().filter_map(|x| x[field].as_f64()).collect()).unwrap_or_default())
            .map_or(0.0, |m| m.0)
    };
    let rows: Vec<(String, f64, f64)> = obj
        .iter()
        .filter(|(_, v)| v.get("bulk_1_fwd").is_some())
        .map(|(k, v)| (k.clone(), med(v, "bulk_1_fwd", "gbps"), med(v, "bulk_1_fwd", "cpu_s_per_gb")))
        .collect();
    let max_g = rows.iter().map(|r| r.1).fold(0.1, f64::max);
    let max_c = rows.iter().map(|r| r.2).fold(0.01, f64::max);
    let (w, row_h) = (760.0, 28.0);
    let h = 60.0 + row_h * rows.len() as f64;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<text x='10' y='18' font-weight='bold'>1 stream Gbit/s (blue, left) and CPU s per GB (orange, right), medians</text>\n"
    );
    for (i, (name, g, c)) in rows.iter().enumerate() {
        let y = 40.0 + row_h * i as f64;
        let gw = 250.0 * g / max_g;
        let cw = 250.0 * c / max_c;
        let _ = writeln!(
            svg,
            "<text x='10' y='{ty}'>{name}</text><rect x='130' y='{y}' width='{gw:.1}' height='18' fill='#3b78c2'/><text x='{gx:.1}' y='{ty}'>{g:.2}</text>\
<rect x='470' y='{y}' width='{cw:.1}' height='18' fill='#e08a2c'/><text x='{cx:.1}' y='{ty}'>{c:.2}</text>",
            ty = y + 13.0,
            gx = 134.0 + gw,
            cx = 474.0 + cw
        );
    }
    svg.push_str("</svg>\n");
    svg
}
