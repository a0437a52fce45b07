//! The connection path: accept → peek SNI → route → connect → handoff → close.
//!
//! `serve` takes bound listeners and a shutdown future (tests pass `127.0.0.1:0` listeners and
//! their own trigger). Each accepted connection gets one task that peeks the ClientHello
//! (never consuming it), picks a route and an endpoint, connects, and hands both sockets to the
//! kernel splice, or relays them in userspace. The task then ends (kernel) or lives as long as
//! the relay (userspace).
//!
//! [`Ingress`] is the shared state: the current [`Snapshot`] (route table and per-cluster
//! counters, swapped whole on reload so new connections follow the new table at once while
//! established flows keep what they had), the listener (rebound or closed without touching open
//! flows), the registry of open flows, the counters, and the lifecycle phase `/ready` reports.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Notify, watch},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::{
    client_hello::{self, Parsed},
    config::{Inventory, ZoneIngress},
    flows::{Flow, Flows},
    metrics::{ClusterStats, Metrics, UpstreamPermit},
    routing::{AvailableService, Cluster, Reject, Route, RouteTable},
    sni,
    splice::{
        CloseReason, Closed, Limits, Path, SpliceMode,
        kernel::{KernelSplice, Rejected},
        userspace::{self, Progress},
    },
    sys,
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
    /// Proxy id and zone for the empty-table answer (reference §6.3); the loaded ZoneIngress's
    /// name takes precedence over `proxy_id`.
    pub proxy_id: String,
    pub zone: String,
    /// The splice mode asked for on the command line (`/ready` and `/config_dump`).
    pub splice: SpliceMode,
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
            splice: SpliceMode::Auto,
            limits: Limits::default(),
        }
    }
}

/// One applied configuration: the route table and what was loaded with it. Immutable; a
/// reload installs a new one.
#[derive(Debug)]
pub struct Snapshot {
    /// 1 for the configuration loaded at startup, +1 per applied reload.
    pub version: u64,
    pub table: Arc<RouteTable>,
    /// The counters of every cluster of `table`, by cluster name.
    pub clusters: HashMap<String, Arc<ClusterStats>>,
    /// The ZoneIngress resource (absent when the ingress was built from a table alone).
    pub zone_ingress: Option<ZoneIngress>,
    /// The inventory the table was built from.
    pub inventory: Arc<Inventory>,
    /// What the control plane would publish as `availableServices` for this inventory.
    pub available_services: Vec<AvailableService>,
    /// Dataplanes in the inventory.
    pub dataplanes: usize,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// A snapshot of `table` with counters from `metrics`.
    #[must_use]
    pub fn new(metrics: &Metrics, table: RouteTable) -> Self {
        Self {
            version: 1,
            clusters: metrics.clusters_for(&table),
            table: Arc::new(table),
            zone_ingress: None,
            inventory: Arc::new(Inventory::default()),
            available_services: Vec::new(),
            dataplanes: 0,
            loaded_at: SystemTime::now(),
        }
    }

    /// The counters of `cluster` (a cluster of this snapshot's table).
    fn cluster_stats(&self, cluster: &Cluster) -> Option<Arc<ClusterStats>> {
        self.clusters.get(&cluster.name).cloned()
    }
}

/// What `/ready` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// `READY` (200).
    Ready,
    /// `NOT_READY` (503), with why.
    NotReady(&'static str),
    /// `TERMINATING` (503): shutting down, draining established flows.
    Terminating,
}

const PHASE_LIVE: u8 = 0;
const PHASE_TERMINATING: u8 = 1;

/// The accept loops of the bound listener.
#[derive(Default)]
struct ListenerState {
    /// The address the listener is (or should be) bound to.
    addr: Option<SocketAddr>,
    /// The accept tasks; `None` when not listening.
    tasks: Option<JoinSet<()>>,
    /// Listening was stopped on purpose (SIGUSR2, `/drain_listeners`, shutdown): reloads do
    /// not rebind.
    drained: bool,
}

/// Shared state of a running ingress.
pub struct Ingress {
    pub options: Options,
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    /// The open flows (`/connections`).
    pub flows: Flows,
    /// `Some` when the kernel splice is loaded and attached.
    pub kernel: Option<KernelSplice>,
    /// Open connections still owned by a task (userspace relays and connections being routed).
    tasks: AtomicUsize,
    tasks_done: Notify,
    phase: AtomicU8,
    listener: Mutex<ListenerState>,
    /// Set to `true` to close every userspace relay (end of drain).
    abort_relays: watch::Sender<bool>,
    started: Instant,
    /// Outcome of the last configuration load (`/config_dump`, metrics).
    pub config_status: Mutex<crate::reload::ConfigStatus>,
    next_version: AtomicU64,
}

impl fmt::Debug for Ingress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ingress").field("options", &self.options).finish_non_exhaustive()
    }
}

impl Ingress {
    /// An ingress serving `table` (no ZoneIngress resource attached; see
    /// [`Ingress::with_snapshot`]).
    pub fn new(options: Options, table: RouteTable, kernel: Option<KernelSplice>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let snapshot = Snapshot::new(&metrics, table);
        Self::with_snapshot(options, metrics, snapshot, kernel)
    }

    /// An ingress serving `snapshot`, whose cluster counters come from `metrics`.
    pub fn with_snapshot(options: Options, metrics: Arc<Metrics>, snapshot: Snapshot, kernel: Option<KernelSplice>) -> Arc<Self> {
        Arc::new(Self {
            options,
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            flows: Flows::default(),
            kernel,
            tasks: AtomicUsize::new(0),
            tasks_done: Notify::new(),
            phase: AtomicU8::new(PHASE_LIVE),
            listener: Mutex::default(),
            abort_relays: watch::Sender::new(false),
            started: Instant::now(),
            config_status: Mutex::new(crate::reload::ConfigStatus::loaded()),
            next_version: AtomicU64::new(2),
        })
    }

    /// The configuration new connections use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The current route table.
    pub fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.snapshot.load().table)
    }

    /// Installs a new configuration atomically: connections accepted from now on route with
    /// it; established flows are not touched. Returns its version.
    pub fn install(&self, mut snapshot: Snapshot) -> u64 {
        snapshot.version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let version = snapshot.version;
        self.snapshot.store(Arc::new(snapshot));
        version
    }

    /// Time since the ingress was created.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
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

    fn lock_listener(&self) -> MutexGuard<'_, ListenerState> {
        self.listener.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts accepting on `listeners` (all bound to one address), replacing the accept loops
    /// of a previous listener, which stop at once. Open flows are not affected.
    pub fn start_listeners(self: &Arc<Self>, listeners: Vec<TcpListener>) {
        let mut tasks = JoinSet::new();
        let mut addr = None;
        for listener in listeners {
            if let Ok(a) = listener.local_addr() {
                info!(addr = %a, "listening");
                addr = Some(a);
            }
            tasks.spawn(accept_loop(Arc::clone(self), listener));
        }
        let old = {
            let mut state = self.lock_listener();
            state.addr = addr.or(state.addr);
            state.drained = false;
            state.tasks.replace(tasks)
        };
        // Aborting drops the old listening sockets (the abort completes on the runtime).
        if let Some(mut old) = old {
            old.abort_all();
        }
    }

    /// Stops accepting and closes the listening sockets; waits until they are closed. Open
    /// flows keep running. Later reloads do not rebind.
    pub async fn stop_listeners(&self) {
        let tasks = {
            let mut state = self.lock_listener();
            state.drained = true;
            state.tasks.take()
        };
        if let Some(mut tasks) = tasks {
            tasks.shutdown().await;
            info!("listener closed; no new connections are accepted");
        }
    }

    /// The listener's address (configured or bound).
    pub fn listener_addr(&self) -> Option<SocketAddr> {
        self.lock_listener().addr
    }

    /// Records the configured listener address without binding (drained listener).
    pub fn set_listener_addr(&self, addr: SocketAddr) {
        self.lock_listener().addr = Some(addr);
    }

    /// Accept loops are running.
    pub fn listener_bound(&self) -> bool {
        self.lock_listener().tasks.is_some()
    }

    /// Listening was stopped on purpose (drain or shutdown).
    pub fn listener_drained(&self) -> bool {
        self.lock_listener().drained
    }

    /// Enters the terminating phase (`/ready` answers `TERMINATING`).
    pub fn begin_termination(&self) {
        self.phase.store(PHASE_TERMINATING, Ordering::Release);
    }

    /// Shutting down.
    pub fn terminating(&self) -> bool {
        self.phase.load(Ordering::Acquire) == PHASE_TERMINATING
    }

    /// What `/ready` answers now.
    pub fn readiness(&self) -> Readiness {
        if self.terminating() {
            return Readiness::Terminating;
        }
        if self.options.splice == SpliceMode::Kernel && self.kernel.is_none() {
            return Readiness::NotReady("the eBPF splice is not attached");
        }
        if !self.listener_bound() {
            return Readiness::NotReady(if self.listener_drained() { "listener drained" } else { "listener not bound" });
        }
        Readiness::Ready
    }

    /// Closes every open flow now (end of the drain time): kernel-spliced ones and userspace
    /// relays, each logged with reason `shutdown`.
    pub fn abort_flows(&self) {
        if let Some(k) = &self.kernel {
            k.abort_all(CloseReason::Shutdown);
        }
        self.abort_relays.send_replace(true);
    }

    /// Reads a kernel flow's counters by its cookies (see [`crate::flows::KernelReader`]).
    pub fn kernel_counters(&self, cookies: [u64; 2]) -> Option<(u64, u64, u64)> {
        let k = self.kernel.as_ref()?;
        let c = k.socket_counters(cookies[0])?;
        let b = k.socket_counters(cookies[1])?;
        Some((c.bytes, b.bytes, c.last_active_ns.max(b.last_active_ns)))
    }
}

/// Fails if another socket (another zone-ingress, or anything else) is bound to `addr`: binds a
/// probe without `SO_REUSEPORT`, which the kernel refuses next to any listener on that port.
///
/// # Errors
/// `AddrInUse` with an explanation, or the probe's own error.
pub fn check_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    probe.set_reuseaddr(true)?;
    match probe.bind(addr) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{addr} is already in use by another socket (another zone-ingress instance?); not sharing the port"),
        )),
        other => other,
    }
}

/// Binds `n` listeners on `addr` with `SO_REUSEPORT`, so the kernel spreads accepts over cores.
/// `TCP_NODELAY` and keepalive (after `keepalive` idle) are set on the listeners, which every
/// accepted socket inherits: both paths need them on the client socket, which then gets them
/// without five system calls per connection.
pub fn bind(addr: SocketAddr, n: usize, keepalive: Duration) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        sys::set_nodelay(socket.as_fd())?;
        sys::set_dead_peer_detection(socket.as_fd(), keepalive, crate::splice::KEEPALIVE_INTERVAL, crate::splice::KEEPALIVE_PROBES)?;
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
    ingress.start_listeners(listeners);
    shutdown.await;
    ingress.stop_listeners().await;
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

/// Reasons Envoy would count as `no_filter_chain_match`: no chain for this SNI (or none at all).
fn is_no_chain(reason: &str) -> bool {
    matches!(
        reason,
        "no_sni" | "unknown_sni" | "not_canonical" | "invalid_sni" | "not_tls" | "not_client_hello" | "malformed" | "bad_sni" | "client_hello_timeout"
    )
}

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
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let m = &ingress.metrics;
    m.reject(reason);
    m.destroyed.fetch_add(1, Ordering::Relaxed);
    if is_no_chain(reason) {
        m.no_filter_chain_match.fetch_add(1, Ordering::Relaxed);
    }
    if reason == "client_hello_timeout" {
        m.pre_cx_timeout.fetch_add(1, Ordering::Relaxed);
    }
    let now = sys::monotonic_ns() / 1_000_000_000;
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        LOGGED.store(0, Ordering::Relaxed);
    }
    if LOGGED.fetch_add(1, Ordering::Relaxed) < REJECT_LOG_PER_SEC {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        info!(target: "access", client = %peer, sni, reason, suppressed, "connection rejected");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        m.access_log_suppressed.fetch_add(1, Ordering::Relaxed);
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(%peer))]
async fn handle(ingress: &Arc<Ingress>, client: TcpStream, peer: SocketAddr, accepted_at: Instant) {
    let started = SystemTime::now();
    let snap = ingress.snapshot();
    let table = &snap.table;
    if table.is_empty() {
        // Kuma's answer when no mesh has any service (reference §6.3).
        let proxy = snap.zone_ingress.as_ref().map_or(ingress.options.proxy_id.as_str(), |zi| zi.name.as_str());
        let body = serde_json::json!({"proxy": proxy, "zone": ingress.options.zone}).to_string();
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
        Err(r) => {
            if r == Reject::NoEndpoints {
                count_none_healthy(&snap, &sni);
            }
            return reject(ingress, &client, peer, Some(&sni), r.as_str());
        }
    };
    let Some(stats) = snap.cluster_stats(&route.cluster) else {
        // Every route's cluster is in its snapshot; nothing to count against otherwise.
        warn!(sni, cluster = route.cluster.name, "cluster missing from the snapshot");
        return reject(ingress, &client, peer, Some(&sni), "unknown_sni");
    };
    // Hold on to the route, not the whole table: a long flow must not keep old tables alive.
    drop(snap);
    stats.downstream_cx_total.fetch_add(1, Ordering::Relaxed);
    // Per-cluster cap (Envoy's circuit breaker), kept across reloads; released at close.
    let Some(permit) = stats.try_acquire(opts.max_cluster_connections) else {
        stats.upstream_cx_overflow.fetch_add(1, Ordering::Relaxed);
        return reject(ingress, &client, peer, Some(&sni), "cluster_overflow");
    };
    let Some((backend, endpoint)) = connect(ingress, &route, &stats).await else {
        return reject(ingress, &client, peer, Some(&sni), "connect_failed");
    };
    debug!(sni, %endpoint, "routed");

    let progress = Arc::new(Progress::default());
    let cookies = ingress.kernel.as_ref().and_then(|_| {
        let c = sys::socket_cookie(client.as_fd()).ok()?;
        let b = sys::socket_cookie(backend.as_fd()).ok()?;
        Some([c, b])
    });
    let mode = if ingress.kernel.is_some() { Path::Kernel } else { Path::Userspace };
    let flow_id = ingress.flows.open(Flow {
        client: peer,
        sni: sni.clone(),
        route: Arc::clone(&route),
        endpoint,
        mode,
        started,
        started_ns: sys::monotonic_ns().saturating_sub(u64::try_from(accepted_at.elapsed().as_nanos()).unwrap_or(0)),
        progress: Arc::clone(&progress),
        cookies,
        cluster: stats,
    });
    let ctx = ConnInfo { peer, sni, route, endpoint, accepted_at, flow_id, progress };
    if let Some(kernel) = &ingress.kernel {
        match hand_to_kernel(ingress, kernel, client, backend, ctx, permit) {
            Ok(()) => {}
            Err(fallback) => {
                let (client, backend, ctx, permit, error) = *fallback;
                m.kernel_fallbacks.fetch_add(1, Ordering::Relaxed);
                ingress.flows.set_mode(ctx.flow_id, Path::Userspace);
                info!(peer = %ctx.peer, sni = ctx.sni, %error, "kernel splice refused this connection; relaying in userspace");
                relay(ingress, client, backend, ctx, permit).await;
            }
        }
    } else {
        relay(ingress, client, backend, ctx, permit).await;
    }
}

/// A subset SNI that matched no endpoint counts as `upstream_cx_none_healthy` of its service.
fn count_none_healthy(snap: &Snapshot, sni: &str) {
    if let Ok(parsed) = sni::parse_legacy(sni)
        && let Some(mesh) = parsed.mesh()
        && let Some(stats) = snap.clusters.get(&format!("{mesh}:{}", parsed.service))
    {
        stats.upstream_cx_none_healthy.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the access log and metrics need about one routed connection.
struct ConnInfo {
    peer: SocketAddr,
    sni: String,
    route: Arc<Route>,
    endpoint: SocketAddr,
    accepted_at: Instant,
    flow_id: u64,
    progress: Arc<Progress>,
}

/// A route's tags as `k=v,k=v` for the access log.
struct Tags<'a>(&'a std::collections::BTreeMap<String, String>);

impl fmt::Display for Tags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

fn log_close(ingress: &Ingress, ctx: &ConnInfo, path: Path, closed: Closed) {
    ingress.flows.close(ctx.flow_id, &closed, &ingress.metrics);
    ingress.metrics.destroyed.fetch_add(1, Ordering::Relaxed);
    let route = &ctx.route;
    // `mode` directly before the byte counts: the text format reads `mode="kernel" bytes…`.
    info!(
        target: "access",
        flow = ctx.flow_id,
        client = %ctx.peer,
        sni = ctx.sni,
        service = route.service,
        mesh = route.mesh,
        tags = %Tags(&route.tags),
        cluster = route.cluster.name,
        endpoint = %ctx.endpoint,
        mode = path.as_str(),
        bytes_client_to_backend = closed.client_to_backend,
        bytes_backend_to_client = closed.backend_to_client,
        duration_ms = u64::try_from(ctx.accepted_at.elapsed().as_millis()).unwrap_or(u64::MAX),
        reason = closed.reason.as_str(),
        "connection closed"
    );
}

type Fallback = (TcpStream, TcpStream, ConnInfo, UpstreamPermit, crate::splice::kernel::HandoffError);

fn hand_to_kernel(
    ingress: &Arc<Ingress>,
    kernel: &KernelSplice,
    client: TcpStream,
    backend: TcpStream,
    ctx: ConnInfo,
    permit: UpstreamPermit,
) -> Result<(), Box<Fallback>> {
    let to_owned = |s: TcpStream| -> io::Result<OwnedFd> { Ok(OwnedFd::from(s.into_std()?)) };
    let flow_id = ctx.flow_id;
    let (client_fd, backend_fd) = match (to_owned(client), to_owned(backend)) {
        (Ok(c), Ok(b)) => (c, b),
        // into_std only fails if deregistration fails, which leaves nothing to serve.
        _ => {
            let closed = Closed { reason: CloseReason::Internal, client_to_backend: 0, backend_to_client: 0 };
            log_close(ingress, &ctx, Path::Kernel, closed);
            return Ok(());
        }
    };
    let ing = Arc::clone(ingress);
    let accepted_at = ctx.accepted_at;
    // The closure owns what it needs; `permit` drops (and frees the cluster slot) with it.
    let shared_ctx = Arc::new(Mutex::new(Some((ctx, permit))));
    let cb_ctx = Arc::clone(&shared_ctx);
    let on_close = Box::new(move |closed: Closed| {
        if let Some((ctx, permit)) = cb_ctx.lock().ok().and_then(|mut g| g.take()) {
            log_close(&ing, &ctx, Path::Kernel, closed);
            drop(permit);
        }
    });
    match kernel.handoff(client_fd, backend_fd, on_close) {
        Ok(()) => {
            ingress.metrics.spliced(Path::Kernel);
            ingress.metrics.handoff.observe(accepted_at.elapsed());
            debug!(flow = flow_id, "spliced in the kernel");
            Ok(())
        }
        Err(Rejected { client, backend, error }) => {
            let Some((ctx, permit)) = shared_ctx.lock().ok().and_then(|mut g| g.take()) else { return Ok(()) };
            let back = |fd: OwnedFd| TcpStream::from_std(std::net::TcpStream::from(fd));
            match (back(client), back(backend)) {
                (Ok(c), Ok(b)) => Err(Box::new((c, b, ctx, permit, error))),
                _ => {
                    let closed = Closed { reason: CloseReason::Internal, client_to_backend: 0, backend_to_client: 0 };
                    log_close(ingress, &ctx, Path::Kernel, closed);
                    Ok(())
                }
            }
        }
    }
}

async fn relay(ingress: &Arc<Ingress>, client: TcpStream, backend: TcpStream, ctx: ConnInfo, permit: UpstreamPermit) {
    ingress.metrics.spliced(Path::Userspace);
    ingress.metrics.handoff.observe(ctx.accepted_at.elapsed());
    let progress = Arc::clone(&ctx.progress);
    let mut abort = ingress.abort_relays.subscribe();
    let closed = tokio::select! {
        closed = userspace::relay(client, backend, &ingress.options.limits, Arc::clone(&progress)) => closed,
        // End of the drain time: dropping the relay closes both sockets.
        _ = abort.wait_for(|abort| *abort) => Closed {
            reason: CloseReason::Shutdown,
            client_to_backend: progress.client_to_backend.load(Ordering::Relaxed),
            backend_to_client: progress.backend_to_client.load(Ordering::Relaxed),
        },
    };
    log_close(ingress, &ctx, Path::Userspace, closed);
    drop(permit);
}

/// Tries the route's endpoints in round-robin order, each with the connect timeout.
async fn connect(ingress: &Ingress, route: &Route, stats: &ClusterStats) -> Option<(TcpStream, SocketAddr)> {
    let opts = &ingress.options;
    for endpoint in route.candidates(opts.connect_attempts.max(1)) {
        stats.upstream_cx_total.fetch_add(1, Ordering::Relaxed);
        let attempt = async {
            let socket = if endpoint.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.connect(endpoint).await
        };
        match tokio::time::timeout(opts.connect_timeout, attempt).await {
            Ok(Ok(stream)) => return Some((stream, endpoint)),
            Ok(Err(e)) => debug!(%endpoint, error = %e, "connect failed"),
            Err(_) => {
                debug!(%endpoint, "connect timed out");
                stats.upstream_cx_connect_timeout.fetch_add(1, Ordering::Relaxed);
            }
        }
        stats.upstream_cx_connect_fail.fetch_add(1, Ordering::Relaxed);
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
    let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) }
}

/// Closes every spliced connection now (end of drain).
pub fn abort_spliced(ingress: &Ingress) {
    ingress.abort_flows();
}
