//! The built-in demo (`cargo xtask demo`): a remote-zone client, the ingress and three local
//! dataplanes serving mTLS, each in its own network namespace. Real TLS connections are routed
//! by SNI through the spliced path; the demo prints what was routed and spliced, then cleans up.
//! With `--control-plane`, the routes come from a control plane speaking Kuma's protocols
//! (bootstrap + ADS over TLS, in dataplane 3's namespace) instead of an inventory file.

use std::{collections::BTreeMap, ffi::OsString, net::SocketAddr, process::Stdio, time::Duration};

use rustls::pki_types::ServerName;
use zone_ingress_tests::{
    DP_NAMES,
    control_plane::{self as cp, ControlPlane, Service},
    daemon::{Daemon, Scratch, zone_ingress_yaml},
    netns::Topology,
    pki::Pki,
    runtime, section5_inventory,
    stream::{self, spawn_dataplane},
};

#[expect(clippy::print_stdout, reason = "the demo's output is its purpose")]
fn main() {
    let splice = std::env::args().skip_while(|a| a != "--splice").nth(1).unwrap_or_else(|| "auto".into());
    let with_cp = std::env::args().any(|a| a == "--control-plane");
    println!("== zone-ingress demo (splice mode: {splice})");
    println!("   namespaces: client 198.18.0.1 → ingress 198.18.0.2:10001 → dataplanes 198.18.{{1,2,3}}.2");
    let topo = Topology::new(3);
    let pki = Pki::new();
    // The control plane's runtime lives until the end (the dataplanes' runtime is dropped halfway).
    let cp_rt = runtime();
    let (daemon, _cp) = if with_cp {
        let (d, c) = start_with_control_plane(&topo, &pki, &cp_rt, &splice);
        (d, Some(c))
    } else {
        let d = Daemon::start(
            &topo.ingress,
            &zone_ingress_yaml("198.18.0.2", 10001, 9901),
            &section5_inventory(false),
            &["--splice", &splice, "--drain-time", "2s"],
        );
        println!(
            "   ingress pid {} is ready; inventory: backend v1, backend v2 (8080), redis (6379), web (NotReady)",
            d.pid()
        );
        (d, None)
    };
    let rt = runtime();
    let ingress: SocketAddr = "198.18.0.2:10001".parse().expect("addr");
    rt.block_on(async {
        for (k, name) in DP_NAMES.iter().enumerate() {
            let port = if k == 2 { 6379 } else { 8080 };
            let addr = SocketAddr::new(Topology::dataplane_addr(k + 1, false), port);
            let leaf = pki
                .leaf(name, &["a601e0c00295a9fbe.backend.8080.default.ms", "a25502fde077cd057.redis.6379.default.ms"]);
            spawn_dataplane(topo.dataplanes[k].listen(addr), name, Some(pki.server_config(&leaf)));
        }
        let client_leaf = pki.leaf("remote-client", &["client.test"]);
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(&client_leaf));
        println!("\n== mTLS connections (rustls client with a client certificate; the ingress holds no certificate)");
        for sni in [
            "a601e0c00295a9fbe.backend.8080.default.ms",
            "a601e0c00295a9fbe.backend.8080.default.ms",
            "a25502fde077cd057.redis.6379.default.ms",
            "a0123456789abcdef.backend.8080.default.ms",
        ] {
            let tcp = topo.client.connect(ingress).expect("connect");
            let name = ServerName::try_from(sni.to_owned()).expect("dns name");
            let result = async {
                let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await??;
                tokio::time::timeout(Duration::from_secs(30), stream::client(tls, 8 << 20, 8 << 20)).await?
            }
            .await;
            match result {
                Ok(o) => println!(
                    "   SNI {sni:<45} → {:<10} 8 MiB each way, SHA-256 {}",
                    o.dataplane,
                    if o.up_ok && o.down_ok { "match" } else { "MISMATCH" }
                ),
                Err(e) => println!("   SNI {sni:<45} → rejected (closed without a byte: {e})"),
            }
        }
    });
    // Legacy tag SNIs contain `{`, `=`, `,`: rustls refuses to send them and rustls servers
    // refuse to accept them (Envoy, Kuma's dataplane proxy, accepts them). So this part uses
    // OpenSSL on both ends: `s_server` requiring a client certificate on each dataplane.
    drop(rt);
    println!("\n== legacy tag SNIs (openssl s_client → ingress → openssl s_server -Verify 1, mTLS end to end)");
    let scratch = Scratch::new("demo");
    let ca = scratch.write("ca.pem", &pki.ca_pem);
    let client = pki.leaf("remote-client", &["client.test"]);
    let cert = scratch.write("client.pem", &client.cert_pem);
    let key = scratch.write("client.key", &client.key_pem);
    let mut servers = Vec::new();
    for (k, name) in DP_NAMES.iter().enumerate() {
        let leaf = pki.leaf(name, &["dataplane.test"]);
        let scert = scratch.write(&format!("{name}.pem"), &leaf.cert_pem);
        let skey = scratch.write(&format!("{name}.key"), &leaf.key_pem);
        let port = if k == 2 { 6379 } else { 8080 };
        let child = topo.dataplanes[k]
            .command("openssl")
            .args([
                "s_server",
                "-quiet",
                "-accept",
                &format!("{}:{port}", Topology::dataplane_v4(k + 1)),
                "-Verify",
                "1",
            ])
            .arg("-cert")
            .arg(&scert)
            .arg("-key")
            .arg(&skey)
            .arg("-CAfile")
            .arg(&ca)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        servers.push(child);
    }
    std::thread::sleep(Duration::from_millis(300));
    for sni in [
        "backend{mesh=default}",
        "backend{mesh=default}",
        "backend{mesh=default,version=v1}",
        "backend{kuma.io/zone=east,mesh=default,version=v2}",
        "redis{mesh=default}",
        "backend{mesh=default,version=v3}",
        "backend{version=v1,mesh=default}",
        "web{mesh=default}",
    ] {
        let out = topo
            .client
            .command("openssl")
            .args(["s_client", "-brief", "-connect", "198.18.0.2:10001", "-servername", sni])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .arg("-CAfile")
            .arg(&ca)
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client");
        let text = String::from_utf8_lossy(&out.stderr);
        let peer = text
            .lines()
            .filter(|l| l.starts_with("Peer certificate"))
            .find_map(|l| l.split("CN").nth(1))
            .map_or("?", |cn| cn.trim_start_matches([' ', '=']))
            .trim()
            .to_owned();
        if text.contains("CONNECTION ESTABLISHED") {
            println!("   SNI {sni:<52} → {peer:<10} mTLS handshake completed (server certificate CN {peer})");
        } else {
            println!("   SNI {sni:<52} → rejected (closed without a byte)");
        }
    }
    for mut s in servers {
        // SAFETY: signalling the s_server we started, by PID.
        unsafe { libc::kill(libc::pid_t::try_from(s.id()).expect("pid"), libc::SIGTERM) };
        let _ = s.wait();
    }
    std::thread::sleep(Duration::from_millis(500));
    println!("\n== access log of the ingress (one line per closed connection)");
    for line in daemon.log_text().lines().filter(|l| l.contains("connection closed") || l.contains("rejected")) {
        println!("   {line}");
    }
    let log = daemon.log_text();
    let on = |path: &str| log.matches(&format!("mode=\"{path}\" bytes")).count();
    println!(
        "\n   {} connection(s) forwarded at packet level, {} spliced by sockmap, {} relayed in userspace",
        on("packet"),
        on("kernel"),
        on("userspace")
    );
    println!("\n== admin API of the ingress (127.0.0.1:9901 inside its namespace)");
    let get = |path: &str| -> String {
        topo.ingress.run(|| {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9901").expect("admin port");
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or(body)
        })
    };
    println!("-- GET /ready: {}", get("/ready").trim());
    let dump = get("/config_dump");
    println!("-- GET /config_dump (first 40 lines)");
    let pretty =
        serde_json::from_str::<serde_json::Value>(&dump).and_then(|v| serde_json::to_string_pretty(&v)).unwrap_or(dump);
    for line in pretty.lines().take(40) {
        println!("   {line}");
    }
    println!("-- GET /stats/prometheus (excerpt)");
    for line in get("/stats/prometheus").lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("envoy_listener_downstream_cx_total")
                || l.starts_with("envoy_tcp_downstream_cx_total")
                || l.starts_with("envoy_cluster_upstream_cx_total")
                || l.starts_with("envoy_tls_inspector")
                || l.starts_with("zone_ingress_connections")
                || l.starts_with("zone_ingress_rejects")
                || l.starts_with("zone_ingress_handoff_duration_seconds_count")
                || l.starts_with("zone_ingress_handoff_duration_seconds_sum")
                || l.starts_with("zone_ingress_bytes"))
    }) {
        println!("   {line}");
    }
    if with_cp {
        println!(
            "-- control plane: {}",
            get("/stats/prometheus")
                .lines()
                .find(|l| l.starts_with("envoy_control_plane_connected_state"))
                .unwrap_or("?")
        );
    }
    drop(daemon);
    drop(topo);
    println!("== cleaned up (daemon stopped, namespaces removed)");
}

/// The demo's services as a Kuma control plane sends them to a zone ingress: the same routes
/// as the inventory of the file mode (`web` is NotReady, so it has none).
fn demo_services() -> Vec<Service> {
    let dp = |k: usize, port: u16| SocketAddr::new(Topology::dataplane_addr(k, false), port);
    let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };
    let backend_eps = vec![
        (dp(1, 8080), tags(&[("kuma.io/service", "backend"), ("kuma.io/zone", "east"), ("version", "v1")])),
        (dp(2, 8080), tags(&[("kuma.io/service", "backend"), ("kuma.io/zone", "east"), ("version", "v2")])),
    ];
    let redis_eps = vec![(dp(3, 6379), tags(&[("kuma.io/service", "redis")]))];
    vec![
        Service {
            cluster: "default:backend".into(),
            endpoints: backend_eps.clone(),
            subset_keys: vec![vec!["version".into()], vec!["kuma.io/zone".into(), "version".into()]],
            snis: vec![
                ("backend{mesh=default}".into(), BTreeMap::new()),
                ("backend{mesh=default,version=v1}".into(), tags(&[("version", "v1")])),
                (
                    "backend{kuma.io/zone=east,mesh=default,version=v2}".into(),
                    tags(&[("kuma.io/zone", "east"), ("version", "v2")]),
                ),
            ],
        },
        Service {
            cluster: "default_backend__east_msvc_8080".into(),
            endpoints: backend_eps,
            subset_keys: vec![],
            snis: vec![("a601e0c00295a9fbe.backend.8080.default.ms".into(), BTreeMap::new())],
        },
        Service {
            cluster: "default:redis".into(),
            endpoints: redis_eps.clone(),
            subset_keys: vec![],
            snis: vec![("redis{mesh=default}".into(), BTreeMap::new())],
        },
        Service {
            cluster: "default_redis__east_msvc_6379".into(),
            endpoints: redis_eps,
            subset_keys: vec![],
            snis: vec![("a25502fde077cd057.redis.6379.default.ms".into(), BTreeMap::new())],
        },
    ]
}

/// Starts the control plane in dataplane 3's namespace and the daemon in control-plane mode.
#[expect(clippy::print_stdout, reason = "the demo's output is its purpose")]
fn start_with_control_plane(
    topo: &Topology,
    pki: &Pki,
    rt: &tokio::runtime::Runtime,
    splice: &str,
) -> (Daemon, ControlPlane) {
    const TOKEN: &str = "demo-dataplane-token";
    let _guard = rt.enter();
    let ns = &topo.dataplanes[2];
    let cp_addr = |port| SocketAddr::new(Topology::dataplane_addr(3, false), port);
    let config = cp::kuma_ingress("198.18.0.2:10001".parse().expect("addr"), &demo_services(), "zi-test", "east");
    let control_plane = ControlPlane::start(ns.listen(cp_addr(5678)), ns.listen(cp_addr(5679)), pki, TOKEN, config);
    println!("   control plane (bootstrap 198.18.3.2:5678, ADS 198.18.3.2:5679, TLS) serves the demo's services");
    let scratch = Scratch::new("demo-cp");
    let zi = scratch.write("zoneingress.yaml", &zone_ingress_yaml("198.18.0.2", 10001, 9901));
    let ca = scratch.write("ca.crt", &pki.ca_pem);
    let token = scratch.write("token", TOKEN);
    let args: Vec<OsString> = [
        "--proxy-type=ingress",
        "--cp-address",
        "https://198.18.3.2:5678",
        "--dataplane-file",
        zi.to_str().expect("utf-8"),
        "--dataplane-token-file",
        token.to_str().expect("utf-8"),
        "--ca-cert-file",
        ca.to_str().expect("utf-8"),
        "--zone",
        "east",
        "--splice",
        splice,
        "--drain-time",
        "2s",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut daemon = Daemon::launch(&topo.ingress, scratch, &args, "info");
    daemon.expect_ready(Duration::from_secs(20));
    if !daemon.wait_log("control plane: configuration applied", Duration::from_secs(15)) {
        panic!("no configuration from the control plane:\n{}", daemon.log_text());
    }
    let boot = control_plane.record.bootstraps.lock().expect("lock").len();
    println!(
        "   ingress pid {} joined: {boot} bootstrap request with the ZoneIngress and the token, ADS stream up, {} acknowledged updates",
        daemon.pid(),
        control_plane
            .record
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| !r.nonce.is_empty() && r.error.is_none())
            .count()
    );
    (daemon, control_plane)
}
