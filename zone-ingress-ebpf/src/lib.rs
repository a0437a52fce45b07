//! Types and names shared by the kernel programs (`src/main.rs`, built for `bpfel-unknown-none`)
//! and the daemon (feature `user`, which implements `aya::Pod`).
//!
//! Every struct here is `#[repr(C)]`, `Copy`, and has no implicit padding: the kernel and
//! userspace must agree on every byte.
#![no_std]

/// The sockhash splice: one verdict program, two SOCKHASHes, one pairing map.
///
/// `SOCKS` holds every spliced socket for its whole life and has no program: it is the redirect
/// target, and it keeps each socket's psock (and the bytes queued toward it) alive. `VERDICT`
/// has the verdict attached; a socket is in it while the kernel should read it. Removing a socket
/// from `VERDICT` (and only from there) pauses that direction: its bytes stay in its TCP receive
/// queue, its window closes and the sender slows down. That is the backpressure the redirect path
/// itself lacks (in-kernel-splice.md §4).
pub mod splice {
    /// SOCKHASH of every spliced socket, keyed by the socket's own cookie (no program).
    pub const SOCKS: &str = "SOCKS";
    /// SOCKHASH with the verdict attached: sockets whose received bytes the kernel forwards.
    pub const VERDICT: &str = "VERDICT";
    /// Pairing and per-socket counters: own cookie → [`Pair`].
    pub const PAIRS: &str = "PAIRS";
    /// Ring buffer of `u64` socket cookies: a socket forwarded another `REPORT_EVERY` bytes, so
    /// userspace should look at how much is queued toward its peer (event-driven flow control,
    /// no polling of idle connections).
    pub const EVENTS: &str = "EVENTS";
    /// Bytes between two `EVENTS` reports of one socket.
    pub const REPORT_EVERY: u64 = 1 << 20;
    /// Size of `EVENTS` in bytes (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 18;
    /// Per-CPU array of global counters, indexed by the `STAT_*` constants.
    pub const STATS: &str = "SPLICE_STATS";
    /// The sk_skb stream-verdict program.
    pub const VERDICT_PROG: &str = "splice_verdict";

    /// Capacity of `SOCKS` and `PAIRS`: two sockets per spliced connection.
    pub const MAX_SOCKETS: u32 = 1 << 18;

    /// Skbs whose socket had no `PAIRS` entry (left on the socket; userspace aborts).
    pub const STAT_NO_PAIR: u32 = 0;
    /// Redirects that failed because the peer was not in `SOCKS` (left on the socket).
    pub const STAT_PEER_MISSING: u32 = 1;
    /// Zero-length skbs (a bare FIN) that were not redirected.
    pub const STAT_EMPTY: u32 = 2;
    /// Skbs redirected to the peer.
    pub const STAT_REDIRECTED: u32 = 3;
    /// Number of `STAT_*` slots.
    pub const STAT_COUNT: u32 = 4;

    /// One spliced socket's view: who its peer is and what the verdict forwarded from it.
    ///
    /// Userspace writes `peer` (and zeroes the rest) before inserting the socket into `SOCKS`;
    /// only the verdict program writes the counters afterwards. The verdict for one socket runs
    /// under that socket's lock, so the counters of one entry are never written concurrently.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Pair {
        /// Cookie of the socket that bytes received here are redirected to.
        pub peer: u64,
        /// Payload bytes received on this socket and queued to the peer.
        pub bytes: u64,
        /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last redirected skb; 0 = none yet.
        pub last_active_ns: u64,
        /// Redirects that failed because the peer was missing from `SOCKS`: non-zero means
        /// the handoff order was broken and the connection must be aborted.
        pub peer_missing: u64,
        /// Value of `bytes` at the last `EVENTS` report.
        pub reported: u64,
    }

    #[cfg(feature = "user")]
    // SAFETY: `Pair` is `repr(C)`, `Copy`, five `u64`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for Pair {}
}
