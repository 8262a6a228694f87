//! istiod's generators: each attribute of a rule becomes an entry of an `andRules` / `andIds` list,
//! its values an `or`, its notValues a `not(or)`. Field order and value forms follow istiod's output
//! (see the conformance corpus).

use super::{AuthorizationPolicy, Condition, Policies, Rule, Target};
use crate::matcher::BadTemplate;
use crate::rbac::{
    Action, Authenticated, CidrRange, HeaderMatcher, ListMatcher, MetadataMatcher, OrMatcher,
    PathMatcher, PathSegment, Permission, PermissionSet, Policy, Principal, PrincipalSet,
    RegexMatcher, StringMatcher, TypedExtensionConfig, URI_TEMPLATE_TYPE, UriTemplateConfig,
    ValueMatcher,
};

/// Why a rule cannot be translated: an ALLOW rule then grants nothing, a DENY rule denies all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Untranslatable {
    #[error("empty header name in {0}")]
    EmptyHeaderName(String),
    #[error("unknown attribute {0:?}")]
    UnknownAttribute(String),
    #[error("bad key path {0:?}")]
    BadKeyPath(String),
    #[error("empty key in {0:?}")]
    EmptyKey(String),
    #[error("missing key in {0:?}")]
    NoKey(String),
    #[error("bad port {0:?}")]
    BadPort(String),
    #[error("{0} is not a permission")]
    NotAPermission(String),
    #[error("path template {value:?}: {why}")]
    PathTemplate { value: String, why: BadTemplate },
    #[error("bad prefix length in {0:?}")]
    BadPrefixLength(String),
    #[error("bad IP {0:?}")]
    BadIp(String),
    #[error("{0} is not a principal")]
    NotAPrincipal(String),
}

const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";

/// What an attribute is about, and how its values are generated.
#[derive(Debug, Clone)]
enum Key {
    // Permissions.
    Host,
    Method,
    Path,
    Port,
    DestIp,
    Sni,
    EnvoyFilter { filter: String, path: Vec<String> },
    // Principals.
    Principal,
    ServiceAccount,
    TrustDomain,
    RequestPrincipal,
    Namespace,
    RemoteIp,
    SourceIp,
    Header(String),
    Claim(Vec<String>),
}

impl Key {
    fn is_permission(&self) -> bool {
        matches!(
            self,
            Key::Host
                | Key::Method
                | Key::Path
                | Key::Port
                | Key::DestIp
                | Key::Sni
                | Key::EnvoyFilter { .. }
        )
    }

    fn http_only(&self) -> bool {
        matches!(
            self,
            Key::Host
                | Key::Method
                | Key::Path
                | Key::RequestPrincipal
                | Key::Header(_)
                | Key::Claim(_)
        )
    }

    fn from_condition(key: &str) -> Result<Self, Untranslatable> {
        Ok(match key {
            "destination.ip" => Key::DestIp,
            "destination.port" => Key::Port,
            "connection.sni" => Key::Sni,
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "source.namespace" => Key::Namespace,
            "source.principal" => Key::Principal,
            "request.auth.principal" => Key::RequestPrincipal,
            "request.auth.audiences" => Key::Claim(vec!["aud".into()]),
            "request.auth.presenter" => Key::Claim(vec!["azp".into()]),
            k if k.starts_with("request.headers[") && k.ends_with(']') => {
                let name = &k["request.headers[".len()..k.len() - 1];
                if name.is_empty() {
                    return Err(Untranslatable::EmptyHeaderName(k.to_owned()));
                }
                Key::Header(name.to_owned())
            }
            k if k.starts_with("request.auth.claims[") => {
                Key::Claim(brackets(&k["request.auth.claims".len()..])?)
            }
            k if k.starts_with("experimental.envoy.filters.") => {
                let open = k
                    .find('[')
                    .ok_or_else(|| Untranslatable::NoKey(k.to_owned()))?;
                Key::EnvoyFilter {
                    filter: k["experimental.".len()..open].to_owned(),
                    path: brackets(&k[open..])?,
                }
            }
            k => return Err(Untranslatable::UnknownAttribute(k.to_owned())),
        })
    }
}

/// `[a][b]` → `["a", "b"]`.
fn brackets(s: &str) -> Result<Vec<String>, Untranslatable> {
    let bad = || Untranslatable::BadKeyPath(s.to_owned());
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[').ok_or_else(bad)?;
        let end = inner.find(']').ok_or_else(bad)?;
        if end == 0 {
            return Err(Untranslatable::EmptyKey(s.to_owned()));
        }
        out.push(inner[..end].to_owned());
        rest = &inner[end + 1..];
    }
    if out.is_empty() {
        return Err(Untranslatable::NoKey(s.to_owned()));
    }
    Ok(out)
}

struct Entry {
    key: Key,
    values: Vec<String>,
    not_values: Vec<String>,
}

impl Entry {
    fn new(key: Key, values: &[String], not_values: &[String]) -> Option<Self> {
        (!values.is_empty() || !not_values.is_empty()).then(|| Self {
            key,
            values: values.to_vec(),
            not_values: not_values.to_vec(),
        })
    }
}

fn policy_name(p: &AuthorizationPolicy, i: usize) -> String {
    format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name)
}

/// Adds one policy per translatable rule of `p`.
pub(crate) fn policies(
    p: &AuthorizationPolicy,
    action: Action,
    t: &Target,
    tcp: bool,
    out: &mut Policies,
) {
    let rules = match &p.spec().rules {
        Some(r) if !r.is_empty() => r,
        // No rules: an ALLOW policy allows nothing; DENY and AUDIT policies match nothing.
        _ => {
            if p.is_allow() {
                out.insert(
                    policy_name(p, 0),
                    Policy {
                        permissions: vec![Permission::NotRule(Box::new(Permission::Any(true)))],
                        principals: vec![Principal::NotId(Box::new(Principal::Any(true)))],
                    },
                );
            }
            return;
        }
    };
    for (i, rule) in rules.iter().enumerate() {
        match rule_policy(p, rule, action, t, tcp) {
            Ok(Some(policy)) => {
                out.insert(policy_name(p, i), policy);
            }
            Ok(None) => {}
            // An untranslatable ALLOW rule grants nothing; an untranslatable DENY rule denies all.
            Err(_) if action == Action::Allow => {}
            Err(_) => {
                out.insert(policy_name(p, i), any_policy());
            }
        }
    }
}

fn any_policy() -> Policy {
    Policy {
        permissions: vec![Permission::AndRules(PermissionSet {
            rules: vec![Permission::Any(true)],
        })],
        principals: vec![Principal::AndIds(PrincipalSet {
            ids: vec![Principal::Any(true)],
        })],
    }
}

fn rule_policy(
    p: &AuthorizationPolicy,
    rule: &Rule,
    action: Action,
    t: &Target,
    tcp: bool,
) -> Result<Option<Policy>, Untranslatable> {
    let mut base_perm = Vec::new();
    let mut base_id = Vec::new();
    for Condition {
        key,
        values,
        not_values,
    } in &rule.when
    {
        let k = Key::from_condition(key)?;
        let target = if k.is_permission() {
            &mut base_perm
        } else {
            &mut base_id
        };
        target.extend(Entry::new(k, values, not_values));
    }
    let mut principal_sets: Vec<Vec<Entry>> = Vec::new();
    for from in &rule.from {
        let s = &from.source;
        let mut set: Vec<Entry> = [
            Entry::new(Key::Principal, &s.principals, &s.not_principals),
            Entry::new(
                Key::ServiceAccount,
                &s.service_accounts,
                &s.not_service_accounts,
            ),
            Entry::new(Key::TrustDomain, &s.trust_domains, &s.not_trust_domains),
            Entry::new(
                Key::RequestPrincipal,
                &s.request_principals,
                &s.not_request_principals,
            ),
            Entry::new(Key::Namespace, &s.namespaces, &s.not_namespaces),
            Entry::new(Key::RemoteIp, &s.remote_ip_blocks, &s.not_remote_ip_blocks),
            Entry::new(Key::SourceIp, &s.ip_blocks, &s.not_ip_blocks),
        ]
        .into_iter()
        .flatten()
        .collect();
        set.extend(base_id.iter().map(clone_entry));
        principal_sets.push(set);
    }
    if rule.from.is_empty() {
        principal_sets.push(base_id.iter().map(clone_entry).collect());
    }
    let mut permission_sets: Vec<Vec<Entry>> = Vec::new();
    for to in &rule.to {
        let o = &to.operation;
        let mut set: Vec<Entry> = [
            Entry::new(Key::Host, &o.hosts, &o.not_hosts),
            Entry::new(Key::Method, &o.methods, &o.not_methods),
            Entry::new(Key::Path, &o.paths, &o.not_paths),
            Entry::new(Key::Port, &o.ports, &o.not_ports),
        ]
        .into_iter()
        .flatten()
        .collect();
        set.extend(base_perm.iter().map(clone_entry));
        permission_sets.push(set);
    }
    if rule.to.is_empty() {
        permission_sets.push(base_perm.iter().map(clone_entry).collect());
    }
    if tcp {
        let has_http = principal_sets
            .iter()
            .chain(permission_sets.iter())
            .flatten()
            .any(|e| e.key.http_only());
        if has_http && action == Action::Allow {
            // An ALLOW rule that needs HTTP attributes cannot match a TCP connection.
            return Ok(None);
        }
        // DENY and AUDIT: the HTTP attributes are dropped, so the rule matches more, never less.
        for set in principal_sets.iter_mut().chain(permission_sets.iter_mut()) {
            set.retain(|e| !e.key.http_only());
        }
    }
    let permissions = permission_sets
        .iter()
        .map(|set| {
            let rules = set
                .iter()
                .map(entry_permissions)
                .collect::<Result<Vec<_>, _>>()?;
            let rules: Vec<Permission> = rules.into_iter().flatten().collect();
            Ok::<_, Untranslatable>(Permission::AndRules(PermissionSet {
                rules: if rules.is_empty() {
                    vec![Permission::Any(true)]
                } else {
                    rules
                },
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let principals = principal_sets
        .iter()
        .map(|set| {
            let ids = set
                .iter()
                .map(|e| entry_principals(e, p, t))
                .collect::<Result<Vec<_>, _>>()?;
            let ids: Vec<Principal> = ids.into_iter().flatten().collect();
            Ok::<_, Untranslatable>(Principal::AndIds(PrincipalSet {
                ids: if ids.is_empty() {
                    vec![Principal::Any(true)]
                } else {
                    ids
                },
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Policy {
        permissions,
        principals,
    }))
}

fn clone_entry(e: &Entry) -> Entry {
    Entry {
        key: e.key.clone(),
        values: e.values.clone(),
        not_values: e.not_values.clone(),
    }
}

// === permissions ===

fn entry_permissions(e: &Entry) -> Result<Vec<Permission>, Untranslatable> {
    let mut out = Vec::new();
    for (values, negate) in [(&e.values, false), (&e.not_values, true)] {
        if values.is_empty() {
            continue;
        }
        let item = match &e.key {
            Key::EnvoyFilter { filter, path } => Permission::Metadata(Box::new(MetadataMatcher {
                filter: filter.clone(),
                path: path
                    .iter()
                    .map(|k| PathSegment { key: k.clone() })
                    .collect(),
                value: one_or_many(
                    values
                        .iter()
                        .map(|v| ValueMatcher::StringMatch(wildcard(v, "", false)))
                        .collect(),
                ),
                invert: false,
            })),
            key => Permission::OrRules(PermissionSet {
                rules: values
                    .iter()
                    .map(|v| permission(key, v))
                    .collect::<Result<_, _>>()?,
            }),
        };
        out.push(if negate {
            Permission::NotRule(Box::new(item))
        } else {
            item
        });
    }
    Ok(out)
}

fn permission(key: &Key, v: &str) -> Result<Permission, Untranslatable> {
    Ok(match key {
        Key::Host => header_matcher(":authority", v, true),
        Key::Method => header_matcher(":method", v, false),
        Key::Path => path_permission(v)?,
        Key::Port => Permission::DestinationPort(
            v.parse::<u16>()
                .map_err(|_| Untranslatable::BadPort(v.to_owned()))?
                .into(),
        ),
        Key::DestIp => Permission::DestinationIp(cidr(v)?),
        Key::Sni => Permission::RequestedServerName(Box::new(wildcard(v, "", false))),
        other => return Err(Untranslatable::NotAPermission(format!("{other:?}"))),
    })
}

fn header_matcher(name: &str, v: &str, ignore_case: bool) -> Permission {
    Permission::Header(Box::new(header(name, v, ignore_case)))
}

fn header(name: &str, v: &str, ignore_case: bool) -> HeaderMatcher {
    if v == "*" {
        return HeaderMatcher {
            name: name.into(),
            present_match: Some(true),
            ..Default::default()
        };
    }
    let mut m = wildcard(v, "", false);
    m.ignore_case = ignore_case;
    HeaderMatcher {
        name: name.into(),
        string_match: Some(m),
        ..Default::default()
    }
}

/// A path value: Istio's `{*}` / `{**}` templates become Envoy URI templates, which must parse
/// (a rule with one that does not is untranslatable: a DENY rule then denies everything, an ALLOW
/// rule grants nothing); anything else is Istio's wildcard form.
fn path_permission(v: &str) -> Result<Permission, Untranslatable> {
    if v.contains('{') || v.contains('}') {
        let path_template = v.replace("{**}", "**").replace("{*}", "*");
        crate::matcher::UriTemplate::parse(&path_template).map_err(|why| {
            Untranslatable::PathTemplate {
                value: v.to_owned(),
                why,
            }
        })?;
        return Ok(Permission::UriTemplate(Box::new(TypedExtensionConfig {
            name: "uri-template".into(),
            typed_config: UriTemplateConfig {
                type_url: URI_TEMPLATE_TYPE.into(),
                path_template,
            },
        })));
    }
    Ok(Permission::UrlPath(Box::new(PathMatcher {
        path: wildcard(v, "", false),
    })))
}

/// Istio's value forms: `*` any non-empty, `x*` prefix, `*x` suffix, else exact; all after `prefix`.
fn wildcard(v: &str, prefix: &str, suffix_as_regex: bool) -> StringMatcher {
    if v == "*" {
        return regex(".+");
    }
    if let Some(rest) = v.strip_prefix('*') {
        if suffix_as_regex {
            return regex(&format!("{}.*{}", regex_escape(prefix), regex_escape(rest)));
        }
        return StringMatcher {
            suffix: Some(rest.into()),
            ..Default::default()
        };
    }
    if let Some(rest) = v.strip_suffix('*') {
        return StringMatcher {
            prefix: Some(format!("{prefix}{rest}")),
            ..Default::default()
        };
    }
    StringMatcher {
        exact: Some(format!("{prefix}{v}")),
        ..Default::default()
    }
}

fn regex(r: &str) -> StringMatcher {
    StringMatcher {
        safe_regex: Some(RegexMatcher {
            regex: r.into(),
            google_re2: None,
        }),
        ..Default::default()
    }
}

/// Escapes regex metacharacters the way istiod does (Go's `regexp.QuoteMeta`): both RE2, but
/// Rust's `regex::escape` escapes more characters, and the generated text must match istiod's.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn cidr(v: &str) -> Result<CidrRange, Untranslatable> {
    let bad_len = || Untranslatable::BadPrefixLength(v.to_owned());
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| bad_len())?)),
        None => (v, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| Untranslatable::BadIp(v.to_owned()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        return Err(bad_len());
    }
    Ok(CidrRange {
        address_prefix: addr.into(),
        prefix_len: len,
    })
}

fn one_or_many(mut ms: Vec<ValueMatcher>) -> ValueMatcher {
    if ms.len() == 1 {
        return ms.remove(0);
    }
    ValueMatcher::OrMatch(OrMatcher { value_matchers: ms })
}

// === principals ===

fn entry_principals(
    e: &Entry,
    p: &AuthorizationPolicy,
    t: &Target,
) -> Result<Vec<Principal>, Untranslatable> {
    let mut out = Vec::new();
    for (values, negate) in [(&e.values, false), (&e.not_values, true)] {
        if values.is_empty() {
            continue;
        }
        let item = match &e.key {
            Key::Claim(path) => claim(path, values),
            key => {
                let mut ids = Vec::new();
                let values: Vec<String> = match key {
                    Key::Principal if !t.trust_domain_aliases.is_empty() => with_aliases(values, t),
                    _ => values.clone(),
                };
                for v in &values {
                    ids.push(principal(key, v, p)?);
                }
                Principal::OrIds(PrincipalSet { ids })
            }
        };
        out.push(if negate {
            Principal::NotId(Box::new(item))
        } else {
            item
        });
    }
    Ok(out)
}

fn authenticated(m: StringMatcher) -> Principal {
    Principal::Authenticated(Box::new(Authenticated {
        principal_name: Some(m),
    }))
}

fn principal(key: &Key, v: &str, p: &AuthorizationPolicy) -> Result<Principal, Untranslatable> {
    Ok(match key {
        Key::Principal => authenticated(wildcard(v, "spiffe://", true)),
        Key::Namespace => authenticated(regex(&namespace_regex(v))),
        Key::ServiceAccount => {
            let (ns, sa) = v.split_once('/').unwrap_or((p.namespace(), v));
            authenticated(regex(&format!(
                "spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?",
                regex_escape(ns),
                regex_escape(sa)
            )))
        }
        Key::TrustDomain => authenticated(if v.contains('*') {
            regex(&format!(
                "spiffe://{}/.*",
                regex_escape(v).replace("\\*", "[^/]*")
            ))
        } else {
            StringMatcher {
                prefix: Some(format!("spiffe://{v}/")),
                ..Default::default()
            }
        }),
        Key::RequestPrincipal => request_principal(v),
        Key::RemoteIp => Principal::RemoteIp(cidr(v)?),
        Key::SourceIp => Principal::DirectRemoteIp(cidr(v)?),
        Key::Header(name) => Principal::Header(Box::new(header(name, v, false))),
        other => return Err(Untranslatable::NotAPrincipal(format!("{other:?}"))),
    })
}

fn namespace_regex(v: &str) -> String {
    if v == "*" {
        return ".*/ns/.*/.*".into();
    }
    let body = if let Some(rest) = v.strip_prefix('*') {
        format!(".*{}", regex_escape(rest))
    } else if let Some(rest) = v.strip_suffix('*') {
        format!("{}.*", regex_escape(rest))
    } else {
        regex_escape(v)
    };
    format!(".*/ns/{body}/.*")
}

fn jwt(claim: &str, m: StringMatcher) -> Principal {
    Principal::Metadata(Box::new(MetadataMatcher {
        filter: JWT_FILTER.into(),
        path: vec![
            PathSegment {
                key: "payload".into(),
            },
            PathSegment { key: claim.into() },
        ],
        value: ValueMatcher::StringMatch(m),
        invert: false,
    }))
}

/// `iss/sub` (split at the last '/'), with Istio's wildcards.
fn request_principal(v: &str) -> Principal {
    let any = || regex(".+");
    let (iss, sub) = if v == "*" {
        (any(), any())
    } else if let Some((iss, sub)) = v.rsplit_once('/') {
        let sub = if sub == "*" {
            any()
        } else {
            wildcard(sub, "", false)
        };
        (
            StringMatcher {
                exact: Some(iss.into()),
                ..Default::default()
            },
            sub,
        )
    } else if let Some(rest) = v.strip_suffix('*') {
        (
            StringMatcher {
                prefix: Some(rest.into()),
                ..Default::default()
            },
            any(),
        )
    } else if let Some(rest) = v.strip_prefix('*') {
        (
            any(),
            StringMatcher {
                suffix: Some(rest.into()),
                ..Default::default()
            },
        )
    } else {
        (
            StringMatcher {
                exact: Some(v.into()),
                ..Default::default()
            },
            StringMatcher {
                exact: Some(String::new()),
                ..Default::default()
            },
        )
    };
    Principal::AndIds(PrincipalSet {
        ids: vec![jwt("iss", iss), jwt("sub", sub)],
    })
}

/// JWT claims (`aud`, `azp`, `claims[a][b]`): a claim may be a string or a list of strings.
fn claim(path: &[String], values: &[String]) -> Principal {
    let matchers = || {
        one_or_many(
            values
                .iter()
                .map(|v| ValueMatcher::StringMatch(wildcard(v, "", false)))
                .collect(),
        )
    };
    let mut segments = vec![PathSegment {
        key: "payload".into(),
    }];
    segments.extend(path.iter().map(|k| PathSegment { key: k.clone() }));
    Principal::Metadata(Box::new(MetadataMatcher {
        filter: JWT_FILTER.into(),
        path: segments,
        value: ValueMatcher::OrMatch(OrMatcher {
            value_matchers: vec![
                ValueMatcher::ListMatch(ListMatcher {
                    one_of: Box::new(matchers()),
                }),
                matchers(),
            ],
        }),
        invert: false,
    }))
}

/// istiod's trust-domain alias expansion for principals `td/ns/x/sa/y`.
fn with_aliases(values: &[String], t: &Target) -> Vec<String> {
    let domains: Vec<&str> = std::iter::once(t.trust_domain.as_str())
        .chain(t.trust_domain_aliases.iter().map(String::as_str))
        .collect();
    let mut out = Vec::new();
    for v in values {
        let parts: Vec<&str> = v.split('/').collect();
        // "*/ns/x/sa/y" does not constrain the trust domain; "*" and odd shapes are kept as they are.
        if v == "*" || (parts.len() == 5 && parts[0] == "*") || !v.contains('/') {
            out.push(v.clone());
            continue;
        }
        let td = parts[0];
        let known = td == "cluster.local" || domains.iter().any(|d| pattern_matches(td, d));
        if !known {
            out.push(v.clone());
            continue;
        }
        let rest = &v[td.len()..];
        let mut expanded: Vec<String> = Vec::new();
        for d in &domains {
            let candidate = if td.contains('*') && pattern_matches(td, d) {
                v.clone()
            } else {
                format!("{d}{rest}")
            };
            if !expanded.contains(&candidate) {
                expanded.push(candidate);
            }
        }
        out.extend(expanded);
    }
    out
}

/// Whether the trust-domain pattern `pattern` (`*` at one end allowed) matches `td`.
fn pattern_matches(pattern: &str, td: &str) -> bool {
    if pattern == td || pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return td.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return td.starts_with(prefix);
    }
    false
}
