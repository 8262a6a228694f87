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
use xds::pb::envoy::config::cluster::v3::{Cluster, cluster};
use xds::pb::envoy::config::core::v3::{
    Address, ConfigSource, TransportSocket, address, config_source, socket_address,
    transport_socket,
};
use xds::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use xds::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use xds::pb::envoy::config::route::v3::{
    HeaderMatcher as PbHeaderMatcher, RouteConfiguration as PbRouteConfiguration,
    header_matcher::HeaderMatchSpecifier, route, route_action, route_match,
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
    fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            resource: self.resource.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn note(&mut self, what: impl AsRef<str>) {
        self.notes
            .push(format!("{}: {}", self.resource, what.as_ref()));
    }
}

// === listeners ===

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

fn socket_addr(a: Option<&Address>) -> Result<SocketAddr, String> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err("pipe and internal addresses are not supported".into());
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", sa.address))?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("port {p} is out of range"))?
        }
        _ => return Err("a port_value is required".into()),
    };
    Ok(SocketAddr::new(ip, port))
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
            let range: config::CidrRange = text.parse().map_err(|e: String| {
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
                let json =
                    codec::any_to_json(tc).map_err(|e| cx.invalid(&ffield, e.to_string()))?;
                let fcfg = FilterConfig {
                    name: policy::rbac::NETWORK_RBAC_FILTER.into(),
                    typed_config: Some(json),
                };
                config::compile_rbac(std::slice::from_ref(&fcfg))
                    .map_err(|e| cx.invalid(&ffield, format!("RBAC does not compile: {e}")))?;
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
fn own_certificate(
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
    if hcm.tracing.is_some() {
        cx.note(format!("{field}: tracing skipped"));
    }
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
            let json = codec::any_to_json(tc).map_err(|e| cx.invalid(&ffield, e.to_string()))?;
            let fcfg = FilterConfig {
                name: policy::rbac::HTTP_RBAC_FILTER.into(),
                typed_config: Some(json),
            };
            config::compile_rbac(std::slice::from_ref(&fcfg))
                .map_err(|e| cx.invalid(&ffield, format!("RBAC does not compile: {e}")))?;
            http_filters.push(fcfg);
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
    })
}

/// Resources must come over the same ADS stream (`ads: {}`) — or `self`, which means the same.
fn ads_source(src: &ConfigSource) -> Result<(), String> {
    match &src.config_source_specifier {
        Some(
            config_source::ConfigSourceSpecifier::Ads(_)
            | config_source::ConfigSourceSpecifier::Self_(_),
        ) => Ok(()),
        _ => Err("config sources other than ADS are not supported".into()),
    }
}

// === routes ===

/// An RDS resource.
pub fn route_configuration(
    rc: &PbRouteConfiguration,
    notes: &mut Notes,
) -> Result<RouteConfiguration, Invalid> {
    let mut cx = Ctx {
        resource: &format!("route {}", rc.name),
        notes,
    };
    if rc.name.is_empty() {
        return Err(cx.invalid("name", "a route configuration needs a name"));
    }
    route_configuration_in(rc, "", &mut cx)
}

/// Per-route overrides of HTTP filters (virtual host, route, weighted cluster). They are judged by
/// what they are (their type), not by the filter name they are keyed with, which is any string
/// the connection manager chose: an RBAC override would change authorization on that route, and a
/// `FilterConfig` wrapper can switch any filter off (`disabled: true`), so both are refused; other
/// overrides (rate limits, fault injection, CORS…) belong to filters this proxy does not run and
/// cannot widen access, so they are noted and skipped.
fn per_filter_configs(
    configs: &std::collections::HashMap<String, xds::pb::google::protobuf::Any>,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<(), Invalid> {
    for (name, any) in configs {
        let type_url = codec::effective_type_url(any);
        let message = type_url.rsplit('/').next().unwrap_or(&type_url);
        let at = format!("{field}.typed_per_filter_config[{name}]");
        if message.starts_with("envoy.extensions.filters.http.rbac.")
            || message.starts_with("envoy.extensions.filters.network.rbac.")
            || message == "envoy.config.route.v3.FilterConfig"
        {
            return Err(cx.invalid(
                at,
                format!("{message} overrides are not supported (they could change or switch off authorization on this route)"),
            ));
        }
        cx.note(format!("{at}: {message} override skipped"));
    }
    Ok(())
}

fn route_configuration_in(
    rc: &PbRouteConfiguration,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<RouteConfiguration, Invalid> {
    let sep = if field.is_empty() { "" } else { "." };
    let mut virtual_hosts = Vec::new();
    let mut retries = 0usize;
    for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
        let vfield = format!("{field}{sep}virtual_hosts[{vi}]");
        per_filter_configs(&vh.typed_per_filter_config, &vfield, cx)?;
        if vh.require_tls != 0 {
            return Err(cx.invalid(format!("{vfield}.require_tls"), "not supported"));
        }
        let mut routes = Vec::new();
        for (ri, r) in vh.routes.iter().enumerate() {
            let rfield = format!("{vfield}.routes[{ri}]");
            per_filter_configs(&r.typed_per_filter_config, &rfield, cx)?;
            let m = r
                .r#match
                .as_ref()
                .ok_or_else(|| cx.invalid(format!("{rfield}.match"), "required"))?;
            let mut rm = RouteMatch::default();
            match &m.path_specifier {
                Some(route_match::PathSpecifier::Prefix(p)) => rm.prefix = Some(p.clone()),
                Some(route_match::PathSpecifier::Path(p)) => rm.path = Some(p.clone()),
                Some(route_match::PathSpecifier::SafeRegex(re)) => {
                    rm.safe_regex = Some(re.regex.clone())
                }
                Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
                    rm.path_separated_prefix = Some(p.clone());
                }
                _ => {
                    return Err(cx.invalid(
                        format!("{rfield}.match"),
                        "this path specifier (connect_matcher / path_match_policy) is not supported; prefix, path, safe_regex and path_separated_prefix are",
                    ));
                }
            }
            if m.case_sensitive.as_ref().is_some_and(|b| !b.value) {
                return Err(cx.invalid(
                    format!("{rfield}.match.case_sensitive"),
                    "case-insensitive matching is not supported",
                ));
            }
            if !m.query_parameters.is_empty()
                || m.grpc.is_some()
                || m.runtime_fraction.is_some()
                || !m.dynamic_metadata.is_empty()
                || m.tls_context.is_some()
            {
                return Err(cx.invalid(
                    format!("{rfield}.match"),
                    "query_parameters, grpc, runtime_fraction, dynamic_metadata and tls_context matches are not supported",
                ));
            }
            for (hi, h) in m.headers.iter().enumerate() {
                rm.headers.push(
                    header_matcher(h)
                        .map_err(|msg| cx.invalid(format!("{rfield}.match.headers[{hi}]"), msg))?,
                );
            }
            let action = match &r.action {
                Some(route::Action::Route(a)) => a,
                _ => {
                    return Err(cx.invalid(
                        rfield.clone(),
                        "redirect and direct_response actions are not supported",
                    ));
                }
            };
            let mut ra = RouteAction {
                cluster: String::new(),
                weighted_clusters: Vec::new(),
                timeout: action
                    .timeout
                    .as_ref()
                    .map_or(Duration::from_secs(15), |d| duration(d.seconds, d.nanos)),
            };
            match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                    ra.cluster = c.clone()
                }
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    for (ci, c) in w.clusters.iter().enumerate() {
                        per_filter_configs(
                            &c.typed_per_filter_config,
                            &format!("{rfield}.route.weighted_clusters.clusters[{ci}]"),
                            cx,
                        )?;
                    }
                    ra.weighted_clusters = w
                        .clusters
                        .iter()
                        .map(|c| WeightedCluster {
                            name: c.name.clone(),
                            weight: c.weight.as_ref().map_or(0, |w| w.value),
                        })
                        .collect();
                }
                _ => {
                    return Err(cx.invalid(
                        format!("{rfield}.route"),
                        "a cluster or weighted_clusters is required (cluster_header is not supported)",
                    ));
                }
            }
            if action.prefix_rewrite.len() + action.regex_rewrite.as_ref().map_or(0, |_| 1) > 0
                || action.host_rewrite_specifier.is_some()
                || action.path_rewrite_policy.is_some()
            {
                return Err(cx.invalid(format!("{rfield}.route"), "rewrites are not supported"));
            }
            if action.retry_policy.is_some() {
                retries += 1;
            }
            let route = config::Route {
                name: r.name.clone(),
                match_: rm,
                route: ra,
            };
            config::check_route(&route).map_err(|(f, m)| cx.invalid(format!("{rfield}.{f}"), m))?;
            routes.push(route);
        }
        virtual_hosts.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.clone(),
            routes,
        });
    }
    if retries > 0 {
        cx.note(format!("retry_policy on {retries} route(s) not applied"));
    }
    Ok(RouteConfiguration {
        name: rc.name.clone(),
        virtual_hosts,
    })
}

fn header_matcher(h: &PbHeaderMatcher) -> Result<HeaderMatcher, String> {
    let mut out = HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        exact_match: None,
        prefix_match: None,
        present_match: None,
        invert_match: h.invert_match,
    };
    #[expect(
        deprecated,
        reason = "Envoy's older header match fields are still sent by istiod"
    )]
    match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(v)) => out.exact_match = Some(v.clone()),
        Some(HeaderMatchSpecifier::PrefixMatch(v)) => out.prefix_match = Some(v.clone()),
        Some(HeaderMatchSpecifier::PresentMatch(v)) => out.present_match = Some(*v),
        Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(p),
            ignore_case: false,
        })) => {
            match p {
                string_matcher::MatchPattern::Exact(v) => out.exact_match = Some(v.clone()),
                string_matcher::MatchPattern::Prefix(v) => out.prefix_match = Some(v.clone()),
                _ => return Err(
                    "suffix, contains, regex and case-insensitive header matches are not supported"
                        .into(),
                ),
            }
        }
        None => out.present_match = Some(true),
        _ => {
            return Err(
                "range, regex, suffix and contains header matches are not supported".into(),
            );
        }
    }
    Ok(out)
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

// === clusters and endpoints ===

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
        Some(cluster::ClusterDiscoveryType::Type(0)) | None => {
            out.endpoints = match &c.load_assignment {
                Some(la) => load_assignment_in(la, "load_assignment", &mut cx)?,
                None => Vec::new(),
            };
        }
        Some(cluster::ClusterDiscoveryType::Type(1 | 2)) => {
            // Resolved once, when the cluster arrives.
            let la = c
                .load_assignment
                .as_ref()
                .ok_or_else(|| cx.invalid("load_assignment", "required for DNS clusters"))?;
            out.endpoints = dns_endpoints(la, &mut cx)?;
            cx.note("DNS names resolved once, when the cluster arrived");
        }
        Some(cluster::ClusterDiscoveryType::Type(3)) => {
            let eds = c.eds_cluster_config.as_ref();
            if let Some(src) = eds.and_then(|e| e.eds_config.as_ref()) {
                ads_source(src).map_err(|m| cx.invalid("eds_cluster_config.eds_config", m))?;
            }
            let service = eds
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty());
            out.eds = Some(service.unwrap_or_else(|| c.name.clone()));
        }
        Some(cluster::ClusterDiscoveryType::Type(4)) => {
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
        && let Ok(json) = codec::any_to_json(opts)
        && let Some(explicit) = json.get("explicit_http_config")
    {
        out.protocol = if explicit.get("http2_protocol_options").is_some() {
            config::UpstreamProtocol::Http2
        } else {
            config::UpstreamProtocol::Http1
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

fn san_exact(m: &StringMatcher) -> Result<SpiffeId, String> {
    match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(v)) if !m.ignore_case => {
            SpiffeId::parse(v).map_err(|e| format!("{v:?} is not a SPIFFE ID: {e}"))
        }
        _ => Err(
            "non-exact SAN matchers are not supported (a prefix could admit any workload)".into(),
        ),
    }
}

/// An EDS resource: the healthy endpoints of priority 0, each repeated by its weight (bounded).
pub fn load_assignment(
    la: &ClusterLoadAssignment,
    notes: &mut Notes,
) -> Result<Vec<SocketAddr>, Invalid> {
    let mut cx = Ctx {
        resource: &format!("endpoints {}", la.cluster_name),
        notes,
    };
    if la.cluster_name.is_empty() {
        return Err(cx.invalid("cluster_name", "required"));
    }
    load_assignment_in(la, "", &mut cx)
}

fn load_assignment_in(
    la: &ClusterLoadAssignment,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<Vec<SocketAddr>, Invalid> {
    let sep = if field.is_empty() { "" } else { "." };
    let mut out = Vec::new();
    let mut skipped = 0usize;
    let mut weighted = false;
    for (li, loc) in la.endpoints.iter().enumerate() {
        if loc.priority != 0 {
            skipped += loc.lb_endpoints.len();
            continue;
        }
        for (ei, e) in loc.lb_endpoints.iter().enumerate() {
            // HealthStatus: 0 UNKNOWN, 1 HEALTHY; anything else is not used.
            if e.health_status > 1 {
                skipped += 1;
                continue;
            }
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                skipped += 1;
                continue;
            };
            let addr = match socket_addr(ep.address.as_ref()) {
                Ok(a) => a,
                Err(m)
                    if ep.address.as_ref().is_some_and(|a| {
                        matches!(a.address, Some(address::Address::SocketAddress(_)))
                    }) =>
                {
                    return Err(cx.invalid(
                        format!("{field}{sep}endpoints[{li}].lb_endpoints[{ei}].endpoint.address"),
                        m,
                    ));
                }
                Err(_) => {
                    skipped += 1;
                    continue;
                }
            };
            let w = e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |w| w.value)
                .clamp(1, 128);
            weighted |= w > 1;
            for _ in 0..w {
                out.push(addr);
            }
        }
    }
    if skipped > 0 {
        cx.note(format!(
            "{skipped} endpoint(s) not used (unhealthy, priority > 0, or not a socket address)"
        ));
    }
    if weighted {
        cx.note("endpoint weights applied by repetition (up to 128)");
    }
    Ok(out)
}

fn dns_endpoints(la: &ClusterLoadAssignment, cx: &mut Ctx<'_>) -> Result<Vec<SocketAddr>, Invalid> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for loc in &la.endpoints {
        for e in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err(cx.invalid("load_assignment", "a port_value is required"));
            };
            let port = u16::try_from(port)
                .map_err(|_| cx.invalid("load_assignment", "port out of range"))?;
            match (sa.address.as_str(), port).to_socket_addrs() {
                Ok(addrs) => out.extend(addrs),
                Err(e) => cx.note(format!("{} does not resolve: {e}", sa.address)),
            }
        }
    }
    Ok(out)
}

// === the model back to Envoy's messages (for /config_dump) ===

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

fn typed_filter(f: &FilterConfig) -> Option<Any> {
    f.typed_config
        .clone()
        .and_then(|v| codec::json_to_any(v).ok())
}

fn sds(name: &str) -> xds::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig {
    xds::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    }
}

fn route_configuration_pb(rc: &RouteConfiguration) -> PbRouteConfiguration {
    use xds::pb::envoy::config::route::v3 as r;
    PbRouteConfiguration {
        name: rc.name.clone(),
        virtual_hosts: rc
            .virtual_hosts
            .iter()
            .map(|vh| r::VirtualHost {
                name: vh.name.clone(),
                domains: vh.domains.clone(),
                routes: vh
                    .routes
                    .iter()
                    .map(|rt| {
                        let m = &rt.match_;
                        let path_specifier = if let Some(p) = &m.prefix {
                            route_match::PathSpecifier::Prefix(p.clone())
                        } else if let Some(p) = &m.path {
                            route_match::PathSpecifier::Path(p.clone())
                        } else if let Some(p) = &m.safe_regex {
                            route_match::PathSpecifier::SafeRegex(
                                xds::pb::envoy::r#type::matcher::v3::RegexMatcher {
                                    regex: p.clone(),
                                    ..Default::default()
                                },
                            )
                        } else {
                            route_match::PathSpecifier::PathSeparatedPrefix(
                                m.path_separated_prefix.clone().unwrap_or_default(),
                            )
                        };
                        let cluster_specifier = if rt.route.cluster.is_empty() {
                            route_action::ClusterSpecifier::WeightedClusters(r::WeightedCluster {
                                clusters: rt
                                    .route
                                    .weighted_clusters
                                    .iter()
                                    .map(|w| r::weighted_cluster::ClusterWeight {
                                        name: w.name.clone(),
                                        weight: Some(xds::pb::google::protobuf::UInt32Value {
                                            value: w.weight,
                                        }),
                                        ..Default::default()
                                    })
                                    .collect(),
                                ..Default::default()
                            })
                        } else {
                            route_action::ClusterSpecifier::Cluster(rt.route.cluster.clone())
                        };
                        #[expect(deprecated, reason = "the forms istiod writes")]
                        let headers = m
                            .headers
                            .iter()
                            .map(|h| PbHeaderMatcher {
                                name: h.name.clone(),
                                invert_match: h.invert_match,
                                header_match_specifier: if let Some(v) = &h.exact_match {
                                    Some(HeaderMatchSpecifier::ExactMatch(v.clone()))
                                } else if let Some(v) = &h.prefix_match {
                                    Some(HeaderMatchSpecifier::PrefixMatch(v.clone()))
                                } else {
                                    Some(HeaderMatchSpecifier::PresentMatch(
                                        h.present_match.unwrap_or(true),
                                    ))
                                },
                                ..Default::default()
                            })
                            .collect();
                        r::Route {
                            name: rt.name.clone(),
                            r#match: Some(r::RouteMatch {
                                path_specifier: Some(path_specifier),
                                headers,
                                ..Default::default()
                            }),
                            action: Some(route::Action::Route(r::RouteAction {
                                cluster_specifier: Some(cluster_specifier),
                                timeout: Some(duration_pb(rt.route.timeout)),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

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
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(0)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn listener_json(v: serde_json::Value) -> Listener {
        let mut v = v;
        v["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
        codec::unpack(&codec::json_to_any(v).unwrap()).unwrap()
    }

    fn hcm_filter(extra_filters: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": "in",
                "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}]}]},
                "http_filters": extra_filters,
            }
        })
    }

    #[test]
    fn per_route_overrides_are_judged_by_type_not_by_filter_name() {
        let rc = |per_filter: serde_json::Value, weighted: bool| {
            let action = if weighted {
                serde_json::json!({"weighted_clusters": {"clusters": [
                    {"name": "a", "weight": 1, "typed_per_filter_config": per_filter}]}})
            } else {
                serde_json::json!({"cluster": "a"})
            };
            let route = if weighted {
                serde_json::json!({"match": {"prefix": "/"}, "route": action})
            } else {
                serde_json::json!({"match": {"prefix": "/"}, "route": action,
                    "typed_per_filter_config": per_filter})
            };
            let v = serde_json::json!({
                "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                "name": "r",
                "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}],
            });
            let pb: PbRouteConfiguration = codec::unpack(&codec::json_to_any(v).unwrap()).unwrap();
            let mut notes = Notes::default();
            route_configuration(&pb, &mut notes).map(|_| notes)
        };
        let rbac_override = serde_json::json!({"my-authz": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"}});
        let disabled = serde_json::json!({"anything": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}});
        for weighted in [false, true] {
            for bad in [&rbac_override, &disabled] {
                let e = rc(bad.clone(), weighted).unwrap_err();
                assert!(e.to_string().contains("typed_per_filter_config"), "{e}");
            }
        }
        // An override of a filter this proxy does not run is skipped, with a note.
        let fault = serde_json::json!({"envoy.filters.http.fault": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}});
        let notes = rc(fault, false).unwrap();
        assert!(
            format!("{notes:?}").contains("HTTPFault override skipped"),
            "{notes:?}"
        );
    }

    #[test]
    fn unevaluable_chains_refuse_and_specific_chains_come_first() {
        let l = listener_json(serde_json::json!({
            "name": "virtualOutbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
            "traffic_direction": "OUTBOUND",
            "filter_chains": [
                {"filters": [hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER_TYPE}}]))]},
                {"filter_chain_match": {"source_prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}],
                    "destination_port": 8080},
                 "filters": [hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER_TYPE}}]))]},
            ],
        }));
        let mut notes = Vec::new();
        let out = listener(&l, &mut notes).unwrap().unwrap();
        assert_eq!(out.filter_chains.len(), 2);
        assert_eq!(
            out.filter_chains[0].filter_chain_match.destination_port,
            Some(8080)
        );
        assert!(
            out.filter_chains[0]
                .refuse
                .as_deref()
                .unwrap()
                .contains("source_prefix_ranges")
        );
        assert!(out.filter_chains[1].refuse.is_none());
    }

    #[test]
    fn capture_listeners_translate_for_hand_off() {
        let router = || {
            hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
                "typed_config": {"@type": ROUTER_TYPE}}]))
        };
        let virtual_outbound = listener_json(serde_json::json!({
            "name": "virtualOutbound",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
            "use_original_dst": true,
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{"filters": [router()]}],
        }));
        let out = listener(&virtual_outbound, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert!(out.use_original_dst && out.original_dst && out.bind_to_port);
        let target = listener_json(serde_json::json!({
            "name": "0.0.0.0_8080",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
            "bind_to_port": false,
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{"filters": [router()]}],
        }));
        let out = listener(&target, &mut Vec::new()).unwrap().unwrap();
        assert!(!out.bind_to_port && !out.use_original_dst);
        // And back, for /config_dump.
        let pb = listener_pb(&out);
        assert_eq!(pb.bind_to_port.map(|b| b.value), Some(false));
        let inbound = listener_json(serde_json::json!({
            "name": "virtualInbound",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
            "listener_filters": [{"name": "envoy.filters.listener.original_dst"}],
            "traffic_direction": "INBOUND",
            "filter_chains": [{"filters": [router()]}],
        }));
        let out = listener(&inbound, &mut Vec::new()).unwrap().unwrap();
        assert!(out.original_dst && !out.use_original_dst);
    }

    #[test]
    fn destination_prefix_ranges_translate_and_the_longest_prefix_comes_first() {
        let chain = |prefix: &str, len: u32, name: &str| {
            serde_json::json!({"name": name,
                "filter_chain_match": {"prefix_ranges": [{"address_prefix": prefix, "prefix_len": len}]},
                "filters": [hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER_TYPE}}]))]})
        };
        let l = listener_json(serde_json::json!({
            "name": "virtualOutbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
            "traffic_direction": "OUTBOUND",
            "filter_chains": [chain("10.0.0.0", 8, "wide"), chain("10.1.2.3", 32, "narrow"), chain("fd00::", 8, "v6")],
        }));
        let out = listener(&l, &mut Vec::new()).unwrap().unwrap();
        let names: Vec<&str> = out.filter_chains.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["narrow", "wide", "v6"]);
        assert!(out.filter_chains.iter().all(|c| c.refuse.is_none()));
        let narrow = &out.filter_chains[0].filter_chain_match.prefix_ranges[0];
        assert!(narrow.contains("10.1.2.3".parse().unwrap()));
        assert!(!narrow.contains("10.1.2.4".parse().unwrap()));
        assert!(narrow.contains("::ffff:10.1.2.3".parse().unwrap()));
        // A bad range is an error naming the field.
        let bad = listener_json(serde_json::json!({
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
            "filter_chains": [chain("10.0.0.0", 33, "bad")],
        }));
        let err = listener(&bad, &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("prefix_ranges[0]"), "{err}");
    }

    #[test]
    fn unsupported_required_filters_and_bad_rbac_are_rejected_naming_the_field() {
        let with = |filters: serde_json::Value| {
            listener_json(serde_json::json!({
                "name": "l",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                "filter_chains": [{"filters": [hcm_filter(filters)]}],
            }))
        };
        let ext_authz = with(serde_json::json!([
            {"name": "envoy.filters.http.ext_authz", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]));
        let e = listener(&ext_authz, &mut Vec::new()).unwrap_err();
        assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[0]");
        assert!(e.message.contains("not supported"));
        let bad_rbac = with(serde_json::json!([
            {"name": "envoy.filters.http.rbac", "typed_config": {"@type": policy::rbac::HTTP_RBAC_TYPE,
                "rules": {"action": "ALLOW", "policies": {"p": {"permissions": [{"any": true}],
                "principals": [{"direct_remote_ip": {"address_prefix": "not-an-ip", "prefix_len": 8}}]}}}}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]));
        let e = listener(&bad_rbac, &mut Vec::new()).unwrap_err();
        assert!(e.message.contains("RBAC does not compile"), "{e}");
        // Istio's observe-only filters are skipped and said so.
        let stats = with(serde_json::json!([
            {"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]));
        let mut notes = Vec::new();
        assert!(listener(&stats, &mut notes).unwrap().is_some());
        assert!(notes.iter().any(|n| n.contains("istio.stats skipped")));
    }

    #[test]
    fn upstream_identity_must_be_exact_spiffe_ids() {
        let cluster_with = |matcher: serde_json::Value| -> Cluster {
            codec::unpack(&codec::json_to_any(serde_json::json!({
                "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "name": "outbound|80||ledger.bank.svc.cluster.local",
                "type": "STATIC",
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": UPSTREAM_TLS_TYPE, "sni": "outbound_.80_._.ledger.bank.svc.cluster.local",
                    "common_tls_context": {"combined_validation_context": {
                        "default_validation_context": {"match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": matcher}]},
                        "validation_context_sds_secret_config": {"name": "ROOTCA"}}}}},
            })).unwrap()).unwrap()
        };
        let ok = cluster(
            &cluster_with(serde_json::json!({"exact": "spiffe://cluster.local/ns/bank/sa/ledger"})),
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(
            ok.transport_socket.unwrap().match_spiffe_ids[0].as_str(),
            "spiffe://cluster.local/ns/bank/sa/ledger"
        );
        assert_eq!(
            ok.metadata.service.as_deref(),
            Some("ledger.bank.svc.cluster.local")
        );
        assert_eq!(ok.metadata.namespace.as_deref(), Some("bank"));
        let prefix = cluster(
            &cluster_with(serde_json::json!({"prefix": "spiffe://cluster.local/"})),
            &mut Vec::new(),
        );
        assert!(
            prefix
                .unwrap_err()
                .message
                .contains("non-exact SAN matchers are not supported")
        );
    }
}
