//! The sockmap splice (`--splice kernel`): one SOCKHASH with the sk_skb stream verdict
//! attached, the pairing map, and the monitor threads that turn FIN/RST on one socket into
//! FIN/RST on its peer and hold a direction whose peer falls behind.
//!
//! - `handoff`: hands a routed connection's two sockets to the kernel, in the order that
//!   keeps every byte on one path ([docs/design.md#handoff](../../../../docs/design.md#handoff));
//! - `monitor`: the monitor threads: FIN → drain check → `SHUT_WR`, RST → RST, idle timeout,
//!   memory guard, and the close report each connection ends with
//!   ([docs/design.md#close](../../../../docs/design.md#close));
//! - `hold`: backpressure: holding a direction and relaying what it kept
//!   ([docs/design.md#backpressure](../../../../docs/design.md#backpressure)).
//!
//! After the handoff userspace never reads or writes either socket, except to relay a held
//! direction. Each connection ends with one [`CloseReport`] on the channel given to
//! [`KernelSplice::load`]; its owner (the flow registry) logs and counts it.

mod handoff;
mod hold;
mod monitor;

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use aya::{
    maps::{HashMap, IterableMap as _, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
};
use tracing::{error, info};
use zone_ingress_ebpf::splice::{self as abi, Hold, Pair};

pub use self::hold::HOLD_AT;
use self::monitor::{Monitor, fatal_on_panic};
use super::{CloseReason, CloseReport, Limits, ReportSender};
use crate::{
    ebpf::{self, Object},
    sys::{BpfMap, epoll},
};

/// Why the kernel splice could not be set up at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Object(#[from] ebpf::Error),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Why one connection could not be handed to the kernel (it is then served in userspace;
/// nothing was moved, so that path starts clean).
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("global cap of {0} spliced connections reached")]
    Full(usize),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Map {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What a failed handoff gives back: both sockets, untouched, for the userspace path.
pub type Rejected = super::Rejected<HandoffError>;

/// The maps userspace writes, used without a lock (`sys::BpfMap`): handoffs on the runtime's
/// workers and the monitors' drain checks, holds and closes run in parallel.
struct Maps {
    socks: BpfMap<u64, i32>,
    verdict: BpfMap<u64, i32>,
    pairs: BpfMap<u64, Pair>,
    hold: BpfMap<u64, Hold>,
}

/// Global counters of the kernel path, read by the metrics module.
#[derive(Debug, Default)]
pub struct KernelStats {
    /// Connections currently spliced in the kernel.
    pub active: AtomicUsize,
    /// Connections handed to the kernel since start.
    pub total: AtomicU64,
    /// Connections aborted because their in-flight bytes stayed above the cap.
    pub memory_guard_aborts: AtomicU64,
    /// Connections aborted because the verdict found the peer missing.
    pub peer_missing_aborts: AtomicU64,
    /// Connections aborted because the drain check did not converge.
    pub drain_stalls: AtomicU64,
    /// Sum over connections of in-flight bytes at the last sample.
    pub in_flight_bytes: AtomicU64,
    /// Times a direction was held for backpressure (its bytes relayed by the monitor).
    pub holds: AtomicU64,
    /// Bytes the monitor relayed for held directions.
    pub relayed_bytes: AtomicU64,
}

/// The loaded programs and maps plus the monitor threads. Dropping it detaches the verdict
/// (sockets already inserted keep theirs until they close).
pub struct KernelSplice {
    shared: Arc<Shared>,
    // Keeps the program attached for the process lifetime (legacy prog-attach: the program goes
    // with the object).
    _object: Arc<Object>,
    stats_map: Mutex<PerCpuArray<MapData, u64>>,
}

/// State shared by the handoff (on the runtime's workers) and the monitor threads.
struct Shared {
    maps: Maps,
    events: Mutex<RingBuf<MapData>>,
    /// The monitor threads; connection `token` belongs to `monitors[token % len]`.
    monitors: Vec<Monitor>,
    next_token: AtomicU64,
    limits: Limits,
    stats: Arc<KernelStats>,
    stop: AtomicBool,
    /// Where each connection's end is reported.
    reports: ReportSender,
}

/// Default number of monitor threads: one per CPU, at most 4.
pub fn default_monitor_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(4)
}

/// Index of the client socket in a connection's per-side arrays.
const CLIENT: usize = 0;
/// Index of the backend socket.
const BACKEND: usize = 1;

impl KernelSplice {
    /// Takes the splice's maps out of `object`, loads and attaches the verdict, and starts the
    /// monitor threads. Each connection's end is reported on `reports`.
    pub fn load(object: Arc<Object>, limits: Limits, reports: ReportSender) -> Result<Self, LoadError> {
        let socks: SockHash<MapData, u64> = object.take_map(abi::SOCKS)?;
        let verdict: SockHash<MapData, u64> = object.take_map(abi::VERDICT)?;
        let events: RingBuf<MapData> = object.take_map(abi::EVENTS)?;
        let pairs: HashMap<MapData, u64, Pair> = object.take_map(abi::PAIRS)?;
        let hold: HashMap<MapData, u64, Hold> = object.take_map(abi::HOLD)?;
        let stats_map: PerCpuArray<MapData, u64> = object.take_map(abi::STATS)?;
        // The typed aya maps above checked key and value sizes; from here on plain fds.
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(|source| LoadError::Io { what: "duplicating a map fd", source })
        };
        let maps = Maps {
            socks: BpfMap::new(dup(socks.fd().as_fd())?),
            verdict: BpfMap::new(dup(verdict.fd().as_fd())?),
            pairs: BpfMap::new(dup(pairs.map().fd().as_fd())?),
            hold: BpfMap::new(dup(hold.map().fd().as_fd())?),
        };
        {
            let program = |source| LoadError::Program { name: abi::VERDICT_PROG, source };
            let mut ebpf = object.lock();
            let prog: &mut SkSkb = ebpf
                .program_mut(abi::VERDICT_PROG)
                .ok_or(ebpf::Error::Missing(abi::VERDICT_PROG))?
                .try_into()
                .map_err(program)?;
            prog.load().map_err(program)?;
            prog.attach(verdict.fd()).map_err(program)?;
        }

        let threads = limits.monitor_threads.max(1);
        let monitors = (0..threads)
            .map(|_| Monitor::new())
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| LoadError::Io { what: "epoll/eventfd of a monitor thread", source })?;
        epoll::add(monitors[0].epoll.as_fd(), events.as_raw_fd(), libc::EPOLLIN as u32, monitor::EVENTS_TOKEN)
            .map_err(|source| LoadError::Io { what: "epoll_ctl of the EVENTS ring", source })?;
        let shared = Arc::new(Shared {
            maps,
            events: Mutex::new(events),
            monitors,
            next_token: AtomicU64::new(1),
            limits,
            stats: Arc::new(KernelStats::default()),
            stop: AtomicBool::new(false),
            reports,
        });
        for idx in 0..threads {
            let monitor = Arc::clone(&shared);
            let body = move || {
                fatal_on_panic(
                    || monitor.run(idx),
                    |msg| {
                        // Its spliced connections would stay open unwatched: end the process (the
                        // kernel closes every socket), as a supervisor expects of a broken proxy.
                        error!(thread = idx, panic = msg, "splice monitor thread panicked; exiting");
                        std::process::exit(70);
                    },
                );
            };
            std::thread::Builder::new().name(format!("splice-mon-{idx}")).spawn(body).map_err(|source| {
                // The threads already started would otherwise run for the process lifetime.
                shared.stop.store(true, Ordering::Relaxed);
                LoadError::Io { what: "spawning a monitor thread", source }
            })?;
        }
        info!(
            program = abi::VERDICT_PROG,
            map = abi::VERDICT,
            monitor_threads = threads,
            "sk_skb stream verdict attached"
        );
        Ok(Self { shared, _object: object, stats_map: Mutex::new(stats_map) })
    }

    /// Counters of the kernel path.
    pub fn stats(&self) -> Arc<KernelStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Global verdict counters (`STAT_*` slots), summed over CPUs.
    pub fn verdict_counters(&self) -> [u64; abi::STAT_COUNT as usize] {
        ebpf::per_cpu_sums(&self.stats_map)
    }

    /// Number of spliced connections currently tracked.
    pub fn active(&self) -> usize {
        self.shared.stats.active.load(Ordering::Relaxed)
    }

    /// The `PAIRS` entry of a spliced socket, by its cookie: the bytes the verdict forwarded
    /// from it and when it last did. `None` once the connection has closed. One map lookup: for
    /// on-demand reads (admin, scrapes), never a per-connection poll.
    pub fn socket_counters(&self, cookie: u64) -> Option<Pair> {
        self.shared.maps.pairs.get(&cookie).ok()
    }

    /// Duplicates of the maps' fds, by map name, for read-only inspection (entry counts).
    pub fn map_fds(&self) -> Vec<(&'static str, OwnedFd)> {
        let maps = &self.shared.maps;
        [
            (abi::SOCKS, maps.socks.fd().try_clone_to_owned()),
            (abi::VERDICT, maps.verdict.fd().try_clone_to_owned()),
            (abi::PAIRS, maps.pairs.fd().try_clone_to_owned()),
            (abi::HOLD, maps.hold.fd().try_clone_to_owned()),
        ]
        .into_iter()
        .filter_map(|(name, fd)| fd.ok().map(|fd| (name, fd)))
        .collect()
    }

    /// Resets every spliced connection, both sides (the end of the drain time: a peer must not
    /// take the cut for the end of the stream); the monitor threads keep running until the
    /// `KernelSplice` is dropped.
    pub fn abort_all(&self, reason: CloseReason) {
        for monitor in &self.shared.monitors {
            let mut conns = monitor.lock_conns();
            let tokens: Vec<u64> = conns.conns.keys().copied().collect();
            for t in tokens {
                self.shared.abort(&mut conns, t, CLIENT, reason);
            }
        }
    }
}

impl Drop for KernelSplice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

impl Shared {
    fn monitor_of(&self, token: u64) -> &Monitor {
        // `as usize`: the remainder is below `monitors.len()`.
        &self.monitors[(token % self.monitors.len() as u64) as usize]
    }

    /// Reports the end of connection `flow` to its owner. The receiver lives as long as the
    /// ingress; a send can only fail during process exit, when nobody needs the report.
    fn report(&self, report: CloseReport) {
        let _ = self.reports.send(report);
    }
}
