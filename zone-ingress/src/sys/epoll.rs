//! epoll for the splice monitor threads: sets with sub-millisecond waits, and an eventfd to
//! wake a thread from another one.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// A new epoll set (close-on-exec).
pub fn create() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 has no preconditions; it returns a new fd or -1.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

/// A new non-blocking eventfd (close-on-exec).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no preconditions; it returns a new fd or -1.
    owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by a creating call and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter (never blocks: the eventfd is non-blocking).
pub fn signal(eventfd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a live buffer to an eventfd.
    unsafe { libc::write(eventfd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Reads (and so resets) an eventfd's counter.
pub fn clear(eventfd: BorrowedFd<'_>) {
    let mut count = [0u8; 8];
    // SAFETY: reading 8 bytes into a live buffer from a non-blocking eventfd.
    unsafe { libc::read(eventfd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
}

fn ctl(epoll: BorrowedFd<'_>, op: libc::c_int, fd: i32, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: (re)registering a live fd the caller keeps open, with a valid event.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &raw mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Adds `fd` to `epoll` for `events` with `token`.
pub fn add(epoll: BorrowedFd<'_>, fd: i32, events: u32, token: u64) -> io::Result<()> {
    ctl(epoll, libc::EPOLL_CTL_ADD, fd, events, token)
}

/// Changes the events of `fd`, registered in `epoll` with `token`.
pub fn modify(epoll: BorrowedFd<'_>, fd: i32, events: u32, token: u64) -> io::Result<()> {
    ctl(epoll, libc::EPOLL_CTL_MOD, fd, events, token)
}

/// `epoll_pwait2`: like `epoll_wait` with a timeout finer than a millisecond. Returns how many
/// entries of `events` were filled.
pub fn wait(epoll: BorrowedFd<'_>, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `events` is valid for `max` entries, `ts` lives across the call, no signal mask.
    let n = unsafe {
        libc::syscall(
            SYS_EPOLL_PWAIT2,
            epoll.as_raw_fd(),
            events.as_mut_ptr(),
            max,
            &raw const ts,
            std::ptr::null::<libc::sigset_t>(),
            0usize,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `epoll_pwait2` (Linux 5.11), the same number on every architecture of the generic table.
const SYS_EPOLL_PWAIT2: libc::c_long = 441;
