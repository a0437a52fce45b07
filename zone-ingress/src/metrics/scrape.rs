//! What a scrape reads from outside the metrics module: the open flows' live bytes, the kernel
//! path's counters and maps, the XDP guard, the process's memory. The server gathers it
//! (`crate::server::Ingress::scrape`); the families are built from it.

use std::{sync::Arc, time::Duration};

use super::ClusterStats;

/// Process memory as the allocator sees it (glibc `mallinfo2`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub heap_size: u64,
    pub allocated: u64,
}

impl Memory {
    /// Reads the allocator's counters (walks its arenas: call per scrape, not per connection).
    #[must_use]
    pub fn read() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallinfo2 has no preconditions and returns a plain struct.
            let mi = unsafe { libc::mallinfo2() };
            Self { heap_size: (mi.arena + mi.hblkhd) as u64, allocated: (mi.uordblks + mi.hblkhd) as u64 }
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        {
            Self::default()
        }
    }
}

/// One cluster in a scrape: its counters, and its bytes (closed flows plus the live counters of
/// open ones, read consistently; see [`crate::flows`]).
#[derive(Debug)]
pub struct ClusterSample {
    pub stats: Arc<ClusterStats>,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Occupancy of one BPF map.
#[derive(Debug, Clone)]
pub struct MapSample {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

/// The packet path's state in a scrape.
#[derive(Debug, Default)]
pub struct PacketSample {
    /// Flows translated now (lingering ones included).
    pub active: usize,
    pub total: u64,
    pub refused: u64,
    pub failed: u64,
    /// Flows taken over from an earlier daemon at start.
    pub adopted: u64,
    /// Flows kept as map entries only.
    pub dormant: usize,
    /// (endpoint, source port) pairs the packet splice holds.
    pub ports_held: usize,
    /// Program counters by name.
    pub program: Vec<(&'static str, u64)>,
    pub maps: Vec<MapSample>,
}

/// The kernel path's state in a scrape.
#[derive(Debug, Default)]
pub struct KernelSample {
    pub active: usize,
    pub in_flight_bytes: u64,
    pub memory_guard_aborts: u64,
    pub peer_missing_aborts: u64,
    pub drain_stalls: u64,
    pub holds: u64,
    pub grant_holds: u64,
    pub relayed_bytes: u64,
    pub verdicts: Vec<(&'static str, u64)>,
    pub maps: Vec<MapSample>,
}

/// State read at scrape time from outside this module.
#[derive(Debug, Default)]
pub struct Scrape {
    /// `envoy_listener_address` of the configured listener.
    pub listener_address: String,
    pub listener_bound: bool,
    /// Client connections open now (routing, relayed or spliced).
    pub open_connections: usize,
    /// Clusters with counters, with the live bytes of their open flows.
    pub clusters: Vec<ClusterSample>,
    /// Open flows, and bytes of closed plus open flows (client → backend, backend → client),
    /// per path (kernel, userspace).
    pub flows_by_mode: [usize; 3],
    pub bytes_by_mode: [(u64, u64); 3],
    pub max_cluster_connections: usize,
    pub uptime: Duration,
    pub memory: Memory,
    pub concurrency: usize,
    pub draining: bool,
    pub ready: bool,
    /// The last configuration load succeeded.
    pub config_ok: bool,
    pub last_reload_unix: f64,
    pub routes: usize,
    pub subset_routes: usize,
    pub kernel: Option<KernelSample>,
    pub packet: Option<PacketSample>,
    /// The XDP guard, when attached.
    pub xdp: Option<XdpSample>,
}

/// The XDP guard's state in a scrape ([`crate::xdp::Guard`]).
#[derive(Debug, Default)]
pub struct XdpSample {
    /// Packets per reason (`passed` and the drop reasons), summed over CPUs.
    pub packets: Vec<(&'static str, u64)>,
    /// Attached interfaces and their mode (`native` or `generic`).
    pub interfaces: Vec<(String, &'static str)>,
    /// Prefixes in the allow and deny lists.
    pub allow: usize,
    pub deny: usize,
}
