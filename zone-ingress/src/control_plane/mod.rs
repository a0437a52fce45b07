//! Control-plane mode: the configuration comes from a Kuma control plane, as it comes to
//! kuma-dp's Envoy (docs/design.md#control-plane-mode).
//!
//! 1. bootstrap ([`bootstrap`]): `POST /bootstrap` with the ZoneIngress resource and the
//!    dataplane token, retried with a constant backoff up to a maximum duration as kuma-dp does;
//!    the answer names the ADS server, the node and the token for the stream;
//! 2. ADS ([`ads`]): one gRPC stream over TLS (the CA checked), the token as `authorization`
//!    metadata; clusters, their endpoints and listeners are subscribed to, each response is
//!    checked ([`translate`]), acknowledged or refused with the reason, and a complete
//!    configuration becomes a route table installed in one atomic swap, as a file reload does;
//! 3. the stream is re-established with a backoff when it ends; the installed table keeps
//!    routing meanwhile; on shutdown the stream is closed, which the control plane takes as the
//!    proxy leaving.

pub mod ads;
pub mod bootstrap;
pub mod translate;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use hyper::Uri;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::server::Ingress;

/// kuma-dp's defaults for the bootstrap retry (`controlPlane.retry`).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(3);
pub const DEFAULT_RETRY_MAX_DURATION: Duration = Duration::from_secs(5 * 60);

/// Everything control-plane mode needs, read from the command line and files.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--cp-address`.
    pub url: Uri,
    /// The dataplane token (trimmed), from `--dataplane-token-file` or `--dataplane-token`.
    pub token: String,
    /// `--dataplane-token-file`, sent as kuma-dp sends it.
    pub token_path: Option<PathBuf>,
    /// `--ca-cert-file`'s PEM.
    pub ca: Option<Vec<u8>>,
    /// `--mesh` and the resource's name.
    pub mesh: String,
    pub name: String,
    /// The ZoneIngress resource as JSON.
    pub resource: String,
    /// The zone (`--zone`), for the route table's cluster names and empty-table answer.
    pub zone: String,
    pub retry_backoff: Duration,
    pub retry_max_duration: Duration,
}

impl Settings {
    /// Checks the URL.
    ///
    /// # Errors
    /// Not `http(s)://host:port`.
    pub fn parse_url(url: &str) -> anyhow::Result<Uri> {
        let uri: Uri = url.parse().with_context(|| format!("--cp-address {url:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => bail!("--cp-address {url:?}: unsupported URL scheme, must be http or https"),
        }
        if uri.host().is_none_or(str::is_empty) {
            bail!("--cp-address {url:?} has no host");
        }
        Ok(uri)
    }
}

/// The bootstrap, retried as kuma-dp retries it: every `retry_backoff` until
/// `retry_max_duration` has passed, except for a refusal that trying again cannot change.
///
/// # Errors
/// A refusal (4xx), or no success within the maximum duration; the error says why.
pub async fn bootstrap(settings: &Settings) -> anyhow::Result<bootstrap::Bootstrap> {
    let tls = match (&settings.ca, settings.url.scheme_str()) {
        (Some(ca), _) => Some(bootstrap::tls_client(ca).context("--ca-cert-file")?),
        (None, Some("https")) => Some(bootstrap::tls_client(&system_roots()?).context("the system's CA bundle")?),
        (None, _) => None,
    };
    let request = bootstrap::BootstrapRequest::new(settings);
    let started = tokio::time::Instant::now();
    loop {
        info!(url = %settings.url, "fetching the bootstrap configuration from the control plane");
        match bootstrap::fetch(&settings.url, tls.as_ref(), &request).await {
            Ok(b) => {
                info!(node = b.node_id, ads = %format!("{}:{}", b.ads_host, b.ads_port), "bootstrap received");
                return Ok(b);
            }
            Err(bootstrap::Failure::Fatal(e)) => return Err(e),
            Err(bootstrap::Failure::Retry(e)) => {
                if started.elapsed() + settings.retry_backoff > settings.retry_max_duration {
                    return Err(e.context(format!(
                        "no bootstrap from the control plane within {}",
                        humantime::format_duration(settings.retry_max_duration)
                    )));
                }
                warn!(error = format!("{e:#}"), backoff = %humantime::format_duration(settings.retry_backoff), "could not fetch the bootstrap configuration; retrying");
            }
        }
        tokio::time::sleep(settings.retry_backoff).await;
    }
}

/// The system's CA bundle, for an `https` control plane without `--ca-cert-file`.
fn system_roots() -> anyhow::Result<Vec<u8>> {
    const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    std::fs::read(BUNDLE).with_context(|| format!("no --ca-cert-file and no system CA bundle at {BUNDLE}"))
}

/// Runs the ADS client until `shutdown` turns true: connects, applies, reconnects with a
/// backoff (1 s doubling to 30 s, reset by a stream that delivered a configuration). `first`
/// receives one message once the first configuration is installed.
pub async fn serve(
    settings: Settings,
    boot: bootstrap::Bootstrap,
    ingress: Arc<Ingress>,
    first: mpsc::Sender<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut state = ads::State::new(settings.zone.clone(), first);
    let mut backoff = ads::MIN_BACKOFF;
    loop {
        let outcome = tokio::select! {
            r = ads::session(&settings, &boot, &ingress, &mut state) => r,
            _ = shutdown.changed() => {
                ingress.metrics.cp_connected.store(false, std::sync::atomic::Ordering::Relaxed);
                info!("control plane: stream closed for shutdown");
                return;
            }
        };
        ingress.metrics.cp_connected.store(false, std::sync::atomic::Ordering::Relaxed);
        if outcome.delivered {
            backoff = ads::MIN_BACKOFF;
        }
        warn!(
            error = format!("{:#}", outcome.error),
            retry_in = %humantime::format_duration(backoff),
            routes = ingress.snapshot().table.len(),
            "control plane: stream ended; routing continues with the last configuration"
        );
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(ads::MAX_BACKOFF);
    }
}
