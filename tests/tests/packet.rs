//! The packet splice under conditions that make the two legs differ: real rustls mTLS end to end
//! (client and dataplane certificates from a test CA the ingress never sees), SHA-256 of every
//! byte each way, and on each leg in turn: 1 % loss both ways (nftables `numgen` drops in the
//! leg's far namespace: this kernel has no netem), reordering on both legs (nftables sends 2 %
//! of the packets through a slow HTB class), window scales that differ, timestamps off at one
//! end, SACK off at one end, MTU 9000 on one leg and 1500 on the other, ECN on both legs (and on
//! one only, which takes the sockmap splice), and IPv6. Each case checks that the flow was
//! carried at packet level (`mode="packet"`), with exact byte totals in the access log, and that
//! the translation saw no option layout it could not translate. Then restarts: the daemon SIGKILLed mid-transfer, and a SIGQUIT handover, each
//! followed by a new daemon on the same pins that adopts the flows. Then the backend leg's source
//! ports (the range's check at start, its exhaustion), an option layout the programs do not
//! translate (dropped, logged by the program, recovered by the retransmission), and the
//! capabilities the packet splice runs with as an unprivileged user.

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use zone_ingress_tests::{
    daemon::{Daemon, zone_ingress_yaml},
    netns::{Netns, Topology},
    ops,
    pki::Pki,
    runtime, section5_inventory,
    stream::{self, spawn_dataplane},
};

const MIB: u64 = 1 << 20;
const BACKEND_MS: &str = "a601e0c00295a9fbe.backend.8080.default.ms";

/// What a case changes before the daemon starts.
#[derive(Clone, Copy)]
enum Impair {
    None,
    /// 1 % of TCP packets dropped both ways, in the client's namespace or the dataplane's.
    Loss {
        client_leg: bool,
    },
    /// The client's receive buffers cap its window scale below the other leg's.
    WindowScales,
    /// No TCP timestamps in the client's namespace.
    NoTimestampsClient,
    /// No SACK in the dataplane's namespace.
    NoSackBackend,
    /// MTU 9000 on the client leg, 1500 on the dataplane leg.
    Jumbo,
    /// 2 % of the TCP packets the client and the dataplane send overtaken by the rest.
    Reorder,
    /// The client and the ingress's host ask for ECN on their connections: both legs have it.
    EcnBothLegs,
    /// The client asks for ECN, the ingress's host does not (Linux's default): the ingress
    /// asks the backend because the client leg has it, so both legs have it.
    EcnAskedByClient,
    /// The client asks for ECN, the dataplane's host refuses it: the client leg alone has it.
    EcnClientLegOnly,
    /// The ingress's host asks for ECN, the client does not: the backend leg alone has it.
    EcnBackendLegOnly,
}

impl Impair {
    /// ECN on the (client, backend) legs, for the cases about ECN.
    fn ecn_legs(self) -> Option<(bool, bool)> {
        match self {
            Impair::EcnBothLegs | Impair::EcnAskedByClient => Some((true, true)),
            Impair::EcnClientLegOnly => Some((true, false)),
            Impair::EcnBackendLegOnly => Some((false, true)),
            _ => None,
        }
    }
}

fn sysctl(ns: &Netns, kv: &str) {
    let out = ns.command("sysctl").args(["-qw", kv]).output().expect("sysctl");
    assert!(out.status.success(), "sysctl {kv}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Drops `percent` of the TCP packets entering and leaving `ns`.
fn loss(ns: &Netns, percent: u32) {
    ops::nft(
        ns,
        &format!(
            "table inet zi_loss {{\n  chain in {{ type filter hook input priority 0; meta l4proto tcp numgen random mod 100 < {percent} counter drop; }}\n  chain out {{ type filter hook output priority 0; meta l4proto tcp numgen random mod 100 < {percent} counter drop; }}\n}}\n"
        ),
    );
}

/// Reorders what `ns` sends on `ifname`: nftables gives `percent` of its TCP packets the
/// priority of a slow HTB class (HTB takes a priority naming one of its classes as the class),
/// which at 200 Mbit/s holds each for up to 3 ms while the others pass at full speed (this
/// kernel has no netem).
fn reorder(ns: &Netns, ifname: &str, percent: u32) {
    ops::nft(
        ns,
        &format!(
            "table inet zi_reorder {{\n  chain out {{ type filter hook output priority 0; meta l4proto tcp numgen random mod 100 < {percent} counter meta priority set 0x10020; }}\n}}\n"
        ),
    );
    let tc = |args: &str| {
        let out = ns.command("tc").args(args.split_whitespace()).output().expect("tc");
        assert!(out.status.success(), "tc {args}: {}", String::from_utf8_lossy(&out.stderr));
    };
    tc(&format!("qdisc add dev {ifname} root handle 1: htb default 10"));
    tc(&format!("class add dev {ifname} parent 1: classid 1:10 htb rate 40gbit"));
    tc(&format!("class add dev {ifname} parent 1: classid 1:20 htb rate 200mbit ceil 200mbit"));
}

/// Segments that TCP in `ns` received out of order (`TcpExtTCPOFOQueue`).
fn out_of_order(ns: &Netns) -> u64 {
    ops::nstat(ns, "TcpExtTCPOFOQueue")
}

/// Packets the reorder rules of `ns` sent through the slow class.
fn reordered(ns: &Netns) -> u64 {
    ops::nft_counted(ns, "zi_reorder")
}

/// Packets the loss rules of `ns` dropped.
fn dropped(ns: &Netns) -> u64 {
    ops::nft_counted(ns, "zi_loss")
}

/// Counts the ECN-capable packets (ECT or CE) that TCP in `ns` receives.
fn count_ecn_capable(ns: &Netns) {
    ops::nft(
        ns,
        "table inet zi_ect {\n  chain in { type filter hook input priority 0; meta l4proto tcp ip ecn != not-ect counter; meta l4proto tcp ip6 ecn != not-ect counter; }\n}\n",
    );
}

fn impair(topo: &Topology, how: Impair) {
    let (client, dp) = (&topo.client, &topo.dataplanes[0]);
    if how.ecn_legs().is_some() {
        count_ecn_capable(dp);
    }
    match how {
        Impair::None => {}
        Impair::Loss { client_leg: true } => loss(client, 1),
        Impair::Loss { client_leg: false } => loss(dp, 1),
        Impair::WindowScales => sysctl(client, "net.ipv4.tcp_rmem=4096 65536 262144"),
        Impair::NoTimestampsClient => sysctl(client, "net.ipv4.tcp_timestamps=0"),
        Impair::NoSackBackend => sysctl(dp, "net.ipv4.tcp_sack=0"),
        Impair::Jumbo => {
            topo.client.ip(&["link", "set", "c0", "mtu", "9000"]);
            topo.ingress.ip(&["link", "set", "i0", "mtu", "9000"]);
        }
        Impair::Reorder => {
            reorder(client, "c0", 2);
            reorder(dp, "d0", 2);
        }
        Impair::EcnBothLegs => {
            sysctl(client, "net.ipv4.tcp_ecn=1");
            sysctl(&topo.ingress, "net.ipv4.tcp_ecn=1");
        }
        Impair::EcnAskedByClient => sysctl(client, "net.ipv4.tcp_ecn=1"),
        Impair::EcnClientLegOnly => {
            sysctl(client, "net.ipv4.tcp_ecn=1");
            sysctl(dp, "net.ipv4.tcp_ecn=0");
        }
        Impair::EcnBackendLegOnly => sysctl(&topo.ingress, "net.ipv4.tcp_ecn=1"),
    }
}

/// Whether `sock` negotiated ECN (`TCPI_OPT_ECN`).
fn ecn_negotiated(sock: &tokio::net::TcpStream) -> bool {
    let info = zone_ingress::sys::tcp_info(std::os::fd::AsFd::as_fd(sock)).expect("TCP_INFO");
    info.options() & zone_ingress::sys::TCPI_OPT_ECN != 0
}

/// One mTLS connection through the packet path, `size` each way, under `how`.
fn transfer(how: Impair, v6: bool, size: u64) {
    transfer_by(how, v6, size, "packet");
}

/// One mTLS connection, `size` each way, under `how`, carried by the splice `mode` names.
fn transfer_by(how: Impair, v6: bool, size: u64, mode: &str) {
    let topo = Topology::new(3);
    impair(&topo, how);
    let pki = Pki::new();
    let rt = runtime();
    let listen = if v6 { Topology::ingress_v6().to_string() } else { Topology::ingress_v4().to_string() };
    let daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml(&listen, 10001, 9901),
        &section5_inventory(v6),
        &["--splice", "packet", "--drain-time", "1s"],
    );
    rt.block_on(async {
        let addr = SocketAddr::new(Topology::dataplane_addr(1, v6), 8080);
        let leaf = pki.leaf("backend-1", &[BACKEND_MS]);
        let stats = spawn_dataplane(topo.dataplanes[0].listen(addr), "backend-1", Some(pki.server_config(&leaf)));
        let client_leaf = pki.leaf("remote-client", &["client.test"]);
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(&client_leaf));
        let ingress = SocketAddr::new(listen.parse().expect("ip"), 10001);
        let tcp = topo.client.connect(ingress).expect("connect to the ingress");
        let client_ecn = ecn_negotiated(&tcp);
        let tls = stream::mtls_handshake(&connector, tcp, BACKEND_MS, Duration::from_secs(10)).await;
        if let Some((client_leg, backend_leg)) = how.ecn_legs() {
            assert_eq!(client_ecn, client_leg, "ECN on the client leg");
            let backend = stats.tcp_options.lock().expect("lock").first().copied().expect("the dataplane accepted");
            assert_eq!(
                backend & zone_ingress::sys::TCPI_OPT_ECN != 0,
                backend_leg,
                "ECN on the backend leg:\n{}",
                daemon.log_text()
            );
        }
        let out = tokio::time::timeout(Duration::from_secs(240), stream::client(tls, size, size))
            .await
            .expect("transfer timed out")
            .expect("transfer");
        assert!(out.up_ok, "client → dataplane SHA-256 mismatch");
        assert!(out.down_ok, "dataplane → client SHA-256 mismatch");
        assert_eq!(out.dataplane, "backend-1");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.completed.load(Ordering::Relaxed) < 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.completed.load(Ordering::Relaxed), 1, "errors: {:?}", stats.errors.lock().expect("lock"));
    });
    assert!(
        daemon.wait_log_count("connection closed", 1, Duration::from_secs(15)),
        "no access line:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert_eq!(log.matches(&format!("mode=\"{mode}\" bytes")).count(), 1, "carried by the {mode} splice:\n{log}");
    if let Some((client_leg, backend_leg)) = how.ecn_legs() {
        // ECN-capable packets reach the dataplane only when its leg negotiated ECN: a socket
        // that asked and was refused must not keep marking its packets.
        let ect = ops::nft_counted(&topo.dataplanes[0], "zi_ect");
        assert_eq!(ect > 0, backend_leg, "{ect} ECN-capable packets reached the dataplane");
        if client_leg != backend_leg {
            let leg = if client_leg { "client" } else { "backend" };
            let reason = format!("ECN was negotiated on the {leg} leg only");
            assert!(log.contains(&reason), "the refusal's reason ({reason}):\n{log}");
        }
    }
    if let Impair::Loss { client_leg } = how {
        let n = dropped(if client_leg { &topo.client } else { &topo.dataplanes[0] });
        // 1 % of the packets as the stack handles them: a dropped GSO packet takes up to 45
        // segments with it, so a few dozen drops already mean thousands of lost segments.
        assert!(n > 20, "the loss rules dropped only {n} packets");
        eprintln!("loss on the {} leg: {n} packets dropped", if client_leg { "client" } else { "backend" });
    }
    if let Impair::Reorder = how {
        let (c, d) = (reordered(&topo.client), reordered(&topo.dataplanes[0]));
        assert!(c > 20 && d > 20, "the reorder rules held back only {c} (client) and {d} (dataplane) packets");
        // The receivers saw the reordering: segments queued out of order at both ends.
        let (oc, od) = (out_of_order(&topo.client), out_of_order(&topo.dataplanes[0]));
        assert!(oc > 0 && od > 0, "out-of-order segments: {oc} at the client, {od} at the dataplane");
        eprintln!(
            "reordering: {c} packets held back at the client, {d} at the dataplane; {oc} and {od} queued out of order"
        );
    }
    let scrape = ops::get(&topo.ingress, "127.0.0.1:9901".parse().expect("addr"), "/stats/prometheus").body;
    let bad = scrape
        .lines()
        .find(|l| l.starts_with("zone_ingress_packet_program_packets_total{result=\"bad_options\"}"))
        .unwrap_or_else(|| panic!("program counters in the scrape:\n{scrape}"));
    assert!(bad.ends_with(" 0"), "packets with options the program could not translate: {bad}");
}

#[test]
fn loss_1pct_on_client_leg_256mib_each_way() {
    transfer(Impair::Loss { client_leg: true }, false, 256 * MIB);
}

#[test]
fn loss_1pct_on_backend_leg_256mib_each_way() {
    transfer(Impair::Loss { client_leg: false }, false, 256 * MIB);
}

#[test]
fn reordering_on_both_legs_64mib_each_way() {
    transfer(Impair::Reorder, false, 64 * MIB);
}

#[test]
fn window_scales_differ_between_legs() {
    transfer(Impair::WindowScales, false, 64 * MIB);
}

#[test]
fn timestamps_off_at_the_client() {
    transfer(Impair::NoTimestampsClient, false, 64 * MIB);
}

#[test]
fn sack_off_at_the_backend() {
    transfer(Impair::NoSackBackend, false, 64 * MIB);
}

#[test]
fn mtu_9000_client_leg_1500_backend_leg() {
    transfer(Impair::Jumbo, false, 64 * MIB);
}

/// ECN on both legs: the program passes the codepoints and the ECE/CWR flags through, which
/// end to end is right.
#[test]
fn ecn_on_both_legs() {
    transfer(Impair::EcnBothLegs, false, 64 * MIB);
}

/// A client that asks for ECN, through an ingress whose host does not: the backend's connect
/// asks for it too, and the flow is forwarded at packet level with ECN end to end (over IPv6;
/// `ecn_on_both_legs` asks over IPv4). The dataplane accepting ECN also shows that the SYN left
/// without ECT: Linux refuses ECN to an ECN-capable SYN.
#[test]
fn ecn_asked_by_the_client_is_asked_of_the_backend() {
    transfer(Impair::EcnAskedByClient, true, 64 * MIB);
}

/// ECN on the client leg alone (the dataplane refuses it): marks on one leg would never reach
/// the other leg's sender, so the flow takes the sockmap splice.
#[test]
fn ecn_on_the_client_leg_only_takes_the_sockmap_splice() {
    transfer_by(Impair::EcnClientLegOnly, false, 16 * MIB, "kernel");
}

/// ECN on the backend leg alone (the ingress's host asks, the client does not): the sockmap
/// splice too.
#[test]
fn ecn_on_the_backend_leg_only_takes_the_sockmap_splice() {
    transfer_by(Impair::EcnBackendLegOnly, false, 16 * MIB, "kernel");
}

#[test]
fn ipv6_64mib_each_way() {
    transfer(Impair::None, true, 64 * MIB);
}

#[test]
fn ipv6_with_loss_on_backend_leg() {
    transfer(Impair::Loss { client_leg: false }, true, 64 * MIB);
}

/// A packet-level flow idle for longer than `--idle-timeout` is reset both ways by RSTs the
/// daemon sends for its parked sockets (the peers accept them: RFC 5961's exact sequence
/// number), and the access log says `idle_timeout`.
#[test]
fn idle_flow_is_reset_both_ways() {
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &["--idle-timeout", "2s"]);
    idle_flow_is_reset(&topo, &daemon);
}

/// One plain flow, some bytes each way, then silence: the idle timeout (2 s) resets both ends,
/// and the access log has the flow's one packet-level line, with `idle_timeout`.
fn idle_flow_is_reset(topo: &Topology, daemon: &Daemon) {
    runtime().block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let (mut c, mut b, _) = open_flow(topo, &l).await;
        expect_reset_both_ways(&mut c, &mut b, Duration::from_secs(8)).await;
    });
    assert!(daemon.wait_log_count("reason=\"idle_timeout\"", 1, Duration::from_secs(5)), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert_eq!(log.matches("mode=\"packet\" bytes").count(), 1, "{log}");
}

/// An idle flow goes dormant: the daemon keeps nothing of it but the map entries, yet
/// `/connections` lists it with its route and exact bytes, the cluster's counters and cap count
/// it, it carries bytes both ways while dormant, and its end wakes it: one access log line with
/// the exact totals, its cap slot and source port given back. A second dormant flow is reset
/// both ways by the idle timeout.
#[test]
fn idle_flow_goes_dormant_and_wakes_at_its_end() {
    use tokio::io::AsyncWriteExt as _;
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &["--bpf-pin-dir", "off", "--idle-timeout", "7s"]);
    let admin = ops::admin_addr(9901);
    let scrape = || ops::scrape(&topo.ingress, admin);
    let dormant = || dormant_flows(&topo);
    let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}").len() as u64;
    runtime().block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let (mut c, mut b, _) = open_flow(&topo, &l).await;
        let client = c.local_addr().expect("addr").to_string();
        assert_eq!(dormant(), 0.0, "a flow that just switched is awake");
        assert!(ops::wait_until(Duration::from_secs(6), || dormant() == 1.0), "{}", daemon.log_text());
        let listed = |up: u64, down: u64| {
            let page = ops::get(&topo.ingress, admin, "/connections").json();
            assert_eq!(page["total"], 1, "{page}");
            let f = &page["connections"][0];
            assert_eq!(f["client"], client.as_str(), "{page}");
            assert_eq!(f["mode"], "packet", "{page}");
            assert_eq!(f["sni"], "backend{mesh=default,version=v1}", "{page}");
            assert_eq!(f["route"]["service"], "backend", "{page}");
            assert_eq!(f["bytesClientToBackend"], up, "{page}");
            assert_eq!(f["bytesBackendToClient"], down, "{page}");
            let s = scrape();
            assert_eq!(s.sum("envoy_cluster_upstream_cx_active"), 1.0, "the dormant flow keeps its cap slot");
            assert_eq!(s.sum("envoy_cluster_upstream_cx_tx_bytes_total"), up as f64, "{}", s.text);
            assert_eq!(s.sum("envoy_cluster_upstream_cx_rx_bytes_total"), down as f64, "{}", s.text);
        };
        listed(hello, 4);
        // Bytes both ways while dormant: forwarded, counted, and the flow stays dormant.
        c.write_all(&zone_ingress_tests::raw::pattern(7, 1500)).await.expect("write");
        assert_eq!(read_n(&mut b, 1500, "while dormant").await, zone_ingress_tests::raw::pattern(7, 1500));
        b.write_all(&zone_ingress_tests::raw::pattern(8, 600)).await.expect("write");
        assert_eq!(read_n(&mut c, 600, "while dormant").await, zone_ingress_tests::raw::pattern(8, 600));
        listed(hello + 1500, 604);
        assert_eq!(dormant(), 1.0);
        // Its end wakes it.
        c.shutdown().await.expect("client FIN");
        expect_eof(&mut b).await;
        b.shutdown().await.expect("backend FIN");
        expect_eof(&mut c).await;
        assert!(daemon.wait_log_count("connection closed", 1, Duration::from_secs(5)), "{}", daemon.log_text());
        let log = daemon.log_text();
        assert!(
            log.contains(&format!("bytes_client_to_backend={} bytes_backend_to_client=604", hello + 1500)),
            "{log}"
        );
        assert_eq!(log.matches("connection closed").count(), 1, "{log}");
        let s = scrape();
        assert_eq!(s.must("zone_ingress_packet_dormant_flows", &[]), 0.0);
        assert_eq!(s.sum("envoy_cluster_upstream_cx_active"), 0.0, "{}", s.text);
        assert_eq!(s.sum("envoy_cluster_upstream_cx_tx_bytes_total"), (hello + 1500) as f64, "{}", s.text);
        assert_eq!(ops::get(&topo.ingress, admin, "/connections").json()["total"], 0);
        assert!(
            ops::wait_until(Duration::from_secs(5), || scrape().must("zone_ingress_packet_source_ports_held", &[])
                == 0.0),
            "the port is given back after the linger"
        );
        // A dormant flow past the idle timeout is reset both ways.
        let (mut c, mut b, _) = open_flow(&topo, &l).await;
        assert!(ops::wait_until(Duration::from_secs(6), || dormant() == 1.0), "{}", daemon.log_text());
        expect_reset_both_ways(&mut c, &mut b, Duration::from_secs(10)).await;
        assert!(daemon.wait_log_count("reason=\"idle_timeout\"", 1, Duration::from_secs(5)), "{}", daemon.log_text());
        assert_eq!(dormant(), 0.0);
        // The end of the drain resets a dormant flow too.
        let (mut c, mut b, _) = open_flow(&topo, &l).await;
        assert!(ops::wait_until(Duration::from_secs(6), || dormant() == 1.0), "{}", daemon.log_text());
        daemon.signal(libc::SIGTERM);
        expect_reset_both_ways(&mut c, &mut b, Duration::from_secs(5)).await;
    });
    let mut daemon = daemon;
    assert!(daemon.stop(Duration::from_secs(10)).is_some_and(|s| s.success()), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(log.contains("reason=\"shutdown\""), "{log}");
    assert_eq!(log.matches("connection closed").count(), 3, "{log}");
}

/// A client gives up on a dormant flow without a word (its socket closed in repair mode: no FIN,
/// no RST) and connects again from the same port. The program drops the old flow's client entry
/// at the SYN; the scan of dormant flows finds it gone and resets the backend leg; once the old
/// flow is removed, its guard no longer holds the listener's SYN-ACK, and the new connection
/// completes and works. The old flow is logged once, `internal_error`, with no byte counted for the
/// direction whose entry is gone.
#[test]
fn client_abandoning_a_dormant_flow_then_reusing_its_port() {
    use std::os::fd::AsRawFd as _;
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &["--bpf-pin-dir", "off", "--idle-timeout", "8s"]);
    let dormant = || dormant_flows(&topo);
    let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
    runtime().block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let ingress = SocketAddr::new(Topology::ingress_v4().into(), 10001);
        let connect = || async {
            let sock = topo.client.run(tokio::net::TcpSocket::new_v4).expect("socket");
            sock.set_reuseaddr(true).expect("SO_REUSEADDR");
            sock.bind(SocketAddr::new(std::net::Ipv4Addr::new(198, 18, 0, 1).into(), 47100)).expect("bind");
            tokio::time::timeout(Duration::from_secs(15), sock.connect(ingress))
                .await
                .expect("connect timed out")
                .expect("connect")
        };
        let mut c = connect().await;
        let (mut b, _) = exchange(&mut c, &l, &hello, b"pong").await;
        assert!(ops::wait_until(Duration::from_secs(6), || dormant() == 1.0), "{}", daemon.log_text());
        // Gone without a word: in repair mode, closing sends nothing.
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a live fd with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_REPAIR,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "TCP_REPAIR: {}", std::io::Error::last_os_error());
        drop(c);
        let mut c = connect().await;
        // The new connection's dataplane socket stays open to the end of the test.
        let (_b2, _) = exchange(&mut c, &l, &hello, b"again").await;
        // The old backend leg was reset.
        let mut one = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut b, &mut one)).await;
        assert!(
            matches!(&r, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the old backend leg: {r:?}"
        );
    });
    assert!(daemon.wait_log_count("connection closed", 1, Duration::from_secs(5)), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(log.contains("reason=\"internal_error\""), "{log}");
    assert!(log.contains("bytes_client_to_backend=0 bytes_backend_to_client=4"), "{log}");
}

/// Flows that end at once, both ways, before the monitor has looked at them: nothing of the
/// ingress's own sockets reaches either end afterwards. (An ended flow's backend socket was
/// left open until the linger's end; the backend's acknowledgment of the ClientHello had gone
/// to the client with its answer, so the socket sent the ClientHello again at its
/// retransmission timeout, and the client, closed by then, answered the backend's duplicate
/// acknowledgment with a RST.)
#[test]
fn flows_ending_at_once_leave_no_packet_behind() {
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &[]);
    let rt = runtime();
    const FLOWS: usize = 12;
    rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let counts = || {
            [
                ops::nstat(&topo.ingress, "TcpRetransSegs"),
                ops::nstat(&topo.client, "TcpOutRsts"),
                ops::nstat(&topo.dataplanes[0], "TcpOutRsts"),
            ]
        };
        let before = counts();
        for _ in 0..FLOWS {
            let (c, b, _) = open_flow(&topo, &l).await;
            // The dataplane closes first, the client at once after.
            drop(b);
            drop(c);
        }
        // Past a retransmission timeout and its first backoff (200 ms, then 400 ms).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = counts();
        assert_eq!(
            [after[0] - before[0], after[1] - before[1], after[2] - before[2]],
            [0; 3],
            "segments the ingress's namespace retransmitted, RSTs the client and the dataplane sent:\n{}",
            daemon.log_text()
        );
    });
    let log = daemon.log_text();
    assert_eq!(log.matches("mode=\"packet\" bytes").count(), FLOWS, "every flow at packet level:\n{log}");
}

/// A client that reuses its 4-tuple at once (it reset the last connection, so it keeps no
/// TIME_WAIT) gets a new, working connection each time, while the previous flow's entries still
/// linger: the new SYN is not taken for the old flow.
#[test]
fn client_reusing_its_port_at_once() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &[]);
    let rt = runtime();
    const ROUNDS: usize = 20;
    rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
        let server = tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let (mut b, _) =
                    tokio::time::timeout(Duration::from_secs(5), l.accept()).await.expect("accept").expect("accept");
                // The first byte of the ClientHello: the connection reached this backend.
                let mut first = [0u8; 1];
                b.read_exact(&mut first).await.expect("the ClientHello's first byte");
                b.write_all(b"ok").await.expect("reply");
                // Read until the client's reset.
                let mut rest = [0u8; 4096];
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), b.read(&mut rest)).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        });
        let ingress = SocketAddr::new(Topology::ingress_v4().into(), 10001);
        for round in 0..ROUNDS {
            let sock = topo.client.run(tokio::net::TcpSocket::new_v4).expect("socket");
            sock.set_reuseaddr(true).expect("SO_REUSEADDR");
            sock.bind(SocketAddr::new(std::net::Ipv4Addr::new(198, 18, 0, 1).into(), 47000))
                .expect("bind the same port");
            let mut c = tokio::time::timeout(Duration::from_secs(3), sock.connect(ingress))
                .await
                .unwrap_or_else(|_| panic!("round {round}: connect timed out"))
                .unwrap_or_else(|e| panic!("round {round}: connect: {e}"));
            c.write_all(&hello).await.expect("hello");
            let mut ok = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut ok))
                .await
                .unwrap_or_else(|_| panic!("round {round}: no reply"))
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(&ok, b"ok");
            zone_ingress_tests::raw::set_linger_zero(&c).expect("SO_LINGER 0");
            drop(c);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.await.expect("server");
    });
    assert!(daemon.wait_log_count("connection closed", ROUNDS, Duration::from_secs(10)), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert_eq!(log.matches("mode=\"packet\" bytes").count(), ROUNDS, "every round at packet level:\n{log}");
}

/// A bpffs of the test's own, mounted where the daemons' namespaces see it (`ip netns exec`
/// mounts a fresh /sys, without /sys/fs/bpf): unmounted, with whatever is pinned in it, on drop.
struct BpfFs(std::path::PathBuf);

impl BpfFs {
    fn mount() -> Self {
        let dir = std::env::temp_dir().join(format!("zi-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mount point");
        let out = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir).output().expect("mount");
        assert!(out.status.success(), "mount -t bpf: {}", String::from_utf8_lossy(&out.stderr));
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Reads exactly `n` bytes, or panics saying `what`.
async fn read_n(s: &mut tokio::net::TcpStream, n: usize, what: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    buf
}

/// The daemon of most tests here: listener 198.18.0.2:10001, admin port 9901, the section 5
/// inventory, `--splice packet --drain-time 1s`, then `extra`.
/// Flows the daemon in `topo`'s ingress holds dormant (`zone_ingress_packet_dormant_flows`).
fn dormant_flows(topo: &Topology) -> f64 {
    ops::scrape(&topo.ingress, ops::admin_addr(9901)).must("zone_ingress_packet_dormant_flows", &[])
}

fn packet_daemon(topo: &Topology, extra: &[&str]) -> Daemon {
    let mut args = vec!["--splice", "packet", "--drain-time", "1s"];
    args.extend_from_slice(extra);
    Daemon::start(&topo.ingress, &zone_ingress_yaml("198.18.0.2", 10001, 9901), &section5_inventory(false), &args)
}

/// A plain flow through the ingress on port 10001 to the dataplane's listener `l`: the probe
/// ClientHello reaches the dataplane whole, and 4 bytes come back to the client. Returns the
/// client's socket, the dataplane's, and the backend leg's source port.
async fn open_flow(
    topo: &Topology,
    l: &tokio::net::TcpListener,
) -> (tokio::net::TcpStream, tokio::net::TcpStream, u16) {
    let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
    let mut c = topo.client.connect(SocketAddr::new(Topology::ingress_v4().into(), 10001)).expect("connect");
    let (b, peer) = exchange(&mut c, l, &hello, b"pong").await;
    (c, b, peer.port())
}

/// The client `c` sends `hello`; the dataplane accepts on `l`, receives it whole and answers
/// `answer`, which the client receives whole. Returns the dataplane's socket and its peer.
async fn exchange(
    c: &mut tokio::net::TcpStream,
    l: &tokio::net::TcpListener,
    hello: &[u8],
    answer: &[u8],
) -> (tokio::net::TcpStream, SocketAddr) {
    use tokio::io::AsyncWriteExt as _;
    c.write_all(hello).await.expect("hello");
    let (mut b, peer) =
        tokio::time::timeout(Duration::from_secs(5), l.accept()).await.expect("accept").expect("accept");
    assert_eq!(read_n(&mut b, hello.len(), "the ClientHello").await, hello);
    b.write_all(answer).await.expect("backend write");
    assert_eq!(read_n(c, answer.len(), "the answer").await, answer);
    (b, peer)
}

/// The peer's FIN arrives within 5 s, with nothing before it.
async fn expect_eof(s: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "expected the peer's FIN and nothing else: {n:?} {rest:?}");
}

/// Both ends of an idle flow see a reset within `within` (the idle timeout's RSTs).
async fn expect_reset_both_ways(c: &mut tokio::net::TcpStream, b: &mut tokio::net::TcpStream, within: Duration) {
    use tokio::io::AsyncReadExt as _;
    let (mut one, mut other) = ([0u8; 1], [0u8; 1]);
    let (rc, rb) =
        tokio::join!(tokio::time::timeout(within, c.read(&mut one)), tokio::time::timeout(within, b.read(&mut other)),);
    for (who, r) in [("client", rc), ("backend", rb)] {
        match r {
            Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{who}: {e}"),
            other => panic!("{who}: expected a reset after the idle timeout, got {other:?}"),
        }
    }
}

/// The daemon is SIGKILLed while packet-level flows run: its pinned programs and maps keep
/// translating them, so a 256 MiB mTLS transfer each way completes byte-exact and an open flow
/// keeps carrying bytes with no daemon at all. A new daemon started with the same pin directory
/// adopts all three flows (the finished one, the open one, an idle one): lists them in
/// `/connections`, counts them, logs each close with exact byte totals, resets the idle one
/// after its idle timeout, and removes every entry after the linger. Its graceful exit removes
/// the pins.
#[test]
fn daemon_killed_mid_transfer_flows_survive_and_are_adopted() {
    use tokio::io::AsyncWriteExt as _;
    let topo = Topology::new(1);
    let bpffs = BpfFs::mount();
    let pins = bpffs.0.join("zone-ingress");
    let pin_arg = pins.to_str().expect("utf-8").to_owned();
    let pki = Pki::new();
    let rt = runtime();
    let admin: SocketAddr = "127.0.0.1:9901".parse().expect("addr");
    let ingress = SocketAddr::new(Topology::ingress_v4().into(), 10001);
    let mut first = packet_daemon(&topo, &["--bpf-pin-dir", &pin_arg]);
    assert!(pins.join("PKT_FLOWS").exists(), "maps pinned in {}:\n{}", pins.display(), first.log_text());
    assert!(pins.join("link-ingress-i0").exists(), "links pinned in {}:\n{}", pins.display(), first.log_text());
    let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
    let size = 256 * MIB;
    let (second, open_up, open_down) = rt.block_on(async {
        let addr = SocketAddr::new(Topology::dataplane_addr(1, false), 8080);
        // Two plain flows first, accepted here; then the listener serves the mTLS protocol.
        let raw_backend = topo.dataplanes[0].listen(addr);
        let mut open = topo.client.connect(ingress).expect("connect");
        open.write_all(&hello).await.expect("hello");
        let mut idle = topo.client.connect(ingress).expect("connect");
        idle.write_all(&hello).await.expect("hello");
        let (mut open_b, _) =
            tokio::time::timeout(Duration::from_secs(5), raw_backend.accept()).await.expect("accept").expect("accept");
        let (mut idle_b, _) =
            tokio::time::timeout(Duration::from_secs(5), raw_backend.accept()).await.expect("accept").expect("accept");
        // Either accepted connection may be either flow: tell them apart by a first message.
        assert_eq!(read_n(&mut open_b, hello.len(), "hello").await, hello);
        assert_eq!(read_n(&mut idle_b, hello.len(), "hello").await, hello);
        open.write_all(b"open").await.expect("tag");
        idle.write_all(b"idle").await.expect("tag");
        let tag = read_n(&mut open_b, 4, "tag").await;
        let _ = read_n(&mut idle_b, 4, "tag").await;
        if tag != b"open" {
            std::mem::swap(&mut open_b, &mut idle_b);
        }
        let (mut up, mut down) = (hello.len() + 4, 0usize);
        let exchange = |n: usize, seed: u64| zone_ingress_tests::raw::pattern(seed, n);
        // Some bytes each way with the first daemon.
        open.write_all(&exchange(1000, 1)).await.expect("write");
        assert_eq!(read_n(&mut open_b, 1000, "before the kill").await, exchange(1000, 1));
        open_b.write_all(&exchange(500, 2)).await.expect("write");
        assert_eq!(read_n(&mut open, 500, "before the kill").await, exchange(500, 2));
        (up, down) = (up + 1000, down + 500);
        idle_b.write_all(b"ok").await.expect("write");
        assert_eq!(read_n(&mut idle, 2, "idle flow").await, b"ok");
        // The bulk mTLS flow; the daemon dies while it runs.
        let leaf = pki.leaf("backend-1", &[BACKEND_MS]);
        let stats = spawn_dataplane(raw_backend, "backend-1", Some(pki.server_config(&leaf)));
        let connector =
            tokio_rustls::TlsConnector::from(pki.client_config(&pki.leaf("remote-client", &["client.test"])));
        let tcp = topo.client.connect(ingress).expect("connect to the ingress");
        let tls = stream::mtls_handshake(&connector, tcp, BACKEND_MS, Duration::from_secs(10)).await;
        let bulk = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(120), stream::client(tls, size, size)).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!bulk.is_finished(), "the transfer ended before the kill: nothing was tested");
        first.signal(libc::SIGKILL);
        assert!(first.wait_exit(Duration::from_secs(5)).is_some(), "the daemon did not die");
        // No daemon now: the bulk transfer completes and the open flow carries bytes.
        let out = bulk.await.expect("join").expect("transfer timed out").expect("transfer");
        assert!(out.up_ok && out.down_ok, "SHA-256 mismatch across the kill: {out:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.completed.load(Ordering::Relaxed) < 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.completed.load(Ordering::Relaxed), 1, "errors: {:?}", stats.errors.lock().expect("lock"));
        open.write_all(&exchange(2000, 3)).await.expect("write");
        assert_eq!(read_n(&mut open_b, 2000, "with no daemon").await, exchange(2000, 3));
        open_b.write_all(&exchange(700, 4)).await.expect("write");
        assert_eq!(read_n(&mut open, 700, "with no daemon").await, exchange(700, 4));
        (up, down) = (up + 2000, down + 700);
        // A new daemon on the same pins adopts the three flows.
        let second = packet_daemon(&topo, &["--bpf-pin-dir", &pin_arg, "--idle-timeout", "4s"]);
        assert!(
            second.wait_log("adopted the flows an earlier daemon left running flows=3", Duration::from_secs(5)),
            "{}",
            second.log_text()
        );
        let listed = ops::get(&topo.ingress, admin, "/connections").json();
        let conns = listed["connections"].as_array().expect("connections").clone();
        let mine = conns
            .iter()
            .find(|c| c["client"] == open.local_addr().expect("addr").to_string())
            .unwrap_or_else(|| panic!("the open flow is not listed: {listed}"));
        assert_eq!(mine["mode"], "packet", "{mine}");
        assert_eq!(mine["bytesClientToBackend"], up as u64, "{mine}");
        assert_eq!(mine["bytesBackendToClient"], down as u64, "{mine}");
        assert_eq!(mine["sni"], "backend{mesh=default,version=v1}", "{mine}");
        // The adopted flow keeps working, then ends with FINs both ways.
        open.write_all(&exchange(3000, 5)).await.expect("write");
        assert_eq!(read_n(&mut open_b, 3000, "after the adoption").await, exchange(3000, 5));
        open_b.write_all(&exchange(900, 6)).await.expect("write");
        assert_eq!(read_n(&mut open, 900, "after the adoption").await, exchange(900, 6));
        (up, down) = (up + 3000, down + 900);
        open.shutdown().await.expect("client FIN");
        let mut rest = Vec::new();
        use tokio::io::AsyncReadExt as _;
        tokio::time::timeout(Duration::from_secs(5), open_b.read_to_end(&mut rest))
            .await
            .expect("backend EOF")
            .expect("read");
        assert!(rest.is_empty());
        open_b.shutdown().await.expect("backend FIN");
        tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
            .await
            .expect("client EOF")
            .expect("read");
        // The idle flow is reset both ways by the new daemon's idle timeout.
        expect_reset_both_ways(&mut idle, &mut idle_b, Duration::from_secs(10)).await;
        (second, up, down)
    });
    let mut second = second;
    assert!(second.wait_log_count("connection closed", 3, Duration::from_secs(5)), "{}", second.log_text());
    let log = second.log_text();
    assert_eq!(log.matches("mode=\"packet\" bytes").count(), 3, "{log}");
    assert!(
        log.contains(&format!("bytes_client_to_backend={open_up} bytes_backend_to_client={open_down}")),
        "the open flow's exact totals ({open_up}, {open_down}):\n{log}"
    );
    assert!(log.contains("reason=\"idle_timeout\""), "{log}");
    let scrape = ops::scrape(&topo.ingress, admin);
    assert_eq!(scrape.must("zone_ingress_packet_adopted_total", &[]), 3.0);
    // Entries removed after the linger; no parked socket left.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = ops::scrape(&topo.ingress, admin);
        let left = s.must("zone_ingress_bpf_map_entries", &[("map", "PKT_FLOWS")])
            + s.must("zone_ingress_bpf_map_entries", &[("map", "PKT_QUIET")])
            + s.must("zone_ingress_bpf_map_entries", &[("map", "PKT_META")]);
        if left == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "map entries left 15 s after the ends: {}", s.text);
        std::thread::sleep(Duration::from_millis(200));
    }
    let ss = topo.ingress.command("ss").args(["-tanH"]).output().expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout).into_owned();
    assert!(!ss.lines().any(|l| l.contains(":8080")), "sockets left:\n{ss}");
    assert!(second.stop(Duration::from_secs(10)).is_some_and(|s| s.success()), "{}", second.log_text());
    assert!(!pins.exists(), "a graceful exit removes the pins");
}

/// SIGQUIT hands over: the daemon stops accepting and exits 0 at once, its packet-level flow
/// keeps running, and the next daemon adopts it and logs its close (the first one never does).
/// The flow is dormant when handed over, and goes dormant again in the next daemon.
#[test]
fn sigquit_hands_flows_over_to_the_next_daemon() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let topo = Topology::new(1);
    let bpffs = BpfFs::mount();
    let pins = bpffs.0.join("zone-ingress");
    let pin_arg = pins.to_str().expect("utf-8").to_owned();
    let args = ["--splice", "packet", "--bpf-pin-dir", &pin_arg, "--drain-time", "1s"];
    let zi = zone_ingress_yaml("198.18.0.2", 10001, 9901);
    let mut first = Daemon::start(&topo.ingress, &zi, &section5_inventory(false), &args);
    let rt = runtime();
    let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
    let (second, up, down) = rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let (mut c, mut b, _) = open_flow(&topo, &l).await;
        // Handed over while dormant: its record says so, and the next daemon adopts it anyway.
        let admin = ops::admin_addr(9901);
        let dormant = || dormant_flows(&topo);
        assert!(ops::wait_until(Duration::from_secs(6), || dormant() == 1.0), "{}", first.log_text());
        first.signal(libc::SIGQUIT);
        let status = first.wait_exit(Duration::from_secs(5)).expect("the daemon exits at once on SIGQUIT");
        assert!(status.success(), "{status:?}\n{}", first.log_text());
        c.write_all(b"while no daemon runs").await.expect("write");
        assert_eq!(read_n(&mut b, 20, "no daemon").await, b"while no daemon runs");
        let second = Daemon::start(&topo.ingress, &zi, &section5_inventory(false), &args);
        assert!(second.wait_log("flows=1", Duration::from_secs(5)), "{}", second.log_text());
        let page = ops::get(&topo.ingress, admin, "/connections").json();
        assert_eq!(page["connections"][0]["bytesClientToBackend"], hello.len() + 20, "{page}");
        // Idle again: dormant in this daemon too, and its end wakes it here.
        assert!(ops::wait_until(Duration::from_secs(6), || dormant() == 1.0), "{}", second.log_text());
        c.shutdown().await.expect("FIN");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut rest)).await.expect("EOF").expect("read");
        b.shutdown().await.expect("FIN");
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.expect("EOF").expect("read");
        (second, hello.len() + 20, 4)
    });
    assert!(second.wait_log("connection closed", Duration::from_secs(5)), "{}", second.log_text());
    let log = second.log_text();
    assert!(
        log.contains(&format!("mode=\"packet\" bytes_client_to_backend={up} bytes_backend_to_client={down}")),
        "{log}"
    );
    assert!(!first.log_text().contains("connection closed"), "the first daemon logged a close:\n{}", first.log_text());
    assert!(pins.join("PKT_FLOWS").exists(), "the second daemon holds the pins");
}

/// The client sends its hello with 512 KiB of early data in one write, so the backend socket
/// relays a lot at the switch, and the backend answers 1 MiB at once, before it acknowledged all
/// of it and without reading on. Three things must hold, or a direction stalls (each failed
/// this test before it was fixed): the backend's ACKs, whose sequence numbers are far past what
/// the ingress's backend socket received (the answer went to the client), still reach that
/// socket as ACKs; that socket's segments, whose acknowledgment is far behind what the backend
/// sent, are not taken for a blind injection (RFC 5961); and the client's pure ACKs, numbered
/// past the backend's shut window (the client saw the ingress socket's wider one), are not
/// dropped unread.
#[test]
fn backend_answers_at_length_while_early_data_is_relayed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &["--bpf-pin-dir", "off"]);
    let rt = runtime();
    const EARLY: usize = 512 << 10;
    const ANSWER: usize = 1 << 20;
    rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
        let mut first = hello.clone();
        first.extend_from_slice(&zone_ingress_tests::raw::pattern(7, EARLY));
        let mut c = topo.client.connect(SocketAddr::new(Topology::ingress_v4().into(), 10001)).expect("connect");
        let (mut cr, mut cw) = c.split();
        let mut down = vec![0u8; ANSWER];
        let (sent, (mut b, answer), ()) = tokio::join!(
            async {
                cw.write_all(&first).await.expect("hello and early data");
                first.len()
            },
            async {
                let (mut b, _) =
                    tokio::time::timeout(Duration::from_secs(5), l.accept()).await.expect("accept").expect("accept");
                // The hello only, then the whole answer before reading on.
                let mut got = vec![0u8; hello.len()];
                b.read_exact(&mut got).await.expect("hello");
                let answer = zone_ingress_tests::raw::pattern(8, ANSWER);
                b.write_all(&answer).await.expect("answer");
                (b, answer)
            },
            async {
                tokio::time::timeout(Duration::from_secs(10), cr.read_exact(&mut down))
                    .await
                    .expect("the answer in time")
                    .expect("answer");
            }
        );
        assert!(down == answer, "answer corrupted");
        let mut rest = vec![0u8; EARLY];
        tokio::time::timeout(Duration::from_secs(10), b.read_exact(&mut rest))
            .await
            .expect("the early data reached the backend in time (the flow stalled)")
            .expect("early data");
        assert!(rest == first[hello.len()..sent], "early data corrupted");
        // The flow settled and keeps working both ways.
        cw.write_all(b"after").await.expect("write");
        let mut after = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), b.read_exact(&mut after)).await.expect("in time").expect("read");
        assert_eq!(&after, b"after");
        b.write_all(b"bye").await.expect("write");
        let mut bye = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), cr.read_exact(&mut bye)).await.expect("in time").expect("read");
        assert_eq!(&bye, b"bye");
    });
    let log = daemon.log_text();
    assert!(!log.contains("never acknowledged"), "{log}");
    let scrape = ops::scrape(&topo.ingress, "127.0.0.1:9901".parse().expect("addr"));
    assert_eq!(scrape.must("zone_ingress_packet_spliced_total", &[]), 1.0, "carried at packet level:\n{log}");
}

/// `--packet-ports`: a range the kernel may pick from is refused with a message that says what
/// to change (`--splice packet` exits; `auto` runs without the packet splice), and the same
/// range once listed in `net.ipv4.ip_local_reserved_ports` is used: the backend leg's source
/// port comes from it.
#[test]
fn source_port_range_must_be_one_the_kernel_never_picks() {
    let topo = Topology::new(1);
    let zi = zone_ingress_yaml("198.18.0.2", 10001, 9901);
    let inv = section5_inventory(false);
    let scratch = zone_ingress_tests::daemon::Scratch::new("ports");
    let (zi_path, inv_path) = (scratch.write("zi.yaml", &zi), scratch.write("dps.yaml", &inv));
    let args = |splice: &str| -> Vec<std::ffi::OsString> {
        ["--dataplane-file", zi_path.to_str().unwrap(), "--dataplanes", inv_path.to_str().unwrap()]
            .into_iter()
            .chain(["--splice", splice, "--packet-ports", "40000-40999", "--bpf-pin-dir", "off"])
            .map(Into::into)
            .collect()
    };
    let mut refused =
        Daemon::launch(&topo.ingress, zone_ingress_tests::daemon::Scratch::new("ports"), &args("packet"), "info");
    let status = refused.wait_exit(Duration::from_secs(20)).expect("`--splice packet` with a clashing range exits");
    assert!(!status.success(), "exit status {status}");
    let log = refused.log_text();
    assert!(
        log.contains("--packet-ports 40000-40999: port 40000 is in the kernel's ephemeral range 32768-60999")
            && log.contains("ip_local_reserved_ports"),
        "{log}"
    );
    let mut auto =
        Daemon::launch(&topo.ingress, zone_ingress_tests::daemon::Scratch::new("ports"), &args("auto"), "info");
    auto.expect_ready(Duration::from_secs(20));
    let log = auto.log_text();
    assert!(log.contains("the packet splice could not load") && log.contains("port 40000"), "{log}");
    assert!(log.contains("splice mode: auto (sockmap, then userspace)"), "{log}");
    auto.stop(Duration::from_secs(10));

    sysctl(&topo.ingress, "net.ipv4.ip_local_reserved_ports=40000-40999");
    let mut daemon =
        Daemon::launch(&topo.ingress, zone_ingress_tests::daemon::Scratch::new("ports"), &args("packet"), "info");
    daemon.expect_ready(Duration::from_secs(20));
    let rt = runtime();
    let port = rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let (c, b, port) = open_flow(&topo, &l).await;
        drop((c, b));
        port
    });
    assert!((40000..=40999).contains(&port), "backend leg from port {port}");
    assert!(daemon.wait_log_count("connection closed", 1, Duration::from_secs(10)), "{}", daemon.log_text());
    assert_eq!(daemon.log_text().matches("mode=\"packet\" bytes").count(), 1, "{}", daemon.log_text());
    daemon.stop(Duration::from_secs(10));
}

/// More flows toward one endpoint than the source port range has ports: the first 64 are carried
/// at packet level, the rest by the sockmap splice (the kernel picked their port), every one
/// byte-exact; once all have ended and lingered, no port is held.
#[test]
fn source_port_range_exhausted_flows_take_the_sockmap_splice() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const RANGE: usize = 64;
    const FLOWS: usize = RANGE + 16;
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &["--packet-ports", "61000-61063", "--bpf-pin-dir", "off"]);
    let admin = ops::admin_addr(9901);
    let rt = runtime();
    let ports = rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
        let ingress = SocketAddr::new(Topology::ingress_v4().into(), 10001);
        let mut open = Vec::new();
        // One at a time, so the order of the splices is the order of the connects.
        for i in 0..FLOWS {
            let mut c = topo.client.connect(ingress).expect("connect");
            c.write_all(&hello).await.expect("hello");
            let (mut b, peer) =
                tokio::time::timeout(Duration::from_secs(5), l.accept()).await.expect("accept").expect("accept");
            assert_eq!(read_n(&mut b, hello.len(), "the ClientHello").await, hello);
            let msg = format!("flow {i:04} down");
            b.write_all(msg.as_bytes()).await.expect("backend write");
            assert_eq!(read_n(&mut c, msg.len(), "the backend's bytes").await, msg.as_bytes());
            open.push((c, b, peer.port()));
        }
        // Every flow open at once carries bytes up too.
        for (i, (c, b, _)) in open.iter_mut().enumerate() {
            let msg = format!("flow {i:04} up");
            c.write_all(msg.as_bytes()).await.expect("client write");
            assert_eq!(read_n(b, msg.len(), "the client's bytes").await, msg.as_bytes());
        }
        let s = ops::scrape(&topo.ingress, admin);
        assert_eq!(s.must("zone_ingress_packet_source_ports_held", &[]), RANGE as f64);
        assert_eq!(s.must("zone_ingress_packet_spliced_total", &[]), RANGE as f64);
        assert_eq!(s.must("zone_ingress_packet_refused_total", &[]), (FLOWS - RANGE) as f64);
        let ports: Vec<u16> = open.iter().map(|(_, _, p)| *p).collect();
        for (mut c, mut b, _) in open {
            c.shutdown().await.expect("client FIN");
            b.shutdown().await.expect("backend FIN");
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut rest)).await;
            assert!(rest.is_empty(), "bytes after the FIN: {rest:?}");
        }
        ports
    });
    let (inside, outside): (Vec<u16>, Vec<u16>) = ports.iter().partition(|p| (61000..=61063).contains(*p));
    assert_eq!(inside.len(), RANGE, "ports {ports:?}");
    assert!(ports[..RANGE].iter().all(|p| (61000..=61063).contains(p)), "the first {RANGE} from the range: {ports:?}");
    assert!(outside.iter().all(|p| (32768..=60999).contains(p)), "the rest from the kernel's range: {outside:?}");
    assert!(daemon.wait_log_count("connection closed", FLOWS, Duration::from_secs(10)), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert_eq!(log.matches("mode=\"packet\" bytes").count(), RANGE, "{log}");
    assert_eq!(log.matches("mode=\"kernel\" bytes").count(), FLOWS - RANGE, "{log}");
    assert_eq!(log.matches("was chosen by the kernel").count(), FLOWS - RANGE, "{log}");
    // After the linger (10 s) every entry is gone and no port is held.
    let mut held = f64::NAN;
    let released = ops::wait_until(Duration::from_secs(15), || {
        held = ops::scrape(&topo.ingress, admin).must("zone_ingress_packet_source_ports_held", &[]);
        held == 0.0
    });
    assert!(released, "{held} ports still held 15 s after the flows ended");
}

/// A flow closed both ways, each FIN acknowledged, gives its backend source port back about 2 s
/// after its end (docs/design.md#packet-splice: the linger of a cleanly closed flow), and so does
/// one the client reset; one whose
/// last FIN was never acknowledged (nftables drops the client's ACKs) keeps its entries and its
/// port for the full 10 s linger, then gives them back too.
#[test]
fn closed_flow_gives_its_port_back_after_2s_an_unacknowledged_fin_after_10s() {
    use tokio::io::AsyncWriteExt as _;
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &["--bpf-pin-dir", "off"]);
    let admin = ops::admin_addr(9901);
    let held = || ops::scrape(&topo.ingress, admin).must("zone_ingress_packet_source_ports_held", &[]);
    // The flow's port is still held, and given back within `within` from now, `at_least` after
    // the flow's end or later.
    let released = |ended: std::time::Instant, what: &str, within: Duration, at_least: Duration| {
        assert_eq!(held(), 1.0, "the port is held while the flow lingers after {what}");
        let mut n = f64::NAN;
        assert!(
            ops::wait_until(within, || {
                n = held();
                n == 0.0
            }),
            "{n} ports still held {:?} after {what}\n{}",
            ended.elapsed(),
            daemon.log_text()
        );
        let after = ended.elapsed();
        assert!(after >= at_least, "released {after:?} after {what}, before {at_least:?}");
    };
    let (short, five) = (Duration::from_millis(1500), Duration::from_secs(5));
    runtime().block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        // Closed cleanly: both FINs acknowledged.
        let (mut c, mut b, _) = open_flow(&topo, &l).await;
        c.shutdown().await.expect("client FIN");
        expect_eof(&mut b).await;
        b.shutdown().await.expect("backend FIN");
        expect_eof(&mut c).await;
        released(std::time::Instant::now(), "a clean close", five, short);
        // Ended by the client's RST: nothing follows a RST, so the short linger too.
        let (c, mut b, _) = open_flow(&topo, &l).await;
        zone_ingress_tests::raw::set_linger_zero(&c).expect("SO_LINGER 0");
        drop(c);
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut b, &mut buf)).await;
        assert!(
            matches!(&r, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the backend got {r:?}, not the client's RST"
        );
        released(std::time::Instant::now(), "a RST", five, short);
        // The client's ACK of the backend's FIN never leaves its namespace.
        let (mut c, mut b, _) = open_flow(&topo, &l).await;
        c.shutdown().await.expect("client FIN");
        expect_eof(&mut b).await;
        ops::nft(
            &topo.client,
            "table inet zi_ack {\n  chain out { type filter hook output priority 0; tcp dport 10001 counter drop; }\n}\n",
        );
        b.shutdown().await.expect("backend FIN");
        expect_eof(&mut c).await;
        let ended = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(ops::nft_counted(&topo.client, "zi_ack") >= 1, "the client's ACK was not dropped");
        released(ended, "an unacknowledged FIN", Duration::from_secs(10), Duration::from_millis(9500));
        drop((c, b));
    });
    assert!(daemon.wait_log_count("connection closed", 3, Duration::from_secs(5)), "{}", daemon.log_text());
}

/// A segment whose options the translation does not know (nftables replaces the client's
/// timestamp option by NOPs) is dropped, counted, and reported in the daemon's log by the tc
/// program itself (aya-log, target `kernel`); the client's retransmission, once it carries a
/// layout the program knows again, delivers the bytes: none is lost.
#[test]
fn untranslated_option_layout_is_dropped_and_logged_by_the_program() {
    use tokio::io::AsyncWriteExt as _;
    let topo = Topology::new(1);
    let daemon = packet_daemon(&topo, &["--bpf-pin-dir", "off"]);
    let admin = ops::admin_addr(9901);
    let rt = runtime();
    rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let (mut c, mut b, _) = open_flow(&topo, &l).await;
        ops::nft(
            &topo.client,
            "table inet zi_opts {\n  chain out { type filter hook output priority 0; tcp dport 10001 tcp flags & syn == 0 counter reset tcp option timestamp; }\n}\n",
        );
        c.write_all(b"ping").await.expect("client write");
        assert!(
            daemon.wait_log("a TCP option layout it does not translate", Duration::from_secs(5)),
            "no kernel log line:\n{}",
            daemon.log_text()
        );
        let bad = ops::scrape(&topo.ingress, admin)
            .must("zone_ingress_packet_program_packets_total", &[("result", "bad_options")]);
        assert!(bad >= 1.0, "bad_options {bad}");
        ops::nft(&topo.client, "delete table inet zi_opts\n");
        // The retransmission (RTO backoff: within a few seconds) carries the timestamps again.
        let got = tokio::time::timeout(Duration::from_secs(15), read_n(&mut b, 4, "ping"))
            .await
            .expect("the retransmitted bytes arrive");
        assert_eq!(got, b"ping");
    });
    let log = daemon.log_text();
    let line = log.lines().find(|l| l.contains("a TCP option layout it does not translate")).expect("line");
    assert!(
        line.contains("WARN") && line.contains("kernel") && line.contains("zone_ingress_ebpf::packet"),
        "level, target and program of the kernel's line: {line}"
    );
    assert!(line.contains("to 10001") && line.contains("12 option bytes starting 1010101"), "{line}");
}

/// The packet splice's privileges (docs/operations.md#privileges), as the deployment files give
/// them: an unprivileged user with `CAP_BPF`, `CAP_NET_ADMIN`, `CAP_NET_RAW` and `CAP_PERFMON`
/// carries a flow at packet level, and its idle timeout resets both ends (the RSTs need the raw
/// socket). Without `CAP_PERFMON` (the verifier refuses the programs' packet pointer arithmetic)
/// `--splice packet` exits saying so; without `CAP_NET_RAW` too, `auto` takes the sockmap splice,
/// which loads with `CAP_BPF` and `CAP_NET_ADMIN` alone (its rare-event log lines included).
#[test]
fn packet_splice_runs_as_a_user_with_bpf_net_admin_net_raw_and_perfmon() {
    use std::os::unix::fs::PermissionsExt as _;

    let topo = Topology::new(1);
    // The daemon and its files where `nobody` can read them.
    let files = zone_ingress_tests::daemon::Scratch::new("caps");
    let bin = files.0.join("zone-ingress");
    std::fs::copy(zone_ingress_tests::daemon::binary(), &bin).expect("copy the daemon");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let zi = files.write("zi.yaml", &zone_ingress_yaml("198.18.0.2", 10001, 9901));
    let inv = files.write("dps.yaml", &section5_inventory(false));
    let start = |caps: &str, splice: &str| {
        let scratch = zone_ingress_tests::daemon::Scratch::new("caps");
        std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let (inh, amb) = (format!("--inh-caps=-all,{caps}"), format!("--ambient-caps=-all,{caps}"));
        let argv =
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", &inh, &amb, bin.to_str().unwrap()];
        let args: Vec<std::ffi::OsString> = [
            "--dataplane-file",
            zi.to_str().unwrap(),
            "--dataplanes",
            inv.to_str().unwrap(),
            "--splice",
            splice,
            "--bpf-pin-dir",
            "off",
            "--idle-timeout",
            "2s",
            "--drain-time",
            "1s",
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        Daemon::launch_under(&topo.ingress, scratch, &argv, &args, "info")
    };

    let mut no_perfmon = start("+bpf,+net_admin,+net_raw", "packet");
    let status = no_perfmon.wait_exit(Duration::from_secs(20)).expect("`--splice packet` without CAP_PERFMON exits");
    assert!(!status.success());
    let log = no_perfmon.log_text();
    assert!(log.contains("--splice packet: loading the packet splice: CAP_PERFMON"), "{log}");
    let mut auto = start("+bpf,+net_admin", "auto");
    auto.expect_ready(Duration::from_secs(20));
    let log = auto.log_text();
    assert!(
        log.contains("it needs CAP_NET_RAW") && log.contains("splice mode: auto (sockmap, then userspace)"),
        "{log}"
    );
    auto.stop(Duration::from_secs(10));

    let mut daemon = start("+bpf,+net_admin,+net_raw,+perfmon", "packet");
    daemon.expect_ready(Duration::from_secs(20));
    // The idle timeout's resets go out through the raw socket.
    idle_flow_is_reset(&topo, &daemon);
    let log = daemon.log_text();
    assert!(!log.contains("sending a RST failed"), "{log}");
    daemon.stop(Duration::from_secs(10));
}
