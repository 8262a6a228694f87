//! `eastguard control-plane`: reads Istio resources from a directory (and watches it), and serves
//! each proxy — or proxyless gRPC client — its own configuration over ADS.
//!
//! Port 15010 is plaintext, for loopback development: a caller is who its node says it is. Every
//! change to the directory is pushed within one poll interval; a bad file is rejected (logged,
//! naming file, document and field) and its last good content keeps being served.

pub mod audit;
pub mod ca;
pub mod generate;
pub mod inject;
pub mod inventory;
pub mod kube;
pub mod registry;
pub mod webhook;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;
use xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use xds::server::{AdsServer, Caller, Snapshot, SnapshotSource};

pub use generate::Mesh;
use registry::{Directory, Registry};

/// How the control plane is run.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_dir: PathBuf,
    pub xds_address: SocketAddr,
    /// ADS over mTLS (Istio's 15012): the caller's SPIFFE ID must be its workload's.
    pub tls: Option<TlsOptions>,
    pub mesh: Mesh,
    pub poll_interval: Duration,
    /// Where the inventory store lives (`inventory.sqlite3`); in memory without one.
    pub data_dir: Option<PathBuf>,
    /// The inventory's HTTP API (`/apis`); off without one.
    pub http_address: Option<SocketAddr>,
    pub inventory: inventory::store::StoreLimits,
    /// Policy changes as OCSF events, one per line (they are also at `/apis/events`).
    pub audit_log: Option<PathBuf>,
    /// The injection webhook (HTTPS); off without one.
    pub webhook: Option<webhook::WebhookOptions>,
    /// The Kubernetes API as a source besides the files; off without one.
    pub kubernetes: Option<kube::KubeOptions>,
    /// The CA that gives node agents their intermediates (needs `kubernetes`); off without one.
    pub ca: Option<ca::CaOptions>,
}

/// The control plane's own SVID (PEM files, re-read when they change) and where to serve mTLS.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub address: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// The registry in force and per-workload snapshots generated from it.
pub struct ControlPlane {
    mesh: Mesh,
    registry: RwLock<Arc<Registry>>,
    generation: watch::Sender<u64>,
    /// Snapshots by what they are generated from (never by what a node says about itself), so
    /// the cache holds at most two entries per workload of the registry, plus one.
    cache: Mutex<HashMap<(SnapshotKey, u64), Arc<Snapshot>>>,
    /// What each connected proxy holds (sent / ACKed / NACKed per type), for `proxy-status`.
    pub sync: Arc<xds::sync::SyncRegistry>,
}

/// What a snapshot is generated from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SnapshotKey {
    /// A sidecar of the workload (namespace, name).
    Sidecar(String, String),
    /// A proxyless gRPC client: of a workload (mTLS), or anyone on the plaintext port.
    Proxyless(Option<(String, String)>),
}

impl ControlPlane {
    pub fn new(mesh: Mesh, registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            mesh,
            registry: RwLock::new(Arc::new(registry)),
            generation: watch::channel(0).0,
            cache: Mutex::default(),
            sync: Arc::default(),
        })
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn registry(&self) -> Arc<Registry> {
        match self.registry.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Installs a new registry and tells every stream to recompute.
    pub fn set(&self, registry: Registry) {
        match self.registry.write() {
            Ok(mut g) => *g = Arc::new(registry),
            Err(p) => *p.into_inner() = Arc::new(registry),
        }
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Who the caller is, checked before anything is generated or served from the cache: on the
    /// mTLS port every caller (sidecar or proxyless gRPC) must be a registered workload whose
    /// SPIFFE ID is the caller's verified one; on the plaintext port a sidecar is who its node id
    /// says, and a proxyless client needs no workload.
    fn resolve(&self, caller: &Caller, reg: &Registry) -> Result<SnapshotKey, Status> {
        let proxyless = caller
            .node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("GENERATOR"))
            .is_some_and(|v| {
                matches!(&v.kind, Some(xds::pb::google::protobuf::value::Kind::StringValue(s)) if s == "grpc")
            });
        let workload = generate::workload_for_node(&caller.node.id, reg);
        let Some(peer) = &caller.peer_id else {
            return match (proxyless, workload) {
                (true, _) => Ok(SnapshotKey::Proxyless(None)),
                (false, Some(w)) => Ok(SnapshotKey::Sidecar(
                    w.meta.namespace.clone(),
                    w.meta.name.clone(),
                )),
                (false, None) => Err(unknown_node(&caller.node.id)),
            };
        };
        let w = workload.ok_or_else(|| unknown_node(&caller.node.id))?;
        let expected = self.mesh.spiffe_id(&w.meta.namespace, w.service_account());
        if *peer != expected {
            return Err(Status::permission_denied(format!(
                "node {} is workload {}/{}, which is {expected}; the caller is {peer}",
                caller.node.id, w.meta.namespace, w.meta.name
            )));
        }
        let id = (w.meta.namespace.clone(), w.meta.name.clone());
        Ok(if proxyless {
            SnapshotKey::Proxyless(Some(id))
        } else {
            SnapshotKey::Sidecar(id.0, id.1)
        })
    }

    fn generate(&self, key: &SnapshotKey, reg: &Registry) -> Result<Snapshot, Status> {
        match key {
            SnapshotKey::Proxyless(_) => Ok(generate::proxyless(reg)),
            SnapshotKey::Sidecar(namespace, name) => {
                let w = reg
                    .workload(namespace, name)
                    .ok_or_else(|| Status::unavailable("the workload was just removed"))?;
                let (snap, notes) = generate::sidecar(w, reg, &self.mesh);
                for n in notes {
                    tracing::debug!(workload = %format!("{namespace}/{name}"), note = %n, "generation note");
                }
                Ok(snap)
            }
        }
    }

    /// Which workload (`namespace/name`) an inventory report is from, checked as a stream's
    /// caller is; and the hosts of services it does not back (it may not report for them).
    pub fn reporter(
        &self,
        node_id: &str,
        peer: Option<&str>,
    ) -> Result<(String, std::collections::BTreeSet<String>), Status> {
        let reg = self.registry();
        let caller = Caller {
            node: xds::pb::envoy::config::core::v3::Node {
                id: node_id.to_owned(),
                ..Default::default()
            },
            peer_id: peer.map(str::to_owned),
        };
        let SnapshotKey::Sidecar(namespace, name) = self.resolve(&caller, &reg)? else {
            return Err(unknown_node(node_id));
        };
        let w = reg
            .workload(&namespace, &name)
            .ok_or_else(|| unknown_node(node_id))?;
        let (mine, theirs): (Vec<_>, Vec<_>) =
            reg.services.iter().partition(|s| generate::selects(s, w));
        let mine: std::collections::BTreeSet<&String> =
            mine.iter().flat_map(|s| &s.hosts).collect();
        let foreign = theirs
            .iter()
            .flat_map(|s| &s.hosts)
            .filter(|h| !mine.contains(h))
            .cloned()
            .collect();
        Ok((format!("{namespace}/{name}"), foreign))
    }

    /// How many snapshots are cached (bounded by the registry, whatever callers send).
    pub fn cached_snapshots(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }
}

fn unknown_node(id: &str) -> Status {
    Status::permission_denied(format!(
        "node {id:?} is not a known workload (expected sidecar~IP~NAME.NAMESPACE~… matching a WorkloadEntry)"
    ))
}

impl SnapshotSource for ControlPlane {
    fn snapshot(&self, caller: &Caller) -> Result<Arc<Snapshot>, Status> {
        let generation = *self.generation.borrow();
        let reg = self.registry();
        let refused = |status: &Status| {
            tracing::warn!(node = %caller.node.id, peer = ?caller.peer_id, reason = %status.message(), "xDS stream refused");
        };
        let key = (self.resolve(caller, &reg).inspect_err(refused)?, generation);
        if let Some(s) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(s);
        }
        let snap = Arc::new(self.generate(&key.0, &reg).inspect_err(refused)?);
        if let Ok(mut c) = self.cache.lock() {
            // Entries of an older generation are dropped as newer ones arrive.
            c.retain(|(_, g), _| *g >= generation);
            c.insert(key, snap.clone());
        }
        Ok(snap)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn nacked(&self, caller: &Caller, type_url: &str, version: &str, detail: &str) {
        tracing::warn!(node = %caller.node.id, r#type = xds::types::short(type_url), %version, %detail, "proxy NACKed its configuration");
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("trust domain: {0}")]
    TrustDomain(#[from] identity::SpiffeIdError),
    #[error("Kubernetes: {0}")]
    Kubernetes(#[from] kube::client::ConfigError),
    #[error(transparent)]
    ConfigDir(#[from] registry::DirectoryError),
    #[error("API inventory: {0}")]
    Inventory(#[from] inventory::store::StoreError),
    #[error("{what} {address}: {source}")]
    Bind {
        what: &'static str,
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("--audit-log: {0}")]
    AuditLog(std::io::Error),
    #[error("control plane SVID: {0}")]
    Svid(#[from] identity::SourceError),
    #[error("TLS: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
}

async fn bind(
    what: &'static str,
    address: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what,
            address,
            source,
        })
}

/// Runs until `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let mut dir = Directory::new(opts.config_dir.clone());
    dir.refresh()?;
    let cp = ControlPlane::new(opts.mesh.clone(), dir.registry());
    let reg = cp.registry();
    tracing::info!(
        dir = %opts.config_dir.display(),
        services = reg.services.len(),
        workloads = reg.workloads.len(),
        authorization_policies = reg.authorization.len(),
        peer_authentications = reg.peer_authentication.len(),
        errors = dir.errors.len(),
        "registry loaded"
    );
    let apis =
        inventory::ApiInventory::open(opts.data_dir.as_deref(), &opts.config_dir, opts.inventory)?;
    let listener = bind("xDS address", opts.xds_address).await?;
    let http_listener = match opts.http_address {
        Some(a) => Some(bind("HTTP address", a).await?),
        None => None,
    };
    let (closing_tx, closing) = watch::channel(false);
    let server = AdsServer::new(cp.clone())
        .with_shutdown(closing.clone())
        .with_sync(cp.sync.clone());
    let mut closing_wait = closing;
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(
            AggregatedDiscoveryServiceServer::new(server)
                .max_decoding_message_size(16 * 1024 * 1024),
        )
        .add_service(receiver(&cp, &apis))
        .add_service(log_receiver(&cp, &apis))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = closing_wait.wait_for(|c| *c).await;
            },
        );
    tracing::info!(address = %opts.xds_address, "serving ADS (plaintext)");
    let http_task = http_listener.map(|l| {
        tracing::info!(address = ?opts.http_address, "serving the API inventory over HTTP (/apis)");
        tokio::spawn(inventory::http::serve(
            l,
            cp.clone(),
            apis.clone(),
            closing_tx.subscribe(),
        ))
    });
    let audit_log = audit::AuditLog::open(opts.audit_log.as_ref()).map_err(StartError::AuditLog)?;
    let cp2 = cp.clone();
    let apis2 = apis.clone();
    let poll = opts.poll_interval;
    let kube_client = match &opts.kubernetes {
        Some(k) => Some(kube::connect(k)?),
        None => None,
    };
    let (mut kube_rx, kube_pods) = match (&kube_client, opts.kubernetes.clone()) {
        (Some(c), Some(k)) => {
            let started = kube::start(c, k);
            apis.set_cluster(started.cluster);
            (Some(started.registry), Some(started.pods))
        }
        _ => (None, None),
    };
    let watcher = tokio::spawn(async move {
        loop {
            let kube_changed = async {
                match &mut kube_rx {
                    Some(r) => r.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let mut changed = false;
            tokio::select! {
                _ = tokio::time::sleep(poll) => {
                    let a = apis2.clone();
                    let _ = tokio::task::spawn_blocking(move || a.refresh()).await;
                    match dir.refresh() {
                        Ok(c) => changed = c,
                        Err(e) => tracing::error!(error = %e, "cannot read the config directory"),
                    }
                }
                ok = kube_changed => {
                    if ok {
                        changed = true;
                    } else {
                        kube_rx = None;
                    }
                }
            }
            if !changed {
                continue;
            }
            // The files and, once every Kubernetes resource is listed, what Kubernetes says.
            let mut new = dir.registry();
            if let Some(k) = kube_rx.as_ref().and_then(|r| r.borrow().clone()) {
                new.extend(&k);
            }
            let events: Vec<apisec::otlp::Event> = audit::changes(&cp2.registry(), &new)
                .into_iter()
                .map(|(id, activity, kind, name)| {
                    let e = audit::event(id, activity, kind, &name);
                    audit_log.write(&e);
                    apisec::otlp::Event {
                        time_ms: e["time"].as_u64().unwrap_or(0),
                        class_uid: 3004,
                        class_name: "Entity Management".into(),
                        severity_id: 2,
                        message: e["message"].as_str().unwrap_or("").to_owned(),
                        ocsf: e,
                    }
                })
                .collect();
            cp2.set(new);
            tracing::info!(policy_changes = events.len(), "registry changed; pushing");
            if !events.is_empty() {
                let a = apis2.clone();
                let _ = tokio::task::spawn_blocking(move || a.add_events("control-plane", &events))
                    .await;
            }
        }
    });
    let server_task = tokio::spawn(serve);
    // The trust domain's root, for node CAs and (without given files) the webhook's certificate.
    let root = match &opts.ca {
        Some(c) => Some(ca::load_root(
            c.dir.as_deref(),
            identity::TrustDomain::parse(&opts.mesh.trust_domain)?,
        )?),
        None => None,
    };
    let webhook_task = match opts.webhook.clone() {
        Some(mut w) => {
            // With the API at hand, pods admitted without a sidecar (or refused) get an Event.
            w.events = kube_client.clone().map(kube::events::EventSink::start);
            if let (webhook::WebhookCert::FromCa { configuration, .. }, Some(client), Some(root)) =
                (&w.cert, &kube_client, &root)
            {
                tokio::spawn(kube::webhook_config::keep_ca_bundle(
                    client.clone(),
                    configuration.clone(),
                    root.cert_pem(),
                    closing_tx.subscribe(),
                ));
            }
            Some(tokio::spawn(
                webhook::serve(w, root.clone(), closing_tx.subscribe()).await?,
            ))
        }
        None => None,
    };
    let ca_task = match (opts.ca.clone(), &root) {
        (Some(c), Some(root)) => {
            let kube = kube_client.clone().zip(kube_pods);
            Some(tokio::spawn(
                ca::serve(c, root.clone(), kube, closing_tx.subscribe()).await?,
            ))
        }
        _ => None,
    };
    let tls_task = match &opts.tls {
        Some(t) => Some(tokio::spawn(
            serve_tls(t.clone(), cp.clone(), apis.clone(), closing_tx.subscribe()).await?,
        )),
        None => None,
    };
    shutdown.await;
    tracing::info!("shutting down");
    watcher.abort();
    closing_tx.send_replace(true);
    let _ = server_task.await;
    if let Some(t) = tls_task {
        let _ = t.await;
    }
    if let Some(t) = http_task {
        let _ = t.await;
    }
    if let Some(t) = webhook_task {
        let _ = t.await;
    }
    if let Some(t) = ca_task {
        let _ = t.await;
    }
    Ok(())
}

/// The OTLP logs receiver for sidecars' audit events.
fn log_receiver(
    cp: &Arc<ControlPlane>,
    apis: &Arc<inventory::ApiInventory>,
) -> opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsServiceServer<
    inventory::receiver::Receiver,
> {
    opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsServiceServer::new(
        inventory::receiver::Receiver {
            control_plane: cp.clone(),
            inventory: apis.clone(),
        },
    )
    .max_decoding_message_size(16 * 1024 * 1024)
}

/// The OTLP metrics receiver for sidecars' inventory reports.
fn receiver(
    cp: &Arc<ControlPlane>,
    apis: &Arc<inventory::ApiInventory>,
) -> opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer<
    inventory::receiver::Receiver,
>{
    opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer::new(
        inventory::receiver::Receiver {
            control_plane: cp.clone(),
            inventory: apis.clone(),
        },
    )
    .max_decoding_message_size(16 * 1024 * 1024)
}

/// The mTLS ADS server: binds, then returns the serving future.
async fn serve_tls(
    t: TlsOptions,
    cp: Arc<ControlPlane>,
    apis: Arc<inventory::ApiInventory>,
    closing: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, StartError> {
    let creds = identity::FileSource {
        cert: t.cert.clone(),
        key: t.key.clone(),
        bundle: t.bundle.clone(),
        federated: Vec::new(),
        poll_interval: Duration::from_secs(1),
    }
    .watch()?;
    let config = identity::tls::server_config(creds, &[b"h2"])?;
    let listener = bind("xDS mTLS address", t.address).await?;
    tracing::info!(address = %t.address, "serving ADS over mTLS; callers get only their own workload's configuration");
    let incoming = xds::tls::incoming(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        |certs| identity::tls::peer_spiffe_id(certs).map(|id| id.as_str().to_owned()),
    );
    let otlp = receiver(&cp, &apis);
    let otlp_logs = log_receiver(&cp, &apis);
    let sync = cp.sync.clone();
    let server = AdsServer::new(cp)
        .with_shutdown(closing.clone())
        .with_sync(sync);
    let mut closing_wait = closing;
    Ok(async move {
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .add_service(otlp)
            .add_service(otlp_logs)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = closing_wait.wait_for(|c| *c).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "mTLS ADS server failed");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds::pb::envoy::config::core::v3::Node;
    use xds::pb::google::protobuf::{Struct, Value, value::Kind};

    const REGISTRY: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ledger, namespace: bank}\nspec: {hosts: [ledger.bank.svc.cluster.local], ports: [{number: 80, name: http, protocol: HTTP}], workloadSelector: {labels: {app: ledger}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: ledger, namespace: bank}\nspec: {address: 127.0.0.1, ports: {http: 8080}, labels: {app: ledger}, serviceAccount: ledger}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: web, namespace: bank}\nspec: {address: 127.0.0.2, labels: {app: web}, serviceAccount: web}\n";

    fn control_plane() -> Arc<ControlPlane> {
        control_plane_with(REGISTRY)
    }

    fn control_plane_with(registry: &str) -> Arc<ControlPlane> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("eg-cp-lib-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("r.yaml"), registry).unwrap();
        let mut d = Directory::new(dir.clone());
        d.refresh().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        ControlPlane::new(
            Mesh {
                trust_domain: "cluster.local".into(),
                root_namespace: "istio-system".into(),
                default_mtls: policy::istio::peer_authn::MtlsMode::Strict,
                h2_upgrade: true,
                access_log: None,
            },
            d.registry(),
        )
    }

    fn caller(node_id: &str, grpc: bool, peer: Option<&str>, extra: &str) -> Caller {
        let mut fields = std::collections::BTreeMap::new();
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.into())),
        };
        if grpc {
            fields.insert("GENERATOR".to_owned(), s("grpc"));
        }
        fields.insert("NOISE".to_owned(), s(extra));
        Caller {
            node: Node {
                id: node_id.into(),
                metadata: Some(Struct {
                    fields: fields.into_iter().collect(),
                }),
                ..Default::default()
            },
            peer_id: peer.map(Into::into),
        }
    }

    #[test]
    fn proxyless_callers_on_mtls_are_checked_like_sidecars() {
        let cp = control_plane();
        let web = Some("spiffe://cluster.local/ns/bank/sa/web");
        let web_node = "sidecar~127.0.0.2~web.bank~bank.svc.cluster.local";
        // Control: web, as itself, gets configuration either way.
        assert!(cp.snapshot(&caller(web_node, true, web, "")).is_ok());
        assert!(cp.snapshot(&caller(web_node, false, web, "")).is_ok());
        // Claiming ledger's node (or none that exists) with web's SVID gets nothing, proxyless or not.
        let ledger_node = "sidecar~127.0.0.1~ledger.bank~bank.svc.cluster.local";
        for grpc in [true, false] {
            let e = cp
                .snapshot(&caller(ledger_node, grpc, web, ""))
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
            let e = cp.snapshot(&caller("made-up", grpc, web, "")).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        }
    }

    #[test]
    fn the_snapshot_cache_is_bounded_by_the_registry() {
        let cp = control_plane();
        let web = Some("spiffe://cluster.local/ns/bank/sa/web");
        for i in 0..500 {
            let node = format!(
                "sidecar~10.0.0.{}~web.bank~bank.svc.cluster.local-{i}",
                i % 250
            );
            let _ = cp.snapshot(&caller(&node, i % 2 == 0, web, &format!("x{i}")));
            let _ = cp.snapshot(&caller(&format!("junk-{i}"), false, None, &format!("y{i}")));
            let _ = cp.snapshot(&caller(&format!("junk-{i}"), true, None, &format!("z{i}")));
        }
        // web as a sidecar, web as a proxyless client, and the plaintext proxyless client.
        assert_eq!(cp.cached_snapshots(), 3);
    }

    /// The inbound chains of `bank/ledger` as (destination port, transport, server names).
    fn inbound_chains(cp: &ControlPlane) -> Vec<(Option<u32>, String, usize)> {
        use xds::pb::envoy::config::listener::v3::Listener;
        let node = "sidecar~127.0.0.1~ledger.bank~bank.svc.cluster.local";
        let snap = cp.snapshot(&caller(node, false, None, "")).unwrap();
        let any = &snap.resources[xds::types::LISTENER]["virtualInbound"];
        let l: Listener = xds::codec::unpack(any).unwrap();
        l.filter_chains
            .iter()
            .map(|c| {
                let m = c.filter_chain_match.clone().unwrap_or_default();
                (
                    m.destination_port.map(|p| p.value),
                    m.transport_protocol,
                    m.server_names.len(),
                )
            })
            .collect()
    }

    #[test]
    fn port_level_mtls_gets_per_port_chains_or_no_plaintext() {
        let two_ports = REGISTRY
            .replace(
                "ports: [{number: 80, name: http, protocol: HTTP}]",
                "ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: admin, protocol: HTTP}]",
            )
            .replace("ports: {http: 8080}", "ports: {http: 8080, admin: 8081}");
        let pa = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: bank}\nspec: {selector: {matchLabels: {app: ledger}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {8081: {mode: STRICT}}}\n";
        // Captured: a chain per port, picked by the original destination port; the STRICT port
        // has no plaintext chain.
        let captured = format!("{two_ports}{pa}").replace(
            "metadata: {name: ledger, namespace: bank}\nspec: {address",
            "metadata: {name: ledger, namespace: bank, annotations: {sidecar.eastguard.io/capture: ebpf}}\nspec: {address",
        );
        let mut chains = inbound_chains(&control_plane_with(&captured));
        chains.sort();
        assert_eq!(
            chains,
            vec![
                (None, "tls".into(), 1),
                (None, "tls".into(), 1),
                (Some(8080), "raw_buffer".into(), 0),
                (Some(8080), "tls".into(), 1),
                (Some(8081), "tls".into(), 1),
            ]
        );
        // Not captured: which port a plaintext caller meant is unknown, so no plaintext at all.
        let chains = inbound_chains(&control_plane_with(&format!("{two_ports}{pa}")));
        assert!(chains.iter().all(|(_, t, _)| t == "tls"), "{chains:?}");
        // One port, PERMISSIVE, not captured: the plaintext chain is there (control).
        let one = format!(
            "{REGISTRY}{}",
            pa.replace(", portLevelMtls: {8081: {mode: STRICT}}", "")
        );
        let chains = inbound_chains(&control_plane_with(&one));
        assert!(
            chains.iter().any(|(_, t, _)| t == "raw_buffer"),
            "{chains:?}"
        );
    }
}
