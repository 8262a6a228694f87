//! Inventory rows as OTLP metrics, and back.
//!
//! Each row is one data point in each of five delta, monotonic sums — `eastguard.api.calls`,
//! `eastguard.api.denied`, `eastguard.api.request.bytes`, `eastguard.api.response.bytes`,
//! `eastguard.api.duration` (ms) — with the row's key as attributes in OTel's HTTP semantic
//! conventions where they exist: `server.address` (the service), `http.request.method`,
//! `http.route` (the template), `eastguard.status_class` (`2xx`), and `source.principal` (the
//! verified caller SPIFFE ID, Istio's attribute name; absent for a plaintext caller). The calls
//! point also carries the auth schemes, content types and examples. The resource names the
//! reporting sidecar: `eastguard.node.id` and `service.name`.
//!
//! Decoding checks sizes: a request from a hostile or broken exporter is refused whole.

use std::collections::HashMap;

use serde::Serialize;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric,
    number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::call::AuthScheme;
use crate::inventory::{Row, SensitiveRow};
use crate::sensitive::Direction;

pub const CALLS: &str = "eastguard.api.calls";
pub const DENIED: &str = "eastguard.api.denied";
pub const REQUEST_BYTES: &str = "eastguard.api.request.bytes";
pub const RESPONSE_BYTES: &str = "eastguard.api.response.bytes";
pub const DURATION: &str = "eastguard.api.duration";
/// Sensitive-data findings: one point per (operation, data type, direction, place).
pub const SENSITIVE: &str = "eastguard.api.sensitive";

pub const NODE_ID: &str = "eastguard.node.id";
const SCOPE: &str = "eastguard.apisec";

/// Data points one request may carry (per metric).
pub const MAX_POINTS: usize = 20_000;
/// Longest attribute value accepted, in bytes.
const MAX_VALUE: usize = 2048;
/// Entries of a list attribute.
const MAX_LIST: usize = 16;

/// Who reported, from the resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reporter {
    pub node_id: String,
    pub service_name: String,
    /// The reporting sidecar's current X509-SVID, for the control plane's certificate inventory.
    pub svid: Option<SvidInfo>,
}

/// What a sidecar says of its SVID: its SPIFFE ID, serial (hex, `:`-separated) and expiry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct SvidInfo {
    pub spiffe_id: String,
    pub serial: String,
    pub not_after_unix: u64,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("one resource per request (the reporting sidecar), got {0}")]
    Resources(usize),
    #[error("the resource has no {NODE_ID} attribute")]
    NoNode,
    #[error("more than {MAX_POINTS} data points in {0}")]
    TooMany(String),
    #[error("attribute {0}: {1}")]
    Attribute(String, &'static str),
    #[error("metric {0}: not a delta monotonic sum")]
    Shape(String),
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.to_owned()))
}

fn list<'a>(key: &str, items: impl IntoIterator<Item = &'a str>) -> KeyValue {
    kv(
        key,
        any_value::Value::ArrayValue(ArrayValue {
            values: items
                .into_iter()
                .map(|i| AnyValue {
                    value: Some(any_value::Value::StringValue(i.to_owned())),
                })
                .collect(),
        }),
    )
}

fn nanos(unix_secs: u64) -> u64 {
    unix_secs.saturating_mul(1_000_000_000)
}

fn resource_attributes(reporter: &Reporter) -> Vec<KeyValue> {
    let mut a = vec![
        s(NODE_ID, &reporter.node_id),
        s("service.name", &reporter.service_name),
    ];
    if let Some(svid) = &reporter.svid {
        a.push(s("eastguard.svid.spiffe_id", &svid.spiffe_id));
        a.push(s("eastguard.svid.serial", &svid.serial));
        a.push(kv(
            "eastguard.svid.not_after",
            any_value::Value::IntValue(i64::try_from(svid.not_after_unix).unwrap_or(i64::MAX)),
        ));
    }
    a
}

/// The attributes that key a row.
fn key_attributes(r: &Row) -> Vec<KeyValue> {
    let mut a = vec![
        s("server.address", &r.service),
        s("http.request.method", &r.method),
        s("http.route", &r.template),
        s("eastguard.status_class", &r.status_class),
    ];
    if let Some(c) = &r.caller {
        a.push(s("source.principal", c));
    }
    a
}

/// An export request for `rows` (deltas) from the sidecar `reporter`.
pub fn encode(reporter: &Reporter, rows: &[Row]) -> ExportMetricsServiceRequest {
    encode_with(reporter, rows, &[])
}

/// The same, with sensitive-data findings (deltas).
pub fn encode_with(
    reporter: &Reporter,
    rows: &[Row],
    sensitive: &[SensitiveRow],
) -> ExportMetricsServiceRequest {
    let point = |r: &Row, value: number_data_point::Value, extra: Vec<KeyValue>| {
        let mut attributes = key_attributes(r);
        attributes.extend(extra);
        NumberDataPoint {
            attributes,
            start_time_unix_nano: nanos(r.first_seen_unix),
            time_unix_nano: nanos(r.last_seen_unix),
            value: Some(value),
            ..Default::default()
        }
    };
    let sum = |name: &str, unit: &str, points: Vec<NumberDataPoint>| Metric {
        name: name.to_owned(),
        unit: unit.to_owned(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Delta as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    use number_data_point::Value::{AsDouble, AsInt};
    let int = |v: u64| AsInt(i64::try_from(v).unwrap_or(i64::MAX));
    let metrics = vec![
        sum(
            CALLS,
            "{call}",
            rows.iter()
                .map(|r| {
                    point(
                        r,
                        int(r.calls),
                        vec![
                            list("eastguard.auth_schemes", r.auth_schemes.iter().copied()),
                            list(
                                "eastguard.request.content_types",
                                r.request_content_types.iter().map(String::as_str),
                            ),
                            list(
                                "eastguard.response.content_types",
                                r.response_content_types.iter().map(String::as_str),
                            ),
                            list("eastguard.examples", r.examples.iter().map(String::as_str)),
                        ],
                    )
                })
                .collect(),
        ),
        sum(
            DENIED,
            "{call}",
            rows.iter()
                .map(|r| point(r, int(r.denied), vec![]))
                .collect(),
        ),
        sum(
            REQUEST_BYTES,
            "By",
            rows.iter()
                .map(|r| point(r, int(r.request_bytes), vec![]))
                .collect(),
        ),
        sum(
            RESPONSE_BYTES,
            "By",
            rows.iter()
                .map(|r| point(r, int(r.response_bytes), vec![]))
                .collect(),
        ),
        sum(
            DURATION,
            "ms",
            rows.iter()
                .map(|r| point(r, AsDouble(r.latency_ms_total), vec![]))
                .collect(),
        ),
    ];
    let mut metrics = metrics;
    if !sensitive.is_empty() {
        metrics.push(sum(
            SENSITIVE,
            "{finding}",
            sensitive
                .iter()
                .map(|f| NumberDataPoint {
                    attributes: vec![
                        s("server.address", &f.service),
                        s("http.request.method", &f.method),
                        s("http.route", &f.template),
                        s("eastguard.data_type", &f.data_type),
                        s(
                            "eastguard.direction",
                            match f.direction {
                                Direction::Request => "request",
                                Direction::Response => "response",
                            },
                        ),
                        s("eastguard.location", &f.location),
                    ],
                    value: Some(int(f.count)),
                    ..Default::default()
                })
                .collect(),
        ));
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource_attributes(reporter),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: SCOPE.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Who reported, from a resource's attributes.
fn reporter_of(resource: Option<&Resource>) -> Result<Reporter, DecodeError> {
    let mut reporter = Reporter::default();
    let mut svid = SvidInfo::default();
    for a in resource.iter().flat_map(|r| &r.attributes) {
        match a.key.as_str() {
            NODE_ID => reporter.node_id = str_of(a)?.to_owned(),
            "service.name" => reporter.service_name = str_of(a)?.to_owned(),
            "eastguard.svid.spiffe_id" => svid.spiffe_id = str_of(a)?.to_owned(),
            "eastguard.svid.serial" => svid.serial = str_of(a)?.to_owned(),
            "eastguard.svid.not_after" => match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::IntValue(v)) => svid.not_after_unix = (*v).max(0) as u64,
                _ => return Err(DecodeError::Attribute(a.key.clone(), "not an integer")),
            },
            _ => {}
        }
    }
    if !svid.spiffe_id.is_empty() {
        reporter.svid = Some(svid);
    }
    Ok(reporter)
}

fn str_of(a: &KeyValue) -> Result<&str, DecodeError> {
    match a.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(v)) if v.len() <= MAX_VALUE => Ok(v),
        Some(any_value::Value::StringValue(_)) => {
            Err(DecodeError::Attribute(a.key.clone(), "too long"))
        }
        _ => Err(DecodeError::Attribute(a.key.clone(), "not a string")),
    }
}

fn list_of(a: &KeyValue) -> Result<Vec<String>, DecodeError> {
    let Some(any_value::Value::ArrayValue(arr)) = a.value.as_ref().and_then(|v| v.value.as_ref())
    else {
        return Err(DecodeError::Attribute(a.key.clone(), "not a list"));
    };
    if arr.values.len() > MAX_LIST {
        return Err(DecodeError::Attribute(a.key.clone(), "too many entries"));
    }
    arr.values
        .iter()
        .map(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) if s.len() <= MAX_VALUE => Ok(s.clone()),
            _ => Err(DecodeError::Attribute(
                a.key.clone(),
                "not a list of short strings",
            )),
        })
        .collect()
}

/// A row's key as attributes carry it.
type Key = (String, String, String, String, Option<String>);

/// Rows from an export request, and who sent it. Points of the same key add up.
pub fn decode(req: &ExportMetricsServiceRequest) -> Result<(Reporter, Vec<Row>), DecodeError> {
    decode_with(req).map(|(r, rows, _)| (r, rows))
}

/// A sensitive-data finding's key as attributes carry it (the bool: in a response).
type FindingKey = (String, String, String, String, bool, String);

/// Sensitive-data findings of one metric (points of the same key add up).
fn sensitive_points(m: &Metric) -> Result<Vec<SensitiveRow>, DecodeError> {
    let Some(metric::Data::Sum(sum)) = &m.data else {
        return Err(DecodeError::Shape(m.name.clone()));
    };
    if sum.data_points.len() > MAX_POINTS {
        return Err(DecodeError::TooMany(m.name.clone()));
    }
    let mut out: HashMap<FindingKey, u64> = HashMap::new();
    for p in &sum.data_points {
        let mut k = FindingKey::default();
        for a in &p.attributes {
            match a.key.as_str() {
                "server.address" => k.0 = str_of(a)?.to_owned(),
                "http.request.method" => k.1 = str_of(a)?.to_owned(),
                "http.route" => k.2 = str_of(a)?.to_owned(),
                "eastguard.data_type" => k.3 = str_of(a)?.to_owned(),
                "eastguard.direction" => k.4 = str_of(a)? == "response",
                "eastguard.location" => k.5 = str_of(a)?.to_owned(),
                _ => {}
            }
        }
        if k.0.is_empty() || k.2.is_empty() || k.3.is_empty() {
            return Err(DecodeError::Attribute(
                SENSITIVE.into(),
                "missing key attributes",
            ));
        }
        let n = match p.value {
            Some(number_data_point::Value::AsInt(v)) => v.max(0) as u64,
            _ => 0,
        };
        let c = out.entry(k).or_default();
        *c = c.saturating_add(n);
    }
    Ok(out
        .into_iter()
        .map(
            |((service, method, template, data_type, response, location), count)| SensitiveRow {
                service,
                method,
                template,
                data_type,
                direction: if response {
                    Direction::Response
                } else {
                    Direction::Request
                },
                location,
                count,
            },
        )
        .collect())
}

/// Rows, sensitive-data findings, and who sent them.
pub fn decode_with(
    req: &ExportMetricsServiceRequest,
) -> Result<(Reporter, Vec<Row>, Vec<SensitiveRow>), DecodeError> {
    let [rm] = req.resource_metrics.as_slice() else {
        return Err(DecodeError::Resources(req.resource_metrics.len()));
    };
    let reporter = reporter_of(rm.resource.as_ref())?;
    if reporter.node_id.is_empty() {
        return Err(DecodeError::NoNode);
    }
    let mut rows: HashMap<Key, Row> = HashMap::new();
    let mut found: Vec<SensitiveRow> = Vec::new();
    let mut points = 0usize;
    for sm in &rm.scope_metrics {
        for m in &sm.metrics {
            let which = match m.name.as_str() {
                CALLS | DENIED | REQUEST_BYTES | RESPONSE_BYTES | DURATION => m.name.as_str(),
                SENSITIVE => {
                    found.extend(sensitive_points(m)?);
                    continue;
                }
                _ => continue,
            };
            let Some(metric::Data::Sum(sum)) = &m.data else {
                return Err(DecodeError::Shape(m.name.clone()));
            };
            if sum.aggregation_temporality != AggregationTemporality::Delta as i32 {
                return Err(DecodeError::Shape(m.name.clone()));
            }
            points += sum.data_points.len();
            if points > MAX_POINTS * 5 || sum.data_points.len() > MAX_POINTS {
                return Err(DecodeError::TooMany(m.name.clone()));
            }
            for p in &sum.data_points {
                let mut key: Key = Default::default();
                let mut extra: Vec<(&str, Vec<String>)> = Vec::new();
                for a in &p.attributes {
                    match a.key.as_str() {
                        "server.address" => key.0 = str_of(a)?.to_owned(),
                        "http.request.method" => key.1 = str_of(a)?.to_owned(),
                        "http.route" => key.2 = str_of(a)?.to_owned(),
                        "eastguard.status_class" => key.3 = str_of(a)?.to_owned(),
                        "source.principal" => key.4 = Some(str_of(a)?.to_owned()),
                        k @ ("eastguard.auth_schemes"
                        | "eastguard.request.content_types"
                        | "eastguard.response.content_types"
                        | "eastguard.examples") => extra.push((k, list_of(a)?)),
                        _ => {}
                    }
                }
                for (name, v) in [("server.address", &key.0), ("http.route", &key.2)] {
                    if v.is_empty() {
                        return Err(DecodeError::Attribute(name.into(), "missing"));
                    }
                }
                let value = match p.value {
                    Some(number_data_point::Value::AsInt(v)) => v.max(0) as f64,
                    Some(number_data_point::Value::AsDouble(v)) if v.is_finite() => v.max(0.0),
                    _ => 0.0,
                };
                let row = rows.entry(key.clone()).or_insert_with(|| Row {
                    service: key.0.clone(),
                    method: key.1.clone(),
                    template: key.2.clone(),
                    caller: key.4.clone(),
                    status_class: key.3.clone(),
                    calls: 0,
                    denied: 0,
                    request_bytes: 0,
                    response_bytes: 0,
                    latency_ms_total: 0.0,
                    latency_ms_max: 0.0,
                    auth_schemes: Vec::new(),
                    request_content_types: Vec::new(),
                    response_content_types: Vec::new(),
                    examples: Vec::new(),
                    first_seen_unix: u64::MAX,
                    last_seen_unix: 0,
                });
                row.first_seen_unix = row
                    .first_seen_unix
                    .min(p.start_time_unix_nano / 1_000_000_000);
                row.last_seen_unix = row.last_seen_unix.max(p.time_unix_nano / 1_000_000_000);
                let n = value as u64;
                match which {
                    CALLS => row.calls = row.calls.saturating_add(n),
                    DENIED => row.denied = row.denied.saturating_add(n),
                    REQUEST_BYTES => row.request_bytes = row.request_bytes.saturating_add(n),
                    RESPONSE_BYTES => row.response_bytes = row.response_bytes.saturating_add(n),
                    _ => row.latency_ms_total += value,
                }
                for (k, values) in extra {
                    let into = match k {
                        "eastguard.auth_schemes" => {
                            for v in values {
                                if let Some(s) = AuthScheme::from_name(&v)
                                    && !row.auth_schemes.contains(&s.as_str())
                                {
                                    row.auth_schemes.push(s.as_str());
                                }
                            }
                            continue;
                        }
                        "eastguard.request.content_types" => &mut row.request_content_types,
                        "eastguard.response.content_types" => &mut row.response_content_types,
                        _ => &mut row.examples,
                    };
                    for v in values {
                        if into.len() < MAX_LIST && !into.contains(&v) {
                            into.push(v);
                        }
                    }
                }
            }
        }
    }
    let mut rows: Vec<Row> = rows.into_values().collect();
    for r in &mut rows {
        if r.first_seen_unix == u64::MAX {
            r.first_seen_unix = r.last_seen_unix;
        }
    }
    rows.sort_by(|a, b| {
        (
            &a.service,
            &a.template,
            &a.method,
            &a.caller,
            &a.status_class,
        )
            .cmp(&(
                &b.service,
                &b.template,
                &b.method,
                &b.caller,
                &b.status_class,
            ))
    });
    Ok((reporter, rows, found))
}

/// An audit event as exported: OCSF JSON, and what is needed to list it without parsing it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub time_ms: u64,
    pub class_uid: u32,
    pub class_name: String,
    pub severity_id: u8,
    pub message: String,
    /// The whole OCSF event.
    pub ocsf: serde_json::Value,
}

/// Events one request may carry.
pub const MAX_EVENTS: usize = 1000;
/// Largest event body, in bytes.
const MAX_EVENT: usize = 64 * 1024;

/// OTLP logs carrying OCSF events (one log record each, the event as the body).
pub fn encode_events(
    reporter: &Reporter,
    events: &[serde_json::Value],
) -> opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest {
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    let records = events
        .iter()
        .map(|e| {
            let time_ms = e["time"].as_u64().unwrap_or(0);
            let severity = e["severity_id"].as_u64().unwrap_or(0);
            LogRecord {
                time_unix_nano: time_ms.saturating_mul(1_000_000),
                observed_time_unix_nano: time_ms.saturating_mul(1_000_000),
                // OTel severity: INFO 9, WARN 13, ERROR 17 (OCSF Medium / High / Critical).
                severity_number: match severity {
                    0..=2 => 9,
                    3 => 13,
                    _ => 17,
                },
                severity_text: e["severity"].as_str().unwrap_or("").to_owned(),
                body: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(e.to_string())),
                }),
                attributes: vec![
                    s("event.name", e["class_name"].as_str().unwrap_or("")),
                    kv(
                        "ocsf.class_uid",
                        any_value::Value::IntValue(e["class_uid"].as_i64().unwrap_or(0)),
                    ),
                ],
                ..Default::default()
            }
        })
        .collect();
    opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: resource_attributes(reporter),
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: SCOPE.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Events from an OTLP logs request, and who sent them; a record that is not an OCSF event
/// (a JSON object with a numeric `class_uid`) refuses the request.
pub fn decode_events(
    req: &opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest,
) -> Result<(Reporter, Vec<Event>), DecodeError> {
    let [rl] = req.resource_logs.as_slice() else {
        return Err(DecodeError::Resources(req.resource_logs.len()));
    };
    let reporter = reporter_of(rl.resource.as_ref())?;
    if reporter.node_id.is_empty() {
        return Err(DecodeError::NoNode);
    }
    let records: Vec<_> = rl.scope_logs.iter().flat_map(|s| &s.log_records).collect();
    if records.len() > MAX_EVENTS {
        return Err(DecodeError::TooMany("log records".into()));
    }
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let Some(any_value::Value::StringValue(body)) =
            r.body.as_ref().and_then(|b| b.value.as_ref())
        else {
            return Err(DecodeError::Attribute("body".into(), "not a string"));
        };
        if body.len() > MAX_EVENT {
            return Err(DecodeError::Attribute("body".into(), "too long"));
        }
        let ocsf: serde_json::Value = serde_json::from_str(body)
            .map_err(|_| DecodeError::Attribute("body".into(), "not JSON"))?;
        let Some(class_uid) = ocsf["class_uid"]
            .as_u64()
            .and_then(|c| u32::try_from(c).ok())
        else {
            return Err(DecodeError::Attribute("body".into(), "not an OCSF event"));
        };
        out.push(Event {
            time_ms: ocsf["time"]
                .as_u64()
                .unwrap_or(r.time_unix_nano / 1_000_000),
            class_uid,
            class_name: ocsf["class_name"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(64)
                .collect(),
            severity_id: ocsf["severity_id"].as_u64().map_or(0, |v| v.min(99) as u8),
            message: ocsf["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(1024)
                .collect(),
            ocsf,
        });
    }
    Ok((reporter, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(caller: Option<&str>) -> Row {
        Row {
            service: "orders.shop.svc.cluster.local".into(),
            method: "GET".into(),
            template: "/orders/{id}".into(),
            caller: caller.map(Into::into),
            status_class: "2xx".into(),
            calls: 7,
            denied: 1,
            request_bytes: 10,
            response_bytes: 700,
            latency_ms_total: 3.5,
            latency_ms_max: 1.0,
            auth_schemes: vec!["bearer-jwt"],
            request_content_types: vec![],
            response_content_types: vec!["application/json".into()],
            examples: vec!["/orders/1".into()],
            first_seen_unix: 1_700_000_000,
            last_seen_unix: 1_700_000_010,
        }
    }

    #[test]
    fn rows_survive_the_round_trip() {
        let reporter = Reporter {
            node_id: "sidecar~127.0.0.1~orders.shop~shop.svc.cluster.local".into(),
            service_name: "orders".into(),
            svid: Some(SvidInfo {
                spiffe_id: "spiffe://cluster.local/ns/shop/sa/orders".into(),
                serial: "0a:1b".into(),
                not_after_unix: 1_800_000_000,
            }),
        };
        let rows = vec![
            row(Some("spiffe://cluster.local/ns/shop/sa/web")),
            row(None),
        ];
        let req = encode(&reporter, &rows);
        let (got_reporter, mut got) = decode(&req).unwrap();
        assert_eq!(got_reporter, reporter);
        // The max latency is not exported (a sum cannot carry it).
        for r in &mut got {
            r.latency_ms_max = 1.0;
        }
        let mut want = rows;
        want.sort_by(|a, b| a.caller.cmp(&b.caller));
        got.sort_by(|a, b| a.caller.cmp(&b.caller));
        assert_eq!(got, want);
    }

    #[test]
    fn sensitive_findings_survive_the_round_trip() {
        let reporter = Reporter {
            node_id: "n".into(),
            service_name: "s".into(),
            svid: None,
        };
        let f = SensitiveRow {
            service: "orders.shop".into(),
            method: "GET".into(),
            template: "/cards/{id}".into(),
            data_type: "payment_card".into(),
            direction: Direction::Response,
            location: "body:/card".into(),
            count: 3,
        };
        let req = encode_with(&reporter, &[row(None)], std::slice::from_ref(&f));
        let (_, _, got) = decode_with(&req).unwrap();
        assert_eq!(got, vec![f]);
    }

    #[test]
    fn events_survive_the_round_trip_and_non_events_are_refused() {
        let reporter = Reporter {
            node_id: "n".into(),
            service_name: "s".into(),
            svid: None,
        };
        let e = serde_json::json!({"class_uid": 2004, "class_name": "Detection Finding", "time": 5,
            "severity_id": 4, "severity": "High", "message": "m"});
        let (r, got) = decode_events(&encode_events(&reporter, std::slice::from_ref(&e))).unwrap();
        assert_eq!(r, reporter);
        assert_eq!(
            (got[0].class_uid, got[0].severity_id, got[0].time_ms),
            (2004, 4, 5)
        );
        assert_eq!(got[0].ocsf, e);
        let bad = encode_events(&reporter, &[serde_json::json!({"hello": 1})]);
        assert_eq!(
            decode_events(&bad).unwrap_err(),
            DecodeError::Attribute("body".into(), "not an OCSF event")
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let reporter = Reporter {
            node_id: "n".into(),
            service_name: "s".into(),
            svid: None,
        };
        let good = encode(&reporter, &[row(None)]);
        assert!(decode(&good).is_ok());
        let mut none = good.clone();
        none.resource_metrics[0].resource = None;
        assert_eq!(decode(&none).unwrap_err(), DecodeError::NoNode);
        let mut two = good.clone();
        two.resource_metrics.push(two.resource_metrics[0].clone());
        assert_eq!(decode(&two).unwrap_err(), DecodeError::Resources(2));
        let mut long = good.clone();
        let m = &mut long.resource_metrics[0].scope_metrics[0].metrics[1];
        let Some(metric::Data::Sum(sum)) = &mut m.data else {
            unreachable!()
        };
        sum.data_points[0].attributes[2] = s("http.route", &"x".repeat(3000));
        assert_eq!(
            decode(&long).unwrap_err(),
            DecodeError::Attribute("http.route".into(), "too long")
        );
        let mut cumulative = good;
        let m = &mut cumulative.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(metric::Data::Sum(sum)) = &mut m.data else {
            unreachable!()
        };
        sum.aggregation_temporality = AggregationTemporality::Cumulative as i32;
        assert_eq!(
            decode(&cumulative).unwrap_err(),
            DecodeError::Shape(CALLS.into())
        );
    }
}
