//! Envoy's access-log command operators (`%RESPONSE_CODE%`, `%REQ(:AUTHORITY)%`, …) compiled once
//! from a format string, then rendered per record. Only operators this proxy can fill are
//! accepted; any other is refused when the config is read, naming it.

use serde_json::Value;

use super::{Record, dash};

/// Istio's default text format (`meshConfig.accessLogFormat` unset).
pub const ISTIO_TEXT: &str = xds::types::ISTIO_ACCESS_LOG_FORMAT;

/// One operator: which record field it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    StartTime,
    Method,
    Path,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamServiceTime,
    XForwardedFor,
    UserAgent,
    RequestId,
    Authority,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamPeerUriSan,
    UpstreamPeerUriSan,
    RequestedServerName,
    RouteName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Op(Op, Option<usize>),
}

/// A format string that cannot be compiled: an unknown or malformed operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(String);

/// A compiled format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Segment>);

/// Operators accepted, for error messages.
const SUPPORTED: &str = "START_TIME, REQ(:METHOD), REQ(:PATH), REQ(X-ENVOY-ORIGINAL-PATH?:PATH), REQ(:AUTHORITY), REQ(HOST), REQ(USER-AGENT), REQ(X-REQUEST-ID), REQ(X-FORWARDED-FOR), RESP(X-ENVOY-UPSTREAM-SERVICE-TIME), PROTOCOL, RESPONSE_CODE, RESPONSE_FLAGS, RESPONSE_CODE_DETAILS, CONNECTION_TERMINATION_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON, BYTES_RECEIVED, BYTES_SENT, DURATION, UPSTREAM_HOST, UPSTREAM_CLUSTER, UPSTREAM_CLUSTER_RAW, UPSTREAM_LOCAL_ADDRESS, DOWNSTREAM_LOCAL_ADDRESS, DOWNSTREAM_REMOTE_ADDRESS, DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT, DOWNSTREAM_PEER_URI_SAN, UPSTREAM_PEER_URI_SAN, REQUESTED_SERVER_NAME, ROUTE_NAME";

fn header_op(args: &str, response: bool) -> Option<Op> {
    let h = args.to_ascii_lowercase();
    if response {
        return (h == "x-envoy-upstream-service-time").then_some(Op::UpstreamServiceTime);
    }
    Some(match h.as_str() {
        ":method" => Op::Method,
        // The path the request arrived with (this proxy never rewrites it before the log).
        ":path" | "x-envoy-original-path?:path" => Op::Path,
        ":authority" | "host" | ":authority?host" | "host?:authority" => Op::Authority,
        "user-agent" => Op::UserAgent,
        "x-request-id" => Op::RequestId,
        "x-forwarded-for" => Op::XForwardedFor,
        _ => return None,
    })
}

fn op(name: &str, args: Option<&str>) -> Option<Op> {
    Some(match (name, args) {
        ("REQ", Some(a)) => header_op(a, false)?,
        ("RESP", Some(a)) => header_op(a, true)?,
        ("START_TIME", None) => Op::StartTime,
        ("PROTOCOL", None) => Op::Protocol,
        ("RESPONSE_CODE", None) => Op::ResponseCode,
        ("RESPONSE_FLAGS", None) => Op::ResponseFlags,
        ("RESPONSE_CODE_DETAILS", None) => Op::ResponseCodeDetails,
        ("CONNECTION_TERMINATION_DETAILS", None) => Op::ConnectionTerminationDetails,
        ("UPSTREAM_TRANSPORT_FAILURE_REASON", None) => Op::UpstreamTransportFailureReason,
        ("BYTES_RECEIVED", None) => Op::BytesReceived,
        ("BYTES_SENT", None) => Op::BytesSent,
        ("DURATION", None) => Op::Duration,
        ("UPSTREAM_HOST", None) => Op::UpstreamHost,
        ("UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW", None) => Op::UpstreamCluster,
        ("UPSTREAM_LOCAL_ADDRESS", None) => Op::UpstreamLocalAddress,
        ("DOWNSTREAM_LOCAL_ADDRESS", None) => Op::DownstreamLocalAddress,
        ("DOWNSTREAM_REMOTE_ADDRESS", None) => Op::DownstreamRemoteAddress,
        ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None) => Op::DownstreamRemoteAddressWithoutPort,
        ("DOWNSTREAM_PEER_URI_SAN", None) => Op::DownstreamPeerUriSan,
        ("UPSTREAM_PEER_URI_SAN", None) => Op::UpstreamPeerUriSan,
        ("REQUESTED_SERVER_NAME", None) => Op::RequestedServerName,
        ("ROUTE_NAME", None) => Op::RouteName,
        _ => return None,
    })
}

impl Template {
    /// Compiles a format string; `%%` is a literal `%`. Errors name the operator.
    pub fn parse(format: &str) -> Result<Self, FormatError> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = format;
        while let Some(start) = rest.find('%') {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            if let Some(r) = after.strip_prefix('%') {
                literal.push('%');
                rest = r;
                continue;
            }
            let end = after.find('%').ok_or_else(|| {
                FormatError(format!("unterminated operator at {:?}", &rest[start..]))
            })?;
            let body = &after[..end];
            rest = &after[end + 1..];
            // NAME, NAME(args), either with :max_length.
            let (call, max) = match body.rsplit_once(':') {
                Some((call, n))
                    if !n.is_empty()
                        && n.bytes().all(|c| c.is_ascii_digit())
                        && (!call.contains('(') || call.ends_with(')')) =>
                {
                    let n = n
                        .parse::<usize>()
                        .map_err(|e| FormatError(format!("%{body}%: {e}")))?;
                    (call, Some(n))
                }
                _ => (body, None),
            };
            let (name, args) = match call.find('(') {
                Some(i) if call.ends_with(')') => (&call[..i], Some(&call[i + 1..call.len() - 1])),
                _ => (call, None),
            };
            let op = op(name, args).ok_or_else(|| {
                FormatError(format!(
                    "unsupported operator %{body}% (supported: {SUPPORTED})"
                ))
            })?;
            if !literal.is_empty() {
                segments.push(Segment::Literal(std::mem::take(&mut literal)));
            }
            segments.push(Segment::Op(op, max));
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Self(segments))
    }

    /// The text of a record; an absent value prints `-`, as in Envoy.
    pub fn render(&self, r: &Record) -> String {
        let mut out = String::with_capacity(256);
        for s in &self.0 {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::Op(op, max) => {
                    let v = text(*op, r);
                    match max {
                        Some(n) => out.extend(v.chars().take(*n)),
                        None => out.push_str(&v),
                    }
                }
            }
        }
        out
    }

    /// A JSON value: a lone numeric operator is a number, a lone absent one `null`, anything
    /// else a string (Envoy's `json_format` typing).
    pub fn render_json(&self, r: &Record) -> Value {
        if let [Segment::Op(op, None)] = self.0.as_slice() {
            return value(*op, r);
        }
        Value::String(self.render(r))
    }
}

fn opt<S: AsRef<str>>(v: &Option<S>) -> Value {
    v.as_ref()
        .map_or(Value::Null, |s| Value::String(s.as_ref().to_owned()))
}

fn value(op: Op, r: &Record) -> Value {
    match op {
        Op::ResponseCode => r.response_code.into(),
        Op::BytesReceived => r.bytes_received.into(),
        Op::BytesSent => r.bytes_sent.into(),
        Op::Duration => r.duration.into(),
        Op::UpstreamServiceTime => r.upstream_service_time.map_or(Value::Null, Value::from),
        Op::Method => opt(&r.method),
        Op::Path => opt(&r.path),
        Op::ResponseCodeDetails => opt(&r.response_code_details),
        Op::UpstreamTransportFailureReason => opt(&r.upstream_transport_failure_reason),
        Op::XForwardedFor => opt(&r.x_forwarded_for),
        Op::UserAgent => opt(&r.user_agent),
        Op::RequestId => opt(&r.request_id),
        Op::Authority => opt(&r.authority),
        Op::UpstreamHost => addr_value(r.upstream_host),
        Op::UpstreamCluster => opt(&r.upstream_cluster),
        Op::UpstreamLocalAddress => addr_value(r.upstream_local_address),
        Op::DownstreamPeerUriSan => opt(&r.downstream_peer_uri_san),
        Op::UpstreamPeerUriSan => opt(&r.upstream_peer_uri_san),
        Op::RequestedServerName => opt(&r.requested_server_name),
        Op::RouteName => opt(&r.route_name),
        Op::ConnectionTerminationDetails => Value::Null,
        _ => Value::String(text(op, r)),
    }
}

/// An address as a JSON value: its text, or null when unknown.
fn addr_value(a: Option<std::net::SocketAddr>) -> Value {
    a.map_or(Value::Null, |a| Value::String(a.to_string()))
}

/// An address as text, `-` when unknown.
fn addr_text(a: Option<std::net::SocketAddr>) -> String {
    a.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

fn text(op: Op, r: &Record) -> String {
    fn s<S: AsRef<str>>(v: &Option<S>) -> String {
        dash(v).to_owned()
    }
    match op {
        Op::StartTime => r.start_time.clone(),
        Op::Method => s(&r.method),
        Op::Path => s(&r.path),
        Op::Protocol => r.protocol.to_owned(),
        Op::ResponseCode => r.response_code.to_string(),
        Op::ResponseFlags => r.response_flags.to_owned(),
        Op::ResponseCodeDetails => s(&r.response_code_details),
        // Set by no filter of this proxy, as in most Envoy configurations.
        Op::ConnectionTerminationDetails => "-".into(),
        Op::UpstreamTransportFailureReason => s(&r.upstream_transport_failure_reason),
        Op::BytesReceived => r.bytes_received.to_string(),
        Op::BytesSent => r.bytes_sent.to_string(),
        Op::Duration => r.duration.to_string(),
        Op::UpstreamServiceTime => r
            .upstream_service_time
            .map_or_else(|| "-".into(), |t| t.to_string()),
        Op::XForwardedFor => s(&r.x_forwarded_for),
        Op::UserAgent => s(&r.user_agent),
        Op::RequestId => s(&r.request_id),
        Op::Authority => s(&r.authority),
        Op::UpstreamHost => addr_text(r.upstream_host),
        Op::UpstreamCluster => s(&r.upstream_cluster),
        Op::UpstreamLocalAddress => addr_text(r.upstream_local_address),
        Op::DownstreamLocalAddress => addr_text(r.downstream_local_address),
        Op::DownstreamRemoteAddress => addr_text(r.downstream_remote_address),
        Op::DownstreamRemoteAddressWithoutPort => r
            .downstream_remote_address
            .map_or_else(|| "-".to_owned(), |a| a.ip().to_string()),
        Op::DownstreamPeerUriSan => s(&r.downstream_peer_uri_san),
        Op::UpstreamPeerUriSan => s(&r.upstream_peer_uri_san),
        Op::RequestedServerName => s(&r.requested_server_name),
        Op::RouteName => s(&r.route_name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            start_time: "2026-12-01T00:00:00.000Z".into(),
            method: Some("GET".into()),
            path: Some("/orders/1".into()),
            protocol: "HTTP/1.1",
            response_code: 200,
            response_flags: "-",
            bytes_sent: 42,
            duration: 3,
            authority: Some("server".into()),
            downstream_remote_address: "127.0.0.1:5555".parse().ok(),
            downstream_local_address: "127.0.0.1:15006".parse().ok(),
            downstream_peer_uri_san: Some("spiffe://td/ns/a/sa/b".into()),
            ..Default::default()
        }
    }

    #[test]
    fn operators_render_as_envoy_does() {
        let t = Template::parse(
            "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN% %UPSTREAM_HOST% 100%% %REQ(:AUTHORITY):3% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\n",
        )
        .unwrap();
        assert_eq!(
            t.render(&record()),
            "GET /orders/1 200 spiffe://td/ns/a/sa/b - 100% ser 127.0.0.1\n"
        );
    }

    #[test]
    fn istio_default_format_parses_and_fills_every_field() {
        let line = Template::parse(ISTIO_TEXT).unwrap().render(&record());
        assert!(
            line.starts_with(
                "[2026-12-01T00:00:00.000Z] \"GET /orders/1 HTTP/1.1\" 200 - - - \"-\" 0 42 3 - "
            ),
            "{line}"
        );
        assert!(
            line.ends_with(" 127.0.0.1:15006 127.0.0.1:5555 - -\n"),
            "{line}"
        );
    }

    #[test]
    fn json_values_are_typed() {
        let code = Template::parse("%RESPONSE_CODE%").unwrap();
        assert_eq!(code.render_json(&record()), serde_json::json!(200));
        let host = Template::parse("%UPSTREAM_HOST%").unwrap();
        assert_eq!(host.render_json(&record()), Value::Null);
        let mixed = Template::parse("code=%RESPONSE_CODE%").unwrap();
        assert_eq!(mixed.render_json(&record()), serde_json::json!("code=200"));
    }

    #[test]
    fn unsupported_or_malformed_operators_are_refused_by_name() {
        for bad in [
            "%DYNAMIC_METADATA(istio)%",
            "%REQ(X-SECRET)%",
            "%RESPONSE_CODE",
            "%FOO%",
        ] {
            let e = Template::parse(bad).unwrap_err().to_string();
            assert!(e.contains("operator"), "{bad}: {e}");
        }
        let e = Template::parse("%REQ(X-SECRET)%").unwrap_err().to_string();
        assert!(e.contains("%REQ(X-SECRET)%"), "{e}");
    }
}
