//! Sidecar injection: a pod in, the pod with eastguard's sidecar out (or why not).
//!
//! The pod is handled as JSON, not as typed Kubernetes structs, so fields this code does not know
//! (newer Kubernetes versions, alpha fields) pass through untouched; the webhook answers with the
//! JSON Patch between the two (`review`).
//!
//! Rules, in order:
//! 1. Not a pod (no `spec.containers`), a namespace of the never-inject list, eastguard's own
//!    components (`app.kubernetes.io/part-of: eastguard`), host networking, or
//!    `sidecar.eastguard.io/inject` or else `sidecar.istio.io/inject` (label first, then
//!    annotation) other than y/yes/true/on: skipped.
//! 2. Already injected (a container `eastguard-proxy` or the status annotation): left as it is,
//!    so injecting twice is a no-op. A pod Istio injected (`istio-proxy`) is skipped with a warning.
//! 3. `inject.istio.io/templates` naming a template other than `sidecar` or `spire`: skipped with
//!    a warning (gateways and agents are not sidecars).
//! 4. Annotations that do not parse: refused (see `annotations`).
//! 5. Otherwise the sidecar is added: a native sidecar (first init container with
//!    `restartPolicy: Always`) by default, a classic container by option or annotation.

pub mod annotations;
pub mod probes;
pub mod review;

use serde::Deserialize;
use serde_json::{Map, Value, json};

pub const SIDECAR: &str = "eastguard-proxy";
pub const STATUS_ANNOTATION: &str = "sidecar.eastguard.io/status";
pub const CAPTURE_ANNOTATION: &str = "sidecar.eastguard.io/capture-settings";
const SOCKET_VOLUME: &str = "eastguard-workload-socket";
const SOCKET_DIR: &str = "/run/secrets/workload-spiffe-uds";

/// What the webhook injects: Istio's injection ConfigMap plays this part. Read from YAML (a file,
/// or a ConfigMap whose `data.config` holds it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Template {
    pub image: String,
    pub image_pull_policy: String,
    /// A native sidecar (Kubernetes ≥ 1.29); `false`: a classic container.
    pub native_sidecar: bool,
    /// The control plane's mTLS ADS address (Istio's 15012).
    pub xds_address: String,
    /// The SPIFFE IDs the control plane may present.
    pub control_plane_ids: Vec<String>,
    pub cluster: String,
    /// Where the SPIFFE Workload API socket comes from.
    pub workload_socket: WorkloadSocket,
    pub proxy_uid: i64,
    /// The sidecar's worker threads (Envoy's `--concurrency`).
    pub concurrency: u16,
    /// Container resources of the sidecar (`requests`, `limits`).
    pub resources: Value,
    pub rewrite_app_probes: bool,
    pub never_inject_namespaces: Vec<String>,
}

impl Default for Template {
    fn default() -> Self {
        Self {
            image: "ghcr.io/eastguard/eastguard:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            native_sidecar: true,
            xds_address: "eastguard-control-plane.eastguard-system.svc:15012".into(),
            control_plane_ids: vec![
                "spiffe://cluster.local/ns/eastguard-system/sa/eastguard-control-plane".into(),
            ],
            cluster: "Kubernetes".into(),
            workload_socket: WorkloadSocket::Csi,
            proxy_uid: 1337,
            concurrency: 2,
            resources: json!({"requests": {"cpu": "50m", "memory": "32Mi"}}),
            rewrite_app_probes: true,
            never_inject_namespaces: vec![
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
            ],
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum WorkloadSocket {
    /// The SPIFFE CSI driver (`csi.spiffe.io`), as SPIRE and Istio's `spire` template use it.
    Csi,
    /// A host directory the node agent serves its socket in (`socket` below it).
    HostPath { path: String },
}

/// Why a template file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Template {
    /// A template file: the template itself, or a ConfigMap with it under `data.config`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, TemplateError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| TemplateError::Invalid { path: p, message })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let doc = match doc.get("kind").and_then(Value::as_str) {
            Some("ConfigMap") => {
                let inner = doc["data"]["config"]
                    .as_str()
                    .ok_or("a ConfigMap template needs data.config")?;
                serde_yaml::from_str(inner).map_err(|e| format!("data.config: {e}"))?
            }
            _ => doc,
        };
        let t: Template = serde_json::from_value(doc).map_err(|e| e.to_string())?;
        if t.image.trim().is_empty() {
            return Err("image: empty".into());
        }
        if t.concurrency == 0 || t.concurrency > 256 {
            return Err("concurrency: not 1..256".into());
        }
        if t.xds_address.trim().is_empty() {
            return Err("xdsAddress: empty".into());
        }
        Ok(t)
    }
}

/// The webhook's answer for one pod.
#[derive(Debug)]
pub enum Decision {
    /// Admitted unchanged; why (for the log), and whether to warn the user.
    Skip { reason: String, warn: bool },
    /// Admitted with the sidecar.
    Inject { pod: Value, warnings: Vec<String> },
    /// Refused: what in the pod is wrong.
    Refuse(String),
}

fn skip(reason: impl Into<String>, warn: bool) -> Decision {
    Decision::Skip {
        reason: reason.into(),
        warn,
    }
}

/// Decides and, when injecting, builds the injected pod.
pub fn inject(pod: &Value, namespace: &str, t: &Template) -> Decision {
    let Some(spec) = pod.get("spec").and_then(Value::as_object) else {
        return skip("not a pod: no spec", true);
    };
    let Some(containers) = spec.get("containers").and_then(Value::as_array) else {
        return skip("not a pod: no spec.containers", true);
    };
    let empty = Map::new();
    let meta = pod.get("metadata").and_then(Value::as_object);
    let labels = meta
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let notes = meta
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let note = |k: &str| notes.get(k).and_then(Value::as_str);

    if t.never_inject_namespaces.iter().any(|n| n == namespace) {
        return skip(format!("namespace {namespace} is never injected"), false);
    }
    if label("app.kubernetes.io/part-of") == Some("eastguard") {
        return skip("an eastguard component is never injected", false);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return skip(
            "host networking: the pod has no network of its own to capture",
            false,
        );
    }
    // eastguard's own switch first, then Istio's; a label before an annotation.
    let asked = label("sidecar.eastguard.io/inject")
        .or_else(|| note("sidecar.eastguard.io/inject"))
        .or_else(|| label("sidecar.istio.io/inject"))
        .or_else(|| note("sidecar.istio.io/inject"))
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "y" | "yes" | "true" | "on"));
    if asked == Some(false) {
        return skip(
            "sidecar.eastguard.io/inject or sidecar.istio.io/inject says no",
            false,
        );
    }
    let named = |list: Option<&Value>, n: &str| {
        list.and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(n))
        })
    };
    let inits = spec.get("initContainers");
    if named(Some(&spec["containers"]), SIDECAR)
        || named(inits, SIDECAR)
        || note(STATUS_ANNOTATION).is_some()
    {
        return skip("already injected", false);
    }
    if named(Some(&spec["containers"]), "istio-proxy") || named(inits, "istio-proxy") {
        return skip(
            "Istio's sidecar is already in this pod; eastguard does not add a second one",
            true,
        );
    }
    if let Some(names) = note("inject.istio.io/templates")
        && let Some(other) = names
            .split(',')
            .map(str::trim)
            .find(|n| !matches!(*n, "sidecar" | "spire"))
    {
        return skip(
            format!("inject.istio.io/templates: eastguard has no {other:?} template"),
            true,
        );
    }
    if containers.is_empty() {
        return skip("the pod has no containers", true);
    }
    let settings = match annotations::read(notes) {
        Ok(s) => s,
        Err(e) => return Decision::Refuse(e.to_string()),
    };
    let volumes = spec.get("volumes").and_then(Value::as_array);
    let taken = |n: &str| {
        volumes.is_some_and(|v| {
            v.iter()
                .any(|v| v.get("name").and_then(Value::as_str) == Some(n))
        })
    };
    for v in &settings.user_volumes {
        let n = v["name"].as_str().unwrap_or_default();
        if taken(n) || n == SOCKET_VOLUME {
            return Decision::Refuse(format!(
                "annotation sidecar.istio.io/userVolume: {n} is already a volume of the pod"
            ));
        }
    }
    if taken(SOCKET_VOLUME) {
        return Decision::Refuse(format!(
            "the pod has a volume named {SOCKET_VOLUME}, which is the sidecar's"
        ));
    }
    match build(pod, namespace, t, settings) {
        Ok((pod, warnings)) => Decision::Inject { pod, warnings },
        // A shape this code cannot take apart: admitted as it is (never blocked by the webhook).
        Err(e) => skip(format!("the pod cannot be injected: {e}"), true),
    }
}

fn build(
    original: &Value,
    namespace: &str,
    t: &Template,
    mut s: annotations::Settings,
) -> Result<(Value, Vec<String>), String> {
    let mut pod = original.clone();
    let spec = pod["spec"].as_object_mut().ok_or("spec is not an object")?;
    let mut probers = Map::new();
    if s.rewrite_probes.unwrap_or(t.rewrite_app_probes) {
        let cs = spec
            .get_mut("containers")
            .and_then(Value::as_array_mut)
            .ok_or("spec.containers is not a list")?;
        probers = probes::rewrite(cs, &mut s.warnings);
        // The pod's own native sidecars are probed by kubelet too (plain init containers
        // cannot have probes).
        if let Some(inits) = spec.get_mut("initContainers").and_then(Value::as_array_mut) {
            let mut sidecars: Vec<Value> = inits
                .iter()
                .filter(|c| c["restartPolicy"] == "Always")
                .cloned()
                .collect();
            probers.extend(probes::rewrite(&mut sidecars, &mut s.warnings));
            let mut rewritten = sidecars.into_iter();
            for c in inits.iter_mut().filter(|c| c["restartPolicy"] == "Always") {
                if let Some(r) = rewritten.next() {
                    *c = r;
                }
            }
        }
    }

    let first_app = spec["containers"][0]["name"].as_str().map(str::to_owned);
    let native = s.native.unwrap_or(t.native_sidecar);
    let hold = s.hold_application.unwrap_or(false);
    let sidecar = container(original, namespace, t, &s, &probers, native);

    // Volumes: the Workload API socket, then the user's.
    let socket_volume = match &t.workload_socket {
        WorkloadSocket::Csi => json!({
            "name": SOCKET_VOLUME,
            "csi": {"driver": "csi.spiffe.io", "readOnly": true},
        }),
        WorkloadSocket::HostPath { path } => json!({
            "name": SOCKET_VOLUME,
            "hostPath": {"path": path, "type": "Directory"},
        }),
    };
    let volumes = spec
        .entry("volumes")
        .or_insert_with(|| Value::Array(Vec::new()));
    let volumes = volumes.as_array_mut().ok_or("spec.volumes is not a list")?;
    volumes.push(socket_volume);
    volumes.extend(s.user_volumes.iter().cloned());

    if native {
        let inits = spec
            .entry("initContainers")
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .ok_or("spec.initContainers is not a list")?;
        // First, so the app's own init containers already have the mesh.
        inits.insert(0, sidecar);
    } else {
        let cs = spec["containers"]
            .as_array_mut()
            .ok_or("spec.containers is not a list")?;
        if hold {
            cs.insert(0, sidecar);
        } else {
            cs.push(sidecar);
        }
    }

    let meta = pod
        .as_object_mut()
        .ok_or("the pod is not an object")?
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("metadata is not an object")?;
    let notes = meta
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("metadata.annotations is not an object")?;
    notes.insert(
        STATUS_ANNOTATION.into(),
        Value::String(
            json!({
                "containers": if native { json!([]) } else { json!([SIDECAR]) },
                "initContainers": if native { json!([SIDECAR]) } else { json!([]) },
                "volumes": [SOCKET_VOLUME],
            })
            .to_string(),
        ),
    );
    if let Some(c) = &s.capture {
        notes.insert(
            CAPTURE_ANNOTATION.into(),
            Value::String(serde_json::to_string(c).unwrap_or_default()),
        );
        // The control plane gives captured workloads Istio's capture-shaped listeners.
        if c.enabled {
            notes.insert(
                crate::generate::CAPTURE_ANNOTATION.into(),
                Value::String("ebpf".into()),
            );
        }
    }
    if let Some(app) = first_app {
        notes
            .entry("kubectl.kubernetes.io/default-container")
            .or_insert(Value::String(app.clone()));
        notes
            .entry("kubectl.kubernetes.io/default-logs-container")
            .or_insert(Value::String(app));
    }
    let labels = meta
        .entry("labels")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("metadata.labels is not an object")?;
    // Istio's labels: peers and tools see an mTLS-capable workload.
    labels
        .entry("security.istio.io/tlsMode")
        .or_insert(Value::String("istio".into()));
    let (canonical, revision) = canonical_names(original);
    labels
        .entry("service.istio.io/canonical-name")
        .or_insert(Value::String(canonical));
    labels
        .entry("service.istio.io/canonical-revision")
        .or_insert(Value::String(revision));
    Ok((pod, s.warnings))
}

/// The sidecar container.
fn container(
    pod: &Value,
    namespace: &str,
    t: &Template,
    s: &annotations::Settings,
    probers: &Map<String, Value>,
    native: bool,
) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("INSTANCE_IP", "status.podIP"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("NODE_NAME", "spec.nodeName"),
        field("POD_UID", "metadata.uid"),
        json!({"name": "SPIFFE_ENDPOINT_SOCKET", "value": format!("unix://{SOCKET_DIR}/socket")}),
        json!({"name": "EASTGUARD_BOOTSTRAP", "value": bootstrap(pod, namespace, t, s)}),
    ];
    if !probers.is_empty() {
        env.push(json!({
            "name": "ISTIO_KUBE_APP_PROBERS",
            "value": Value::Object(probers.clone()).to_string(),
        }));
    }
    let mut resources = t.resources.clone();
    for (key, values) in [("requests", &s.requests), ("limits", &s.limits)] {
        if values.is_empty() {
            continue;
        }
        if !resources.is_object() {
            resources = json!({});
        }
        let slot = resources
            .as_object_mut()
            .map(|r| r.entry(key).or_insert_with(|| json!({})));
        if let Some(Value::Object(m)) = slot {
            for (k, v) in values {
                m.insert((*k).to_owned(), Value::String(v.clone()));
            }
        }
    }
    let mut readiness = json!({
        "httpGet": {"path": "/healthz/ready", "port": 15021},
        "periodSeconds": 2,
        "failureThreshold": 30,
        "timeoutSeconds": 3,
    });
    for (k, v) in &s.readiness {
        readiness[*k] = json!(v);
    }
    let mut mounts = vec![json!({
        "name": SOCKET_VOLUME,
        "mountPath": SOCKET_DIR,
        "readOnly": true,
    })];
    mounts.extend(s.user_mounts.iter().cloned());
    let concurrency = s.concurrency.unwrap_or(t.concurrency);
    let mut c = json!({
        "name": SIDECAR,
        "image": s.image.clone().unwrap_or_else(|| t.image.clone()),
        "imagePullPolicy": t.image_pull_policy,
        "command": ["eastguard-sidecar"],
        "args": ["--config-env", "EASTGUARD_BOOTSTRAP", "--concurrency", concurrency.to_string()],
        "env": env,
        "ports": [
            {"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"},
            {"name": "status-port", "containerPort": probes::STATUS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": readiness,
        "resources": resources,
        "securityContext": {
            "runAsUser": t.proxy_uid,
            "runAsGroup": t.proxy_uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if native {
        c["restartPolicy"] = json!("Always");
        // The app's containers start once the sidecar is ready (Istio's native-sidecar shape).
        c["startupProbe"] = json!({
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 1,
            "failureThreshold": 600,
            "timeoutSeconds": 3,
        });
    }
    c
}

/// The sidecar's bootstrap (the proxy's YAML config). `${NAME}` values are filled from the
/// container's environment when the sidecar starts (pod name and IP are unknown at admission).
fn bootstrap(pod: &Value, namespace: &str, t: &Template, s: &annotations::Settings) -> String {
    let (app, version) = canonical_names(pod);
    let mut doc = json!({
        "node": {
            "id": "sidecar~${INSTANCE_IP}~${POD_NAME}.${POD_NAMESPACE}~${POD_NAMESPACE}.svc.cluster.local",
            "workload": workload_name(pod),
            "namespace": if namespace.is_empty() { "${POD_NAMESPACE}" } else { namespace },
            "app": app,
            "version": version,
            "cluster": t.cluster,
        },
        "admin": {
            "address": "127.0.0.1:15000",
            "health_address": "0.0.0.0:15021",
            "prometheus_address": "0.0.0.0:15090",
            "status_address": format!("0.0.0.0:{}", probes::STATUS_PORT),
        },
        "identity": {"workload_api": {}},
        "xds": {"address": t.xds_address, "control_plane_ids": t.control_plane_ids},
    });
    // A captured sidecar is not ready until the node agent says capture is attached, in the
    // directory it shares with the sidecar (the hostPath socket's; a CSI volume has none).
    if s.capture.as_ref().is_some_and(|c| c.enabled)
        && matches!(t.workload_socket, WorkloadSocket::HostPath { .. })
    {
        doc["capture"] = json!({"status_file": format!("{SOCKET_DIR}/${{POD_UID}}.capture")});
    }
    serde_yaml::to_string(&doc).unwrap_or_default()
}

/// Istio's canonical service name and revision from the pod's labels.
fn canonical_names(pod: &Value) -> (String, String) {
    let labels = &pod["metadata"]["labels"];
    let first = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k).and_then(Value::as_str))
            .map(str::to_owned)
    };
    let name = first(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| workload_name(pod));
    let revision = first(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".into());
    (name, revision)
}

/// The workload a pod belongs to, as Istio names it: its controller (a Deployment for a
/// ReplicaSet's pods, a CronJob for a Job's), else `generateName`, else the pod's name.
fn workload_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    let owner = meta["ownerReferences"]
        .as_array()
        .and_then(|os| {
            os.iter()
                .find(|o| o["controller"].as_bool() == Some(true))
                .or(os.first())
        })
        .and_then(|o| Some((o["kind"].as_str()?, o["name"].as_str()?)));
    let trimmed = |name: &str, hash_ok: fn(&str) -> bool| match name.rsplit_once('-') {
        Some((base, hash)) if !base.is_empty() && hash_ok(hash) => base.to_owned(),
        _ => name.to_owned(),
    };
    match owner {
        Some(("ReplicaSet", n)) => trimmed(n, |h| {
            !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric())
        }),
        Some(("Job", n)) => trimmed(n, |h| {
            !h.is_empty() && h.bytes().all(|b| b.is_ascii_digit())
        }),
        Some((_, n)) => n.to_owned(),
        None => match meta["generateName"].as_str() {
            Some(g) if !g.trim_end_matches('-').is_empty() => g.trim_end_matches('-').to_owned(),
            _ => meta["name"].as_str().unwrap_or("${POD_NAME}").to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(extra: Value) -> Value {
        let mut p = json!({
            "metadata": {"name": "hello", "labels": {"app": "hello"}},
            "spec": {"containers": [{"name": "hello", "image": "hello:1",
                     "readinessProbe": {"httpGet": {"port": 8080}}}]},
        });
        json_patch::merge(&mut p, &extra);
        p
    }

    fn injected(p: &Value) -> Value {
        match inject(p, "default", &Template::default()) {
            Decision::Inject { pod, .. } => pod,
            other => panic!("not injected: {other:?}"),
        }
    }

    #[test]
    fn a_plain_pod_gets_a_native_sidecar_first_and_reinjection_is_a_no_op() {
        let out = injected(&pod(json!({})));
        let inits = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], SIDECAR);
        assert_eq!(inits[0]["restartPolicy"], "Always");
        assert_eq!(
            out["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
            "/app-health/hello/readyz"
        );
        assert!(matches!(
            inject(&out, "default", &Template::default()),
            Decision::Skip { warn: false, .. }
        ));
    }

    #[test]
    fn skipped_where_istio_skips_and_for_eastguard_itself() {
        for (p, ns) in [
            (pod(json!({"spec": {"hostNetwork": true}})), "default"),
            (
                pod(json!({"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}}})),
                "default",
            ),
            (
                pod(json!({"metadata": {"labels": {"sidecar.istio.io/inject": "false"}}})),
                "default",
            ),
            (
                pod(
                    json!({"metadata": {"annotations": {"sidecar.eastguard.io/inject": "false",
                                                         "sidecar.istio.io/inject": "true"}}}),
                ),
                "default",
            ),
            (
                pod(json!({"metadata": {"labels": {"app.kubernetes.io/part-of": "eastguard"}}})),
                "eastguard-system",
            ),
            (pod(json!({})), "kube-system"),
        ] {
            assert!(
                matches!(inject(&p, ns, &Template::default()), Decision::Skip { .. }),
                "{p}"
            );
        }
    }

    #[test]
    fn a_bad_annotation_refuses_the_pod() {
        let p = pod(json!({"metadata": {"annotations":
            {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40"}}}));
        assert!(matches!(
            inject(&p, "default", &Template::default()),
            Decision::Refuse(m) if m.contains("excludeOutboundIPRanges")
        ));
    }

    #[test]
    fn classic_mode_appends_a_container() {
        let p =
            pod(json!({"metadata": {"annotations": {"sidecar.istio.io/nativeSidecar": "false"}}}));
        let out = injected(&p);
        let cs = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(cs.last().unwrap()["name"], SIDECAR);
        assert!(cs.last().unwrap().get("restartPolicy").is_none());
        assert!(out["spec"].get("initContainers").is_none());
    }

    #[test]
    fn the_workload_is_named_after_its_controller() {
        let p = pod(
            json!({"metadata": {"name": null, "generateName": "web-7f9c5d-",
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7f9c5d", "controller": true}]}}),
        );
        assert_eq!(workload_name(&p), "web");
        let p = pod(json!({"metadata": {"ownerReferences":
            [{"kind": "Job", "name": "nightly-28391040", "controller": true}]}}));
        assert_eq!(workload_name(&p), "nightly");
    }

    #[test]
    fn templates() {
        assert!(Template::parse("image: x\nnativeSidecar: false\n").is_ok());
        assert!(Template::parse("imagee: x\n").is_err());
        assert!(Template::parse("concurrency: 0\n").is_err());
        let cm = "kind: ConfigMap\ndata:\n  config: |\n    workloadSocket:\n      hostPath:\n        path: /run/eastguard\n";
        assert_eq!(
            Template::parse(cm).unwrap().workload_socket,
            WorkloadSocket::HostPath {
                path: "/run/eastguard".into()
            }
        );
    }
}
