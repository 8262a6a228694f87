//! Evaluation: Envoy's RBAC semantics, filter by filter, plus one rule of our own for ambiguity.
//!
//! A request can be read more than one way: a header sent twice (`x-user: guest` and
//! `x-user: admin`; Envoy matches the comma-joined `guest,admin`), or a path with `;parameters`
//! that some servers ignore. DENY and LOG policies match **leniently** (if any reading matches),
//! ALLOW policies **strictly** (only if every reading matches); `not` flips the mode. So a DENY rule
//! cannot be sidestepped by an ambiguous request, and an ALLOW rule is never widened by one. Paths
//! have more readings still, those of lenient backends (`path::lenient_readings`: escapes decoded
//! again, case folded, trailing dots and spaces dropped, …): DENY matches them too, ALLOW reads the
//! normalized path only.

use std::net::IpAddr;
use std::sync::Arc;

use crate::compile::{CompiledPolicy, Engine, HeaderKind, HeaderM, Id, MetaM, Perm, Rules, ValueM};
use crate::rbac::Action;

/// What a request looks like to policy. Header names are lowercase and include the pseudo-headers
/// `:authority` (normalized), `:method`, `:path` (with query) and `:scheme`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    /// The verified peer SPIFFE ID; `None` for a connection without a client certificate.
    pub principal: Option<&'a str>,
    /// The normalized path (no query).
    pub path: &'a str,
    /// The same path with `;parameters` removed, when it differs.
    pub path_without_params: Option<&'a str>,
    /// Other readings of the path a lenient backend may apply (`path::lenient_readings`), which
    /// DENY rules also match. Filled by [`Engine::evaluate`] from `path`; what a caller sets here
    /// is replaced.
    pub lenient_paths: &'a [String],
    pub headers: &'a [(&'a str, &'a [u8])],
    pub direct_remote_ip: Option<IpAddr>,
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    /// Dynamic metadata by filter name (e.g. `envoy.filters.http.jwt_authn`), if any.
    pub metadata: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided: the matching DENY policy, or the ALLOW policy that let it through.
    /// `None` when allowed with no policy, or denied because no ALLOW policy matched.
    pub policy: Option<Arc<str>>,
    /// The filter that denied, if any.
    pub denied_by: Option<Arc<str>>,
    /// Shadow (dry-run) results: would the shadow rules have allowed it, and by which policy.
    pub shadow: Option<(bool, Option<Arc<str>>)>,
    /// A LOG (Istio AUDIT) policy matched.
    pub logged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Match if any reading of the request matches.
    Lenient,
    /// Match only if every reading matches.
    Strict,
}

impl Mode {
    fn flip(self) -> Self {
        match self {
            Mode::Lenient => Mode::Strict,
            Mode::Strict => Mode::Lenient,
        }
    }

    fn for_action(a: Action) -> Self {
        match a {
            Action::Allow => Mode::Strict,
            Action::Deny | Action::Log => Mode::Lenient,
        }
    }
}

impl Engine {
    /// Evaluates every filter in order; the first denial decides.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let readings = crate::path::lenient_readings(req.path);
        let req = &Request {
            lenient_paths: &readings,
            ..*req
        };
        let mut decision = Decision {
            allowed: true,
            policy: None,
            denied_by: None,
            shadow: None,
            logged: false,
        };
        for f in &self.filters {
            if let Some(shadow) = &f.shadow {
                let (allowed, policy, _) = outcome(shadow, req);
                // The first shadow verdict that would deny wins, as the enforced chain does.
                if decision.shadow.as_ref().is_none_or(|(a, _)| *a) {
                    decision.shadow = Some((allowed, policy));
                }
            }
            let Some(rules) = &f.rules else { continue };
            let (allowed, policy, logged) = outcome(rules, req);
            decision.logged |= logged;
            if rules.action == Action::Log {
                continue;
            }
            if !allowed {
                decision.allowed = false;
                decision.policy = policy;
                decision.denied_by = Some(f.name.clone());
                return decision;
            }
            if policy.is_some() {
                decision.policy = policy;
            }
        }
        decision
    }
}

/// (allowed, deciding policy, logged) for one rule set.
fn outcome(rules: &Rules, req: &Request<'_>) -> (bool, Option<Arc<str>>, bool) {
    let mode = Mode::for_action(rules.action);
    // Candidates in name order: the policies indexed under the caller's ID or under a namespace
    // `X` whose `/ns/X/` occurs anywhere in it, merged with those not indexed. A policy indexed
    // only under other keys cannot match this caller.
    let try_policy = |&i: &usize| {
        let (name, p) = &rules.policies[i];
        policy_matches(p, req, mode).then(|| name.clone())
    };
    let exact: &[usize] = req
        .principal
        .and_then(|p| rules.by_principal.get(p))
        .map_or(&[], Vec::as_slice);
    let namespaced: Vec<&[usize]> = match req.principal {
        Some(p) if !rules.by_namespace.is_empty() => namespace_segments(p)
            .filter_map(|ns| rules.by_namespace.get(ns).map(Vec::as_slice))
            .collect(),
        _ => Vec::new(),
    };
    let matched = if namespaced.is_empty() {
        // The common case, without allocating: a two-way merge of sorted index lists.
        let (mut a, mut b) = (exact.iter().peekable(), rules.unindexed.iter().peekable());
        std::iter::from_fn(|| match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => None,
        })
        .find_map(try_policy)
    } else {
        let mut all: Vec<usize> = [exact, &rules.unindexed]
            .into_iter()
            .chain(namespaced)
            .flatten()
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all.iter().find_map(try_policy)
    };
    match rules.action {
        Action::Allow => (matched.is_some(), matched, false),
        Action::Deny => (matched.is_none(), matched, false),
        Action::Log => (true, matched.clone(), matched.is_some()),
    }
}

/// Every `X` such that `/ns/X/` occurs in `id` (at any position: a namespace matcher is a
/// "contains", so an ID with several `/ns/` segments must be looked up under each).
fn namespace_segments(id: &str) -> impl Iterator<Item = &str> {
    id.match_indices("/ns/").filter_map(move |(i, _)| {
        let rest = &id[i + 4..];
        let end = rest.find('/')?;
        (end > 0).then(|| &rest[..end])
    })
}

/// The same outcome by scanning every policy: the reference the index is tested against.
#[cfg(test)]
pub(crate) fn outcome_by_scan(rules: &Rules, req: &Request<'_>) -> Option<Arc<str>> {
    let mode = Mode::for_action(rules.action);
    rules
        .policies
        .iter()
        .find(|(_, p)| policy_matches(p, req, mode))
        .map(|(n, _)| n.clone())
}

#[cfg(test)]
pub(crate) fn outcome_indexed(rules: &Rules, req: &Request<'_>) -> Option<Arc<str>> {
    outcome(rules, req).1
}

pub(crate) fn policy_matches(p: &CompiledPolicy, req: &Request<'_>, mode: Mode) -> bool {
    p.permissions.iter().any(|x| perm(x, req, mode))
        && p.principals.iter().any(|x| id(x, req, mode))
}

fn perm(p: &Perm, req: &Request<'_>, mode: Mode) -> bool {
    match p {
        Perm::And(xs) => xs.iter().all(|x| perm(x, req, mode)),
        Perm::Or(xs) => xs.iter().any(|x| perm(x, req, mode)),
        Perm::Any => true,
        Perm::Header(h) => header(h, req, mode),
        Perm::Path(m) => path_matches(req, mode, |p| m.matches(p.as_bytes())),
        Perm::DestIp(c) => req.destination_ip.is_some_and(|ip| c.contains(ip)),
        Perm::DestPort(port) => u32::from(req.destination_port) == *port,
        Perm::DestPortRange(start, end) => {
            (*start..*end).contains(&i64::from(req.destination_port))
        }
        Perm::Metadata(m) => metadata(m, req),
        Perm::Not(inner) => !perm(inner, req, mode.flip()),
        Perm::Sni(m) => req.sni.is_some_and(|s| m.matches(s.as_bytes())),
        Perm::Template(t) => path_matches(req, mode, |p| t.matches(p)),
    }
}

fn id(p: &Id, req: &Request<'_>, mode: Mode) -> bool {
    match p {
        Id::And(xs) => xs.iter().all(|x| id(x, req, mode)),
        Id::Or(xs) => xs.iter().any(|x| id(x, req, mode)),
        Id::Any => true,
        Id::Authenticated(m) => match (req.principal, m) {
            (Some(p), Some(m)) => m.matches(p.as_bytes()),
            (Some(_), None) => true,
            (None, _) => false,
        },
        Id::DirectRemoteIp(c) => req.direct_remote_ip.is_some_and(|ip| c.contains(ip)),
        Id::RemoteIp(c) => req
            .remote_ip
            .or(req.direct_remote_ip)
            .is_some_and(|ip| c.contains(ip)),
        Id::Header(h) => header(h, req, mode),
        Id::Path(m) => path_matches(req, mode, |p| m.matches(p.as_bytes())),
        Id::Metadata(m) => metadata(m, req),
        Id::Not(inner) => !id(inner, req, mode.flip()),
    }
}

fn path_matches(req: &Request<'_>, mode: Mode, f: impl Fn(&str) -> bool) -> bool {
    let main = f(req.path);
    match (req.path_without_params, mode) {
        (None, Mode::Lenient) => main || req.lenient_paths.iter().any(|p| f(p)),
        (None, Mode::Strict) => main,
        (Some(alt), Mode::Lenient) => main || f(alt) || req.lenient_paths.iter().any(|p| f(p)),
        (Some(alt), Mode::Strict) => main && f(alt),
    }
}

fn header(h: &HeaderM, req: &Request<'_>, mode: Mode) -> bool {
    // `invert_match` negates the matcher: evaluate the inner match in the opposite mode.
    let inner_mode = if h.invert { mode.flip() } else { mode };
    let values: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|(n, _)| *n == h.name)
        .map(|(_, v)| *v)
        .collect();
    let matched = match &h.kind {
        HeaderKind::Present(want) => values.is_empty() != *want,
        HeaderKind::Str(m) if values.is_empty() => h.missing_as_empty && m.matches(b""),
        // The authority is also read without its port: `admin.internal:8080` is admin.internal.
        HeaderKind::Str(m) if h.name == ":authority" => {
            let host = values.first().copied().unwrap_or_default();
            let readings = [host, strip_port(host)];
            match inner_mode {
                Mode::Lenient => readings.iter().any(|v| m.matches(v)),
                Mode::Strict => readings.iter().all(|v| m.matches(v)),
            }
        }
        HeaderKind::Str(m) if values.len() == 1 => match inner_mode {
            // `x-user: guest, admin` means the same as two `x-user` lines (RFC 9110 §5.3).
            Mode::Lenient => m.matches(values[0]) || comma_parts(values[0], m),
            Mode::Strict => m.matches(values[0]),
        },
        HeaderKind::Str(m) => {
            let joined = values.join(&b","[..]);
            match inner_mode {
                Mode::Lenient => {
                    m.matches(&joined) || values.iter().any(|v| m.matches(v) || comma_parts(v, m))
                }
                Mode::Strict => m.matches(&joined) && values.iter().all(|v| m.matches(v)),
            }
        }
    };
    matched != h.invert
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
fn strip_port(authority: &[u8]) -> &[u8] {
    match authority.iter().rposition(|b| *b == b':') {
        Some(i)
            if authority[i + 1..].iter().all(u8::is_ascii_digit)
                && !authority[i + 1..].is_empty() =>
        {
            let host = &authority[..i];
            // `[::1]` has colons inside brackets; only strip after the closing bracket.
            if host.first() == Some(&b'[') && host.last() != Some(&b']') {
                authority
            } else {
                host
            }
        }
        _ => authority,
    }
}

/// Whether a reading of a header value a lenient backend may apply matches: any comma-separated
/// element, or the value itself, with surrounding whitespace trimmed (`x-user:  admin ` is
/// `admin` to most servers).
fn comma_parts(value: &[u8], m: &crate::matcher::StringMatcher) -> bool {
    value
        .split(|b| *b == b',')
        .any(|part| m.matches(part.trim_ascii()))
}

fn metadata(m: &MetaM, req: &Request<'_>) -> bool {
    let found = req
        .metadata
        .and_then(|md| md.get(&m.filter))
        .and_then(|v| m.path.iter().try_fold(v, |v, k| v.get(k)));
    let matched = match found {
        None => matches!(m.value, ValueM::Present(false)),
        Some(v) => value(&m.value, v),
    };
    matched != m.invert
}

fn value(m: &ValueM, v: &serde_json::Value) -> bool {
    match m {
        ValueM::Str(s) => v.as_str().is_some_and(|x| s.matches(x.as_bytes())),
        ValueM::Present(p) => *p,
        ValueM::Bool(b) => v.as_bool() == Some(*b),
        ValueM::ListOneOf(inner) => v
            .as_array()
            .is_some_and(|xs| xs.iter().any(|x| value(inner, x))),
        ValueM::Or(ms) => ms.iter().any(|m| value(m, v)),
    }
}
