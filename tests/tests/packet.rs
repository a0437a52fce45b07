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
