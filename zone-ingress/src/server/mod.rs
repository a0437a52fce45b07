//! The connection path's shared state and its stages ([docs/design.md#data-path](../../../docs/design.md#data-path)):
//!
//! ```text
//!  accept ──► peek SNI ──► route ──► connect ──► handoff ──────────────► close
//!  listener   conn          conn      conn        splice::sockmap          flows (close report)
//!                                                └► splice::userspace ──► conn (relay ends)
//! ```
//!
//! - `listener`: binding (`SO_REUSEPORT`) and the accept loops;
//! - `conn`: one connection's task, from the peek to the handoff (or the relay's end);
//! - `stats`: the metrics scrape, read from this state.
//!
//! [`Ingress`] is the shared state: the current [`Snapshot`] (route table and per-cluster
//! counters, swapped whole on reload so new connections follow the new table at once while
//! established flows keep what they had), the listener (rebound or closed without touching open
//! flows), the registry of open flows (which owns every routed connection until its close is
//! logged), the counters, and the lifecycle phase `/ready` reports.

mod conn;
mod listener;
mod stats;

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
    task::JoinSet,
};
use tracing::{info, warn};

pub use self::listener::{bind, check_port_free};
use crate::{
    client_hello,
    config::{Inventory, ZoneIngress},
    flows::{Flow, Flows, KernelFlows},
    metrics::{ClusterStats, Metrics},
    routing::{AvailableService, RouteTable},
    splice::{
        CloseReason, CloseReport, Closed, Limits, Path, ReportReceiver, SpliceMode,
        packet::{self, Dormant, PacketSplice},
        sockmap::KernelSplice,
    },
};

/// Per-connection knobs (Kuma's defaults in `Default`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Options {
    /// Give up on a ClientHello that is not complete after this long (Envoy: 15 s).
    pub client_hello_timeout: Duration,
    /// Per-attempt backend connect timeout (Kuma: 5 s).
    pub connect_timeout: Duration,
    /// Endpoints tried per connection when connects fail (Kuma's Envoy tries one). Retrying is
    /// safe: nothing has been sent to the backend yet.
    pub connect_attempts: usize,
    /// Concurrent connections per cluster (Envoy's default circuit breaker: 1024).
    pub max_cluster_connections: usize,
    /// Largest ClientHello accepted, in bytes (records included).
    pub max_client_hello: usize,
    /// Connections that may wait for their ClientHello at once; more are closed at once
    /// (`handshake_overflow`).
    pub max_pending_handshakes: usize,
    /// Non-Kuma extension, off by default: connections whose first bytes are not a TLS
    /// ClientHello are routed as if they carried this SNI.
    pub plaintext_route: Option<String>,
    /// Proxy id and zone for the empty-table answer (docs/design.md#routing); the loaded ZoneIngress's
    /// name takes precedence over `proxy_id`.
    pub proxy_id: String,
    pub zone: String,
    /// The splice mode asked for on the command line (`/ready` and `/config_dump`).
    pub splice: SpliceMode,
    /// Limits of spliced connections.
    pub limits: Limits,
    /// `TCP_MAXSEG` of the listeners (the packet splice: see `PacketSplice::listener_mss`).
    pub listener_mss: Option<u16>,
}

/// Defaults of [`Options`] (Kuma's and Envoy's), also the command line's.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// See [`DEFAULT_CLIENT_HELLO_TIMEOUT`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`DEFAULT_CLIENT_HELLO_TIMEOUT`].
pub const DEFAULT_CONNECT_ATTEMPTS: u16 = 3;
/// See [`DEFAULT_CLIENT_HELLO_TIMEOUT`].
pub const DEFAULT_MAX_CLUSTER_CONNECTIONS: usize = 1024;
/// Not Envoy's: it bounds the memory of connections that have not sent a ClientHello yet
/// (each holds a task, a socket and up to a ClientHello's worth of peek buffer).
pub const DEFAULT_MAX_PENDING_HANDSHAKES: u32 = 16_384;

impl Default for Options {
    fn default() -> Self {
        Self {
            client_hello_timeout: DEFAULT_CLIENT_HELLO_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            connect_attempts: usize::from(DEFAULT_CONNECT_ATTEMPTS),
            max_cluster_connections: DEFAULT_MAX_CLUSTER_CONNECTIONS,
            max_client_hello: client_hello::DEFAULT_MAX_CLIENT_HELLO,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES as usize,
            plaintext_route: None,
            listener_mss: None,
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
    /// The snapshot of a table from the control plane (no inventory).
    #[must_use]
    pub fn from_table(metrics: &Metrics, zone_ingress: Option<ZoneIngress>, table: RouteTable) -> Self {
        Self {
            version: 1,
            clusters: metrics.clusters_for(&table),
            available_services: Vec::new(),
            dataplanes: 0,
            inventory: Arc::new(Inventory::default()),
            zone_ingress,
            loaded_at: SystemTime::now(),
            table: Arc::new(table),
        }
    }

    /// The snapshot of `inventory` (and the ZoneIngress resource it was loaded with) for zone
    /// `zone`, with counters from `metrics`. Its version is set when it is installed.
    #[must_use]
    pub fn build(metrics: &Metrics, zone_ingress: Option<ZoneIngress>, inventory: Inventory, zone: &str) -> Self {
        let table = RouteTable::build(&inventory, zone);
        let available_services = table.available_services(&inventory);
        Self {
            available_services,
            dataplanes: inventory.dataplanes.len(),
            inventory: Arc::new(inventory),
            ..Self::from_table(metrics, zone_ingress, table)
        }
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
    pub flows: Arc<Flows>,
    /// `Some` when the kernel splice is loaded and attached.
    pub kernel: Option<KernelSplice>,
    /// `Some` when the packet splice's programs are loaded and attached.
    pub packet: Option<PacketSplice>,
    /// Open connections still owned by a task (userspace relays and connections being routed).
    tasks: AtomicUsize,
    /// Connections handed to the kernel whose close report has not been processed yet.
    spliced_open: AtomicUsize,
    tasks_done: Notify,
    phase: AtomicU8,
    listener: Mutex<ListenerState>,
    /// Set to `true` to close every userspace relay (end of drain).
    abort_relays: watch::Sender<bool>,
    started: Instant,
    /// Outcome of the last configuration load (`/config_dump`, metrics).
    pub config_status: Mutex<ConfigStatus>,
    next_version: AtomicU64,
}

impl fmt::Debug for Ingress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ingress").field("options", &self.options).finish_non_exhaustive()
    }
}

impl Ingress {
    /// An ingress serving `snapshot`, whose cluster counters come from `metrics`. With `kernel`,
    /// run [`close_reports`] on the receiver of the channel the splice reports on.
    pub fn with_snapshot(
        options: Options,
        metrics: Arc<Metrics>,
        snapshot: Snapshot,
        kernel: Option<KernelSplice>,
        packet: Option<PacketSplice>,
    ) -> Arc<Self> {
        let flows = Arc::new(Flows::default());
        if let Some(p) = &packet {
            p.set_owner(Arc::clone(&flows) as Arc<dyn packet::Owner>);
        }
        Arc::new(Self {
            options,
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            flows,
            kernel,
            packet,
            tasks: AtomicUsize::new(0),
            spliced_open: AtomicUsize::new(0),
            tasks_done: Notify::new(),
            phase: AtomicU8::new(PHASE_LIVE),
            listener: Mutex::default(),
            abort_relays: watch::Sender::new(false),
            started: Instant::now(),
            config_status: Mutex::new(ConfigStatus::loaded()),
            next_version: AtomicU64::new(2),
        })
    }

    /// The configuration new connections use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Installs a new configuration atomically: connections accepted from now on route with
    /// it; established flows are not touched. Returns its version.
    pub fn install(&self, mut snapshot: Snapshot) -> u64 {
        if let Some(p) = &self.packet {
            p.follow_endpoints(snapshot.table.entries().flat_map(|r| r.endpoints.iter().map(SocketAddr::ip)));
        }
        snapshot.version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let version = snapshot.version;
        self.snapshot.store(Arc::new(snapshot));
        version
    }

    /// Records the outcome of a configuration update (a file reload or a control-plane
    /// response) for the metrics and `/config_dump`: `Ok(warnings)` applied, `Err(errors)`
    /// rejected (the running configuration, its last success and warnings stay).
    pub fn record_update(&self, trigger: &str, outcome: Result<Vec<String>, Vec<String>>) {
        let m = &self.metrics;
        let applied = outcome.is_ok();
        if applied { &m.reload_success } else { &m.reload_failure }.fetch_add(1, Ordering::Relaxed);
        m.count_update(applied);
        let mut status = self.config_status.lock().unwrap_or_else(PoisonError::into_inner);
        let now = unix(SystemTime::now());
        status.ok = applied;
        status.last_attempt_unix = now;
        trigger.clone_into(&mut status.trigger);
        match outcome {
            Ok(warnings) => {
                status.last_success_unix = now;
                status.errors = Vec::new();
                status.warnings = warnings;
            }
            Err(errors) => status.errors = errors,
        }
    }

    /// Time since the ingress was created.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Open connections: routing, relayed in userspace, or spliced in the kernel.
    pub fn open_connections(&self) -> usize {
        self.tasks.load(Ordering::Acquire) + self.spliced_open.load(Ordering::Acquire)
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
            tasks.spawn(listener::accept_loop(Arc::clone(self), listener));
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
        if self.options.splice == SpliceMode::Packet && self.packet.is_none() {
            return Readiness::NotReady("the packet splice is not attached");
        }
        if !self.listener_bound() {
            return Readiness::NotReady(if self.listener_drained() {
                "listener drained"
            } else {
                "listener not bound"
            });
        }
        Readiness::Ready
    }

    /// Closes every open flow now (end of the drain time): kernel-spliced ones and userspace
    /// relays, each logged with reason `shutdown`.
    pub fn abort_flows(&self) {
        if let Some(k) = &self.kernel {
            k.abort_all(CloseReason::Shutdown);
        }
        if let Some(p) = &self.packet {
            p.abort_all(CloseReason::Shutdown);
        }
        self.abort_relays.send_replace(true);
    }

    /// Ends flow `id`: removes it from the registry (which releases its cluster slot), counts
    /// it and writes its access log line. Called once per routed connection, by the
    /// connection's task or, for a kernel-spliced one, by [`close_reports`].
    fn close_flow(&self, id: u64, closed: Closed) {
        let Some(flow) = self.flows.close(id, &closed, &self.metrics) else { return };
        self.metrics.destroyed.fetch_add(1, Ordering::Relaxed);
        conn::log_close(id, &flow, &closed);
    }

    /// Takes over the packet-level flows an earlier daemon left pinned (once a configuration is
    /// installed): each is registered under the route its server name has now, so
    /// `/connections`, the metrics, the idle timeout, the drain and the access log treat it as
    /// any other. Returns how many were adopted.
    pub fn adopt_packet_flows(&self) -> usize {
        let Some(packet) = &self.packet else { return 0 };
        let snap = self.snapshot();
        packet.adopt(|a, token| {
            // Every adopted flow ends with one close report, registered or not.
            self.spliced_open.fetch_add(1, Ordering::AcqRel);
            let route = match snap.table.lookup(&a.sni) {
                Ok(route) => route,
                Err(reason) => {
                    warn!(sni = a.sni, client = %a.client, ?reason, "adopted flow: its server name does not route now; carried unlisted");
                    return 0;
                }
            };
            let Some(permit) = snap.clusters.get(&route.cluster.name).and_then(|c| c.try_acquire(usize::MAX)) else {
                return 0;
            };
            self.flows.open(Flow::packet((a.client, a.endpoint), &a.sni, a.started, token, route, permit))
        })
    }
}

impl KernelFlows for Ingress {
    fn counters(&self, path: Path, cookies: [u64; 2]) -> Option<(u64, u64, u64)> {
        if path == Path::Packet {
            return self.packet.as_ref()?.flow_counters(cookies[0]);
        }
        let k = self.kernel.as_ref()?;
        let c = k.socket_counters(cookies[0])?;
        let b = k.socket_counters(cookies[1])?;
        Some((c.bytes, b.bytes, c.last_active_ns.max(b.last_active_ns)))
    }

    fn dormant(&self, f: &mut dyn FnMut(&Dormant)) {
        if let Some(p) = &self.packet {
            p.dormant_flows(f);
        }
    }
}

/// Processes the close reports of the kernel splice until the channel closes: each ends its
/// flow (`Ingress::close_flow`).
pub async fn close_reports(ingress: Arc<Ingress>, mut reports: ReportReceiver) {
    while let Some(CloseReport { flow, closed }) = reports.recv().await {
        ingress.close_flow(flow, closed);
        ingress.spliced_open.fetch_sub(1, Ordering::AcqRel);
        ingress.tasks_done.notify_waiters();
    }
}

/// Outcome of the last configuration load, for `/config_dump` and the metrics.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// The last load was applied (or found nothing to change).
    pub ok: bool,
    /// Unix time of the last load attempt and of the last applied one, seconds.
    pub last_attempt_unix: f64,
    pub last_success_unix: f64,
    /// What triggered the last attempt (`startup`, `file change`, `SIGHUP`).
    pub trigger: String,
    /// Problems of the last failed attempt, as logged (empty after a success).
    pub errors: Vec<String>,
    /// Warnings of the last attempt.
    pub warnings: Vec<String>,
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl ConfigStatus {
    /// The status right after the startup load.
    #[must_use]
    pub fn loaded() -> Self {
        let now = unix(SystemTime::now());
        Self {
            ok: true,
            last_attempt_unix: now,
            last_success_unix: now,
            trigger: "startup".into(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }
}
