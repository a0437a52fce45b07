//! Types and names shared by the kernel programs (`src/main.rs`, built for `bpfel-unknown-none`)
//! and the daemon (feature `user`, which implements `aya::Pod`).
//!
//! Every struct here is `#[repr(C)]`, `Copy`, and has no implicit padding: the kernel and
//! userspace must agree on every byte.
#![no_std]

/// The sockhash splice: one verdict program, two SOCKHASHes, the pairing map and the hold map.
///
/// `SOCKS` holds every spliced socket for its whole life and has no program: it is the redirect
/// target, and it keeps each socket's psock (and the bytes queued toward it) alive. `VERDICT`
/// has the verdict attached; a socket stays in it for its whole life too (removing a socket from
/// the map that carries the program, while bytes arrive, drops acknowledged bytes).
///
/// Backpressure (docs/design.md#backpressure): the redirect path has none, because a redirected skb
/// no longer counts against the sender's receive buffer. When the bytes queued toward a peer
/// grow too large, userspace asks the verdict to *hold* that direction (`HOLD`): from the next
/// skb on, the verdict passes skbs to the receiving socket itself (`SK_PASS` without a
/// redirect), where they are charged to its receive buffer, so its TCP window closes like any
/// slow reader's. Userspace waits until the peer's queue is empty, then relays the held bytes
/// with `recv`/`send` (bounded by the receive buffer) and releases the hold; the verdict goes
/// back to redirecting only once every held byte was relayed (`Pair::held == Hold::relayed`),
/// so the byte order on the wire never changes. The verdict also holds by itself once a socket
/// has redirected everything userspace granted (`Hold::grant`, `REDIRECT_WINDOW` ahead of the
/// peer's TCP), so the queue toward a peer stays bounded without the daemon.
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
    /// Hold requests, written only by userspace: own cookie → [`Hold`]. No entry = no hold.
    pub const HOLD: &str = "HOLD";
    /// Bytes between two `EVENTS` reports of one socket.
    pub const REPORT_EVERY: u64 = 1 << 20;
    /// Redirect window of a socket without a `HOLD` entry: the verdict redirects at most this
    /// many bytes before userspace has granted more (`Hold::grant`). Beyond it, the verdict holds
    /// the direction by itself, so what waits toward a slow peer stays bounded even while the
    /// daemon cannot run (paused, starved).
    pub const REDIRECT_WINDOW: u64 = 4 << 20;
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
    /// Skbs kept on their own socket because the direction was held (backpressure).
    pub const STAT_HELD: u32 = 4;
    /// Directions the verdict held by itself: an skb would have passed the socket's grant.
    pub const STAT_OVER_GRANT: u32 = 5;
    /// Number of `STAT_*` slots.
    pub const STAT_COUNT: u32 = 6;

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
        /// 1 while the verdict holds this direction (passes skbs to this socket itself).
        pub holding: u64,
        /// Payload bytes ever held (passed to this socket itself) since the handoff.
        pub held: u64,
    }

    #[cfg(feature = "user")]
    // SAFETY: `Pair` is `repr(C)`, `Copy`, seven `u64`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for Pair {}

    /// A hold request and the redirect grant of one socket's direction, written only by
    /// userspace (the verdict only reads it), so neither side ever overwrites the other's fields.
    /// No entry reads as `{want: 0, relayed: 0, grant: REDIRECT_WINDOW}`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Hold {
        /// Non-zero: hold this direction from the next skb on.
        pub want: u64,
        /// Held bytes that userspace has read from this socket and written to the peer.
        pub relayed: u64,
        /// The verdict redirects an skb only while `Pair::bytes` stays within this value; the
        /// skb that would pass it is held instead (and reported once on `EVENTS`). Userspace
        /// moves it to `REDIRECT_WINDOW` beyond what has reached the peer's TCP.
        pub grant: u64,
    }

    #[cfg(feature = "user")]
    // SAFETY: `Hold` is `repr(C)`, `Copy`, three `u64`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for Hold {}
}

/// The XDP guard in front of the listener: one XDP program, its configuration, two LPM tries
/// of source CIDRs, the per-source SYN token buckets and the per-reason counters.
///
/// Only packets *for the listener* are judged: TCP to the listener's address and port. All
/// other traffic passes untouched and uncounted. Addresses are kept as the raw network-order
/// bytes of the packet, read as native `u32` words (so both sides compare and mask words without
/// byte swapping; userspace builds them with `u32::from_ne_bytes` of the octets).
pub mod prefilter {
    /// The XDP program.
    pub const PROG: &str = "prefilter";
    /// `Array` of one [`Config`].
    pub const CONFIG: &str = "XDP_CONFIG";
    /// LPM trie of IPv4 source CIDRs (key: prefix length + 4 address bytes) → `ACTION_*`.
    pub const CIDR_V4: &str = "XDP_CIDR_V4";
    /// LPM trie of IPv6 source CIDRs (key: prefix length + 16 address bytes) → `ACTION_*`.
    pub const CIDR_V6: &str = "XDP_CIDR_V6";
    /// LRU per-CPU hash of [`SourceKey`] → [`Bucket`]: the SYN token buckets.
    pub const SYN_BUCKETS: &str = "XDP_SYN_BUCKETS";
    /// Per-CPU array of counters, indexed by the `STAT_*` constants.
    pub const STATS: &str = "XDP_STATS";

    /// Capacity of each CIDR trie (allocated per entry: the kernel requires
    /// `BPF_F_NO_PREALLOC`, so an unused capacity costs nothing).
    pub const MAX_CIDRS: u32 = 1 << 16;
    /// Default capacity of `SYN_BUCKETS` (userspace may resize it before loading).
    pub const DEFAULT_TRACKED_SOURCES: u32 = 1 << 16;
    /// IPv6 extension headers walked before a packet to the listener address is called
    /// malformed (legitimate TCP carries none or one or two).
    pub const MAX_EXT_HEADERS: u32 = 6;
    /// Token-bucket fixed point: one token (one SYN) is this many units, so a bucket refills
    /// by `elapsed_ns × rate` units without a division.
    pub const UNITS_PER_TOKEN: u64 = 1_000_000_000;
    /// Largest accepted `syn_rate` (SYNs per second per source and CPU).
    pub const MAX_SYN_RATE: u64 = 10_000_000;
    /// Largest accepted `syn_burst`: keeps `burst × UNITS_PER_TOKEN` and every refill far
    /// from overflowing a `u64`.
    pub const MAX_SYN_BURST: u64 = 1_000_000;

    /// Layout version of [`Config`]; the program ignores a configuration of another version
    /// (and then passes everything, counting `STAT_NO_CONFIG`).
    pub const CONFIG_VERSION: u32 = 1;

    /// `Config::flags`: the listener is IPv4 (`addr_v4` is its address).
    pub const FLAG_LISTENER_V4: u32 = 1 << 0;
    /// `Config::flags`: the listener is IPv6 (`addr_v6` is its address).
    pub const FLAG_LISTENER_V6: u32 = 1 << 1;
    /// `Config::flags`: the allow list is not empty, so a source that matches no entry (or
    /// only a shorter deny) is dropped.
    pub const FLAG_DEFAULT_DENY: u32 = 1 << 2;
    /// `Config::flags`: the SYN rate limit is on.
    pub const FLAG_SYN_LIMIT: u32 = 1 << 3;

    /// CIDR trie value: sources in this prefix are allowed (longest prefix wins).
    pub const ACTION_ALLOW: u32 = 1;
    /// CIDR trie value: sources in this prefix are dropped (longest prefix wins).
    pub const ACTION_DENY: u32 = 2;

    /// `SourceKey::family` values.
    pub const FAMILY_V4: u32 = 4;
    pub const FAMILY_V6: u32 = 6;

    /// Packets for the listener that passed every check.
    pub const STAT_PASSED: u32 = 0;
    /// Dropped: the source matched a deny prefix.
    pub const STAT_DENIED: u32 = 1;
    /// Dropped: the allow list is not empty and the source is not in it.
    pub const STAT_NOT_ALLOWED: u32 = 2;
    /// Dropped: a SYN over its source's token bucket.
    pub const STAT_SYN_RATE: u32 = 3;
    /// Dropped: a first IP fragment for the listener (or one too short to show the port).
    pub const STAT_FRAGMENT: u32 = 4;
    /// Dropped: a malformed IP or TCP header (bad lengths, truncated, too many IPv6
    /// extension headers).
    pub const STAT_MALFORMED: u32 = 5;
    /// Dropped: an impossible TCP flag combination.
    pub const STAT_BAD_FLAGS: u32 = 6;
    /// Dropped: TCP urgent data (URG), which sockmap splicing mishandles.
    pub const STAT_URGENT: u32 = 7;
    /// Passed unlimited: a new source's token bucket could not be stored (full LRU map under
    /// memory pressure). The guard fails open.
    pub const STAT_SYN_UNTRACKED: u32 = 8;
    /// Passed unchecked: no valid configuration in `CONFIG` (should never count).
    pub const STAT_NO_CONFIG: u32 = 9;
    /// Number of `STAT_*` slots.
    pub const STAT_COUNT: u32 = 10;

    /// The `reason` label of each `STAT_*` slot, in slot order.
    pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
        "passed",
        "denied",
        "not_allowed",
        "syn_rate_limited",
        "fragment",
        "malformed",
        "bad_flags",
        "urgent",
        "syn_untracked",
        "no_config",
    ];

    /// What the guard enforces; written by userspace into `CONFIG[0]`, read once per packet.
    ///
    /// Addresses and masks are raw network-order bytes read as native words (see the module
    /// docs). A reload rewrites the whole entry; a packet racing the write may see a mix of
    /// old and new fields, which is harmless: every field is valid on its own and the token
    /// arithmetic cannot overflow whatever `syn_rate` and `syn_burst` it reads.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        /// [`CONFIG_VERSION`].
        pub version: u32,
        /// `FLAG_*` bits.
        pub flags: u32,
        /// Listener TCP port, host byte order.
        pub port: u32,
        /// Listener IPv4 address (raw), with `FLAG_LISTENER_V4`.
        pub addr_v4: u32,
        /// Listener IPv6 address (raw), with `FLAG_LISTENER_V6`.
        pub addr_v6: [u32; 4],
        /// Mask applied to an IPv4 source before its SYN bucket lookup (e.g. /32).
        pub syn_mask_v4: u32,
        /// Mask applied to an IPv6 source before its SYN bucket lookup (e.g. /64).
        pub syn_mask_v6: [u32; 4],
        /// Explicit padding (zero) so that the `u64`s below are aligned.
        pub _pad: u32,
        /// SYNs per second a source prefix may open, per CPU (1..=[`MAX_SYN_RATE`]).
        pub syn_rate: u64,
        /// Bucket depth in SYNs (1..=[`MAX_SYN_BURST`]).
        pub syn_burst: u64,
    }

    /// Key of `SYN_BUCKETS`: the source address masked to the configured prefix.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SourceKey {
        /// [`FAMILY_V4`] or [`FAMILY_V6`].
        pub family: u32,
        /// Masked source address (raw); IPv4 uses the first word only.
        pub addr: [u32; 4],
    }

    /// One source's SYN token bucket, on one CPU.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Bucket {
        /// Tokens left, in [`UNITS_PER_TOKEN`] units.
        pub tokens: u64,
        /// `bpf_ktime_get_ns()` of the last refill; 0 on a CPU that never saw the source,
        /// which refills the bucket completely.
        pub last_ns: u64,
    }

    #[cfg(feature = "user")]
    // SAFETY: `repr(C)`, `Copy`, only `u32`/`u64` fields laid out without implicit padding
    // (`_pad` is explicit); every bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    #[cfg(feature = "user")]
    // SAFETY: `repr(C)`, five `u32`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for SourceKey {}
    #[cfg(feature = "user")]
    // SAFETY: `repr(C)`, two `u64`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for Bucket {}

    // The layouts both sides rely on: a change here must change `CONFIG_VERSION`.
    const _: () = assert!(core::mem::size_of::<Config>() == 72);
    const _: () = assert!(core::mem::size_of::<SourceKey>() == 20);
    const _: () = assert!(core::mem::size_of::<Bucket>() == 16);
}

/// The packet splice (docs/design.md#packet-splice): after the handoff, a tc ingress program
/// rewrites every packet of the client leg into the backend leg and back (addresses, ports,
/// sequence and acknowledgment numbers, SACK edges, timestamps, window scale, TTL, checksums)
/// and redirects it out of the other leg's interface, like a router. A tc egress program keeps
/// the ingress's own parked sockets silent. Both run as tcx links.
pub mod packet {
    /// Translation entries, two per flow (one per direction): [`Key`] as received → [`Xlate`].
    pub const FLOWS: &str = "PKT_FLOWS";
    /// Egress guard: the 4-tuple of a parked socket as it would send → packets dropped.
    pub const QUIET: &str = "PKT_QUIET";
    /// Handshakes seen on the attached interfaces: SYN and SYN-ACK, keyed as received, so that
    /// the switch knows each peer's options, initial sequence number and timestamp clock.
    pub const SYNS: &str = "PKT_SYNS";
    /// Ring buffer of [`Key`]s: the first FIN or RST of a direction, so userspace learns of a
    /// flow's end without polling.
    pub const EVENTS: &str = "PKT_EVENTS";
    /// Per-CPU array of global counters, indexed by the `STAT_*` constants.
    pub const STATS: &str = "PKT_STATS";
    /// What a restarted daemon needs to adopt a flow, by the flow's client [`Key`] ([`Meta`]).
    /// Only userspace reads and writes it; it is pinned with the others.
    pub const META: &str = "PKT_META";
    /// The maps pinned under the pin directory, so flows outlive the daemon.
    pub const PINNED: [&str; 6] = [FLOWS, QUIET, SYNS, EVENTS, STATS, META];
    /// The tc ingress program (translate and redirect; record handshakes).
    pub const INGRESS_PROG: &str = "packet_ingress";
    /// The tc egress program (guard).
    pub const EGRESS_PROG: &str = "packet_egress";
    /// Socket cookies of backend connects that ask for ECN (docs/design.md#ecn) → 1. Written
    /// by userspace around a connect; not pinned (it matters only while a connect runs).
    pub const ECN_ASK: &str = "PKT_ECN_ASK";
    /// The sock_ops program (cgroup) that makes the connects in `ECN_ASK` ask for ECN.
    pub const ECN_PROG: &str = "packet_ecn";
    /// Capacity of `ECN_ASK` (an LRU: an entry a crash left behind is evicted in time).
    pub const MAX_ECN_ASKS: u32 = 4096;

    /// Capacity of `FLOWS` and `QUIET`: two entries per flow.
    pub const MAX_ENTRIES: u32 = 1 << 17;
    /// Capacity of `SYNS` (an LRU: a SYN flood only evicts observations, and a flow whose
    /// observation is gone uses the sockmap splice).
    pub const MAX_SYNS: u32 = 1 << 16;
    /// Size of `EVENTS` in bytes.
    pub const EVENTS_BYTES: u32 = 1 << 16;
    /// `skb->mark` of a translated packet between the ingress program and the egress program
    /// of the interface it leaves by, which clears it: the guard must not drop it although it
    /// carries a parked socket's 4-tuple. Raw sockets of the daemon that send on behalf of a
    /// parked socket (resets) set it too.
    pub const MARK: u32 = 0x7a69_5053;

    pub const FAMILY_V4: u32 = 4;
    pub const FAMILY_V6: u32 = 6;

    /// [`Xlate::events`]: a FIN was translated in this direction.
    pub const EV_FIN: u32 = 1;
    /// [`Xlate::events`]: a RST was translated in this direction.
    pub const EV_RST: u32 = 2;

    /// [`Xlate::flags`]: translate the timestamp option (both legs negotiated it).
    pub const XF_TS: u8 = 1;

    /// Packets translated and redirected.
    pub const STAT_TRANSLATED: u32 = 0;
    /// Pure ACKs of a flow passed to its local socket (acknowledging what that socket sent
    /// before the switch).
    pub const STAT_LOCAL_ACK: u32 = 1;
    /// Packets of a flow with a TCP option layout the program does not translate (dropped).
    pub const STAT_BAD_OPTIONS: u32 = 2;
    /// Packets of a flow whose TTL or hop limit ran out (dropped, as a router would).
    pub const STAT_TTL: u32 = 3;
    /// Packets from a parked socket dropped by the egress guard.
    pub const STAT_GUARDED: u32 = 4;
    /// SYN / SYN-ACK recorded in `SYNS`.
    pub const STAT_SYN_SEEN: u32 = 5;
    /// Packets of a flow whose headers could not be made linear (passed untranslated).
    pub const STAT_PULL_FAILED: u32 = 6;
    /// Redirects the kernel refused.
    pub const STAT_REDIRECT_FAILED: u32 = 7;
    /// Number of `STAT_*` slots.
    pub const STAT_COUNT: u32 = 8;

    /// A TCP 4-tuple as it appears in a packet: IPv4 addresses in word 0 (rest zero), ports in
    /// network byte order, addresses as raw memory words.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Key {
        pub src: [u32; 4],
        pub dst: [u32; 4],
        pub sport: u16,
        pub dport: u16,
        pub family: u32,
    }

    #[cfg(feature = "user")]
    // SAFETY: `repr(C)`, `Copy`, 40 bytes of integers without padding.
    unsafe impl aya::Pod for Key {}

    /// How to rewrite one direction of a flow, and what the program saw of it.
    ///
    /// Userspace writes the first block at the switch (sequence arithmetic is modulo 2^32);
    /// only the program writes the counters afterwards.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Xlate {
        /// The other leg's 4-tuple, as the packet must leave.
        pub src: [u32; 4],
        pub dst: [u32; 4],
        pub sport: u16,
        pub dport: u16,
        /// Interface to leave by (`bpf_redirect_neigh`).
        pub ifindex: u32,
        /// Added to the sequence number.
        pub seq_delta: u32,
        /// Added to the acknowledgment number and to SACK edges.
        pub ack_delta: u32,
        /// Added to TSval / to a non-zero TSecr.
        pub tsval_delta: u32,
        pub tsecr_delta: u32,
        /// While non-zero: a pure ACK (no payload, SYN, FIN or RST) whose acknowledgment number
        /// (as received) is before this value acknowledges only bytes that the ingress's own
        /// socket sent before the switch, and goes to that socket instead.
        pub local_below: u32,
        /// Window rescale: `win << shl >> shr` (the legs' window scales differ).
        pub win_shl: u8,
        pub win_shr: u8,
        /// `XF_*`.
        pub flags: u8,
        pub _pad: u8,
        /// With `local_below`: the sequence number the local socket expects next (the peer's
        /// SYN + 1: it received nothing since). An ACK passed to it gets this number, which the
        /// peer's own has left behind once it sent to the other leg.
        pub local_seq: u32,
        pub _pad2: u32,
        /// Packets translated.
        pub packets: u64,
        /// Payload bytes translated (retransmissions included).
        pub bytes: u64,
        /// `bpf_ktime_get_ns()` of the last packet translated.
        pub last_ns: u64,
        /// Highest acknowledgment number seen (as received; what the sender has received).
        pub max_ack: u32,
        /// Highest sequence number past the payload seen (as received).
        pub max_end: u32,
        /// `EV_*` seen.
        pub events: u32,
        /// Sequence number just past the FIN (as received), once one was seen.
        pub fin_end: u32,
        /// `bpf_ktime_get_ns()` of the first FIN.
        pub fin_ns: u64,
    }

    #[cfg(feature = "user")]
    // SAFETY: `repr(C)`, `Copy`, integers laid out without padding (checked by a size test).
    unsafe impl aya::Pod for Xlate {}

    /// A SYN or SYN-ACK as received.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Syn {
        pub seq: u32,
        pub ack: u32,
        /// `bpf_ktime_get_ns()` when it arrived.
        pub ns: u64,
        /// Interface it arrived on.
        pub ifindex: u32,
        /// Bytes of `options` that are valid.
        pub options_len: u32,
        /// The raw TCP options.
        pub options: [u8; 40],
    }

    impl Default for Syn {
        fn default() -> Self {
            Self { seq: 0, ack: 0, ns: 0, ifindex: 0, options_len: 0, options: [0; 40] }
        }
    }

    #[cfg(feature = "user")]
    // SAFETY: `repr(C)`, `Copy`, integers and bytes without padding (64 bytes).
    unsafe impl aya::Pod for Syn {}

    /// [`Meta::flags`]: the client's FIN reached its socket before the switch (the backend
    /// socket relayed it; the program never saw it).
    pub const META_CLIENT_FIN: u32 = 1;
    /// [`Meta::flags`]: the flow's end was reported (a later daemon does not report it again).
    pub const META_REPORTED: u32 = 2;
    /// [`Meta::flags`]: the daemon keeps nothing of this flow but its `group`'s count: it was
    /// idle, and the entries and this record are all there is of it until it wakes (its end,
    /// its idle timeout, the drain). A later daemon's adoption clears it.
    pub const META_DORMANT: u32 = 4;
    /// Longest server name kept in [`Meta`].
    pub const META_SNI: usize = 256;

    /// One flow as its switch set it up: what the entries alone do not say.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Meta {
        /// The client's and the backend's initial sequence numbers (byte counts are relative).
        pub client_isn: u32,
        pub backend_isn: u32,
        /// Bytes the backend socket relayed at the switch.
        pub relayed: u32,
        /// `META_*`.
        pub flags: u32,
        /// Unix time of the accept, milliseconds.
        pub started_unix_ms: u64,
        /// The key of the backend's packets (the flow's other entry).
        pub backend_key: Key,
        /// Bytes of `sni` that are valid.
        pub sni_len: u32,
        /// With `META_DORMANT`: the daemon's group of dormant flows (route and cluster) it
        /// counts in.
        pub group: u32,
        /// The server name the flow was routed by.
        pub sni: [u8; META_SNI],
        /// The daemon's id of the flow (`/connections`, the access log), with `META_DORMANT`.
        pub flow: u64,
    }

    impl Default for Meta {
        fn default() -> Self {
            Self {
                client_isn: 0,
                backend_isn: 0,
                relayed: 0,
                flags: 0,
                started_unix_ms: 0,
                backend_key: Key::default(),
                sni_len: 0,
                group: 0,
                sni: [0; META_SNI],
                flow: 0,
            }
        }
    }

    #[cfg(feature = "user")]
    // SAFETY: `repr(C)`, `Copy`, integers and bytes laid out without padding (checked below).
    unsafe impl aya::Pod for Meta {}

    const _: () = assert!(core::mem::size_of::<Meta>() == 24 + 40 + 8 + META_SNI + 8);
    const _: () = assert!(core::mem::size_of::<Key>() == 40);
    const _: () = assert!(core::mem::size_of::<Xlate>() == 120);
    const _: () = assert!(core::mem::size_of::<Syn>() == 64);
}
