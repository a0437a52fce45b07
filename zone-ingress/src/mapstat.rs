//! BPF map occupancy for the metrics: entries (by walking the keys) and capacity (from the
//! map's info), read through duplicated fds so the splice's own map lock is never held.
//!
//! Called per scrape, never on the connection path. Walking costs one `bpf(2)` call per entry;
//! the walk is capped at the map's capacity, so a map that changes under it (a deleted key
//! restarts the walk in the kernel) cannot keep it going: the count is then approximate.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `BPF_MAP_GET_NEXT_KEY` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `bpf_attr` for the map element commands (`map_fd`, `key`, `next_key`, `flags`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info` (the kernel fills at most `info_len` bytes).
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `max_entries` of a map.
///
/// # Errors
/// The `bpf(2)` call failed (not a map fd, no privilege).
pub fn max_entries(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = MapInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?,
        info_len: u32::try_from(size_of::<MapInfoHead>()).unwrap_or(0),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.max_entries)
}

/// Number of keys of a map with 8-byte keys, counting at most `cap`.
///
/// # Errors
/// The first `bpf(2)` call failed for another reason than an empty map.
pub fn count_u64_keys(fd: BorrowedFd<'_>, cap: u64) -> io::Result<u64> {
    let map_fd = u32::try_from(fd.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut key = 0u64;
    let mut next = 0u64;
    let mut count = 0u64;
    let mut first = true;
    while count < cap {
        let mut attr = ElemAttr {
            map_fd,
            // A null key asks for the first one.
            key: if first { 0 } else { std::ptr::from_ref(&key) as u64 },
            next_key: std::ptr::from_mut(&mut next) as u64,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) if first => return Err(e),
            Err(_) => break,
        }
        first = false;
        key = next;
        count += 1;
    }
    Ok(count)
}
