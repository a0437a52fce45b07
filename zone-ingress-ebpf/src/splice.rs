//! sk_skb stream verdict: every skb received on a spliced socket is redirected to the egress of
//! its peer (`bpf_sk_redirect_hash(.., flags = 0)`), so the kernel moves the payload between the
//! two TCP connections without a userspace copy. See `docs/design.md#kernel-behaviour-the-code-relies-on`.
//!
//! Attached alone (no stream parser) to `VERDICT`: the kernel runs it on each skb taken from the
//! receive queue of a socket in that map (`sk_psock_verdict_recv`, net/core/skmsg.c,
//! Linux ≥ 5.13) and redirects through `SOCKS`, where both sockets stay for their whole life.
//!
//! A direction that userspace holds (`HOLD`, backpressure; see the crate docs) is passed to the
//! receiving socket itself instead (`SK_PASS`, no redirect): the bytes wait there, charged to its
//! receive buffer, until userspace relays them. The verdict holds a direction by itself, and
//! reports it once on `EVENTS`, when an skb would take the socket's redirected bytes past the
//! grant userspace gave it (`Hold::grant`, `REDIRECT_WINDOW` without an entry): the queue toward
//! the peer is bounded even when userspace does not run. The verdict of one socket never runs
//! twice at once (it runs under the socket's lock), so the switch back to redirecting, taken here
//! when every held byte has been relayed and the grant allows, cannot overtake a held byte.

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use zone_ingress_ebpf::splice::{
    EVENTS_BYTES, Hold, MAX_SOCKETS, Pair, REDIRECT_WINDOW, REPORT_EVERY, STAT_COUNT, STAT_EMPTY, STAT_HELD,
    STAT_NO_PAIR, STAT_OVER_GRANT, STAT_PEER_MISSING, STAT_REDIRECTED,
};

use crate::rare;

#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Only its attachment matters to the kernel; the program never reads it.
#[map(name = "VERDICT")]
static VERDICT: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "PAIRS")]
static PAIRS: HashMap<u64, Pair> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "HOLD")]
static HOLD: HashMap<u64, Hold> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "SPLICE_STATS")]
static SPLICE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[stream_verdict]
pub(crate) fn splice_verdict(ctx: SkBuffContext) -> u32 {
    try_splice_verdict(&ctx)
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(v) = SPLICE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and the verdict does not nest on one CPU.
        unsafe { *v += 1 };
    }
}

/// Decides one skb. Never returns `SK_DROP` for payload: TCP has already acknowledged those
/// bytes, so a drop would silently corrupt the stream. A missing pairing or peer leaves the
/// bytes on this socket (`SK_PASS` without a redirect) and is counted; userspace sees the
/// counter and aborts the connection with a reset.
#[inline(always)]
fn try_splice_verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the skb's socket; `as_ptr` is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pair) = PAIRS.get_ptr_mut(cookie) else {
        count(STAT_NO_PAIR);
        return SK_PASS;
    };
    let len = ctx.len();
    if len == 0 {
        // A bare FIN: redirecting an empty skb makes the peer's psock worker treat the empty
        // send as a hard error (EPIPE) and stop sending to it. Nothing to forward; the daemon
        // propagates the FIN itself.
        count(STAT_EMPTY);
        return SK_DROP;
    }
    // SAFETY: `pair` points into a map value that stays valid for this program run; only this
    // socket's verdict writes its entry, and never concurrently (module docs).
    unsafe {
        // SAFETY: a map value read for this program run.
        let hold = HOLD.get(cookie);
        let want = hold.is_some_and(|h| h.want != 0);
        let relayed = hold.map_or(0, |h| h.relayed);
        let grant = hold.map_or(REDIRECT_WINDOW, |h| h.grant);
        let over = (*pair).bytes + u64::from(len) > grant;
        let keep = if (*pair).holding != 0 {
            // Back to redirecting only when nothing held is still waiting on this socket.
            want || over || relayed != (*pair).held
        } else {
            want || over
        };
        if keep {
            if (*pair).holding == 0 && !want {
                // Held by the grant alone: userspace does not know yet. Best effort, like every
                // report: its once-a-second sample finds a hold the ring could not deliver.
                count(STAT_OVER_GRANT);
                if EVENTS.output::<u64>(&cookie, 0).is_err() {
                    log_report_lost(ctx, cookie);
                }
            }
            (*pair).holding = 1;
            (*pair).held += u64::from(len);
            (*pair).last_active_ns = bpf_ktime_get_ns();
            count(STAT_HELD);
            return SK_PASS;
        }
        (*pair).holding = 0;
    }
    // SAFETY: as above.
    let mut peer = unsafe { (*pair).peer };
    if SOCKS.redirect_skb(ctx, &mut peer, 0) != i64::from(SK_PASS) {
        // SAFETY: as above; only this socket's verdict writes its entry.
        unsafe { (*pair).peer_missing += 1 };
        count(STAT_PEER_MISSING);
        log_peer_missing(ctx, cookie);
        return SK_PASS;
    }
    // SAFETY: as above.
    let report = unsafe {
        (*pair).bytes += u64::from(len);
        (*pair).last_active_ns = bpf_ktime_get_ns();
        let due = (*pair).bytes - (*pair).reported >= REPORT_EVERY;
        if due {
            (*pair).reported = (*pair).bytes;
        }
        due
    };
    if report {
        // Best effort: a full ring only delays flow control until the next report.
        let _ = EVENTS.output::<u64>(&cookie, 0);
    }
    count(STAT_REDIRECTED);
    SK_PASS
}

// The rare events' log lines (`rare`), each a BPF subprogram of its own: the log record's ring
// pointer then never shares a stack slot with the verdict's values, which the verifier requires
// of a loader without CAP_PERFMON (it may not overwrite a spilled pointer).

#[inline(never)]
fn log_report_lost(ctx: &SkBuffContext, cookie: u64) {
    if rare::due(rare::SPLICE_REPORT_LOST) {
        warn!(
            ctx,
            "sockmap splice: the event ring is full; a hold of socket {} waits for the daemon's next sample", cookie
        );
    }
}

#[inline(never)]
fn log_peer_missing(ctx: &SkBuffContext, cookie: u64) {
    if rare::due(rare::SPLICE_PEER_MISSING) {
        warn!(ctx, "sockmap splice: socket {}'s peer is not in the socket map; its bytes stay on the socket", cookie);
    }
}
