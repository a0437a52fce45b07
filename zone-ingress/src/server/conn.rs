//! One connection: accept → peek SNI → route → connect → handoff → close.
//!
//! The task peeks the ClientHello (never consuming it), picks a route and an endpoint,
//! connects, registers the flow and hands both sockets to the kernel splice, or relays them in
//! userspace. With the kernel the task then ends and the flow registry owns the connection
//! until the splice reports its end ([`super::close_reports`]); a userspace relay lives in the
//! task, which closes the flow itself. Either way the end goes through [`Ingress::close_flow`].

use std::{
    fmt, io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{TcpSocket, TcpStream},
};
use tracing::{debug, info, warn};

use super::{Ingress, Snapshot};
use crate::{
    client_hello::{self, Parsed},
    flows::Flow,
    metrics::{ClusterStats, Metrics},
    reject::RejectReason,
    routing::Route,
    sni,
    splice::{
        CloseReason, Closed, Path,
        packet::{Addrs, PacketSplice, Refused, Rejected as PacketRejected, Syn, ports::Lease},
        sockmap::{KernelSplice, Rejected},
        userspace::{self, Progress},
    },
    sys,
};

/// At most this many rejected connections are logged per second (a flood cannot fill a disk);
/// the rest are counted and the number suppressed is logged with the next line.
const REJECT_LOG_PER_SEC: u64 = 20;

/// Counts and (rate-limited) logs a connection closed before reaching a backend.
fn reject(ingress: &Ingress, client: &TcpStream, peer: SocketAddr, sni: Option<&str>, reason: RejectReason) {
    // Consume what the client already sent (we only peeked it): closing a socket with unread
    // data makes the kernel answer with RST, and a rejected client should see a plain FIN.
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: `scratch` is writable for its length.
        let n =
            unsafe { libc::recv(client.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
    }
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let m = &ingress.metrics;
    m.reject(reason);
    m.destroyed.fetch_add(1, Ordering::Relaxed);
    if reason.no_filter_chain_match() {
        m.no_filter_chain_match.fetch_add(1, Ordering::Relaxed);
    }
    if reason == RejectReason::ClientHelloTimeout {
        m.pre_cx_timeout.fetch_add(1, Ordering::Relaxed);
    }
    let now = sys::monotonic_ns() / 1_000_000_000;
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        LOGGED.store(0, Ordering::Relaxed);
    }
    if LOGGED.fetch_add(1, Ordering::Relaxed) < REJECT_LOG_PER_SEC {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        info!(target: "access", client = %peer, sni, reason = reason.label(), why = reason.describe(), suppressed, "connection rejected");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        m.access_log_suppressed.fetch_add(1, Ordering::Relaxed);
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(%peer))]
pub(super) async fn handle(ingress: &Arc<Ingress>, client: TcpStream, peer: SocketAddr, accepted_at: Instant) {
    let started = SystemTime::now();
    let snap = ingress.snapshot();
    let table = &snap.table;
    if table.is_empty() {
        // Kuma's answer when no mesh has any service (docs/design.md#routing).
        let body = table.default_answer().map_or_else(
            || {
                let proxy = snap.zone_ingress.as_ref().map_or(ingress.options.proxy_id.as_str(), |zi| zi.name.as_str());
                serde_json::json!({"proxy": proxy, "zone": ingress.options.zone}).to_string().into_bytes()
            },
            <[u8]>::to_vec,
        );
        let mut client = client;
        let _ = client.write_all(&body).await;
        let _ = client.shutdown().await;
        reject(ingress, &client, peer, None, RejectReason::EmptyTable);
        return;
    }
    let opts = &ingress.options;
    let m = &ingress.metrics;
    let Some(slot) = HandshakeSlot::take(m, opts.max_pending_handshakes) else {
        return reject(ingress, &client, peer, None, RejectReason::HandshakeOverflow);
    };
    let parsed = match tokio::time::timeout(
        opts.client_hello_timeout,
        peek_client_hello(&client, opts.max_client_hello),
    )
    .await
    {
        Err(_) => return reject(ingress, &client, peer, None, RejectReason::ClientHelloTimeout),
        Ok(Err(_)) => return reject(ingress, &client, peer, None, RejectReason::ClientClosed),
        Ok(Ok(p)) => p,
    };
    drop(slot);
    let sni = match &parsed {
        Parsed::Complete { sni: Some(sni), .. } => {
            m.tls_found.fetch_add(1, Ordering::Relaxed);
            m.sni_found.fetch_add(1, Ordering::Relaxed);
            sni.as_str().to_owned()
        }
        Parsed::Complete { sni: None, .. } => {
            m.tls_found.fetch_add(1, Ordering::Relaxed);
            m.sni_not_found.fetch_add(1, Ordering::Relaxed);
            return reject(ingress, &client, peer, None, RejectReason::NoSni);
        }
        Parsed::Invalid(client_hello::Invalid::NotTls) if opts.plaintext_route.is_some() => {
            m.tls_not_found.fetch_add(1, Ordering::Relaxed);
            opts.plaintext_route.clone().unwrap_or_default()
        }
        Parsed::Invalid(invalid) => {
            if matches!(invalid, client_hello::Invalid::TooLarge) {
                m.client_hello_too_large.fetch_add(1, Ordering::Relaxed);
            } else {
                m.tls_not_found.fetch_add(1, Ordering::Relaxed);
            }
            return reject(ingress, &client, peer, None, (*invalid).into());
        }
        Parsed::Incomplete { .. } => return reject(ingress, &client, peer, None, RejectReason::ClientClosed),
    };
    let route = match table.lookup(&sni) {
        Ok(route) => route,
        Err(r) => {
            if r == crate::routing::Reject::NoEndpoints {
                count_none_healthy(&snap, &sni);
            }
            return reject(ingress, &client, peer, Some(&sni), r.into());
        }
    };
    let Some(stats) = snap.clusters.get(&route.cluster.name).cloned() else {
        // Every route's cluster is in its snapshot; nothing to count against otherwise.
        warn!(sni, cluster = route.cluster.name, "cluster missing from the snapshot");
        return reject(ingress, &client, peer, Some(&sni), RejectReason::UnknownSni);
    };
    // Hold on to the route, not the whole table: a long flow must not keep old tables alive.
    drop(snap);
    stats.downstream_cx_total.fetch_add(1, Ordering::Relaxed);
    // Per-cluster cap (Envoy's circuit breaker), kept across reloads; released at close.
    let Some(permit) = stats.try_acquire(opts.max_cluster_connections) else {
        stats.upstream_cx_overflow.fetch_add(1, Ordering::Relaxed);
        return reject(ingress, &client, peer, Some(&sni), RejectReason::ClusterOverflow);
    };
    // The packet path forwards the backend's segments to the client as they are: the backend
    // must not send larger ones than the client announced.
    // With the packet splice only: the listener's address and, by it, the client's SYN as the
    // program saw it, read once for the MSS here and for the handoff.
    let seen = ingress.packet.as_ref().map(|p| {
        let local = client.local_addr();
        let syn = local.as_ref().ok().and_then(|l| p.client_syn(peer, *l));
        (local, syn)
    });
    let mss = seen.as_ref().and_then(|(_, syn)| syn.as_ref()).and_then(crate::splice::packet::syn_mss);
    // ECN on the client leg: the backend's connect asks for it too, so that the legs agree
    // (docs/design.md#ecn).
    let ecn = ingress.packet.as_ref().is_some_and(PacketSplice::can_ask_ecn)
        && sys::tcp_info(client.as_fd()).is_ok_and(|i| i.options() & sys::TCPI_OPT_ECN != 0);
    let Some((backend, endpoint, connect_started, source_port)) = connect(ingress, &route, &stats, mss, ecn).await
    else {
        return reject(ingress, &client, peer, Some(&sni), RejectReason::ConnectFailed);
    };
    debug!(sni, %endpoint, "routed");

    let progress = Arc::new(Progress::default());
    let mode = if ingress.packet.is_some() {
        Path::Packet
    } else if ingress.kernel.is_some() {
        Path::Kernel
    } else {
        Path::Userspace
    };
    // What the packet path records for a later daemon to adopt the flow.
    let origin = ingress.packet.as_ref().map(|_| (sni.clone(), started));
    let flow = ingress.flows.open(Flow {
        client: peer,
        sni,
        route,
        endpoint,
        mode,
        started,
        started_ns: sys::monotonic_ns().saturating_sub(u64::try_from(accepted_at.elapsed().as_nanos()).unwrap_or(0)),
        upstream_since: connect_started,
        progress: Arc::clone(&progress),
        cookies: None,
        permit,
        source_port,
    });
    let (client, backend) = match (&ingress.packet, seen) {
        (Some(packet), Some((client_local, client_syn))) => match hand_to_packet(
            ingress,
            packet,
            [client, backend],
            HandoffAddrs { client_local, client_peer: peer, backend_peer: endpoint, client_syn },
            flow,
            accepted_at,
            origin,
        ) {
            None => return,
            Some((client, backend, error)) => {
                info!(%peer, flow, %error, "packet splice refused this connection; trying the next path");
                (client, backend)
            }
        },
        _ => (client, backend),
    };
    let (client, backend) = match &ingress.kernel {
        Some(kernel) => {
            let cookies =
                (|| Some([sys::socket_cookie(client.as_fd()).ok()?, sys::socket_cookie(backend.as_fd()).ok()?]))();
            ingress.flows.set_mode(flow, Path::Kernel, cookies);
            match hand_to_kernel(ingress, kernel, client, backend, flow, accepted_at) {
                None => return,
                Some((client, backend, error)) => {
                    m.kernel_fallbacks.fetch_add(1, Ordering::Relaxed);
                    info!(%peer, flow, %error, "kernel splice refused this connection; relaying in userspace");
                    (client, backend)
                }
            }
        }
        None => (client, backend),
    };
    ingress.flows.set_mode(flow, Path::Userspace, None);
    relay(ingress, client, backend, flow, accepted_at, &progress).await;
}

/// A subset SNI that matched no endpoint counts as `upstream_cx_none_healthy` of its service.
fn count_none_healthy(snap: &Snapshot, sni: &str) {
    if let Ok(parsed) = sni::parse_legacy(sni)
        && let Some(mesh) = parsed.mesh()
        && let Some(stats) = snap.clusters.get(&format!("{mesh}:{}", parsed.service))
    {
        stats.upstream_cx_none_healthy.fetch_add(1, Ordering::Relaxed);
    }
}

/// A route's tags as `k=v,k=v` for the access log.
struct Tags<'a>(&'a std::collections::BTreeMap<String, String>);

impl fmt::Display for Tags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// The access log line of a closed flow.
pub(super) fn log_close(id: u64, flow: &Flow, closed: &Closed) {
    let route = &flow.route;
    let duration_ns = sys::monotonic_ns().saturating_sub(flow.started_ns);
    // `mode` directly before the byte counts: the text format reads `mode="kernel" bytes…`.
    info!(
        target: "access",
        flow = id,
        client = %flow.client,
        sni = flow.sni,
        service = route.service,
        mesh = route.mesh,
        tags = %Tags(&route.tags),
        cluster = route.cluster.name,
        endpoint = %flow.endpoint,
        mode = flow.mode.as_str(),
        bytes_client_to_backend = closed.client_to_backend,
        bytes_backend_to_client = closed.backend_to_client,
        duration_ms = duration_ns / 1_000_000,
        reason = closed.reason.as_str(),
        "connection closed"
    );
}

/// Hands flow `flow` to the kernel. `None`: the kernel owns it now (or it was closed); `Some`:
/// the kernel refused it and both sockets come back untouched, for the userspace relay.
fn hand_to_kernel(
    ingress: &Arc<Ingress>,
    kernel: &KernelSplice,
    client: TcpStream,
    backend: TcpStream,
    flow: u64,
    accepted_at: Instant,
) -> Option<(TcpStream, TcpStream, crate::splice::sockmap::HandoffError)> {
    let to_owned = |s: TcpStream| -> io::Result<OwnedFd> { Ok(OwnedFd::from(s.into_std()?)) };
    let internal = Closed { reason: CloseReason::Internal, client_to_backend: 0, backend_to_client: 0 };
    let (Ok(client_fd), Ok(backend_fd)) = (to_owned(client), to_owned(backend)) else {
        // into_std only fails if deregistration fails, which leaves nothing to serve.
        ingress.close_flow(flow, internal);
        return None;
    };
    // Counted before the handoff: the report may arrive before this function returns.
    ingress.spliced_open.fetch_add(1, Ordering::AcqRel);
    match kernel.handoff(client_fd, backend_fd, flow) {
        Ok(()) => {
            ingress.metrics.spliced(Path::Kernel);
            ingress.metrics.handoff.observe(accepted_at.elapsed());
            debug!(flow, "spliced in the kernel");
            None
        }
        Err(Rejected { client, backend, error }) => {
            ingress.spliced_open.fetch_sub(1, Ordering::AcqRel);
            take_back(ingress, flow, client, backend).map(|(c, b)| (c, b, error))
        }
    }
}

/// Both sockets of a refused handoff, back in the runtime; `None` (the flow closed) if that
/// fails.
fn take_back(ingress: &Ingress, flow: u64, client: OwnedFd, backend: OwnedFd) -> Option<(TcpStream, TcpStream)> {
    let back = |fd: OwnedFd| TcpStream::from_std(std::net::TcpStream::from(fd));
    match (back(client), back(backend)) {
        (Ok(c), Ok(b)) => Some((c, b)),
        _ => {
            let internal = Closed { reason: CloseReason::Internal, client_to_backend: 0, backend_to_client: 0 };
            ingress.close_flow(flow, internal);
            None
        }
    }
}

/// What the connection's task already knows of the packet path's inputs: the addresses it
/// accepted and connected with, and the client's SYN as the program saw it.
struct HandoffAddrs {
    client_local: io::Result<SocketAddr>,
    client_peer: SocketAddr,
    backend_peer: SocketAddr,
    client_syn: Option<Syn>,
}

/// Hands flow `flow` to the packet path. `None`: the packet path owns it now (or it was
/// closed); `Some`: refused, both sockets come back untouched for the next path.
fn hand_to_packet(
    ingress: &Arc<Ingress>,
    packet: &PacketSplice,
    [client, backend]: [TcpStream; 2],
    known: HandoffAddrs,
    flow: u64,
    accepted_at: Instant,
    origin: Option<(String, SystemTime)>,
) -> Option<(TcpStream, TcpStream, Refused)> {
    let internal = Closed { reason: CloseReason::Internal, client_to_backend: 0, backend_to_client: 0 };
    let addrs = (|| {
        io::Result::Ok(Addrs {
            client_local: known.client_local?,
            client_peer: known.client_peer,
            // The only address not known yet: the kernel picked the source address at connect.
            backend_local: backend.local_addr()?,
            backend_peer: known.backend_peer,
        })
    })();
    let addrs = match addrs {
        Ok(a) => a,
        Err(source) => return Some((client, backend, Refused::Io { what: "the connection's addresses", source })),
    };
    let to_owned = |s: TcpStream| -> io::Result<OwnedFd> { Ok(OwnedFd::from(s.into_std()?)) };
    let (Ok(client_fd), Ok(backend_fd)) = (to_owned(client), to_owned(backend)) else {
        ingress.close_flow(flow, internal);
        return None;
    };
    // Counted before the handoff: the report may arrive before this function returns.
    ingress.spliced_open.fetch_add(1, Ordering::AcqRel);
    let (sni, started) = origin.unwrap_or_else(|| (String::new(), SystemTime::now()));
    match packet.handoff(client_fd, backend_fd, addrs, known.client_syn, flow, (&sni, started)) {
        Ok(token) => {
            ingress.flows.set_mode(flow, Path::Packet, Some([token, 0]));
            ingress.metrics.spliced(Path::Packet);
            ingress.metrics.handoff.observe(accepted_at.elapsed());
            debug!(flow, token, "spliced at packet level");
            None
        }
        Err(PacketRejected { client, backend, error }) => {
            ingress.spliced_open.fetch_sub(1, Ordering::AcqRel);
            take_back(ingress, flow, client, backend).map(|(c, b)| (c, b, error))
        }
    }
}

/// Relays flow `flow` in userspace until it ends, then closes it.
async fn relay(
    ingress: &Arc<Ingress>,
    client: TcpStream,
    backend: TcpStream,
    flow: u64,
    accepted_at: Instant,
    progress: &Arc<Progress>,
) {
    ingress.metrics.spliced(Path::Userspace);
    ingress.metrics.handoff.observe(accepted_at.elapsed());
    let mut abort = ingress.abort_relays.subscribe();
    // End of the drain time: the relay resets both sides.
    let aborted = async move {
        let _ = abort.wait_for(|abort| *abort).await;
    };
    let closed = userspace::relay(client, backend, &ingress.options.limits, Arc::clone(progress), aborted).await;
    ingress.close_flow(flow, closed);
}

/// Tries the route's endpoints in round-robin order, each with the connect timeout. Returns
/// the connected socket, its endpoint, when its (successful) attempt started, and the packet
/// splice's hold on its source port. `mss`: the MSS to announce; `ecn`: ask for ECN.
async fn connect(
    ingress: &Ingress,
    route: &Route,
    stats: &ClusterStats,
    mss: Option<u16>,
    ecn: bool,
) -> Option<(TcpStream, SocketAddr, Instant, Option<Lease>)> {
    let opts = &ingress.options;
    for endpoint in route.candidates(opts.connect_attempts.max(1)) {
        stats.upstream_cx_total.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let attempt = async {
            // A 4-tuple our bind makes that the kernel still has (a TIME_WAIT left by a flow on
            // another path) fails the connect at once: the next port of the range is tried,
            // and after a few a port of the kernel's choice.
            for tries_left in (0..=PORT_TRIES).rev() {
                let socket = if endpoint.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                if let Some(mss) = mss {
                    sys::tcp::set_maxseg(socket.as_fd(), mss)?;
                }
                let lease = match &ingress.packet {
                    Some(packet) if tries_left > 0 => bind_source_port(&socket, packet, endpoint),
                    _ => None,
                };
                let _asking = ingress.packet.as_ref().filter(|_| ecn).and_then(|p| p.ask_ecn(socket.as_fd()));
                match socket.connect(endpoint).await {
                    Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable && lease.is_some() => {
                        debug!(%endpoint, port = lease.as_ref().map(Lease::port), "source port still in use toward the endpoint; trying the next");
                    }
                    result => return result.map(|s| (s, lease)),
                }
            }
            Err(io::Error::from(io::ErrorKind::AddrNotAvailable))
        };
        match tokio::time::timeout(opts.connect_timeout, attempt).await {
            Ok(Ok((stream, lease))) => {
                stats.upstream_cx_connect_ms.observe(started.elapsed());
                return Some((stream, endpoint, started, lease));
            }
            Ok(Err(e)) => debug!(%endpoint, error = %e, "connect failed"),
            Err(_) => {
                debug!(%endpoint, "connect timed out");
                stats.upstream_cx_connect_timeout.fetch_add(1, Ordering::Relaxed);
            }
        }
        stats.upstream_cx_connect_fail.fetch_add(1, Ordering::Relaxed);
    }
    None
}

/// Connects (and binds) tried per endpoint before a port of the packet splice's range is given
/// up for a kernel-chosen one.
const PORT_TRIES: usize = 4;

/// Binds `socket` to a source port of the packet splice's range (docs/design.md#source-ports),
/// held toward `endpoint` by the lease returned. `None`: the range is exhausted toward it, or
/// the ports tried are bound by other sockets; the kernel then picks the port at connect, and
/// the flow takes the sockmap splice.
fn bind_source_port(socket: &TcpSocket, packet: &PacketSplice, endpoint: SocketAddr) -> Option<Lease> {
    let any: std::net::IpAddr = if endpoint.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    // Shared with the daemon's other connects to other endpoints from the same port.
    socket.set_reuseaddr(true).ok()?;
    for _ in 0..PORT_TRIES {
        let lease = packet.lease_port(endpoint)?;
        match socket.bind(SocketAddr::new(any, lease.port())) {
            Ok(()) => return Some(lease),
            // A listener (of any process) on that port.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => {
                debug!(%endpoint, error = %e, "binding a source port of the packet splice failed");
                return None;
            }
        }
    }
    None
}

/// A connection's place among those waiting for their ClientHello (`--max-pending-handshakes`).
struct HandshakeSlot<'a>(&'a Metrics);

/// A burst of at least this many pending handshakes is worth trimming the heap after.
const TRIM_AFTER_PEAK: u64 = 1024;

impl<'a> HandshakeSlot<'a> {
    fn take(m: &'a Metrics, max: usize) -> Option<Self> {
        let now = m.handshakes_pending.fetch_add(1, Ordering::AcqRel) + 1;
        if now > max as u64 {
            m.handshakes_pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        m.handshakes_peak.fetch_max(now, Ordering::Relaxed);
        Some(Self(m))
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        let now = self.0.handshakes_pending.fetch_sub(1, Ordering::AcqRel) - 1;
        // After a burst (a flood of connections that send nothing, say) the allocator keeps the
        // freed buffers: once the burst is mostly gone, hand the free pages back to the kernel.
        let peak = self.0.handshakes_peak.load(Ordering::Relaxed);
        if peak >= TRIM_AFTER_PEAK
            && now <= peak / 8
            && self.0.handshakes_peak.compare_exchange(peak, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            debug!(peak, now, "handshake burst over; returning free heap pages");
            tokio::task::spawn_blocking(sys::trim_heap);
        }
    }
}

/// First size of the peek buffer: a typical ClientHello fits (most are under 600 bytes; a
/// post-quantum key share brings one to about 1.8 KiB). It doubles while peeks fill it, up to
/// the cap, so a connection that sent little holds little.
const PEEK_START: usize = 2048;

/// Peeks (`MSG_PEEK`, never consuming) until the ClientHello is complete, invalid, or the
/// client closes. Returns `Err` when the client closed or failed first.
///
/// Readiness: a peek leaves the bytes queued, so the socket would stay "readable" for ever; a
/// peek that finds nothing new clears tokio's readiness, but only the readiness observed
/// *before* that peek (`try_io`), so an edge from bytes that arrive during or after it is kept.
/// Whoever reads the socket next (the userspace relay waits for readability before its first
/// read) therefore never waits for an edge that already came.
async fn peek_client_hello(stream: &TcpStream, max: usize) -> io::Result<Parsed> {
    // One byte more than the cap, so "too large" is distinguishable from "exactly at the cap".
    let mut buf = vec![0u8; PEEK_START.min(max + 1)];
    let mut have = 0usize;
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let mut n = peek_now(stream, &mut buf)?;
            while n == buf.len() && buf.len() < max + 1 {
                buf.resize((buf.len() * 2).min(max + 1), 0);
                n = peek_now(stream, &mut buf)?;
            }
            if n > have { Ok(n) } else { Err(io::ErrorKind::WouldBlock.into()) }
        });
        match peeked {
            Ok(n) => {
                have = n;
                match client_hello::parse(&buf[..have], max) {
                    Parsed::Incomplete { .. } if have <= max => {}
                    Parsed::Incomplete { .. } => return Ok(Parsed::Invalid(client_hello::Invalid::TooLarge)),
                    done => return Ok(done),
                }
            }
            // Nothing new, and the client has sent its FIN: nothing more will come.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                if have == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                return Ok(Parsed::Incomplete { need_at_least: None });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// One non-blocking `recv(MSG_PEEK)`; 0 when nothing is queued.
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe {
        libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) }
}
