//! One access-log record and one metrics update per request or TCP connection, written by a drop
//! guard so that every exit path (success, local error, client gone) counts exactly once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use crate::access_log::{AccessLog, Record, format_time};
use crate::body::{Body, BoxError};
use crate::config::{DestinationMetadata, Node};
use crate::stats::{EnvoyStats, IstioMetrics, Lv, RequestLabels};

/// Shared by every call: where metrics and logs go, and who this proxy is.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: IstioMetrics,
    pub stats: EnvoyStats,
    pub access_log: AccessLog,
    local: LocalLabels,
    /// Distinct label sets created so far (HTTP, TCP), and how many each family may hold
    /// (`limits.max_metric_series`). Past it, the labels a caller can influence (the service it
    /// named, the workload and app its sidecar claimed, the gRPC status its app sent) read
    /// `overflow`, so the series stop growing; each such call is counted in
    /// `eastguard.metric_series_overflow`.
    series: [AtomicUsize; 2],
    max_series: usize,
    overflow: crate::stats::Stat,
    /// Each HTTP label set's metric handles, found once by what the labels are made of.
    http_series: SeriesCache,
    /// The API inventory of inbound HTTP calls, if on; the service a call is for is the routed
    /// cluster's, else this workload's (never a name the caller sent).
    pub inventory: Option<Arc<std::sync::Mutex<apisec::Inventory>>>,
    /// Sensitive-data sampling of inbound HTTP calls (with the inventory).
    pub sensitive: Option<crate::sampling::Sensitive>,
    /// Audit events (denials, detections); off unless `audit` is configured.
    pub audit: crate::audit::Audit,
    /// Authorization drift against a learned baseline (with the inventory), if on.
    pub drift: Option<crate::drift::Drift>,
    /// Distributed tracing, if configured.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// Who this proxy is (a connection manager's tracer names it too).
    pub node: Node,
    /// The latest BOLA / enumeration findings (at most [`DETECTIONS_KEPT`]), for `/apis`.
    pub detections: std::sync::Mutex<std::collections::VecDeque<apisec::inventory::BolaEvent>>,
    local_service: Box<str>,
}

/// BOLA / enumeration findings kept for `/apis`.
pub const DETECTIONS_KEPT: usize = 100;

/// What the API inventory needs of an inbound HTTP call beyond its log record.
#[derive(Debug, Default)]
pub struct ApiCall {
    /// The normalized path (set once the request was normalized; a call refused before is not
    /// an API call).
    pub path: Option<String>,
    pub request_type: Option<String>,
    pub response_type: Option<String>,
    pub auth: Option<apisec::AuthScheme>,
}

#[derive(Debug, Clone)]
struct LocalLabels {
    workload: Lv,
    namespace: Lv,
    app: Lv,
    version: Lv,
    cluster: Lv,
}

/// Which side of the call this proxy reports for (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// Outbound: this proxy is next to the caller.
    Source,
    /// Inbound: this proxy is next to the callee.
    Destination,
}

/// Who is on the other side, as far as this proxy knows.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub principal: Option<Arc<str>>,
    pub workload: Option<Arc<str>>,
    pub namespace: Option<Arc<str>>,
    pub app: Option<Arc<str>>,
    pub service: Option<Arc<str>>,
}

/// The record of one request, emitted when dropped.
#[derive(Debug)]
pub struct CallGuard {
    telemetry: Arc<Telemetry>,
    reporter: Reporter,
    /// The call's start; `%START_TIME%` is the wall clock less the time since.
    started: Instant,
    pub record: Record,
    pub peer: Peer,
    pub grpc: bool,
    pub grpc_status: Option<String>,
    pub mtls: bool,
    pub request_bytes: Arc<AtomicU64>,
    pub response_bytes: Arc<AtomicU64>,
    /// The service the call was routed to, from the routed cluster (inbound: `None` unless its
    /// metadata names one; the `Host` a caller sent is never a label).
    pub destination_service: Option<Arc<str>>,
    /// Set when the response body finished; a guard dropped before that reports `DC`.
    pub completed: bool,
    /// TCP calls report to the istio_tcp_* metrics instead.
    pub tcp: bool,
    /// Keeps the connection from counting as idle while this call lives.
    pub inflight: Option<crate::idle::InFlight>,
    /// Where an HTTP stream's end is counted for the premature-reset rule.
    pub stream_resets: Option<Arc<crate::idle::StreamResets>>,
    /// This proxy's SPIFFE ID on the call's connection.
    local_id: Arc<str>,
    /// Inbound HTTP with the inventory on: what it records of the call.
    pub api: Option<ApiCall>,
    /// A sampled call's copy for sensitive-data classification.
    pub sample: Option<Box<crate::sampling::SampleCopy>>,
    /// This call's span, if tracing is on and the call is sampled, and the tracer it goes to.
    pub span: Option<crate::trace::ActiveSpan>,
    tracer: Option<Arc<crate::trace::Tracer>>,
    /// The connection manager's own access logs (xDS), besides the bootstrap's.
    pub chain_logs: Option<Arc<[AccessLog]>>,
}

// === impl Telemetry ===

impl Telemetry {
    pub fn new(
        node: &Node,
        access_log: AccessLog,
        stats: EnvoyStats,
        max_series: usize,
        inventory: Option<apisec::Limits>,
    ) -> Self {
        let lv = |s: &str| Lv::from(s);
        Self {
            inventory: inventory
                .map(|l| Arc::new(std::sync::Mutex::new(apisec::Inventory::new(l)))),
            sensitive: None,
            audit: crate::audit::Audit::off(stats.stat("audit.dropped")),
            detections: Default::default(),
            drift: None,
            tracer: None,
            node: node.clone(),
            local_service: node.workload.as_str().into(),
            metrics: IstioMetrics::with_envoy_stats(&stats),
            series: Default::default(),
            max_series,
            overflow: stats.stat("eastguard.metric_series_overflow"),
            http_series: SeriesCache::default(),
            stats,
            access_log,
            local: LocalLabels {
                workload: lv(&node.workload),
                namespace: lv(&node.namespace),
                app: lv(node.app.as_deref().unwrap_or(&node.workload)),
                version: lv(node.version.as_deref().unwrap_or("unknown")),
                cluster: lv(&node.cluster),
            },
        }
    }

    /// Starts a call's record; `local_id` is this proxy's SPIFFE ID for the connection (it can
    /// rotate, and with the Workload API there is none at startup).
    pub fn start(self: &Arc<Self>, reporter: Reporter, local_id: Arc<str>) -> CallGuard {
        CallGuard {
            telemetry: self.clone(),
            reporter,
            started: Instant::now(),
            record: Record {
                response_flags: "-",
                ..Default::default()
            },
            peer: Peer::default(),
            grpc: false,
            grpc_status: None,
            mtls: false,
            request_bytes: Arc::default(),
            response_bytes: Arc::default(),
            destination_service: None,
            completed: false,
            tcp: false,
            inflight: None,
            stream_resets: None,
            local_id,
            api: (reporter == Reporter::Destination && self.inventory.is_some())
                .then(ApiCall::default),
            sample: None,
            span: None,
            tracer: None,
            chain_logs: None,
        }
    }
}

impl Peer {
    /// What a destination cluster's metadata says about the callee.
    pub fn from_metadata(m: &DestinationMetadata) -> Self {
        Self {
            principal: None,
            workload: m.workload.as_deref().map(Into::into),
            namespace: m.namespace.as_deref().map(Into::into),
            app: m.app.as_deref().map(Into::into),
            service: m.service.as_deref().map(Into::into),
        }
    }

    /// Fills the namespace from an Istio-form SPIFFE ID (`/ns/<ns>/sa/<sa>`) when unknown.
    pub fn with_principal(mut self, principal: Option<Arc<str>>) -> Self {
        if self.namespace.is_none()
            && let Some(p) = &principal
            && let Some(rest) = p.split_once("/ns/").map(|(_, r)| r)
        {
            self.namespace = rest.split('/').next().map(Into::into);
        }
        self.principal = principal;
        self
    }
}

// === impl CallGuard ===

/// Whether a peer's claim (workload or app name) can be a label value: a DNS label or
/// subdomain, as Kubernetes names are.
pub fn plausible_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn unknown(v: &Option<Arc<str>>) -> Lv {
    Lv(v.clone().unwrap_or_else(|| "unknown".into()))
}

impl CallGuard {
    /// Starts this call's span (if tracing is on) and rewrites the request's trace headers so it
    /// leaves with that span as its parent.
    /// `chain` is the connection manager's own tracer, which wins over the bootstrap's.
    pub fn start_span(
        &mut self,
        headers: &mut http::HeaderMap,
        chain: Option<&Arc<crate::trace::Tracer>>,
    ) {
        if let Some(tracer) = chain.or(self.telemetry.tracer.as_ref()) {
            let side = match self.reporter {
                Reporter::Source => crate::trace::Side::Client,
                Reporter::Destination => crate::trace::Side::Server,
            };
            self.span = tracer.begin(headers, side);
            if self.span.is_some() {
                self.tracer = Some(tracer.clone());
            }
        }
    }

    /// Records a local failure: status, flag and details.
    pub fn fail(&mut self, e: &crate::error::ProxyError) {
        let r = e.response();
        self.record.response_code = r.status;
        self.record.response_flags = r.flag;
        self.record.response_code_details = Some(r.details.into());
        self.record.upstream_transport_failure_reason = e.transport_failure_reason();
        if self.grpc {
            self.grpc_status = Some(r.grpc_status.to_string());
        }
    }

    fn labels(&self) -> RequestLabels {
        let t = &self.telemetry.local;
        let peer = &self.peer;
        let (
            src_wl,
            src_ns,
            src_principal,
            src_app,
            src_cluster,
            dst_wl,
            dst_ns,
            dst_principal,
            dst_app,
            dst_cluster,
            dst_service,
        ) = match self.reporter {
            Reporter::Source => (
                t.workload.clone(),
                t.namespace.clone(),
                Lv(self.local_id.clone()),
                t.app.clone(),
                t.cluster.clone(),
                unknown(&peer.workload),
                unknown(&peer.namespace),
                unknown(&peer.principal),
                unknown(&peer.app),
                t.cluster.clone(),
                unknown(&peer.service),
            ),
            Reporter::Destination => (
                unknown(&peer.workload),
                unknown(&peer.namespace),
                unknown(&peer.principal),
                unknown(&peer.app),
                t.cluster.clone(),
                t.workload.clone(),
                t.namespace.clone(),
                Lv(self.local_id.clone()),
                t.app.clone(),
                t.cluster.clone(),
                unknown(&self.destination_service),
            ),
        };
        let service_name: Lv = Lv(dst_service.0.split('.').next().unwrap_or("unknown").into());
        RequestLabels {
            reporter: Lv::from(match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            }),
            source_workload: src_wl,
            source_workload_namespace: src_ns,
            source_principal: src_principal,
            source_app: src_app,
            source_version: match self.reporter {
                Reporter::Source => t.version.clone(),
                Reporter::Destination => Lv::from("unknown"),
            },
            source_cluster: src_cluster,
            destination_workload: dst_wl,
            destination_workload_namespace: dst_ns.clone(),
            destination_principal: dst_principal,
            destination_app: dst_app,
            destination_version: match self.reporter {
                Reporter::Source => Lv::from("unknown"),
                Reporter::Destination => t.version.clone(),
            },
            destination_service: dst_service,
            destination_service_name: service_name,
            destination_service_namespace: dst_ns,
            destination_cluster: dst_cluster,
            request_protocol: Lv::from(if self.tcp {
                "tcp"
            } else if self.grpc {
                "grpc"
            } else {
                "http"
            }),
            response_code: Lv(if self.tcp {
                "0".into()
            } else {
                self.record.response_code.to_string().into()
            }),
            // A gRPC status is a number (0–16); anything else an app sends is not a label value.
            grpc_response_status: Lv(match grpc_label(self.grpc_status.as_deref()) {
                Some(Some(n)) => n.to_string().into(),
                Some(None) => "unknown".into(),
                None => "".into(),
            }),
            response_flags: Lv(self.record.response_flags.into()),
            connection_security_policy: Lv::from(match (self.reporter, self.mtls) {
                (Reporter::Destination, true) => "mutual_tls",
                (Reporter::Destination, false) => "none",
                (Reporter::Source, _) => "unknown",
            }),
        }
    }
}

/// One HTTP label set's four metrics (clones share the family's values).
#[derive(Clone)]
struct HttpSeries {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// What an HTTP call's labels are made of, besides this proxy's own: hashing this with a seeded
/// fast hasher replaces hashing the 21 labels with SipHash in each of five families per call.
#[derive(Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    reporter: Reporter,
    peer: [Option<Arc<str>>; 5],
    local_id: Arc<str>,
    destination_service: Option<Arc<str>>,
    grpc: bool,
    mtls: bool,
    response_code: u16,
    /// The gRPC status as its label reads it: `None` none, `Some(Some(n))` a status,
    /// `Some(None)` not a status.
    grpc_status: Option<Option<u8>>,
    response_flags: &'static str,
}

/// Label sets already seen, to their metric handles. It holds at most as many keys as the
/// families may hold series (`limits.max_metric_series`), as keys come partly from what peers
/// claim; past that, calls find their series the slow way.
#[derive(Default)]
struct SeriesCache(
    std::sync::Mutex<std::collections::HashMap<SeriesKey, HttpSeries, foldhash::fast::RandomState>>,
);

impl std::fmt::Debug for SeriesCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeriesCache")
    }
}

fn grpc_label(status: Option<&str>) -> Option<Option<u8>> {
    status.map(|g| g.parse::<u8>().ok().filter(|n| *n <= 16))
}

impl CallGuard {
    fn series_key(&self) -> SeriesKey {
        let p = &self.peer;
        SeriesKey {
            reporter: self.reporter,
            peer: [
                p.principal.clone(),
                p.workload.clone(),
                p.namespace.clone(),
                p.app.clone(),
                p.service.clone(),
            ],
            local_id: self.local_id.clone(),
            destination_service: self.destination_service.clone(),
            grpc: self.grpc,
            mtls: self.mtls,
            response_code: self.record.response_code,
            grpc_status: grpc_label(self.grpc_status.as_deref()),
            response_flags: self.record.response_flags,
        }
    }

    /// This HTTP call's metrics: from the cache, or looked up by label set (and cached while
    /// there is room).
    fn http_series(&self) -> HttpSeries {
        let t = &self.telemetry;
        let key = self.series_key();
        let lock = || t.http_series.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = lock().get(&key) {
            return s.clone();
        }
        let labels = self.bounded(self.labels());
        let m = &t.metrics;
        let series = HttpSeries {
            requests: m.requests_total.get_or_create(&labels).clone(),
            duration_ms: m.request_duration_ms.get_or_create(&labels).clone(),
            request_bytes: m.request_bytes.get_or_create(&labels).clone(),
            response_bytes: m.response_bytes.get_or_create(&labels).clone(),
        };
        let mut cache = lock();
        if cache.len() < t.max_series {
            cache.insert(key, series.clone());
        }
        series
    }

    /// The labels as given while the family has room; past `limits.max_metric_series`, the
    /// caller-influenced ones read `overflow`.
    fn bounded(&self, mut labels: RequestLabels) -> RequestLabels {
        let t = &self.telemetry;
        let (family_has, series) = if self.tcp {
            (
                t.metrics.tcp_connections_opened.get(&labels).is_some(),
                &t.series[1],
            )
        } else {
            (
                t.metrics.requests_total.get(&labels).is_some(),
                &t.series[0],
            )
        };
        if family_has || series.fetch_add(1, Ordering::Relaxed) < t.max_series {
            return labels;
        }
        series.fetch_sub(1, Ordering::Relaxed);
        t.overflow.inc();
        let overflow = || Lv::from("overflow");
        labels.destination_service = overflow();
        labels.destination_service_name = overflow();
        labels.grpc_response_status = overflow();
        match self.reporter {
            Reporter::Destination => {
                labels.source_workload = overflow();
                labels.source_app = overflow();
            }
            Reporter::Source => {}
        }
        labels
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.completed && self.record.response_flags == "-" {
            // The response never finished: the downstream went away (Envoy's DC).
            self.record.response_flags = "DC";
        }
        // One clock read for all that follows.
        let elapsed = self.started.elapsed();
        if let Some(resets) = &self.stream_resets {
            resets.record(!self.completed && elapsed < crate::idle::PREMATURE_RESET_MIN_LIFETIME);
        }
        self.record.duration = elapsed.as_millis() as u64;
        self.record.bytes_received = self.request_bytes.load(Ordering::Relaxed);
        self.record.bytes_sent = self.response_bytes.load(Ordering::Relaxed);
        if self.tcp {
            let labels = self.bounded(self.labels());
            let m = &self.telemetry.metrics;
            m.tcp_received_bytes
                .get_or_create(&labels)
                .inc_by(self.record.bytes_received);
            m.tcp_sent_bytes
                .get_or_create(&labels)
                .inc_by(self.record.bytes_sent);
            m.tcp_connections_closed.get_or_create(&labels).inc();
        } else {
            let series = self.http_series();
            series.requests.inc();
            series.duration_ms.observe(elapsed.as_secs_f64() * 1000.0);
            series
                .request_bytes
                .observe(self.record.bytes_received as f64);
            series.response_bytes.observe(self.record.bytes_sent as f64);
        }
        let chain_logs = self.chain_logs.take().filter(|l| !l.is_empty());
        if self.telemetry.access_log.enabled() || chain_logs.is_some() {
            // The wall clock is read only for a line that shows it.
            let now = SystemTime::now();
            self.record.start_time = format_time(now.checked_sub(elapsed).unwrap_or(now));
            self.telemetry.access_log.write(&self.record);
            for log in chain_logs.iter().flat_map(|l| l.iter()) {
                log.write(&self.record);
            }
        }
        if self.record.rbac_decision == Some("denied") {
            let audit = &self.telemetry.audit;
            if self.tcp {
                if let (Some(remote), Some(local)) = (
                    self.record.downstream_remote_address,
                    self.record.downstream_local_address,
                ) {
                    let reason = match &self.record.rbac_policy {
                        Some(p) => format!("TCP connection denied by {p}"),
                        None => "TCP connection denied: no ALLOW policy matched".to_owned(),
                    };
                    audit.connection_refused(
                        remote,
                        local,
                        self.record.downstream_peer_uri_san.as_deref(),
                        &reason,
                    );
                }
            } else {
                audit.call_denied(&self.record, self.destination_service.as_deref());
            }
        }
        if let (Some(span), Some(tracer)) = (self.span.take(), self.tracer.take()) {
            tracer.finish(span, &self.record, &self.local_id);
        }
        self.observe_api(elapsed);
    }
}

impl CallGuard {
    /// Adds an inbound HTTP call to the API inventory.
    fn observe_api(&mut self, latency: std::time::Duration) {
        let (Some(inventory), Some(api)) = (&self.telemetry.inventory, &self.api) else {
            return;
        };
        let Some(path) = api.path.as_deref() else {
            return;
        };
        if self.tcp {
            return;
        }
        let call = apisec::Call {
            service: self
                .destination_service
                .as_deref()
                .unwrap_or(&self.telemetry.local_service),
            method: self.record.method.as_deref().unwrap_or("-"),
            path,
            status: self.record.response_code,
            caller: self.record.downstream_peer_uri_san.as_deref(),
            allowed: self.record.rbac_decision != Some("denied"),
            request_bytes: self.record.bytes_received,
            response_bytes: self.record.bytes_sent,
            latency,
            request_type: api.request_type.as_deref(),
            response_type: api.response_type.as_deref(),
            auth: api.auth.unwrap_or(apisec::AuthScheme::None),
            grpc: self.grpc,
        };
        let finding = inventory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(&call, SystemTime::now());
        if let Some(drift) = &self.telemetry.drift
            && self.record.rbac_decision != Some("denied")
            && drift.mode != crate::drift::DriftMode::Enforce
        {
            self.drift_after_call(drift, &call, path);
        }
        if let Some(f) = finding {
            self.telemetry.stats.stat("inventory.bola_detections").inc();
            self.telemetry.audit.bola(&f);
            let mut kept = self
                .telemetry
                .detections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if kept.len() >= DETECTIONS_KEPT {
                kept.pop_front();
            }
            kept.push_back(f);
        }
        if let (Some(sensitive), Some(copy)) = (&self.telemetry.sensitive, self.sample.take()) {
            sensitive.submit(crate::sampling::Job {
                service: call.service.to_owned(),
                method: call.method.to_owned(),
                path: path.to_owned(),
                request_type: api.request_type.clone(),
                response_type: api.response_type.clone(),
                copy,
            });
        }
    }
}

impl CallGuard {
    /// The drift baseline, when it is enforced.
    pub fn telemetry_drift_enforce(&self) -> Option<&crate::drift::Drift> {
        self.telemetry
            .drift
            .as_ref()
            .filter(|d| d.mode == crate::drift::DriftMode::Enforce)
    }

    /// The service a call is for, as the inventory names it.
    pub fn service_name(&self) -> &str {
        self.destination_service
            .as_deref()
            .unwrap_or(&self.telemetry.local_service)
    }

    /// Learn and audit modes, once the call is done: learn its edge, or flag it if new.
    fn drift_after_call(&self, drift: &crate::drift::Drift, call: &apisec::Call<'_>, path: &str) {
        let caller = call.caller.unwrap_or("plaintext");
        if drift.known(caller, call.service, call.method, path) {
            return;
        }
        let Some(template) = self.telemetry.inventory.as_ref().and_then(|i| {
            i.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .template_of(call.service, path)
        }) else {
            return;
        };
        let edge = crate::drift::Edge {
            caller: caller.to_owned(),
            service: call.service.to_owned(),
            method: call.method.to_owned(),
            template,
        };
        match drift.mode {
            crate::drift::DriftMode::Learn => drift.learn(edge),
            crate::drift::DriftMode::Audit if drift.flag(edge.clone()) => {
                self.telemetry
                    .stats
                    .stat("inventory.drift_detections")
                    .inc();
                self.telemetry.audit.drift(&edge, call.status);
            }
            _ => {}
        }
    }

    /// For TCP: counts the connection as opened (closed is counted on drop).
    pub fn tcp_opened(&mut self) {
        self.tcp = true;
        let labels = self.bounded(self.labels());
        self.telemetry
            .metrics
            .tcp_connections_opened
            .get_or_create(&labels)
            .inc();
    }
}
/// A response body that counts bytes, notes the gRPC status from trailers, and drops the call's
/// guard (writing its log record) when the body ends or is abandoned.
pub struct Guarded {
    inner: Body,
    guard: Option<CallGuard>,
}

impl Guarded {
    pub fn boxed(inner: Body, guard: CallGuard) -> Body {
        let mut this = Self {
            inner,
            guard: Some(guard),
        };
        if this.inner.is_end_stream() {
            this.finish();
        }
        this.boxed_unsync()
    }

    fn finish(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.completed = true;
        }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(g) = self.guard.as_mut() {
                    if let Some(d) = f.data_ref() {
                        g.response_bytes
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                        if let Some(copy) = g.sample.as_mut() {
                            copy.response.push(d);
                        }
                    } else if let Some(t) = f.trailers_ref()
                        && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                    {
                        g.grpc_status = Some(s.to_owned());
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Some(Err(_)) => {
                if let Some(g) = self.guard.as_mut() {
                    g.record.response_flags = "UPE";
                }
                self.guard = None;
            }
            None => self.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn telemetry(max_series: usize) -> Arc<Telemetry> {
        let node = Node {
            id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into(),
            workload: "a".into(),
            namespace: "ns".into(),
            app: None,
            version: None,
            cluster: "Kubernetes".into(),
        };
        let log = AccessLog::open(None, Default::default()).unwrap();
        Arc::new(Telemetry::new(
            &node,
            log,
            EnvoyStats::default(),
            max_series,
            None,
        ))
    }

    fn call(t: &Arc<Telemetry>, workload: &str, code: u16) {
        let mut g = t.start(Reporter::Destination, "spiffe://td/ns/ns/sa/a".into());
        g.peer.workload = Some(workload.into());
        g.record.response_code = code;
        g.completed = true;
    }

    /// `istio_requests_total` by (source_workload, response_code), as `/stats/prometheus` shows it.
    fn counts(t: &Telemetry) -> std::collections::BTreeMap<(String, String), u64> {
        let text = t.metrics.render();
        let label = |line: &str, name: &str| {
            let start = line.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            line[start..][..line[start..].find('"').unwrap()].to_owned()
        };
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .map(|l| {
                let value = l.rsplit(' ').next().unwrap().parse().unwrap();
                (
                    (label(l, "source_workload"), label(l, "response_code")),
                    value,
                )
            })
            .collect()
    }

    fn key(w: &str, code: &str) -> (String, String) {
        (w.to_owned(), code.to_owned())
    }

    #[test]
    fn calls_with_the_same_labels_count_in_one_series_and_new_ones_in_theirs() {
        let t = telemetry(10);
        call(&t, "b", 200);
        call(&t, "b", 200);
        call(&t, "b", 503);
        call(&t, "c", 200);
        let want = [
            (key("b", "200"), 2),
            (key("b", "503"), 1),
            (key("c", "200"), 1),
        ];
        assert_eq!(counts(&t), want.into_iter().collect());
        assert_eq!(t.http_series.0.lock().unwrap().len(), 3);
    }

    #[test]
    fn past_the_series_cap_claims_read_overflow_and_the_cache_stops_growing() {
        let t = telemetry(2);
        for i in 0..50 {
            call(&t, &format!("w{i}"), 200);
        }
        call(&t, "w0", 200);
        // The first two claims have their series; every later one lands in the one overflow
        // series, counted once per call.
        let want = [
            (key("w0", "200"), 2),
            (key("w1", "200"), 1),
            (key("overflow", "200"), 48),
        ];
        assert_eq!(counts(&t), want.into_iter().collect());
        assert!(t.http_series.0.lock().unwrap().len() <= 2);
    }
}
