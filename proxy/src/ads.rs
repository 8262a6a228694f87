//! The proxy's side of ADS: holds the accepted resources of each type, turns them into the model
//! (with warming: a listener waits for its routes, a cluster for its endpoints, and until then the
//! previous version keeps serving), and installs it through the [`Runtime`]. An update that does
//! not translate or cannot be installed is NACKed and changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prost::Message;
use xds::pb::envoy::admin::v3::{
    ClustersConfigDump, EndpointsConfigDump, ListenersConfigDump, RoutesConfigDump,
    UpdateFailureState, clusters_config_dump, endpoints_config_dump, listeners_config_dump,
    routes_config_dump,
};
use xds::pb::envoy::config::cluster::v3::Cluster;
use xds::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds::pb::envoy::config::listener::v3::Listener;
use xds::pb::envoy::config::route::v3::RouteConfiguration;
use xds::pb::google::protobuf::{Any, Timestamp};
use xds::{codec, types};

use crate::config;
use crate::envoy;
use crate::runtime::{Model, Runtime};
use crate::stats::{EnvoyStats, Stat};

/// What the admin API shows of xDS, and whether the first configuration has arrived.
#[derive(Default)]
pub struct XdsState {
    /// LDS and CDS have been applied and nothing was warming (readiness waits for it).
    pub synced: AtomicBool,
    /// The ADS stream is up.
    pub connected: AtomicBool,
    types: Mutex<BTreeMap<&'static str, TypeState>>,
    /// Optional items the last translation skipped.
    notes: Mutex<Vec<String>>,
}

#[derive(Default, Clone)]
struct TypeState {
    version: String,
    updated: Option<SystemTime>,
    resources: BTreeMap<String, Any>,
    error: Option<Failure>,
}

#[derive(Clone)]
struct Failure {
    version: String,
    details: String,
    at: SystemTime,
    resources: BTreeMap<String, Any>,
    /// The resources that were rejected while the rest of the update was applied; empty when the
    /// update was rejected whole.
    rejected: BTreeSet<String>,
}

impl Failure {
    /// Whether this failure is about resource `name`.
    fn concerns(&self, name: &str) -> bool {
        if self.rejected.is_empty() {
            self.resources.contains_key(name)
        } else {
            self.rejected.contains(name)
        }
    }
}

/// A resource that does not translate: which one, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub type_url: &'static str,
    pub name: String,
    pub message: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Envoy's xDS update counters for one type.
struct UpdateStats {
    attempt: Stat,
    success: Stat,
    rejected: Stat,
}

impl UpdateStats {
    fn new(stats: &EnvoyStats, prefix: &str) -> Self {
        Self {
            attempt: stats.stat(&format!("{prefix}.update_attempt")),
            success: stats.stat(&format!("{prefix}.update_success")),
            rejected: stats.stat(&format!("{prefix}.update_rejected")),
        }
    }
}

pub struct Handler {
    runtime: Arc<Runtime>,
    updates: HashMap<&'static str, UpdateStats>,
    connected_state: Stat,
    base: Model,
    state: Arc<XdsState>,
    accepted: HashMap<&'static str, BTreeMap<String, Any>>,
    /// The dynamic part installed last (warming keeps its versions).
    active: Model,
    eds_names: BTreeSet<String>,
    rds_names: BTreeSet<String>,
    warming: usize,
}

impl Handler {
    /// `base`: the bootstrap's static listeners and clusters, installed alongside.
    pub fn new(
        runtime: Arc<Runtime>,
        base: Model,
        state: Arc<XdsState>,
        stats: &EnvoyStats,
    ) -> Self {
        let updates = [
            (types::LISTENER, "listener_manager.lds"),
            (types::ROUTE, "rds"),
            (types::CLUSTER, "cluster_manager.cds"),
            (types::ENDPOINT, "cluster_manager.eds"),
        ]
        .into_iter()
        .map(|(t, prefix)| (t, UpdateStats::new(stats, prefix)))
        .collect();
        Self {
            runtime,
            updates,
            connected_state: stats.stat("control_plane.connected_state"),
            base,
            state,
            accepted: HashMap::new(),
            active: Model::default(),
            eds_names: BTreeSet::new(),
            rds_names: BTreeSet::new(),
            warming: 0,
        }
    }

    /// Applies what translates; returns the resources now in force and those rejected. `Err`:
    /// nothing was applied.
    fn try_apply(
        &mut self,
        type_url: &'static str,
        resources: &[Any],
    ) -> Result<(BTreeMap<String, Any>, Vec<Rejected>), UpdateError> {
        let mut by_name = BTreeMap::new();
        for (i, r) in resources.iter().enumerate() {
            let name = resource_name(type_url, r)
                .map_err(|source| UpdateError::Unreadable { index: i, source })?;
            if name.is_empty() {
                return Err(UpdateError::Unnamed {
                    index: i,
                    type_name: types::short(type_url),
                });
            }
            if by_name.insert(name.clone(), r.clone()).is_some() {
                return Err(UpdateError::Duplicate { index: i, name });
            }
        }
        // Envoy's behaviour: the resources that translate are applied; one that does not keeps
        // its last accepted version (a new one is left out), and the update is NACKed naming it.
        let previous = self.accepted.get(type_url).cloned().unwrap_or_default();
        let mut offered = by_name;
        let mut rejected: Vec<Rejected> = Vec::new();
        let mut notes = Vec::new();
        let (candidate, built) = loop {
            let mut candidate = self.accepted.clone();
            candidate.insert(type_url, offered.clone());
            notes.clear();
            match build(&candidate, &self.active, &mut notes) {
                Ok(built) => break (candidate, built),
                Err(r)
                    if r.type_url == type_url
                        && offered.contains_key(&r.name)
                        && !rejected.iter().any(|x| x.name == r.name) =>
                {
                    match previous.get(&r.name) {
                        Some(old) => offered.insert(r.name.clone(), old.clone()),
                        None => offered.remove(&r.name),
                    };
                    rejected.push(r);
                }
                Err(r) => return Err(UpdateError::Invalid(r)),
            }
        };
        let mut all = self.base.clone();
        for l in &built.model.listeners {
            if all.listeners.iter().any(|s| s.name == l.name) {
                return Err(UpdateError::StaticName {
                    kind: "listener",
                    name: l.name.clone(),
                });
            }
        }
        for c in &built.model.clusters {
            if all.clusters.iter().any(|s| s.name == c.name) {
                return Err(UpdateError::StaticName {
                    kind: "cluster",
                    name: c.name.clone(),
                });
            }
        }
        all.listeners.extend(built.model.listeners.iter().cloned());
        all.clusters.extend(built.model.clusters.iter().cloned());
        self.runtime.apply(&all)?;
        let applied = candidate.get(type_url).cloned().unwrap_or_default();
        self.accepted = candidate;
        self.active = built.model;
        self.eds_names = built.eds_names;
        self.warming = built.warming;
        self.rds_names = built.rds_names;
        let mut held = lock(&self.state.notes);
        if *held != notes {
            for n in notes.iter().filter(|n| !held.contains(n)) {
                tracing::info!(note = %n, "xDS: optional item not applied");
            }
            *held = notes;
        }
        Ok((applied, rejected))
    }
}

impl xds::client::Handler for Handler {
    type Error = UpdateError;

    fn apply(
        &mut self,
        type_url: &str,
        version: &str,
        resources: Vec<Any>,
    ) -> Result<(), UpdateError> {
        let Some(type_url) = types::ALL.iter().copied().find(|t| *t == type_url) else {
            return Err(UpdateError::UnexpectedType(type_url.to_owned()));
        };
        if type_url == types::SECRET {
            return Err(UpdateError::SdsOverAds);
        }
        let counters = self.updates.get(type_url);
        if let Some(c) = counters {
            c.attempt.inc();
        }
        let result = self.try_apply(type_url, &resources);
        let clean = matches!(&result, Ok((_, rejected)) if rejected.is_empty());
        if let Some(c) = self.updates.get(type_url) {
            if clean {
                c.success.inc()
            } else {
                c.rejected.inc()
            }
        }
        let now = SystemTime::now();
        let offered = || {
            resources
                .iter()
                .map(|r| (resource_name(type_url, r).unwrap_or_default(), r.clone()))
                .collect()
        };
        let mut types_state = lock(&self.state.types);
        let entry = types_state.entry(type_url).or_default();
        match result {
            Ok((applied, rejected)) => {
                entry.resources = applied;
                entry.updated = Some(now);
                let outcome = if rejected.is_empty() {
                    entry.version = version.to_owned();
                    entry.error = None;
                    Ok(())
                } else {
                    // The version stays the last one accepted whole; the rest is in force.
                    let error = UpdateError::Partial(rejected);
                    entry.error = Some(Failure {
                        version: version.to_owned(),
                        details: error.to_string(),
                        at: now,
                        resources: offered(),
                        rejected: match &error {
                            UpdateError::Partial(r) => r.iter().map(|r| r.name.clone()).collect(),
                            _ => BTreeSet::new(),
                        },
                    });
                    Err(error)
                };
                drop(types_state);
                let have = |t| {
                    lock(&self.state.types)
                        .get(t)
                        .is_some_and(|s| s.updated.is_some())
                };
                if have(types::LISTENER) && have(types::CLUSTER) && self.warming == 0 {
                    self.state.synced.store(true, Ordering::Relaxed);
                }
                outcome
            }
            Err(error) => {
                entry.error = Some(Failure {
                    version: version.to_owned(),
                    details: error.to_string(),
                    at: now,
                    resources: offered(),
                    rejected: BTreeSet::new(),
                });
                Err(error)
            }
        }
    }

    fn interest(&self) -> Vec<(&'static str, Option<BTreeSet<String>>)> {
        vec![
            (types::CLUSTER, None),
            (types::ENDPOINT, Some(self.eds_names.clone())),
            (types::LISTENER, None),
            (types::ROUTE, Some(self.rds_names.clone())),
        ]
    }

    fn connection(&mut self, up: bool) {
        self.state.connected.store(up, Ordering::Relaxed);
        let now = self.connected_state.get();
        match (up, now) {
            (true, 0) => self.connected_state.inc(),
            (false, 1) => self.connected_state.dec(),
            _ => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn resource_name(type_url: &str, r: &Any) -> Result<String, NameError> {
    if r.type_url != type_url {
        return Err(NameError::WrongType {
            expected: types::short(type_url),
            got: r.type_url.clone(),
        });
    }
    Ok(match type_url {
        types::LISTENER => Listener::decode(r.value.as_slice())?.name,
        types::ROUTE => RouteConfiguration::decode(r.value.as_slice())?.name,
        types::CLUSTER => Cluster::decode(r.value.as_slice())?.name,
        types::ENDPOINT => ClusterLoadAssignment::decode(r.value.as_slice())?.cluster_name,
        _ => return Err(NameError::Unhandled(type_url.to_owned())),
    })
}

/// Why a resource's name could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("a {expected} response carries a {got}")]
    WrongType { expected: &'static str, got: String },
    #[error(transparent)]
    Decode(#[from] prost::DecodeError),
    #[error("{0} is not handled")]
    Unhandled(String),
}

/// Why an xDS update was NACKed. `Partial`: the rest of the update is in force; otherwise nothing
/// of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("unexpected type {0}")]
    UnexpectedType(String),
    #[error("SDS over ADS is not used: secrets come from the Workload API")]
    SdsOverAds,
    #[error("resources[{index}]: {source}")]
    Unreadable {
        index: usize,
        #[source]
        source: NameError,
    },
    #[error("resources[{index}]: a {type_name} resource needs a name")]
    Unnamed {
        index: usize,
        type_name: &'static str,
    },
    #[error("resources[{index}]: {name} appears twice")]
    Duplicate { index: usize, name: String },
    #[error("{0}")]
    Invalid(Rejected),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Partial(Vec<Rejected>),
    #[error("{kind} {name}: the name of a static {kind}")]
    StaticName { kind: &'static str, name: String },
    #[error(transparent)]
    Runtime(#[from] crate::runtime::ApplyError),
}

/// The dynamic model from a set of accepted resources, and the names to subscribe to next.
pub struct Built {
    pub model: Model,
    /// Listeners and clusters waiting for their routes or endpoints.
    pub warming: usize,
    pub eds_names: BTreeSet<String>,
    pub rds_names: BTreeSet<String>,
}

/// Translates everything; anything that does not translate is an error naming it. A listener
/// whose routes, or a cluster whose endpoints, have not arrived yet keeps its `previous` version
/// (or waits, if it is new).
pub fn build(
    resources: &HashMap<&'static str, BTreeMap<String, Any>>,
    previous: &Model,
    notes: &mut Vec<String>,
) -> Result<Built, Rejected> {
    let empty = BTreeMap::new();
    let of = |t| resources.get(t).unwrap_or(&empty);
    let rejected = |type_url: &'static str, name: &str| {
        let name = name.to_owned();
        move |e: &dyn std::fmt::Display| Rejected {
            type_url,
            message: format!("{}", e),
            name,
        }
    };
    let decode_err = |type_url: &'static str, name: &str, e: codec::CodecError| Rejected {
        type_url,
        name: name.to_owned(),
        message: format!("{name}: {e}"),
    };

    let mut endpoints = HashMap::new();
    for (name, any) in of(types::ENDPOINT) {
        let la: ClusterLoadAssignment =
            codec::unpack(any).map_err(|e| decode_err(types::ENDPOINT, name, e))?;
        endpoints.insert(
            name.clone(),
            envoy::load_assignment(&la, notes).map_err(|e| rejected(types::ENDPOINT, name)(&e))?,
        );
    }
    let mut clusters = Vec::new();
    let mut warming_count = 0;
    let mut eds_names = BTreeSet::new();
    for (name, any) in of(types::CLUSTER) {
        let c: Cluster = codec::unpack(any).map_err(|e| decode_err(types::CLUSTER, name, e))?;
        let mut mc = envoy::cluster(&c, notes).map_err(|e| rejected(types::CLUSTER, name)(&e))?;
        if let Some(eds) = mc.eds.clone() {
            eds_names.insert(eds.clone());
            match endpoints.get(&eds) {
                Some(eps) => mc.endpoints.clone_from(eps),
                None => {
                    // Warming: the previous version serves until the endpoints arrive.
                    warming_count += 1;
                    if let Some(prev) = previous.clusters.iter().find(|p| p.name == mc.name) {
                        clusters.push(prev.clone());
                    }
                    continue;
                }
            }
        }
        clusters.push(mc);
    }
    let mut routes = HashMap::new();
    for (name, any) in of(types::ROUTE) {
        let rc: RouteConfiguration =
            codec::unpack(any).map_err(|e| decode_err(types::ROUTE, name, e))?;
        routes.insert(
            name.clone(),
            envoy::route_configuration(&rc, notes).map_err(|e| rejected(types::ROUTE, name)(&e))?,
        );
    }
    let mut listeners = Vec::new();
    let mut rds_names = BTreeSet::new();
    for (name, any) in of(types::LISTENER) {
        let l: Listener = codec::unpack(any).map_err(|e| decode_err(types::LISTENER, name, e))?;
        let Some(mut ml) =
            envoy::listener(&l, notes).map_err(|e| rejected(types::LISTENER, name)(&e))?
        else {
            continue;
        };
        let mut warming = false;
        for fc in &mut ml.filter_chains {
            if let Some(hcm) = &mut fc.http_connection_manager
                && let Some(rds) = &hcm.rds
            {
                rds_names.insert(rds.clone());
                match routes.get(rds) {
                    Some(rc) => hcm.route_config = config::RouteConfiguration::clone(rc),
                    None => warming = true,
                }
            }
        }
        if warming {
            warming_count += 1;
            if let Some(prev) = previous.listeners.iter().find(|p| p.name == ml.name) {
                listeners.push(prev.clone());
            }
            continue;
        }
        listeners.push(ml);
    }
    Ok(Built {
        model: Model {
            listeners,
            clusters,
        },
        warming: warming_count,
        eds_names,
        rds_names,
    })
}

// === /config_dump ===

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A resource as it can be rendered: itself, or (if a typed config inside it is of a type this
/// build has no descriptor for) a Struct saying so.
fn renderable(any: &Any) -> Any {
    match codec::any_to_json(any) {
        Ok(_) => any.clone(),
        Err(e) => {
            let json = serde_json::json!({
                "@type": "type.googleapis.com/google.protobuf.Struct",
                "value": { "unrenderable": e.to_string(), "type_url": any.type_url },
            });
            codec::json_to_any(json).unwrap_or_default()
        }
    }
}

fn failure(f: &Failure, name: &str) -> UpdateFailureState {
    UpdateFailureState {
        failed_configuration: f.resources.get(name).map(renderable),
        last_update_attempt: Some(timestamp(f.at)),
        details: f.details.clone(),
        version_info: f.version.clone(),
    }
}

/// One resource's line in a config dump: its active version, and the failure that concerned it.
struct DumpEntry {
    name: String,
    version: String,
    resource: Option<Any>,
    updated: Option<Timestamp>,
    error: Option<UpdateFailureState>,
}

impl TypeState {
    /// Every resource held, and every one the last rejected update was about.
    fn entries(&self) -> Vec<DumpEntry> {
        let names: BTreeSet<&String> = self
            .resources
            .keys()
            .chain(
                self.error
                    .iter()
                    .flat_map(|f| f.resources.keys().filter(|n| f.concerns(n))),
            )
            .collect();
        names
            .into_iter()
            .map(|n| DumpEntry {
                name: n.clone(),
                version: self.version.clone(),
                resource: self.resources.get(n).map(renderable),
                updated: self.updated.map(timestamp),
                error: self
                    .error
                    .as_ref()
                    .filter(|f| f.concerns(n))
                    .map(|f| failure(f, n)),
            })
            .collect()
    }
}

impl XdsState {
    /// The dynamic parts of Envoy's ConfigDump, as proto3 JSON (`@type`d admin messages).
    pub fn config_dump(&self) -> Vec<serde_json::Value> {
        let types = lock(&self.types).clone();
        let get = |t| types.get(t).cloned().unwrap_or_default();
        let (l, c, r, e) = (
            get(types::LISTENER),
            get(types::CLUSTER),
            get(types::ROUTE),
            get(types::ENDPOINT),
        );
        let dumps = [
            codec::pack(&ListenersConfigDump {
                version_info: l.version.clone(),
                dynamic_listeners: l
                    .entries()
                    .into_iter()
                    .map(|d| listeners_config_dump::DynamicListener {
                        name: d.name,
                        active_state: d.resource.map(|a| {
                            listeners_config_dump::DynamicListenerState {
                                version_info: d.version,
                                listener: Some(a),
                                last_updated: d.updated,
                            }
                        }),
                        error_state: d.error,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            codec::pack(&ClustersConfigDump {
                version_info: c.version.clone(),
                dynamic_active_clusters: c
                    .entries()
                    .into_iter()
                    .map(|d| clusters_config_dump::DynamicCluster {
                        version_info: d.version,
                        cluster: d.resource,
                        last_updated: d.updated,
                        error_state: d.error,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            codec::pack(&RoutesConfigDump {
                dynamic_route_configs: r
                    .entries()
                    .into_iter()
                    .map(|d| routes_config_dump::DynamicRouteConfig {
                        version_info: d.version,
                        route_config: d.resource,
                        last_updated: d.updated,
                        error_state: d.error,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            codec::pack(&EndpointsConfigDump {
                dynamic_endpoint_configs: e
                    .entries()
                    .into_iter()
                    .map(|d| endpoints_config_dump::DynamicEndpointConfig {
                        version_info: d.version,
                        endpoint_config: d.resource,
                        last_updated: d.updated,
                        error_state: d.error,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        ];
        let mut out: Vec<serde_json::Value> = dumps
            .iter()
            .map(|a| {
                codec::any_to_json(a).unwrap_or_else(
                    |e| serde_json::json!({ "@type": a.type_url, "error": e.to_string() }),
                )
            })
            .collect();
        // What translation skipped (Istio's optional filters, retries …), as one Struct entry:
        // ConfigDump's `configs` holds `Any`s, so tools that do not know it pass over it.
        let notes = self.notes();
        if !notes.is_empty() {
            out.push(serde_json::json!({
                "@type": "type.googleapis.com/google.protobuf.Struct",
                "value": { "eastguard_not_applied": notes },
            }));
        }
        out
    }

    /// Optional items the last translation skipped.
    pub fn notes(&self) -> Vec<String> {
        lock(&self.notes).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dump_reports_skipped_items_and_errors_on_the_resources_they_concern() {
        let state = XdsState::default();
        *lock(&state.notes) = vec!["listener l: HTTP filter istio.stats skipped".into()];
        let good = codec::pack(&Cluster {
            name: "good".into(),
            ..Default::default()
        });
        let bad = codec::pack(&Cluster {
            name: "bad".into(),
            ..Default::default()
        });
        lock(&state.types).insert(
            types::CLUSTER,
            TypeState {
                version: "v1".into(),
                updated: Some(SystemTime::now()),
                resources: BTreeMap::from([("good".to_owned(), good.clone())]),
                error: Some(Failure {
                    version: "v2".into(),
                    details: "cluster bad: transport_socket.sni: invalid SNI".into(),
                    at: SystemTime::now(),
                    resources: BTreeMap::from([("good".to_owned(), good), ("bad".to_owned(), bad)]),
                    rejected: BTreeSet::from(["bad".to_owned()]),
                }),
            },
        );
        let dump = state.config_dump();
        let clusters = dump
            .iter()
            .find(|c| c["@type"] == "type.googleapis.com/envoy.admin.v3.ClustersConfigDump")
            .expect("clusters");
        let entries = clusters["dynamic_active_clusters"]
            .as_array()
            .expect("entries");
        assert_eq!(entries.len(), 2);
        let bad = entries
            .iter()
            .find(|e| e["error_state"].is_object())
            .expect("error state");
        assert_eq!(bad["error_state"]["failed_configuration"]["name"], "bad");
        assert!(bad.get("cluster").is_none(), "never active");
        let good = entries
            .iter()
            .find(|e| e.get("cluster").is_some())
            .expect("active");
        assert!(
            good.get("error_state").is_none(),
            "the good cluster is not blamed"
        );
        let notes = dump
            .iter()
            .find(|c| c["@type"] == "type.googleapis.com/google.protobuf.Struct")
            .expect("notes entry");
        assert_eq!(
            notes["value"]["eastguard_not_applied"][0],
            "listener l: HTTP filter istio.stats skipped"
        );
    }
}
