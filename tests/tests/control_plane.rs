//! Control-plane mode against a control plane that speaks Kuma's protocols
//! (`zone_ingress_tests::control_plane`): HTTP bootstrap and ADS, both over TLS with a CA the
//! daemon is given, the dataplane token checked on the stream. The control plane runs in
//! dataplane namespace 3; the daemon in the ingress namespace joins it as kuma-dp would, routes
//! every SNI the control plane sends (legacy, subsets, Kubernetes MeshService, MeshMultiZoneService,
//! a cross-mesh gateway, a MeshService over real mTLS), follows updates without touching live
//! flows, refuses bad updates with a NACK and keeps its table, and keeps routing through an
//! outage.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use zone_ingress_tests::{
    control_plane::{self as cp, CLUSTER, ControlPlane, ENDPOINTS, LISTENER, Service},
    daemon::{Daemon, Scratch, zone_ingress_yaml},
    netns::Topology,
    ops::{self, admin_addr, get, paced_client, wait_until},
    pki::Pki,
    raw, runtime,
    stream::{self, spawn_dataplane},
};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.zone-ingress-test-token";
const ADMIN: u16 = 9901;
const LISTEN: &str = "198.18.0.2:10001";
/// A MeshService SNI (a DNS name: the client below is real rustls).
const BACKEND_MS: &str = "a601e0c00295a9fbe.backend.8080.default.ms";
const K8S_MS: &str = "a1b2c3d4e5f607182.names.kuma-demo.7000.default.ms";
const MZMS: &str = "a0f1e2d3c4b5a6978.names-mzms.7000.default.mzms";
const GATEWAY: &str = "edge-gateway{mesh=other}";

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn dp(k: usize, port: u16) -> SocketAddr {
    SocketAddr::new(Topology::dataplane_addr(k, false), port)
}

/// The zone's services: `names` (v1 on dataplane 1, v2 on dataplane 2, with a `version`
/// selector), the same endpoints as a Kubernetes MeshService, a MeshMultiZoneService, a gateway
/// of another mesh, and `backend` (mTLS, port 8080) as a MeshService.
fn services(v2_on: usize) -> Vec<Service> {
    let names_eps = vec![
        (dp(1, 7000), tags(&[("kuma.io/service", "names"), ("version", "v1"), ("mesh", "default")])),
        (dp(v2_on, 7000), tags(&[("kuma.io/service", "names"), ("version", "v2"), ("mesh", "default")])),
    ];
    vec![
        Service {
            cluster: "default:names".into(),
            endpoints: names_eps,
            subset_keys: vec![vec!["version".into()]],
            snis: vec![
                ("names{mesh=default}".into(), BTreeMap::new()),
                ("names{mesh=default,version=v2}".into(), tags(&[("version", "v2")])),
                ("names{mesh=default,version=v3}".into(), tags(&[("version", "v3")])),
            ],
        },
        Service {
            cluster: "default_names_kuma-demo_east_msvc_7000".into(),
            endpoints: vec![(dp(1, 7000), tags(&[("kuma.io/service", "names")]))],
            subset_keys: vec![],
            snis: vec![(K8S_MS.into(), BTreeMap::new())],
        },
        Service {
            cluster: "default_names-mzms___mzms_7000".into(),
            endpoints: vec![(dp(2, 7000), tags(&[("kuma.io/service", "names")]))],
            subset_keys: vec![],
            snis: vec![(MZMS.into(), BTreeMap::new())],
        },
        Service {
            cluster: "other:edge-gateway".into(),
            endpoints: vec![(dp(3, 7000), tags(&[("kuma.io/service", "edge-gateway")]))],
            subset_keys: vec![],
            snis: vec![(GATEWAY.into(), BTreeMap::new())],
        },
        Service {
            cluster: "default_backend___msvc_8080".into(),
            endpoints: vec![(dp(1, 8080), BTreeMap::new()), (dp(2, 8080), BTreeMap::new())],
            subset_keys: vec![],
            snis: vec![(BACKEND_MS.into(), BTreeMap::new())],
        },
    ]
}

fn config(v2_on: usize) -> cp::Config {
    cp::kuma_ingress(LISTEN.parse().expect("addr"), &services(v2_on), "zi-test", "east")
}

/// Which dataplane answered a connection carrying `sni` ("" when the ingress closed it).
async fn route_of(topo: &Topology, sni: &str) -> String {
    let mut tcp = topo.client.connect(LISTEN.parse().expect("addr")).expect("connect to the ingress");
    tcp.write_all(&raw::probe(sni)).await.expect("write the ClientHello");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The backends: a name server on port 7000 of each dataplane and mTLS servers on 8080 of
/// dataplanes 1 and 2.
fn start_backends(topo: &Topology, pki: &Pki) {
    for k in 1..=3 {
        cp::spawn_name_server(topo.dataplanes[k - 1].listen(dp(k, 7000)), &format!("dp-{k}"));
    }
    for k in 1..=2 {
        let leaf = pki.leaf(&format!("backend-{k}"), &[BACKEND_MS]);
        spawn_dataplane(
            topo.dataplanes[k - 1].listen(dp(k, 8080)),
            &format!("backend-{k}"),
            Some(pki.server_config(&leaf)),
        );
    }
}

fn start_cp(topo: &Topology, pki: &Pki, config: cp::Config) -> ControlPlane {
    let ns = &topo.dataplanes[2];
    ControlPlane::start(ns.listen(dp(3, 5678)), ns.listen(dp(3, 5679)), pki, TOKEN, config)
}

/// The daemon in control-plane mode, with `token` and `ca` written to files; extra flags after.
fn launch(topo: &Topology, tag: &str, token: Option<&str>, ca: &str, extra: &[&str]) -> Daemon {
    let scratch = Scratch::new(tag);
    let zi = scratch.write("zoneingress.yaml", &zone_ingress_yaml("198.18.0.2", 10001, ADMIN));
    let ca = scratch.write("ca.crt", ca);
    let mut args: Vec<OsString> = vec![
        "--proxy-type=ingress".into(),
        "--cp-address".into(),
        "https://198.18.3.2:5678".into(),
        "--dataplane-file".into(),
        zi.into(),
        "--ca-cert-file".into(),
        ca.into(),
        "--zone".into(),
        "east".into(),
        "--drain-time".into(),
        "2s".into(),
    ];
    if let Some(token) = token {
        args.push("--dataplane-token-file".into());
        args.push(scratch.write("token", &format!("{token}\n")).into());
    }
    args.extend(extra.iter().map(OsString::from));
    Daemon::launch(&topo.ingress, scratch, &args, "info")
}

/// The backends, the control plane serving `config(2)`, and a daemon joined to it (its first
/// configuration applied).
fn joined(topo: &Topology, pki: &Pki, tag: &str, splice: &str) -> (ControlPlane, Daemon) {
    start_backends(topo, pki);
    let cp = start_cp(topo, pki, config(2));
    let mut daemon = launch(topo, tag, Some(TOKEN), &pki.ca_pem, &["--splice", splice]);
    daemon.expect_ready(Duration::from_secs(20));
    assert!(applied(&daemon, 1), "no configuration applied:\n{}", daemon.log_text());
    (cp, daemon)
}

fn connected(topo: &Topology) -> f64 {
    ops::scrape(&topo.ingress, admin_addr(ADMIN)).must("envoy_control_plane_connected_state", &[])
}

fn applied(d: &Daemon, n: usize) -> bool {
    d.wait_log_count("control plane: configuration applied", n, Duration::from_secs(15))
}

#[test]
fn joins_as_kuma_dp_and_routes_every_sni_the_control_plane_sends() {
    let topo = Topology::new(3);
    let pki = Pki::new();
    let rt = runtime();
    let _guard = rt.enter();
    let (cp, mut daemon) = joined(&topo, &pki, "cp-join", "kernel");

    // Registration: the bootstrap carried the resource and the token; the stream the token.
    let boots = cp.record.bootstraps.lock().expect("lock").clone();
    assert_eq!(boots.len(), 1, "{boots:?}");
    let b = &boots[0];
    assert_eq!(b["proxyType"], "ingress");
    assert_eq!(b["name"], "zi-test");
    assert_eq!(b["dataplaneToken"], TOKEN, "the token is sent trimmed");
    let resource: serde_json::Value =
        serde_json::from_str(b["dataplaneResource"].as_str().expect("resource")).expect("resource JSON");
    assert_eq!(resource["type"], "ZoneIngress");
    assert_eq!(resource["networking"]["port"], 10001);
    assert!(b["caCert"].as_str().is_some_and(|c| c.contains("BEGIN CERTIFICATE")));
    // kuma-cp refuses to generate anything for a proxy with an admin port but no readiness port.
    assert_eq!(b["readinessPort"], 9902);
    assert_eq!(*cp.record.stream_tokens.lock().expect("lock"), vec![TOKEN.to_owned()]);
    assert_eq!(*cp.record.nodes.lock().expect("lock"), vec![".zi-test".to_owned()], "the bootstrap's node id");
    // Each resource type acknowledged at the served version.
    for t in [CLUSTER, ENDPOINTS, LISTENER] {
        let acks = cp.record.acks(t, false);
        assert!(acks.iter().any(|a| a.version_info == "1"), "{t} not acknowledged: {acks:?}");
        assert!(cp.record.acks(t, true).is_empty(), "{t} refused");
    }
    let eds = cp.record.acks(ENDPOINTS, false);
    assert!(eds.iter().all(|a| a.names.contains(&"default:names".to_owned())), "EDS names: {eds:?}");

    rt.block_on(async {
        // Round robin over the whole service; the subset goes to v2 only; a subset with no
        // endpoint and anything the control plane did not send are closed.
        let mut whole = Vec::new();
        for _ in 0..4 {
            whole.push(route_of(&topo, "names{mesh=default}").await);
        }
        whole.sort();
        assert_eq!(whole, ["dp-1", "dp-1", "dp-2", "dp-2"]);
        for _ in 0..3 {
            assert_eq!(route_of(&topo, "names{mesh=default,version=v2}").await, "dp-2");
        }
        assert_eq!(route_of(&topo, "names{mesh=default,version=v3}").await, "");
        assert_eq!(route_of(&topo, "names{mesh=default,version=v1}").await, "", "not sent: not routed");
        assert_eq!(route_of(&topo, K8S_MS).await, "dp-1");
        assert_eq!(route_of(&topo, MZMS).await, "dp-2");
        assert_eq!(route_of(&topo, GATEWAY).await, "dp-3");

        // Real mTLS end to end through a MeshService SNI.
        let client_leaf = pki.leaf("remote-client", &["client.test"]);
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(&client_leaf));
        let tcp = topo.client.connect(LISTEN.parse().expect("addr")).expect("connect");
        let tls = stream::mtls_handshake(&connector, tcp, BACKEND_MS, Duration::from_secs(10)).await;
        let out = tokio::time::timeout(Duration::from_secs(60), stream::client(tls, 8 << 20, 8 << 20))
            .await
            .expect("transfer timed out")
            .expect("transfer");
        assert!(out.up_ok && out.down_ok, "{out:?}");
    });

    assert_eq!(connected(&topo), 1.0);
    assert_eq!(get(&topo.ingress, admin_addr(ADMIN), "/ready").status, 200);
    let dump = get(&topo.ingress, admin_addr(ADMIN), "/config_dump").json();
    let snis: Vec<&str> = dump["routes"].as_array().expect("routes").iter().filter_map(|r| r["sni"].as_str()).collect();
    assert!(snis.contains(&K8S_MS) && snis.contains(&GATEWAY), "{snis:?}");

    // Shutdown closes the stream: the control plane sees the proxy leave.
    let status = daemon.stop(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    assert_eq!(cp.record.closed.load(Ordering::SeqCst), 1, "the ADS stream was closed by the proxy");
}

#[test]
fn updates_follow_live_flows_stay_and_a_bad_update_is_refused() {
    let topo = Topology::new(3);
    let pki = Pki::new();
    let rt = runtime();
    let _guard = rt.enter();
    let (cp, daemon) = joined(&topo, &pki, "cp-update", "auto");

    // A paced mTLS flow that outlives every update below.
    let client_leaf = pki.leaf("remote-client", &["client.test"]);
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(&client_leaf));
    let tls = rt.block_on(async {
        let tcp = topo.client.connect(LISTEN.parse().expect("addr")).expect("connect");
        stream::mtls_handshake(&connector, tcp, BACKEND_MS, Duration::from_secs(10)).await
    });
    let long = rt.spawn(paced_client(tls, 16 << 20, 16 << 20, 256 << 10, Duration::from_millis(50)));

    // Endpoint moved and subset changed: v2 now on dataplane 3.
    cp.set(config(3));
    assert!(applied(&daemon, 2), "{}", daemon.log_text());
    rt.block_on(async {
        for _ in 0..3 {
            assert_eq!(route_of(&topo, "names{mesh=default,version=v2}").await, "dp-3");
        }
    });
    // Endpoint removed: only v1 (dataplane 1) left.
    let mut one = config(3);
    one.assignments.retain(|a| a.cluster_name != "default:names");
    one.assignments.push(cp::assignment(
        "default:names",
        &[(dp(1, 7000), tags(&[("kuma.io/service", "names"), ("version", "v1")]))],
    ));
    cp.set(one.clone());
    assert!(applied(&daemon, 3), "{}", daemon.log_text());
    rt.block_on(async {
        for _ in 0..3 {
            assert_eq!(route_of(&topo, "names{mesh=default}").await, "dp-1");
        }
        assert_eq!(route_of(&topo, "names{mesh=default,version=v2}").await, "", "no v2 endpoint: closed");
    });

    // A bad update (an endpoint that is a hostname): NACK with the reason; the table stays.
    let mut bad = one.clone();
    bad.assignments.retain(|a| a.cluster_name != "default:names");
    let mut cla = cp::assignment("default:names", &[(dp(2, 7000), tags(&[("version", "v1")]))]);
    if let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e)) =
        &mut cla.endpoints[0].lb_endpoints[0].host_identifier
        && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.address = "names.kuma-demo.svc".into();
    }
    bad.assignments.push(cla);
    cp.set(bad);
    assert!(
        wait_until(Duration::from_secs(10), || !cp.record.acks(ENDPOINTS, true).is_empty()),
        "no NACK:\n{}",
        daemon.log_text()
    );
    let nack = cp.record.acks(ENDPOINTS, true).remove(0);
    assert!(nack.error.as_deref().is_some_and(|e| e.contains("not an IP address")), "{nack:?}");
    assert_eq!(nack.version_info, "3", "a NACK carries the last accepted version");
    rt.block_on(async {
        assert_eq!(route_of(&topo, "names{mesh=default}").await, "dp-1", "the previous table stays");
    });
    let s = ops::scrape(&topo.ingress, admin_addr(ADMIN));
    assert!(s.must("envoy_cluster_manager_cds_update_rejected", &[]) >= 1.0);
    assert_eq!(s.must("envoy_control_plane_connected_state", &[]), 1.0, "a NACK keeps the stream");

    // A good update after it applies.
    cp.set(config(2));
    assert!(applied(&daemon, 4), "{}", daemon.log_text());
    rt.block_on(async {
        assert_eq!(route_of(&topo, "names{mesh=default,version=v2}").await, "dp-2");
        let out =
            tokio::time::timeout(Duration::from_secs(60), long).await.expect("long flow").expect("task").expect("io");
        assert!(out.up_ok && out.down_ok, "the live flow is byte-exact across the updates: {out:?}");
    });
}

#[test]
fn routing_survives_a_control_plane_outage_and_reconnects() {
    let topo = Topology::new(3);
    let pki = Pki::new();
    let rt = runtime();
    let _guard = rt.enter();
    let (mut cp, daemon) = joined(&topo, &pki, "cp-outage", "userspace");
    assert_eq!(connected(&topo), 1.0);

    cp.stop();
    assert!(wait_until(Duration::from_secs(10), || connected(&topo) == 0.0), "{}", daemon.log_text());
    rt.block_on(async {
        for _ in 0..3 {
            assert_eq!(route_of(&topo, "names{mesh=default,version=v2}").await, "dp-2", "routing continues");
        }
    });
    assert_eq!(get(&topo.ingress, admin_addr(ADMIN), "/ready").status, 200, "still ready: it routes");

    // The token rotates while the control plane is away (as a Kubernetes service account
    // token does): the reconnect reads the token file again.
    cp.set_token("rotated-token");
    std::fs::write(daemon.scratch.0.join("token"), "rotated-token\n").expect("rotate the token");
    let ns = &topo.dataplanes[2];
    cp.restart(ns.listen(dp(3, 5678)), ns.listen(dp(3, 5679)), &pki);
    assert!(
        daemon.wait_log_count("control plane: ADS stream up", 2, Duration::from_secs(40)),
        "no reconnect:\n{}",
        daemon.log_text()
    );
    assert!(wait_until(Duration::from_secs(10), || connected(&topo) == 1.0));
    assert_eq!(cp.record.stream_tokens.lock().expect("lock").last().map(String::as_str), Some("rotated-token"));
    assert_eq!(cp.record.bootstraps.lock().expect("lock").len(), 1, "a reconnect does not bootstrap again");
    let versions: Vec<String> = cp.record.acks(LISTENER, false).iter().map(|a| a.version_info.clone()).collect();
    assert!(versions.len() >= 2, "the new stream is acknowledged too: {versions:?}");
    rt.block_on(async {
        assert_eq!(route_of(&topo, "names{mesh=default,version=v2}").await, "dp-2", "same table");
        assert_eq!(route_of(&topo, K8S_MS).await, "dp-1");
    });
}

#[test]
fn a_wrong_token_a_wrong_ca_or_no_token_fail_with_a_clear_error() {
    let topo = Topology::new(3);
    let pki = Pki::new();
    let rt = runtime();
    let _guard = rt.enter();
    start_backends(&topo, &pki);
    let cp = start_cp(&topo, &pki, config(2));

    // Wrong token: the bootstrap succeeds, the stream is refused, clearly; no route, not ready.
    let mut daemon = launch(&topo, "cp-token", Some("not-the-token"), &pki.ca_pem, &["--splice", "userspace"]);
    daemon.expect_ready(Duration::from_secs(20));
    assert!(
        daemon.wait_log("the control plane refused the dataplane token", Duration::from_secs(10)),
        "{}",
        daemon.log_text()
    );
    assert_eq!(connected(&topo), 0.0);
    assert_eq!(get(&topo.ingress, admin_addr(ADMIN), "/ready").status, 503, "no configuration: not ready");
    assert!(cp.record.stream_tokens.lock().expect("lock").contains(&"not-the-token".to_owned()));
    let _ = daemon.stop(Duration::from_secs(10));

    // Wrong CA: the control plane's certificate is refused; the bootstrap gives up after the
    // maximum duration with the reason, and nothing starts.
    let other = Pki::new();
    let started = Instant::now();
    let mut daemon = launch(
        &topo,
        "cp-ca",
        Some(TOKEN),
        &other.ca_pem,
        &["--cp-retry-backoff", "200ms", "--cp-retry-max-duration", "1s"],
    );
    let status = daemon.wait_exit(Duration::from_secs(20)).expect("gives up");
    assert!(!status.success(), "{status:?}");
    let log = daemon.log_text();
    assert!(log.contains("TLS handshake") && log.contains("no bootstrap from the control plane within"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!log.contains(" ready "), "{log}");

    // No token: the control plane's 422 is final and its reason is shown.
    let mut daemon = launch(&topo, "cp-notoken", None, &pki.ca_pem, &[]);
    let status = daemon.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(!status.success());
    let log = daemon.log_text();
    assert!(log.contains("Dataplane Token is required") && log.contains("422"), "{log}");
}
