//! BPF maps through plain `bpf(2)` calls: element access shared by threads without a lock
//! ([`BpfMap`]), and occupancy for the metrics ([`max_entries`], [`count_u64_keys`]).

use std::{
    io,
    marker::PhantomData,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

/// `bpf(2)` commands (`include/uapi/linux/bpf.h`, `enum bpf_cmd`).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The kernel's `ENOTSUPP` (include/linux/errno.h), which `bpf(2)` returns for a batch command
/// the map type lacks.
const ENOTSUPP: i32 = 524;

/// One `bpf(2)` call with `attr`, a valid, initialised `bpf_attr` prefix of its own size.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size passed; the pointers
    // inside it are the callers' contract.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `bpf_attr` of the map element commands (`map_fd`, `key`, `value` or `next_key`, `flags`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` of the batch commands (`in_batch`, `out_batch`, `keys`, `values`, `count`,
/// `map_fd`, `elem_flags`, `flags`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn map_fd(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// A BPF map used through its fd with plain `bpf(2)` element commands. Each command is atomic in
/// the kernel, so threads share one `BpfMap` without a lock (aya's map types take `&mut self`
/// to update).
///
/// `K` and `V` must be the map's key and value types (plain data of exactly the map's key and
/// value sizes): check that once, e.g. with aya's typed `try_from`, before [`BpfMap::new`].
#[derive(Debug)]
pub struct BpfMap<K, V> {
    fd: OwnedFd,
    _types: PhantomData<fn(K) -> V>,
}

impl<K: Copy, V: Copy> BpfMap<K, V> {
    /// Wraps `fd`, a map whose key and value types are `K` and `V` (see the type's docs).
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd, _types: PhantomData }
    }

    /// One element command; `flags` 0 (`BPF_ANY` for updates). `value` points to a live `V` (or
    /// is 0 for a delete).
    fn call(&self, cmd: libc::c_long, key: &K, value: u64) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: map_fd(self.fd.as_fd())?,
            key: std::ptr::from_ref(key) as u64,
            value,
            ..ElemAttr::default()
        };
        // `key` points to a live `K` and `value` (if non-zero) to a live `V` the kernel reads or
        // writes in full, which are the map's key and value sizes (the type's contract).
        bpf(cmd, &mut attr)
    }

    /// The value at `key` (`ENOENT` if there is none).
    pub fn get(&self, key: &K) -> io::Result<V> {
        let mut out = MaybeUninit::<V>::uninit();
        self.call(BPF_MAP_LOOKUP_ELEM, key, out.as_mut_ptr() as u64)?;
        // SAFETY: the lookup succeeded, so the kernel wrote a whole value of `V`'s size.
        Ok(unsafe { out.assume_init() })
    }

    /// Inserts or replaces the value at `key` (`BPF_ANY`).
    pub fn insert(&self, key: &K, value: &V) -> io::Result<()> {
        self.call(BPF_MAP_UPDATE_ELEM, key, std::ptr::from_ref(value) as u64)
    }

    /// Removes `key` (`ENOENT` if absent).
    pub fn remove(&self, key: &K) -> io::Result<()> {
        self.call(BPF_MAP_DELETE_ELEM, key, 0)
    }

    /// Inserts or replaces each of `entries` in order (`BPF_ANY`), with one
    /// `BPF_MAP_UPDATE_BATCH`: as one call of [`Self::insert`] per entry would, it stops at the
    /// first that fails, leaving those before it in place.
    ///
    /// # Errors
    /// The first entry that failed, as `insert` would have failed.
    pub fn insert_all<const N: usize>(&self, entries: [(K, V); N]) -> io::Result<()> {
        let keys: [K; N] = entries.map(|(k, _)| k);
        let values: [V; N] = entries.map(|(_, v)| v);
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: u32::try_from(N).unwrap_or(u32::MAX),
            map_fd: map_fd(self.fd.as_fd())?,
            ..BatchAttr::default()
        };
        // `keys` and `values` hold `count` keys and values of the map's sizes (the type's
        // contract); the kernel reads them and writes back in `count` how many it stored.
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => Ok(()),
            // A kernel without batch updates for this map refuses before storing anything (and
            // leaves `count` as it was): one call per entry.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                keys.iter().zip(&values).try_for_each(|(k, v)| self.insert(k, v))
            }
            Err(e) => Err(e),
        }
    }

    /// Removes every key of `keys` that is in the map, with `BPF_MAP_DELETE_BATCH`: one system
    /// call for all of them, plus one per absent key (the kernel stops at one; it is skipped).
    /// Where the kernel has no batch deletion for the map, one call per key. Returns how many
    /// were removed.
    pub fn remove_batch(&self, keys: &[K]) -> usize {
        let Ok(fd) = map_fd(self.fd.as_fd()) else { return 0 };
        let (mut at, mut removed) = (0, 0);
        while at < keys.len() {
            let rest = &keys[at..];
            let mut attr = BatchAttr {
                keys: rest.as_ptr() as u64,
                count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
                map_fd: fd,
                ..BatchAttr::default()
            };
            // `keys` holds `count` keys of the map's key size (the type's contract); the kernel
            // reads them and writes back in `count` how many it removed.
            let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
            let n = (attr.count as usize).min(rest.len());
            match r {
                Ok(()) => {
                    removed += n;
                    break;
                }
                // The key after the `n` removed is not in the map.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    removed += n;
                    at += n + 1;
                }
                // Refused before or during the work (`count` then says nothing reliable, e.g.
                // a kernel without batch deletion for this map): one call per key; a key
                // already removed answers `ENOENT`.
                Err(_) => {
                    removed += rest.iter().filter(|k| self.remove(k).is_ok()).count();
                    break;
                }
            }
        }
        removed
    }

    /// The map's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl<K: Copy + Default, V: Copy + Default> BpfMap<K, V> {
    /// Calls `f` with each element of a hash map, read [`BATCH`] at a time with
    /// `BPF_MAP_LOOKUP_BATCH` (a few system calls for thousands of elements, where a walk takes
    /// two per element), at most about `cap` of them. Elements added or removed meanwhile may
    /// be seen or not, none twice (the kernel walks bucket by bucket).
    ///
    /// # Errors
    /// A `bpf(2)` call failed for another reason than the end of the map.
    pub fn for_each(&self, cap: usize, mut f: impl FnMut(&K, &V)) -> io::Result<()> {
        let mut keys = vec![K::default(); BATCH];
        let mut values = vec![V::default(); BATCH];
        // A hash map's position is a bucket number.
        let (mut at, mut next) = (0u32, 0u32);
        let mut first = true;
        let mut seen = 0;
        while seen < cap {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { std::ptr::from_ref(&at) as u64 },
                out_batch: std::ptr::from_mut(&mut next) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: u32::try_from(BATCH).unwrap_or(u32::MAX),
                map_fd: map_fd(self.fd.as_fd())?,
                ..BatchAttr::default()
            };
            // `keys` and `values` hold `BATCH` elements of the map's key and value sizes (the
            // type's contract); the kernel writes `count` of each, and one `u32` at `next`.
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            // The end of the map comes with its last elements; another error, with none.
            let end = match r {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Err(e) => return Err(e),
            };
            let n = (attr.count as usize).min(BATCH);
            for i in 0..n {
                f(&keys[i], &values[i]);
            }
            seen += n;
            if end {
                return Ok(());
            }
            at = next;
            first = false;
        }
        Ok(())
    }
}

/// Elements per `BPF_MAP_LOOKUP_BATCH` call: more than one hash bucket ever holds (the call
/// fails with `ENOSPC` below a bucket's size).
const BATCH: usize = 1024;

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

/// `max_entries` of a map. Called per scrape, never on the connection path.
///
/// # Errors
/// The `bpf(2)` call failed (not a map fd, no privilege).
pub fn max_entries(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = MapInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: map_fd(fd)?,
        info_len: u32::try_from(size_of::<MapInfoHead>()).unwrap_or(0),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.max_entries)
}

/// Number of keys of a map with 8-byte keys, counting at most `cap`. Called per scrape: one
/// `bpf(2)` call per entry, capped at `cap`, so a map that changes under the walk (a deleted
/// key restarts it in the kernel) cannot keep it going; the count is then approximate.
///
/// # Errors
/// The first `bpf(2)` call failed for another reason than an empty map.
pub fn count_u64_keys(fd: BorrowedFd<'_>, cap: u64) -> io::Result<u64> {
    count_keys::<u64>(fd, cap)
}

/// [`count_u64_keys`] for a map whose keys are `K` (plain data of the map's key size).
///
/// # Errors
/// The first `bpf(2)` call failed for another reason than an empty map.
pub fn count_keys<K: Copy + Default>(fd: BorrowedFd<'_>, cap: u64) -> io::Result<u64> {
    let mut count = 0u64;
    for_each_key::<K>(fd, cap, |_| count += 1)?;
    Ok(count)
}

/// Calls `f` with each key of a map whose keys are `K`, at most `cap` of them (a map that
/// changes under the walk may show a key twice or not at all, as [`count_u64_keys`] says).
///
/// # Errors
/// The first `bpf(2)` call failed for another reason than an empty map.
pub fn for_each_key<K: Copy + Default>(fd: BorrowedFd<'_>, cap: u64, mut f: impl FnMut(K)) -> io::Result<()> {
    let fd = map_fd(fd)?;
    let mut key = K::default();
    let mut next = K::default();
    let mut count = 0u64;
    let mut first = true;
    while count < cap {
        let mut attr = ElemAttr {
            map_fd: fd,
            // A null key asks for the first one.
            key: if first { 0 } else { std::ptr::from_ref(&key) as u64 },
            value: std::ptr::from_mut(&mut next) as u64,
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
        f(key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    /// A hash map of `u64` keys and values (needs `CAP_BPF`: the tests run as root).
    fn hash_map(max_entries: u32) -> BpfMap<u64, u64> {
        /// `bpf_attr` of `BPF_MAP_CREATE`, up to `map_flags`.
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_HASH: u32 = 1;
        let mut attr =
            CreateAttr { map_type: BPF_MAP_TYPE_HASH, key_size: 8, value_size: 8, max_entries, map_flags: 0 };
        // SAFETY: a valid `bpf_attr` prefix of its own size.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &raw mut attr, size_of::<CreateAttr>()) };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: a new descriptor this test owns.
        BpfMap::new(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) })
    }

    #[test]
    fn remove_batch_skips_absent_keys_and_removes_the_rest() {
        let m = hash_map(64);
        for k in 0..10u64 {
            m.insert(&k, &(k * 10)).expect("insert");
        }
        // Absent keys first, in the middle and last; one present key twice.
        let keys = [100, 1, 2, 101, 3, 3, 9, 102];
        assert_eq!(m.remove_batch(&keys), 4);
        let mut left: Vec<u64> = Vec::new();
        m.for_each(64, |k, v| {
            assert_eq!(*v, k * 10);
            left.push(*k);
        })
        .expect("walk");
        left.sort_unstable();
        assert_eq!(left, [0, 4, 5, 6, 7, 8]);
        assert_eq!(m.remove_batch(&[]), 0);
        assert_eq!(m.remove_batch(&[0, 4, 5, 6, 7, 8]), 6);
        assert!(matches!(m.get(&0), Err(e) if e.raw_os_error() == Some(libc::ENOENT)));
    }

    #[test]
    fn insert_all_stores_every_entry_and_stops_at_the_first_that_fails() {
        let m = hash_map(3);
        m.insert_all([(1, 10), (2, 20)]).expect("two entries");
        assert_eq!((m.get(&1).expect("1"), m.get(&2).expect("2")), (10, 20));
        m.insert_all([(1, 11)]).expect("a replacement");
        assert_eq!(m.get(&1).expect("1"), 11);
        // Room for one more: the second new key does not fit, the third is never tried.
        let e = m.insert_all([(3, 30), (4, 40), (5, 50)]).expect_err("the map is full");
        assert_eq!(e.raw_os_error(), Some(libc::E2BIG), "{e}");
        assert_eq!(m.get(&3).expect("3"), 30);
        assert!(m.get(&4).is_err() && m.get(&5).is_err());
    }
}
