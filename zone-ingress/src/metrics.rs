//! Counters of the connection path and their two admin renderings: Prometheus text
//! (`/stats/prometheus`) and Envoy's plain `name: value` listing (`/stats`).
//!
//! The connection path only touches atomics (no lock, no allocation per byte or per packet).
//! Everything is turned into metric families at scrape time: state that lives elsewhere (the
//! route table's membership, the BPF maps' counters and occupancy, the open flows' live byte
//! counts) is read then and passed in as a [`Scrape`]. The `prometheus` crate provides the
//! exposition model and the text encoder (format 0.0.4). Families are built by hand rather
//! than through its `Counter` types so that names stay exactly Envoy's (no `_total` rewriting)
//! and label sets follow the route table across reloads.
//!
//! Names and labels follow Envoy's Prometheus output (reference §8), so Kuma's stock
//! zone-ingress dashboard works unchanged; request-level and TLS-termination series, which a
//! passthrough listener never moves, are exported as zeros as Envoy does. Our own series are
//! prefixed `zone_ingress_`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{self, MetricFamily, MetricType},
};

use crate::{
    client_hello,
    routing::{Cluster, Reject, RouteTable},
    splice::{CloseReason, Path},
};

/// Upper bounds (µs) of the handoff-latency histogram buckets (accept → spliced).
pub const HANDOFF_BUCKETS_US: [u64; 12] = [25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000];

/// `Content-Type` of the Prometheus text exposition.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A fixed-bucket histogram (per-bucket counts; made cumulative on export).
#[derive(Debug, Default)]
pub struct Histogram {
    pub buckets: [AtomicU64; HANDOFF_BUCKETS_US.len()],
    pub count: AtomicU64,
    pub sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = HANDOFF_BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Why a connection was closed before it reached a backend (`reason` label of
/// `zone_ingress_rejected_connections_total` and of the `connection rejected` log line).
/// Every value is exported from the start, so a rate over a reason that never happened is 0,
/// not absent.
pub const REJECT_REASONS: [&str; 15] = [
    // ClientHello (client_hello::Invalid).
    client_hello::Invalid::ALL[0].as_str(),
    client_hello::Invalid::ALL[1].as_str(),
    client_hello::Invalid::ALL[2].as_str(),
    client_hello::Invalid::ALL[3].as_str(),
    client_hello::Invalid::ALL[4].as_str(),
    // Routing (routing::Reject).
    Reject::ALL[0].as_str(),
    Reject::ALL[1].as_str(),
    Reject::ALL[2].as_str(),
    Reject::ALL[3].as_str(),
    // The connection path itself.
    "no_sni",
    "client_hello_timeout",
    "client_closed",
    "empty_table",
    "cluster_overflow",
    "connect_failed",
];

/// Every close reason, in export order.
pub const CLOSE_REASONS: [CloseReason; 9] = [
    CloseReason::ClientFin,
    CloseReason::BackendFin,
    CloseReason::ClientReset,
    CloseReason::BackendReset,
    CloseReason::IdleTimeout,
    CloseReason::MemoryGuard,
    CloseReason::DrainStall,
    CloseReason::Shutdown,
    CloseReason::Internal,
];

const MODES: [Path; 2] = [Path::Kernel, Path::Userspace];

fn mode_index(p: Path) -> usize {
    match p {
        Path::Kernel => 0,
        Path::Userspace => 1,
    }
}

/// Counters of one backend cluster, kept by name across reloads (a reload that keeps a cluster
/// keeps its counters and its open-connection count, so the per-cluster cap holds across
/// tables). Also the `envoy_tcp_*` counters of the routes that lead to it: Kuma's ingress
/// names the tcp_proxy stat prefix after the cluster.
#[derive(Debug)]
pub struct ClusterStats {
    /// Kuma's cluster name (`default:backend`).
    pub name: String,
    /// `envoy_cluster_name` (`default_backend`).
    pub stat_name: String,
    /// `envoy_tcp_prefix`: the name with every character outside `[A-Za-z0-9_-]` replaced by `_`.
    pub tcp_prefix: String,
    /// Connections currently counted against the per-cluster cap (routed, connecting or open).
    active: AtomicUsize,
    /// Connect attempts (Envoy counts an upstream connection when it starts connecting).
    pub upstream_cx_total: AtomicU64,
    pub upstream_cx_connect_fail: AtomicU64,
    pub upstream_cx_connect_timeout: AtomicU64,
    /// Connections refused by the per-cluster cap.
    pub upstream_cx_overflow: AtomicU64,
    /// Connections whose subset matched no healthy endpoint.
    pub upstream_cx_none_healthy: AtomicU64,
    /// Flows that reached this cluster and have closed.
    pub upstream_cx_destroy: AtomicU64,
    /// Connections routed to this cluster (`envoy_tcp_downstream_cx_total`).
    pub downstream_cx_total: AtomicU64,
    /// Flows closed by the idle timeout (`envoy_tcp_idle_timeout`).
    pub idle_timeout: AtomicU64,
    /// Bytes of closed flows, client → backend and backend → client. Written only under the
    /// flow registry's lock, so a scrape sees each flow either live or closed, never both.
    pub closed_client_to_backend: AtomicU64,
    pub closed_backend_to_client: AtomicU64,
    /// Configuration loads that kept (`success`) or failed to replace (`rejected`) this cluster.
    pub update_success: AtomicU64,
    pub update_rejected: AtomicU64,
    /// Endpoints in the current table (0 once the cluster left it).
    pub membership_healthy: AtomicUsize,
    pub membership_total: AtomicUsize,
}

impl ClusterStats {
    fn new(cluster: &Cluster) -> Self {
        Self {
            name: cluster.name.clone(),
            stat_name: cluster.stat_name.clone(),
            tcp_prefix: sanitize(&cluster.name),
            active: AtomicUsize::new(0),
            upstream_cx_total: AtomicU64::new(0),
            upstream_cx_connect_fail: AtomicU64::new(0),
            upstream_cx_connect_timeout: AtomicU64::new(0),
            upstream_cx_overflow: AtomicU64::new(0),
            upstream_cx_none_healthy: AtomicU64::new(0),
            upstream_cx_destroy: AtomicU64::new(0),
            downstream_cx_total: AtomicU64::new(0),
            idle_timeout: AtomicU64::new(0),
            closed_client_to_backend: AtomicU64::new(0),
            closed_backend_to_client: AtomicU64::new(0),
            update_success: AtomicU64::new(0),
            update_rejected: AtomicU64::new(0),
            membership_healthy: AtomicUsize::new(cluster.healthy),
            membership_total: AtomicUsize::new(cluster.total),
        }
    }

    /// Counts one more connection unless `limit` are already open; the permit gives it back
    /// when dropped.
    #[must_use]
    pub fn try_acquire(self: &Arc<Self>, limit: usize) -> Option<UpstreamPermit> {
        self.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok().map(|_| UpstreamPermit(Arc::clone(self)))
    }

    /// Connections currently counted against the cap.
    #[must_use]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// One connection counted against a cluster's cap; released on drop.
#[derive(Debug)]
pub struct UpstreamPermit(Arc<ClusterStats>);

impl Drop for UpstreamPermit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `envoy_tcp_prefix` form of a name: Envoy's stat-prefix sanitising.
#[must_use]
pub fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

/// `envoy_listener_address` form of a socket address: `198.18.0.2_10001`, `[2001_2__2]_10001`
/// (Envoy writes the address and replaces every `:` by `_`).
#[must_use]
pub fn listener_label(addr: std::net::SocketAddr) -> String {
    addr.to_string().replace(':', "_")
}

/// Process-wide counters. One instance per [`crate::server::Ingress`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// Accepted client connections (`envoy_listener_downstream_cx_total`).
    pub accepted: AtomicU64,
    /// Client connections that ended (rejected or closed; `envoy_listener_downstream_cx_destroy`).
    pub destroyed: AtomicU64,
    /// Unknown or missing SNI, not TLS (`envoy_listener_no_filter_chain_match`).
    pub no_filter_chain_match: AtomicU64,
    /// ClientHello timeouts (`envoy_listener_downstream_pre_cx_timeout`).
    pub pre_cx_timeout: AtomicU64,
    /// ClientHello parsing (Envoy's tls_inspector counters).
    pub tls_found: AtomicU64,
    pub tls_not_found: AtomicU64,
    pub sni_found: AtomicU64,
    pub sni_not_found: AtomicU64,
    pub client_hello_too_large: AtomicU64,
    /// Connections handed to each path (index: kernel, userspace).
    spliced: [AtomicU64; 2],
    /// Connections that `auto` meant to splice in the kernel but served in userspace.
    pub kernel_fallbacks: AtomicU64,
    /// Bytes of closed flows per path, client → backend and backend → client. Written only
    /// under the flow registry's lock (see [`ClusterStats::closed_client_to_backend`]).
    closed_bytes: [[AtomicU64; 2]; 2],
    /// Accept → spliced latency.
    pub handoff: Histogram,
    /// Rejected connections by reason (index into [`REJECT_REASONS`]; the last slot counts
    /// reasons not in the list).
    rejects: [AtomicU64; REJECT_REASONS.len() + 1],
    /// Closed flows by reason (index into [`CLOSE_REASONS`]).
    closes: [AtomicU64; CLOSE_REASONS.len()],
    /// `connection rejected` log lines dropped by the rate limit.
    pub access_log_suppressed: AtomicU64,
    /// Configuration loads after startup (file change or SIGHUP) that were applied / rejected.
    pub reload_success: AtomicU64,
    pub reload_failure: AtomicU64,
    /// Listener rebinds after an address change.
    pub listener_rebinds: AtomicU64,
    /// Per-cluster counters by cluster name.
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
}

impl Metrics {
    /// Counts a rejected connection.
    pub fn reject(&self, reason: &str) {
        let i = REJECT_REASONS.iter().position(|r| *r == reason).unwrap_or(REJECT_REASONS.len());
        self.rejects[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection handed to `path`.
    pub fn spliced(&self, path: Path) {
        self.spliced[mode_index(path)].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections handed to `path` so far.
    #[must_use]
    pub fn spliced_count(&self, path: Path) -> u64 {
        self.spliced[mode_index(path)].load(Ordering::Relaxed)
    }

    /// Counts a closed flow. Call with the flow registry's lock held (see
    /// [`crate::flows::Flows::close`]) so that live and closed bytes never overlap in a scrape.
    pub fn flow_closed(&self, path: Path, reason: CloseReason, client_to_backend: u64, backend_to_client: u64) {
        let i = CLOSE_REASONS.iter().position(|r| *r == reason).unwrap_or(CLOSE_REASONS.len() - 1);
        self.closes[i].fetch_add(1, Ordering::Relaxed);
        let m = mode_index(path);
        self.closed_bytes[m][0].fetch_add(client_to_backend, Ordering::Relaxed);
        self.closed_bytes[m][1].fetch_add(backend_to_client, Ordering::Relaxed);
    }

    /// Bytes of closed flows on `path`: (client → backend, backend → client).
    #[must_use]
    pub fn closed_bytes(&self, path: Path) -> (u64, u64) {
        let m = mode_index(path);
        (self.closed_bytes[m][0].load(Ordering::Relaxed), self.closed_bytes[m][1].load(Ordering::Relaxed))
    }

    /// Rejected connections by reason (reasons with no rejection included, as 0).
    #[must_use]
    pub fn rejects(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = REJECT_REASONS.iter().zip(&self.rejects).map(|(r, n)| (*r, n.load(Ordering::Relaxed))).collect();
        out.insert("other", self.rejects[REJECT_REASONS.len()].load(Ordering::Relaxed));
        out
    }

    /// Closed flows by reason.
    #[must_use]
    pub fn closes(&self) -> BTreeMap<&'static str, u64> {
        CLOSE_REASONS.iter().zip(&self.closes).map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed))).collect()
    }

    fn lock_clusters(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<ClusterStats>>> {
        self.clusters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters of every cluster of `table`, created on first sight and kept (with their
    /// counts) while the cluster exists. Updates membership; clusters that left the table drop
    /// to zero members and are forgotten once no flow holds them any more.
    pub fn clusters_for(&self, table: &RouteTable) -> HashMap<String, Arc<ClusterStats>> {
        let mut registry = self.lock_clusters();
        let mut out = HashMap::new();
        for route in table.entries() {
            let cluster = &route.cluster;
            if out.contains_key(&cluster.name) {
                continue;
            }
            let stats = Arc::clone(registry.entry(cluster.name.clone()).or_insert_with(|| Arc::new(ClusterStats::new(cluster))));
            stats.membership_healthy.store(cluster.healthy, Ordering::Relaxed);
            stats.membership_total.store(cluster.total, Ordering::Relaxed);
            out.insert(cluster.name.clone(), stats);
        }
        for (name, stats) in registry.iter() {
            if !out.contains_key(name) {
                stats.membership_healthy.store(0, Ordering::Relaxed);
                stats.membership_total.store(0, Ordering::Relaxed);
            }
        }
        // Only the registry holds it: no table, flow or connection task can still count on it.
        registry.retain(|name, stats| out.contains_key(name) || Arc::strong_count(stats) > 1);
        out
    }

    /// Every cluster with counters (current and draining ones), by name.
    #[must_use]
    pub fn all_clusters(&self) -> Vec<Arc<ClusterStats>> {
        self.lock_clusters().values().cloned().collect()
    }

    /// Counts a configuration load for every cluster it concerns.
    pub fn count_update(&self, success: bool) {
        for c in self.lock_clusters().values() {
            if c.membership_total.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let counter = if success { &c.update_success } else { &c.update_rejected };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// All metric families for one scrape, sorted by name.
    #[must_use]
    pub fn gather(&self, s: &Scrape) -> Vec<MetricFamily> {
        let mut f = Families::default();
        self.listener_families(&mut f, s);
        self.cluster_families(&mut f, s);
        self.server_families(&mut f, s);
        self.own_families(&mut f, s);
        f.0.into_values().collect()
    }

    fn listener_families(&self, f: &mut Families, s: &Scrape) {
        let l = [("envoy_listener_address", s.listener_address.as_str())];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        f.counter("envoy_listener_downstream_cx_total", "Accepted client connections.", &l, get(&self.accepted));
        f.gauge("envoy_listener_downstream_cx_active", "Open client connections.", &l, s.open_connections as f64);
        f.counter("envoy_listener_downstream_cx_destroy", "Client connections that ended.", &l, get(&self.destroyed));
        f.counter("envoy_listener_downstream_cx_overflow", "Refused by a listener connection limit (none is set).", &l, 0.0);
        f.counter("envoy_listener_downstream_cx_overload_reject", "Refused by an overload manager (none runs).", &l, 0.0);
        f.counter("envoy_listener_downstream_global_cx_overflow", "Refused by a global connection limit (none is set).", &l, 0.0);
        f.counter("envoy_listener_downstream_pre_cx_timeout", "ClientHello not complete in time.", &l, get(&self.pre_cx_timeout));
        f.counter("envoy_listener_no_filter_chain_match", "Connections with an unknown or missing SNI, or not TLS.", &l, get(&self.no_filter_chain_match));
        for name in ["envoy_listener_ssl_handshake", "envoy_listener_ssl_fail_verify_error", "envoy_listener_ssl_connection_error"] {
            f.counter(name, "Always 0: TLS passes through, it is never terminated here.", &l, 0.0);
        }
        f.gauge("envoy_listener_manager_total_listeners_active", "1 while the passthrough listener is bound.", &[], f64::from(u8::from(s.listener_bound)));
        let tls = [
            ("envoy_tls_inspector_tls_found", "Connections that started with a TLS ClientHello.", &self.tls_found),
            ("envoy_tls_inspector_tls_not_found", "Connections that did not start with TLS.", &self.tls_not_found),
            ("envoy_tls_inspector_sni_found", "ClientHellos with a server_name.", &self.sni_found),
            ("envoy_tls_inspector_sni_not_found", "ClientHellos without a server_name.", &self.sni_not_found),
            ("envoy_tls_inspector_client_hello_too_large", "ClientHellos larger than the peek limit.", &self.client_hello_too_large),
        ];
        for (name, help, v) in tls {
            f.counter(name, help, &[], get(v));
        }
    }

    fn cluster_families(&self, f: &mut Families, s: &Scrape) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        for c in &s.clusters {
            let st = &c.stats;
            let l = [("envoy_cluster_name", st.stat_name.as_str())];
            let t = [("envoy_tcp_prefix", st.tcp_prefix.as_str())];
            let (c2b, b2c) = (c.client_to_backend, c.backend_to_client);
            f.counter("envoy_tcp_downstream_cx_total", "Connections routed through this prefix.", &t, get(&st.downstream_cx_total));
            f.counter("envoy_tcp_downstream_cx_rx_bytes_total", "Bytes received from clients (BPF counters for spliced flows).", &t, c2b as f64);
            f.counter("envoy_tcp_downstream_cx_tx_bytes_total", "Bytes sent to clients (BPF counters for spliced flows).", &t, b2c as f64);
            f.counter("envoy_tcp_idle_timeout", "Flows closed by the idle timeout.", &t, get(&st.idle_timeout));

            f.counter("envoy_cluster_upstream_cx_total", "Upstream connect attempts.", &l, get(&st.upstream_cx_total));
            f.gauge("envoy_cluster_upstream_cx_active", "Connections counted against the cluster cap.", &l, st.active() as f64);
            f.counter("envoy_cluster_upstream_cx_connect_fail", "Failed connect attempts.", &l, get(&st.upstream_cx_connect_fail));
            f.counter("envoy_cluster_upstream_cx_connect_timeout", "Connect attempts that timed out.", &l, get(&st.upstream_cx_connect_timeout));
            f.counter("envoy_cluster_upstream_cx_overflow", "Connections refused by the per-cluster cap.", &l, get(&st.upstream_cx_overflow));
            f.counter("envoy_cluster_upstream_cx_none_healthy", "Connections whose subset had no healthy endpoint.", &l, get(&st.upstream_cx_none_healthy));
            f.counter("envoy_cluster_upstream_cx_destroy", "Upstream flows that closed.", &l, get(&st.upstream_cx_destroy));
            f.counter("envoy_cluster_upstream_cx_rx_bytes_total", "Bytes received from the cluster's endpoints.", &l, b2c as f64);
            f.counter("envoy_cluster_upstream_cx_tx_bytes_total", "Bytes sent to the cluster's endpoints.", &l, c2b as f64);
            f.gauge(
                "envoy_cluster_circuit_breakers_default_cx_open",
                "1 while the per-cluster connection cap is reached.",
                &l,
                f64::from(u8::from(st.active() >= s.max_cluster_connections)),
            );
            f.gauge("envoy_cluster_membership_healthy", "Healthy endpoints in the current table.", &l, st.membership_healthy.load(Ordering::Relaxed) as f64);
            f.gauge("envoy_cluster_membership_total", "All inbounds of the cluster in the inventory.", &l, st.membership_total.load(Ordering::Relaxed) as f64);
            f.counter("envoy_cluster_update_success", "Configuration loads that kept this cluster.", &l, get(&st.update_success));
            f.counter("envoy_cluster_update_rejected", "Configuration loads rejected while this cluster was served.", &l, get(&st.update_rejected));
            // Request-level series: a TCP passthrough never sees a request.
            for name in [
                "envoy_cluster_upstream_rq_total",
                "envoy_cluster_upstream_rq_retry",
                "envoy_cluster_upstream_rq_retry_success",
                "envoy_cluster_upstream_rq_timeout",
                "envoy_cluster_upstream_rq_pending_overflow",
                "envoy_cluster_upstream_cx_pool_overflow",
                "envoy_cluster_upstream_cx_destroy_remote_with_active_rq",
            ] {
                f.counter(name, "Always 0: request-level, and this is a TCP passthrough.", &l, 0.0);
            }
            for name in [
                "envoy_cluster_circuit_breakers_default_rq_open",
                "envoy_cluster_circuit_breakers_default_rq_pending_open",
                "envoy_cluster_circuit_breakers_default_rq_retry_open",
            ] {
                f.gauge(name, "Always 0: request-level, and this is a TCP passthrough.", &l, 0.0);
            }
        }
    }

    fn server_families(&self, f: &mut Families, s: &Scrape) {
        let attempts = (self.reload_success.load(Ordering::Relaxed) + self.reload_failure.load(Ordering::Relaxed) + 1) as f64;
        let ok = (self.reload_success.load(Ordering::Relaxed) + 1) as f64;
        let rejected = self.reload_failure.load(Ordering::Relaxed) as f64;
        f.gauge("envoy_server_uptime", "Seconds since start.", &[], s.uptime.as_secs() as f64);
        f.gauge("envoy_server_memory_heap_size", "Heap reserved by the allocator, bytes.", &[], s.memory.heap_size as f64);
        f.gauge("envoy_server_memory_allocated", "Heap in use, bytes.", &[], s.memory.allocated as f64);
        f.gauge("envoy_server_live", "1 unless draining.", &[], f64::from(u8::from(!s.draining)));
        f.gauge("envoy_server_state", "0 live, 1 draining.", &[], f64::from(u8::from(s.draining)));
        f.gauge("envoy_server_total_connections", "Open client connections.", &[], s.open_connections as f64);
        f.gauge("envoy_server_concurrency", "Worker threads.", &[], s.concurrency as f64);
        f.counter("envoy_server_watchdog_miss", "Always 0: no watchdog.", &[], 0.0);
        f.counter("envoy_server_watchdog_mega_miss", "Always 0: no watchdog.", &[], 0.0);
        f.gauge(
            "envoy_control_plane_connected_state",
            "1 while the configuration files load; 0 after a rejected reload until a valid one.",
            &[],
            f64::from(u8::from(s.config_ok)),
        );
        f.gauge("envoy_control_plane_pending_requests", "Always 0: configuration comes from files.", &[], 0.0);
        for prefix in ["envoy_listener_manager_lds", "envoy_cluster_manager_cds"] {
            f.counter(&format!("{prefix}_update_attempt"), "Configuration loads (startup included).", &[], attempts);
            f.counter(&format!("{prefix}_update_success"), "Configuration loads applied (startup included).", &[], ok);
            f.counter(&format!("{prefix}_update_rejected"), "Configuration loads rejected.", &[], rejected);
        }
    }

    fn own_families(&self, f: &mut Families, s: &Scrape) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        for (i, mode) in MODES.iter().enumerate() {
            let l = [("mode", mode.as_str())];
            f.counter("zone_ingress_connections_total", "Connections handed to each path after routing.", &l, get(&self.spliced[i]));
            f.gauge("zone_ingress_connections_active", "Open flows on each path.", &l, s.flows_by_mode[i] as f64);
            for (d, direction) in ["client_to_backend", "backend_to_client"].iter().enumerate() {
                let v = if d == 0 { s.bytes_by_mode[i].0 } else { s.bytes_by_mode[i].1 };
                f.counter(
                    "zone_ingress_bytes_total",
                    "Bytes moved per path and direction (BPF counters for kernel-spliced flows).",
                    &[("direction", direction), ("mode", mode.as_str())],
                    v as f64,
                );
            }
        }
        f.counter("zone_ingress_kernel_fallbacks_total", "Connections the kernel refused and userspace relayed.", &[], get(&self.kernel_fallbacks));
        f.histogram("zone_ingress_handoff_duration_seconds", "Accept to spliced (or relayed) latency.", &self.handoff);
        for (i, reason) in REJECT_REASONS.iter().enumerate() {
            f.counter("zone_ingress_rejected_connections_total", "Connections closed before reaching a backend.", &[("reason", reason)], get(&self.rejects[i]));
        }
        f.counter(
            "zone_ingress_rejected_connections_total",
            "Connections closed before reaching a backend.",
            &[("reason", "other")],
            get(&self.rejects[REJECT_REASONS.len()]),
        );
        for (i, reason) in CLOSE_REASONS.iter().enumerate() {
            f.counter("zone_ingress_closed_connections_total", "Flows that closed, by reason.", &[("reason", reason.as_str())], get(&self.closes[i]));
        }
        f.counter("zone_ingress_access_log_suppressed_total", "Rejection log lines dropped by the rate limit.", &[], get(&self.access_log_suppressed));
        for (result, v) in [("success", &self.reload_success), ("failure", &self.reload_failure)] {
            f.counter("zone_ingress_config_reloads_total", "Configuration reloads after startup.", &[("result", result)], get(v));
        }
        f.gauge("zone_ingress_config_last_reload_successful", "0 after a rejected reload until a valid one.", &[], f64::from(u8::from(s.config_ok)));
        f.gauge("zone_ingress_config_last_reload_timestamp_seconds", "Unix time of the last load attempt.", &[], s.last_reload_unix);
        f.gauge("zone_ingress_routes", "Exact SNI entries in the table.", &[], s.routes as f64);
        f.gauge("zone_ingress_subset_routes_cached", "Subset routes built and cached.", &[], s.subset_routes as f64);
        f.counter("zone_ingress_listener_rebinds_total", "Listener rebinds after an address change.", &[], get(&self.listener_rebinds));
        f.gauge("zone_ingress_ready", "1 when /ready answers READY.", &[], f64::from(u8::from(s.ready)));
        if let Some(k) = &s.kernel {
            f.gauge("zone_ingress_kernel_spliced_active", "Connections spliced in the kernel now.", &[], k.active as f64);
            f.gauge(
                "zone_ingress_kernel_in_flight_bytes",
                "Bytes queued toward slow peers, summed over flows (sampled each second).",
                &[],
                k.in_flight_bytes as f64,
            );
            f.counter("zone_ingress_memory_guard_aborts_total", "Flows aborted by the memory guard.", &[], k.memory_guard_aborts as f64);
            f.counter("zone_ingress_peer_missing_aborts_total", "Flows aborted because the verdict found no peer.", &[], k.peer_missing_aborts as f64);
            f.counter("zone_ingress_drain_stalls_total", "Flows aborted because a half-close drain check stalled.", &[], k.drain_stalls as f64);
            f.counter("zone_ingress_splice_holds_total", "Times a kernel-spliced direction was held for backpressure.", &[], k.holds as f64);
            f.counter("zone_ingress_splice_relayed_bytes_total", "Bytes of held directions relayed by the daemon.", &[], k.relayed_bytes as f64);
            for (result, v) in &k.verdicts {
                f.counter("zone_ingress_bpf_verdict_skbs_total", "Skbs seen by the sk_skb verdict, by outcome.", &[("result", result)], *v as f64);
            }
            for m in &k.maps {
                f.gauge("zone_ingress_bpf_map_entries", "Entries in each BPF map.", &[("map", m.name)], m.entries as f64);
                f.gauge("zone_ingress_bpf_map_max_entries", "Capacity of each BPF map.", &[("map", m.name)], f64::from(m.max_entries));
            }
        }
        if let Some(x) = &s.xdp {
            for (reason, v) in &x.packets {
                f.counter("zone_ingress_xdp_packets_total", "Packets for the listener judged by the XDP guard, by outcome.", &[("reason", reason)], *v as f64);
            }
            for (interface, mode) in &x.interfaces {
                f.gauge("zone_ingress_xdp_attached", "1 per interface the XDP guard is attached to.", &[("interface", interface), ("mode", mode)], 1.0);
            }
            for (list, n) in [("allow", x.allow), ("deny", x.deny)] {
                f.gauge("zone_ingress_xdp_prefixes", "Source prefixes in the XDP guard's lists.", &[("list", list)], n as f64);
            }
        }
    }
}

/// Process memory as the allocator sees it (glibc `mallinfo2`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub heap_size: u64,
    pub allocated: u64,
}

impl Memory {
    /// Reads the allocator's counters (walks its arenas: call per scrape, not per connection).
    #[must_use]
    pub fn read() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallinfo2 has no preconditions and returns a plain struct.
            let mi = unsafe { libc::mallinfo2() };
            Self { heap_size: (mi.arena + mi.hblkhd) as u64, allocated: (mi.uordblks + mi.hblkhd) as u64 }
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        {
            Self::default()
        }
    }
}

/// One cluster in a scrape: its counters, and its bytes (closed flows plus the live counters of
/// open ones, read consistently; see [`crate::flows`]).
#[derive(Debug)]
pub struct ClusterSample {
    pub stats: Arc<ClusterStats>,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Occupancy of one BPF map.
#[derive(Debug, Clone)]
pub struct MapSample {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

/// The kernel path's state in a scrape.
#[derive(Debug, Default)]
pub struct KernelSample {
    pub active: usize,
    pub in_flight_bytes: u64,
    pub memory_guard_aborts: u64,
    pub peer_missing_aborts: u64,
    pub drain_stalls: u64,
    pub holds: u64,
    pub relayed_bytes: u64,
    pub verdicts: Vec<(&'static str, u64)>,
    pub maps: Vec<MapSample>,
}

/// State read at scrape time from outside this module.
#[derive(Debug, Default)]
pub struct Scrape {
    /// `envoy_listener_address` of the configured listener.
    pub listener_address: String,
    pub listener_bound: bool,
    /// Client connections open now (routing, relayed or spliced).
    pub open_connections: usize,
    /// Clusters with counters, with the live bytes of their open flows.
    pub clusters: Vec<ClusterSample>,
    /// Open flows, and bytes of closed plus open flows (client → backend, backend → client),
    /// per path (kernel, userspace).
    pub flows_by_mode: [usize; 2],
    pub bytes_by_mode: [(u64, u64); 2],
    pub max_cluster_connections: usize,
    pub uptime: Duration,
    pub memory: Memory,
    pub concurrency: usize,
    pub draining: bool,
    pub ready: bool,
    /// The last configuration load succeeded.
    pub config_ok: bool,
    pub last_reload_unix: f64,
    pub routes: usize,
    pub subset_routes: usize,
    pub kernel: Option<KernelSample>,
    /// The XDP guard, when attached.
    pub xdp: Option<XdpSample>,
}

/// The XDP guard's state in a scrape ([`crate::xdp::Guard`]).
#[derive(Debug, Default)]
pub struct XdpSample {
    /// Packets per reason (`passed` and the drop reasons), summed over CPUs.
    pub packets: Vec<(&'static str, u64)>,
    /// Attached interfaces and their mode (`native` or `generic`).
    pub interfaces: Vec<(String, &'static str)>,
    /// Prefixes in the allow and deny lists.
    pub allow: usize,
    pub deny: usize,
}

/// Metric families being built, by name.
#[derive(Default)]
struct Families(BTreeMap<String, MetricFamily>);

impl Families {
    fn push(&mut self, name: &str, help: &str, ty: MetricType, labels: &[(&str, &str)], metric: impl FnOnce(&mut proto::Metric)) {
        let mf = self.0.entry(name.to_owned()).or_insert_with(|| {
            let mut mf = MetricFamily::default();
            mf.set_name(name.to_owned());
            mf.set_help(help.to_owned());
            mf.set_field_type(ty);
            mf
        });
        let mut m = proto::Metric::from_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut lp = proto::LabelPair::default();
                    lp.set_name((*k).to_owned());
                    lp.set_value((*v).to_owned());
                    lp
                })
                .collect(),
        );
        metric(&mut m);
        mf.mut_metric().push(m);
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::COUNTER, labels, |m| {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        });
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::GAUGE, labels, |m| {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        });
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        // Read the count last: a concurrent observation then shows up in a bucket before the
        // count, never the other way round, so buckets never exceed the +Inf bucket.
        let mut cumulative = 0u64;
        let buckets: Vec<proto::Bucket> = HANDOFF_BUCKETS_US
            .iter()
            .zip(&h.buckets)
            .map(|(le_us, n)| {
                cumulative += n.load(Ordering::Relaxed);
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*le_us as f64 / 1e6);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let count = h.count.load(Ordering::Relaxed).max(cumulative);
        self.push(name, help, MetricType::HISTOGRAM, &[], |m| {
            let mut ph = proto::Histogram::default();
            ph.set_bucket(buckets);
            ph.set_sample_sum(sum);
            ph.set_sample_count(count);
            m.set_histogram(ph);
        });
    }
}

/// Renders families in the Prometheus text format (0.0.4).
///
/// # Errors
/// Only for a family without metrics or name, which [`Metrics::gather`] never produces.
pub fn render_prometheus(families: &[MetricFamily]) -> Result<String, prometheus::Error> {
    let mut buf = Vec::with_capacity(64 << 10);
    TextEncoder::new().encode(families, &mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The Envoy stat name of one Prometheus sample: `envoy_cluster_upstream_cx_total
/// {envoy_cluster_name="default_backend"}` → `cluster.default_backend.upstream_cx_total`.
/// Our own series: `zone_ingress_bytes_total{direction="x",mode="y"}` →
/// `zone_ingress.bytes_total.x.y` (label values in label order).
fn envoy_stat_name(name: &str, labels: &[proto::LabelPair]) -> String {
    let label = |key: &str| labels.iter().find(|l| l.name() == key).map(proto::LabelPair::value);
    // Scoped families: the scope's tag goes back between the family and the stat.
    let scoped = [
        ("envoy_listener_manager_", "listener_manager", None),
        ("envoy_cluster_manager_", "cluster_manager", None),
        ("envoy_listener_", "listener", Some("envoy_listener_address")),
        ("envoy_cluster_", "cluster", Some("envoy_cluster_name")),
        ("envoy_tcp_", "tcp", Some("envoy_tcp_prefix")),
        ("envoy_tls_inspector_", "tls_inspector", None),
        ("envoy_server_", "server", None),
        ("envoy_control_plane_", "control_plane", None),
    ];
    for (prefix, scope, tag) in scoped {
        if let Some(stat) = name.strip_prefix(prefix) {
            return match tag.and_then(label) {
                Some(v) => format!("{scope}.{v}.{stat}"),
                None => format!("{scope}.{stat}"),
            };
        }
    }
    let mut out = name.strip_prefix("zone_ingress_").map_or_else(|| name.to_owned(), |s| format!("zone_ingress.{s}"));
    for l in labels {
        out.push('.');
        out.push_str(l.value());
    }
    out
}

/// Renders families as Envoy's admin `/stats` does: one `name: value` line per counter and
/// gauge, sorted by name; histograms as `P50(v) P90(v) P99(v) count=N sum=S` (quantiles are
/// the upper bound of the bucket that reaches them). Lines whose name does not contain
/// `filter` (when given) are left out.
#[must_use]
pub fn render_envoy_stats(families: &[MetricFamily], filter: Option<&str>) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    for mf in families {
        for m in mf.get_metric() {
            let name = envoy_stat_name(mf.name(), m.get_label());
            if filter.is_some_and(|f| !name.contains(f)) {
                continue;
            }
            let value = match mf.get_field_type() {
                MetricType::COUNTER => number(m.get_counter().get_value()),
                MetricType::GAUGE => number(m.get_gauge().get_value()),
                MetricType::HISTOGRAM => histogram_summary(m.get_histogram()),
                MetricType::SUMMARY | MetricType::UNTYPED => continue,
            };
            lines.push((name, value));
        }
    }
    lines.sort();
    let mut out = String::with_capacity(lines.len() * 48);
    for (name, value) in lines {
        let _ = writeln!(out, "{name}: {value}");
    }
    out
}

/// The same listing as JSON, as Envoy's `/stats?format=json` (`{"stats":[{"name","value"}]}`).
#[must_use]
pub fn render_envoy_stats_json(families: &[MetricFamily], filter: Option<&str>) -> serde_json::Value {
    let stats: Vec<serde_json::Value> = render_envoy_stats(families, filter)
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(name, value)| match value.parse::<u64>() {
            Ok(n) => serde_json::json!({"name": name, "value": n}),
            Err(_) => serde_json::json!({"name": name, "value": value}),
        })
        .collect();
    serde_json::json!({ "stats": stats })
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 { format!("{}", v as i64) } else { format!("{v}") }
}

fn histogram_summary(h: &proto::Histogram) -> String {
    let count = h.get_sample_count();
    if count == 0 {
        return "No recorded values".to_owned();
    }
    let quantile = |q: f64| {
        let rank = (q * count as f64).ceil() as u64;
        h.get_bucket().iter().find(|b| b.cumulative_count() >= rank).map_or_else(|| "+Inf".to_owned(), |b| number(b.upper_bound()))
    };
    format!("P50({}) P90({}) P99({}) count={count} sum={}", quantile(0.5), quantile(0.9), quantile(0.99), h.get_sample_sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape() -> Scrape {
        Scrape { listener_address: "198.18.0.2_10001".into(), listener_bound: true, config_ok: true, ready: true, ..Scrape::default() }
    }

    #[test]
    fn prometheus_text_keeps_envoy_names() {
        let m = Metrics::default();
        m.accepted.fetch_add(3, Ordering::Relaxed);
        m.reject("unknown_sni");
        m.reject("something new");
        m.handoff.observe(Duration::from_micros(40));
        let text = render_prometheus(&m.gather(&scrape())).expect("encode");
        assert!(text.contains("# TYPE envoy_listener_downstream_cx_total counter\n"), "{text}");
        assert!(text.contains("envoy_listener_downstream_cx_total{envoy_listener_address=\"198.18.0.2_10001\"} 3\n"), "{text}");
        assert!(text.contains("envoy_tls_inspector_sni_found 0\n"), "{text}");
        assert!(text.contains("zone_ingress_rejected_connections_total{reason=\"unknown_sni\"} 1\n"), "{text}");
        assert!(text.contains("zone_ingress_rejected_connections_total{reason=\"other\"} 1\n"), "{text}");
        assert!(text.contains("zone_ingress_handoff_duration_seconds_bucket{le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("zone_ingress_handoff_duration_seconds_count 1\n"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn envoy_stats_names() {
        let m = Metrics::default();
        m.accepted.fetch_add(2, Ordering::Relaxed);
        m.spliced(Path::Kernel);
        let text = render_envoy_stats(&m.gather(&scrape()), None);
        assert!(text.contains("listener.198.18.0.2_10001.downstream_cx_total: 2\n"), "{text}");
        assert!(text.contains("tls_inspector.sni_found: 0\n"), "{text}");
        assert!(text.contains("listener_manager.lds_update_success: 1\n"), "{text}");
        assert!(text.contains("zone_ingress.connections_total.kernel: 1\n"), "{text}");
        assert!(text.contains("zone_ingress.handoff_duration_seconds: No recorded values\n"), "{text}");
        let filtered = render_envoy_stats(&m.gather(&scrape()), Some("tls_inspector."));
        assert_eq!(filtered.lines().count(), 5, "{filtered}");
    }

    #[test]
    fn labels_follow_envoy() {
        assert_eq!(listener_label("198.18.0.2:10001".parse().expect("addr")), "198.18.0.2_10001");
        assert_eq!(listener_label("[2001:2::2]:10001".parse().expect("addr")), "[2001_2__2]_10001");
        assert_eq!(sanitize("default:backend"), "default_backend");
        assert_eq!(sanitize("default_backend__east_msvc_8080"), "default_backend__east_msvc_8080");
    }

    #[test]
    fn cluster_cap_and_registry_pruning() {
        let inv = crate::config::parse_inventory(
            std::path::Path::new("inv.yaml"),
            "type: Dataplane\nmesh: default\nname: b1\nnetworking:\n  address: 198.18.1.2\n  inbound:\n  - port: 8080\n    tags:\n      kuma.io/service: backend\n",
        )
        .expect("inventory")
        .value;
        let m = Metrics::default();
        let table = RouteTable::build(&inv, "");
        let clusters = m.clusters_for(&table);
        let stats = Arc::clone(clusters.get("default:backend").expect("cluster"));
        let p1 = stats.try_acquire(2).expect("first");
        let _p2 = stats.try_acquire(2).expect("second");
        assert!(stats.try_acquire(2).is_none(), "cap of 2");
        drop(p1);
        assert!(stats.try_acquire(2).is_some());
        // The cluster leaves the table but a flow still holds it: kept, with zero members.
        drop(clusters);
        let empty = RouteTable::build(&crate::config::Inventory::default(), "");
        let _ = m.clusters_for(&empty);
        assert_eq!(m.all_clusters().len(), 1);
        assert_eq!(stats.membership_healthy.load(Ordering::Relaxed), 0);
        drop(_p2);
        drop(stats);
        let _ = m.clusters_for(&empty);
        assert!(m.all_clusters().is_empty(), "forgotten once nothing holds it");
    }
}
