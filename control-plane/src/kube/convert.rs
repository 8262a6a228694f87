//! Kubernetes objects → the registry the files also feed.
//!
//! - Istio's resources (ServiceEntry, WorkloadEntry, AuthorizationPolicy, PeerAuthentication,
//!   Telemetry) go through the same reader as files. An object that is refused keeps its last
//!   good version, as a file does: a DENY edited into something unreadable keeps denying.
//! - A Service with a selector is a ServiceEntry for `NAME.NS.svc.DOMAIN` at its cluster IPs,
//!   selecting Pods; only addresses its EndpointSlices list as ready get traffic.
//! - A Pod with an IP is a WorkloadEntry (labels, service account, annotations), with each
//!   selecting Service's port names mapped to the target port (named ports resolved).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::watch::Store;
use crate::registry::{
    DocError, FileContent, Meta, Registry, ServiceEntry, ServicePort, WorkloadEntry, WorkloadSpec,
    document,
};

/// The objects of every watched resource.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: std::sync::Arc<Store>,
    pub pods: std::sync::Arc<Store>,
    pub endpoint_slices: std::sync::Arc<Store>,
    /// Istio's resources, every kind together.
    pub istio: Vec<std::sync::Arc<Store>>,
}

/// Turns objects into a registry, remembering the last good version of each Istio object.
#[derive(Debug, Default)]
pub struct Converter {
    /// (kind, namespace, name) → (resourceVersion, content).
    last_good: BTreeMap<(String, String, String), (String, FileContent)>,
    /// The version of each object whose refusal was last logged (one entry per object, so an
    /// object edited badly again and again does not grow it).
    logged: BTreeMap<(String, String, String), String>,
    pub cluster_domain: String,
}

impl Converter {
    pub fn new(cluster_domain: String) -> Self {
        Self {
            cluster_domain,
            ..Self::default()
        }
    }

    pub fn registry(&mut self, o: &Objects) -> Registry {
        let mut reg = Registry::default();
        let mut seen = BTreeSet::new();
        for store in &o.istio {
            for ((ns, name), obj) in store.iter() {
                let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
                let id = (kind.clone(), ns.clone(), name.clone());
                seen.insert(id.clone());
                let version = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let content = match self.last_good.get(&id) {
                    Some((v, c)) if *v == version => Some(c.clone()),
                    _ => {
                        let mut c = FileContent::default();
                        match document(obj.clone(), &mut c) {
                            Ok(()) => {
                                self.last_good.insert(id.clone(), (version, c.clone()));
                                Some(c)
                            }
                            Err(e) => {
                                self.log_refused(&id, &version, &e);
                                self.last_good.get(&id).map(|(_, c)| c.clone())
                            }
                        }
                    }
                };
                if let Some(c) = content {
                    c.add_to(&mut reg);
                }
            }
        }
        self.last_good.retain(|k, _| seen.contains(k));
        self.logged.retain(|k, _| seen.contains(k));

        let ready = ready_addresses(&o.endpoint_slices);
        let services: Vec<(&Value, ServiceEntry)> = o
            .services
            .values()
            .filter_map(|s| Some((s, self.service(s, &ready)?)))
            .collect();
        for pod in o.pods.values() {
            if let Some(w) = workload(pod, &services) {
                reg.workloads.push(w);
            }
        }
        reg.services.extend(services.into_iter().map(|(_, s)| s));
        reg
    }

    fn log_refused(&mut self, id: &(String, String, String), version: &str, e: &DocError) {
        if self.logged.get(id).map(String::as_str) != Some(version) {
            self.logged.insert(id.clone(), version.to_owned());
            let kept = self.last_good.contains_key(id);
            tracing::error!(kind = %id.0, namespace = %id.1, name = %id.2, error = %e, kept_last_good = kept,
                "Kubernetes object refused");
        }
    }

    fn service(
        &self,
        s: &Value,
        ready: &BTreeMap<(String, String), BTreeSet<String>>,
    ) -> Option<ServiceEntry> {
        let spec = &s["spec"];
        let selector: BTreeMap<String, String> =
            serde_json::from_value(spec["selector"].clone()).ok()?;
        if selector.is_empty() || spec["type"].as_str() == Some("ExternalName") {
            return None;
        }
        let meta = meta(s)?;
        let ports = spec["ports"]
            .as_array()?
            .iter()
            .filter(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let number = u16::try_from(p["port"].as_u64()?).ok().filter(|n| *n > 0)?;
                let name = p["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .map_or_else(|| number.to_string(), str::to_owned);
                Some(ServicePort {
                    protocol: protocol(&name, p["appProtocol"].as_str()),
                    target_port: p["targetPort"].as_u64().and_then(|t| u16::try_from(t).ok()),
                    number,
                    name,
                })
            })
            .collect();
        let addresses = spec["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(std::iter::once(&spec["clusterIP"]))
            .filter_map(|a| a.as_str()?.parse::<std::net::IpAddr>().ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Some(ServiceEntry {
            hosts: vec![format!(
                "{}.{}.svc.{}",
                meta.name, meta.namespace, self.cluster_domain
            )],
            ready: Some(
                ready
                    .get(&(meta.namespace.clone(), meta.name.clone()))
                    .cloned()
                    .unwrap_or_default(),
            ),
            meta,
            addresses,
            ports,
            selector: Some(selector),
            endpoints: Vec::new(),
        })
    }
}

fn meta(obj: &Value) -> Option<Meta> {
    let m = &obj["metadata"];
    let map = |v: &Value| -> BTreeMap<String, String> {
        serde_json::from_value(v.clone()).unwrap_or_default()
    };
    Some(Meta {
        name: m["name"].as_str()?.to_owned(),
        namespace: m["namespace"].as_str().unwrap_or("default").to_owned(),
        labels: map(&m["labels"]),
        annotations: map(&m["annotations"]),
    })
}

/// Istio's protocol selection: `appProtocol`, else the port name's prefix (`http-web`).
fn protocol(name: &str, app_protocol: Option<&str>) -> Option<String> {
    let p = match app_protocol {
        Some("kubernetes.io/h2c") => "http2",
        Some(a) => a,
        None => name.split('-').next().unwrap_or(name),
    };
    match p.to_ascii_lowercase().as_str() {
        "http" => Some("HTTP"),
        "http2" => Some("HTTP2"),
        "grpc" | "grpc-web" => Some("GRPC"),
        "tcp" => Some("TCP"),
        "tls" | "https" => Some("TLS"),
        _ => None,
    }
    .map(str::to_owned)
}

/// Ready endpoint addresses per (namespace, service), from EndpointSlices.
fn ready_addresses(slices: &Store) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for s in slices.values() {
        let Some(service) = s["metadata"]["labels"]["kubernetes.io/service-name"].as_str() else {
            continue;
        };
        let ns = s["metadata"]["namespace"].as_str().unwrap_or("default");
        let set = out.entry((ns.to_owned(), service.to_owned())).or_default();
        for e in s["endpoints"].as_array().into_iter().flatten() {
            // Kubernetes: an absent `ready` means ready.
            if e["conditions"]["ready"].as_bool() == Some(false) {
                continue;
            }
            for a in e["addresses"].as_array().into_iter().flatten() {
                if let Some(a) = a.as_str() {
                    set.insert(a.to_owned());
                }
            }
        }
    }
    out
}

/// A pod as a workload; `None` without an IP, finished, or on the host's network.
fn workload(pod: &Value, services: &[(&Value, ServiceEntry)]) -> Option<WorkloadEntry> {
    let status = &pod["status"];
    let spec = &pod["spec"];
    if matches!(status["phase"].as_str(), Some("Succeeded" | "Failed"))
        || spec["hostNetwork"].as_bool() == Some(true)
    {
        return None;
    }
    let address = status["podIP"]
        .as_str()
        .filter(|a| !a.is_empty())?
        .to_owned();
    let meta = meta(pod)?;
    let mut ports = BTreeMap::new();
    for (svc, entry) in services {
        let selected = entry.meta.namespace == meta.namespace
            && entry
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| meta.labels.get(k) == Some(v)));
        if !selected {
            continue;
        }
        for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
            let name = p["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .or_else(|| p["port"].as_u64().map(|n| n.to_string()));
            let target = match &p["targetPort"] {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Value::String(named) => container_port(spec, named),
                _ => p["port"].as_u64().and_then(|n| u16::try_from(n).ok()),
            };
            if let (Some(name), Some(target)) = (name, target) {
                ports.entry(name).or_insert(target);
            }
        }
    }
    Some(WorkloadEntry {
        spec: WorkloadSpec {
            address,
            ports,
            labels: meta.labels.clone(),
            service_account: spec["serviceAccountName"].as_str().map(str::to_owned),
            ..WorkloadSpec::default()
        },
        meta,
    })
}

/// A named container port of the pod.
fn container_port(spec: &Value, name: &str) -> Option<u16> {
    spec["containers"]
        .as_array()?
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"].as_str() == Some(name))?["containerPort"]
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn store(items: Vec<Value>) -> Arc<Store> {
        Arc::new(
            items
                .into_iter()
                .map(|o| {
                    let m = &o["metadata"];
                    (
                        (
                            m["namespace"].as_str().unwrap_or_default().to_owned(),
                            m["name"].as_str().unwrap().to_owned(),
                        ),
                        o,
                    )
                })
                .collect(),
        )
    }

    fn objects(policy: Value) -> Objects {
        Objects {
            services: store(vec![
                json!({"metadata": {"name": "web", "namespace": "shop"},
                "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                         "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]}}),
            ]),
            pods: store(vec![
                json!({"metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
                       "spec": {"serviceAccountName": "web", "containers": [{"name": "c", "ports": [{"name": "web", "containerPort": 8080}]}]},
                       "status": {"phase": "Running", "podIP": "10.8.0.7"}}),
                json!({"metadata": {"name": "web-2", "namespace": "shop", "labels": {"app": "web"}},
                       "spec": {"serviceAccountName": "web"}, "status": {"phase": "Running", "podIP": "10.8.0.8"}}),
            ]),
            endpoint_slices: store(vec![
                json!({"metadata": {"name": "web-abc", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "web"}},
                "endpoints": [{"addresses": ["10.8.0.7"], "conditions": {"ready": true}},
                              {"addresses": ["10.8.0.8"], "conditions": {"ready": false}}]}),
            ]),
            istio: vec![store(vec![policy])],
        }
    }

    fn deny(paths: Value, version: &str) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "deny", "namespace": "shop", "resourceVersion": version},
               "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": paths}}]}]}})
    }

    #[test]
    fn services_pods_and_slices_become_the_registry() {
        let mut c = Converter::new("cluster.local".into());
        let reg = c.registry(&objects(deny(json!(["/admin"]), "1")));
        let s = &reg.services[0];
        assert_eq!(s.hosts, ["web.shop.svc.cluster.local"]);
        assert_eq!(s.ports[0].protocol.as_deref(), Some("HTTP"));
        assert_eq!(
            s.ready.as_ref().unwrap().iter().collect::<Vec<_>>(),
            ["10.8.0.7"]
        );
        let w = reg
            .workloads
            .iter()
            .find(|w| w.meta.name == "web-1")
            .unwrap();
        assert_eq!(w.spec.ports["http"], 8080);
        assert_eq!(w.service_account(), "web");
        assert_eq!(reg.authorization.len(), 1);
    }

    #[test]
    fn a_refused_policy_keeps_its_last_good_version() {
        let mut c = Converter::new("cluster.local".into());
        assert_eq!(
            c.registry(&objects(deny(json!(["/admin"]), "1")))
                .authorization
                .len(),
            1
        );
        // Edited into something unreadable: the DENY stays.
        let bad = deny(json!("not a list"), "2");
        assert_eq!(c.registry(&objects(bad)).authorization.len(), 1);
        // Deleted: gone.
        let mut o = objects(deny(json!(["/admin"]), "1"));
        o.istio = vec![store(vec![])];
        assert!(c.registry(&o).authorization.is_empty());
    }
}
