//! Envoy's RBAC configuration as typed values, in proto3 JSON form (the field names of
//! `envoy.config.rbac.v3`, `envoy.extensions.filters.{http,network}.rbac.v3`, `envoy.type.matcher.v3`).
//!
//! Unknown fields are errors: a security-relevant field this model does not know must never be
//! silently dropped. `oneof`s are enums (one key per object). Values compare as messages: an
//! absent field equals its default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "envoy")]
pub mod envoy;

/// `envoy.extensions.filters.http.rbac.v3.RBAC` (HTTP) and
/// `envoy.extensions.filters.network.rbac.v3.RBAC` (network) share these fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbacFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Rbac>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_rules: Option<Rbac>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shadow_rules_stat_prefix: String,
    /// Network filter only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stat_prefix: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rules_stat_prefix: String,
}

/// `envoy.config.rbac.v3.RBAC`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rbac {
    #[serde(default, skip_serializing_if = "Action::is_allow")]
    pub action: Action,
    /// Proto3 JSON omits an empty map.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, Policy>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Log,
}

impl Action {
    fn is_allow(&self) -> bool {
        *self == Action::Allow
    }
}

/// `envoy.config.rbac.v3.Policy`: matches when any permission and any principal match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub permissions: Vec<Permission>,
    #[serde(default)]
    pub principals: Vec<Principal>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PermissionSet {
    #[serde(default)]
    pub rules: Vec<Permission>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrincipalSet {
    #[serde(default)]
    pub ids: Vec<Principal>,
}

/// `envoy.config.rbac.v3.Permission` (what is being accessed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Permission {
    AndRules(PermissionSet),
    OrRules(PermissionSet),
    Any(bool),
    // The larger matchers are boxed: a rule is mostly small variants (the sets, ports), and an
    // unboxed matcher would size every one of them at ~340 bytes, kept for each policy.
    Header(Box<HeaderMatcher>),
    UrlPath(Box<PathMatcher>),
    DestinationIp(CidrRange),
    DestinationPort(u32),
    DestinationPortRange(Int32Range),
    Metadata(Box<MetadataMatcher>),
    NotRule(Box<Permission>),
    RequestedServerName(Box<StringMatcher>),
    UriTemplate(Box<TypedExtensionConfig>),
}

/// `envoy.config.rbac.v3.Principal` (who is asking).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Principal {
    AndIds(PrincipalSet),
    OrIds(PrincipalSet),
    Any(bool),
    // Boxed as in `Permission`.
    Authenticated(Box<Authenticated>),
    SourceIp(CidrRange),
    DirectRemoteIp(CidrRange),
    RemoteIp(CidrRange),
    Header(Box<HeaderMatcher>),
    UrlPath(Box<PathMatcher>),
    Metadata(Box<MetadataMatcher>),
    /// Istio writes the peer's principal as filter state `io.istio.peer_principal`.
    FilterState(Box<FilterStateMatcher>),
    NotId(Box<Principal>),
}

/// `envoy.type.matcher.v3.FilterStateMatcher` (its string form).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterStateMatcher {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_match: Option<StringMatcher>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authenticated {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_name: Option<StringMatcher>,
}

/// `envoy.config.core.v3.CidrRange`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRange {
    pub address_prefix: String,
    #[serde(default)]
    pub prefix_len: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Int32Range {
    #[serde(default)]
    pub start: i64,
    #[serde(default)]
    pub end: i64,
}

/// `envoy.config.route.v3.HeaderMatcher` (the forms Istio and users write).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatcher {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_match: Option<StringMatcher>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_match: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix_match: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains_match: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_regex_match: Option<RegexMatcher>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present_match: Option<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert_match: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub treat_missing_header_as_empty: bool,
}

/// `envoy.type.matcher.v3.PathMatcher`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatcher {
    pub path: StringMatcher,
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatcher {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_regex: Option<RegexMatcher>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_case: bool,
}

/// `envoy.type.matcher.v3.RegexMatcher` (RE2 syntax).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexMatcher {
    pub regex: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub google_re2: Option<serde_json::Value>,
}

/// `envoy.type.matcher.v3.MetadataMatcher`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetadataMatcher {
    pub filter: String,
    #[serde(default)]
    pub path: Vec<PathSegment>,
    pub value: ValueMatcher,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathSegment {
    pub key: String,
}

/// `envoy.type.matcher.v3.ValueMatcher` (the forms Istio emits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ValueMatcher {
    StringMatch(StringMatcher),
    PresentMatch(bool),
    BoolMatch(bool),
    ListMatch(ListMatcher),
    OrMatch(OrMatcher),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrMatcher {
    pub value_matchers: Vec<ValueMatcher>,
}

impl Default for ValueMatcher {
    fn default() -> Self {
        ValueMatcher::PresentMatch(true)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListMatcher {
    pub one_of: Box<ValueMatcher>,
}

/// `envoy.config.core.v3.TypedExtensionConfig` (Istio's `uriTemplate` permission).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TypedExtensionConfig {
    pub name: String,
    pub typed_config: UriTemplateConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UriTemplateConfig {
    #[serde(rename = "@type")]
    pub type_url: String,
    pub path_template: String,
}

/// An HTTP or network filter as it appears in a listener: `name` + `typedConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    pub name: String,
    pub typed_config: TypedFilterConfig,
}

/// The `typedConfig` of an RBAC filter, with its `@type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TypedFilterConfig {
    #[serde(rename = "@type")]
    pub type_url: String,
    #[serde(flatten)]
    pub rbac: RbacFilter,
}

pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
pub const NETWORK_RBAC_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
pub const URI_TEMPLATE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig";
