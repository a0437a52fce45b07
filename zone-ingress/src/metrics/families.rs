//! The metric families of one scrape, with Envoy's names and labels
//! ([docs/metrics.md](../../../docs/metrics.md)). Families are built by hand rather than
//! through the `prometheus` crate's `Counter` types so that names stay exactly Envoy's (no
//! `_total` rewriting) and label sets follow the route table across reloads.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus::proto::{self, MetricFamily, MetricType};

use super::{Buckets, CLOSE_REASONS, Histogram, MODES, Metrics, Scrape};
use crate::reject::RejectReason;

impl Metrics {
    /// All metric families for one scrape, sorted by name.
    #[must_use]
    pub fn gather(&self, s: &Scrape) -> Vec<MetricFamily> {
        let mut f = Families::default();
        self.listener_families(&mut f, s);
        self.cluster_families(&mut f, s);
        self.server_families(&mut f, s);
        self.own_families(&mut f, s);
        f.0.into_values().collect()
    }

    fn listener_families(&self, f: &mut Families, s: &Scrape) {
        let l = [("envoy_listener_address", s.listener_address.as_str())];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        f.counter("envoy_listener_downstream_cx_total", "Accepted client connections.", &l, get(&self.accepted));
        f.gauge("envoy_listener_downstream_cx_active", "Open client connections.", &l, s.open_connections as f64);
        f.counter("envoy_listener_downstream_cx_destroy", "Client connections that ended.", &l, get(&self.destroyed));
        f.counter(
            "envoy_listener_downstream_cx_overflow",
            "Closed at once: --max-pending-handshakes connections were waiting for their ClientHello.",
            &l,
            get(&self.rejects[RejectReason::HandshakeOverflow.index()]),
        );
        f.counter(
            "envoy_listener_downstream_cx_overload_reject",
            "Refused by an overload manager (none runs).",
            &l,
            0.0,
        );
        f.counter(
            "envoy_listener_downstream_global_cx_overflow",
            "Refused by a global connection limit (none is set).",
            &l,
            0.0,
        );
        f.counter(
            "envoy_listener_downstream_pre_cx_timeout",
            "ClientHello not complete in time.",
            &l,
            get(&self.pre_cx_timeout),
        );
        f.counter(
            "envoy_listener_no_filter_chain_match",
            "Connections with an unknown or missing SNI, or not TLS.",
            &l,
            get(&self.no_filter_chain_match),
        );
        for name in [
            "envoy_listener_ssl_handshake",
            "envoy_listener_ssl_fail_verify_error",
            "envoy_listener_ssl_connection_error",
        ] {
            f.counter(name, "Always 0: TLS passes through, it is never terminated here.", &l, 0.0);
        }
        f.gauge(
            "envoy_listener_manager_total_listeners_active",
            "1 while the passthrough listener is bound.",
            &[],
            f64::from(u8::from(s.listener_bound)),
        );
        let tls = [
            ("envoy_tls_inspector_tls_found", "Connections that started with a TLS ClientHello.", &self.tls_found),
            ("envoy_tls_inspector_tls_not_found", "Connections that did not start with TLS.", &self.tls_not_found),
            ("envoy_tls_inspector_sni_found", "ClientHellos with a server_name.", &self.sni_found),
            ("envoy_tls_inspector_sni_not_found", "ClientHellos without a server_name.", &self.sni_not_found),
            (
                "envoy_tls_inspector_client_hello_too_large",
                "ClientHellos larger than the peek limit.",
                &self.client_hello_too_large,
            ),
        ];
        for (name, help, v) in tls {
            f.counter(name, help, &[], get(v));
        }
    }

    fn cluster_families(&self, f: &mut Families, s: &Scrape) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        for c in &s.clusters {
            let st = &c.stats;
            let l = [("envoy_cluster_name", st.stat_name.as_str())];
            let t = [("envoy_tcp_prefix", st.tcp_prefix.as_str())];
            let (c2b, b2c) = (c.client_to_backend, c.backend_to_client);
            f.counter(
                "envoy_tcp_downstream_cx_total",
                "Connections routed through this prefix.",
                &t,
                get(&st.downstream_cx_total),
            );
            f.counter(
                "envoy_tcp_downstream_cx_rx_bytes_total",
                "Bytes received from clients (BPF counters for spliced flows).",
                &t,
                c2b as f64,
            );
            f.counter(
                "envoy_tcp_downstream_cx_tx_bytes_total",
                "Bytes sent to clients (BPF counters for spliced flows).",
                &t,
                b2c as f64,
            );
            f.counter("envoy_tcp_idle_timeout", "Flows closed by the idle timeout.", &t, get(&st.idle_timeout));

            f.counter("envoy_cluster_upstream_cx_total", "Upstream connect attempts.", &l, get(&st.upstream_cx_total));
            f.gauge(
                "envoy_cluster_upstream_cx_active",
                "Connections counted against the cluster cap.",
                &l,
                st.active() as f64,
            );
            f.counter(
                "envoy_cluster_upstream_cx_connect_fail",
                "Failed connect attempts.",
                &l,
                get(&st.upstream_cx_connect_fail),
            );
            f.counter(
                "envoy_cluster_upstream_cx_connect_timeout",
                "Connect attempts that timed out.",
                &l,
                get(&st.upstream_cx_connect_timeout),
            );
            f.counter(
                "envoy_cluster_upstream_cx_overflow",
                "Connections refused by the per-cluster cap.",
                &l,
                get(&st.upstream_cx_overflow),
            );
            f.counter(
                "envoy_cluster_upstream_cx_none_healthy",
                "Connections whose subset had no healthy endpoint.",
                &l,
                get(&st.upstream_cx_none_healthy),
            );
            f.counter(
                "envoy_cluster_upstream_cx_destroy",
                "Upstream flows that closed.",
                &l,
                get(&st.upstream_cx_destroy),
            );
            f.histogram(
                "envoy_cluster_upstream_cx_connect_ms",
                "Time to connect to an endpoint, ms (successful connects).",
                &l,
                &st.upstream_cx_connect_ms,
            );
            f.histogram(
                "envoy_cluster_upstream_cx_length_ms",
                "Upstream connection lifetime, ms, observed when the flow closes.",
                &l,
                &st.upstream_cx_length_ms,
            );
            f.counter(
                "envoy_cluster_upstream_cx_rx_bytes_total",
                "Bytes received from the cluster's endpoints.",
                &l,
                b2c as f64,
            );
            f.counter(
                "envoy_cluster_upstream_cx_tx_bytes_total",
                "Bytes sent to the cluster's endpoints.",
                &l,
                c2b as f64,
            );
            f.gauge(
                "envoy_cluster_circuit_breakers_default_cx_open",
                "1 while the per-cluster connection cap is reached.",
                &l,
                f64::from(u8::from(st.active() >= s.max_cluster_connections)),
            );
            f.gauge(
                "envoy_cluster_membership_healthy",
                "Healthy endpoints in the current table.",
                &l,
                st.membership_healthy.load(Ordering::Relaxed) as f64,
            );
            f.gauge(
                "envoy_cluster_membership_total",
                "All inbounds of the cluster in the inventory.",
                &l,
                st.membership_total.load(Ordering::Relaxed) as f64,
            );
            f.counter(
                "envoy_cluster_update_success",
                "Configuration loads that kept this cluster.",
                &l,
                get(&st.update_success),
            );
            f.counter(
                "envoy_cluster_update_rejected",
                "Configuration loads rejected while this cluster was served.",
                &l,
                get(&st.update_rejected),
            );
            // Request-level series: a TCP passthrough never sees a request.
            for name in [
                "envoy_cluster_upstream_rq_total",
                "envoy_cluster_upstream_rq_retry",
                "envoy_cluster_upstream_rq_retry_success",
                "envoy_cluster_upstream_rq_timeout",
                "envoy_cluster_upstream_rq_pending_overflow",
                "envoy_cluster_upstream_cx_pool_overflow",
                "envoy_cluster_upstream_cx_destroy_remote_with_active_rq",
            ] {
                f.counter(name, "Always 0: request-level, and this is a TCP passthrough.", &l, 0.0);
            }
            for name in [
                "envoy_cluster_circuit_breakers_default_rq_open",
                "envoy_cluster_circuit_breakers_default_rq_pending_open",
                "envoy_cluster_circuit_breakers_default_rq_retry_open",
            ] {
                f.gauge(name, "Always 0: request-level, and this is a TCP passthrough.", &l, 0.0);
            }
        }
    }

    fn server_families(&self, f: &mut Families, s: &Scrape) {
        let cp_mode = self.cp_mode.load(Ordering::Relaxed);
        // File mode counts the startup load; control-plane mode counts only the updates.
        let startup = u64::from(!cp_mode);
        let attempts = (self.reload_success.load(Ordering::Relaxed)
            + self.reload_failure.load(Ordering::Relaxed)
            + startup) as f64;
        let ok = (self.reload_success.load(Ordering::Relaxed) + startup) as f64;
        let rejected = self.reload_failure.load(Ordering::Relaxed) as f64;
        f.gauge("envoy_server_uptime", "Seconds since start.", &[], s.uptime.as_secs() as f64);
        f.gauge(
            "envoy_server_memory_heap_size",
            "Heap reserved by the allocator, bytes.",
            &[],
            s.memory.heap_size as f64,
        );
        f.gauge("envoy_server_memory_allocated", "Heap in use, bytes.", &[], s.memory.allocated as f64);
        f.gauge("envoy_server_live", "1 unless draining.", &[], f64::from(u8::from(!s.draining)));
        f.gauge("envoy_server_state", "0 live, 1 draining.", &[], f64::from(u8::from(s.draining)));
        f.gauge("envoy_server_total_connections", "Open client connections.", &[], s.open_connections as f64);
        f.gauge("envoy_server_concurrency", "Worker threads.", &[], s.concurrency as f64);
        f.counter("envoy_server_watchdog_miss", "Always 0: no watchdog.", &[], 0.0);
        f.counter("envoy_server_watchdog_mega_miss", "Always 0: no watchdog.", &[], 0.0);
        f.gauge(
            "envoy_control_plane_connected_state",
            "Control-plane mode: 1 while the ADS stream is up. File mode: 1 while the configuration files load; 0 after a rejected reload until a valid one.",
            &[],
            f64::from(u8::from(if cp_mode { self.cp_connected.load(Ordering::Relaxed) } else { s.config_ok })),
        );
        f.gauge("envoy_control_plane_pending_requests", "Always 0: updates are applied as they arrive.", &[], 0.0);
        for prefix in ["envoy_listener_manager_lds", "envoy_cluster_manager_cds"] {
            f.counter(&format!("{prefix}_update_attempt"), "Configuration loads (startup included).", &[], attempts);
            f.counter(&format!("{prefix}_update_success"), "Configuration loads applied (startup included).", &[], ok);
            f.counter(&format!("{prefix}_update_rejected"), "Configuration loads rejected.", &[], rejected);
        }
    }

    fn own_families(&self, f: &mut Families, s: &Scrape) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        for (i, mode) in MODES.iter().enumerate() {
            let l = [("mode", mode.as_str())];
            f.counter(
                "zone_ingress_connections_total",
                "Connections handed to each path after routing.",
                &l,
                get(&self.spliced[i]),
            );
            f.gauge("zone_ingress_connections_active", "Open flows on each path.", &l, s.flows_by_mode[i] as f64);
            for (d, direction) in ["client_to_backend", "backend_to_client"].iter().enumerate() {
                let v = if d == 0 { s.bytes_by_mode[i].0 } else { s.bytes_by_mode[i].1 };
                f.counter(
                    "zone_ingress_bytes_total",
                    "Bytes moved per path and direction (BPF counters for kernel-spliced flows).",
                    &[("direction", direction), ("mode", mode.as_str())],
                    v as f64,
                );
            }
        }
        f.counter(
            "zone_ingress_kernel_fallbacks_total",
            "Connections the kernel refused and userspace relayed.",
            &[],
            get(&self.kernel_fallbacks),
        );
        f.gauge(
            "zone_ingress_handshakes_pending",
            "Connections waiting for their ClientHello (capped by --max-pending-handshakes).",
            &[],
            get(&self.handshakes_pending),
        );
        f.histogram(
            "zone_ingress_handoff_duration_seconds",
            "Accept to spliced (or relayed) latency.",
            &[],
            &self.handoff,
        );
        for reason in RejectReason::ALL {
            f.counter(
                "zone_ingress_rejected_connections_total",
                "Connections closed before reaching a backend.",
                &[("reason", reason.label())],
                get(&self.rejects[reason.index()]),
            );
        }
        for (i, reason) in CLOSE_REASONS.iter().enumerate() {
            f.counter(
                "zone_ingress_closed_connections_total",
                "Flows that closed, by reason.",
                &[("reason", reason.as_str())],
                get(&self.closes[i]),
            );
        }
        f.counter(
            "zone_ingress_access_log_suppressed_total",
            "Rejection log lines dropped by the rate limit.",
            &[],
            get(&self.access_log_suppressed),
        );
        for (result, v) in [("success", &self.reload_success), ("failure", &self.reload_failure)] {
            f.counter(
                "zone_ingress_config_reloads_total",
                "Configuration reloads after startup.",
                &[("result", result)],
                get(v),
            );
        }
        f.gauge(
            "zone_ingress_config_last_reload_successful",
            "0 after a rejected reload until a valid one.",
            &[],
            f64::from(u8::from(s.config_ok)),
        );
        f.gauge(
            "zone_ingress_config_last_reload_timestamp_seconds",
            "Unix time of the last load attempt.",
            &[],
            s.last_reload_unix,
        );
        f.gauge("zone_ingress_routes", "Exact SNI entries in the table.", &[], s.routes as f64);
        f.gauge("zone_ingress_subset_routes_cached", "Subset routes built and cached.", &[], s.subset_routes as f64);
        f.counter(
            "zone_ingress_listener_rebinds_total",
            "Listener rebinds after an address change.",
            &[],
            get(&self.listener_rebinds),
        );
        f.gauge("zone_ingress_ready", "1 when /ready answers READY.", &[], f64::from(u8::from(s.ready)));
        if let Some(k) = &s.kernel {
            f.gauge(
                "zone_ingress_kernel_spliced_active",
                "Connections spliced in the kernel now.",
                &[],
                k.active as f64,
            );
            f.gauge(
                "zone_ingress_kernel_in_flight_bytes",
                "Bytes queued toward slow peers, summed over flows (sampled each second).",
                &[],
                k.in_flight_bytes as f64,
            );
            f.counter(
                "zone_ingress_memory_guard_aborts_total",
                "Flows aborted by the memory guard.",
                &[],
                k.memory_guard_aborts as f64,
            );
            f.counter(
                "zone_ingress_peer_missing_aborts_total",
                "Flows aborted because the verdict found no peer.",
                &[],
                k.peer_missing_aborts as f64,
            );
            f.counter(
                "zone_ingress_drain_stalls_total",
                "Flows aborted because a half-close drain check stalled.",
                &[],
                k.drain_stalls as f64,
            );
            f.counter(
                "zone_ingress_splice_holds_total",
                "Times a kernel-spliced direction was held for backpressure.",
                &[],
                k.holds as f64,
            );
            f.counter(
                "zone_ingress_splice_grant_holds_total",
                "Times the verdict held a kernel-spliced direction by itself: its redirect grant ran out.",
                &[],
                k.grant_holds as f64,
            );
            f.counter(
                "zone_ingress_splice_relayed_bytes_total",
                "Bytes of held directions relayed by the daemon.",
                &[],
                k.relayed_bytes as f64,
            );
            for (result, v) in &k.verdicts {
                f.counter(
                    "zone_ingress_bpf_verdict_skbs_total",
                    "Skbs seen by the sk_skb verdict, by outcome.",
                    &[("result", result)],
                    *v as f64,
                );
            }
            f.maps(&k.maps);
        }
        if let Some(p) = &s.packet {
            f.gauge(
                "zone_ingress_packet_spliced_active",
                "Flows forwarded at packet level now (lingering ones included).",
                &[],
                p.active as f64,
            );
            f.counter("zone_ingress_packet_spliced_total", "Flows switched to packet forwarding.", &[], p.total as f64);
            f.counter(
                "zone_ingress_packet_refused_total",
                "Connections the packet path refused (they took the next path).",
                &[],
                p.refused as f64,
            );
            f.counter(
                "zone_ingress_packet_switch_failures_total",
                "Switches that failed after the ClientHello was read (the connection was reset).",
                &[],
                p.failed as f64,
            );
            f.counter(
                "zone_ingress_packet_adopted_total",
                "Flows an earlier daemon left in the pinned maps, taken over at start.",
                &[],
                p.adopted as f64,
            );
            f.gauge(
                "zone_ingress_packet_dormant_flows",
                "Idle packet-level flows the daemon keeps nothing of but their map entries (they wake at their end).",
                &[],
                p.dormant as f64,
            );
            f.gauge(
                "zone_ingress_packet_source_ports_held",
                "(endpoint, source port) pairs the packet splice holds: connects in progress and flows not yet removed.",
                &[],
                p.ports_held as f64,
            );
            for (what, v) in &p.program {
                f.counter(
                    "zone_ingress_packet_program_packets_total",
                    "Packets seen by the packet splice's tc programs, by outcome.",
                    &[("result", what)],
                    *v as f64,
                );
            }
            f.maps(&p.maps);
        }
        if let Some(x) = &s.xdp {
            for (reason, v) in &x.packets {
                f.counter(
                    "zone_ingress_xdp_packets_total",
                    "Packets for the listener judged by the XDP guard, by outcome.",
                    &[("reason", reason)],
                    *v as f64,
                );
            }
            for (interface, mode) in &x.interfaces {
                f.gauge(
                    "zone_ingress_xdp_attached",
                    "1 per interface the XDP guard is attached to.",
                    &[("interface", interface), ("mode", mode)],
                    1.0,
                );
            }
            for (list, n) in [("allow", x.allow), ("deny", x.deny)] {
                f.gauge(
                    "zone_ingress_xdp_prefixes",
                    "Source prefixes in the XDP guard's lists.",
                    &[("list", list)],
                    n as f64,
                );
            }
        }
    }
}

/// Metric families being built, by name.
#[derive(Default)]
struct Families(BTreeMap<String, MetricFamily>);

impl Families {
    fn push(
        &mut self,
        name: &str,
        help: &str,
        ty: MetricType,
        labels: &[(&str, &str)],
        metric: impl FnOnce(&mut proto::Metric),
    ) {
        let mf = self.0.entry(name.to_owned()).or_insert_with(|| {
            let mut mf = MetricFamily::default();
            mf.set_name(name.to_owned());
            mf.set_help(help.to_owned());
            mf.set_field_type(ty);
            mf
        });
        let mut m = proto::Metric::from_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut lp = proto::LabelPair::default();
                    lp.set_name((*k).to_owned());
                    lp.set_value((*v).to_owned());
                    lp
                })
                .collect(),
        );
        metric(&mut m);
        mf.mut_metric().push(m);
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::COUNTER, labels, |m| {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        });
    }

    /// Occupancy and capacity of BPF maps.
    fn maps(&mut self, maps: &[super::MapSample]) {
        for m in maps {
            self.gauge(
                "zone_ingress_bpf_map_entries",
                "Entries in each BPF map.",
                &[("map", m.name)],
                m.entries as f64,
            );
            self.gauge(
                "zone_ingress_bpf_map_max_entries",
                "Capacity of each BPF map.",
                &[("map", m.name)],
                f64::from(m.max_entries),
            );
        }
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.push(name, help, MetricType::GAUGE, labels, |m| {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        });
    }

    fn histogram<B: Buckets>(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &Histogram<B>) {
        // Read the count last: a concurrent observation then shows up in a bucket before the
        // count, never the other way round, so buckets never exceed the +Inf bucket.
        let mut cumulative = 0u64;
        let buckets: Vec<proto::Bucket> = B::BOUNDS_US
            .iter()
            .zip(&*h.buckets)
            .map(|(le_us, n)| {
                cumulative += n.load(Ordering::Relaxed);
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*le_us as f64 / B::UNIT_US);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / B::UNIT_US;
        let count = h.count.load(Ordering::Relaxed).max(cumulative);
        self.push(name, help, MetricType::HISTOGRAM, labels, |m| {
            let mut ph = proto::Histogram::default();
            ph.set_bucket(buckets);
            ph.set_sample_sum(sum);
            ph.set_sample_count(count);
            m.set_histogram(ph);
        });
    }
}
