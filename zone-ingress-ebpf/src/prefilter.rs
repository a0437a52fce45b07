//! XDP guard in front of the listener (docs/design.md#xdp-guard): judges every packet *for the
//! listener* (TCP to its address and port) before the stack allocates anything for it, and lets
//! everything else through untouched and uncounted.
//!
//! For a packet to the listener, in order (the first failing check decides and is counted):
//! 1. `malformed`: IP version/IHL/length fields that contradict each other or the frame, a TCP
//!    data offset below 5 or past the segment, an IPv6 extension-header chain longer than
//!    [`MAX_EXT_HEADERS`] or running off the frame;
//! 2. `fragment`: a *first* IP fragment (or IPv6 atomic fragment) for the listener port, or one
//!    too short to show the port at all (RFC 1858's tiny fragment). Later fragments carry no
//!    port and pass: they cannot be reassembled without their first fragment, and since Linux
//!    4.19 the stack discards overlapping fragments (CVE-2018-5391), so a later fragment cannot
//!    rewrite a header either;
//! 3. `denied` / `not_allowed`: the source's longest matching prefix in the CIDR trie of its
//!    family says deny, or nothing matches while the allow list is not empty;
//! 4. `bad_flags`: flag combinations no valid segment carries (SYN+FIN, SYN+RST, FIN+RST, and
//!    none of SYN/ACK/RST: RFC 9293 §3.10.7 has every later segment carry ACK);
//! 5. `urgent`: URG set. Sockmap does not carry urgent data (the out-of-band byte is lost or
//!    lands in the stream), see docs/design.md#kernel-behaviour-the-code-relies-on;
//! 6. `syn_rate_limited`: a SYN (without ACK) over its source prefix's token bucket.
//!
//! The token buckets live in an LRU per-CPU hash, so the rate is per CPU and memory stays bounded
//! under spoofed floods: evicting a bucket only refills it, so a full map degrades to allowing.
//!
//! Loaded with `BPF_F_XDP_HAS_FRAGS` (section `xdp.frags`, Linux ≥ 5.18) so that it can sit on
//! jumbo-MTU and multi-buffer drivers (and on veth without shrinking the peer's MTU); it only
//! reads headers, which are always in the first buffer.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::{bpf_ktime_get_ns, bpf_xdp_get_buff_len},
    macros::{map, xdp},
    maps::{Array, LpmTrie, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use zone_ingress_ebpf::prefilter::{
    ACTION_ALLOW, ACTION_DENY, Bucket, CONFIG_VERSION, Config, DEFAULT_TRACKED_SOURCES, FAMILY_V4, FAMILY_V6,
    FLAG_DEFAULT_DENY, FLAG_LISTENER_V4, FLAG_LISTENER_V6, FLAG_SYN_LIMIT, MAX_CIDRS, MAX_EXT_HEADERS, MAX_SYN_BURST,
    MAX_SYN_RATE, STAT_BAD_FLAGS, STAT_COUNT, STAT_DENIED, STAT_FRAGMENT, STAT_MALFORMED, STAT_NO_CONFIG,
    STAT_NOT_ALLOWED, STAT_PASSED, STAT_SYN_RATE, STAT_SYN_UNTRACKED, STAT_URGENT, SourceKey, UNITS_PER_TOKEN,
};

use crate::{
    headers::{EthHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr},
    rare,
};

#[map(name = "XDP_CONFIG")]
static XDP_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Keys are a prefix length and the raw address words; values `ACTION_*`.
#[map(name = "XDP_CIDR_V4")]
static XDP_CIDR_V4: LpmTrie<u32, u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

#[map(name = "XDP_CIDR_V6")]
static XDP_CIDR_V6: LpmTrie<[u32; 4], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

#[map(name = "XDP_SYN_BUCKETS")]
static XDP_SYN_BUCKETS: LruPerCpuHashMap<SourceKey, Bucket> =
    LruPerCpuHashMap::with_max_entries(DEFAULT_TRACKED_SOURCES, 0);

#[map(name = "XDP_STATS")]
static XDP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

// Ethertypes and protocol numbers (include/uapi/linux/if_ether.h, in.h, in6.h).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
// IPv4 `frag_off` bits (host order): more fragments, and the 13-bit offset.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
// IPv6 fragment header offset field (host order; the low 3 bits are flags).
const IP6_OFFSET: u16 = 0xfff8;
// TCP flags (byte 13 of the header).
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

const ETH_HLEN: usize = 14;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;

#[repr(C)]
struct VlanHdr {
    tci: u16,
    proto: u16,
}

/// The two bytes every IPv6 extension header starts with (RFC 8200 §4).
#[repr(C)]
struct ExtHdr {
    next_header: u8,
    len: u8,
}

#[repr(C)]
struct FragHdr {
    next_header: u8,
    reserved: u8,
    frag_off: u16,
    ident: u32,
}

/// The headers ended before the packet could be recognised as one for the listener: not ours
/// to judge (the stack drops runts by itself).
struct NotParsed;

/// What to do with a parsed packet.
enum Verdict {
    /// Not for the listener: pass, uncounted.
    Ignore,
    /// For the listener, and fine: pass, counted as `passed`.
    Pass,
    /// For the listener, and dropped for the given `STAT_*` reason.
    Drop(u32),
}

/// The packet's source, for the CIDR tries and the SYN buckets.
#[derive(Clone, Copy)]
enum Source {
    V4(u32),
    V6([u32; 4]),
}

#[xdp(frags)]
pub(crate) fn prefilter(ctx: XdpContext) -> u32 {
    match try_prefilter(&ctx) {
        Ok(Verdict::Ignore) | Err(NotParsed) => XDP_PASS,
        Ok(Verdict::Pass) => {
            count(STAT_PASSED);
            XDP_PASS
        }
        Ok(Verdict::Drop(reason)) => {
            count(reason);
            XDP_DROP
        }
    }
}

/// The one bounds-checked access to packet memory: a pointer to a `T` at `offset` from the
/// start of the frame, if the whole `T` lies inside the first buffer. Every header read goes
/// through here, so the verifier sees one comparison against `data_end` per access.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(v) = XDP_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; XDP runs do not nest on one CPU.
        unsafe { *v += 1 };
    }
}

/// Whole length of the frame, across fragments of a multi-buffer packet.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: the helper only reads the program's own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

#[inline(always)]
fn try_prefilter(ctx: &XdpContext) -> Result<Verdict, NotParsed> {
    let Some(cfg) = XDP_CONFIG.get(0) else {
        count(STAT_NO_CONFIG);
        return Ok(Verdict::Ignore);
    };
    if cfg.version != CONFIG_VERSION {
        count(STAT_NO_CONFIG);
        return Ok(Verdict::Ignore);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(NotParsed)?;
    // SAFETY: `ptr_at` checked that the header lies inside the packet.
    let mut proto = u16::from_be(unsafe { (*eth).proto });
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner), in case the guard sits on a trunk.
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, l3).ok_or(NotParsed)?;
        // SAFETY: bounds checked by `ptr_at`.
        proto = u16::from_be(unsafe { (*vlan).proto });
        l3 += size_of::<VlanHdr>();
    }
    match proto {
        ETH_P_IP if cfg.flags & FLAG_LISTENER_V4 != 0 => ipv4(ctx, cfg, l3),
        ETH_P_IPV6 if cfg.flags & FLAG_LISTENER_V6 != 0 => ipv6(ctx, cfg, l3),
        _ => Ok(Verdict::Ignore),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, cfg: &Config, l3: usize) -> Result<Verdict, NotParsed> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(NotParsed)?;
    // SAFETY (all reads of `*ip`): the fixed 20-byte header is inside the packet.
    let (version_ihl, daddr, protocol) = unsafe { ((*ip).version_ihl, (*ip).daddr, (*ip).protocol) };
    if daddr != cfg.addr_v4 || protocol != IPPROTO_TCP {
        return Ok(Verdict::Ignore);
    }
    // TCP to the listener's address: from here on a header that cannot be read is malformed,
    // as long as it may be for the listener port.
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Ok(Verdict::Drop(STAT_MALFORMED));
    }
    let (tot_len, frag_off, saddr) =
        unsafe { (usize::from(u16::from_be((*ip).tot_len)), u16::from_be((*ip).frag_off), (*ip).saddr) };
    let l4 = l3 + ihl;
    if frag_off & (IP_MF | IP_OFFSET) != 0 {
        return Ok(fragment(ctx, cfg, frag_off & IP_OFFSET == 0, l4, tot_len >= ihl + 4));
    }
    if !for_listener_port(ctx, cfg, l4) {
        return Ok(Verdict::Ignore);
    }
    let frame = frame_len(ctx);
    // 0: a GRO super-packet above 64 KiB (BIG TCP) seen in generic mode; its length is the
    // frame's. On the wire the stack rejects it anyway.
    let l4_len = if tot_len == 0 {
        frame.saturating_sub(l4)
    } else {
        if tot_len < ihl || l3 + tot_len > frame {
            return Ok(Verdict::Drop(STAT_MALFORMED));
        }
        tot_len - ihl
    };
    Ok(tcp(ctx, cfg, l4, l4_len, Source::V4(saddr)))
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, cfg: &Config, l3: usize) -> Result<Verdict, NotParsed> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(NotParsed)?;
    // SAFETY (all reads of `*ip`): the fixed 40-byte header is inside the packet.
    let daddr = unsafe { (*ip).daddr };
    let want = cfg.addr_v6;
    // Word by word: an array `==` could become a `bcmp` call, which BPF cannot make.
    if daddr[0] != want[0] || daddr[1] != want[1] || daddr[2] != want[2] || daddr[3] != want[3] {
        return Ok(Verdict::Ignore);
    }
    let (version, payload_len, mut next, saddr) = unsafe {
        (
            u32::from_be((*ip).version_class_flow) >> 28,
            usize::from(u16::from_be((*ip).payload_len)),
            (*ip).next_header,
            (*ip).saddr,
        )
    };
    // Walk the extension headers to TCP. Anything else (UDP, ICMPv6, ESP, no next header) is not
    // for the listener.
    let mut l4 = l3 + IPV6_HLEN;
    let mut fragment_header: Option<bool> = None;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            IPPROTO_FRAGMENT => {
                let Some(h) = ptr_at::<FragHdr>(ctx, l4) else {
                    return Ok(Verdict::Drop(STAT_MALFORMED));
                };
                // SAFETY: bounds checked by `ptr_at`.
                let (nh, off) = unsafe { ((*h).next_header, u16::from_be((*h).frag_off)) };
                fragment_header = Some(off & IP6_OFFSET == 0);
                next = nh;
                l4 += size_of::<FragHdr>();
            }
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let Some(h) = ptr_at::<ExtHdr>(ctx, l4) else {
                    return Ok(Verdict::Drop(STAT_MALFORMED));
                };
                // SAFETY: bounds checked by `ptr_at`.
                let (nh, len) = unsafe { ((*h).next_header, usize::from((*h).len)) };
                // RFC 8200 §4.3-4.6: 8-octet units beyond the first 8; AH (RFC 4302 §2.2):
                // 4-octet units minus 2.
                l4 += if next == IPPROTO_AH { (len + 2) * 4 } else { (len + 1) * 8 };
                next = nh;
            }
            _ => return Ok(Verdict::Ignore),
        }
    }
    if next != IPPROTO_TCP {
        // More extension headers than any TCP segment carries: it may be for the listener
        // and the port lies beyond what the guard reads, so it cannot bypass the lists.
        return Ok(Verdict::Drop(STAT_MALFORMED));
    }
    if version != 6 {
        return Ok(Verdict::Drop(STAT_MALFORMED));
    }
    if let Some(first) = fragment_header {
        let end = l3 + IPV6_HLEN + payload_len;
        return Ok(fragment(ctx, cfg, first, l4, end >= l4 + 4));
    }
    if !for_listener_port(ctx, cfg, l4) {
        return Ok(Verdict::Ignore);
    }
    let frame = frame_len(ctx);
    // 0: a jumbogram or a BIG TCP GRO packet (generic mode); its length is the frame's.
    let l4_len = if payload_len == 0 {
        frame.saturating_sub(l4)
    } else {
        let end = l3 + IPV6_HLEN + payload_len;
        if end > frame || end < l4 {
            return Ok(Verdict::Drop(STAT_MALFORMED));
        }
        end - l4
    };
    Ok(tcp(ctx, cfg, l4, l4_len, Source::V6(saddr)))
}

/// A fragment of a TCP datagram to the listener address. `first`: offset 0 (it holds the TCP
/// header); `port_inside`: the datagram's length says the fragment covers the ports.
#[inline(always)]
fn fragment(ctx: &XdpContext, cfg: &Config, first: bool, l4: usize, port_inside: bool) -> Verdict {
    if !first {
        // No port to look at; see the module docs for why passing it is safe.
        return Verdict::Ignore;
    }
    match ptr_at::<[u16; 2]>(ctx, l4) {
        // SAFETY: bounds checked by `ptr_at`.
        Some(ports) if port_inside => {
            if u32::from(u16::from_be(unsafe { (*ports)[1] })) == cfg.port {
                Verdict::Drop(STAT_FRAGMENT)
            } else {
                Verdict::Ignore
            }
        }
        // Too short to show the port: RFC 1858's tiny fragment, never sent by a sane stack.
        _ => Verdict::Drop(STAT_FRAGMENT),
    }
}

/// Whether the TCP header at `l4` is for the listener port. A segment too short to show the
/// port counts as one (it is dropped as malformed by [`tcp`]).
#[inline(always)]
fn for_listener_port(ctx: &XdpContext, cfg: &Config, l4: usize) -> bool {
    match ptr_at::<[u16; 2]>(ctx, l4) {
        // SAFETY: bounds checked by `ptr_at`.
        Some(ports) => u32::from(u16::from_be(unsafe { (*ports)[1] })) == cfg.port,
        None => true,
    }
}

/// The checks on a TCP segment for the listener (`l4_len`: the segment's length per the IP
/// header).
#[inline(always)]
fn tcp(ctx: &XdpContext, cfg: &Config, l4: usize, l4_len: usize, src: Source) -> Verdict {
    let Some(th) = ptr_at::<TcpHdr>(ctx, l4) else {
        return Verdict::Drop(STAT_MALFORMED);
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (data_offset, flags) = unsafe { ((*th).data_offset, (*th).flags) };
    let doff = usize::from(data_offset >> 4) * 4;
    if doff < TCP_HLEN || doff > l4_len {
        return Verdict::Drop(STAT_MALFORMED);
    }
    match source_action(src) {
        Some(ACTION_DENY) => return Verdict::Drop(STAT_DENIED),
        Some(ACTION_ALLOW) => {}
        _ if cfg.flags & FLAG_DEFAULT_DENY != 0 => return Verdict::Drop(STAT_NOT_ALLOWED),
        _ => {}
    }
    let syn = flags & TCP_SYN != 0;
    let fin = flags & TCP_FIN != 0;
    let rst = flags & TCP_RST != 0;
    if (syn && (fin || rst)) || (fin && rst) || flags & (TCP_SYN | TCP_ACK | TCP_RST) == 0 {
        return Verdict::Drop(STAT_BAD_FLAGS);
    }
    if flags & TCP_URG != 0 {
        return Verdict::Drop(STAT_URGENT);
    }
    if syn && flags & TCP_ACK == 0 && cfg.flags & FLAG_SYN_LIMIT != 0 && !take_syn_token(ctx, cfg, src) {
        return Verdict::Drop(STAT_SYN_RATE);
    }
    Verdict::Pass
}

/// The action of the source's longest matching prefix, if any.
#[inline(always)]
fn source_action(src: Source) -> Option<u32> {
    match src {
        Source::V4(addr) => XDP_CIDR_V4.get(Key::new(32, addr)).copied(),
        Source::V6(addr) => XDP_CIDR_V6.get(Key::new(128, addr)).copied(),
    }
}

/// Takes one token from the source prefix's bucket on this CPU; `false` when it is empty.
///
/// Tokens are fixed point ([`UNITS_PER_TOKEN`] units each): `elapsed_ns × rate` units accrue
/// since the last SYN, capped at `burst` tokens. Once `elapsed` reaches the time a full refill
/// takes the bucket is simply full, so the product stays below `burst × UNITS_PER_TOKEN`
/// (≤ 10^15) and never overflows, whatever values a concurrent reload leaves in `cfg`.
#[inline(always)]
fn take_syn_token(ctx: &XdpContext, cfg: &Config, src: Source) -> bool {
    let rate = cfg.syn_rate.min(MAX_SYN_RATE);
    let burst = cfg.syn_burst.min(MAX_SYN_BURST);
    if rate == 0 || burst == 0 {
        return true;
    }
    let cap = burst * UNITS_PER_TOKEN;
    let key = match src {
        Source::V4(a) => SourceKey { family: FAMILY_V4, addr: [a & cfg.syn_mask_v4, 0, 0, 0] },
        Source::V6(a) => SourceKey {
            family: FAMILY_V6,
            addr: [
                a[0] & cfg.syn_mask_v6[0],
                a[1] & cfg.syn_mask_v6[1],
                a[2] & cfg.syn_mask_v6[2],
                a[3] & cfg.syn_mask_v6[3],
            ],
        },
    };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(bucket) = XDP_SYN_BUCKETS.get_ptr_mut(key) else {
        // A new source starts with a full bucket minus this SYN. If it cannot be stored (the
        // LRU map could not evict under memory pressure) the SYN passes: the guard fails open
        // rather than blocking legitimate clients.
        let fresh = Bucket { tokens: cap - UNITS_PER_TOKEN, last_ns: now };
        if XDP_SYN_BUCKETS.insert(key, fresh, 0).is_err() {
            count(STAT_SYN_UNTRACKED);
            log_syn_untracked(ctx);
        }
        return true;
    };
    // SAFETY: this CPU's value of the entry; XDP runs do not nest on one CPU, and an eviction
    // by another CPU leaves the memory valid until this program returns (RCU).
    unsafe {
        let elapsed = now.saturating_sub((*bucket).last_ns);
        let tokens = if elapsed >= cap / rate { cap } else { ((*bucket).tokens + elapsed * rate).min(cap) };
        (*bucket).last_ns = now;
        if tokens >= UNITS_PER_TOKEN {
            (*bucket).tokens = tokens - UNITS_PER_TOKEN;
            true
        } else {
            (*bucket).tokens = tokens;
            false
        }
    }
}

/// A BPF subprogram of its own, so the log record's ring pointer never shares a stack slot with
/// the program's values (the verifier's rule for a loader without CAP_PERFMON).
#[inline(never)]
fn log_syn_untracked(ctx: &XdpContext) {
    if rare::due(rare::SYN_UNTRACKED) {
        warn!(ctx, "xdp guard: the SYN rate table could not store a new source; its SYN passes unlimited");
    }
}
