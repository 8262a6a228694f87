//! Registration entries (which workload gets which SPIFFE ID) and SPIRE-style selectors.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use identity::{SpiffeId, TrustDomain};

/// Default X509-SVID lifetime when an entry does not set one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Shortest lifetime an entry may ask for: renewal happens at half-life.
const MIN_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EntriesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A property of a workload the agent can verify itself (never one the workload claims).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    UnixUid(u32),
    UnixGid(u32),
    /// Absolute path of the process's executable (`/proc/<pid>/exe`).
    UnixPath(PathBuf),
    /// SPIRE's `k8s:<kind>:<value>` (ns, sa, pod-uid, pod-name, pod-label (`key:value`),
    /// container-name, container-image, node-name), from the caller's pod (`k8s.rs`).
    K8s(String, String),
}

/// The `k8s:` selector kinds the agent attests.
pub const K8S_KINDS: [&str; 8] = [
    "ns",
    "sa",
    "pod-uid",
    "pod-name",
    "pod-label",
    "container-name",
    "container-image",
    "node-name",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spiffe_id: SpiffeId,
    pub selectors: BTreeSet<Selector>,
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Entries {
    pub trust_domain: TrustDomain,
    pub entries: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    trust_domain: TrustDomain,
    #[serde(default)]
    entries: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    spiffe_id: SpiffeId,
    selectors: Vec<String>,
    #[serde(default)]
    x509_svid_ttl: Option<String>,
}

/// A selector the agent cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSelector {
    #[error(
        "selector {0:?}: expected unix:uid:N, unix:gid:N, unix:path:/abs/exe or k8s:KIND:VALUE (KIND: ns, sa, pod-uid, pod-name, pod-label, container-name, container-image, node-name)"
    )]
    Malformed(String),
}

/// An `x509_svid_ttl` the agent cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTtl {
    #[error("{0:?} needs a unit (s, m, h)")]
    NoUnit(String),
    #[error("{0:?} does not start with a number")]
    NotANumber(String),
    #[error("{text:?} has unknown unit {unit:?} (s, m, h)")]
    UnknownUnit { text: String, unit: String },
    #[error("{0:?} is outside 2s..30 days")]
    OutOfRange(String),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, BadSelector> {
        let bad = || BadSelector::Malformed(s.to_owned());
        match s.split_once(':').ok_or_else(bad)? {
            ("unix", rest) => match rest.split_once(':').ok_or_else(bad)? {
                ("uid", n) => n.parse().map(Selector::UnixUid).map_err(|_| bad()),
                ("gid", n) => n.parse().map(Selector::UnixGid).map_err(|_| bad()),
                ("path", p) if p.starts_with('/') => Ok(Selector::UnixPath(PathBuf::from(p))),
                _ => Err(bad()),
            },
            ("k8s", rest) => match rest.split_once(':').ok_or_else(bad)? {
                (kind, value) if K8S_KINDS.contains(&kind) && !value.is_empty() => {
                    Ok(Selector::K8s(kind.to_owned(), value.to_owned()))
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl Entries {
    pub fn load(path: &Path) -> Result<Self, EntriesError> {
        let text = std::fs::read_to_string(path).map_err(|source| EntriesError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(name: &str, text: &str) -> Result<Self, EntriesError> {
        let invalid = |message: String| EntriesError::Invalid {
            path: name.to_owned(),
            message,
        };
        let file: File = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut entries = Vec::with_capacity(file.entries.len());
        for (i, e) in file.entries.into_iter().enumerate() {
            if e.spiffe_id.trust_domain_str() != file.trust_domain.as_str() {
                return Err(invalid(format!(
                    "entries[{i}].spiffe_id: {} is not in {}",
                    e.spiffe_id, file.trust_domain
                )));
            }
            if e.selectors.is_empty() {
                // An entry without selectors would match every caller.
                return Err(invalid(format!(
                    "entries[{i}].selectors: at least one selector is required"
                )));
            }
            let selectors = e
                .selectors
                .iter()
                .map(|s| Selector::parse(s))
                .collect::<Result<_, _>>()
                .map_err(|m| invalid(format!("entries[{i}].selectors: {m}")))?;
            let selectors: BTreeSet<Selector> = selectors;
            if selectors.iter().all(|s| matches!(s, Selector::UnixPath(_))) {
                // A path alone is not an identity: the same path names different binaries in
                // different containers, and any user can run (or LD_PRELOAD into) a binary.
                return Err(invalid(format!(
                    "entries[{i}].selectors: a unix:path selector needs a unix:uid or unix:gid selector beside it"
                )));
            }
            let ttl = match e.x509_svid_ttl.as_deref() {
                None => DEFAULT_TTL,
                Some(t) => {
                    parse_ttl(t).map_err(|m| invalid(format!("entries[{i}].x509_svid_ttl: {m}")))?
                }
            };
            entries.push(Entry {
                spiffe_id: e.spiffe_id,
                selectors,
                ttl,
            });
        }
        Ok(Self {
            trust_domain: file.trust_domain,
            entries,
        })
    }

    /// Whether any entry needs `k8s:` selectors (which need the kubelet).
    pub fn uses_k8s(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.selectors.iter().any(|s| matches!(s, Selector::K8s(..))))
    }

    /// Entries whose every selector the caller has (SPIRE's rule), in file order.
    pub fn matching<'a>(&'a self, caller: &BTreeSet<Selector>) -> Vec<&'a Entry> {
        self.entries
            .iter()
            .filter(|e| e.selectors.is_subset(caller))
            .collect()
    }
}

/// `30s`, `10m`, `1h`.
fn parse_ttl(s: &str) -> Result<Duration, BadTtl> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| BadTtl::NoUnit(s.to_owned()))?,
    );
    let n: u64 = num.parse().map_err(|_| BadTtl::NotANumber(s.to_owned()))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => {
            return Err(BadTtl::UnknownUnit {
                text: s.to_owned(),
                unit: unit.to_owned(),
            });
        }
    };
    let ttl = Duration::from_secs(secs);
    if ttl < MIN_TTL || ttl > Duration::from_secs(30 * 86400) {
        return Err(BadTtl::OutOfRange(s.to_owned()));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "trust_domain: cluster.local\nentries:\n  - spiffe_id: spiffe://cluster.local/ns/demo/sa/frontend\n    selectors: [\"unix:uid:1000\"]\n    x509_svid_ttl: 1h\n  - spiffe_id: spiffe://cluster.local/ns/demo/sa/tool\n    selectors: [\"unix:uid:1000\", \"unix:path:/usr/bin/tool\"]\n";

    #[test]
    fn entries_match_by_selector_subset() {
        let e = Entries::parse("e.yaml", GOOD).unwrap();
        let caller = BTreeSet::from([Selector::UnixUid(1000), Selector::UnixGid(1000)]);
        let ids: Vec<_> = e
            .matching(&caller)
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(ids, ["spiffe://cluster.local/ns/demo/sa/frontend"]);
        let mut tool = caller.clone();
        tool.insert(Selector::UnixPath("/usr/bin/tool".into()));
        assert_eq!(e.matching(&tool).len(), 2);
        assert!(
            e.matching(&BTreeSet::from([Selector::UnixUid(0)]))
                .is_empty()
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_field() {
        for (bad, want) in [
            (
                GOOD.replace("uid:1000\"]\n    x509", "uid:x\"]\n    x509"),
                "entries[0].selectors",
            ),
            (
                GOOD.replace(
                    "spiffe://cluster.local/ns/demo/sa/frontend",
                    "spiffe://other/x",
                ),
                "entries[0].spiffe_id",
            ),
            (
                GOOD.replace("1h", "1 fortnight"),
                "entries[0].x509_svid_ttl",
            ),
            (GOOD.replace("1h", "1s"), "outside"),
            (
                GOOD.replace("[\"unix:uid:1000\"]\n    x509", "[]\n    x509"),
                "at least one selector",
            ),
            (
                GOOD.replace(
                    "unix:uid:1000\"]\n    x509",
                    "k8s:namespace:demo\"]\n    x509",
                ),
                "k8s:KIND:VALUE",
            ),
            (format!("{GOOD}surprise: 1\n"), "unknown field"),
            (
                GOOD.replace("[\"unix:uid:1000\", \"unix:path", "[\"unix:path"),
                "needs a unix:uid or unix:gid",
            ),
        ] {
            let err = Entries::parse("e.yaml", &bad).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
