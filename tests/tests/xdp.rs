//! The XDP guard in front of the listener, in namespaces this test creates (198.18.0.0/15,
//! 2001:2::/48): allow/deny lists (IPv4 and IPv6) with exact counters, a bounded SYN flood from
//! one namespace while another keeps completing TLS through the ingress, crafted malformed
//! packets (fragments, impossible flags, URG, broken lengths) dropped and counted while real
//! flows stay byte-exact, live list updates under traffic without detaching, and the lifecycle
//! (`--xdp off`, detached on exit, invalid guard file = exit 64).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::{net::TcpSocket, task::JoinSet};
use zone_ingress_tests::{
    daemon::{Daemon, Scratch, binary, zone_ingress_yaml},
    guard::{self, Packet, RawSender, flags, v4, v6 as v6addr},
    netns::Topology,
    ops::{self, admin_addr},
    pki::Pki,
    runtime, section5_inventory,
    stream::{self, ServerStats, spawn_dataplane},
};

const PORT: u16 = 10001;
const ADMIN: u16 = 9911;
const BACKEND_MS: &str = "a601e0c00295a9fbe.backend.8080.default.ms";
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The ingress namespace's listener for the family.
fn listener(v6: bool) -> SocketAddr {
    let ip: IpAddr = if v6 { Topology::ingress_v6().into() } else { Topology::ingress_v4().into() };
    SocketAddr::new(ip, PORT)
}

/// A topology with TLS dataplanes behind a running daemon, and the guard file it reads.
struct Setup {
    topo: Topology,
    daemon: Daemon,
    pki: Pki,
    guard_file: PathBuf,
    _scratch: Scratch,
    v6: bool,
}

impl Setup {
    fn start(v6: bool, guard_yaml: Option<&str>, args: &[&str]) -> Self {
        let topo = Topology::new(3);
        let scratch = Scratch::new("xdp");
        let guard_file = scratch.write("guard.yaml", guard_yaml.unwrap_or(""));
        let mut all: Vec<&str> = vec!["--drain-time", "1s"];
        let path = guard_file.to_str().expect("utf-8 path").to_owned();
        if guard_yaml.is_some() {
            all.extend(["--xdp-config", path.as_str()]);
        }
        all.extend_from_slice(args);
        let daemon = Daemon::start(
            &topo.ingress,
            &zone_ingress_yaml(&listener(v6).ip().to_string(), PORT, ADMIN),
            &section5_inventory(v6),
            &all,
        );
        Self { topo, daemon, pki: Pki::new(), guard_file, _scratch: scratch, v6 }
    }

    /// TLS dataplanes for `backend` (dataplanes 1 and 2); call inside the runtime.
    fn dataplanes(&self) -> Vec<Arc<ServerStats>> {
        (0..2)
            .map(|k| {
                let name = zone_ingress_tests::DP_NAMES[k];
                let leaf = self.pki.leaf(name, &[BACKEND_MS]);
                let addr = SocketAddr::new(Topology::dataplane_addr(k + 1, self.v6), 8080);
                spawn_dataplane(self.topo.dataplanes[k].listen(addr), name, Some(self.pki.server_config(&leaf)))
            })
            .collect()
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        let leaf = self.pki.leaf("remote-client", &["client.test"]);
        tokio_rustls::TlsConnector::from(self.pki.client_config(&leaf))
    }

    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        guard::counters(&self.topo.ingress, admin_addr(ADMIN))
    }

    /// Adds `ip` to the client's veth so that connections can come from it.
    fn add_client_address(&self, ip: IpAddr) {
        match ip {
            IpAddr::V4(_) => self.topo.client.ip(&["addr", "add", &format!("{ip}/24"), "dev", "c0"]),
            IpAddr::V6(_) => self.topo.client.ip(&["-6", "addr", "add", &format!("{ip}/64"), "dev", "c0", "nodad"]),
        }
    }

    /// Waits (at most 5 s) until the client's sockets bound to `src` are gone or in TIME-WAIT:
    /// their last packets are sent, and `src` sends nothing more unless a peer retransmits.
    async fn wait_last_packet_from(&self, src: IpAddr) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.topo.client.command("ss").args(["-Htan", "src", &src.to_string()]).output().expect("ss");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.lines().all(|l| l.starts_with("TIME-WAIT")) {
                // The last ACK is on the wire: let it cross the guard.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            assert!(Instant::now() < end, "sockets from {src} still closing:\n{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A connection from `src` that the guard must stop: it fails within 600 ms. Returns the
    /// SYNs it sent, as the client's nftables counted them (one, and a retransmission if the
    /// timer fired late on a loaded machine).
    async fn refused_from(&self, src: IpAddr) -> u64 {
        let fam = if src.is_ipv4() { "ip" } else { "ip6" };
        ops::nft(
            &self.topo.client,
            &format!(
                "table inet zi_syns {{\n  chain out {{ type filter hook output priority 0; {fam} saddr {src} tcp flags & (syn | ack) == syn counter; }}\n}}\n"
            ),
        );
        assert!(self.connect_from(src, Duration::from_millis(600)).await.is_err(), "{src} must not connect");
        let syns = ops::nft_counted(&self.topo.client, "zi_syns");
        ops::nft(&self.topo.client, "delete table inet zi_syns\n");
        assert!(syns >= 1, "no SYN from {src} counted");
        syns
    }

    /// A raw sender on the client's veth, toward the ingress.
    fn raw_sender(&self) -> RawSender {
        RawSender::open(&self.topo.client, "c0", guard::mac(&self.topo.ingress, "i0"))
    }

    /// Connects from `src` (a client address) to the listener within `timeout`.
    async fn connect_from(&self, src: IpAddr, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
        let socket = self.topo.client.run(|| if src.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() })?;
        socket.bind(SocketAddr::new(src, 0))?;
        tokio::time::timeout(timeout, socket.connect(listener(self.v6)))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }

    /// One TLS flow from `src` through the ingress: `n` bytes each way, SHA-256 checked.
    async fn tls_flow(&self, connector: &tokio_rustls::TlsConnector, src: IpAddr, n: u64) -> Result<(), String> {
        let tcp =
            self.connect_from(src, Duration::from_secs(5)).await.map_err(|e| format!("connect from {src}: {e}"))?;
        tls_over(connector, tcp, n).await
    }
}

async fn tls_over(connector: &tokio_rustls::TlsConnector, tcp: tokio::net::TcpStream, n: u64) -> Result<(), String> {
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from(BACKEND_MS).expect("name"), tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_owned())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    let out = tokio::time::timeout(Duration::from_secs(60), stream::client(tls, n, n))
        .await
        .map_err(|_| "transfer timed out".to_owned())?
        .map_err(|e| format!("transfer: {e}"))?;
    if out.up_ok && out.down_ok { Ok(()) } else { Err(format!("SHA-256 mismatch: {out:?}")) }
}

fn delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    reason: &str,
) -> u64 {
    after.get(reason).copied().unwrap_or(0) - before.get(reason).copied().unwrap_or(0)
}

/// Reasons that must not move unless a test provokes them.
const DROP_REASONS: [&str; 7] =
    ["denied", "not_allowed", "syn_rate_limited", "fragment", "malformed", "bad_flags", "urgent"];

fn lists(v6: bool, mode_flag: &[&str], expect_mode: &str) {
    // Longest prefix wins across both lists: a deny inside an allow, an allow inside that deny.
    let yaml = "allow:\n  - 198.18.0.0/26\n  - 198.18.0.50/32\n  - 2001:2::/120\n  - 2001:2::31/128\ndeny:\n  - 198.18.0.48/28\n  - 2001:2::30/124\n";
    let s = Setup::start(v6, Some(yaml), mode_flag);
    let (allowed, denied, outside) = if v6 {
        ([v6addr(0, 1), v6addr(0, 0x31)], v6addr(0, 0x32), IpAddr::V6("2001:2::1:0".parse().expect("v6")))
    } else {
        ([v4(0, 1), v4(0, 50)], v4(0, 49), v4(0, 100))
    };
    for ip in [allowed[1], denied, outside] {
        s.add_client_address(ip);
    }
    assert_eq!(guard::xdp_attachment(&s.topo.ingress, "i0"), Some(expect_mode), "{}", s.daemon.log_text());
    assert!(
        s.daemon.log_text().contains(&format!("xdp guard attached ({expect_mode} mode)")),
        "{}",
        s.daemon.log_text()
    );
    let rt = runtime();
    rt.block_on(async {
        let _dps = s.dataplanes();
        let connector = s.connector();
        let before = s.counters();
        for ip in allowed {
            for _ in 0..2 {
                s.tls_flow(&connector, ip, 64 * KIB).await.unwrap_or_else(|e| panic!("allowed source {ip}: {e}"));
            }
        }
        // Usually one SYN per attempt: the timeout ends each before the first retransmission.
        let mut syns = [0; 2];
        for (n, ip) in syns.iter_mut().zip([denied, outside]) {
            for _ in 0..3 {
                *n += s.refused_from(ip).await;
            }
        }
        let after = s.counters();
        assert_eq!(delta(&before, &after, "denied"), syns[0], "{after:?}");
        assert_eq!(delta(&before, &after, "not_allowed"), syns[1], "{after:?}");
        // Four flows of handshake, 64 KiB each way and close: at least a few dozen segments.
        assert!(delta(&before, &after, "passed") >= 40, "{after:?}");
        for reason in ["syn_rate_limited", "fragment", "malformed", "bad_flags", "urgent", "syn_untracked", "no_config"]
        {
            assert_eq!(delta(&before, &after, reason), 0, "{reason}: {after:?}");
        }
        // The same counters in Envoy's /stats listing.
        let text = ops::get(&s.topo.ingress, admin_addr(ADMIN), "/stats?filter=xdp").body;
        assert!(text.contains(&format!("zone_ingress.xdp_packets_total.denied: {}", after["denied"])), "{text}");
        assert!(text.contains(&format!("zone_ingress.xdp_attached.i0.{expect_mode}: 1")), "{text}");
        // And the guard's state in /config_dump: where it is attached and how long its lists are.
        let dump = ops::get(&s.topo.ingress, admin_addr(ADMIN), "/config_dump").json();
        let g = &dump["xdpGuard"];
        assert_eq!(g["interfaces"], serde_json::json!([{"interface": "i0", "mode": expect_mode}]), "{dump:#}");
        assert_eq!((g["allowCidrs"].as_u64(), g["denyCidrs"].as_u64()), (Some(4), Some(2)), "{dump:#}");
    });
}

#[test]
fn lists_v4_native() {
    lists(false, &[], "native");
}

#[test]
fn lists_v6_generic() {
    lists(true, &["--xdp", "generic"], "generic");
}

#[test]
fn syn_flood_is_limited_while_legitimate_clients_complete_tls() {
    const RATE: u64 = 20;
    let s = Setup::start(false, Some(&format!("synLimit:\n  rate: {RATE}\n  burst: {RATE}\n")), &[]);
    let id = s.topo.ingress.name.trim_end_matches('i').to_owned();
    let flood_ns = guard::routed_namespace(&format!("{id}f"), 60, &s.topo.client, &s.topo.ingress);
    let flooder = RawSender::open(&flood_ns, "f0", guard::mac(&s.topo.client, "r60"));
    // The flood's SYNs the program let through, counted where the stack receives them (XDP runs
    // before): under load a veth may drop frames before XDP sees them, which the sender's count
    // cannot tell from passes.
    ops::nft(
        &s.topo.ingress,
        &format!(
            "table inet zi_synflood {{\n  chain pre {{ type filter hook prerouting priority -300; ip saddr {} tcp flags syn counter; }}\n}}\n",
            v4(60, 2)
        ),
    );
    let rt = runtime();
    rt.block_on(async {
        let _dps = s.dataplanes();
        let connector = s.connector();
        let before = s.counters();
        let started = Instant::now();
        let flood = std::thread::spawn(move || {
            let sent = guard::syn_flood(&flooder, v4(60, 2), listener(false), 200_000, Duration::from_secs(4));
            (sent, started.elapsed())
        });
        // Legitimate clients: a new TLS connection every 100 ms from the other namespace for as
        // long as the flood runs (and at least 3 s).
        let mut flows = JoinSet::new();
        let connector = Arc::new(connector);
        let s = Arc::new(s);
        let mut started_flows = 0;
        while started.elapsed() < Duration::from_secs(3) || !flood.is_finished() {
            let (s, connector) = (Arc::clone(&s), Arc::clone(&connector));
            flows.spawn(async move { s.tls_flow(&connector, v4(0, 1), 16 * KIB).await });
            started_flows += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (sent, flood_time) = flood.join().expect("flood thread");
        let mut failures = Vec::new();
        while let Some(r) = flows.join_next().await {
            if let Err(e) = r.expect("flow task") {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {started_flows} legitimate flows failed under the flood: {failures:?}",
            failures.len()
        );
        let after = s.counters();
        let limited = delta(&before, &after, "syn_rate_limited");
        let passed = ops::nft_counted(&s.topo.ingress, "zi_synflood");
        // Per CPU: the burst plus the rate over the flood's duration may pass. Every online CPU
        // may run the program, whatever this process's affinity or cgroup quota allows it.
        // SAFETY: sysconf reads a system value.
        let cpus = u64::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1);
        // The measured duration rounded up, plus a second of slack: the buckets refill
        // continuously and the duration is measured from this thread, not by the program.
        let may_pass = cpus * (RATE + RATE * (flood_time.as_secs_f64().ceil() as u64 + 1));
        eprintln!(
            "flood: {sent} SYNs in {flood_time:?}, {limited} dropped by the limit, {passed} passed, {started_flows} TLS flows all fine"
        );
        assert!(sent >= 10_000, "the flood sent only {sent} SYNs");
        assert!(passed <= may_pass, "{passed} SYNs of the flood passed, at most {may_pass} may: {after:?}");
        // Nearly all of the flood reached the program and was dropped by the limit (frames a
        // veth drops before XDP under load are neither limited nor passed).
        assert!(
            limited + passed <= sent as u64 && limited * 100 >= sent as u64 * 99,
            "sent {sent}, limited {limited}, passed {passed}: {after:?}"
        );
        assert_eq!(delta(&before, &after, "syn_untracked"), 0);
        drop(flood_ns);
    });
}

/// Sends each frame `n` times.
fn send_n(sender: &RawSender, packet: &Packet, n: usize) {
    let frame = sender.frame(packet);
    sender.send_all(&vec![frame; n]);
}

/// `splice`: the path the well-formed flows take (the guard itself never touches their bytes).
fn malformed(v6: bool, splice: &str) {
    let s = Arc::new(Setup::start(v6, None, &["--xdp", "auto", "--splice", splice]));
    let sender = s.raw_sender();
    let (src, dst) = if v6 { (v6addr(0, 1), listener(true).ip()) } else { (v4(0, 1), listener(false).ip()) };
    // Source ports below the ephemeral range: never one of the real flows.
    let tcp = |sport: u16, dport: u16, f: u8| Packet::tcp(src, dst, sport, dport, f);
    let rt = runtime();
    rt.block_on(async {
        let dps = s.dataplanes();
        let connector = Arc::new(s.connector());
        let s = Arc::clone(&s);
        let before = s.counters();
        let mut flows = JoinSet::new();
        for _ in 0..2 {
            let (s, connector) = (Arc::clone(&s), Arc::clone(&connector));
            flows.spawn(async move { s.tls_flow(&connector, src, 16 * MIB).await });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        const N: usize = 5;
        let mut want: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        let mut expect = |reason: &'static str, packet: Packet| {
            send_n(&sender, &packet, N);
            *want.entry(reason).or_default() += N as u64;
        };
        // Fragments: a first fragment for the port, and one too short to show the port.
        expect("fragment", Packet { fragment: Some((true, 0)), ..tcp(1001, PORT, flags::SYN) });
        expect("fragment", Packet { fragment: Some((true, 0)), truncate_l4: Some(2), ..tcp(1002, PORT, flags::SYN) });
        // Impossible flags.
        expect("bad_flags", tcp(1003, PORT, flags::SYN | flags::FIN));
        expect("bad_flags", tcp(1004, PORT, 0));
        expect("bad_flags", tcp(1005, PORT, flags::FIN | flags::RST | flags::ACK));
        expect("bad_flags", tcp(1006, PORT, flags::FIN | flags::PSH | flags::URG));
        expect("bad_flags", tcp(1007, PORT, flags::SYN | flags::RST));
        // Urgent data.
        expect("urgent", Packet { payload: b"!".to_vec(), urg_ptr: 1, ..tcp(1008, PORT, flags::ACK | flags::URG | flags::PSH) });
        // Broken lengths and offsets.
        expect("malformed", Packet { data_offset: 3, ..tcp(1009, PORT, flags::SYN) });
        expect("malformed", Packet { data_offset: 15, ..tcp(1010, PORT, flags::SYN) });
        expect("malformed", Packet { length_field: Some(if v6 { 200 } else { 240 }), ..tcp(1011, PORT, flags::SYN) });
        expect("malformed", Packet { truncate_l4: Some(12), length_field: Some(if v6 { 12 } else { 32 }), ..tcp(1012, PORT, flags::ACK) });
        if v6 {
            // More extension headers than the guard walks; and flags judged behind two of them.
            expect("malformed", Packet { ext_headers: 7, ..tcp(1013, PORT, flags::SYN) });
            expect("bad_flags", Packet { ext_headers: 2, ..tcp(1014, PORT, flags::SYN | flags::FIN) });
            expect("fragment", Packet { ext_headers: 1, fragment: Some((false, 0)), ..tcp(1015, PORT, flags::SYN) });
        } else {
            expect("malformed", Packet { ihl: 4, ..tcp(1013, PORT, flags::SYN) });
        }
        // Not for the listener: another port, or a later fragment (no port to judge). These
        // pass untouched and uncounted.
        for p in [
            tcp(1020, PORT + 1, flags::SYN | flags::FIN),
            tcp(1021, PORT + 1, flags::ACK | flags::URG),
            Packet { fragment: Some((true, 0)), ..tcp(1022, PORT + 1, flags::SYN) },
            Packet { fragment: Some((false, 100)), ..tcp(1023, PORT, flags::SYN) },
        ] {
            send_n(&sender, &p, N);
        }
        let mut failures = Vec::new();
        while let Some(r) = flows.join_next().await {
            if let Err(e) = r.expect("flow task") {
                failures.push(e);
            }
        }
        let after = s.counters();
        let dp_errors: Vec<String> = dps.iter().flat_map(|d| d.errors.lock().expect("lock").clone()).collect();
        // The kernel splice's backpressure (pause/resume) shows in the daemon's debug log.
        assert!(
            failures.is_empty(),
            "well-formed flows failed next to the crafted packets: {failures:?}\ndataplanes: {dp_errors:?}\ncounters {after:?}\n{}",
            s.daemon.log_text()
        );
        for reason in DROP_REASONS {
            assert_eq!(delta(&before, &after, reason), want.get(reason).copied().unwrap_or(0), "{reason}: before {before:?} after {after:?}");
        }
        assert!(delta(&before, &after, "passed") > 1000, "two 16 MiB flows pass: {after:?}");
    });
    if splice == "packet" {
        // The guard and the packet splice's tc programs share the interface: the flows were
        // forwarded at packet level.
        assert!(
            s.daemon.wait_log_count("mode=\"packet\" bytes", 2, Duration::from_secs(10)),
            "both flows at packet level:\n{}",
            s.daemon.log_text()
        );
    }
}

#[test]
fn malformed_v4_dropped_and_counted() {
    malformed(false, "kernel");
}

#[test]
fn malformed_v6_dropped_and_counted() {
    malformed(true, "kernel");
}

#[test]
fn malformed_v4_dropped_and_counted_packet_splice() {
    malformed(false, "packet");
}

#[test]
fn malformed_v6_dropped_and_counted_packet_splice() {
    malformed(true, "packet");
}

#[test]
fn malformed_v4_dropped_and_counted_userspace_relay() {
    malformed(false, "userspace");
}

#[test]
fn malformed_v6_dropped_and_counted_userspace_relay() {
    malformed(true, "userspace");
}

/// The XDP program id on `i0` in the ingress namespace.
fn xdp_prog_id(s: &Setup) -> u64 {
    let out = s.topo.ingress.command("ip").args(["-d", "-j", "link", "show", "dev", "i0"]).output().expect("ip link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v[0]["xdp"]["prog"]["id"].as_u64().unwrap_or_else(|| panic!("no XDP program on i0: {v}"))
}

#[test]
fn live_update_under_traffic() {
    let s = Setup::start(false, Some("deny: []\n"), &[]);
    let other = v4(0, 49);
    s.add_client_address(other);
    let prog = xdp_prog_id(&s);
    let rt = runtime();
    rt.block_on(async {
        let _dps = s.dataplanes();
        let connector = Arc::new(s.connector());
        let s = Arc::new(s);
        // Long flows from the allowed source that span every update (paced upload, ~4 s).
        let mut flows = JoinSet::new();
        for _ in 0..3 {
            let (s, connector) = (Arc::clone(&s), Arc::clone(&connector));
            flows.spawn(async move {
                let tcp = s.connect_from(v4(0, 1), Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
                let tls = connector
                    .connect(ServerName::try_from(BACKEND_MS).expect("name"), tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                let out = ops::paced_client(tls, 2 * MIB, 2 * MIB, 64 << 10, Duration::from_millis(125))
                    .await
                    .map_err(|e| e.to_string())?;
                if out.up_ok && out.down_ok { Ok(()) } else { Err(format!("{out:?}")) }
            });
        }
        s.tls_flow(&connector, other, 16 * KIB).await.expect("not denied yet");
        // Its last packets sent before the deny, so that the counts below are exact: whatever
        // `other` sends later (a RST answering a late segment of this flow) would count too.
        s.wait_last_packet_from(other).await;
        let update = |text: &str, n: usize| {
            ops::write_atomic(&s.guard_file, text);
            s.daemon.signal(libc::SIGHUP);
            assert!(s.daemon.wait_log_count("xdp guard updated", n, Duration::from_secs(5)), "{}", s.daemon.log_text());
        };
        update("deny: [198.18.0.49/32]\n", 1);
        let c0 = s.counters();
        let syns = s.refused_from(other).await;
        assert_eq!(delta(&c0, &s.counters(), "denied"), syns, "its SYNs: {:?}", s.counters());
        s.tls_flow(&connector, v4(0, 1), 16 * KIB).await.expect("others still connect");
        // An invalid file changes nothing.
        ops::write_atomic(&s.guard_file, "deny: [198.18.0.49/33]\n");
        s.daemon.signal(libc::SIGHUP);
        assert!(s.daemon.wait_log("the running guard stays", Duration::from_secs(5)), "{}", s.daemon.log_text());
        assert!(s.daemon.log_text().contains("deny[0]"), "{}", s.daemon.log_text());
        assert!(s.connect_from(other, Duration::from_millis(600)).await.is_err(), "still denied");
        // An allow list that leaves the source out.
        update("allow: [198.18.0.0/28]\n", 2);
        let c1 = s.counters();
        let syns = s.refused_from(other).await;
        assert_eq!(delta(&c1, &s.counters(), "not_allowed"), syns, "its SYNs: {:?}", s.counters());
        s.tls_flow(&connector, v4(0, 1), 16 * KIB).await.expect("allowed source connects");
        // Back to no lists.
        update("{}\n", 3);
        s.tls_flow(&connector, other, 16 * KIB).await.expect("no longer denied");
        let mut failures = Vec::new();
        while let Some(r) = flows.join_next().await {
            if let Err(e) = r.expect("flow task") {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "flows across the updates: {failures:?}");
        assert_eq!(xdp_prog_id(&s), prog, "the program was never detached or replaced");
    });
}

#[test]
fn off_detach_and_bad_config() {
    // --xdp off: nothing attached.
    let topo = Topology::new(3);
    let zi = zone_ingress_yaml(&Topology::ingress_v4().to_string(), PORT, ADMIN);
    let inv = section5_inventory(false);
    {
        let d = Daemon::start(&topo.ingress, &zi, &inv, &["--xdp", "off"]);
        assert_eq!(guard::xdp_attachment(&topo.ingress, "i0"), None);
        assert!(d.log_text().contains("xdp guard: off"), "{}", d.log_text());
    }
    // Without --xdp-config (nor --xdp) the guard is off, as before the guard existed.
    {
        let d = Daemon::start(&topo.ingress, &zi, &inv, &[]);
        assert_eq!(guard::xdp_attachment(&topo.ingress, "i0"), None);
        assert!(d.log_text().contains("xdp guard: off"), "{}", d.log_text());
    }
    // auto: attached while running, detached after a clean exit.
    let mut d = Daemon::start(&topo.ingress, &zi, &inv, &["--xdp", "auto"]);
    assert_eq!(guard::xdp_attachment(&topo.ingress, "i0"), Some("native"));
    let status = d.stop(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(guard::xdp_attachment(&topo.ingress, "i0"), None, "detached on exit");
    assert!(d.log_text().contains("xdp guard detached"), "{}", d.log_text());
    // auto: an interface that refuses the program is logged and the daemon runs without it;
    // native: the same is fatal.
    let scratch = Scratch::new("xdp-bad");
    let nowhere = scratch.write("nowhere.yaml", "interfaces: [nosuch0]\n");
    let nowhere = nowhere.to_str().expect("utf-8");
    {
        let d = Daemon::start(&topo.ingress, &zi, &inv, &["--xdp-config", nowhere]);
        assert!(d.log_text().contains("not attached (auto); running without it"), "{}", d.log_text());
        assert_eq!(guard::xdp_attachment(&topo.ingress, "i0"), None);
    }
    let zi_path = scratch.write("zi.yaml", &zi);
    let inv_path = scratch.write("dps.yaml", &inv);
    let run = |extra: &[&str]| {
        let out = topo
            .ingress
            .command(binary().to_str().expect("utf-8"))
            .args(["run", "--dataplane-file"])
            .arg(&zi_path)
            .arg("--dataplanes")
            .arg(&inv_path)
            .args(extra)
            .output()
            .expect("run the daemon");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = run(&["--xdp", "native", "--xdp-config", nowhere]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("--xdp native") && text.contains("nosuch0"), "{text}");
    // An invalid guard file is a configuration error: every problem, then exit 64.
    let bad = scratch.write("guard.yaml", "allow: [198.18.0.1/24]\nsynLimit:\n  rate: 0\nextra: true\n");
    let (code, text) = run(&["--xdp-config", bad.to_str().expect("utf-8")]);
    assert_eq!(code, Some(64), "{text}");
    for needle in [
        "guard.yaml:1:9: allow[0]",
        "did you mean 198.18.0.0/24",
        "guard.yaml:3:9: synLimit.rate",
        "guard.yaml:4:1: extra: unknown key",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
    assert_eq!(guard::xdp_attachment(&topo.ingress, "i0"), None);
}
