//! Clusters (CDS) with their upstream TLS, and the inverse.

use super::*;
use xds::pb::envoy::config::cluster::v3::cluster as cds;
use xds::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use xds::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
use xds::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;

/// A CDS resource. EDS clusters come back with no endpoints and `eds` set.
pub fn cluster(c: &Cluster, notes: &mut Notes) -> Result<config::Cluster, Invalid> {
    let mut cx = Ctx {
        resource: &format!("cluster {}", c.name),
        notes,
    };
    if c.name.is_empty() {
        return Err(cx.invalid("name", "a cluster needs a name"));
    }
    let mut out = config::Cluster {
        name: c.name.clone(),
        endpoints: Vec::new(),
        eds: None,
        lb_policy: LbPolicy::RoundRobin,
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map_or(Duration::from_secs(5), |d| duration(d.seconds, d.nanos)),
        protocol: config::UpstreamProtocol::Auto,
        transport_socket: None,
        metadata: config::DestinationMetadata::default(),
    };
    // DiscoveryType: 0 STATIC, 1 STRICT_DNS, 2 LOGICAL_DNS, 3 EDS, 4 ORIGINAL_DST.
    match &c.cluster_discovery_type {
        Some(cds::ClusterDiscoveryType::Type(0)) | None => {
            out.endpoints = match &c.load_assignment {
                Some(la) => load_assignment_in(la, "load_assignment", &mut cx)?,
                None => Vec::new(),
            };
        }
        Some(cds::ClusterDiscoveryType::Type(1 | 2)) => {
            // Resolved once, when the cluster arrives.
            let la = c
                .load_assignment
                .as_ref()
                .ok_or_else(|| cx.invalid("load_assignment", "required for DNS clusters"))?;
            out.endpoints = dns_endpoints(la, &mut cx)?;
            cx.note("DNS names resolved once, when the cluster arrived");
        }
        Some(cds::ClusterDiscoveryType::Type(3)) => {
            let eds = c.eds_cluster_config.as_ref();
            if let Some(src) = eds.and_then(|e| e.eds_config.as_ref()) {
                ads_source(src).map_err(|m| cx.invalid("eds_cluster_config.eds_config", m))?;
            }
            let service = eds
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty());
            out.eds = Some(service.unwrap_or_else(|| c.name.clone()));
        }
        Some(cds::ClusterDiscoveryType::Type(4)) => {
            cx.note(
                "ORIGINAL_DST needs original-destination capture; the cluster has no endpoints",
            );
        }
        _ => {
            return Err(cx.invalid(
                "type",
                "not supported (STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST are)",
            ));
        }
    }
    out.metadata = destination_from_name(&c.name);
    if out.metadata.service.is_none()
        && let Some((host, namespace)) = service_from_metadata(c)
    {
        out.metadata.service = Some(host);
        out.metadata.namespace = namespace;
    }
    // LbPolicy: 0 ROUND_ROBIN, 1 LEAST_REQUEST, 2 RING_HASH, 3 RANDOM, 5 MAGLEV, 6 CLUSTER_PROVIDED.
    out.lb_policy = match c.lb_policy {
        0 => LbPolicy::RoundRobin,
        1 => LbPolicy::LeastRequest,
        3 => LbPolicy::Random,
        other => {
            cx.note(format!("lb_policy {other} applied as ROUND_ROBIN"));
            LbPolicy::RoundRobin
        }
    };
    if c.circuit_breakers.is_some() {
        cx.note("circuit_breakers not enforced");
    }
    if c.outlier_detection.is_some() {
        cx.note("outlier_detection not applied");
    }
    if let Some(opts) = c
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        && let Ok(opts) = codec::unpack::<HttpProtocolOptions>(opts)
    {
        out.protocol = match opts.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => {
                match explicit.protocol_config {
                    Some(ProtocolConfig::Http2ProtocolOptions(_)) => {
                        config::UpstreamProtocol::Http2
                    }
                    _ => config::UpstreamProtocol::Http1,
                }
            }
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
                config::UpstreamProtocol::Downstream
            }
            Some(UpstreamProtocolOptions::AutoConfig(_)) | None => config::UpstreamProtocol::Auto,
        };
    }
    let socket = match (&c.transport_socket, c.transport_socket_matches.as_slice()) {
        (Some(ts), _) => Some(ts.clone()),
        (None, []) => None,
        (None, matches) => {
            // Istio's auto-mTLS: endpoints labelled tlsMode=istio get mTLS. Every endpoint of ours
            // is a sidecar, so the mTLS socket is taken for all of them.
            let tls = matches
                .iter()
                .find(|m| m.transport_socket.as_ref().is_some_and(is_tls_socket));
            if tls.is_some() {
                cx.note("transport_socket_matches: the mTLS socket applies to every endpoint");
            }
            tls.and_then(|m| m.transport_socket.clone())
        }
    };
    if let Some(ts) = socket {
        if is_tls_socket(&ts) {
            out.transport_socket = Some(upstream_tls(&ts, &mut cx)?);
        } else if !(ts.name == "envoy.transport_sockets.raw_buffer"
            || ts.name == "raw_buffer"
            || typed(&ts).is_some_and(|a| a.type_url == RAW_BUFFER_TYPE))
        {
            return Err(cx.invalid("transport_socket", format!("{} is not supported", ts.name)));
        }
    }
    Ok(out)
}

/// Istio names outbound clusters `outbound|PORT|SUBSET|HOST`: the destination service for metric
/// labels, and its namespace for `*.NS.svc.*` hosts (istiod also sends it as cluster metadata,
/// which this proxy does not read).
fn destination_from_name(name: &str) -> config::DestinationMetadata {
    let mut parts = name.split('|');
    let (Some("outbound"), Some(_), Some(_), Some(host)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return config::DestinationMetadata::default();
    };
    let labels: Vec<&str> = host.split('.').collect();
    let namespace = (labels.len() > 2 && labels[2] == "svc").then(|| labels[1].to_owned());
    config::DestinationMetadata {
        service: Some(host.to_owned()),
        namespace,
        ..Default::default()
    }
}

/// istiod's cluster metadata `istio.services[].host` (and `namespace`), which inbound clusters
/// carry: the first service. Anything not shaped so is ignored (it only labels telemetry).
fn service_from_metadata(
    c: &xds::pb::envoy::config::cluster::v3::Cluster,
) -> Option<(String, Option<String>)> {
    use xds::pb::google::protobuf::value::Kind;
    let istio = c.metadata.as_ref()?.filter_metadata.get("istio")?;
    let Some(Kind::ListValue(list)) = istio.fields.get("services")?.kind.as_ref() else {
        return None;
    };
    let Some(Kind::StructValue(svc)) = list.values.first()?.kind.as_ref() else {
        return None;
    };
    let text = |k: &str| match svc.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) if !s.is_empty() && s.len() <= 253 => Some(s.clone()),
        _ => None,
    };
    let host = text("host")?;
    let namespace = text("namespace")
        .or_else(|| destination_from_name(&format!("outbound|0||{host}")).namespace);
    Some((host, namespace))
}

fn upstream_tls(ts: &TransportSocket, cx: &mut Ctx<'_>) -> Result<UpstreamTls, Invalid> {
    let field = "transport_socket";
    let any = typed(ts).ok_or_else(|| cx.invalid(field, "an UpstreamTlsContext is required"))?;
    let ctx: UpstreamTlsContext =
        codec::unpack(any).map_err(|e| cx.invalid(field, e.to_string()))?;
    let common = ctx.common_tls_context.unwrap_or_default();
    own_certificate(&common, field, cx)?;
    let mut ids = Vec::new();
    let validation = match &common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => Some(v.clone()),
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            if let Some(sds) = &c.validation_context_sds_secret_config
                && !SDS_CA_NAMES.contains(&sds.name.as_str())
                && !sds.name.starts_with("file-root:")
            {
                return Err(cx.invalid(
                    format!(
                        "{field}.combined_validation_context.validation_context_sds_secret_config"
                    ),
                    format!(
                        "SDS secret {:?} is not served (\"ROOTCA\": this workload's trust bundle)",
                        sds.name
                    ),
                ));
            }
            c.default_validation_context.clone()
        }
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds)) => {
            if !SDS_CA_NAMES.contains(&sds.name.as_str()) {
                return Err(cx.invalid(
                    format!("{field}.validation_context_sds_secret_config"),
                    format!("SDS secret {:?} is not served", sds.name),
                ));
            }
            None
        }
        _ => None,
    };
    if let Some(v) = validation {
        if v.trusted_ca.is_some() {
            cx.note("trusted_ca ignored: peers are verified against the SPIFFE trust bundle");
        }
        #[expect(deprecated, reason = "match_subject_alt_names is what istiod sends")]
        let plain = v.match_subject_alt_names.iter();
        for m in plain {
            ids.push(
                san_exact(m)
                    .map_err(|msg| cx.invalid(format!("{field}.match_subject_alt_names"), msg))?,
            );
        }
        for m in &v.match_typed_subject_alt_names {
            // SanType 4 = URI.
            if m.san_type != subject_alt_name_matcher::SanType::Uri as i32 {
                return Err(cx.invalid(
                    format!("{field}.match_typed_subject_alt_names"),
                    "non-URI SAN matchers are not supported (peers are named by SPIFFE ID)",
                ));
            }
            let sm = m.matcher.as_ref().ok_or_else(|| {
                cx.invalid(
                    format!("{field}.match_typed_subject_alt_names"),
                    "matcher required",
                )
            })?;
            ids.push(san_exact(sm).map_err(|msg| {
                cx.invalid(format!("{field}.match_typed_subject_alt_names"), msg)
            })?);
        }
    }
    if ids.is_empty() {
        return Err(cx.invalid(
            format!("{field}.validation_context"),
            "an mTLS upstream needs the SPIFFE IDs it may present (SAN matchers); \"any ID in the trust domain\" is refused",
        ));
    }
    let sni = if ctx.sni.is_empty() {
        "outbound".to_owned()
    } else {
        ctx.sni.clone()
    };
    if rustls_pki_types::ServerName::try_from(sni.as_str()).is_err() {
        return Err(cx.invalid(format!("{field}.sni"), format!("invalid SNI {sni:?}")));
    }
    Ok(UpstreamTls {
        sni,
        match_spiffe_ids: ids,
    })
}

fn san_exact(m: &StringMatcher) -> Result<SpiffeId, FieldError> {
    match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(v)) if !m.ignore_case => SpiffeId::parse(v)
            .map_err(|source| FieldError::NotASpiffeId {
                value: v.clone(),
                source,
            }),
        _ => Err(FieldError::NonExactSan),
    }
}

// === the model back to Envoy's message ===

/// A model cluster as Envoy's message.
pub fn cluster_pb(c: &config::Cluster) -> Cluster {
    use xds::pb::envoy::config::endpoint::v3 as e;
    let transport_socket = c.transport_socket.as_ref().map(|t| TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(codec::pack(&UpstreamTlsContext {
            sni: t.sni.clone(),
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds("default")],
                validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(
                            xds::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext {
                                match_typed_subject_alt_names: t
                                    .match_spiffe_ids
                                    .iter()
                                    .map(|id| xds::pb::envoy::extensions::transport_sockets::tls::v3::SubjectAltNameMatcher {
                                        san_type: subject_alt_name_matcher::SanType::Uri as i32,
                                        matcher: Some(StringMatcher {
                                            match_pattern: Some(string_matcher::MatchPattern::Exact(id.to_string())),
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
                )),
                ..Default::default()
            }),
            ..Default::default()
        }))),
    });
    Cluster {
        name: c.name.clone(),
        cluster_discovery_type: Some(cds::ClusterDiscoveryType::Type(0)),
        connect_timeout: Some(duration_pb(c.connect_timeout)),
        lb_policy: match c.lb_policy {
            LbPolicy::RoundRobin => 0,
            LbPolicy::LeastRequest => 1,
            LbPolicy::Random => 3,
        },
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: c.name.clone(),
            endpoints: vec![e::LocalityLbEndpoints {
                lb_endpoints: c
                    .endpoints
                    .iter()
                    .map(|a| e::LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(e::Endpoint {
                            address: Some(socket_address_pb(*a)),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket,
        ..Default::default()
    }
}
