//! Access logging as Istio configures it: the mesh-wide `accessLogFile` / `accessLogEncoding` /
//! `accessLogFormat` (here `--access-log-file`, `--access-log-encoding`, `--access-log-format`),
//! overridden per namespace or workload by Telemetry resources (`accessLogging` with Istio's
//! built-in `envoy` provider, or `disabled: true`). The result is Envoy's file access logger on
//! each HTTP connection manager, as istiod writes it.

use xds::codec;
use xds::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use xds::pb::envoy::config::core::v3::{
    DataSource, SubstitutionFormatString, data_source, substitution_format_string,
};
use xds::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
use xds::pb::google::protobuf::{Struct, Value, value};

use super::Mesh;
use crate::registry::{Registry, Telemetry, WorkloadEntry};

/// Istio's default text format (`accessLogEncoding: TEXT` without `accessLogFormat`).
const ISTIO_TEXT: &str = xds::types::ISTIO_ACCESS_LOG_FORMAT;

/// Istio's default JSON keys (`accessLogEncoding: JSON`) and the operator behind each.
const ISTIO_JSON: &[(&str, &str)] = &[
    ("authority", "%REQ(:AUTHORITY)%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("duration", "%DURATION%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("route_name", "%ROUTE_NAME%"),
    ("start_time", "%START_TIME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
];

/// Mesh-wide access logging (Istio's MeshConfig fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshAccessLog {
    /// `accessLogFile`; empty: off unless a Telemetry resource turns it on (then `/dev/stdout`).
    pub file: String,
    /// `accessLogEncoding: JSON` (else TEXT).
    pub json: bool,
    /// `accessLogFormat`: a text format, or for JSON a JSON object of key → operator.
    pub format: Option<String>,
}

/// Which side's connection managers a Telemetry rule is for (`match.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Outbound (`CLIENT`).
    Client,
    /// Inbound (`SERVER`).
    Server,
}

/// The access loggers for one side of workload `w`'s connection managers.
pub fn access_logs(w: &WorkloadEntry, reg: &Registry, mesh: &Mesh, side: Side) -> Vec<AccessLog> {
    let mesh_log = mesh.access_log.as_ref();
    let on = match governing(w, reg, &mesh.root_namespace, side) {
        Some(rule) => !rule.disabled,
        None => mesh_log.is_some_and(|m| !m.file.is_empty()),
    };
    if !on {
        return Vec::new();
    }
    let path = mesh_log
        .map(|m| m.file.as_str())
        .filter(|f| !f.is_empty())
        .unwrap_or("/dev/stdout");
    let format = match mesh_log {
        Some(MeshAccessLog {
            json: true, format, ..
        }) => substitution_format_string::Format::JsonFormat(json_format(format.as_deref())),
        Some(MeshAccessLog {
            format: Some(f), ..
        }) => text(f),
        _ => text(ISTIO_TEXT),
    };
    vec![AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(access_log::ConfigType::TypedConfig(codec::pack(
            &FileAccessLog {
                path: path.into(),
                access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                    SubstitutionFormatString {
                        format: Some(format),
                        ..Default::default()
                    },
                )),
            },
        ))),
        ..Default::default()
    }]
}

fn text(f: &str) -> substitution_format_string::Format {
    substitution_format_string::Format::TextFormatSource(DataSource {
        specifier: Some(data_source::Specifier::InlineString(f.to_owned())),
        ..Default::default()
    })
}

/// `accessLogFormat` for JSON is an object of key → operator (checked when the flag is read);
/// without one, Istio's keys.
fn json_format(format: Option<&str>) -> Struct {
    let custom: Option<serde_json::Map<String, serde_json::Value>> =
        format.and_then(|f| serde_json::from_str(f).ok());
    let fields = match custom {
        Some(map) => map
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
            .collect::<Vec<_>>(),
        None => ISTIO_JSON
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Value {
                        kind: Some(value::Kind::StringValue(v)),
                    },
                )
            })
            .collect(),
    }
}

/// The Telemetry rule that decides for `w`, as Istio picks it: one selecting the workload in its
/// namespace, else its namespace's without a selector, else the root namespace's. Only rules that
/// say something about access logging (for this side) count.
fn governing<'a>(
    w: &WorkloadEntry,
    reg: &'a Registry,
    root_namespace: &str,
    side: Side,
) -> Option<&'a crate::registry::AccessLogging> {
    let for_side = |t: &'a Telemetry| t.access_logging.iter().find(|a| a.sides.contains(&side));
    let ns = &w.meta.namespace;
    let selecting = reg.telemetry.iter().filter(|t| {
        &t.meta.namespace == ns
            && t.selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| w.spec.labels.get(k) == Some(v)))
    });
    let namespace_wide = reg
        .telemetry
        .iter()
        .filter(|t| &t.meta.namespace == ns && t.selector.is_none());
    let root = reg
        .telemetry
        .iter()
        .filter(|t| t.meta.namespace == root_namespace && t.selector.is_none());
    selecting
        .filter_map(for_side)
        .next()
        .or_else(|| namespace_wide.filter_map(for_side).next())
        .or_else(|| root.filter_map(for_side).next())
}
