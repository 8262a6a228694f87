//! Every way a proxied request can fail, and the one place that says what each failure looks like
//! to the client (status, gRPC status, Envoy response flag, details).

use http::header;
use http::{Response, StatusCode};

use crate::body::{self, Body};

/// A failure while handling one request. Adding a variant does not compile until
/// [`ProxyError::response`] maps it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches {authority}{path}")]
    NoRoute { authority: String, path: String },
    #[error("cluster {cluster} has no endpoint")]
    NoHealthyUpstream { cluster: String },
    #[error("connecting to {endpoint} failed: {reason}")]
    UpstreamConnect { endpoint: String, reason: String },
    #[error("connecting to {endpoint} timed out")]
    UpstreamConnectTimeout { endpoint: String },
    #[error("TLS handshake with {endpoint} failed: {reason}")]
    UpstreamTls { endpoint: String, reason: String },
    #[error("upstream did not respond within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    #[error("upstream connection terminated: {0}")]
    UpstreamReset(String),
    #[error("invalid request: {0}")]
    BadRequest(&'static str),
    #[error("protocol upgrade failed: {0}")]
    Upgrade(String),
    #[error("upgrade to {protocol:?} is not allowed on this connection manager")]
    UpgradeRefused { protocol: String },
    #[error("denied by RBAC policy {}", policy.as_deref().unwrap_or("(no ALLOW policy matched)"))]
    RbacDenied { policy: Option<String> },
    #[error("authorization drift: {caller} has no {operation} in the baseline")]
    Drift { caller: String, operation: String },
    #[error("cluster {cluster} does not exist")]
    NoCluster { cluster: String },
    #[error("outbound traffic to cluster {cluster}, which has no mTLS transport socket")]
    PlaintextOutbound { cluster: String },
    #[error("the filter chain this connection was accepted on has been removed")]
    ChainRemoved,
}

/// What a [`ProxyError`] becomes on the wire and in the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorResponse {
    pub status: u16,
    /// gRPC status for gRPC requests (sent as a trailers-only response).
    pub grpc_status: u8,
    /// Envoy response flag (`%RESPONSE_FLAGS%`).
    pub flag: &'static str,
    /// Envoy-style `%RESPONSE_CODE_DETAILS%`.
    pub details: &'static str,
    /// Whether the downstream connection should be closed after the response.
    pub close: bool,
}

// gRPC status codes used below.
const INTERNAL: u8 = 13;
const UNIMPLEMENTED: u8 = 12;
const UNAVAILABLE: u8 = 14;
const DEADLINE_EXCEEDED: u8 = 4;
const PERMISSION_DENIED: u8 = 7;

impl ProxyError {
    pub fn response(&self) -> ErrorResponse {
        let r = |status, grpc_status, flag, details, close| ErrorResponse {
            status,
            grpc_status,
            flag,
            details,
            close,
        };
        match self {
            Self::NoRoute { .. } => r(404, UNIMPLEMENTED, "NR", "route_not_found", false),
            Self::NoHealthyUpstream { .. } => {
                r(503, UNAVAILABLE, "UH", "no_healthy_upstream", false)
            }
            Self::UpstreamConnect { .. } => r(
                503,
                UNAVAILABLE,
                "UF",
                "upstream_reset_before_response_started{connection_failure}",
                false,
            ),
            Self::UpstreamConnectTimeout { .. } => r(
                503,
                UNAVAILABLE,
                "UF",
                "upstream_reset_before_response_started{connection_timeout}",
                false,
            ),
            Self::UpstreamTls { .. } => r(
                503,
                UNAVAILABLE,
                "UF",
                "upstream_reset_before_response_started{connection_failure,TLS_error}",
                false,
            ),
            Self::UpstreamTimeout(_) => r(504, DEADLINE_EXCEEDED, "UT", "response_timeout", false),
            Self::UpstreamReset(_) => r(
                503,
                UNAVAILABLE,
                "UC",
                "upstream_reset_before_response_started{connection_termination}",
                false,
            ),
            Self::BadRequest(_) => r(400, INTERNAL, "DPE", "http1.codec_error", true),
            Self::Upgrade(_) => r(503, UNAVAILABLE, "UF", "upgrade_failed", false),
            Self::UpgradeRefused { .. } => r(403, PERMISSION_DENIED, "-", "upgrade_failed", false),
            Self::RbacDenied { .. } => {
                r(403, PERMISSION_DENIED, "RBAC", "rbac_access_denied", false)
            }
            Self::Drift { .. } => r(403, PERMISSION_DENIED, "RBAC", "authorization_drift", false),
            Self::NoCluster { .. } => r(503, UNAVAILABLE, "NC", "cluster_not_found", false),
            Self::PlaintextOutbound { .. } => {
                r(503, UNAVAILABLE, "UF", "outbound_requires_mtls", false)
            }
            Self::ChainRemoved => r(503, UNAVAILABLE, "NC", "filter_chain_not_found", true),
        }
    }

    /// The reason to log as `%UPSTREAM_TRANSPORT_FAILURE_REASON%`, if this is a TLS failure.
    pub fn transport_failure_reason(&self) -> Option<String> {
        match self {
            Self::UpstreamTls { reason, .. } => Some(reason.clone()),
            _ => None,
        }
    }
}

/// Envoy's local reply body when the upstream connection failed before response headers.
fn reset_reply(reason: &str) -> String {
    format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}")
}

/// The response for a request the proxy answers itself.
pub fn local_reply(e: &ProxyError, grpc: bool) -> Response<Body> {
    let r = e.response();
    let mut builder = Response::builder();
    if r.close {
        builder = builder.header(header::CONNECTION, "close");
    }
    let message = match e {
        ProxyError::UpstreamConnect { .. } => reset_reply("connection failure"),
        ProxyError::UpstreamConnectTimeout { .. } => reset_reply("connection timeout"),
        ProxyError::UpstreamTls { reason, .. } => reset_reply(&format!(
            "connection failure, transport failure reason: TLS_error: {reason}"
        )),
        ProxyError::UpstreamReset(_) => reset_reply("connection termination"),
        ProxyError::UpstreamTimeout(_) => "upstream request timeout".to_owned(),
        ProxyError::NoHealthyUpstream { .. } => "no healthy upstream".to_owned(),
        ProxyError::NoCluster { .. } | ProxyError::ChainRemoved => "no cluster".to_owned(),
        ProxyError::PlaintextOutbound { .. } => "outbound traffic requires mTLS".to_owned(),
        ProxyError::NoRoute { .. } => String::new(),
        ProxyError::BadRequest(why) => format!("Bad Request: {why}"),
        ProxyError::Upgrade(_) | ProxyError::UpgradeRefused { .. } => "upgrade failed".to_owned(),
        ProxyError::RbacDenied { .. } => "RBAC: access denied".to_owned(),
        ProxyError::Drift { caller, operation } => {
            format!("authorization drift: {caller} has not called {operation} before")
        }
    };
    let built = if grpc {
        // gRPC: a trailers-only response carrying the status.
        builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", r.grpc_status.to_string())
            .header("grpc-message", message.replace(['\r', '\n'], " "))
            .body(body::empty())
    } else {
        builder
            .status(r.status)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(body::full(message))
    };
    built.unwrap_or_else(|_| {
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}

/// An error and its sources, joined: hyper's top-level messages alone say little.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_error_maps_to_a_response() {
        let table = [
            (
                ProxyError::NoRoute {
                    authority: "a".into(),
                    path: "/".into(),
                },
                404,
                12,
                "NR",
            ),
            (
                ProxyError::NoHealthyUpstream {
                    cluster: "c".into(),
                },
                503,
                14,
                "UH",
            ),
            (
                ProxyError::UpstreamConnect {
                    endpoint: "e".into(),
                    reason: "r".into(),
                },
                503,
                14,
                "UF",
            ),
            (
                ProxyError::UpstreamConnectTimeout {
                    endpoint: "e".into(),
                },
                503,
                14,
                "UF",
            ),
            (
                ProxyError::UpstreamTls {
                    endpoint: "e".into(),
                    reason: "r".into(),
                },
                503,
                14,
                "UF",
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                4,
                "UT",
            ),
            (ProxyError::UpstreamReset("x".into()), 503, 14, "UC"),
            (ProxyError::BadRequest("x"), 400, 13, "DPE"),
            (ProxyError::Upgrade("x".into()), 503, 14, "UF"),
            (
                ProxyError::UpgradeRefused {
                    protocol: "h2c".into(),
                },
                403,
                7,
                "-",
            ),
            (ProxyError::RbacDenied { policy: None }, 403, 7, "RBAC"),
        ];
        for (err, status, grpc, flag) in table {
            let r = err.response();
            assert_eq!(
                (r.status, r.grpc_status, r.flag),
                (status, grpc, flag),
                "{err}"
            );
        }
    }
}
