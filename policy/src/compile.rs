//! Envoy RBAC filters → the evaluation IR. Everything is checked here, once: a filter that does
//! not compile is refused whole, so evaluation never meets a half-understood rule.

use std::sync::Arc;

use crate::CompileError;
use crate::matcher::{Cidr, StringMatcher, UriTemplate};
use crate::rbac::{self, Action};

/// A chain of RBAC filters, in order, ready to evaluate.
#[derive(Debug, Clone, Default)]
pub struct Engine {
    pub(crate) filters: Vec<CompiledFilter>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledFilter {
    pub(crate) name: Arc<str>,
    pub(crate) rules: Option<Rules>,
    pub(crate) shadow: Option<Rules>,
}

#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub(crate) action: Action,
    pub(crate) policies: Vec<(Arc<str>, CompiledPolicy)>,
    /// Policies that can only match callers with one of a few exact SPIFFE IDs, by ID
    /// (indices into `policies`, ascending); the rest are in `unindexed`.
    /// Keys come from the policies; every decision looks the caller up, hence foldhash (seeded
    /// per map) rather than SipHash.
    pub(crate) by_principal: Index,
    /// Policies that can only match callers whose ID contains `/ns/<key>/`, by namespace.
    pub(crate) by_namespace: Index,
    pub(crate) unindexed: Vec<usize>,
}

pub(crate) type Index =
    std::collections::HashMap<Arc<str>, Vec<usize>, foldhash::fast::RandomState>;

/// What a policy requires of the caller's SPIFFE ID, for the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Requirement<'a> {
    Exact(&'a str),
    /// The ID contains `/ns/<namespace>/`.
    Namespace(&'a str),
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub(crate) permissions: Vec<Perm>,
    pub(crate) principals: Vec<Id>,
}

#[derive(Debug, Clone)]
pub(crate) struct HeaderM {
    pub(crate) name: String,
    pub(crate) kind: HeaderKind,
    pub(crate) invert: bool,
    pub(crate) missing_as_empty: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum HeaderKind {
    Str(StringMatcher),
    Present(bool),
}

#[derive(Debug, Clone)]
pub(crate) struct MetaM {
    pub(crate) filter: String,
    pub(crate) path: Vec<String>,
    pub(crate) value: ValueM,
    pub(crate) invert: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum ValueM {
    Str(StringMatcher),
    Present(bool),
    Bool(bool),
    ListOneOf(Box<ValueM>),
    Or(Vec<ValueM>),
}

#[derive(Debug, Clone)]
pub(crate) enum Perm {
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Any,
    Header(HeaderM),
    Path(StringMatcher),
    DestIp(Cidr),
    DestPort(u32),
    DestPortRange(i64, i64),
    Metadata(MetaM),
    Not(Box<Perm>),
    Sni(StringMatcher),
    Template(UriTemplate),
}

#[derive(Debug, Clone)]
pub(crate) enum Id {
    And(Vec<Id>),
    Or(Vec<Id>),
    Any,
    Authenticated(Option<StringMatcher>),
    DirectRemoteIp(Cidr),
    RemoteIp(Cidr),
    Header(HeaderM),
    Path(StringMatcher),
    Metadata(MetaM),
    Not(Box<Id>),
}

// === compile ===

impl Engine {
    /// Compiles RBAC filters (`envoy.filters.http.rbac` or `envoy.filters.network.rbac`), in order.
    pub fn compile(filters: &[rbac::Filter]) -> Result<Self, CompileError> {
        let mut out = Vec::with_capacity(filters.len());
        for (i, f) in filters.iter().enumerate() {
            let at = format!("filters[{i}]({})", f.name);
            let t = &f.typed_config.type_url;
            if t != rbac::HTTP_RBAC_TYPE && t != rbac::NETWORK_RBAC_TYPE {
                return Err(CompileError::Unsupported {
                    at,
                    what: format!("filter type {t}"),
                });
            }
            out.push(compile_filter(&f.name, &f.typed_config.rbac, &at)?);
        }
        Ok(Self { filters: out })
    }

    /// Compiles one RBAC filter config.
    pub fn compile_one(name: &str, config: &rbac::RbacFilter) -> Result<Self, CompileError> {
        Ok(Self {
            filters: vec![compile_filter(name, config, name)?],
        })
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Policies across all filters (enforced and shadow).
    pub fn policy_count(&self) -> usize {
        self.filters
            .iter()
            .flat_map(|f| f.rules.iter().chain(f.shadow.iter()))
            .map(|r| r.policies.len())
            .sum()
    }
}

fn compile_filter(
    name: &str,
    f: &rbac::RbacFilter,
    at: &str,
) -> Result<CompiledFilter, CompileError> {
    let rules = f
        .rules
        .as_ref()
        .map(|r| compile_rules(r, &format!("{at}.rules")))
        .transpose()?;
    let shadow = f
        .shadow_rules
        .as_ref()
        .map(|r| compile_rules(r, &format!("{at}.shadowRules")))
        .transpose()?;
    Ok(CompiledFilter {
        name: name.into(),
        rules,
        shadow,
    })
}

fn compile_rules(r: &rbac::Rbac, at: &str) -> Result<Rules, CompileError> {
    let mut policies = Vec::with_capacity(r.policies.len());
    // Envoy evaluates policies in name order (a map); so do we, for a deterministic "deciding policy".
    for (name, p) in &r.policies {
        let at = format!("{at}.policies[{name}]");
        if p.permissions.is_empty() || p.principals.is_empty() {
            return Err(CompileError::invalid(
                &at,
                "a policy needs at least one permission and one principal",
            ));
        }
        let permissions = p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| perm(x, &format!("{at}.permissions[{i}]")))
            .collect::<Result<_, _>>()?;
        let principals = p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| id(x, &format!("{at}.principals[{i}]")))
            .collect::<Result<_, _>>()?;
        policies.push((
            name.as_str().into(),
            CompiledPolicy {
                permissions,
                principals,
            },
        ));
    }
    let mut by_principal = Index::default();
    let mut by_namespace = Index::default();
    let mut unindexed = Vec::new();
    for (i, (_, p)) in policies.iter().enumerate() {
        match required_principals(&p.principals) {
            Some(reqs) => {
                for r in reqs {
                    let (map, key) = match r {
                        Requirement::Exact(id) => (&mut by_principal, id),
                        Requirement::Namespace(ns) => (&mut by_namespace, ns),
                    };
                    let slot = map.entry(key.into()).or_default();
                    if slot.last() != Some(&i) {
                        slot.push(i);
                    }
                }
            }
            None => unindexed.push(i),
        }
    }
    Ok(Rules {
        action: r.action,
        policies,
        by_principal,
        by_namespace,
        unindexed,
    })
}

/// The exact SPIFFE IDs a caller must have for any of `principals` (an OR) to match, or `None`
/// when that cannot be shown. Conservative: `None` only costs speed, never correctness.
fn required_principals(principals: &[Id]) -> Option<Vec<Requirement<'_>>> {
    let mut all = Vec::new();
    for p in principals {
        all.extend(required(p)?);
    }
    Some(all)
}

fn required(p: &Id) -> Option<Vec<Requirement<'_>>> {
    match p {
        Id::Authenticated(Some(m)) => m
            .exact_case_sensitive()
            .map(Requirement::Exact)
            .or_else(|| m.namespace_segment().map(Requirement::Namespace))
            .map(|r| vec![r]),
        // Every child must hold, so any child's requirement is the and's requirement.
        Id::And(xs) => xs.iter().filter_map(required).min_by_key(Vec::len),
        // Some child must hold, so the or needs the union, and only if every child has one.
        Id::Or(xs) => {
            let mut all = Vec::new();
            for x in xs {
                all.extend(required(x)?);
            }
            Some(all)
        }
        _ => None,
    }
}

fn perm(p: &rbac::Permission, at: &str) -> Result<Perm, CompileError> {
    use rbac::Permission as P;
    Ok(match p {
        P::AndRules(s) => Perm::And(list(&s.rules, at, "andRules", perm)?),
        P::OrRules(s) => Perm::Or(list(&s.rules, at, "orRules", perm)?),
        P::Any(true) => Perm::Any,
        P::Any(false) => return Err(CompileError::invalid(at, "any must be true")),
        P::Header(h) => Perm::Header(header(h, at)?),
        P::UrlPath(m) => Perm::Path(StringMatcher::compile(&m.path, at)?),
        P::DestinationIp(c) => Perm::DestIp(Cidr::compile(c, at)?),
        P::DestinationPort(port) if *port <= 65535 => Perm::DestPort(*port),
        P::DestinationPort(port) => {
            return Err(CompileError::invalid(at, &format!("port {port} > 65535")));
        }
        P::DestinationPortRange(r) => Perm::DestPortRange(r.start, r.end),
        P::Metadata(m) => Perm::Metadata(meta(m, at)?),
        P::NotRule(inner) => Perm::Not(Box::new(perm(inner, &format!("{at}.notRule"))?)),
        P::RequestedServerName(m) => Perm::Sni(StringMatcher::compile(m, at)?),
        P::UriTemplate(t) => Perm::Template(UriTemplate::compile(t, at)?),
    })
}

/// Istio's filter-state key for the authenticated peer principal.
const PEER_PRINCIPAL_KEY: &str = "io.istio.peer_principal";

fn id(p: &rbac::Principal, at: &str) -> Result<Id, CompileError> {
    use rbac::Principal as P;
    Ok(match p {
        P::AndIds(s) => Id::And(list(&s.ids, at, "andIds", id)?),
        P::OrIds(s) => Id::Or(list(&s.ids, at, "orIds", id)?),
        P::Any(true) => Id::Any,
        P::Any(false) => return Err(CompileError::invalid(at, "any must be true")),
        P::Authenticated(a) => Id::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| StringMatcher::compile(m, at))
                .transpose()?,
        ),
        // `source_ip` is the deprecated name of `direct_remote_ip`.
        P::SourceIp(c) | P::DirectRemoteIp(c) => Id::DirectRemoteIp(Cidr::compile(c, at)?),
        P::RemoteIp(c) => Id::RemoteIp(Cidr::compile(c, at)?),
        P::Header(h) => Id::Header(header(h, at)?),
        P::UrlPath(m) => Id::Path(StringMatcher::compile(&m.path, at)?),
        P::Metadata(m) => Id::Metadata(meta(m, at)?),
        // The only filter state this proxy keeps is the verified peer's SPIFFE ID.
        P::FilterState(f) => match (f.key.as_str(), &f.string_match) {
            (PEER_PRINCIPAL_KEY, Some(m)) => {
                Id::Authenticated(Some(StringMatcher::compile(m, at)?))
            }
            (key, _) => {
                return Err(CompileError::invalid(
                    at,
                    &format!(
                        "filterState {key:?} with a string match is not supported (only {PEER_PRINCIPAL_KEY:?})"
                    ),
                ));
            }
        },
        P::NotId(inner) => Id::Not(Box::new(id(inner, &format!("{at}.notId"))?)),
    })
}

fn list<T, U>(
    xs: &[T],
    at: &str,
    field: &str,
    f: impl Fn(&T, &str) -> Result<U, CompileError>,
) -> Result<Vec<U>, CompileError> {
    if xs.is_empty() {
        // Envoy requires at least one entry; an empty and/or has no agreed meaning: refuse it.
        return Err(CompileError::invalid(at, &format!("{field} is empty")));
    }
    xs.iter()
        .enumerate()
        .map(|(i, x)| f(x, &format!("{at}.{field}[{i}]")))
        .collect()
}

fn header(h: &rbac::HeaderMatcher, at: &str) -> Result<HeaderM, CompileError> {
    if h.name.is_empty() {
        return Err(CompileError::invalid(at, "header matcher without a name"));
    }
    let s = |exact: Option<&String>,
             prefix: Option<&String>,
             suffix: Option<&String>,
             contains: Option<&String>| rbac::StringMatcher {
        exact: exact.cloned(),
        prefix: prefix.cloned(),
        suffix: suffix.cloned(),
        contains: contains.cloned(),
        ..Default::default()
    };
    let mut kinds = Vec::new();
    if let Some(m) = &h.string_match {
        kinds.push(HeaderKind::Str(StringMatcher::compile(m, at)?));
    }
    if let Some(v) = &h.exact_match {
        kinds.push(HeaderKind::Str(StringMatcher::compile(
            &s(Some(v), None, None, None),
            at,
        )?));
    }
    if let Some(v) = &h.prefix_match {
        kinds.push(HeaderKind::Str(StringMatcher::compile(
            &s(None, Some(v), None, None),
            at,
        )?));
    }
    if let Some(v) = &h.suffix_match {
        kinds.push(HeaderKind::Str(StringMatcher::compile(
            &s(None, None, Some(v), None),
            at,
        )?));
    }
    if let Some(v) = &h.contains_match {
        kinds.push(HeaderKind::Str(StringMatcher::compile(
            &s(None, None, None, Some(v)),
            at,
        )?));
    }
    if let Some(r) = &h.safe_regex_match {
        let m = rbac::StringMatcher {
            safe_regex: Some(r.clone()),
            ..Default::default()
        };
        kinds.push(HeaderKind::Str(StringMatcher::compile(&m, at)?));
    }
    if let Some(p) = h.present_match {
        kinds.push(HeaderKind::Present(p));
    }
    let kind = match kinds.len() {
        0 => HeaderKind::Present(true),
        1 => kinds.remove(0),
        _ => {
            return Err(CompileError::invalid(
                at,
                "header matcher with more than one match kind",
            ));
        }
    };
    Ok(HeaderM {
        name: h.name.to_ascii_lowercase(),
        kind,
        invert: h.invert_match,
        missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn meta(m: &rbac::MetadataMatcher, at: &str) -> Result<MetaM, CompileError> {
    Ok(MetaM {
        filter: m.filter.clone(),
        path: m.path.iter().map(|p| p.key.clone()).collect(),
        value: value(&m.value, at)?,
        invert: m.invert,
    })
}

fn value(v: &rbac::ValueMatcher, at: &str) -> Result<ValueM, CompileError> {
    Ok(match v {
        rbac::ValueMatcher::StringMatch(s) => ValueM::Str(StringMatcher::compile(s, at)?),
        rbac::ValueMatcher::PresentMatch(p) => ValueM::Present(*p),
        rbac::ValueMatcher::BoolMatch(b) => ValueM::Bool(*b),
        rbac::ValueMatcher::ListMatch(l) => ValueM::ListOneOf(Box::new(value(&l.one_of, at)?)),
        rbac::ValueMatcher::OrMatch(o) => {
            ValueM::Or(list(&o.value_matchers, at, "orMatch", value)?)
        }
    })
}
