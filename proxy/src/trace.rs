//! Distributed tracing: W3C `traceparent` / `tracestate` and B3 (the single `b3` header and the
//! `x-b3-*` set) carried through the sidecar, and one span per HTTP call (SERVER on the inbound
//! side, CLIENT on the outbound side) exported as OTLP/gRPC.
//!
//! Head sampling as in Istio: a caller's sampled flag decides; a request without one is sampled at
//! `tracing.sampling` percent, decided from its trace id (so every hop decides alike), and the
//! decision leaves with the request in the headers this sidecar rewrites. The request leaves with
//! this call's span as its parent, so the next hop's span (the peer sidecar's, or the app's) is a
//! child of it.
//!
//! Off the request path: a finished span goes into a bounded queue (full: dropped and counted);
//! one task batches and exports, each export bounded in time. A collector that is down, slow or
//! hanging costs spans, never requests.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;

mod otlp;
use otlp::{
    ExportTraceServiceRequest, ResourceSpans, ScopeSpans, Span, SpanKind, Status, StatusCode,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::access_log::Record;
use crate::stats::{EnvoyStats, Stat};

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// W3C Trace Context: a `tracestate` longer than this is dropped rather than forwarded.
const MAX_TRACESTATE: usize = 512;
/// Spans per export call.
const BATCH: usize = 512;
/// How long one export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// `tracing:` in the bootstrap.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Percent of new traces sampled (Istio's `tracing.sampling`; a caller's flag wins).
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// The OTLP/gRPC receiver (a collector): `host:port` or `http://host:port`.
    pub address: String,
    /// Finished spans waiting for export; past it they are dropped and counted.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

fn default_sampling() -> f64 {
    1.0
}

fn default_max_queue() -> usize {
    2048
}

impl TracingConfig {
    /// What is wrong with it, as (field, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=100.0).contains(&self.sampling) {
            return Err(("tracing.sampling", "a percentage, 0 to 100".into()));
        }
        if !(1..=65_536).contains(&self.max_queue) {
            return Err(("tracing.max_queue", "between 1 and 65536 spans".into()));
        }
        endpoint(&self.address)
            .map(|_| ())
            .map_err(|e| ("tracing.address", e.to_string()))
    }
}

/// A collector address that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{address:?}: {reason}")]
pub struct BadCollector {
    address: String,
    reason: String,
}

fn endpoint(address: &str) -> Result<tonic::transport::Endpoint, BadCollector> {
    let bad = |reason: String| BadCollector {
        address: address.to_owned(),
        reason,
    };
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let parsed: http::Uri = uri.parse().map_err(|e| bad(format!("{e}")))?;
    if parsed.host().is_none_or(str::is_empty) || parsed.port_u16().is_none() {
        return Err(bad("needs a host and a port".into()));
    }
    tonic::transport::Endpoint::from_shared(uri)
        .map(|e| e.connect_timeout(EXPORT_TIMEOUT).timeout(EXPORT_TIMEOUT))
        .map_err(|e| bad(e.to_string()))
}

/// How the caller sent its trace context, so the request leaves in the same form (plus W3C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum B3Form {
    None,
    Single,
    Multi,
}

/// A trace context as a request arrived with it.
#[derive(Debug, PartialEq, Eq)]
struct Incoming {
    trace_id: Option<[u8; 16]>,
    parent: Option<[u8; 8]>,
    sampled: Option<bool>,
    b3: B3Form,
}

/// The side of a call a span is for: the outbound sidecar's CLIENT span or the inbound one's
/// SERVER span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Who traces: the OTLP resource of every span a proxy exports.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    /// `app.namespace`, as Istio names a workload's service in traces.
    pub service_name: String,
    pub namespace: &'a str,
    pub node_id: &'a str,
}

/// A span started for a call, finished when the call's record is written.
#[derive(Debug)]
pub struct ActiveSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    trace_state: String,
    kind: Side,
    start: SystemTime,
}

/// Samples, rewrites headers and queues finished spans.
#[derive(Debug)]
pub struct Tracer {
    /// Sampled when the trace id's low 64 bits are below this (`None`: every trace).
    threshold: Option<u64>,
    tx: mpsc::Sender<Span>,
    dropped: Stat,
    sampled: Stat,
}

/// The export side of a [`Tracer`], run as a task.
pub struct Export {
    rx: mpsc::Receiver<Span>,
    endpoint: tonic::transport::Endpoint,
    resource: Resource,
    sent: Stat,
    dropped: Stat,
    failed: Stat,
}

impl Tracer {
    /// A tracer and its exporter; the config was checked when read.
    pub fn new(
        config: &TracingConfig,
        origin: &Origin<'_>,
        stats: &EnvoyStats,
    ) -> Result<(Self, Export), BadCollector> {
        let endpoint = endpoint(&config.address)?;
        let (tx, rx) = mpsc::channel(config.max_queue);
        let dropped = stats.stat("tracing.opentelemetry.spans_dropped");
        let p = config.sampling / 100.0;
        let threshold = (p < 1.0).then(|| (p * 2f64.powi(64)) as u64);
        let s = |k: &str, v: &str| kv(k, v.to_owned());
        let resource = Resource {
            attributes: vec![
                s("service.name", &origin.service_name),
                s("k8s.namespace.name", origin.namespace),
                s("eastguard.node.id", origin.node_id),
            ],
            ..Default::default()
        };
        Ok((
            Self {
                threshold,
                tx,
                dropped: dropped.clone(),
                sampled: stats.stat("tracing.random_sampling"),
            },
            Export {
                rx,
                endpoint,
                resource,
                sent: stats.stat("tracing.opentelemetry.spans_sent"),
                dropped,
                failed: stats.stat("tracing.opentelemetry.export_failed"),
            },
        ))
    }

    /// Decides sampling for a request and rewrites its trace headers so that it leaves with a
    /// new span id as its parent; returns the span to finish if the call is sampled.
    pub fn begin(&self, headers: &mut HeaderMap, kind: Side) -> Option<ActiveSpan> {
        let incoming = extract(headers);
        let trace_id = incoming
            .as_ref()
            .and_then(|c| c.trace_id)
            .unwrap_or_else(random);
        let sampled = match incoming.as_ref().and_then(|c| c.sampled) {
            Some(decided) => decided,
            None => {
                let sampled = self.samples(&trace_id);
                if sampled {
                    self.sampled.inc();
                }
                sampled
            }
        };
        let span_id: [u8; 8] = random();
        let b3 = incoming.as_ref().map_or(B3Form::None, |c| c.b3);
        let parent = incoming.and_then(|c| c.parent);
        let trace_state = headers
            .get(&TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= MAX_TRACESTATE)
            .unwrap_or("")
            .to_owned();
        if trace_state.is_empty() {
            headers.remove(&TRACESTATE);
        }
        inject(headers, &trace_id, &span_id, parent.as_ref(), sampled, b3);
        sampled.then(|| ActiveSpan {
            trace_id,
            span_id,
            parent,
            trace_state,
            kind,
            start: SystemTime::now(),
        })
    }

    fn samples(&self, trace_id: &[u8; 16]) -> bool {
        let Some(threshold) = self.threshold else {
            return true;
        };
        let low = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or_default());
        low < threshold
    }

    /// Ends a span with what the call's record says, and queues it (never waiting).
    pub fn finish(&self, s: ActiveSpan, r: &Record, local_id: &str) {
        let end = SystemTime::now();
        let nanos = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        let mut attributes = Vec::with_capacity(16);
        let mut put = |k: &'static str, v: Option<&str>| {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                attributes.push(kv(k, v.to_owned()));
            }
        };
        // OTel HTTP semantic conventions. The query string is never recorded: it may carry
        // secrets the tracing backend has no business holding.
        put("http.request.method", r.method.as_deref());
        put(
            "url.path",
            r.path.as_deref().map(|p| p.split('?').next().unwrap_or(p)),
        );
        put("server.address", r.authority.as_deref());
        put("user_agent.original", r.user_agent.as_deref());
        put(
            "network.protocol.version",
            r.protocol.strip_prefix("HTTP/").map(|v| match v {
                "2" | "2.0" => "2",
                v => v,
            }),
        );
        put(
            "client.address",
            r.downstream_remote_address
                .map(|a| a.ip().to_string())
                .as_deref(),
        );
        put("http.request.header.x-request-id", r.request_id.as_deref());
        // The mesh: who called whom, verified, and what policy said.
        let (source, destination) = match s.kind {
            Side::Server => (r.downstream_peer_uri_san.as_deref(), Some(local_id)),
            Side::Client => (Some(local_id), r.upstream_peer_uri_san.as_deref()),
        };
        put("source.principal", source);
        put("destination.principal", destination);
        put("eastguard.rbac.decision", r.rbac_decision);
        put("eastguard.rbac.policy", r.rbac_policy.as_deref());
        put("upstream_cluster", r.upstream_cluster.as_deref());
        put(
            "upstream_address",
            r.upstream_host.map(|a| a.to_string()).as_deref(),
        );
        put(
            "response_flags",
            Some(r.response_flags).filter(|f| *f != "-"),
        );
        put("route_name", r.route_name.as_deref());
        if r.response_code != 0 {
            attributes.push(KeyValue {
                key: "http.response.status_code".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(i64::from(r.response_code))),
                }),
                ..Default::default()
            });
        }
        // Semantic conventions: 5xx is an error on either side, 4xx only for the client.
        let error = r.response_code == 0
            || r.response_code >= 500
            || (s.kind == Side::Client && r.response_code >= 400);
        let kind = match s.kind {
            Side::Server => SpanKind::Server,
            Side::Client => SpanKind::Client,
        };
        let name = format!(
            "{} {}",
            r.method.as_deref().unwrap_or("HTTP"),
            r.authority.as_deref().unwrap_or("-")
        );
        let span = Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            trace_state: s.trace_state,
            parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 0x1 | 0x100 | if s.parent.is_some() { 0x200 } else { 0 },
            name,
            kind: kind as i32,
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(end),
            attributes,
            status: Some(Status {
                message: String::new(),
                code: if error {
                    StatusCode::Error
                } else {
                    StatusCode::Unset
                } as i32,
            }),
        };
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

fn kv(key: &str, v: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v)),
        }),
        ..Default::default()
    }
}

/// Random ids from the system RNG (batched per thread by `rng`); an all-zero id is invalid in
/// both W3C and B3.
fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    while b.iter().all(|x| *x == 0) {
        if !crate::rng::fill(&mut b) {
            // No RNG: a time-derived id still keeps traces apart well enough for correlation.
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos())
                .to_be_bytes();
            for (i, x) in b.iter_mut().enumerate() {
                *x = t[(16 - N + i) % 16] | 1;
            }
        }
    }
    b
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    out.iter().any(|b| *b != 0).then_some(out)
}

/// A B3 trace id: 16 or 32 lowercase hex digits (a 64-bit id is the low half).
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    if s.len() == 16 {
        let low: [u8; 8] = hex_array(s)?;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&low);
        Some(id)
    } else {
        hex_array(s)
    }
}

fn header<'h>(h: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The context a request carries: W3C first, then B3 single, then B3 multi. A malformed header
/// counts as absent (a new trace starts), never as an error.
fn extract(h: &HeaderMap) -> Option<Incoming> {
    if let Some(tp) = header(h, &TRACEPARENT).and_then(traceparent) {
        let b3 = if h.contains_key(&B3) {
            B3Form::Single
        } else if h.contains_key(&B3_TRACE_ID) {
            B3Form::Multi
        } else {
            B3Form::None
        };
        return Some(Incoming { b3, ..tp });
    }
    if let Some(v) = header(h, &B3) {
        return b3_single(v);
    }
    let sampled = header(h, &B3_FLAGS)
        .filter(|f| *f == "1")
        .map(|_| true)
        .or_else(|| match header(h, &B3_SAMPLED)? {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        });
    let trace_id = header(h, &B3_TRACE_ID).and_then(b3_trace_id);
    let parent = header(h, &B3_SPAN_ID).and_then(hex_array::<8>);
    if trace_id.is_none() && sampled.is_none() {
        return None;
    }
    Some(Incoming {
        // A span id without its trace id (or the reverse) is not a context to join.
        trace_id: trace_id.filter(|_| parent.is_some()),
        parent: parent.filter(|_| trace_id.is_some()),
        sampled,
        b3: B3Form::Multi,
    })
}

/// `version-traceid-parentid-flags`; a future version may append fields after a `-`.
fn traceparent(v: &str) -> Option<Incoming> {
    let mut parts = v.splitn(5, '-');
    let version = parts.next()?;
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    let version: [u8; 1] = hex_array(version).or((version == "00").then_some([0]))?;
    if version == [0xff] || (version == [0] && rest.is_some()) || flags.len() != 2 {
        return None;
    }
    let flags: [u8; 1] = hex_array(flags).or((flags == "00").then_some([0]))?;
    Some(Incoming {
        trace_id: Some(hex_array(trace)?),
        parent: Some(hex_array(parent)?),
        sampled: Some(flags[0] & 1 == 1),
        b3: B3Form::None,
    })
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or only the sampling state.
fn b3_single(v: &str) -> Option<Incoming> {
    let decision = |s: &str| match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    let parts: Vec<&str> = v.splitn(5, '-').collect();
    match parts.as_slice() {
        [only] => Some(Incoming {
            trace_id: None,
            parent: None,
            sampled: Some(decision(only)?),
            b3: B3Form::Single,
        }),
        [trace, span, rest @ ..] if rest.len() <= 2 => Some(Incoming {
            trace_id: Some(b3_trace_id(trace)?),
            parent: Some(hex_array(span)?),
            sampled: match rest.first() {
                Some(s) => Some(decision(s)?),
                None => None,
            },
            b3: B3Form::Single,
        }),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the outgoing context: `traceparent` always, B3 in the form the caller used.
fn inject(
    h: &mut HeaderMap,
    trace_id: &[u8; 16],
    span_id: &[u8; 8],
    parent: Option<&[u8; 8]>,
    sampled: bool,
    b3: B3Form,
) {
    let (trace, span) = (hex(trace_id), hex(span_id));
    let flag = if sampled { "1" } else { "0" };
    let mut set = |name: &HeaderName, value: Cow<'_, str>| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name.clone(), v);
        }
    };
    set(&TRACEPARENT, format!("00-{trace}-{span}-0{flag}").into());
    match b3 {
        B3Form::None => {}
        B3Form::Single => set(&B3, format!("{trace}-{span}-{flag}").into()),
        B3Form::Multi => {
            set(&B3_TRACE_ID, trace.as_str().into());
            set(&B3_SPAN_ID, span.as_str().into());
            set(&B3_SAMPLED, flag.into());
            if let Some(p) = parent {
                set(&B3_PARENT, hex(p).into());
            }
        }
    }
    if b3 == B3Form::Multi && parent.is_none() {
        h.remove(&B3_PARENT);
    }
    h.remove(&B3_FLAGS);
}

impl Export {
    /// Exports batches until `stop` turns true, then what is queued, once.
    /// Exports until every [`Tracer`] handle is gone (a connection manager's tracer, replaced
    /// with its chain), then what is queued, once.
    pub async fn run_until_dropped(self) {
        let (_keep, stop) = watch::channel(false);
        self.run(stop).await;
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let channel = self.endpoint.connect_lazy();
        let scope = InstrumentationScope {
            name: "eastguard".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let stopping = tokio::select! {
                n = self.rx.recv_many(&mut batch, BATCH) => n == 0,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                while batch.len() < BATCH
                    && let Ok(s) = self.rx.try_recv()
                {
                    batch.push(s);
                }
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                let request = ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(self.resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(scope.clone()),
                            spans: std::mem::take(&mut batch),
                        }],
                    }],
                };
                let sent = otlp::export(channel.clone(), request);
                match tokio::time::timeout(EXPORT_TIMEOUT, sent).await {
                    Ok(Ok(_)) => self.sent.add(n),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, spans = n, "span export failed");
                        self.failed.inc();
                        self.dropped.add(n);
                    }
                    Err(_) => {
                        tracing::debug!(spans = n, "span export timed out");
                        self.failed.inc();
                        self.dropped.add(n);
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn traceparent_is_read_strictly() {
        let ok = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-01"),
        )]))
        .unwrap();
        assert_eq!(ok.trace_id.map(|t| hex(&t)).as_deref(), Some(TRACE));
        assert_eq!(ok.parent.map(|p| hex(&p)).as_deref(), Some(SPAN));
        assert_eq!(ok.sampled, Some(true));
        let unsampled = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-00"),
        )]))
        .unwrap();
        assert_eq!(unsampled.sampled, Some(false));
        // A later version may add fields; version 00 may not.
        assert!(
            extract(&headers(&[(
                "traceparent",
                &format!("01-{TRACE}-{SPAN}-01-x")
            )]))
            .is_some()
        );
        for bad in [
            format!("00-{TRACE}-{SPAN}-01-x"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}x-{SPAN}-01"),
            "garbage".to_owned(),
        ] {
            assert_eq!(extract(&headers(&[("traceparent", &bad)])), None, "{bad}");
        }
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let single = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))])).unwrap();
        assert_eq!(single.trace_id.map(|t| hex(&t)).as_deref(), Some(TRACE));
        assert_eq!((single.sampled, single.b3), (Some(true), B3Form::Single));
        let short = extract(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}"))])).unwrap();
        assert_eq!(
            short.trace_id.map(|t| hex(&t)).as_deref(),
            Some("0000000000000000a3ce929d0e0e4736")
        );
        assert_eq!(short.sampled, None);
        assert_eq!(
            extract(&headers(&[("b3", "0")])).unwrap().sampled,
            Some(false)
        );
        let multi = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap();
        assert_eq!((multi.sampled, multi.b3), (Some(true), B3Form::Multi));
        assert_eq!(multi.parent.map(|p| hex(&p)).as_deref(), Some(SPAN));
        let debug = extract(&headers(&[("x-b3-flags", "1")])).unwrap();
        assert_eq!((debug.trace_id, debug.sampled), (None, Some(true)));
        assert_eq!(extract(&headers(&[("b3", "nonsense-x")])), None);
    }

    fn tracer(sampling: f64) -> (Tracer, Export) {
        let origin = Origin {
            service_name: "w.ns".into(),
            namespace: "ns",
            node_id: "n",
        };
        let config = TracingConfig {
            sampling,
            address: "127.0.0.1:4317".into(),
            max_queue: 4,
        };
        Tracer::new(&config, &origin, &EnvoyStats::default()).unwrap()
    }

    #[test]
    fn the_request_leaves_with_its_span_as_parent_and_the_callers_decision() {
        let (t, _export) = tracer(0.0);
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=1"),
        ]);
        let span = t
            .begin(&mut h, Side::Server)
            .expect("the caller sampled it");
        assert_eq!(span.parent.map(|p| hex(&p)).as_deref(), Some(SPAN));
        let out = h["traceparent"].to_str().unwrap();
        assert_eq!(out, format!("00-{TRACE}-{}-01", hex(&span.span_id)));
        assert_eq!(h["tracestate"], "vendor=1");
        // Not sampled by the caller: no span, and the decision travels on.
        let mut h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        assert!(t.begin(&mut h, Side::Server).is_none());
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn a_new_trace_is_sampled_at_the_configured_rate_and_says_so() {
        let (all, _e1) = tracer(100.0);
        let (none, _e2) = tracer(0.0);
        let (some, _e3) = tracer(25.0);
        let mut sampled = 0;
        for _ in 0..4000 {
            let mut h = HeaderMap::new();
            assert!(all.begin(&mut h, Side::Client).is_some());
            assert!(h["traceparent"].to_str().unwrap().ends_with("-01"));
            let mut h = HeaderMap::new();
            assert!(none.begin(&mut h, Side::Client).is_none());
            assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
            let mut h = HeaderMap::new();
            sampled += usize::from(some.begin(&mut h, Side::Client).is_some());
        }
        assert!((800..1200).contains(&sampled), "{sampled} of 4000 at 25 %");
    }

    #[test]
    fn b3_callers_get_b3_back_and_a_full_queue_drops() {
        let (t, _export) = tracer(100.0);
        let mut h = headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let span = t.begin(&mut h, Side::Client).unwrap();
        assert_eq!(
            h["b3"].to_str().unwrap(),
            format!("{TRACE}-{}-1", hex(&span.span_id))
        );
        assert!(h.contains_key("traceparent"));
        let record = Record {
            method: Some("GET".into()),
            response_code: 200,
            ..Default::default()
        };
        // Nobody exports: the queue (4) fills, and the rest are counted as dropped.
        for _ in 0..10 {
            let s = t.begin(&mut HeaderMap::new(), Side::Client).unwrap();
            t.finish(s, &record, "spiffe://td/x");
        }
        assert_eq!(t.dropped.get(), 6);
    }
}
