//! In-process integration tests of the connection path: accept → peek the ClientHello → route by
//! SNI → connect → relay. The relay is the userspace one (no kernel splice is attached), so these
//! tests need neither root nor eBPF, and everything runs on 127.0.0.1 with ephemeral ports.
//!
//! Clients and dataplanes speak real TLS (rustls, mTLS with a throwaway CA the ingress never
//! sees) or send a real rustls ClientHello followed by raw bytes. Kuma's legacy SNIs
//! (`backend{mesh=default}`) are not DNS names, which rustls refuses to send; see [`KumaSni`] for
//! how such a handshake is still made end to end.
//!
//! Everything that touches daemon internals (building the ingress, reading its counters) is in
//! the first section below; the tests themselves talk to sockets.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zone_ingress::{
    config,
    metrics::Metrics,
    server::{self, Ingress, Options, Snapshot},
    splice::{Limits, Path as SplicePath, SpliceMode},
};

// ---------------------------------------------------------------------------------------------
// The daemon: every use of its internals is here.
// ---------------------------------------------------------------------------------------------

/// The zone the inventories below are in.
const ZONE: &str = "east";
/// The proxy id of the empty-table answer.
const PROXY_ID: &str = "zone-ingress-test";

/// What a test may change; everything else is the daemon's default.
#[derive(Default)]
struct Knobs {
    max_cluster_connections: Option<usize>,
    idle_timeout: Option<Duration>,
}

/// A running ingress (userspace relay) listening on 127.0.0.1 on an ephemeral port.
struct Zi {
    ingress: Arc<Ingress>,
    addr: SocketAddr,
}

/// Starts an ingress serving the Dataplane resources in `inventory` (YAML). Call from within the
/// test's runtime: the accept loop is spawned on it and ends with it.
fn start_ingress(inventory: &str, knobs: Knobs) -> Zi {
    let inventory = match config::parse_inventory(Path::new("inventory.yaml"), inventory) {
        Ok(loaded) => loaded.value,
        Err(e) => panic!("inventory does not parse:\n{e}"),
    };
    let defaults = Options::default();
    let options = Options {
        proxy_id: PROXY_ID.to_owned(),
        zone: ZONE.to_owned(),
        splice: SpliceMode::Userspace,
        max_cluster_connections: knobs.max_cluster_connections.unwrap_or(defaults.max_cluster_connections),
        limits: Limits {
            idle_timeout: knobs.idle_timeout.unwrap_or(defaults.limits.idle_timeout),
            ..Limits::default()
        },
        ..defaults
    };
    let metrics = Arc::new(Metrics::default());
    let snapshot = Snapshot::build(&metrics, None, inventory, ZONE);
    let ingress = Ingress::with_snapshot(options, metrics, snapshot, None, None);
    let listeners = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 1, Duration::from_secs(60), None)
        .expect("bind the ingress listener");
    ingress.start_listeners(listeners);
    let addr = ingress.listener_addr().expect("the listener has an address");
    Zi { ingress, addr }
}

/// Waits until the ingress holds no connection any more (every connection task has finished,
/// so everything it counts is counted).
async fn settled(zi: &Zi) {
    let left = zi.ingress.wait_idle(Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(left, 0, "connections still open in the ingress");
}

/// Connections rejected before reaching a backend, by reason (non-zero counts only).
fn rejects(zi: &Zi) -> BTreeMap<String, u64> {
    zi.ingress.metrics.rejects().into_iter().filter(|(_, n)| *n > 0).map(|(reason, n)| (reason.to_owned(), n)).collect()
}

/// Relayed connections that have closed, by reason (non-zero counts only).
fn closes(zi: &Zi) -> BTreeMap<String, u64> {
    zi.ingress.metrics.closes().into_iter().filter(|(_, n)| *n > 0).map(|(reason, n)| (reason.to_owned(), n)).collect()
}

/// Bytes of closed relayed connections: (client → backend, backend → client).
fn closed_bytes(zi: &Zi) -> (u64, u64) {
    zi.ingress.metrics.closed_bytes(SplicePath::Userspace)
}

/// One cluster's counters that the tests check.
#[derive(Debug, PartialEq, Eq)]
struct ClusterCounts {
    /// Connections currently counted against the per-cluster cap.
    active: usize,
    overflow: u64,
    connect_fail: u64,
}

/// The counters of the cluster named `name` (Kuma's name, e.g. `default:backend`).
fn cluster(zi: &Zi, name: &str) -> ClusterCounts {
    let snapshot = zi.ingress.snapshot();
    let Some(stats) = snapshot.clusters.get(name) else { panic!("no cluster {name} in the snapshot") };
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    ClusterCounts {
        active: stats.active(),
        overflow: get(&stats.upstream_cx_overflow),
        connect_fail: get(&stats.upstream_cx_connect_fail),
    }
}

// ---------------------------------------------------------------------------------------------
// Test infrastructure: inventories, Kuma SNIs, TLS, backends, data.
// ---------------------------------------------------------------------------------------------

/// Longest a test may run.
const TEST_LIMIT: Duration = Duration::from_secs(30);

/// Runs a test body, failing it if it takes longer than [`TEST_LIMIT`].
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_LIMIT, body).await.expect("test timed out");
}

/// Polls `cond` until it holds (at most 10 s): for state the ingress updates after the event a
/// test can observe on a socket.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One Universal Dataplane resource with a single inbound, in mesh `default` and zone [`ZONE`].
fn dataplane(name: &str, service: &str, endpoint: SocketAddr, state: &str) -> String {
    let (ip, port) = (endpoint.ip(), endpoint.port());
    format!(
        "\
type: Dataplane
mesh: default
name: {name}
labels:
  kuma.io/zone: {ZONE}
networking:
  address: {ip}
  inbound:
  - port: {port}
    state: {state}
    tags:
      kuma.io/service: {service}
      kuma.io/zone: {ZONE}
"
    )
}

/// An inventory of ready dataplanes, one per `(name, service, endpoint)`.
fn inventory(dataplanes: &[(&str, &str, SocketAddr)]) -> String {
    dataplanes
        .iter()
        .map(|(name, service, endpoint)| dataplane(name, service, *endpoint, "Ready"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// FNV-1a 64 (Kuma's hash for resource SNIs).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Kuma's MeshService SNI (`a<hex16(fnv1a64("name;mesh;"))>.name.port.mesh.ms`), computed here
/// independently of the daemon.
fn mesh_service_sni(name: &str, mesh: &str, port: u16) -> String {
    format!("a{:016x}.{name}.{port}.{mesh}.ms", fnv1a64(format!("{name};{mesh};").as_bytes()))
}

/// A Kuma SNI as a rustls client can ask for it.
///
/// rustls only sends DNS names, and Kuma's legacy SNIs (`backend{mesh=default}`) are not. For
/// those, both TLS ends use a DNS stand-in of the same length: the client's first record goes on
/// the wire with the stand-in's bytes replaced by the Kuma SNI ([`SwapFirstRecord`]), which is
/// what the ingress peeks and routes on, and the dataplane puts the stand-in back before its
/// rustls reads the hello ([`restore_first_record`]). Both ends then hash the same transcript, so
/// the handshake (certificates included) verifies end to end. DNS-shaped SNIs (MeshService) go
/// on the wire unchanged.
#[derive(Clone, Debug)]
struct KumaSni {
    /// What the ClientHello carries on the wire.
    wire: String,
    /// What the TLS ends use (the DNS name the dataplane's certificate is for).
    tls_name: String,
}

impl KumaSni {
    fn new(sni: &str) -> Self {
        if DnsName::try_from(sni).is_ok() {
            return Self { wire: sni.to_owned(), tls_name: sni.to_owned() };
        }
        // Distinct per SNI (hash), DNS-valid (labels of at most 40 bytes), same length.
        let seed: Vec<u8> = format!("s{:016x}", fnv1a64(sni.as_bytes())).into_bytes();
        let tls_name: String = (0..sni.len())
            .map(|i| if i % 41 == 40 && i + 1 < sni.len() { '.' } else { char::from(*seed.get(i).unwrap_or(&b'q')) })
            .collect();
        assert!(DnsName::try_from(tls_name.as_str()).is_ok(), "stand-in {tls_name} is not a DNS name");
        Self { wire: sni.to_owned(), tls_name }
    }

    fn server_name(&self) -> ServerName<'static> {
        ServerName::try_from(self.tls_name.clone()).expect("a DNS name")
    }

    /// Replaces the stand-in by the wire SNI in a ClientHello (no-op for DNS-shaped SNIs).
    fn to_wire(&self, hello: &mut [u8]) {
        if self.wire != self.tls_name {
            assert!(
                replace_once(hello, self.tls_name.as_bytes(), self.wire.as_bytes()),
                "{} not found in the ClientHello",
                self.tls_name
            );
        }
    }
}

/// Replaces the first occurrence of `from` in `buf` by `to` (same length); false if absent.
fn replace_once(buf: &mut [u8], from: &[u8], to: &[u8]) -> bool {
    assert_eq!(from.len(), to.len());
    match buf.windows(from.len()).position(|w| w == from) {
        Some(at) => {
            buf[at..at + to.len()].copy_from_slice(to);
            true
        }
        None => false,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A throwaway CA: dataplane certificates, and the client certificate of a mesh client.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    roots: Arc<RootCertStore>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, "connection_path test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = params.self_signed(&ca_key).expect("CA certificate");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).expect("add the CA");
        Self { ca, ca_key, roots: Arc::new(roots) }
    }

    /// A leaf for the DNS names `names`.
    fn leaf(&self, names: Vec<String>) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, "connection_path test leaf");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("sign the leaf");
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// A dataplane: certificate for `names`, client certificate from this CA required.
    fn server_config(&self, names: Vec<String>) -> Arc<ServerConfig> {
        let (chain, key) = self.leaf(names);
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), provider())
            .build()
            .expect("client verifier");
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server certificate");
        Arc::new(config)
    }

    /// A mesh client: trusts only this CA, presents a certificate from it.
    fn client_config(&self) -> Arc<ClientConfig> {
        let (chain, key) = self.leaf(vec!["client.mesh".to_owned()]);
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(Arc::clone(&self.roots))
            .with_client_auth_cert(chain, key)
            .expect("client certificate");
        Arc::new(config)
    }
}

/// The first flight of a real rustls client for `name`, with `alpn` offered.
fn rustls_first_flight(name: ServerName<'static>, alpn: Vec<Vec<u8>>) -> Vec<u8> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// A real rustls ClientHello carrying `sni` on the wire.
fn client_hello(sni: &str) -> Vec<u8> {
    let sni = KumaSni::new(sni);
    let mut hello = rustls_first_flight(sni.server_name(), Vec::new());
    sni.to_wire(&mut hello);
    hello
}

/// A client's stream to the ingress that sends its first write (rustls's ClientHello record)
/// with the stand-in replaced by the Kuma SNI; see [`KumaSni`].
struct SwapFirstRecord {
    inner: TcpStream,
    sni: Option<KumaSni>,
    /// The rewritten record, not yet written to `inner`.
    pending: Vec<u8>,
}

impl SwapFirstRecord {
    fn new(inner: TcpStream, sni: &KumaSni) -> Self {
        Self { inner, sni: Some(sni.clone()), pending: Vec::new() }
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for SwapFirstRecord {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SwapFirstRecord {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(sni) = this.sni.take() {
            let mut record = buf.to_vec();
            sni.to_wire(&mut record);
            this.pending = record;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A dataplane's accepted stream that serves `prefix` (its first record, already read and
/// restored) before the rest of the connection.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads one TLS record (header and fragment) off `stream`.
async fn read_record(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut record = vec![0u8; 5];
    stream.read_exact(&mut record).await?;
    let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
    record.resize(5 + len, 0);
    stream.read_exact(&mut record[5..]).await?;
    Ok(record)
}

/// Puts the stand-in of whichever of `snis` the ClientHello record carries back in place.
fn restore_first_record(record: &mut [u8], snis: &[KumaSni]) {
    for sni in snis.iter().filter(|s| s.wire != s.tls_name) {
        replace_once(record, sni.wire.as_bytes(), sni.tls_name.as_bytes());
    }
}

/// A 127.0.0.1 listener on an ephemeral port, and its address.
async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind a backend");
    let addr = listener.local_addr().expect("backend address");
    (listener, addr)
}

/// Runs a dataplane on `listener`: a TLS server with a certificate for the stand-ins of `snis`
/// that requires a client certificate from `pki`, and answers every connection with `id`
/// before closing (close_notify, then FIN).
fn spawn_tls_dataplane(pki: &Pki, listener: TcpListener, id: &'static str, snis: Vec<KumaSni>) {
    let acceptor = TlsAcceptor::from(pki.server_config(snis.iter().map(|s| s.tls_name.clone()).collect()));
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            let (acceptor, snis) = (acceptor.clone(), snis.clone());
            tokio::spawn(async move {
                let mut first = read_record(&mut tcp).await.expect("dataplane: read the ClientHello");
                restore_first_record(&mut first, &snis);
                let stream = Prefixed { prefix: first, pos: 0, inner: tcp };
                let mut tls = acceptor.accept(stream).await.expect("dataplane: TLS handshake");
                assert!(
                    tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()),
                    "dataplane: no client certificate"
                );
                tls.write_all(id.as_bytes()).await.expect("dataplane: write id");
                tls.shutdown().await.expect("dataplane: close");
            });
        }
    });
}

/// Connects through the ingress with a verified mTLS handshake for `sni` and returns what the
/// dataplane says before it closes.
async fn tls_fetch(ingress: SocketAddr, config: Arc<ClientConfig>, sni: &str) -> String {
    let sni = KumaSni::new(sni);
    let tcp = TcpStream::connect(ingress).await.expect("connect to the ingress");
    let connector = TlsConnector::from(config);
    let mut tls = match connector.connect(sni.server_name(), SwapFirstRecord::new(tcp, &sni)).await {
        Ok(tls) => tls,
        Err(e) => panic!("TLS handshake for {} through the ingress: {e}", sni.wire),
    };
    assert!(tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()), "no server certificate");
    let mut said = String::new();
    tls.read_to_string(&mut said).await.expect("read the dataplane's answer");
    said
}

/// Runs a backend on `listener` that answers every connection with `ROUTED` and closes: a
/// connection that should have been rejected and reaches it is seen at once.
fn spawn_sentinel(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"ROUTED").await;
        }
    });
}

/// Runs a backend on `listener` that echoes every connection until EOF, then closes.
fn spawn_echo(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = stream.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
}

/// Opens a flow to an echo backend: the echo of its ClientHello proves it reached the backend.
async fn open_echo_flow(ingress: SocketAddr, hello: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(ingress).await.expect("connect to the ingress");
    stream.write_all(hello).await.expect("send the ClientHello");
    let mut echoed = vec![0u8; hello.len()];
    stream.read_exact(&mut echoed).await.expect("echo through the ingress");
    assert_same(&echoed, hello, "echo");
    stream
}

/// An ingress whose only route, `backend{mesh=default}`, leads to a sentinel backend.
async fn ingress_with_sentinel() -> Zi {
    let (backend, addr) = listener().await;
    spawn_sentinel(backend);
    start_ingress(&inventory(&[("backend-1", "backend", addr)]), Knobs::default())
}

/// Sends `bytes` to the ingress (then FIN if `fin`) and returns all it answers up to its clean
/// close; fails if the connection is reset instead.
async fn send_and_read_to_eof(addr: SocketAddr, bytes: &[u8], fin: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the ingress");
    stream.write_all(bytes).await.expect("send to the ingress");
    if fin {
        stream.shutdown().await.expect("FIN");
    }
    let mut got = Vec::new();
    match stream.read_to_end(&mut got).await {
        Ok(_) => got,
        Err(e) => panic!("expected a clean close, got {e} ({:?}) after {} bytes", e.kind(), got.len()),
    }
}

/// Sends `bytes` (then FIN if `fin`), expects the ingress to close without a byte, and the
/// connection to be counted as rejected for `reason` and nothing else.
async fn assert_rejected(zi: &Zi, bytes: &[u8], fin: bool, reason: &str) {
    let answer = send_and_read_to_eof(zi.addr, bytes, fin).await;
    assert!(answer.is_empty(), "expected no bytes before the close, got {:?}", String::from_utf8_lossy(&answer));
    settled(zi).await;
    assert_eq!(rejects(zi), BTreeMap::from([(reason.to_owned(), 1)]));
    assert_eq!(closes(zi), BTreeMap::new(), "a rejected connection is not a relayed flow");
}

/// `len` deterministic pseudo-random bytes (xorshift64 from `seed`).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Exact comparison of two byte streams, reporting the length and first difference.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!("{what}: got {} bytes, want {}; first difference at offset {at}", got.len(), want.len());
    }
}

/// Reads once and expects a connection reset (not a clean EOF, not data).
async fn assert_reset(stream: &mut TcpStream, who: &str) {
    let mut buf = [0u8; 256];
    match stream.read(&mut buf).await {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}: expected a reset, got {e}"),
        Ok(0) => panic!("{who}: clean EOF where a reset was expected"),
        Ok(n) => panic!("{who}: {n} unexpected bytes where a reset was expected"),
    }
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// A legacy tag SNI and a MeshService hash SNI each reach their own service's dataplane through
/// a real mTLS handshake that verifies end to end (the ingress passes the ClientHello through
/// untouched); each dataplane identifies itself in application data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_legacy_and_mesh_service_snis_to_their_dataplanes() {
    bounded(async {
        let pki = Pki::new();
        let (backend_l, backend) = listener().await;
        let (web_l, web) = listener().await;
        let backend_snis = vec![
            KumaSni::new("backend{mesh=default}"),
            KumaSni::new(&mesh_service_sni("backend", "default", backend.port())),
        ];
        let web_snis =
            vec![KumaSni::new("web{mesh=default}"), KumaSni::new(&mesh_service_sni("web", "default", web.port()))];
        spawn_tls_dataplane(&pki, backend_l, "backend-1", backend_snis.clone());
        spawn_tls_dataplane(&pki, web_l, "web-1", web_snis.clone());
        let zi =
            start_ingress(&inventory(&[("backend-1", "backend", backend), ("web-1", "web", web)]), Knobs::default());
        let client = pki.client_config();
        for (snis, id) in [(&backend_snis, "backend-1"), (&web_snis, "web-1")] {
            for sni in snis {
                assert_eq!(tls_fetch(zi.addr, Arc::clone(&client), &sni.wire).await, id, "SNI {}", sni.wire);
            }
        }
        settled(&zi).await;
        assert_eq!(rejects(&zi), BTreeMap::new());
    })
    .await;
}

/// Sequential connections to a service with two endpoints alternate between them (round robin
/// per connection), each completing a verified handshake with the dataplane it reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_between_a_services_endpoints() {
    bounded(async {
        let pki = Pki::new();
        let sni = KumaSni::new("backend{mesh=default}");
        let (l1, a1) = listener().await;
        let (l2, a2) = listener().await;
        spawn_tls_dataplane(&pki, l1, "backend-1", vec![sni.clone()]);
        spawn_tls_dataplane(&pki, l2, "backend-2", vec![sni.clone()]);
        let zi =
            start_ingress(&inventory(&[("backend-1", "backend", a1), ("backend-2", "backend", a2)]), Knobs::default());
        let client = pki.client_config();
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(tls_fetch(zi.addr, Arc::clone(&client), &sni.wire).await);
        }
        assert!(seen.windows(2).all(|w| w[0] != w[1]), "not alternating: {seen:?}");
        assert_eq!(seen.iter().filter(|id| *id == "backend-1").count(), 3, "{seen:?}");
        assert_eq!(seen.iter().filter(|id| *id == "backend-2").count(), 3, "{seen:?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Rejects
// ---------------------------------------------------------------------------------------------

/// A ClientHello for a service the zone does not have is closed without a byte
/// (`unknown_sni`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_unknown_sni() {
    bounded(async {
        let zi = ingress_with_sentinel().await;
        assert_rejected(&zi, &client_hello("nope{mesh=default}"), false, "unknown_sni").await;
    })
    .await;
}

/// A ClientHello without a server_name (rustls sends none for an IP address) is closed without a
/// byte (`no_sni`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_client_hello_without_sni() {
    bounded(async {
        let zi = ingress_with_sentinel().await;
        let hello = rustls_first_flight(ServerName::from(IpAddr::from(Ipv4Addr::LOCALHOST)), Vec::new());
        assert_rejected(&zi, &hello, false, "no_sni").await;
    })
    .await;
}

/// Plaintext (an HTTP request) is closed without a byte (`not_tls`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_plaintext() {
    bounded(async {
        let zi = ingress_with_sentinel().await;
        assert_rejected(&zi, b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n", false, "not_tls").await;
    })
    .await;
}

/// A ClientHello with a broken field (session id longer than 32 bytes) is closed without a byte
/// (`malformed`), although its SNI is routable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_malformed_client_hello() {
    bounded(async {
        let zi = ingress_with_sentinel().await;
        let mut hello = client_hello("backend{mesh=default}");
        // Record header (5), handshake header (4), version (2), random (32): the session id length.
        const SESSION_ID_LEN: usize = 5 + 4 + 2 + 32;
        assert_eq!(hello[SESSION_ID_LEN], 32, "rustls sends a 32-byte session id");
        hello[SESSION_ID_LEN] = 33;
        assert_rejected(&zi, &hello, false, "malformed").await;
    })
    .await;
}

/// A real ClientHello (two records, many ALPN protocols) larger than the 16 KiB peek limit is
/// closed without a byte (`too_large`), although its SNI is routable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_oversized_client_hello() {
    bounded(async {
        let zi = ingress_with_sentinel().await;
        let sni = KumaSni::new("backend{mesh=default}");
        let alpn: Vec<Vec<u8>> = (0..100u8).map(|i| vec![b'a' + i % 26; 200]).collect();
        let mut hello = rustls_first_flight(sni.server_name(), alpn);
        sni.to_wire(&mut hello);
        assert!(hello.len() > 16 * 1024 + 1000, "hello of {} bytes", hello.len());
        assert_rejected(&zi, &hello, false, "too_large").await;
    })
    .await;
}

/// A client that sends half a ClientHello and then FIN is closed without a byte
/// (`client_closed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_client_that_closes_before_a_full_client_hello() {
    bounded(async {
        let zi = ingress_with_sentinel().await;
        let hello = client_hello("backend{mesh=default}");
        assert_rejected(&zi, &hello[..hello.len() / 2], true, "client_closed").await;
    })
    .await;
}

/// With no routable service at all, every connection gets Kuma's
/// `{"proxy":…,"zone":…}` answer and a clean close (`empty_table`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_proxy_and_zone_when_no_service_is_routable() {
    bounded(async {
        let (backend, addr) = listener().await;
        spawn_sentinel(backend);
        let zi = start_ingress(&dataplane("backend-1", "backend", addr, "NotReady"), Knobs::default());
        let answer = send_and_read_to_eof(zi.addr, &client_hello("backend{mesh=default}"), false).await;
        let json: serde_json::Value =
            serde_json::from_slice(&answer).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&answer)));
        assert_eq!(json, serde_json::json!({"proxy": PROXY_ID, "zone": ZONE}));
        settled(&zi).await;
        assert_eq!(rejects(&zi), BTreeMap::from([("empty_table".to_owned(), 1)]));
    })
    .await;
}

/// A route whose only endpoint refuses connections (closed port) is closed without a byte
/// (`connect_failed`), after one failed attempt on that cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_when_the_endpoint_refuses_the_connection() {
    bounded(async {
        let (closed, addr) = listener().await;
        drop(closed);
        let zi = start_ingress(&inventory(&[("backend-1", "backend", addr)]), Knobs::default());
        assert_rejected(&zi, &client_hello("backend{mesh=default}"), false, "connect_failed").await;
        assert_eq!(cluster(&zi, "default:backend"), ClusterCounts { active: 0, overflow: 0, connect_fail: 1 });
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Half-close
// ---------------------------------------------------------------------------------------------

/// After the client half-closes, the backend still gets every byte and EOF, and what it sends
/// afterwards (only once it has seen EOF) still reaches the client in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_keeps_backend_to_client_open() {
    bounded(async {
        let hello = client_hello("backend{mesh=default}");
        let up = [hello.as_slice(), &pattern((3 << 20) + 17, 1)].concat();
        let down = pattern((2 << 20) + 5, 2);
        let (backend_l, addr) = listener().await;
        let zi = start_ingress(&inventory(&[("backend-1", "backend", addr)]), Knobs::default());
        let backend = tokio::spawn({
            let down = down.clone();
            async move {
                let (mut s, _) = backend_l.accept().await.expect("accept");
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("backend: read to EOF");
                s.write_all(&down).await.expect("backend: send after the client's FIN");
                s.shutdown().await.expect("backend: FIN");
                got
            }
        });
        let mut client = TcpStream::connect(zi.addr).await.expect("connect");
        client.write_all(&up).await.expect("client: send");
        client.shutdown().await.expect("client: FIN");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("client: read to EOF");
        assert_same(&got, &down, "backend → client after the client's FIN");
        assert_same(&backend.await.expect("backend task"), &up, "client → backend");
        settled(&zi).await;
        assert_eq!(closed_bytes(&zi), (up.len() as u64, down.len() as u64));
        assert_eq!(closes(&zi), BTreeMap::from([("client_fin".to_owned(), 1)]));
    })
    .await;
}

/// After the backend half-closes, the client still gets every byte and EOF, and what it sends
/// afterwards (only once it has seen EOF) still reaches the backend in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_keeps_client_to_backend_open() {
    bounded(async {
        let hello = client_hello("backend{mesh=default}");
        let down = pattern((3 << 20) + 11, 3);
        let up = pattern((2 << 20) + 3, 4);
        let (backend_l, addr) = listener().await;
        let zi = start_ingress(&inventory(&[("backend-1", "backend", addr)]), Knobs::default());
        let backend = tokio::spawn({
            let (hello, down) = (hello.clone(), down.clone());
            async move {
                let (mut s, _) = backend_l.accept().await.expect("accept");
                let mut first = vec![0u8; hello.len()];
                s.read_exact(&mut first).await.expect("backend: read the ClientHello");
                assert_same(&first, &hello, "ClientHello as relayed");
                s.write_all(&down).await.expect("backend: send");
                s.shutdown().await.expect("backend: FIN");
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("backend: read to EOF");
                got
            }
        });
        let mut client = TcpStream::connect(zi.addr).await.expect("connect");
        client.write_all(&hello).await.expect("client: send the ClientHello");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("client: read to EOF");
        assert_same(&got, &down, "backend → client");
        client.write_all(&up).await.expect("client: send after the backend's FIN");
        client.shutdown().await.expect("client: FIN");
        assert_same(&backend.await.expect("backend task"), &up, "client → backend after the backend's FIN");
        settled(&zi).await;
        assert_eq!(closed_bytes(&zi), ((hello.len() + up.len()) as u64, down.len() as u64));
        assert_eq!(closes(&zi), BTreeMap::from([("backend_fin".to_owned(), 1)]));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Reset
// ---------------------------------------------------------------------------------------------

/// A backend that resets (SO_LINGER 0) an established flow makes the client see a reset, not a
/// clean EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_reaches_the_client_as_reset() {
    bounded(async {
        let hello = client_hello("backend{mesh=default}");
        let (backend_l, addr) = listener().await;
        let zi = start_ingress(&inventory(&[("backend-1", "backend", addr)]), Knobs::default());
        let (go, go_rx) = oneshot::channel::<()>();
        let backend = tokio::spawn({
            let hello_len = hello.len();
            async move {
                let (mut s, _) = backend_l.accept().await.expect("accept");
                let mut first = vec![0u8; hello_len];
                s.read_exact(&mut first).await.expect("backend: read the ClientHello");
                s.write_all(b"ready").await.expect("backend: write");
                go_rx.await.expect("go");
                s.set_zero_linger().expect("SO_LINGER 0");
                drop(s);
            }
        });
        let mut client = TcpStream::connect(zi.addr).await.expect("connect");
        client.write_all(&hello).await.expect("client: send");
        let mut ready = [0u8; 5];
        client.read_exact(&mut ready).await.expect("client: read");
        assert_eq!(&ready, b"ready");
        go.send(()).expect("backend waits");
        backend.await.expect("backend task");
        assert_reset(&mut client, "client").await;
        settled(&zi).await;
        assert_eq!(closes(&zi), BTreeMap::from([("backend_reset".to_owned(), 1)]));
    })
    .await;
}

/// A client that resets (SO_LINGER 0) an established flow makes the backend see a reset, not a
/// clean EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_the_backend_as_reset() {
    bounded(async {
        let hello = client_hello("backend{mesh=default}");
        let (backend_l, addr) = listener().await;
        let zi = start_ingress(&inventory(&[("backend-1", "backend", addr)]), Knobs::default());
        let backend = tokio::spawn({
            let hello_len = hello.len();
            async move {
                let (mut s, _) = backend_l.accept().await.expect("accept");
                let mut first = vec![0u8; hello_len];
                s.read_exact(&mut first).await.expect("backend: read the ClientHello");
                s.write_all(b"ready").await.expect("backend: write");
                assert_reset(&mut s, "backend").await;
            }
        });
        let mut client = TcpStream::connect(zi.addr).await.expect("connect");
        client.write_all(&hello).await.expect("client: send");
        let mut ready = [0u8; 5];
        client.read_exact(&mut ready).await.expect("client: read");
        assert_eq!(&ready, b"ready");
        client.set_zero_linger().expect("SO_LINGER 0");
        drop(client);
        backend.await.expect("backend task");
        settled(&zi).await;
        assert_eq!(closes(&zi), BTreeMap::from([("client_reset".to_owned(), 1)]));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Idle timeout
// ---------------------------------------------------------------------------------------------

/// The idle timeout of the tests below (long enough that a loaded machine still relays the
/// first exchange well within it).
const IDLE: Duration = Duration::from_secs(1);

/// A flow silent for the idle timeout is reset on both sides (a cut, not the end of the stream),
/// no sooner than the timeout after its last byte and no later than two timeouts (the check's
/// period) plus scheduling slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_silent_flow_on_both_sides() {
    bounded(async {
        let hello = client_hello("backend{mesh=default}");
        let (backend_l, addr) = listener().await;
        let zi = start_ingress(
            &inventory(&[("backend-1", "backend", addr)]),
            Knobs { idle_timeout: Some(IDLE), ..Knobs::default() },
        );
        let backend = tokio::spawn({
            let hello_len = hello.len();
            async move {
                let (mut s, _) = backend_l.accept().await.expect("accept");
                let mut first = vec![0u8; hello_len];
                s.read_exact(&mut first).await.expect("backend: read the ClientHello");
                assert_reset(&mut s, "backend").await;
                Instant::now()
            }
        });
        let mut client = TcpStream::connect(zi.addr).await.expect("connect");
        let sent = Instant::now();
        client.write_all(&hello).await.expect("client: send");
        assert_reset(&mut client, "client").await;
        let client_closed = Instant::now();
        let backend_closed = backend.await.expect("backend task");
        for (side, at) in [("client", client_closed), ("backend", backend_closed)] {
            let after = at - sent;
            assert!(after >= IDLE, "{side} closed {after:?} after the last byte, before the idle timeout");
            assert!(after <= 2 * IDLE + Duration::from_secs(2), "{side} closed only {after:?} after the last byte");
        }
        settled(&zi).await;
        assert_eq!(closes(&zi), BTreeMap::from([("idle_timeout".to_owned(), 1)]));
    })
    .await;
}

/// A flow that exchanges a byte every quarter of the idle timeout stays open for four idle
/// timeouts and more, and then ends with the client's FIN, not the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_spares_a_flow_that_keeps_talking() {
    bounded(async {
        let hello = client_hello("backend{mesh=default}");
        let (backend_l, addr) = listener().await;
        spawn_echo(backend_l);
        let zi = start_ingress(
            &inventory(&[("backend-1", "backend", addr)]),
            Knobs { idle_timeout: Some(IDLE), ..Knobs::default() },
        );
        let mut client = TcpStream::connect(zi.addr).await.expect("connect");
        client.write_all(&hello).await.expect("client: send");
        let mut echoed = vec![0u8; hello.len()];
        client.read_exact(&mut echoed).await.expect("client: echo of the ClientHello");
        let started = Instant::now();
        let mut tick = tokio::time::interval(IDLE / 4);
        let mut i = 0u8;
        while started.elapsed() < 4 * IDLE {
            tick.tick().await;
            i = i.wrapping_add(1);
            client.write_all(&[i]).await.expect("client: send a byte");
            let mut b = [0u8; 1];
            client
                .read_exact(&mut b)
                .await
                .unwrap_or_else(|e| panic!("flow closed after {:?}: {e}", started.elapsed()));
            assert_eq!(b[0], i);
        }
        client.shutdown().await.expect("client: FIN");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("client: clean EOF");
        assert!(rest.is_empty());
        settled(&zi).await;
        assert_eq!(closes(&zi), BTreeMap::from([("client_fin".to_owned(), 1)]));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Per-cluster cap
// ---------------------------------------------------------------------------------------------

/// With `max_cluster_connections = 2`, a third concurrent connection to the cluster is closed
/// without a byte (`cluster_overflow`) while the two open flows and another cluster are
/// unaffected; once one flow closes, a new connection gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_cap_refuses_a_third_connection_until_one_closes() {
    bounded(async {
        let hello = client_hello("backend{mesh=default}");
        let (backend_l, backend) = listener().await;
        let (web_l, web) = listener().await;
        spawn_echo(backend_l);
        spawn_echo(web_l);
        let zi = start_ingress(
            &inventory(&[("backend-1", "backend", backend), ("web-1", "web", web)]),
            Knobs { max_cluster_connections: Some(2), ..Knobs::default() },
        );
        let mut first = open_echo_flow(zi.addr, &hello).await;
        let mut second = open_echo_flow(zi.addr, &hello).await;
        assert_eq!(cluster(&zi, "default:backend").active, 2);

        let answer = send_and_read_to_eof(zi.addr, &hello, false).await;
        assert!(answer.is_empty(), "the third connection got {} bytes", answer.len());
        wait_until("the overflow is counted", || cluster(&zi, "default:backend").overflow == 1).await;
        assert_eq!(rejects(&zi), BTreeMap::from([("cluster_overflow".to_owned(), 1)]));
        drop(open_echo_flow(zi.addr, &client_hello("web{mesh=default}")).await);

        first.shutdown().await.expect("FIN");
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).await.expect("first flow: clean EOF");
        wait_until("the first flow's slot is released", || cluster(&zi, "default:backend").active == 1).await;
        let mut fourth = open_echo_flow(zi.addr, &hello).await;
        assert_eq!(cluster(&zi, "default:backend"), ClusterCounts { active: 2, overflow: 1, connect_fail: 0 });

        for s in [&mut second, &mut fourth] {
            s.write_all(b"still open").await.expect("send");
            let mut b = [0u8; 10];
            s.read_exact(&mut b).await.expect("echo");
            assert_eq!(&b, b"still open");
        }
        assert_eq!(rejects(&zi), BTreeMap::from([("cluster_overflow".to_owned(), 1)]));
    })
    .await;
}
