//! A control plane for tests that speaks Kuma's real protocols: the dataplane server's HTTP
//! `POST /bootstrap` (over TLS) and an ADS gRPC server (over TLS, the dataplane token checked as
//! kuma-cp checks it on the stream), built from the same Envoy API crates as the daemon. It
//! serves configurations shaped as Kuma's zone-ingress generator emits them ([`kuma_ingress`])
//! and records what the proxy sent: bootstrap requests, stream metadata, every discovery
//! request (ACKs and NACKs), streams closed.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use base64::Engine as _;
use bytes::Bytes;
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{
                    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbSubsetConfig,
                    lb_subset_config::{
                        LbSubsetFallbackPolicy, LbSubsetSelector, lb_subset_selector::LbSubsetSelectorFallbackPolicy,
                    },
                },
            },
            core::v3::{
                Address, ConfigSource, Metadata, SocketAddress, address, config_source::ConfigSourceSpecifier,
                socket_address::PortSpecifier,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
            },
            listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter},
        },
        extensions::filters::{
            listener::tls_inspector::v3::TlsInspector,
            network::tcp_proxy::v3::{TcpProxy, tcp_proxy::ClusterSpecifier},
        },
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
        },
    },
    google::protobuf::{Any, Struct, Value, value::Kind},
};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{
    Status,
    transport::{Identity, Server, ServerTlsConfig},
};

use crate::pki::{Leaf, Pki};

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The resources served, with their version.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub version: u64,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    pub assignments: Vec<ClusterLoadAssignment>,
}

/// A discovery request as received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub type_url: String,
    pub version_info: String,
    pub nonce: String,
    pub names: Vec<String>,
    /// The NACK's reason.
    pub error: Option<String>,
}

/// What the proxy sent, for assertions.
#[derive(Default)]
pub struct Record {
    /// Bootstrap request bodies (JSON).
    pub bootstraps: Mutex<Vec<serde_json::Value>>,
    /// `authorization` metadata of each ADS stream opened (accepted or not).
    pub stream_tokens: Mutex<Vec<String>>,
    /// Node ids sent on the streams' first requests.
    pub nodes: Mutex<Vec<String>>,
    pub requests: Mutex<Vec<Seen>>,
    /// Streams the proxy ended.
    pub closed: AtomicUsize,
}

impl Record {
    /// The requests of `type_url` carrying `error` (NACKs) or not (ACKs of a response).
    #[must_use]
    pub fn acks(&self, type_url: &str, nack: bool) -> Vec<Seen> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.type_url == type_url && !r.nonce.is_empty() && r.error.is_some() == nack)
            .cloned()
            .collect()
    }
}

/// The running control plane. [`ControlPlane::stop`] ends both servers (streams included).
pub struct ControlPlane {
    pub bootstrap_addr: SocketAddr,
    pub ads_addr: SocketAddr,
    pub record: Arc<Record>,
    config: watch::Sender<Config>,
    token: String,
    tasks: Vec<JoinHandle<()>>,
    stream_tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// The name the control plane's certificate carries and the proxy checks.
pub const CP_NAME: &str = "cp.zone-ingress.test";

impl ControlPlane {
    /// Starts both servers on `bootstrap` and `ads` (listeners bound where the test wants them,
    /// e.g. in a namespace), with a certificate for [`CP_NAME`] from `pki`, accepting `token`.
    pub fn start(bootstrap: TcpListener, ads: TcpListener, pki: &Pki, token: &str, config: Config) -> Self {
        let (config, _) = watch::channel(config);
        Self::start_with(bootstrap, ads, pki, token, config, Arc::new(Record::default()))
    }

    fn start_with(
        bootstrap: TcpListener,
        ads: TcpListener,
        pki: &Pki,
        token: &str,
        config: watch::Sender<Config>,
        record: Arc<Record>,
    ) -> Self {
        let bootstrap_addr = bootstrap.local_addr().expect("addr");
        // The URL names the IP; the bootstrap names CP_NAME for the ADS server, as kuma-cp's
        // certificate carries both.
        let leaf = pki.leaf(CP_NAME, &[CP_NAME, &bootstrap_addr.ip().to_string()]);
        let ads_addr = ads.local_addr().expect("addr");
        let stream_tasks = Arc::new(Mutex::new(Vec::new()));
        let http = tokio::spawn(serve_bootstrap(
            bootstrap,
            tls_server(&leaf),
            ads_addr,
            pki.ca_pem.clone(),
            Arc::clone(&record),
        ));
        let service = Ads {
            config: config.clone(),
            token: token.to_owned(),
            record: Arc::clone(&record),
            tasks: Arc::clone(&stream_tasks),
        };
        let identity = Identity::from_pem(&leaf.cert_pem, &leaf.key_pem);
        let grpc = tokio::spawn(async move {
            let _ = Server::builder()
                .tls_config(ServerTlsConfig::new().identity(identity))
                .expect("tls")
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(ads))
                .await;
        });
        Self {
            bootstrap_addr,
            ads_addr,
            record,
            config,
            token: token.to_owned(),
            tasks: vec![http, grpc],
            stream_tasks,
        }
    }

    /// Serves `config` from now on (pushed to every open stream).
    pub fn set(&self, mut config: Config) {
        config.version = self.config.borrow().version + 1;
        self.config.send_replace(config);
    }

    /// The configuration served now.
    #[must_use]
    pub fn current(&self) -> Config {
        self.config.borrow().clone()
    }

    /// Stops both servers and drops every stream (a control plane going away).
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        for t in self.stream_tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
    }

    /// The token accepted by the next start (a rotated token).
    pub fn set_token(&mut self, token: &str) {
        token.clone_into(&mut self.token);
    }

    /// Starts again on new listeners, with the same configuration, token and record.
    pub fn restart(&mut self, bootstrap: TcpListener, ads: TcpListener, pki: &Pki) {
        self.stop();
        let fresh = Self::start_with(bootstrap, ads, pki, &self.token, self.config.clone(), Arc::clone(&self.record));
        *self = fresh;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tls_server(leaf: &Leaf) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
        .expect("cert");
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// kuma-cp's `/bootstrap`: the request recorded; 422 without a token (as kuma-cp's
/// `DpTokenRequired`); else an Envoy bootstrap naming `ads` as the ADS cluster, with the CA,
/// the TLS name and the token as the stream's `authorization`.
async fn serve_bootstrap(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    ads: SocketAddr,
    ca_pem: String,
    record: Arc<Record>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let tls = tls.clone();
        let record = Arc::clone(&record);
        let ca_pem = ca_pem.clone();
        tokio::spawn(async move {
            let Ok(stream) = tls.accept(tcp).await else { return };
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let record = Arc::clone(&record);
                let ca_pem = ca_pem.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(bootstrap_answer(&path, &body, ads, &ca_pem, &record))
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn bootstrap_answer(path: &str, body: &[u8], ads: SocketAddr, ca_pem: &str, record: &Record) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder().status(status).body(Full::new(Bytes::from(body))).expect("response")
    };
    if path != "/bootstrap" {
        return reply(StatusCode::NOT_FOUND, "404: Page Not Found".into());
    }
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return reply(StatusCode::BAD_REQUEST, "not JSON".into());
    };
    record.bootstraps.lock().expect("lock").push(request.clone());
    let token = request["dataplaneToken"].as_str().unwrap_or_default().to_owned();
    if token.is_empty() {
        return reply(StatusCode::UNPROCESSABLE_ENTITY, "Dataplane Token is required. Generate token using 'kumactl generate dataplane-token > /path/file' and provide it via --dataplane-token-file=/path/file argument to Kuma DP".into());
    }
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let name = request["name"].as_str().unwrap_or_default();
    let mesh = request["mesh"].as_str().unwrap_or_default();
    // Kuma's bootstrap (template_v3.go), in its camelCase JSON spelling, trimmed to what a
    // zone ingress uses.
    let yaml = format!(
        r#"dynamicResources:
  adsConfig:
    apiType: GRPC
    grpcServices:
    - envoyGrpc:
        clusterName: ads_cluster
      initialMetadata:
      - key: authorization
        value: "{token}"
    setNodeOnFirstMessageOnly: true
    transportApiVersion: V3
  cdsConfig:
    ads: {{}}
    initialFetchTimeout: 0s
    resourceApiVersion: V3
  ldsConfig:
    ads: {{}}
    initialFetchTimeout: 0s
    resourceApiVersion: V3
node:
  cluster: ingress
  id: "{mesh}.{name}"
  metadata:
    dataplane.proxyType: ingress
    dataplane.resource: {resource}
staticResources:
  clusters:
  - connectTimeout: 1s
    loadAssignment:
      clusterName: ads_cluster
      endpoints:
      - lbEndpoints:
        - endpoint:
            address:
              socketAddress:
                address: "{ip}"
                portValue: {port}
    name: ads_cluster
    transportSocket:
      name: envoy.transport_sockets.tls
      typedConfig:
        '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {CP_NAME}
    type: STATIC
  secrets:
  - name: cp_validation_ctx
    validationContext:
      trustedCa:
        inlineBytes: {ca}
"#,
        resource = serde_json::to_string(request["dataplaneResource"].as_str().unwrap_or_default()).expect("json"),
        ip = ads.ip(),
        port = ads.port(),
        ca = b64(ca_pem),
    );
    let answer =
        serde_json::json!({"bootstrap": b64(&yaml), "kumaSidecarConfiguration": {"networking": {}, "metrics": {}}});
    let mut r = reply(StatusCode::OK, answer.to_string());
    r.headers_mut().insert("kuma-bootstrap-version", "3".parse().expect("header"));
    r
}

struct Ads {
    config: watch::Sender<Config>,
    token: String,
    record: Arc<Record>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::codegen::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, Status> {
        let token =
            request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        self.record.stream_tokens.lock().expect("lock").push(token.clone());
        if token != self.token {
            return Err(Status::unauthenticated("authentication failed: invalid dataplane token"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let record = Arc::clone(&self.record);
        let mut config = self.config.subscribe();
        let task = tokio::spawn(async move {
            let mut subscribed: HashMap<String, Vec<String>> = HashMap::new();
            let mut nonce = 0u64;
            loop {
                let push: Vec<String> = tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(r)) = msg else {
                            record.closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        };
                        if let Some(node) = &r.node {
                            record.nodes.lock().expect("lock").push(node.id.clone());
                        }
                        record.requests.lock().expect("lock").push(Seen {
                            type_url: r.type_url.clone(),
                            version_info: r.version_info.clone(),
                            nonce: r.response_nonce.clone(),
                            names: r.resource_names.clone(),
                            error: r.error_detail.as_ref().map(|e| e.message.clone()),
                        });
                        let changed = subscribed.get(&r.type_url) != Some(&r.resource_names);
                        let new = r.response_nonce.is_empty() || changed;
                        subscribed.insert(r.type_url.clone(), r.resource_names.clone());
                        if new { vec![r.type_url] } else { Vec::new() }
                    }
                    c = config.changed() => {
                        if c.is_err() {
                            return;
                        }
                        // Clusters first, then endpoints, then listeners, as go-control-plane
                        // orders an ADS push.
                        [CLUSTER, ENDPOINTS, LISTENER].iter().filter(|t| subscribed.contains_key(**t)).map(|t| (*t).to_owned()).collect()
                    }
                };
                for type_url in push {
                    nonce += 1;
                    let names = subscribed.get(&type_url).cloned().unwrap_or_default();
                    let response = respond(&config.borrow(), &type_url, &names, nonce);
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        self.tasks.lock().expect("lock").push(task);
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaResponses>, Status> {
        Err(Status::unimplemented("delta xDS is not served here"))
    }
}

fn respond(config: &Config, type_url: &str, names: &[String], nonce: u64) -> DiscoveryResponse {
    let any = |value: Vec<u8>| Any { type_url: type_url.to_owned(), value };
    let resources: Vec<Any> = match type_url {
        LISTENER => config.listeners.iter().map(|l| any(l.encode_to_vec())).collect(),
        CLUSTER => config.clusters.iter().map(|c| any(c.encode_to_vec())).collect(),
        ENDPOINTS => config
            .assignments
            .iter()
            .filter(|a| names.is_empty() || names.contains(&a.cluster_name))
            .map(|a| any(a.encode_to_vec()))
            .collect(),
        _ => Vec::new(),
    };
    DiscoveryResponse {
        version_info: config.version.to_string(),
        resources,
        type_url: type_url.to_owned(),
        nonce: nonce.to_string(),
        ..DiscoveryResponse::default()
    }
}

/// One service of the zone as the generator sees it.
#[derive(Clone, Debug)]
pub struct Service {
    /// Kuma's cluster name (`mesh:service`, or a MeshService's `mesh_name_ns_zone_msvc_port`).
    pub cluster: String,
    /// Endpoints with their tags (`envoy.lb` metadata).
    pub endpoints: Vec<(SocketAddr, BTreeMap<String, String>)>,
    /// Tag keys a subset selector exists for (Kuma: the keys policies use).
    pub subset_keys: Vec<Vec<String>>,
    /// The SNIs routed to it, each with its `metadata_match` (empty: the whole service).
    pub snis: Vec<(String, BTreeMap<String, String>)>,
}

fn string_struct(map: &BTreeMap<String, String>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), Value { kind: Some(Kind::StringValue(v.clone())) })).collect(),
    }
}

fn lb_metadata(tags: &BTreeMap<String, String>) -> Metadata {
    let mut filter_metadata = HashMap::new();
    filter_metadata.insert("envoy.lb".to_owned(), string_struct(tags));
    filter_metadata.insert("envoy.transport_socket_match".to_owned(), string_struct(tags));
    Metadata { filter_metadata, ..Metadata::default() }
}

fn socket(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
            ..SocketAddress::default()
        })),
    }
}

/// An endpoint assignment for `cluster` (any addresses, for updates and bad inputs).
#[must_use]
pub fn assignment(cluster: &str, endpoints: &[(SocketAddr, BTreeMap<String, String>)]) -> ClusterLoadAssignment {
    let lb_endpoints = endpoints
        .iter()
        .map(|(addr, tags)| LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(*addr)),
                ..Endpoint::default()
            })),
            metadata: Some(lb_metadata(tags)),
            load_balancing_weight: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 1 }),
            ..LbEndpoint::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: cluster.to_owned(),
        endpoints: vec![LocalityLbEndpoints { lb_endpoints, ..LocalityLbEndpoints::default() }],
        ..ClusterLoadAssignment::default()
    }
}

/// The configuration Kuma's zone-ingress generator emits for `services` on `listen`: one
/// `inbound:IP:PORT` listener with the TLS inspector and one filter chain per SNI (TLS
/// transport, `tcp_proxy` with `metadata_match` for a subset), EDS clusters with an LB subset
/// config (any endpoint when no selector matches; no fallback within a selector), and their
/// assignments. No service: the default chain's `direct_response` with `{"proxy","zone"}`.
/// Kuma's admin listener (HTTP) and its static clusters come with it, as they do from kuma-cp.
#[must_use]
pub fn kuma_ingress(listen: SocketAddr, services: &[Service], proxy: &str, zone: &str) -> Config {
    let any = |type_url: &str, value: Vec<u8>| Any { type_url: type_url.to_owned(), value };
    let mut chains = Vec::new();
    let mut clusters = Vec::new();
    let mut assignments = Vec::new();
    for s in services {
        for (sni, tags) in &s.snis {
            let proxy = TcpProxy {
                stat_prefix: s.cluster.replace(':', "_"),
                cluster_specifier: Some(ClusterSpecifier::Cluster(s.cluster.clone())),
                metadata_match: (!tags.is_empty()).then(|| {
                    let mut m = HashMap::new();
                    m.insert("envoy.lb".to_owned(), string_struct(tags));
                    Metadata { filter_metadata: m, ..Metadata::default() }
                }),
                ..TcpProxy::default()
            };
            chains.push(FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    server_names: vec![sni.clone()],
                    transport_protocol: "tls".to_owned(),
                    ..FilterChainMatch::default()
                }),
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(
                        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        proxy.encode_to_vec(),
                    ))),
                }],
                ..FilterChain::default()
            });
        }
        clusters.push(Cluster {
            name: s.cluster.clone(),
            alt_stat_name: s.cluster.replace(':', "_"),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                eds_config: Some(ConfigSource {
                    config_source_specifier: Some(ConfigSourceSpecifier::Ads(Default::default())),
                    ..ConfigSource::default()
                }),
                ..EdsClusterConfig::default()
            }),
            lb_subset_config: (!s.subset_keys.is_empty()).then(|| LbSubsetConfig {
                fallback_policy: LbSubsetFallbackPolicy::AnyEndpoint as i32,
                subset_selectors: s
                    .subset_keys
                    .iter()
                    .map(|keys| LbSubsetSelector {
                        keys: keys.clone(),
                        fallback_policy: LbSubsetSelectorFallbackPolicy::NoFallback as i32,
                        ..LbSubsetSelector::default()
                    })
                    .collect(),
                ..LbSubsetConfig::default()
            }),
            ..Cluster::default()
        });
        assignments.push(assignment(&s.cluster, &s.endpoints));
    }
    if chains.is_empty() {
        let body = serde_json::json!({"proxy": proxy, "zone": zone}).to_string();
        let config = envoy_types::pb::envoy::extensions::filters::network::direct_response::v3::Config {
            response: Some(envoy_types::pb::envoy::config::core::v3::DataSource {
                specifier: Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(
                    body.into_bytes(),
                )),
                ..Default::default()
            }),
        };
        chains.push(FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.direct_response".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config",
                    config.encode_to_vec(),
                ))),
            }],
            ..FilterChain::default()
        });
    }
    // What Kuma's admin generator adds for every proxy with an admin port: Envoy's admin API
    // as an HTTP listener on the ingress address and its two static clusters.
    for (cluster, port) in [("kuma:envoy:admin", 9901), ("kuma:readiness", 9902)] {
        let local = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
        clusters.push(Cluster {
            name: cluster.to_owned(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
            load_assignment: Some(assignment(cluster, &[(local, BTreeMap::new())])),
            ..Cluster::default()
        });
    }
    let admin = Listener {
        name: "kuma:envoy:admin".to_owned(),
        address: Some(socket(SocketAddr::new(listen.ip(), 9901))),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    Vec::new(),
                ))),
            }],
            ..FilterChain::default()
        }],
        ..Listener::default()
    };
    let name = format!("inbound:{}:{}", listen.ip(), listen.port());
    let listener = Listener {
        name: name.clone(),
        address: Some(socket(listen)),
        filter_chains: chains,
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".to_owned(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
                TlsInspector::default().encode_to_vec(),
            ))),
            ..ListenerFilter::default()
        }],
        ..Listener::default()
    };
    Config { version: 1, listeners: vec![listener, admin], clusters, assignments }
}

/// A plain TCP server that answers every connection with `name` once something arrived (the
/// probe ClientHello), then closes: which endpoint a connection reached.
pub fn spawn_name_server(listener: TcpListener, name: &str) -> JoinHandle<()> {
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if sock.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = sock.write_all(name.as_bytes()).await;
                }
                let _ = sock.shutdown().await;
            });
        }
    })
}
