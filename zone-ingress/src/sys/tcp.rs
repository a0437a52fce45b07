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
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;

/// A socket's sequence numbers: the next byte it will write (`write_seq`, unsent bytes included)
/// and the next byte it expects (`rcv_nxt`, unread bytes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seqs {
    pub write_seq: u32,
    pub rcv_nxt: u32,
}

/// What the switch reads of a socket in one moment of repair mode: its [`Seqs`] and its
/// timestamp clock (`TCP_TIMESTAMP`, the TSval it would send now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub seqs: Seqs,
    pub ts_now: u32,
}

/// Reads a [`Snapshot`] in a moment of repair mode, left without a window probe: the socket
/// sends nothing because of it and keeps working. With `advance` > 0 the socket's timestamp
/// clock is then moved that many ticks forward (`ts_now` is the value before); the low bit of
/// the value stays as read (it says whether the clock counts microseconds, Linux ≥ 6.7), so
/// `advance` is even. The repair queue selected here needs no reset: the kernel looks at it only
/// in repair mode, and entering repair mode clears it.
///
/// # Errors
/// No `CAP_NET_ADMIN`, or the socket is neither established nor closed.
pub fn snapshot(fd: BorrowedFd<'_>, advance: u32) -> io::Result<Snapshot> {
    debug_assert!(advance.is_multiple_of(2), "an odd step would flip the clock's unit bit");
    setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &TCP_REPAIR_ON)?;
    let read = || -> io::Result<Snapshot> {
        let mut write_seq: u32 = 0;
        let mut rcv_nxt: u32 = 0;
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE)?;
        getsockopt(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, &mut write_seq)?;
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE)?;
        getsockopt(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, &mut rcv_nxt)?;
        let ts_now = timestamp(fd)?;
        if advance != 0 {
            setsockopt(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, &ts_now.wrapping_add(advance))?;
        }
        Ok(Snapshot { seqs: Seqs { write_seq, rcv_nxt }, ts_now })
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

/// `TCP_TIMESTAMP`: the socket's timestamp clock now (the TSval it would send).
///
/// # Errors
/// Not a TCP socket.
fn timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: u32 = 0;
    getsockopt(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, &mut v)?;
    Ok(v)
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
