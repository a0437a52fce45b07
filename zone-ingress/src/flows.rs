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
//!
//! Dormant flows (docs/design.md#dormant-flows): an idle packet-spliced flow leaves the registry
//! for its group (its route and cluster, counted once per group, not per flow) and lives on as
//! the packet splice's map entries, which `/connections` and the scrape read; it comes back
//! under its id when it wakes (its end, idle timeout or the drain). The splice orders each move
//! so that the flow is always in the registry or in the maps (a record whose flow is still
//! registered is skipped), and moves count as changes: a scrape that saw one meanwhile reads
//! again, so every flow counts once.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    metrics::{ClusterStats, Metrics, UpstreamPermit},
    routing::Route,
    splice::{
        CloseReason, Closed, Path,
        packet::{Dormant, Owner, Woken, ports::Lease},
        userspace::Progress,
    },
    sys,
};

/// Reads of the live counters a scrape makes at most while flows go dormant or wake under it.
const LIVE_READS: usize = 8;

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

impl Flow {
    /// A packet-level flow this process did not route itself, registered from what the maps
    /// keep of it (an adopted or a woken one): `(client, endpoint)`, the server name, the accept
    /// time and the key of its counters. Its connect time is taken as the accept time.
    #[must_use]
    pub fn packet(
        (client, endpoint): (SocketAddr, SocketAddr),
        sni: &str,
        started: SystemTime,
        token: u64,
        route: Arc<Route>,
        permit: UpstreamPermit,
    ) -> Self {
        let age = SystemTime::now().duration_since(started).unwrap_or_default();
        Self {
            client,
            sni: sni.to_owned(),
            route,
            endpoint,
            mode: Path::Packet,
            started,
            started_ns: sys::monotonic_ns().saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(0)),
            upstream_since: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            progress: Arc::default(),
            cookies: Some([token, 0]),
            permit,
            source_port: None,
        }
    }
}

/// What the registry reads of the kernel's flows.
pub trait KernelFlows {
    /// A kernel flow's counters by its path and its `cookies` (the sockets' cookies of a sockmap
    /// flow, `[token, 0]` of a packet flow): (client → backend, backend → client, last activity
    /// in `sys::monotonic_ns()` time); `None` once the flow is gone from the maps.
    fn counters(&self, mode: Path, cookies: [u64; 2]) -> Option<(u64, u64, u64)>;
    /// Calls `f` with each dormant flow.
    fn dormant(&self, f: &mut dyn FnMut(&Dormant));
}

/// No kernel splice.
#[derive(Debug)]
pub struct NoKernel;

impl KernelFlows for NoKernel {
    fn counters(&self, _: Path, _: [u64; 2]) -> Option<(u64, u64, u64)> {
        None
    }

    fn dormant(&self, _: &mut dyn FnMut(&Dormant)) {}
}

type KernelReader<'a> = &'a dyn KernelFlows;

/// A flow's counters: (client → backend, backend → client, last activity). Kernel values are
/// remembered in `progress` (monotonically), so a flow whose map entries are already gone but
/// whose close is not yet recorded still shows its last value, never less.
fn counters(mode: Path, progress: &Progress, cookies: Option<[u64; 2]>, kernel: KernelReader<'_>) -> (u64, u64, u64) {
    if mode != Path::Userspace
        && let Some(c) = cookies
        && let Some((c2b, b2c, last)) = kernel.counters(mode, c)
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
    /// Groups of dormant flows by slot (the slot is in each flow's map record); `None`: free.
    groups: Vec<Option<Group>>,
    /// A group's slot by its route's and cluster's addresses.
    group_of: HashMap<(usize, usize), u32>,
    /// Dormant flows.
    dormant: usize,
    /// Flows that went dormant or woke, since start.
    changes: u64,
}

/// The dormant flows of one route and cluster: what their `Flow`s shared.
#[derive(Debug)]
struct Group {
    route: Arc<Route>,
    /// Their slots under the cluster's cap stay counted (`UpstreamPermit::keep_counted`).
    cluster: Arc<ClusterStats>,
    flows: usize,
}

impl Inner {
    /// One flow fewer in `group`; the group goes with its last.
    fn leave(&mut self, group: u32) {
        let Some(Some(g)) = self.groups.get_mut(group as usize) else { return };
        g.flows = g.flows.saturating_sub(1);
        if g.flows == 0 {
            let key = Group::key(&g.route, &g.cluster);
            self.group_of.remove(&key);
            self.groups[group as usize] = None;
        }
    }
}

impl Group {
    fn key(route: &Arc<Route>, cluster: &Arc<ClusterStats>) -> (usize, usize) {
        (Arc::as_ptr(route) as usize, Arc::as_ptr(cluster) as usize)
    }
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

    /// Open flows (dormant ones included).
    #[must_use]
    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.open.len() + inner.dormant
    }

    /// Dormant flows.
    #[must_use]
    pub fn dormant(&self) -> usize {
        self.lock().dormant
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
        // A flow that went dormant or woke while the counters were read may be in both reads
        // or in neither: read again (a few times at most; they come in bursts once a second).
        for attempt in 0..LIVE_READS {
            let (changes, open): (u64, Vec<Entry>) = {
                let inner = self.lock();
                let open = inner
                    .open
                    .iter()
                    .map(|(id, f)| (*id, f.mode, Arc::clone(&f.progress), f.cookies, f.permit.cluster().name.clone()))
                    .collect();
                (inner.changes, open)
            };
            let live: Vec<(u64, Path, String, u64, u64)> = open
                .into_iter()
                .map(|(id, mode, progress, cookies, cluster)| {
                    let (c2b, b2c, _) = counters(mode, &progress, cookies, kernel);
                    (id, mode, cluster, c2b, b2c)
                })
                .collect();
            let mut dormant: Vec<(u64, u32, u64, u64)> = Vec::new();
            kernel.dormant(&mut |d| dormant.push((d.flow, d.group, d.client_to_backend, d.backend_to_client)));
            let inner = self.lock();
            if inner.changes != changes && attempt + 1 < LIVE_READS {
                continue;
            }
            let mut t = LiveTotals::default();
            let mut add = |cluster: &str, mode: Path, c2b: u64, b2c: u64| {
                let e = t.by_cluster.entry(cluster.to_owned()).or_default();
                e.0 += c2b;
                e.1 += b2c;
                let m = mode.index();
                t.flows_by_mode[m] += 1;
                t.by_mode[m].0 += c2b;
                t.by_mode[m].1 += b2c;
            };
            for (id, mode, cluster, c2b, b2c) in live {
                // Closed meanwhile: its final bytes are in the closed totals already.
                if inner.open.contains_key(&id) {
                    add(&cluster, mode, c2b, b2c);
                }
            }
            for (id, group, c2b, b2c) in dormant {
                // Registered (going dormant or waking right now): counted above, or in the closed
                // totals.
                if inner.open.contains_key(&id) {
                    continue;
                }
                if let Some(Some(g)) = inner.groups.get(group as usize) {
                    add(&g.cluster.name, Path::Packet, c2b, b2c);
                }
            }
            return f(&t);
        }
        unreachable!("the last attempt returns")
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) flows with an id greater than `after`, oldest first
    /// (dormant ones included).
    #[must_use]
    pub fn page(&self, after: Option<u64>, limit: usize, kernel: KernelReader<'_>) -> Page {
        let limit = limit.clamp(1, MAX_PAGE);
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut asleep: Vec<Dormant> = Vec::new();
        kernel.dormant(&mut |d| {
            if d.flow >= start {
                asleep.push(d.clone());
            }
        });
        asleep.sort_unstable_by_key(|d| d.flow);
        asleep.truncate(limit + 1);
        let inner = self.lock();
        type Picked = (u64, FlowView, Option<(Arc<Progress>, Option<[u64; 2]>)>);
        let mut picked: Vec<Picked> = inner
            .open
            .range(start..)
            .take(limit + 1)
            .map(|(id, f)| (*id, view(*id, f), Some((Arc::clone(&f.progress), f.cookies))))
            .collect();
        for d in asleep {
            // Woken meanwhile: listed as open.
            if inner.open.contains_key(&d.flow) {
                continue;
            }
            if let Some(Some(g)) = inner.groups.get(d.group as usize) {
                picked.push((d.flow, dormant_view(&d, &g.route), None));
            }
        }
        let total = inner.open.len() + inner.dormant;
        drop(inner);
        picked.sort_unstable_by_key(|p| p.0);
        let next_after = if picked.len() > limit {
            picked.truncate(limit);
            picked.last().map(|p| p.0)
        } else {
            None
        };
        let now_ns = sys::monotonic_ns();
        let connections: Vec<FlowView> = picked
            .into_iter()
            .map(|(_, mut v, open)| {
                if let Some((progress, cookies)) = open {
                    let (c2b, b2c, last) = counters(v.mode, &progress, cookies, kernel);
                    v.bytes_client_to_backend = c2b;
                    v.bytes_backend_to_client = b2c;
                    v.idle_ms = now_ns.saturating_sub(last.max(v.started_ns)) / 1_000_000;
                }
                v
            })
            .collect();
        Page { total, returned: connections.len(), next_after, connections }
    }
}

impl Owner for Flows {
    fn group(&self, id: u64) -> Option<u32> {
        let mut inner = self.lock();
        let flow = inner.open.get(&id)?;
        if flow.mode != Path::Packet {
            return None;
        }
        let key = Group::key(&flow.route, flow.permit.cluster());
        let slot = match inner.group_of.get(&key) {
            Some(&slot) => slot,
            None => {
                let group =
                    Group { route: Arc::clone(&flow.route), cluster: Arc::clone(flow.permit.cluster()), flows: 0 };
                let i = inner.groups.iter().position(Option::is_none).unwrap_or(inner.groups.len());
                let slot = u32::try_from(i).ok()?;
                if i == inner.groups.len() {
                    inner.groups.push(Some(group));
                } else {
                    inner.groups[i] = Some(group);
                }
                inner.group_of.insert(key, slot);
                slot
            }
        };
        if let Some(Some(g)) = inner.groups.get_mut(slot as usize) {
            g.flows += 1;
        }
        Some(slot)
    }

    fn leave_group(&self, group: u32) {
        self.lock().leave(group);
    }

    fn sleep(&self, id: u64, group: u32) -> bool {
        let mut inner = self.lock();
        if !matches!(inner.groups.get(group as usize), Some(Some(_))) {
            return false;
        }
        let Some(flow) = inner.open.remove(&id) else { return false };
        inner.dormant += 1;
        inner.changes += 1;
        flow.permit.keep_counted();
        true
    }

    fn wake(&self, w: &Woken) -> bool {
        let mut inner = self.lock();
        if inner.open.contains_key(&w.flow) {
            // Registered already (not expected: the splice wakes a flow once).
            return true;
        }
        let Some(Some(g)) = inner.groups.get(w.group as usize) else { return false };
        let (route, cluster) = (Arc::clone(&g.route), Arc::clone(&g.cluster));
        inner.leave(w.group);
        inner.dormant = inner.dormant.saturating_sub(1);
        inner.changes += 1;
        let flow = Flow::packet((w.client, w.endpoint), &w.sni, w.started, w.token, route, cluster.resume_permit());
        inner.open.insert(w.flow, flow);
        true
    }
}

/// What `/connections` shows of a dormant flow.
fn dormant_view(d: &Dormant, route: &Route) -> FlowView {
    let started = SystemTime::UNIX_EPOCH + Duration::from_millis(d.started_unix_ms);
    let age = SystemTime::now().duration_since(started).unwrap_or(Duration::ZERO);
    let now_ns = sys::monotonic_ns();
    FlowView {
        id: d.flow,
        client: d.client.to_string(),
        sni: d.sni.clone(),
        route: route_view(route),
        endpoint: d.endpoint.to_string(),
        mode: Path::Packet,
        bytes_client_to_backend: d.client_to_backend,
        bytes_backend_to_client: d.backend_to_client,
        started_unix: started.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |t| t.as_secs_f64()),
        started_ns: 0,
        age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        idle_ms: now_ns.saturating_sub(d.last_ns) / 1_000_000,
    }
}

fn route_view(r: &Route) -> RouteView {
    RouteView {
        service: r.service.clone(),
        mesh: r.mesh.clone(),
        tags: r.tags.clone(),
        cluster: r.cluster.name.clone(),
    }
}

fn view(id: u64, f: &Flow) -> FlowView {
    let age = SystemTime::now().duration_since(f.started).unwrap_or(Duration::ZERO);
    FlowView {
        id,
        client: f.client.to_string(),
        sni: f.sni.clone(),
        route: route_view(&f.route),
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
            let page = flows.page(after, 10, &NoKernel);
            assert!(page.returned <= 10);
            assert_eq!(page.total, 25);
            seen.extend(page.connections.iter().map(|c| c.id));
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        assert_eq!(seen, ids);
        assert_eq!(flows.page(None, 0, &NoKernel).returned, 1, "a limit of 0 is raised to 1");
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
        let live = flows.live_totals(&NoKernel, |t| t.by_cluster["default:backend"]);
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
