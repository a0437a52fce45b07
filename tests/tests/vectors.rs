//! Every row of the SNI test-vector table (docs/design.md#sni-examples) through the live ingress,
//! with `section5_inventory(false)` and `--zone east`, in both splice modes.
//!
//! - `probe_table_*`: a probe ClientHello per row over plain TCP. Dataplanes 1/2/3 run plain TCP
//!   servers that read the probe record, parse its SNI and answer with their name and the SHA-256
//!   of the record, so each routed row proves which dataplane got it and that the ClientHello
//!   arrived unchanged; rows routed to both backend dataplanes are sent 4 times and must hit
//!   each twice. Reject rows (plus no SNI, plaintext, NUL in the name, a name over 255 bytes
//!   and the parser error cases) must see EOF with zero bytes and a `connection rejected` line
//!   with the row's `reason=`.
//! - `legacy_mtls_openssl_*`: the legacy tag SNIs with a real mTLS handshake end to end,
//!   `openssl s_client` (client namespace) against `openssl s_server -Verify 1` (dataplane
//!   namespaces); rustls servers refuse such SNIs, Envoy and OpenSSL accept them.
//! - `meshservice_rustls_*`: the MeshService rows with tokio-rustls on both ends.
//! - `empty_table_answers_proxy_and_zone`: no healthy service → `{"proxy":..,"zone":..}`.
//! - `plaintext_route_*`: `--plaintext-route 'redis{mesh=default}'` routes plaintext to
//!   dataplane 3 byte-exactly.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpListener, task::JoinHandle};
use zone_ingress::client_hello::{self, Parsed};
use zone_ingress_tests::{
    DP_NAMES,
    daemon::{Daemon, Scratch, zone_ingress_yaml},
    netns::{Netns, Topology},
    pki::Pki,
    raw::{self, End, SockOpts},
    runtime, section5_inventory,
    stream::{self, spawn_dataplane},
};

const ZONE: &str = "east";
const STEP: Duration = Duration::from_secs(10);

fn ingress_addr() -> SocketAddr {
    SocketAddr::new(Topology::ingress_v4().into(), 10001)
}

/// Dataplane k's (1-based) address in the inventory of docs/design.md#sni-examples: 8080 for the backends, 6379 for redis.
fn dp_addr(k: usize) -> SocketAddr {
    SocketAddr::new(Topology::dataplane_v4(k).into(), if k == 3 { 6379 } else { 8080 })
}

fn start(topo: &Topology, mode: &str, inventory: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--splice", mode, "--drain-time", "1s", "--zone", ZONE];
    args.extend_from_slice(extra);
    Daemon::start(&topo.ingress, &zone_ingress_yaml("198.18.0.2", 10001, 9901), inventory, &args)
}

// -------------------------------------------------------------------------------------------
// Plain TCP probe servers.

/// What a probe server saw: (dataplane name, SNI parsed from the record it received).
type Hits = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Reads one TLS record (the probe), answers `name` (16 bytes, NUL padded) + SHA-256 of the
/// record, and closes.
fn spawn_probe_server(l: TcpListener, name: &'static str, hits: Hits) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let hits = Arc::clone(&hits);
            tokio::spawn(async move {
                let Ok(header) = raw::read_exact(&mut s, 5, STEP).await else { return };
                let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                let Ok(body) = raw::read_exact(&mut s, len, STEP).await else { return };
                let mut record = header;
                record.extend_from_slice(&body);
                let sni = match client_hello::parse(&record, 1 << 16) {
                    Parsed::Complete { sni, .. } => sni.map(|s| s.as_str().to_owned()),
                    _ => None,
                };
                hits.lock().expect("lock").push((name.to_owned(), sni));
                let mut answer = [0u8; 16].to_vec();
                answer[..name.len()].copy_from_slice(name.as_bytes());
                answer.extend_from_slice(&raw::sha256(&record));
                let _ = raw::write_all(&mut s, &answer, STEP).await;
                let _ = s.shutdown().await;
                let _ = raw::read_to_end(&mut s, 1 << 20, STEP).await;
            });
        }
    })
}

/// What one row expects.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Routed; the dataplanes (1-based) that must answer, each equally often.
    Routed(&'static [usize]),
    /// Closed without a byte; the access log's `reason`.
    Rejected(&'static str),
}

/// The table of docs/design.md#sni-examples (SNI → expectation), plus parser error cases.
const TABLE: [(&str, Expect); 18] = [
    ("backend{mesh=default}", Expect::Routed(&[1, 2])),
    ("backend{mesh=default,version=v1}", Expect::Routed(&[1])),
    ("backend{kuma.io/zone=east,mesh=default,version=v2}", Expect::Routed(&[2])),
    ("backend{mesh=default,version=v3}", Expect::Rejected("no_endpoints")),
    ("backend{version=v1,mesh=default}", Expect::Rejected("not_canonical")),
    ("backend", Expect::Rejected("unknown_sni")),
    ("backend{mesh=other}", Expect::Rejected("unknown_sni")),
    ("redis{mesh=default}", Expect::Routed(&[3])),
    ("web{mesh=default}", Expect::Rejected("unknown_sni")),
    ("a601e0c00295a9fbe.backend.8080.default.ms", Expect::Routed(&[1, 2])),
    ("a25502fde077cd057.redis.6379.default.ms", Expect::Routed(&[3])),
    ("a601e0c00295a9fbe.backend.80.default.ms", Expect::Rejected("unknown_sni")),
    ("a0123456789abcdef.backend.8080.default.ms", Expect::Rejected("unknown_sni")),
    ("a601e0c00295a9fbe.backend.8080.default.mzms", Expect::Rejected("unknown_sni")),
    ("afce62f771ed74b78.example.9090.default.mes", Expect::Rejected("unknown_sni")),
    ("sni.msvc.default.east.backend.http", Expect::Rejected("unknown_sni")),
    ("backend{", Expect::Rejected("invalid_sni")),
    ("backend{mesh=default{mesh", Expect::Rejected("invalid_sni")),
];

/// The first bytes of connections that carry no usable SNI, with the reason each must get.
fn raw_rejects() -> Vec<(String, Vec<u8>, &'static str)> {
    let long_known_prefix = "backend{mesh=default,version=";
    // 255 bytes: a legal length for a name that is simply unknown.
    let at_limit = format!("{long_known_prefix}{}}}", "v".repeat(255 - long_known_prefix.len() - 1));
    assert_eq!(at_limit.len(), 255);
    // 256 bytes: over the limit.
    let over_limit = format!("{long_known_prefix}{}}}", "v".repeat(256 - long_known_prefix.len() - 1));
    assert_eq!(over_limit.len(), 256);
    vec![
        ("(no SNI extension)".to_owned(), raw::probe_without_sni(), "no_sni"),
        ("(plaintext GET / HTTP/1.1)".to_owned(), b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n".to_vec(), "not_tls"),
        (
            "backend\\0{mesh=default} (NUL in the name)".to_owned(),
            raw::probe_bytes(b"backend\0{mesh=default}"),
            "bad_sni",
        ),
        ("(256-byte name)".to_owned(), raw::probe(&over_limit), "bad_sni"),
        ("(300-byte name)".to_owned(), raw::probe(&"a".repeat(300)), "bad_sni"),
        ("(255-byte name, well-formed, no such subset)".to_owned(), raw::probe(&at_limit), "no_endpoints"),
    ]
}

/// Sends `first` and reads what comes back (to EOF, bounded).
async fn exchange(topo: &Topology, first: &[u8]) -> (SocketAddr, Vec<u8>, End) {
    let mut c = raw::connect(&topo.client, ingress_addr(), SockOpts::nodelay()).await.expect("connect to the ingress");
    let me = c.local_addr().expect("addr");
    raw::write_all(&mut c, first, STEP).await.expect("write the first flight");
    let (got, end) = raw::read_to_end(&mut c, 1 << 20, STEP).await;
    (me, got, end)
}

fn check_rejected(daemon: &Daemon, row: &str, client: SocketAddr, got: &[u8], end: &End, reason: &str) {
    assert!(got.is_empty(), "{row}: a rejected client got {} bytes: {:?}", got.len(), String::from_utf8_lossy(got));
    assert!(end.is_eof(), "{row}: a rejected client must see a clean EOF, got {end:?}");
    let line = raw::wait_access_line(&daemon.log, client, "connection rejected", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{row}: no `connection rejected` line for {client}:\n{}", daemon.log_text()));
    assert_eq!(raw::field(&line, "reason"), Some(reason), "{row}: {line}");
}

fn probe_table(mode: &'static str) {
    let topo = Topology::new(3);
    let daemon = start(&topo, mode, &section5_inventory(false), &[]);
    let rt = runtime();
    rt.block_on(async {
        let hits: Hits = Arc::default();
        let servers: Vec<JoinHandle<()>> = (1..=3)
            .map(|k| spawn_probe_server(topo.dataplanes[k - 1].listen(dp_addr(k)), DP_NAMES[k - 1], Arc::clone(&hits)))
            .collect();
        for (sni, expect) in TABLE {
            let hello = raw::probe(sni);
            match expect {
                Expect::Routed(dps) => {
                    let per_dp = 2;
                    hits.lock().expect("lock").clear();
                    let mut answered = BTreeMap::<String, usize>::new();
                    for _ in 0..per_dp * dps.len() {
                        let (client, got, end) = exchange(&topo, &hello).await;
                        assert!(end.is_eof(), "{sni}: {end:?} after {} bytes", got.len());
                        assert_eq!(got.len(), 48, "{sni}: answer {got:?}");
                        let name = String::from_utf8_lossy(&got[..16]).trim_end_matches('\0').to_owned();
                        assert_eq!(got[16..], raw::sha256(&hello), "{sni}: the ClientHello reached {name} altered");
                        *answered.entry(name).or_default() += 1;
                        let line =
                            raw::wait_access_line(&daemon.log, client, "connection closed", Duration::from_secs(5))
                                .unwrap_or_else(|| {
                                    panic!("{sni}: no access line for {client}:\n{}", daemon.log_text())
                                });
                        assert_eq!(raw::field(&line, "sni"), Some(sni), "{line}");
                        assert!(line.contains(&format!("mode=\"{mode}\"")), "{line}");
                    }
                    let want: BTreeMap<String, usize> =
                        dps.iter().map(|k| (DP_NAMES[k - 1].to_owned(), per_dp)).collect();
                    assert_eq!(answered, want, "{sni}: which dataplanes answered");
                    let seen: Vec<Option<String>> = hits.lock().expect("lock").iter().map(|(_, s)| s.clone()).collect();
                    assert!(
                        seen.iter().all(|s| s.as_deref() == Some(sni)),
                        "{sni}: SNIs the dataplanes parsed: {seen:?}"
                    );
                    eprintln!("{mode}: {sni} → {answered:?}");
                    hits.lock().expect("lock").clear();
                }
                Expect::Rejected(reason) => {
                    let (client, got, end) = exchange(&topo, &hello).await;
                    check_rejected(&daemon, sni, client, &got, &end, reason);
                    assert!(hits.lock().expect("lock").is_empty(), "{sni}: a rejected row reached a dataplane");
                    eprintln!("{mode}: {sni} → rejected ({reason})");
                    // The daemon logs at most 20 rejections per second.
                    tokio::time::sleep(Duration::from_millis(60)).await;
                }
            }
        }
        for (row, first, reason) in raw_rejects() {
            let (client, got, end) = exchange(&topo, &first).await;
            check_rejected(&daemon, &row, client, &got, &end, reason);
            eprintln!("{mode}: {row} → rejected ({reason})");
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert!(
            hits.lock().expect("lock").is_empty(),
            "a rejected row reached a dataplane: {:?}",
            hits.lock().expect("lock")
        );
        for s in servers {
            s.abort();
        }
    });
}

// -------------------------------------------------------------------------------------------
// Legacy tag SNIs: real mTLS with OpenSSL on both ends.

/// A process we started, killed (by its own PID) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &Netns, port: u16) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.command("ss").args(["-Hltn", &format!("sport = :{port}")]).output().expect("ss");
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(Instant::now() < end, "nothing listens on port {port} in {}", ns.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` with `input` on stdin, bounded by `timeout`; returns stdout + stderr.
fn run_bounded(mut cmd: Command, input: &[u8], timeout: Duration) -> String {
    let scratch = Scratch::new("sclient");
    let out_path = scratch.0.join("out");
    let out = std::fs::File::create(&out_path).expect("out");
    let err = out.try_clone().expect("dup");
    let mut child = cmd.stdin(Stdio::piped()).stdout(out).stderr(err).spawn().expect("spawn");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(input);
    }
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command timed out after {timeout:?}: {cmd:?}\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(&out_path).unwrap_or_default()
}

fn legacy_mtls_openssl(mode: &'static str) {
    let topo = Topology::new(3);
    let daemon = start(&topo, mode, &section5_inventory(false), &[]);
    let pki = Pki::new();
    let files = Scratch::new("pem");
    let ca = files.write("ca.pem", &pki.ca_pem);
    let client_leaf = pki.leaf("remote-client", &["client.test"]);
    let client_cert = files.write("client.pem", &client_leaf.cert_pem);
    let client_key = files.write("client.key", &client_leaf.key_pem);
    let mut servers = Vec::new();
    for k in 1..=3 {
        let name = DP_NAMES[k - 1];
        let leaf = pki.leaf(name, &[]);
        let cert = files.write(&format!("{name}.pem"), &leaf.cert_pem);
        let key = files.write(&format!("{name}.key"), &leaf.key_pem);
        let log = std::fs::File::create(files.0.join(format!("{name}.log"))).expect("log");
        let child = topo.dataplanes[k - 1]
            .command("openssl")
            .args(["s_server", "-accept", &dp_addr(k).port().to_string(), "-cert"])
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .arg("-CAfile")
            .arg(&ca)
            // Require a client certificate from our CA; fail the handshake otherwise.
            .args(["-Verify", "1", "-verify_return_error", "-rev"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("openssl s_server");
        servers.push(Proc(child));
        wait_listening(&topo.dataplanes[k - 1], dp_addr(k).port());
    }
    let rows: [(&str, &[&str]); 4] = [
        ("backend{mesh=default}", &["backend-1", "backend-2"]),
        ("backend{mesh=default,version=v1}", &["backend-1"]),
        ("backend{kuma.io/zone=east,mesh=default,version=v2}", &["backend-2"]),
        ("redis{mesh=default}", &["redis-1"]),
    ];
    let text = "zone-ingress passthrough";
    let reversed: String = text.chars().rev().collect();
    for (sni, cns) in rows {
        let mut answered = Vec::new();
        for _ in 0..cns.len().max(2) {
            let mut cmd = topo.client.command("openssl");
            cmd.args(["s_client", "-connect", &ingress_addr().to_string(), "-servername", sni, "-cert"])
                .arg(&client_cert)
                .arg("-key")
                .arg(&client_key)
                .arg("-CAfile")
                .arg(&ca)
                .args(["-verify_return_error", "-brief", "-ign_eof"]);
            let out = run_bounded(cmd, format!("{text}\nCLOSE\n").as_bytes(), Duration::from_secs(15));
            assert!(out.contains("CONNECTION ESTABLISHED"), "{sni}: handshake did not complete:\n{out}");
            assert!(out.contains("Verification: OK"), "{sni}: server certificate not verified:\n{out}");
            // `-rev`: the server answers each line reversed, after it verified our certificate.
            assert!(out.contains(&reversed), "{sni}: no application data after the handshake:\n{out}");
            let cn = out
                .lines()
                .find_map(|l| l.strip_prefix("Peer certificate: "))
                .and_then(|l| l.split("CN = ").nth(1))
                .map(|s| s.split(',').next().unwrap_or(s).trim().to_owned())
                .unwrap_or_else(|| panic!("{sni}: no peer certificate line:\n{out}"));
            answered.push(cn);
        }
        let mut distinct = answered.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct,
            cns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            "{sni}: server certificates that answered: {answered:?}"
        );
        eprintln!("{mode}: openssl mTLS {sni} → {answered:?}");
    }
    let closed = daemon.log_text().matches("connection closed").count();
    assert_eq!(closed, 8, "eight mTLS connections logged:\n{}", daemon.log_text());
    assert_eq!(daemon.log_text().matches(&format!("mode=\"{mode}\" bytes")).count(), 8, "{}", daemon.log_text());
    drop(servers);
}

// -------------------------------------------------------------------------------------------
// MeshService rows: rustls on both ends.

fn meshservice_rustls(mode: &'static str) {
    const MS_BACKEND: &str = "a601e0c00295a9fbe.backend.8080.default.ms";
    const MS_REDIS: &str = "a25502fde077cd057.redis.6379.default.ms";
    let topo = Topology::new(3);
    let daemon = start(&topo, mode, &section5_inventory(false), &[]);
    let pki = Pki::new();
    let rt = runtime();
    rt.block_on(async {
        let mut stats = Vec::new();
        for k in 1..=3 {
            let name = DP_NAMES[k - 1];
            let leaf = pki.leaf(name, &[MS_BACKEND, MS_REDIS]);
            stats.push(spawn_dataplane(
                topo.dataplanes[k - 1].listen(dp_addr(k)),
                name,
                Some(pki.server_config(&leaf)),
            ));
        }
        let client_leaf = pki.leaf("remote-client", &["client.test"]);
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(&client_leaf));
        for (sni, want, n) in [(MS_BACKEND, vec!["backend-1", "backend-2"], 4), (MS_REDIS, vec!["redis-1"], 2)] {
            let mut answered = BTreeMap::<String, usize>::new();
            for _ in 0..n {
                let tcp = raw::connect(&topo.client, ingress_addr(), SockOpts::nodelay()).await.expect("connect");
                let tls = stream::mtls_handshake(&connector, tcp, sni, STEP).await;
                let out = tokio::time::timeout(Duration::from_secs(30), stream::client(tls, 256 << 10, 256 << 10))
                    .await
                    .expect("transfer timed out")
                    .expect("transfer");
                assert!(out.up_ok && out.down_ok, "{sni}: SHA-256 mismatch {out:?}");
                *answered.entry(out.dataplane).or_default() += 1;
            }
            let each = n / want.len();
            let want: BTreeMap<String, usize> = want.iter().map(|s| ((*s).to_owned(), each)).collect();
            assert_eq!(answered, want, "{sni}: which dataplanes answered");
            eprintln!("{mode}: rustls mTLS {sni} → {answered:?}");
        }
        let snis = |k: usize| stats[k].snis.lock().expect("lock").clone();
        assert_eq!(snis(0), vec![MS_BACKEND.to_owned(); 2]);
        assert_eq!(snis(1), vec![MS_BACKEND.to_owned(); 2]);
        assert_eq!(snis(2), vec![MS_REDIS.to_owned(); 2]);
        for s in &stats {
            assert_eq!(s.failed.load(Ordering::Relaxed), 0, "{:?}", s.errors.lock().expect("lock"));
        }
    });
    assert!(daemon.wait_log_count("connection closed", 6, Duration::from_secs(10)), "{}", daemon.log_text());
}

// -------------------------------------------------------------------------------------------
// Empty table and the plaintext route.

#[test]
fn empty_table_answers_proxy_and_zone() {
    // Only a NotReady inbound: no service is healthy anywhere, so the table is empty.
    let inventory = r#"type: Dataplane
mesh: default
name: web-1
networking:
  address: "198.18.1.2"
  inbound:
  - port: 80
    state: NotReady
    tags:
      kuma.io/service: web
"#;
    let topo = Topology::new(1);
    let daemon = start(&topo, "kernel", inventory, &[]);
    let want = format!(r#"{{"proxy":"zi-test","zone":"{ZONE}"}}"#);
    let rt = runtime();
    rt.block_on(async {
        // A client that says nothing, one that sends a ClientHello, one that speaks plaintext.
        let firsts: [(&str, Vec<u8>); 3] = [
            ("silent", Vec::new()),
            ("ClientHello", raw::probe("backend{mesh=default}")),
            ("plaintext", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ];
        for (what, first) in firsts {
            let mut c = raw::connect(&topo.client, ingress_addr(), SockOpts::nodelay()).await.expect("connect");
            let me = c.local_addr().expect("addr");
            if !first.is_empty() {
                raw::write_all(&mut c, &first, STEP).await.expect("write");
            }
            let (got, end) = raw::read_to_end(&mut c, 1 << 20, STEP).await;
            assert_eq!(String::from_utf8_lossy(&got), want, "{what}: answer of an ingress with an empty table");
            assert!(end.is_eof(), "{what}: expected EOF after the answer, got {end:?}");
            let line = raw::wait_access_line(&daemon.log, me, "connection rejected", Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{what}: no log line:\n{}", daemon.log_text()));
            assert_eq!(raw::field(&line, "reason"), Some("empty_table"), "{line}");
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    });
}

fn plaintext_route(mode: &'static str) {
    let topo = Topology::new(3);
    let daemon = start(&topo, mode, &section5_inventory(false), &["--plaintext-route", "redis{mesh=default}"]);
    let rt = runtime();
    rt.block_on(async {
        let mut request = b"GET / HTTP/1.1\r\nHost: redis\r\n\r\n".to_vec();
        request.extend_from_slice(&raw::pattern(301, 256 << 10));
        let response = raw::pattern(302, (512 << 10) + 1);
        // Dataplanes 1 and 2 must not be reached; dataplane 3 checks the plaintext byte-exactly.
        let l1 = topo.dataplanes[0].listen(dp_addr(1));
        let l2 = topo.dataplanes[1].listen(dp_addr(2));
        let l3 = topo.dataplanes[2].listen(dp_addr(3));
        let server = async {
            let mut s = raw::accept(&l3, STEP).await.expect("dataplane 3 accepts");
            let got = raw::read_exact(&mut s, request.len(), STEP).await.expect("request");
            raw::assert_bytes("plaintext client→redis", &got, &request);
            raw::write_all(&mut s, &response, STEP).await.expect("response");
            s.shutdown().await.expect("shutdown");
            let (rest, end) = raw::read_to_end(&mut s, 1 << 20, STEP).await;
            assert!(rest.is_empty() && end.is_eof(), "dataplane 3: {} extra bytes, {end:?}", rest.len());
        };
        let client = async {
            let mut c = raw::connect(&topo.client, ingress_addr(), SockOpts::nodelay()).await.expect("connect");
            let me = c.local_addr().expect("addr");
            raw::write_all(&mut c, &request, STEP).await.expect("request");
            let (got, end) = raw::read_to_end(&mut c, 4 << 20, STEP).await;
            assert!(end.is_eof(), "client: {end:?}");
            raw::assert_bytes("redis→plaintext client", &got, &response);
            c.shutdown().await.expect("shutdown");
            me
        };
        let ((), me) = tokio::join!(server, client);
        let line = raw::wait_access_line(&daemon.log, me, "connection closed", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no access line:\n{}", daemon.log_text()));
        assert_eq!(raw::field(&line, "sni"), Some("redis{mesh=default}"), "{line}");
        assert_eq!(raw::field(&line, "mode"), Some(mode), "{line}");
        assert_eq!(raw::field(&line, "bytes_client_to_backend"), Some(request.len().to_string().as_str()), "{line}");
        assert_eq!(raw::field(&line, "bytes_backend_to_client"), Some(response.len().to_string().as_str()), "{line}");
        // TLS clients are still routed by SNI.
        let hello = raw::probe("backend{mesh=default,version=v1}");
        let tls_client = async {
            let mut c = raw::connect(&topo.client, ingress_addr(), SockOpts::nodelay()).await.expect("connect");
            raw::write_all(&mut c, &hello, STEP).await.expect("hello");
            let got = raw::read_exact(&mut c, 2, STEP).await.expect("answer");
            assert_eq!(got, b"v1");
        };
        let backend = async {
            let mut s = raw::accept(&l1, STEP).await.expect("dataplane 1 accepts");
            let got = raw::read_exact(&mut s, hello.len(), STEP).await.expect("hello");
            raw::assert_bytes("ClientHello", &got, &hello);
            raw::write_all(&mut s, b"v1", STEP).await.expect("answer");
        };
        tokio::join!(tls_client, backend);
        // Nothing reached dataplane 2.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), l2.accept()).await.is_err(),
            "dataplane 2 got a connection"
        );
    });
}

macro_rules! both_modes {
    ($($name:ident => $body:ident;)*) => {$(
        mod $name {
            #[test]
            fn kernel() {
                super::$body("kernel");
            }
            #[test]
            fn userspace() {
                super::$body("userspace");
            }
        }
    )*};
}

both_modes! {
    probe_table => probe_table;
    legacy_mtls_openssl => legacy_mtls_openssl;
    meshservice_rustls => meshservice_rustls;
    plaintext_route => plaintext_route;
}
