//! Authorization drift (APIClarity's BFLA idea, keyed on verified SPIFFE IDs): a baseline of
//! which caller calls which operation of this workload, and three modes —
//!
//! - **learn**: every call RBAC allowed adds its edge (caller, service, method, template);
//! - **audit**: a call on an edge not in the baseline goes through and raises a Detection
//!   Finding (severity High when it got a 2xx), once per edge;
//! - **enforce**: such a call is refused, 403 `authorization drift: …`, and audited as a denial.
//!
//! The baseline is matched by template (`{x}` matches any one segment), so it holds across
//! restarts; `GET /drift/baseline` on the admin port gives it as JSON, which
//! `inventory.drift.baseline` reads back. At most [`MAX_EDGES`] edges, and as many flagged ones.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub const MAX_EDGES: usize = 10_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftMode {
    #[default]
    Off,
    Learn,
    Audit,
    Enforce,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    #[serde(default)]
    pub mode: DriftMode,
    /// A baseline saved from `GET /drift/baseline` (a JSON array of edges).
    #[serde(default)]
    pub baseline: Option<PathBuf>,
}

/// One caller → operation edge; `caller` is `plaintext` for callers without a verified ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Edge {
    pub caller: String,
    pub service: String,
    pub method: String,
    pub template: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a JSON array of {{caller, service, method, template}}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: more than {MAX_EDGES} edges")]
    TooMany { path: String },
}

/// caller → service → method → templates (nested, so a call is looked up without allocating).
type Edges = HashMap<String, HashMap<String, HashMap<String, Vec<String>>>>;

#[derive(Debug, Default)]
struct State {
    edges: Edges,
    count: usize,
    flagged: HashSet<Edge>,
}

#[derive(Debug)]
pub struct Drift {
    pub mode: DriftMode,
    state: Mutex<State>,
}

/// Whether `path` fits `template` (`{x}` is any one segment).
fn fits(template: &str, path: &str) -> bool {
    let mut t = template.trim_end_matches('/').split('/');
    let mut p = path.trim_end_matches('/').split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) => {
                if !(ts.starts_with('{') && ts.ends_with('}') && !ps.is_empty()) && ts != ps {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

impl Drift {
    pub fn load(config: &DriftConfig) -> Result<Self, BaselineError> {
        let mut state = State::default();
        if let Some(path) = &config.baseline {
            let p = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| BaselineError::Read {
                path: p.clone(),
                source,
            })?;
            let edges: Vec<Edge> =
                serde_json::from_str(&text).map_err(|source| BaselineError::Parse {
                    path: p.clone(),
                    source,
                })?;
            if edges.len() > MAX_EDGES {
                return Err(BaselineError::TooMany { path: p });
            }
            for e in edges {
                add(&mut state, e);
            }
        }
        Ok(Self {
            mode: config.mode,
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call of `caller` to `method path` on `service` is on a known edge.
    pub fn known(&self, caller: &str, service: &str, method: &str, path: &str) -> bool {
        let s = self.state();
        s.edges
            .get(caller)
            .and_then(|services| services.get(service))
            .and_then(|methods| methods.get(method))
            .is_some_and(|ts| ts.iter().any(|t| fits(t, path)))
    }

    /// Learn mode: adds an edge (bounded).
    pub fn learn(&self, e: Edge) {
        add(&mut self.state(), e);
    }

    /// Audit mode: whether this unknown edge is flagged for the first time.
    pub fn flag(&self, e: Edge) -> bool {
        let mut s = self.state();
        if s.flagged.len() >= MAX_EDGES || s.flagged.contains(&e) {
            return false;
        }
        s.flagged.insert(e)
    }

    pub fn baseline(&self) -> Vec<Edge> {
        let s = self.state();
        let mut out = Vec::new();
        for (caller, services) in &s.edges {
            for (service, methods) in services {
                for (method, ts) in methods {
                    out.extend(ts.iter().map(|t| Edge {
                        caller: caller.clone(),
                        service: service.clone(),
                        method: method.clone(),
                        template: t.clone(),
                    }));
                }
            }
        }
        out.sort();
        out
    }
}

fn add(s: &mut State, e: Edge) {
    if s.count >= MAX_EDGES {
        return;
    }
    let ts = s
        .edges
        .entry(e.caller)
        .or_default()
        .entry(e.service)
        .or_default()
        .entry(e.method)
        .or_default();
    if !ts.contains(&e.template) {
        ts.push(e.template);
        s.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fit_paths_segment_by_segment() {
        assert!(fits("/orders/{id}", "/orders/42"));
        assert!(fits("/orders/{id}/", "/orders/42"));
        assert!(!fits("/orders/{id}", "/orders/42/items"));
        assert!(!fits("/orders/{id}", "/orders/"));
        assert!(!fits("/orders/{id}", "/admin/42"));
        assert!(fits("/", "/"));
    }

    #[test]
    fn edges_are_per_caller_method_and_template() {
        let d = Drift::load(&DriftConfig::default()).unwrap();
        let e = |caller: &str, method: &str, template: &str| Edge {
            caller: caller.into(),
            service: "s".into(),
            method: method.into(),
            template: template.into(),
        };
        d.learn(e("a", "GET", "/orders/{id}"));
        assert!(d.known("a", "s", "GET", "/orders/7"));
        assert!(!d.known("a", "s", "DELETE", "/orders/7"));
        assert!(!d.known("b", "s", "GET", "/orders/7"));
        assert!(!d.known("a", "other", "GET", "/orders/7"));
        assert!(d.flag(e("b", "GET", "/orders/{id}")));
        assert!(!d.flag(e("b", "GET", "/orders/{id}")), "once per edge");
        assert_eq!(d.baseline(), vec![e("a", "GET", "/orders/{id}")]);
    }
}
