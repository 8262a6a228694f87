//! Envoy xDS v3 resources → the proxy's model (DESIGN §4). One translation, used for ADS updates
//! and for reading Istio's config dumps.
//!
//! Three outcomes for anything in a resource:
//! - it maps into the model;
//! - it is an optional item this proxy does not apply (Istio's stats and metadata-exchange filters,
//!   tracing, retries …): skipped, and said so in the [`Notes`];
//! - it is required and unsupported, or invalid: an [`Invalid`] error naming the resource and the
//!   field, which the xDS client sends back as a NACK (the previous configuration stays).
//!
//! Nothing is dropped in a way that widens access: a filter chain whose match criteria this proxy
//! cannot evaluate (source or destination IP ranges) becomes a chain that refuses its connections,
//! so its traffic cannot fall through to a wider chain; an RBAC filter either compiles or the
//! resource is rejected.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use identity::SpiffeId;
use xds::codec;
use xds::pb::envoy::config::cluster::v3::Cluster;
use xds::pb::envoy::config::core::v3::{
    Address, ConfigSource, TransportSocket, address, config_source, socket_address,
    transport_socket,
};
use xds::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use xds::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use xds::pb::envoy::config::route::v3::{
    HeaderMatcher as PbHeaderMatcher, RouteConfiguration as PbRouteConfiguration,
    header_matcher::HeaderMatchSpecifier, route_action, route_match,
};
use xds::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager as PbHcm, http_connection_manager, http_filter,
};
use xds::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy as PbTcpProxy, tcp_proxy,
};
use xds::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher,
};
use xds::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use xds::pb::google::protobuf::Any;

mod cluster;
mod endpoint;
mod listener;
mod route;

pub use cluster::{cluster, cluster_pb};
pub use endpoint::load_assignment;
pub use listener::{listener, listener_pb};
pub use route::route_configuration;

use endpoint::{dns_endpoints, load_assignment_in};
use listener::{ads_source, own_certificate, sds};
use route::{route_configuration_in, route_configuration_pb};

use crate::config::{
    self, Direction, FilterConfig, ForwardClientCertDetails, HeaderMatcher, HttpConnectionManager,
    LbPolicy, RouteAction, RouteConfiguration, RouteMatch, TcpProxy, UpgradeConfig, UpstreamTls,
    VirtualHost, WeightedCluster,
};

/// `HttpConnectionManager.PathWithEscapedSlashesAction.REJECT_REQUEST`.
const REJECT_REQUEST: i32 = 2;

/// A required piece this proxy cannot apply, or an invalid one: the resource is rejected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{resource}: {field}: {message}")]
pub struct Invalid {
    pub resource: String,
    pub field: String,
    pub message: String,
}

/// Optional items skipped, one line each (`resource: what`).
pub type Notes = Vec<String>;

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const TLS_SOCKET_NAMES: &[&str] = &["envoy.transport_sockets.tls", "tls"];
const UPSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const RAW_BUFFER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// Filters that only observe or decorate (stats, peer metadata exchange, fault injection, CORS,
/// ALPN override): skipping them changes no access decision.
const SKIPPABLE_NETWORK_FILTERS: &[&str] =
    &["istio.stats", "istio.metadata_exchange", "istio_authn"];
const SKIPPABLE_HTTP_FILTERS: &[&str] = &[
    "istio.stats",
    "istio.metadata_exchange",
    "istio.alpn",
    "envoy.filters.http.grpc_stats",
    "envoy.filters.http.fault",
    "envoy.filters.http.cors",
    "connect_baggage",
    "connect_authority",
];

/// SDS secret names that mean this workload's own SVID and trust bundle (Istio's and SPIRE's).
const SDS_CERT_NAMES: &[&str] = &["default"];
const SDS_CA_NAMES: &[&str] = &["ROOTCA", "ALL"];

struct Ctx<'a> {
    resource: &'a str,
    notes: &'a mut Notes,
}

impl Ctx<'_> {
    fn invalid(&self, field: impl Into<String>, message: impl std::fmt::Display) -> Invalid {
        Invalid {
            resource: self.resource.to_owned(),
            field: field.into(),
            message: message.to_string(),
        }
    }

    fn note(&mut self, what: impl AsRef<str>) {
        self.notes
            .push(format!("{}: {}", self.resource, what.as_ref()));
    }
}

// === helpers shared by the resources ===

fn is_tls_socket(ts: &TransportSocket) -> bool {
    TLS_SOCKET_NAMES.contains(&ts.name.as_str())
        || typed(ts)
            .is_some_and(|a| a.type_url == DOWNSTREAM_TLS_TYPE || a.type_url == UPSTREAM_TLS_TYPE)
}

fn typed(ts: &TransportSocket) -> Option<&Any> {
    match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => Some(a),
        None => None,
    }
}

/// What is wrong with one field of a resource; the caller names the resource and the field
/// (`Ctx::invalid`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum FieldError {
    #[error("pipe and internal addresses are not supported")]
    NotASocketAddress,
    #[error("{0:?} is not an IP address")]
    NotAnIp(String),
    #[error("port {0} is out of range")]
    PortOutOfRange(u32),
    #[error("a port_value is required")]
    NoPort,
    #[error("{value:?} is not a SPIFFE ID: {source}")]
    NotASpiffeId {
        value: String,
        source: identity::SpiffeIdError,
    },
    #[error("non-exact SAN matchers are not supported (a prefix could admit any workload)")]
    NonExactSan,
    #[error("config sources other than ADS are not supported")]
    NotAds,
    #[error("suffix, contains, regex and case-insensitive header matches are not supported")]
    UnsupportedStringMatch,
    #[error("range, regex, suffix and contains header matches are not supported")]
    UnsupportedHeaderMatch,
}

fn socket_addr(a: Option<&Address>) -> Result<SocketAddr, FieldError> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(FieldError::NotASocketAddress);
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| FieldError::NotAnIp(sa.address.clone()))?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| FieldError::PortOutOfRange(p))?
        }
        _ => return Err(FieldError::NoPort),
    };
    Ok(SocketAddr::new(ip, port))
}

fn duration(seconds: i64, nanos: i32) -> Duration {
    if seconds < 0 || nanos < 0 {
        return Duration::ZERO;
    }
    Duration::new(
        seconds.unsigned_abs().min(366 * 86400),
        nanos.unsigned_abs().min(999_999_999),
    )
}

pub(crate) fn socket_address_pb(a: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(
            xds::pb::envoy::config::core::v3::SocketAddress {
                address: a.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    a.port(),
                ))),
                ..Default::default()
            },
        )),
    }
}

fn duration_pb(d: Duration) -> xds::pb::google::protobuf::Duration {
    xds::pb::google::protobuf::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests;
