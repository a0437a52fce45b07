//! Helpers for the XDP guard tests (`tests/xdp.rs`) and its benchmark: hand-built Ethernet
//! frames (IPv4/IPv6, TCP with any flags, fragments, extension headers, broken lengths) sent
//! through an `AF_PACKET` socket, bounded SYN floods, extra namespaces routed through the
//! client namespace, and what the tests read back (attached XDP programs, guard counters).
//!
//! Every frame goes to an address of the test ranges (198.18.0.0/15, 2001:2::/48); every flood
//! stops at a packet count and a deadline, whichever comes first.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use crate::{netns::Netns, ops};

/// Test ranges every crafted packet must stay in.
fn in_test_ranges(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            s[0] == 0x2001 && s[1] == 2 && s[2] == 0
        }
    }
}

/// The MAC address of `ifname` in `ns` (`ip -j link show`).
pub fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out =
        Command::new("ip").args(["-n", &ns.name, "-j", "link", "show", "dev", ifname]).output().expect("ip link show");
    assert!(out.status.success(), "ip link show {ifname}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let text = v[0]["address"].as_str().unwrap_or_else(|| panic!("no address for {ifname}: {v}"));
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).expect("hex MAC");
    }
    mac
}

/// The XDP attachment of `ifname` in `ns`: `Some("native")`, `Some("generic")` or `None`.
pub fn xdp_attachment(ns: &Netns, ifname: &str) -> Option<&'static str> {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-d", "-j", "link", "show", "dev", ifname])
        .output()
        .expect("ip link show");
    assert!(out.status.success(), "ip link show {ifname} in {}: {}", ns.name, String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ip -j link show printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert!(v[0].is_object(), "ip -j link show {ifname}: no link in {v}");
    // No `xdp` key: nothing attached.
    let mode = v[0]["xdp"]["mode"].as_u64()?;
    // XDP_ATTACHED_DRV = 1, SKB = 2, HW = 3, MULTI = 4 (include/uapi/linux/if_link.h).
    match mode {
        1 => Some("native"),
        2 => Some("generic"),
        _ => Some("other"),
    }
}

/// A namespace routed through the client namespace: `ns` ─veth─ client (which forwards),
/// on 198.18.<net>.0/24 and 2001:2:0:<net>::/64 (`ns` is host 2, the client side host 1). The
/// ingress namespace gets a route back through the client (198.18.0.1 / 2001:2::1).
pub fn routed_namespace(name: &str, net: u8, client: &Netns, ingress: &Netns) -> Netns {
    let ns = Netns::new(name);
    let (outer, inner) = (format!("r{net}"), "f0".to_owned());
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    };
    ip(&["link", "add", &outer, "netns", &client.name, "type", "veth", "peer", "name", &inner, "netns", &ns.name]);
    client.ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &outer]);
    client.ip(&["-6", "addr", "add", &format!("2001:2:0:{net:x}::1/64"), "dev", &outer, "nodad"]);
    client.ip(&["link", "set", &outer, "up"]);
    ns.ip(&["addr", "add", &format!("198.18.{net}.2/24"), "dev", &inner]);
    ns.ip(&["-6", "addr", "add", &format!("2001:2:0:{net:x}::2/64"), "dev", &inner, "nodad"]);
    ns.ip(&["link", "set", &inner, "up"]);
    ns.ip(&["route", "add", "default", "via", &format!("198.18.{net}.1")]);
    ns.ip(&["-6", "route", "add", "default", "via", &format!("2001:2:0:{net:x}::1")]);
    for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        let out = client.command("sysctl").args(["-qw", key]).output().expect("sysctl");
        assert!(out.status.success(), "sysctl {key}: {}", String::from_utf8_lossy(&out.stderr));
    }
    ingress.ip(&["route", "add", &format!("198.18.{net}.0/24"), "via", "198.18.0.1"]);
    ingress.ip(&["-6", "route", "add", &format!("2001:2:0:{net:x}::/64"), "via", "2001:2::1"]);
    std::thread::sleep(Duration::from_millis(50));
    ns
}

/// An `AF_PACKET` socket on one interface of a namespace, sending whole Ethernet frames.
pub struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

impl RawSender {
    /// Opens the socket in `ns` on `ifname`; frames go to `dst_mac` (the peer's MAC).
    pub fn open(ns: &Netns, ifname: &str, dst_mac: [u8; 6]) -> Self {
        let src_mac = mac(ns, ifname);
        let name = std::ffi::CString::new(ifname).expect("ifname");
        let (fd, ifindex) = ns.run(move || {
            // SAFETY: plain socket creation; protocol 0 means this socket receives nothing.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(raw >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            // SAFETY: `raw` is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: `name` is NUL-terminated.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex != 0, "no interface {name:?}");
            (fd, i32::try_from(ifindex).expect("ifindex"))
        });
        Self { fd, ifindex, src_mac, dst_mac }
    }

    /// Sends one frame (`frame` starts with the Ethernet header).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_ll is valid; the fields we need are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&self.dst_mac);
        // SAFETY: valid buffer and address for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&sll).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>()).expect("len"),
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Sends `n` frames; panics on a send error. A frame the interface's queue had no room for
    /// (`ENOBUFS`: it was dropped, not sent; the burst outran the peer's XDP ring) is sent
    /// again after 1 ms, up to 500 times.
    pub fn send_all(&self, frames: &[Vec<u8>]) {
        for f in frames {
            let mut tries = 500;
            loop {
                match self.send(f) {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && tries > 0 => {
                        tries -= 1;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(e) => panic!("sending a {}-byte frame: {e}", f.len()),
                }
            }
        }
    }

    /// The Ethernet header of a frame from this sender.
    fn eth(&self, ethertype: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(1600);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// A whole frame carrying `packet`.
    pub fn frame(&self, packet: &Packet) -> Vec<u8> {
        assert!(
            in_test_ranges(packet.src) && in_test_ranges(packet.dst),
            "crafted packets stay in the test ranges: {packet:?}"
        );
        let mut f = self.eth(if packet.src.is_ipv4() { 0x0800 } else { 0x86dd });
        f.extend_from_slice(&packet.bytes());
        f
    }
}

/// TCP flag bits.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// An IP packet carrying a TCP segment, with knobs to break it.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub seq: u32,
    pub payload: Vec<u8>,
    /// TCP data offset in 32-bit words (5 = no options).
    pub data_offset: u8,
    pub urg_ptr: u16,
    /// IPv4 IHL in words (5 = no options; larger values add zero options).
    pub ihl: u8,
    /// Overrides the IPv4 total length / IPv6 payload length field.
    pub length_field: Option<u16>,
    /// IPv4: (more fragments, offset in 8-byte units). IPv6: adds a fragment header.
    pub fragment: Option<(bool, u16)>,
    /// IPv6 destination-options headers before TCP (each 8 bytes).
    pub ext_headers: usize,
    /// Cut the packet to this many bytes of IP payload after building it.
    pub truncate_l4: Option<usize>,
}

impl Packet {
    /// A well-formed segment.
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            flags,
            seq: 0x1000_0000,
            payload: Vec::new(),
            data_offset: 5,
            urg_ptr: 0,
            ihl: 5,
            length_field: None,
            fragment: None,
            ext_headers: 0,
            truncate_l4: None,
        }
    }

    fn tcp_segment(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity(20 + self.payload.len());
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&(if self.flags & flags::ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
        t.push(self.data_offset << 4);
        t.push(self.flags);
        t.extend_from_slice(&64240u16.to_be_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&self.urg_ptr.to_be_bytes());
        // No options whatever `data_offset` says: a larger offset points past the header.
        t.extend_from_slice(&self.payload);
        let sum = checksum(&pseudo_header(self.src, self.dst, t.len()), &t);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        t
    }

    /// The IP packet.
    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = self.tcp_segment();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                if let Some(n) = self.truncate_l4 {
                    l4.truncate(n);
                }
                let hlen = usize::from(self.ihl).max(5) * 4;
                let mut ip = vec![0u8; hlen];
                ip[0] = 0x40 | (self.ihl & 0x0f);
                let total = u16::try_from(hlen + l4.len()).expect("length");
                ip[2..4].copy_from_slice(&self.length_field.unwrap_or(total).to_be_bytes());
                ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
                let frag = match self.fragment {
                    Some((mf, off)) => (if mf { 0x2000 } else { 0 }) | (off & 0x1fff),
                    None => 0x4000, // DF
                };
                ip[6..8].copy_from_slice(&frag.to_be_bytes());
                ip[8] = 64;
                ip[9] = 6;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                let sum = checksum(&[], &ip);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                ip.extend_from_slice(&l4);
                ip
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                // Destination options (8 bytes: a PadN option filling 6), then fragment, then TCP.
                let mut chain: Vec<u8> = std::iter::repeat_n(60u8, self.ext_headers).collect();
                if self.fragment.is_some() {
                    chain.push(44);
                }
                chain.push(6);
                let first = chain[0];
                for (i, kind) in chain.iter().enumerate().take(chain.len() - 1) {
                    let next = chain[i + 1];
                    match kind {
                        60 => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
                        _ => {
                            let (mf, off) = self.fragment.unwrap_or((false, 0));
                            let field = (off << 3) | u16::from(mf);
                            ext.push(next);
                            ext.push(0);
                            ext.extend_from_slice(&field.to_be_bytes());
                            ext.extend_from_slice(&0x0bad_f00du32.to_be_bytes());
                        }
                    }
                }
                if let Some(n) = self.truncate_l4 {
                    l4.truncate(n);
                }
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                let payload = u16::try_from(ext.len() + l4.len()).expect("length");
                ip[4..6].copy_from_slice(&self.length_field.unwrap_or(payload).to_be_bytes());
                ip[6] = first;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                ip.extend_from_slice(&ext);
                ip.extend_from_slice(&l4);
                ip
            }
            _ => panic!("mixed address families"),
        }
    }
}

fn pseudo_header(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, 6]);
            p.extend_from_slice(&u16::try_from(len).expect("len").to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&u32::try_from(len).expect("len").to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6]);
        }
        _ => {}
    }
    p
}

/// The Internet checksum (RFC 1071) of `a` followed by `b`.
fn checksum(a: &[u8], b: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for &byte in a.iter().chain(b) {
        match odd.take() {
            None => odd = Some(byte),
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, byte])),
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends SYNs from `src` to `dst` (varying source port and sequence number), at most
/// `max_packets`, at most for `max_time`, and spread evenly over `max_time` (so the flood
/// overlaps whatever runs beside it). Returns how many were sent.
pub fn syn_flood(sender: &RawSender, src: IpAddr, dst: SocketAddr, max_packets: usize, max_time: Duration) -> usize {
    assert!(max_packets <= 1_000_000 && max_time <= Duration::from_secs(10), "floods stay bounded");
    let start = Instant::now();
    let per_packet = max_time.as_secs_f64() / max_packets.max(1) as f64;
    let template = sender.frame(&Packet::tcp(src, dst.ip(), 1024, dst.port(), flags::SYN));
    let (l4, sport_at) = if src.is_ipv4() { (14 + 20, 14 + 20) } else { (14 + 40, 14 + 40) };
    let end = Instant::now() + max_time;
    let mut sent = 0;
    let mut frame = template;
    while sent < max_packets {
        if sent % 256 == 0 {
            let now = Instant::now();
            if now >= end {
                break;
            }
            // Ahead of schedule: wait for it (keeps the rate at max_packets / max_time).
            let due = start + Duration::from_secs_f64(per_packet * sent as f64);
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        // New source port and sequence; adjust the TCP checksum incrementally (RFC 1624).
        let sport = 1024 + (sent % 60_000) as u16;
        let seq = (sent as u32).wrapping_mul(2_654_435_761);
        let old: Vec<u16> =
            (0..4).map(|i| u16::from_be_bytes([frame[sport_at + 2 * i], frame[sport_at + 2 * i + 1]])).collect();
        frame[sport_at..sport_at + 2].copy_from_slice(&sport.to_be_bytes());
        frame[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let new: Vec<u16> =
            (0..4).map(|i| u16::from_be_bytes([frame[sport_at + 2 * i], frame[sport_at + 2 * i + 1]])).collect();
        let mut sum = u32::from(!u16::from_be_bytes([frame[l4 + 16], frame[l4 + 17]]));
        for (o, n) in old.iter().zip(&new) {
            sum += u32::from(!*o) + u32::from(*n);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        frame[l4 + 16..l4 + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        match sender.send(&frame) {
            Ok(()) => sent += 1,
            // The qdisc or the peer's backlog is full: give it a moment.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => panic!("flood send: {e}"),
        }
    }
    sent
}

/// The guard's counters from `/stats/prometheus`, by reason.
pub fn counters(ns: &Netns, admin: SocketAddr) -> std::collections::BTreeMap<String, u64> {
    let s = ops::scrape(ns, admin);
    let mut out = std::collections::BTreeMap::new();
    for sample in &s.parsed.samples {
        if sample.metric != "zone_ingress_xdp_packets_total" {
            continue;
        }
        let v = match &sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("unexpected sample type {other:?}"),
        };
        if let Some(reason) = sample.labels.get("reason") {
            out.insert(reason.to_owned(), v as u64);
        }
    }
    out
}

/// An IPv4 address in 198.18.0.0/15.
pub fn v4(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, c, d))
}

/// An IPv6 address in 2001:2:0:<net>::/64.
pub fn v6(net: u16, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, net, 0, 0, 0, host))
}
