//! API specs (OpenAPI 3.0 / 3.1, Swagger 2.0) and how live operations compare with them.
//!
//! A spec is read into operations (method, path template, deprecated, documented status codes
//! and content types). Live templates are matched parameter-name-insensitively: `/orders/{id}`
//! live is `/orders/{orderId}` in the spec, and a spec parameter also matches a live literal
//! (`/users/{name}` documents `/users/alice`). Among several matches the most literal wins.
//!
//! Statuses ([`Status`]): documented, shadow (live, not in the spec — or the service has no spec),
//! zombie (deprecated in the spec, still called), unused (in the spec, not called), drift (called,
//! with a status class or content type the spec does not list). Calls the sidecar itself answered
//! (RBAC denials) say nothing about the API and do not count for drift.

use std::collections::BTreeSet;

use serde::Serialize;

/// Operations one spec may hold; a larger document is refused.
pub const MAX_OPERATIONS: usize = 10_000;
/// Longest path in a spec, in bytes.
const MAX_PATH: usize = 2048;

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct SpecError {
    /// Where in the document (`paths./orders/{id}.get.responses`).
    pub at: String,
    pub reason: String,
}

fn refuse(at: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        at: at.into(),
        reason: reason.into(),
    }
}

/// One path segment of a template: a literal, or a parameter of any name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

fn segments(path: &str) -> Vec<Segment> {
    path.trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(|s| {
            if s.contains('{') {
                Segment::Param
            } else {
                Segment::Literal(s.to_owned())
            }
        })
        .collect()
}

/// A documented operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpecOperation {
    /// Upper case (`GET`).
    pub method: String,
    /// As the spec writes it, base path included (`/api/orders/{orderId}`).
    pub path: String,
    pub deprecated: bool,
    /// Response keys: `200`, `4XX`, `default`.
    pub statuses: Vec<String>,
    /// Response media types, lower case, parameters dropped.
    pub response_types: Vec<String>,
    #[serde(skip)]
    segments: Vec<Segment>,
}

impl SpecOperation {
    /// Whether the spec lists a response of this class (`2` for 2xx).
    pub fn allows_class(&self, class: u16) -> bool {
        self.statuses.is_empty()
            || self.statuses.iter().any(|s| {
                s == "default"
                    || s.as_bytes().first() == Some(&(b'0' + (class as u8 % 10))) && s.len() == 3
            })
    }

    /// Whether a response media type is among the documented ones (`*/*`, `type/*` match).
    pub fn allows_type(&self, media: &str) -> bool {
        self.response_types.is_empty()
            || self.response_types.iter().any(|t| {
                t == media
                    || t == "*/*"
                    || t.strip_suffix("/*")
                        .is_some_and(|major| media.split('/').next() == Some(major))
            })
    }
}

/// A service's spec, read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Spec {
    pub title: String,
    pub version: String,
    pub operations: Vec<SpecOperation>,
}

fn media(t: &str) -> String {
    t.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn str_keys(v: Option<&serde_json::Value>) -> Vec<String> {
    v.and_then(|v| v.as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn str_list(v: Option<&serde_json::Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str()).map(media).collect())
        .unwrap_or_default()
}

/// The path part of an OpenAPI 3 `servers[0].url` (`https://h/api/v1` → `/api/v1`), or of a
/// Swagger 2 `basePath`; empty for `/` or nothing.
fn base_path(doc: &serde_json::Value, swagger: bool) -> String {
    let raw = if swagger {
        doc.get("basePath").and_then(|v| v.as_str()).unwrap_or("")
    } else {
        doc.get("servers")
            .and_then(|s| s.as_array())
            .and_then(|s| s.first())
            .and_then(|s| s.get("url"))
            .and_then(|u| u.as_str())
            .unwrap_or("")
    };
    let path = match raw.find("://") {
        Some(i) => raw[i + 3..].find('/').map_or("", |j| &raw[i + 3 + j..]),
        None => raw,
    };
    // Server variables (`{basePath}`) are not resolved: such a base is left out.
    if !path.starts_with('/') || path.contains('{') {
        return String::new();
    }
    path.trim_end_matches('/').to_owned()
}

impl Spec {
    /// Reads an OpenAPI 3.x or Swagger 2.0 document (already parsed from YAML or JSON).
    pub fn from_document(doc: &serde_json::Value) -> Result<Spec, SpecError> {
        let root = doc
            .as_object()
            .ok_or_else(|| refuse("(document)", "not a mapping"))?;
        let swagger = match (root.get("openapi"), root.get("swagger")) {
            (Some(v), _) if v.as_str().is_some_and(|v| v.starts_with("3.")) => false,
            (None, Some(v)) if v.as_str() == Some("2.0") => true,
            (Some(v), _) => return Err(refuse("openapi", format!("unsupported version {v}"))),
            (None, Some(v)) => return Err(refuse("swagger", format!("unsupported version {v}"))),
            (None, None) => {
                return Err(refuse(
                    "(document)",
                    "neither `openapi: 3.x` nor `swagger: \"2.0\"`",
                ));
            }
        };
        let info = root.get("info");
        let text = |k: &str| {
            info.and_then(|i| i.get(k))
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .unwrap_or_default()
        };
        let base = base_path(doc, swagger);
        let global_produces = str_list(root.get("produces"));
        let mut operations = Vec::new();
        let paths = match root.get("paths") {
            None | Some(serde_json::Value::Null) => serde_json::Map::new(),
            Some(serde_json::Value::Object(m)) => m.clone(),
            Some(_) => return Err(refuse("paths", "not a mapping")),
        };
        for (path, item) in &paths {
            if !path.starts_with('/') {
                return Err(refuse(format!("paths.{path}"), "a path must start with /"));
            }
            if path.len() > MAX_PATH {
                return Err(refuse(format!("paths.{}…", &path[..32]), "path too long"));
            }
            let item = item
                .as_object()
                .ok_or_else(|| refuse(format!("paths.{path}"), "not a mapping"))?;
            for method in METHODS {
                let Some(op) = item.get(*method) else {
                    continue;
                };
                let at = format!("paths.{path}.{method}");
                let op = op.as_object().ok_or_else(|| refuse(&at, "not a mapping"))?;
                let deprecated = match op.get("deprecated") {
                    None => false,
                    Some(serde_json::Value::Bool(b)) => *b,
                    Some(_) => return Err(refuse(format!("{at}.deprecated"), "not a boolean")),
                };
                let responses = op.get("responses");
                if responses.is_some_and(|r| !r.is_object()) {
                    return Err(refuse(format!("{at}.responses"), "not a mapping"));
                }
                let statuses = str_keys(responses);
                for s in &statuses {
                    let ok = s == "default"
                        || s.len() == 3
                            && s.as_bytes()[0].is_ascii_digit()
                            && (s[1..].bytes().all(|b| b.is_ascii_digit())
                                || s[1..].eq_ignore_ascii_case("xx"));
                    if !ok {
                        return Err(refuse(
                            format!("{at}.responses.{s}"),
                            "not a status code, a range like 4XX, or default",
                        ));
                    }
                }
                let mut response_types: BTreeSet<String> = BTreeSet::new();
                if swagger {
                    let produces = op.get("produces").map(|p| str_list(Some(p)));
                    response_types.extend(produces.unwrap_or_else(|| global_produces.clone()));
                } else if let Some(r) = responses.and_then(|r| r.as_object()) {
                    for resp in r.values() {
                        response_types
                            .extend(str_keys(resp.get("content")).iter().map(|t| media(t)));
                    }
                }
                let full = format!("{base}{path}");
                operations.push(SpecOperation {
                    method: method.to_ascii_uppercase(),
                    segments: segments(&full),
                    path: full,
                    deprecated,
                    statuses: statuses.iter().map(|s| s.to_ascii_uppercase()).collect(),
                    response_types: response_types.into_iter().collect(),
                });
                if operations.len() > MAX_OPERATIONS {
                    return Err(refuse(
                        "paths",
                        format!("more than {MAX_OPERATIONS} operations"),
                    ));
                }
            }
        }
        Ok(Spec {
            title: text("title"),
            version: text("version"),
            operations,
        })
    }

    /// The documented operation a live (method, template) is, the most literal one if several match.
    pub fn find(&self, method: &str, template: &str) -> Option<usize> {
        let live = segments(template);
        self.operations
            .iter()
            .enumerate()
            .filter(|(_, op)| op.method == method && op.segments.len() == live.len())
            .filter_map(|(i, op)| {
                let mut literal = 0;
                for (s, l) in op.segments.iter().zip(&live) {
                    match (s, l) {
                        (Segment::Param, _) => {}
                        (Segment::Literal(a), Segment::Literal(b)) if a == b => literal += 1,
                        _ => return None,
                    }
                }
                Some((literal, i))
            })
            .max_by_key(|(literal, i)| (*literal, std::cmp::Reverse(*i)))
            .map(|(_, i)| i)
    }
}

/// Where an operation stands against its service's spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Documented,
    /// Live and not in the spec (or the service has none).
    Shadow,
    /// Deprecated in the spec and still called.
    Zombie,
    /// In the spec, not called in the window.
    Unused,
    /// Called with a status class or content type the spec does not list.
    Drift,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Documented => "documented",
            Status::Shadow => "shadow",
            Status::Zombie => "zombie",
            Status::Unused => "unused",
            Status::Drift => "drift",
        }
    }
}

/// What was seen live of one operation (all callers), for classification.
#[derive(Debug, Clone, Default)]
pub struct LiveOperation {
    pub method: String,
    pub template: String,
    /// Status classes (2 for 2xx) of calls the application answered (RBAC denials left out).
    pub classes: BTreeSet<u16>,
    /// Response media types seen.
    pub response_types: BTreeSet<String>,
}

/// The verdict on one operation, live or documented.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub method: String,
    /// The live template, or the spec's path for an unused operation.
    pub template: String,
    pub status: Status,
    /// The spec's path it matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_path: Option<String>,
    /// For drift: what the spec does not list (`status 5xx`, `content type text/html`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
}

/// Classifies a service's live operations against its spec (`None`: no spec, all shadow), and
/// lists the spec's operations nobody called.
pub fn classify(spec: Option<&Spec>, live: &[LiveOperation]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let mut called = BTreeSet::new();
    for op in live {
        let matched = spec.and_then(|s| {
            s.find(&op.method, &op.template)
                .map(|i| (i, &s.operations[i]))
        });
        let Some((i, documented)) = matched else {
            out.push(Verdict {
                method: op.method.clone(),
                template: op.template.clone(),
                status: Status::Shadow,
                spec_path: None,
                drift: Vec::new(),
            });
            continue;
        };
        called.insert(i);
        let mut drift: Vec<String> = op
            .classes
            .iter()
            .filter(|c| !documented.allows_class(**c))
            .map(|c| format!("status {c}xx"))
            .collect();
        drift.extend(
            op.response_types
                .iter()
                .filter(|t| !documented.allows_type(t))
                .map(|t| format!("content type {t}")),
        );
        let status = if documented.deprecated {
            Status::Zombie
        } else if !drift.is_empty() {
            Status::Drift
        } else {
            Status::Documented
        };
        out.push(Verdict {
            method: op.method.clone(),
            template: op.template.clone(),
            status,
            spec_path: Some(documented.path.clone()),
            drift,
        });
    }
    if let Some(spec) = spec {
        for (i, op) in spec.operations.iter().enumerate() {
            if !called.contains(&i) {
                out.push(Verdict {
                    method: op.method.clone(),
                    template: op.path.clone(),
                    status: Status::Unused,
                    spec_path: Some(op.path.clone()),
                    drift: Vec::new(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Spec {
        Spec::from_document(&json!({
            "openapi": "3.1.0",
            "info": {"title": "orders", "version": "2"},
            "servers": [{"url": "http://orders.shop/api"}],
            "paths": {
                "/orders/{orderId}": {
                    "get": {"responses": {"200": {"content": {"application/json": {}}}, "404": {}}},
                    "delete": {"deprecated": true, "responses": {"204": {}}}
                },
                "/orders/export": {"get": {"responses": {"2XX": {"content": {"text/*": {}}}}}},
                "/health": {"get": {"responses": {"default": {}}}}
            }
        }))
        .unwrap()
    }

    fn live(method: &str, template: &str, classes: &[u16], types: &[&str]) -> LiveOperation {
        LiveOperation {
            method: method.into(),
            template: template.into(),
            classes: classes.iter().copied().collect(),
            response_types: types.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn templates_match_whatever_the_parameter_is_called_and_the_most_literal_wins() {
        let s = spec();
        let found = |m, t| s.find(m, t).map(|i| s.operations[i].path.clone());
        assert_eq!(
            found("GET", "/api/orders/{id}").as_deref(),
            Some("/api/orders/{orderId}")
        );
        // A live literal is documented by a spec parameter, unless a literal path says more.
        assert_eq!(
            found("GET", "/api/orders/42").as_deref(),
            Some("/api/orders/{orderId}")
        );
        assert_eq!(
            found("GET", "/api/orders/export").as_deref(),
            Some("/api/orders/export")
        );
        assert_eq!(
            found("GET", "/api/orders/export/").as_deref(),
            Some("/api/orders/export")
        );
        // A live parameter is not documented by a spec literal; method and depth must agree.
        assert_eq!(found("GET", "/api/{param}/export"), None);
        assert_eq!(found("POST", "/api/orders/{id}"), None);
        assert_eq!(found("GET", "/api/orders/{id}/items"), None);
        assert_eq!(
            found("GET", "/orders/{id}"),
            None,
            "the server's base path counts"
        );
    }

    #[test]
    fn each_status_is_given_for_its_reason() {
        let s = spec();
        let verdicts = classify(
            Some(&s),
            &[
                live("GET", "/api/orders/{id}", &[2, 4], &["application/json"]),
                live("DELETE", "/api/orders/{id}", &[2], &[]),
                live(
                    "GET",
                    "/api/orders/export",
                    &[2, 5],
                    &["text/csv", "text/html"],
                ),
                live("GET", "/api/admin/users", &[2], &["application/json"]),
                live("GET", "/api/orders/{uuid}/x", &[2], &[]),
            ],
        );
        let by = |t: &str, m: &str| {
            verdicts
                .iter()
                .find(|v| v.template == t && v.method == m)
                .unwrap()
        };
        assert_eq!(by("/api/orders/{id}", "GET").status, Status::Documented);
        assert_eq!(by("/api/orders/{id}", "DELETE").status, Status::Zombie);
        let export = by("/api/orders/export", "GET");
        assert_eq!(export.status, Status::Drift);
        assert_eq!(
            export.drift,
            vec!["status 5xx"],
            "text/* covers text/csv and text/html"
        );
        assert_eq!(by("/api/admin/users", "GET").status, Status::Shadow);
        assert_eq!(by("/api/orders/{uuid}/x", "GET").status, Status::Shadow);
        assert_eq!(by("/api/health", "GET").status, Status::Unused);
        assert_eq!(verdicts.len(), 6);
        // A content type the spec does not list is drift too.
        let v = classify(
            Some(&s),
            &[live("GET", "/api/orders/7", &[2], &["text/html"])],
        );
        assert_eq!(v[0].drift, vec!["content type text/html"]);
        // No spec: everything live is shadow, nothing is unused.
        let v = classify(None, &[live("GET", "/x", &[2], &[])]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].status, Status::Shadow);
    }

    #[test]
    fn swagger_two_with_base_path_and_produces() {
        let s = Spec::from_document(&json!({
            "swagger": "2.0", "info": {"title": "t", "version": 1}, "basePath": "/v1/",
            "produces": ["application/json"],
            "paths": {"/pets/{petId}": {"get": {"responses": {"200": {}}}, "put": {"produces": ["application/xml"], "responses": {}}}}
        }))
        .unwrap();
        assert_eq!(s.version, "1");
        let get = &s.operations[s.find("GET", "/v1/pets/{id}").unwrap()];
        assert_eq!(get.response_types, vec!["application/json"]);
        let put = &s.operations[s.find("PUT", "/v1/pets/{id}").unwrap()];
        assert_eq!(put.response_types, vec!["application/xml"]);
    }

    #[test]
    fn bad_documents_are_refused_with_where() {
        let bad = [
            (json!([1]), "(document)"),
            (json!({"info": {}}), "(document)"),
            (json!({"openapi": "4.0"}), "openapi"),
            (json!({"swagger": "1.2"}), "swagger"),
            (json!({"openapi": "3.0.3", "paths": []}), "paths"),
            (json!({"openapi": "3.0.3", "paths": {"x": {}}}), "paths.x"),
            (
                json!({"openapi": "3.0.3", "paths": {"/x": {"get": 1}}}),
                "paths./x.get",
            ),
            (
                json!({"openapi": "3.0.3", "paths": {"/x": {"get": {"deprecated": "yes"}}}}),
                "paths./x.get.deprecated",
            ),
            (
                json!({"openapi": "3.0.3", "paths": {"/x": {"get": {"responses": {"ok": {}}}}}}),
                "paths./x.get.responses.ok",
            ),
        ];
        for (doc, at) in bad {
            let e = Spec::from_document(&doc).unwrap_err();
            assert_eq!(e.at, at, "{doc}: {e}");
        }
        // Control: the smallest valid document.
        assert!(
            Spec::from_document(&json!({"openapi": "3.0.3"}))
                .unwrap()
                .operations
                .is_empty()
        );
    }

    #[test]
    fn status_ranges_and_defaults() {
        let op = |statuses: &[&str]| SpecOperation {
            method: "GET".into(),
            path: "/".into(),
            deprecated: false,
            statuses: statuses.iter().map(|s| s.to_string()).collect(),
            response_types: Vec::new(),
            segments: Vec::new(),
        };
        assert!(op(&["200"]).allows_class(2));
        assert!(!op(&["200"]).allows_class(5));
        assert!(op(&["5XX"]).allows_class(5));
        assert!(op(&["default"]).allows_class(5));
        assert!(
            op(&[]).allows_class(4),
            "no responses listed: nothing to drift from"
        );
    }
}
