//! The admin API over real HTTP, in the ingress namespace: every endpoint, bad requests, the
//! Prometheus output (parsed with a real text-format parser, carrying the names Kuma's stock
//! zone-ingress dashboard queries), exact byte and connection counters and the per-cluster
//! histograms for known traffic through the kernel splice and the userspace relay, and the
//! read-only admin listener.

use std::{collections::BTreeSet, time::Duration};

use zone_ingress_tests::{
    daemon::{Daemon, zone_ingress_yaml},
    netns::Topology,
    ops::{
        self, Scrape, admin_addr, get, ingress_addr, paced_client, plain_dataplanes, plain_flow, raw_request, request,
        wait_exit, wait_until,
    },
    runtime, section5_inventory,
};

const ADMIN_PORT: u16 = 9901;
const PLAIN_ROUTE: &str = "backend{mesh=default}";

/// Every metric name Kuma's stock zone-ingress dashboard (`dashboards/grafana/kuma-zone-ingress.json`)
/// queries, except three this data plane cannot have: `envoy_server_days_until_first_cert_expiring`
/// (it holds no certificate), and the request-level histogram `envoy_cluster_upstream_rq_time`
/// and `envoy_cluster_upstream_rq_xx` (labelled by response class), which a TCP passthrough never
/// observes. The request-level counters are exported as zeros, as Envoy does.
const DASHBOARD_METRICS: &[&str] = &[
    "envoy_control_plane_connected_state",
    "envoy_control_plane_pending_requests",
    "envoy_server_uptime",
    "envoy_server_memory_heap_size",
    "envoy_server_watchdog_miss",
    "envoy_server_watchdog_mega_miss",
    "envoy_listener_downstream_cx_active",
    "envoy_listener_downstream_cx_total",
    "envoy_listener_downstream_cx_overflow",
    "envoy_listener_downstream_cx_overload_reject",
    "envoy_listener_ssl_handshake",
    "envoy_listener_ssl_fail_verify_error",
    "envoy_listener_ssl_connection_error",
    "envoy_listener_manager_lds_update_success",
    "envoy_listener_manager_lds_update_rejected",
    "envoy_tcp_downstream_cx_rx_bytes_total",
    "envoy_tcp_downstream_cx_tx_bytes_total",
    "envoy_cluster_upstream_cx_total",
    "envoy_cluster_upstream_cx_connect_fail",
    "envoy_cluster_upstream_cx_pool_overflow",
    "envoy_cluster_upstream_cx_destroy_remote_with_active_rq",
    "envoy_cluster_upstream_rq_total",
    "envoy_cluster_upstream_rq_retry",
    "envoy_cluster_upstream_rq_retry_success",
    "envoy_cluster_upstream_rq_timeout",
    "envoy_cluster_upstream_rq_pending_overflow",
    "envoy_cluster_membership_healthy",
    "envoy_cluster_circuit_breakers_default_cx_open",
    "envoy_cluster_circuit_breakers_default_rq_open",
    "envoy_cluster_circuit_breakers_default_rq_pending_open",
    "envoy_cluster_circuit_breakers_default_rq_retry_open",
    "envoy_cluster_update_success",
    "envoy_cluster_update_rejected",
];

/// The rest of Envoy's series (docs/metrics.md) and our own.
const OTHER_METRICS: &[&str] = &[
    "envoy_listener_no_filter_chain_match",
    "envoy_tcp_downstream_cx_total",
    "envoy_cluster_upstream_cx_active",
    "envoy_cluster_upstream_cx_overflow",
    "envoy_cluster_upstream_cx_none_healthy",
    "envoy_cluster_upstream_cx_connect_ms",
    "envoy_cluster_upstream_cx_length_ms",
    "envoy_cluster_membership_total",
    "envoy_tls_inspector_tls_found",
    "envoy_tls_inspector_tls_not_found",
    "envoy_tls_inspector_sni_found",
    "envoy_tls_inspector_sni_not_found",
    "envoy_tls_inspector_client_hello_too_large",
    "zone_ingress_connections_total",
    "zone_ingress_connections_active",
    "zone_ingress_bytes_total",
    "zone_ingress_handoff_duration_seconds",
    "zone_ingress_kernel_in_flight_bytes",
    "zone_ingress_memory_guard_aborts_total",
    "zone_ingress_splice_holds_total",
    "zone_ingress_splice_relayed_bytes_total",
    "zone_ingress_splice_grant_holds_total",
    "zone_ingress_handshakes_pending",
    "zone_ingress_rejected_connections_total",
    "zone_ingress_closed_connections_total",
    "zone_ingress_bpf_map_entries",
    "zone_ingress_bpf_map_max_entries",
    "zone_ingress_config_reloads_total",
];

fn start(topo: &Topology, splice: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--splice", splice, "--plaintext-route", PLAIN_ROUTE, "--drain-time", "2s"];
    args.extend_from_slice(extra);
    Daemon::start(&topo.ingress, &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT), &section5_inventory(false), &args)
}

#[test]
fn every_endpoint_over_http() {
    let topo = Topology::new(3);
    let rt = runtime();
    // Three monitor threads: the flows below spread over all of them.
    let mut daemon = start(&topo, "kernel", &["--splice-threads", "3"]);
    let admin = admin_addr(ADMIN_PORT);
    let ns = &topo.ingress;
    let _dps = rt.block_on(async {
        plain_dataplanes(&topo, &[(1, 8080, "backend-1"), (2, 8080, "backend-2"), (3, 6379, "redis-1")])
    });

    // /ready and the index.
    let r = get(ns, admin, "/ready");
    assert_eq!((r.status, r.body.trim()), (200, "READY"));
    let r = request(ns, admin, "HEAD", "/ready");
    assert_eq!(r.status, 200);
    let r = get(ns, admin, "/");
    assert_eq!(r.status, 200);
    for path in ["/ready", "/stats/prometheus", "/config_dump", "/connections", "/quitquitquit", "/drain_listeners"] {
        assert!(r.body.contains(path), "index lists {path}:\n{}", r.body);
    }

    // /config_dump: the ZoneIngress with availableServices as the control plane computes them.
    let dump = get(ns, admin, "/config_dump");
    assert_eq!(dump.status, 200);
    assert_eq!(dump.header("content-type"), Some("application/json"));
    let dump = dump.json();
    let zi = &dump["zoneIngress"];
    assert_eq!(zi["type"], "ZoneIngress");
    assert_eq!(zi["name"], "zi-test");
    assert_eq!(zi["networking"]["address"], "198.18.0.2");
    assert_eq!(zi["networking"]["port"], 10001);
    assert_eq!(zi["networking"]["advertisedAddress"], "198.18.100.1");
    assert_eq!(zi["networking"]["admin"]["port"], ADMIN_PORT);
    let services: BTreeSet<String> =
        zi["availableServices"].as_array().expect("availableServices").iter().map(ToString::to_string).collect();
    let expected: BTreeSet<String> = [
        serde_json::json!({"mesh": "default", "instances": 1, "tags": {"kuma.io/service": "backend", "kuma.io/zone": "east", "version": "v1"}}),
        serde_json::json!({"mesh": "default", "instances": 1, "tags": {"kuma.io/service": "backend", "kuma.io/zone": "east", "version": "v2"}}),
        serde_json::json!({"mesh": "default", "instances": 1, "tags": {"kuma.io/service": "redis"}}),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(services, expected, "availableServices (web is NotReady and absent)");
    let routes = dump["routes"].as_array().expect("routes");
    let backend = routes.iter().find(|r| r["sni"] == PLAIN_ROUTE).expect("backend route");
    assert_eq!(backend["cluster"], "default:backend");
    assert_eq!(backend["endpoints"], serde_json::json!(["198.18.1.2:8080", "198.18.2.2:8080"]));
    assert!(routes.iter().any(|r| r["sni"] == "a601e0c00295a9fbe.backend.8080.default.ms"));
    assert!(routes.iter().any(|r| r["sni"] == "redis{mesh=default}"));
    assert!(!routes.iter().any(|r| r["service"] == "web"), "web has no healthy inbound");
    assert_eq!(dump["splice"]["mode"], "kernel");
    assert_eq!(dump["splice"]["requested"], "kernel");
    assert!(dump["splice"]["limits"]["maxSpliced"].as_u64().is_some());
    assert_eq!(dump["splice"]["limits"]["monitorThreads"], 3);
    assert_eq!(dump["listener"]["address"], "198.18.0.2:10001");
    assert_eq!(dump["config"]["lastReload"]["ok"], true);

    // /connections: three paced flows are open while we look.
    let flows = rt.block_on(async {
        (0..3)
            .map(|_| {
                let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
                tokio::spawn(paced_client(tcp, 4 << 20, 1 << 16, 64 << 10, Duration::from_millis(20)))
            })
            .collect::<Vec<_>>()
    });
    let ok = wait_until(Duration::from_secs(10), || {
        let page = get(ns, admin, "/connections").json();
        page["total"] == 3
            && page["connections"]
                .as_array()
                .is_some_and(|c| c.iter().all(|f| f["bytesClientToBackend"].as_u64().unwrap_or(0) > 0))
    });
    let page = get(ns, admin, "/connections").json();
    assert!(ok, "three open flows with live kernel byte counts expected: {page:#}");
    // The daemon never reads a spliced socket, so only the kernel can notice a vanished peer.
    assert_keepalive_on_every_socket(daemon.pid(), 3);
    for f in page["connections"].as_array().expect("connections") {
        assert!(f["client"].as_str().expect("client").starts_with("198.18.0.1:"), "{f}");
        assert_eq!(f["sni"], PLAIN_ROUTE);
        assert_eq!(f["mode"], "kernel");
        assert_eq!(f["route"]["service"], "backend");
        assert_eq!(f["route"]["mesh"], "default");
        assert_eq!(f["route"]["cluster"], "default:backend");
        assert!(["198.18.1.2:8080", "198.18.2.2:8080"].contains(&f["endpoint"].as_str().expect("endpoint")), "{f}");
        for field in ["id", "bytesBackendToClient", "ageMs", "idleMs", "startedUnix"] {
            assert!(f.get(field).is_some(), "{field} missing in {f}");
        }
    }
    for f in flows {
        let out = rt.block_on(f).expect("join").expect("paced flow");
        assert!(out.up_ok && out.down_ok, "{out:?}");
    }

    // Paging: bounded pages that together list every flow once.
    let flows = rt.block_on(async {
        (0..5)
            .map(|_| {
                let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
                tokio::spawn(paced_client(tcp, 2 << 20, 16, 64 << 10, Duration::from_millis(20)))
            })
            .collect::<Vec<_>>()
    });
    assert!(wait_until(Duration::from_secs(10), || get(ns, admin, "/connections").json()["total"] == 5));
    let first = get(ns, admin, "/connections?limit=2").json();
    assert_eq!(first["returned"], 2);
    let mut ids: Vec<u64> =
        first["connections"].as_array().expect("page").iter().filter_map(|c| c["id"].as_u64()).collect();
    let mut after = first["nextAfter"].as_u64().expect("nextAfter on a partial page");
    loop {
        let page = get(ns, admin, &format!("/connections?limit=2&after={after}")).json();
        ids.extend(page["connections"].as_array().expect("page").iter().filter_map(|c| c["id"].as_u64()));
        match page["nextAfter"].as_u64() {
            Some(a) => after = a,
            None => break,
        }
    }
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 5, "no flow listed twice");
    for bad in ["/connections?limit=0", "/connections?limit=5000", "/connections?limit=abc", "/connections?after=-1"] {
        assert_eq!(get(ns, admin, bad).status, 400, "{bad}");
    }
    for f in flows {
        let out = rt.block_on(f).expect("join").expect("paced flow");
        assert!(out.up_ok && out.down_ok, "{out:?}");
    }

    // /stats: Envoy's `name: value` lines.
    let stats = get(ns, admin, "/stats");
    assert_eq!(stats.status, 200);
    for line in stats.body.lines() {
        let (name, value) = line.split_once(": ").unwrap_or_else(|| panic!("not `name: value`: {line:?}"));
        assert!(!name.is_empty() && !name.contains(' '), "{line:?}");
        assert!(!value.is_empty(), "{line:?}");
    }
    for needle in [
        "listener.198.18.0.2_10001.downstream_cx_total: 8\n",
        "cluster.default_backend.upstream_cx_total: 8\n",
        "tcp.default_backend.downstream_cx_total: 8\n",
        "tls_inspector.tls_not_found: 8\n",
        "zone_ingress.connections_total.kernel: 8\n",
        "server.uptime: ",
    ] {
        assert!(stats.body.contains(needle), "{needle:?} in /stats:\n{}", stats.body);
    }
    let filtered = get(ns, admin, "/stats?filter=tls_inspector.");
    assert_eq!(filtered.body.lines().count(), 5, "{}", filtered.body);
    let json = get(ns, admin, "/stats?format=json").json();
    assert!(
        json["stats"].as_array().is_some_and(|s| s
            .iter()
            .any(|s| s["name"] == "cluster.default_backend.upstream_cx_total" && s["value"] == 8)),
        "{json}"
    );
    let prom = get(ns, admin, "/stats?format=prometheus");
    assert_eq!(prom.status, 200);
    Scrape::parse(&prom.body);

    // /stats/prometheus: parses strictly, carries the dashboard's names and ours.
    let r = get(ns, admin, "/stats/prometheus");
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let scrape = Scrape::parse(&r.body);
    let names = scrape.names();
    for name in DASHBOARD_METRICS.iter().chain(OTHER_METRICS) {
        assert!(names.contains(*name), "metric {name} missing from /stats/prometheus:\n{}", scrape.text);
    }
    assert_eq!(
        scrape.must("envoy_listener_downstream_cx_total", &[("envoy_listener_address", "198.18.0.2_10001")]),
        8.0
    );
    assert_eq!(scrape.must("envoy_cluster_membership_healthy", &[("envoy_cluster_name", "default_backend")]), 2.0);
    assert_eq!(scrape.must("envoy_cluster_membership_total", &[("envoy_cluster_name", "default_redis")]), 1.0);
    assert!(
        scrape.value("envoy_cluster_membership_total", &[("envoy_cluster_name", "default_web")]).is_none(),
        "web: no healthy inbound, no cluster"
    );
    assert_eq!(scrape.must("envoy_control_plane_connected_state", &[]), 1.0);
    assert_eq!(scrape.must("zone_ingress_bpf_map_max_entries", &[("map", "PAIRS")]), 262_144.0);
    assert!(
        r.body.contains("# TYPE envoy_cluster_upstream_cx_connect_fail counter\n"),
        "Envoy's name, no _total added"
    );

    // Bad requests: 4xx, never a crash.
    assert_eq!(get(ns, admin, "/nope").status, 404);
    assert_eq!(get(ns, admin, "/stats/prometheus/extra").status, 404);
    let r = request(ns, admin, "POST", "/ready");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(get(ns, admin, "/quitquitquit").status, 405);
    assert_eq!(request(ns, admin, "DELETE", "/stats").status, 405);
    assert_eq!(get(ns, admin, "/stats?format=xml").status, 400);
    assert_eq!(get(ns, admin, "/stats?filter=%zz").status, 400);
    let huge =
        format!("GET /ready HTTP/1.1\r\nHost: admin\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(64 << 10));
    let r = raw_request(ns, admin, huge.as_bytes()).expect("an answer to an oversized request");
    assert!((400..500).contains(&r.status), "oversized head: {}", r.status);
    let r = raw_request(
        ns,
        admin,
        b"POST /drain_listeners HTTP/1.1\r\nHost: admin\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer to an oversized body");
    assert_eq!(r.status, 413);
    let r = raw_request(ns, admin, b"HELLO WORLD\r\n\r\n").expect("an answer to garbage");
    assert_eq!(r.status, 400);
    assert!(raw_request(ns, admin, b"\x16\x03\x01\x00\x05hello").is_none_or(|r| (400..500).contains(&r.status)));
    let r = get(ns, admin, "/ready");
    assert_eq!((r.status, r.body.trim()), (200, "READY"), "still serving after bad requests");

    // Loopback only: the admin port is not reachable on the ingress's network address.
    assert!(topo.client.connect(std::net::SocketAddr::new(Topology::ingress_v4().into(), ADMIN_PORT)).is_err());
    assert!(ns.connect(std::net::SocketAddr::new(Topology::ingress_v4().into(), ADMIN_PORT)).is_err());

    // POST /drain_listeners: not ready, no new connection, established flows finish.
    let flow = {
        let _in_runtime = rt.enter();
        let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
        rt.spawn(paced_client(tcp, 2 << 20, 1 << 16, 64 << 10, Duration::from_millis(20)))
    };
    std::thread::sleep(Duration::from_millis(300));
    let r = request(ns, admin, "POST", "/drain_listeners");
    assert_eq!((r.status, r.body.trim()), (200, "OK"));
    assert!(wait_until(Duration::from_secs(5), || {
        let r = get(ns, admin, "/ready");
        r.status == 503 && r.body.trim() == "NOT_READY"
    }));
    assert!(topo.client.connect(ingress_addr(10001)).is_err(), "listener drained: connections are refused");
    let out = rt.block_on(flow).expect("join").expect("flow across /drain_listeners");
    assert!(out.up_ok && out.down_ok);

    // POST /quitquitquit: exits now, with 0.
    let r = request(ns, admin, "POST", "/quitquitquit");
    assert_eq!((r.status, r.body.trim()), (200, "OK"));
    assert!(
        wait_exit(daemon.pid(), Duration::from_secs(10)),
        "the daemon exits after /quitquitquit:\n{}",
        daemon.log_text()
    );
    let status = daemon.stop(Duration::from_secs(5)).expect("exit status");
    assert!(status.success(), "exit status {status:?}:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("POST /quitquitquit"));
}

/// Runs `conns` plain flows of known sizes and checks every counter against what the
/// clients sent and received.
fn exact_counters(splice: &str, access_log: bool) {
    let topo = Topology::new(3);
    let rt = runtime();
    let daemon = start(&topo, splice, if access_log { &[] } else { &["--access-log", "off"] });
    let admin = admin_addr(ADMIN_PORT);
    let ns = &topo.ingress;
    let _dps = rt.block_on(async { plain_dataplanes(&topo, &[(1, 8080, "backend-1"), (2, 8080, "backend-2")]) });
    let sizes: Vec<(u64, u64)> =
        vec![(0, 0), (1, 1), (1000, 70_000), (65_536, 3), (3 << 20, 5 << 20), (12_345, 678_901)];
    let (mut up, mut down) = (0u64, 0u64);
    rt.block_on(async {
        for (n_up, n_down) in &sizes {
            let out = plain_flow(&topo, 10001, *n_up, *n_down).await.expect("flow");
            assert!(out.up_ok && out.down_ok, "{out:?}");
            let (u, d) = ops::protocol_bytes(*n_up, *n_down);
            up += u;
            down += d;
        }
        // Two rejected connections: a ClientHello for an unknown service.
        for _ in 0..2 {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
            tcp.write_all(&zone_ingress::client_hello::build_client_hello(Some(b"nope{mesh=default}"), 0))
                .await
                .expect("hello");
            let mut buf = [0u8; 16];
            let n =
                tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.expect("closed").unwrap_or(0);
            assert_eq!(n, 0, "rejected without a byte");
        }
    });
    let n = sizes.len() as f64;
    let settled = wait_until(Duration::from_secs(10), || {
        let s = ops::scrape(ns, admin);
        s.sum("zone_ingress_closed_connections_total") == n && s.must("envoy_listener_downstream_cx_active", &[]) == 0.0
    });
    let s = ops::scrape(ns, admin);
    assert!(settled, "all flows closed:\n{}", s.text);
    let listener = [("envoy_listener_address", "198.18.0.2_10001")];
    let tcp = [("envoy_tcp_prefix", "default_backend")];
    let cluster = [("envoy_cluster_name", "default_backend")];
    let (mode, other) = if splice == "userspace" { ("userspace", "kernel") } else { ("kernel", "userspace") };
    type Check<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);
    let checks: Vec<Check<'_>> = vec![
        ("envoy_listener_downstream_cx_total", listener.to_vec(), n + 2.0),
        ("envoy_listener_downstream_cx_destroy", listener.to_vec(), n + 2.0),
        ("envoy_listener_no_filter_chain_match", listener.to_vec(), 2.0),
        ("envoy_tls_inspector_tls_not_found", vec![], n),
        ("envoy_tls_inspector_sni_found", vec![], 2.0),
        ("envoy_tcp_downstream_cx_total", tcp.to_vec(), n),
        ("envoy_tcp_downstream_cx_rx_bytes_total", tcp.to_vec(), up as f64),
        ("envoy_tcp_downstream_cx_tx_bytes_total", tcp.to_vec(), down as f64),
        ("envoy_cluster_upstream_cx_total", cluster.to_vec(), n),
        ("envoy_cluster_upstream_cx_destroy", cluster.to_vec(), n),
        ("envoy_cluster_upstream_cx_connect_fail", cluster.to_vec(), 0.0),
        ("envoy_cluster_upstream_cx_active", cluster.to_vec(), 0.0),
        ("envoy_cluster_upstream_cx_tx_bytes_total", cluster.to_vec(), up as f64),
        ("envoy_cluster_upstream_cx_rx_bytes_total", cluster.to_vec(), down as f64),
        ("zone_ingress_connections_total", vec![("mode", mode)], n),
        ("zone_ingress_connections_total", vec![("mode", other)], 0.0),
        ("zone_ingress_connections_active", vec![("mode", mode)], 0.0),
        ("zone_ingress_bytes_total", vec![("mode", mode), ("direction", "client_to_backend")], up as f64),
        ("zone_ingress_bytes_total", vec![("mode", mode), ("direction", "backend_to_client")], down as f64),
        ("zone_ingress_bytes_total", vec![("mode", other), ("direction", "client_to_backend")], 0.0),
        ("zone_ingress_rejected_connections_total", vec![("reason", "unknown_sni")], 2.0),
        ("zone_ingress_handoff_duration_seconds", vec![], n),
    ];
    for (name, labels, want) in checks {
        assert_eq!(s.must(name, &labels), want, "{name}{labels:?}\n{}", s.text);
    }
    // One connect time and one upstream lifetime per flow, whichever path carried it (the
    // histogram's value is its +Inf bucket).
    for family in ["envoy_cluster_upstream_cx_connect_ms", "envoy_cluster_upstream_cx_length_ms"] {
        assert_eq!(s.must(family, &cluster), n, "{family}\n{}", s.text);
        assert_eq!(s.must(&format!("{family}_count"), &cluster), n, "{family}_count\n{}", s.text);
    }
    let connect_ms = s.must("envoy_cluster_upstream_cx_connect_ms_sum", &cluster);
    assert!(
        connect_ms > 0.0 && s.must("envoy_cluster_upstream_cx_length_ms_sum", &cluster) >= connect_ms,
        "{}",
        s.text
    );
    if splice == "kernel" {
        // Every flow closed: the maps are empty again.
        for map in ["SOCKS", "PAIRS", "HOLD"] {
            assert_eq!(s.must("zone_ingress_bpf_map_entries", &[("map", map)]), 0.0, "{map}\n{}", s.text);
        }
        assert!(s.must("zone_ingress_bpf_verdict_skbs_total", &[("result", "redirected")]) > 0.0);
    }
    let log = daemon.log_text();
    let needle = format!("mode=\"{mode}\" bytes");
    if !access_log {
        // `--access-log off`: the counters above still count, and no access line is written.
        assert_eq!(log.matches(" access: ").count(), 0, "{log}");
        assert!(log.contains("ready"), "the daemon's own log stays on:\n{log}");
        return;
    }
    // The access log agrees, line by line.
    assert_eq!(log.matches(&needle).count(), sizes.len(), "{log}");
    assert_eq!(log.matches("connection rejected").count(), 2, "{log}");
    assert!(log.contains("service=\"backend\"") || log.contains("service=backend"), "{log}");
}

/// Every socket of the `flows` open flows held by the daemon `pid` (client side: peer
/// 198.18.0.1, backend side: peer port 8080) has keepalive on with the daemon's settings (60 s
/// idle, 10 s interval, 6 probes). Read from the sockets themselves (`pidfd_getfd`, then
/// `getsockopt`): `ss -o` shows one timer per socket, and a segment in flight hides keepalive.
fn assert_keepalive_on_every_socket(pid: u32, flows: usize) {
    fn opt(fd: i32, level: i32, name: i32) -> i32 {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes of their sizes.
        let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut v).cast(), &raw mut len) };
        assert_eq!(rc, 0, "getsockopt({level}, {name}): {}", std::io::Error::last_os_error());
        v
    }
    // SAFETY: plain system calls; every fd they return is closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir").flatten() {
        let link = std::fs::read_link(entry.path()).unwrap_or_default();
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Some(target) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // SAFETY: as above.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) } as i32;
        if fd < 0 {
            continue;
        }
        // SAFETY: `peer` and `len` are valid for writes of their sizes.
        let mut peer: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let connected = unsafe { libc::getpeername(fd, (&raw mut peer).cast(), &raw mut len) } == 0
            && i32::from(peer.sin_family) == libc::AF_INET;
        let addr = std::net::Ipv4Addr::from(u32::from_be(peer.sin_addr.s_addr));
        if connected && (addr == std::net::Ipv4Addr::new(198, 18, 0, 1) || u16::from_be(peer.sin_port) == 8080) {
            let got = [
                opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
                opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
                opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
                opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            ];
            found.push((format!("{addr}:{}", u16::from_be(peer.sin_port)), got));
        }
        // SAFETY: `fd` is our duplicate.
        unsafe { libc::close(fd) };
    }
    // SAFETY: `pidfd` is ours.
    unsafe { libc::close(pidfd) };
    assert_eq!(found.len(), 2 * flows, "{flows} flows, two sockets each: {found:?}");
    for (peer, got) in &found {
        assert_eq!(got, &[1, 60, 10, 6], "socket to {peer}: SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT");
    }
}

/// The userspace path runs keepalive on both sockets too: the client socket inherits it from
/// the listener, the backend socket gets it at connect.
#[test]
fn userspace_sockets_run_keepalive() {
    let topo = Topology::new(1);
    let rt = runtime();
    let daemon = start(&topo, "userspace", &[]);
    let admin = admin_addr(ADMIN_PORT);
    let ns = &topo.ingress;
    let _dps = rt.block_on(async { plain_dataplanes(&topo, &[(1, 8080, "backend-1")]) });
    let flows = rt.block_on(async {
        (0..2)
            .map(|_| {
                let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
                // Paced to stay open (about 2.6 s) while the sockets are looked at.
                tokio::spawn(paced_client(tcp, 8 << 20, 1 << 16, 64 << 10, Duration::from_millis(20)))
            })
            .collect::<Vec<_>>()
    });
    assert!(wait_until(Duration::from_secs(10), || get(ns, admin, "/connections").json()["total"] == 2));
    assert_keepalive_on_every_socket(daemon.pid(), 2);
    rt.block_on(async {
        for f in flows {
            let out = f.await.expect("join").expect("flow");
            assert!(out.up_ok && out.down_ok, "{out:?}");
        }
    });
}

#[test]
fn counters_are_exact_kernel() {
    exact_counters("kernel", true);
}

#[test]
fn counters_are_exact_without_access_log() {
    exact_counters("kernel", false);
}

#[test]
fn counters_are_exact_userspace() {
    exact_counters("userspace", true);
}

/// Byte counters of a spliced flow move while it runs (read from the BPF maps), and never
/// go backwards across scrapes.
#[test]
fn live_kernel_bytes_are_monotonic() {
    let topo = Topology::new(1);
    let rt = runtime();
    let inventory =
        ops::inventory(&[ops::Inbound { name: "backend-1", k: 1, port: 8080, service: "backend", tags: &[] }]);
    let _daemon = Daemon::start(
        &topo.ingress,
        &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT),
        &inventory,
        &["--splice", "kernel", "--plaintext-route", PLAIN_ROUTE],
    );
    let admin = admin_addr(ADMIN_PORT);
    let n_up = 8u64 << 20;
    let flow = {
        let _in_runtime = rt.enter();
        plain_dataplanes(&topo, &[(1, 8080, "backend-1")]);
        let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
        rt.spawn(paced_client(tcp, n_up, 1024, 64 << 10, Duration::from_millis(15)))
    };
    let mut samples = Vec::new();
    for _ in 0..10 {
        let s = ops::scrape(&topo.ingress, admin);
        samples.push(
            s.value("envoy_tcp_downstream_cx_rx_bytes_total", &[("envoy_tcp_prefix", "default_backend")])
                .unwrap_or(0.0),
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    let out = rt.block_on(flow).expect("join").expect("flow");
    assert!(out.up_ok && out.down_ok);
    assert!(samples.windows(2).all(|w| w[0] <= w[1]), "monotonic: {samples:?}");
    let (total, _) = ops::protocol_bytes(n_up, 1024);
    assert!(samples.iter().any(|v| *v > 0.0 && *v < total as f64), "a live value between 0 and the total: {samples:?}");
}

/// 100 idle admin connections (more than the 64 served at once) do not keep `/ready` and
/// `/stats` from answering: the longest-idle connection is closed to make room.
#[test]
fn ready_answers_under_an_admin_flood() {
    let topo = Topology::new(1);
    let daemon = start(&topo, "userspace", &[]);
    let ns = &topo.ingress;
    let admin = admin_addr(ADMIN_PORT);
    let idle: Vec<std::net::TcpStream> = ns.run(|| {
        (0..100)
            .map(|_| {
                std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5)).expect("idle admin connection")
            })
            .collect()
    });
    for i in 0..20 {
        let r = get(ns, admin, "/ready");
        assert_eq!((r.status, r.body.trim()), (200, "READY"), "probe {i} under the flood:\n{}", daemon.log_text());
    }
    assert_eq!(get(ns, admin, "/stats").status, 200);
    // The server made room by closing idle connections: at most 64 are still open.
    let mut open = 0;
    for c in &idle {
        c.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        if matches!(std::io::Read::read(&mut &*c, &mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            open += 1;
        }
    }
    assert!(open <= 64, "{open} of 100 idle admin connections are still open");
    drop(idle);
}

/// At the descriptor limit (the daemon's `RLIMIT_NOFILE` lowered to what it holds plus a few,
/// then clients hold every descriptor left), `/ready` still answers: the admin server keeps
/// one descriptor in reserve for it.
#[test]
fn ready_answers_at_the_descriptor_limit() {
    let topo = Topology::new(1);
    let rt = runtime();
    // Clients that never send a ClientHello keep their descriptors for the whole test.
    let daemon = start(&topo, "userspace", &["--client-hello-timeout", "120s"]);
    let ns = &topo.ingress;
    let admin = admin_addr(ADMIN_PORT);
    let pid = daemon.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the daemon's descriptors").count();
    let limit = open + 6;
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
    // Clients that connect and say nothing: each accepted one holds a descriptor until its
    // ClientHello times out, the rest wait in the backlog.
    let clients: Vec<tokio::net::TcpStream> =
        rt.block_on(async { (0..20).map(|_| topo.client.connect(ingress_addr(10001)).expect("connect")).collect() });
    assert!(
        wait_until(Duration::from_secs(5), || daemon.log_text().contains("accept failed")),
        "the daemon never ran out of descriptors:\n{}",
        daemon.log_text()
    );
    for i in 0..3 {
        let asked = std::time::Instant::now();
        let r = get(ns, admin, "/ready");
        assert_eq!(
            (r.status, r.body.trim()),
            (200, "READY"),
            "probe {i} at the descriptor limit:\n{}",
            daemon.log_text()
        );
        assert!(asked.elapsed() < Duration::from_secs(3), "probe {i} took {:?}", asked.elapsed());
    }
    drop(clients);
}

/// `--admin-address` on a namespace address: a peer that is not on loopback may read state but
/// gets 403 for every state-changing request, and the process keeps running.
#[test]
fn non_loopback_peers_cannot_change_state() {
    let topo = Topology::new(1);
    let daemon = start(&topo, "userspace", &["--admin-address", "198.18.0.2"]);
    let admin = std::net::SocketAddr::new(Topology::ingress_v4().into(), ADMIN_PORT);
    // The client namespace (198.18.0.1) reaches the admin server through the veth.
    let from = &topo.client;
    for path in ["/quitquitquit", "/drain_listeners"] {
        let r = request(from, admin, "POST", path);
        assert_eq!(r.status, 403, "POST {path} from 198.18.0.1: {} {}", r.status, r.body);
    }
    let r = get(from, admin, "/ready");
    assert_eq!((r.status, r.body.trim()), (200, "READY"), "still running and listening:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("refused a state-changing admin request"), "{}", daemon.log_text());
    assert_eq!(daemon.log_text().matches("admin request").count(), 2, "only the two refusals:\n{}", daemon.log_text());
}

/// `--read-only-admin-address` on the ingress's network address: another host (the client
/// namespace, as a kubelet probe or a Prometheus scrape at the pod's address) gets `/ready` and
/// the metrics there, with the per-cluster connect-time and lifetime histograms filled by real
/// flows, and nothing else: no state change, no configuration or flow dump. The full admin API
/// stays on loopback and keeps working.
#[test]
fn read_only_listener_serves_probes_and_metrics_only() {
    let topo = Topology::new(2);
    let rt = runtime();
    let mut daemon = start(&topo, "kernel", &["--read-only-admin-address", "198.18.0.2"]);
    let read_only = std::net::SocketAddr::new(Topology::ingress_v4().into(), ADMIN_PORT);
    let admin = admin_addr(ADMIN_PORT);
    let (from, ns) = (&topo.client, &topo.ingress);
    let _dps = rt.block_on(async { plain_dataplanes(&topo, &[(1, 8080, "backend-1"), (2, 8080, "backend-2")]) });

    let r = get(from, read_only, "/ready");
    assert_eq!((r.status, r.body.trim()), (200, "READY"), "{}", daemon.log_text());
    assert_eq!(request(from, read_only, "HEAD", "/ready").status, 200);
    let index = get(from, read_only, "/");
    assert_eq!(index.status, 200);
    for path in ["/ready", "/stats", "/stats/prometheus"] {
        assert!(index.body.contains(path), "index lists {path}:\n{}", index.body);
    }
    for path in ["/config_dump", "/connections", "/quitquitquit", "/drain_listeners"] {
        assert!(!index.body.contains(path), "index does not list {path}:\n{}", index.body);
    }

    // Real flows through the ingress to one cluster, then the histograms over the read-only
    // listener: one connect and one lifetime per flow.
    let flows = 5u64;
    rt.block_on(async {
        for _ in 0..flows {
            let out = plain_flow(&topo, 10001, 4096, 70_000).await.expect("flow");
            assert!(out.up_ok && out.down_ok, "{out:?}");
        }
    });
    let n = flows as f64;
    let cluster = [("envoy_cluster_name", "default_backend")];
    let settled = wait_until(Duration::from_secs(10), || {
        ops::scrape(from, read_only).value("envoy_cluster_upstream_cx_length_ms_count", &cluster) == Some(n)
    });
    let r = get(from, read_only, "/stats/prometheus");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let s = Scrape::parse(&r.body);
    assert!(settled, "a lifetime per closed flow:\n{}", s.text);
    for family in ["envoy_cluster_upstream_cx_connect_ms", "envoy_cluster_upstream_cx_length_ms"] {
        assert!(r.body.contains(&format!("# TYPE {family} histogram\n")), "{family}:\n{}", s.text);
        assert_eq!(s.must(&format!("{family}_count"), &cluster), n, "{family}_count\n{}", s.text);
        // The highest cumulative bucket is +Inf: every observation.
        assert_eq!(s.must(family, &cluster), n, "{family} +Inf bucket\n{}", s.text);
        assert!(
            r.body.contains(&format!(
                "{family}_bucket{{envoy_cluster_name=\"default_backend\",le=\"3600000\"}} {flows}\n"
            )),
            "{family}: every flow under Envoy's last bound (1 h)\n{}",
            s.text
        );
    }
    let connect_sum = s.must("envoy_cluster_upstream_cx_connect_ms_sum", &cluster);
    let length_sum = s.must("envoy_cluster_upstream_cx_length_ms_sum", &cluster);
    assert!(connect_sum > 0.0, "connect time measured: {connect_sum}");
    assert!(length_sum >= connect_sum, "a lifetime includes its connect: {length_sum} < {connect_sum}");
    assert_eq!(s.must("envoy_cluster_upstream_cx_total", &cluster), n);
    let stats = get(from, read_only, "/stats?filter=upstream_cx_connect_ms");
    assert_eq!(stats.status, 200);
    assert!(stats.body.contains("cluster.default_backend.upstream_cx_connect_ms: P50("), "{}", stats.body);
    assert!(stats.body.contains(&format!(" count={flows} sum=")), "{}", stats.body);

    // Nothing that changes state or shows the configuration and the flows.
    for path in ["/quitquitquit", "/drain_listeners", "/ready", "/stats"] {
        let r = request(from, read_only, "POST", path);
        assert_eq!(r.status, 405, "POST {path} on the read-only listener: {} {}", r.status, r.body);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }
    for path in ["/config_dump", "/connections", "/quitquitquit", "/drain_listeners", "/nope"] {
        assert_eq!(get(from, read_only, path).status, 404, "GET {path} on the read-only listener");
    }
    // The same holds from the ingress's own namespace (a loopback-like local peer).
    assert_eq!(request(ns, read_only, "POST", "/quitquitquit").status, 405);
    assert_eq!(get(ns, read_only, "/config_dump").status, 404);
    let r = get(from, read_only, "/ready");
    assert_eq!((r.status, r.body.trim()), (200, "READY"), "still running and accepting:\n{}", daemon.log_text());
    let out = rt.block_on(plain_flow(&topo, 10001, 10, 10)).expect("a flow after the refusals");
    assert!(out.up_ok && out.down_ok);
    assert!(!daemon.log_text().contains("admin request"), "no state-changing request reached the run loop");

    // The full admin API, on loopback only, is unchanged.
    let dump = get(ns, admin, "/config_dump");
    assert_eq!(dump.status, 200);
    assert_eq!(dump.json()["admin"]["address"], "127.0.0.1:9901");
    assert_eq!(get(ns, admin, "/connections").status, 200);
    assert_eq!(ops::scrape(ns, admin).must("envoy_cluster_upstream_cx_connect_ms_count", &cluster), n + 1.0);
    let r = request(ns, admin, "POST", "/quitquitquit");
    assert_eq!((r.status, r.body.trim()), (200, "OK"));
    assert!(wait_exit(daemon.pid(), Duration::from_secs(10)), "exits after /quitquitquit:\n{}", daemon.log_text());
    let status = daemon.stop(Duration::from_secs(5)).expect("exit status");
    assert!(status.success(), "exit status {status:?}:\n{}", daemon.log_text());
}

/// A read-only address that would take the admin port from the admin server (the same address,
/// or a wildcard that covers it) is refused at start, with the reason, before anything binds.
#[test]
fn read_only_address_overlapping_the_admin_address_is_refused() {
    use zone_ingress_tests::daemon::{Scratch, binary, wait_or_kill};
    let topo = Topology::new(1);
    let scratch = Scratch::new("ro-admin");
    let zi = scratch.write("zi.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT));
    let dps = scratch.write("dps.yaml", &section5_inventory(false));
    let cases = [
        (&["--read-only-admin-address", "127.0.0.1"][..], "is the admin address"),
        (&["--read-only-admin-address", "0.0.0.0"], "overlap"),
        (&["--read-only-admin-address", "::"], "overlap"),
        (&["--admin-address", "0.0.0.0", "--read-only-admin-address", "198.18.0.2"], "overlap"),
    ];
    for (args, needle) in cases {
        let log = scratch.0.join("run.log");
        let out = std::fs::File::create(&log).expect("log");
        let mut child = topo
            .ingress
            .command(binary().to_str().expect("utf-8 path"))
            .args(["run", "--splice", "userspace", "--dataplane-file"])
            .arg(&zi)
            .arg("--dataplanes")
            .arg(&dps)
            .args(args)
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn the daemon");
        let status = wait_or_kill(&mut child, Duration::from_secs(10));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{args:?}: refused at start:\n{text}");
        assert!(text.contains(needle) && text.contains("--read-only-admin-address"), "{args:?}:\n{text}");
        assert!(!text.contains("listening"), "{args:?}: nothing bound:\n{text}");
    }
}
