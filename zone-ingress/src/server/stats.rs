//! The metrics scrape, read from the ingress's state: the open flows' live bytes (consistent
//! with the closed totals, see [`crate::flows`]), the kernel path's counters and map occupancy.

use std::{
    os::fd::AsFd as _,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use zone_ingress_ebpf::splice as abi;

use super::{Ingress, Readiness};
use crate::{
    metrics::{self, ClusterSample, KernelSample, MapSample, Memory, PacketSample, Scrape},
    splice::Path,
    sys::bpf,
};

impl Ingress {
    /// Everything a scrape needs from outside the metrics module (the XDP guard's part is
    /// added by its owner).
    #[must_use]
    pub fn scrape(&self) -> Scrape {
        let ingress = self;
        let snap = ingress.snapshot();
        let m = &ingress.metrics;
        let all = m.all_clusters();
        let (clusters, flows_by_mode, bytes_by_mode) = ingress.flows.live_totals(ingress, |t| {
            let clusters: Vec<ClusterSample> = all
                .iter()
                .map(|st| {
                    let (c2b, b2c) = t.by_cluster.get(&st.name).copied().unwrap_or_default();
                    ClusterSample {
                        stats: Arc::clone(st),
                        client_to_backend: st.closed_client_to_backend.load(Ordering::Relaxed) + c2b,
                        backend_to_client: st.closed_backend_to_client.load(Ordering::Relaxed) + b2c,
                    }
                })
                .collect();
            let bytes = Path::ALL.map(|p| {
                let (c, live) = (m.closed_bytes(p), t.by_mode[p.index()]);
                (c.0 + live.0, c.1 + live.1)
            });
            (clusters, t.flows_by_mode, bytes)
        });
        let status = ingress.config_status.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let kernel = ingress.kernel.as_ref().map(|k| {
            let st = k.stats();
            let v = k.verdict_counters();
            let at = |slot: u32| v.get(slot as usize).copied().unwrap_or(0);
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            KernelSample {
                active: k.active(),
                in_flight_bytes: load(&st.in_flight_bytes),
                memory_guard_aborts: load(&st.memory_guard_aborts),
                peer_missing_aborts: load(&st.peer_missing_aborts),
                drain_stalls: load(&st.drain_stalls),
                holds: load(&st.holds),
                grant_holds: at(abi::STAT_OVER_GRANT),
                relayed_bytes: load(&st.relayed_bytes),
                verdicts: vec![
                    ("held", at(abi::STAT_HELD)),
                    ("redirected", at(abi::STAT_REDIRECTED)),
                    ("peer_missing", at(abi::STAT_PEER_MISSING)),
                    ("no_pair", at(abi::STAT_NO_PAIR)),
                    ("empty", at(abi::STAT_EMPTY)),
                ],
                maps: k
                    .map_fds()
                    .into_iter()
                    .map(|(name, fd)| {
                        let max_entries = bpf::max_entries(fd.as_fd()).unwrap_or(abi::MAX_SOCKETS);
                        let entries = bpf::count_u64_keys(fd.as_fd(), u64::from(max_entries)).unwrap_or(0);
                        MapSample { name, entries, max_entries }
                    })
                    .collect(),
            }
        });
        let packet = ingress.packet.as_ref().map(|p| {
            use zone_ingress_ebpf::packet as pabi;
            let st = p.stats();
            let v = p.program_counters();
            let at = |slot: u32| v.get(slot as usize).copied().unwrap_or(0);
            PacketSample {
                active: st.active.load(Ordering::Relaxed),
                total: st.total.load(Ordering::Relaxed),
                refused: st.refused.load(Ordering::Relaxed),
                failed: st.failed.load(Ordering::Relaxed),
                adopted: st.adopted.load(Ordering::Relaxed),
                dormant: st.dormant.load(Ordering::Relaxed),
                ports_held: p.ports_held(),
                program: vec![
                    ("translated", at(pabi::STAT_TRANSLATED)),
                    ("local_ack", at(pabi::STAT_LOCAL_ACK)),
                    ("bad_options", at(pabi::STAT_BAD_OPTIONS)),
                    ("ttl_expired", at(pabi::STAT_TTL)),
                    ("guarded", at(pabi::STAT_GUARDED)),
                    ("syn_seen", at(pabi::STAT_SYN_SEEN)),
                    ("pull_failed", at(pabi::STAT_PULL_FAILED)),
                    ("redirect_failed", at(pabi::STAT_REDIRECT_FAILED)),
                ],
                maps: p
                    .map_entries()
                    .into_iter()
                    .map(|(name, entries, max_entries)| MapSample { name, entries, max_entries })
                    .collect(),
            }
        });
        Scrape {
            listener_address: ingress.listener_addr().map(metrics::listener_label).unwrap_or_default(),
            listener_bound: ingress.listener_bound(),
            open_connections: ingress.open_connections(),
            clusters,
            flows_by_mode,
            bytes_by_mode,
            max_cluster_connections: ingress.options.max_cluster_connections,
            uptime: ingress.uptime(),
            memory: Memory::read(),
            concurrency: std::thread::available_parallelism().map_or(1, usize::from),
            draining: ingress.terminating(),
            ready: ingress.readiness() == Readiness::Ready,
            config_ok: status.ok,
            last_reload_unix: status.last_attempt_unix,
            routes: snap.table.len(),
            subset_routes: snap.table.cached_subsets(),
            kernel,
            packet,
            // Filled by `stats`, which holds the guard.
            xdp: None,
        }
    }
}
