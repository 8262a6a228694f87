//! Kubernetes workload attestation, as SPIRE's `k8s` workload attestor does it: the caller's
//! PID → its cgroup → pod UID and container ID → that pod, as this node's kubelet lists it →
//! `k8s:` selectors. Also the registration entries the agent derives itself for pods eastguard
//! injected (no entries file to write on Kubernetes).
//!
//! What makes it hold:
//! - The cgroup path is read from `/proc/<pid>/cgroup` (world-readable, so anyone can learn a
//!   pod's path) and then **verified** in the host's cgroup tree: the PID must be listed in
//!   `cgroup.procs` of that pod's container directory under `kubepods`, which only root can
//!   create or move processes into. A process in a look-alike cgroup of its own (a user's
//!   delegated systemd subtree) is not in a pod.
//! - The pod comes from this node's kubelet, so only pods scheduled on this node are attested.
//! - Only the container named in the pod's status with that container ID is attested; a pod's
//!   other containers, the pause container and conmon are not it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use identity::{SpiffeId, TrustDomain};
use serde_json::Value;

use crate::entries::{Entry, Selector};

/// A process's pod and container, from its cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// With dashes (`systemd` writes underscores).
    pub pod_uid: String,
    /// 64 hex digits.
    pub container_id: String,
}

/// Reads the pod and container from `/proc/<pid>/cgroup`'s text (cgroup v2 `0::path` or v1
/// `N:controllers:path` lines; systemd and cgroupfs drivers; containerd, CRI-O and Docker).
/// Relative paths (`/../..`, seen from a private cgroup namespace) are read the same way: the
/// pod and container segments are below where they diverge. `None`: not a pod container.
pub fn pod_container(cgroup: &str) -> Option<PodContainer> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        segs.windows(2).find_map(|w| {
            let pod_uid = pod_uid(w[0])?;
            let container_id = container_id(w[1])?;
            Some(PodContainer {
                pod_uid,
                container_id,
            })
        })
    })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-qos]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let at = seg.rfind("pod")?;
    let prefix = &seg[..at];
    if !(prefix.is_empty() || (prefix.starts_with("kubepods") && prefix.ends_with('-'))) {
        return None;
    }
    let uid = seg[at + 3..].replace('_', "-");
    let shape = uid.len() == 36
        && uid.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    shape.then(|| uid.to_ascii_lowercase())
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` (systemd) or `<id>`,
/// `crio-<id>` (cgroupfs). CRI-O's `crio-conmon-<id>` is its monitor, not the container.
fn container_id(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|p| seg.strip_prefix(p))
        .unwrap_or(seg);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The directories a kubelet gives this container, under the cgroup root: both drivers, every
/// QoS class, every runtime's naming.
pub(crate) fn container_dirs(root: &Path, pc: &PodContainer) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let systemd_uid = pc.pod_uid.replace('-', "_");
    let id = &pc.container_id;
    for qos in ["", "burstable", "besteffort"] {
        // systemd driver
        let mut d = root.join("kubepods.slice");
        let pod = if qos.is_empty() {
            format!("kubepods-pod{systemd_uid}.slice")
        } else {
            d = d.join(format!("kubepods-{qos}.slice"));
            format!("kubepods-{qos}-pod{systemd_uid}.slice")
        };
        for scope in [
            format!("cri-containerd-{id}.scope"),
            format!("crio-{id}.scope"),
            format!("docker-{id}.scope"),
        ] {
            out.push(d.join(&pod).join(scope));
        }
        // cgroupfs driver
        let mut d = root.join("kubepods");
        if !qos.is_empty() {
            d = d.join(qos);
        }
        let pod = d.join(format!("pod{}", pc.pod_uid));
        out.push(pod.join(id));
        out.push(pod.join(format!("crio-{id}")));
    }
    out
}

/// The pod container `pid` runs in, verified in the host's cgroup tree at `cgroup_root`.
pub fn verified_pod_container(pid: i32, cgroup_root: &Path) -> Option<PodContainer> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let pc = pod_container(&text)?;
    let listed = container_dirs(cgroup_root, &pc).into_iter().any(|dir| {
        std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| {
            procs
                .lines()
                .any(|l| l.trim().parse::<i32>().ok() == Some(pid))
        })
    });
    listed.then_some(pc)
}

/// Why the kubelet's pod list could not be used; the previous list stays.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error("the kubelet's pod list is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the kubelet's pod list has no items")]
    NoItems,
}

/// This node's pods, as the kubelet lists them (`GET /pods`: a PodList).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pods {
    pods: Vec<Value>,
    /// True for a list the kubelet gave; false for the empty one before it (capture must not
    /// take that for "no pods" and detach what an earlier agent attached).
    listed: bool,
}

impl Pods {
    pub fn parse(body: &[u8]) -> Result<Self, PodsError> {
        let mut list: Value = serde_json::from_slice(body)?;
        match list.get_mut("items").map(Value::take) {
            Some(Value::Array(pods)) => Ok(Self { pods, listed: true }),
            _ => Err(PodsError::NoItems),
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Whether this is a list the kubelet gave (not the empty one before the first).
    pub fn is_listed(&self) -> bool {
        self.listed
    }

    pub(crate) fn items(&self) -> &[Value] {
        &self.pods
    }

    fn by_uid(&self, uid: &str) -> Option<&Value> {
        self.pods
            .iter()
            .find(|p| p["metadata"]["uid"].as_str() == Some(uid))
    }

    /// The `k8s:` selectors of the container, if this node's kubelet lists the pod with a
    /// container of that ID.
    pub fn selectors(&self, pc: &PodContainer) -> Option<BTreeSet<Selector>> {
        let pod = self.by_uid(&pc.pod_uid)?;
        let status = &pod["status"];
        let container = [
            "containerStatuses",
            "initContainerStatuses",
            "ephemeralContainerStatuses",
        ]
        .iter()
        .filter_map(|k| status[*k].as_array())
        .flatten()
        .find(|c| {
            c["containerID"]
                .as_str()
                .and_then(|id| id.split_once("://"))
                .is_some_and(|(_, id)| id.eq_ignore_ascii_case(&pc.container_id))
        })?;
        let meta = &pod["metadata"];
        let spec = &pod["spec"];
        let k = |kind: &str, v: &str| Selector::K8s(kind.to_owned(), v.to_owned());
        let mut s = BTreeSet::from([k("pod-uid", &pc.pod_uid)]);
        let text = |v: &Value| v.as_str().map(str::to_owned);
        if let Some(ns) = text(&meta["namespace"]) {
            s.insert(k("ns", &ns));
        }
        if let Some(name) = text(&meta["name"]) {
            s.insert(k("pod-name", &name));
        }
        let sa = text(&spec["serviceAccountName"]).unwrap_or_else(|| "default".into());
        s.insert(k("sa", &sa));
        if let Some(node) = text(&spec["nodeName"]) {
            s.insert(k("node-name", &node));
        }
        if let Some(labels) = meta["labels"].as_object() {
            for (key, v) in labels {
                if let Some(v) = v.as_str() {
                    s.insert(k("pod-label", &format!("{key}:{v}")));
                }
            }
        }
        if let Some(name) = text(&container["name"]) {
            s.insert(k("container-name", &name));
        }
        if let Some(image) = text(&container["image"]) {
            s.insert(k("container-image", &image));
        }
        Some(s)
    }

    /// Entries for the pods eastguard injected (`sidecar.eastguard.io/status`): the sidecar
    /// container alone gets `spiffe://<td>/ns/<ns>/sa/<sa>` (Istio's shape), never the app's
    /// containers. Pods whose names do not make a valid SPIFFE ID are left out.
    pub fn injected_entries(&self, td: &TrustDomain, ttl: std::time::Duration) -> Vec<Entry> {
        self.pods
            .iter()
            .filter(|p| {
                p["metadata"]["annotations"]["sidecar.eastguard.io/status"]
                    .as_str()
                    .is_some()
            })
            .filter_map(|p| {
                let uid = p["metadata"]["uid"].as_str()?;
                let ns = p["metadata"]["namespace"].as_str()?;
                let sa = p["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default");
                let id = SpiffeId::parse(&format!("spiffe://{td}/ns/{ns}/sa/{sa}")).ok()?;
                Some(Entry {
                    spiffe_id: id,
                    selectors: BTreeSet::from([
                        Selector::K8s("pod-uid".into(), uid.to_owned()),
                        Selector::K8s("container-name".into(), SIDECAR.into()),
                    ]),
                    ttl,
                })
            })
            .collect()
    }
}

/// The injected sidecar's container name (the webhook's).
pub const SIDECAR: &str = "eastguard-proxy";

/// Where the node's pods come from.
#[derive(Debug, Clone)]
pub struct KubeletOptions {
    /// The kubelet's pod list: `https://127.0.0.1:10250/pods` (with a token and the kubelet's
    /// CA), or `http://…` (the read-only port, or a stand-in in tests).
    pub url: String,
    /// A bearer token file (a projected service-account token), re-read at every request.
    pub token_file: Option<PathBuf>,
    /// The CA that signed the kubelet's serving certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// The host's cgroup tree (a hostPath of `/sys/fs/cgroup` in a DaemonSet).
    pub cgroup_root: PathBuf,
    pub poll: std::time::Duration,
}

/// Why the pod list could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("kubelet URL {0:?}: expected http://HOST:PORT/PATH or https://HOST:PORT/PATH")]
    Url(String),
    #[error("kubelet CA {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("token file {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubelet {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("kubelet {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error(transparent)]
    Pods(#[from] PodsError),
}

/// Pod lists larger than this are refused (a node runs at most a few hundred pods).
const MAX_LIST: usize = 64 * 1024 * 1024;

/// A client of the kubelet's pod list.
pub struct Kubelet {
    opts: KubeletOptions,
    uri: http::Uri,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

impl Kubelet {
    pub fn new(opts: KubeletOptions) -> Result<Self, FetchError> {
        let uri: http::Uri = opts
            .url
            .parse()
            .map_err(|_| FetchError::Url(opts.url.clone()))?;
        let host = uri
            .host()
            .ok_or_else(|| FetchError::Url(opts.url.clone()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let ca_err = |path: &Path, reason: String| FetchError::Ca {
                    path: path.display().to_string(),
                    reason,
                };
                let Some(ca) = &opts.ca_file else {
                    return Err(FetchError::Ca {
                        path: "(none)".into(),
                        reason: "an https kubelet URL needs --kubelet-ca".into(),
                    });
                };
                use rustls_pki_types::pem::PemObject as _;
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)
                    .map_err(|e| ca_err(ca, e.to_string()))?
                {
                    roots
                        .add(c.map_err(|e| ca_err(ca, e.to_string()))?)
                        .map_err(|e| ca_err(ca, e.to_string()))?;
                }
                let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| ca_err(ca, e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                let name = rustls_pki_types::ServerName::try_from(host)
                    .map_err(|_| FetchError::Url(opts.url.clone()))?;
                Some((
                    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
                    name,
                ))
            }
            _ => return Err(FetchError::Url(opts.url.clone())),
        };
        Ok(Self { opts, uri, tls })
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.opts.cgroup_root
    }

    pub fn poll(&self) -> std::time::Duration {
        self.opts.poll
    }

    /// One `GET` of the pod list.
    pub async fn fetch(&self) -> Result<Pods, FetchError> {
        use http_body_util::BodyExt as _;
        let url = self.opts.url.clone();
        let fail = |reason: String| FetchError::Request {
            url: url.clone(),
            reason,
        };
        let port = self
            .uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let host = self.uri.host().unwrap_or_default();
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect((
                host.trim_start_matches('[').trim_end_matches(']'),
                port,
            )),
        )
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
        let mut req = http::Request::get(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", self.uri.authority().map_or("", |a| a.as_str()))
            .header("accept", "application/json");
        if let Some(path) = &self.opts.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| FetchError::Token {
                path: path.display().to_string(),
                source,
            })?;
            req = req.header("authorization", format!("Bearer {}", token.trim()));
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let work = async {
            let resp = match &self.tls {
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    send(hyper_util::rt::TokioIo::new(tls), req).await
                }
                None => send(hyper_util::rt::TokioIo::new(tcp), req).await,
            }
            .map_err(fail)?;
            if !resp.status().is_success() {
                return Err(FetchError::Status {
                    url: url.clone(),
                    status: resp.status().as_u16(),
                });
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_LIST)
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            Ok(Pods::parse(&body)?)
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), work)
            .await
            .map_err(|_| fail("timed out".into()))?
    }
}

async fn send<I>(
    io: I,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5b1f3a2e-8c4d-4e6f-9a0b-1c2d3e4f5a6b";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn want() -> Option<PodContainer> {
        Some(PodContainer {
            pod_uid: UID.into(),
            container_id: CID.into(),
        })
    }

    #[test]
    fn cgroup_paths_of_real_kubelet_layouts() {
        let u = UID.replace('-', "_");
        for text in [
            // systemd driver, containerd, burstable (cgroup v2)
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope\n"
            ),
            // systemd driver, CRI-O, guaranteed
            format!("0::/kubepods.slice/kubepods-pod{u}.slice/crio-{CID}.scope\n"),
            // cgroupfs driver, containerd, besteffort
            format!("0::/kubepods/besteffort/pod{UID}/{CID}\n"),
            // cgroupfs driver, CRI-O
            format!("0::/kubepods/burstable/pod{UID}/crio-{CID}\n"),
            // cgroup v1, several hierarchies, Docker through systemd
            format!(
                "12:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{CID}.scope\n11:cpu,cpuacct:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{CID}.scope\n1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{CID}.scope\n"
            ),
            // seen from the agent's own (private) cgroup namespace
            format!(
                "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope\n"
            ),
        ] {
            assert_eq!(pod_container(&text), want(), "{text}");
        }
    }

    #[test]
    fn processes_outside_pod_containers_are_not_in_a_pod() {
        let u = UID.replace('-', "_");
        for text in [
            "0::/user.slice/user-1000.slice/session-3.scope\n".to_owned(),
            "0::/system.slice/containerd.service\n".to_owned(),
            // the pod's own cgroup (no container), CRI-O's monitor, a truncated ID
            format!("0::/kubepods.slice/kubepods-pod{u}.slice\n"),
            format!("0::/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{CID}.scope\n"),
            format!("0::/kubepods/pod{UID}/{}\n", &CID[..63]),
            // a look-alike pod segment
            format!("0::/user.slice/evilpod{UID}/{CID}\n"),
            String::new(),
            "garbage".to_owned(),
        ] {
            assert_eq!(pod_container(&text), None, "{text}");
        }
    }

    #[test]
    fn a_look_alike_cgroup_is_not_verified() {
        // A user-made directory tree with the right names but not under the cgroup root's
        // kubepods: the PID is nowhere in the kubelet's tree.
        let root = std::env::temp_dir().join(format!("eastguard-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let pc = want().unwrap();
        assert!(container_dirs(&root, &pc).iter().all(|d| !d.exists()));
        assert_eq!(
            verified_pod_container(std::process::id() as i32, &root),
            None
        );
    }

    fn kubelet() -> Pods {
        Pods::parse(
            serde_json::json!({"kind": "PodList", "items": [{
                "metadata": {"name": "web-1", "namespace": "shop", "uid": UID,
                             "labels": {"app": "web"},
                             "annotations": {"sidecar.eastguard.io/status": "{}"}},
                "spec": {"serviceAccountName": "web", "nodeName": "node-a"},
                "status": {
                    "containerStatuses": [{"name": "web", "image": "web:1", "containerID": format!("containerd://{}", "f".repeat(64))}],
                    "initContainerStatuses": [{"name": "eastguard-proxy", "image": "eg:1", "containerID": format!("containerd://{CID}")}],
                },
            }]})
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn the_pod_gives_the_selectors_of_that_container_only() {
        let pods = kubelet();
        let s = pods.selectors(&want().unwrap()).unwrap();
        let k = |a: &str, b: &str| Selector::K8s(a.into(), b.into());
        for sel in [
            k("ns", "shop"),
            k("sa", "web"),
            k("pod-uid", UID),
            k("pod-name", "web-1"),
            k("pod-label", "app:web"),
            k("container-name", "eastguard-proxy"),
            k("node-name", "node-a"),
        ] {
            assert!(s.contains(&sel), "{sel:?}");
        }
        // Another container ID in the same pod: not this container; an unknown pod: nothing.
        let other = PodContainer {
            pod_uid: UID.into(),
            container_id: "e".repeat(64),
        };
        assert_eq!(pods.selectors(&other), None);
        let elsewhere = PodContainer {
            pod_uid: "00000000-0000-0000-0000-000000000000".into(),
            container_id: CID.into(),
        };
        assert_eq!(pods.selectors(&elsewhere), None);
    }

    #[test]
    fn injected_pods_get_an_entry_for_their_sidecar_container() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let entries = kubelet().injected_entries(&td, std::time::Duration::from_secs(3600));
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(
            entries[0]
                .selectors
                .contains(&Selector::K8s("container-name".into(), SIDECAR.into()))
        );
    }
}
