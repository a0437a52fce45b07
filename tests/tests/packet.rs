//! The packet splice under conditions that make the two legs differ: real rustls mTLS end to end
//! (client and dataplane certificates from a test CA the ingress never sees), SHA-256 of every
//! byte each way, and on each leg in turn: 1 % loss both ways (nftables `numgen` drops in the
//! leg's far namespace: this kernel has neither netem nor a queueing discipline that could
//! reorder), window scales that differ,
//! timestamps off at one end, SACK off at one end, MTU 9000 on one leg and 1500 on the other,
//! and IPv6. Each case checks that the flow was carried at packet level (`mode="packet"`), with
//! exact byte totals in the access log, and that the translation saw no option layout it could
//! not translate.

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
}

fn sysctl(ns: &Netns, kv: &str) {
    let out = ns.command("sysctl").args(["-qw", kv]).output().expect("sysctl");
    assert!(out.status.success(), "sysctl {kv}: {}", String::from_utf8_lossy(&out.stderr));
}

fn nft(ns: &Netns, script: &str) {
    use std::io::Write as _;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft (installed by `cargo xtask setup`)");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("nft script");
    let out = child.wait_with_output().expect("nft");
    assert!(out.status.success(), "nft: {}\n{script}", String::from_utf8_lossy(&out.stderr));
}

/// Drops `percent` of the TCP packets entering and leaving `ns`.
fn loss(ns: &Netns, percent: u32) {
    nft(
        ns,
        &format!(
            "table inet zi_loss {{\n  chain in {{ type filter hook input priority 0; meta l4proto tcp numgen random mod 100 < {percent} counter drop; }}\n  chain out {{ type filter hook output priority 0; meta l4proto tcp numgen random mod 100 < {percent} counter drop; }}\n}}\n"
        ),
    );
}

/// Packets the loss rules of `ns` dropped.
fn dropped(ns: &Netns) -> u64 {
    let out = ns.command("nft").args(["list", "table", "inet", "zi_loss"]).output().expect("nft list");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("packets ").skip(1).filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

fn impair(topo: &Topology, how: Impair) {
    let (client, dp) = (&topo.client, &topo.dataplanes[0]);
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
    }
}

/// One mTLS connection through the packet path, `size` each way, under `how`.
fn transfer(how: Impair, v6: bool, size: u64) {
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
        let tls = stream::mtls_handshake(&connector, tcp, BACKEND_MS, Duration::from_secs(10)).await;
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
    assert_eq!(log.matches("mode=\"packet\" bytes").count(), 1, "carried at packet level:\n{log}");
    if let Impair::Loss { client_leg } = how {
        let n = dropped(if client_leg { &topo.client } else { &topo.dataplanes[0] });
        // 1 % of the packets as the stack handles them: a dropped GSO packet takes up to 45
        // segments with it, so a few dozen drops already mean thousands of lost segments.
        assert!(n > 20, "the loss rules dropped only {n} packets");
        eprintln!("loss on the {} leg: {n} packets dropped", if client_leg { "client" } else { "backend" });
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let topo = Topology::new(1);
    let daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml("198.18.0.2", 10001, 9901),
        &section5_inventory(false),
        &["--splice", "packet", "--idle-timeout", "2s", "--drain-time", "1s"],
    );
    let rt = runtime();
    rt.block_on(async {
        let l = topo.dataplanes[0].listen(SocketAddr::new(Topology::dataplane_addr(1, false), 8080));
        let hello = zone_ingress_tests::raw::probe("backend{mesh=default,version=v1}");
        let mut c = topo.client.connect(SocketAddr::new(Topology::ingress_v4().into(), 10001)).expect("connect");
        c.write_all(&hello).await.expect("hello");
        let (mut b, _) =
            tokio::time::timeout(Duration::from_secs(5), l.accept()).await.expect("accept").expect("accept");
        let mut got = vec![0u8; hello.len()];
        b.read_exact(&mut got).await.expect("hello at the backend");
        assert_eq!(got, hello);
        // Some bytes each way, then silence.
        b.write_all(b"pong").await.expect("backend write");
        let mut pong = [0u8; 4];
        c.read_exact(&mut pong).await.expect("client read");
        assert_eq!(&pong, b"pong");
        let (mut one, mut other) = ([0u8; 1], [0u8; 1]);
        let (rc, rb) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(8), c.read(&mut one)),
            tokio::time::timeout(Duration::from_secs(8), b.read(&mut other)),
        );
        for (who, r) in [("client", rc), ("backend", rb)] {
            match r {
                Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{who}: {e}"),
                other => panic!("{who}: expected a reset after the idle timeout, got {other:?}"),
            }
        }
    });
    assert!(daemon.wait_log_count("reason=\"idle_timeout\"", 1, Duration::from_secs(5)), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert_eq!(log.matches("mode=\"packet\" bytes").count(), 1, "{log}");
}

/// A client that reuses its 4-tuple at once (it reset the last connection, so it keeps no
/// TIME_WAIT) gets a new, working connection each time, while the previous flow's entries still
/// linger: the new SYN is not taken for the old flow.
#[test]
fn client_reusing_its_port_at_once() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let topo = Topology::new(1);
    let daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml("198.18.0.2", 10001, 9901),
        &section5_inventory(false),
        &["--splice", "packet", "--drain-time", "1s"],
    );
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
