//! The arithmetic of the switch (docs/design.md#packet-splice): from what each leg's handshake
//! and socket say, the two translation entries.
//!
//! Both legs share one byte numbering: client byte *j* of the stream is sequence number
//! `client ISN + 1 + j` on the client leg and `ingress ISN + 1 + j` on the backend leg (the
//! daemon relays the bytes it received before the switch in order, and nothing else), and the
//! same for the backend's bytes. A fixed delta per direction therefore translates every
//! packet, before, during and after the switch: a byte the ingress's own socket sent and the
//! same byte retransmitted by its real sender land at the same place, and TCP takes the
//! duplicate for what it is.

use std::net::{IpAddr, SocketAddr};

use zone_ingress_ebpf::packet::{FAMILY_V4, FAMILY_V6, Key, XF_TS, Xlate};

/// What a SYN or SYN-ACK offered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SynOptions {
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack: bool,
    /// TSval and TSecr.
    pub ts: Option<(u32, u32)>,
}

/// Parses TCP options (RFC 9293 §3.2): kinds 0 (end), 1 (NOP), 2 (MSS), 3 (window scale),
/// 4 (SACK permitted), 8 (timestamps); others are skipped by their length. A malformed list
/// ends the walk with what was read so far.
#[must_use]
pub fn parse_options(opts: &[u8]) -> SynOptions {
    let mut out = SynOptions::default();
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = opts.get(i + 1) else { break };
                let len = usize::from(len);
                if len < 2 || i + len > opts.len() {
                    break;
                }
                let body = &opts[i + 2..i + len];
                match (kind, body.len()) {
                    (2, 2) => out.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                    (3, 1) => out.wscale = Some(body[0].min(14)),
                    (4, 0) => out.sack = true,
                    (8, 8) => {
                        let v = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                        let e = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                        out.ts = Some((v, e));
                    }
                    _ => {}
                }
                i += len;
            }
        }
    }
    out
}

/// The map key of a packet from `from` to `to`, as it appears on the wire (an IPv4-mapped IPv6
/// address is the IPv4 packet it really is).
#[must_use]
pub fn key(from: SocketAddr, to: SocketAddr) -> Key {
    let (src, family) = words(from.ip());
    let (dst, _) = words(to.ip());
    Key { src, dst, sport: from.port().to_be(), dport: to.port().to_be(), family }
}

/// The (from, to) addresses of a key: the inverse of [`key`] (IPv4 addresses come back plain).
#[must_use]
pub fn addrs(k: &Key) -> (SocketAddr, SocketAddr) {
    let ip = |w: [u32; 4]| -> IpAddr {
        if k.family == FAMILY_V4 {
            IpAddr::V4(std::net::Ipv4Addr::from(w[0].to_ne_bytes()))
        } else {
            let mut o = [0u8; 16];
            for (i, word) in w.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(std::net::Ipv6Addr::from(o))
        }
    };
    (SocketAddr::new(ip(k.src), u16::from_be(k.sport)), SocketAddr::new(ip(k.dst), u16::from_be(k.dport)))
}

/// An address as the map's raw words, and its family on the wire.
fn words(ip: IpAddr) -> ([u32; 4], u32) {
    match unmap(ip) {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (a dual-stack listener's view).
#[must_use]
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// One leg as the ingress's socket on it sees it.
#[derive(Debug, Clone, Copy)]
pub struct Leg {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The peer's initial sequence number (its SYN's).
    pub peer_isn: u32,
    /// The ingress socket's initial sequence number.
    pub local_isn: u32,
    /// Timestamps negotiated on this leg.
    pub ts: bool,
    /// Window scale of the peer's advertised windows (`tcpi_snd_wscale`) and of ours
    /// (`tcpi_rcv_wscale`); 0 without window scaling.
    pub peer_wscale: u8,
    pub local_wscale: u8,
    /// The ingress socket's timestamp clock now.
    pub local_ts_now: u32,
    /// The peer's timestamp clock now, estimated from its SYN's TSval and the time since.
    pub peer_ts_now: u32,
    /// Interface the peer's packets arrive on, and where packets to it leave.
    pub ifindex: u32,
}

/// Timestamp ticks added to every translated TSval beyond the receiver's last one seen: PAWS
/// (RFC 7323 §5) drops a segment whose TSval went back, and the clocks are only estimated to
/// the millisecond. The backend socket, which keeps sending the relayed bytes for a while, has
/// its own clock moved forward by as much at the switch: the backend then sees TSvals from it
/// and translated ones from the client within one tick of each other, both ways, which PAWS
/// accepts. Even (the low bit of a `TCP_TIMESTAMP` value is its unit).
pub const TS_MARGIN: u32 = 2;

/// The two entries of a flow: (key of packets from the client, its entry), (key of packets from
/// the backend, its entry). `relayed`: bytes the daemon read from the client socket and writes
/// to the backend socket at the switch (the ClientHello and anything after it); `fin`: the
/// client's FIN came with them, and the backend socket sends it too.
#[must_use]
pub fn entries(client: &Leg, backend: &Leg, relayed: u32, fin: bool) -> ((Key, Xlate), (Key, Xlate)) {
    let owed = relayed.wrapping_add(u32::from(fin));
    let ts = client.ts && backend.ts;
    // Client TSval → backend leg, and back; each TSecr is the inverse of the other direction.
    let ts_c2b = backend.local_ts_now.wrapping_sub(client.peer_ts_now).wrapping_add(TS_MARGIN);
    let ts_b2c = client.local_ts_now.wrapping_sub(backend.peer_ts_now).wrapping_add(TS_MARGIN);
    let mut from_client = direction(client, backend, ts, ts_c2b, ts_b2c);
    from_client.max_end = from_client.max_end.wrapping_add(relayed);
    let mut from_backend = direction(backend, client, ts, ts_b2c, ts_c2b);
    // The relayed bytes are the backend socket's to deliver: ACKs of part of them go to it.
    if owed != 0 {
        from_backend.local_below = backend.local_isn.wrapping_add(1).wrapping_add(owed);
        from_backend.local_seq = backend.peer_isn.wrapping_add(1);
    }
    ((key(client.peer, client.local), from_client), (key(backend.peer, backend.local), from_backend))
}

/// The entry of packets that arrive on leg `from` and leave on leg `to`: `tsval` is this
/// direction's timestamp delta, `back` the other's (whose inverse translates the echoes).
fn direction(from: &Leg, to: &Leg, ts: bool, tsval: u32, back: u32) -> Xlate {
    Xlate {
        src: words(to.local.ip()).0,
        dst: words(to.peer.ip()).0,
        sport: to.local.port().to_be(),
        dport: to.peer.port().to_be(),
        ifindex: to.ifindex,
        seq_delta: to.local_isn.wrapping_sub(from.peer_isn),
        ack_delta: to.peer_isn.wrapping_sub(from.local_isn),
        tsval_delta: tsval,
        tsecr_delta: back.wrapping_neg(),
        win_shl: from.peer_wscale,
        win_shr: to.local_wscale,
        flags: if ts { XF_TS } else { 0 },
        max_ack: from.local_isn.wrapping_add(1),
        max_end: from.peer_isn.wrapping_add(1),
        ..Xlate::default()
    }
}

/// Stream bytes one direction carried: from the first byte after the SYN up to the highest
/// sequence number seen, less the FIN's.
#[must_use]
pub fn stream_bytes(x: &Xlate, peer_isn: u32) -> u64 {
    let fin = u32::from(x.events & zone_ingress_ebpf::packet::EV_FIN != 0);
    u64::from(x.max_end.wrapping_sub(peer_isn.wrapping_add(1)).wrapping_sub(fin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_addresses_round_trip() {
        for (from, to) in [("198.18.0.1:40000", "198.18.0.2:10001"), ("[2001:2::1]:40000", "[2001:2:0:1::2]:8080")] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().expect("addr"), to.parse().expect("addr"));
            assert_eq!(addrs(&key(from, to)), (from, to));
        }
        // A dual-stack listener's IPv4-mapped view comes back as the IPv4 packet it is.
        let mapped: SocketAddr = "[::ffff:198.18.0.1]:40000".parse().expect("addr");
        let to: SocketAddr = "198.18.0.2:10001".parse().expect("addr");
        assert_eq!(addrs(&key(mapped, to)).0, "198.18.0.1:40000".parse::<SocketAddr>().expect("addr"));
    }

    #[test]
    fn linux_syn_layouts() {
        // MSS 1460, SACK permitted, TS, NOP, window scale 7.
        let syn = [2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 1, 0, 0, 0, 0, 0, 1, 3, 3, 7];
        let o = parse_options(&syn);
        assert_eq!(o, SynOptions { mss: Some(1460), wscale: Some(7), sack: true, ts: Some((256, 0)) });
        // Without SACK and timestamps: MSS NOP NOP NOP WS.
        let o = parse_options(&[2, 4, 35, 40, 1, 1, 1, 3, 3, 10]);
        assert_eq!(o, SynOptions { mss: Some(9000), wscale: Some(10), sack: false, ts: None });
        // A truncated option ends the walk.
        assert_eq!(parse_options(&[2, 4, 5]), SynOptions::default());
        assert_eq!(parse_options(&[3, 0, 1]).wscale, None);
    }

    #[test]
    fn keys_are_wire_order() {
        let a: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let b: SocketAddr = "[::ffff:198.18.0.2]:443".parse().unwrap();
        let k = key(a, b);
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.src[0].to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(k.dst[0].to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(k.dst[1..], [0, 0, 0]);
        assert_eq!(k.sport.to_ne_bytes(), 40000u16.to_be_bytes());
        let k6 = key("[2001:2::1]:1".parse().unwrap(), "[2001:2::2]:2".parse().unwrap());
        assert_eq!(k6.family, FAMILY_V6);
        assert_eq!(k6.src[0].to_ne_bytes(), [0x20, 0x01, 0, 2]);
        assert_eq!(k6.src[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    fn leg(local: &str, peer: &str, peer_isn: u32, local_isn: u32) -> Leg {
        Leg {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            peer_isn,
            local_isn,
            ts: true,
            peer_wscale: 7,
            local_wscale: 9,
            local_ts_now: 5_000,
            peer_ts_now: 1_000,
            ifindex: 3,
        }
    }

    /// Every byte of either stream lands at the same offset on the other leg, whatever the ISNs
    /// (wrapping included), and the acknowledgment of a translated byte translates back to it.
    #[test]
    fn both_legs_share_one_numbering() {
        let client = leg("198.18.0.2:443", "198.18.0.1:40000", u32::MAX - 10, 77);
        let backend = leg("198.18.1.1:50000", "198.18.1.2:8443", 123_456, u32::MAX - 3);
        let ((kc, c), (kb, b)) = entries(&client, &backend, 517, false);
        assert_eq!(kc, key(client.peer, client.local));
        assert_eq!(kb, key(backend.peer, backend.local));
        for j in [0u32, 1, 516, 517, 1 << 20] {
            // Client byte j: client leg seq, backend leg seq.
            let on_client = client.peer_isn.wrapping_add(1).wrapping_add(j);
            let on_backend = backend.local_isn.wrapping_add(1).wrapping_add(j);
            assert_eq!(on_client.wrapping_add(c.seq_delta), on_backend);
            // The backend acknowledges it; the client must see its own numbering.
            assert_eq!(on_backend.wrapping_add(b.ack_delta), on_client);
            // Backend byte j, the other way round.
            let on_b = backend.peer_isn.wrapping_add(1).wrapping_add(j);
            let on_c = client.local_isn.wrapping_add(1).wrapping_add(j);
            assert_eq!(on_b.wrapping_add(b.seq_delta), on_c);
            assert_eq!(on_c.wrapping_add(c.ack_delta), on_b);
        }
        // Timestamps: a client TSval reaches the backend on the backend socket's clock (plus the
        // margin) and the backend's echo of it comes back as the client's own value.
        let tsval = client.peer_ts_now;
        let seen = tsval.wrapping_add(c.tsval_delta);
        assert_eq!(seen, backend.local_ts_now + TS_MARGIN);
        assert_eq!(seen.wrapping_add(b.tsecr_delta), tsval);
        let bval = backend.peer_ts_now;
        assert_eq!(bval.wrapping_add(b.tsval_delta).wrapping_add(c.tsecr_delta), bval);
        // Windows: the client's scale in, the backend socket's scale out.
        assert_eq!((c.win_shl, c.win_shr), (7, 9));
        assert_eq!(c.flags, XF_TS);
        // ACKs of the relayed ClientHello go to the backend socket until all of it is acked.
        assert_eq!(b.local_below, backend.local_isn.wrapping_add(518));
        assert_eq!(c.local_below, 0);
        assert_eq!(c.ifindex, backend.ifindex);
        // Nothing sent yet: no bytes either way.
        assert_eq!(stream_bytes(&c, client.peer_isn), 517);
        assert_eq!(stream_bytes(&b, backend.peer_isn), 0);
    }

    #[test]
    fn timestamps_only_when_both_legs_have_them() {
        let client = Leg { ts: false, ..leg("198.18.0.2:443", "198.18.0.1:40000", 1, 2) };
        let backend = leg("198.18.1.1:50000", "198.18.1.2:8443", 3, 4);
        let ((_, c), (_, b)) = entries(&client, &backend, 0, false);
        assert_eq!((c.flags, b.flags), (0, 0));
        assert_eq!(b.local_below, 0);
        // A FIN relayed at the switch is the backend socket's to deliver, like bytes.
        let (_, (_, b)) = entries(&client, &backend, 0, true);
        assert_eq!(b.local_below, backend.local_isn.wrapping_add(2));
    }
}
