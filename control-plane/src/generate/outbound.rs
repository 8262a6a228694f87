//! A sidecar's outbound side: an `outbound|port||host` EDS cluster per service port, whose mTLS
//! peers must present the SPIFFE IDs of the service's workloads, the `outbound` route table, and
//! (without capture) `virtualOutbound`, which routes by Host.

use super::*;

/// With capture: the address:port a service port is reached at (VIPs and member pods' app ports)
/// → (its cluster, whether it is HTTP).
pub(super) type Handoff = BTreeMap<(String, u16), (String, bool)>;

/// Clusters, endpoints and the `outbound` routes for every service in the mesh; returns the
/// hand-off targets for capture.
pub(super) fn generate(
    w: &WorkloadEntry,
    reg: &Registry,
    mesh: &Mesh,
    snap: &mut Snapshot,
    notes: &mut Vec<String>,
) -> Handoff {
    // Outbound: every HTTP service port in the mesh, by host; with capture, also a listener at
    // each address:port the service is reached at (VIPs and its workloads' app ports).
    let mut vhosts = Vec::new();
    let mut handoff = Handoff::new();
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
                // As istiod does by `h2UpgradePolicy`: HTTP/2 and gRPC ports, and every HTTP
                // port with UPGRADE, are HTTP/2 to the peer; without it an HTTP port carries each
                // request as it came, so HTTP/1.1 stays HTTP/1.1.
                if p.is_http() {
                    let protocol = if p.is_h2() || mesh.h2_upgrade {
                        UpstreamHttp::Http2
                    } else {
                        UpstreamHttp::Downstream
                    };
                    c.typed_extension_protocol_options.insert(
                        HTTP_PROTOCOL_OPTIONS.into(),
                        http_protocol_options(protocol),
                    );
                }
                put(snap, types::CLUSTER, &name, &c);
                let eps: Vec<(String, u16)> = peers
                    .iter()
                    .map(|m| (m.spec.address.clone(), inbound_port(m)))
                    .collect();
                put(snap, types::ENDPOINT, &name, &load_assignment(&name, &eps));
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
    put(snap, types::ROUTE, "outbound", &outbound_rds);
    handoff
}

/// `virtualOutbound` without capture: the app dials it, and the Host picks the service.
pub(super) fn by_host_listener(
    w: &WorkloadEntry,
    access_log: &[xds::pb::envoy::config::accesslog::v3::AccessLog],
    snap: &mut Snapshot,
) {
    let hcm = HttpConnectionManager {
        stat_prefix: format!("outbound_0.0.0.0_{}", outbound_port(w)),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: "outbound".into(),
        })),
        http_filters: vec![router()],
        upgrade_configs: websocket(),
        access_log: access_log.to_vec(),
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
    let l = Listener {
        name: "virtualOutbound".into(),
        address: Some(socket("127.0.0.1", outbound_port(w))),
        filter_chains: vec![by_host],
        traffic_direction: 2,
        ..Default::default()
    };
    put(snap, types::LISTENER, &l.name, &l);
}
