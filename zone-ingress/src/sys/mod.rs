//! Thin, checked wrappers over the socket options and ioctls the handoff and close logic need.
//! Every function takes a borrowed fd and returns `io::Result`; nothing here owns a socket.
//! BPF maps are in [`bpf`], epoll sets in [`epoll`].

pub mod bpf;
pub mod epoll;
pub mod net;
pub mod tcp;

use std::{
    io,
    mem::{self, size_of},
    os::fd::{AsRawFd, BorrowedFd},
    time::Duration,
};

pub use bpf::BpfMap;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

pub(crate) fn setsockopt<T>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` and the length passed is its size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    check(ret).map(drop)
}

pub(crate) fn getsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &mut T,
) -> io::Result<usize> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is writable for `len` bytes; the kernel writes at most `len`.
    let ret = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, std::ptr::from_mut(value).cast(), &raw mut len) };
    check(ret).map(|_| len as usize)
}

/// `p` as a NUL-terminated string for a system call.
///
/// # Errors
/// `p` holds a NUL byte.
pub fn c_path(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

/// `SO_COOKIE`: the socket's boot-unique 64-bit id, the key of every BPF map entry.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, &mut cookie)?;
    Ok(cookie)
}

/// `TCPI_OPT_ECN` of [`TcpInfo::options`]: the connection negotiated ECN (RFC 3168).
pub const TCPI_OPT_ECN: u8 = 8;

/// The prefix of `struct tcp_info` (include/uapi/linux/tcp.h) up to `tcpi_bytes_received`,
/// which every kernel since 4.2 fills. glibc's older definition stops before these fields.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TcpInfo {
    /// `tcpi_state`, `tcpi_ca_state`, ... (eight `__u8`, bitfields included).
    pub head: [u8; 8],
    /// `tcpi_rto` through `tcpi_total_retrans`.
    pub u32s: [u32; 24],
    pub pacing_rate: u64,
    pub max_pacing_rate: u64,
    /// RFC 4898 tcpEStatsAppHCThruOctetsAcked: bytes of ours the peer acknowledged.
    pub bytes_acked: u64,
    /// RFC 4898 tcpEStatsAppHCThruOctetsReceived: sequence space received, FIN included.
    pub bytes_received: u64,
}

impl TcpInfo {
    /// The TCP state (`TCP_ESTABLISHED` = 1, `TCP_CLOSE_WAIT` = 8, ...).
    pub fn state(&self) -> u8 {
        self.head[0]
    }

    /// `tcpi_options`: `TCPI_OPT_TIMESTAMPS` (1), `_SACK` (2), `_WSCALE` (4), `_ECN` (8).
    pub fn options(&self) -> u8 {
        self.head[5]
    }

    /// `tcpi_snd_wscale`: the scale the peer applies to the windows it advertises.
    pub fn snd_wscale(&self) -> u8 {
        self.head[6] & 0x0f
    }

    /// `tcpi_rcv_wscale`: the scale this socket applies to the windows it advertises.
    pub fn rcv_wscale(&self) -> u8 {
        self.head[6] >> 4
    }
}

/// `TCP_INFO`. Fails if the kernel returned less than the fields we read.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut info = TcpInfo::default();
    let len = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    if len < size_of::<TcpInfo>() {
        return Err(io::Error::other(format!("TCP_INFO returned {len} bytes, need {}", size_of::<TcpInfo>())));
    }
    Ok(info)
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests write one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, &raw mut value) })?;
    Ok(u32::try_from(value).unwrap_or(0))
}

/// `SIOCOUTQ`: bytes in the send queue not yet acknowledged (unsent included).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// `SIOCINQ`: unread bytes in the TCP receive queue. Meaningless once the socket is in a sockmap.
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, libc::FIONREAD)
}

/// `SO_RCVLOWAT`: readable only once `bytes` are queued. Setting it also makes TCP re-evaluate
/// data-ready, which is how the handoff kicks a socket that already holds bytes.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, &v)
}

/// `recv(MSG_DONTWAIT)`.
pub fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `send(MSG_DONTWAIT | MSG_NOSIGNAL)`.
pub fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    let n =
        unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Re-sets `SO_SNDBUF` to its current size. The kernel then calls the socket's write-space
/// callback, which for a socket in a sockmap reschedules its psock worker: a nudge for bytes
/// that wait in the psock queue while the send buffer has room.
pub fn poke_write_space(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut v: libc::c_int = 0;
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &mut v)?;
    // getsockopt reports the doubled value the kernel keeps; setsockopt doubles what it gets.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &(v / 2).max(1))
}

/// Whether `fd` has room to write now (`poll` with `POLLOUT`, no wait). A TCP socket found full
/// is marked so that its next freed space wakes `EPOLLOUT` waiters.
pub fn writable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    if unsafe { libc::poll(&raw mut p, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & libc::POLLOUT != 0)
}

/// Returns the allocator's free pages to the kernel (`malloc_trim`), wherever they are in the
/// heap; other threads keep allocating meanwhile. A no-op where the C library has no such call.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `SO_LINGER {on, 0}`: the next close sends RST instead of FIN.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &l)
}

/// `TCP_NODELAY`.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &1 as &libc::c_int)
}

/// Keepalive probes: once a socket is spliced the daemon never reads it, so only the kernel can
/// notice an idle peer that vanished. No `TCP_USER_TIMEOUT`: it also ends a connection whose
/// peer answers zero-window probes but keeps its window closed that long (`tcp_probe_timer`),
/// i.e. a live reader that pauses; unacknowledged data to a dead peer still ends the connection
/// after the kernel's retransmission limit (`tcp_retries2`), as in Envoy.
pub fn set_dead_peer_detection(fd: BorrowedFd<'_>, idle: Duration, interval: Duration, probes: u32) -> io::Result<()> {
    let secs = |d: Duration| libc::c_int::try_from(d.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &1 as &libc::c_int)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &secs(idle))?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, &secs(interval))?;
    let probes_c = libc::c_int::try_from(probes).unwrap_or(9);
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, &probes_c)
}

/// `TCP_USER_TIMEOUT`: data unacknowledged (or a zero window not reopened) for this long ends
/// the connection with `ETIMEDOUT`.
pub fn set_user_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, &ms)
}

/// `SO_ERROR`: the pending socket error, cleared by reading it.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut err)?;
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// `shutdown(fd, SHUT_WR)`: queue a FIN after whatever is in the send queue.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

/// Fixes glibc's thresholds, which it otherwise raises as large blocks are freed: after the
/// tables of many flows were freed, a thread arena kept up to twice the largest of them resident
/// at its top, which `malloc_trim` does not give back outside the main arena
/// (docs/design.md#dormant-flows). Blocks from 256 KiB are mapped on their own, and an arena
/// gives back its top beyond 1 MiB. Nothing with another libc.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt(3) has no preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Gives the allocator's free pages back to the system (glibc's `malloc_trim`; nothing with
/// another libc).
pub fn malloc_trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim(3) has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns()` stamps with.
pub fn monotonic_ns() -> u64 {
    // SAFETY: `ts` is a valid out-pointer.
    let mut ts: libc::timespec = unsafe { mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A socket address as raw `sockaddr_in`/`sockaddr_in6` bytes and its length.
pub fn sockaddr(a: std::net::SocketAddr) -> ([u8; 28], libc::socklen_t) {
    let mut out = [0u8; 28];
    match a {
        std::net::SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in is 16 plain bytes, within the 28-byte buffer.
            unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast(), sin) };
            (out, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        std::net::SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 is 28 plain bytes, the buffer's size.
            unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast(), sin6) };
            (out, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// `CAP_PERFMON` (include/uapi/linux/capability.h).
pub const CAP_PERFMON: u32 = 38;

/// Whether capability `cap` is in this thread's effective set (`capget`).
///
/// # Errors
/// `capget` failed.
pub fn has_capability(cap: u32) -> io::Result<bool> {
    /// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
    const VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills `data` (two entries for version 3) and reads `header`.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let word = data.get((cap / 32) as usize).map_or(0, |d| d.effective);
    Ok(word & (1 << (cap % 32)) != 0)
}
