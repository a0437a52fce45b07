//! The kernel programs' object (built from `zone-ingress-ebpf` by `build.rs` and embedded),
//! loaded once per process and shared by the sockmap splice and the XDP guard: each takes its
//! own maps out of it and loads and attaches its own program in it. The programs and maps stay
//! as long as an [`Object`] handle does, except the packet splice's maps when a pin directory is
//! given: those are pinned there (or taken from there, left by an earlier daemon), so the flows
//! they carry outlive the process (docs/design.md#restarts-and-adoption).

use std::{
    path::PathBuf,
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapError, PerCpuArray},
};
use zone_ingress_ebpf::{packet, prefilter, splice};

/// The object built by `build.rs` (empty with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zone-ingress-ebpf"));

/// Why the object, or a part of it, could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the eBPF object is empty: the daemon was built with AYA_BUILD_SKIP=1")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{0} missing from the eBPF object (or already taken)")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// What the object is loaded for: maps a user does not need are created at their smallest.
#[derive(Debug, Clone)]
pub struct Users {
    /// The sockmap splice (its socket maps are large).
    pub splice: bool,
    /// Sources the XDP guard's SYN limit tracks (its bucket map is sized at load).
    pub syn_buckets: u32,
    /// Where the packet splice's maps are pinned (created there, or reused when present).
    pub packet_pins: Option<PathBuf>,
}

/// The loaded object.
pub struct Object {
    ebpf: Mutex<Ebpf>,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object").finish_non_exhaustive()
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

impl Object {
    /// Creates the object's maps (programs are loaded by their users).
    ///
    /// # Errors
    /// The object is empty, or the kernel refused a map.
    pub fn load(users: Users) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        let mut loader = EbpfLoader::new();
        if !users.splice {
            for name in [splice::SOCKS, splice::VERDICT, splice::PAIRS, splice::HOLD, splice::STATS] {
                loader.map_max_entries(name, 1);
            }
            loader.map_max_entries(splice::EVENTS, page_size());
        }
        loader.map_max_entries(prefilter::SYN_BUCKETS, users.syn_buckets);
        let pins: Vec<(&str, PathBuf)> =
            users.packet_pins.iter().flat_map(|dir| packet::PINNED.map(|name| (name, dir.join(name)))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        Ok(Self { ebpf: Mutex::new(loader.load(OBJECT)?) })
    }

    /// Takes map `name` out of the object, typed (`try_from` checks key and value sizes).
    ///
    /// # Errors
    /// No such map (or taken already), or its type or sizes differ from `M`'s.
    pub fn take_map<M>(&self, name: &'static str) -> Result<M, Error>
    where
        M: TryFrom<Map, Error = MapError>,
    {
        let map = self.lock().take_map(name).ok_or(Error::Missing(name))?;
        M::try_from(map).map_err(|source| Error::Map { name, source })
    }

    /// The object itself, to load and attach a program.
    pub fn lock(&self) -> MutexGuard<'_, Ebpf> {
        self.ebpf.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The first `N` slots of a per-CPU counter array, each summed over CPUs (0 where unreadable).
pub fn per_cpu_sums<const N: usize>(map: &Mutex<PerCpuArray<MapData, u64>>) -> [u64; N] {
    let mut out = [0; N];
    let map = map.lock().unwrap_or_else(PoisonError::into_inner);
    for (slot, v) in out.iter_mut().enumerate() {
        if let Ok(values) = map.get(&(slot as u32), 0) {
            *v = values.iter().sum();
        }
    }
    out
}
