//! Istio PeerAuthentication → the effective mTLS mode of a workload, per port, with istiod's
//! precedence: workload (selector) > namespace > mesh (root namespace); UNSET inherits; the mesh
//! default is PERMISSIVE. At one level the first policy by name wins (istiod: the oldest).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{IstioError, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// The result: the workload's mode, and ports whose mode differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MtlsSettings {
    pub mode: MtlsMode,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u32, MtlsMode>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    #[serde(default = "unset")]
    mode: MtlsMode,
}

fn unset() -> MtlsMode {
    MtlsMode::Unset
}

/// A parsed PeerAuthentication.
#[derive(Debug, Clone)]
pub struct PeerAuthentication {
    name: String,
    namespace: String,
    spec: Spec,
}

impl PeerAuthentication {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// Every PeerAuthentication in a multi-document YAML text (other kinds are skipped).
pub fn parse(text: &str) -> Result<Vec<PeerAuthentication>, IstioError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_json::Value::deserialize(doc).map_err(|e| IstioError::Parse {
            index,
            message: e.to_string(),
        })?;
        if v["kind"] != "PeerAuthentication" {
            continue;
        }
        let spec: Spec = serde_json::from_value(if v["spec"].is_null() {
            serde_json::json!({})
        } else {
            v["spec"].clone()
        })
        .map_err(|e| IstioError::Parse {
            index,
            message: format!("spec: {e}"),
        })?;
        for port in spec.port_level_mtls.keys() {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(IstioError::Parse {
                    index,
                    message: format!("portLevelMtls: bad port {port:?}"),
                });
            }
        }
        out.push(PeerAuthentication {
            name: v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            namespace: v["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            spec,
        });
    }
    Ok(out)
}

/// The mTLS settings `target` gets from `policies`, with Istio's mesh default (PERMISSIVE) where
/// nothing sets a mode.
pub fn effective(policies: &[PeerAuthentication], target: &Target) -> MtlsSettings {
    effective_with_default(policies, target, MtlsMode::Permissive)
}

/// Like [`effective`], with `default` where no policy sets a mode (eastguard's control plane
/// defaults to STRICT: a sidecar does not take plaintext unless a policy says so).
pub fn effective_with_default(
    policies: &[PeerAuthentication],
    target: &Target,
    default: MtlsMode,
) -> MtlsSettings {
    let mut sorted: Vec<&PeerAuthentication> = policies.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let selected = |p: &&&PeerAuthentication| {
        p.spec.selector.as_ref().is_some_and(|s| {
            !s.match_labels.is_empty()
                && s.match_labels
                    .iter()
                    .all(|(k, v)| target.labels.get(k) == Some(v))
        })
    };
    let no_selector = |p: &&&PeerAuthentication| {
        p.spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty())
    };
    let mesh = sorted
        .iter()
        .find(|p| p.namespace == target.root_namespace && no_selector(p));
    let namespace = sorted
        .iter()
        .find(|p| p.namespace == target.namespace && no_selector(p));
    let workload = sorted
        .iter()
        .find(|p| p.namespace == target.namespace && selected(p));

    let mut mode = default;
    for level in [mesh, namespace, workload].into_iter().flatten() {
        if let Some(m) = level.spec.mtls.as_ref().map(|m| m.mode)
            && m != MtlsMode::Unset
        {
            mode = m;
        }
    }
    // Port-level settings count only on a workload policy (istiod ignores them elsewhere).
    let ports = workload
        .map(|w| {
            w.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, m)| {
                    let p: u32 = port.parse().ok()?;
                    let m = if m.mode == MtlsMode::Unset {
                        mode
                    } else {
                        m.mode
                    };
                    (m != mode).then_some((p, m))
                })
                .collect()
        })
        .unwrap_or_default();
    MtlsSettings { mode, ports }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            namespace: "foo".into(),
            labels: [("app".to_owned(), "httpbin".to_owned())].into(),
            root_namespace: "istio-system".into(),
            trust_domain: "cluster.local".into(),
            trust_domain_aliases: vec![],
        }
    }

    fn pa(ns: &str, name: &str, body: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {body}\n---\n"
        )
    }

    fn eff(docs: &[String]) -> MtlsSettings {
        effective(&parse(&docs.concat()).unwrap(), &target())
    }

    #[test]
    fn precedence_workload_namespace_mesh() {
        assert_eq!(eff(&[]).mode, MtlsMode::Permissive);
        let mesh = pa("istio-system", "default", "{mtls: {mode: STRICT}}");
        assert_eq!(eff(std::slice::from_ref(&mesh)).mode, MtlsMode::Strict);
        let ns = pa("foo", "default", "{mtls: {mode: PERMISSIVE}}");
        assert_eq!(eff(&[mesh.clone(), ns.clone()]).mode, MtlsMode::Permissive);
        let wl = pa(
            "foo",
            "httpbin",
            "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: DISABLE}}",
        );
        assert_eq!(eff(&[mesh.clone(), ns.clone(), wl]).mode, MtlsMode::Disable);
        // UNSET inherits from the level above; another workload's policy does not apply.
        let unset = pa(
            "foo",
            "httpbin",
            "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: UNSET}}",
        );
        assert_eq!(eff(&[mesh.clone(), unset]).mode, MtlsMode::Strict);
        let other = pa(
            "foo",
            "other",
            "{selector: {matchLabels: {app: other}}, mtls: {mode: DISABLE}}",
        );
        assert_eq!(eff(&[mesh, other]).mode, MtlsMode::Strict);
    }

    #[test]
    fn port_level_only_on_workload_policies() {
        let wl = pa(
            "foo",
            "httpbin",
            "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: PERMISSIVE}, '9090': {mode: UNSET}}}",
        );
        let s = eff(&[wl]);
        assert_eq!(s.mode, MtlsMode::Strict);
        assert_eq!(s.ports, [(8080, MtlsMode::Permissive)].into());
        let ns = pa(
            "foo",
            "default",
            "{mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: DISABLE}}}",
        );
        assert!(eff(&[ns]).ports.is_empty());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(parse(&pa("foo", "x", "{mtls: {mode: SOMETIMES}}")).is_err());
        assert!(parse(&pa("foo", "x", "{portLevelMtls: {'http': {mode: STRICT}}}")).is_err());
        assert!(parse(&pa("foo", "x", "{mtls: {mode: STRICT, extra: 1}}")).is_err());
    }
}
