//! RSTs on a flow's behalf (idle timeout, the drain's end, a failed switch): a raw TCP segment
//! with the ingress side's 4-tuple of a leg and a sequence number the peer accepts, marked
//! so that the egress guard lets it out (`abi::MARK`).
//!
//! Since RFC 5961 a peer accepts a RST only at exactly its next expected sequence number (one
//! inside the window only earns a challenge ACK), and the daemon knows that number only as well
//! as the program saw it: the peer's last acknowledgment, or what was sent to it. The caller
//! sends one RST per candidate.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use zone_ingress_ebpf::packet::MARK;

use super::switch::unmap;

/// Ones'-complement sum of 16-bit big-endian words.
fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).map_or(0, |b| u32::from(*b));
        acc += hi | lo;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The 20-byte TCP header of a bare RST from `from` to `to` with sequence number `seq`, its
/// checksum over the pseudo-header of either family.
#[must_use]
pub(super) fn segment(from: SocketAddr, to: SocketAddr, seq: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&from.port().to_be_bytes());
    h[2..4].copy_from_slice(&to.port().to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = 0x04; // RST
    let mut acc = 0u32;
    match (unmap(from.ip()), unmap(to.ip())) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(acc, &s.octets());
            acc = sum16(acc, &d.octets());
            acc += u32::from(libc::IPPROTO_TCP as u8) + 20;
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            acc = sum16(acc, &v6(s));
            acc = sum16(acc, &v6(d));
            acc += 20 + u32::from(libc::IPPROTO_TCP as u8);
        }
    }
    acc = sum16(acc, &h);
    h[16..18].copy_from_slice(&fold(acc).to_be_bytes());
    h
}

/// A raw TCP socket can be made (`CAP_NET_RAW`), as [`send`] does: checked once at load, so a
/// packet splice that could not reset its flows never starts.
///
/// # Errors
/// No `CAP_NET_RAW`.
pub(super) fn check() -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned (and closed) at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_TCP) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    drop(unsafe { OwnedFd::from_raw_fd(raw) });
    Ok(())
}

/// Sends one RST per sequence number in `seqs` from `from` to `to`.
///
/// # Errors
/// The raw socket could not be made (no `CAP_NET_RAW`) or the send failed.
pub(super) fn send(from: SocketAddr, to: SocketAddr, seqs: &[u32]) -> io::Result<()> {
    let (src, dst) = (unmap(from.ip()), unmap(to.ip()));
    let family = if src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_TCP) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    crate::sys::setsockopt(std::os::fd::AsFd::as_fd(&sock), libc::SOL_SOCKET, libc::SO_MARK, &MARK)?;
    let (bind, dest) = (crate::sys::sockaddr(SocketAddr::new(src, 0)), crate::sys::sockaddr(SocketAddr::new(dst, 0)));
    // SAFETY: `bind` is a valid sockaddr of the length passed.
    if unsafe { libc::bind(sock.as_raw_fd(), bind.0.as_ptr().cast(), bind.1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for &seq in seqs {
        let seg = segment(SocketAddr::new(src, from.port()), SocketAddr::new(dst, to.port()), seq);
        // SAFETY: `seg` and `dest` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(sock.as_raw_fd(), seg.as_ptr().cast(), seg.len(), 0, dest.0.as_ptr().cast(), dest.1)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum verifies: summing the pseudo-header and the segment gives 0xffff.
    #[test]
    fn checksums_verify() {
        for (from, to) in [
            ("198.18.0.2:443", "198.18.0.1:40000"),
            ("[2001:2::2]:443", "[2001:2::1]:40000"),
            ("[::ffff:198.18.0.2]:443", "198.18.0.1:1"),
        ] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
            let seg = segment(from, to, 0xdead_beef);
            let mut acc = 0u32;
            match (unmap(from.ip()), unmap(to.ip())) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    acc = sum16(acc, &s.octets());
                    acc = sum16(acc, &d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    acc = sum16(acc, &s.octets());
                    acc = sum16(acc, &d.octets());
                }
                _ => unreachable!(),
            }
            acc += 6 + 20;
            acc = sum16(acc, &seg);
            assert_eq!(fold(acc), 0, "{from} → {to}");
            assert_eq!(seg[13], 0x04);
            assert_eq!(u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]), 0xdead_beef);
        }
    }
}
