//! The control plane's resources (listeners, clusters, cluster load assignments) → a
//! [`RouteTable`] (docs/design.md#control-plane-mode).
//!
//! What a Kuma control plane sends a zone ingress, and what this takes from it:
//! - one listener with a TLS inspector and one filter chain per SNI: `filter_chain_match.
//!   server_names` and a `tcp_proxy` filter naming a cluster, with a `metadata_match` on
//!   `envoy.lb` for a subset; a listener with no service has one chain without a match whose
//!   `direct_response` is the answer to every connection;
//! - EDS clusters (or STATIC ones with their endpoints inline), with an `lb_subset_config`
//!   where subsets are used;
//! - the endpoints: IP and port, `envoy.lb` metadata (the tags), health.
//!
//! Every SNI the control plane sends becomes an entry, whatever its format: the control plane
//! is the source of truth, nothing of Kuma's naming is re-derived here. A resource this data
//! plane cannot serve faithfully (a hostname endpoint, weighted clusters, a cluster of another
//! discovery type, a chain without `tcp_proxy`) is an error: the whole update is refused
//! (NACK) and the previous table stays, as Envoy refuses an update it cannot apply.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster as XdsCluster,
                cluster::{
                    ClusterDiscoveryType, DiscoveryType, LbSubsetConfig,
                    lb_subset_config::{LbSubsetFallbackPolicy, lb_subset_selector::LbSubsetSelectorFallbackPolicy},
                },
            },
            core::v3::{HealthStatus, Metadata, address, data_source, socket_address},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier},
            listener::v3::{Filter, Listener, filter},
        },
        extensions::filters::network::{
            direct_response::v3::Config as DirectResponse,
            tcp_proxy::v3::{TcpProxy, tcp_proxy::ClusterSpecifier},
        },
    },
    google::protobuf::{Any, Struct, value::Kind},
};
use prost::Message;

use crate::routing::{Cluster, ControlPlaneRoute, RouteTable};

/// Type URLs of the resources this data plane subscribes to.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const DIRECT_RESPONSE_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config";
const TCP_PROXY_NAME: &str = "envoy.filters.network.tcp_proxy";
const DIRECT_RESPONSE_NAME: &str = "envoy.filters.network.direct_response";
/// The metadata namespace of endpoint tags and of a chain's subset match.
const LB_NAMESPACE: &str = "envoy.lb";

/// Decodes every resource of a response as `M`, checking its type URL.
///
/// # Errors
/// A resource of another type or one that does not decode (the update is refused).
pub fn decode_all<M: Message + Default>(type_url: &str, resources: &[Any]) -> Result<Vec<M>, String> {
    resources
        .iter()
        .enumerate()
        .map(|(i, any)| {
            if any.type_url != type_url {
                return Err(format!("resource {i} has type {:?}, expected {type_url:?}", any.type_url));
            }
            M::decode(any.value.as_slice()).map_err(|e| format!("resource {i} does not decode: {e}"))
        })
        .collect()
}

/// One cluster as routing needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// The cluster's name (what `tcp_proxy` refers to).
    pub name: String,
    /// `alt_stat_name`, else the name with `:` as `_`.
    pub stat_name: String,
    /// Where its endpoints come from.
    pub endpoints: EndpointSource,
    /// The subset rules, if the cluster has any.
    pub subsets: Option<LbSubsetConfig>,
}

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointSource {
    /// EDS: the load assignment of this name (`service_name`, else the cluster's name).
    Eds(String),
    /// STATIC: inline.
    Static(Vec<Member>),
    /// A cluster this data plane cannot use, and why.
    Unusable(String),
}

/// One healthy endpoint and its `envoy.lb` tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub addr: SocketAddr,
    pub tags: BTreeMap<String, String>,
}

/// A cluster load assignment: healthy members, and how many endpoints in all.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    pub members: Vec<Member>,
    pub total: usize,
}

/// Checks the clusters of a CDS response.
///
/// # Errors
/// A cluster this data plane cannot serve (module docs).
pub fn clusters(list: &[XdsCluster]) -> Result<BTreeMap<String, ClusterSpec>, String> {
    let mut out = BTreeMap::new();
    for c in list {
        let kind = match c.cluster_discovery_type {
            None => Ok(DiscoveryType::Static),
            Some(ClusterDiscoveryType::Type(t)) => Ok(DiscoveryType::try_from(t).unwrap_or(DiscoveryType::Static)),
            Some(ClusterDiscoveryType::ClusterType(_)) => Err("a custom cluster type".to_owned()),
        };
        // A cluster this data plane cannot use is kept as unusable rather than refused: the
        // control plane also sends clusters no filter chain of the ingress listener names
        // (Envoy's own admin and readiness clusters); a chain that names one closes its
        // connections and says why.
        let endpoints = match kind {
            Ok(DiscoveryType::Eds) => {
                let service = c.eds_cluster_config.as_ref().map(|e| e.service_name.clone()).unwrap_or_default();
                EndpointSource::Eds(if service.is_empty() { c.name.clone() } else { service })
            }
            Ok(DiscoveryType::Static) => match c.load_assignment.as_ref().map(assignment).transpose() {
                Ok(a) => EndpointSource::Static(a.unwrap_or_default().members),
                Err(e) => EndpointSource::Unusable(e),
            },
            Ok(other) => EndpointSource::Unusable(format!(
                "discovery type {} is not supported (EDS and STATIC are)",
                other.as_str_name()
            )),
            Err(e) => EndpointSource::Unusable(format!("{e} is not supported")),
        };
        let stat_name = if c.alt_stat_name.is_empty() { c.name.replace(':', "_") } else { c.alt_stat_name.clone() };
        let spec = ClusterSpec { name: c.name.clone(), stat_name, endpoints, subsets: c.lb_subset_config.clone() };
        if out.insert(c.name.clone(), spec).is_some() {
            return Err(format!("cluster {:?} appears twice", c.name));
        }
    }
    Ok(out)
}

/// Checks the load assignments of an EDS response.
///
/// # Errors
/// An endpoint that is not an IP address and port.
pub fn assignments(list: &[ClusterLoadAssignment]) -> Result<BTreeMap<String, Assignment>, String> {
    list.iter().map(|cla| Ok((cla.cluster_name.clone(), assignment(cla)?))).collect()
}

fn assignment(cla: &ClusterLoadAssignment) -> Result<Assignment, String> {
    let mut out = Assignment::default();
    for locality in &cla.endpoints {
        for lb in &locality.lb_endpoints {
            let Some(HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
                return Err(format!("cluster {:?}: an endpoint without an address", cla.cluster_name));
            };
            let Some(address::Address::SocketAddress(sa)) = endpoint.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(format!("cluster {:?}: an endpoint that is not a socket address", cla.cluster_name));
            };
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                format!("cluster {:?}: endpoint address {:?} is not an IP address", cla.cluster_name, sa.address)
            })?;
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier.clone() else {
                return Err(format!("cluster {:?}: endpoint {ip} has no port number", cla.cluster_name));
            };
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("cluster {:?}: endpoint {ip} has port {port}", cla.cluster_name))?;
            out.total += 1;
            // Envoy balances over healthy hosts; UNKNOWN is what a control plane without health
            // checks sends.
            let health = HealthStatus::try_from(lb.health_status).unwrap_or(HealthStatus::Unknown);
            if matches!(health, HealthStatus::Unknown | HealthStatus::Healthy) {
                out.members.push(Member { addr: SocketAddr::new(ip, port), tags: lb_tags(lb.metadata.as_ref()) });
            }
        }
    }
    Ok(out)
}

/// The string values of the `envoy.lb` namespace.
fn lb_tags(metadata: Option<&Metadata>) -> BTreeMap<String, String> {
    metadata.and_then(|m| m.filter_metadata.get(LB_NAMESPACE)).map(string_fields).unwrap_or_default()
}

fn string_fields(s: &Struct) -> BTreeMap<String, String> {
    s.fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(v)) => Some((k.clone(), v.clone())),
            Some(Kind::NumberValue(n)) => Some((k.clone(), n.to_string())),
            Some(Kind::BoolValue(b)) => Some((k.clone(), b.to_string())),
            _ => None,
        })
        .collect()
}

/// One filter chain's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub snis: Vec<String>,
    pub cluster: String,
    pub tags: BTreeMap<String, String>,
}

/// What the listeners of an LDS response say.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listeners {
    /// The SNI chains, in order.
    pub chains: Vec<Chain>,
    /// The default chain's `direct_response`, if any.
    pub default_answer: Option<Vec<u8>>,
    /// The listeners' addresses (to compare with the one this data plane binds).
    pub addresses: Vec<SocketAddr>,
    /// Listeners left aside: none of their chains proxies TCP or answers directly (Kuma's
    /// `kuma:envoy:admin`, an HTTP listener for Envoy's own admin API, which the admin server
    /// of this data plane replaces).
    pub skipped: Vec<String>,
}

/// Checks the listeners of an LDS response.
///
/// # Errors
/// A chain this data plane cannot serve (module docs).
pub fn listeners(list: &[Listener]) -> Result<Listeners, String> {
    let mut out = Listeners::default();
    for l in list {
        let serves =
            |f: &Filter| is(f, TCP_PROXY_NAME, TCP_PROXY_TYPE) || is(f, DIRECT_RESPONSE_NAME, DIRECT_RESPONSE_TYPE);
        if !l.filter_chains.iter().chain(l.default_filter_chain.as_ref()).any(|c| c.filters.iter().any(serves)) {
            out.skipped.push(l.name.clone());
            continue;
        }
        if let Some(address::Address::SocketAddress(sa)) = l.address.as_ref().and_then(|a| a.address.as_ref())
            && let (Ok(ip), Some(socket_address::PortSpecifier::PortValue(port))) =
                (sa.address.parse::<IpAddr>(), sa.port_specifier.clone())
            && let Ok(port) = u16::try_from(port)
        {
            out.addresses.push(SocketAddr::new(ip, port));
        }
        for (i, chain) in l.filter_chains.iter().chain(l.default_filter_chain.as_ref()).enumerate() {
            let at = || format!("listener {:?}, filter chain {i}", l.name);
            let snis = chain.filter_chain_match.as_ref().map(|m| m.server_names.clone()).unwrap_or_default();
            if let Some(f) = chain.filters.iter().find(|f| is(f, TCP_PROXY_NAME, TCP_PROXY_TYPE)) {
                let proxy: TcpProxy = typed(f).map_err(|e| format!("{}: {e}", at()))?;
                let cluster = match proxy.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => c,
                    Some(ClusterSpecifier::WeightedClusters(_)) => {
                        return Err(format!("{}: weighted clusters are not supported", at()));
                    }
                    _ => return Err(format!("{}: tcp_proxy names no cluster", at())),
                };
                if snis.is_empty() {
                    return Err(format!("{}: a tcp_proxy chain without server_names is not supported", at()));
                }
                if let Some(bad) = snis.iter().find(|s| s.starts_with('*') || s.is_empty()) {
                    return Err(format!("{}: wildcard or empty server name {bad:?} is not supported", at()));
                }
                let tags = proxy.metadata_match.as_ref().map(|m| lb_tags(Some(m))).unwrap_or_default();
                out.chains.push(Chain { snis, cluster, tags });
            } else if let Some(f) = chain.filters.iter().find(|f| is(f, DIRECT_RESPONSE_NAME, DIRECT_RESPONSE_TYPE)) {
                let config: DirectResponse = typed(f).map_err(|e| format!("{}: {e}", at()))?;
                let bytes = match config.response.and_then(|r| r.specifier) {
                    Some(data_source::Specifier::InlineBytes(b)) => b,
                    Some(data_source::Specifier::InlineString(s)) => s.into_bytes(),
                    None => Vec::new(),
                    Some(_) => return Err(format!("{}: direct_response must be inline", at())),
                };
                if !snis.is_empty() {
                    return Err(format!("{}: a direct_response chain with server_names is not supported", at()));
                }
                out.default_answer = Some(bytes);
            } else {
                let names: Vec<&str> = chain.filters.iter().map(|f| f.name.as_str()).collect();
                return Err(format!("{}: no tcp_proxy or direct_response filter (filters: {names:?})", at()));
            }
        }
    }
    Ok(out)
}

/// The filter is `name`, or its typed config is of `type_url`.
fn is(f: &Filter, name: &str, type_url: &str) -> bool {
    f.name == name || matches!(&f.config_type, Some(filter::ConfigType::TypedConfig(any)) if any.type_url == type_url)
}

fn typed<M: Message + Default>(f: &Filter) -> Result<M, String> {
    match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => {
            M::decode(any.value.as_slice()).map_err(|e| format!("filter {:?} does not decode: {e}", f.name))
        }
        _ => Err(format!("filter {:?} has no typed_config", f.name)),
    }
}

/// The route table of a complete configuration, and the (SNI, cluster) pairs whose cluster the
/// configuration does not have: those SNIs are known but their connections are closed, as
/// Envoy's `tcp_proxy` closes them.
#[must_use]
pub fn table(
    zone: &str,
    listeners: &Listeners,
    clusters: &BTreeMap<String, ClusterSpec>,
    assignments: &BTreeMap<String, Assignment>,
) -> (RouteTable, Vec<(String, String)>) {
    let mut shared: HashMap<&str, (Arc<Cluster>, Vec<Member>)> = HashMap::new();
    let mut entries = Vec::new();
    let mut missing = Vec::new();
    for chain in &listeners.chains {
        let Some(spec) = clusters.get(&chain.cluster) else {
            for sni in &chain.snis {
                missing.push((sni.clone(), chain.cluster.clone()));
                entries.push(ControlPlaneRoute {
                    sni: sni.clone(),
                    cluster: Arc::new(Cluster::new(chain.cluster.clone(), 0, 0)),
                    tags: chain.tags.clone(),
                    endpoints: Vec::new(),
                });
            }
            continue;
        };
        let (cluster, members) = shared.entry(spec.name.as_str()).or_insert_with(|| {
            let (members, total) = match &spec.endpoints {
                EndpointSource::Static(m) => (m.clone(), m.len()),
                EndpointSource::Unusable(_) => (Vec::new(), 0),
                // An EDS cluster whose assignment has not come has no endpoint, as in Envoy.
                EndpointSource::Eds(name) => {
                    assignments.get(name).map(|a| (a.members.clone(), a.total)).unwrap_or_default()
                }
            };
            let mut cluster = Cluster::new(spec.name.clone(), members.len(), total);
            cluster.stat_name.clone_from(&spec.stat_name);
            (Arc::new(cluster), members)
        });
        let endpoints = select(spec.subsets.as_ref(), &chain.tags, members);
        for sni in &chain.snis {
            entries.push(ControlPlaneRoute {
                sni: sni.clone(),
                cluster: Arc::clone(cluster),
                tags: chain.tags.clone(),
                endpoints: endpoints.clone(),
            });
        }
    }
    (RouteTable::from_control_plane(zone, entries, listeners.default_answer.clone()), missing)
}

/// Envoy's subset load balancer for one `metadata_match`: the members whose tags hold every
/// key of `wanted` when a selector has exactly those keys, with the selector's (else the
/// cluster's) fallback when none does; without subset rules, every member.
fn select(subsets: Option<&LbSubsetConfig>, wanted: &BTreeMap<String, String>, members: &[Member]) -> Vec<SocketAddr> {
    let all = || members.iter().map(|m| m.addr).collect();
    let Some(config) = subsets else {
        return all();
    };
    if wanted.is_empty() {
        return all();
    }
    let matching = |want: &BTreeMap<String, String>| -> Vec<SocketAddr> {
        members.iter().filter(|m| want.iter().all(|(k, v)| m.tags.get(k) == Some(v))).map(|m| m.addr).collect()
    };
    let top_fallback = || match LbSubsetFallbackPolicy::try_from(config.fallback_policy) {
        Ok(LbSubsetFallbackPolicy::AnyEndpoint) => all(),
        Ok(LbSubsetFallbackPolicy::DefaultSubset) => {
            config.default_subset.as_ref().map_or_else(all, |d| matching(&string_fields(d)))
        }
        _ => Vec::new(),
    };
    let selector = config
        .subset_selectors
        .iter()
        .find(|s| s.keys.len() == wanted.len() && s.keys.iter().all(|k| wanted.contains_key(k)));
    let Some(selector) = selector else {
        return top_fallback();
    };
    let found = matching(wanted);
    if !found.is_empty() {
        return found;
    }
    match LbSubsetSelectorFallbackPolicy::try_from(selector.fallback_policy) {
        Ok(LbSubsetSelectorFallbackPolicy::NoFallback) => Vec::new(),
        Ok(LbSubsetSelectorFallbackPolicy::AnyEndpoint) => all(),
        Ok(LbSubsetSelectorFallbackPolicy::DefaultSubset) => {
            config.default_subset.as_ref().map_or_else(all, |d| matching(&string_fields(d)))
        }
        _ => top_fallback(),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::{
        envoy::config::{
            cluster::v3::cluster::lb_subset_config::LbSubsetSelector,
            core::v3::{Address, SocketAddress},
            endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints},
            listener::v3::{FilterChain, FilterChainMatch},
        },
        google::protobuf::Value,
    };

    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn member(addr: &str, t: &[(&str, &str)]) -> Member {
        Member { addr: addr.parse().expect("addr"), tags: tags(t) }
    }

    fn subsets(fallback: LbSubsetFallbackPolicy, selector_fallback: LbSubsetSelectorFallbackPolicy) -> LbSubsetConfig {
        LbSubsetConfig {
            fallback_policy: fallback as i32,
            subset_selectors: vec![LbSubsetSelector {
                keys: vec!["version".into()],
                fallback_policy: selector_fallback as i32,
                ..LbSubsetSelector::default()
            }],
            ..LbSubsetConfig::default()
        }
    }

    fn addrs(v: &[SocketAddr]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn subset_selection_follows_envoy() {
        let members = [member("198.18.1.2:80", &[("version", "v1")]), member("198.18.2.2:80", &[("version", "v2")])];
        let kuma = subsets(LbSubsetFallbackPolicy::AnyEndpoint, LbSubsetSelectorFallbackPolicy::NoFallback);
        // A selector with exactly the match's keys: its members only.
        assert_eq!(addrs(&select(Some(&kuma), &tags(&[("version", "v2")]), &members)), ["198.18.2.2:80"]);
        // The selector matches no endpoint: NO_FALLBACK means none.
        assert!(select(Some(&kuma), &tags(&[("version", "v3")]), &members).is_empty());
        // No selector for these keys: the cluster's fallback (any endpoint).
        assert_eq!(select(Some(&kuma), &tags(&[("region", "eu")]), &members).len(), 2);
        let strict = subsets(LbSubsetFallbackPolicy::NoFallback, LbSubsetSelectorFallbackPolicy::NotDefined);
        assert!(select(Some(&strict), &tags(&[("region", "eu")]), &members).is_empty());
        // NOT_DEFINED inherits the cluster's policy.
        assert!(select(Some(&strict), &tags(&[("version", "v3")]), &members).is_empty());
        // Without subset rules or without a match: every endpoint.
        assert_eq!(select(None, &tags(&[("version", "v2")]), &members).len(), 2);
        assert_eq!(select(Some(&kuma), &BTreeMap::new(), &members).len(), 2);
    }

    fn endpoint(address: &str, port: u32, health: HealthStatus, t: &[(&str, &str)]) -> LbEndpoint {
        let mut meta = HashMap::new();
        meta.insert(
            LB_NAMESPACE.to_owned(),
            Struct {
                fields: t
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Value { kind: Some(Kind::StringValue((*v).to_owned())) }))
                    .collect(),
            },
        );
        LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: address.to_owned(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                        ..SocketAddress::default()
                    })),
                }),
                ..Endpoint::default()
            })),
            health_status: health as i32,
            metadata: Some(Metadata { filter_metadata: meta, ..Metadata::default() }),
            ..LbEndpoint::default()
        }
    }

    fn cla(endpoints: Vec<LbEndpoint>) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: "default:backend".into(),
            endpoints: vec![LocalityLbEndpoints { lb_endpoints: endpoints, ..LocalityLbEndpoints::default() }],
            ..ClusterLoadAssignment::default()
        }
    }

    #[test]
    fn assignments_keep_healthy_ip_endpoints_with_their_tags() {
        let a = assignments(&[cla(vec![
            endpoint("198.18.1.2", 8080, HealthStatus::Unknown, &[("version", "v1")]),
            endpoint("2001:2:0:2::2", 8080, HealthStatus::Healthy, &[]),
            endpoint("198.18.3.2", 8080, HealthStatus::Unhealthy, &[]),
        ])])
        .expect("valid");
        let a = &a["default:backend"];
        assert_eq!(a.total, 3);
        assert_eq!(
            a.members.iter().map(|m| m.addr.to_string()).collect::<Vec<_>>(),
            ["198.18.1.2:8080", "[2001:2:0:2::2]:8080"]
        );
        assert_eq!(a.members[0].tags, tags(&[("version", "v1")]));
    }

    #[test]
    fn endpoints_that_are_not_ip_and_port_are_refused() {
        let e =
            assignments(&[cla(vec![endpoint("backend.svc", 80, HealthStatus::Unknown, &[])])]).expect_err("hostname");
        assert!(e.contains("not an IP address"), "{e}");
        let e = assignments(&[cla(vec![endpoint("198.18.1.2", 0, HealthStatus::Unknown, &[])])]).expect_err("port 0");
        assert!(e.contains("port 0"), "{e}");
        let e = assignments(&[cla(vec![endpoint("198.18.1.2", 70000, HealthStatus::Unknown, &[])])]).expect_err("big");
        assert!(e.contains("70000"), "{e}");
    }

    fn chain(snis: &[&str], filters: Vec<Filter>) -> FilterChain {
        FilterChain {
            filter_chain_match: (!snis.is_empty()).then(|| FilterChainMatch {
                server_names: snis.iter().map(|s| (*s).to_owned()).collect(),
                ..FilterChainMatch::default()
            }),
            filters,
            ..FilterChain::default()
        }
    }

    fn tcp_proxy(spec: ClusterSpecifier) -> Filter {
        let proxy = TcpProxy { cluster_specifier: Some(spec), ..TcpProxy::default() };
        Filter {
            name: TCP_PROXY_NAME.into(),
            config_type: Some(filter::ConfigType::TypedConfig(Any {
                type_url: TCP_PROXY_TYPE.into(),
                value: proxy.encode_to_vec(),
            })),
        }
    }

    #[test]
    fn listeners_give_chains_and_refuse_what_cannot_be_served() {
        let l = Listener {
            name: "inbound:198.18.0.2:10001".into(),
            filter_chains: vec![chain(
                &["a{mesh=m}", "b{mesh=m}"],
                vec![tcp_proxy(ClusterSpecifier::Cluster("m:a".into()))],
            )],
            ..Listener::default()
        };
        let got = listeners(&[l]).expect("valid");
        assert_eq!(
            got.chains,
            [Chain {
                snis: vec!["a{mesh=m}".into(), "b{mesh=m}".into()],
                cluster: "m:a".into(),
                tags: BTreeMap::new()
            }]
        );
        let weighted = Listener {
            filter_chains: vec![chain(&["a"], vec![tcp_proxy(ClusterSpecifier::WeightedClusters(Default::default()))])],
            ..Listener::default()
        };
        assert!(listeners(&[weighted]).expect_err("weighted").contains("weighted clusters"));
        let catch_all = Listener {
            filter_chains: vec![chain(&[], vec![tcp_proxy(ClusterSpecifier::Cluster("m:a".into()))])],
            ..Listener::default()
        };
        assert!(listeners(&[catch_all]).expect_err("no SNI").contains("without server_names"));
        let half = Listener {
            filter_chains: vec![
                chain(&["a"], vec![tcp_proxy(ClusterSpecifier::Cluster("m:a".into()))]),
                chain(&["b"], vec![]),
            ],
            ..Listener::default()
        };
        assert!(listeners(&[half]).expect_err("a chain that serves nothing").contains("no tcp_proxy"));
        // Envoy's admin listener (HTTP only) is left aside, not refused.
        let admin = Listener {
            name: "kuma:envoy:admin".into(),
            filter_chains: vec![chain(
                &[],
                vec![Filter { name: "envoy.filters.network.http_connection_manager".into(), config_type: None }],
            )],
            ..Listener::default()
        };
        let got = listeners(&[admin]).expect("skipped");
        assert_eq!(got.skipped, ["kuma:envoy:admin"]);
        assert!(got.chains.is_empty());
    }

    #[test]
    fn clusters_this_data_plane_cannot_use_are_kept_as_unusable() {
        let dns = XdsCluster {
            name: "kuma:readiness".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32)),
            ..XdsCluster::default()
        };
        let got = clusters(&[dns]).expect("not refused");
        assert!(
            matches!(&got["kuma:readiness"].endpoints, EndpointSource::Unusable(why) if why.contains("STRICT_DNS"))
        );
    }

    #[test]
    fn a_chain_to_a_missing_cluster_is_known_but_closed() {
        let l = Listeners {
            chains: vec![Chain { snis: vec!["x{mesh=m}".into()], cluster: "m:x".into(), tags: BTreeMap::new() }],
            ..Listeners::default()
        };
        let (table, missing) = table("east", &l, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(missing, [("x{mesh=m}".to_owned(), "m:x".to_owned())]);
        assert_eq!(table.lookup("x{mesh=m}").map(|_| ()), Err(crate::routing::Reject::NoEndpoints));
        assert_eq!(table.lookup("y{mesh=m}").map(|_| ()), Err(crate::routing::Reject::UnknownSni));
    }
}
