//! One ADS stream (state of the world, xDS v3), as Envoy runs it against a Kuma control plane
//! (docs/design.md#control-plane-mode).
//!
//! Requests: clusters and listeners (wildcard) at the start, then the load assignments of the
//! EDS clusters whenever that set changes. Each response is checked on its own: a response
//! that cannot be applied is refused (NACK: the last accepted version, the response's nonce and
//! the reason in `error_detail`) and what was accepted before stays; an accepted one is
//! acknowledged (ACK: its version and nonce). Once listeners and clusters have been accepted and
//! no requested assignment is outstanding, the configuration is translated into a route table
//! and installed if it differs from the installed one.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use envoy_types::pb::{
    envoy::{
        config::core::v3::{Node, node::UserAgentVersionType},
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::{
        protobuf::{ListValue, Struct, Value as PbValue, value::Kind},
        rpc::Status,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{error, info, warn};

use super::{
    Settings,
    bootstrap::Bootstrap,
    translate::{self, Assignment, CLUSTER_TYPE, ClusterSpec, ENDPOINT_TYPE, LISTENER_TYPE, Listeners},
};
use crate::server::{Ingress, Snapshot};

/// Reconnect backoff bounds.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Time allowed to set up the connection to the ADS server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The trigger `/config_dump` shows for an update from the control plane.
const TRIGGER: &str = "control plane";
/// gRPC `INVALID_ARGUMENT`, the code Envoy puts in a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// A complete configuration as accepted: listeners, clusters, assignments.
type Accepted = (Listeners, BTreeMap<String, ClusterSpec>, BTreeMap<String, Assignment>);

/// What was accepted, kept across streams: a new stream starts from it.
pub struct State {
    zone: String,
    listeners: Option<Listeners>,
    clusters: Option<BTreeMap<String, ClusterSpec>>,
    assignments: BTreeMap<String, Assignment>,
    /// Last accepted version per type URL.
    versions: BTreeMap<&'static str, String>,
    /// What the installed table was built from.
    installed: Option<Accepted>,
    first: Option<mpsc::Sender<()>>,
}

impl State {
    /// Nothing accepted yet; `first` hears once the first table is installed.
    #[must_use]
    pub fn new(zone: String, first: mpsc::Sender<()>) -> Self {
        Self {
            zone,
            listeners: None,
            clusters: None,
            assignments: BTreeMap::new(),
            versions: BTreeMap::new(),
            installed: None,
            first: Some(first),
        }
    }

    /// The assignments the accepted clusters need, sorted.
    fn eds_names(&self) -> Vec<String> {
        let names: BTreeSet<&String> = self
            .clusters
            .iter()
            .flat_map(BTreeMap::values)
            .filter_map(|c| match &c.endpoints {
                translate::EndpointSource::Eds(name) => Some(name),
                translate::EndpointSource::Static(_) | translate::EndpointSource::Unusable(_) => None,
            })
            .collect();
        names.into_iter().cloned().collect()
    }
}

/// How a stream ended.
pub struct Outcome {
    pub error: anyhow::Error,
    /// It delivered at least one response (the reconnect backoff starts over).
    pub delivered: bool,
}

/// Runs one stream until it fails.
pub async fn session(settings: &Settings, boot: &Bootstrap, ingress: &Arc<Ingress>, state: &mut State) -> Outcome {
    let mut delivered = false;
    let error = match run(settings, boot, ingress, state, &mut delivered).await {
        Ok(()) => anyhow!("the control plane closed the stream"),
        Err(e) => e,
    };
    Outcome { error, delivered }
}

async fn run(
    settings: &Settings,
    boot: &Bootstrap,
    ingress: &Arc<Ingress>,
    state: &mut State,
    delivered: &mut bool,
) -> anyhow::Result<()> {
    let ca = boot.ads_ca.clone().or_else(|| settings.ca.clone());
    let host = if boot.ads_host.contains(':') { format!("[{}]", boot.ads_host) } else { boot.ads_host.clone() };
    let scheme = if boot.ads_tls_name.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}:{}", boot.ads_port))
        .context("the ADS address")?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(name) = &boot.ads_tls_name {
        let ca = ca.context("no CA for the ADS server (neither the bootstrap nor --ca-cert-file has one)")?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(name.clone()))
            .context("the ADS TLS settings")?;
    }
    let channel = endpoint.connect().await.with_context(|| {
        format!("connecting to the ADS server {host}:{} (TLS name {:?})", boot.ads_port, boot.ads_tls_name)
    })?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let node = node(boot);
    // The node goes on the first request only (`set_node_on_first_message_only`).
    let first = DiscoveryRequest {
        node: Some(node),
        type_url: CLUSTER_TYPE.to_owned(),
        version_info: state.versions.get(CLUSTER_TYPE).cloned().unwrap_or_default(),
        ..DiscoveryRequest::default()
    };
    tx.send(first).await?;
    let mut eds_requested: Vec<String> = state.eds_names();
    if !eds_requested.is_empty() {
        tx.send(request(state, ENDPOINT_TYPE, eds_requested.clone(), String::new(), None)).await?;
    }
    tx.send(request(state, LISTENER_TYPE, Vec::new(), String::new(), None)).await?;
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = stream_token(settings, boot) {
        call.metadata_mut()
            .insert("authorization", token.parse().context("the dataplane token is not a valid header value")?);
    }
    let mut stream = match client.stream_aggregated_resources(call).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(refusal(&status)),
    };
    ingress.metrics.cp_connected.store(true, Ordering::Relaxed);
    info!(ads = %format!("{host}:{}", boot.ads_port), "control plane: ADS stream up");
    // Assignments asked for and not answered yet: the table waits for them, as Envoy's
    // clusters wait for their endpoints before they are used.
    let mut eds_pending = !eds_requested.is_empty() && state.installed.is_none();
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(status) => return Err(refusal(&status)),
        };
        *delivered = true;
        let type_url = response.type_url.clone();
        let verdict = accept(state, &response);
        match &verdict {
            Ok(()) => {
                let version = response.version_info.clone();
                let key = static_type(&type_url);
                if let Some(key) = key {
                    state.versions.insert(key, version.clone());
                }
                let names = if type_url == ENDPOINT_TYPE { eds_requested.clone() } else { Vec::new() };
                tx.send(request(state, &type_url, names, response.nonce.clone(), None)).await?;
                info!(type_url, version, resources = response.resources.len(), "control plane: update accepted");
                if type_url == ENDPOINT_TYPE {
                    eds_pending = false;
                }
                if type_url == CLUSTER_TYPE {
                    let wanted = state.eds_names();
                    if wanted != eds_requested {
                        eds_pending |= wanted.iter().any(|n| !state.assignments.contains_key(n));
                        eds_requested = wanted;
                        tx.send(request(state, ENDPOINT_TYPE, eds_requested.clone(), String::new(), None)).await?;
                    }
                }
            }
            Err(reason) => {
                warn!(
                    type_url,
                    version = response.version_info,
                    reason,
                    "control plane: update refused (NACK); the previous configuration stays"
                );
                ingress.record_update(TRIGGER, Err(vec![reason.clone()]));
                let names = if type_url == ENDPOINT_TYPE { eds_requested.clone() } else { Vec::new() };
                let detail = Status { code: INVALID_ARGUMENT, message: reason.clone(), details: Vec::new() };
                tx.send(request(state, &type_url, names, response.nonce.clone(), Some(detail))).await?;
            }
        }
        if verdict.is_ok() && !eds_pending {
            install(state, ingress);
        }
    }
}

/// The token for a new stream: the token file read again (a rotated token, e.g. a Kubernetes
/// service account token, is picked up at the next reconnect), else the bootstrap's
/// `authorization`, else the token given at start.
fn stream_token(settings: &Settings, boot: &Bootstrap) -> Option<String> {
    let from_file = settings.token_path.as_ref().and_then(|p| match std::fs::read_to_string(p) {
        Ok(t) => Some(t.trim().to_owned()),
        Err(e) => {
            warn!(file = %p.display(), error = %e, "cannot read the dataplane token file again; using the token read at start");
            None
        }
    });
    from_file.or_else(|| boot.authorization.clone()).or_else(|| Some(settings.token.clone())).filter(|t| !t.is_empty())
}

/// Checks one response and keeps what it holds.
fn accept(state: &mut State, response: &DiscoveryResponse) -> Result<(), String> {
    match response.type_url.as_str() {
        CLUSTER_TYPE => {
            let list = translate::decode_all(CLUSTER_TYPE, &response.resources)?;
            state.clusters = Some(translate::clusters(&list)?);
        }
        LISTENER_TYPE => {
            let list = translate::decode_all(LISTENER_TYPE, &response.resources)?;
            state.listeners = Some(translate::listeners(&list)?);
        }
        ENDPOINT_TYPE => {
            let list = translate::decode_all(ENDPOINT_TYPE, &response.resources)?;
            state.assignments = translate::assignments(&list)?;
        }
        other => return Err(format!("unexpected resource type {other:?}")),
    }
    Ok(())
}

/// Builds and installs the table once listeners and clusters are known, if it changed.
fn install(state: &mut State, ingress: &Arc<Ingress>) {
    let (Some(listeners), Some(clusters)) = (&state.listeners, &state.clusters) else {
        return;
    };
    let current = (listeners.clone(), clusters.clone(), state.assignments.clone());
    if state.installed.as_ref() == Some(&current) {
        return;
    }
    let listen = ingress.listener_addr();
    if let Some(addr) = listen
        && !listeners.addresses.is_empty()
        && !listeners.addresses.contains(&addr)
    {
        warn!(listener = %addr, control_plane = ?listeners.addresses, "the control plane's listener address differs from the ZoneIngress file's; keeping the file's");
    }
    let (table, missing) = translate::table(&state.zone, listeners, clusters, &state.assignments);
    for (sni, cluster) in &missing {
        warn!(
            sni,
            cluster, "control plane: a filter chain names a cluster it did not send; its connections are closed"
        );
    }
    let snapshot = Snapshot::from_table(&ingress.metrics, ingress.snapshot().zone_ingress.clone(), table);
    let routes = snapshot.table.len();
    let version = ingress.install(snapshot);
    ingress.record_update(TRIGGER, Ok(Vec::new()));
    info!(version, routes, clusters = clusters.len(), "control plane: configuration applied");
    state.installed = Some(current);
    if let Some(first) = state.first.take() {
        let _ = first.try_send(());
    }
}

fn static_type(type_url: &str) -> Option<&'static str> {
    [CLUSTER_TYPE, LISTENER_TYPE, ENDPOINT_TYPE].into_iter().find(|t| *t == type_url)
}

/// An ACK (no `error`) or NACK of `nonce`, or a new subscription (empty nonce).
fn request(
    state: &State,
    type_url: &str,
    names: Vec<String>,
    nonce: String,
    error: Option<Status>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: state.versions.get(type_url).cloned().unwrap_or_default(),
        resource_names: names,
        type_url: type_url.to_owned(),
        response_nonce: nonce,
        error_detail: error,
        ..DiscoveryRequest::default()
    }
}

/// A gRPC error from the control plane, in words an operator can act on.
fn refusal(status: &tonic::Status) -> anyhow::Error {
    let why = match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            "the control plane refused the dataplane token (check --dataplane-token-file)"
        }
        tonic::Code::Unavailable => "the ADS server is unavailable",
        _ => "the ADS stream failed",
    };
    error!(code = ?status.code(), message = status.message(), "control plane: {why}");
    anyhow!("{why}: {} ({:?})", status.message(), status.code())
}

/// The node of the bootstrap, as Envoy sends it.
fn node(boot: &Bootstrap) -> Node {
    Node {
        id: boot.node_id.clone(),
        cluster: boot.node_cluster.clone(),
        metadata: Some(to_struct(&boot.node_metadata)),
        user_agent_name: "zone-ingress".to_owned(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(env!("CARGO_PKG_VERSION").to_owned())),
        ..Node::default()
    }
}

fn to_struct(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct { fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() }
}

fn to_value(v: &serde_json::Value) -> PbValue {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(ListValue { values: a.iter().map(to_value).collect() }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    PbValue { kind: Some(kind) }
}
