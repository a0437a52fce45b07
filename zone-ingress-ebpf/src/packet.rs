//! The packet splice's tc programs (docs/design.md#packet-splice).
//!
//! `packet_ingress` runs on every packet that enters an attached interface:
//! - a SYN or SYN-ACK is recorded in `PKT_SYNS` (sequence numbers, options, interface, time), so
//!   the switch knows both peers of both legs;
//! - a packet of a spliced flow (`PKT_FLOWS` has its 4-tuple) is rewritten into the other leg
//!   (addresses, ports, sequence and acknowledgment numbers, SACK edges, timestamps, window
//!   scale, TTL / hop limit, checksums) and redirected out of that leg's interface with
//!   `bpf_redirect_neigh`, as a router forwards it. The one exception: a pure ACK that only
//!   acknowledges bytes the ingress's own socket sent before the switch (`Xlate::local_below`)
//!   goes to that socket, which still owns their retransmission;
//! - everything else passes untouched.
//!
//! `packet_ecn`, a sock_ops program on the daemon's cgroup, makes a backend connect ask for
//! ECN when userspace listed its socket in `PKT_ECN_ASK`: the client leg has ECN, and the
//! legs must agree for the flow to be forwarded at packet level (docs/design.md#ecn).
//!
//! `packet_egress` drops what the ingress's parked sockets would send (`PKT_QUIET`): after the
//! switch only translated packets speak for a flow. Translated packets carry `MARK` from the
//! ingress program to the egress program of the interface they leave by, which clears it.
//!
//! Option layouts translated (the ones Linux, BSDs, macOS and Windows emit on established
//! segments): none; `NOP NOP TS`; `NOP NOP TS NOP NOP SACK`; `NOP NOP SACK`. Anything else on a
//! spliced flow is dropped and counted (`STAT_BAD_OPTIONS`): a generic option walk does not pass
//! the verifier in reasonable time, and an untranslated timestamp or SACK edge would corrupt the
//! other leg's state. Every TCP field rewritten sits at an even offset, so one ones'-complement
//! difference covers all of them.

use core::{mem::size_of, ptr};

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, BPF_SOCK_OPS_NEEDS_ECN, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_redirect_neigh,
        bpf_skb_pull_data,
    },
    macros::{classifier, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockOpsContext, TcContext},
};
use aya_log_ebpf::warn;
use zone_ingress_ebpf::packet::{
    EV_FIN, EV_RST, EVENTS_BYTES, FAMILY_V4, FAMILY_V6, Key, MARK, MAX_ECN_ASKS, MAX_ENTRIES, MAX_SYNS, Meta,
    STAT_BAD_OPTIONS, STAT_COUNT, STAT_GUARDED, STAT_LOCAL_ACK, STAT_PULL_FAILED, STAT_REDIRECT_FAILED, STAT_SYN_SEEN,
    STAT_TRANSLATED, STAT_TTL, Syn, XF_TS, Xlate,
};

use crate::{
    headers::{EthHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr},
    rare,
};

#[map(name = "PKT_FLOWS")]
static PKT_FLOWS: HashMap<Key, Xlate> = HashMap::with_max_entries(MAX_ENTRIES, 0);

#[map(name = "PKT_QUIET")]
static PKT_QUIET: HashMap<Key, u64> = HashMap::with_max_entries(MAX_ENTRIES, 0);

#[map(name = "PKT_SYNS")]
static PKT_SYNS: LruHashMap<Key, Syn> = LruHashMap::with_max_entries(MAX_SYNS, 0);

#[map(name = "PKT_EVENTS")]
static PKT_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "PKT_STATS")]
static PKT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Written and read by userspace only; allocated per entry (`BPF_F_NO_PREALLOC`).
#[map(name = "PKT_META")]
static PKT_META: HashMap<Key, Meta> = HashMap::with_max_entries(MAX_ENTRIES / 2, BPF_F_NO_PREALLOC);

#[map(name = "PKT_ECN_ASK")]
static PKT_ECN_ASK: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_ECN_ASKS, 0);

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Offset of the checksum in the TCP header.
const TCP_CHECK: usize = 16;
/// Offset of the checksum in the IPv4 header.
const IP_CHECK: usize = 10;
/// No option at this offset.
const NONE: usize = 0xff;

#[inline(always)]
fn count(slot: u32) {
    if let Some(v) = PKT_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; tc runs do not nest on one CPU.
        unsafe { *v += 1 };
    }
}

/// A bounds-checked pointer to a `T` at `offset` into the linear part of the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Ones'-complement accumulator of 32-bit word changes, in raw memory order.
#[inline(always)]
fn csum_add(sum: u64, old: u32, new: u32) -> u64 {
    sum + u64::from(!old) + u64::from(new)
}

#[inline(always)]
fn csum_fold(mut sum: u64) -> u32 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// Where the headers of a TCP packet are.
struct Headers {
    family: u32,
    /// Offset of the TCP header.
    l4: usize,
    /// TCP header length (data offset × 4).
    doff: usize,
    key: Key,
}

#[inline(always)]
fn headers(ctx: &TcContext) -> Option<Headers> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by `ptr_at`.
    let proto = u16::from_be(unsafe { (*eth).proto });
    let mut key = Key::default();
    let (family, l4) = if proto == ETH_P_IP {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (vihl, protocol, frag, s, d) =
            unsafe { ((*ip).version_ihl, (*ip).protocol, u16::from_be((*ip).frag_off), (*ip).saddr, (*ip).daddr) };
        // Options in the IP header or fragments: not a packet this program rewrites.
        if vihl != 0x45 || protocol != IPPROTO_TCP || frag & 0x3fff != 0 {
            return None;
        }
        key.src[0] = s;
        key.dst[0] = d;
        (FAMILY_V4, ETH_LEN + size_of::<Ipv4Hdr>())
    } else if proto == ETH_P_IPV6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            // Extension headers: not a packet this program rewrites.
            if (*ip).next_header != IPPROTO_TCP {
                return None;
            }
            key.src = (*ip).saddr;
            key.dst = (*ip).daddr;
        }
        (FAMILY_V6, ETH_LEN + size_of::<Ipv6Hdr>())
    } else {
        return None;
    };
    let th: *mut TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (sport, dport, off) = unsafe { ((*th).source, (*th).dest, (*th).data_offset) };
    let doff = usize::from(off >> 4) * 4;
    if doff < size_of::<TcpHdr>() {
        return None;
    }
    key.sport = sport;
    key.dport = dport;
    key.family = family;
    Some(Headers { family, l4, doff, key })
}

#[classifier]
pub(crate) fn packet_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> i32 {
    let Some(h) = headers(ctx) else {
        return TC_ACT_OK;
    };
    let Some(th) = ptr_at::<TcpHdr>(ctx, h.l4) else {
        return TC_ACT_OK;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (flags, seq, ack) = unsafe { ((*th).flags, u32::from_be((*th).seq), u32::from_be((*th).ack_seq)) };
    if flags & TCP_SYN != 0 {
        observe(ctx, &h, seq, ack);
        if flags & TCP_ACK == 0 {
            // A client reuses this 4-tuple for a new connection: the flow that had it is over on
            // the client's side, and the new connection's packets must reach the listener.
            let _ = PKT_FLOWS.remove(h.key);
        }
        return TC_ACT_OK;
    }
    let Some(x) = PKT_FLOWS.get_ptr_mut(h.key) else {
        return TC_ACT_OK;
    };
    // SAFETY: a map value pointer, valid for this run.
    let x = unsafe { &mut *x };
    let hdr_end = h.l4 + h.doff;
    if ctx.data() + hdr_end > ctx.data_end() {
        // SAFETY: the helper only touches this program's packet.
        if unsafe { bpf_skb_pull_data(ctx.skb.skb, hdr_end as u32) } != 0 {
            count(STAT_PULL_FAILED);
            log_pull_failed(ctx, u16::from_be(h.key.sport), u16::from_be(h.key.dport));
            // Not to the stack: no socket has the flow's 4-tuple (or, during the switch, one that
            // must not see the peer's bytes). Its sender retransmits it.
            return TC_ACT_SHOT;
        }
    }
    translate(ctx, &h, x, flags, seq, ack)
}

/// Records a SYN or SYN-ACK: its sequence numbers, its raw options, where and when it arrived.
#[inline(always)]
fn observe(ctx: &TcContext, h: &Headers, seq: u32, ack: u32) {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: helpers and fields of this program's own context.
    let (ns, ifindex) = unsafe { (bpf_ktime_get_ns(), (*skb).ingress_ifindex) };
    let mut syn = Syn { seq, ack, ns, ifindex, ..Syn::default() };
    // Byte by byte from the linear header (a length the verifier can bound: the helper that
    // copies a variable length would need one it cannot prove here).
    let len = h.doff - size_of::<TcpHdr>();
    let base = h.l4 + size_of::<TcpHdr>();
    let mut copied = 0u32;
    for i in 0..40 {
        if i >= len {
            break;
        }
        let Some(b) = ptr_at::<u8>(ctx, base + i) else { break };
        // SAFETY: bounds checked by `ptr_at`.
        syn.options[i] = unsafe { *b };
        copied += 1;
    }
    syn.options_len = copied;
    let _ = PKT_SYNS.insert(h.key, syn, 0);
    count(STAT_SYN_SEEN);
}

/// Offsets (from the TCP header) of the timestamp option's TSval and of the first SACK edge,
/// and the number of SACK edges; `Err` for a layout this program does not translate.
#[inline(always)]
fn options(ctx: &TcContext, l4: usize, doff: usize) -> Result<(usize, usize, usize), ()> {
    let olen = doff - size_of::<TcpHdr>();
    if olen == 0 {
        return Ok((NONE, NONE, 0));
    }
    let base = l4 + size_of::<TcpHdr>();
    let Some(o) = ptr_at::<[u8; 4]>(ctx, base) else {
        return Err(());
    };
    // SAFETY: bounds checked by `ptr_at`.
    let o = unsafe { *o };
    if o[0] == 1 && o[1] == 1 && o[2] == 8 && o[3] == 10 {
        // NOP NOP TS [NOP NOP SACK]
        if olen == 12 {
            return Ok((size_of::<TcpHdr>() + 4, NONE, 0));
        }
        let Some(s) = ptr_at::<[u8; 4]>(ctx, base + 12) else {
            return Err(());
        };
        // SAFETY: bounds checked by `ptr_at`.
        let s = unsafe { *s };
        let len = usize::from(s[3]);
        if s[0] == 1 && s[1] == 1 && s[2] == 5 && (10..=26).contains(&len) && (len - 2) % 8 == 0 && 14 + len <= olen {
            return Ok((size_of::<TcpHdr>() + 4, size_of::<TcpHdr>() + 16, (len - 2) / 4));
        }
        return Err(());
    }
    if o[0] == 1 && o[1] == 1 && o[2] == 5 {
        // NOP NOP SACK
        let len = usize::from(o[3]);
        if (10..=34).contains(&len) && (len - 2) % 8 == 0 && 2 + len <= olen {
            return Ok((NONE, size_of::<TcpHdr>() + 4, (len - 2) / 4));
        }
        return Err(());
    }
    Err(())
}

#[inline(always)]
fn load32(p: *const u8) -> u32 {
    // SAFETY: callers checked that 4 bytes at `p` are inside the packet.
    unsafe { ptr::read_unaligned(p.cast::<u32>()) }
}

#[inline(always)]
fn store32(p: *mut u8, v: u32) {
    // SAFETY: callers checked that 4 bytes at `p` are inside the packet.
    unsafe { ptr::write_unaligned(p.cast::<u32>(), v) }
}

/// A first FIN or RST of this direction goes to userspace.
#[inline(always)]
fn event(ctx: &TcContext, x: &mut Xlate, key: &Key, ev: u32) {
    if x.events & ev == 0 {
        x.events |= ev;
        if PKT_EVENTS.output::<Key>(key, 0).is_err() {
            log_event_lost(ctx, u16::from_be(key.sport), u16::from_be(key.dport));
        }
    }
}

#[inline(always)]
#[expect(clippy::too_many_lines, reason = "one pass over the headers, in wire order")]
fn translate(ctx: &TcContext, h: &Headers, x: &mut Xlate, flags: u8, seq: u32, ack: u32) -> i32 {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // Pointers again: a pull above moved the packet.
    let Some(th) = ptr_at::<TcpHdr>(ctx, h.l4) else {
        return TC_ACT_OK;
    };
    let Ok((ts, sack, edges)) = options(ctx, h.l4, h.doff) else {
        count(STAT_BAD_OPTIONS);
        let first = ptr_at::<[u8; 4]>(ctx, h.l4 + size_of::<TcpHdr>())
            // SAFETY: bounds checked by `ptr_at`.
            .map_or(0, |p| u32::from_be_bytes(unsafe { *p }));
        let ports = (u32::from(u16::from_be(h.key.sport)) << 16) | u32::from(u16::from_be(h.key.dport));
        log_bad_options(ctx, ports, (h.doff - size_of::<TcpHdr>()) as u32, first);
        return TC_ACT_SHOT;
    };
    let payload = (ctx.len() as usize).saturating_sub(h.l4 + h.doff) as u32;
    let fin = flags & TCP_FIN != 0;
    let rst = flags & TCP_RST != 0;
    let has_ack = flags & TCP_ACK != 0;

    if has_ack && (ack.wrapping_sub(x.max_ack) as i32) > 0 {
        x.max_ack = ack;
    }
    // Everything the local socket sent is acknowledged: from now on every ACK is the peer's.
    // Userspace learns it from the event ring (the switch has settled: the socket can go).
    if has_ack && x.local_below != 0 && (ack.wrapping_sub(x.local_below) as i32) >= 0 {
        x.local_below = 0;
        if PKT_EVENTS.output::<Key>(&h.key, 0).is_err() {
            log_event_lost(ctx, u16::from_be(h.key.sport), u16::from_be(h.key.dport));
        }
    }
    let end = seq.wrapping_add(payload).wrapping_add(u32::from(fin));
    if (end.wrapping_sub(x.max_end) as i32) > 0 {
        x.max_end = end;
    }
    if fin {
        x.fin_end = end;
        if x.events & EV_FIN == 0 {
            // SAFETY: a helper without arguments.
            x.fin_ns = unsafe { bpf_ktime_get_ns() };
        }
        event(ctx, x, &h.key, EV_FIN);
    }
    if rst {
        event(ctx, x, &h.key, EV_RST);
    }
    if payload == 0 && !fin && !rst && has_ack && x.local_below != 0 && (ack.wrapping_sub(x.local_below) as i32) < 0 {
        // The local socket received nothing from this peer since its SYN, while the peer's
        // sequence number moves on with what it sends to the other leg: once that passes the
        // socket's receive window, TCP would drop the ACK unprocessed (and the socket would
        // retransmit the relayed bytes forever). The ACK gets the number the socket expects.
        if seq != x.local_seq {
            let new = x.local_seq.to_be();
            // SAFETY: `th` was bounds-checked above and no helper has run since.
            let old = unsafe { (*th).seq };
            // SAFETY: as above.
            unsafe { (*th).seq = new };
            let sum = csum_fold(csum_add(0, old, new));
            // SAFETY: checksum helper on this program's packet, at an offset inside the header.
            unsafe { bpf_l4_csum_replace(skb, (h.l4 + TCP_CHECK) as u32, 0, u64::from(sum), 0) };
        }
        count(STAT_LOCAL_ACK);
        return TC_ACT_OK;
    }

    // IP header: TTL / hop limit and addresses.
    let mut pseudo: u64 = 0;
    let mut l3sum: u64 = 0;
    if h.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
            return TC_ACT_OK;
        };
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            if (*ip).ttl <= 1 {
                count(STAT_TTL);
                return TC_ACT_SHOT;
            }
            let ttl_word = ip.cast::<u8>().add(8);
            let old = u32::from(ptr::read_unaligned(ttl_word.cast::<u16>()));
            (*ip).ttl -= 1;
            let new = u32::from(ptr::read_unaligned(ttl_word.cast::<u16>()));
            l3sum += u64::from(!old & 0xffff) + u64::from(new);
            let (s, d) = ((*ip).saddr, (*ip).daddr);
            (*ip).saddr = x.src[0];
            (*ip).daddr = x.dst[0];
            pseudo = csum_add(pseudo, s, x.src[0]);
            pseudo = csum_add(pseudo, d, x.dst[0]);
            l3sum = csum_add(l3sum, s, x.src[0]);
            l3sum = csum_add(l3sum, d, x.dst[0]);
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
            return TC_ACT_OK;
        };
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            if (*ip).hop_limit <= 1 {
                count(STAT_TTL);
                return TC_ACT_SHOT;
            }
            (*ip).hop_limit -= 1;
            for i in 0..4 {
                let (s, d) = ((*ip).saddr[i], (*ip).daddr[i]);
                (*ip).saddr[i] = x.src[i];
                (*ip).daddr[i] = x.dst[i];
                pseudo = csum_add(pseudo, s, x.src[i]);
                pseudo = csum_add(pseudo, d, x.dst[i]);
            }
        }
    }

    let mut out_seq = seq.wrapping_add(x.seq_delta);
    if payload == 0 && !fin && !rst && flags & TCP_SYN == 0 {
        // A pure ACK says nothing with its sequence number, but a receiver drops one numbered
        // past its window without looking at the acknowledgment. A sender can be past the
        // other leg's window through no fault of its own: before the switch it saw the
        // ingress socket's window, whose right edge may lie beyond the other leg's. Such an
        // ACK gets the number its receiver acknowledged last (`max_ack` of the other
        // direction: every ACK the receiver sent since the switch went through here), which
        // the receiver always accepts. Without it, a receiver whose window stays shut never
        // sees the ACKs of what it sends, and both directions stall.
        let back = Key { src: x.dst, dst: x.src, sport: x.dport, dport: x.sport, family: h.key.family };
        // SAFETY: a lookup in a map of plain values; the value is only read.
        if let Some(r) = unsafe { PKT_FLOWS.get(back) }
            && (out_seq.wrapping_sub(r.max_ack) as i32) > 0
        {
            out_seq = r.max_ack;
        }
    }

    // TCP header: ports, sequence, acknowledgment, window.
    let mut tcp: u64 = 0;
    let t = th.cast::<u8>();
    // SAFETY: `th` points at a whole TCP header (`ptr_at`), options checked by `options`.
    unsafe {
        let old = load32(t);
        (*th).source = x.sport;
        (*th).dest = x.dport;
        tcp = csum_add(tcp, old, load32(t));
        let old = (*th).seq;
        let new = out_seq.to_be();
        (*th).seq = new;
        tcp = csum_add(tcp, old, new);
        if has_ack {
            let old = (*th).ack_seq;
            let new = ack.wrapping_add(x.ack_delta).to_be();
            (*th).ack_seq = new;
            tcp = csum_add(tcp, old, new);
        }
        if x.win_shl != x.win_shr {
            let old = load32(t.add(12));
            let win = u32::from(u16::from_be((*th).window));
            let mut scaled = (win << (x.win_shl & 15)) >> (x.win_shr & 15);
            if scaled > 0xffff {
                scaled = 0xffff;
            }
            // Rounding a small window down to 0 would stall the sender.
            if scaled == 0 && win != 0 {
                scaled = 1;
            }
            (*th).window = (scaled as u16).to_be();
            tcp = csum_add(tcp, old, load32(t.add(12)));
        }
    }
    if ts != NONE && x.flags & XF_TS != 0 {
        let Some(p) = ptr_at::<[u8; 8]>(ctx, h.l4 + ts) else {
            return TC_ACT_SHOT;
        };
        let p = p.cast::<u8>();
        let (old_val, old_ecr) = (load32(p), load32(p.wrapping_add(4)));
        let new_val = u32::from_be(old_val).wrapping_add(x.tsval_delta).to_be();
        let ecr = u32::from_be(old_ecr);
        let new_ecr = if ecr == 0 { 0 } else { ecr.wrapping_add(x.tsecr_delta).to_be() };
        store32(p, new_val);
        store32(p.wrapping_add(4), new_ecr);
        tcp = csum_add(tcp, old_val, new_val);
        tcp = csum_add(tcp, old_ecr, new_ecr);
    }
    if sack != NONE {
        // SACK edges are acknowledgment-space numbers.
        for i in 0..8 {
            if i >= edges {
                break;
            }
            let Some(p) = ptr_at::<[u8; 4]>(ctx, h.l4 + sack + i * 4) else {
                return TC_ACT_SHOT;
            };
            let p = p.cast::<u8>();
            let old = load32(p);
            let new = u32::from_be(old).wrapping_add(x.ack_delta).to_be();
            store32(p, new);
            tcp = csum_add(tcp, old, new);
        }
    }

    // Counters before the helpers below (they invalidate packet pointers, not this entry).
    // Plain additions (the BPF target has no atomic read-modify-write in `core`): one direction
    // of a flow is nearly always carried by one CPU, and these two only inform `/connections`;
    // the byte totals of the access log come from `max_end`.
    x.packets += 1;
    x.bytes += u64::from(payload);
    // SAFETY: a helper without arguments.
    x.last_ns = unsafe { bpf_ktime_get_ns() };
    let l4_check = (h.l4 + TCP_CHECK) as u32;
    // SAFETY: checksum helpers on this program's packet, at offsets inside the headers.
    unsafe {
        if h.family == FAMILY_V4 {
            bpf_l3_csum_replace(skb, (ETH_LEN + IP_CHECK) as u32, 0, u64::from(csum_fold(l3sum)), 0);
        }
        bpf_l4_csum_replace(skb, l4_check, 0, u64::from(csum_fold(pseudo)), u64::from(BPF_F_PSEUDO_HDR));
        bpf_l4_csum_replace(skb, l4_check, 0, u64::from(csum_fold(tcp)), 0);
        (*skb).mark = MARK;
        (*skb).tstamp = 0;
    }
    count(STAT_TRANSLATED);
    // SAFETY: redirect of this program's packet.
    let r = unsafe { bpf_redirect_neigh(x.ifindex, ptr::null_mut(), 0, 0) } as i32;
    if r == TC_ACT_SHOT {
        count(STAT_REDIRECT_FAILED);
        log_redirect_failed(ctx, x.ifindex);
    }
    r
}

// The rare events' log lines (`rare`), each a BPF subprogram of its own (`inline(never)`): the
// log record's ring pointer then never shares a stack slot with the caller's values, which the
// verifier requires of a loader without CAP_PERFMON (it may not overwrite a spilled pointer).

#[inline(never)]
fn log_pull_failed(ctx: &TcContext, sport: u16, dport: u16) {
    if rare::due(rare::PACKET_PULL_FAILED) {
        warn!(
            ctx,
            "packet splice: the headers of a spliced flow's packet could not be made linear (port {} to {}); packet dropped",
            sport,
            dport
        );
    }
}

#[inline(never)]
fn log_event_lost(ctx: &TcContext, sport: u16, dport: u16) {
    if rare::due(rare::PACKET_EVENT_LOST) {
        warn!(
            ctx,
            "packet splice: the event ring is full; a FIN, RST or settled switch (port {} to {}) waits for the daemon's next scan",
            sport,
            dport
        );
    }
}

/// `ports`: source port << 16 | destination port (a subprogram takes at most five arguments).
#[inline(never)]
fn log_bad_options(ctx: &TcContext, ports: u32, len: u32, first: u32) {
    if rare::due(rare::BAD_OPTIONS) {
        warn!(
            ctx,
            "packet splice: a TCP option layout it does not translate (port {} to {}, {} option bytes starting {:x}); packet dropped",
            ports >> 16,
            ports & 0xffff,
            len,
            first
        );
    }
}

#[inline(never)]
fn log_redirect_failed(ctx: &TcContext, ifindex: u32) {
    if rare::due(rare::PACKET_REDIRECT_FAILED) {
        warn!(
            ctx,
            "packet splice: the kernel refused to redirect a translated packet to interface {}; dropped", ifindex
        );
    }
}

#[classifier]
pub(crate) fn packet_egress(ctx: TcContext) -> i32 {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: a field of this program's own context.
    unsafe {
        if (*skb).mark == MARK {
            (*skb).mark = 0;
            return TC_ACT_OK;
        }
    }
    let Some(h) = headers(&ctx) else {
        return TC_ACT_OK;
    };
    if let Some(th) = ptr_at::<TcpHdr>(&ctx, h.l4)
        // SAFETY: bounds checked by `ptr_at`.
        && unsafe { (*th).flags } & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        syn_not_ect(&ctx, &h);
    }
    if let Some(n) = PKT_QUIET.get_ptr_mut(h.key) {
        // SAFETY: a map value pointer, valid for this run (a racy count is good enough).
        unsafe { *n += 1 };
        count(STAT_GUARDED);
        return TC_ACT_SHOT;
    }
    local_ack_fixup(&ctx, &h);
    TC_ACT_OK
}

/// A connect that `packet_ecn` made ask for ECN sends its SYN ECN-capable: the kernel sets ECT
/// on every packet of a socket a BPF program says needs ECN, the SYN included, and a receiver
/// that follows RFC 3168 (Linux among them) refuses ECN to an ECN-capable SYN. So the SYN of
/// a socket listed in `PKT_ECN_ASK` leaves with its IP ECN field cleared (docs/design.md#ecn).
#[inline(always)]
fn syn_not_ect(ctx: &TcContext, h: &Headers) {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: the helper takes this program's own context (0 when the packet has no socket).
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    // SAFETY: a lookup in a map of plain values; the value is not kept.
    if cookie == 0 || unsafe { PKT_ECN_ASK.get(cookie) }.is_none() {
        return;
    }
    if h.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
            return;
        };
        // SAFETY: bounds checked by `ptr_at`; the checksum helper works at an offset inside the
        // header, after the last use of the pointer.
        unsafe {
            if (*ip).tos & 3 == 0 {
                return;
            }
            // The first 16-bit word (version, header length, TOS), before and after.
            let old = u32::from(ptr::read_unaligned(ip.cast::<u16>()));
            (*ip).tos &= !3;
            let new = u32::from(ptr::read_unaligned(ip.cast::<u16>()));
            let sum = u64::from(!old & 0xffff) + u64::from(new);
            bpf_l3_csum_replace(skb, (ETH_LEN + IP_CHECK) as u32, 0, u64::from(csum_fold(sum)), 0);
        }
    } else if let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) {
        // Version (4 bits), traffic class (8), flow label (20): ECN is the class's low 2 bits.
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let v = u32::from_be((*ip).version_class_flow);
            (*ip).version_class_flow = (v & !(3 << 20)).to_be();
        }
    }
}

/// A backend socket still delivering what it relayed at the switch (its flow's backend entry
/// has `local_below`) acknowledges only the backend's SYN: everything the backend sent since went
/// to the client. Once the backend has sent more than a window, that acknowledgment is so far
/// behind that the backend takes the segment for a blind injection (RFC 5961 §5.2), drops it
/// with its data and answers a challenge ACK: the relayed bytes would never arrive. The
/// segment gets the acknowledgment the client last gave instead, which the backend has seen
/// already (it went through the ingress program).
#[inline(always)]
fn local_ack_fixup(ctx: &TcContext, h: &Headers) {
    let back = Key { src: h.key.dst, dst: h.key.src, sport: h.key.dport, dport: h.key.sport, family: h.key.family };
    // SAFETY: lookups in a map of plain values; the values are only read.
    let Some(x) = (unsafe { PKT_FLOWS.get(back) }) else {
        return;
    };
    if x.local_below == 0 {
        return;
    }
    let client = Key { src: x.dst, dst: x.src, sport: x.dport, dport: x.sport, family: h.key.family };
    // SAFETY: as above.
    let Some(y) = (unsafe { PKT_FLOWS.get(client) }) else {
        return;
    };
    let acked = y.max_ack.wrapping_add(y.ack_delta);
    let Some(th) = ptr_at::<TcpHdr>(ctx, h.l4) else {
        return;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let (flags, old) = unsafe { ((*th).flags, (*th).ack_seq) };
    if flags & TCP_ACK == 0 || (acked.wrapping_sub(u32::from_be(old)) as i32) <= 0 {
        return;
    }
    let new = acked.to_be();
    // SAFETY: as above.
    unsafe { (*th).ack_seq = new };
    let sum = csum_fold(csum_add(0, old, new));
    // SAFETY: checksum helper on this program's packet, at an offset inside the header.
    unsafe { bpf_l4_csum_replace(ctx.skb.skb, (h.l4 + TCP_CHECK) as u32, 0, u64::from(sum), 0) };
}

/// Called by TCP on the sockets of the daemon's cgroup: when one about to send its SYN asks
/// whether it needs ECN (`BPF_SOCK_OPS_NEEDS_ECN`), the answer is yes for the sockets userspace
/// listed. Every other socket and operation is left as it is.
#[sock_ops]
pub(crate) fn packet_ecn(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_NEEDS_ECN {
        // SAFETY: the helper takes this program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: a lookup in a map of plain values; the value is not kept.
        if unsafe { PKT_ECN_ASK.get(cookie) }.is_some() {
            ctx.set_reply(1);
        }
    }
    1
}
