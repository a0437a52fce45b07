//! Counters of the connection path and their two admin renderings: Prometheus text
//! (`/stats/prometheus`) and Envoy's plain `name: value` listing (`/stats`).
//!
//! - this module: the counters (process-wide [`Metrics`], per-cluster [`ClusterStats`]);
//! - `families`: the metric families of one scrape;
//! - `render`: the Prometheus text and Envoy `/stats` renderings;
//! - `scrape`: what a scrape reads from outside (flows, BPF maps, the XDP guard).
//!
//! The connection path only touches atomics (no lock, no allocation per byte or per packet).
//! Everything is turned into metric families at scrape time: state that lives elsewhere (the
//! route table's membership, the BPF maps' counters and occupancy, the open flows' live byte
//! counts) is read then and passed in as a [`Scrape`]. The `prometheus` crate provides the
//! exposition model and the text encoder (format 0.0.4). Families are built by hand rather
//! than through its `Counter` types so that names stay exactly Envoy's (no `_total` rewriting)
//! and label sets follow the route table across reloads.
//!
//! Names and labels follow Envoy's Prometheus output ([docs/metrics.md](../../../docs/metrics.md)), so Kuma's stock
//! zone-ingress dashboard works unchanged; request-level and TLS-termination series, which a
//! passthrough listener never moves, are exported as zeros as Envoy does. Our own series are
//! prefixed `zone_ingress_`.

mod families;
mod render;
mod scrape;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

pub use self::{
    render::{PROMETHEUS_CONTENT_TYPE, render_envoy_stats, render_envoy_stats_json, render_prometheus},
    scrape::{ClusterSample, KernelSample, MapSample, Memory, PacketSample, Scrape, XdpSample},
};
use crate::{
    reject::RejectReason,
    routing::{Cluster, RouteTable},
    splice::{CloseReason, Path},
};

/// Bucket bounds and export unit of a [`Histogram`].
pub trait Buckets {
    /// Upper bounds of the buckets in µs, ascending (the `+Inf` bucket is implied).
    const BOUNDS_US: &'static [u64];
    /// Microseconds per exported unit: bounds and sum are exported divided by it.
    const UNIT_US: f64;
}

/// `zone_ingress_handoff_duration_seconds`: 25 µs to 1 s, exported in seconds.
#[derive(Debug)]
pub struct HandoffBuckets;

impl Buckets for HandoffBuckets {
    const BOUNDS_US: &'static [u64] = &[25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000];
    const UNIT_US: f64 = 1e6;
}

/// Envoy's default histogram buckets (`histogram_bucket_settings` unset), exported in
/// milliseconds as Envoy's `_ms` histograms are: 0.5 ms to 1 h.
#[derive(Debug)]
pub struct EnvoyMsBuckets;

impl Buckets for EnvoyMsBuckets {
    const BOUNDS_US: &'static [u64] = &[
        500,
        1_000,
        5_000,
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        30_000_000,
        60_000_000,
        300_000_000,
        600_000_000,
        1_800_000_000,
        3_600_000_000,
    ];
    const UNIT_US: f64 = 1e3;
}

/// A fixed-bucket histogram: one atomic per bucket (made cumulative on export), a count and a
/// sum in µs. Observing costs three relaxed atomic adds, no lock.
#[derive(Debug)]
pub struct Histogram<B> {
    /// Observations per bucket of `B::BOUNDS_US` (not cumulative; above the last bound: none).
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
    unit: std::marker::PhantomData<B>,
}

impl<B: Buckets> Default for Histogram<B> {
    fn default() -> Self {
        Self {
            buckets: B::BOUNDS_US.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            unit: std::marker::PhantomData,
        }
    }
}

impl<B: Buckets> Histogram<B> {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = B::BOUNDS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

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

const MODES: [Path; 3] = Path::ALL;

fn mode_index(p: Path) -> usize {
    p.index()
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
    /// Time to connect to an endpoint, successful connects only (`envoy_cluster_upstream_cx_connect_ms`).
    pub upstream_cx_connect_ms: Histogram<EnvoyMsBuckets>,
    /// Upstream connection lifetime, from the start of its connect to the flow's close
    /// (`envoy_cluster_upstream_cx_length_ms`).
    pub upstream_cx_length_ms: Histogram<EnvoyMsBuckets>,
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
            upstream_cx_connect_ms: Histogram::default(),
            upstream_cx_length_ms: Histogram::default(),
        }
    }

    /// Counts one more connection unless `limit` are already open; the permit gives it back
    /// when dropped.
    #[must_use]
    pub fn try_acquire(self: &Arc<Self>, limit: usize) -> Option<UpstreamPermit> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| UpstreamPermit(Arc::clone(self)))
    }

    /// A permit for a connection that is still counted (its earlier permit was kept counted
    /// by [`UpstreamPermit::keep_counted`]).
    #[must_use]
    pub fn resume_permit(self: &Arc<Self>) -> UpstreamPermit {
        UpstreamPermit(Arc::clone(self))
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

impl UpstreamPermit {
    /// The cluster this connection counts against.
    #[must_use]
    pub fn cluster(&self) -> &Arc<ClusterStats> {
        &self.0
    }

    /// Lets go of the permit while the connection stays counted (a dormant flow, whose group
    /// holds the cluster); [`ClusterStats::resume_permit`] takes it back.
    pub fn keep_counted(self) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the Arc is read out once and dropped; `this` is never dropped or used again.
        drop(unsafe { std::ptr::read(&raw const this.0) });
    }
}

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
pub fn listener_label(addr: SocketAddr) -> String {
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
    /// Connections waiting for their ClientHello now (`zone_ingress_handshakes_pending`).
    pub handshakes_pending: AtomicU64,
    /// Most of them at once since the heap was last trimmed after a burst (not exported).
    pub handshakes_peak: AtomicU64,
    /// ClientHello parsing (Envoy's tls_inspector counters).
    pub tls_found: AtomicU64,
    pub tls_not_found: AtomicU64,
    pub sni_found: AtomicU64,
    pub sni_not_found: AtomicU64,
    pub client_hello_too_large: AtomicU64,
    /// Connections handed to each path (index: kernel, userspace).
    spliced: [AtomicU64; 3],
    /// Connections that `auto` meant to splice in the kernel but served in userspace.
    pub kernel_fallbacks: AtomicU64,
    /// Bytes of closed flows per path, client → backend and backend → client. Written only
    /// under the flow registry's lock (see [`ClusterStats::closed_client_to_backend`]).
    closed_bytes: [[AtomicU64; 2]; 3],
    /// Accept → spliced latency.
    pub handoff: Histogram<HandoffBuckets>,
    /// Rejected connections by reason (slot: [`RejectReason::index`]).
    rejects: [AtomicU64; RejectReason::ALL.len()],
    /// Closed flows by reason (index into [`CLOSE_REASONS`]).
    closes: [AtomicU64; CLOSE_REASONS.len()],
    /// `connection rejected` log lines dropped by the rate limit.
    pub access_log_suppressed: AtomicU64,
    /// Configuration loads after startup (file change or SIGHUP) that were applied / rejected.
    pub reload_success: AtomicU64,
    pub reload_failure: AtomicU64,
    /// The configuration comes from a control plane (ADS) rather than files.
    pub cp_mode: AtomicBool,
    /// The ADS stream to the control plane is up (`envoy_control_plane_connected_state`).
    pub cp_connected: AtomicBool,
    /// Listener rebinds after an address change.
    pub listener_rebinds: AtomicU64,
    /// Per-cluster counters by cluster name.
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
}

impl Metrics {
    /// Counts a rejected connection.
    pub fn reject(&self, reason: RejectReason) {
        self.rejects[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection handed to `path`.
    pub fn spliced(&self, path: Path) {
        self.spliced[mode_index(path)].fetch_add(1, Ordering::Relaxed);
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
        RejectReason::ALL.iter().zip(&self.rejects).map(|(r, n)| (r.label(), n.load(Ordering::Relaxed))).collect()
    }

    /// Closed flows by reason.
    #[must_use]
    pub fn closes(&self) -> BTreeMap<&'static str, u64> {
        CLOSE_REASONS.iter().zip(&self.closes).map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed))).collect()
    }

    fn lock_clusters(&self) -> MutexGuard<'_, BTreeMap<String, Arc<ClusterStats>>> {
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
            let stats = Arc::clone(
                registry.entry(cluster.name.clone()).or_insert_with(|| Arc::new(ClusterStats::new(cluster))),
            );
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
