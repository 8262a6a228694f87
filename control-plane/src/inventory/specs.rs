//! API specs from `<config-dir>/openapi/` (`*.yaml`, `*.yml`, `*.json`; OpenAPI 3.x or Swagger
//! 2.0). A spec documents a service when a ServiceEntry names it in the annotation
//! `eastguard.io/openapi: FILE`, or when the file is named after one of the service's hosts
//! (`orders.shop.svc.cluster.local.yaml`). Re-read when a file changes; a bad file is refused
//! with its name and line, and the last good version of it stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use apisec::spec::{Spec, SpecError};

use crate::kube::cluster::{Cluster, owner_of};
use crate::registry::{Registry, ServiceEntry};

/// The annotation on a ServiceEntry naming its spec file (in `openapi/`).
pub const SPEC_ANNOTATION: &str = "eastguard.io/openapi";
/// Larger files are refused.
const MAX_FILE: u64 = 8 * 1024 * 1024;
/// Files read from the directory; more are ignored with an error.
const MAX_FILES: usize = 1000;

#[derive(Default)]
pub struct Specs {
    dir: PathBuf,
    /// File name → (mtime, size) last read, the last good spec, and the current error.
    files: BTreeMap<String, FileState>,
    pub errors: BTreeMap<String, String>,
}

struct FileState {
    stamp: (Option<SystemTime>, u64),
    good: Option<Arc<Spec>>,
}

/// The line of `needle` in `text` at or after line `from` (1-based), if it is there.
fn line_of(text: &str, needle: &str, from: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
}

/// Where a structural error is in the file: `paths./orders/{id}.get.responses.ok` → the line of
/// `ok` after the line of `get` after the line of `/orders/{id}`.
fn locate(text: &str, at: &str) -> Option<usize> {
    let mut parts: Vec<&str> = Vec::new();
    if let Some(rest) = at.strip_prefix("paths.") {
        parts.push("paths");
        // The path itself holds dots only rarely; it ends at the method that follows it.
        let (path, tail) = match rest.rfind(".") {
            Some(_) => {
                let methods = [
                    ".get", ".put", ".post", ".delete", ".options", ".head", ".patch", ".trace",
                ];
                match methods.iter().filter_map(|m| rest.find(m)).min() {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, ""),
                }
            }
            None => (rest, ""),
        };
        parts.push(path);
        parts.extend(tail.split('.').filter(|p| !p.is_empty()));
    } else {
        parts.extend(at.split('.').filter(|p| !p.starts_with('(')));
    }
    let mut line = 1;
    for p in parts {
        line = line_of(text, p, line)?;
    }
    Some(line)
}

/// Why a spec file was not taken (reported per file; the others still count).
#[derive(Debug, thiserror::Error)]
enum SpecFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("larger than {MAX_FILE} bytes")]
    TooLarge,
    #[error("line {line}: {source}")]
    YamlAt {
        line: usize,
        source: serde_yaml::Error,
    },
    #[error("{0}")]
    Yaml(serde_yaml::Error),
    #[error("line {line}: {source}")]
    SpecAt { line: usize, source: SpecError },
    #[error("{0}")]
    Spec(SpecError),
}

/// Reads one spec file.
fn read(path: &Path) -> Result<Spec, SpecFileError> {
    let meta = std::fs::metadata(path)?;
    if meta.len() > MAX_FILE {
        return Err(SpecFileError::TooLarge);
    }
    let text = std::fs::read_to_string(path)?;
    let doc: serde_json::Value = serde_yaml::from_str(&text).map_err(|e| match e.location() {
        Some(l) => SpecFileError::YamlAt {
            line: l.line(),
            source: e,
        },
        None => SpecFileError::Yaml(e),
    })?;
    Spec::from_document(&doc).map_err(|e| match locate(&text, &e.at) {
        Some(line) => SpecFileError::SpecAt { line, source: e },
        None => SpecFileError::Spec(e),
    })
}

impl Specs {
    pub fn new(config_dir: &Path) -> Self {
        Self {
            dir: config_dir.join("openapi"),
            ..Default::default()
        }
    }

    /// Re-reads changed files; whether anything changed.
    pub fn refresh(&mut self) -> bool {
        let mut seen = Vec::new();
        let mut changed = false;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            // No directory: no specs (and none of the old ones stay).
            Err(_) => {
                changed = !self.files.is_empty() || !self.errors.is_empty();
                self.files.clear();
                self.errors.clear();
                return changed;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if !matches!(ext, "yaml" | "yml" | "json") || !path.is_file() {
                continue;
            }
            if seen.len() >= MAX_FILES {
                self.errors
                    .insert(name, format!("more than {MAX_FILES} spec files; ignored"));
                continue;
            }
            seen.push(name.clone());
            let meta = entry.metadata().ok();
            let stamp = (
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.as_ref().map_or(0, |m| m.len()),
            );
            if self.files.get(&name).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            changed = true;
            let state = self
                .files
                .entry(name.clone())
                .or_insert(FileState { stamp, good: None });
            state.stamp = stamp;
            match read(&path) {
                Ok(spec) => {
                    state.good = Some(Arc::new(spec));
                    self.errors.remove(&name);
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "API spec refused; the last good version of it stays");
                    self.errors.insert(name, e.to_string());
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|n, _| seen.contains(n));
        self.errors
            .retain(|n, _| seen.contains(n) || !self.files.contains_key(n));
        changed || before != self.files.len()
    }

    /// The spec file documenting `host`, and the spec.
    pub fn for_service(&self, host: &str, reg: &Registry) -> Option<(String, Arc<Spec>)> {
        let named = reg
            .services
            .iter()
            .find(|s| s.hosts.iter().any(|h| h == host))
            .and_then(|s| s.meta.annotations.get(SPEC_ANNOTATION));
        let candidates = named.cloned().into_iter().chain(
            ["yaml", "yml", "json"]
                .iter()
                .map(|ext| format!("{host}.{ext}")),
        );
        for name in candidates {
            if let Some(spec) = self.files.get(&name).and_then(|f| f.good.clone()) {
                return Some((name, spec));
            }
        }
        None
    }

    /// Hosts that have a spec (so their unused operations can be listed).
    pub fn documented_hosts(&self, reg: &Registry) -> Vec<String> {
        let mut hosts: Vec<String> = reg
            .services
            .iter()
            .flat_map(|s| s.hosts.iter())
            .filter(|h| self.for_service(h, reg).is_some())
            .cloned()
            .collect();
        for name in self.files.keys() {
            let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
            if !hosts.iter().any(|h| h == stem)
                && !reg
                    .services
                    .iter()
                    .any(|s| s.meta.annotations.get(SPEC_ANNOTATION) == Some(name))
                && self.files[name].good.is_some()
            {
                hosts.push(stem.to_owned());
            }
        }
        hosts.sort();
        hosts.dedup();
        hosts
    }
}

/// Who owns a service: the ServiceEntry's `eastguard.io/owner`, `owner` or `team` label or
/// annotation, else its namespace's (with `--kubernetes`). `None` makes the service an orphan.
pub fn owner(host: &str, reg: &Registry, cluster: Option<&Cluster>) -> Option<String> {
    let s: &ServiceEntry = reg
        .services
        .iter()
        .find(|s| s.hosts.iter().any(|h| h == host))?;
    owner_of(Some(&s.meta.labels), Some(&s.meta.annotations)).or_else(|| {
        cluster
            .and_then(|c| c.namespace_owner(&s.meta.namespace))
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structural_errors_point_at_their_line() {
        let text = "openapi: 3.0.3\ninfo: {title: t, version: '1'}\npaths:\n  /a:\n    get:\n      responses: {}\n  /orders/{id}:\n    get:\n      deprecated: yes\n";
        assert_eq!(locate(text, "paths./orders/{id}.get.deprecated"), Some(9));
        assert_eq!(locate(text, "paths./a.get"), Some(5));
        assert_eq!(locate(text, "openapi"), Some(1));
    }

    #[test]
    fn a_bad_file_keeps_the_last_good_one() {
        let dir = std::env::temp_dir().join(format!("eg-specs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("openapi")).unwrap();
        let file = dir.join("openapi/orders.shop.yaml");
        std::fs::write(
            &file,
            "openapi: 3.0.3\npaths:\n  /o: {get: {responses: {'200': {}}}}\n",
        )
        .unwrap();
        let mut specs = Specs::new(&dir);
        assert!(specs.refresh());
        let reg = Registry::default();
        let (name, spec) = specs.for_service("orders.shop", &reg).unwrap();
        assert_eq!(
            (name.as_str(), spec.operations.len()),
            ("orders.shop.yaml", 1)
        );
        std::fs::write(
            &file,
            "openapi: 3.0.3\npaths:\n  /o: {get: {deprecated: maybe, x: 1}}\n# more\n",
        )
        .unwrap();
        assert!(specs.refresh());
        assert_eq!(
            specs.errors["orders.shop.yaml"],
            "line 3: paths./o.get.deprecated: not a boolean"
        );
        assert_eq!(
            specs
                .for_service("orders.shop", &reg)
                .unwrap()
                .1
                .operations
                .len(),
            1
        );
        std::fs::write(&file, "openapi: 3.0.3\npaths: [\n").unwrap();
        specs.refresh();
        assert!(
            specs.errors["orders.shop.yaml"].starts_with("line "),
            "{:?}",
            specs.errors
        );
        assert_eq!(specs.documented_hosts(&reg), vec!["orders.shop"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
