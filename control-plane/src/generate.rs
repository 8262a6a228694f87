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

use policy::istio::{Target, peer_authn::MtlsMode};
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
}

impl Mesh {
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }
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

fn selects(s: &ServiceEntry, w: &WorkloadEntry) -> bool {
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
            vec![policy::rbac::Filter {
                name: if tcp {
                    policy::rbac::NETWORK_RBAC_FILTER
                } else {
                    policy::rbac::HTTP_RBAC_FILTER
                }
                .into(),
                typed_config: policy::rbac::TypedFilterConfig {
                    type_url: if tcp {
                        policy::rbac::NETWORK_RBAC_TYPE
                    } else {
                        policy::rbac::HTTP_RBAC_TYPE
                    }
                    .into(),
                    rbac: policy::rbac::RbacFilter {
                        rules: Some(policy::rbac::Rbac {
                            action: policy::rbac::Action::Allow,
                            policies: BTreeMap::new(),
                        }),
                        stat_prefix: if tcp { "tcp.".into() } else { String::new() },
                        ..Default::default()
                    },
                },
            }]
        }
    };
    filters
        .into_iter()
        .filter_map(|f| {
            let json = serde_json::to_value(&f.typed_config).ok()?;
            match codec::json_to_any(json) {
                Ok(any) => Some((f.name, any)),
                Err(e) => {
                    notes.push(format!("RBAC filter does not encode: {e}"));
                    None
                }
            }
        })
        .collect()
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
    let http_rbac = rbac_filters(reg, &target, false, &mut notes);
    let tcp_rbac = rbac_filters(reg, &target, true, &mut notes);

    // Inbound.
    let downstream = codec::pack(&DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("default")],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    "ROOTCA",
                )),
            ),
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut chains = Vec::new();
    let mut plaintext: Vec<(u16, Option<u32>, Vec<Filter>)> = Vec::new();
    let mut app_ports = BTreeSet::new();
    for s in reg.services.iter().filter(|s| selects(s, w)) {
        for p in &s.ports {
            let port = target_port(p, w);
            let cluster = format!("inbound|{port}||");
            app_ports.insert((port, p.is_h2()));
            let filters = if p.is_http() {
                let hcm = HttpConnectionManager {
                    stat_prefix: format!("inbound_0.0.0.0_{port}"),
                    route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                        RouteConfiguration {
                            name: cluster.clone(),
                            virtual_hosts: vec![VirtualHost {
                                name: format!("inbound|http|{port}"),
                                domains: vec!["*".into()],
                                routes: vec![route_to(&cluster)],
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                    )),
                    http_filters: http_rbac
                        .iter()
                        .map(|(name, any)| HttpFilter {
                            name: name.clone(),
                            config_type: Some(http_filter::ConfigType::TypedConfig(any.clone())),
                            ..Default::default()
                        })
                        .chain([router()])
                        .collect(),
                    forward_client_cert_details: 3, // SANITIZE_SET
                    upgrade_configs: websocket(),
                    ..Default::default()
                };
                vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&hcm))),
                }]
            } else {
                tcp_rbac
                    .iter()
                    .map(|(name, any)| Filter {
                        name: name.clone(),
                        config_type: Some(filter::ConfigType::TypedConfig(any.clone())),
                    })
                    .chain([Filter {
                        name: "envoy.filters.network.tcp_proxy".into(),
                        config_type: Some(filter::ConfigType::TypedConfig(codec::pack(
                            &TcpProxy {
                                stat_prefix: cluster.clone(),
                                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                                    cluster.clone(),
                                )),
                                ..Default::default()
                            },
                        ))),
                    }])
                    .collect()
            };
            let mode = port_mode(&mtls, port);
            let at_port = captured(w).then_some(u32::from(port));
            if mode != MtlsMode::Disable {
                // Sidecars dial the inbound port itself (no port criterion: chosen by SNI); with
                // capture, connections to the app port are chosen by their original destination
                // port first, so that port gets its own TLS chain beside its plaintext one.
                let ports = if at_port.is_some() {
                    vec![None, at_port]
                } else {
                    vec![None]
                };
                for dport in ports {
                    chains.push(FilterChain {
                        name: format!(
                            "inbound|{port}|{}|{}{}",
                            p.name,
                            s.hosts.join(","),
                            if dport.is_some() { "|dport" } else { "" }
                        ),
                        filter_chain_match: Some(FilterChainMatch {
                            destination_port: dport.map(|value| UInt32Value { value }),
                            server_names: s.hosts.iter().map(|h| sni(p.number, h)).collect(),
                            transport_protocol: "tls".into(),
                            ..Default::default()
                        }),
                        filters: filters.clone(),
                        transport_socket: Some(tls_socket(downstream.clone())),
                        ..Default::default()
                    });
                }
            }
            if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
                plaintext.push((port, at_port, filters));
            }
        }
    }
    // Plaintext: with capture, a chain per port that allows it (the original destination port
    // picks it; Istio's shape). Without capture the port a plaintext caller meant is unknown, so
    // there is a plaintext chain only when the workload has one app port and it allows plaintext;
    // otherwise plaintext is refused rather than delivered to whichever port came first.
    let app_port_count = app_ports.len();
    plaintext.sort_by_key(|(port, ..)| *port);
    plaintext.dedup_by_key(|(port, ..)| *port);
    let ports_allowing = plaintext.len();
    for (port, at_port, filters) in plaintext {
        if at_port.is_none() && (app_port_count != 1 || ports_allowing != 1) {
            notes.push(format!(
                "plaintext inbound for port {port} needs capture (the original destination port) on a workload with several ports; refused"
            ));
            continue;
        }
        chains.push(FilterChain {
            name: format!("inbound|{port}|plaintext"),
            filter_chain_match: Some(FilterChainMatch {
                destination_port: at_port.map(|value| UInt32Value { value }),
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            }),
            filters,
            ..Default::default()
        });
    }
    if !chains.is_empty() {
        let l = Listener {
            name: "virtualInbound".into(),
            address: Some(socket(&w.spec.address, inbound_port(w))),
            filter_chains: chains,
            traffic_direction: 1,
            ..Default::default()
        };
        put(&mut snap, types::LISTENER, &l.name, &l);
    }
    for (port, h2) in app_ports {
        let name = format!("inbound|{port}||");
        let mut c = Cluster {
            name: name.clone(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(0)),
            connect_timeout: Some(Duration {
                seconds: 5,
                nanos: 0,
            }),
            load_assignment: Some(load_assignment(&name, &[("127.0.0.1".into(), port)])),
            ..Default::default()
        };
        if h2 {
            let opts = serde_json::json!({
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            });
            if let Ok(any) = codec::json_to_any(opts) {
                c.typed_extension_protocol_options.insert(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                    any,
                );
            }
        }
        put(&mut snap, types::CLUSTER, &name, &c);
    }

    // Outbound: every HTTP service port in the mesh, by host; with capture, also a listener at
    // each address:port the service is reached at (VIPs and its workloads' app ports).
    let mut vhosts = Vec::new();
    let mut handoff: BTreeMap<(String, u16), (String, bool)> = BTreeMap::new();
    for s in &reg.services {
        let peers = members(s, reg);
        let ids: BTreeSet<String> = peers
            .iter()
            .map(|m| mesh.spiffe_id(&m.meta.namespace, m.service_account()))
            .collect();
        for p in &s.ports {
            for h in &s.hosts {
                let name = format!("outbound|{}||{h}", p.number);
                if ids.is_empty() {
                    notes.push(format!("{name}: no workloads; not generated"));
                    continue;
                }
                let mut c = eds_cluster(&name);
                c.transport_socket = Some(tls_socket(codec::pack(&UpstreamTlsContext {
                    sni: sni(p.number, h),
                    common_tls_context: Some(CommonTlsContext {
                        tls_certificate_sds_secret_configs: vec![sds("default")],
                        validation_context_type: Some(
                            common_tls_context::ValidationContextType::CombinedValidationContext(
                                common_tls_context::CombinedCertificateValidationContext {
                                    default_validation_context: Some(
                                        CertificateValidationContext {
                                            match_typed_subject_alt_names: ids
                                                .iter()
                                                .map(|id| SubjectAltNameMatcher {
                                                    san_type: subject_alt_name_matcher::SanType::Uri
                                                        as i32,
                                                    matcher: Some(StringMatcher {
                                                        match_pattern: Some(
                                                            string_matcher::MatchPattern::Exact(
                                                                id.clone(),
                                                            ),
                                                        ),
                                                        ignore_case: false,
                                                    }),
                                                    ..Default::default()
                                                })
                                                .collect(),
                                            ..Default::default()
                                        },
                                    ),
                                    validation_context_sds_secret_config: Some(sds("ROOTCA")),
                                    ..Default::default()
                                },
                            ),
                        ),
                        alpn_protocols: vec!["istio-h2".into(), "h2".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                })));
                put(&mut snap, types::CLUSTER, &name, &c);
                let eps: Vec<(String, u16)> = peers
                    .iter()
                    .map(|m| (m.spec.address.clone(), inbound_port(m)))
                    .collect();
                put(
                    &mut snap,
                    types::ENDPOINT,
                    &name,
                    &load_assignment(&name, &eps),
                );
                if captured(w) && h == &s.hosts[0] {
                    let vips = s.addresses.iter().map(|a| (a.to_string(), p.number));
                    let pods = peers
                        .iter()
                        .map(|m| (m.spec.address.clone(), target_port(p, m)));
                    for at in vips.chain(pods) {
                        if let Some((other, _)) = handoff.get(&at) {
                            notes.push(format!(
                                "{}:{}: already reached as {other}; {name} is not",
                                at.0, at.1
                            ));
                            continue;
                        }
                        handoff.insert(at, (name.clone(), p.is_http()));
                    }
                }
                if p.is_http() {
                    vhosts.push(VirtualHost {
                        name: format!("{h}:{}", p.number),
                        domains: domains(h, p.number, &w.meta.namespace)
                            .into_iter()
                            .chain(s.addresses.iter().flat_map(|a| vip_domains(*a, p.number)))
                            .collect(),
                        routes: vec![route_to(&name)],
                        ..Default::default()
                    });
                }
            }
        }
    }
    let outbound_rds = RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vhosts,
        ..Default::default()
    };
    put(&mut snap, types::ROUTE, "outbound", &outbound_rds);
    let hcm = HttpConnectionManager {
        stat_prefix: format!("outbound_0.0.0.0_{}", outbound_port(w)),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: "outbound".into(),
        })),
        http_filters: vec![router()],
        upgrade_configs: websocket(),
        ..Default::default()
    };
    let by_host = FilterChain {
        name: "virtualOutbound-http".into(),
        filters: vec![Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&hcm))),
        }],
        ..Default::default()
    };
    let l = if captured(w) {
        for ((ip, port), (cluster, http)) in &handoff {
            let l = handoff_listener(ip, *port, cluster, *http);
            put(&mut snap, types::LISTENER, &l.name, &l);
        }
        // Istio's REGISTRY_ONLY: a destination with no listener meets a black hole.
        Listener {
            name: "virtualOutbound".into(),
            address: Some(socket("127.0.0.1", outbound_port(w))),
            use_original_dst: Some(BoolValue { value: true }),
            filter_chains: vec![blackhole()],
            traffic_direction: 2,
            ..Default::default()
        }
    } else {
        Listener {
            name: "virtualOutbound".into(),
            address: Some(socket("127.0.0.1", outbound_port(w))),
            filter_chains: vec![by_host],
            traffic_direction: 2,
            ..Default::default()
        }
    };
    put(&mut snap, types::LISTENER, &l.name, &l);
    (snap, notes)
}

/// A hand-off target (`bind_to_port: false`) at `ip:port` for one service port: HTTP routed to
/// A port's effective mTLS mode: its port-level setting, else the workload's (unset is STRICT
/// here unless the mesh default says otherwise, which `effective_with_default` already applied).
fn port_mode(mtls: &policy::istio::peer_authn::MtlsSettings, port: u16) -> MtlsMode {
    match mtls.ports.get(&u32::from(port)) {
        Some(m) if *m != MtlsMode::Unset => *m,
        _ => mtls.mode,
    }
}

/// The upgrade types Istio's connection managers tunnel: WebSocket only.
fn websocket() -> Vec<http_connection_manager::UpgradeConfig> {
    vec![http_connection_manager::UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    }]
}

/// its cluster whatever the Host, or TCP proxied to it.
fn handoff_listener(ip: &str, port: u16, cluster: &str, http: bool) -> Listener {
    let name = format!("outbound_{ip}_{port}");
    let filter = if http {
        let hcm = HttpConnectionManager {
            stat_prefix: name.clone(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                RouteConfiguration {
                    name: name.clone(),
                    virtual_hosts: vec![VirtualHost {
                        name: format!("{ip}:{port}"),
                        domains: vec!["*".into()],
                        routes: vec![route_to(cluster)],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            http_filters: vec![router()],
            upgrade_configs: websocket(),
            ..Default::default()
        };
        Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&hcm))),
        }
    } else {
        Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&TcpProxy {
                stat_prefix: name.clone(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            }))),
        }
    };
    Listener {
        name,
        address: Some(socket(ip, port)),
        bind_to_port: Some(BoolValue { value: false }),
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        traffic_direction: 2,
        ..Default::default()
    }
}

/// A chain that refuses every connection (Istio's BlackHoleCluster).
fn blackhole() -> FilterChain {
    FilterChain {
        name: "BlackHoleCluster".into(),
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&TcpProxy {
                stat_prefix: "BlackHoleCluster".into(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                    "BlackHoleCluster".into(),
                )),
                ..Default::default()
            }))),
        }],
        ..Default::default()
    }
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

/// A proxyless gRPC client's configuration: API listeners `host:port` for every gRPC/HTTP port.
pub fn proxyless(reg: &Registry) -> Snapshot {
    let mut snap = Snapshot::default();
    for s in &reg.services {
        let peers = members(s, reg);
        for p in s.ports.iter().filter(|p| p.is_http()) {
            for h in &s.hosts {
                let name = format!("{h}:{}", p.number);
                let cluster = format!("outbound|{}||{h}", p.number);
                let hcm = HttpConnectionManager {
                    route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                        config_source: Some(ads()),
                        route_config_name: name.clone(),
                    })),
                    http_filters: vec![router()],
                    ..Default::default()
                };
                let l = Listener {
                    name: name.clone(),
                    api_listener: Some(ApiListener {
                        api_listener: Some(codec::pack(&hcm)),
                    }),
                    ..Default::default()
                };
                put(&mut snap, types::LISTENER, &name, &l);
                let rc = RouteConfiguration {
                    name: name.clone(),
                    virtual_hosts: vec![VirtualHost {
                        name: name.clone(),
                        domains: vec![h.clone(), name.clone()],
                        routes: vec![route_to(&cluster)],
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                put(&mut snap, types::ROUTE, &name, &rc);
                put(&mut snap, types::CLUSTER, &cluster, &eds_cluster(&cluster));
                let eps: Vec<(String, u16)> = peers
                    .iter()
                    .map(|m| (m.spec.address.clone(), target_port(p, m)))
                    .collect();
                put(
                    &mut snap,
                    types::ENDPOINT,
                    &cluster,
                    &load_assignment(&cluster, &eps),
                );
            }
        }
    }
    snap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Meta, ServicePort, WorkloadSpec};

    fn sample() -> Registry {
        let meta = |name: &str, labels: &[(&str, &str)]| Meta {
            name: name.into(),
            namespace: "bank".into(),
            labels: BTreeMap::new(),
            annotations: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        };
        let workload = |name: &str, app: &str| WorkloadEntry {
            meta: meta(name, &[]),
            spec: WorkloadSpec {
                address: "127.0.0.1".into(),
                ports: BTreeMap::from([("http".into(), 8080)]),
                labels: BTreeMap::from([("app".into(), app.into())]),
                service_account: Some(app.into()),
                ..Default::default()
            },
        };
        let policies = policy::istio::parse(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: bank}\nspec:\n  selector: {matchLabels: {app: ledger}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/bank/sa/web]}}], to: [{operation: {paths: [/api/*]}}]}]\n",
        )
        .unwrap_or_default();
        Registry {
            services: vec![ServiceEntry {
                meta: meta("ledger", &[]),
                hosts: vec!["ledger.bank.svc.cluster.local".into()],
                addresses: vec!["10.96.0.20".parse().expect("ip")],
                ports: vec![
                    ServicePort {
                        number: 80,
                        name: "http".into(),
                        protocol: Some("HTTP".into()),
                        target_port: None,
                    },
                    ServicePort {
                        number: 9000,
                        name: "tcp".into(),
                        protocol: Some("TCP".into()),
                        target_port: None,
                    },
                ],
                selector: Some(BTreeMap::from([("app".into(), "ledger".into())])),
                endpoints: vec![],
            }],
            workloads: vec![workload("ledger-1", "ledger"), workload("web-1", "web")],
            authorization: policies,
            peer_authentication: vec![],
        }
    }

    fn mesh() -> Mesh {
        Mesh {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            default_mtls: MtlsMode::Strict,
        }
    }

    #[test]
    fn sidecar_config_has_the_inbound_outbound_shape_and_binds_identities() {
        let reg = sample();
        let w = workload_for_node(
            "sidecar~127.0.0.1~ledger-1.bank~bank.svc.cluster.local",
            &reg,
        );
        let (snap, _) = sidecar(w.expect("known node"), &reg, &mesh());
        let listeners = &snap.resources[types::LISTENER];
        assert!(
            listeners.contains_key("virtualInbound") && listeners.contains_key("virtualOutbound")
        );
        let clusters = &snap.resources[types::CLUSTER];
        assert!(clusters.contains_key("inbound|8080||"));
        let c: Cluster = codec::unpack(&clusters["outbound|80||ledger.bank.svc.cluster.local"])
            .expect("cluster");
        let json = codec::any_to_json(&codec::pack(&c))
            .expect("json")
            .to_string();
        assert!(
            json.contains("spiffe://cluster.local/ns/bank/sa/ledger"),
            "{json}"
        );
        // The service's VIP is one of its names: a captured app calling it is routed the same.
        let routes: RouteConfiguration =
            codec::unpack(&snap.resources[types::ROUTE]["outbound"]).expect("routes");
        let vh = routes
            .virtual_hosts
            .iter()
            .find(|v| v.name == "ledger.bank.svc.cluster.local:80")
            .expect("ledger vhost");
        for d in ["10.96.0.20", "10.96.0.20:80", "ledger", "ledger:80"] {
            assert!(
                vh.domains.iter().any(|x| x == d),
                "{d} not in {:?}",
                vh.domains
            );
        }
        assert!(workload_for_node("sidecar~1.2.3.4~nobody.bank~x", &reg).is_none());
        // Deterministic: the same registry gives byte-identical resources (versions are hashes).
        let (again, _) = sidecar(w.expect("known node"), &reg, &mesh());
        assert_eq!(
            format!("{:?}", snap.resources),
            format!("{:?}", again.resources)
        );
    }

    #[test]
    fn captured_workloads_get_istio_hand_off_listeners() {
        let mut reg = sample();
        reg.workloads[1]
            .meta
            .annotations
            .insert(CAPTURE_ANNOTATION.into(), "ebpf".into());
        let (snap, _) = sidecar(&reg.workloads[1], &reg, &mesh());
        let listeners = &snap.resources[types::LISTENER];
        let vo: Listener = codec::unpack(&listeners["virtualOutbound"]).expect("listener");
        assert_eq!(vo.use_original_dst.map(|b| b.value), Some(true));
        // The VIP (service port) and the workload's app port, each a hand-off target.
        for (name, port) in [
            ("outbound_10.96.0.20_80", 80),
            ("outbound_127.0.0.1_8080", 8080),
        ] {
            let l: Listener = codec::unpack(&listeners[name]).expect(name);
            assert_eq!(l.bind_to_port.map(|b| b.value), Some(false), "{name}");
            let json = codec::any_to_json(&listeners[name])
                .expect("json")
                .to_string();
            assert!(json.contains(&format!("\"port_value\":{port}")), "{json}");
            assert!(
                json.contains("outbound|80||ledger.bank.svc.cluster.local"),
                "{json}"
            );
        }
        // TCP port: proxied, not HTTP.
        let tcp = codec::any_to_json(&listeners["outbound_10.96.0.20_9000"])
            .expect("json")
            .to_string();
        assert!(
            tcp.contains("tcp_proxy") && tcp.contains("outbound|9000||ledger"),
            "{tcp}"
        );
        // Without the annotation: the host-routed listener, no hand-off targets.
        let (plain, _) = sidecar(&sample().workloads[1], &sample(), &mesh());
        assert!(!plain.resources[types::LISTENER].contains_key("outbound_10.96.0.20_80"));
    }

    /// Writes fuzz seeds for `proxy/fuzz` (type byte + protobuf) when asked:
    /// `EASTGUARD_WRITE_SEEDS=proxy/fuzz/corpus/translate cargo test -p eastguard-control-plane seeds`.
    #[test]
    fn seeds() {
        let Some(dir) = std::env::var_os("EASTGUARD_WRITE_SEEDS") else {
            return;
        };
        let reg = sample();
        let (snap, _) = sidecar(&reg.workloads[0], &reg, &mesh());
        let proxyless = proxyless(&reg);
        for s in [&snap, &proxyless] {
            for (t, kind) in [
                (types::LISTENER, 0u8),
                (types::CLUSTER, 1),
                (types::ROUTE, 2),
                (types::ENDPOINT, 3),
            ] {
                for (name, any) in s.resources.get(t).into_iter().flatten() {
                    let mut bytes = vec![kind];
                    bytes.extend_from_slice(&any.value);
                    let file = format!("seed-{kind}-{}", name.replace(['|', '/', ':', '.'], "_"));
                    std::fs::write(std::path::Path::new(&dir).join(file), bytes)
                        .expect("write seed");
                }
            }
        }
    }
}
