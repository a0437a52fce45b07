//! End to end: rustls client (remote zone) → zone-ingress → rustls server requiring a client
//! certificate (local dataplane), in namespaces this test creates. The handshake completes end to
//! end and the SHA-256 of 64 MiB each way matches, through the kernel and the userspace path,
//! over IPv4 and IPv6.

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use zone_ingress_tests::{
    DP_NAMES,
    daemon::{Daemon, zone_ingress_yaml},
    netns::Topology,
    pki::Pki,
    runtime, section5_inventory,
    stream::{self, spawn_dataplane},
};

const MIB: u64 = 1 << 20;
const BACKEND_MS: &str = "a601e0c00295a9fbe.backend.8080.default.ms";

fn e2e(splice: &str, v6: bool) {
    let topo = Topology::new(3);
    let pki = Pki::new();
    let rt = runtime();
    let listen = if v6 { Topology::ingress_v6().to_string() } else { Topology::ingress_v4().to_string() };
    let daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml(&listen, 10001, 9901),
        &section5_inventory(v6),
        &["--splice", splice, "--drain-time", "1s"],
    );
    rt.block_on(async {
        let mut stats = Vec::new();
        for (k, name) in DP_NAMES.iter().enumerate() {
            let port = if k == 2 { 6379 } else { 8080 };
            let addr = SocketAddr::new(Topology::dataplane_addr(k + 1, v6), port);
            let leaf = pki.leaf(name, &[BACKEND_MS, "a25502fde077cd057.redis.6379.default.ms"]);
            stats.push(spawn_dataplane(topo.dataplanes[k].listen(addr), name, Some(pki.server_config(&leaf))));
        }
        let client_leaf = pki.leaf("remote-client", &["client.test"]);
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(&client_leaf));
        let ingress: SocketAddr = SocketAddr::new(listen.parse().expect("ip"), 10001);
        let mut seen = Vec::new();
        // Two connections: round robin must send one to each backend dataplane.
        for _ in 0..2 {
            let tcp = topo.client.connect(ingress).expect("connect to the ingress");
            let tls = stream::mtls_handshake(&connector, tcp, BACKEND_MS, Duration::from_secs(10)).await;
            let out = tokio::time::timeout(Duration::from_secs(120), stream::client(tls, 64 * MIB, 64 * MIB))
                .await
                .expect("transfer timed out")
                .expect("transfer");
            assert!(out.up_ok, "client → dataplane SHA-256 mismatch via {splice}");
            assert!(out.down_ok, "dataplane → client SHA-256 mismatch via {splice}");
            seen.push(out.dataplane);
        }
        seen.sort();
        assert_eq!(seen, vec!["backend-1".to_owned(), "backend-2".to_owned()], "round robin over both backends");
        for s in &stats[..2] {
            assert_eq!(
                s.snis.lock().expect("lock").as_slice(),
                &[BACKEND_MS.to_owned()],
                "SNI passed through untouched"
            );
            // The dataplane counts a connection once it has read the client's EOF, which on the
            // kernel path follows the drain check: it may come just after the client finished.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while s.completed.load(Ordering::Relaxed) < 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(s.completed.load(Ordering::Relaxed), 1);
        }
    });
    let mode = if splice == "userspace" { "mode=\"userspace\" bytes" } else { "mode=\"kernel\" bytes" };
    let log_ok = daemon.wait_log_count("connection closed", 2, Duration::from_secs(10));
    let log = daemon.log_text();
    assert!(log_ok, "two access-log lines expected:\n{log}");
    assert_eq!(log.matches(mode).count(), 2, "both connections on the {splice} path:\n{log}");
}

#[test]
fn kernel_v4_64mib_each_way() {
    e2e("kernel", false);
}

#[test]
fn userspace_v4_64mib_each_way() {
    e2e("userspace", false);
}

#[test]
fn kernel_v6_64mib_each_way() {
    e2e("kernel", true);
}

/// `zone-ingress validate` and `run` with broken inputs: every problem of both files reported
/// at once (file, line:column, field path), exit code 64, nothing started.
#[test]
fn bad_config_reports_every_problem_and_starts_nothing() {
    use zone_ingress_tests::daemon::{Scratch, binary};
    let scratch = Scratch::new("badcfg");
    let zi = scratch.write("zi.yaml", "type: ZoneIngress\nname: zi\nnetworking:\n  address: 0.0.0.0\n  port: 70000\n  advertisedAddress: 198.18.100.1\n");
    let dps = scratch.write(
        "dps.yaml",
        "type: Dataplane\nmesh: default\nname: a\nnetworking:\n  address: 198.18.1.2\n  inbound:\n  - port: 0\n    tags:\n      version: v1\n",
    );
    for cmd in ["validate", "run"] {
        let out = std::process::Command::new(binary())
            .args([cmd, "--dataplane-file"])
            .arg(&zi)
            .arg("--dataplanes")
            .arg(&dps)
            .output()
            .expect("run the daemon binary");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(64), "{cmd}: exit code 64 expected:\n{text}");
        for needle in [
            "zi.yaml:4:",
            "networking.address",
            "zi.yaml:5:",
            "networking.port",
            "advertisedPort",
            "dps.yaml:7:",
            "inbound[0].port",
            "kuma.io/service",
        ] {
            assert!(text.contains(needle), "{cmd}: {needle:?} missing from the report:\n{text}");
        }
        assert!(!text.contains("ready"), "{cmd}: nothing may start:\n{text}");
    }
}

/// `zone-ingress validate --xdp-config`: the guard file is checked with the other two inputs,
/// every problem of all three reported at once; a valid guard file passes.
#[test]
fn validate_checks_the_xdp_guard_file() {
    use zone_ingress_tests::daemon::{Scratch, binary};
    let scratch = Scratch::new("badguard");
    let zi = scratch.write(
        "zi.yaml",
        "type: ZoneIngress\nname: zi\nnetworking:\n  address: 198.18.0.2\n  port: 70000\n  advertisedAddress: 198.18.100.1\n  advertisedPort: 10001\n",
    );
    let dps = scratch.write(
        "dps.yaml",
        "type: Dataplane\nmesh: default\nname: a\nnetworking:\n  address: 198.18.1.2\n  inbound:\n  - port: 8080\n    tags:\n      kuma.io/service: backend\n",
    );
    let bad = scratch.write("guard.yaml", "allow:\n  - 198.18.0.0/15\n  - nonsense\nsynLimit:\n  rate: -1\n");
    let good = scratch.write("good.yaml", "deny: [198.18.66.0/24]\nsynLimit:\n  rate: 100\n");
    let validate = |zi: &std::path::Path, guard: &std::path::Path| {
        let out = std::process::Command::new(binary())
            .args(["validate", "--dataplane-file"])
            .arg(zi)
            .arg("--dataplanes")
            .arg(&dps)
            .arg("--xdp-config")
            .arg(guard)
            .output()
            .expect("run the daemon binary");
        (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    // Bad ZoneIngress and bad guard file: both files' problems in one report.
    let (code, text) = validate(&zi, &bad);
    assert_eq!(code, Some(64), "exit code 64 expected:\n{text}");
    for needle in ["zi.yaml:5:", "networking.port", "guard.yaml:3:", "allow[1]", "guard.yaml:5:", "synLimit.rate"] {
        assert!(text.contains(needle), "{needle:?} missing from the report:\n{text}");
    }
    // Valid inputs and a bad guard file: still refused.
    let zi_ok = scratch.write(
        "zi-ok.yaml",
        "type: ZoneIngress\nname: zi\nnetworking:\n  address: 198.18.0.2\n  port: 10001\n  advertisedAddress: 198.18.100.1\n  advertisedPort: 10001\n",
    );
    let (code, text) = validate(&zi_ok, &bad);
    assert_eq!(code, Some(64), "a bad guard file alone fails validation:\n{text}");
    assert!(text.contains("guard.yaml:3:"), "{text}");
    // Everything valid.
    let (code, text) = validate(&zi_ok, &good);
    assert_eq!(code, Some(0), "valid inputs:\n{text}");
    assert!(text.contains("XDP guard file is valid") && text.contains("configuration is valid"), "{text}");
}
