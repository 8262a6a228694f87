//! Per-node xDS, generated from the registry the way istiod shapes it (names, SNI, SAN matchers):
//!
//! - a sidecar gets `virtualInbound` (mTLS chains per service port, chosen by SNI, with the RBAC
//!   filters of the AuthorizationPolicies that select it; plaintext chains only if
//!   PeerAuthentication allows), `inbound|port||` clusters to its app, and `virtualOutbound` with the
//!   `outbound` route table and `outbound|port||host` EDS clusters whose mTLS peers must present
//!   the SPIFFE IDs of the service's workloads;
//! - a proxyless gRPC client (node metadata `GENERATOR: grpc`, as Istio's) gets API listeners
//!   named `host:port`, routes, clusters and endpoints pointing at the workloads' app ports.
//!
//! With the annotation `sidecar.eastguard.io/capture` (the workload's traffic is captured, by eBPF
//! or iptables), `virtualOutbound` takes Istio's capture shape instead: `use_original_dst`, a
//! hand-off listener (`bind_to_port: false`) per service VIP:port and per member pod IP:app port,
//! and `BlackHoleCluster` for every other destination.
//!
//! Sidecar ports: a WorkloadEntry's sidecar takes inbound mTLS on `address:15006` and the app's
//! outbound traffic on `127.0.0.1:15001`; the annotations `sidecar.eastguard.io/inbound-port` and
//! `sidecar.eastguard.io/outbound-port` change them (several sidecars on one host, in tests).

use std::collections::{BTreeMap, BTreeSet};

use policy::istio::{
    Target,
    peer_authn::{MtlsMode, MtlsSettings},
};
use xds::codec;
use xds::pb::envoy::config::cluster::v3::{Cluster, cluster};
use xds::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, Locality, SocketAddress, TransportSocket,
    address, config_source, socket_address, transport_socket,
};
use xds::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use xds::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, filter,
};
use xds::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use xds::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use xds::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use xds::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use xds::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use xds::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value};
use xds::server::Snapshot;
use xds::types;

use crate::registry::{Registry, ServiceEntry, ServicePort, WorkloadEntry};

mod capture;
mod inbound;
mod outbound;
mod proxyless;
pub mod telemetry;

pub use proxyless::proxyless;

pub const INBOUND_PORT_ANNOTATION: &str = "sidecar.eastguard.io/inbound-port";
pub const OUTBOUND_PORT_ANNOTATION: &str = "sidecar.eastguard.io/outbound-port";
/// `ebpf` (or `iptables`): the workload's traffic is captured, so its sidecar gets Istio's capture
/// shape: `virtualOutbound` hands each connection to the listener at its original destination.
pub const CAPTURE_ANNOTATION: &str = "sidecar.eastguard.io/capture";

/// Mesh-wide settings.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub trust_domain: String,
    pub root_namespace: String,
    /// The mTLS mode where no PeerAuthentication sets one (Istio: PERMISSIVE; here STRICT unless
    /// configured otherwise).
    pub default_mtls: MtlsMode,
    /// Istio's meshConfig `h2UpgradePolicy`: `UPGRADE` (true, the default here) carries every
    /// HTTP request between the sidecars on a multiplexed HTTP/2 connection; with
    /// `DO_NOT_UPGRADE` (Istio's default) only HTTP2 and GRPC ports, and requests that arrived as
    /// HTTP/2, use it, and other requests go as HTTP/1.1 on keep-alive connections.
    pub h2_upgrade: bool,
    /// Mesh-wide access logging (Istio's `accessLogFile` / `accessLogEncoding` /
    /// `accessLogFormat`); Telemetry resources override it per namespace or workload.
    pub access_log: Option<telemetry::MeshAccessLog>,
}

impl Mesh {
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }
}

/// The key of a cluster's upstream HTTP protocol options.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// What a cluster speaks to its endpoints, when not Envoy's default (HTTP/1.1).
#[derive(Debug, Clone, Copy)]
enum UpstreamHttp {
    Http2,
    /// The protocol each request arrived with.
    Downstream,
}

/// `HttpProtocolOptions` saying `protocol`, packed.
fn http_protocol_options(protocol: UpstreamHttp) -> xds::pb::google::protobuf::Any {
    use xds::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions,
        http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig,
            explicit_http_config::ProtocolConfig,
        },
    };
    let options = match protocol {
        UpstreamHttp::Http2 => UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Default::default())),
        }),
        UpstreamHttp::Downstream => {
            UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
                http_protocol_options: Some(Default::default()),
                http2_protocol_options: Some(Default::default()),
                ..Default::default()
            })
        }
    };
    codec::pack(&HttpProtocolOptions {
        upstream_protocol_options: Some(options),
        ..Default::default()
    })
}

fn port_annotation(w: &WorkloadEntry, key: &str, default: u16) -> u16 {
    w.meta
        .annotations
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn inbound_port(w: &WorkloadEntry) -> u16 {
    port_annotation(w, INBOUND_PORT_ANNOTATION, 15006)
}

fn outbound_port(w: &WorkloadEntry) -> u16 {
    port_annotation(w, OUTBOUND_PORT_ANNOTATION, 15001)
}

fn captured(w: &WorkloadEntry) -> bool {
    w.meta
        .annotations
        .get(CAPTURE_ANNOTATION)
        .is_some_and(|v| matches!(v.as_str(), "ebpf" | "iptables" | "true"))
}

pub(crate) fn selects(s: &ServiceEntry, w: &WorkloadEntry) -> bool {
    s.meta.namespace == w.meta.namespace
        && s.selector
            .as_ref()
            .is_some_and(|sel| sel.iter().all(|(k, v)| w.spec.labels.get(k) == Some(v)))
}

/// The app port a service port reaches on a workload.
fn target_port(p: &ServicePort, w: &WorkloadEntry) -> u16 {
    w.spec
        .ports
        .get(&p.name)
        .copied()
        .or(p.target_port)
        .unwrap_or(p.number)
}

fn sni(port: u16, host: &str) -> String {
    format!("outbound_.{port}_._.{host}")
}

fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_owned(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: 2,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

fn tls_socket(any: Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any)),
    }
}

fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(codec::pack(
            &xds::pb::envoy::extensions::filters::http::router::v3::Router::default(),
        ))),
        ..Default::default()
    }
}

fn zero() -> Duration {
    Duration {
        seconds: 0,
        nanos: 0,
    }
}

fn route_to(cluster: &str) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            timeout: Some(zero()),
            ..Default::default()
        })),
        name: "default".into(),
        ..Default::default()
    }
}

fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(3)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        connect_timeout: Some(Duration {
            seconds: 5,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn load_assignment(name: &str, endpoints: &[(String, u16)]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality::default()),
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            lb_endpoints: endpoints
                .iter()
                .map(|(ip, port)| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(ip, *port)),
                        ..Default::default()
                    })),
                    load_balancing_weight: Some(UInt32Value { value: 1 }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn put<M: prost::Message + prost::Name>(snap: &mut Snapshot, type_url: &str, name: &str, m: &M) {
    snap.resources
        .entry(type_url.to_owned())
        .or_default()
        .insert(name.to_owned(), codec::pack(m));
}

/// The workloads behind a service: selected WorkloadEntries and inline endpoints.
fn members<'a>(s: &'a ServiceEntry, reg: &'a Registry) -> Vec<WorkloadEntry> {
    let mut out: Vec<WorkloadEntry> = reg
        .workloads
        .iter()
        .filter(|w| selects(s, w))
        .filter(|w| s.ready.as_ref().is_none_or(|r| r.contains(&w.spec.address)))
        .cloned()
        .collect();
    for (i, e) in s.endpoints.iter().enumerate() {
        out.push(WorkloadEntry {
            meta: crate::registry::Meta {
                name: format!("{}-endpoint-{i}", s.meta.name),
                namespace: s.meta.namespace.clone(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
            },
            spec: e.clone(),
        });
    }
    out
}

/// Which workload a sidecar node is: Istio's node id `sidecar~IP~NAME.NAMESPACE~...`.
pub fn workload_for_node<'a>(node_id: &str, reg: &'a Registry) -> Option<&'a WorkloadEntry> {
    let mut parts = node_id.split('~');
    let (_kind, _ip, pod) = (parts.next()?, parts.next()?, parts.next()?);
    let (name, namespace) = pod.split_once('.')?;
    reg.workloads
        .iter()
        .find(|w| w.meta.name == name && w.meta.namespace == namespace)
}

fn rbac_filters(
    reg: &Registry,
    target: &Target,
    tcp: bool,
    notes: &mut Vec<String>,
) -> Vec<(String, Any)> {
    let filters = match policy::istio::translate(&reg.authorization, target, tcp) {
        Ok(f) => f,
        Err(e) => {
            // Fail closed: a policy that cannot be enforced denies everything it could have allowed.
            notes.push(format!("{e}; denying all requests to this workload"));
            return vec![deny_all(tcp)];
        }
    };
    let mut out = Vec::with_capacity(filters.len());
    for f in filters {
        match policy::rbac::envoy::to_any(&f.typed_config) {
            Ok(any) => out.push((f.name, any)),
            Err(e) => {
                // Dropping one filter would widen access: deny everything instead.
                notes.push(format!(
                    "RBAC filter {} does not encode ({e}); denying all requests to this workload",
                    f.name
                ));
                return vec![deny_all(tcp)];
            }
        }
    }
    out
}

/// An RBAC filter that allows nothing (ALLOW with no policies).
fn deny_all(tcp: bool) -> (String, Any) {
    use xds::pb::envoy::config::rbac::v3::Rbac as Rules;
    use xds::pb::envoy::extensions::filters::{http, network};
    let rules = Some(Rules::default()); // action ALLOW, no policy
    if tcp {
        let f = network::rbac::v3::Rbac {
            rules,
            stat_prefix: "tcp.".into(),
            ..Default::default()
        };
        (policy::rbac::NETWORK_RBAC_FILTER.into(), codec::pack(&f))
    } else {
        let f = http::rbac::v3::Rbac {
            rules,
            ..Default::default()
        };
        (policy::rbac::HTTP_RBAC_FILTER.into(), codec::pack(&f))
    }
}

/// A sidecar's configuration.
pub fn sidecar(w: &WorkloadEntry, reg: &Registry, mesh: &Mesh) -> (Snapshot, Vec<String>) {
    let mut snap = Snapshot::default();
    let mut notes = Vec::new();
    let target = Target {
        namespace: w.meta.namespace.clone(),
        labels: w.spec.labels.clone(),
        root_namespace: mesh.root_namespace.clone(),
        trust_domain: mesh.trust_domain.clone(),
        trust_domain_aliases: Vec::new(),
    };
    let mtls = policy::istio::peer_authn::effective_with_default(
        &reg.peer_authentication,
        &target,
        mesh.default_mtls,
    );
    let rbac = inbound::Rbac {
        http: rbac_filters(reg, &target, false, &mut notes),
        tcp: rbac_filters(reg, &target, true, &mut notes),
    };
    let server_log = telemetry::access_logs(w, reg, mesh, telemetry::Side::Server);
    let client_log = telemetry::access_logs(w, reg, mesh, telemetry::Side::Client);
    inbound::generate(w, reg, &mtls, &rbac, &server_log, &mut snap, &mut notes);
    let handoff = outbound::generate(w, reg, mesh, &mut snap, &mut notes);
    if captured(w) {
        capture::listeners(w, &handoff, &client_log, &mut snap);
    } else {
        outbound::by_host_listener(w, &client_log, &mut snap);
    }
    (snap, notes)
}

/// The upgrade types Istio's connection managers tunnel: WebSocket only.
fn websocket() -> Vec<http_connection_manager::UpgradeConfig> {
    vec![http_connection_manager::UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    }]
}

/// The names a host answers to from a namespace: the full name, and for `*.svc.cluster.local`
/// hosts the `svc.ns` and (same namespace) `svc` short forms; each with and without the port.
fn domains(host: &str, port: u16, from_namespace: &str) -> Vec<String> {
    let mut names = vec![host.to_owned()];
    if let Some(rest) = host.strip_suffix(".svc.cluster.local")
        && let Some((svc, ns)) = rest.split_once('.')
    {
        names.push(format!("{svc}.{ns}"));
        if ns == from_namespace {
            names.push(svc.to_owned());
        }
    }
    let with_port: Vec<String> = names.iter().map(|n| format!("{n}:{port}")).collect();
    names.extend(with_port);
    names
}

/// A service VIP as HTTP authorities: `10.0.0.1`, `10.0.0.1:80`, `[fd00::1]`, `[fd00::1]:80`.
fn vip_domains(ip: std::net::IpAddr, port: u16) -> [String; 2] {
    let host = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    };
    [host.clone(), format!("{host}:{port}")]
}

#[cfg(test)]
mod tests;
