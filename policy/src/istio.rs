//! Istio `security.istio.io/v1` (and `v1beta1`) AuthorizationPolicy → Envoy RBAC filters, as istiod
//! generates them for one workload: DENY / ALLOW / AUDIT(LOG) filters in istiod's order, dry-run
//! policies as shadow rules, trust-domain aliases, HTTP filters or (for TCP) network filters.
//!
//! CUSTOM (ext_authz) is reported as unsupported. A rule that cannot be translated is dropped from
//! an ALLOW policy (it grants nothing) but turns a DENY policy into "deny everything": an error in
//! a DENY rule must never widen access.

mod generate;
pub mod peer_authn;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::rbac::{self, Action, Filter, Policy, Rbac, RbacFilter, TypedFilterConfig};

/// The workload the policies are evaluated for, and the mesh settings that matter.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub root_namespace: String,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
}

/// Why translation failed or what it could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IstioError {
    #[error("document {index}: {message}")]
    Parse { index: usize, message: String },
    #[error("policy {namespace}/{name}: CUSTOM action (ext_authz) is not supported yet")]
    CustomUnsupported { namespace: String, name: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: serde_json::Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    action: Option<String>,
    /// CUSTOM's ext_authz provider; read so the field is not an error, not used (CUSTOM is refused).
    #[serde(default, rename = "provider")]
    _provider: Option<serde_json::Value>,
    /// `None` (no `rules` field) differs from `Some([])`: an ALLOW policy without rules allows nothing.
    #[serde(default)]
    pub(crate) rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Rule {
    #[serde(default)]
    pub(crate) from: Vec<From>,
    #[serde(default)]
    pub(crate) to: Vec<To>,
    #[serde(default)]
    pub(crate) when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct From {
    #[serde(default)]
    pub(crate) source: Source,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct To {
    #[serde(default)]
    pub(crate) operation: Operation,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Source {
    #[serde(default)]
    pub(crate) principals: Vec<String>,
    #[serde(default)]
    pub(crate) not_principals: Vec<String>,
    #[serde(default)]
    pub(crate) request_principals: Vec<String>,
    #[serde(default)]
    pub(crate) not_request_principals: Vec<String>,
    #[serde(default)]
    pub(crate) namespaces: Vec<String>,
    #[serde(default)]
    pub(crate) not_namespaces: Vec<String>,
    #[serde(default)]
    pub(crate) ip_blocks: Vec<String>,
    #[serde(default)]
    pub(crate) not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub(crate) remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub(crate) not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub(crate) service_accounts: Vec<String>,
    #[serde(default)]
    pub(crate) not_service_accounts: Vec<String>,
    #[serde(default)]
    pub(crate) trust_domains: Vec<String>,
    #[serde(default)]
    pub(crate) not_trust_domains: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Operation {
    #[serde(default)]
    pub(crate) hosts: Vec<String>,
    #[serde(default)]
    pub(crate) not_hosts: Vec<String>,
    #[serde(default)]
    pub(crate) ports: Vec<String>,
    #[serde(default)]
    pub(crate) not_ports: Vec<String>,
    #[serde(default)]
    pub(crate) methods: Vec<String>,
    #[serde(default)]
    pub(crate) not_methods: Vec<String>,
    #[serde(default)]
    pub(crate) paths: Vec<String>,
    #[serde(default)]
    pub(crate) not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Condition {
    pub(crate) key: String,
    #[serde(default)]
    pub(crate) values: Vec<String>,
    #[serde(default)]
    pub(crate) not_values: Vec<String>,
}

/// A parsed AuthorizationPolicy.
#[derive(Debug, Clone)]
pub struct AuthorizationPolicy {
    name: String,
    namespace: String,
    dry_run: bool,
    action: IstioAction,
    selector: Option<BTreeMap<String, String>>,
    spec: Spec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IstioAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

/// Parses every AuthorizationPolicy in a multi-document YAML text (other kinds are skipped).
pub fn parse(text: &str) -> Result<Vec<AuthorizationPolicy>, IstioError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(|e| IstioError::Parse {
            index,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let doc: Document = serde_json::from_value(value).map_err(|e| IstioError::Parse {
            index,
            message: e.to_string(),
        })?;
        if doc.kind != "AuthorizationPolicy" {
            continue;
        }
        if !doc.api_version.starts_with("security.istio.io/") {
            return Err(IstioError::Parse {
                index,
                message: format!("unsupported apiVersion {:?}", doc.api_version),
            });
        }
        let spec: Spec = serde_json::from_value(if doc.spec.is_null() {
            serde_json::json!({})
        } else {
            doc.spec
        })
        .map_err(|e| IstioError::Parse {
            index,
            message: format!("spec: {e}"),
        })?;
        let action = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => IstioAction::Allow,
            "DENY" => IstioAction::Deny,
            "AUDIT" => IstioAction::Audit,
            "CUSTOM" => IstioAction::Custom,
            other => {
                return Err(IstioError::Parse {
                    index,
                    message: format!("unknown action {other:?}"),
                });
            }
        };
        let dry_run = doc
            .metadata
            .annotations
            .get("istio.io/dry-run")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        out.push(AuthorizationPolicy {
            name: doc.metadata.name,
            namespace: doc.metadata.namespace,
            dry_run,
            action,
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            spec,
        });
    }
    Ok(out)
}

/// The Envoy RBAC filters istiod would give `target` for `policies`: HTTP filters, or network
/// filters with `tcp`.
pub fn translate(
    policies: &[AuthorizationPolicy],
    target: &Target,
    tcp: bool,
) -> Result<Vec<Filter>, IstioError> {
    let applicable: Vec<&AuthorizationPolicy> =
        policies.iter().filter(|p| applies(p, target)).collect();
    if let Some(p) = applicable.iter().find(|p| p.action == IstioAction::Custom) {
        return Err(IstioError::CustomUnsupported {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        });
    }
    let mut filters = Vec::new();
    for (istio_action, action) in [
        (IstioAction::Audit, Action::Log),
        (IstioAction::Deny, Action::Deny),
        (IstioAction::Allow, Action::Allow),
    ] {
        let group: Vec<&&AuthorizationPolicy> = applicable
            .iter()
            .filter(|p| p.action == istio_action)
            .collect();
        if group.is_empty() {
            continue;
        }
        let mut rules = Rbac {
            action,
            policies: BTreeMap::new(),
        };
        let mut shadow = Rbac {
            action,
            policies: BTreeMap::new(),
        };
        for p in &group {
            let into = if p.dry_run { &mut shadow } else { &mut rules };
            generate::policies(p, action, target, tcp, &mut into.policies);
        }
        let any_enforced = group.iter().any(|p| !p.dry_run);
        let any_shadow = group.iter().any(|p| p.dry_run);
        let config = RbacFilter {
            rules: any_enforced.then_some(rules),
            shadow_rules: any_shadow.then_some(shadow),
            shadow_rules_stat_prefix: if any_shadow && action == Action::Deny {
                "istio_dry_run_deny_".into()
            } else {
                "istio_dry_run_allow_".into()
            },
            stat_prefix: if tcp { "tcp.".into() } else { String::new() },
            rules_stat_prefix: String::new(),
        };
        let (name, type_url) = if tcp {
            (rbac::NETWORK_RBAC_FILTER, rbac::NETWORK_RBAC_TYPE)
        } else {
            (rbac::HTTP_RBAC_FILTER, rbac::HTTP_RBAC_TYPE)
        };
        filters.push(Filter {
            name: name.into(),
            typed_config: TypedFilterConfig {
                type_url: type_url.into(),
                rbac: config,
            },
        });
    }
    Ok(filters)
}

fn applies(p: &AuthorizationPolicy, t: &Target) -> bool {
    let ns_ok = p.namespace == t.namespace || p.namespace == t.root_namespace;
    let labels_ok = p
        .selector
        .as_ref()
        .is_none_or(|sel| sel.iter().all(|(k, v)| t.labels.get(k) == Some(v)));
    ns_ok && labels_ok
}

impl AuthorizationPolicy {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub(crate) fn is_allow(&self) -> bool {
        self.action == IstioAction::Allow
    }
    pub(crate) fn spec(&self) -> &Spec {
        &self.spec
    }
}

/// The policy map the generator fills.
pub(crate) type Policies = BTreeMap<String, Policy>;
