//! Envoy-style counters (`/stats`) and Istio standard metrics (`/stats/prometheus`).
//!
//! Counters are created when the config is loaded and handed to the code that bumps them, so the
//! request path never looks a name up. One prometheus-client registry serves `/stats/prometheus`:
//! the Istio families, and the Envoy stats through a collector that names each `envoy_<name>`
//! (dots as underscores), so no Prometheus text is written by hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A shared counter (or gauge, moved both ways) in the Envoy stats namespace.
#[derive(Clone, Default, Debug)]
pub struct Stat(Arc<AtomicU64>);

/// Envoy-style stats by dotted name. Clones share the same stats.
#[derive(Clone, Default, Debug)]
pub struct EnvoyStats {
    by_name: Arc<Mutex<BTreeMap<String, Stat>>>,
}

/// A Prometheus label value backed by a shared string (cloning is a refcount bump).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lv(pub Arc<str>);

/// Istio's standard labels for HTTP and gRPC request metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Lv,
    pub source_workload: Lv,
    pub source_workload_namespace: Lv,
    pub source_principal: Lv,
    pub source_app: Lv,
    pub source_version: Lv,
    pub source_cluster: Lv,
    pub destination_workload: Lv,
    pub destination_workload_namespace: Lv,
    pub destination_principal: Lv,
    pub destination_app: Lv,
    pub destination_version: Lv,
    pub destination_service: Lv,
    pub destination_service_name: Lv,
    pub destination_service_namespace: Lv,
    pub destination_cluster: Lv,
    pub request_protocol: Lv,
    pub response_code: Lv,
    pub grpc_response_status: Lv,
    pub response_flags: Lv,
    pub connection_security_policy: Lv,
}

/// The Istio metric families this proxy reports.
pub struct IstioMetrics {
    pub requests_total: Family<RequestLabels, Counter>,
    pub request_duration_ms: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub tcp_sent_bytes: Family<RequestLabels, Counter>,
    pub tcp_received_bytes: Family<RequestLabels, Counter>,
    pub tcp_connections_opened: Family<RequestLabels, Counter>,
    pub tcp_connections_closed: Family<RequestLabels, Counter>,
    registry: Registry,
}

// === impl Stat ===

impl Stat {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// For a gauge.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

// === impl EnvoyStats ===

impl EnvoyStats {
    /// The stat called `name`, created at zero the first time.
    pub fn stat(&self, name: &str) -> Stat {
        let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    /// Envoy's `/stats` text: `name: value` lines, sorted.
    pub fn render_text(&self) -> String {
        let map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, stat) in map.iter() {
            let _ = writeln!(out, "{name}: {}", stat.get());
        }
        out
    }
}

/// The Envoy stats in the Prometheus registry: each a gauge named `envoy_<name>`, the dotted name
/// as its help, as Envoy's own `/stats/prometheus` names them.
#[derive(Debug)]
struct EnvoyCollector(EnvoyStats);

impl prometheus_client::collector::Collector for EnvoyCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let stats: Vec<(String, u64)> = {
            let map = self.0.by_name.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|(n, s)| (n.clone(), s.get())).collect()
        };
        for (name, value) in stats {
            let metric: String = format!("envoy_{name}")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(
                i64::try_from(value).unwrap_or(i64::MAX),
            );
            let m = encoder.encode_descriptor(&metric, &name, None, gauge.metric_type())?;
            gauge.encode(m)?;
        }
        Ok(())
    }
}

// === impl Lv ===

impl EncodeLabelValue for Lv {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

impl From<&str> for Lv {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

// === impl IstioMetrics ===

fn duration_histogram() -> Histogram {
    // Istio's default buckets for istio_request_duration_milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

impl IstioMetrics {
    /// The Istio families alone.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// The Istio families and `stats`, in one registry.
    pub fn with_envoy_stats(stats: &EnvoyStats) -> Self {
        Self::build(Some(stats))
    }

    fn build(envoy: Option<&EnvoyStats>) -> Self {
        let mut registry = Registry::default();
        if let Some(stats) = envoy {
            registry.register_collector(Box::new(EnvoyCollector(stats.clone())));
        }
        let requests_total = Family::<RequestLabels, Counter>::default();
        let request_duration_ms =
            Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            );
        let request_bytes =
            Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                bytes_histogram as fn() -> Histogram,
            );
        let response_bytes =
            Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                bytes_histogram as fn() -> Histogram,
            );
        let tcp_sent_bytes = Family::<RequestLabels, Counter>::default();
        let tcp_received_bytes = Family::<RequestLabels, Counter>::default();
        let tcp_connections_opened = Family::<RequestLabels, Counter>::default();
        let tcp_connections_closed = Family::<RequestLabels, Counter>::default();
        registry.register(
            "istio_requests",
            "Requests processed",
            requests_total.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            request_duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request sizes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response sizes",
            response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent on TCP connections",
            tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received on TCP connections",
            tcp_received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_connections_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_connections_closed.clone(),
        );
        Self {
            requests_total,
            request_duration_ms,
            request_bytes,
            response_bytes,
            tcp_sent_bytes,
            tcp_received_bytes,
            tcp_connections_opened,
            tcp_connections_closed,
            registry,
        }
    }

    /// Prometheus text exposition format 0.0.4, as Envoy serves it: counter families are named
    /// with their `_total` suffix in `# HELP` / `# TYPE`, and there is no OpenMetrics `# EOF`.
    /// (istio-agent merges a sidecar's `/stats/prometheus` with the app's using Prometheus' 0.0.4
    /// text parser, so that is the format served; prometheus-client writes OpenMetrics.)
    pub fn render(&self) -> String {
        let mut open_metrics = String::new();
        let _ =
            prometheus_client::encoding::text::encode_registry(&mut open_metrics, &self.registry);
        to_classic_text(&open_metrics)
    }
}

/// Rewrites OpenMetrics text into the classic format Prometheus and Envoy use.
pub fn to_classic_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let _ = writeln!(out, "{kind}{name}{suffix} {tail}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

impl Default for IstioMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IstioMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IstioMetrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_classic_text() {
        let m = IstioMetrics::new();
        let text = m.render();
        assert!(
            text.contains("# TYPE istio_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE istio_request_duration_milliseconds histogram"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn envoy_stats_are_in_the_same_registry() {
        let stats = EnvoyStats::default();
        let m = IstioMetrics::with_envoy_stats(&stats);
        stats
            .stat("cluster.inbound|8080||.upstream_rq_retry")
            .add(3);
        stats
            .stat("listener.0.0.0.0_15006.downstream_cx_total")
            .inc();
        let text = m.render();
        assert!(
            text.contains("# TYPE envoy_cluster_inbound_8080___upstream_rq_retry gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("\nenvoy_cluster_inbound_8080___upstream_rq_retry 3\n"),
            "{text}"
        );
        assert!(
            text.contains("\nenvoy_listener_0_0_0_0_15006_downstream_cx_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE istio_requests_total counter"),
            "{text}"
        );
        // A stat created after the registry is read at the next scrape.
        stats.stat("server.late").inc();
        assert!(m.render().contains("\nenvoy_server_late 1\n"));
    }
}
