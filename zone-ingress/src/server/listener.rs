//! The listener: bound sockets (`SO_REUSEPORT`, one per CPU by default) and their accept loops.
//! Each accepted connection gets one task ([`super::conn::handle`]).

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpSocket};
use tracing::warn;

use super::{Ingress, conn};
use crate::{
    splice::{KEEPALIVE_INTERVAL, KEEPALIVE_PROBES},
    sys,
};

/// Fails if another socket (another zone-ingress, or anything else) is bound to `addr`: binds a
/// probe without `SO_REUSEPORT`, which the kernel refuses next to any listener on that port.
///
/// # Errors
/// `AddrInUse` with an explanation, or the probe's own error.
pub fn check_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    probe.set_reuseaddr(true)?;
    match probe.bind(addr) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{addr} is already in use by another socket (another zone-ingress instance?); not sharing the port"
            ),
        )),
        other => other,
    }
}

/// Binds `n` listeners on `addr` with `SO_REUSEPORT`, so the kernel spreads accepts over cores.
/// `TCP_NODELAY` and keepalive (after `keepalive` idle) are set on the listeners, which every
/// accepted socket inherits: both paths need them on the client socket, which then gets them
/// without five system calls per connection.
pub fn bind(addr: SocketAddr, n: usize, keepalive: Duration, mss: Option<u16>) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        sys::set_nodelay(socket.as_fd())?;
        sys::set_dead_peer_detection(socket.as_fd(), keepalive, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES)?;
        if let Some(mss) = mss {
            sys::tcp::set_maxseg(socket.as_fd(), mss)?;
        }
        socket.bind(addr)?;
        // Port 0: the first bind picks it, the others must share it.
        addr = socket.local_addr()?;
        out.push(socket.listen(4096)?);
    }
    Ok(out)
}

pub(super) async fn accept_loop(ingress: Arc<Ingress>, listener: TcpListener) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let accepted_at = Instant::now();
                ingress.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                ingress.tasks.fetch_add(1, Ordering::AcqRel);
                let ing = Arc::clone(&ingress);
                tokio::spawn(async move {
                    conn::handle(&ing, stream, peer, accepted_at).await;
                    ing.tasks.fetch_sub(1, Ordering::AcqRel);
                    ing.tasks_done.notify_waiters();
                });
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the backlog holds clients.
                warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
