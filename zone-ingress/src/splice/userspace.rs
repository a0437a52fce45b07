//! Userspace path: the kernel splice's semantics (half-close each way, RST as RST, idle timeout)
//! with a bounded copy loop. Used by `--splice userspace`, by `auto` when eBPF cannot load, and
//! for single connections the kernel refused (e.g. a client that sent FIN before the handoff).

use std::{
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};
use tracing::debug;

use super::{CloseReason, Closed, Limits};
use crate::sys;

/// Live byte counters of one userspace connection.
#[derive(Debug, Default)]
pub struct Progress {
    pub client_to_backend: AtomicU64,
    pub backend_to_client: AtomicU64,
    /// `sys::monotonic_ns()` of the last byte moved.
    pub last_active_ns: AtomicU64,
}

enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies until EOF, then shuts the writer down (FIN), so each direction half-closes alone.
/// The buffer exists only while bytes are moving: it is allocated (not zeroed) when the source
/// turns readable and freed when it has nothing more, so an idle flow holds no buffer.
async fn pump(
    from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counter: &AtomicU64,
    progress: &Progress,
    buffer: usize,
) -> Result<(), PumpError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        buf.clear();
        buf.reserve(buffer);
        let n = match from.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf = Vec::new();
                continue;
            }
            Err(e) => return Err(PumpError::Read(e)),
        };
        if n == 0 {
            return to.shutdown().await.map_err(PumpError::Write);
        }
        to.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        progress.last_active_ns.store(sys::monotonic_ns(), Ordering::Relaxed);
    }
}

/// Relays between `client` and `backend` until both directions are finished, one side resets,
/// the connection idles out, or `abort` resolves (the end of the drain time). Nothing has been
/// read from `client` yet: the ClientHello is still in its receive queue and is relayed like
/// any other byte. An idle timeout or an abort resets both sides, so neither mistakes the cut
/// for the end of the stream.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    limits: &Limits,
    progress: Arc<Progress>,
    abort: impl Future<Output = ()>,
) -> Closed {
    // The client socket inherited what it needs from the listener (`server::bind`).
    if let Err(e) = super::prepare_backend(backend.as_fd(), limits) {
        debug!(error = %e, "setting the backend socket's options failed");
    }
    let fds = [client.as_raw_fd(), backend.as_raw_fd()];
    progress.last_active_ns.store(sys::monotonic_ns(), Ordering::Relaxed);
    // Borrowed halves: unlike `into_split`'s owned write half, dropping them does not send a
    // FIN, so a reset can be propagated as a reset (the peer must not see a clean EOF first).
    let (mut client, mut backend) = (client, backend);
    let (cr, cw) = client.split();
    let (br, bw) = backend.split();
    let buffer = limits.userspace_buffer;
    let mut c2b = pin!(pump(cr, bw, &progress.client_to_backend, &progress, buffer));
    let mut b2c = pin!(pump(br, cw, &progress.backend_to_client, &progress, buffer));
    let mut done = [false; 2];
    let idle_ns = u64::try_from(limits.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let tick = limits.idle_timeout.min(Duration::from_secs(1));
    let mut first_fin = None;
    let mut abort = pin!(abort);
    // `reset[side]`: end that side with RST (the other one failed, or the flow is cut).
    let (reason, reset) = loop {
        tokio::select! {
            r = &mut c2b, if !done[0] => match r {
                Ok(()) => { done[0] = true; first_fin.get_or_insert(CloseReason::ClientFin); }
                Err(PumpError::Read(e)) => { debug!(error = %e, "client read failed"); break (CloseReason::ClientReset, [false, true]) }
                Err(PumpError::Write(e)) => { debug!(error = %e, "backend write failed"); break (CloseReason::BackendReset, [true, false]) }
            },
            r = &mut b2c, if !done[1] => match r {
                Ok(()) => { done[1] = true; first_fin.get_or_insert(CloseReason::BackendFin); }
                Err(PumpError::Read(e)) => { debug!(error = %e, "backend read failed"); break (CloseReason::BackendReset, [true, false]) }
                Err(PumpError::Write(e)) => { debug!(error = %e, "client write failed"); break (CloseReason::ClientReset, [false, true]) }
            },
            () = tokio::time::sleep(tick) => {
                let last = progress.last_active_ns.load(Ordering::Relaxed);
                if sys::monotonic_ns().saturating_sub(last) >= idle_ns {
                    break (CloseReason::IdleTimeout, [true, true]);
                }
            }
            () = &mut abort => break (CloseReason::Shutdown, [true, true]),
        }
        if done == [true, true] {
            break (first_fin.unwrap_or(CloseReason::ClientFin), [false, false]);
        }
    };
    for (fd, _) in fds.iter().zip(reset).filter(|(_, reset)| *reset) {
        // SAFETY: both streams are still alive inside the pinned futures until this fn returns.
        let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
        let _ = sys::set_linger_zero(fd);
    }
    Closed {
        reason,
        client_to_backend: progress.client_to_backend.load(Ordering::Relaxed),
        backend_to_client: progress.backend_to_client.load(Ordering::Relaxed),
    }
}
