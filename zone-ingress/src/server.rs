//! The connection path: accept → peek SNI → route → connect → handoff → close.
//!
//! `serve` takes bound listeners and a shutdown future (tests pass `127.0.0.1:0` listeners and
//! their own trigger). Each accepted connection gets one task that peeks the ClientHello
//! (never consuming it), picks a route and an endpoint, connects, and hands both sockets to the
//! kernel splice, or relays them in userspace. The task then ends (kernel) or lives as long as
//! the relay (userspace).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
};
use tracing::{debug, info, warn};

use crate::{
    client_hello::{self, Parsed},
    metrics::Metrics,
    routing::{Route, RouteTable},
    splice::{
        CloseReason, Closed, Limits, Path,
        kernel::{KernelSplice, Rejected},
        userspace::{self, Progress},
    },
};

/// Per-connection knobs (Kuma's defaults in `Default`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Options {
    /// Give up on a ClientHello that is not complete after this long (Envoy: 15 s).
    pub client_hello_timeout: Duration,
    /// Per-attempt backend connect timeout (Kuma: 5 s).
    pub connect_timeout: Duration,
    /// Endpoints tried per connection when connects fail (Kuma: 1; safe to retry since
    /// nothing has been sent to the backend yet).
    pub connect_attempts: usize,
    /// Concurrent connections per cluster (Envoy's default circuit breaker: 1024).
    pub max_cluster_connections: usize,
    /// Largest ClientHello accepted, in bytes (records included).
    pub max_client_hello: usize,
    /// Non-Kuma extension, off by default: connections whose first bytes are not a TLS
    /// ClientHello are routed as if they carried this SNI.
    pub plaintext_route: Option<String>,
    /// Proxy id and zone for the empty-table answer (reference §6.3).
    pub proxy_id: String,
    pub zone: String,
    /// Limits of spliced connections.
    pub limits: Limits,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            client_hello_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            max_cluster_connections: 1024,
            max_client_hello: client_hello::DEFAULT_MAX_CLIENT_HELLO,
            plaintext_route: None,
            proxy_id: String::new(),
            zone: String::new(),
            limits: Limits::default(),
        }
    }
}

/// Shared state of a running ingress.
pub struct Ingress {
    pub options: Options,
    pub table: ArcSwap<RouteTable>,
    pub metrics: Arc<Metrics>,
    /// `Some` when the kernel splice is loaded and attached.
    pub kernel: Option<KernelSplice>,
    /// Open connections still owned by a task (userspace relays and connections being routed).
    tasks: AtomicUsize,
    tasks_done: Notify,
}

impl Ingress {
    pub fn new(options: Options, table: RouteTable, kernel: Option<KernelSplice>) -> Arc<Self> {
        Arc::new(Self {
            options,
            table: ArcSwap::from_pointee(table),
            metrics: Arc::new(Metrics::default()),
            kernel,
            tasks: AtomicUsize::new(0),
            tasks_done: Notify::new(),
        })
    }

    /// Open connections: routing, relayed in userspace, or spliced in the kernel.
    pub fn open_connections(&self) -> usize {
        self.tasks.load(Ordering::Acquire) + self.kernel.as_ref().map_or(0, KernelSplice::active)
    }

    /// Waits until no connection is open or `deadline` passes; returns how many are left.
    pub async fn wait_idle(&self, deadline: Instant) -> usize {
        loop {
            let left = self.open_connections();
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(wait, self.tasks_done.notified()).await;
        }
    }
}

/// Binds `n` listeners on `addr` with `SO_REUSEPORT`, so the kernel spreads accepts over cores.
pub fn bind(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        // Port 0: the first bind picks it, the others must share it.
        addr = socket.local_addr()?;
        out.push(socket.listen(4096)?);
    }
    Ok(out)
}

/// Accepts on every listener until `shutdown` resolves; then stops accepting (already
/// accepted connections keep running; see `Ingress::wait_idle`).
pub async fn serve(ingress: Arc<Ingress>, listeners: Vec<TcpListener>, shutdown: impl Future<Output = ()>) {
    let mut accept_tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "listening");
        }
        accept_tasks.spawn(accept_loop(Arc::clone(&ingress), listener));
    }
    shutdown.await;
    accept_tasks.shutdown().await;
    info!("listener closed; no new connections are accepted");
}

async fn accept_loop(ingress: Arc<Ingress>, listener: TcpListener) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let accepted_at = Instant::now();
                ingress.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                ingress.tasks.fetch_add(1, Ordering::AcqRel);
                let ing = Arc::clone(&ingress);
                tokio::spawn(async move {
                    handle(&ing, stream, peer, accepted_at).await;
                    ing.tasks.fetch_sub(1, Ordering::AcqRel);
                    ing.tasks_done.notify_waiters();
                });
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the backlog holds clients.
                warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// At most this many rejected connections are logged per second (a flood cannot fill a disk);
/// the rest are counted and the number suppressed is logged with the next line.
const REJECT_LOG_PER_SEC: u64 = 20;

/// Counts and (rate-limited) logs a connection closed before reaching a backend.
fn reject(ingress: &Ingress, client: &TcpStream, peer: SocketAddr, sni: Option<&str>, reason: &'static str) {
    // Consume what the client already sent (we only peeked it): closing a socket with unread
    // data makes the kernel answer with RST, and a rejected client should see a plain FIN.
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: `scratch` is writable for its length.
        let n = unsafe { libc::recv(client.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
    }
    use std::sync::atomic::AtomicU64;
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    ingress.metrics.reject(reason);
    let now = crate::sys::monotonic_ns() / 1_000_000_000;
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        LOGGED.store(0, Ordering::Relaxed);
    }
    if LOGGED.fetch_add(1, Ordering::Relaxed) < REJECT_LOG_PER_SEC {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        info!(target: "access", client = %peer, sni, reason, suppressed, "connection rejected");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(%peer))]
async fn handle(ingress: &Arc<Ingress>, client: TcpStream, peer: SocketAddr, accepted_at: Instant) {
    let table = ingress.table.load_full();
    if table.is_empty() {
        // Kuma's answer when no mesh has any service (reference §6.3).
        let body = serde_json::json!({"proxy": ingress.options.proxy_id, "zone": ingress.options.zone}).to_string();
        let mut client = client;
        let _ = client.write_all(body.as_bytes()).await;
        let _ = client.shutdown().await;
        reject(ingress, &client, peer, None, "empty_table");
        return;
    }
    let opts = &ingress.options;
    let m = &ingress.metrics;
    let parsed = match tokio::time::timeout(opts.client_hello_timeout, peek_client_hello(&client, opts.max_client_hello)).await {
        Err(_) => return reject(ingress, &client, peer, None, "client_hello_timeout"),
        Ok(Err(_)) => return reject(ingress, &client, peer, None, "client_closed"),
        Ok(Ok(p)) => p,
    };
    let sni = match &parsed {
        Parsed::Complete { sni: Some(sni), .. } => {
            m.tls_found.fetch_add(1, Ordering::Relaxed);
            m.sni_found.fetch_add(1, Ordering::Relaxed);
            sni.as_str().to_owned()
        }
        Parsed::Complete { sni: None, .. } => {
            m.tls_found.fetch_add(1, Ordering::Relaxed);
            m.sni_not_found.fetch_add(1, Ordering::Relaxed);
            return reject(ingress, &client, peer, None, "no_sni");
        }
        Parsed::Invalid(client_hello::Invalid::NotTls) if opts.plaintext_route.is_some() => {
            m.tls_not_found.fetch_add(1, Ordering::Relaxed);
            opts.plaintext_route.clone().unwrap_or_default()
        }
        Parsed::Invalid(invalid) => {
            if matches!(invalid, client_hello::Invalid::TooLarge) {
                m.client_hello_too_large.fetch_add(1, Ordering::Relaxed);
            } else {
                m.tls_not_found.fetch_add(1, Ordering::Relaxed);
            }
            return reject(ingress, &client, peer, None, invalid.as_str());
        }
        Parsed::Incomplete { .. } => return reject(ingress, &client, peer, None, "client_closed"),
    };
    let route = match table.lookup(&sni) {
        Ok(route) => route,
        Err(r) => return reject(ingress, &client, peer, Some(&sni), r.as_str()),
    };
    // Per-cluster cap (Envoy's circuit breaker); released when the connection closes.
    let cluster = Arc::clone(&route.cluster);
    if cluster.active.fetch_add(1, Ordering::AcqRel) >= opts.max_cluster_connections {
        cluster.active.fetch_sub(1, Ordering::AcqRel);
        return reject(ingress, &client, peer, Some(&sni), "cluster_overflow");
    }
    let release = scopeguard(move || {
        cluster.active.fetch_sub(1, Ordering::AcqRel);
    });
    let Some((backend, endpoint)) = connect(ingress, &route).await else {
        return reject(ingress, &client, peer, Some(&sni), "connect_failed");
    };
    debug!(sni, %endpoint, "routed");

    let ctx = ConnInfo { peer, sni, route: Arc::clone(&route), endpoint, accepted_at };
    if let Some(kernel) = &ingress.kernel {
        match hand_to_kernel(ingress, kernel, client, backend, ctx, release) {
            Ok(()) => return,
            Err((client, backend, ctx, release, error)) => {
                m.kernel_fallbacks.fetch_add(1, Ordering::Relaxed);
                info!(peer = %ctx.peer, sni = ctx.sni, %error, "kernel splice refused this connection; relaying in userspace");
                relay(ingress, client, backend, ctx, release).await;
            }
        }
    } else {
        relay(ingress, client, backend, ctx, release).await;
    }
}

/// What the access log and metrics need about one routed connection.
struct ConnInfo {
    peer: SocketAddr,
    sni: String,
    route: Arc<Route>,
    endpoint: SocketAddr,
    accepted_at: Instant,
}

fn log_close(ingress: &Ingress, ctx: &ConnInfo, path: Path, closed: Closed) {
    let m = &ingress.metrics;
    m.client_to_backend_bytes.fetch_add(closed.client_to_backend, Ordering::Relaxed);
    m.backend_to_client_bytes.fetch_add(closed.backend_to_client, Ordering::Relaxed);
    m.closed(closed.reason.as_str());
    info!(
        target: "access",
        client = %ctx.peer,
        sni = ctx.sni,
        cluster = ctx.route.cluster.name,
        endpoint = %ctx.endpoint,
        mode = path.as_str(),
        bytes_client_to_backend = closed.client_to_backend,
        bytes_backend_to_client = closed.backend_to_client,
        duration_ms = u64::try_from(ctx.accepted_at.elapsed().as_millis()).unwrap_or(u64::MAX),
        reason = closed.reason.as_str(),
        "connection closed"
    );
}

type Fallback = (TcpStream, TcpStream, ConnInfo, ScopeGuard, crate::splice::kernel::HandoffError);

fn hand_to_kernel(
    ingress: &Arc<Ingress>,
    kernel: &KernelSplice,
    client: TcpStream,
    backend: TcpStream,
    ctx: ConnInfo,
    release: ScopeGuard,
) -> Result<(), Fallback> {
    let to_owned = |s: TcpStream| -> io::Result<OwnedFd> { Ok(OwnedFd::from(s.into_std()?)) };
    let (client_fd, backend_fd) = match (to_owned(client), to_owned(backend)) {
        (Ok(c), Ok(b)) => (c, b),
        // into_std only fails if deregistration fails, which leaves nothing to serve.
        _ => return Ok(()),
    };
    let ing = Arc::clone(ingress);
    // The closure owns what it needs; `release` drops (and frees the cluster slot) with it.
    let shared_ctx = Arc::new(std::sync::Mutex::new(Some((ctx, release))));
    let cb_ctx = Arc::clone(&shared_ctx);
    let on_close = Box::new(move |closed: Closed| {
        if let Some((ctx, release)) = cb_ctx.lock().ok().and_then(|mut g| g.take()) {
            log_close(&ing, &ctx, Path::Kernel, closed);
            drop(release);
        }
    });
    match kernel.handoff(client_fd, backend_fd, on_close) {
        Ok(()) => {
            ingress.metrics.spliced_kernel.fetch_add(1, Ordering::Relaxed);
            if let Some(Some((ctx, _))) = shared_ctx.lock().ok().as_deref() {
                ingress.metrics.handoff.observe(ctx.accepted_at.elapsed());
            }
            Ok(())
        }
        Err(Rejected { client, backend, error }) => {
            let Some((ctx, release)) = shared_ctx.lock().ok().and_then(|mut g| g.take()) else { return Ok(()) };
            let back = |fd: OwnedFd| TcpStream::from_std(std::net::TcpStream::from(fd));
            match (back(client), back(backend)) {
                (Ok(c), Ok(b)) => Err((c, b, ctx, release, error)),
                _ => Ok(()),
            }
        }
    }
}

async fn relay(ingress: &Arc<Ingress>, client: TcpStream, backend: TcpStream, ctx: ConnInfo, release: ScopeGuard) {
    ingress.metrics.spliced_userspace.fetch_add(1, Ordering::Relaxed);
    ingress.metrics.handoff.observe(ctx.accepted_at.elapsed());
    let progress = Arc::new(Progress::default());
    let closed = userspace::relay(client, backend, &ingress.options.limits, progress).await;
    log_close(ingress, &ctx, Path::Userspace, closed);
    drop(release);
}

/// Tries the route's endpoints in round-robin order, each with the connect timeout.
async fn connect(ingress: &Ingress, route: &Route) -> Option<(TcpStream, SocketAddr)> {
    let opts = &ingress.options;
    for endpoint in route.candidates(opts.connect_attempts.max(1)) {
        let attempt = async {
            let socket = if endpoint.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.connect(endpoint).await
        };
        match tokio::time::timeout(opts.connect_timeout, attempt).await {
            Ok(Ok(stream)) => return Some((stream, endpoint)),
            Ok(Err(e)) => debug!(%endpoint, error = %e, "connect failed"),
            Err(_) => debug!(%endpoint, "connect timed out"),
        }
        ingress.metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
    }
    None
}

/// Peeks (`MSG_PEEK`, never consuming) until the ClientHello is complete, invalid, or the
/// client closes. Returns `Err` when the client closed or failed first.
async fn peek_client_hello(stream: &TcpStream, max: usize) -> io::Result<Parsed> {
    // One byte more than the cap, so "too large" is distinguishable from "exactly at the cap".
    let mut buf = vec![0u8; max + 1];
    let mut have = 0usize;
    let mut closed = false;
    loop {
        let n = peek_now(stream, &mut buf)?;
        if n > have {
            have = n;
            match client_hello::parse(&buf[..have], max) {
                Parsed::Incomplete { .. } if have <= max => {}
                Parsed::Incomplete { .. } => return Ok(Parsed::Invalid(client_hello::Invalid::TooLarge)),
                done => return Ok(done),
            }
            continue;
        }
        if closed {
            if have == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            return Ok(Parsed::Incomplete { need_at_least: None });
        }
        // Nothing new. Clear tokio's readiness (a peek leaves the data, so the socket stays
        // "readable"), re-check once to close the race with data that arrived meanwhile, then
        // wait for the next edge.
        let _ = stream.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        if peek_now(stream, &mut buf)? > have {
            continue;
        }
        let ready = stream.ready(Interest::READABLE).await?;
        closed = ready.is_read_closed();
    }
}

/// One non-blocking `recv(MSG_PEEK)`; 0 when nothing is queued.
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe {
        libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) }
}

/// Runs a closure when dropped (frees the cluster slot on every exit path).
pub struct ScopeGuard(Option<Box<dyn FnOnce() + Send>>);

fn scopeguard(f: impl FnOnce() + Send + 'static) -> ScopeGuard {
    ScopeGuard(Some(Box::new(f)))
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Closes every spliced connection now (end of drain).
pub fn abort_spliced(ingress: &Ingress) {
    if let Some(k) = &ingress.kernel {
        k.abort_all(CloseReason::Shutdown);
    }
}
