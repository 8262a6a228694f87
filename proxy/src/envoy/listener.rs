//! Listeners and their filter chains (HTTP connection manager, TCP proxy, downstream TLS), and
//! the inverse for `/config_dump`.

use super::*;

/// A listener, or `None` when the whole listener is one this proxy does not serve (an API listener
/// for proxyless gRPC, a listener that is not bound to a port): that is said in `notes`.
pub fn listener(l: &Listener, notes: &mut Notes) -> Result<Option<config::Listener>, Invalid> {
    // Static listeners may be unnamed (Envoy names them itself); xDS ones are checked by the handler.
    let name = if l.name.is_empty() {
        socket_addr(l.address.as_ref())
            .map_or_else(|_| "(unnamed listener)".to_owned(), |a| a.to_string())
    } else {
        l.name.clone()
    };
    let name = name.as_str();
    let mut cx = Ctx {
        resource: &format!("listener {name}"),
        notes,
    };
    if l.api_listener.is_some() {
        cx.note("api_listener is for proxyless gRPC clients; not served by the proxy");
        return Ok(None);
    }
    if matches!(
        l.listener_specifier,
        Some(
            xds::pb::envoy::config::listener::v3::listener::ListenerSpecifier::InternalListener(_)
        )
    ) {
        cx.note("internal_listener (waypoint tunnels) not supported; listener not served");
        return Ok(None);
    }
    // Not bound: reached by hand-off from a `use_original_dst` listener (capture).
    let bind_to_port = l.bind_to_port.as_ref().is_none_or(|b| b.value);
    let address = socket_addr(l.address.as_ref()).map_err(|m| cx.invalid("address", m))?;
    let use_original_dst = l.use_original_dst.as_ref().is_some_and(|b| b.value);
    let original_dst = use_original_dst
        || l.listener_filters
            .iter()
            .any(|lf| lf.name == "envoy.filters.listener.original_dst");
    for lf in &l.listener_filters {
        if !matches!(
            lf.name.as_str(),
            "envoy.filters.listener.tls_inspector"
                | "envoy.filters.listener.http_inspector"
                | "envoy.filters.listener.original_dst"
                | "istio.original_src"
        ) {
            cx.note(format!("listener filter {} skipped", lf.name));
        }
    }
    let has_tls = l
        .filter_chains
        .iter()
        .any(|fc| fc.transport_socket.as_ref().is_some_and(is_tls_socket));
    // TrafficDirection: 1 INBOUND, 2 OUTBOUND.
    let direction = match l.traffic_direction {
        1 => Direction::Inbound,
        2 => Direction::Outbound,
        _ if has_tls => Direction::Inbound,
        _ => Direction::Outbound,
    };
    let mut chains = Vec::new();
    for (i, fc) in l.filter_chains.iter().enumerate() {
        chains.push(filter_chain(
            fc,
            direction,
            &format!("filter_chains[{i}]"),
            &mut cx,
        )?);
    }
    if let Some(fc) = &l.default_filter_chain {
        let mut c = filter_chain(fc, direction, "default_filter_chain", &mut cx)?;
        if c.name.is_empty() {
            c.name = format!("{name}#default");
        }
        chains.push(c);
    }
    if chains.is_empty() {
        return Err(cx.invalid("filter_chains", "a listener needs a filter chain"));
    }
    // Envoy picks the most specific chain; the model takes the first match, so order by specificity
    // (destination port, then the longest destination prefix, then server names, then transport
    // protocol, then ALPN), stably.
    chains.sort_by_key(|c| {
        let m = &c.filter_chain_match;
        let longest_prefix = m.prefix_ranges.iter().map(|r| {
            // Compare IPv4 and IPv6 prefixes on one scale.
            u16::from(r.prefix_len) + if r.address.is_ipv4() { 96 } else { 0 }
        });
        std::cmp::Reverse((
            m.destination_port.is_some(),
            longest_prefix.max().map_or(0, |l| l + 1),
            !m.server_names.is_empty(),
            m.transport_protocol.is_some(),
            !m.application_protocols.is_empty(),
        ))
    });
    Ok(Some(config::Listener {
        name: name.to_owned(),
        address,
        direction,
        filter_chains: chains,
        max_connections: 10_000,
        original_dst,
        bind_to_port,
        use_original_dst,
    }))
}

fn filter_chain(
    fc: &FilterChain,
    direction: Direction,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<config::FilterChain, Invalid> {
    let chain_name = if fc.name.is_empty() {
        String::new()
    } else {
        fc.name.clone()
    };
    let mut out = config::FilterChain {
        name: chain_name,
        filter_chain_match: config::FilterChainMatch::default(),
        http_connection_manager: None,
        tcp_proxy: None,
        rbac_filters: Vec::new(),
        refuse: None,
    };
    let mut refuse = Vec::new();
    if let Some(m) = &fc.filter_chain_match {
        if let Some(p) = &m.destination_port {
            out.filter_chain_match.destination_port =
                Some(u16::try_from(p.value).map_err(|_| {
                    cx.invalid(
                        format!("{field}.filter_chain_match.destination_port"),
                        "out of range",
                    )
                })?);
        }
        out.filter_chain_match.server_names = m.server_names.clone();
        out.filter_chain_match.application_protocols = m.application_protocols.clone();
        match m.transport_protocol.as_str() {
            "" => {}
            "tls" | "raw_buffer" => {
                out.filter_chain_match.transport_protocol = Some(m.transport_protocol.clone())
            }
            other => refuse.push(format!("transport_protocol {other:?}")),
        }
        for (j, r) in m.prefix_ranges.iter().enumerate() {
            let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
            let text = format!("{}/{len}", r.address_prefix);
            let range: config::CidrRange = text.parse().map_err(|e: config::BadCidr| {
                cx.invalid(format!("{field}.filter_chain_match.prefix_ranges[{j}]"), e)
            })?;
            out.filter_chain_match.prefix_ranges.push(range);
        }
        for (set, what) in [
            (!m.source_prefix_ranges.is_empty(), "source_prefix_ranges"),
            (
                !m.direct_source_prefix_ranges.is_empty(),
                "direct_source_prefix_ranges",
            ),
            (!m.source_ports.is_empty(), "source_ports"),
            (m.source_type != 0, "source_type"),
            (!m.address_suffix.is_empty(), "address_suffix"),
        ] {
            if set {
                refuse.push(what.to_owned());
            }
        }
    }
    let tls = fc.transport_socket.as_ref().filter(|ts| is_tls_socket(ts));
    match (direction, tls) {
        (Direction::Inbound, Some(ts)) => {
            downstream_tls(ts, &format!("{field}.transport_socket"), cx)?;
            if out.filter_chain_match.transport_protocol.as_deref() == Some("raw_buffer") {
                return Err(cx.invalid(
                    format!("{field}.transport_socket"),
                    "a raw_buffer chain cannot terminate TLS",
                ));
            }
            out.filter_chain_match.transport_protocol = Some("tls".into());
        }
        (Direction::Inbound, None) => {
            if out.filter_chain_match.transport_protocol.as_deref() == Some("tls") {
                refuse.push("TLS passthrough (tls match without a TLS transport socket)".into());
            }
            out.filter_chain_match.transport_protocol = Some("raw_buffer".into());
            out.filter_chain_match.server_names.clear();
            out.filter_chain_match.application_protocols.clear();
        }
        (Direction::Outbound, Some(_)) => {
            refuse.push("TLS termination on an outbound listener".into());
        }
        (Direction::Outbound, None) => {
            // Outbound chains see the app's plaintext; a transport_protocol criterion there is
            // Istio's "raw_buffer" (always true) or "tls" (an app speaking TLS: refused below).
            if out.filter_chain_match.transport_protocol.as_deref() == Some("tls") {
                refuse.push("TLS originated by the app".into());
            }
            out.filter_chain_match.transport_protocol = None;
        }
    }

    let mut blackhole = false;
    for (i, f) in fc.filters.iter().enumerate() {
        let ffield = format!("{field}.filters[{i}]");
        let Some(filter::ConfigType::TypedConfig(tc)) = &f.config_type else {
            if SKIPPABLE_NETWORK_FILTERS.contains(&f.name.as_str()) {
                cx.note(format!("network filter {} skipped", f.name));
                continue;
            }
            return Err(cx.invalid(
                &ffield,
                format!("network filter {} has no typed_config", f.name),
            ));
        };
        let type_url = codec::effective_type_url(tc);
        if out.http_connection_manager.is_some() || out.tcp_proxy.is_some() {
            return Err(cx.invalid(&ffield, "no network filter may follow a terminal filter"));
        }
        match type_url.as_str() {
            HCM_TYPE => {
                let hcm: PbHcm =
                    codec::unpack(tc).map_err(|e| cx.invalid(&ffield, e.to_string()))?;
                out.http_connection_manager = Some(http_connection_manager(&hcm, &ffield, cx)?);
            }
            TCP_PROXY_TYPE => {
                let tcp: PbTcpProxy =
                    codec::unpack(tc).map_err(|e| cx.invalid(&ffield, e.to_string()))?;
                let cluster = match &tcp.cluster_specifier {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => c.clone(),
                    Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                        // One weighted cluster is a plain cluster; a split is not supported for TCP.
                        match w.clusters.as_slice() {
                            [one] => one.name.clone(),
                            _ => {
                                return Err(cx.invalid(
                                    format!("{ffield}.weighted_clusters"),
                                    "a weighted TCP split is not supported",
                                ));
                            }
                        }
                    }
                    _ => {
                        return Err(
                            cx.invalid(format!("{ffield}.cluster"), "a cluster is required")
                        );
                    }
                };
                if cluster == "BlackHoleCluster" {
                    // Istio's black hole (REGISTRY_ONLY): every connection is refused.
                    blackhole = true;
                    continue;
                }
                out.tcp_proxy = Some(TcpProxy {
                    stat_prefix: tcp.stat_prefix.clone(),
                    cluster,
                });
            }
            policy::rbac::NETWORK_RBAC_TYPE => {
                let fcfg = rbac_filter(policy::rbac::NETWORK_RBAC_FILTER, tc, &ffield, cx)?;
                out.rbac_filters.push(fcfg);
            }
            _ if SKIPPABLE_NETWORK_FILTERS.contains(&f.name.as_str()) => {
                cx.note(format!("network filter {} skipped", f.name));
            }
            other => {
                return Err(cx.invalid(
                    &ffield,
                    format!("network filter {} ({other}) is not supported", f.name),
                ));
            }
        }
    }
    if blackhole && out.http_connection_manager.is_none() && out.tcp_proxy.is_none() {
        out.refuse = Some("BlackHoleCluster".into());
        return Ok(out);
    }
    if out.http_connection_manager.is_none() && out.tcp_proxy.is_none() {
        return Err(cx.invalid(
            format!("{field}.filters"),
            "a filter chain needs an http_connection_manager or a tcp_proxy",
        ));
    }
    if !refuse.is_empty() {
        let reason = format!("unsupported match: {}", refuse.join(", "));
        cx.note(format!("{field}: refuses its connections ({reason})"));
        out.refuse = Some(reason);
    }
    Ok(out)
}

fn downstream_tls(ts: &TransportSocket, field: &str, cx: &mut Ctx<'_>) -> Result<(), Invalid> {
    let Some(any) = typed(ts) else {
        return Err(cx.invalid(field, "a TLS transport socket needs a DownstreamTlsContext"));
    };
    let ctx: DownstreamTlsContext =
        codec::unpack(any).map_err(|e| cx.invalid(field, e.to_string()))?;
    if !ctx
        .require_client_certificate
        .as_ref()
        .is_some_and(|b| b.value)
    {
        cx.note(format!(
            "{field}: require_client_certificate is not set; a client SVID is required anyway"
        ));
    }
    if let Some(common) = &ctx.common_tls_context {
        own_certificate(common, field, cx)?;
    }
    Ok(())
}

/// The certificate to present must be this workload's SVID (SDS `default`), never inline keys.
pub(super) fn own_certificate(
    common: &CommonTlsContext,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<(), Invalid> {
    if !common.tls_certificates.is_empty() {
        return Err(cx.invalid(
            format!("{field}.common_tls_context.tls_certificates"),
            "inline certificates are not supported; the SVID comes from the Workload API (SDS \"default\")",
        ));
    }
    for s in &common.tls_certificate_sds_secret_configs {
        if !SDS_CERT_NAMES.contains(&s.name.as_str()) && !s.name.starts_with("spiffe://") {
            return Err(cx.invalid(
                format!("{field}.common_tls_context.tls_certificate_sds_secret_configs"),
                format!(
                    "SDS secret {:?} is not served (\"default\": this workload's SVID)",
                    s.name
                ),
            ));
        }
    }
    Ok(())
}

fn http_connection_manager(
    hcm: &PbHcm,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<HttpConnectionManager, Invalid> {
    let (route_config, rds) = match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
            if let Some(src) = &rds.config_source {
                ads_source(src).map_err(|m| cx.invalid(format!("{field}.rds.config_source"), m))?;
            }
            if rds.route_config_name.is_empty() {
                return Err(cx.invalid(format!("{field}.rds.route_config_name"), "required"));
            }
            (
                RouteConfiguration::default(),
                Some(rds.route_config_name.clone()),
            )
        }
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => (
            route_configuration_in(rc, &format!("{field}.route_config"), cx)?,
            None,
        ),
        _ => {
            return Err(cx.invalid(
                field,
                "scoped routes are not supported; use rds or route_config",
            ));
        }
    };
    // ForwardClientCertDetails: 0 SANITIZE, 1 FORWARD_ONLY, 2 APPEND_FORWARD, 3 SANITIZE_SET,
    // 4 ALWAYS_FORWARD_ONLY. A caller's own XFCC is never trusted here, so the forwarding modes
    // become "set from the verified peer" (APPEND_FORWARD) or "remove" (the forward-only modes).
    let forward_client_cert_details = match hcm.forward_client_cert_details {
        0 => ForwardClientCertDetails::Sanitize,
        3 => ForwardClientCertDetails::SanitizeSet,
        2 => {
            cx.note(format!(
                "{field}: forward_client_cert_details APPEND_FORWARD applied as SANITIZE_SET (a caller's XFCC is never forwarded)"
            ));
            ForwardClientCertDetails::SanitizeSet
        }
        other => {
            cx.note(format!(
                "{field}: forward_client_cert_details {other} applied as SANITIZE (a caller's XFCC is never forwarded)"
            ));
            ForwardClientCertDetails::Sanitize
        }
    };
    if hcm.normalize_path.as_ref().is_some_and(|b| !b.value) {
        cx.note(format!(
            "{field}: normalize_path false: paths are always normalized"
        ));
    }
    let tracing = match &hcm.tracing {
        Some(t) => tracing_in(t, &format!("{field}.tracing"), cx)?,
        None => None,
    };
    let access_log = access_logs(&hcm.access_log, &format!("{field}.access_log"), cx)?;
    let mut http_filters = Vec::new();
    let mut router = false;
    for (i, f) in hcm.http_filters.iter().enumerate() {
        let ffield = format!("{field}.http_filters[{i}]");
        if router {
            return Err(cx.invalid(&ffield, "no HTTP filter may follow the router"));
        }
        let tc = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(tc)) => Some(tc),
            _ => None,
        };
        let type_url = tc.map(codec::effective_type_url).unwrap_or_default();
        if f.name == config::ROUTER_FILTER || type_url == ROUTER_TYPE {
            router = true;
            continue;
        }
        if type_url == policy::rbac::HTTP_RBAC_TYPE {
            let Some(tc) = tc else { continue };
            http_filters.push(rbac_filter(
                policy::rbac::HTTP_RBAC_FILTER,
                tc,
                &ffield,
                cx,
            )?);
            continue;
        }
        if SKIPPABLE_HTTP_FILTERS.contains(&f.name.as_str()) || f.is_optional {
            cx.note(format!("{field}: HTTP filter {} skipped", f.name));
            continue;
        }
        return Err(cx.invalid(
            &ffield,
            format!(
                "HTTP filter {} ({}) is required and not supported",
                f.name,
                if type_url.is_empty() {
                    "no typed_config"
                } else {
                    &type_url
                }
            ),
        ));
    }
    if !router {
        return Err(cx.invalid(
            format!("{field}.http_filters"),
            "the router filter is required",
        ));
    }
    // Envoy's `upgrade_configs`, as listed (none listed: no upgrade is tunnelled, as in Envoy).
    let upgrade_configs = hcm
        .upgrade_configs
        .iter()
        .map(|u| UpgradeConfig {
            upgrade_type: u.upgrade_type.clone(),
            enabled: u.enabled.is_none_or(|e| e.value),
        })
        .collect();
    for (i, u) in hcm.upgrade_configs.iter().enumerate() {
        if !u.filters.is_empty() {
            cx.note(format!(
                "{field}.upgrade_configs[{i}]: upgrade filters skipped"
            ));
        }
    }
    Ok(HttpConnectionManager {
        stat_prefix: hcm.stat_prefix.clone(),
        route_config,
        rds,
        forward_client_cert_details,
        http_filters,
        upgrade_configs,
        // REJECT_REQUEST; the other actions are what normalization does anyway.
        reject_ambiguous_paths: hcm.path_with_escaped_slashes_action == REJECT_REQUEST,
        access_log,
        tracing,
    })
}

const OTEL_TRACER: &str = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig";

/// Envoy's `tracing` with the OpenTelemetry provider over gRPC (what istiod sends for an
/// `opentelemetry` extension provider). Other providers, and OTLP over HTTP, are skipped with a
/// note: the calls are served, only not traced.
fn tracing_in(
    t: &http_connection_manager::Tracing,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<Option<config::HcmTracing>, Invalid> {
    use xds::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    use xds::pb::envoy::config::trace::v3::OpenTelemetryConfig;
    use xds::pb::envoy::config::trace::v3::tracing::http::ConfigType;
    let sampling = t.random_sampling.as_ref().map_or(100.0, |p| p.value);
    if !(0.0..=100.0).contains(&sampling) {
        return Err(cx.invalid(format!("{field}.random_sampling"), "a percentage, 0 to 100"));
    }
    let Some(provider) = &t.provider else {
        cx.note(format!("{field}: no provider; not traced"));
        return Ok(None);
    };
    let tc = match &provider.config_type {
        Some(ConfigType::TypedConfig(tc)) if codec::effective_type_url(tc) == OTEL_TRACER => tc,
        _ => {
            cx.note(format!(
                "{field}: tracing provider {} skipped (OpenTelemetry over gRPC only)",
                provider.name
            ));
            return Ok(None);
        }
    };
    let otel: OpenTelemetryConfig =
        codec::unpack(tc).map_err(|e| cx.invalid(format!("{field}.provider"), e.to_string()))?;
    let target = otel.grpc_service.and_then(|g| g.target_specifier);
    let (address, cluster) = match target {
        Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => {
            (None, Some(e.cluster_name))
        }
        Some(TargetSpecifier::GoogleGrpc(g)) if !g.target_uri.is_empty() => {
            (Some(g.target_uri), None)
        }
        _ => {
            cx.note(format!("{field}: OpenTelemetry provider without a gRPC service skipped (OTLP over HTTP is not supported)"));
            return Ok(None);
        }
    };
    let out = config::HcmTracing {
        sampling,
        address,
        cluster,
    };
    if let Some(a) = &out.address {
        crate::trace::TracingConfig {
            sampling,
            address: a.clone(),
            max_queue: 2048,
        }
        .check()
        .map_err(|(_, m)| cx.invalid(format!("{field}.provider.grpc_service"), m))?;
    }
    Ok(Some(out))
}

/// A connection manager's tracing as Envoy's message (the inverse of [`tracing_in`]).
fn tracing_pb(t: &config::HcmTracing) -> http_connection_manager::Tracing {
    use xds::pb::envoy::config::core::v3::{GrpcService, grpc_service};
    use xds::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing};
    let target = match (&t.address, &t.cluster) {
        (Some(a), _) => grpc_service::TargetSpecifier::GoogleGrpc(grpc_service::GoogleGrpc {
            target_uri: a.clone(),
            ..Default::default()
        }),
        (None, c) => grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
            cluster_name: c.clone().unwrap_or_default(),
            ..Default::default()
        }),
    };
    http_connection_manager::Tracing {
        random_sampling: Some(xds::pb::envoy::r#type::v3::Percent { value: t.sampling }),
        provider: Some(tracing::Http {
            name: "envoy.tracers.opentelemetry".into(),
            config_type: Some(tracing::http::ConfigType::TypedConfig(codec::pack(
                &OpenTelemetryConfig {
                    grpc_service: Some(GrpcService {
                        target_specifier: Some(target),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ))),
        }),
        ..Default::default()
    }
}

const FILE_ACCESS_LOG: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_ACCESS_LOG: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_ACCESS_LOG: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Envoy's access loggers (file, stdout, stderr — what Istio's `accessLogFile` and Telemetry API
/// generate) as the model's; others are skipped with a note. A format the proxy cannot fill is
/// invalid (NACK), as a bad format is in Envoy.
use std::path::PathBuf;
use xds::pb::envoy::config::core::v3::{data_source, substitution_format_string};

#[expect(
    deprecated,
    reason = "Istio and older control planes still send the deprecated format fields"
)]
fn access_logs(
    logs: &[xds::pb::envoy::config::accesslog::v3::AccessLog],
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<Vec<config::AccessLogConfig>, Invalid> {
    use xds::pb::envoy::config::accesslog::v3::access_log::ConfigType;
    use xds::pb::envoy::config::core::v3::SubstitutionFormatString;
    use xds::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
    use xds::pb::envoy::extensions::access_loggers::stream::v3::{
        StderrAccessLog, StdoutAccessLog, stderr_access_log, stdout_access_log,
    };
    let mut out = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let lfield = format!("{field}[{i}]");
        let Some(ConfigType::TypedConfig(tc)) = &log.config_type else {
            cx.note(format!(
                "{lfield}: access log {} without typed_config skipped",
                log.name
            ));
            continue;
        };
        let type_url = codec::effective_type_url(tc);
        let unpack_err = |e: xds::codec::CodecError| e.to_string();
        let (path, format): (PathBuf, Option<SubstitutionFormatString>) = match type_url.as_str() {
            FILE_ACCESS_LOG => {
                let f: FileAccessLog =
                    codec::unpack(tc).map_err(|e| cx.invalid(&lfield, unpack_err(e)))?;
                if f.path.is_empty() {
                    return Err(cx.invalid(format!("{lfield}.path"), "required"));
                }
                let format = match f.access_log_format {
                    Some(file_access_log::AccessLogFormat::LogFormat(s)) => Some(s),
                    Some(file_access_log::AccessLogFormat::Format(t)) => Some(text_format(t)),
                    Some(
                        file_access_log::AccessLogFormat::JsonFormat(j)
                        | file_access_log::AccessLogFormat::TypedJsonFormat(j),
                    ) => Some(SubstitutionFormatString {
                        format: Some(substitution_format_string::Format::JsonFormat(j)),
                        ..Default::default()
                    }),
                    None => None,
                };
                (PathBuf::from(f.path), format)
            }
            STDOUT_ACCESS_LOG => {
                let f: StdoutAccessLog =
                    codec::unpack(tc).map_err(|e| cx.invalid(&lfield, unpack_err(e)))?;
                let format = f
                    .access_log_format
                    .map(|stdout_access_log::AccessLogFormat::LogFormat(s)| s);
                ("/dev/stdout".into(), format)
            }
            STDERR_ACCESS_LOG => {
                let f: StderrAccessLog =
                    codec::unpack(tc).map_err(|e| cx.invalid(&lfield, unpack_err(e)))?;
                let format = f
                    .access_log_format
                    .map(|stderr_access_log::AccessLogFormat::LogFormat(s)| s);
                ("/dev/stderr".into(), format)
            }
            other => {
                cx.note(format!(
                    "{lfield}: access logger {} ({other}) skipped",
                    log.name
                ));
                continue;
            }
        };
        if log.filter.is_some() {
            cx.note(format!(
                "{lfield}: access log filter skipped; every call is logged"
            ));
        }
        let mut c = config::AccessLogConfig {
            path,
            format: config::AccessLogFormat::Text,
            text_format: None,
            json_format: None,
        };
        match format.and_then(|f| f.format) {
            None => {}
            Some(substitution_format_string::Format::TextFormat(t)) => c.text_format = Some(t),
            Some(substitution_format_string::Format::TextFormatSource(ds)) => match ds.specifier {
                Some(data_source::Specifier::InlineString(t)) => c.text_format = Some(t),
                Some(data_source::Specifier::InlineBytes(b)) => {
                    c.text_format = Some(String::from_utf8(b).map_err(|_| {
                        cx.invalid(format!("{lfield}.log_format"), "format is not UTF-8")
                    })?);
                }
                _ => {
                    return Err(cx.invalid(
                        format!("{lfield}.log_format.text_format_source"),
                        "only inline formats are supported",
                    ));
                }
            },
            Some(substitution_format_string::Format::JsonFormat(j)) => {
                let mut map = std::collections::BTreeMap::new();
                for (k, v) in j.fields {
                    match v.kind {
                        Some(xds::pb::google::protobuf::value::Kind::StringValue(s)) => {
                            map.insert(k, s);
                        }
                        _ => {
                            return Err(cx.invalid(
                                format!("{lfield}.log_format.json_format.{k}"),
                                "only string values (format strings) are supported",
                            ));
                        }
                    }
                }
                c.json_format = Some(map);
            }
        }
        crate::access_log::Formatter::of(&c)
            .map_err(|(f, e)| cx.invalid(format!("{lfield}: {f}"), e))?;
        out.push(c);
    }
    Ok(out)
}

/// A model access log as Envoy's file logger (the inverse of [`access_logs`], for `/config_dump`).
fn access_log_pb(c: &config::AccessLogConfig) -> xds::pb::envoy::config::accesslog::v3::AccessLog {
    use xds::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
    use xds::pb::envoy::config::core::v3::{DataSource, SubstitutionFormatString};
    use xds::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
    use xds::pb::google::protobuf::{Struct, Value, value};
    let format = match (&c.text_format, &c.json_format, c.format) {
        (Some(t), _, _) => Some(substitution_format_string::Format::TextFormatSource(
            DataSource {
                specifier: Some(data_source::Specifier::InlineString(t.clone())),
                ..Default::default()
            },
        )),
        (None, Some(j), _) => Some(substitution_format_string::Format::JsonFormat(Struct {
            fields: j
                .iter()
                .map(|(k, v)| {
                    let v = Value {
                        kind: Some(value::Kind::StringValue(v.clone())),
                    };
                    (k.clone(), v)
                })
                .collect(),
        })),
        (None, None, config::AccessLogFormat::Istio) => Some(
            substitution_format_string::Format::TextFormatSource(DataSource {
                specifier: Some(data_source::Specifier::InlineString(
                    crate::access_log::format::ISTIO_TEXT.into(),
                )),
                ..Default::default()
            }),
        ),
        _ => None,
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(access_log::ConfigType::TypedConfig(codec::pack(
            &FileAccessLog {
                path: c.path.display().to_string(),
                access_log_format: format.map(|f| {
                    file_access_log::AccessLogFormat::LogFormat(SubstitutionFormatString {
                        format: Some(f),
                        ..Default::default()
                    })
                }),
            },
        ))),
        ..Default::default()
    }
}

#[expect(
    deprecated,
    reason = "the deprecated `format` field becomes the deprecated text_format"
)]
fn text_format(t: String) -> xds::pb::envoy::config::core::v3::SubstitutionFormatString {
    xds::pb::envoy::config::core::v3::SubstitutionFormatString {
        format: Some(substitution_format_string::Format::TextFormat(t)),
        ..Default::default()
    }
}

/// Resources must come over the same ADS stream (`ads: {}`) — or `self`, which means the same.
pub(super) fn ads_source(src: &ConfigSource) -> Result<(), FieldError> {
    match &src.config_source_specifier {
        Some(
            config_source::ConfigSourceSpecifier::Ads(_)
            | config_source::ConfigSourceSpecifier::Self_(_),
        ) => Ok(()),
        _ => Err(FieldError::NotAds),
    }
}

// === the model back to Envoy's message ===

/// A model listener as Envoy's message (what `/config_dump` shows for the static ones).
pub fn listener_pb(l: &config::Listener) -> Listener {
    use xds::pb::envoy::config::listener::v3 as pb;
    let chains = l
        .filter_chains
        .iter()
        .map(|fc| {
            let m = &fc.filter_chain_match;
            let mut filters: Vec<pb::Filter> = fc
                .rbac_filters
                .iter()
                .map(|f| pb::Filter {
                    name: f.name.clone(),
                    config_type: typed_filter(f).map(filter::ConfigType::TypedConfig),
                })
                .collect();
            if let Some(h) = &fc.http_connection_manager {
                let hcm = PbHcm {
                    stat_prefix: h.stat_prefix.clone(),
                    route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                        route_configuration_pb(&h.route_config),
                    )),
                    http_filters: h
                        .http_filters
                        .iter()
                        .map(|f| xds::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter {
                            name: f.name.clone(),
                            config_type: typed_filter(f).map(http_filter::ConfigType::TypedConfig),
                            ..Default::default()
                        })
                        .collect(),
                    forward_client_cert_details: match h.forward_client_cert_details {
                        ForwardClientCertDetails::Sanitize => 0,
                        ForwardClientCertDetails::SanitizeSet => 3,
                    },
                    path_with_escaped_slashes_action: if h.reject_ambiguous_paths {
                        REJECT_REQUEST
                    } else {
                        0
                    },
                    access_log: h.access_log.iter().map(access_log_pb).collect(),
                    tracing: h.tracing.as_ref().map(tracing_pb),
                    upgrade_configs: h
                        .upgrade_configs
                        .iter()
                        .map(|u| http_connection_manager::UpgradeConfig {
                            upgrade_type: u.upgrade_type.clone(),
                            enabled: (!u.enabled).then_some(xds::pb::google::protobuf::BoolValue { value: false }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                };
                filters.push(pb::Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&hcm))),
                });
            }
            if let Some(t) = &fc.tcp_proxy {
                filters.push(pb::Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&PbTcpProxy {
                        stat_prefix: t.stat_prefix.clone(),
                        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(t.cluster.clone())),
                        ..Default::default()
                    }))),
                });
            }
            let tls = l.direction == Direction::Inbound && m.transport_protocol.as_deref() != Some("raw_buffer");
            pb::FilterChain {
                name: fc.name.clone(),
                filter_chain_match: Some(pb::FilterChainMatch {
                    destination_port: m.destination_port.map(|p| xds::pb::google::protobuf::UInt32Value { value: u32::from(p) }),
                    prefix_ranges: m
                        .prefix_ranges
                        .iter()
                        .map(|r| xds::pb::envoy::config::core::v3::CidrRange {
                            address_prefix: r.address.to_string(),
                            prefix_len: Some(xds::pb::google::protobuf::UInt32Value { value: u32::from(r.prefix_len) }),
                        })
                        .collect(),
                    server_names: m.server_names.clone(),
                    transport_protocol: m.transport_protocol.clone().unwrap_or_default(),
                    application_protocols: m.application_protocols.clone(),
                    ..Default::default()
                }),
                filters,
                transport_socket: tls.then(|| TransportSocket {
                    name: "envoy.transport_sockets.tls".into(),
                    config_type: Some(transport_socket::ConfigType::TypedConfig(codec::pack(&DownstreamTlsContext {
                        require_client_certificate: Some(xds::pb::google::protobuf::BoolValue { value: true }),
                        common_tls_context: Some(CommonTlsContext {
                            tls_certificate_sds_secret_configs: vec![sds("default")],
                            validation_context_type: Some(
                                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds("ROOTCA")),
                            ),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }))),
                }),
                ..Default::default()
            }
        })
        .collect();
    Listener {
        name: l.name.clone(),
        address: Some(socket_address_pb(l.address)),
        filter_chains: chains,
        traffic_direction: match l.direction {
            Direction::Inbound => 1,
            Direction::Outbound => 2,
        },
        bind_to_port: (!l.bind_to_port)
            .then_some(xds::pb::google::protobuf::BoolValue { value: false }),
        use_original_dst: l
            .use_original_dst
            .then_some(xds::pb::google::protobuf::BoolValue { value: true }),
        listener_filters: if l.original_dst && !l.use_original_dst {
            vec![xds::pb::envoy::config::listener::v3::ListenerFilter {
                name: "envoy.filters.listener.original_dst".into(),
                ..Default::default()
            }]
        } else {
            vec![]
        },
        ..Default::default()
    }
}

/// An RBAC filter read from its protobuf message (no proto3-JSON round trip, so no descriptor
/// pool: DESIGN §4), checked to compile before the listener is accepted.
fn rbac_filter(name: &str, tc: &Any, field: &str, cx: &Ctx<'_>) -> Result<FilterConfig, Invalid> {
    let typed = policy::rbac::envoy::from_any(tc)
        .map_err(|e| cx.invalid(format!("{field}.typed_config.{}", e.field), e.reason))?;
    let fcfg = FilterConfig::rbac(policy::rbac::Filter {
        name: name.into(),
        typed_config: typed,
    });
    config::compile_rbac(std::slice::from_ref(&fcfg))
        .map_err(|e| cx.invalid(field, format!("RBAC does not compile: {e}")))?;
    Ok(fcfg)
}

/// A filter's typed config as protobuf: RBAC through the model's own conversion, anything else
/// through proto3 JSON.
fn typed_filter(f: &FilterConfig) -> Option<Any> {
    if let Some(typed) = &f.rbac {
        return policy::rbac::envoy::to_any(&typed.typed_config).ok();
    }
    let json = f.typed_config.clone()?;
    if f.name == policy::rbac::HTTP_RBAC_FILTER || f.name == policy::rbac::NETWORK_RBAC_FILTER {
        let value =
            policy::proto_json_keys(serde_json::json!({ "name": f.name, "typedConfig": json }));
        let parsed: policy::rbac::Filter = serde_json::from_value(value).ok()?;
        return policy::rbac::envoy::to_any(&parsed.typed_config).ok();
    }
    codec::json_to_any(json).ok()
}

pub(super) fn sds(
    name: &str,
) -> xds::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig {
    xds::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    }
}
