//! The admin HTTP server (HTTP/1.1, `hyper`), on `networking.admin.port` of the ZoneIngress,
//! bound to `127.0.0.1` unless `--admin-address` says otherwise: it serves state and a
//! shutdown trigger, so it is never open to the network by default.
//!
//! | path | method | answer |
//! | --- | --- | --- |
//! | `/` | GET | this list |
//! | `/ready` | GET | `READY` 200, `NOT_READY` 503, `TERMINATING` 503 |
//! | `/stats/prometheus` | GET | Prometheus text: Envoy's names (docs/metrics.md) and `zone_ingress_*` |
//! | `/stats` | GET | the same as `name: value` lines (`?filter=`, `?format=json|prometheus`) |
//! | `/config_dump` | GET | JSON: ZoneIngress with `availableServices`, routes, clusters, splice |
//! | `/connections` | GET | JSON page of open flows (`?limit=` ≤ 1000, `?after=<id>`) |
//! | `/quitquitquit` | POST, loopback | exit now (flows are closed), code 0 |
//! | `/drain_listeners` | POST, loopback | stop accepting, keep running (as SIGUSR2) |
//!
//! A second, read-only listener (`--read-only-admin-address`, on the same port) serves only
//! `GET` `/`, `/ready`, `/stats` and `/stats/prometheus`, for probes and scrapers that reach the
//! pod's address: any other method is 405, any other path 404. It is the same server with
//! [`Role::ReadOnly`], so it has the same limits.
//!
//! Bad requests get a 4xx and never affect the process: unknown path 404, wrong method 405
//! (with `Allow`), a request head over 16 KiB 431 (hyper), a body over 64 KiB 413, a bad query
//! 400, a state-changing request from a non-loopback peer 403. At most 64 admin connections are
//! served at once: a new one closes the one that has waited longest for a request, so idle
//! clients cannot lock `/ready` out; headers must arrive within 10 s and a connection lives at
//! most 5 minutes. A descriptor is kept in reserve so that `/ready` is answered even when the
//! process has run out of them.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{Notify, mpsc},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    flows,
    metrics::{self, XdpSample},
    server::{Ingress, Readiness},
};

/// Default admin bind address: loopback only.
pub const DEFAULT_ADMIN_ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// Admin connections served at once (beyond: the longest-idle one is closed).
const MAX_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers) hyper buffers.
const MAX_REQUEST_HEAD: usize = 16 << 10;
/// Largest request body announced with `Content-Length` (no endpoint reads one).
const MAX_BODY: u64 = 64 << 10;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// `/connections` page size when `limit` is absent.
const DEFAULT_PAGE: usize = 100;

/// What an admin listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every endpoint (`--admin-address`).
    Full,
    /// `GET`/`HEAD` of `/`, `/ready`, `/stats` and `/stats/prometheus` only
    /// (`--read-only-admin-address`).
    ReadOnly,
}

impl Role {
    fn serves(self, endpoint: &Endpoint) -> bool {
        self == Self::Full || endpoint.read_only
    }

    /// For logs: `admin`, `read-only admin`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "admin",
            Self::ReadOnly => "read-only admin",
        }
    }
}

/// Why `read_only` cannot take the admin port beside `admin`, if it cannot: binding the same
/// port on both would fail. On Linux two listeners share a port only on two different specific
/// addresses (an IPv4-mapped IPv6 address is its IPv4 one); `0.0.0.0` overlaps every IPv4
/// address, and `::` (dual-stack) every address of either family.
///
/// # Errors
/// The two overlap; the message says how.
pub fn check_read_only_address(admin: IpAddr, read_only: IpAddr) -> Result<(), String> {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let (a, r) = (canonical(admin), canonical(read_only));
    // `wild` is unspecified and its socket would take `other`'s address too.
    let covers = |wild: IpAddr, other: IpAddr| match wild {
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(w) => w.is_unspecified(),
    };
    if a == r {
        Err(format!(
            "--read-only-admin-address {read_only} is the admin address: the read-only listener needs another address on the admin port"
        ))
    } else if covers(r, a) || covers(a, r) {
        Err(format!(
            "--read-only-admin-address {read_only} and --admin-address {admin} overlap on the admin port ({} covers the other address); give both specific addresses, e.g. the pod's address and 127.0.0.1",
            if covers(r, a) { read_only } else { admin }
        ))
    } else {
        Ok(())
    }
}

/// State-changing requests, forwarded to the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `POST /quitquitquit`.
    Quit,
    /// `POST /drain_listeners`.
    DrainListeners,
}

/// Static facts shown by `/config_dump`.
#[derive(Debug, Clone, Default)]
pub struct Info {
    /// `--dataplane-file` and `--dataplanes`.
    pub dataplane_file: PathBuf,
    pub dataplanes: PathBuf,
    /// `--drain-time`.
    pub drain_time: Duration,
    /// Listener sockets per bind.
    pub listeners: usize,
    /// The XDP guard, when attached (its counters are read per scrape).
    pub xdp: Option<Arc<crate::xdp::Guard>>,
}

/// A running admin server; dropping it stops accepting.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ctx {
    ingress: Arc<Ingress>,
    commands: mpsc::Sender<Command>,
    info: Info,
    addr: SocketAddr,
    role: Role,
}

/// Binds the admin listener.
///
/// # Errors
/// The address is in use or not local.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

impl AdminServer {
    /// Serves the endpoints of `role` on `listener` until dropped.
    pub fn start(
        ingress: Arc<Ingress>,
        listener: TcpListener,
        commands: mpsc::Sender<Command>,
        info: Info,
        role: Role,
    ) -> Self {
        let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::new(DEFAULT_ADMIN_ADDRESS, 0));
        info!(%addr, "{} listening", role.as_str());
        let ctx = Arc::new(Ctx { ingress, commands, info, addr, role });
        let task = tokio::spawn(accept_loop(ctx, listener));
        Self { addr, task }
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The admin connections being served: when all [`MAX_CONNECTIONS`] are taken, the one idle
/// longest (waiting for a request) is closed to make room, so idle or stalled clients can never
/// keep `/ready` from answering.
#[derive(Default)]
struct Table {
    next: u64,
    /// Connection id → since when it waits for a request (`None` while it handles one), and
    /// how to close it.
    live: BTreeMap<u64, (Option<Instant>, Arc<Notify>)>,
}

impl Table {
    fn lock(table: &Mutex<Self>) -> MutexGuard<'_, Self> {
        table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection, closing the longest-idle one if the table is full. `None`
    /// when every connection is busy with a request (the new one is then closed).
    fn admit(&mut self) -> Option<(u64, Arc<Notify>)> {
        if self.live.len() >= MAX_CONNECTIONS {
            let oldest = self.live.iter().filter_map(|(id, (idle, _))| idle.map(|t| (t, *id))).min()?;
            if let Some((_, close)) = self.live.remove(&oldest.1) {
                close.notify_one();
            }
        }
        self.next += 1;
        let close = Arc::new(Notify::new());
        self.live.insert(self.next, (Some(Instant::now()), Arc::clone(&close)));
        Some((self.next, close))
    }

    fn set_idle(&mut self, id: u64, idle: bool) {
        if let Some(entry) = self.live.get_mut(&id) {
            entry.0 = idle.then(Instant::now);
        }
    }
}

/// A descriptor kept in reserve: when `accept` fails for lack of descriptors, it is given up so
/// that the admin connection waiting in the backlog can be accepted and answered (a supervisor's
/// `/ready` probe at the descriptor limit), then taken again.
fn reserve_fd() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

async fn accept_loop(ctx: Arc<Ctx>, listener: TcpListener) {
    let table = Arc::new(Mutex::new(Table::default()));
    // Taken again once a descriptor is free: after the next accept, or when a connection ends.
    let reserve = Arc::new(Mutex::new(reserve_fd()));
    let refill = |reserve: &Mutex<Option<std::fs::File>>| {
        let mut r = reserve.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = reserve_fd();
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) if out_of_descriptors(&e) => {
                let spare = reserve.lock().unwrap_or_else(PoisonError::into_inner).take();
                if spare.is_some() {
                    warn!(error = %e, "admin accept: out of file descriptors; using the reserved one");
                    drop(spare);
                } else {
                    warn!(error = %e, "admin accept: out of file descriptors");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        refill(&reserve);
        let Some((id, close)) = Table::lock(&table).admit() else {
            debug!(%peer, "admin connection limit reached and every connection is busy; closing");
            continue;
        };
        let ctx = Arc::clone(&ctx);
        let table = Arc::clone(&table);
        let reserve = Arc::clone(&reserve);
        tokio::spawn(async move {
            let service = service_fn({
                let table = Arc::clone(&table);
                move |req| {
                    let ctx = Arc::clone(&ctx);
                    let table = Arc::clone(&table);
                    async move {
                        Table::lock(&table).set_idle(id, false);
                        let response = handle(ctx, peer, req).await;
                        Table::lock(&table).set_idle(id, true);
                        Ok::<_, Infallible>(response)
                    }
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => match r {
                    Ok(Err(e)) => debug!(%peer, error = %e, "admin connection ended with an error"),
                    Err(_) => debug!(%peer, "admin connection closed after its lifetime"),
                    Ok(Ok(())) => {}
                },
                () = close.notified() => debug!(%peer, "idle admin connection closed to make room for a new one"),
            }
            Table::lock(&table).live.remove(&id);
            refill(&reserve);
        });
    }
}

type Body = Full<Bytes>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, max-age=0"));
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json_response(value: &serde_json::Value) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(StatusCode::OK, "application/json", body)
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding JSON: {e}\n")),
    }
}

/// One admin endpoint.
struct Endpoint {
    path: &'static str,
    /// `GET` endpoints also answer `HEAD`.
    method: Method,
    help: &'static str,
    /// Also served by the read-only listener ([`Role::ReadOnly`]).
    read_only: bool,
}

const ENDPOINTS: &[Endpoint] = &[
    Endpoint { path: "/", method: Method::GET, help: "this list", read_only: true },
    Endpoint {
        path: "/ready",
        method: Method::GET,
        help: "READY 200, NOT_READY 503, TERMINATING 503",
        read_only: true,
    },
    Endpoint {
        path: "/stats",
        method: Method::GET,
        help: "counters as name: value (?filter=<substring>, ?format=json|prometheus)",
        read_only: true,
    },
    Endpoint {
        path: "/stats/prometheus",
        method: Method::GET,
        help: "Prometheus text format (Envoy names and zone_ingress_*)",
        read_only: true,
    },
    Endpoint {
        path: "/config_dump",
        method: Method::GET,
        help: "effective configuration: ZoneIngress, routes, clusters, splice",
        read_only: false,
    },
    Endpoint {
        path: "/connections",
        method: Method::GET,
        help: "open flows (?limit=1..1000, default 100; ?after=<id> for the next page)",
        read_only: false,
    },
    Endpoint {
        path: "/quitquitquit",
        method: Method::POST,
        help: "exit now, closing open flows (loopback only)",
        read_only: false,
    },
    Endpoint {
        path: "/drain_listeners",
        method: Method::POST,
        help: "stop accepting, keep running (loopback only)",
        read_only: false,
    },
];

async fn handle(ctx: Arc<Ctx>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if ctx.role == Role::ReadOnly && !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "this admin listener is read-only: GET and HEAD only\n");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(endpoint) = ENDPOINTS.iter().find(|e| e.path == path && ctx.role.serves(e)) else {
        return text(StatusCode::NOT_FOUND, format!("unknown path {path:?}; GET / lists the endpoints\n"));
    };
    let method = req.method();
    let allowed = *method == endpoint.method || (endpoint.method == Method::GET && *method == Method::HEAD);
    if !allowed {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, format!("{path} answers {} only\n", endpoint.method));
        let allow = if endpoint.method == Method::GET { "GET, HEAD" } else { "POST" };
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        return r;
    }
    let body_len =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if body_len.is_some_and(|n| n > MAX_BODY) {
        return text(StatusCode::PAYLOAD_TOO_LARGE, format!("request body larger than {MAX_BODY} bytes\n"));
    }
    let params = match parse_query(req.uri().query().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad query: {e}\n")),
    };
    match path.as_str() {
        "/" => {
            let mut body = format!("zone-ingress {}\n", ctx.role.as_str());
            for e in ENDPOINTS.iter().filter(|e| ctx.role.serves(e)) {
                body.push_str(&format!("  {:<5} {:<18} {}\n", e.method.as_str(), e.path, e.help));
            }
            text(StatusCode::OK, body)
        }
        "/ready" => match ctx.ingress.readiness() {
            Readiness::Ready => text(StatusCode::OK, "READY\n"),
            Readiness::NotReady(why) => {
                let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY\n");
                if let Ok(v) = HeaderValue::from_str(why) {
                    r.headers_mut().insert("x-not-ready-reason", v);
                }
                r
            }
            Readiness::Terminating => text(StatusCode::SERVICE_UNAVAILABLE, "TERMINATING\n"),
        },
        "/stats/prometheus" => stats(&ctx, "prometheus", None).await,
        "/stats" => {
            let format = param(&params, "format").unwrap_or("text");
            if !matches!(format, "text" | "json" | "prometheus") {
                return text(StatusCode::BAD_REQUEST, format!("unknown format {format:?}: text, json or prometheus\n"));
            }
            stats(&ctx, format, param(&params, "filter").map(str::to_owned)).await
        }
        "/config_dump" => json_response(&config_dump(&ctx)),
        "/connections" => {
            let limit = match param(&params, "limit").map(str::parse::<usize>) {
                None => DEFAULT_PAGE,
                Some(Ok(n)) if (1..=flows::MAX_PAGE).contains(&n) => n,
                Some(_) => return text(StatusCode::BAD_REQUEST, format!("limit must be 1..={}\n", flows::MAX_PAGE)),
            };
            let after = match param(&params, "after").map(str::parse::<u64>) {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "after must be a flow id\n"),
            };
            let ingress = &ctx.ingress;
            let page = ingress.flows.page(after, limit, ingress.as_ref());
            match serde_json::to_value(&page) {
                Ok(v) => json_response(&v),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding JSON: {e}\n")),
            }
        }
        "/quitquitquit" | "/drain_listeners" => {
            if !is_loopback(peer.ip()) {
                warn!(%peer, path, "refused a state-changing admin request from a non-loopback peer");
                return text(StatusCode::FORBIDDEN, "only from loopback\n");
            }
            let command = if path == "/quitquitquit" { Command::Quit } else { Command::DrainListeners };
            info!(%peer, path, "admin request");
            match ctx.commands.try_send(command) {
                // A full queue already holds a pending command; it covers this one.
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => text(StatusCode::OK, "OK\n"),
                Err(mpsc::error::TrySendError::Closed(_)) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "unknown path\n"),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Splits and percent-decodes a query string (`+` is a space, as in forms).
fn parse_query(query: &str) -> Result<Vec<(String, String)>, &'static str> {
    fn decode(s: &str) -> Result<String, &'static str> {
        let mut out = Vec::with_capacity(s.len());
        let mut bytes = s.bytes();
        while let Some(b) = bytes.next() {
            match b {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = [bytes.next().ok_or("truncated %-escape")?, bytes.next().ok_or("truncated %-escape")?];
                    let hex = std::str::from_utf8(&hex).map_err(|_| "bad %-escape")?;
                    out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape")?);
                }
                b => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| "not UTF-8")
    }
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

async fn stats(ctx: &Arc<Ctx>, format: &str, filter: Option<String>) -> Response<Body> {
    // Reading the BPF maps costs syscalls: keep it off the async workers.
    let ingress = Arc::clone(&ctx.ingress);
    let xdp = ctx.info.xdp.clone();
    let Ok(families) = tokio::task::spawn_blocking(move || {
        let mut s = ingress.scrape();
        s.xdp = xdp.as_deref().map(xdp_sample);
        ingress.metrics.gather(&s)
    })
    .await
    else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "collecting metrics failed\n");
    };
    match format {
        "prometheus" => match metrics::render_prometheus(&families) {
            Ok(body) => respond(StatusCode::OK, metrics::PROMETHEUS_CONTENT_TYPE, body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
        },
        "json" => json_response(&metrics::render_envoy_stats_json(&families, filter.as_deref())),
        _ => text(StatusCode::OK, metrics::render_envoy_stats(&families, filter.as_deref())),
    }
}

/// The XDP guard's counters and attachments for a scrape.
#[must_use]
pub fn xdp_sample(guard: &crate::xdp::Guard) -> XdpSample {
    let (allow, deny) = guard.list_sizes();
    XdpSample { packets: guard.counters().to_vec(), interfaces: guard.attachments(), allow, deny }
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `/config_dump`: the effective state.
fn config_dump(ctx: &Ctx) -> serde_json::Value {
    let ingress = &ctx.ingress;
    let snap = ingress.snapshot();
    let opts = &ingress.options;
    let zone_ingress = snap.zone_ingress.as_ref().map(|zi| {
        let mut networking = json!({
            "address": zi.address.to_string(),
            "port": zi.port,
            "admin": { "port": zi.admin_port },
        });
        if let Some((address, port)) = zi.advertised() {
            networking["advertisedAddress"] = json!(address);
            networking["advertisedPort"] = json!(port);
        }
        json!({
            "type": "ZoneIngress",
            "name": zi.name,
            "networking": networking,
            "availableServices": snap.available_services,
        })
    });
    let routes: Vec<serde_json::Value> = snap
        .table
        .entries()
        .map(|r| {
            json!({
                "sni": r.sni,
                "kind": r.kind,
                "mesh": r.mesh,
                "service": r.service,
                "tags": r.tags,
                "cluster": r.cluster.name,
                "endpoints": r.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut clusters: Vec<serde_json::Value> = snap
        .clusters
        .values()
        .map(|c| {
            json!({
                "name": c.name,
                "statName": c.stat_name,
                "healthy": c.membership_healthy.load(std::sync::atomic::Ordering::Relaxed),
                "total": c.membership_total.load(std::sync::atomic::Ordering::Relaxed),
                "activeConnections": c.active(),
            })
        })
        .collect();
    clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let status = ingress.config_status.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let readiness = match ingress.readiness() {
        Readiness::Ready => "READY",
        Readiness::NotReady(_) => "NOT_READY",
        Readiness::Terminating => "TERMINATING",
    };
    let l = &opts.limits;
    let xdp_guard = ctx.info.xdp.as_deref().map(|g| {
        let (allow, deny) = g.list_sizes();
        json!({
            "interfaces": g.attachments().into_iter().map(|(i, mode)| json!({"interface": i, "mode": mode})).collect::<Vec<_>>(),
            "allowCidrs": allow,
            "denyCidrs": deny,
        })
    });
    json!({
        "version": snap.version,
        "loadedAtUnix": snap.loaded_at.duration_since(std::time::SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        "zone": opts.zone,
        "zoneIngress": zone_ingress,
        "dataplanes": snap.dataplanes,
        "readiness": readiness,
        "listener": {
            "address": ingress.listener_addr().map(|a| a.to_string()),
            "bound": ingress.listener_bound(),
            "drained": ingress.listener_drained(),
            "sockets": ctx.info.listeners,
        },
        "admin": { "address": ctx.addr.to_string() },
        "routes": routes,
        "subsetRoutesCached": snap.table.cached_subsets(),
        "clusters": clusters,
        "splice": {
            "requested": opts.splice,
            "mode": if ingress.kernel.is_some() { "kernel" } else { "userspace" },
            "limits": {
                "idleTimeout": duration(l.idle_timeout),
                "maxInFlightBytes": l.max_in_flight,
                "inFlightGrace": duration(l.in_flight_grace),
                "maxSpliced": l.max_spliced,
                "drainStall": duration(l.drain_stall),
                "keepalive": duration(l.keepalive),
                "backendUserTimeout": l.backend_user_timeout.map(duration),
                "userspaceBufferBytes": l.userspace_buffer,
                "holdAtBytes": crate::splice::sockmap::HOLD_AT,
                "monitorThreads": l.monitor_threads,
            },
        },
        "xdpGuard": xdp_guard,
        "connections": {
            "clientHelloTimeout": duration(opts.client_hello_timeout),
            "connectTimeout": duration(opts.connect_timeout),
            "connectAttempts": opts.connect_attempts,
            "maxConnectionsPerCluster": opts.max_cluster_connections,
            "maxClientHelloBytes": opts.max_client_hello,
            "maxPendingHandshakes": opts.max_pending_handshakes,
            "plaintextRoute": opts.plaintext_route,
            "drainTime": duration(ctx.info.drain_time),
        },
        "config": {
            "dataplaneFile": ctx.info.dataplane_file.display().to_string(),
            "dataplanes": ctx.info.dataplanes.display().to_string(),
            "lastReload": status,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let p = parse_query("filter=cluster.default_backend&format=json&x").expect("query");
        assert_eq!(param(&p, "filter"), Some("cluster.default_backend"));
        assert_eq!(param(&p, "x"), Some(""));
        let p = parse_query("filter=a%2Fb+c").expect("query");
        assert_eq!(param(&p, "filter"), Some("a/b c"));
        assert!(parse_query("filter=%zz").is_err());
        assert!(parse_query("filter=%4").is_err());
        assert!(parse_query("filter=%ff").is_err(), "not UTF-8");
    }

    #[test]
    fn read_only_address_conflicts() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let ok = |a: &str, r: &str| check_read_only_address(ip(a), ip(r));
        // Two specific addresses share a port.
        assert!(ok("127.0.0.1", "198.18.0.2").is_ok());
        assert!(ok("127.0.0.1", "::1").is_ok());
        assert!(ok("::1", "2001:2::2").is_ok());
        assert!(ok("0.0.0.0", "2001:2::2").is_ok(), "0.0.0.0 takes IPv4 addresses only");
        // The same address, also written as IPv4-mapped IPv6.
        assert!(ok("127.0.0.1", "127.0.0.1").expect_err("same").contains("is the admin address"));
        assert!(ok("198.18.0.2", "::ffff:198.18.0.2").is_err());
        // A wildcard covers the other address.
        for (a, r) in [("127.0.0.1", "0.0.0.0"), ("0.0.0.0", "198.18.0.2"), ("127.0.0.1", "::"), ("::", "::1")] {
            assert!(ok(a, r).expect_err("overlap").contains("overlap"), "{a} {r}");
        }
        assert!(ok("0.0.0.0", "::").is_err(), "`::` is dual-stack");
    }

    #[test]
    fn read_only_role_serves_only_probes_and_stats() {
        let served: Vec<&str> = ENDPOINTS.iter().filter(|e| Role::ReadOnly.serves(e)).map(|e| e.path).collect();
        assert_eq!(served, ["/", "/ready", "/stats", "/stats/prometheus"]);
        assert!(
            ENDPOINTS.iter().filter(|e| Role::ReadOnly.serves(e)).all(|e| e.method == Method::GET),
            "nothing that changes state"
        );
        assert_eq!(ENDPOINTS.iter().filter(|e| Role::Full.serves(e)).count(), ENDPOINTS.len());
    }

    #[test]
    fn loopback_peers() {
        assert!(is_loopback("127.0.0.1".parse().expect("ip")));
        assert!(is_loopback("::1".parse().expect("ip")));
        assert!(is_loopback("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!is_loopback("198.18.0.1".parse().expect("ip")));
    }
}
