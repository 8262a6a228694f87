//! The service registry and policies, read from a directory of Istio YAML files:
//! `networking.istio.io` ServiceEntry and WorkloadEntry, `security.istio.io` AuthorizationPolicy and
//! PeerAuthentication. Each file is parsed whole; a file with an error keeps its last good content
//! (the error names the file, the document and the field), so a bad edit never takes a service or
//! a policy away.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use policy::istio::{AuthorizationPolicy, peer_authn::PeerAuthentication};
use serde::Deserialize;

/// Everything the control plane knows.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub services: Vec<ServiceEntry>,
    pub workloads: Vec<WorkloadEntry>,
    pub authorization: Vec<AuthorizationPolicy>,
    pub peer_authentication: Vec<PeerAuthentication>,
    /// `telemetry.istio.io` Telemetry (access logging).
    pub telemetry: Vec<Telemetry>,
}

/// A Telemetry resource: which workloads (`selector`, else its whole namespace; in the root
/// namespace, the mesh) and its access-logging rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    pub meta: Meta,
    pub selector: Option<BTreeMap<String, String>>,
    pub access_logging: Vec<AccessLogging>,
}

/// One `accessLogging` entry: on (Istio's built-in `envoy` provider) or `disabled`, for the
/// sides `match.mode` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogging {
    pub sides: Vec<crate::generate::telemetry::Side>,
    pub disabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TelemetrySpec {
    #[serde(default)]
    selector: Option<MatchLabels>,
    #[serde(default)]
    access_logging: Vec<AccessLoggingSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MatchLabels {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AccessLoggingSpec {
    #[serde(default)]
    providers: Vec<ProviderRef>,
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default, rename = "match")]
    match_: Option<ModeMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderRef {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeMatch {
    #[serde(default)]
    mode: Option<String>,
}

fn telemetry(meta: Meta, spec: serde_json::Value) -> Result<Telemetry, FieldError> {
    use crate::generate::telemetry::Side;
    let s: TelemetrySpec = serde_json::from_value(spec).map_err(|e| {
        FieldError::at("spec", format!("{e} (eastguard reads `selector` and `accessLogging`; tracing is set in each sidecar's bootstrap, metrics are Istio's standard set)"))
    })?;
    let mut access_logging = Vec::new();
    for (i, a) in s.access_logging.iter().enumerate() {
        for p in &a.providers {
            if p.name != "envoy" {
                return Err(FieldError::at(
                    format!("spec.accessLogging[{i}].providers"),
                    format!(
                        "{:?} is not a provider here (only Istio's built-in `envoy`; its file and format are the control plane's --access-log-* flags)",
                        p.name
                    ),
                ));
            }
        }
        let sides = match a.match_.as_ref().and_then(|m| m.mode.as_deref()) {
            None | Some("CLIENT_AND_SERVER") => vec![Side::Client, Side::Server],
            Some("CLIENT") => vec![Side::Client],
            Some("SERVER") => vec![Side::Server],
            Some(other) => {
                return Err(FieldError::at(
                    format!("spec.accessLogging[{i}].match.mode"),
                    format!("{other:?} is not CLIENT, SERVER or CLIENT_AND_SERVER"),
                ));
            }
        };
        access_logging.push(AccessLogging {
            sides,
            disabled: a.disabled.unwrap_or(false),
        });
    }
    Ok(Telemetry {
        meta,
        selector: s.selector.map(|m| m.match_labels),
        access_logging,
    })
}

impl Registry {
    /// Adds another source's resources (files and Kubernetes together).
    pub fn extend(&mut self, other: &Registry) {
        self.services.extend(other.services.iter().cloned());
        self.workloads.extend(other.workloads.iter().cloned());
        self.authorization
            .extend(other.authorization.iter().cloned());
        self.peer_authentication
            .extend(other.peer_authentication.iter().cloned());
        self.telemetry.extend(other.telemetry.iter().cloned());
    }

    /// The WorkloadEntry `namespace/name`.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&WorkloadEntry> {
        self.workloads
            .iter()
            .find(|w| w.meta.namespace == namespace && w.meta.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub meta: Meta,
    pub hosts: Vec<String>,
    /// Virtual IPs (`spec.addresses`, single addresses): the service also answers to them, so a
    /// captured app calling the VIP is routed like one calling the name.
    pub addresses: Vec<std::net::IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Workloads (WorkloadEntries in the same namespace) whose labels include these.
    pub selector: Option<BTreeMap<String, String>>,
    /// Inline endpoints, as WorkloadEntries of the service's namespace.
    pub endpoints: Vec<WorkloadSpec>,
    /// A Kubernetes Service's ready endpoint addresses (its EndpointSlices): a selected workload
    /// at any other address gets no traffic. `None` (ServiceEntries): every selected workload.
    pub ready: Option<BTreeSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub number: u16,
    pub name: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    /// HTTP, HTTP2 and GRPC are HTTP; anything else is carried as TCP.
    pub fn is_http(&self) -> bool {
        matches!(
            self.protocol
                .as_deref()
                .map(str::to_ascii_uppercase)
                .as_deref(),
            Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB")
        )
    }

    pub fn is_h2(&self) -> bool {
        matches!(
            self.protocol
                .as_deref()
                .map(str::to_ascii_uppercase)
                .as_deref(),
            Some("HTTP2" | "GRPC")
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadEntry {
    pub meta: Meta,
    pub spec: WorkloadSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub address: String,
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
}

impl WorkloadEntry {
    pub fn service_account(&self) -> &str {
        self.spec.service_account.as_deref().unwrap_or("default")
    }
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceEntrySpec {
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    resolution: Option<String>,
    #[serde(default)]
    endpoints: Vec<WorkloadSpec>,
    #[serde(default)]
    workload_selector: Option<Selector>,
    #[serde(default)]
    export_to: Vec<String>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// One file's content.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileContent {
    services: Vec<ServiceEntry>,
    workloads: Vec<WorkloadEntry>,
    authorization: Vec<AuthorizationPolicy>,
    peer_authentication: Vec<PeerAuthentication>,
    telemetry: Vec<Telemetry>,
}

/// Parses one file (all its documents) or says what is wrong with it.
fn parse_file(path: &Path, text: &str) -> Result<FileContent, FileError> {
    let file = path.display().to_string();
    let in_file = |document: Option<usize>, reason: String| FileError {
        file: file.clone(),
        document,
        resource: None,
        field: None,
        reason,
    };
    let mut out = FileContent::default();
    let mut documents = 0;
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_json::Value::deserialize(doc).map_err(|e| in_file(Some(index), e.to_string()))?;
        if value.is_null() {
            continue;
        }
        documents += 1;
        document(value, &mut out).map_err(|e| match e {
            DocError::Shape(reason) => in_file(Some(index), reason),
            DocError::Field { resource, error } => FileError {
                file: file.clone(),
                document: Some(index),
                resource: Some(resource),
                field: error.field,
                reason: error.reason,
            },
        })?;
    }
    if documents == 0 {
        // An empty file is what a truncated write looks like; taking it as "no resources" would
        // drop a DENY (or the only ALLOW) in one step.
        return Err(in_file(
            None,
            "the file has no documents (delete it to remove what it held)".into(),
        ));
    }
    Ok(out)
}

impl FileContent {
    /// Adds what this content holds to a registry.
    pub(crate) fn add_to(self, reg: &mut Registry) {
        reg.services.extend(self.services);
        reg.workloads.extend(self.workloads);
        reg.authorization.extend(self.authorization);
        reg.peer_authentication.extend(self.peer_authentication);
        reg.telemetry.extend(self.telemetry);
    }
}

/// Why one document (of a file, or an object from the Kubernetes API) was not taken.
#[derive(Debug)]
pub(crate) enum DocError {
    /// Not a resource at all.
    Shape(String),
    /// A resource (`Kind namespace/name`) with a wrong field.
    Field { resource: String, error: FieldError },
}

impl std::fmt::Display for DocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DocError::Shape(r) => f.write_str(r),
            DocError::Field { resource, error } => match &error.field {
                Some(field) => write!(f, "{resource}: {field}: {}", error.reason),
                None => write!(f, "{resource}: {}", error.reason),
            },
        }
    }
}

/// Reads one resource into `out`.
pub(crate) fn document(value: serde_json::Value, out: &mut FileContent) -> Result<(), DocError> {
    let mut d: Document =
        serde_json::from_value(value.clone()).map_err(|e| DocError::Shape(e.to_string()))?;
    let resource = format!(
        "{} {}/{}",
        d.kind,
        if d.metadata.namespace.is_empty() {
            "default"
        } else {
            &d.metadata.namespace
        },
        d.metadata.name
    );
    let invalid = |error: FieldError| DocError::Field {
        resource: resource.clone(),
        error,
    };
    if d.metadata.name.is_empty() {
        return Err(invalid(FieldError::whole("metadata.name is required")));
    }
    if d.metadata.namespace.is_empty() {
        d.metadata.namespace = "default".into();
    }
    let group = d.api_version.split('/').next().unwrap_or_default();
    let meta = Meta {
        name: d.metadata.name.clone(),
        namespace: d.metadata.namespace.clone(),
        labels: d.metadata.labels.clone(),
        annotations: d.metadata.annotations.clone(),
    };
    let spec = if d.spec.is_null() {
        serde_json::json!({})
    } else {
        d.spec.clone()
    };
    match (group, d.kind.as_str()) {
        ("networking.istio.io", "ServiceEntry") => {
            let s: ServiceEntrySpec = serde_json::from_value(spec)
                .map_err(|e| invalid(FieldError::at("spec", e.to_string())))?;
            if s.hosts.is_empty() {
                return Err(invalid(FieldError::at(
                    "spec.hosts",
                    "at least one host is required",
                )));
            }
            for (i, p) in s.ports.iter().enumerate() {
                if p.number == 0 {
                    return Err(invalid(FieldError::at(
                        format!("spec.ports[{i}].number"),
                        "must be 1-65535",
                    )));
                }
            }
            for (i, e) in s.endpoints.iter().enumerate() {
                check_address(&e.address, format!("spec.endpoints[{i}].address"))
                    .map_err(&invalid)?;
            }
            let mut addresses = Vec::new();
            for (i, a) in s.addresses.iter().enumerate() {
                // Istio also takes CIDRs here; only single addresses name a service.
                let ip = a
                    .strip_suffix("/32")
                    .or_else(|| a.strip_suffix("/128"))
                    .unwrap_or(a);
                addresses.push(ip.parse::<std::net::IpAddr>().map_err(|_| {
                    invalid(FieldError::at(
                        format!("spec.addresses[{i}]"),
                        format!("{a:?} is not an IP address (CIDR ranges are not supported)"),
                    ))
                })?);
            }
            let _ = (
                &s.location,
                &s.resolution,
                &s.export_to,
                &s.subject_alt_names,
            );
            out.services.push(ServiceEntry {
                meta,
                hosts: s.hosts,
                addresses,
                ports: s.ports,
                selector: s.workload_selector.map(|w| w.labels),
                endpoints: s.endpoints,
                ready: None,
            });
        }
        ("networking.istio.io", "WorkloadEntry") => {
            let s: WorkloadSpec = serde_json::from_value(spec)
                .map_err(|e| invalid(FieldError::at("spec", e.to_string())))?;
            check_address(&s.address, "spec.address").map_err(&invalid)?;
            out.workloads.push(WorkloadEntry { meta, spec: s });
        }
        ("security.istio.io", "AuthorizationPolicy" | "PeerAuthentication") => {
            // The policy crate parses these; give it this one document, namespace filled in.
            let mut v = value;
            v["metadata"]["namespace"] = serde_json::Value::String(meta.namespace.clone());
            let text =
                serde_yaml::to_string(&v).map_err(|e| invalid(FieldError::whole(e.to_string())))?;
            let refused = |e: policy::istio::IstioError| {
                invalid(FieldError::whole(strip_doc(&e.to_string())))
            };
            if d.kind == "AuthorizationPolicy" {
                out.authorization
                    .extend(policy::istio::parse(&text).map_err(refused)?);
            } else {
                out.peer_authentication
                    .extend(policy::istio::peer_authn::parse(&text).map_err(refused)?);
            }
        }
        ("telemetry.istio.io", "Telemetry") => {
            out.telemetry.push(telemetry(meta, spec).map_err(&invalid)?);
        }
        _ => {
            return Err(invalid(FieldError::whole(format!(
                "unsupported kind {:?} (apiVersion {:?}); ServiceEntry, WorkloadEntry, AuthorizationPolicy, PeerAuthentication and Telemetry are read",
                d.kind, d.api_version
            ))));
        }
    }
    Ok(())
}

/// The policy crate numbers documents of the text it was given (always 0 here).
fn strip_doc(msg: &str) -> &str {
    msg.strip_prefix("document 0: ").unwrap_or(msg)
}

fn check_address(a: &str, field: impl Into<String>) -> Result<(), FieldError> {
    a.parse::<std::net::IpAddr>().map(|_| ()).map_err(|_| {
        FieldError::at(
            field,
            format!("{a:?} is not an IP address (DNS names are not resolved)"),
        )
    })
}

/// What is wrong inside one resource: a field (or the whole resource) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) field: Option<String>,
    pub(crate) reason: String,
}

impl FieldError {
    fn at(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            reason: reason.into(),
        }
    }

    fn whole(reason: impl Into<String>) -> Self {
        Self {
            field: None,
            reason: reason.into(),
        }
    }
}

/// A config file the control plane refused, and where in it; the file's last good content stays
/// in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub file: String,
    /// The YAML document (0-based), if the fault is in one.
    pub document: Option<usize>,
    /// `Kind namespace/name` of the resource, once it is known.
    pub resource: Option<String>,
    pub field: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.file)?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(r) = &self.resource {
            write!(f, " ({r})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for FileError {}

/// The config directory could not be listed (what was read from it stays in force).
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", dir.display())]
pub struct DirectoryError {
    pub dir: PathBuf,
    pub source: std::io::Error,
}

/// A directory of YAML files, re-read when they change.
///
/// A change is applied only once it has been read the same on two polls in a row, so a file
/// caught half-written (an editor's truncate-then-write, a slow copy) is never pushed; a file that
/// is empty (no documents) is refused like a broken one, its last good content staying in force
/// (delete the file to remove what it held); and a file that disappears is dropped only when it
/// is still gone on the next poll (an editor's delete-then-rename is not a moment without its
/// policies). The first read, before anything is served, applies at once.
pub struct Directory {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (String, FileContent)>,
    /// Changes seen once, waiting for the next poll to confirm them.
    pending: BTreeMap<PathBuf, Pending>,
    /// Whether a refresh has run (the first applies without waiting).
    primed: bool,
    /// The last error of each file that has one.
    pub errors: BTreeMap<PathBuf, String>,
}

/// A change seen on one poll.
#[derive(Debug, PartialEq, Eq)]
enum Pending {
    /// New content, by hash.
    Content(String),
    Gone,
}

impl Directory {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            pending: BTreeMap::new(),
            primed: false,
            errors: BTreeMap::new(),
        }
    }

    /// Re-reads the directory. Returns whether the registry changed; errors are logged and kept in
    /// `errors` (the file's last good content stays in force).
    pub fn refresh(&mut self) -> Result<bool, DirectoryError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| DirectoryError {
            dir: self.dir.clone(),
            source,
        })?;
        let confirm = std::mem::replace(&mut self.primed, true);
        let mut seen = BTreeSet::new();
        let mut changed = false;
        for entry in entries.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml") || !path.is_file() {
                continue;
            }
            seen.insert(path.clone());
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if self.files.get(&path).is_some_and(|(t, _)| *t == text) {
                self.pending.remove(&path);
                continue;
            }
            let hash = hash_prefix(&text);
            if self.errors.get(&path).is_some_and(|e| e.starts_with(&hash)) {
                continue;
            }
            if confirm && self.pending.get(&path) != Some(&Pending::Content(hash.clone())) {
                // Seen for the first time: applied if the next poll reads the same.
                self.pending.insert(path, Pending::Content(hash));
                continue;
            }
            self.pending.remove(&path);
            match parse_file(&path, &text) {
                Ok(content) => {
                    if self.errors.remove(&path).is_some() {
                        tracing::info!(file = %path.display(), "file is valid again");
                    }
                    self.files.insert(path, (text, content));
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "file rejected; its last good content stays in force");
                    self.errors.insert(path, format!("{hash}{e}"));
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            if confirm && self.pending.get(&p) != Some(&Pending::Gone) {
                self.pending.insert(p, Pending::Gone);
                continue;
            }
            tracing::info!(file = %p.display(), "file removed");
            self.pending.remove(&p);
            self.files.remove(&p);
            changed = true;
        }
        self.errors.retain(|p, _| seen.contains(p));
        self.pending
            .retain(|p, what| seen.contains(p) || *what == Pending::Gone);
        Ok(changed)
    }

    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        for (_, c) in self.files.values() {
            r.services.extend(c.services.iter().cloned());
            r.workloads.extend(c.workloads.iter().cloned());
            r.authorization.extend(c.authorization.iter().cloned());
            r.peer_authentication
                .extend(c.peer_authentication.iter().cloned());
            r.telemetry.extend(c.telemetry.iter().cloned());
        }
        r
    }

    /// The errors, without the content hash they are keyed by.
    pub fn error_messages(&self) -> Vec<String> {
        self.errors
            .values()
            .map(|e| e.split_once('|').map_or(e.as_str(), |(_, m)| m).to_owned())
            .collect()
    }
}

/// A tag that says which content an error belongs to (so an unchanged bad file is not re-parsed
/// and re-logged every poll).
fn hash_prefix(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}|", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: ns}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}\n";

    fn policies(d: &Directory) -> usize {
        d.registry().authorization.len()
    }

    #[test]
    fn half_written_empty_and_vanishing_files_never_drop_policy_in_one_step() {
        let dir = std::env::temp_dir().join(format!("eg-cp-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("authz.yaml");
        std::fs::write(&f, DENY).unwrap();
        let mut d = Directory::new(dir.clone());
        // The first read applies at once.
        assert!(d.refresh().unwrap());
        assert_eq!(policies(&d), 1);
        // Truncated: an empty file is refused, and the DENY stays.
        std::fs::write(&f, "").unwrap();
        for _ in 0..3 {
            assert!(!d.refresh().unwrap());
        }
        assert_eq!(policies(&d), 1);
        assert!(
            d.error_messages()[0].contains("no documents"),
            "{:?}",
            d.error_messages()
        );
        // A change applies once two polls read the same content.
        std::fs::write(&f, DENY.replace("/admin", "/secret")).unwrap();
        assert!(!d.refresh().unwrap(), "applied on the first sight");
        assert!(d.refresh().unwrap());
        // One that keeps changing between polls never applies.
        for i in 0..4 {
            std::fs::write(&f, DENY.replace("/admin", &format!("/p{i}"))).unwrap();
            assert!(!d.refresh().unwrap());
        }
        // Deleted: dropped only when still gone on the next poll; back in time, nothing changes.
        std::fs::write(&f, DENY.replace("/admin", "/secret")).unwrap();
        d.refresh().unwrap();
        std::fs::remove_file(&f).unwrap();
        assert!(!d.refresh().unwrap());
        assert_eq!(policies(&d), 1);
        std::fs::write(&f, DENY.replace("/admin", "/secret")).unwrap();
        assert!(!d.refresh().unwrap());
        assert_eq!(policies(&d), 1);
        std::fs::remove_file(&f).unwrap();
        assert!(!d.refresh().unwrap());
        assert!(d.refresh().unwrap());
        assert_eq!(policies(&d), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let text = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: a}\nspec: {address: 10.0.0.1}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s, namespace: ns}\nspec: {hosts: [x], portz: []}\n";
        let err = parse_file(Path::new("reg.yaml"), text).unwrap_err();
        assert_eq!(
            (err.document, err.resource.as_deref(), err.field.as_deref()),
            (Some(1), Some("ServiceEntry ns/s"), Some("spec"))
        );
        let e = err.to_string();
        assert!(
            e.starts_with("reg.yaml: document 1 (ServiceEntry ns/s): spec: unknown field `portz`"),
            "{e}"
        );
        let e = parse_file(Path::new("w.yaml"), "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: a}\nspec: {address: host.example}\n").unwrap_err().to_string();
        assert!(
            e.contains("document 0 (WorkloadEntry default/a): spec.address"),
            "{e}"
        );
        let e = parse_file(
            Path::new("k.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported kind"), "{e}");
    }

    #[test]
    fn parses_the_four_kinds() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ledger, namespace: bank}
spec:
  hosts: [ledger.bank.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  workloadSelector: {labels: {app: ledger}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ledger-1, namespace: bank}
spec: {address: 127.0.0.1, labels: {app: ledger}, serviceAccount: ledger}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: bank}
spec: {selector: {matchLabels: {app: ledger}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: bank}
spec: {mtls: {mode: STRICT}}
"#;
        let c = parse_file(Path::new("r.yaml"), text).unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.workloads[0].service_account(), "ledger");
        assert_eq!(c.authorization.len(), 1);
        assert_eq!(c.peer_authentication.len(), 1);
        assert!(c.services[0].ports[0].is_http());
    }
}
