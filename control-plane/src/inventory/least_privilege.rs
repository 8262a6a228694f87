//! Least privilege from traffic: Istio AuthorizationPolicies that allow exactly the calls observed
//! ([`suggest`]), and the ALLOW rules of the policies in force that admitted nothing
//! ([`unused`]).
//!
//! A suggestion is per workload: an ALLOW policy selecting it by its labels, one rule per verified
//! caller (principal) with its methods and paths. A template becomes an Istio path with `{*}` for
//! each parameter (one segment, as the template means). What cannot be said exactly is left out
//! and noted — plaintext callers (no principal), the `{overflow}` bucket, a workload without labels
//! (an empty selector would cover its whole namespace) — so a suggestion never allows more than was
//! seen.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::generate::Mesh;
use crate::registry::Registry;

use super::store::Edge;

/// Suggested policies as multi-document YAML, and what was left out.
#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    pub yaml: String,
    pub notes: Vec<String>,
}

/// `/orders/{id}/items` → `/orders/{*}/items`; `None` if a literal segment holds characters Istio
/// would read as a pattern.
fn istio_path(template: &str) -> Option<String> {
    if template.contains("{overflow}") || !template.starts_with('/') {
        return None;
    }
    let mut out = String::with_capacity(template.len());
    for seg in template.split('/').skip(1) {
        out.push('/');
        if seg.starts_with('{') && seg.ends_with('}') {
            out.push_str("{*}");
        } else if seg.contains(['{', '}', '*']) {
            return None;
        } else {
            out.push_str(seg);
        }
    }
    Some(if out.is_empty() { "/".into() } else { out })
}

/// `spiffe://td/ns/x/sa/y` → `td/ns/x/sa/y` (Istio's principal form).
fn principal(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://").filter(|p| !p.is_empty())
}

/// Policies allowing exactly `edges`' allowed calls from verified callers.
pub fn suggest(edges: &[Edge], reg: &Registry) -> Suggestion {
    let mut notes = Vec::new();
    // workload → principal → method → paths
    type Ops = BTreeMap<String, BTreeSet<String>>;
    let mut by_workload: BTreeMap<&str, BTreeMap<&str, Ops>> = BTreeMap::new();
    for e in edges.iter().filter(|e| e.allowed > 0) {
        let Some(caller) = e.caller.as_deref().and_then(principal) else {
            notes.push(format!(
                "{}: {} {} from plaintext callers ({} calls): no principal to allow; left out",
                e.workload, e.method, e.template, e.allowed
            ));
            continue;
        };
        let Some(path) = istio_path(&e.template) else {
            notes.push(format!(
                "{}: {} {} from {caller} ({} calls): not expressible as an Istio path; left out",
                e.workload, e.method, e.template, e.allowed
            ));
            continue;
        };
        by_workload
            .entry(&e.workload)
            .or_default()
            .entry(caller)
            .or_default()
            .entry(e.method.clone())
            .or_default()
            .insert(path);
    }
    let mut docs = Vec::new();
    for (workload, callers) in by_workload {
        let (namespace, name) = workload.split_once('/').unwrap_or(("default", workload));
        let Some(w) = reg.workload(namespace, name) else {
            notes.push(format!(
                "{workload}: not in the registry any more; no policy suggested"
            ));
            continue;
        };
        if w.spec.labels.is_empty() {
            notes.push(format!(
                "{workload}: has no labels to select it by (an empty selector would cover namespace {namespace}); no policy suggested"
            ));
            continue;
        }
        let rules: Vec<serde_json::Value> = callers
            .into_iter()
            .map(|(caller, ops)| {
                let to: Vec<serde_json::Value> = ops
                    .into_iter()
                    .map(|(method, paths)| {
                        serde_json::json!({"operation": {"methods": [method], "paths": paths}})
                    })
                    .collect();
                serde_json::json!({"from": [{"source": {"principals": [caller]}}], "to": to})
            })
            .collect();
        let doc = serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": format!("eastguard-least-privilege-{name}"),
                "namespace": namespace,
                "annotations": {"eastguard.io/generated-by": "eastguard policy suggest"},
            },
            "spec": {
                "selector": {"matchLabels": w.spec.labels},
                "action": "ALLOW",
                "rules": rules,
            },
        });
        match serde_yaml::to_string(&doc) {
            Ok(y) => docs.push(y),
            Err(e) => notes.push(format!("{workload}: {e}")),
        }
    }
    Suggestion {
        yaml: docs.join("---\n"),
        notes,
    }
}

/// An ALLOW rule in force that admitted none of the observed calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnusedRule {
    /// The workload it applies to (`namespace/name`).
    pub workload: String,
    /// Envoy's policy name for the rule, as in access logs: `ns[NS]-policy[NAME]-rule[I]`.
    pub rule: String,
}

/// Why the unused rules of a workload cannot be told (its policies do not translate or compile).
#[derive(Debug, thiserror::Error)]
pub enum UnusedError {
    #[error("{workload}: {source}")]
    Translate {
        workload: String,
        source: policy::istio::IstioError,
    },
    #[error("{workload}: {source}")]
    Compile {
        workload: String,
        source: policy::CompileError,
    },
}

/// ALLOW rules that applied to a workload and admitted none of its observed allowed calls; for
/// workloads the inventory has calls of (a workload nobody called says nothing about its rules).
pub fn unused(edges: &[Edge], reg: &Registry, mesh: &Mesh) -> Result<Vec<UnusedRule>, UnusedError> {
    let mut called: BTreeMap<&str, Vec<&Edge>> = BTreeMap::new();
    for e in edges.iter().filter(|e| e.allowed > 0) {
        called.entry(&e.workload).or_default().push(e);
    }
    let mut out = Vec::new();
    for (workload, calls) in called {
        let (namespace, name) = workload.split_once('/').unwrap_or(("default", workload));
        let Some(w) = reg.workload(namespace, name) else {
            continue;
        };
        let target = policy::istio::Target {
            namespace: namespace.to_owned(),
            labels: w.spec.labels.clone(),
            root_namespace: mesh.root_namespace.clone(),
            trust_domain: mesh.trust_domain.clone(),
            trust_domain_aliases: Vec::new(),
        };
        let filters =
            policy::istio::translate(&reg.authorization, &target, false).map_err(|source| {
                UnusedError::Translate {
                    workload: workload.to_owned(),
                    source,
                }
            })?;
        let rules: BTreeSet<String> = filters
            .iter()
            .filter_map(|f| f.typed_config.rbac.rules.as_ref())
            .filter(|r| r.action == policy::rbac::Action::Allow)
            .flat_map(|r| r.policies.keys().cloned())
            .collect();
        if rules.is_empty() {
            continue;
        }
        let engine = policy::Engine::compile(&filters).map_err(|source| UnusedError::Compile {
            workload: workload.to_owned(),
            source,
        })?;
        let mut used = BTreeSet::new();
        for e in calls {
            // A concrete path of the operation: an example, or the template with a value per
            // parameter.
            let concrete = e.examples.first().cloned().unwrap_or_else(|| {
                e.template
                    .split('/')
                    .map(|s| if s.starts_with('{') { "1" } else { s })
                    .collect::<Vec<_>>()
                    .join("/")
            });
            let Ok(normalized) = policy::path::normalize(&concrete) else {
                continue;
            };
            let full = normalized.path_and_query();
            let headers: [(&str, &[u8]); 4] = [
                (":authority", e.service.as_bytes()),
                (":method", e.method.as_bytes()),
                (":path", full.as_bytes()),
                (":scheme", b"http"),
            ];
            let without = normalized.without_params();
            let d = engine.evaluate(&policy::Request {
                principal: e.caller.as_deref(),
                path: &normalized.path,
                path_without_params: without.as_deref(),
                headers: &headers,
                ..Default::default()
            });
            if d.allowed
                && let Some(p) = d.policy
            {
                used.insert(p.to_string());
            }
        }
        out.extend(
            rules
                .into_iter()
                .filter(|r| !used.contains(r))
                .map(|rule| UnusedRule {
                    workload: workload.to_owned(),
                    rule,
                }),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_become_istio_paths_only_when_exact() {
        assert_eq!(
            istio_path("/orders/{id}/items").as_deref(),
            Some("/orders/{*}/items")
        );
        assert_eq!(istio_path("/").as_deref(), Some("/"));
        assert_eq!(istio_path("/a/b").as_deref(), Some("/a/b"));
        assert_eq!(istio_path("{overflow}"), None);
        assert_eq!(istio_path("/a*/b"), None);
        assert_eq!(
            istio_path("/pkg.Svc/Method").as_deref(),
            Some("/pkg.Svc/Method")
        );
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    const REG: &str = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: server, namespace: test}\nspec: {address: 127.0.0.1, labels: {app: server}, serviceAccount: server}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: bare, namespace: test}\nspec: {address: 127.0.0.2, serviceAccount: bare}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broad, namespace: test}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/test/sa/client]}}]\n  - from: [{source: {principals: [cluster.local/ns/test/sa/legacy]}}]\n";

    fn registry() -> Registry {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("eg-lp-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("r.yaml"), REG).unwrap();
        let mut d = crate::registry::Directory::new(dir.clone());
        d.refresh().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        d.registry()
    }

    fn edge(
        workload: &str,
        caller: Option<&str>,
        method: &str,
        template: &str,
        allowed: u64,
    ) -> Edge {
        Edge {
            workload: workload.into(),
            caller: caller.map(Into::into),
            service: "server.test.svc.cluster.local".into(),
            method: method.into(),
            template: template.into(),
            allowed,
            denied: 0,
            examples: vec![],
        }
    }

    const CLIENT: Option<&str> = Some("spiffe://cluster.local/ns/test/sa/client");

    #[test]
    fn unused_names_the_rules_that_admitted_nothing() {
        let mesh = Mesh {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            default_mtls: policy::istio::peer_authn::MtlsMode::Strict,
            h2_upgrade: true,
            access_log: None,
        };
        let reg = registry();
        let edges = [edge("test/server", CLIENT, "GET", "/orders/{id}", 3)];
        let u = unused(&edges, &reg, &mesh).unwrap();
        assert_eq!(
            u,
            vec![UnusedRule {
                workload: "test/server".into(),
                rule: "ns[test]-policy[broad]-rule[1]".into()
            }]
        );
        // Denied-only edges admitted nothing: both rules are unused then.
        let denied = [edge("test/server", CLIENT, "GET", "/orders/{id}", 0)];
        assert!(
            unused(&denied, &reg, &mesh).unwrap().is_empty(),
            "no allowed call: nothing to say"
        );
    }

    #[test]
    fn suggestions_cover_what_was_seen_and_say_what_they_left_out() {
        let reg = registry();
        let edges = [
            edge("test/server", CLIENT, "GET", "/orders/{id}", 3),
            edge("test/server", CLIENT, "GET", "/orders/{id}/items", 1),
            edge("test/server", CLIENT, "POST", "/orders", 1),
            edge("test/server", CLIENT, "GET", "{overflow}", 9),
            edge("test/server", None, "GET", "/health", 2),
            edge("test/server", CLIENT, "DELETE", "/orders/{id}", 0),
            edge("test/bare", CLIENT, "GET", "/", 1),
        ];
        let s = suggest(&edges, &reg);
        let doc: serde_json::Value = serde_yaml::from_str(&s.yaml).unwrap();
        assert_eq!(doc["spec"]["selector"]["matchLabels"]["app"], "server");
        assert_eq!(
            doc["spec"]["rules"],
            serde_json::json!([{
                "from": [{"source": {"principals": ["cluster.local/ns/test/sa/client"]}}],
                "to": [
                    {"operation": {"methods": ["GET"], "paths": ["/orders/{*}", "/orders/{*}/items"]}},
                    {"operation": {"methods": ["POST"], "paths": ["/orders"]}},
                ],
            }])
        );
        assert_eq!(s.notes.len(), 3, "{:?}", s.notes);
        assert!(s.notes[0].contains("{overflow}") && s.notes[1].contains("plaintext"));
        assert!(s.notes[2].starts_with("test/bare: has no labels"));
    }
}
