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
//! Order is kept because the relay writes only after the queued redirects reached the peer, and
//! the verdict redirects again only after the relay wrote every held byte. The memory guard
//! (`--max-in-flight-bytes`) remains as the last resort: a backlog above it aborts the
//! connection (RST both ways).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tracing::{debug, warn};
use zone_ingress_ebpf::splice::{Hold, Pair};

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
    /// Since when every held byte has been relayed (see `relay_side`).
    settled_since: Option<Instant>,
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
            settled_since: None,
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
    fn set_hold(&self, cookie: u64, want: bool, relayed: u64) -> io::Result<()> {
        let hold = Hold { want: u64::from(want), relayed };
        self.maps.hold.insert(&cookie, &hold)
    }

    /// Backpressure and memory guard for direction `side` of `token` (module docs): called
    /// after the verdict reported another `REPORT_EVERY` bytes.
    pub(super) fn check_direction(&self, state: &mut State, token: u64, side: usize) {
        let Some(conn) = state.conns.get_mut(&token) else { return };
        if conn.shut[side] || conn.relay[side].is_some() {
            return;
        }
        let Ok((backlog, _)) = self.backlog(conn, side) else { return };
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
        if backlog > HOLD_AT {
            if let Err(e) = self.set_hold(conn.cookies[side], true, conn.relayed[side]) {
                warn!(token, side, error = %e, "could not hold a direction (HOLD map update)");
                return;
            }
            conn.relay[side] = Some(Relay::new());
            conn.hold_entry[side] = true;
            state.held.insert(token);
            self.stats.holds.fetch_add(1, Ordering::Relaxed);
            debug!(token, side, backlog, "direction held: bytes stay on the socket until the peer's queue drains");
        }
    }

    /// One pass over the held directions of `token`: once the peer's psock queue is empty,
    /// release the hold and relay what the verdict kept; end when every held byte is relayed.
    pub(super) fn relay(&self, me: &Monitor, state: &mut State, token: u64) {
        let Some(conn) = state.conns.get_mut(&token) else {
            state.held.remove(&token);
            return;
        };
        for side in [CLIENT, BACKEND] {
            if conn.relay[side].is_none() {
                continue;
            }
            let result = self.relay_side(conn, side);
            if let (Ok(done), Some(relay)) = (&result, conn.relay[side].as_mut()) {
                // EPOLLIN only while a kept relay's passes are light: a saturating flow is served
                // by the passes, without a wake-up per arriving batch.
                let want = !done && relay.keep && relay.quiet_since.is_some();
                if want != relay.armed {
                    let events = if want {
                        libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET
                    } else {
                        libc::EPOLLRDHUP | libc::EPOLLET
                    };
                    match epoll::modify(
                        me.epoll.as_fd(),
                        conn.fds[side].as_raw_fd(),
                        events as u32,
                        token << 1 | side as u64,
                    ) {
                        Ok(()) => relay.armed = want,
                        Err(e) => {
                            debug!(token, side, error = %e, "epoll_ctl(MOD) of a relayed socket failed; the 200 µs passes still run")
                        }
                    }
                }
            }
            match result {
                Ok(true) => {
                    conn.relay[side] = None;
                    debug!(token, side, relayed = conn.relayed[side], "hold released: the verdict redirects again");
                }
                Ok(false) => {}
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
        if conn.relay.iter().all(Option::is_none) {
            state.held.remove(&token);
        }
    }

    /// Relays one held direction as far as it can without blocking. `Ok(true)`: the direction
    /// is no longer held (the verdict redirects its next skb).
    fn relay_side(&self, conn: &mut Spliced, side: usize) -> Result<bool, RelayError> {
        // Only the wait for the peer's queue needs the backlog (three system calls per pass).
        let waiting = conn.relay[side].as_ref().is_some_and(|r| r.want);
        let (backlog, pair) =
            if waiting { self.backlog(conn, side).map_err(RelayError::Internal)? } else { (0, Pair::default()) };
        let cookie = conn.cookies[side];
        let publish = |relayed: u64| self.set_hold(cookie, false, relayed).map_err(RelayError::Internal);
        let (src, dst) = (conn.fds[side].as_fd(), conn.fds[1 - side].as_fd());
        let Some(relay) = conn.relay[side].as_mut() else { return Ok(true) };
        let relayed = &mut conn.relayed[side];
        if relay.want {
            if pair.holding == 0 && backlog == 0 {
                // The queue drained before the verdict held anything: cancel. If a verdict run
                // holds an skb meanwhile, `held != relayed` keeps it holding and we relay it.
                relay.want = false;
                publish(*relayed)?;
            }
            // `holding` was set by a verdict run that finished after every earlier redirect of
            // this socket (runs are serialized), so `backlog` counts all of them: relay only once
            // they are all in the peer's TCP, or our bytes would overtake theirs.
            if pair.holding == 0 || backlog != 0 {
                return Ok(false);
            }
            // The hold did its job (the peer's queue is empty): relay from here on. The hold stays
            // requested while bytes keep coming, so a saturating flow is carried by the relay alone
            // instead of returning to the psock worker, which sends slower than the receive path
            // fills its queue (each return cost another hold cycle); it is set down once the
            // passes have been light for a while (below).
            relay.want = false;
            relay.keep = true;
            relay.quiet_since = None;
        }
        let mut moved = 0u64;
        let mut caught_up = false;
        while moved < RELAY_BUDGET {
            if relay.start < relay.end {
                match sys::send_nonblocking(dst, &relay.buf[relay.start..relay.end]) {
                    Ok(n) => {
                        relay.start += n;
                        moved += n as u64;
                        *relayed += n as u64;
                        if relay.start == relay.end && !relay.keep {
                            // Tell the verdict at once, so it can resume as early as possible.
                            publish(*relayed)?;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
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
                Ok(n) => (relay.start, relay.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    caught_up = true;
                    relay.buf = Vec::new();
                    break;
                }
                Err(e) => return Err(RelayError::Source(e)),
            }
        }
        self.stats.relayed_bytes.fetch_add(moved, Ordering::Relaxed);
        if relay.keep {
            // A light pass drained the source and moved little: interactive traffic, which the
            // verdict's redirect serves faster than the relay's passes.
            let light = caught_up && moved < LIGHT_PASS;
            if !relay.eof && !light {
                relay.quiet_since = None;
                return Ok(false);
            }
            let quiet_since = *relay.quiet_since.get_or_insert_with(Instant::now);
            if !relay.eof && quiet_since.elapsed() < RELAY_QUIET {
                return Ok(false);
            }
            // Light for `RELAY_QUIET` (or at EOF): release. The verdict holds on until an skb finds
            // every held byte relayed, so it resumes redirecting at the first skb after the relay
            // has caught up.
            relay.keep = false;
            publish(*relayed)?;
        }
        let held = pair_held_now(&self.maps, cookie).map_err(RelayError::Internal)?;
        if !caught_up || held != *relayed {
            relay.settled_since = None;
            return Ok(false);
        }
        // Every held byte was relayed. A verdict run that read the hold request just before it
        // was released could still be finishing (softirq, microseconds): only a second look, a
        // while later, that still finds `held == relayed` ends the relay.
        match relay.settled_since {
            Some(t) if t.elapsed() >= RELAY_SETTLE => Ok(true),
            Some(_) => Ok(false),
            None => {
                relay.settled_since = Some(Instant::now());
                Ok(false)
            }
        }
    }
}

/// `Pair::held` of the socket with `cookie`, read now.
fn pair_held_now(maps: &Maps, cookie: u64) -> io::Result<u64> {
    Ok(maps.pairs.get(&cookie)?.held)
}
