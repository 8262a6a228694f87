//! A service's live operations written out as an OpenAPI 3.1 document: paths from the inferred
//! templates, one path parameter per template parameter, responses by the status classes seen,
//! and the verified callers of each operation as `x-eastguard-callers`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

/// What was seen of one operation, for export.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub method: String,
    pub template: String,
    /// Status classes (2 for 2xx).
    pub classes: BTreeSet<u16>,
    pub request_types: BTreeSet<String>,
    pub response_types: BTreeSet<String>,
    /// Verified caller SPIFFE IDs; plaintext callers are not listed.
    pub callers: BTreeSet<String>,
    pub calls: u64,
}

/// `/orders/{id}/x/{id}` → (`/orders/{id}/x/{id2}`, [`id`, `id2`]); the key ignores names.
fn named(template: &str) -> (String, Vec<String>, String) {
    let mut names: Vec<String> = Vec::new();
    let mut path = String::new();
    let mut key = String::new();
    for seg in template.split('/').skip(1) {
        path.push('/');
        key.push('/');
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(base) => {
                let base: String = base
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = if base.is_empty() {
                    "param".to_owned()
                } else {
                    base
                };
                let mut name = base.clone();
                let mut n = 2;
                while names.contains(&name) {
                    name = format!("{base}{n}");
                    n += 1;
                }
                path.push_str(&format!("{{{name}}}"));
                key.push_str("{}");
                names.push(name);
            }
            None => {
                path.push_str(seg);
                key.push_str(seg);
            }
        }
    }
    if path.is_empty() {
        path.push('/');
        key.push('/');
    }
    (path, names, key)
}

fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_ascii_lowercase();
    for c in path.chars() {
        id.push(if c.is_ascii_alphanumeric() { c } else { '_' });
    }
    id
}

/// A path as written (first parameter names seen), its parameter names, and its operations by
/// lower-case method.
type Path = (String, Vec<String>, BTreeMap<String, Observed>);

/// An OpenAPI 3.1 document of `service`'s observed operations. The `{overflow}` bucket and
/// methods OpenAPI has no field for are left out.
pub fn document(service: &str, operations: &[Observed]) -> Value {
    // Templates that differ only in parameter names are one path.
    let mut paths: BTreeMap<String, Path> = BTreeMap::new();
    for op in operations {
        let method = op.method.to_ascii_lowercase();
        if op.template.contains("{overflow}")
            || !op.template.starts_with('/')
            || !matches!(
                method.as_str(),
                "get" | "put" | "post" | "delete" | "options" | "head" | "patch" | "trace"
            )
        {
            continue;
        }
        let (path, names, key) = named(&op.template);
        let entry = paths
            .entry(key)
            .or_insert_with(|| (path, names, BTreeMap::new()));
        let merged = entry.2.entry(method).or_default();
        merged.classes.extend(&op.classes);
        merged
            .request_types
            .extend(op.request_types.iter().cloned());
        merged
            .response_types
            .extend(op.response_types.iter().cloned());
        merged.callers.extend(op.callers.iter().cloned());
        merged.calls += op.calls;
    }
    let mut out = serde_json::Map::new();
    for (path, names, methods) in paths.into_values() {
        let mut item = serde_json::Map::new();
        for (method, op) in methods {
            let content: serde_json::Map<String, Value> = op
                .response_types
                .iter()
                .map(|t| (t.clone(), json!({})))
                .collect();
            let mut responses = serde_json::Map::new();
            for c in &op.classes {
                let mut r = json!({"description": format!("{c}xx responses were observed")});
                if !content.is_empty() {
                    r["content"] = Value::Object(content.clone());
                }
                responses.insert(format!("{c}XX"), r);
            }
            if responses.is_empty() {
                responses.insert("default".into(), json!({"description": "observed"}));
            }
            let mut o = json!({
                "operationId": operation_id(&method, &path),
                "responses": responses,
                "x-eastguard-callers": op.callers,
                "x-eastguard-calls": op.calls,
            });
            if !names.is_empty() {
                o["parameters"] = names
                    .iter()
                    .map(|n| json!({"name": n, "in": "path", "required": true, "schema": {"type": "string"}}))
                    .collect();
            }
            if !op.request_types.is_empty() {
                o["requestBody"] = json!({"content": op.request_types.iter().map(|t| (t.clone(), json!({}))).collect::<serde_json::Map<_, _>>()});
            }
            item.insert(method, o);
        }
        out.insert(path, Value::Object(item));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": service,
            "version": "observed",
            "description": "Operations eastguard observed in live traffic, with their verified callers.",
        },
        "paths": out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(method: &str, template: &str) -> Observed {
        Observed {
            method: method.into(),
            template: template.into(),
            classes: [2].into(),
            response_types: ["application/json".to_owned()].into(),
            callers: ["spiffe://td/ns/a/sa/b".to_owned()].into(),
            calls: 3,
            ..Default::default()
        }
    }

    #[test]
    fn templates_become_paths_with_unique_parameters() {
        let doc = document(
            "orders",
            &[
                observed("GET", "/orders/{id}/lines/{id}"),
                observed("DELETE", "/orders/{uuid}/lines/{id}"),
                observed("GET", "/{overflow}"),
                observed("OTHER", "/x"),
                observed("GET", "/"),
            ],
        );
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(
            paths.keys().collect::<Vec<_>>(),
            ["/", "/orders/{id}/lines/{id2}"]
        );
        let item = &paths["/orders/{id}/lines/{id2}"];
        assert_eq!(item["get"]["parameters"][1]["name"], "id2");
        assert!(
            item["delete"].is_object(),
            "same path whatever its parameters are called"
        );
        assert_eq!(
            item["get"]["responses"]["2XX"]["content"]["application/json"],
            json!({})
        );
        assert_eq!(
            item["get"]["x-eastguard-callers"][0],
            "spiffe://td/ns/a/sa/b"
        );
        assert_ne!(item["get"]["operationId"], item["delete"]["operationId"]);
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
