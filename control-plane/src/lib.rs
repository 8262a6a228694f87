//! `eastguard control-plane`: reads Istio resources from a directory (and watches it), and serves
//! each proxy — or proxyless gRPC client — its own configuration over ADS.
//!
//! Port 15010 is plaintext, for loopback development: a caller is who its node says it is. Every
//! change to the directory is pushed within one poll interval; a bad file is rejected (logged,
//! naming file, document and field) and its last good content keeps being served.

pub mod generate;
pub mod registry;

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
}

/// The control plane's own SVID (PEM files, re-read when they change) and where to serve mTLS.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub address: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// The registry in force and per-node snapshots generated from it.
pub struct ControlPlane {
    mesh: Mesh,
    registry: RwLock<Arc<Registry>>,
    generation: watch::Sender<u64>,
    cache: Mutex<HashMap<(String, u64), Arc<Snapshot>>>,
}

impl ControlPlane {
    pub fn new(mesh: Mesh, registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            mesh,
            registry: RwLock::new(Arc::new(registry)),
            generation: watch::channel(0).0,
            cache: Mutex::default(),
        })
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

    fn generate(&self, caller: &Caller) -> Result<Snapshot, Status> {
        let reg = self.registry();
        let metadata = caller.node.metadata.as_ref();
        let generator = metadata
            .and_then(|m| m.fields.get("GENERATOR"))
            .and_then(|v| match &v.kind {
                Some(xds::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            });
        if generator == Some("grpc") {
            return Ok(generate::proxyless(&reg));
        }
        let Some(w) = generate::workload_for_node(&caller.node.id, &reg) else {
            return Err(Status::permission_denied(format!(
                "node {:?} is not a known workload (expected sidecar~IP~NAME.NAMESPACE~… matching a WorkloadEntry)",
                caller.node.id
            )));
        };
        if let Some(peer) = &caller.peer_id {
            let expected = self.mesh.spiffe_id(&w.meta.namespace, w.service_account());
            if *peer != expected {
                return Err(Status::permission_denied(format!(
                    "node {} is workload {}/{}, which is {expected}; the caller is {peer}",
                    caller.node.id, w.meta.namespace, w.meta.name
                )));
            }
        }
        let (snap, notes) = generate::sidecar(w, &reg, &self.mesh);
        for n in notes {
            tracing::debug!(node = %caller.node.id, note = %n, "generation note");
        }
        Ok(snap)
    }
}

impl SnapshotSource for ControlPlane {
    fn snapshot(&self, caller: &Caller) -> Result<Arc<Snapshot>, Status> {
        let generation = *self.generation.borrow();
        let key = (
            format!(
                "{}|{:?}|{:?}",
                caller.node.id, caller.peer_id, caller.node.metadata
            ),
            generation,
        );
        if let Some(s) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(s);
        }
        let snap = Arc::new(self.generate(caller).inspect_err(|status| {
            tracing::warn!(node = %caller.node.id, peer = ?caller.peer_id, reason = %status.message(), "xDS stream refused");
        })?);
        if let Ok(mut c) = self.cache.lock() {
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

/// Runs until `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
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
    let listener = tokio::net::TcpListener::bind(opts.xds_address)
        .await
        .map_err(|e| format!("xDS address {}: {e}", opts.xds_address))?;
    let (closing_tx, closing) = watch::channel(false);
    let server = AdsServer::new(cp.clone()).with_shutdown(closing.clone());
    let mut closing_wait = closing;
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(
            AggregatedDiscoveryServiceServer::new(server)
                .max_decoding_message_size(16 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = closing_wait.wait_for(|c| *c).await;
            },
        );
    tracing::info!(address = %opts.xds_address, "serving ADS (plaintext)");
    let cp2 = cp.clone();
    let poll = opts.poll_interval;
    let watcher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(poll).await;
            match dir.refresh() {
                Ok(true) => {
                    cp2.set(dir.registry());
                    tracing::info!("registry changed; pushing");
                }
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "cannot read the config directory"),
            }
        }
    });
    let server_task = tokio::spawn(serve);
    let tls_task = match &opts.tls {
        Some(t) => Some(tokio::spawn(
            serve_tls(t.clone(), cp.clone(), closing_tx.subscribe()).await?,
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
    Ok(())
}

/// The mTLS ADS server: binds, then returns the serving future.
async fn serve_tls(
    t: TlsOptions,
    cp: Arc<ControlPlane>,
    closing: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    let creds = identity::FileSource {
        cert: t.cert.clone(),
        key: t.key.clone(),
        bundle: t.bundle.clone(),
        federated: Vec::new(),
        poll_interval: Duration::from_secs(1),
    }
    .watch()
    .map_err(|e| format!("control plane SVID: {e}"))?;
    let config = identity::tls::server_config(creds, &[b"h2"]).map_err(|e| format!("TLS: {e}"))?;
    let listener = tokio::net::TcpListener::bind(t.address)
        .await
        .map_err(|e| format!("xDS mTLS address {}: {e}", t.address))?;
    tracing::info!(address = %t.address, "serving ADS over mTLS; callers get only their own workload's configuration");
    let incoming = xds::tls::incoming(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        |certs| identity::tls::peer_spiffe_id(certs).map(|id| id.as_str().to_owned()),
    );
    let server = AdsServer::new(cp).with_shutdown(closing.clone());
    let mut closing_wait = closing;
    Ok(async move {
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = closing_wait.wait_for(|c| *c).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "mTLS ADS server failed");
        }
    })
}
