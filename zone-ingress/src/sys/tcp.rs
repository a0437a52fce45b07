//! TCP options of the packet splice's switch (docs/design.md#packet-splice): the sequence numbers
//! of a socket (`TCP_REPAIR`), its timestamp clock, its MSS, and parking it (repair mode: it
//! sends nothing, and closing it is silent). All need `CAP_NET_ADMIN` except the MSS.

use std::{io, os::fd::BorrowedFd};

use super::{getsockopt, setsockopt};

/// include/uapi/linux/tcp.h.
const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCP_REPAIR_ON: libc::c_int = 1;
/// Leave repair mode without the window probe `TCP_REPAIR_OFF` (0) sends.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCP_NO_QUEUE: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;

/// A socket's sequence numbers: the next byte it will write (`write_seq`, unsent bytes included)
/// and the next byte it expects (`rcv_nxt`, unread bytes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seqs {
    pub write_seq: u32,
    pub rcv_nxt: u32,
}

/// Reads [`Seqs`] in a moment of repair mode, left without a window probe: the socket sends
/// nothing because of it and keeps working.
///
/// # Errors
/// No `CAP_NET_ADMIN`, or the socket is neither established nor closed.
pub fn seqs(fd: BorrowedFd<'_>) -> io::Result<Seqs> {
    setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &TCP_REPAIR_ON)?;
    let read = || -> io::Result<Seqs> {
        let mut write_seq: u32 = 0;
        let mut rcv_nxt: u32 = 0;
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE)?;
        getsockopt(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, &mut write_seq)?;
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE)?;
        getsockopt(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, &mut rcv_nxt)?;
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, &TCP_NO_QUEUE)?;
        Ok(Seqs { write_seq, rcv_nxt })
    };
    let out = read();
    setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP)?;
    out
}

/// Parks a socket for good: in repair mode TCP sends nothing (no ACK, retransmission,
/// keepalive, FIN or RST) and a close frees it silently.
///
/// # Errors
/// No `CAP_NET_ADMIN`, or the socket is neither established nor closed.
pub fn park(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &TCP_REPAIR_ON)
}

/// A parked socket made from nothing: created in repair mode, bound to `local` and connected to
/// `peer` without a packet (repair mode's connect goes straight to ESTABLISHED, and its bind
/// may share a port with a listener). It holds the 4-tuple, so the kernel cannot give that
/// source port to another connection toward `peer`; closing it is silent.
///
/// # Errors
/// No `CAP_NET_ADMIN`, or the 4-tuple is taken.
pub fn parked_socket(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _};
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    park(fd.as_fd())?;
    let (l, llen) = super::sockaddr(local);
    // SAFETY: `l` is a valid sockaddr of the length passed.
    if unsafe { libc::bind(fd.as_raw_fd(), l.as_ptr().cast(), llen) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (p, plen) = super::sockaddr(peer);
    // SAFETY: `p` is a valid sockaddr of the length passed.
    if unsafe { libc::connect(fd.as_raw_fd(), p.as_ptr().cast(), plen) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `TCP_TIMESTAMP`: the socket's timestamp clock now (the TSval it would send).
///
/// # Errors
/// Not a TCP socket.
pub fn timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: u32 = 0;
    getsockopt(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, &mut v)?;
    Ok(v)
}

/// Moves the socket's timestamp clock `ticks` forward (`TCP_TIMESTAMP` in a moment of repair
/// mode, left without a window probe). The low bit of the value stays as read: it says whether
/// the clock counts microseconds (Linux ≥ 6.7) and `ticks` is even.
///
/// # Errors
/// No `CAP_NET_ADMIN`, or the socket is neither established nor closed.
pub fn advance_timestamp(fd: BorrowedFd<'_>, ticks: u32) -> io::Result<()> {
    debug_assert!(ticks.is_multiple_of(2), "an odd step would flip the clock's unit bit");
    setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &TCP_REPAIR_ON)?;
    let set = timestamp(fd).and_then(|now| setsockopt(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, &now.wrapping_add(ticks)));
    setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP)?;
    set
}

/// `TCP_MAXSEG` before connect or listen: the MSS advertised in the SYN (and the most this
/// socket sends).
///
/// # Errors
/// Out of range.
pub fn set_maxseg(fd: BorrowedFd<'_>, mss: u16) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, &libc::c_int::from(mss))
}

/// `TCP_QUICKACK`: sends an ACK now if one is pending.
///
/// # Errors
/// Not a TCP socket.
pub fn quickack(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, &1 as &libc::c_int)
}
