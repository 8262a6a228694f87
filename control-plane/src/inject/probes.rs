//! Kubelet probes rewritten through the sidecar's status port, as Istio's app-probe rewriting
//! does: kubelet calls `http://POD:15020/app-health/<container>/<kind>` and the sidecar runs the
//! original probe against the app. Without this, captured inbound traffic needs mTLS that the
//! kubelet cannot present.
//!
//! The originals travel to the sidecar in `ISTIO_KUBE_APP_PROBERS` (Istio's name and JSON shape:
//! path → `{"httpGet"|"tcpSocket"|"grpc": {...}, "timeoutSeconds": N}`), with named ports resolved.

use serde_json::{Map, Value, json};

pub const STATUS_PORT: u16 = 15020;

const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];
const HOOKS: [(&str, &str); 2] = [("postStart", "poststartz"), ("preStop", "prestopz")];

/// Rewrites the probes and lifecycle hooks of `containers` in place; returns the probers, keyed
/// by the path the sidecar serves, and warnings for probes left as they were.
pub fn rewrite(containers: &mut [Value], warnings: &mut Vec<String>) -> Map<String, Value> {
    let mut probers = Map::new();
    for c in containers.iter_mut() {
        let Some(c) = c.as_object_mut() else { continue };
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ports = c.get("ports").cloned().unwrap_or(Value::Null);
        for (field, kind) in PROBES {
            let Some(probe) = c.get_mut(field).and_then(Value::as_object_mut) else {
                continue;
            };
            let path = format!("/app-health/{name}/{kind}");
            if let Some(p) = take_action(probe, &ports, &path, warnings) {
                probers.insert(path, p);
            }
        }
        if let Some(lifecycle) = c.get_mut("lifecycle").and_then(Value::as_object_mut) {
            for (field, kind) in HOOKS {
                let Some(hook) = lifecycle.get_mut(field).and_then(Value::as_object_mut) else {
                    continue;
                };
                let path = format!("/app-lifecycle/{name}/{kind}");
                if let Some(p) = take_action(hook, &ports, &path, warnings) {
                    probers.insert(path, p);
                }
            }
        }
    }
    probers
}

/// Replaces the probe's (or hook's) network action by an `httpGet` on the status port; returns
/// the original action as a prober.
fn take_action(
    probe: &mut Map<String, Value>,
    ports: &Value,
    path: &str,
    warnings: &mut Vec<String>,
) -> Option<Value> {
    let (kind, action) = ["httpGet", "tcpSocket", "grpc"].into_iter().find_map(|k| {
        probe
            .get(k)
            .and_then(Value::as_object)
            .map(|a| (k, a.clone()))
    })?;
    let mut action = action;
    let port = match action.get("port") {
        Some(Value::Number(n)) => n.as_u64().filter(|p| (1..=65535).contains(p)),
        Some(Value::String(named)) => named_port(ports, named),
        _ => None,
    };
    let Some(port) = port else {
        warnings.push(format!(
            "{path}: the probe's port is neither a number nor a named port of its container; \
             left as it is"
        ));
        return None;
    };
    if port == u64::from(STATUS_PORT) {
        // Already aimed at the status port (a probe of the sidecar itself, or a re-injection).
        return None;
    }
    action.insert("port".into(), json!(port));
    let mut prober = Map::new();
    prober.insert(kind.into(), Value::Object(action));
    if let Some(t) = probe.get("timeoutSeconds") {
        prober.insert("timeoutSeconds".into(), t.clone());
    }
    probe.remove(kind);
    probe.insert(
        "httpGet".into(),
        json!({ "path": path, "port": STATUS_PORT, "scheme": "HTTP" }),
    );
    Some(Value::Object(prober))
}

/// A container's port by name (`containerPort` of the entry with that `name`).
fn named_port(ports: &Value, name: &str) -> Option<u64> {
    ports
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("containerPort")?
        .as_u64()
        .filter(|p| (1..=65535).contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_tcp_and_grpc_probes_go_through_the_status_port_with_named_ports_resolved() {
        let mut cs = vec![json!({
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"port": "http", "path": "/live",
                               "httpHeaders": [{"name": "X", "value": "y"}]},
                              "timeoutSeconds": 3, "periodSeconds": 7},
            "readinessProbe": {"tcpSocket": {"port": 9090}},
            "startupProbe": {"grpc": {"port": 9091, "service": "s"}},
            "lifecycle": {"preStop": {"httpGet": {"port": 91}}},
        })];
        let mut w = Vec::new();
        let probers = rewrite(&mut cs, &mut w);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            probers["/app-health/app/livez"],
            json!({"httpGet": {"port": 8080, "path": "/live",
                   "httpHeaders": [{"name": "X", "value": "y"}]}, "timeoutSeconds": 3})
        );
        assert_eq!(
            probers["/app-health/app/readyz"],
            json!({"tcpSocket": {"port": 9090}})
        );
        assert_eq!(
            probers["/app-health/app/startupz"],
            json!({"grpc": {"port": 9091, "service": "s"}})
        );
        assert_eq!(
            probers["/app-lifecycle/app/prestopz"],
            json!({"httpGet": {"port": 91}})
        );
        let c = &cs[0];
        assert_eq!(
            c["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP"},
                   "timeoutSeconds": 3, "periodSeconds": 7})
        );
        assert!(c["readinessProbe"].get("tcpSocket").is_none());
        assert!(c["startupProbe"].get("grpc").is_none());
    }

    #[test]
    fn exec_probes_and_unknown_named_ports_are_left_alone() {
        let mut cs = vec![json!({
            "name": "app",
            "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"httpGet": {"port": "nope"}},
        })];
        let before = cs.clone();
        let mut w = Vec::new();
        assert!(rewrite(&mut cs, &mut w).is_empty());
        assert_eq!(cs, before);
        assert_eq!(w.len(), 1);
    }
}
