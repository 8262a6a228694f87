//! The control plane's API inventory: an OTLP/gRPC receiver for the sidecars' deltas
//! ([`receiver`]), a SQLite store that survives restarts ([`store`]), API specs from the config
//! directory ([`specs`]), and the view that joins them — each operation with its status against
//! its spec, its owner, and its verified callers — served over HTTP ([`http`]).

pub mod http;
pub mod least_privilege;
pub mod receiver;
pub mod report;
pub mod specs;
pub mod store;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use apisec::spec::{LiveOperation, Status, classify};
use serde::Serialize;

use crate::kube::cluster::{Cluster, Identity};
use crate::registry::Registry;
use specs::Specs;

type ClusterRx = tokio::sync::watch::Receiver<Option<Arc<Cluster>>>;
use store::{Operation, Store, StoreError, StoreLimits};

pub struct ApiInventory {
    store: Mutex<Store>,
    specs: Mutex<Specs>,
    /// Namespaces and ServiceAccounts from Kubernetes (`--kubernetes`), once listed.
    cluster: Mutex<Option<ClusterRx>>,
    /// How long rows and events are kept.
    pub retention: std::time::Duration,
}

/// One operation in the view: what was seen of it and where it stands.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub service: String,
    pub method: String,
    pub template: String,
    pub status: Status,
    /// The spec file and path that document it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_path: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    /// The service's owner, else its namespace's.
    pub owner: Option<String>,
    /// No owner label or annotation on the service or its namespace.
    pub orphan: bool,
    /// What was seen (absent for an unused operation).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub seen: Option<Operation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub operations: Vec<Entry>,
    /// Operations per status.
    pub summary: BTreeMap<&'static str, usize>,
    /// Spec files refused, with why (their last good version, if any, is in force).
    pub spec_errors: BTreeMap<String, String>,
    /// Rows the store refused for a bound since start.
    pub dropped_rows: u64,
    /// Verified callers whose ID is shaped as this cluster's workload IDs but names no
    /// ServiceAccount it has (with `--kubernetes`): deleted since, or never there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_callers: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ApiInventory {
    pub fn open(
        data_dir: Option<&Path>,
        config_dir: &Path,
        limits: StoreLimits,
    ) -> Result<Arc<Self>, StoreError> {
        let mut specs = Specs::new(config_dir);
        specs.refresh();
        Ok(Arc::new(Self {
            store: Mutex::new(Store::open(data_dir, limits)?),
            specs: Mutex::new(specs),
            cluster: Mutex::new(None),
            retention: limits.retention,
        }))
    }

    /// Where Namespaces and ServiceAccounts come from (`--kubernetes`).
    pub fn set_cluster(&self, rx: ClusterRx) {
        *lock(&self.cluster) = Some(rx);
    }

    fn cluster(&self) -> Option<Arc<Cluster>> {
        lock(&self.cluster)
            .as_ref()
            .and_then(|r| r.borrow().clone())
    }

    /// Re-reads changed spec files and drops expired rows.
    pub fn refresh(&self) {
        if lock(&self.specs).refresh() {
            tracing::info!("API specs changed");
        }
        if let Err(e) = lock(&self.store).expire() {
            tracing::warn!(error = %e, "inventory store: expiring old rows failed");
        }
    }

    /// Adds a workload's deltas; how many rows were dropped for a bound.
    pub fn add(&self, workload: &str, rows: &[apisec::Row]) -> Result<u64, StoreError> {
        lock(&self.store).add(workload, rows)
    }

    pub fn add_sensitive(
        &self,
        workload: &str,
        found: &[apisec::inventory::SensitiveRow],
    ) -> Result<u64, StoreError> {
        lock(&self.store).add_sensitive(workload, found)
    }

    pub fn set_cert(
        &self,
        workload: &str,
        svid: &apisec::otlp::SvidInfo,
    ) -> Result<(), StoreError> {
        lock(&self.store).set_cert(workload, svid)
    }

    pub fn certs(&self) -> Result<Vec<store::CertRow>, StoreError> {
        lock(&self.store).certs()
    }

    pub fn add_events(
        &self,
        workload: &str,
        events: &[apisec::otlp::Event],
    ) -> Result<(), StoreError> {
        lock(&self.store).add_events(workload, events)
    }

    pub fn events(
        &self,
        class_uid: Option<u32>,
        limit: u32,
    ) -> Result<Vec<store::StoredEvent>, StoreError> {
        lock(&self.store).events(class_uid, limit)
    }

    pub fn edges(&self, since: i64) -> Result<Vec<store::Edge>, StoreError> {
        lock(&self.store).edges(since)
    }

    pub fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        lock(&self.store).operations()
    }

    /// Every live operation classified against its service's spec, plus the spec operations
    /// nobody called.
    pub fn view(&self, reg: &Registry) -> Result<View, StoreError> {
        let (ops, dropped) = {
            let s = lock(&self.store);
            (s.operations()?, s.dropped)
        };
        let cluster = self.cluster();
        let mut unknown = std::collections::BTreeSet::new();
        let mut ops = ops;
        if let Some(c) = &cluster {
            for caller in ops.iter_mut().flat_map(|o| o.callers.iter_mut()) {
                let identity = c.identity(&caller.id);
                if identity == Identity::Unknown {
                    unknown.insert(caller.id.clone());
                }
                caller.identity = Some(identity);
            }
        }
        let specs = lock(&self.specs);
        let mut by_service: BTreeMap<String, Vec<Operation>> = BTreeMap::new();
        for op in ops {
            by_service.entry(op.service.clone()).or_default().push(op);
        }
        for host in specs.documented_hosts(reg) {
            by_service.entry(host).or_default();
        }
        let mut out = Vec::new();
        for (service, ops) in by_service {
            let spec = specs.for_service(&service, reg);
            let live: Vec<LiveOperation> = ops
                .iter()
                .map(|o| LiveOperation {
                    method: o.method.clone(),
                    template: o.template.clone(),
                    classes: o.app_classes.clone(),
                    response_types: o.response_content_types.iter().cloned().collect(),
                })
                .collect();
            let owner = specs::owner(&service, reg, cluster.as_deref());
            for v in classify(spec.as_ref().map(|(_, s)| s.as_ref()), &live) {
                let seen = ops
                    .iter()
                    .find(|o| {
                        o.method == v.method
                            && o.template == v.template
                            && v.status != Status::Unused
                    })
                    .cloned();
                out.push(Entry {
                    service: service.clone(),
                    method: v.method,
                    template: v.template,
                    status: v.status,
                    spec_file: v
                        .spec_path
                        .as_ref()
                        .and(spec.as_ref())
                        .map(|(f, _)| f.clone()),
                    spec_path: v.spec_path,
                    drift: v.drift,
                    owner: owner.clone(),
                    orphan: owner.is_none(),
                    seen,
                });
            }
        }
        let mut summary = BTreeMap::new();
        for e in &out {
            *summary.entry(e.status.as_str()).or_insert(0) += 1;
        }
        Ok(View {
            operations: out,
            summary,
            spec_errors: specs.errors.clone(),
            dropped_rows: dropped,
            unknown_callers: unknown.into_iter().collect(),
        })
    }

    /// `service`'s observed operations as an OpenAPI 3.1 document.
    pub fn openapi(&self, service: &str) -> Result<serde_json::Value, StoreError> {
        let ops = self.operations()?;
        let observed: Vec<apisec::openapi::Observed> = ops
            .into_iter()
            .filter(|o| o.service == service)
            .map(|o| apisec::openapi::Observed {
                method: o.method,
                template: o.template,
                classes: o
                    .status_classes
                    .keys()
                    .filter_map(|c| c.strip_suffix("xx").and_then(|c| c.parse().ok()))
                    .collect(),
                request_types: o.request_content_types.into_iter().collect(),
                response_types: o.response_content_types.into_iter().collect(),
                callers: o
                    .callers
                    .into_iter()
                    .filter(|c| c.id.starts_with("spiffe://"))
                    .map(|c| c.id)
                    .collect(),
                calls: o.calls,
            })
            .collect();
        Ok(apisec::openapi::document(service, &observed))
    }
}
