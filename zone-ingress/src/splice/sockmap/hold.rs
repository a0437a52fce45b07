//! Backpressure of a spliced direction ([docs/design.md#backpressure](../../../../docs/design.md#backpressure)).
//!
//! The redirect path has none, so a fast sender toward a slow reader (or toward a psock worker
//! slower than the receive path) grows the peer's psock queue without bound. The verdict
//! reports every `REPORT_EVERY` forwarded bytes of a socket on the `EVENTS` ring; the monitor
//! then measures that direction's backlog (forwarded but not yet in the peer's TCP) and above
//! [`HOLD_AT`] *holds* the direction (`HOLD` map): the verdict keeps the following skbs on the
//! receiving socket, charged to its receive buffer, so its TCP window closes as for any slow
//! reader. Once the peer's psock queue is empty the monitor relays what the socket holds
//! (`recv`/`send`, non-blocking, one bounded buffer per held direction), keeping the hold while
//! bytes keep coming: a saturating flow is then carried by the relay alone instead of going
//! back to the psock worker, which sends each skb from a kernel thread and falls behind the
//! receive path within milliseconds. While the relay's passes stay light (each drains the
//! source and moves under `LIGHT_PASS` bytes: the flow has turned interactive) the source is
//! also watched for `EPOLLIN`, so a held message is relayed at once; after `RELAY_QUIET` of light
//! passes the monitor sets the hold down; the verdict keeps holding until an skb finds every
//! held byte relayed, and redirects from that skb on.
//!
//! Order is kept because the relay writes only after the queued redirects reached the peer (a
//! look taken while the verdict holds, and taken again if the verdict has redirected since), and
//! the verdict redirects again only after the relay wrote every held byte. A held direction whose
//! peer's send buffer is full is parked on the peer's `EPOLLOUT` instead of being polled.
//!
//! The verdict also bounds a direction without the daemon: it redirects at most the grant
//! (`Hold::grant`, `REDIRECT_WINDOW` ahead of the peer's TCP), which [`Shared::check_direction`]
//! moves forward on each report, and holds by itself beyond it. The memory guard
//! (`--max-in-flight-bytes`) remains as the last resort: a backlog above it aborts the
//! connection (RST both ways).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tracing::{debug, warn};
use zone_ingress_ebpf::splice::{Hold, Pair, REDIRECT_WINDOW};

use super::{
    BACKEND, CLIENT, Maps, Shared,
    monitor::{Monitor, Spliced, State},
};
use crate::{
    splice::CloseReason,
    sys::{self, epoll},
};

/// Backlog toward the peer above which a direction is held.
pub const HOLD_AT: u64 = 2 << 20;
/// Size of the relay buffer of a held direction.
const RELAY_BUFFER: usize = 256 << 10;
/// How long a relay must stay caught up before it ends (see `relay_side`).
const RELAY_SETTLE: Duration = Duration::from_millis(2);
/// How long a held direction's relay must find only light passes (the source drained, under
/// `LIGHT_PASS` bytes moved) before the hold is set down and the verdict redirects again (see
/// `relay_side`). A saturating flow moves more per pass and stays on the relay.
const RELAY_QUIET: Duration = Duration::from_millis(5);
/// At most this many bytes moved in a pass that drained the source make it a light pass.
const LIGHT_PASS: u64 = 64 << 10;
/// Bytes one held direction may relay per monitor pass (keeps one pass short).
const RELAY_BUDGET: u64 = 4 << 20;

/// Where one relay pass left a held direction.
enum Step {
    /// The direction is no longer held: the verdict redirects its next skb.
    Done,
    /// More to do at the next pass.
    More,
    /// Nothing can move until the peer's send buffer has room.
    Blocked,
}

/// Why relaying a held direction failed: which socket, or our own bookkeeping.
enum RelayError {
    Source(io::Error),
    Dest(io::Error),
    Internal(io::Error),
}

/// The relay of one held direction.
pub(super) struct Relay {
    /// Allocated only while the relay moves bytes (empty while it waits for the peer's queue to
    /// drain, and again once it has caught up), so idle holds cost no memory.
    buf: Vec<u8>,
    /// `buf[start..end]` was read from the source and is not yet written to the peer.
    start: usize,
    end: usize,
    /// The hold is requested (`Hold::want`); false once released, while the verdict still
    /// holds bytes that must be relayed.
    want: bool,
    /// Released from waiting but still requested: while bytes keep coming, the verdict holds
    /// every skb and the relay is the only writer to the peer; set down after `RELAY_QUIET` of
    /// light passes.
    keep: bool,
    /// Since when the relay's passes have all been light (with `keep`).
    quiet_since: Option<Instant>,
    /// The source is registered for `EPOLLIN` (while light with `keep`), so a message that the
    /// verdict holds meanwhile is relayed at once rather than at the next 200 µs pass.
    armed: bool,
    /// The source reached EOF: nothing more to read.
    eof: bool,
    /// Waiting for room in the peer (its send buffer was full): out of the monitor's passes
    /// until the peer's `EPOLLOUT` (or the once-a-second sample), so a peer that does not read
    /// costs nothing.
    pub(super) parked: bool,
    /// Since when every held byte has been relayed (see `relay_side`).
    settled_since: Option<Instant>,
    /// The relay may write: a look found the verdict holding and nothing it redirected still
    /// waiting toward the peer, and the verdict has redirected nothing since (`frozen`).
    verified: bool,
    /// `Pair::bytes` when the relay was verified. Once it moves, the verdict has redirected
    /// again after the relay caught up, so bytes it holds from then on (its grant ran out) may
    /// only go out after those redirects: the relay needs a new look first.
    frozen: u64,
}

impl Relay {
    pub(super) fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            want: true,
            keep: false,
            quiet_since: None,
            armed: false,
            eof: false,
            parked: false,
            settled_since: None,
            verified: false,
            frozen: 0,
        }
    }
}

impl Shared {
    /// Bytes the verdict redirected from `side` that are not yet in the peer's TCP send queue,
    /// i.e. what waits in the peer's psock queue; with `side`'s `PAIRS` entry.
    fn backlog(&self, conn: &Spliced, side: usize) -> io::Result<(u64, Pair)> {
        let pair = self.maps.pairs.get(&conn.cookies[side])?;
        let peer = conn.fds[1 - side].as_fd();
        let y = sys::tcp_info(peer)?;
        // The peer's TCP holds what was redirected and what the monitor relayed.
        let in_peer = (y.bytes_acked + u64::from(sys::outq(peer)?)).saturating_sub(conn.sent_base[1 - side]);
        Ok((conn.moved(side, &pair).saturating_sub(in_peer), pair))
    }

    /// Writes the `HOLD` entry of the socket with `cookie` (the only writer of that map).
    fn set_hold(&self, cookie: u64, want: bool, relayed: u64, grant: u64) -> io::Result<()> {
        let hold = Hold { want: u64::from(want), relayed, grant };
        self.maps.hold.insert(&cookie, &hold)
    }

    /// Backpressure, redirect grant and memory guard for direction `side` of `token` (module
    /// docs): called after the verdict reported another `REPORT_EVERY` bytes or held the
    /// direction by itself, and from the once-a-second sample.
    pub(super) fn check_direction(&self, state: &mut State, token: u64, side: usize) {
        let Some(conn) = state.conns.get_mut(&token) else { return };
        if conn.shut[side] || conn.relay[side].is_some() {
            return;
        }
        let Ok((backlog, pair)) = self.backlog(conn, side) else { return };
        if backlog > self.limits.max_in_flight {
            self.stats.memory_guard_aborts.fetch_add(1, Ordering::Relaxed);
            warn!(
                token,
                side,
                backlog,
                cap = self.limits.max_in_flight,
                "bytes queued toward a slow peer above the cap; aborting (memory guard)"
            );
            self.abort(state, token, side, CloseReason::MemoryGuard);
            return;
        }
        if backlog > HOLD_AT || pair.holding != 0 {
            if let Err(e) = self.set_hold(conn.cookies[side], true, conn.relayed[side], conn.grant[side]) {
                warn!(token, side, error = %e, "could not hold a direction (HOLD map update)");
                return;
            }
            conn.relay[side] = Some(Relay::new());
            conn.hold_entry[side] = true;
            state.held.insert(token);
            self.stats.holds.fetch_add(1, Ordering::Relaxed);
            let by = if backlog > HOLD_AT { "backlog" } else { "verdict (redirect grant used up)" };
            debug!(token, side, backlog, by, "direction held: bytes stay on the socket until the peer's queue drains");
            return;
        }
        // Let the verdict redirect up to `REDIRECT_WINDOW` beyond what reached the peer's TCP.
        let grant = pair.bytes.saturating_sub(backlog) + REDIRECT_WINDOW;
        if grant > conn.grant[side] {
            if let Err(e) = self.set_hold(conn.cookies[side], false, conn.relayed[side], grant) {
                // The verdict holds by itself at the old grant: slower, never unbounded.
                debug!(token, side, error = %e, "could not extend a redirect grant (HOLD map update)");
                return;
            }
            conn.grant[side] = grant;
            conn.hold_entry[side] = true;
        }
    }

    /// Wakes the held direction toward `side` of `token` parked on that side's send buffer:
    /// `side` reported `EPOLLOUT` (or the once-a-second sample looks again).
    pub(super) fn unpark(&self, me: &Monitor, state: &mut State, token: u64, side: usize) {
        let Some(conn) = state.conns.get_mut(&token) else { return };
        let Some(relay) = conn.relay[1 - side].as_mut() else { return };
        if !relay.parked {
            return;
        }
        relay.parked = false;
        if let Err(e) = rearm(me, conn, token, side) {
            debug!(token, side, error = %e, "epoll_ctl(MOD) of a spliced socket failed");
        }
        state.held.insert(token);
    }

    /// One pass over the held directions of `token`: once the peer's psock queue is empty,
    /// release the hold and relay what the verdict kept; end when every held byte is relayed.
    pub(super) fn relay(&self, me: &Monitor, state: &mut State, token: u64) {
        let Some(conn) = state.conns.get_mut(&token) else {
            state.held.remove(&token);
            return;
        };
        let mut ended = Vec::new();
        for side in [CLIENT, BACKEND] {
            if conn.relay[side].as_ref().is_none_or(|r| r.parked) {
                continue;
            }
            let result = self.relay_side(conn, side);
            if let (Ok(step), Some(relay)) = (&result, conn.relay[side].as_mut()) {
                // EPOLLIN only while a kept relay's passes are light: a saturating flow is served
                // by the passes, without a wake-up per arriving batch.
                let want = matches!(step, Step::More) && relay.keep && relay.quiet_since.is_some();
                if want != relay.armed {
                    relay.armed = want;
                    if let Err(e) = rearm(me, conn, token, side) {
                        debug!(token, side, error = %e, "epoll_ctl(MOD) of a relayed socket failed; the 200 µs passes still run");
                    }
                }
            }
            match result {
                Ok(Step::Done) => {
                    conn.relay[side] = None;
                    ended.push(side);
                    debug!(token, side, relayed = conn.relayed[side], "hold released: the verdict redirects again");
                }
                Ok(Step::More) => {}
                Ok(Step::Blocked) => {
                    // Out of the passes until the peer has room: its EPOLLOUT brings it back.
                    // Registering for it re-checks the peer, so room that appeared meanwhile
                    // still wakes the monitor at once.
                    if let Some(relay) = conn.relay[side].as_mut() {
                        relay.parked = true;
                        relay.armed = false;
                    }
                    let armed = rearm(me, conn, token, 1 - side).and_then(|()| rearm(me, conn, token, side));
                    if let Err(e) = armed {
                        debug!(token, side, error = %e, "epoll_ctl(MOD) of a spliced socket failed; polling instead");
                        if let Some(relay) = conn.relay[side].as_mut() {
                            relay.parked = false;
                        }
                    }
                }
                Err(e) => {
                    let (failed, e) = match e {
                        RelayError::Source(e) => (Some(side), e),
                        RelayError::Dest(e) => (Some(1 - side), e),
                        RelayError::Internal(e) => (None, e),
                    };
                    debug!(token, side, error = %e, "relay of a held direction failed");
                    let reason = match failed {
                        Some(CLIENT) => CloseReason::ClientReset,
                        Some(_) => CloseReason::BackendReset,
                        None => CloseReason::Internal,
                    };
                    self.abort(state, token, side, reason);
                    return;
                }
            }
        }
        if conn.relay.iter().all(|r| r.as_ref().is_none_or(|r| r.parked)) {
            state.held.remove(&token);
        }
        // The verdict may have held anew after the relay's last look (its grant ran out), and its
        // report came while the relay still ran: look once more now that none does.
        for side in ended {
            self.check_direction(state, token, side);
        }
    }

    /// Relays one held direction as far as it can without blocking.
    fn relay_side(&self, conn: &mut Spliced, side: usize) -> Result<Step, RelayError> {
        // Only the look before writing needs the backlog (three system calls per pass).
        let verified = conn.relay[side].as_ref().is_none_or(|r| r.verified);
        let (backlog, pair) =
            if verified { (0, Pair::default()) } else { self.backlog(conn, side).map_err(RelayError::Internal)? };
        let cookie = conn.cookies[side];
        let publish =
            |relayed: u64, grant: u64| self.set_hold(cookie, false, relayed, grant).map_err(RelayError::Internal);
        let (src, dst) = (conn.fds[side].as_fd(), conn.fds[1 - side].as_fd());
        let Some(relay) = conn.relay[side].as_mut() else { return Ok(Step::Done) };
        let relayed = &mut conn.relayed[side];
        let grant = &mut conn.grant[side];
        if !relay.verified {
            if backlog == 0 {
                // The peer's queue is empty: grant a full window beyond what the verdict
                // redirected so far, published with the release.
                *grant = (*grant).max(pair.bytes + REDIRECT_WINDOW);
            }
            if relay.want && pair.holding == 0 && backlog == 0 {
                // The queue drained before the verdict held anything: cancel. If a verdict run
                // holds an skb meanwhile, `held != relayed` keeps it holding, and a later look
                // finds it.
                relay.want = false;
                publish(*relayed, *grant)?;
            }
            if pair.holding == 0 && !relay.want {
                // Cancelled, and the verdict holds nothing: done once that is settled (below).
            } else if pair.holding == 0 || backlog != 0 {
                // `holding` was set by a verdict run that finished after every earlier redirect
                // of this socket (runs are serialized), and the verdict cannot redirect again
                // before the relay writes (`want`, or held bytes not yet relayed), so `backlog`
                // counts every redirect: write only once they are all in the peer's TCP, or our
                // bytes would overtake theirs. A peer without room sends nothing from its queue
                // either: wait for its EPOLLOUT.
                let full = backlog != 0 && !sys::writable(dst).map_err(RelayError::Dest)?;
                return Ok(if full { Step::Blocked } else { Step::More });
            } else {
                relay.verified = true;
                relay.frozen = pair.bytes;
                if relay.want {
                    // The hold did its job (the peer's queue is empty): relay from here on. The
                    // hold stays requested while bytes keep coming, so a saturating flow is
                    // carried by the relay alone instead of returning to the psock worker, which
                    // sends slower than the receive path fills its queue (each return cost
                    // another hold cycle); it is set down once the passes have been light for a
                    // while (below).
                    relay.want = false;
                    relay.keep = true;
                    relay.quiet_since = None;
                }
            }
        }
        let mut moved = 0u64;
        let mut caught_up = false;
        let mut blocked = false;
        while relay.verified && moved < RELAY_BUDGET {
            if relay.start < relay.end {
                match sys::send_nonblocking(dst, &relay.buf[relay.start..relay.end]) {
                    Ok(n) => {
                        relay.start += n;
                        moved += n as u64;
                        *relayed += n as u64;
                        if relay.start == relay.end && !relay.keep {
                            // Tell the verdict at once, so it can resume as early as possible.
                            publish(*relayed, *grant)?;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) => return Err(RelayError::Dest(e)),
                }
                continue;
            }
            if relay.eof {
                caught_up = true;
                break;
            }
            if relay.buf.is_empty() {
                relay.buf = vec![0; RELAY_BUFFER];
            }
            match sys::recv_nonblocking(src, &mut relay.buf) {
                Ok(0) => relay.eof = true,
                Ok(n) => {
                    (relay.start, relay.end) = (0, n);
                    if !relay.keep && pair_now(&self.maps, cookie).map_err(RelayError::Internal)?.bytes != relay.frozen
                    {
                        // Released, the verdict redirected again, then held anew: the resume
                        // needed every held byte relayed, so all of these bytes came after those
                        // redirects. They wait in the buffer for a new look.
                        relay.verified = false;
                        relay.settled_since = None;
                        return Ok(Step::More);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    caught_up = true;
                    relay.buf = Vec::new();
                    break;
                }
                Err(e) => return Err(RelayError::Source(e)),
            }
        }
        self.stats.relayed_bytes.fetch_add(moved, Ordering::Relaxed);
        if blocked {
            // The peer's send buffer is full: nothing moves until it has room.
            relay.quiet_since = None;
            return Ok(Step::Blocked);
        }
        if relay.keep {
            // A light pass drained the source and moved little: interactive traffic, which the
            // verdict's redirect serves faster than the relay's passes.
            let light = caught_up && moved < LIGHT_PASS;
            if !relay.eof && !light {
                relay.quiet_since = None;
                return Ok(Step::More);
            }
            let quiet_since = *relay.quiet_since.get_or_insert_with(Instant::now);
            if !relay.eof && quiet_since.elapsed() < RELAY_QUIET {
                return Ok(Step::More);
            }
            // Light for `RELAY_QUIET` (or at EOF): release. The verdict holds on until an skb finds
            // every held byte relayed, so it resumes redirecting at the first skb after the relay
            // has caught up.
            relay.keep = false;
            publish(*relayed, *grant)?;
        }
        let held = pair_now(&self.maps, cookie).map_err(RelayError::Internal)?.held;
        // A verified relay has read everything the source held; an unverified one (cancelled) read
        // nothing, and the verdict holds nothing.
        if (relay.verified && !caught_up) || held != *relayed || relay.start < relay.end {
            relay.settled_since = None;
            return Ok(Step::More);
        }
        // Every held byte was relayed. A verdict run that read the hold request just before it
        // was released could still be finishing (softirq, microseconds): only a second look, a
        // while later, that still finds `held == relayed` ends the relay.
        match relay.settled_since {
            Some(t) if t.elapsed() >= RELAY_SETTLE => Ok(Step::Done),
            Some(_) => Ok(Step::More),
            None => {
                relay.settled_since = Some(Instant::now());
                Ok(Step::More)
            }
        }
    }
}

/// Registers `side` of `token` in the monitor's epoll set for what its state needs: always a
/// peer's close (`EPOLLRDHUP`); `EPOLLIN` while its held direction's relay is light (`armed`);
/// `EPOLLOUT` while the direction toward it is parked on its send buffer.
pub(super) fn rearm(me: &Monitor, conn: &Spliced, token: u64, side: usize) -> io::Result<()> {
    let mut events = libc::EPOLLRDHUP | libc::EPOLLET;
    if conn.relay[side].as_ref().is_some_and(|r| r.armed) {
        events |= libc::EPOLLIN;
    }
    if conn.relay[1 - side].as_ref().is_some_and(|r| r.parked) {
        events |= libc::EPOLLOUT;
    }
    epoll::modify(me.epoll.as_fd(), conn.fds[side].as_raw_fd(), events as u32, token << 1 | side as u64)
}

/// The `PAIRS` entry of the socket with `cookie`, read now.
fn pair_now(maps: &Maps, cookie: u64) -> io::Result<Pair> {
    maps.pairs.get(&cookie)
}
