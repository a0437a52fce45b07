//! Hot reload under load: while paced flows stream with SHA-256 checks, dataplanes are added
//! and removed and the inventory is broken on purpose. No flow breaks, new connections follow
//! each valid table at once, the invalid file is rejected (metric, `/config_dump`, log) and the
//! running table stays. A changed listener port rebinds without touching established flows.

use std::{collections::BTreeSet, time::Duration};

use zone_ingress_tests::{
    daemon::{Daemon, Scratch, zone_ingress_yaml},
    netns::Topology,
    ops::{
        self, Inbound, admin_addr, get, ingress_addr, paced_client, plain_dataplanes, plain_flow, request, wait_until,
        write_atomic,
    },
    runtime,
};

const ADMIN_PORT: u16 = 9901;
const PLAIN_ROUTE: &str = "backend{mesh=default}";

fn backend(name: &'static str, k: usize) -> Inbound<'static> {
    Inbound { name, k, port: 8080, service: "backend", tags: &[] }
}

fn reloads(topo: &Topology, result: &str) -> f64 {
    ops::scrape(&topo.ingress, admin_addr(ADMIN_PORT)).must("zone_ingress_config_reloads_total", &[("result", result)])
}

/// Which dataplanes answer `n` short flows.
fn served_by(rt: &tokio::runtime::Runtime, topo: &Topology, port: u16, n: usize) -> BTreeSet<String> {
    rt.block_on(async {
        let mut seen = BTreeSet::new();
        for _ in 0..n {
            let out = plain_flow(topo, port, 4096, 4096).await.expect("short flow");
            assert!(out.up_ok && out.down_ok, "{out:?}");
            seen.insert(out.dataplane);
        }
        seen
    })
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn reload_under_load() {
    let topo = Topology::new(2);
    let rt = runtime();
    let scratch = Scratch::new("reload");
    let zi = scratch.write("zoneingress.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT));
    let dps = scratch.write("dataplanes.yaml", &ops::inventory(&[backend("backend-1", 1)]));
    let daemon = Daemon::start_files(
        &topo.ingress,
        Scratch::new("reload-daemon"),
        &zi,
        &dps,
        &["--plaintext-route", PLAIN_ROUTE, "--drain-time", "2s"],
    );
    let admin = admin_addr(ADMIN_PORT);
    let ns = &topo.ingress;
    let n_up = 64u64 << 20;
    // Four long flows, all on backend-1 (the only endpoint), paced to outlive every step below.
    let long = rt.block_on(async {
        plain_dataplanes(&topo, &[(1, 8080, "backend-1"), (2, 8080, "backend-2")]);
        (0..4)
            .map(|_| {
                let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
                tokio::spawn(paced_client(tcp, n_up, 1 << 20, 64 << 10, Duration::from_millis(10)))
            })
            .collect::<Vec<_>>()
    });
    assert!(wait_until(Duration::from_secs(5), || get(ns, admin, "/connections").json()["total"] == 4));

    // 1. Add backend-2: new connections use both at once.
    write_atomic(&dps, &ops::inventory(&[backend("backend-1", 1), backend("backend-2", 2)]));
    assert!(
        wait_until(Duration::from_secs(10), || reloads(&topo, "success") >= 1.0),
        "reload after adding a dataplane:\n{}",
        daemon.log_text()
    );
    assert_eq!(served_by(&rt, &topo, 10001, 4), set(&["backend-1", "backend-2"]));

    // 2. Break the file (not YAML; a Dataplane that breaks a rule would only be skipped): rejected
    // with the startup report, the table stays.
    write_atomic(&dps, "items:\n- type: Dataplane\n  mesh: default\n  name: [broken\n  networking:\n");
    assert!(
        wait_until(Duration::from_secs(10), || reloads(&topo, "failure") >= 1.0),
        "rejected reload:\n{}",
        daemon.log_text()
    );
    let s = ops::scrape(ns, admin);
    assert_eq!(s.must("envoy_control_plane_connected_state", &[]), 0.0);
    assert_eq!(s.must("zone_ingress_config_last_reload_successful", &[]), 0.0);
    assert_eq!(s.must("envoy_listener_manager_lds_update_rejected", &[]), 1.0);
    let dump = get(ns, admin, "/config_dump").json();
    assert_eq!(dump["config"]["lastReload"]["ok"], false);
    let errors = dump["config"]["lastReload"]["errors"].as_array().expect("errors");
    assert!(!errors.is_empty(), "{dump:#}");
    assert!(
        errors.iter().any(|e| e.as_str().is_some_and(|e| e.contains("dataplanes.yaml"))),
        "errors name the file: {errors:?}"
    );
    let backend_route = |dump: &serde_json::Value| {
        dump["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .find(|r| r["sni"] == PLAIN_ROUTE)
            .map(|r| r["endpoints"].clone())
    };
    assert_eq!(
        backend_route(&dump),
        Some(serde_json::json!(["198.18.1.2:8080", "198.18.2.2:8080"])),
        "the running table stays"
    );
    assert_eq!(served_by(&rt, &topo, 10001, 4), set(&["backend-1", "backend-2"]));
    assert!(daemon.log_text().contains("configuration rejected"), "{}", daemon.log_text());

    // 3. Remove backend-1 (and say so with SIGHUP too): new connections avoid it, its flows go on.
    write_atomic(&dps, &ops::inventory(&[backend("backend-2", 2)]));
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let dump = get(ns, admin, "/config_dump").json();
            dump["config"]["lastReload"]["ok"] == true
                && backend_route(&dump) == Some(serde_json::json!(["198.18.2.2:8080"]))
        }),
        "reload after removing a dataplane:\n{}",
        daemon.log_text()
    );
    let s = ops::scrape(ns, admin);
    assert_eq!(s.must("envoy_control_plane_connected_state", &[]), 1.0);
    assert!(s.must("zone_ingress_config_reloads_total", &[("result", "success")]) >= 2.0);
    assert_eq!(s.must("envoy_cluster_membership_healthy", &[("envoy_cluster_name", "default_backend")]), 1.0);
    let dump = get(ns, admin, "/config_dump").json();
    assert_eq!(dump["zoneIngress"]["availableServices"].as_array().map(Vec::len), Some(1));
    assert_eq!(served_by(&rt, &topo, 10001, 4), set(&["backend-2"]));
    // The short flows of `served_by` may still be closing for a moment.
    assert!(
        wait_until(Duration::from_secs(5), || get(ns, admin, "/connections").json()["total"] == 4),
        "the removed endpoint keeps its flows (and only those are open): {}",
        get(ns, admin, "/connections").json()
    );

    // Every long flow finishes intact on the endpoint it started on.
    for f in long {
        let out = rt.block_on(f).expect("join").expect("long flow across reloads");
        assert!(out.up_ok && out.down_ok, "{out:?}");
        assert_eq!(out.dataplane, "backend-1");
    }
    let log = daemon.log_text();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        !log.contains("reason=\"client_reset\"") && !log.contains("reason=\"backend_reset\""),
        "no flow was reset:\n{log}"
    );
}

#[test]
fn listener_rebind_keeps_flows() {
    let topo = Topology::new(1);
    let rt = runtime();
    let scratch = Scratch::new("rebind");
    let zi = scratch.write("zoneingress.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT));
    let dps = scratch.write("dataplanes.yaml", &ops::inventory(&[backend("backend-1", 1)]));
    let daemon = Daemon::start_files(
        &topo.ingress,
        Scratch::new("rebind-daemon"),
        &zi,
        &dps,
        // At packet level: the paced clients send a burst before the switch, which the backend
        // socket relays while the backend answers (docs/design.md#packet-splice).
        &["--plaintext-route", PLAIN_ROUTE, "--splice", "packet"],
    );
    let admin = admin_addr(ADMIN_PORT);
    let long = rt.block_on(async {
        plain_dataplanes(&topo, &[(1, 8080, "backend-1")]);
        (0..2)
            .map(|_| {
                let tcp = topo.client.connect(ingress_addr(10001)).expect("connect");
                tokio::spawn(paced_client(tcp, 16 << 20, 1 << 16, 64 << 10, Duration::from_millis(10)))
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(300));
    write_atomic(&zi, &zone_ingress_yaml("198.18.0.2", 10002, ADMIN_PORT));
    assert!(daemon.wait_log("listener rebound", Duration::from_secs(10)), "{}", daemon.log_text());
    assert_eq!(served_by(&rt, &topo, 10002, 2), set(&["backend-1"]));
    assert!(topo.client.connect(ingress_addr(10001)).is_err(), "the old port is closed");
    let dump = get(&topo.ingress, admin, "/config_dump").json();
    assert_eq!(dump["listener"]["address"], "198.18.0.2:10002");
    assert_eq!(dump["zoneIngress"]["networking"]["port"], 10002);
    let s = ops::scrape(&topo.ingress, admin);
    assert_eq!(s.must("zone_ingress_listener_rebinds_total", &[]), 1.0);
    assert!(s.value("envoy_listener_downstream_cx_total", &[("envoy_listener_address", "198.18.0.2_10002")]).is_some());
    for f in long {
        let out = rt.block_on(f).expect("join").expect("flow across the rebind");
        assert!(out.up_ok && out.down_ok, "{out:?}");
    }
}

/// A changed admin port moves both admin listeners: the full one on loopback and the
/// read-only one on the ingress's address.
#[test]
fn admin_port_change_rebinds_admin() {
    let topo = Topology::new(1);
    let rt = runtime();
    let _in_runtime = rt.enter();
    let scratch = Scratch::new("adminport");
    let zi = scratch.write("zoneingress.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT));
    let dps = scratch.write("dataplanes.yaml", &ops::inventory(&[backend("backend-1", 1)]));
    let args = ["--read-only-admin-address", "198.18.0.2"];
    let daemon = Daemon::start_files(&topo.ingress, Scratch::new("adminport-daemon"), &zi, &dps, &args);
    let read_only = |port| std::net::SocketAddr::new(Topology::ingress_v4().into(), port);
    assert_eq!(get(&topo.client, read_only(ADMIN_PORT), "/ready").status, 200);
    write_atomic(&zi, &zone_ingress_yaml("198.18.0.2", 10001, 9902));
    assert!(
        wait_until(Duration::from_secs(10), || topo.ingress.connect(admin_addr(9902)).is_ok()
            && topo.client.connect(read_only(9902)).is_ok()),
        "admin and read-only admin on the new port:\n{}",
        daemon.log_text()
    );
    assert_eq!(get(&topo.ingress, admin_addr(9902), "/ready").status, 200);
    assert!(topo.ingress.connect(admin_addr(ADMIN_PORT)).is_err(), "the old admin port is closed");
    let r = get(&topo.client, read_only(9902), "/ready");
    assert_eq!((r.status, r.body.trim()), (200, "READY"));
    assert_eq!(request(&topo.client, read_only(9902), "POST", "/quitquitquit").status, 405, "still read-only");
    assert!(topo.client.connect(read_only(ADMIN_PORT)).is_err(), "the old read-only port is closed");
}

/// How long a changed source may take to be applied: the settle time (250 ms of quiet) plus a
/// margin for a loaded machine.
const APPLIED_WITHIN: Duration = Duration::from_millis(2500);

/// Waits until `n` short flows are all served by `want`; returns how long it took.
fn wait_served_by(
    rt: &tokio::runtime::Runtime,
    topo: &Topology,
    want: &BTreeSet<String>,
    limit: Duration,
) -> Option<Duration> {
    let start = std::time::Instant::now();
    wait_until(limit, || served_by(rt, topo, 10001, 2) == *want).then(|| start.elapsed())
}

/// The inventory directory is replaced whole, the two ways operators and Kubernetes do it:
/// `mv inv.new inv`, then `rm -rf inv; mkdir inv; cp ...`. The watch follows the new directory
/// each time, and each change is applied within the settle time.
#[test]
fn inventory_directory_replaced_whole_is_reloaded() {
    let topo = Topology::new(2);
    let rt = runtime();
    let scratch = Scratch::new("dirswap");
    let zi = scratch.write("zoneingress.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT));
    let inv = scratch.0.join("inv");
    std::fs::create_dir(&inv).expect("mkdir inv");
    std::fs::write(inv.join("a.yaml"), ops::inventory(&[backend("backend-1", 1)])).expect("write a.yaml");
    let daemon = Daemon::start_files(
        &topo.ingress,
        Scratch::new("dirswap-daemon"),
        &zi,
        &inv,
        &["--plaintext-route", PLAIN_ROUTE],
    );
    rt.block_on(async { plain_dataplanes(&topo, &[(1, 8080, "backend-1"), (2, 8080, "backend-2")]) });
    assert_eq!(served_by(&rt, &topo, 10001, 2), set(&["backend-1"]));

    // 1. `mv inv.new inv` (rename over the old directory needs it gone first: `mv -T` semantics
    //    through a rename of the old one away).
    let new = scratch.0.join("inv.new");
    std::fs::create_dir(&new).expect("mkdir inv.new");
    std::fs::write(new.join("b.yaml"), ops::inventory(&[backend("backend-2", 2)])).expect("write b.yaml");
    std::fs::rename(&inv, scratch.0.join("inv.old")).expect("move the old directory away");
    std::fs::rename(&new, &inv).expect("move the new directory into place");
    let took = wait_served_by(&rt, &topo, &set(&["backend-2"]), APPLIED_WITHIN);
    assert!(took.is_some(), "directory renamed into place not applied:\n{}", daemon.log_text());
    eprintln!("mv inv.new inv: applied after {took:?}");

    // 2. `rm -rf inv; mkdir inv; cp ...` into the directory that replaced the first one: only a
    //    watch that followed the rename sees this.
    std::fs::remove_dir_all(&inv).expect("rm -rf inv");
    std::fs::create_dir(&inv).expect("mkdir inv");
    std::fs::write(inv.join("c.yaml"), ops::inventory(&[backend("backend-1", 1)])).expect("write c.yaml");
    let took = wait_served_by(&rt, &topo, &set(&["backend-1"]), APPLIED_WITHIN);
    assert!(took.is_some(), "directory recreated in place not applied:\n{}", daemon.log_text());
    eprintln!("rm -rf inv; mkdir inv; cp: applied after {took:?}");

    // 3. A later edit inside the recreated directory is seen too.
    std::fs::write(inv.join("c.yaml"), ops::inventory(&[backend("backend-2", 2)])).expect("rewrite c.yaml");
    let took = wait_served_by(&rt, &topo, &set(&["backend-2"]), APPLIED_WITHIN);
    assert!(took.is_some(), "edit inside the recreated directory not applied:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("configuration directory replaced"), "{}", daemon.log_text());
}

/// `cat new > inventory.yaml` by a slow writer: the file is empty (truncated) for a while before
/// its new contents arrive. The running table stays meanwhile (every connection is served) and
/// the new contents are applied once written.
#[test]
fn truncate_then_slow_write_keeps_the_service() {
    use std::io::Write as _;

    let topo = Topology::new(2);
    let rt = runtime();
    let scratch = Scratch::new("truncate");
    let zi = scratch.write("zoneingress.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN_PORT));
    let dps = scratch.write("dataplanes.yaml", &ops::inventory(&[backend("backend-1", 1)]));
    let daemon = Daemon::start_files(
        &topo.ingress,
        Scratch::new("truncate-daemon"),
        &zi,
        &dps,
        &["--plaintext-route", PLAIN_ROUTE],
    );
    rt.block_on(async { plain_dataplanes(&topo, &[(1, 8080, "backend-1"), (2, 8080, "backend-2")]) });
    assert_eq!(served_by(&rt, &topo, 10001, 2), set(&["backend-1"]));

    let mut file = std::fs::File::create(&dps).expect("truncate the inventory");
    // 1.2 s with the file empty: connections keep being served by the running table.
    let end = std::time::Instant::now() + Duration::from_millis(1200);
    let mut served = 0;
    while std::time::Instant::now() < end {
        assert_eq!(
            served_by(&rt, &topo, 10001, 1),
            set(&["backend-1"]),
            "while the file was empty:\n{}",
            daemon.log_text()
        );
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served >= 5, "only {served} connections checked while the file was empty");
    let text = ops::inventory(&[backend("backend-1", 1), backend("backend-2", 2)]);
    let (head, tail) = text.split_at(text.len() / 2);
    file.write_all(head.as_bytes()).expect("first half");
    file.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(100));
    file.write_all(tail.as_bytes()).expect("second half");
    drop(file);
    assert!(
        wait_until(APPLIED_WITHIN, || served_by(&rt, &topo, 10001, 4) == set(&["backend-1", "backend-2"])),
        "the completed file is applied:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(!log.contains("dataplanes=0"), "the empty file was never applied:\n{log}");
}
