//! `eastguard node-agent --capture REGISTRY` (or `--capture-pods`, the pods the kubelet lists for
//! capture): keeps each registered pod's eBPF capture attached
//! (`ebpf-redirect`), and serves its state on a loopback admin endpoint:
//! `GET /capture` (JSON), `GET /stats/prometheus`, `GET /healthz/ready` (200 when every
//! registered pod is attached).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use ebpf_redirect::{Manager, PodStatus, Registry, State};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

pub struct CaptureOptions {
    pub source: Source,
    pub bpffs: PathBuf,
    pub admin: Option<SocketAddr>,
    pub poll: Duration,
}

/// Where the pods to capture come from.
pub enum Source {
    /// A registry file (`--capture FILE`).
    File(PathBuf),
    /// The kubelet's pod list (`--capture-pods`): the pods the webhook set up for capture
    /// (`node_agent::k8s_capture`); each pod's status file is `<status_dir>/<pod uid>.capture`.
    Pods {
        pods: tokio::sync::watch::Receiver<Arc<node_agent::k8s::Pods>>,
        cgroup_root: PathBuf,
        status_dir: PathBuf,
    },
}

#[derive(Default)]
struct Shared {
    pods: Vec<PodStatus>,
    registry_error: Option<String>,
    reconciles: u64,
}

/// What one poll of the source gives.
enum Read {
    /// Nothing to act on yet (a file mid-write, no pod list yet).
    NotYet,
    Registry(Registry),
    /// The source is broken; the last good registry stays.
    Broken(String),
}

/// The registry file, applied once two polls read the same bytes, so a file caught
/// half-written is never reconciled (a pod dropped from it would lose its capture).
fn read_file(path: &std::path::Path, last_read: &mut Option<String>) -> Read {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    let stable = text.as_ref().ok() == last_read.as_ref();
    *last_read = text.as_ref().ok().cloned();
    match text {
        Ok(_) if !stable => Read::NotYet,
        Ok(t) => match Registry::parse(&t) {
            Ok(r) => Read::Registry(r),
            Err(e) => Read::Broken(format!("{}: {e}", path.display())),
        },
        Err(e) => Read::Broken(e),
    }
}

/// Capture registry names of pods from the pod list: this, then the pod's UID.
const POD_PREFIX: &str = "k8s-";

/// What `from_pods` keeps from one poll to the next.
#[derive(Default)]
struct FromPods {
    targets: node_agent::k8s_capture::CaptureTargets,
    /// What was logged last poll (each message is said once while it holds).
    said: std::collections::BTreeSet<String>,
    /// The last entry of each pod that passed the registry's checks.
    good: std::collections::BTreeMap<String, ebpf_redirect::PodSpec>,
}

/// The registry for the pods the kubelet lists for capture. A pod whose entry does not pass
/// the registry's checks (a bad CIDR in its annotation) keeps its last good entry, or is left
/// out if it never had one; either way it is said once.
fn from_pods(
    state: &mut FromPods,
    pods: &node_agent::k8s::Pods,
    cgroup_root: &std::path::Path,
    status_dir: &std::path::Path,
) -> Read {
    let FromPods {
        targets,
        said,
        good,
    } = state;
    let Some((found, failed)) = targets.update(pods, cgroup_root) else {
        return Read::NotYet;
    };
    let mut now_said = std::collections::BTreeSet::new();
    let mut say = |key: String, f: &dyn Fn()| {
        if !said.contains(&key) {
            f();
        }
        now_said.insert(key);
    };
    for f in &failed {
        say(
            format!("{}: {}", f.pod, f.reason),
            &|| tracing::warn!(pod = %f.pod, reason = %f.reason, "pod set up for capture not placed (an earlier capture of it stays)"),
        );
    }
    let mut registry = Registry::default();
    for t in found {
        if !t.ignored.is_empty() {
            say(
                format!("{}: ignored {:?}", t.pod, t.ignored),
                &|| tracing::warn!(pod = %t.pod, ignored = ?t.ignored, "capture settings eBPF capture does not apply; the pod is captured whole"),
            );
        }
        let spec = ebpf_redirect::PodSpec {
            name: format!("{POD_PREFIX}{}", t.uid),
            cgroup: t.cgroup,
            sidecar_cgroup: t.sidecar_cgroup,
            netns: t.netns,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_outbound_ports: t.exclude_outbound_ports,
            exclude_outbound_cidrs: t.exclude_outbound_cidrs,
            exclude_inbound_ports: t.exclude_inbound_ports,
            short_circuit: true,
            status_file: Some(status_dir.join(format!("{}.capture", t.uid))),
        };
        let one = Registry {
            pods: vec![spec.clone()],
        };
        match one.validate() {
            Ok(()) => {
                good.insert(spec.name.clone(), spec.clone());
                registry.pods.push(spec);
            }
            Err(e) => {
                let kept = good.get(&spec.name).cloned();
                say(
                    format!("{}: {e}", t.pod),
                    &|| tracing::error!(pod = %t.pod, error = %e, kept_earlier = kept.is_some(), "capture entry refused"),
                );
                registry.pods.extend(kept);
            }
        }
    }
    good.retain(|name, _| registry.pods.iter().any(|p| &p.name == name));
    *said = now_said;
    Read::Registry(registry)
}

pub async fn run(
    opts: CaptureOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut manager = Manager::new(&opts.bpffs).context("starting capture")?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    if let Some(addr) = opts.admin {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "--capture-admin {addr} must be a loopback address"
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the capture admin endpoint {addr}"))?;
        tokio::spawn(serve_admin(listener, shared.clone()));
    }
    let mut source = opts.source;
    let mut registry = Registry::default();
    // A broken source keeps the last good registry; before the first good one, nothing is
    // touched (a restarted agent re-adopts what is pinned once it knows the pods).
    let mut have_good = false;
    let mut last_read: Option<String> = None;
    let mut from_pods_state = FromPods::default();
    if matches!(source, Source::Pods { .. }) {
        // Pods an earlier agent captured stay captured, with what they were captured with,
        // whatever their annotation says now (the decision is made once per pod).
        for (name, e) in manager.pinned() {
            if let Some(uid) = name.strip_prefix(POD_PREFIX) {
                tracing::info!(pod_uid = uid, exclusions = ?e, "adopting a pod an earlier agent captured");
                from_pods_state.targets.adopt(
                    uid,
                    node_agent::k8s_capture::Exclusions {
                        inbound_ports: e.inbound_ports,
                        outbound_ports: e.outbound_ports,
                        outbound_cidrs: e.outbound_cidrs,
                    },
                );
            }
        }
    }
    let mut tick = tokio::time::interval(opts.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        let read = match &mut source {
            Source::File(path) => read_file(path, &mut last_read),
            Source::Pods {
                pods,
                cgroup_root,
                status_dir,
            } => {
                let list = pods.borrow_and_update().clone();
                tokio::task::block_in_place(|| {
                    from_pods(&mut from_pods_state, &list, cgroup_root, status_dir)
                })
            }
        };
        let registry_error = match read {
            Read::NotYet => continue,
            Read::Registry(r) => {
                registry = r;
                have_good = true;
                None
            }
            Read::Broken(e) => Some(e),
        };
        {
            // Logged when it changes, not at every poll.
            let mut s = lock(&shared);
            if s.registry_error != registry_error
                && let Some(e) = &registry_error
            {
                if have_good {
                    tracing::error!(error = %e, "capture registry (keeping the last good one)");
                } else {
                    tracing::error!(error = %e, "capture registry (nothing adopted or removed until it parses)");
                }
            }
            s.registry_error = registry_error;
        }
        if !have_good {
            // Nothing good yet: adopt nothing, remove nothing, until the source is read.
            continue;
        }
        let keep: Vec<String> = from_pods_state
            .targets
            .held()
            .map(|uid| format!("{POD_PREFIX}{uid}"))
            .collect();
        let pods = tokio::task::block_in_place(|| manager.reconcile(&registry, &keep));
        let mut s = lock(&shared);
        s.pods = pods;
        s.reconciles += 1;
    }
    // Capture stays attached (pinned) when the agent stops; only a registry removal detaches.
    tracing::info!("node-agent capture stopped; pods stay captured");
    Ok(())
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_admin(listener: tokio::net::TcpListener, shared: Arc<Mutex<Shared>>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(&req, &lock(&shared));
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, s: &Shared) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/capture" => {
            let body = serde_json::json!({
                "pods": s.pods,
                "registry_error": s.registry_error,
                "reconciles": s.reconciles,
            });
            reply(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        "/healthz/ready" => {
            let ready = s.reconciles > 0 && s.pods.iter().all(|p| p.state == State::Attached);
            if ready {
                reply(StatusCode::OK, "text/plain", "LIVE\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "capture not attached\n".into(),
                )
            }
        }
        "/stats/prometheus" => reply(StatusCode::OK, "text/plain; version=0.0.4", prometheus(s)),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `/stats/prometheus`: the pods' capture state through a prometheus-client registry (one
/// collector over a snapshot), served in the 0.0.4 text format like the sidecar's.
fn prometheus(s: &Shared) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(CaptureCollector(s.pods.clone())));
    let mut open_metrics = String::new();
    let _ = prometheus_client::encoding::text::encode_registry(&mut open_metrics, &registry);
    proxy::stats::to_classic_text(&open_metrics)
}

#[derive(Debug)]
struct CaptureCollector(Vec<PodStatus>);

impl prometheus_client::collector::Collector for CaptureCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        for name in ebpf_redirect::COUNTERS {
            let metric = format!("eastguard_capture_{name}");
            let help = format!("eBPF capture: {name}, per pod");
            let mut family =
                encoder.encode_descriptor(&metric, &help, None, MetricType::Counter)?;
            for p in &self.0 {
                let v = p.counters.get(name).copied().unwrap_or(0);
                ConstCounter::new(v).encode(family.encode_family(&[("pod", p.name.as_str())])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "eastguard_capture_attached",
            "Whether every capture program is attached to the pod (1) or not (0)",
            None,
            MetricType::Gauge,
        )?;
        for p in &self.0 {
            let attached = i64::from(p.state == State::Attached);
            ConstGauge::new(attached).encode(family.encode_family(&[("pod", p.name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "eastguard_capture_link_repairs",
            "Capture links found detached or pointing elsewhere and re-created",
            None,
            MetricType::Counter,
        )?;
        for p in &self.0 {
            ConstCounter::new(p.repairs)
                .encode(family.encode_family(&[("pod", p.name.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, state: State, denied: u64, repairs: u64) -> PodStatus {
        PodStatus {
            name: name.into(),
            state,
            error: None,
            links: Default::default(),
            inbound_ipv4: true,
            inbound_ipv6: false,
            repairs,
            counters: [("outbound_denied", denied)].into_iter().collect(),
        }
    }

    #[test]
    fn capture_metrics_are_classic_text_per_pod() {
        let s = Shared {
            pods: vec![
                pod("a", State::Attached, 7, 0),
                pod("b", State::NotReady, 0, 2),
            ],
            ..Default::default()
        };
        let text = prometheus(&s);
        for line in [
            "# TYPE eastguard_capture_outbound_denied_total counter",
            "eastguard_capture_outbound_denied_total{pod=\"a\"} 7",
            "eastguard_capture_outbound_denied_total{pod=\"b\"} 0",
            "eastguard_capture_outbound_redirected_total{pod=\"a\"} 0",
            "# TYPE eastguard_capture_attached gauge",
            "eastguard_capture_attached{pod=\"a\"} 1",
            "eastguard_capture_attached{pod=\"b\"} 0",
            "# TYPE eastguard_capture_link_repairs_total counter",
            "eastguard_capture_link_repairs_total{pod=\"b\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        assert!(!text.contains("# EOF"));
    }
}
