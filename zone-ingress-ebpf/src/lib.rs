//! Types and names shared by the kernel programs (`src/main.rs`, built for `bpfel-unknown-none`)
//! and the daemon (feature `user`, which implements `aya::Pod`).
//!
//! Every struct here is `#[repr(C)]`, `Copy`, and has no implicit padding: the kernel and
//! userspace must agree on every byte.
#![no_std]

/// The sockhash splice: one verdict program, one SOCKHASH, one pairing map.
pub mod splice {
    /// SOCKHASH of every spliced socket, keyed by the socket's own cookie.
    pub const SOCKS: &str = "SOCKS";
    /// Pairing and per-socket counters: own cookie → [`Pair`].
    pub const PAIRS: &str = "PAIRS";
    /// Per-CPU array of global counters, indexed by the `STAT_*` constants.
    pub const STATS: &str = "SPLICE_STATS";
    /// The sk_skb stream-verdict program.
    pub const VERDICT: &str = "splice_verdict";

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
    }

    #[cfg(feature = "user")]
    // SAFETY: `Pair` is `repr(C)`, `Copy`, four `u64`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for Pair {}
}
