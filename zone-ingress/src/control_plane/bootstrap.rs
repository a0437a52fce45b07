//! The bootstrap request, as kuma-dp makes it (docs/design.md#control-plane-mode): `POST
//! <cp-address>/bootstrap` with the ZoneIngress resource and the dataplane token; the answer
//! holds an Envoy bootstrap (YAML) naming the ADS server, the node and the token to send on
//! the stream.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// kuma-dp's default readiness reporter port (`dataplane.readinessPort`).
pub const KUMA_DP_READINESS_PORT: u32 = 9902;

/// kuma-dp's timeout for one bootstrap request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A bootstrap answer is a few KiB; anything past this is not one.
const MAX_RESPONSE: usize = 4 << 20;

/// What kuma-dp sends (the fields a zone ingress fills; the others keep their zero values).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapRequest {
    pub mesh: String,
    pub name: String,
    pub proxy_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dataplane_token: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dataplane_token_path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dataplane_resource: String,
    pub version: Version,
    pub ca_cert: String,
    pub dynamic_metadata: std::collections::BTreeMap<String, String>,
    /// kuma-dp's readiness reporter port: the control plane refuses to generate the
    /// configuration of a proxy with an admin port and none (its admin listener routes `/ready`
    /// there). Nothing of ours listens on it; the listener it feeds is left aside.
    #[serde(skip_serializing_if = "is_zero")]
    pub readiness_port: u32,
    pub operating_system: String,
    pub features: Vec<String>,
    pub workdir: String,
}

impl BootstrapRequest {
    /// kuma-dp's request for `settings`: the token inline (and its path, as kuma-dp sends it),
    /// the resource as JSON, this build as the kuma-dp version and no Envoy.
    #[must_use]
    pub fn new(settings: &super::Settings) -> Self {
        Self {
            mesh: settings.mesh.clone(),
            name: settings.name.clone(),
            proxy_type: "ingress".to_owned(),
            dataplane_token: settings.token.clone(),
            dataplane_token_path: settings.token_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            dataplane_resource: settings.resource.clone(),
            version: Version {
                kuma_dp: KumaDpVersion {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    git_tag: String::new(),
                    git_commit: String::new(),
                    build_date: String::new(),
                },
                envoy: EnvoyVersion { version: String::new(), build: String::new(), kuma_dp_compatible: true },
            },
            ca_cert: settings.ca.as_ref().map(|c| String::from_utf8_lossy(c).into_owned()).unwrap_or_default(),
            dynamic_metadata: std::collections::BTreeMap::new(),
            readiness_port: KUMA_DP_READINESS_PORT,
            operating_system: std::env::consts::OS.to_owned(),
            features: Vec::new(),
            workdir: String::new(),
        }
    }
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// `version` of the request: ours as kuma-dp's, and no Envoy.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Version {
    pub kuma_dp: KumaDpVersion,
    pub envoy: EnvoyVersion,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KumaDpVersion {
    pub version: String,
    pub git_tag: String,
    pub git_commit: String,
    pub build_date: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyVersion {
    pub version: String,
    pub build: String,
    pub kuma_dp_compatible: bool,
}

/// The answer: the Envoy bootstrap, base64 in JSON (Go's `[]byte`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    bootstrap: String,
}

/// What this data plane takes from the Envoy bootstrap.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    /// `node.id`, `node.cluster` and `node.metadata` (JSON), sent on the first ADS request.
    pub node_id: String,
    pub node_cluster: String,
    pub node_metadata: serde_json::Map<String, Value>,
    /// The ADS server: host and port of the ADS cluster's endpoint.
    pub ads_host: String,
    pub ads_port: u16,
    /// The name the ADS server's certificate must carry (the TLS `sni`); `None`: plain gRPC.
    pub ads_tls_name: Option<String>,
    /// The CA of the ADS server (`cp_validation_ctx`), PEM, when the bootstrap has one.
    pub ads_ca: Option<Vec<u8>>,
    /// The `authorization` initial metadata of the ADS stream.
    pub authorization: Option<String>,
}

/// Why a bootstrap attempt failed, and whether trying again can help.
#[derive(Debug)]
pub enum Failure {
    /// Try again after the backoff (network error, 5xx, Dataplane not found yet).
    Retry(anyhow::Error),
    /// Trying again cannot help (a 4xx with the control plane's reason, a bad answer).
    Fatal(anyhow::Error),
}

/// The TLS client for the control plane: `ca` (PEM) as the only trust anchor.
///
/// # Errors
/// The PEM holds no certificate.
pub fn tls_client(ca: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.context("reading the CA certificate")?).context("adding the CA certificate")?;
        n += 1;
    }
    if n == 0 {
        bail!("the CA file holds no PEM certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// One bootstrap attempt against `url` (`http(s)://host:port`).
pub async fn fetch(
    url: &Uri,
    tls: Option<&Arc<rustls::ClientConfig>>,
    request: &BootstrapRequest,
) -> Result<Bootstrap, Failure> {
    let body = serde_json::to_vec_pretty(request).map_err(|e| Failure::Fatal(e.into()))?;
    let (status, text) = tokio::time::timeout(REQUEST_TIMEOUT, post(url, tls, body))
        .await
        .map_err(|_| Failure::Retry(anyhow!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))?
        .map_err(Failure::Retry)?;
    match status {
        StatusCode::OK => parse(&text).map_err(Failure::Fatal),
        StatusCode::NOT_FOUND if text.is_empty() => Err(Failure::Retry(anyhow!(
            "the control plane has no ZoneIngress {:?} in mesh {:?} yet (404)",
            request.name,
            request.mesh
        ))),
        StatusCode::NOT_FOUND => Err(Failure::Retry(anyhow!(
            "no /bootstrap endpoint at {url}: is it the control plane's dataplane server port (5678 by default), not its API port (5681)?"
        ))),
        s if s.is_client_error() => Err(Failure::Fatal(anyhow!(
            "the control plane refused the bootstrap request ({s}): {}",
            String::from_utf8_lossy(&text).trim()
        ))),
        s => Err(Failure::Retry(anyhow!("the control plane answered {s}"))),
    }
}

async fn post(
    url: &Uri,
    tls: Option<&Arc<rustls::ClientConfig>>,
    body: Vec<u8>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let host = url.host().context("the control plane URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port)).await.with_context(|| format!("connecting to {host}:{port}"))?;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/bootstrap")
        .header(header::HOST, url.authority().map_or(host, |a| a.as_str()))
        .header(header::ACCEPT, "application/json")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    if https {
        let tls = tls.context("https needs a CA (--ca-cert-file)")?;
        let name = ServerName::try_from(host.to_owned()).context("the control plane host is not a valid TLS name")?;
        let stream = TlsConnector::from(Arc::clone(tls))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {host}:{port} (is the CA right?)"))?;
        exchange(stream, request).await
    } else {
        exchange(tcp, request).await
    }
}

async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer: {e}"))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// Reads the answer of a successful request.
///
/// # Errors
/// Not JSON, not base64, not YAML, or no ADS server in it.
pub fn parse(body: &[u8]) -> anyhow::Result<Bootstrap> {
    let response: Response = serde_json::from_slice(body).context("the bootstrap answer is not kuma-cp's JSON")?;
    let yaml = base64::engine::general_purpose::STANDARD
        .decode(response.bootstrap.as_bytes())
        .context("the bootstrap is not base64")?;
    let doc: Value = serde_yaml::from_slice(&yaml).context("the bootstrap is not YAML")?;
    from_envoy_bootstrap(&doc)
}

/// A field by its proto name in either JSON spelling (`adsConfig` or `ads_config`).
fn field<'a>(v: &'a Value, camel: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    obj.get(camel).or_else(|| {
        let snake: String = camel
            .chars()
            .flat_map(|c| if c.is_ascii_uppercase() { vec!['_', c.to_ascii_lowercase()] } else { vec![c] })
            .collect();
        obj.get(&snake)
    })
}

fn path<'a>(v: &'a Value, fields: &[&str]) -> Option<&'a Value> {
    fields.iter().try_fold(v, |v, f| field(v, f))
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

fn from_envoy_bootstrap(doc: &Value) -> anyhow::Result<Bootstrap> {
    let node = field(doc, "node").context("the bootstrap has no node")?;
    let grpc = path(doc, &["dynamicResources", "adsConfig", "grpcServices"])
        .and_then(|g| g.as_array()?.first())
        .context("the bootstrap has no ADS gRPC service (dynamicResources.adsConfig.grpcServices)")?;
    let cluster_name = text(path(grpc, &["envoyGrpc", "clusterName"])).context("the ADS service names no cluster")?;
    let authorization = field(grpc, "initialMetadata")
        .and_then(Value::as_array)
        .and_then(|m| m.iter().find(|h| text(field(h, "key")).as_deref() == Some("authorization")))
        .and_then(|h| text(field(h, "value")));
    let cluster = path(doc, &["staticResources", "clusters"])
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| text(field(c, "name")).as_deref() == Some(cluster_name.as_str())))
        .with_context(|| format!("the bootstrap has no static cluster {cluster_name:?}"))?;
    let socket = path(cluster, &["loadAssignment", "endpoints"])
        .and_then(|e| e.as_array()?.first())
        .and_then(|e| field(e, "lbEndpoints")?.as_array()?.first())
        .and_then(|e| path(e, &["endpoint", "address", "socketAddress"]))
        .with_context(|| format!("cluster {cluster_name:?} has no socket address"))?;
    let ads_host = text(field(socket, "address")).context("the ADS address is missing")?;
    let ads_port = field(socket, "portValue")
        .and_then(|p| p.as_u64().or_else(|| p.as_str()?.parse().ok()))
        .and_then(|p| u16::try_from(p).ok())
        .context("the ADS port is missing")?;
    let tls = path(cluster, &["transportSocket", "typedConfig"]);
    let ads_tls_name = tls.map(|t| text(field(t, "sni")).unwrap_or_else(|| ads_host.clone()));
    let ads_ca = path(doc, &["staticResources", "secrets"])
        .and_then(Value::as_array)
        .and_then(|s| s.iter().find_map(|s| text(path(s, &["validationContext", "trustedCa", "inlineBytes"]))))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    Ok(Bootstrap {
        node_id: text(field(node, "id")).context("the bootstrap node has no id")?,
        node_cluster: text(field(node, "cluster")).unwrap_or_default(),
        node_metadata: field(node, "metadata").and_then(Value::as_object).cloned().unwrap_or_default(),
        ads_host,
        ads_port,
        ads_tls_name,
        ads_ca,
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(yaml: &str) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(yaml);
        serde_json::to_vec(&serde_json::json!({"bootstrap": b64, "kumaSidecarConfiguration": {}})).unwrap_or_default()
    }

    const BOOTSTRAP: &str = r"
dynamicResources:
  adsConfig:
    apiType: GRPC
    grpcServices:
    - envoyGrpc:
        clusterName: ads_cluster
      initialMetadata:
      - key: authorization
        value: tok-1
node:
  cluster: ingress
  id: default.zi-1
  metadata:
    dataplane.proxyType: ingress
    version:
      kumaDp:
        version: 2.14.3
staticResources:
  clusters:
  - name: access_log_sink
    type: STATIC
  - loadAssignment:
      clusterName: ads_cluster
      endpoints:
      - lbEndpoints:
        - endpoint:
            address:
              socketAddress:
                address: cp.example
                portValue: 5678
    name: ads_cluster
    transportSocket:
      name: envoy.transport_sockets.tls
      typedConfig:
        sni: cp.example
  secrets:
  - name: cp_validation_ctx
    validationContext:
      trustedCa:
        inlineBytes: LS0tCg==
";

    #[test]
    fn reads_kumas_bootstrap() {
        let b = parse(&answer(BOOTSTRAP)).expect("parses");
        assert_eq!(b.node_id, "default.zi-1");
        assert_eq!(b.node_cluster, "ingress");
        assert_eq!(b.node_metadata["dataplane.proxyType"], "ingress");
        assert_eq!((b.ads_host.as_str(), b.ads_port), ("cp.example", 5678));
        assert_eq!(b.ads_tls_name.as_deref(), Some("cp.example"));
        assert_eq!(b.ads_ca.as_deref(), Some(&b"---\n"[..]));
        assert_eq!(b.authorization.as_deref(), Some("tok-1"));
    }

    #[test]
    fn snake_case_names_are_read_too() {
        let snake = BOOTSTRAP
            .replace("dynamicResources", "dynamic_resources")
            .replace("adsConfig", "ads_config")
            .replace("grpcServices", "grpc_services")
            .replace("portValue", "port_value");
        let b = parse(&answer(&snake)).expect("parses");
        assert_eq!(b.ads_port, 5678);
    }

    #[test]
    fn a_bootstrap_without_ads_is_refused() {
        let e = parse(&answer("node:\n  id: x\n")).expect_err("no ADS");
        assert!(format!("{e:#}").contains("no ADS gRPC service"), "{e:#}");
        let e = parse(b"{\"bootstrap\": \"%%%\"}").expect_err("not base64");
        assert!(format!("{e:#}").contains("not base64"), "{e:#}");
    }

    #[test]
    fn the_request_has_kuma_dps_field_names() {
        let r = BootstrapRequest {
            mesh: "default".into(),
            name: "zi-1".into(),
            proxy_type: "ingress".into(),
            dataplane_token: "t".into(),
            dataplane_token_path: String::new(),
            dataplane_resource: "{}".into(),
            version: Version {
                kuma_dp: KumaDpVersion {
                    version: "1".into(),
                    git_tag: String::new(),
                    git_commit: String::new(),
                    build_date: String::new(),
                },
                envoy: EnvoyVersion { version: String::new(), build: String::new(), kuma_dp_compatible: true },
            },
            ca_cert: String::new(),
            dynamic_metadata: std::collections::BTreeMap::new(),
            readiness_port: 9902,
            operating_system: "linux".into(),
            features: vec![],
            workdir: String::new(),
        };
        let v = serde_json::to_value(&r).unwrap_or_default();
        for key in [
            "mesh",
            "name",
            "proxyType",
            "dataplaneToken",
            "dataplaneResource",
            "caCert",
            "operatingSystem",
            "readinessPort",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["version"]["kumaDp"]["version"], "1");
        assert!(v.get("dataplaneTokenPath").is_none());
    }
}
