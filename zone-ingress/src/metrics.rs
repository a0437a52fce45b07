//! Process-wide counters. Plain atomics on the connection path; the admin server (and tests)
//! read them.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Upper bounds (µs) of the handoff-latency histogram buckets (accept → spliced).
pub const HANDOFF_BUCKETS_US: [u64; 12] = [25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000];

/// A fixed-bucket histogram (cumulative on export, as Prometheus wants).
#[derive(Debug, Default)]
pub struct Histogram {
    pub buckets: [AtomicU64; HANDOFF_BUCKETS_US.len()],
    pub count: AtomicU64,
    pub sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = HANDOFF_BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Counters of the listener and the connection path.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Accepted client connections.
    pub accepted: AtomicU64,
    /// Client connections currently open (from accept until both sides are closed).
    pub active: AtomicU64,
    /// ClientHello parsing (Envoy's tls_inspector counters).
    pub tls_found: AtomicU64,
    pub tls_not_found: AtomicU64,
    pub sni_found: AtomicU64,
    pub sni_not_found: AtomicU64,
    pub client_hello_too_large: AtomicU64,
    /// Connections handed to the kernel splice.
    pub spliced_kernel: AtomicU64,
    /// Connections relayed in userspace.
    pub spliced_userspace: AtomicU64,
    /// Connections that `auto` meant to splice in the kernel but served in userspace.
    pub kernel_fallbacks: AtomicU64,
    /// Backend connect attempts that failed.
    pub connect_failures: AtomicU64,
    /// Bytes moved in each direction by connections that have closed.
    pub client_to_backend_bytes: AtomicU64,
    pub backend_to_client_bytes: AtomicU64,
    /// Accept → spliced latency.
    pub handoff: Histogram,
    /// Closed connections by close reason.
    closes: Mutex<BTreeMap<&'static str, u64>>,
    /// Rejected connections (closed without a backend) by reason.
    rejects: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn reject(&self, reason: &'static str) {
        *self.rejects.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(reason).or_default() += 1;
    }

    pub fn closed(&self, reason: &'static str) {
        *self.closes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(reason).or_default() += 1;
    }

    /// Rejects by reason.
    pub fn rejects(&self) -> BTreeMap<&'static str, u64> {
        self.rejects.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Closes by reason.
    pub fn closes(&self) -> BTreeMap<&'static str, u64> {
        self.closes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}
