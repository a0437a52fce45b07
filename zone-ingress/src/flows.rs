//! The open flows: the owner of every routed connection until its close is logged, what
//! `/connections` lists, and where the live byte counters come from.
//!
//! A flow is registered once its backend is connected (just before the handoff) and removed
//! when it closes (its close report, or its relay's end), so the registry never holds more
//! entries than there are open connections; removing it releases its cluster slot.
//! Byte counters: the userspace relay's shared [`Progress`], and for kernel-spliced flows the
//! BPF map's per-socket counters, read on demand (a page of `/connections`, a scrape), never
//! polled.
//!
//! Closing a flow and adding its final bytes to the closed totals happen under the registry's
//! lock. A scrape reads the live counters outside the lock, then, under it, keeps only the flows
//! still open and reads the closed totals: every flow counts once, either with a live value or
//! with its final one (which is never smaller), so the exported counters never go backwards.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    metrics::{Metrics, UpstreamPermit},
    routing::Route,
    splice::{CloseReason, Closed, Path, packet::ports::Lease, userspace::Progress},
    sys,
};

/// Most flows one `/connections` page returns.
pub const MAX_PAGE: usize = 1000;

/// One open flow.
#[derive(Debug)]
pub struct Flow {
    pub client: SocketAddr,
    pub sni: String,
    pub route: Arc<Route>,
    pub endpoint: SocketAddr,
    pub mode: Path,
    /// Wall-clock start (accept time), for display.
    pub started: SystemTime,
    /// `sys::monotonic_ns()` at accept, for the age.
    pub started_ns: u64,
    /// When the connect to the endpoint started: the upstream connection's lifetime
    /// (`envoy_cluster_upstream_cx_length_ms`) runs from here to the close.
    pub upstream_since: Instant,
    /// Userspace flows: the relay's counters.
    pub progress: Arc<Progress>,
    /// Kernel flows: the sockets' cookies (client, backend), the keys of their BPF counters.
    pub cookies: Option<[u64; 2]>,
    /// The flow's slot under its cluster's cap (and so its cluster's counters), released when the
    /// flow leaves the registry.
    pub permit: UpstreamPermit,
    /// The packet splice's hold on the backend socket's source port (`ports`), released when
    /// the flow leaves the registry (a switched flow's entries hold it on their own).
    pub source_port: Option<Lease>,
}

/// Reads a kernel flow's counters by its path and its `cookies` (the sockets' cookies of a
/// sockmap flow, `[token, 0]` of a packet flow): (client → backend, backend → client, last
/// activity in `sys::monotonic_ns()` time); `None` once the flow is gone from the maps.
pub type KernelReader<'a> = &'a dyn Fn(Path, [u64; 2]) -> Option<(u64, u64, u64)>;

/// A flow's counters: (client → backend, backend → client, last activity). Kernel values are
/// remembered in `progress` (monotonically), so a flow whose map entries are already gone but
/// whose close is not yet recorded still shows its last value, never less.
fn counters(mode: Path, progress: &Progress, cookies: Option<[u64; 2]>, kernel: KernelReader<'_>) -> (u64, u64, u64) {
    if mode != Path::Userspace
        && let Some(c) = cookies
        && let Some((c2b, b2c, last)) = kernel(mode, c)
    {
        progress.client_to_backend.fetch_max(c2b, Ordering::Relaxed);
        progress.backend_to_client.fetch_max(b2c, Ordering::Relaxed);
        progress.last_active_ns.fetch_max(last, Ordering::Relaxed);
    }
    (
        progress.client_to_backend.load(Ordering::Relaxed),
        progress.backend_to_client.load(Ordering::Relaxed),
        progress.last_active_ns.load(Ordering::Relaxed),
    )
}

/// What `/connections` shows of a flow.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowView {
    pub id: u64,
    pub client: String,
    pub sni: String,
    pub route: RouteView,
    pub endpoint: String,
    pub mode: Path,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    /// Unix time of the accept, seconds.
    pub started_unix: f64,
    #[serde(skip)]
    started_ns: u64,
    pub age_ms: u64,
    /// Time since the last byte either way.
    pub idle_ms: u64,
}

/// The route of a flow.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    pub service: String,
    pub mesh: String,
    pub tags: BTreeMap<String, String>,
    pub cluster: String,
}

/// One page of flows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    /// Open flows in total.
    pub total: usize,
    /// Flows in this page.
    pub returned: usize,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<u64>,
    pub connections: Vec<FlowView>,
}

/// Live bytes of the open flows, read under the registry's lock.
#[derive(Debug, Default)]
pub struct LiveTotals {
    /// By cluster name: (client → backend, backend → client).
    pub by_cluster: BTreeMap<String, (u64, u64)>,
    /// Open flows per path (kernel, userspace).
    pub flows_by_mode: [usize; 3],
    /// Live bytes per path (kernel, userspace).
    pub by_mode: [(u64, u64); 3],
}

/// The registry of open flows.
#[derive(Debug, Default)]
pub struct Flows {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    open: BTreeMap<u64, Flow>,
}

impl Flows {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation below leaves the map consistent at each step.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a flow; returns its id (unique for the process lifetime).
    pub fn open(&self, flow: Flow) -> u64 {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.open.insert(id, flow);
        id
    }

    /// Records the path a flow ended up on, with the keys of its counters (see
    /// [`KernelReader`]).
    pub fn set_mode(&self, id: u64, mode: Path, cookies: Option<[u64; 2]>) {
        if let Some(f) = self.lock().open.get_mut(&id) {
            f.mode = mode;
            f.cookies = cookies;
        }
    }

    /// Removes a flow and adds its final counters to the closed totals, atomically with
    /// respect to [`Flows::live_totals`]. Returns the flow (`None` if it was not registered).
    pub fn close(&self, id: u64, closed: &Closed, metrics: &Metrics) -> Option<Flow> {
        let mut inner = self.lock();
        let flow = inner.open.remove(&id)?;
        let c = flow.permit.cluster();
        c.closed_client_to_backend.fetch_add(closed.client_to_backend, Ordering::Relaxed);
        c.closed_backend_to_client.fetch_add(closed.backend_to_client, Ordering::Relaxed);
        c.upstream_cx_destroy.fetch_add(1, Ordering::Relaxed);
        c.upstream_cx_length_ms.observe(flow.upstream_since.elapsed());
        if closed.reason == CloseReason::IdleTimeout {
            c.idle_timeout.fetch_add(1, Ordering::Relaxed);
        }
        metrics.flow_closed(flow.mode, closed.reason, closed.client_to_backend, closed.backend_to_client);
        drop(inner);
        Some(flow)
    }

    /// Open flows.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// No open flow.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sums the live counters of the open flows and calls `f` with them while the lock is
    /// held, so that `f` reads closed totals consistent with them (module docs).
    pub fn live_totals<R>(&self, kernel: KernelReader<'_>, f: impl FnOnce(&LiveTotals) -> R) -> R {
        type Entry = (u64, Path, Arc<Progress>, Option<[u64; 2]>, String);
        let open: Vec<Entry> = self
            .lock()
            .open
            .iter()
            .map(|(id, f)| (*id, f.mode, Arc::clone(&f.progress), f.cookies, f.permit.cluster().name.clone()))
            .collect();
        let live: Vec<(u64, Path, String, u64, u64)> = open
            .into_iter()
            .map(|(id, mode, progress, cookies, cluster)| {
                let (c2b, b2c, _) = counters(mode, &progress, cookies, kernel);
                (id, mode, cluster, c2b, b2c)
            })
            .collect();
        let inner = self.lock();
        let mut t = LiveTotals::default();
        for (id, mode, cluster, c2b, b2c) in live {
            // Closed meanwhile: its final bytes are in the closed totals already.
            if !inner.open.contains_key(&id) {
                continue;
            }
            let e = t.by_cluster.entry(cluster).or_default();
            e.0 += c2b;
            e.1 += b2c;
            let m = mode.index();
            t.flows_by_mode[m] += 1;
            t.by_mode[m].0 += c2b;
            t.by_mode[m].1 += b2c;
        }
        f(&t)
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) flows with an id greater than `after`, oldest first.
    #[must_use]
    pub fn page(&self, after: Option<u64>, limit: usize, kernel: KernelReader<'_>) -> Page {
        let limit = limit.clamp(1, MAX_PAGE);
        let inner = self.lock();
        let start = after.map_or(0, |a| a.saturating_add(1));
        type Picked = (u64, FlowView, Arc<Progress>, Option<[u64; 2]>);
        let mut picked: Vec<Picked> = inner
            .open
            .range(start..)
            .take(limit + 1)
            .map(|(id, f)| (*id, view(*id, f), Arc::clone(&f.progress), f.cookies))
            .collect();
        let total = inner.open.len();
        drop(inner);
        let next_after = if picked.len() > limit {
            picked.truncate(limit);
            picked.last().map(|p| p.0)
        } else {
            None
        };
        let now_ns = sys::monotonic_ns();
        let connections: Vec<FlowView> = picked
            .into_iter()
            .map(|(_, mut v, progress, cookies)| {
                let (c2b, b2c, last) = counters(v.mode, &progress, cookies, kernel);
                v.bytes_client_to_backend = c2b;
                v.bytes_backend_to_client = b2c;
                v.idle_ms = now_ns.saturating_sub(last.max(v.started_ns)) / 1_000_000;
                v
            })
            .collect();
        Page { total, returned: connections.len(), next_after, connections }
    }
}

fn view(id: u64, f: &Flow) -> FlowView {
    let age = SystemTime::now().duration_since(f.started).unwrap_or(Duration::ZERO);
    FlowView {
        id,
        client: f.client.to_string(),
        sni: f.sni.clone(),
        route: RouteView {
            service: f.route.service.clone(),
            mesh: f.route.mesh.clone(),
            tags: f.route.tags.clone(),
            cluster: f.route.cluster.name.clone(),
        },
        endpoint: f.endpoint.to_string(),
        mode: f.mode,
        bytes_client_to_backend: 0,
        bytes_backend_to_client: 0,
        started_unix: f.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        started_ns: f.started_ns,
        age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        idle_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, routing::RouteTable};

    fn flow(metrics: &Metrics) -> Flow {
        let inv = config::parse_inventory(
            std::path::Path::new("inv.yaml"),
            "type: Dataplane\nmesh: default\nname: b1\nnetworking:\n  address: 198.18.1.2\n  inbound:\n  - port: 8080\n    tags:\n      kuma.io/service: backend\n",
        )
        .expect("inventory")
        .value;
        let table = RouteTable::build(&inv, "");
        let clusters = metrics.clusters_for(&table);
        let route = table.lookup("backend{mesh=default}").expect("route");
        Flow {
            client: "198.18.0.1:40000".parse().expect("addr"),
            sni: route.sni.clone(),
            endpoint: route.endpoints[0],
            permit: clusters[&route.cluster.name].try_acquire(usize::MAX).expect("no cap"),
            source_port: None,
            route,
            mode: Path::Kernel,
            started: SystemTime::now(),
            started_ns: sys::monotonic_ns(),
            upstream_since: Instant::now(),
            progress: Arc::new(Progress::default()),
            cookies: None,
        }
    }

    #[test]
    fn paging_is_bounded_and_complete() {
        let m = Metrics::default();
        let flows = Flows::default();
        let ids: Vec<u64> = (0..25).map(|_| flows.open(flow(&m))).collect();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = flows.page(after, 10, &|_, _| None);
            assert!(page.returned <= 10);
            assert_eq!(page.total, 25);
            seen.extend(page.connections.iter().map(|c| c.id));
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        assert_eq!(seen, ids);
        assert_eq!(flows.page(None, 0, &|_, _| None).returned, 1, "a limit of 0 is raised to 1");
    }

    #[test]
    fn close_moves_bytes_from_live_to_closed_once() {
        let m = Metrics::default();
        let flows = Flows::default();
        let f = flow(&m);
        let progress = Arc::clone(&f.progress);
        let cluster = Arc::clone(f.permit.cluster());
        let id = flows.open(f);
        progress.client_to_backend.store(100, Ordering::Relaxed);
        let live = flows.live_totals(&|_, _| None, |t| t.by_cluster["default:backend"]);
        assert_eq!(live, (100, 0));
        let closed = Closed { reason: CloseReason::ClientFin, client_to_backend: 150, backend_to_client: 7 };
        assert!(flows.close(id, &closed, &m).is_some());
        assert!(flows.close(id, &closed, &m).is_none(), "closing twice counts once");
        assert!(flows.is_empty());
        assert_eq!(cluster.closed_client_to_backend.load(Ordering::Relaxed), 150);
        assert_eq!(cluster.closed_backend_to_client.load(Ordering::Relaxed), 7);
        assert_eq!(cluster.upstream_cx_length_ms.count(), 1, "the lifetime is observed once");
        assert_eq!(m.closes()["client_fin"], 1);
    }
}
