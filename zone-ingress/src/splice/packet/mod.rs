//! The packet splice (`--splice packet`): after the ClientHello, a tc program forwards each
//! packet of the flow from one leg to the other, rewritten like a NAT that also shifts sequence
//! numbers, and redirects it out of the other interface; TCP is no longer terminated twice
//! ([docs/design.md#packet-splice](../../../../docs/design.md#packet-splice)).
//!
//! - `switch`: the sequence, timestamp and window arithmetic of the two translation entries;
//! - `monitor`: the thread that finishes each switch (parks the backend socket once its bytes
//!   are acknowledged), learns of each flow's end from the kernel's FIN/RST events, reports it,
//!   keeps translating through a linger period, then removes the entries and closes the parked
//!   sockets silently; idle timeout and the drain's resets;
//! - `reset`: RSTs sent on a flow's behalf (idle timeout, drain, failed switch);
//! - `pins`: the bpffs directory where maps and links are pinned, so flows outlive the daemon
//!   and the next one adopts them ([`PacketSplice::adopt`]);
//! - `ports`: the backend leg's source ports, which the daemon picks and holds itself, since a
//!   switched flow has no socket left to hold its 4-tuple.
//!
//! The handoff (this file), in order:
//! 1. refuse, with both sockets untouched, a flow the programs cannot carry: legs of different
//!    families, a handshake not observed (an interface without the programs), a backend that
//!    spoke first, more queued from the client than a ClientHello;
//! 2. read both sockets' sequence numbers and timestamp clocks, and move the backend socket's
//!    clock `switch::TS_MARGIN` ticks ahead (unseen if the flow then takes another path);
//! 3. guard the client socket (nothing it sends leaves any more), then read what it queued;
//! 4. install both translation entries: from now on every packet of either leg is forwarded;
//! 5. write what the client socket queued to the backend socket, which delivers it with its own
//!    retransmissions (the backend's ACKs of it come back to it, `Xlate::local_below`);
//! 6. park and close the client socket (silently: repair mode); the monitor does the same with
//!    the backend socket once its bytes are acked. A settled flow is map entries only.
//!
//! Why no byte can be lost or duplicated in any interleaving: see `switch` (one numbering for
//! both legs) and docs/design.md#packet-splice (the guard orders every ACK a socket sent before
//! the bytes the daemon relays).

mod ecn;
mod monitor;
pub mod pins;
pub mod ports;
mod reset;
pub mod switch;

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use aya::{
    maps::{HashMap, IterableMap as _, MapData, PerCpuArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use tracing::{debug, info, warn};
pub use zone_ingress_ebpf::packet::Syn;
use zone_ingress_ebpf::packet::{self as abi, Key, Meta, Xlate};

use self::{
    monitor::{Monitor, PFlow},
    ports::{Lease, Ports, Range},
    switch::Leg,
};
use super::{CloseReason, Limits, ReportSender, sockmap::LoadError};
use crate::{
    ebpf::{self, Object},
    sys::{self, BpfMap, tcp},
};

/// Most bytes the client may have queued at the switch: a ClientHello, and what a client sends
/// without waiting for an answer (early data). The backend socket delivers them with its own
/// retransmissions; beyond this the connection uses the sockmap splice.
pub const MAX_RELAYED: usize = 1 << 20;

/// Why one connection stays off the packet path (it then tries the sockmap splice; nothing
/// was changed on either socket).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("global cap of {0} packet-spliced connections reached")]
    Full(usize),
    #[error("the client leg is {client} and the backend leg {backend}: translating between families is not supported")]
    Families { client: &'static str, backend: &'static str },
    #[error("the {0} handshake was not seen by the tc program (its interface has no program attached)")]
    NotObserved(&'static str),
    #[error("the backend sent {0} bytes before the ClientHello")]
    BackendSpoke(u64),
    #[error("the client queued {0} bytes, more than a ClientHello")]
    TooMuchQueued(u64),
    #[error("the observed handshake does not match the socket (a stale observation)")]
    Stale,
    #[error(
        "ECN was negotiated on the {0} leg only: congestion marks on one leg would never reach the other leg's sender"
    )]
    EcnOneLeg(&'static str),
    #[error(
        "the backend leg's source port {0} was chosen by the kernel (every port of the packet splice's range is held toward that endpoint)"
    )]
    KernelPort(u16),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What a refused handoff gives back: both sockets, untouched, for the sockmap splice.
pub type Rejected = super::Rejected<Refused>;

/// The four addresses of a routed connection.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub client_local: SocketAddr,
    pub client_peer: SocketAddr,
    pub backend_local: SocketAddr,
    pub backend_peer: SocketAddr,
}

/// Global counters of the packet path.
#[derive(Debug, Default)]
pub struct PacketStats {
    /// Flows currently translated (ended ones lingering included until their entries go).
    pub active: AtomicUsize,
    /// Flows switched since start.
    pub total: AtomicU64,
    /// Connections the packet path refused (they went to the next path).
    pub refused: AtomicU64,
    /// Switches that failed after the client socket was read (the flow was reset).
    pub failed: AtomicU64,
    /// Flows an earlier daemon left in the pinned maps, taken over at start.
    pub adopted: AtomicU64,
    /// Flows kept as map entries only (docs/design.md#dormant-flows).
    pub dormant: AtomicUsize,
}

impl PacketStats {
    /// Counts a refused connection.
    fn refuse(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// A flow an earlier daemon left in the pinned maps, as [`PacketSplice::adopt`] hands it to the
/// owner of the flows.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub client: SocketAddr,
    pub endpoint: SocketAddr,
    /// The server name it was routed by.
    pub sni: String,
    /// When it was accepted.
    pub started: SystemTime,
}

/// The owner of the flows (the registry) as dormancy needs it (docs/design.md#dormant-flows).
pub trait Owner: Send + Sync {
    /// A place for flow `flow` in the group of its route and cluster, about to go dormant: the
    /// group's number (`None`: it stays awake, e.g. it is not registered).
    fn group(&self, flow: u64) -> Option<u32>;
    /// Gives back a place [`Owner::group`] gave, for a flow that stays awake after all.
    fn leave_group(&self, group: u32);
    /// Flow `flow`, with a place in `group`, goes dormant: keep nothing else of it (`false`: it
    /// is not registered; it stays awake).
    fn sleep(&self, flow: u64, group: u32) -> bool;
    /// A dormant flow wakes: register it again under its id, and give back its place in its
    /// group (`false`: its group is unknown; it is carried unregistered).
    fn wake(&self, w: &Woken) -> bool;
}

/// A dormant flow waking, as its owner registers it again.
#[derive(Debug, Clone)]
pub struct Woken {
    pub flow: u64,
    pub group: u32,
    /// The key of its counters ([`PacketSplice::flow_counters`]).
    pub token: u64,
    pub client: SocketAddr,
    pub endpoint: SocketAddr,
    pub sni: String,
    pub started: SystemTime,
}

/// A dormant flow as the maps give it (`/connections`, the scrape).
#[derive(Debug, Clone)]
pub struct Dormant {
    pub flow: u64,
    pub group: u32,
    pub client: SocketAddr,
    pub endpoint: SocketAddr,
    pub sni: String,
    pub started_unix_ms: u64,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// The last packet either way, `sys::monotonic_ns()` time.
    pub last_ns: u64,
}

/// The maps userspace uses, through plain `bpf(2)` (shared by threads without a lock).
struct Maps {
    flows: BpfMap<Key, Xlate>,
    quiet: BpfMap<Key, u64>,
    syns: BpfMap<Key, Syn>,
    meta: BpfMap<Key, Meta>,
}

/// State shared by the handoff (runtime workers) and the monitor thread.
struct Shared {
    maps: Maps,
    limits: Limits,
    stats: Arc<PacketStats>,
    reports: ReportSender,
    stop: AtomicBool,
    monitor: Monitor,
    next_token: AtomicU64,
    ports: Arc<Ports>,
    /// The registry, told when a flow goes dormant and when it wakes; none: no flow sleeps.
    owner: std::sync::OnceLock<Arc<dyn Owner>>,
    /// Set at the end of the drain: no flow goes dormant any more (each is about to be reset).
    no_sleep: AtomicBool,
}

/// The loaded and attached programs, their maps and the monitor thread.
pub struct PacketSplice {
    shared: Arc<Shared>,
    object: Arc<Object>,
    stats_map: Mutex<PerCpuArray<MapData, u64>>,
    /// Interfaces with both programs. Unpinned, their links belong to the object (dropped with
    /// it: detached); pinned, they are in `links`.
    attached: Mutex<Vec<String>>,
    /// The pin directory (`None`: nothing is pinned and the flows end with the process).
    pins: Option<PathBuf>,
    links: Mutex<Vec<PinnedLink>>,
    /// Makes a backend connect ask for ECN (`None`: the program could not be attached).
    ecn: Option<ecn::EcnAsk>,
}

impl std::fmt::Debug for PacketSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSplice").finish_non_exhaustive()
    }
}

impl PacketSplice {
    /// Loads both programs, attaches them (tcx) to the interfaces carrying `listen` (every
    /// interface but loopback when it is unspecified) and to those an earlier daemon pinned in
    /// `pins`, checks that this process may park sockets, and starts the monitor thread.
    /// With `pins`, the object's maps were pinned there (`ebpf::Users::packet_pins`) and the
    /// links are pinned there too: atomically replacing an earlier daemon's programs.
    ///
    /// # Errors
    /// No object, a program the kernel refused, no tcx (Linux < 6.6), no `CAP_NET_ADMIN`.
    pub fn load(
        object: Arc<Object>,
        limits: Limits,
        reports: ReportSender,
        listen: SocketAddr,
        pins: Option<PathBuf>,
        ports: Range,
    ) -> Result<Self, LoadError> {
        let io = |what| move |source| LoadError::Io { what, source };
        check_repair().map_err(io("TCP_REPAIR (the packet splice parks sockets; it needs CAP_NET_ADMIN)"))?;
        reset::check().map_err(io("a raw TCP socket (the packet splice sends RSTs on its flows' behalf: idle timeout, drain; it needs CAP_NET_RAW)"))?;
        // The verifier allows the programs' packet pointer arithmetic only with CAP_PERFMON: say
        // so rather than show its log.
        if !sys::has_capability(sys::CAP_PERFMON).unwrap_or(true) {
            return Err(LoadError::Io {
                what: "CAP_PERFMON (the kernel verifies the packet splice's tc programs as privileged ones; without it their packet pointer arithmetic is refused)",
                source: io::Error::from(io::ErrorKind::PermissionDenied),
            });
        }
        let flows: HashMap<MapData, Key, Xlate> = object.take_map(abi::FLOWS)?;
        let quiet: HashMap<MapData, Key, u64> = object.take_map(abi::QUIET)?;
        let syns: HashMap<MapData, Key, Syn> = object.take_map(abi::SYNS)?;
        let meta: HashMap<MapData, Key, Meta> = object.take_map(abi::META)?;
        let events: RingBuf<MapData> = object.take_map(abi::EVENTS)?;
        let stats_map: PerCpuArray<MapData, u64> = object.take_map(abi::STATS)?;
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(io("duplicating a map fd"));
        let maps = Maps {
            flows: BpfMap::new(dup(flows.map().fd().as_fd())?),
            quiet: BpfMap::new(dup(quiet.map().fd().as_fd())?),
            syns: BpfMap::new(dup(syns.map().fd().as_fd())?),
            meta: BpfMap::new(dup(meta.map().fd().as_fd())?),
        };
        {
            let mut ebpf = object.lock();
            for name in [abi::INGRESS_PROG, abi::EGRESS_PROG] {
                let program = |source| LoadError::Program { name, source };
                let prog: &mut SchedClassifier =
                    ebpf.program_mut(name).ok_or(ebpf::Error::Missing(name))?.try_into().map_err(program)?;
                prog.load().map_err(program)?;
            }
        }
        let ecn = match ecn::EcnAsk::attach(&object) {
            Ok((ecn, cgroup)) => {
                debug!(cgroup = %cgroup.display(), "packet splice: a backend connect asks for ECN when its client leg has it");
                Some(ecn)
            }
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "packet splice: backend connects cannot ask for ECN; a client that negotiates it takes the sockmap splice (docs/design.md#ecn)"
                );
                None
            }
        };
        let monitor = Monitor::new(events).map_err(io("epoll of the packet monitor"))?;
        let shared = Arc::new(Shared {
            maps,
            limits,
            stats: Arc::new(PacketStats::default()),
            reports,
            stop: AtomicBool::new(false),
            monitor,
            next_token: AtomicU64::new(1),
            ports: Arc::new(Ports::new(ports)),
            owner: std::sync::OnceLock::new(),
            no_sleep: AtomicBool::new(false),
        });
        let splice = Self {
            shared,
            object,
            stats_map: Mutex::new(stats_map),
            attached: Mutex::default(),
            pins,
            links: Mutex::default(),
            ecn,
        };
        let mut wanted = if listen.ip().is_unspecified() {
            sys::net::all_interfaces().map_err(io("listing the interfaces"))?
        } else {
            sys::net::interfaces_with(switch::unmap(listen.ip())).map_err(io("listing the interfaces"))?
        };
        for name in &wanted {
            splice.attach(name).map_err(|source| LoadError::Program { name: abi::INGRESS_PROG, source })?;
        }
        // Interfaces an earlier daemon attached to (toward endpoints it had): its flows there
        // keep being translated, by these programs now.
        for name in splice.pins.as_deref().map(pins::pinned_interfaces).unwrap_or_default() {
            if wanted.contains(&name) {
                continue;
            }
            match splice.attach(&name) {
                Ok(()) => wanted.push(name),
                Err(e) => {
                    warn!(interface = name, error = %e, "packet splice: a pinned interface is gone; unpinning it")
                }
            }
        }
        let thread = Arc::clone(&splice.shared);
        std::thread::Builder::new()
            .name("packet-mon".into())
            .spawn(move || monitor::run(&thread))
            .map_err(io("spawning the packet monitor thread"))?;
        let pinned = splice.pins.as_ref().map(|d| d.display().to_string());
        info!(interfaces = ?wanted, pins = pinned, source_ports = %ports, "packet splice: tc programs attached (tcx ingress and egress)");
        Ok(splice)
    }

    /// Attaches both programs to `name` unless they are there already. With a pin directory,
    /// a link pinned there is taken over (its program replaced atomically: no packet sees
    /// neither program), else a new one is made; either is pinned there.
    fn attach(&self, name: &str) -> Result<(), aya::programs::ProgramError> {
        let mut attached = self.attached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if attached.iter().any(|a| a == name) {
            return Ok(());
        }
        let mut ebpf = self.object.lock();
        for (prog, at, dir) in
            [(abi::INGRESS_PROG, TcAttachType::Ingress, "ingress"), (abi::EGRESS_PROG, TcAttachType::Egress, "egress")]
        {
            let p: &mut SchedClassifier =
                ebpf.program_mut(prog).ok_or(aya::programs::ProgramError::NotLoaded)?.try_into()?;
            let Some(pins) = &self.pins else {
                p.attach(name, at)?;
                continue;
            };
            let path = pins::link_path(pins, dir, name);
            let id = match take_pinned(&path) {
                Some(old) => match p.attach_to_link(old) {
                    Ok(id) => {
                        debug!(interface = name, direction = dir, "packet splice: took over a pinned link");
                        id
                    }
                    Err(e) => {
                        warn!(interface = name, direction = dir, error = %e, "packet splice: a pinned link could not be taken over; attaching anew");
                        p.attach_with_options(name, at, TcAttachOptions::TcxOrder(LinkOrder::default()))?
                    }
                },
                None => p.attach_with_options(name, at, TcAttachOptions::TcxOrder(LinkOrder::default()))?,
            };
            let link = FdLink::try_from(p.take_link(id)?)
                .map_err(|e| aya::programs::ProgramError::IOError(io::Error::other(e)))?;
            let pinned = link.pin(&path).map_err(|e| aya::programs::ProgramError::IOError(io::Error::other(e)))?;
            self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pinned);
        }
        attached.push(name.to_owned());
        Ok(())
    }

    /// The graceful exit: removes the pins (maps, links, directory), so that the programs detach
    /// and the maps are freed with the process. Called once every flow has ended or was reset.
    pub fn unpin(&self) {
        let Some(dir) = &self.pins else { return };
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for link in links {
            // Unpinned and dropped: detached.
            let _ = link.unpin();
        }
        pins::remove(dir);
        info!(dir = %dir.display(), "packet splice: pins removed");
    }

    /// Takes over the flows an earlier daemon left in the pinned maps: rebuilds each one's state
    /// from its entries and its `PKT_META` record, holds its backend source port, and registers
    /// it with the monitor, which handles its end, idle
    /// timeout and drain as any other. `register` gives each one (with its token, the key of its
    /// counters) to the owner of the flows and returns the id its close report carries (0: not
    /// registered; its end is then only logged here). A flow whose end the earlier daemon
    /// reported only lingers and is not given. Returns how many were adopted.
    pub fn adopt(&self, mut register: impl FnMut(&Adopted, u64) -> u64) -> usize {
        let m = &self.shared.maps;
        let mut clients = Vec::new();
        let _ = sys::bpf::for_each_key::<Key>(m.meta.fd(), u64::from(abi::MAX_ENTRIES), |k| clients.push(k));
        let mut adopted = 0;
        for kc in clients {
            let Ok(meta) = m.meta.get(&kc) else { continue };
            let kb = meta.backend_key;
            let (Ok(_), Ok(xb)) = (m.flows.get(&kc), m.flows.get(&kb)) else {
                // Its entries are gone (a client reused the 4-tuple and the program dropped it).
                let _ = m.meta.remove(&kc);
                continue;
            };
            let (client_peer, _) = switch::addrs(&kc);
            let (backend_peer, backend_local) = switch::addrs(&kb);
            let sni = sni_of(&meta);
            if meta.flags & abi::META_DORMANT != 0 {
                // The earlier daemon's groups went with it: this one registers the flow anew.
                let mut m2 = meta;
                m2.flags &= !abi::META_DORMANT;
                let _ = m.meta.insert(&kc, &m2);
            }
            let started = SystemTime::UNIX_EPOCH + Duration::from_millis(meta.started_unix_ms);
            let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.active.fetch_add(1, Ordering::AcqRel);
            let mut pf = PFlow::adopted(self.shared.ports.hold(backend_peer, backend_local.port()), [kc, kb], &meta);
            pf.guarded = pf.quiet().map(|q| m.quiet.get(&q).is_ok());
            // Ended and reported by the earlier daemon: it only lingers, then is cleaned up.
            let reported = meta.flags & abi::META_REPORTED != 0;
            let flow = if reported {
                0
            } else {
                self.shared.stats.adopted.fetch_add(1, Ordering::Relaxed);
                register(&Adopted { client: client_peer, endpoint: backend_peer, sni, started }, token)
            };
            pf.flow = flow;
            let _ = self.shared.monitor.install(token, &pf.keys, || Ok(()));
            self.shared.monitor.add(token, pf);
            if reported {
                self.shared.monitor.ended(token, false);
                continue;
            }
            info!(flow, client = %client_peer, endpoint = %backend_peer, "packet splice: adopted a flow from an earlier daemon");
            if xb.local_below != 0 {
                // The earlier daemon stopped before the backend acknowledged the ClientHello its
                // socket was delivering: that socket is gone, nobody will retransmit it.
                warn!(flow, "packet splice: an adopted flow's switch never settled; resetting");
                self.shared.abort(token, CloseReason::Internal);
            } else {
                self.shared.check_end(token);
            }
            adopted += 1;
        }
        adopted
    }

    /// Attaches to the interfaces that lead to `endpoints` (the routing table's choice for
    /// each), so their SYN-ACKs are seen and their packets translated. Logged, never fatal: a
    /// flow whose interface lacks the programs uses the sockmap splice.
    pub fn follow_endpoints(&self, endpoints: impl IntoIterator<Item = IpAddr>) {
        let mut seen = std::collections::BTreeSet::new();
        for ip in endpoints {
            let ip = switch::unmap(ip);
            if !seen.insert(ip) {
                continue;
            }
            match sys::net::interfaces_toward(ip) {
                Ok(names) => {
                    for name in names {
                        if let Err(e) = self.attach(&name) {
                            warn!(interface = name, error = %e, "packet splice: cannot attach");
                        } else {
                            info!(interface = name, endpoint = %ip, "packet splice: programs on the interface toward an endpoint");
                        }
                    }
                }
                Err(e) => warn!(endpoint = %ip, error = %e, "packet splice: no route to an endpoint"),
            }
        }
    }

    /// Gives the splice the owner of its flows: idle flows then go dormant (once).
    pub fn set_owner(&self, owner: Arc<dyn Owner>) {
        let _ = self.shared.owner.set(owner);
    }

    /// Calls `f` with each dormant flow, read from the maps.
    pub fn dormant_flows(&self, f: &mut dyn FnMut(&Dormant)) {
        self.shared.for_each_dormant(|kc, meta, c, b| {
            let (client, _) = switch::addrs(&kc);
            let (endpoint, _) = switch::addrs(&meta.backend_key);
            f(&Dormant {
                flow: meta.flow,
                group: meta.group,
                client,
                endpoint,
                sni: sni_of(meta),
                started_unix_ms: meta.started_unix_ms,
                client_to_backend: c.map_or(0, |c| switch::stream_bytes(c, meta.client_isn)),
                backend_to_client: b.map_or(0, |b| switch::stream_bytes(b, meta.backend_isn)),
                last_ns: c.map_or(0, |c| c.last_ns).max(b.map_or(0, |b| b.last_ns)),
            });
        });
    }

    /// Interfaces with the programs.
    pub fn interfaces(&self) -> Vec<String> {
        self.attached.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The client's SYN as the ingress program saw it (`None`: it did not, and the flow will
    /// take another path). Read once per connection: its MSS is announced to the backend
    /// ([`syn_mss`]) and the handoff takes it back.
    pub fn client_syn(&self, client_peer: SocketAddr, client_local: SocketAddr) -> Option<Syn> {
        self.shared.maps.syns.get(&switch::key(client_peer, client_local)).ok()
    }

    /// Whether a backend connect can ask for ECN ([`Self::ask_ecn`]).
    pub fn can_ask_ecn(&self) -> bool {
        self.ecn.is_some()
    }

    /// Makes the connect of `socket` ask for ECN (the client leg has it: docs/design.md#ecn)
    /// while the returned guard lives. `None`: it cannot (logged at debug level).
    pub fn ask_ecn(&self, socket: BorrowedFd<'_>) -> Option<ecn::Asking<'_>> {
        let ecn = self.ecn.as_ref()?;
        ecn.ask(socket).inspect_err(|e| debug!(error = %e, "packet splice: cannot ask for ECN on this connect")).ok()
    }

    /// A source port of the packet splice's range for a connect toward `endpoint`, held until
    /// the lease drops (`None`: every port is held toward it).
    pub fn lease_port(&self, endpoint: SocketAddr) -> Option<Lease> {
        self.shared.ports.lease(endpoint)
    }

    /// (endpoint, source port) pairs held now: connects in progress, flows not yet removed.
    pub fn ports_held(&self) -> usize {
        self.shared.ports.held()
    }

    /// Counters of the packet path.
    pub fn stats(&self) -> Arc<PacketStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Global program counters (`STAT_*` slots), summed over CPUs.
    pub fn program_counters(&self) -> [u64; abi::STAT_COUNT as usize] {
        ebpf::per_cpu_sums(&self.stats_map)
    }

    /// Entries and capacity of the flow, guard and adoption-record maps.
    pub fn map_entries(&self) -> Vec<(&'static str, u64, u32)> {
        let m = &self.shared.maps;
        [(abi::FLOWS, m.flows.fd()), (abi::QUIET, m.quiet.fd()), (abi::META, m.meta.fd())]
            .into_iter()
            .map(|(name, fd)| {
                let max = sys::bpf::max_entries(fd).unwrap_or(abi::MAX_ENTRIES);
                (name, sys::bpf::count_keys::<Key>(fd, u64::from(max)).unwrap_or(0), max)
            })
            .collect()
    }

    /// A flow's counters by the token its handoff returned: (client → backend bytes, backend →
    /// client bytes, last packet in `sys::monotonic_ns()` time); `None` once it is gone.
    pub fn flow_counters(&self, token: u64) -> Option<(u64, u64, u64)> {
        let flows = self.shared.monitor.flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let f = flows.get(&token)?;
        let (c, b) = self.shared.read_entries(f);
        let (c, b) = (c?, b?);
        Some((
            switch::stream_bytes(&c, f.client_isn),
            switch::stream_bytes(&b, f.backend_isn),
            c.last_ns.max(b.last_ns),
        ))
    }

    /// Switches whose backend socket is not parked yet: it still owns the ClientHello's
    /// retransmission, so the flow needs this process until it settles (one round trip).
    pub fn unsettled(&self) -> usize {
        self.shared.monitor.unsettled()
    }

    /// Resets every packet-spliced flow, both ways (the end of the drain time).
    pub fn abort_all(&self, reason: CloseReason) {
        self.shared.abort_all(reason);
    }

    /// Hands a routed connection to the packet path (module docs, steps 1–6). `Ok(token)`: the
    /// flow is the monitor's, and its end is reported with `flow` on the report channel.
    /// `Err`: both sockets come back untouched.
    pub fn handoff(
        &self,
        client: OwnedFd,
        backend: OwnedFd,
        addrs: Addrs,
        client_syn: Option<Syn>,
        flow: u64,
        origin: (&str, SystemTime),
    ) -> Result<u64, Rejected> {
        let cap = self.shared.limits.max_spliced;
        let stats = &self.shared.stats;
        if stats.active.fetch_add(1, Ordering::AcqRel) >= cap {
            stats.refuse();
            return Err(Rejected { client, backend, error: Refused::Full(cap) });
        }
        let (legs, queued) = match self.prepare(client.as_fd(), backend.as_fd(), &addrs, client_syn) {
            Ok(p) => p,
            Err(error) => {
                stats.refuse();
                return Err(Rejected { client, backend, error });
            }
        };
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        stats.total.fetch_add(1, Ordering::Relaxed);
        self.shared.switch(token, flow, [client, backend], &addrs, (&legs, queued), origin);
        Ok(token)
    }

    /// Steps 1–2: everything that can refuse, changing nothing on either socket but the backend
    /// socket's timestamp clock (a few ticks ahead: a peer sees only a faster clock).
    fn prepare(
        &self,
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
        a: &Addrs,
        syn_c: Option<Syn>,
    ) -> Result<([Leg; 2], u64), Refused> {
        let io = |what| move |source| Refused::Io { what, source };
        let fam = |s: SocketAddr| if switch::unmap(s.ip()).is_ipv4() { "IPv4" } else { "IPv6" };
        if fam(a.client_peer) != fam(a.backend_peer) {
            return Err(Refused::Families { client: fam(a.client_peer), backend: fam(a.backend_peer) });
        }
        // Once switched, no socket holds the backend leg's port: it must be one the kernel
        // never gives out by itself.
        if !self.shared.ports.contains(a.backend_local.port()) {
            return Err(Refused::KernelPort(a.backend_local.port()));
        }
        let syns = &self.shared.maps.syns;
        let syn_c = syn_c.ok_or(Refused::NotObserved("client"))?;
        let syn_b =
            syns.get(&switch::key(a.backend_peer, a.backend_local)).map_err(|_| Refused::NotObserved("backend"))?;
        let ic = sys::tcp_info(client).map_err(io("TCP_INFO of the client socket"))?;
        let ib = sys::tcp_info(backend).map_err(io("TCP_INFO of the backend socket"))?;
        if ib.bytes_received > 0 {
            return Err(Refused::BackendSpoke(ib.bytes_received));
        }
        // The program passes the IP header's ECN field and the ECE/CWR flags through: end to end
        // that is right when both legs negotiated ECN, or neither (docs/design.md#ecn).
        match (ic.options() & sys::TCPI_OPT_ECN != 0, ib.options() & sys::TCPI_OPT_ECN != 0) {
            (true, false) => return Err(Refused::EcnOneLeg("client")),
            (false, true) => return Err(Refused::EcnOneLeg("backend")),
            _ => {}
        }
        // The connection's task only peeked: all the client sent is queued.
        let queued = ic.bytes_received;
        if queued > MAX_RELAYED as u64 {
            return Err(Refused::TooMuchQueued(queued));
        }
        // The backend socket's timestamp clock moves `TS_MARGIN` forward in the same moment of
        // repair mode (`switch::TS_MARGIN`; harmless if the flow then takes another path).
        let ts_b = ib.options() & 1 != 0;
        let sc = tcp::snapshot(client, 0).map_err(io("TCP_QUEUE_SEQ of the client socket"))?;
        let sb = tcp::snapshot(backend, if ts_b { switch::TS_MARGIN } else { 0 })
            .map_err(io("TCP_QUEUE_SEQ of the backend socket"))?;
        // The SYN-ACK acknowledged our SYN; the backend has sent nothing since its own SYN. A
        // mismatch means the observation belongs to an earlier connection on the same 4-tuple.
        if sb.seqs.write_seq != syn_b.ack || sb.seqs.rcv_nxt != syn_b.seq.wrapping_add(1) {
            return Err(Refused::Stale);
        }
        // Bytes may arrive between the two reads, never 64 KiB of them before a ServerHello.
        let offset = u64::from(sc.seqs.rcv_nxt.wrapping_sub(syn_c.seq.wrapping_add(1)));
        if offset.wrapping_sub(ic.bytes_received) > 1 << 16 {
            return Err(Refused::Stale);
        }
        let now = sys::monotonic_ns();
        let peer_ts = |syn: &Syn| {
            let o = switch::parse_options(&syn.options[..(syn.options_len as usize).min(40)]);
            // The peer's clock now: its SYN's TSval plus the milliseconds since (RFC 7323
            // clocks tick between 1 ms and 1 s; a slower one only makes ours run ahead).
            o.ts.map_or(0, |(v, _)| v.wrapping_add(u32::try_from(now.saturating_sub(syn.ns) / 1_000_000).unwrap_or(0)))
        };
        let leg = |(local, peer): (SocketAddr, SocketAddr), syn: &Syn, snap: tcp::Snapshot, info: &sys::TcpInfo| Leg {
            local,
            peer,
            peer_isn: syn.seq,
            // Nothing was written to the socket yet: its next byte follows its SYN.
            local_isn: snap.seqs.write_seq.wrapping_sub(1),
            ts: info.options() & 1 != 0,
            peer_wscale: info.snd_wscale(),
            local_wscale: info.rcv_wscale(),
            local_ts_now: snap.ts_now,
            peer_ts_now: peer_ts(syn),
            ifindex: syn.ifindex,
        };
        Ok((
            [
                leg((a.client_local, a.client_peer), &syn_c, sc, &ic),
                leg((a.backend_local, a.backend_peer), &syn_b, sb, &ib),
            ],
            queued,
        ))
    }
}

impl Drop for PacketSplice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

impl Shared {
    /// Steps 3–6. Past step 3 the ClientHello is consumed: a failure resets the flow.
    fn switch(
        &self,
        token: u64,
        flow: u64,
        [client, backend]: [OwnedFd; 2],
        a: &Addrs,
        (legs, queued): (&[Leg; 2], u64),
        (sni, started): (&str, SystemTime),
    ) {
        let port = self.ports.hold(a.backend_peer, a.backend_local.port());
        let mut pf = PFlow::new(flow, [client, backend], port, a, legs);
        let quiet = pf.quiet();
        let result = (|| -> io::Result<()> {
            let c = pf.fds[0].as_ref().map(AsFd::as_fd).ok_or(io::ErrorKind::NotConnected)?;
            // An ACK the client socket still owes goes out before the guard.
            tcp::quickack(c)?;
            self.maps.quiet.insert(&quiet[0], &0)?;
            pf.guarded[0] = true;
            // Everything the client socket acknowledged before the guard is queued now: what
            // `prepare` saw queued and what arrived since.
            let queued = usize::try_from(queued).unwrap_or(MAX_RELAYED);
            // What was queued, and room for what arrived since (grown on demand, up to
            // `MAX_RELAYED` more).
            let mut buf = vec![0u8; queued + 4096];
            let mut n = 0;
            let mut fin = false;
            loop {
                if n == buf.len() {
                    if buf.len() >= queued + MAX_RELAYED {
                        return Err(io::Error::other("the client sent more than a ClientHello during the switch"));
                    }
                    buf.resize((buf.len() * 2).min(queued + MAX_RELAYED), 0);
                }
                match sys::recv_nonblocking(c, &mut buf[n..]) {
                    Ok(0) => {
                        // The client's FIN reached the socket: the backend socket relays it too.
                        fin = true;
                        break;
                    }
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            let relayed = u32::try_from(n).unwrap_or(u32::MAX);
            let ((kc, xc), (kb, xb)) = switch::entries(&legs[0], &legs[1], relayed, fin);
            pf.keys = [kc, kb];
            // The backend's entry first; both in one system call. A failure may leave the
            // backend's alone: it goes too, as the flow is not installed.
            self.monitor.install(token, &pf.keys, || {
                self.maps.flows.insert_all([(kb, xb), (kc, xc)]).inspect_err(|_| {
                    let _ = self.maps.flows.remove(&kb);
                })
            })?;
            pf.installed = true;
            let b = pf.fds[1].as_ref().map(AsFd::as_fd).ok_or(io::ErrorKind::NotConnected)?;
            write_all(b, &buf[..n])?;
            if fin {
                sys::shutdown_write(b)?;
                pf.client_fin = true;
            }
            pf.relayed = relayed;
            // What a later daemon needs to adopt the flow (not fatal: the flow runs without).
            let mut meta = Meta {
                client_isn: legs[0].peer_isn,
                backend_isn: legs[1].peer_isn,
                relayed,
                flags: if fin { abi::META_CLIENT_FIN } else { 0 },
                started_unix_ms: started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
                backend_key: kb,
                sni_len: u32::try_from(sni.len().min(abi::META_SNI)).unwrap_or(0),
                ..Meta::default()
            };
            meta.sni[..meta.sni_len as usize].copy_from_slice(&sni.as_bytes()[..meta.sni_len as usize]);
            if let Err(e) = self.maps.meta.insert(&kc, &meta) {
                debug!(flow, error = %e, "packet splice: no adoption record for this flow");
            }
            // The client socket has nothing left to send: park it and close it (silently). Its
            // guard stays until the flow ends: what the stack would answer to a packet of the
            // flow that is not translated (a RST: no socket has the 4-tuple now) never leaves.
            tcp::park(c)?;
            pf.parked[0] = true;
            pf.fds[0] = None;
            Ok(())
        })();
        match result {
            Ok(()) => {
                // A FIN or RST the program reported before the flow was registered found no
                // flow: look at the entries once now.
                if self.monitor.add(token, pf) {
                    self.check_end(token);
                }
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(flow, error = %e, "packet splice: the switch failed; resetting the connection");
                self.monitor.add(token, pf);
                self.abort(token, CloseReason::Internal);
            }
        }
    }

    /// Both translation entries of `f` as the program last left them.
    fn read_entries(&self, f: &PFlow) -> (Option<Xlate>, Option<Xlate>) {
        if !f.installed {
            return (None, None);
        }
        (self.maps.flows.get(&f.keys[0]).ok(), self.maps.flows.get(&f.keys[1]).ok())
    }
}

/// The server name a flow's record keeps.
fn sni_of(meta: &Meta) -> String {
    String::from_utf8_lossy(&meta.sni[..(meta.sni_len as usize).min(abi::META_SNI)]).into_owned()
}

/// Writes all of `buf` to a non-blocking socket (a ClientHello: it fits the send buffer).
fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !buf.is_empty() {
        match sys::send_nonblocking(fd, buf) {
            Ok(k) => buf = &buf[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The link pinned at `path`, unpinned and ready to be taken over (`None`: there is none).
fn take_pinned(path: &std::path::Path) -> Option<SchedClassifierLink> {
    let old = PinnedLink::from_pin(path).ok()?;
    // The pin goes; the link stays while this fd holds it.
    let fd = old.unpin().ok()?;
    SchedClassifierLink::try_from(fd).ok()
}

/// Repair mode is available to this process (`CAP_NET_ADMIN`): tried on a fresh socket.
fn check_repair() -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    tcp::park(fd.as_fd())
}

impl PacketSplice {
    /// The MSS to announce on the listener: a client's segments are forwarded as they are, so
    /// they must fit every interface a backend may be behind (the smallest MTU of the
    /// namespace's interfaces but loopback, less the IP and TCP headers).
    pub fn listener_mss(v6: bool) -> Option<u16> {
        listener_mss(&sys::net::all_interfaces().ok()?, v6)
    }
}

/// The smallest MTU of `interfaces` less the IP and TCP headers.
fn listener_mss(interfaces: &[String], v6: bool) -> Option<u16> {
    let mtu = interfaces
        .iter()
        .filter_map(|name| std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok())
        .filter_map(|s| s.trim().parse::<u32>().ok())
        .min()?;
    u16::try_from(mtu.saturating_sub(if v6 { 60 } else { 40 })).ok()
}

/// The MSS a SYN announced: the client's is announced to the backend, so neither leg sends
/// segments the other cannot carry.
#[must_use]
pub fn syn_mss(syn: &Syn) -> Option<u16> {
    switch::parse_options(&syn.options[..(syn.options_len as usize).min(40)]).mss
}

/// A map key → the token of the flow it belongs to, for the event handler.
type Index = StdHashMap<Key, u64>;

#[cfg(test)]
mod tests {
    #[test]
    fn mss_from_mtu() {
        assert_eq!(super::listener_mss(&["does-not-exist".into()], false), None);
    }
}
