//! Rare events of the kernel programs, written to the daemon's log through aya-log
//! (`AYA_LOGS`, read by `zone-ingress/src/ebpf_log.rs`): an option layout the packet splice does
//! not translate, a FIN/RST or hold report lost to a full ring, a redirect the kernel refused, a
//! full SYN table of the XDP guard. Each is counted too; the log says which flow and why.
//!
//! A kind is logged at most once a second per CPU (`due`), so a peer that retransmits a packet
//! the programs drop, or a flood that fills a map, cannot flood the log.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};

pub(crate) const BAD_OPTIONS: u32 = 0;
pub(crate) const PACKET_EVENT_LOST: u32 = 1;
pub(crate) const PACKET_REDIRECT_FAILED: u32 = 2;
pub(crate) const PACKET_PULL_FAILED: u32 = 3;
pub(crate) const SPLICE_REPORT_LOST: u32 = 4;
pub(crate) const SPLICE_PEER_MISSING: u32 = 5;
pub(crate) const SYN_UNTRACKED: u32 = 6;
const KINDS: u32 = 7;
/// One log line per kind per CPU at most this often.
const EVERY_NS: u64 = 1_000_000_000;

/// When each kind was last logged on this CPU (`bpf_ktime_get_ns`).
#[map(name = "RARE_LOGGED")]
static RARE_LOGGED: PerCpuArray<u64> = PerCpuArray::with_max_entries(KINDS, 0);

/// Whether an event of `kind` may be logged now (and records that it is).
#[inline(always)]
pub(crate) fn due(kind: u32) -> bool {
    let Some(last) = RARE_LOGGED.get_ptr_mut(kind) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot; programs do not nest on one CPU.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < EVERY_NS {
            return false;
        }
        *last = now;
    }
    true
}
