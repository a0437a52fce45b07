//! The monitor threads ([docs/design.md#close](../../../../docs/design.md#close)).
//!
//! Each monitor thread (`Limits::monitor_threads`, one per CPU up to 4 by default) owns the
//! connections whose token falls to it, with its own epoll set and table, so the relays of
//! several held directions run in parallel. It watches both sockets of a connection for
//! `EPOLLRDHUP` (`EPOLLIN` only while a held direction's relay is light, `EPOLLOUT` only while a
//! direction toward it is parked) and, per
//! direction X→Y, waits until every byte X received is in Y's TCP send queue before
//! `shutdown(Y, SHUT_WR)` (the drain check). A reset on either side resets the other. Once a
//! second it samples every connection: idle timeout, memory guard, a backlog and grant check for
//! holds, and one pass for each held direction parked on its peer's `EPOLLOUT`.
//! Monitor 0 also reads the `EVENTS` ring and passes reports of other monitors' sockets on
//! through their inbox (an eventfd wakes them).

use std::{
    collections::{BTreeSet, HashMap},
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{debug, warn};
use zone_ingress_ebpf::splice::{Pair, REDIRECT_WINDOW};

use super::{
    BACKEND, CLIENT, Shared,
    hold::{HOLD_AT, Relay},
};
use crate::{
    splice::{CloseReason, CloseReport, Closed},
    sys::{self, epoll},
};

/// One monitor thread: its connections, its epoll set, and how other threads reach it.
pub(super) struct Monitor {
    conns: Mutex<State>,
    pub(super) epoll: OwnedFd,
    /// eventfd in `epoll` (`WAKE_TOKEN`): written after a push to `inbox`.
    wake: OwnedFd,
    /// Cookies of sockets the verdict reported (`EVENTS`), forwarded by monitor 0, which reads
    /// the ring; cookies of other monitors' connections are ignored.
    inbox: Mutex<Vec<u64>>,
    /// In-flight bytes of this monitor's connections at its last sample (the global gauge is
    /// the sum over monitors).
    pub(super) in_flight: AtomicU64,
}

impl Monitor {
    pub(super) fn new() -> io::Result<Self> {
        let epoll = epoll::create()?;
        let wake = epoll::eventfd()?;
        epoll::add(epoll.as_fd(), wake.as_raw_fd(), libc::EPOLLIN as u32, WAKE_TOKEN)?;
        Ok(Self {
            conns: Mutex::new(State::default()),
            epoll,
            wake,
            inbox: Mutex::new(Vec::new()),
            in_flight: AtomicU64::new(0),
        })
    }

    pub(super) fn lock_conns(&self) -> MutexGuard<'_, State> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues reported cookies for this monitor and wakes it. At most `INBOX_MAX` wait: a report
    /// is advisory (the once-a-second sample finds every backlog too), memory is not.
    pub(super) fn post(&self, cookies: &[u64]) {
        {
            let mut inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
            let room = INBOX_MAX.saturating_sub(inbox.len());
            if room < cookies.len() {
                debug!(dropped = cookies.len() - room, "monitor inbox full; reports dropped (the sample covers them)");
            }
            inbox.extend_from_slice(&cookies[..room.min(cookies.len())]);
        }
        epoll::signal(self.wake.as_fd());
    }
}

/// Reports that may wait in one monitor's inbox (8 bytes each).
const INBOX_MAX: usize = 1 << 16;

/// Runs `body`; if it panics, calls `on_panic` with the panic message. A monitor thread's panic
/// must not go unnoticed: its connections would never be closed, held or guarded again.
pub(super) fn fatal_on_panic(body: impl FnOnce(), on_panic: impl FnOnce(&str)) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        on_panic(msg);
    }
}

/// A monitor's table: its spliced connections, and those with a drain check pending.
#[derive(Default)]
pub(super) struct State {
    pub(super) conns: HashMap<u64, Spliced>,
    pub(super) draining: BTreeSet<u64>,
    /// Connections with a held direction that can move (polled until released); a direction
    /// parked on a full peer (`Relay::parked`) waits for that peer's `EPOLLOUT` instead.
    pub(super) held: BTreeSet<u64>,
    /// Socket cookie → (token, side), to route `EVENTS` reports.
    pub(super) by_cookie: HashMap<u64, (u64, usize)>,
}

/// epoll token of the `EVENTS` ring (monitor 0 only).
pub(super) const EVENTS_TOKEN: u64 = u64::MAX;
/// epoll token of a monitor's wake-up eventfd.
pub(super) const WAKE_TOKEN: u64 = u64::MAX - 1;

pub(super) struct Spliced {
    pub(super) fds: [OwnedFd; 2],
    pub(super) cookies: [u64; 2],
    /// Baseline of `tcpi_bytes_received` minus what was still unread, per side.
    pub(super) recv_base: [u64; 2],
    /// Baseline of `tcpi_bytes_acked + SIOCOUTQ`, per side.
    pub(super) sent_base: [u64; 2],
    /// FIN received from side i (direction i → peer waits for its drain check).
    pub(super) fin: [bool; 2],
    /// Direction i → peer finished: the peer was shut down for writing.
    pub(super) shut: [bool; 2],
    /// Last time the drain check of direction i made progress, and the value it saw.
    pub(super) drain_progress: [(Instant, u64); 2],
    pub(super) handoff_ns: u64,
    pub(super) over_cap_since: Option<Instant>,
    /// Direction i → peer is held: the monitor relays what the verdict keeps on side i.
    pub(super) relay: [Option<Relay>; 2],
    /// Bytes the monitor relayed from side i to its peer, since the handoff.
    pub(super) relayed: [u64; 2],
    /// Side i has a `HOLD` entry (to delete at close; short connections never get one).
    pub(super) hold_entry: [bool; 2],
    /// The redirect grant of side i last written to `HOLD` (`REDIRECT_WINDOW` without an entry).
    pub(super) grant: [u64; 2],
    /// Last kick of a stuck drain check, per direction.
    pub(super) last_kick: [Option<Instant>; 2],
    /// The owner's id of this connection, in its close report.
    pub(super) flow: u64,
    pub(super) bytes: [u64; 2],
    /// The side whose FIN arrived first (the access log's close reason).
    pub(super) first_fin: Option<usize>,
}

impl Spliced {
    /// Bytes moved out of side `side` so far: redirected by the verdict (`pair` is that side's
    /// `PAIRS` entry) or relayed by the monitor.
    pub(super) fn moved(&self, side: usize, pair: &Pair) -> u64 {
        pair.bytes + self.relayed[side]
    }
}

/// How often the monitor samples in-flight bytes and idle time.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// A drain check without progress for this long kicks both sockets, at most every
/// `DRAIN_KICK_EVERY`.
const DRAIN_KICK_AFTER: Duration = Duration::from_millis(20);
const DRAIN_KICK_EVERY: Duration = Duration::from_millis(100);
/// Poll interval while a drain check is pending.
const DRAIN_POLL: Duration = Duration::from_millis(2);
/// Poll interval while a direction is held: the relay moves what arrived since the last pass,
/// so this bounds how long held bytes wait (and, with the receive buffer, the held rate).
const HOLD_POLL: Duration = Duration::from_micros(200);

impl Shared {
    /// Monitor thread `idx`: close handling, backpressure and relays of its connections.
    pub(super) fn run(&self, idx: usize) {
        let me = &self.monitors[idx];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut last_sample = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let timeout = {
                let st = me.lock_conns();
                if !st.held.is_empty() {
                    HOLD_POLL
                } else if !st.draining.is_empty() {
                    DRAIN_POLL
                } else {
                    Duration::from_millis(200)
                }
            };
            let n = epoll::wait(me.epoll.as_fd(), &mut events, timeout);
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    if e.kind() != io::ErrorKind::Interrupted {
                        warn!(error = %e, "epoll_wait failed in the splice monitor");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    continue;
                }
            };
            let mut conns = me.lock_conns();
            for ev in &events[..n] {
                if ev.u64 == EVENTS_TOKEN {
                    self.on_reports(&mut conns);
                    continue;
                }
                if ev.u64 == WAKE_TOKEN {
                    epoll::clear(me.wake.as_fd());
                    let cookies = std::mem::take(&mut *me.inbox.lock().unwrap_or_else(PoisonError::into_inner));
                    self.on_cookies(&mut conns, &cookies);
                    continue;
                }
                let token = ev.u64 >> 1;
                let side = (ev.u64 & 1) as usize;
                self.on_event(me, &mut conns, token, side, ev.events);
            }
            let tokens: Vec<u64> = conns.held.iter().copied().collect();
            for t in tokens {
                self.relay(me, &mut conns, t);
            }
            let tokens: Vec<u64> = conns.draining.iter().copied().collect();
            for t in tokens {
                self.drain(&mut conns, t);
            }
            if last_sample.elapsed() >= SAMPLE_EVERY {
                last_sample = Instant::now();
                self.sample(me, &mut conns);
            }
        }
    }

    fn on_event(&self, me: &Monitor, state: &mut State, token: u64, side: usize, events: u32) {
        if events & libc::EPOLLOUT as u32 != 0 {
            self.unpark(me, state, token, side);
        }
        let Some(conn) = state.conns.get_mut(&token) else { return };
        let fd = conn.fds[side].as_fd();
        // A pending socket error (a reset) is always reported with EPOLLERR: a plain FIN needs
        // no SO_ERROR read.
        let err = if events & libc::EPOLLERR as u32 != 0 { sys::take_error(fd).ok().flatten() } else { None };
        let hup = events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        if err.is_some() || (hup && events & libc::EPOLLRDHUP as u32 == 0) {
            debug!(token, side, error = ?err, "reset on spliced socket");
            let reason = if side == CLIENT { CloseReason::ClientReset } else { CloseReason::BackendReset };
            self.abort(state, token, side, reason);
            return;
        }
        if events & libc::EPOLLRDHUP as u32 != 0 && !conn.fin[side] {
            conn.fin[side] = true;
            conn.first_fin.get_or_insert(side);
            conn.drain_progress[side] = (Instant::now(), 0);
            state.draining.insert(token);
            self.drain(state, token);
        }
    }

    /// Drain check (docs/design.md#close) for every direction whose FIN arrived but whose peer is still open.
    fn drain(&self, state: &mut State, token: u64) {
        let stall = self.limits.drain_stall;
        let Some(conn) = state.conns.get_mut(&token) else { return };
        for side in [CLIENT, BACKEND] {
            if !conn.fin[side] || conn.shut[side] {
                continue;
            }
            let peer = 1 - side;
            let forwarded = match self.maps.pairs.get(&conn.cookies[side]) {
                Ok(p) => {
                    if p.peer_missing != 0 {
                        self.stats.peer_missing_aborts.fetch_add(1, Ordering::Relaxed);
                        self.abort(state, token, side, CloseReason::Internal);
                        return;
                    }
                    conn.moved(side, &p)
                }
                Err(_) => {
                    self.abort(state, token, side, CloseReason::Internal);
                    return;
                }
            };
            let counts = (|| -> io::Result<(u64, u64)> {
                let x = sys::tcp_info(conn.fds[side].as_fd())?;
                let y = sys::tcp_info(conn.fds[peer].as_fd())?;
                let outq = u64::from(sys::outq(conn.fds[peer].as_fd())?);
                // The FIN takes one sequence number, which tcpi_bytes_received counts.
                let received = x.bytes_received.saturating_sub(conn.recv_base[side]).saturating_sub(1);
                let in_peer = (y.bytes_acked + outq).saturating_sub(conn.sent_base[peer]);
                Ok((received, in_peer))
            })();
            let Ok((received, in_peer)) = counts else {
                self.abort(state, token, side, CloseReason::Internal);
                return;
            };
            conn.bytes[side] = forwarded;
            // Every byte X received went through the verdict, and every forwarded byte is in Y's
            // TCP send queue (or acknowledged). `>=` rather than `==`: an overcount on either
            // side (a sequence number the counters include) must not hold the FIN back forever.
            if forwarded >= received && in_peer >= forwarded {
                if let Err(e) = sys::shutdown_write(conn.fds[peer].as_fd()) {
                    debug!(token, error = %e, "shutdown(SHUT_WR) of the peer failed");
                }
                conn.shut[side] = true;
            } else if received.wrapping_add(forwarded).wrapping_add(in_peer) != conn.drain_progress[side].1 {
                conn.drain_progress[side] = (Instant::now(), received.wrapping_add(forwarded).wrapping_add(in_peer));
            } else if conn.drain_progress[side].0.elapsed() > stall {
                warn!(token, received, forwarded, in_peer, "drain check did not converge; aborting");
                self.stats.drain_stalls.fetch_add(1, Ordering::Relaxed);
                self.abort(state, token, side, CloseReason::DrainStall);
                return;
            } else if conn.drain_progress[side].0.elapsed() > DRAIN_KICK_AFTER
                && conn.last_kick[side].is_none_or(|k| k.elapsed() > DRAIN_KICK_EVERY)
            {
                // Stuck without progress: re-run the verdict over what X still holds, and wake
                // the peer's psock worker for what waits in its queue. Both are idempotent.
                debug!(token, side, received, forwarded, in_peer, "drain check stuck; kicking both sockets");
                conn.last_kick[side] = Some(Instant::now());
                let _ = sys::set_rcvlowat(conn.fds[side].as_fd(), 1);
                let _ = sys::poke_write_space(conn.fds[peer].as_fd());
            }
        }
        if conn.fin.iter().zip(conn.shut).all(|(f, s)| !f || s) {
            state.draining.remove(&token);
        }
        if conn.shut == [true, true] {
            let reason = if conn.first_fin == Some(BACKEND) { CloseReason::BackendFin } else { CloseReason::ClientFin };
            self.finish(state, token, reason);
        }
    }

    /// Drains the `EVENTS` ring (monitor 0): each report names a socket that forwarded another
    /// `REPORT_EVERY` bytes; check that direction's backlog, or pass the report on to the other
    /// monitors (one of them has the connection; a report per MiB makes a broadcast cheap).
    fn on_reports(&self, state: &mut State) {
        let mut cookies = Vec::new();
        {
            let mut ring = self.events.lock().unwrap_or_else(PoisonError::into_inner);
            while let Some(item) = ring.next() {
                if let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) {
                    cookies.push(u64::from_ne_bytes(bytes));
                }
            }
        }
        let foreign = self.on_cookies(state, &cookies);
        if !foreign.is_empty() {
            for monitor in &self.monitors[1..] {
                monitor.post(&foreign);
            }
        }
    }

    /// Runs `flow` for the reported cookies of this monitor's connections; returns the others.
    fn on_cookies(&self, state: &mut State, cookies: &[u64]) -> Vec<u64> {
        let mut foreign = Vec::new();
        for &cookie in cookies {
            if let Some(&(token, side)) = state.by_cookie.get(&cookie) {
                self.check_direction(state, token, side);
            } else {
                foreign.push(cookie);
            }
        }
        foreign
    }

    /// Periodic work: idle timeout, the memory guard (docs/design.md#backpressure) and a backlog check for holds.
    fn sample(&self, me: &Monitor, state: &mut State) {
        let now_ns = sys::monotonic_ns();
        let idle_ns = u64::try_from(self.limits.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut expired = Vec::new();
        let mut behind = Vec::new();
        let mut parked = Vec::new();
        let mut total_in_flight = 0u64;
        {
            let maps = &self.maps;
            for (token, conn) in &mut state.conns {
                let mut last = conn.handoff_ns;
                let mut worst = 0u64;
                for side in [CLIENT, BACKEND] {
                    let Ok(p) = maps.pairs.get(&conn.cookies[side]) else { continue };
                    if p.peer_missing != 0 {
                        expired.push((*token, side, CloseReason::Internal));
                    }
                    conn.bytes[side] = conn.moved(side, &p);
                    last = last.max(p.last_active_ns);
                    let peer = 1 - side;
                    if conn.shut[side] {
                        continue;
                    }
                    let fd = conn.fds[peer].as_fd();
                    if let (Ok(y), Ok(outq)) = (sys::tcp_info(fd), sys::outq(fd)) {
                        let in_peer = (y.bytes_acked + u64::from(outq)).saturating_sub(conn.sent_base[peer]);
                        let backlog = conn.moved(side, &p).saturating_sub(in_peer);
                        // A hold to start (a report the ring could not deliver), or a grant the
                        // reports did not extend.
                        let short = conn.grant[side].saturating_sub(p.bytes) < REDIRECT_WINDOW / 2;
                        if conn.relay[side].is_none() && (backlog > HOLD_AT || p.holding != 0 || short) {
                            behind.push((*token, side));
                        }
                        if conn.relay[side].as_ref().is_some_and(|r| r.parked) {
                            parked.push((*token, peer));
                        }
                        worst = worst.max(backlog);
                    }
                }
                total_in_flight += worst;
                if worst > self.limits.max_in_flight {
                    let since = *conn.over_cap_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.limits.in_flight_grace {
                        expired.push((*token, CLIENT, CloseReason::MemoryGuard));
                        continue;
                    }
                } else {
                    conn.over_cap_since = None;
                }
                if now_ns.saturating_sub(last) > idle_ns {
                    expired.push((*token, CLIENT, CloseReason::IdleTimeout));
                }
            }
        }
        me.in_flight.store(total_in_flight, Ordering::Relaxed);
        let all: u64 = self.monitors.iter().map(|m| m.in_flight.load(Ordering::Relaxed)).sum();
        self.stats.in_flight_bytes.store(all, Ordering::Relaxed);
        for (token, side, reason) in expired {
            match reason {
                CloseReason::MemoryGuard => {
                    self.stats.memory_guard_aborts.fetch_add(1, Ordering::Relaxed);
                    warn!(token, "in-flight bytes above the cap for too long; aborting (memory guard)");
                    self.abort(state, token, side, reason);
                }
                // Reset, not FIN: a peer must not take the cut for the end of the stream.
                CloseReason::IdleTimeout => self.abort(state, token, side, reason),
                _ => {
                    self.stats.peer_missing_aborts.fetch_add(1, Ordering::Relaxed);
                    self.abort(state, token, side, reason);
                }
            }
        }
        // Fallback for a report the ring could not deliver to this table (one sent between the
        // handoff's kick and the registration): the backlog check runs here too
        // (after the expiries: a connection closed above is skipped by `flow`).
        for (token, side) in behind {
            self.check_direction(state, token, side);
        }
        // A parked direction gets one pass a second even without its peer's EPOLLOUT.
        for (token, side) in parked {
            self.unpark(me, state, token, side);
        }
    }

    /// Resets both sides (RST, via `SO_LINGER {1, 0}`) and forgets the connection.
    pub(super) fn abort(&self, state: &mut State, token: u64, _side: usize, reason: CloseReason) {
        if let Some(conn) = state.conns.get(&token) {
            for fd in &conn.fds {
                let _ = sys::set_linger_zero(fd.as_fd());
            }
        }
        self.finish(state, token, reason);
    }

    /// Closes both sockets (which removes them from `SOCKS`), deletes the pairing entries and
    /// reports the connection's totals.
    pub(super) fn finish(&self, state: &mut State, token: u64, reason: CloseReason) {
        state.draining.remove(&token);
        state.held.remove(&token);
        let Some(mut conn) = state.conns.remove(&token) else { return };
        for c in conn.cookies {
            state.by_cookie.remove(&c);
        }
        if conn.shut != [true, true] {
            // A direction that was shut has its final count from its drain check.
            let maps = &self.maps;
            for side in [CLIENT, BACKEND] {
                if conn.shut[side] {
                    continue;
                }
                if let Ok(p) = maps.pairs.get(&conn.cookies[side]) {
                    conn.bytes[side] = conn.moved(side, &p);
                }
            }
        }
        // No EPOLL_CTL_DEL: closing the sockets (nothing else holds their files) takes them out
        // of the monitor's epoll set.
        let Spliced { fds, cookies, bytes, hold_entry, flow, .. } = conn;
        drop(fds);
        {
            let maps = &self.maps;
            for (c, hold) in cookies.iter().zip(hold_entry) {
                let _ = maps.pairs.remove(c);
                if hold {
                    let _ = maps.hold.remove(c);
                }
            }
        }
        self.stats.active.fetch_sub(1, Ordering::AcqRel);
        self.report(CloseReport {
            flow,
            closed: Closed { reason, client_to_backend: bytes[CLIENT], backend_to_client: bytes[BACKEND] },
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn a_panicking_body_reaches_the_handler_with_its_message() {
        let mut seen = None;
        fatal_on_panic(|| panic!("monitor {} broke", 3), |msg| seen = Some(msg.to_owned()));
        assert_eq!(seen.as_deref(), Some("monitor 3 broke"));
        let called = AtomicBool::new(false);
        fatal_on_panic(|| {}, |_| called.store(true, Ordering::Relaxed));
        assert!(!called.load(Ordering::Relaxed), "no panic, no handler");
    }

    #[test]
    fn the_inbox_is_bounded_and_keeps_the_oldest_reports() {
        let m = Monitor::new().expect("epoll and eventfd");
        let batch: Vec<u64> = (0..1000).collect();
        for _ in 0..(INBOX_MAX / 1000 + 5) {
            m.post(&batch);
        }
        let inbox = m.inbox.lock().expect("inbox");
        assert_eq!(inbox.len(), INBOX_MAX);
        assert_eq!(&inbox[..1000], &batch[..]);
    }
}
