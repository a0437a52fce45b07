//! The packet monitor thread: finishes switches, ends flows, lingers, cleans up.
//!
//! - **Settle**: the backend socket keeps sending (and retransmitting) what it relayed until the
//!   backend acknowledges all of it; the program then clears `Xlate::local_below` and says so on
//!   `PKT_EVENTS` (unsettled switches are also looked at every [`SETTLE_POLL`], in case the ring
//!   was full). The monitor then guards, parks and closes the socket (silently): the flow is map
//!   entries only from then on.
//! - **End**: the program reports the first FIN and the first RST of each direction on
//!   `PKT_EVENTS`. A RST either way, or a FIN both ways, ends the flow: its close report goes to
//!   the owner at once, with the exact byte counts (the FIN's sequence number marks the end).
//! - **Linger**: the entries keep translating for [`CLOSED_LINGER`] if a RST ended the flow or
//!   both FINs were acknowledged by then, else for [`LINGER`] (retransmitted FINs, final ACKs);
//!   then they are
//!   removed, then the guard entries, and the flow's hold on its backend source port is
//!   released (`ports`): no connection of the daemon reuses that 4-tuple while packets of the
//!   flow may still arrive.
//! - **Idle**: once a second, flows whose last packet is older than the idle timeout are reset
//!   both ways (the entries' `last_ns`), which also catches an event lost to a full ring.
//! - **Dormant** (docs/design.md#dormant-flows): a settled flow without a packet for
//!   [`DORMANT_AFTER`] leaves the daemon's memory: its owner keeps a count in a group, its port
//!   hold becomes a bit, and its `PKT_META` record gets its id, its group and `META_DORMANT`.
//!   A scan every eighth of the idle timeout (1 to 10 s) reads dormant flows from the maps; an
//!   event of theirs, an idle timeout (or entries a new connection on its client 4-tuple
//!   dropped), or the drain wakes one: it is rebuilt from its record and registered again, then
//!   handled as any other.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, VecDeque},
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Mutex, MutexGuard, PoisonError, atomic::Ordering},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tracing::{debug, info, warn};
use zone_ingress_ebpf::packet::{
    EV_FIN, EV_RST, Key, MAX_ENTRIES, META_CLIENT_FIN, META_DORMANT, META_REPORTED, Meta, Xlate,
};

use super::{
    Addrs, Index, Shared, Woken,
    ports::Lease,
    reset,
    switch::{self, Leg},
};
use crate::{
    splice::{CloseReason, CloseReport, Closed},
    sys::{self, epoll, tcp},
};

/// How long an ended flow's entries keep translating: the peer that closed last retransmits its
/// FIN until it is acknowledged (200 ms, 400 ms, ... after the loss of a final ACK), and its
/// 4-tuple must not be reused meanwhile. Below 15 s, so a flow's sockets are gone by then.
pub(super) const LINGER: Duration = Duration::from_secs(10);
/// The linger of a flow a RST ended, or both of whose FINs were acknowledged, as the program
/// saw: only stragglers are left (nothing is retransmitted after a RST, and neither peer keeps
/// the connection). A FIN retransmitted after it (its ACK lost beyond the ingress) meets
/// the ingress's stack and a RST, which ends a peer that has had every byte acknowledged; a late
/// duplicate meets a new connection's sequence and timestamp checks, as a TIME_WAIT 4-tuple
/// reused after 1 s does (`tcp_tw_reuse`). Five times the flows per source port than `LINGER`.
pub(super) const CLOSED_LINGER: Duration = Duration::from_secs(2);
/// A switch whose relayed bytes the backend has not acknowledged by then is reset.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// How often unsettled switches are looked at without an event.
const SETTLE_POLL: Duration = Duration::from_millis(20);
/// How often idle flows are looked for.
const IDLE_SCAN: Duration = Duration::from_secs(1);
/// The longest interval between two scans of the dormant flows (`Shared::dormant_scan_every`).
const DORMANT_SCAN_MAX: Duration = Duration::from_secs(10);
/// Passes are at least this far apart. Under load the ring has an event for nearly every
/// settle and FIN, and waking for each (three per flow) cost more than the work; a pass handles
/// all that is pending. A flow's end is then seen at most this much later, and a settled
/// switch parks its backend socket as much later (nothing waits for that).
const MIN_PASS_GAP: Duration = Duration::from_millis(2);
/// How long an event's token waits for its flow's registration (microseconds after the install).
const EARLY_KEEP: Duration = Duration::from_secs(1);
/// A settled flow without a packet either way for this long goes dormant at the next scan.
pub(super) const DORMANT_AFTER: Duration = Duration::from_secs(2);
/// A scan that put at least this many flows to sleep gives the room they left back to the
/// system (maps shrunk, `malloc_trim`).
const SHRINK_AFTER: usize = 256;

/// One packet-spliced flow.
pub(super) struct PFlow {
    /// The owner's id, carried by the close report.
    pub(super) flow: u64,
    /// The client and backend sockets until each is parked and closed (the client's at the
    /// switch, the backend's once the switch settles).
    pub(super) fds: [Option<OwnedFd>; 2],
    /// The hold on the backend leg's source port, released with the entries.
    port: Lease,
    /// Keys of packets from the client and from the backend (the flow's addresses: `addrs`;
    /// the guard's keys: `quiet`).
    pub(super) keys: [Key; 2],
    pub(super) client_isn: u32,
    pub(super) backend_isn: u32,
    pub(super) guarded: [bool; 2],
    pub(super) parked: [bool; 2],
    pub(super) installed: bool,
    pub(super) relayed: u32,
    /// The client's FIN reached its socket before the switch (the backend socket relayed it,
    /// so the program never sees it).
    pub(super) client_fin: bool,
    switched_ns: u64,
    /// Set once the flow ended (`sys::monotonic_ns()`), with its report sent.
    ended_ns: Option<u64>,
    /// A peer's RST ended it.
    reset: bool,
}

impl PFlow {
    pub(super) fn new(flow: u64, fds: [OwnedFd; 2], port: Lease, a: &Addrs, legs: &[Leg; 2]) -> Self {
        let [c, b] = fds;
        Self {
            flow,
            fds: [Some(c), Some(b)],
            port,
            keys: [switch::key(a.client_peer, a.client_local), switch::key(a.backend_peer, a.backend_local)],
            client_isn: legs[0].peer_isn,
            backend_isn: legs[1].peer_isn,
            guarded: [false; 2],
            parked: [false; 2],
            installed: false,
            relayed: 0,
            client_fin: false,
            switched_ns: sys::monotonic_ns(),
            ended_ns: None,
            reset: false,
        }
    }

    /// A flow an earlier daemon switched, rebuilt from its entries' keys and its record (its
    /// sockets went with that daemon, closed silently in repair mode).
    /// Its owner's id (`flow`) and its guard entries (`guarded`) are the caller's to fill in.
    pub(super) fn adopted(port: Lease, keys: [Key; 2], meta: &Meta) -> Self {
        Self {
            flow: 0,
            fds: [None, None],
            port,
            keys,
            client_isn: meta.client_isn,
            backend_isn: meta.backend_isn,
            guarded: [false; 2],
            parked: [true, true],
            installed: true,
            relayed: meta.relayed,
            client_fin: meta.flags & META_CLIENT_FIN != 0,
            // Idleness counts from the entries' last packet alone.
            switched_ns: 0,
            // Ended and reported by the earlier daemon: only its linger is left.
            ended_ns: (meta.flags & META_REPORTED != 0).then(sys::monotonic_ns),
            reset: false,
        }
    }

    /// The flow's four addresses, from its keys (IPv4 ones plain).
    pub(super) fn addrs(&self) -> Addrs {
        let (client_peer, client_local) = switch::addrs(&self.keys[0]);
        let (backend_peer, backend_local) = switch::addrs(&self.keys[1]);
        Addrs { client_local, client_peer, backend_local, backend_peer }
    }

    /// Keys of what the client and backend sockets would send (the guard): the keys reversed.
    pub(super) fn quiet(&self) -> [Key; 2] {
        self.keys.map(|k| {
            let (from, to) = switch::addrs(&k);
            switch::key(to, from)
        })
    }

    /// The client's entry as the flow's end reads it: a FIN that reached the client socket
    /// before the switch (the backend socket relayed it, so the program never saw it) counts as
    /// seen at the switch, ending at `client_isn + 2 + relayed`. Its sequence number is in
    /// `max_end` once a later ACK of the client carried it; it counts either way.
    fn with_relayed_fin(&self, mut c: Xlate) -> Xlate {
        if self.client_fin && c.events & EV_FIN == 0 {
            c.events |= EV_FIN;
            c.fin_ns = self.switched_ns;
            c.fin_end = self.client_isn.wrapping_add(2).wrapping_add(self.relayed);
            if (c.fin_end.wrapping_sub(c.max_end) as i32) > 0 {
                c.max_end = c.fin_end;
            }
        }
        c
    }
}

/// The monitor's state.
pub(super) struct Monitor {
    pub(super) flows: Mutex<StdHashMap<u64, PFlow>>,
    index: Mutex<Index>,
    events: Mutex<RingBuf<MapData>>,
    epoll: OwnedFd,
    /// Flows whose backend socket is not parked yet (looked at on each event, and every `SETTLE_POLL`).
    settling: Mutex<BTreeSet<u64>>,
    /// Ended flows in the order they ended, with when (`sys::monotonic_ns()`; 0: reset, removed
    /// at the next pass): after `CLOSED_LINGER` each is removed if both its FINs were
    /// acknowledged, else moved to `lingering`. Neither poll walks every flow.
    ended: Mutex<VecDeque<(u64, u64)>>,
    /// Ended flows waiting for the rest of `LINGER`, in the same order.
    lingering: Mutex<VecDeque<(u64, u64)>>,
    /// Tokens with an event that came between their entries' install and their registration
    /// (`add`), with when, written under the `flows` lock: `add` says so, and its caller looks
    /// again. Forgotten after [`EARLY_KEEP`] (the token of a flow already removed).
    early: Mutex<BTreeMap<u64, u64>>,
}

impl Monitor {
    pub(super) fn new(events: RingBuf<MapData>) -> io::Result<Self> {
        let epoll = epoll::create()?;
        epoll::add(epoll.as_fd(), events.as_raw_fd(), libc::EPOLLIN as u32, 0)?;
        Ok(Self {
            flows: Mutex::default(),
            index: Mutex::default(),
            events: Mutex::new(events),
            epoll,
            settling: Mutex::default(),
            ended: Mutex::default(),
            lingering: Mutex::default(),
            early: Mutex::default(),
        })
    }

    /// Installs a flow's entries with `put`, its keys pointing at `token` in the index, under
    /// the index's lock: the cleanup of an earlier flow whose client 4-tuple the new one reuses
    /// removes an entry only while the index still gives it to that earlier flow.
    pub(super) fn install(&self, token: u64, keys: &[Key; 2], put: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        index.insert(keys[0], token);
        index.insert(keys[1], token);
        let result = put();
        if result.is_err() {
            // Not installed: `put` took back what it had put, and the keys are nobody's.
            for k in keys {
                if index.get(k) == Some(&token) {
                    index.remove(k);
                }
            }
        }
        result
    }

    pub(super) fn unsettled(&self) -> usize {
        self.settling.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Registers a flow. `true`: an event of its came before (see `early`); look at its entries.
    pub(super) fn add(&self, token: u64, f: PFlow) -> bool {
        if !f.parked[1] {
            self.settling.lock().unwrap_or_else(PoisonError::into_inner).insert(token);
        }
        let mut flows = self.flows.lock().unwrap_or_else(PoisonError::into_inner);
        flows.insert(token, f);
        self.early.lock().unwrap_or_else(PoisonError::into_inner).remove(&token).is_some()
    }

    /// Records that `token` ended now: its cleanup follows `CLOSED_LINGER` or `LINGER` later,
    /// or at the next pass if `at_once` (a reset flow: RSTs are not retransmitted).
    pub(super) fn ended(&self, token: u64, at_once: bool) {
        self.settling.lock().unwrap_or_else(PoisonError::into_inner).remove(&token);
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        if at_once {
            ended.push_front((0, token));
        } else {
            ended.push_back((sys::monotonic_ns(), token));
        }
    }
}

/// The thread's body.
pub(super) fn run(shared: &Shared) {
    let mut last_scan = sys::monotonic_ns();
    let mut last_dormant_scan = last_scan;
    let mut last_pass = 0;
    let mut last_sweep = 0;
    let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 4];
    while !shared.stop.load(Ordering::Relaxed) {
        let since = Duration::from_nanos(sys::monotonic_ns().saturating_sub(last_pass));
        if since < MIN_PASS_GAP {
            std::thread::sleep(MIN_PASS_GAP - since);
        }
        let unsettled = shared.monitor.unsettled() > 0;
        let timeout = if unsettled { SETTLE_POLL } else { Duration::from_millis(100) };
        let _ = epoll::wait(shared.monitor.epoll.as_fd(), &mut ready, timeout);
        last_pass = sys::monotonic_ns();
        let keys: Vec<Key> = {
            let mut ring = shared.monitor.events.lock().unwrap_or_else(PoisonError::into_inner);
            let mut keys = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<Key>() {
                    // SAFETY: the program writes whole `Key`s; read unaligned from the ring.
                    keys.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Key>()) });
                }
            }
            keys
        };
        for key in keys {
            let token = shared.monitor.index.lock().unwrap_or_else(PoisonError::into_inner).get(&key).copied();
            // Not indexed: a dormant flow's (woken now), or one already removed.
            if let Some(token) = token.or_else(|| shared.wake_by_key(&key)) {
                shared.on_event(token);
            }
        }
        // An event settles its flow (`examine`). In case the ring was full, every unsettled
        // switch is also looked at every `SETTLE_POLL`.
        let now = sys::monotonic_ns();
        if now.saturating_sub(last_sweep) >= SETTLE_POLL.as_nanos() as u64 {
            last_sweep = now;
            let settling: Vec<u64> =
                shared.monitor.settling.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
            for token in settling {
                shared.settle(token);
            }
        }
        shared
            .monitor
            .early
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, at| now.saturating_sub(*at) < EARLY_KEEP.as_nanos() as u64);
        // Ended flows whose first linger is up, oldest first: removed if both FINs were
        // acknowledged (or reset), else left to linger the rest of `LINGER`.
        let due = |queue: &Mutex<VecDeque<(u64, u64)>>, after: Duration| {
            let mut q = queue.lock().unwrap_or_else(PoisonError::into_inner);
            match q.front() {
                Some(&(at, token)) if now.saturating_sub(at) >= after.as_nanos() as u64 => {
                    q.pop_front();
                    Some((at, token))
                }
                _ => None,
            }
        };
        let mut gone = Vec::new();
        while let Some((at, token)) = due(&shared.monitor.ended, CLOSED_LINGER) {
            if at == 0 || shared.closed_for_good(token) {
                gone.push(token);
            } else {
                shared.monitor.lingering.lock().unwrap_or_else(PoisonError::into_inner).push_back((at, token));
            }
        }
        while let Some((_, token)) = due(&shared.monitor.lingering, LINGER) {
            gone.push(token);
        }
        shared.cleanup(&gone);
        if now.saturating_sub(last_scan) >= IDLE_SCAN.as_nanos() as u64 {
            last_scan = now;
            let open: Vec<u64> = shared
                .monitor
                .flows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|(_, f)| f.ended_ns.is_none())
                .map(|(t, _)| *t)
                .collect();
            let mut slept = 0;
            for token in open {
                if shared.examine(token, Some(now)) && shared.sleep(token, now) {
                    slept += 1;
                }
            }
            if now.saturating_sub(last_dormant_scan) >= shared.dormant_scan_every().as_nanos() as u64 {
                last_dormant_scan = now;
                shared.scan_dormant(now);
            }
            if slept >= SHRINK_AFTER {
                shared.shrink();
            }
        }
    }
}

impl Shared {
    /// Guards and parks the backend socket once the backend acknowledged what it relayed.
    fn settle(&self, token: u64) {
        let flows = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(f) = flows.get(&token) else { return };
        let Ok(b) = self.maps.flows.get(&f.keys[1]) else { return };
        self.settle_with(flows, token, &b);
    }

    /// [`Self::settle`] with the flow's backend entry as just read.
    fn settle_with(&self, mut flows: MutexGuard<'_, StdHashMap<u64, PFlow>>, token: u64, b: &Xlate) {
        let Some(f) = flows.get_mut(&token) else { return };
        if b.local_below != 0 {
            if sys::monotonic_ns().saturating_sub(f.switched_ns) > SETTLE_LIMIT.as_nanos() as u64 {
                drop(flows);
                warn!(token, "packet splice: the backend never acknowledged the ClientHello; resetting");
                self.abort(token, CloseReason::Internal);
            }
            return;
        }
        if f.fds[1].is_none() {
            return;
        }
        let result = self.park_backend(f);
        self.monitor.settling.lock().unwrap_or_else(PoisonError::into_inner).remove(&token);
        match result {
            Ok(0) => debug!(token, flow = f.flow, "packet splice: switch settled"),
            Ok(n) => {
                let flow = f.flow;
                drop(flows);
                warn!(
                    flow,
                    bytes = n,
                    "packet splice: the backend socket received bytes outside the switch; resetting"
                );
                self.abort(token, CloseReason::Internal);
            }
            Err(e) => {
                let flow = f.flow;
                drop(flows);
                warn!(flow, error = %e, "packet splice: parking the backend socket failed; resetting");
                self.abort(token, CloseReason::Internal);
            }
        }
    }

    /// Guards the backend socket's 4-tuple, then parks and closes the socket: silently (repair
    /// mode). The flow's port hold and guard stay. Returns the bytes the socket received: any
    /// reached it before the guard and was acknowledged to the backend by it.
    fn park_backend(&self, f: &mut PFlow) -> io::Result<u64> {
        let quiet = f.quiet()[1];
        let Some(fd) = f.fds[1].as_ref().map(AsFd::as_fd) else { return Ok(0) };
        self.maps.quiet.insert(&quiet, &0)?;
        f.guarded[1] = true;
        // Only the daemon could forward what reached the socket: the backend never sends
        // before it has the ClientHello, which left after the entries were in place.
        let received = sys::tcp_info(fd)?.bytes_received;
        tcp::park(fd)?;
        f.parked[1] = true;
        f.fds[1] = None;
        Ok(received)
    }

    /// Ends the flow if the program saw a RST either way or a FIN both ways.
    pub(super) fn check_end(&self, token: u64) {
        let _ = self.examine(token, None);
    }

    /// Reads the flow's entries once: ends it if the program saw a RST either way or a FIN
    /// both ways; else, given `now`, resets it if it has been idle longer than the idle timeout
    /// (the entries' `last_ns`). `true`: it is open and has been idle for `DORMANT_AFTER`.
    fn examine(&self, token: u64, now: Option<u64>) -> bool {
        let mut flows = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(f) = flows.get_mut(&token) else { return false };
        if f.ended_ns.is_some() {
            return false;
        }
        let (c, b) = self.read_entries(f);
        if let (Some(c), Some(b)) = (c, b) {
            let c = f.with_relayed_fin(c);
            let reason = if c.events & EV_RST != 0 {
                Some(CloseReason::ClientReset)
            } else if b.events & EV_RST != 0 {
                Some(CloseReason::BackendReset)
            } else if c.events & b.events & EV_FIN != 0 {
                // Whoever's FIN came first.
                Some(if c.fin_ns <= b.fin_ns { CloseReason::ClientFin } else { CloseReason::BackendFin })
            } else {
                None
            };
            if let Some(reason) = reason {
                f.ended_ns = Some(sys::monotonic_ns());
                f.reset = matches!(reason, CloseReason::ClientReset | CloseReason::BackendReset);
                self.monitor.ended(token, false);
                self.report(f, reason, Some(&c), Some(&b));
                self.release_client(f);
                // A switch that had not settled (a flow that ended within its first event):
                // its backend socket, which never saw the backend's acknowledgment of the
                // ClientHello (it went to the client with the backend's answer), goes silent
                // now, before its retransmission timer sends the ClientHello again.
                if f.fds[1].is_some() {
                    match self.park_backend(f) {
                        Ok(0) => {}
                        // Too late to reset: the flow has ended. Said, as at a settle.
                        Ok(n) => warn!(
                            flow = f.flow,
                            bytes = n,
                            "packet splice: the backend socket of an ended flow received bytes outside the switch"
                        ),
                        Err(e) => warn!(
                            flow = f.flow,
                            error = %e,
                            "packet splice: parking an ended flow's backend socket failed; it closes with a RST after the linger"
                        ),
                    }
                }
                return false;
            }
        }
        let Some(now) = now else {
            // An event: it may say that the backend acknowledged what the switch relayed.
            // (Its backend socket is still open: the switch has not settled.)
            if let Some(b) = b
                && f.fds[1].is_some()
            {
                self.settle_with(flows, token, &b);
            }
            return false;
        };
        let last = [c.map_or(0, |x| x.last_ns), b.map_or(0, |x| x.last_ns), f.switched_ns].into_iter().max();
        let idle = now.saturating_sub(last.unwrap_or(now));
        if idle > self.limits.idle_timeout.as_nanos() as u64 {
            drop(flows);
            self.abort(token, CloseReason::IdleTimeout);
            return false;
        }
        idle >= DORMANT_AFTER.as_nanos() as u64
    }

    /// An event for `token`: its entries are looked at, or, if the switch has installed them but
    /// not registered the flow yet, word is left for `add` (under the `flows` lock, which `add`
    /// holds too: one of the two sees the other).
    fn on_event(&self, token: u64) {
        {
            let flows = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner);
            if !flows.contains_key(&token) {
                self.monitor.early.lock().unwrap_or_else(PoisonError::into_inner).insert(token, sys::monotonic_ns());
                return;
            }
        }
        self.check_end(token);
    }

    /// An ended flow needs no more than the short linger: a RST ended it (RSTs are not
    /// retransmitted, and neither peer keeps the connection after one), or both its FINs were
    /// acknowledged, as the program saw: the backend's last acknowledgment covers the client's
    /// FIN, and the client's covers the backend's.
    fn closed_for_good(&self, token: u64) -> bool {
        let flows = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(f) = flows.get(&token) else { return false };
        if f.reset {
            return true;
        }
        let (Some(c), Some(b)) = self.read_entries(f) else { return false };
        if (c.events | b.events) & EV_RST != 0 {
            return true;
        }
        let c = f.with_relayed_fin(c);
        if c.events & b.events & EV_FIN == 0 {
            return false;
        }
        let covers = |ack: u32, end: u32| ack.wrapping_sub(end) as i32 >= 0;
        covers(b.max_ack, c.fin_end.wrapping_add(c.seq_delta)) && covers(c.max_ack, b.fin_end.wrapping_add(b.seq_delta))
    }

    /// Lifts the client leg's guard of an ended flow (and closes its socket if the switch had
    /// not): the client may reuse its 4-tuple at once (it leaves no TIME_WAIT when it closed
    /// last, or reset), and the listener's SYN-ACK to it must leave. The translation entries
    /// stay for the linger; the program drops the client's one at a new SYN.
    fn release_client(&self, f: &mut PFlow) {
        if !f.parked[0] {
            return;
        }
        if let Some(fd) = f.fds[0].take() {
            drop(fd);
        }
        if f.guarded[0] {
            let _ = self.maps.quiet.remove(&f.quiet()[0]);
            f.guarded[0] = false;
        }
    }

    /// Sends the flow's close report. An entry that is gone (never installed, or dropped by the
    /// program for a new connection on the client's 4-tuple) counts no byte.
    fn report(&self, f: &PFlow, reason: CloseReason, c: Option<&Xlate>, b: Option<&Xlate>) {
        let closed = Closed {
            reason,
            client_to_backend: c.map_or(0, |c| super::switch::stream_bytes(c, f.client_isn)),
            backend_to_client: b.map_or(0, |b| super::switch::stream_bytes(b, f.backend_isn)),
        };
        // The record under the client key may be a newer flow's (the client reused its 4-tuple).
        if f.installed
            && let Ok(mut meta) = self.maps.meta.get(&f.keys[0])
            && meta.backend_key == f.keys[1]
        {
            // A daemon that adopts the flow during its linger does not report it again.
            meta.flags |= META_REPORTED;
            let _ = self.maps.meta.insert(&f.keys[0], &meta);
        }
        if f.flow == 0 {
            // An adopted flow its owner could not register (its server name routes nowhere now).
            let a = f.addrs();
            info!(
                client = %a.client_peer,
                endpoint = %a.backend_peer,
                bytes_client_to_backend = closed.client_to_backend,
                bytes_backend_to_client = closed.backend_to_client,
                reason = reason.as_str(),
                "packet splice: an adopted, unregistered flow ended"
            );
        }
        let _ = self.reports.send(CloseReport { flow: f.flow, closed });
    }

    /// Resets both ends of `token` now, reports it (unless it ended already), and cleans up
    /// after a short linger (RSTs are not retransmitted; the entries only absorb stragglers).
    pub(super) fn abort(&self, token: u64, reason: CloseReason) {
        let mut flows = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(f) = flows.get_mut(&token) else { return };
        let (c, b) = self.read_entries(f);
        let a = f.addrs();
        // The peer's next expected number: its last ACK, or the end of what was sent to it. A
        // leg whose own entry is gone gets the first alone (its peer left: a new connection
        // took the client's 4-tuple).
        let to_client = c.map(|c| [c.max_ack, b.map_or(c.max_ack, |b| b.max_end.wrapping_add(b.seq_delta))]);
        let to_backend = b.map(|b| [b.max_ack, c.map_or(b.max_ack, |c| c.max_end.wrapping_add(c.seq_delta))]);
        for (from, to, seqs) in
            [(a.client_local, a.client_peer, to_client), (a.backend_local, a.backend_peer, to_backend)]
        {
            // No entry, no RST: a flow never installed, whose sockets' own RSTs are right.
            let Some(seqs) = seqs else { continue };
            if let Err(e) = reset::send(from, to, &seqs) {
                warn!(flow = f.flow, %to, error = %e, "packet splice: sending a RST failed");
            }
        }
        if f.ended_ns.is_none() {
            self.report(f, reason, c.as_ref(), b.as_ref());
        }
        if f.ended_ns.is_none() {
            f.ended_ns = Some(sys::monotonic_ns());
            self.monitor.ended(token, true);
        }
        if !f.installed {
            // Nothing was translated: the sockets' own RSTs are right. Lift the guard first.
            for (i, q) in f.quiet().iter().enumerate() {
                if f.guarded[i] {
                    let _ = self.maps.quiet.remove(q);
                    f.guarded[i] = false;
                }
            }
            for fd in f.fds.iter().flatten() {
                let _ = sys::set_linger_zero(fd.as_fd());
            }
        }
    }

    /// Removes flows: entries, then sockets (silently), then guard entries. Each map's keys go
    /// in one batch (a pass under load has several flows to remove).
    fn cleanup(&self, tokens: &[u64]) {
        if tokens.is_empty() {
            return;
        }
        let gone: Vec<(u64, PFlow)> = {
            let mut flows = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner);
            tokens.iter().filter_map(|t| Some((*t, flows.remove(t)?))).collect()
        };
        {
            let (mut entries, mut records) = (Vec::new(), Vec::new());
            let mut index = self.monitor.index.lock().unwrap_or_else(PoisonError::into_inner);
            for (token, f) in gone.iter().filter(|(_, f)| f.installed) {
                for k in &f.keys {
                    // A newer flow on the same client 4-tuple owns the key now.
                    if index.get(k) == Some(token) {
                        index.remove(k);
                        entries.push(*k);
                        if *k == f.keys[0] {
                            records.push(*k);
                        }
                    }
                }
            }
            // Under the index's lock: a newer flow cannot install a key removed here meanwhile.
            self.maps.flows.remove_batch(&entries);
            self.maps.meta.remove_batch(&records);
        }
        let n = gone.len();
        let (mut guards, mut leases, mut flows) = (Vec::new(), Vec::with_capacity(n), Vec::with_capacity(n));
        for (_, f) in gone {
            guards.extend(f.quiet().into_iter().zip(f.guarded).filter(|(_, g)| *g).map(|(q, _)| q));
            let PFlow { fds, parked, port, flow, .. } = f;
            // The sockets close here, before their guards go.
            for (fd, parked) in fds.into_iter().zip(parked) {
                if let Some(fd) = fd
                    && !parked
                {
                    // A socket not parked closes with a RST (the guard drops it) rather than a FIN.
                    let _ = sys::set_linger_zero(fd.as_fd());
                }
            }
            leases.push(port);
            flows.push(flow);
        }
        self.maps.quiet.remove_batch(&guards);
        // The ports last: a connect that takes one must not meet a guard of its 4-tuple.
        drop(leases);
        self.stats.active.fetch_sub(n, Ordering::AcqRel);
        for flow in flows {
            debug!(flow, "packet splice: flow removed");
        }
    }

    /// Resets every flow and removes it (the end of the drain time).
    pub(super) fn abort_all(&self, reason: CloseReason) {
        // Under the index's lock, which `sleep` holds throughout: from here on no flow goes
        // dormant, so the list below is complete.
        drop({
            let index = self.monitor.index.lock().unwrap_or_else(PoisonError::into_inner);
            self.no_sleep.store(true, Ordering::Release);
            index
        });
        let mut dormant = Vec::new();
        self.for_each_dormant(|kc, _, _, _| dormant.push(kc));
        for kc in dormant {
            self.wake(&kc);
        }
        let tokens: Vec<u64> =
            self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner).keys().copied().collect();
        for t in tokens {
            let ended =
                self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner).get(&t).and_then(|f| f.ended_ns);
            if ended.is_none() {
                self.abort(t, reason);
            }
            self.cleanup(&[t]);
        }
    }

    /// Puts an open, settled flow that has been idle for `DORMANT_AFTER` to sleep (module docs):
    /// `true` if it went dormant. Needs an owner.
    fn sleep(&self, token: u64, now: u64) -> bool {
        let Some(owner) = self.owner.get() else { return false };
        let mut index = self.monitor.index.lock().unwrap_or_else(PoisonError::into_inner);
        if self.no_sleep.load(Ordering::Acquire) {
            return false;
        }
        let mut flows = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(f) = flows.get(&token) else { return false };
        let settled =
            f.installed && f.parked == [true; 2] && f.guarded == [true; 2] && f.fds.iter().all(Option::is_none);
        // Half-closed flows stay awake: their end is near. So do flows whose keys a newer flow
        // took over, and those whose port no bit can hold (an adopted flow's, outside the range).
        if f.ended_ns.is_some()
            || !settled
            || f.flow == 0
            || f.client_fin
            || f.keys.iter().any(|k| index.get(k) != Some(&token))
            || !self.ports.contains(f.port.port())
        {
            return false;
        }
        let (Some(c), Some(b)) = self.read_entries(f) else { return false };
        if c.events | b.events != 0 || now.saturating_sub(c.last_ns.max(b.last_ns)) < DORMANT_AFTER.as_nanos() as u64 {
            return false;
        }
        let Ok(mut meta) = self.maps.meta.get(&f.keys[0]) else { return false };
        // In this order, so that a scrape finds the flow in the registry or in the maps at every
        // moment (it skips a record whose flow is still registered): a place in a group, the
        // record, then the registry lets go.
        let Some(group) = owner.group(f.flow) else { return false };
        let awake = meta;
        meta.flow = f.flow;
        meta.group = group;
        meta.flags |= META_DORMANT;
        if let Err(e) = self.maps.meta.insert(&f.keys[0], &meta) {
            debug!(flow = f.flow, error = %e, "packet splice: a flow stays awake (its record could not be written)");
            owner.leave_group(group);
            return false;
        }
        // Counted under the index's lock, as `wake` uncounts it: a reader that finds none dormant
        // skips the maps.
        self.stats.dormant.fetch_add(1, Ordering::Relaxed);
        if !owner.sleep(f.flow, group) {
            let _ = self.maps.meta.insert(&f.keys[0], &awake);
            self.stats.dormant.fetch_sub(1, Ordering::Relaxed);
            owner.leave_group(group);
            return false;
        }
        let Some(f) = flows.remove(&token) else { return false };
        for k in &f.keys {
            index.remove(k);
        }
        drop(flows);
        drop(index);
        if let Err(lease) = self.ports.sleep(f.port) {
            // Checked above; keep the hold rather than lose it.
            std::mem::forget(lease);
        }
        true
    }

    /// Wakes the dormant flow with client key `kc`, if it is one: its new token.
    pub(super) fn wake(&self, kc: &Key) -> Option<u64> {
        let mut index = self.monitor.index.lock().unwrap_or_else(PoisonError::into_inner);
        let mut meta = self.maps.meta.get(kc).ok()?;
        if meta.flags & META_DORMANT == 0 {
            return None;
        }
        meta.flags &= !META_DORMANT;
        if index.contains_key(kc) {
            // Awake already: a flag whose clearing failed at its wake.
            let _ = self.maps.meta.insert(kc, &meta);
            return None;
        }
        let kb = meta.backend_key;
        let (endpoint, local) = super::switch::addrs(&kb);
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mut pf = PFlow::adopted(self.ports.wake(endpoint, local.port()), [*kc, kb], &meta);
        pf.guarded = [true; 2];
        pf.flow = meta.flow;
        index.insert(*kc, token);
        index.insert(kb, token);
        // In this order, so that a scrape finds the flow at every moment: the monitor has it
        // (its counters), the registry takes it back, then the record's flag goes.
        self.monitor.add(token, pf);
        let registered = self.owner.get().is_some_and(|o| o.wake(&woken(kc, &meta, token)));
        if !registered
            && let Some(f) = self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&token)
        {
            f.flow = 0;
        }
        self.stats.dormant.fetch_sub(1, Ordering::Relaxed);
        let _ = self.maps.meta.insert(kc, &meta);
        debug!(flow = meta.flow, token, "packet splice: a dormant flow woke");
        Some(token)
    }

    /// Wakes the dormant flow an event's key belongs to (either of its keys), if any.
    fn wake_by_key(&self, key: &Key) -> Option<u64> {
        if self.stats.dormant.load(Ordering::Relaxed) == 0 {
            return None;
        }
        if self.maps.meta.get(key).is_ok() {
            return self.wake(key);
        }
        // A backend key: its entry leads to the client leg's 4-tuple, whose reverse is the
        // client key.
        let x = self.maps.flows.get(key).ok()?;
        let kc = Key { src: x.dst, dst: x.src, sport: x.dport, dport: x.sport, family: key.family };
        let meta = self.maps.meta.get(&kc).ok()?;
        (meta.backend_key == *key).then(|| self.wake(&kc)).flatten()
    }

    /// Calls `f` with each dormant flow's client key, record and entries. Both maps are read in
    /// batches (a few system calls whatever the number of flows), and only if a flow is dormant.
    pub(super) fn for_each_dormant(&self, mut f: impl FnMut(Key, &Meta, Option<&Xlate>, Option<&Xlate>)) {
        if self.stats.dormant.load(Ordering::Relaxed) == 0 {
            return;
        }
        let cap = MAX_ENTRIES as usize;
        let mut dormant: Vec<(Key, Meta)> = Vec::new();
        let read = self.maps.meta.for_each(cap, |k, m| {
            if m.flags & META_DORMANT != 0 {
                dormant.push((*k, *m));
            }
        });
        let mut wanted: StdHashMap<Key, Option<Xlate>> = StdHashMap::with_capacity(dormant.len() * 2);
        for (kc, m) in &dormant {
            wanted.insert(*kc, None);
            wanted.insert(m.backend_key, None);
        }
        let read = read.and_then(|()| {
            self.maps.flows.for_each(cap, |k, x| {
                if let Some(slot) = wanted.get_mut(k) {
                    *slot = Some(*x);
                }
            })
        });
        if let Err(e) = read {
            // Not expected (Linux has had batch reads of hash maps since 5.6); walk the maps.
            warn!(error = %e, "packet splice: a batch read of the maps failed; walking them");
            let mut keys = Vec::new();
            let _ = sys::bpf::for_each_key::<Key>(self.maps.meta.fd(), u64::from(MAX_ENTRIES), |k| keys.push(k));
            for kc in keys {
                let Ok(meta) = self.maps.meta.get(&kc) else { continue };
                if meta.flags & META_DORMANT != 0 {
                    let c = self.maps.flows.get(&kc).ok();
                    let b = self.maps.flows.get(&meta.backend_key).ok();
                    f(kc, &meta, c.as_ref(), b.as_ref());
                }
            }
            return;
        }
        for (kc, meta) in &dormant {
            let c = wanted.get(kc).copied().flatten();
            let b = wanted.get(&meta.backend_key).copied().flatten();
            f(*kc, meta, c.as_ref(), b.as_ref());
        }
    }

    /// How often dormant flows are scanned: an eighth of the idle timeout, between 1 s and
    /// `DORMANT_SCAN_MAX`. Reading them costs about 3 µs per flow (both maps are walked bucket by
    /// bucket), so 10,000 dormant flows cost 0.3 % of a core at the longest interval.
    fn dormant_scan_every(&self) -> Duration {
        (self.limits.idle_timeout / 8).clamp(IDLE_SCAN, DORMANT_SCAN_MAX)
    }

    /// The scan of dormant flows: one whose entries show an end, or are gone, wakes and is
    /// looked at (an event lost to a full ring, or to the moment it went dormant); one idle
    /// longer than the idle timeout wakes and is reset.
    fn scan_dormant(&self, now: u64) {
        let mut due = Vec::new();
        self.for_each_dormant(|kc, _, c, b| match (c, b) {
            (Some(c), Some(b)) if c.events | b.events == 0 => {
                if now.saturating_sub(c.last_ns.max(b.last_ns)) > self.limits.idle_timeout.as_nanos() as u64 {
                    due.push((kc, Some(CloseReason::IdleTimeout)));
                }
            }
            (Some(_), Some(_)) => due.push((kc, None)),
            _ => due.push((kc, Some(CloseReason::Internal))),
        });
        for (kc, reason) in due {
            let Some(token) = self.wake(&kc) else { continue };
            match reason {
                None => self.check_end(token),
                Some(r) => self.abort(token, r),
            }
        }
    }

    /// Gives back the room flows that went dormant left: the monitor's tables and the
    /// allocator's free pages (the owner's registry is an ordered map, which shrinks by itself).
    fn shrink(&self) {
        self.monitor.flows.lock().unwrap_or_else(PoisonError::into_inner).shrink_to_fit();
        self.monitor.index.lock().unwrap_or_else(PoisonError::into_inner).shrink_to_fit();
        self.ports.shrink();
        let rss_kb = || {
            std::fs::read_to_string("/proc/self/statm")
                .ok()
                .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
                .map_or(0, |pages| pages * 4)
        };
        let before = rss_kb();
        sys::malloc_trim();
        debug!(
            dormant = self.stats.dormant.load(Ordering::Relaxed),
            rss_kb_before = before,
            rss_kb_after = rss_kb(),
            "packet splice: room left by dormant flows given back"
        );
    }
}

/// What the owner of a dormant flow registers when it wakes.
fn woken(kc: &Key, meta: &Meta, token: u64) -> Woken {
    let (client, _) = super::switch::addrs(kc);
    let (endpoint, _) = super::switch::addrs(&meta.backend_key);
    Woken {
        flow: meta.flow,
        group: meta.group,
        token,
        client,
        endpoint,
        sni: super::sni_of(meta),
        started: std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(meta.started_unix_ms),
    }
}
