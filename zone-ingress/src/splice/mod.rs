//! Moving bytes after routing: the contract every splice mode keeps, and the modes.
//!
//! - [`packet`] (`--splice packet`): after the ClientHello a tc program forwards each packet of
//!   the flow to the other leg, rewritten (addresses, ports, sequence numbers, options), as a
//!   router would; the ingress's own sockets are parked and silent;
//! - [`sockmap`] (`--splice kernel`): a SOCKHASH with an sk_skb verdict redirects every skb to
//!   the peer socket; monitor threads turn FIN/RST on one side into FIN/RST on the other;
//! - [`userspace`]: a bounded copy loop with the same close semantics, without eBPF.
//!
//! The contract ([docs/design.md#close](../../../docs/design.md#close)): a mode moves every byte
//! in order or aborts the connection with RST both ways; a FIN from one side reaches the other
//! only after every byte before it; and the mode reports each connection's end exactly once as
//! [`Closed`] (why, and the bytes each way) to the connection's owner. The userspace relay
//! returns it; a kernel mode, whose connections outlive the task that routed them, sends it as
//! a [`CloseReport`] on the channel its owner gave it. A new mode gets its own module here.

pub mod packet;
pub mod sockmap;
pub mod userspace;

use std::time::Duration;

/// Which path moves a connection's bytes after routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpliceMode {
    /// Per connection, the first path that takes it: packet splice, then sockmap splice, then
    /// userspace (a path whose programs cannot load is skipped for every connection).
    Auto,
    /// Packet splice first; a connection it cannot carry uses the sockmap splice, then
    /// userspace. The daemon refuses to start if the tc programs cannot load.
    Packet,
    /// Kernel splice only: the daemon refuses to start if the programs cannot load.
    Kernel,
    /// Userspace copy loop only; no eBPF is loaded.
    Userspace,
}

/// The path that ended up carrying one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    Kernel,
    Userspace,
    Packet,
}

impl Path {
    /// Every path, in [`Path::index`] order.
    pub const ALL: [Self; 3] = [Self::Kernel, Self::Userspace, Self::Packet];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
            Self::Packet => "packet",
        }
    }

    /// Position in per-path arrays.
    pub fn index(self) -> usize {
        match self {
            Self::Kernel => 0,
            Self::Userspace => 1,
            Self::Packet => 2,
        }
    }
}

/// Dead-peer detection of relayed and spliced sockets: after `Limits::keepalive` idle, a probe
/// every `KEEPALIVE_INTERVAL`; `KEEPALIVE_PROBES` unanswered ones end the connection. Keepalive
/// only probes an idle connection: a peer that vanishes while bytes to it are unacknowledged is
/// found by the retransmission limit, or sooner by `Limits::backend_user_timeout`.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_PROBES: u32 = 6;

/// Sets what every backend socket gets at the handoff, in every mode: `TCP_NODELAY`, dead-peer
/// detection and, when asked for, `TCP_USER_TIMEOUT`. (Client sockets inherit the first two from
/// the listeners.)
///
/// # Errors
/// A socket option could not be set.
pub fn prepare_backend(fd: std::os::fd::BorrowedFd<'_>, limits: &Limits) -> std::io::Result<()> {
    crate::sys::set_nodelay(fd)?;
    crate::sys::set_dead_peer_detection(fd, limits.keepalive, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES)?;
    if let Some(timeout) = limits.backend_user_timeout {
        crate::sys::set_user_timeout(fd, timeout)?;
    }
    Ok(())
}

/// Limits that apply to spliced connections.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Limits {
    /// Close a connection after this long without a byte in either direction (Kuma: 1 h).
    pub idle_timeout: Duration,
    /// Memory guard: abort a kernel-spliced connection whose bytes waiting in the peer's psock
    /// queue stay above this for `in_flight_grace`.
    pub max_in_flight: u64,
    pub in_flight_grace: Duration,
    /// Global cap on kernel-spliced connections; beyond it connections use the userspace path.
    pub max_spliced: usize,
    /// Abort when a half-close drain check makes no progress for this long.
    pub drain_stall: Duration,
    /// Keepalive idle time on every client socket (set on the listeners, inherited) and every
    /// backend socket: a spliced socket is never read by the daemon, so the kernel must notice
    /// dead peers; the userspace path gets the same.
    pub keepalive: Duration,
    /// `TCP_USER_TIMEOUT` of backend sockets (`--backend-user-timeout`), off by default: bytes
    /// sent to a backend that stay unacknowledged this long (a backend that vanished while the
    /// client was sending) end the flow with a reset both ways instead of after the kernel's
    /// retransmission limit (about 15 min). The cost: a backend that keeps its window closed
    /// this long (a paused reader) is cut too.
    pub backend_user_timeout: Option<Duration>,
    /// Userspace path: bytes buffered per direction.
    pub userspace_buffer: usize,
    /// Kernel path: monitor threads (close handling, backpressure, relays of held directions),
    /// each owning a share of the connections.
    pub monitor_threads: usize,
}

/// Defaults of [`Limits`] (Kuma's idle timeout), also the command line's.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// See [`DEFAULT_IDLE_TIMEOUT`].
pub const DEFAULT_MAX_IN_FLIGHT: u64 = 64 << 20;
/// See [`DEFAULT_IDLE_TIMEOUT`].
pub const DEFAULT_IN_FLIGHT_GRACE: Duration = Duration::from_secs(5);

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            in_flight_grace: DEFAULT_IN_FLIGHT_GRACE,
            max_spliced: (zone_ingress_ebpf::splice::MAX_SOCKETS / 2) as usize,
            drain_stall: Duration::from_secs(60),
            keepalive: Duration::from_secs(60),
            backend_user_timeout: None,
            userspace_buffer: 64 << 10,
            monitor_threads: sockmap::default_monitor_threads(),
        }
    }
}

/// Why a connection ended, for the access log and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    ClientFin,
    BackendFin,
    ClientReset,
    BackendReset,
    IdleTimeout,
    MemoryGuard,
    DrainStall,
    Shutdown,
    Internal,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientFin => "client_fin",
            Self::BackendFin => "backend_fin",
            Self::ClientReset => "client_reset",
            Self::BackendReset => "backend_reset",
            Self::IdleTimeout => "idle_timeout",
            Self::MemoryGuard => "memory_guard",
            Self::DrainStall => "drain_stall",
            Self::Shutdown => "shutdown",
            Self::Internal => "internal_error",
        }
    }
}

/// Totals of a finished connection.
#[derive(Clone, Copy, Debug)]
pub struct Closed {
    pub reason: CloseReason,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// The end of a connection that a kernel mode owned: the owner's id for it (given at the
/// handoff) and its totals.
#[derive(Clone, Copy, Debug)]
pub struct CloseReport {
    pub flow: u64,
    pub closed: Closed,
}

/// Where a kernel mode sends its close reports. Unbounded, yet bounded in practice: one report
/// per connection the mode owns, and each is sent once.
pub type ReportSender = tokio::sync::mpsc::UnboundedSender<CloseReport>;

/// What a path that refuses a connection gives back: both sockets, untouched (nothing was read
/// from or written to either), for the next path, and why it refused.
pub struct Rejected<E> {
    pub client: std::os::fd::OwnedFd,
    pub backend: std::os::fd::OwnedFd,
    pub error: E,
}
/// The owner's end of a [`ReportSender`].
pub type ReportReceiver = tokio::sync::mpsc::UnboundedReceiver<CloseReport>;

/// A channel for close reports.
#[must_use]
pub fn report_channel() -> (ReportSender, ReportReceiver) {
    tokio::sync::mpsc::unbounded_channel()
}
