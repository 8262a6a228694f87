//! eastguard's node agent: serves the SPIFFE Workload API on a unix socket. Each caller is
//! attested from the socket's peer credentials (never from anything it says about itself) and
//! gets the SVIDs of the registration entries whose selectors it has.

mod admin;
mod authority_fix;
pub mod ca_client;
mod caller;
pub mod entries;
pub mod jwt;
pub mod k8s;
pub mod k8s_capture;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use entries::{Entries, EntriesError, Selector};
use identity::workload_api as api;
use identity::{DevCa, X509Authority};

/// The metadata header every Workload API call must carry (SPIFFE Workload API standard).
const SECURITY_HEADER: &str = "workload.spiffe.io";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("entries: {0}")]
    Entries(#[from] EntriesError),
    #[error("CA: {0}")]
    Ca(#[from] identity::DevCaError),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--admin-address {0} must be a loopback address")]
    AdminNotLoopback(std::net::SocketAddr),
    #[error("no randomness from the operating system for {0}")]
    NoRandomness(&'static str),
    #[error("the JWT-SVID signing key: {0}")]
    JwtKey(#[from] jwt::JwtError),
    #[error("serving the Workload API: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the entries use k8s: selectors, which need the kubelet (--kubelet-url)")]
    NeedsKubelet,
    #[error("kubelet: {0}")]
    Kubelet(#[from] k8s::FetchError),
    #[error(transparent)]
    CaClient(#[from] ca_client::CaClientError),
    #[error(
        "--ca-url (an intermediate from the control plane) excludes --ca-dir and --admin-address (a CA of the agent's own)"
    )]
    CaConflict,
}

pub struct AgentConfig {
    pub socket: PathBuf,
    pub entries: PathBuf,
    /// How often the entries file is checked for changes.
    pub poll: Duration,
    /// Loopback address of the CA admin API (prepare / activate / taint), if any.
    pub admin: Option<std::net::SocketAddr>,
    /// Where the CA is persisted (created on first start); without it the CA lives in memory.
    pub ca_dir: Option<PathBuf>,
    /// Kubernetes attestation (`k8s:` selectors, entries for injected pods) from this node's
    /// kubelet; off without one.
    pub kubelet: Option<k8s::KubeletOptions>,
    /// Sign with a per-node intermediate from the control plane's CA instead of a CA of its own.
    pub ca: Option<ca_client::CaClientOptions>,
    /// Where the kubelet's pod lists are published (capture reads them too); a channel of
    /// the agent's own without one.
    pub pods: Option<watch::Sender<Arc<k8s::Pods>>>,
}

/// The agent's X.509 authorities: the one that signs, and every one published in the bundle
/// (SPIRE's local authority model: prepare a new CA, activate it, taint the old ones).
pub struct Authorities {
    signing: Arc<dyn X509Authority>,
    published: Vec<Arc<dyn X509Authority>>,
}

impl Authorities {
    fn bundle_der(&self) -> Vec<u8> {
        self.published
            .iter()
            .flat_map(|ca| ca.cert_der().to_vec())
            .collect()
    }
}

/// How long a stopping agent waits for Workload API clients to close their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

struct WorkloadApi {
    /// Flips to true when the agent shuts down: every open stream ends, so the server can.
    stopping: watch::Receiver<bool>,
    entries: watch::Receiver<Arc<Entries>>,
    ca: watch::Receiver<Arc<Authorities>>,
    jwt: Arc<jwt::JwtAuthority>,
    k8s: Option<K8sAttestor>,
}

/// What Kubernetes attestation reads: the host's cgroup tree and the kubelet's latest pod list.
struct K8sAttestor {
    cgroup_root: PathBuf,
    pods: watch::Receiver<Arc<k8s::Pods>>,
    /// Asks the poller for a fresh list now (a container younger than the last list).
    refresh: Arc<tokio::sync::Notify>,
}

/// Runs the agent until `shutdown` resolves. The CA is generated at start (not yet persisted).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut stopped = stopping_rx.clone();
    let shutdown = async move {
        shutdown.await;
        stopping_tx.send_replace(true);
    };
    let entries = Entries::load(&config.entries)?;
    let kubelet = match config.kubelet.clone() {
        Some(o) => Some(k8s::Kubelet::new(o)?),
        None => None,
    };
    if entries.uses_k8s() && kubelet.is_none() {
        return Err(AgentError::NeedsKubelet);
    }
    let ca_client = match config.ca.clone() {
        Some(o) => Some(ca_client::CaClient::new(o, entries.trust_domain.clone())?),
        None => None,
    };
    let (ca_tx, ca) = watch::channel(Arc::new(match &ca_client {
        Some(c) => c.pending(),
        None => {
            let first: Arc<dyn X509Authority> = Arc::new(match &config.ca_dir {
                Some(dir) => DevCa::load_or_create(entries.trust_domain.clone(), dir)?,
                None => DevCa::new(entries.trust_domain.clone())?,
            });
            Authorities {
                signing: first.clone(),
                published: vec![first],
            }
        }
    }));
    if ca_client.is_some() && (config.admin.is_some() || config.ca_dir.is_some()) {
        return Err(AgentError::CaConflict);
    }
    let mut ca_tx = Some(ca_tx);
    if let Some(addr) = config.admin
        && let Some(admin_tx) = ca_tx.take()
    {
        if !addr.ip().is_loopback() {
            return Err(AgentError::AdminNotLoopback(addr));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Socket {
                path: addr.to_string().into(),
                source,
            })?;
        let token = admin::new_token().ok_or(AgentError::NoRandomness("the admin token"))?;
        let token_file = admin_token_file(&config.socket);
        write_private(&token_file, token.as_bytes()).map_err(|source| AgentError::Socket {
            path: token_file.clone(),
            source,
        })?;
        tracing::info!(%addr, token_file = %token_file.display(), "CA admin API listening");
        tokio::spawn(admin::serve(
            listener,
            admin_tx,
            entries.trust_domain.clone(),
            token,
        ));
    }
    let jwt = Arc::new(jwt::JwtAuthority::generate()?);
    let (file_tx, file_rx) = watch::channel(Arc::new(entries.clone()));
    tokio::spawn(watch_entries(config.entries.clone(), config.poll, file_tx));
    let (tx, rx) = watch::channel(Arc::new(entries));
    let tx = Arc::new(tx);
    let k8s = kubelet.map(|kubelet| {
        let (pods_tx, pods_rx) = match config.pods.clone() {
            Some(tx) => {
                let rx = tx.subscribe();
                (tx, rx)
            }
            None => watch::channel(Arc::new(k8s::Pods::default())),
        };
        let refresh = Arc::new(tokio::sync::Notify::new());
        let cgroup_root = kubelet.cgroup_root().to_owned();
        tokio::spawn(poll_pods(
            kubelet,
            pods_tx,
            refresh.clone(),
            file_rx.clone(),
            tx.clone(),
        ));
        K8sAttestor {
            cgroup_root,
            pods: pods_rx,
            refresh,
        }
    });
    // Without the admin API or the CA client, `ca_tx` stays here: streams wait on its changes.
    if let Some(client) = ca_client
        && let Some(ca_tx) = ca_tx.take()
    {
        tokio::spawn(ca_client::run(client, rx.clone(), ca_tx));
    }
    tokio::spawn(follow_file(
        file_rx,
        k8s.as_ref().map(|k| k.pods.clone()),
        tx,
    ));

    let _ = std::fs::remove_file(&config.socket);
    let socket_err = |source| AgentError::Socket {
        path: config.socket.clone(),
        source,
    };
    let listener = tokio::net::UnixListener::bind(&config.socket).map_err(socket_err)?;
    // Any local process may ask; what it gets is decided by attestation, not by file permissions.
    set_mode(&config.socket, 0o777).map_err(socket_err)?;
    tracing::info!(socket = %config.socket.display(), "Workload API listening");
    let serve = tonic::transport::Server::builder()
        .add_service(
            api::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(WorkloadApi {
                stopping: stopping_rx,
                entries: rx,
                ca,
                jwt,
                k8s,
            }),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(UnixListenerStream::new(listener), |c| {
                c.map(authority_fix::AuthorityFix::new)
            }),
            shutdown,
        );
    // Streams end when the agent stops; a client that keeps its connection open anyway gets
    // SHUTDOWN_GRACE, then the agent exits without it.
    let grace = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "Workload API clients still connected; stopping without them");
    };
    tokio::select! {
        r = serve => r?,
        () = grace => {}
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// Where the CA admin API's token is written: beside the Workload API socket.
pub fn admin_token_file(socket: &std::path::Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".admin-token");
    PathBuf::from(name)
}

/// Writes a file only its owner can read (created with that mode, never readable in between).
fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

fn set_mode(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}

/// Polls the kubelet's pod list (and at once when attestation asks); a failed poll keeps the
/// last list. The entries in force are updated before the new list is published, so a caller
/// attested against the new list finds its pod's entry.
async fn poll_pods(
    kubelet: k8s::Kubelet,
    tx: watch::Sender<Arc<k8s::Pods>>,
    refresh: Arc<tokio::sync::Notify>,
    file: watch::Receiver<Arc<Entries>>,
    entries: Arc<watch::Sender<Arc<Entries>>>,
) {
    let mut failing = false;
    loop {
        match kubelet.fetch().await {
            Ok(pods) => {
                if failing {
                    tracing::info!(pods = pods.len(), "kubelet pod list read again");
                }
                failing = false;
                if **tx.borrow() != pods {
                    publish_entries(&entries, &file.borrow(), Some(&pods));
                    tx.send_replace(Arc::new(pods));
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the kubelet's pod list; keeping the last one");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(kubelet.poll()) => {}
            _ = refresh.notified() => {}
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// The entries in force: the file's, plus one per injected pod on this node (its sidecar
/// container only). Published only when they change, so streams renew only then.
fn publish_entries(tx: &watch::Sender<Arc<Entries>>, file: &Entries, pods: Option<&k8s::Pods>) {
    let mut combined = file.clone();
    if let Some(p) = pods {
        combined
            .entries
            .extend(p.injected_entries(&combined.trust_domain, entries::DEFAULT_TTL));
    }
    tx.send_if_modified(|old| {
        let changed = old.entries != combined.entries || old.trust_domain != combined.trust_domain;
        if changed {
            *old = Arc::new(combined);
        }
        changed
    });
}

/// Follows the entries file (the pod side is `poll_pods`).
async fn follow_file(
    mut file: watch::Receiver<Arc<Entries>>,
    pods: Option<watch::Receiver<Arc<k8s::Pods>>>,
    tx: Arc<watch::Sender<Arc<Entries>>>,
) {
    while file.changed().await.is_ok() {
        let f = file.borrow_and_update().clone();
        let p = pods.as_ref().map(|p| p.borrow().clone());
        publish_entries(&tx, &f, p.as_deref());
    }
}

/// Re-reads the entries file when it changes; a bad file is logged and the old entries stay.
async fn watch_entries(path: PathBuf, poll: Duration, tx: watch::Sender<Arc<Entries>>) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(poll).await;
        if tx.is_closed() {
            return;
        }
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        match Entries::load(&path) {
            Ok(e) => {
                tracing::info!(entries = e.entries.len(), "registration entries reloaded");
                tx.send_replace(Arc::new(e));
            }
            Err(e) => {
                tracing::warn!(error = %e, "registration entries file is not valid; keeping the previous entries")
            }
        }
        last = now;
    }
}

impl K8sAttestor {
    /// The `k8s:` selectors of the process, if it runs in a pod container of this node.
    async fn attest(&self, pid: i32) -> BTreeSet<Selector> {
        let root = self.cgroup_root.clone();
        let Ok(Some(pc)) =
            tokio::task::spawn_blocking(move || k8s::verified_pod_container(pid, &root)).await
        else {
            return BTreeSet::new();
        };
        let mut pods = self.pods.clone();
        let mut found = pods.borrow_and_update().selectors(&pc);
        // A container that just started may be younger than the last list: ask again, for up
        // to 2 s (SPIRE's attestor retries too).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while found.is_none() {
            self.refresh.notify_one();
            match tokio::time::timeout_at(deadline, pods.changed()).await {
                Ok(Ok(())) => found = pods.borrow_and_update().selectors(&pc),
                _ => break,
            }
        }
        if found.is_none() {
            tracing::warn!(pid, pod_uid = %pc.pod_uid, container_id = %pc.container_id,
                "the caller's pod container is not in this node's kubelet pod list");
        }
        found.unwrap_or_default()
    }
}

impl WorkloadApi {
    /// The security header, then attestation from the socket's peer credentials.
    async fn caller<T>(&self, req: &Request<T>) -> Result<BTreeSet<Selector>, Status> {
        if req
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok())
            != Some("true")
        {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let caller = req
            .extensions()
            .get::<Option<caller::PinnedCaller>>()
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Status::permission_denied("caller cannot be attested (no peer credentials)")
            })?;
        let refused = |why: caller::CallerChanged| {
            tracing::warn!(%why, "Workload API caller refused");
            Status::permission_denied(format!("caller cannot be attested: {why}"))
        };
        let mut selectors = caller.attest().map_err(refused)?;
        if let (Some(k), Some(pid)) = (&self.k8s, caller.pid()) {
            selectors.extend(k.attest(pid).await);
            // Still the process that connected (not a PID reused while the pod was looked up).
            caller.attest().map_err(refused)?;
        }
        Ok(selectors)
    }

    fn x509_response(
        &self,
        entries: &Entries,
        selectors: &BTreeSet<Selector>,
    ) -> Result<(api::X509svidResponse, Duration), Status> {
        let matching = entries.matching(selectors);
        if matching.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        let authorities = self.ca.borrow().clone();
        let bundle = authorities.bundle_der();
        let mut svids = Vec::with_capacity(matching.len());
        for e in &matching {
            let minted = match authorities.signing.mint(&e.spiffe_id, e.ttl) {
                Ok(m) => m,
                // The node's intermediate does not cover it (yet): the others are still given.
                Err(identity::DevCaError::NotPermitted(_) | identity::DevCaError::Expired) => {
                    continue;
                }
                Err(e) => return Err(Status::internal(e.to_string())),
            };
            let key = PrivateKeyDer::from_pem_slice(minted.key_pem.as_bytes())
                .map_err(|e| Status::internal(e.to_string()))?;
            svids.push(api::X509svid {
                spiffe_id: e.spiffe_id.to_string(),
                x509_svid: minted
                    .svid
                    .chain()
                    .iter()
                    .flat_map(|c| c.to_vec())
                    .collect(),
                x509_svid_key: key.secret_der().to_vec(),
                bundle: bundle.clone(),
                hint: String::new(),
            });
        }
        if svids.is_empty() {
            return Err(Status::unavailable(
                "no CA can sign this identity yet (the node's intermediate does not cover it); retry",
            ));
        }
        let renew = matching
            .iter()
            .map(|e| e.ttl)
            .min()
            .unwrap_or(Duration::from_secs(60))
            / 2;
        Ok((
            api::X509svidResponse {
                svids,
                crl: vec![],
                federated_bundles: Default::default(),
            },
            renew,
        ))
    }
}

#[tonic::async_trait]
impl api::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<api::X509svidResponse>;
    type FetchX509BundlesStream = Stream<api::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<api::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<api::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.caller(&req).await?;
        let mut entries_rx = self.entries.clone();
        let mut ca_rx = self.ca.clone();
        ca_rx.mark_unchanged();
        let (first, mut renew) = self.x509_response(&entries_rx.borrow_and_update(), &selectors)?;
        let (tx, rx) = mpsc::channel(4);
        let this = WorkloadApi {
            stopping: self.stopping.clone(),
            entries: entries_rx.clone(),
            ca: self.ca.clone(),
            jwt: self.jwt.clone(),
            // The stream's selectors were attested above; renewals do not attest again.
            k8s: None,
        };
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut next = Ok(first);
            loop {
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    return;
                }
                // Renew at half-life, or at once when the entries or the authorities change.
                tokio::select! {
                    () = tokio::time::sleep(renew) => {}
                    changed = entries_rx.changed() => if changed.is_err() { return },
                    changed = ca_rx.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                }
                ca_rx.mark_unchanged();
                next = this
                    .x509_response(&entries_rx.borrow_and_update(), &selectors)
                    .map(|(r, d)| {
                        renew = d;
                        r
                    });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<api::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.caller(&req).await?;
        let entries = self.entries.borrow().clone();
        if entries.matching(&selectors).is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        let td = entries.trust_domain.to_string();
        let mut ca_rx = self.ca.clone();
        let (tx, rx) = mpsc::channel(1);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                let bundles = [(td.clone(), ca_rx.borrow_and_update().bundle_der())].into();
                if tx
                    .send(Ok(api::X509BundlesResponse {
                        crl: vec![],
                        bundles,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                // A new bundle whenever the published authorities change.
                tokio::select! {
                    changed = ca_rx.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<api::JwtsvidRequest>,
    ) -> Result<Response<api::JwtsvidResponse>, Status> {
        let selectors = self.caller(&req).await?;
        let req = req.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be set"));
        }
        let entries = self.entries.borrow().clone();
        let matching = entries.matching(&selectors);
        let chosen: Vec<_> = matching
            .iter()
            .filter(|e| req.spiffe_id.is_empty() || e.spiffe_id.as_str() == req.spiffe_id)
            .collect();
        if chosen.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        let mut svids = Vec::with_capacity(chosen.len());
        for e in chosen {
            let token = self
                .jwt
                .sign(&e.spiffe_id, &req.audience)
                .map_err(|e| Status::internal(e.to_string()))?;
            svids.push(api::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: String::new(),
            });
        }
        Ok(Response::new(api::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<api::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let selectors = self.caller(&req).await?;
        let entries = self.entries.borrow().clone();
        if entries.matching(&selectors).is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        let bundles = [(entries.trust_domain.to_string(), self.jwt.jwks())].into();
        let (tx, rx) = mpsc::channel(1);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            if tx
                .send(Ok(api::JwtBundlesResponse { bundles }))
                .await
                .is_ok()
            {
                tokio::select! {
                    () = tx.closed() => {}
                    _ = stopping.wait_for(|s| *s) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<api::ValidateJwtsvidRequest>,
    ) -> Result<Response<api::ValidateJwtsvidResponse>, Status> {
        self.caller(&req).await?;
        let req = req.into_inner();
        if req.audience.is_empty() || req.svid.is_empty() {
            return Err(Status::invalid_argument("audience and svid must be set"));
        }
        let td = self.entries.borrow().trust_domain.clone();
        let (id, claims) = self
            .jwt
            .validate(&req.svid, &req.audience, &td)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(api::ValidateJwtsvidResponse {
            spiffe_id: id.to_string(),
            claims: Some(jwt::to_struct(&claims)),
        }))
    }
}
