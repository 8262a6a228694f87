//! Compiled HTTP connection manager: virtual hosts chosen by authority (Envoy's precedence: exact,
//! then longest `*.suffix`, then longest `prefix.*`, then `*`), routes by path and headers.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ForwardClientCertDetails, HeaderMatcher, HttpConnectionManager, Route};
use crate::stats::{EnvoyStats, Stat};

/// One HTTP filter chain, ready to route.
pub struct HttpChain {
    /// The RBAC filters of this connection manager, compiled; `None` = no authorization filter.
    pub rbac: Option<policy::Engine>,
    pub forward_client_cert: ForwardClientCertDetails,
    /// The `Upgrade` types tunnelled (lowercase; never `h2c`).
    pub upgrade_types: Vec<String>,
    /// Requests with ambiguous paths are refused.
    pub reject_ambiguous_paths: bool,
    virtual_hosts: Vec<VirtualHostRt>,
    pub stats: HttpStats,
    /// This connection manager's own access logs (xDS `access_log`).
    pub access_logs: Arc<[crate::access_log::AccessLog]>,
    /// This connection manager's own tracer (xDS `tracing`), over the bootstrap's.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

pub struct HttpStats {
    pub rbac_allowed: Stat,
    pub rbac_denied: Stat,
    pub rbac_shadow_allowed: Stat,
    pub rbac_shadow_denied: Stat,
    pub downstream_rq_total: Stat,
    pub downstream_rq_2xx: Stat,
    pub downstream_rq_3xx: Stat,
    pub downstream_rq_4xx: Stat,
    pub downstream_rq_5xx: Stat,
}

struct VirtualHostRt {
    domains: Vec<String>,
    routes: Vec<RouteRt>,
}

struct RouteRt {
    route: Route,
    /// `%ROUTE_NAME%`: the route's name, or its virtual host's when it has none; shared with
    /// each request's log record.
    name: Arc<str>,
    regex: Option<regex::Regex>,
    /// Weighted picks so far (a deterministic spread by weight).
    picks: std::sync::atomic::AtomicU64,
}

impl RouteRt {
    fn new(route: &Route, virtual_host: &str) -> Result<Self, crate::config::ChainError> {
        let regex = route
            .match_
            .safe_regex
            .as_deref()
            .map(crate::config::compile_path_regex)
            .transpose()?;
        let name = if route.name.is_empty() {
            virtual_host
        } else {
            &route.name
        };
        Ok(Self {
            route: route.clone(),
            name: name.into(),
            regex,
            picks: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn path_matches(&self, path: &str) -> bool {
        let m = &self.route.match_;
        if let Some(p) = &m.prefix {
            path.starts_with(p.as_str())
        } else if let Some(exact) = &m.path {
            path == exact
        } else if let Some(re) = &self.regex {
            re.is_match(path)
        } else if let Some(p) = &m.path_separated_prefix {
            path.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        } else {
            false
        }
    }

    fn cluster(&self) -> &str {
        let a = &self.route.route;
        if !a.cluster.is_empty() {
            return &a.cluster;
        }
        let total: u64 = a
            .weighted_clusters
            .iter()
            .map(|w| u64::from(w.weight))
            .sum();
        if total == 0 {
            return "";
        }
        let mut n = self
            .picks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % total;
        for w in &a.weighted_clusters {
            let weight = u64::from(w.weight);
            if n < weight {
                return &w.name;
            }
            n -= weight;
        }
        ""
    }
}

/// The route a request takes.
pub struct Selected<'a> {
    pub route_name: &'a Arc<str>,
    pub cluster: &'a str,
    pub timeout: Duration,
}

impl HttpChain {
    /// Builds the chain; fails only if its RBAC filters do not compile (validated at load).
    pub fn new(
        hcm: &HttpConnectionManager,
        stats: &EnvoyStats,
        tracer: Option<Arc<crate::trace::Tracer>>,
    ) -> Result<Arc<Self>, crate::config::ChainError> {
        let s = |n: &str| stats.stat(&format!("http.{}.{n}", hcm.stat_prefix));
        let rbac = crate::config::compile_rbac(&hcm.http_filters)?;
        // A log that cannot be opened costs its records, not the chain's traffic.
        let access_logs = hcm
            .access_log
            .iter()
            .filter_map(|c| {
                crate::access_log::AccessLog::shared(c, stats.stat("access_log.dropped"))
                    .inspect_err(|e| {
                        tracing::warn!(path = %c.path.display(), error = %e, "access log not opened; its records are lost");
                    })
                    .ok()
            })
            .collect();
        Ok(Arc::new(Self {
            access_logs,
            tracer,
            rbac,
            forward_client_cert: hcm.forward_client_cert_details,
            upgrade_types: hcm
                .upgrade_configs
                .iter()
                .filter(|u| u.enabled && !u.upgrade_type.eq_ignore_ascii_case("h2c"))
                .map(|u| u.upgrade_type.to_ascii_lowercase())
                .collect(),
            reject_ambiguous_paths: hcm.reject_ambiguous_paths,
            virtual_hosts: hcm
                .route_config
                .virtual_hosts
                .iter()
                .map(|vh| {
                    Ok(VirtualHostRt {
                        domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                        routes: vh
                            .routes
                            .iter()
                            .map(|r| RouteRt::new(r, &vh.name))
                            .collect::<Result<_, crate::config::ChainError>>()?,
                    })
                })
                .collect::<Result<_, crate::config::ChainError>>()?,
            stats: HttpStats {
                rbac_allowed: s("rbac.allowed"),
                rbac_denied: s("rbac.denied"),
                rbac_shadow_allowed: s("rbac.shadow_allowed"),
                rbac_shadow_denied: s("rbac.shadow_denied"),
                downstream_rq_total: s("downstream_rq_total"),
                downstream_rq_2xx: s("downstream_rq_2xx"),
                downstream_rq_3xx: s("downstream_rq_3xx"),
                downstream_rq_4xx: s("downstream_rq_4xx"),
                downstream_rq_5xx: s("downstream_rq_5xx"),
            },
        }))
    }

    pub fn count_status(&self, status: u16) {
        self.stats.downstream_rq_total.inc();
        match status {
            200..=299 => self.stats.downstream_rq_2xx.inc(),
            300..=399 => self.stats.downstream_rq_3xx.inc(),
            400..=499 => self.stats.downstream_rq_4xx.inc(),
            500..=599 => self.stats.downstream_rq_5xx.inc(),
            _ => {}
        }
    }

    /// Picks the route for a request; `None` is "no route" (404 NR).
    pub fn select(
        &self,
        authority: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<Selected<'_>> {
        let vh = self.virtual_host(authority)?;
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let rt = vh.routes.iter().find(|r| {
            r.path_matches(path)
                && r.route
                    .match_
                    .headers
                    .iter()
                    .all(|h| header_matches(h, headers))
        })?;
        let route = &rt.route;
        Some(Selected {
            route_name: &rt.name,
            cluster: rt.cluster(),
            timeout: route.route.timeout,
        })
    }

    fn virtual_host(&self, authority: &str) -> Option<&VirtualHostRt> {
        // The request path hands in an authority already normalized (lowercase): no copy then.
        let host_port: std::borrow::Cow<'_, str> =
            if authority.bytes().any(|b| b.is_ascii_uppercase()) {
                authority.to_ascii_lowercase().into()
            } else {
                authority.into()
            };
        let host = strip_port(&host_port);
        let mut best: Option<(u8, usize, &VirtualHostRt)> = None;
        for vh in &self.virtual_hosts {
            for d in &vh.domains {
                let score = [&*host_port, host]
                    .iter()
                    .filter_map(|h| domain_score(d, h))
                    .max();
                if let Some((rank, len)) = score
                    && best.is_none_or(|(br, bl, _)| (rank, len) > (br, bl))
                {
                    best = Some((rank, len, vh));
                }
            }
        }
        best.map(|(_, _, vh)| vh)
    }
}

/// (rank, length) of a domain pattern matching `host`: exact 3, `*.suffix` 2, `prefix.*` 1, `*` 0.
fn domain_score(pattern: &str, host: &str) -> Option<(u8, usize)> {
    if pattern == "*" {
        return Some((0, 0));
    }
    if pattern == host {
        return Some((3, pattern.len()));
    }
    if let Some(suffix) = pattern.strip_prefix('*')
        && host.len() > suffix.len()
        && host.ends_with(suffix)
    {
        return Some((2, pattern.len()));
    }
    if let Some(prefix) = pattern.strip_suffix('*')
        && host.len() > prefix.len()
        && host.starts_with(prefix)
    {
        return Some((1, pattern.len()));
    }
    None
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| &authority[..=h.len()]);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn header_matches(m: &HeaderMatcher, headers: &http::HeaderMap) -> bool {
    let values: Vec<&[u8]> = headers
        .get_all(m.name.as_str())
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let joined = values.join(&b","[..]);
    let present = !values.is_empty();
    let result = if let Some(exact) = &m.exact_match {
        present && joined == exact.as_bytes()
    } else if let Some(prefix) = &m.prefix_match {
        present && joined.starts_with(prefix.as_bytes())
    } else if let Some(want) = m.present_match {
        present == want
    } else {
        present
    };
    result != m.invert_match
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteAction, RouteConfiguration, RouteMatch, VirtualHost};

    fn chain() -> Arc<HttpChain> {
        let route = |prefix: &str, cluster: &str| Route {
            name: String::new(),
            match_: RouteMatch {
                prefix: Some(prefix.into()),
                ..Default::default()
            },
            route: RouteAction {
                cluster: cluster.into(),
                weighted_clusters: vec![],
                timeout: Duration::from_secs(1),
            },
        };
        let vh = |name: &str, domains: &[&str], routes| VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes,
        };
        HttpChain::new(
            &HttpConnectionManager {
                stat_prefix: "t".into(),
                forward_client_cert_details: ForwardClientCertDetails::SanitizeSet,
                http_filters: vec![],
                upgrade_configs: vec![],
                reject_ambiguous_paths: false,
                access_log: vec![],
                tracing: None,
                rds: None,
                route_config: RouteConfiguration {
                    name: "r".into(),
                    virtual_hosts: vec![
                        vh("any", &["*"], vec![route("/", "default")]),
                        vh(
                            "ledger",
                            &["ledger", "ledger:80"],
                            vec![route("/api", "ledger-api"), route("/", "ledger")],
                        ),
                        vh("wild", &["*.svc.cluster.local"], vec![route("/", "wild")]),
                    ],
                },
            },
            &EnvoyStats::default(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn domain_precedence_and_paths() {
        let c = chain();
        let h = http::HeaderMap::new();
        let pick = |a: &str, p: &str| c.select(a, p, &h).map(|s| s.cluster.to_owned());
        assert_eq!(pick("ledger", "/api/x").as_deref(), Some("ledger-api"));
        assert_eq!(pick("LEDGER:80", "/other").as_deref(), Some("ledger"));
        assert_eq!(pick("ledger:8080", "/").as_deref(), Some("ledger"));
        assert_eq!(pick("a.svc.cluster.local", "/").as_deref(), Some("wild"));
        assert_eq!(pick("elsewhere", "/").as_deref(), Some("default"));
        assert_eq!(pick("ledger", "/api?x").as_deref(), Some("ledger-api"));
    }

    #[test]
    fn header_matcher_kinds() {
        let mut h = http::HeaderMap::new();
        h.insert("x-a", "hello".parse().unwrap());
        let m = |exact: Option<&str>, prefix: Option<&str>, present: Option<bool>, invert| {
            HeaderMatcher {
                name: "x-a".into(),
                exact_match: exact.map(Into::into),
                prefix_match: prefix.map(Into::into),
                present_match: present,
                invert_match: invert,
            }
        };
        assert!(header_matches(&m(Some("hello"), None, None, false), &h));
        assert!(!header_matches(&m(Some("hell"), None, None, false), &h));
        assert!(header_matches(&m(None, Some("he"), None, false), &h));
        assert!(header_matches(&m(None, None, Some(true), false), &h));
        assert!(header_matches(&m(Some("nope"), None, None, true), &h));
    }
}
