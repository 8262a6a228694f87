//! The RBAC model to and from Envoy's protobuf messages (`envoy-types`), without proto3 JSON: a
//! filter that arrives over xDS is read field by field from its prost message, and the control
//! plane writes its filters the same way, so neither side builds a protobuf descriptor pool.
//!
//! As with the JSON form, a field the model does not hold is an error, never dropped: every
//! message field, oneof case and enum value is matched explicitly below. Fields Envoy has
//! deprecated (`metadata`, `source_ip`, the header matcher's own match kinds) are still read:
//! Istio and users send them.
#![allow(deprecated)]

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher as PbHeaderMatcher, header_matcher::HeaderMatchSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::{http, network};
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3 as m;
use envoy_types::pb::envoy::r#type::v3::Int32Range as PbInt32Range;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::Message;

use super::{
    Action, Authenticated, CidrRange, FilterStateMatcher, HTTP_RBAC_TYPE, HeaderMatcher,
    Int32Range, ListMatcher, MetadataMatcher, NETWORK_RBAC_TYPE, OrMatcher, PathMatcher,
    PathSegment, Permission, PermissionSet, Policy, Principal, PrincipalSet, Rbac, RbacFilter,
    RegexMatcher, StringMatcher, TypedExtensionConfig, TypedFilterConfig, URI_TEMPLATE_TYPE,
    UriTemplateConfig, ValueMatcher,
};

/// An RBAC message this model cannot hold exactly, with the field that is the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Unsupported {
    pub field: String,
    pub reason: String,
}

fn unsupported(field: &str, reason: impl Into<String>) -> Unsupported {
    Unsupported {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn not_set(field: &str, set: bool) -> Result<(), Unsupported> {
    if set {
        Err(unsupported(field, "is not supported"))
    } else {
        Ok(())
    }
}

/// An HTTP or network RBAC filter's typed config, by its type URL.
pub fn from_any(any: &Any) -> Result<TypedFilterConfig, Unsupported> {
    let rbac = match any.type_url.as_str() {
        HTTP_RBAC_TYPE => from_http(&decode::<http::rbac::v3::Rbac>(any)?)?,
        NETWORK_RBAC_TYPE => from_network(&decode::<network::rbac::v3::Rbac>(any)?)?,
        other => {
            return Err(unsupported(
                "@type",
                format!("{other} is not an RBAC filter"),
            ));
        }
    };
    Ok(TypedFilterConfig {
        type_url: any.type_url.clone(),
        rbac,
    })
}

fn decode<M: Message + Default>(any: &Any) -> Result<M, Unsupported> {
    M::decode(any.value.as_slice()).map_err(|e| unsupported("@type", e.to_string()))
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC`.
pub fn from_http(f: &http::rbac::v3::Rbac) -> Result<RbacFilter, Unsupported> {
    not_set("matcher", f.matcher.is_some())?;
    not_set("shadow_matcher", f.shadow_matcher.is_some())?;
    not_set("track_per_rule_stats", f.track_per_rule_stats)?;
    Ok(RbacFilter {
        rules: f.rules.as_ref().map(|r| rbac(r, "rules")).transpose()?,
        shadow_rules: f
            .shadow_rules
            .as_ref()
            .map(|r| rbac(r, "shadow_rules"))
            .transpose()?,
        shadow_rules_stat_prefix: f.shadow_rules_stat_prefix.clone(),
        stat_prefix: String::new(),
        rules_stat_prefix: f.rules_stat_prefix.clone(),
    })
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
pub fn from_network(f: &network::rbac::v3::Rbac) -> Result<RbacFilter, Unsupported> {
    not_set("matcher", f.matcher.is_some())?;
    not_set("shadow_matcher", f.shadow_matcher.is_some())?;
    not_set("enforcement_type", f.enforcement_type != 0)?;
    not_set("delay_deny", f.delay_deny.is_some())?;
    Ok(RbacFilter {
        rules: f.rules.as_ref().map(|r| rbac(r, "rules")).transpose()?,
        shadow_rules: f
            .shadow_rules
            .as_ref()
            .map(|r| rbac(r, "shadow_rules"))
            .transpose()?,
        shadow_rules_stat_prefix: f.shadow_rules_stat_prefix.clone(),
        stat_prefix: f.stat_prefix.clone(),
        rules_stat_prefix: String::new(),
    })
}

fn rbac(r: &pb::Rbac, at: &str) -> Result<Rbac, Unsupported> {
    not_set(
        &format!("{at}.audit_logging_options"),
        r.audit_logging_options.is_some(),
    )?;
    let action = match pb::rbac::Action::try_from(r.action) {
        Ok(pb::rbac::Action::Allow) => Action::Allow,
        Ok(pb::rbac::Action::Deny) => Action::Deny,
        Ok(pb::rbac::Action::Log) => Action::Log,
        _ => {
            return Err(unsupported(
                &format!("{at}.action"),
                format!("action {} is not supported", r.action),
            ));
        }
    };
    let mut policies = std::collections::BTreeMap::new();
    for (name, p) in &r.policies {
        let at = format!("{at}.policies[{name}]");
        not_set(&format!("{at}.condition"), p.condition.is_some())?;
        not_set(
            &format!("{at}.checked_condition"),
            p.checked_condition.is_some(),
        )?;
        not_set(&format!("{at}.cel_config"), p.cel_config.is_some())?;
        let policy = Policy {
            permissions: indexed(&p.permissions, &format!("{at}.permissions"), permission)?,
            principals: indexed(&p.principals, &format!("{at}.principals"), principal)?,
        };
        policies.insert(name.clone(), policy);
    }
    Ok(Rbac { action, policies })
}

fn indexed<T, U>(
    items: &[T],
    at: &str,
    f: impl Fn(&T, &str) -> Result<U, Unsupported>,
) -> Result<Vec<U>, Unsupported> {
    items
        .iter()
        .enumerate()
        .map(|(i, x)| f(x, &format!("{at}[{i}]")))
        .collect()
}

fn permission(p: &pb::Permission, at: &str) -> Result<Permission, Unsupported> {
    use pb::permission::Rule;
    let Some(rule) = &p.rule else {
        return Err(unsupported(at, "a permission needs a rule"));
    };
    Ok(match rule {
        Rule::AndRules(s) => Permission::AndRules(PermissionSet {
            rules: indexed(&s.rules, &format!("{at}.and_rules.rules"), permission)?,
        }),
        Rule::OrRules(s) => Permission::OrRules(PermissionSet {
            rules: indexed(&s.rules, &format!("{at}.or_rules.rules"), permission)?,
        }),
        Rule::Any(b) => Permission::Any(*b),
        Rule::Header(h) => Permission::Header(Box::new(header(h, &format!("{at}.header"))?)),
        Rule::UrlPath(p) => Permission::UrlPath(Box::new(path(p, &format!("{at}.url_path"))?)),
        Rule::DestinationIp(c) => Permission::DestinationIp(cidr(c)),
        Rule::DestinationPort(p) => Permission::DestinationPort(*p),
        Rule::DestinationPortRange(r) => Permission::DestinationPortRange(Int32Range {
            start: i64::from(r.start),
            end: i64::from(r.end),
        }),
        Rule::Metadata(md) => {
            Permission::Metadata(Box::new(metadata(md, &format!("{at}.metadata"))?))
        }
        Rule::NotRule(p) => {
            Permission::NotRule(Box::new(permission(p, &format!("{at}.not_rule"))?))
        }
        Rule::RequestedServerName(s) => Permission::RequestedServerName(Box::new(string(
            s,
            &format!("{at}.requested_server_name"),
        )?)),
        Rule::UriTemplate(t) => {
            Permission::UriTemplate(Box::new(uri_template(t, &format!("{at}.uri_template"))?))
        }
        Rule::Matcher(_) => return Err(unsupported(&format!("{at}.matcher"), "is not supported")),
        Rule::SourcedMetadata(_) => {
            return Err(unsupported(
                &format!("{at}.sourced_metadata"),
                "is not supported",
            ));
        }
    })
}

fn principal(p: &pb::Principal, at: &str) -> Result<Principal, Unsupported> {
    use pb::principal::Identifier;
    let Some(id) = &p.identifier else {
        return Err(unsupported(at, "a principal needs an identifier"));
    };
    Ok(match id {
        Identifier::AndIds(s) => Principal::AndIds(PrincipalSet {
            ids: indexed(&s.ids, &format!("{at}.and_ids.ids"), principal)?,
        }),
        Identifier::OrIds(s) => Principal::OrIds(PrincipalSet {
            ids: indexed(&s.ids, &format!("{at}.or_ids.ids"), principal)?,
        }),
        Identifier::Any(b) => Principal::Any(*b),
        Identifier::Authenticated(a) => Principal::Authenticated(Box::new(Authenticated {
            principal_name: a
                .principal_name
                .as_ref()
                .map(|s| string(s, &format!("{at}.authenticated.principal_name")))
                .transpose()?,
        })),
        Identifier::SourceIp(c) => Principal::SourceIp(cidr(c)),
        Identifier::DirectRemoteIp(c) => Principal::DirectRemoteIp(cidr(c)),
        Identifier::RemoteIp(c) => Principal::RemoteIp(cidr(c)),
        Identifier::Header(h) => Principal::Header(Box::new(header(h, &format!("{at}.header"))?)),
        Identifier::UrlPath(p) => Principal::UrlPath(Box::new(path(p, &format!("{at}.url_path"))?)),
        Identifier::Metadata(md) => {
            Principal::Metadata(Box::new(metadata(md, &format!("{at}.metadata"))?))
        }
        Identifier::FilterState(fs) => {
            let at = format!("{at}.filter_state");
            let string_match = match &fs.matcher {
                None => None,
                Some(m::filter_state_matcher::Matcher::StringMatch(s)) => {
                    Some(string(s, &format!("{at}.string_match"))?)
                }
                Some(m::filter_state_matcher::Matcher::AddressMatch(_)) => {
                    return Err(unsupported(
                        &format!("{at}.address_match"),
                        "is not supported",
                    ));
                }
            };
            Principal::FilterState(Box::new(FilterStateMatcher {
                key: fs.key.clone(),
                string_match,
            }))
        }
        Identifier::NotId(p) => Principal::NotId(Box::new(principal(p, &format!("{at}.not_id"))?)),
        Identifier::SourcedMetadata(_) => {
            return Err(unsupported(
                &format!("{at}.sourced_metadata"),
                "is not supported",
            ));
        }
        Identifier::Custom(_) => {
            return Err(unsupported(&format!("{at}.custom"), "is not supported"));
        }
    })
}

fn cidr(c: &core::CidrRange) -> CidrRange {
    CidrRange {
        address_prefix: c.address_prefix.clone(),
        prefix_len: c.prefix_len.as_ref().map_or(0, |v| v.value),
    }
}

fn header(h: &PbHeaderMatcher, at: &str) -> Result<HeaderMatcher, Unsupported> {
    let mut out = HeaderMatcher {
        name: h.name.clone(),
        invert_match: h.invert_match,
        treat_missing_header_as_empty: h.treat_missing_header_as_empty,
        ..Default::default()
    };
    match &h.header_match_specifier {
        None => {}
        Some(HeaderMatchSpecifier::ExactMatch(s)) => out.exact_match = Some(s.clone()),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => out.prefix_match = Some(s.clone()),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => out.suffix_match = Some(s.clone()),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => out.contains_match = Some(s.clone()),
        Some(HeaderMatchSpecifier::PresentMatch(b)) => out.present_match = Some(*b),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
            out.safe_regex_match = Some(regex(r));
        }
        Some(HeaderMatchSpecifier::StringMatch(s)) => {
            out.string_match = Some(string(s, &format!("{at}.string_match"))?);
        }
        Some(HeaderMatchSpecifier::RangeMatch(_)) => {
            return Err(unsupported(
                &format!("{at}.range_match"),
                "is not supported",
            ));
        }
    }
    Ok(out)
}

fn path(p: &m::PathMatcher, at: &str) -> Result<PathMatcher, Unsupported> {
    match &p.rule {
        Some(m::path_matcher::Rule::Path(s)) => Ok(PathMatcher {
            path: string(s, &format!("{at}.path"))?,
        }),
        None => Err(unsupported(at, "a path matcher needs a path")),
    }
}

fn string(s: &m::StringMatcher, at: &str) -> Result<StringMatcher, Unsupported> {
    use m::string_matcher::MatchPattern;
    let mut out = StringMatcher {
        ignore_case: s.ignore_case,
        ..Default::default()
    };
    match &s.match_pattern {
        None => {}
        Some(MatchPattern::Exact(v)) => out.exact = Some(v.clone()),
        Some(MatchPattern::Prefix(v)) => out.prefix = Some(v.clone()),
        Some(MatchPattern::Suffix(v)) => out.suffix = Some(v.clone()),
        Some(MatchPattern::Contains(v)) => out.contains = Some(v.clone()),
        Some(MatchPattern::SafeRegex(r)) => out.safe_regex = Some(regex(r)),
        Some(MatchPattern::Custom(_)) => {
            return Err(unsupported(&format!("{at}.custom"), "is not supported"));
        }
    }
    Ok(out)
}

fn regex(r: &m::RegexMatcher) -> RegexMatcher {
    RegexMatcher {
        regex: r.regex.clone(),
        google_re2: r.engine_type.as_ref().map(
            |m::regex_matcher::EngineType::GoogleRe2(g)| match &g.max_program_size {
                Some(size) => serde_json::json!({ "max_program_size": size.value }),
                None => serde_json::json!({}),
            },
        ),
    }
}

fn metadata(md: &m::MetadataMatcher, at: &str) -> Result<MetadataMatcher, Unsupported> {
    let path = md
        .path
        .iter()
        .enumerate()
        .map(|(i, s)| match &s.segment {
            Some(m::metadata_matcher::path_segment::Segment::Key(k)) => {
                Ok(PathSegment { key: k.clone() })
            }
            None => Err(unsupported(
                &format!("{at}.path[{i}]"),
                "a segment needs a key",
            )),
        })
        .collect::<Result<_, _>>()?;
    let Some(value) = &md.value else {
        return Err(unsupported(
            &format!("{at}.value"),
            "a metadata matcher needs a value",
        ));
    };
    Ok(MetadataMatcher {
        filter: md.filter.clone(),
        path,
        value: value_matcher(value, &format!("{at}.value"))?,
        invert: md.invert,
    })
}

fn value_matcher(v: &m::ValueMatcher, at: &str) -> Result<ValueMatcher, Unsupported> {
    use m::value_matcher::MatchPattern;
    Ok(match &v.match_pattern {
        Some(MatchPattern::StringMatch(s)) => {
            ValueMatcher::StringMatch(string(s, &format!("{at}.string_match"))?)
        }
        Some(MatchPattern::PresentMatch(b)) => ValueMatcher::PresentMatch(*b),
        Some(MatchPattern::BoolMatch(b)) => ValueMatcher::BoolMatch(*b),
        Some(MatchPattern::ListMatch(l)) => {
            let at = format!("{at}.list_match");
            match &l.match_pattern {
                Some(m::list_matcher::MatchPattern::OneOf(one)) => {
                    ValueMatcher::ListMatch(ListMatcher {
                        one_of: Box::new(value_matcher(one, &format!("{at}.one_of"))?),
                    })
                }
                None => return Err(unsupported(&at, "a list matcher needs one_of")),
            }
        }
        Some(MatchPattern::OrMatch(o)) => ValueMatcher::OrMatch(OrMatcher {
            value_matchers: indexed(
                &o.value_matchers,
                &format!("{at}.or_match.value_matchers"),
                value_matcher,
            )?,
        }),
        Some(MatchPattern::NullMatch(_)) => {
            return Err(unsupported(&format!("{at}.null_match"), "is not supported"));
        }
        Some(MatchPattern::DoubleMatch(_)) => {
            return Err(unsupported(
                &format!("{at}.double_match"),
                "is not supported",
            ));
        }
        None => return Err(unsupported(at, "a value matcher needs a match")),
    })
}

fn uri_template(
    t: &core::TypedExtensionConfig,
    at: &str,
) -> Result<TypedExtensionConfig, Unsupported> {
    let Some(any) = &t.typed_config else {
        return Err(unsupported(&format!("{at}.typed_config"), "is required"));
    };
    if any.type_url != URI_TEMPLATE_TYPE {
        return Err(unsupported(
            &format!("{at}.typed_config"),
            format!("{} is not a URI template", any.type_url),
        ));
    }
    let config = UriTemplateMatchConfig::decode(any.value.as_slice())
        .map_err(|e| unsupported(&format!("{at}.typed_config"), e.to_string()))?;
    Ok(TypedExtensionConfig {
        name: t.name.clone(),
        typed_config: UriTemplateConfig {
            type_url: any.type_url.clone(),
            path_template: config.path_template,
        },
    })
}

// === the model to Envoy's messages (the control plane, /config_dump) ===

/// A filter's typed config as the `Any` Envoy receives.
pub fn to_any(f: &TypedFilterConfig) -> Result<Any, Unsupported> {
    let r = &f.rbac;
    let rules = r.rules.as_ref().map(|x| to_rbac(x, "rules")).transpose()?;
    let shadow_rules = r
        .shadow_rules
        .as_ref()
        .map(|x| to_rbac(x, "shadow_rules"))
        .transpose()?;
    let value = match f.type_url.as_str() {
        HTTP_RBAC_TYPE => {
            not_set("stat_prefix", !r.stat_prefix.is_empty())?;
            http::rbac::v3::Rbac {
                rules,
                shadow_rules,
                shadow_rules_stat_prefix: r.shadow_rules_stat_prefix.clone(),
                rules_stat_prefix: r.rules_stat_prefix.clone(),
                ..Default::default()
            }
            .encode_to_vec()
        }
        NETWORK_RBAC_TYPE => {
            not_set("rules_stat_prefix", !r.rules_stat_prefix.is_empty())?;
            network::rbac::v3::Rbac {
                rules,
                shadow_rules,
                shadow_rules_stat_prefix: r.shadow_rules_stat_prefix.clone(),
                stat_prefix: r.stat_prefix.clone(),
                ..Default::default()
            }
            .encode_to_vec()
        }
        other => {
            return Err(unsupported(
                "@type",
                format!("{other} is not an RBAC filter"),
            ));
        }
    };
    Ok(Any {
        type_url: f.type_url.clone(),
        value,
    })
}

fn to_rbac(r: &Rbac, at: &str) -> Result<pb::Rbac, Unsupported> {
    let action = match r.action {
        Action::Allow => pb::rbac::Action::Allow,
        Action::Deny => pb::rbac::Action::Deny,
        Action::Log => pb::rbac::Action::Log,
    };
    let mut policies = HashMap::with_capacity(r.policies.len());
    for (name, p) in &r.policies {
        let at = format!("{at}.policies[{name}]");
        policies.insert(
            name.clone(),
            pb::Policy {
                permissions: p
                    .permissions
                    .iter()
                    .map(|x| to_permission(x, &at))
                    .collect::<Result<_, _>>()?,
                principals: p
                    .principals
                    .iter()
                    .map(|x| to_principal(x, &at))
                    .collect::<Result<_, _>>()?,
                ..Default::default()
            },
        );
    }
    Ok(pb::Rbac {
        action: action as i32,
        policies,
        audit_logging_options: None,
    })
}

fn to_permission(p: &Permission, at: &str) -> Result<pb::Permission, Unsupported> {
    use pb::permission::{Rule, Set};
    let set = |s: &PermissionSet| -> Result<Set, Unsupported> {
        Ok(Set {
            rules: s
                .rules
                .iter()
                .map(|x| to_permission(x, at))
                .collect::<Result<_, _>>()?,
        })
    };
    let rule = match p {
        Permission::AndRules(s) => Rule::AndRules(set(s)?),
        Permission::OrRules(s) => Rule::OrRules(set(s)?),
        Permission::Any(b) => Rule::Any(*b),
        Permission::Header(h) => Rule::Header(to_header(h, at)?),
        Permission::UrlPath(p) => Rule::UrlPath(to_path(p, at)?),
        Permission::DestinationIp(c) => Rule::DestinationIp(to_cidr(c)),
        Permission::DestinationPort(p) => Rule::DestinationPort(*p),
        Permission::DestinationPortRange(r) => Rule::DestinationPortRange(PbInt32Range {
            start: i32::try_from(r.start)
                .map_err(|_| unsupported(at, "destination_port_range.start is out of range"))?,
            end: i32::try_from(r.end)
                .map_err(|_| unsupported(at, "destination_port_range.end is out of range"))?,
        }),
        Permission::Metadata(md) => Rule::Metadata(to_metadata(md, at)?),
        Permission::NotRule(p) => Rule::NotRule(Box::new(to_permission(p, at)?)),
        Permission::RequestedServerName(s) => Rule::RequestedServerName(to_string(s, at)?),
        Permission::UriTemplate(t) => {
            if t.typed_config.type_url != URI_TEMPLATE_TYPE {
                return Err(unsupported(
                    at,
                    format!("{} is not a URI template", t.typed_config.type_url),
                ));
            }
            Rule::UriTemplate(core::TypedExtensionConfig {
                name: t.name.clone(),
                typed_config: Some(Any {
                    type_url: URI_TEMPLATE_TYPE.into(),
                    value: UriTemplateMatchConfig {
                        path_template: t.typed_config.path_template.clone(),
                    }
                    .encode_to_vec(),
                }),
            })
        }
    };
    Ok(pb::Permission { rule: Some(rule) })
}

fn to_principal(p: &Principal, at: &str) -> Result<pb::Principal, Unsupported> {
    use pb::principal::{Identifier, Set};
    let set = |s: &PrincipalSet| -> Result<Set, Unsupported> {
        Ok(Set {
            ids: s
                .ids
                .iter()
                .map(|x| to_principal(x, at))
                .collect::<Result<_, _>>()?,
        })
    };
    let id = match p {
        Principal::AndIds(s) => Identifier::AndIds(set(s)?),
        Principal::OrIds(s) => Identifier::OrIds(set(s)?),
        Principal::Any(b) => Identifier::Any(*b),
        Principal::Authenticated(a) => Identifier::Authenticated(pb::principal::Authenticated {
            principal_name: a
                .principal_name
                .as_ref()
                .map(|s| to_string(s, at))
                .transpose()?,
        }),
        Principal::SourceIp(c) => Identifier::SourceIp(to_cidr(c)),
        Principal::DirectRemoteIp(c) => Identifier::DirectRemoteIp(to_cidr(c)),
        Principal::RemoteIp(c) => Identifier::RemoteIp(to_cidr(c)),
        Principal::Header(h) => Identifier::Header(to_header(h, at)?),
        Principal::UrlPath(p) => Identifier::UrlPath(to_path(p, at)?),
        Principal::Metadata(md) => Identifier::Metadata(to_metadata(md, at)?),
        Principal::FilterState(fs) => Identifier::FilterState(m::FilterStateMatcher {
            key: fs.key.clone(),
            matcher: fs
                .string_match
                .as_ref()
                .map(|s| to_string(s, at).map(m::filter_state_matcher::Matcher::StringMatch))
                .transpose()?,
        }),
        Principal::NotId(p) => Identifier::NotId(Box::new(to_principal(p, at)?)),
    };
    Ok(pb::Principal {
        identifier: Some(id),
    })
}

fn to_cidr(c: &CidrRange) -> core::CidrRange {
    core::CidrRange {
        address_prefix: c.address_prefix.clone(),
        prefix_len: Some(UInt32Value {
            value: c.prefix_len,
        }),
    }
}

/// At most one of a oneof's cases, which the model keeps as separate fields (as the JSON form
/// does): two set is refused, as the compiler refuses it, rather than one chosen.
fn one_case<T>(cases: Vec<Option<T>>, at: &str) -> Result<Option<T>, Unsupported> {
    let mut set = cases.into_iter().flatten();
    let first = set.next();
    if set.next().is_some() {
        return Err(unsupported(at, "a matcher with more than one match kind"));
    }
    Ok(first)
}

fn to_header(h: &HeaderMatcher, at: &str) -> Result<PbHeaderMatcher, Unsupported> {
    use HeaderMatchSpecifier as S;
    let spec = one_case(
        vec![
            h.exact_match.clone().map(S::ExactMatch),
            h.safe_regex_match
                .as_ref()
                .map(|r| S::SafeRegexMatch(to_regex(r))),
            h.present_match.map(S::PresentMatch),
            h.prefix_match.clone().map(S::PrefixMatch),
            h.suffix_match.clone().map(S::SuffixMatch),
            h.contains_match.clone().map(S::ContainsMatch),
            h.string_match
                .as_ref()
                .map(|s| to_string(s, at))
                .transpose()?
                .map(S::StringMatch),
        ],
        at,
    )?;
    Ok(PbHeaderMatcher {
        name: h.name.clone(),
        invert_match: h.invert_match,
        treat_missing_header_as_empty: h.treat_missing_header_as_empty,
        header_match_specifier: spec,
    })
}

fn to_path(p: &PathMatcher, at: &str) -> Result<m::PathMatcher, Unsupported> {
    Ok(m::PathMatcher {
        rule: Some(m::path_matcher::Rule::Path(to_string(&p.path, at)?)),
    })
}

fn to_string(s: &StringMatcher, at: &str) -> Result<m::StringMatcher, Unsupported> {
    use m::string_matcher::MatchPattern as P;
    let pattern = one_case(
        vec![
            s.exact.clone().map(P::Exact),
            s.prefix.clone().map(P::Prefix),
            s.suffix.clone().map(P::Suffix),
            s.safe_regex.as_ref().map(|r| P::SafeRegex(to_regex(r))),
            s.contains.clone().map(P::Contains),
        ],
        at,
    )?;
    Ok(m::StringMatcher {
        ignore_case: s.ignore_case,
        match_pattern: pattern,
    })
}

fn to_regex(r: &RegexMatcher) -> m::RegexMatcher {
    m::RegexMatcher {
        regex: r.regex.clone(),
        engine_type: r.google_re2.as_ref().map(|v| {
            let size = v
                .get("max_program_size")
                .or_else(|| v.get("maxProgramSize"))
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok());
            m::regex_matcher::EngineType::GoogleRe2(m::regex_matcher::GoogleRe2 {
                max_program_size: size.map(|value| UInt32Value { value }),
            })
        }),
    }
}

fn to_metadata(md: &MetadataMatcher, at: &str) -> Result<m::MetadataMatcher, Unsupported> {
    Ok(m::MetadataMatcher {
        filter: md.filter.clone(),
        path: md
            .path
            .iter()
            .map(|s| m::metadata_matcher::PathSegment {
                segment: Some(m::metadata_matcher::path_segment::Segment::Key(
                    s.key.clone(),
                )),
            })
            .collect(),
        value: Some(to_value_matcher(&md.value, at)?),
        invert: md.invert,
    })
}

fn to_value_matcher(v: &ValueMatcher, at: &str) -> Result<m::ValueMatcher, Unsupported> {
    use m::value_matcher::MatchPattern;
    let pattern = match v {
        ValueMatcher::StringMatch(s) => MatchPattern::StringMatch(to_string(s, at)?),
        ValueMatcher::PresentMatch(b) => MatchPattern::PresentMatch(*b),
        ValueMatcher::BoolMatch(b) => MatchPattern::BoolMatch(*b),
        ValueMatcher::ListMatch(l) => MatchPattern::ListMatch(Box::new(m::ListMatcher {
            match_pattern: Some(m::list_matcher::MatchPattern::OneOf(Box::new(
                to_value_matcher(&l.one_of, at)?,
            ))),
        })),
        ValueMatcher::OrMatch(o) => MatchPattern::OrMatch(m::OrMatcher {
            value_matchers: o
                .value_matchers
                .iter()
                .map(|x| to_value_matcher(x, at))
                .collect::<Result<_, _>>()?,
        }),
    };
    Ok(m::ValueMatcher {
        match_pattern: Some(pattern),
    })
}
