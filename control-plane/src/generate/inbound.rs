//! A sidecar's inbound side: `virtualInbound` (an mTLS chain per service port, chosen by SNI and,
//! with capture, by original destination port; plaintext chains where PeerAuthentication allows),
//! with the RBAC filters of the policies that select the workload, and `inbound|port||` clusters to
//! the app.

use super::*;

/// The RBAC filters for a workload's inbound chains, encoded.
pub(super) struct Rbac {
    pub http: Vec<(String, Any)>,
    pub tcp: Vec<(String, Any)>,
}

pub(super) fn generate(
    w: &WorkloadEntry,
    reg: &Registry,
    mtls: &MtlsSettings,
    rbac: &Rbac,
    access_log: &[xds::pb::envoy::config::accesslog::v3::AccessLog],
    snap: &mut Snapshot,
    notes: &mut Vec<String>,
) {
    let (http_rbac, tcp_rbac) = (&rbac.http, &rbac.tcp);
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
    // Istio's inbound cluster metadata: the services behind each app port (telemetry's
    // destination_service, the API inventory's service).
    let mut port_services: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for s in reg.services.iter().filter(|s| selects(s, w)) {
        for p in &s.ports {
            let port = target_port(p, w);
            let cluster = format!("inbound|{port}||");
            app_ports.insert((port, p.is_h2()));
            let listed = port_services.entry(port).or_default();
            for h in &s.hosts {
                if !listed.contains(h) {
                    listed.push(h.clone());
                }
            }
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
                    access_log: access_log.to_vec(),
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
            let mode = port_mode(mtls, port);
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
        put(snap, types::LISTENER, &l.name, &l);
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
            metadata: Some(istio_services(
                port_services.get(&port).map_or(&[][..], Vec::as_slice),
            )),
            ..Default::default()
        };
        if h2 {
            c.typed_extension_protocol_options.insert(
                HTTP_PROTOCOL_OPTIONS.into(),
                http_protocol_options(UpstreamHttp::Http2),
            );
        }
        put(snap, types::CLUSTER, &name, &c);
    }
}

/// A port's effective mTLS mode: its port-level setting, else the workload's (unset is STRICT
/// here unless the mesh default says otherwise, which `effective_with_default` already applied).
fn port_mode(mtls: &MtlsSettings, port: u16) -> MtlsMode {
    match mtls.ports.get(&u32::from(port)) {
        Some(m) if *m != MtlsMode::Unset => *m,
        _ => mtls.mode,
    }
}

/// `filter_metadata.istio.services: [{host}]`, as istiod writes it on inbound clusters (it adds
/// `name` and `namespace`, which the host already says).
fn istio_services(services: &[String]) -> xds::pb::envoy::config::core::v3::Metadata {
    use xds::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    let list = services
        .iter()
        .map(|host| Value {
            kind: Some(Kind::StructValue(Struct {
                // One field per map: protobuf maps encode in hash order, and the snapshot's
                // version is a hash of the encoding.
                fields: [("host".to_owned(), s(host))].into_iter().collect(),
            })),
        })
        .collect();
    let istio = Struct {
        fields: [(
            "services".to_owned(),
            Value {
                kind: Some(Kind::ListValue(ListValue { values: list })),
            },
        )]
        .into_iter()
        .collect(),
    };
    xds::pb::envoy::config::core::v3::Metadata {
        filter_metadata: [("istio".to_owned(), istio)].into_iter().collect(),
        ..Default::default()
    }
}
