//! Route configurations (RDS, or inline in a connection manager), and the inverse.

use super::*;
use xds::pb::envoy::config::route::v3::route as rds_route;

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

pub(super) fn route_configuration_in(
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
                Some(rds_route::Action::Route(a)) => a,
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

fn header_matcher(h: &PbHeaderMatcher) -> Result<HeaderMatcher, FieldError> {
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
        })) => match p {
            string_matcher::MatchPattern::Exact(v) => out.exact_match = Some(v.clone()),
            string_matcher::MatchPattern::Prefix(v) => out.prefix_match = Some(v.clone()),
            _ => return Err(FieldError::UnsupportedStringMatch),
        },
        None => out.present_match = Some(true),
        _ => {
            return Err(FieldError::UnsupportedHeaderMatch);
        }
    }
    Ok(out)
}

// === the model back to Envoy's message ===

pub(super) fn route_configuration_pb(rc: &RouteConfiguration) -> PbRouteConfiguration {
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
                            action: Some(rds_route::Action::Route(r::RouteAction {
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
