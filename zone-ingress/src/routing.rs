//! The routing table: SNI → route → endpoints (docs/design.md#route-table).
//!
//! Kuma builds one Envoy filter chain per accepted SNI and matches the whole string; this table
//! holds the same set of entries, built from the [`Inventory`]:
//!
//! - legacy `S{mesh=M}` per mesh `M` and service `S` with at least one healthy inbound ;
//! - MeshService `a<hash>.S.<port>.M.ms` per such service whose name is a DNS-1035 label, one per
//!   distinct healthy inbound port (Universal zones generate one MeshService per service).
//!
//! Legacy *subset* SNIs (`S{mesh=M,version=v1}`) are not enumerated: Kuma creates them only for
//! subsets some policy references, which this data plane cannot see. Any canonical subset of a
//! known service is accepted instead and filters that service's endpoints (docs/design.md#route-table explains why the
//! result is identical for every SNI Kuma would generate). Subset routes are built on first use
//! and cached, so each keeps its round-robin position across connections.
//!
//! Balancing is round robin per TCP connection with weight 1; health is exactly the
//! inventory's `state`/`health` (no active checks). A new table is built on every inventory
//! change and swapped in whole by the caller.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::Serialize;
use thiserror::Error;

use crate::{
    client_hello::MAX_SNI_LEN,
    config::{Dataplane, Inbound, Inventory},
    sni::{self, MESH_TAG, ResourceKind},
};

/// Default bound on cached subset routes. Clients only send subsets that policies reference, so
/// a real zone needs a handful; the bound stops a client cycling through made-up subsets from
/// growing memory without limit.
pub const SUBSET_CACHE_CAPACITY: usize = 4096;

/// Why an SNI was not routed (its label: [`crate::reject::RejectReason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum Reject {
    /// No entry for this SNI: unknown mesh or service, no healthy inbound, unknown MeshService
    /// port or hash, a bare service name, and the formats a 2.x ingress does not serve
    /// (MeshMultiZoneService without the resource, MeshExternalService, KRI).
    #[error("no route for this SNI")]
    UnknownSni,
    /// A well-formed tag SNI that Kuma never generates: keys out of order, `kuma.io/service`
    /// inside the braces, a duplicate key, no `mesh`.
    #[error("tag SNI is not in Kuma's canonical form")]
    NotCanonical,
    /// A canonical subset of a known service that matches none of its healthy endpoints. There
    /// is no fallback to the whole service (Kuma closes the connection too).
    #[error("no endpoint matches the requested subset")]
    NoEndpoints,
    /// Not a name at all: empty, longer than 255 bytes, a NUL byte, or a syntactically broken
    /// tag SNI such as `backend{`.
    #[error("malformed SNI")]
    InvalidSni,
}

/// A backend cluster in Kuma's sense: the endpoint set of one service (legacy) or one
/// MeshService port. Shared by every route that sends to it, so the caller can cap concurrent
/// upstream connections per cluster as Envoy does (1024 by default, docs/design.md#route-table).
#[derive(Debug)]
pub struct Cluster {
    /// Kuma's cluster name: `<mesh>:<service>` for legacy routes,
    /// `<mesh>_<name>__<zone>_msvc_<port>` for MeshService routes (docs/design.md#route-table).
    pub name: String,
    /// The name as Envoy's stats show it (`envoy_cluster_name`): `:` becomes `_`.
    pub stat_name: String,
    /// Healthy endpoints (`envoy_cluster_membership_healthy`).
    pub healthy: usize,
    /// All inbounds of the cluster, healthy or not (`envoy_cluster_membership_total`).
    pub total: usize,
}

impl Cluster {
    /// A cluster whose stat name is its name with `:` as `_` (Kuma's `altStatName`).
    #[must_use]
    pub fn new(name: String, healthy: usize, total: usize) -> Self {
        Self { stat_name: name.replace(':', "_"), name, healthy, total }
    }
}

/// One filter chain of the control plane's ingress listener, resolved to its endpoints
/// ([`RouteTable::from_control_plane`]).
#[derive(Debug)]
pub struct ControlPlaneRoute {
    /// The SNI (`server_names`), matched whole.
    pub sni: String,
    /// The cluster the chain's `tcp_proxy` sends to.
    pub cluster: Arc<Cluster>,
    /// The chain's `metadata_match` (`envoy.lb`), empty without one.
    pub tags: BTreeMap<String, String>,
    /// The healthy endpoints of the cluster's subset; empty: the SNI is known but its
    /// connections are closed ([`Reject::NoEndpoints`]), as Envoy closes them.
    pub endpoints: Vec<SocketAddr>,
}

/// What kind of entry a [`Route`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum RouteKind {
    /// `S{mesh=M}`: every healthy endpoint of the service.
    Legacy,
    /// `S{mesh=M,k=v,...}`: the service's endpoints whose tags match.
    Subset,
    /// `a<hash>.S.<port>.M.ms`: the service's healthy endpoints on `port`.
    MeshService {
        /// The MeshService port (= the inbound port on Universal).
        port: u16,
    },
    /// An SNI the control plane sent (a filter chain of the ingress listener), whatever its
    /// format: legacy, subset, MeshService, MeshMultiZoneService, gateway, external service.
    ControlPlane,
}

/// One accepted SNI and where it leads.
#[derive(Debug)]
pub struct Route {
    /// The SNI, exactly as matched.
    pub sni: String,
    /// Which kind of entry this is.
    pub kind: RouteKind,
    /// The cluster; subset routes share their service's.
    pub cluster: Arc<Cluster>,
    /// The mesh.
    pub mesh: String,
    /// The `kuma.io/service` value (MeshService name for MeshService routes).
    pub service: String,
    /// The SNI's tags including `mesh` (just `mesh` for legacy and MeshService routes).
    pub tags: BTreeMap<String, String>,
    /// The endpoints, never empty, in inventory order.
    pub endpoints: Vec<SocketAddr>,
    /// Round-robin position; advanced once per connection.
    cursor: AtomicUsize,
}

impl Route {
    fn new(
        sni: String,
        kind: RouteKind,
        cluster: Arc<Cluster>,
        mesh: &str,
        service: &str,
        tags: BTreeMap<String, String>,
        endpoints: Vec<SocketAddr>,
    ) -> Self {
        Self {
            sni,
            kind,
            cluster,
            mesh: mesh.to_owned(),
            service: service.to_owned(),
            tags,
            endpoints,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The endpoints to try for one new connection: this route's next round-robin pick first,
    /// then the endpoints after it in order (wrapping), at most `min(max_attempts, endpoints)`
    /// of them. Each call advances the round robin by one, so connect failures retry on other
    /// endpoints without skewing the rotation.
    pub fn candidates(&self, max_attempts: usize) -> impl Iterator<Item = SocketAddr> + '_ {
        let len = self.endpoints.len();
        let count = max_attempts.min(len);
        let start = if count == 0 { 0 } else { self.cursor.fetch_add(1, Ordering::Relaxed) % len };
        (0..count).filter_map(move |i| self.endpoints.get((start + i) % len).copied())
    }
}

/// One `availableServices` entry (docs/design.md#route-table): a distinct (mesh, full tag set) of healthy
/// inbounds and how many inbounds carry it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct AvailableService {
    /// The mesh.
    pub mesh: String,
    /// Number of healthy inbounds with exactly these tags (remote clients use it as a weight).
    pub instances: u32,
    /// The full tag set, `kuma.io/service` included.
    pub tags: BTreeMap<String, String>,
}

/// Healthy endpoints of one legacy (mesh, service), kept for subset lookups.
#[derive(Debug)]
struct Service {
    cluster: Arc<Cluster>,
    members: Vec<(SocketAddr, BTreeMap<String, String>)>,
}

/// Subset routes built so far, evicted oldest first when full.
#[derive(Debug, Default)]
struct SubsetCache {
    routes: HashMap<String, Arc<Route>>,
    order: VecDeque<String>,
}

/// The routing table for one inventory. Immutable apart from the subset cache and the routes'
/// counters; shared across connection tasks.
#[derive(Debug)]
pub struct RouteTable {
    zone: String,
    /// Exact entries by SNI.
    routes: HashMap<String, Arc<Route>>,
    /// The same entries sorted by SNI, for dumps.
    ordered: Vec<Arc<Route>>,
    /// mesh → service → healthy endpoints.
    services: HashMap<String, HashMap<String, Service>>,
    subsets: Mutex<SubsetCache>,
    subset_capacity: usize,
    foreign: usize,
    /// SNIs the control plane knows whose subset has no endpoint.
    no_endpoints: HashSet<String>,
    /// The bytes the control plane's default filter chain answers with (`direct_response`),
    /// written to every connection while the table has no entry.
    default_answer: Option<Vec<u8>>,
}

/// Inbounds of one (mesh, service), in inventory order.
#[derive(Default)]
struct Group<'a> {
    healthy: Vec<&'a Inbound>,
    all: Vec<&'a Inbound>,
}

impl RouteTable {
    /// Build the table for the local `zone` (used in MeshService cluster names and to leave out
    /// dataplanes labelled with another zone, e.g. in a dump taken from the global control
    /// plane). An empty `zone` disables that filter.
    #[must_use]
    pub fn build(inventory: &Inventory, zone: &str) -> Self {
        // BTreeMap: deterministic cluster creation order, whatever the inventory order.
        let mut groups: BTreeMap<(&str, &str), Group<'_>> = BTreeMap::new();
        let mut foreign = 0;
        for dp in &inventory.dataplanes {
            if !is_local(dp, zone) {
                foreign += 1;
                continue;
            }
            for inbound in &dp.inbounds {
                let Some(service) = inbound.service() else {
                    continue;
                };
                let group = groups.entry((&dp.mesh, service)).or_default();
                group.all.push(inbound);
                if inbound.healthy {
                    group.healthy.push(inbound);
                }
            }
        }

        let mut routes = HashMap::new();
        let mut services: HashMap<String, HashMap<String, Service>> = HashMap::new();
        for ((mesh, service), group) in &groups {
            if group.healthy.is_empty() {
                continue;
            }
            let mesh_tags = BTreeMap::from([(MESH_TAG.to_owned(), (*mesh).to_owned())]);

            // Legacy `S{mesh=M}`.
            let cluster = Arc::new(Cluster::new(format!("{mesh}:{service}"), group.healthy.len(), group.all.len()));
            let endpoints = group.healthy.iter().map(|i| i.endpoint).collect();
            let sni = sni::legacy_sni(service, &mesh_tags);
            insert_route(
                &mut routes,
                Route::new(sni, RouteKind::Legacy, Arc::clone(&cluster), mesh, service, mesh_tags.clone(), endpoints),
            );
            services.entry((*mesh).to_owned()).or_default().insert(
                (*service).to_owned(),
                Service { cluster, members: group.healthy.iter().map(|i| (i.endpoint, i.tags.clone())).collect() },
            );

            if is_dns1035_label(service) {
                for route in mesh_service_routes(mesh, service, zone, group) {
                    insert_route(&mut routes, route);
                }
            }
        }

        Self { services, subset_capacity: SUBSET_CACHE_CAPACITY, foreign, ..Self::with_routes(zone, routes) }
    }

    /// A table of exactly `routes`: no service for subset lookups, no subset cache.
    fn with_routes(zone: &str, routes: HashMap<String, Arc<Route>>) -> Self {
        let mut ordered: Vec<Arc<Route>> = routes.values().cloned().collect();
        ordered.sort_by(|a, b| a.sni.cmp(&b.sni));
        Self {
            zone: zone.to_owned(),
            routes,
            ordered,
            services: HashMap::new(),
            subsets: Mutex::default(),
            subset_capacity: 0,
            foreign: 0,
            no_endpoints: HashSet::new(),
            default_answer: None,
        }
    }

    /// The table of a configuration from the control plane: exactly its SNIs, nothing derived
    /// (no subset of a known service is accepted unless the control plane sent it).
    /// `default_answer` is the listener's `direct_response` for connections while there is no
    /// entry. The mesh and service shown for an entry come from its SNI when it is a tag SNI.
    #[must_use]
    pub fn from_control_plane(zone: &str, entries: Vec<ControlPlaneRoute>, default_answer: Option<Vec<u8>>) -> Self {
        let mut routes = HashMap::new();
        let mut no_endpoints = HashSet::new();
        for entry in entries {
            if entry.endpoints.is_empty() {
                no_endpoints.insert(entry.sni);
                continue;
            }
            let (mesh, service) = match sni::parse_legacy(&entry.sni) {
                Ok(parsed) => (parsed.mesh().unwrap_or_default().to_owned(), parsed.service.clone()),
                Err(_) => (String::new(), entry.cluster.name.clone()),
            };
            insert_route(
                &mut routes,
                Route::new(
                    entry.sni,
                    RouteKind::ControlPlane,
                    entry.cluster,
                    &mesh,
                    &service,
                    entry.tags,
                    entry.endpoints,
                ),
            );
        }
        Self { no_endpoints, default_answer, ..Self::with_routes(zone, routes) }
    }

    /// What to write to a connection while the table is empty, when the control plane said
    /// (`None`: Kuma's `{"proxy":…,"zone":…}`).
    #[must_use]
    pub fn default_answer(&self) -> Option<&[u8]> {
        self.default_answer.as_deref()
    }

    /// Replace the subset cache bound ([`SUBSET_CACHE_CAPACITY`] by default); 0 disables
    /// caching (each connection then gets a fresh subset route starting its round robin anew).
    #[must_use]
    pub fn with_subset_capacity(mut self, capacity: usize) -> Self {
        self.subset_capacity = capacity;
        self
    }

    /// Route an SNI: an exact entry, else a canonical legacy subset of a known service.
    ///
    /// # Errors
    /// The [`Reject`] reason; the caller closes the connection without writing anything.
    pub fn lookup(&self, sni: &str) -> Result<Arc<Route>, Reject> {
        if let Some(route) = self.routes.get(sni) {
            return Ok(Arc::clone(route));
        }
        if sni.is_empty() || sni.len() > MAX_SNI_LEN || sni.contains('\0') {
            return Err(Reject::InvalidSni);
        }
        if self.no_endpoints.contains(sni) {
            return Err(Reject::NoEndpoints);
        }
        // Only a tag SNI with braces can be a subset; bare names, MeshService, MeshExternalService
        // and KRI names that are not exact entries are unknown.
        if !sni.contains('{') {
            return Err(Reject::UnknownSni);
        }
        if let Some(route) = self.lock_subsets().routes.get(sni) {
            return Ok(Arc::clone(route));
        }
        let parsed = sni::parse_legacy(sni)
            .map_err(|e| if e.is_syntax() { Reject::InvalidSni } else { Reject::NotCanonical })?;
        let base = parsed
            .mesh()
            .and_then(|mesh| self.services.get(mesh))
            .and_then(|services| services.get(&parsed.service))
            .ok_or(Reject::UnknownSni)?;
        let wanted: Vec<(&str, &str)> = parsed.subset_tags().collect();
        // Kuma's TagSelector: every key must be present; `*` matches any value.
        let endpoints: Vec<SocketAddr> = base
            .members
            .iter()
            .filter(|(_, tags)| {
                wanted.iter().all(|(k, v)| tags.get(*k).is_some_and(|have| *v == "*" || have.as_str() == *v))
            })
            .map(|(endpoint, _)| *endpoint)
            .collect();
        if endpoints.is_empty() {
            return Err(Reject::NoEndpoints);
        }
        let mesh = parsed.mesh().unwrap_or_default().to_owned();
        let route = Arc::new(Route::new(
            sni.to_owned(),
            RouteKind::Subset,
            Arc::clone(&base.cluster),
            &mesh,
            &parsed.service,
            parsed.tags,
            endpoints,
        ));
        Ok(self.cache_subset(route))
    }

    /// Insert a subset route unless another connection won the race; returns the cached one.
    fn cache_subset(&self, route: Arc<Route>) -> Arc<Route> {
        if self.subset_capacity == 0 {
            return route;
        }
        let mut cache = self.lock_subsets();
        if let Some(existing) = cache.routes.get(&route.sni) {
            return Arc::clone(existing);
        }
        while cache.routes.len() >= self.subset_capacity {
            let Some(oldest) = cache.order.pop_front() else {
                break;
            };
            cache.routes.remove(&oldest);
        }
        cache.order.push_back(route.sni.clone());
        cache.routes.insert(route.sni.clone(), Arc::clone(&route));
        route
    }

    fn lock_subsets(&self) -> std::sync::MutexGuard<'_, SubsetCache> {
        // The cache holds no invariant a panicking holder could break halfway.
        self.subsets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// No entry at all (no healthy service in any mesh): Kuma then answers every connection
    /// with `{"proxy":…,"zone":…}` (docs/design.md#route-table).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.no_endpoints.is_empty()
    }

    /// Number of exact entries (subset routes not included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// The exact entries, sorted by SNI, for a config dump.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.ordered.iter()
    }

    /// Subset routes currently cached.
    #[must_use]
    pub fn cached_subsets(&self) -> usize {
        self.lock_subsets().routes.len()
    }

    /// The zone the table was built for.
    #[must_use]
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Dataplanes left out because their `kuma.io/zone` label names another zone; worth a
    /// warning when non-zero (a dump from the global control plane, or a wrong `--zone`).
    #[must_use]
    pub fn foreign_dataplanes(&self) -> usize {
        self.foreign
    }

    /// What the control plane would publish as this ingress's `availableServices`: one entry per
    /// distinct (mesh, full tag set) of healthy inbounds of `inventory`'s local dataplanes, sorted.
    /// Pass the inventory this table was built from.
    #[must_use]
    pub fn available_services(&self, inventory: &Inventory) -> Vec<AvailableService> {
        let mut counts: BTreeMap<(&str, &BTreeMap<String, String>), u32> = BTreeMap::new();
        for dp in inventory.dataplanes.iter().filter(|dp| is_local(dp, &self.zone)) {
            for inbound in dp.inbounds.iter().filter(|i| i.healthy && i.service().is_some()) {
                *counts.entry((&dp.mesh, &inbound.tags)).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .map(|((mesh, tags), instances)| AvailableService { mesh: mesh.to_owned(), instances, tags: tags.clone() })
            .collect()
    }
}

/// The generated MeshService's entries `a<hash>.S.<port>.M.ms`, one per distinct healthy inbound
/// port (Universal: `port = targetPort = inbound.port`).
fn mesh_service_routes(mesh: &str, service: &str, zone: &str, group: &Group<'_>) -> Vec<Route> {
    let mut ports: Vec<u16> = Vec::new();
    for inbound in &group.healthy {
        let port = inbound.endpoint.port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
        .into_iter()
        .map(|port| {
            let endpoints: Vec<SocketAddr> =
                group.healthy.iter().map(|i| i.endpoint).filter(|e| e.port() == port).collect();
            let total = group.all.iter().filter(|i| i.endpoint.port() == port).count();
            // Universal MeshServices have no namespace, hence the empty field (`__`).
            let cluster =
                Arc::new(Cluster::new(format!("{mesh}_{service}__{zone}_msvc_{port}"), endpoints.len(), total));
            Route::new(
                sni::mesh_service_sni(service, mesh, port, ResourceKind::Ms),
                RouteKind::MeshService { port },
                cluster,
                mesh,
                service,
                BTreeMap::from([(MESH_TAG.to_owned(), mesh.to_owned())]),
                endpoints,
            )
        })
        .collect()
}

fn insert_route(routes: &mut HashMap<String, Arc<Route>>, route: Route) {
    // Distinct services give distinct SNIs short of an FNV collision; keep the first then.
    routes.entry(route.sni.clone()).or_insert_with(|| Arc::new(route));
}

fn is_local(dp: &Dataplane, zone: &str) -> bool {
    zone.is_empty() || dp.zone().is_none_or(|z| z == zone)
}

/// RFC 1035 label as Kuma checks it for generated MeshService names:
/// `[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes.
fn is_dns1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 63
                && first.is_ascii_lowercase()
                && (last.is_ascii_lowercase() || last.is_ascii_digit())
                && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_inventory;

    /// The inventory of docs/design.md#sni-examples, with 198.18.1.x (benchmarking range) for 10.20.1.x.
    const INVENTORY: &str = r"
type: Dataplane
mesh: default
name: backend-1
labels:
  kuma.io/zone: east
networking:
  address: 198.18.1.11
  inbound:
  - port: 8080
    servicePort: 18080
    tags:
      kuma.io/service: backend
      kuma.io/zone: east
      version: v1
---
type: Dataplane
mesh: default
name: backend-2
networking:
  address: 198.18.1.12
  inbound:
  - port: 8080
    tags:
      kuma.io/service: backend
      kuma.io/zone: east
      version: v2
---
type: Dataplane
mesh: default
name: redis-1
networking:
  address: 198.18.1.13
  inbound:
  - port: 6379
    tags:
      kuma.io/service: redis
---
type: Dataplane
mesh: default
name: web-1
networking:
  address: 198.18.1.14
  inbound:
  - port: 80
    state: NotReady
    tags:
      kuma.io/service: web
";

    fn inventory(text: &str) -> Inventory {
        match parse_inventory(Path::new("test.yaml"), text) {
            Ok(loaded) => loaded.value,
            Err(e) => panic!("inventory does not parse:\n{e}"),
        }
    }

    fn table() -> RouteTable {
        RouteTable::build(&inventory(INVENTORY), "east")
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// The endpoint set of a routed SNI, or the reject reason.
    fn route(table: &RouteTable, sni: &str) -> Result<Vec<SocketAddr>, Reject> {
        table.lookup(sni).map(|r| r.endpoints.clone())
    }

    const B1: &str = "198.18.1.11:8080";
    const B2: &str = "198.18.1.12:8080";
    const REDIS: &str = "198.18.1.13:6379";

    #[test]
    fn vector_legacy_whole_service() {
        assert_eq!(route(&table(), "backend{mesh=default}"), Ok(vec![ep(B1), ep(B2)]));
    }

    #[test]
    fn vector_subset_version_v1() {
        assert_eq!(route(&table(), "backend{mesh=default,version=v1}"), Ok(vec![ep(B1)]));
    }

    #[test]
    fn vector_subset_zone_and_version_v2() {
        assert_eq!(route(&table(), "backend{kuma.io/zone=east,mesh=default,version=v2}"), Ok(vec![ep(B2)]));
    }

    #[test]
    fn vector_subset_without_match_has_no_fallback() {
        assert_eq!(route(&table(), "backend{mesh=default,version=v3}"), Err(Reject::NoEndpoints));
    }

    #[test]
    fn vector_non_canonical_order() {
        assert_eq!(route(&table(), "backend{version=v1,mesh=default}"), Err(Reject::NotCanonical));
    }

    #[test]
    fn vector_bare_service_name() {
        assert_eq!(route(&table(), "backend"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_unknown_mesh() {
        assert_eq!(route(&table(), "backend{mesh=other}"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_redis_legacy() {
        assert_eq!(route(&table(), "redis{mesh=default}"), Ok(vec![ep(REDIS)]));
    }

    #[test]
    fn vector_service_without_healthy_inbound() {
        assert_eq!(route(&table(), "web{mesh=default}"), Err(Reject::UnknownSni));
        // Not even a subset of it.
        assert_eq!(route(&table(), "web{mesh=default,version=v1}"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_mesh_service_backend() {
        let t = table();
        let r = t.lookup("a601e0c00295a9fbe.backend.8080.default.ms").expect("routed");
        assert_eq!(r.endpoints, vec![ep(B1), ep(B2)]);
        assert_eq!(r.kind, RouteKind::MeshService { port: 8080 });
        assert_eq!(r.cluster.name, "default_backend__east_msvc_8080");
    }

    #[test]
    fn vector_mesh_service_redis() {
        assert_eq!(route(&table(), "a25502fde077cd057.redis.6379.default.ms"), Ok(vec![ep(REDIS)]));
    }

    #[test]
    fn vector_mesh_service_unknown_port() {
        assert_eq!(route(&table(), "a601e0c00295a9fbe.backend.80.default.ms"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_mesh_service_wrong_hash() {
        assert_eq!(route(&table(), "a0123456789abcdef.backend.8080.default.ms"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_mzms_without_resource() {
        assert_eq!(route(&table(), "a601e0c00295a9fbe.backend.8080.default.mzms"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_mesh_external_service() {
        assert_eq!(route(&table(), "afce62f771ed74b78.example.9090.default.mes"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_kri_format() {
        assert_eq!(route(&table(), "sni.msvc.default.east.backend.http"), Err(Reject::UnknownSni));
    }

    #[test]
    fn vector_no_name_nul_and_overlong() {
        let t = table();
        assert_eq!(route(&t, ""), Err(Reject::InvalidSni));
        assert_eq!(route(&t, "backend{mesh=default}\0"), Err(Reject::InvalidSni));
        assert_eq!(route(&t, "back\0end"), Err(Reject::InvalidSni));
        let long = format!("backend{{mesh=default,x={}}}", "a".repeat(250));
        assert!(long.len() > 255);
        assert_eq!(route(&t, &long), Err(Reject::InvalidSni));
    }

    #[test]
    fn malformed_tag_sni() {
        let t = table();
        assert_eq!(route(&t, "backend{"), Err(Reject::InvalidSni));
        assert_eq!(route(&t, "backend{mesh=default{mesh"), Err(Reject::InvalidSni));
        assert_eq!(route(&t, "backend{kuma.io/service=backend,mesh=default}"), Err(Reject::NotCanonical));
        assert_eq!(route(&t, "backend{mesh=default,mesh=default}"), Err(Reject::NotCanonical));
        assert_eq!(route(&t, "backend{version=v1}"), Err(Reject::NotCanonical));
    }

    #[test]
    fn entries_and_cluster_names() {
        let t = table();
        let snis: Vec<&str> = t.entries().map(|r| r.sni.as_str()).collect();
        assert_eq!(
            snis,
            vec![
                "a25502fde077cd057.redis.6379.default.ms",
                "a601e0c00295a9fbe.backend.8080.default.ms",
                "backend{mesh=default}",
                "redis{mesh=default}",
            ]
        );
        assert_eq!(t.len(), 4);
        let legacy = t.lookup("backend{mesh=default}").expect("routed");
        assert_eq!(legacy.cluster.name, "default:backend");
        assert_eq!(legacy.cluster.stat_name, "default_backend");
        assert_eq!((legacy.cluster.healthy, legacy.cluster.total), (2, 2));
        assert_eq!(legacy.kind, RouteKind::Legacy);
        assert_eq!(legacy.mesh, "default");
        assert_eq!(legacy.service, "backend");
    }

    #[test]
    fn round_robin_per_route() {
        let t = table();
        let r = t.lookup("backend{mesh=default}").expect("routed");
        let picks: Vec<SocketAddr> = (0..4).filter_map(|_| r.candidates(1).next()).collect();
        assert_eq!(picks, vec![ep(B1), ep(B2), ep(B1), ep(B2)]);
        // The MeshService route to the same endpoints has its own rotation.
        let ms = t.lookup("a601e0c00295a9fbe.backend.8080.default.ms").expect("routed");
        assert_eq!(ms.candidates(1).next(), Some(ep(B1)));
        // A second lookup returns the same route, so the rotation continues.
        let again = t.lookup("backend{mesh=default}").expect("routed");
        assert_eq!(again.candidates(1).next(), Some(ep(B1)));
    }

    #[test]
    fn candidates_try_following_endpoints() {
        let t = table();
        let r = t.lookup("backend{mesh=default}").expect("routed");
        assert_eq!(r.candidates(5).collect::<Vec<_>>(), vec![ep(B1), ep(B2)]);
        assert_eq!(r.candidates(5).collect::<Vec<_>>(), vec![ep(B2), ep(B1)]);
        assert_eq!(r.candidates(1).collect::<Vec<_>>(), vec![ep(B1)]);
        assert_eq!(r.candidates(0).count(), 0);
        // Three endpoints, two attempts: the pick and the one after it.
        let inv = inventory(
            r"
type: Dataplane
mesh: m
name: a
networking:
  address: 198.18.0.1
  inbound:
  - {port: 1, tags: {kuma.io/service: s}}
  - {port: 2, tags: {kuma.io/service: s}}
  - {port: 3, tags: {kuma.io/service: s}}
",
        );
        let t = RouteTable::build(&inv, "");
        let r = t.lookup("s{mesh=m}").expect("routed");
        let ports = |v: Vec<SocketAddr>| v.iter().map(SocketAddr::port).collect::<Vec<_>>();
        assert_eq!(ports(r.candidates(2).collect()), vec![1, 2]);
        assert_eq!(ports(r.candidates(2).collect()), vec![2, 3]);
        assert_eq!(ports(r.candidates(2).collect()), vec![3, 1]);
    }

    #[test]
    fn subset_routes_are_cached_and_share_the_cluster() {
        let t = table();
        let a = t.lookup("backend{mesh=default,version=*}").expect("routed");
        assert_eq!(a.endpoints, vec![ep(B1), ep(B2)]);
        assert_eq!(a.kind, RouteKind::Subset);
        assert_eq!(a.tags.get("version").map(String::as_str), Some("*"));
        assert_eq!(a.candidates(1).next(), Some(ep(B1)));
        let b = t.lookup("backend{mesh=default,version=*}").expect("routed");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(b.candidates(1).next(), Some(ep(B2)));
        let base = t.lookup("backend{mesh=default}").expect("routed");
        assert!(Arc::ptr_eq(&a.cluster, &base.cluster));
        assert_eq!(t.cached_subsets(), 1);
        // Rejections are not cached.
        let _ = t.lookup("backend{mesh=default,version=v3}");
        assert_eq!(t.cached_subsets(), 1);
    }

    #[test]
    fn wildcard_requires_the_key() {
        let t = table();
        assert_eq!(route(&t, "backend{mesh=default,region=*}"), Err(Reject::NoEndpoints));
    }

    #[test]
    fn subset_cache_is_bounded() {
        let t = table().with_subset_capacity(2);
        let snis = [
            "backend{mesh=default,version=v1}",
            "backend{mesh=default,version=v2}",
            "backend{mesh=default,version=*}",
            "backend{kuma.io/zone=east,mesh=default}",
        ];
        for sni in snis {
            t.lookup(sni).expect("routed");
            assert!(t.cached_subsets() <= 2);
        }
        assert_eq!(t.cached_subsets(), 2);
        // Evicted routes are rebuilt on demand.
        assert_eq!(route(&t, snis[0]), Ok(vec![ep(B1)]));
        assert_eq!(t.cached_subsets(), 2);
        // Capacity 0 still routes.
        let t = table().with_subset_capacity(0);
        assert_eq!(route(&t, snis[1]), Ok(vec![ep(B2)]));
        assert_eq!(t.cached_subsets(), 0);
        assert_eq!(SUBSET_CACHE_CAPACITY, 4096);
    }

    #[test]
    fn empty_tables() {
        assert!(RouteTable::build(&Inventory::default(), "east").is_empty());
        let only_unhealthy = inventory(
            r"
type: Dataplane
mesh: default
name: web-1
networking:
  address: 198.18.1.14
  inbound:
  - port: 80
    health: {ready: false}
    tags: {kuma.io/service: web}
",
        );
        let t = RouteTable::build(&only_unhealthy, "east");
        assert!(t.is_empty());
        assert_eq!(t.entries().count(), 0);
        assert!(!table().is_empty());
    }

    #[test]
    fn available_services_counts_distinct_tag_sets() {
        let inv = inventory(&format!(
            "{INVENTORY}---
type: Dataplane
mesh: default
name: backend-3
networking:
  address: 198.18.1.15
  inbound:
  - port: 8080
    tags:
      kuma.io/service: backend
      kuma.io/zone: east
      version: v1
"
        ));
        let t = RouteTable::build(&inv, "east");
        let services = t.available_services(&inv);
        let summary: Vec<(String, u32, Option<&str>)> = services
            .iter()
            .map(|s| (s.tags["kuma.io/service"].clone(), s.instances, s.tags.get("version").map(String::as_str)))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("backend".to_owned(), 2, Some("v1")),
                ("backend".to_owned(), 1, Some("v2")),
                ("redis".to_owned(), 1, None),
            ]
        );
        let json = serde_json::to_value(&services[2]).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "mesh": "default",
                "instances": 1,
                "tags": {"kuma.io/service": "redis"}
            })
        );
        // The legacy cluster counts all three backends.
        let r = t.lookup("backend{mesh=default}").expect("routed");
        assert_eq!(r.endpoints.len(), 3);
    }

    #[test]
    fn dataplanes_of_other_zones_are_left_out() {
        let inv = inventory(&format!(
            "{INVENTORY}---
type: Dataplane
mesh: default
name: remote-backend
labels:
  kuma.io/zone: west
networking:
  address: 198.18.2.11
  inbound:
  - port: 8080
    tags: {{kuma.io/service: backend, kuma.io/zone: west}}
"
        ));
        let t = RouteTable::build(&inv, "east");
        assert_eq!(t.foreign_dataplanes(), 1);
        assert_eq!(route(&t, "backend{mesh=default}"), Ok(vec![ep(B1), ep(B2)]));
        assert_eq!(t.available_services(&inv).len(), 3);
        // Without a zone, nothing is filtered.
        let t = RouteTable::build(&inv, "");
        assert_eq!(t.foreign_dataplanes(), 0);
        assert_eq!(route(&t, "backend{mesh=default}").map(|e| e.len()), Ok(3));
    }

    #[test]
    fn mesh_service_entries_per_port_and_only_for_dns_labels() {
        let inv = inventory(
            r"
type: Dataplane
mesh: default
name: api-1
networking:
  address: 198.18.3.1
  inbound:
  - {port: 8080, tags: {kuma.io/service: api}}
  - {port: 9090, tags: {kuma.io/service: api}}
  - {port: 9091, state: Ignored, tags: {kuma.io/service: api}}
  - {port: 7000, tags: {kuma.io/service: backend_kuma-demo_svc_7000}}
  - {port: 7001, tags: {kuma.io/service: Upper}}
",
        );
        let t = RouteTable::build(&inv, "east");
        let ms: Vec<(u16, String)> = t
            .entries()
            .filter_map(|r| match r.kind {
                RouteKind::MeshService { port } => Some((port, r.cluster.name.clone())),
                _ => None,
            })
            .collect();
        let mut ports: Vec<u16> = ms.iter().map(|(p, _)| *p).collect();
        ports.sort_unstable();
        assert_eq!(ports, vec![8080, 9090]);
        assert!(ms.iter().any(|(_, name)| name == "default_api__east_msvc_9090"));
        let sni = sni::mesh_service_sni("api", "default", 9090, ResourceKind::Ms);
        assert_eq!(route(&t, &sni), Ok(vec![ep("198.18.3.1:9090")]));
        // The legacy entries exist for all three services.
        assert!(t.lookup("backend_kuma-demo_svc_7000{mesh=default}").is_ok());
        assert!(t.lookup("Upper{mesh=default}").is_ok());
        let api = t.lookup("api{mesh=default}").expect("routed");
        assert_eq!((api.cluster.healthy, api.cluster.total), (2, 3));
    }

    #[test]
    fn dns1035_labels() {
        for ok in ["a", "backend", "multi-backend", "a1", &"a".repeat(63)] {
            assert!(is_dns1035_label(ok), "{ok}");
        }
        for bad in ["", "1a", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns1035_label(bad), "{bad}");
        }
    }

    #[test]
    fn ipv6_endpoints() {
        let inv = inventory(
            r#"
type: Dataplane
mesh: default
name: v6
networking:
  address: "2001:db8::11"
  inbound:
  - {port: 8080, tags: {kuma.io/service: backend}}
"#,
        );
        let t = RouteTable::build(&inv, "east");
        assert_eq!(route(&t, "backend{mesh=default}"), Ok(vec![ep("[2001:db8::11]:8080")]));
    }
}
