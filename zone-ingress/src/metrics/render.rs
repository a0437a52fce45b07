//! Renderings of the metric families: Prometheus text (`/stats/prometheus`) and Envoy's plain
//! `name: value` listing (`/stats`, also as JSON).

use std::fmt::Write as _;

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{self, MetricFamily, MetricType},
};

/// `Content-Type` of the Prometheus text exposition.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders families in the Prometheus text format (0.0.4).
///
/// # Errors
/// Only for a family without metrics or name, which [`super::Metrics::gather`] never produces.
pub fn render_prometheus(families: &[MetricFamily]) -> Result<String, prometheus::Error> {
    let mut buf = Vec::with_capacity(64 << 10);
    TextEncoder::new().encode(families, &mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The Envoy stat name of one Prometheus sample: `envoy_cluster_upstream_cx_total
/// {envoy_cluster_name="default_backend"}` → `cluster.default_backend.upstream_cx_total`.
/// Our own series: `zone_ingress_bytes_total{direction="x",mode="y"}` →
/// `zone_ingress.bytes_total.x.y` (label values in label order).
fn envoy_stat_name(name: &str, labels: &[proto::LabelPair]) -> String {
    let label = |key: &str| labels.iter().find(|l| l.name() == key).map(proto::LabelPair::value);
    // Scoped families: the scope's tag goes back between the family and the stat.
    let scoped = [
        ("envoy_listener_manager_", "listener_manager", None),
        ("envoy_cluster_manager_", "cluster_manager", None),
        ("envoy_listener_", "listener", Some("envoy_listener_address")),
        ("envoy_cluster_", "cluster", Some("envoy_cluster_name")),
        ("envoy_tcp_", "tcp", Some("envoy_tcp_prefix")),
        ("envoy_tls_inspector_", "tls_inspector", None),
        ("envoy_server_", "server", None),
        ("envoy_control_plane_", "control_plane", None),
    ];
    for (prefix, scope, tag) in scoped {
        if let Some(stat) = name.strip_prefix(prefix) {
            return match tag.and_then(label) {
                Some(v) => format!("{scope}.{v}.{stat}"),
                None => format!("{scope}.{stat}"),
            };
        }
    }
    let mut out = name.strip_prefix("zone_ingress_").map_or_else(|| name.to_owned(), |s| format!("zone_ingress.{s}"));
    for l in labels {
        out.push('.');
        out.push_str(l.value());
    }
    out
}

/// Renders families as Envoy's admin `/stats` does: one `name: value` line per counter and
/// gauge, sorted by name; histograms as `P50(v) P90(v) P99(v) count=N sum=S` (quantiles are
/// the upper bound of the bucket that reaches them). Lines whose name does not contain
/// `filter` (when given) are left out.
#[must_use]
pub fn render_envoy_stats(families: &[MetricFamily], filter: Option<&str>) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    for mf in families {
        for m in mf.get_metric() {
            let name = envoy_stat_name(mf.name(), m.get_label());
            if filter.is_some_and(|f| !name.contains(f)) {
                continue;
            }
            let value = match mf.get_field_type() {
                MetricType::COUNTER => number(m.get_counter().get_value()),
                MetricType::GAUGE => number(m.get_gauge().get_value()),
                MetricType::HISTOGRAM => histogram_summary(m.get_histogram()),
                MetricType::SUMMARY | MetricType::UNTYPED => continue,
            };
            lines.push((name, value));
        }
    }
    lines.sort();
    let mut out = String::with_capacity(lines.len() * 48);
    for (name, value) in lines {
        let _ = writeln!(out, "{name}: {value}");
    }
    out
}

/// The same listing as JSON, as Envoy's `/stats?format=json` (`{"stats":[{"name","value"}]}`).
#[must_use]
pub fn render_envoy_stats_json(families: &[MetricFamily], filter: Option<&str>) -> serde_json::Value {
    let stats: Vec<serde_json::Value> = render_envoy_stats(families, filter)
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(name, value)| match value.parse::<u64>() {
            Ok(n) => serde_json::json!({"name": name, "value": n}),
            Err(_) => serde_json::json!({"name": name, "value": value}),
        })
        .collect();
    serde_json::json!({ "stats": stats })
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 { format!("{}", v as i64) } else { format!("{v}") }
}

fn histogram_summary(h: &proto::Histogram) -> String {
    let count = h.get_sample_count();
    if count == 0 {
        return "No recorded values".to_owned();
    }
    let quantile = |q: f64| {
        let rank = (q * count as f64).ceil() as u64;
        h.get_bucket()
            .iter()
            .find(|b| b.cumulative_count() >= rank)
            .map_or_else(|| "+Inf".to_owned(), |b| number(b.upper_bound()))
    };
    format!(
        "P50({}) P90({}) P99({}) count={count} sum={}",
        quantile(0.5),
        quantile(0.9),
        quantile(0.99),
        h.get_sample_sum()
    )
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, atomic::Ordering},
        time::Duration,
    };

    use super::*;
    use crate::{
        metrics::{ClusterSample, Metrics, Scrape},
        reject::RejectReason,
        splice::Path,
    };

    fn scrape() -> Scrape {
        Scrape {
            listener_address: "198.18.0.2_10001".into(),
            listener_bound: true,
            config_ok: true,
            ready: true,
            ..Scrape::default()
        }
    }

    #[test]
    fn prometheus_text_keeps_envoy_names() {
        let m = Metrics::default();
        m.accepted.fetch_add(3, Ordering::Relaxed);
        m.reject(RejectReason::UnknownSni);
        m.handoff.observe(Duration::from_micros(40));
        let text = render_prometheus(&m.gather(&scrape())).expect("encode");
        assert!(text.contains("# TYPE envoy_listener_downstream_cx_total counter\n"), "{text}");
        assert!(
            text.contains("envoy_listener_downstream_cx_total{envoy_listener_address=\"198.18.0.2_10001\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("envoy_tls_inspector_sni_found 0\n"), "{text}");
        assert!(text.contains("zone_ingress_rejected_connections_total{reason=\"unknown_sni\"} 1\n"), "{text}");
        assert!(text.contains("zone_ingress_rejected_connections_total{reason=\"connect_failed\"} 0\n"), "{text}");
        assert!(text.contains("zone_ingress_handoff_duration_seconds_bucket{le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("zone_ingress_handoff_duration_seconds_count 1\n"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }

    /// Per-cluster `_ms` histograms: Envoy's bounds in ms, cumulative buckets, `+Inf` equal to
    /// the count, the sum in (fractional) ms; `/stats` gives the quantile summary.
    #[test]
    fn cluster_histograms_follow_envoy() {
        let inv = crate::config::parse_inventory(
            std::path::Path::new("inv.yaml"),
            "type: Dataplane\nmesh: default\nname: b1\nnetworking:\n  address: 198.18.1.2\n  inbound:\n  - port: 8080\n    tags:\n      kuma.io/service: backend\n",
        )
        .expect("inventory")
        .value;
        let m = Metrics::default();
        let clusters = m.clusters_for(&crate::routing::RouteTable::build(&inv, ""));
        let stats = Arc::clone(&clusters["default:backend"]);
        // 0.3 ms, 0.7 ms, 3 ms, 42 ms, and 2 h (beyond the last bound: only in +Inf).
        for us in [300, 700, 3_000, 42_000, 7_200_000_000] {
            stats.upstream_cx_connect_ms.observe(Duration::from_micros(us));
        }
        let s = Scrape {
            clusters: vec![ClusterSample { stats: Arc::clone(&stats), client_to_backend: 0, backend_to_client: 0 }],
            ..scrape()
        };
        let text = render_prometheus(&m.gather(&s)).expect("encode");
        assert!(text.contains("# TYPE envoy_cluster_upstream_cx_connect_ms histogram\n"), "{text}");
        assert!(text.contains("# TYPE envoy_cluster_upstream_cx_length_ms histogram\n"), "{text}");
        let samples = |name: &str| -> Vec<(String, f64)> {
            let prefix = format!("{name}{{envoy_cluster_name=\"default_backend\"");
            text.lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .map(|rest| {
                    let (labels, v) = rest.rsplit_once(' ').expect("value");
                    (labels.to_owned(), v.parse().expect("number"))
                })
                .collect()
        };
        let buckets = samples("envoy_cluster_upstream_cx_connect_ms_bucket");
        let les: Vec<&str> =
            buckets.iter().map(|(l, _)| l.trim_start_matches(",le=\"").trim_end_matches("\"}")).collect();
        assert_eq!(
            les,
            [
                "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "30000",
                "60000", "300000", "600000", "1800000", "3600000", "+Inf"
            ],
            "Envoy's default bounds\n{text}"
        );
        let counts: Vec<f64> = buckets.iter().map(|(_, v)| *v).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative: {counts:?}");
        assert_eq!(&counts[..6], [1.0, 2.0, 3.0, 3.0, 3.0, 4.0], "{text}");
        assert_eq!(counts[18], 4.0, "the 2 h observation is above 3600000 ms");
        assert_eq!(counts[19], 5.0, "+Inf");
        assert_eq!(samples("envoy_cluster_upstream_cx_connect_ms_count"), [("}".to_owned(), 5.0)]);
        let sum = samples("envoy_cluster_upstream_cx_connect_ms_sum")[0].1;
        assert!((sum - 7_200_046.0).abs() < 1e-6, "sum in ms: {sum}");
        // Nothing closed yet: every bucket, the count and the sum are 0.
        let length = samples("envoy_cluster_upstream_cx_length_ms_bucket");
        assert_eq!(length.len(), 20);
        assert!(length.iter().all(|(_, v)| *v == 0.0), "{text}");
        assert_eq!(samples("envoy_cluster_upstream_cx_length_ms_count"), [("}".to_owned(), 0.0)]);

        let listing = render_envoy_stats(&m.gather(&s), Some("cluster.default_backend.upstream_cx_"));
        assert!(
            listing.contains("cluster.default_backend.upstream_cx_connect_ms: P50(5) P90(+Inf) P99(+Inf) count=5 sum="),
            "{listing}"
        );
        assert!(listing.contains("cluster.default_backend.upstream_cx_length_ms: No recorded values\n"), "{listing}");
    }

    #[test]
    fn envoy_stats_names() {
        let m = Metrics::default();
        m.accepted.fetch_add(2, Ordering::Relaxed);
        m.spliced(Path::Kernel);
        let text = render_envoy_stats(&m.gather(&scrape()), None);
        assert!(text.contains("listener.198.18.0.2_10001.downstream_cx_total: 2\n"), "{text}");
        assert!(text.contains("tls_inspector.sni_found: 0\n"), "{text}");
        assert!(text.contains("listener_manager.lds_update_success: 1\n"), "{text}");
        assert!(text.contains("zone_ingress.connections_total.kernel: 1\n"), "{text}");
        assert!(text.contains("zone_ingress.handoff_duration_seconds: No recorded values\n"), "{text}");
        let filtered = render_envoy_stats(&m.gather(&scrape()), Some("tls_inspector."));
        assert_eq!(filtered.lines().count(), 5, "{filtered}");
    }
}
