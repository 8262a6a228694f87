//! The control plane's CA for node agents (`--ca-address`, HTTPS; needs `--kubernetes`).
//!
//! `POST /v1/node-ca` with `Authorization: Bearer <token>` and `{"csr": PEM, "identities": [IDs]}`
//! gives the calling node agent its per-node intermediate (`identity::node_ca`): `{"node",
//! "certificate", "root"}`. The rule it enforces: **an intermediate may sign only SPIFFE IDs
//! `spiffe://TD/ns/NS/sa/SA` for which a pod with namespace NS and service account SA is
//! scheduled on the caller's node** (Succeeded and Failed pods do not count).
//!
//! Who the caller is comes from Kubernetes, never from the request:
//! - the token is a projected service-account token for `--ca-audience`, checked with a
//!   TokenReview: it must be authenticated for that audience, be the node agent's service
//!   account, and be bound to a pod (`authentication.kubernetes.io/pod-name`, `pod-uid`);
//! - that pod (same UID) must be in the pods the control plane lists, and its `spec.nodeName`
//!   is the node (a `node-name` in the review, where the API gives one, must agree).
//!
//! A request naming any ID the node may not have is refused whole (403), the refused IDs
//! listed, so the agent can ask again without them. Nothing is answered before the pods are
//! listed (503). The serving certificate is minted by the root for `--ca-dns-name` and renewed
//! at half-life; node agents trust the root (`node-agent --ca-trust`).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use identity::node_ca::{self, MAX_PERMITTED_IDS};
use identity::{DevCa, SpiffeId, TrustDomain};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::kube::client::Client;
use crate::kube::watch::Snapshot;

/// Where and how the CA serves.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub address: std::net::SocketAddr,
    /// Where the root is kept (`ca.key.pem`, `ca.json`; created on first start); without it
    /// the root lives in memory and every intermediate dies with the process.
    pub dir: Option<PathBuf>,
    /// The DNS names of the serving certificate.
    pub dns_names: Vec<String>,
    /// How long an intermediate is valid: how long a node keeps an identity after its last
    /// pod with it has gone.
    pub node_ca_ttl: Duration,
    /// The audience node agents' projected tokens are for.
    pub audience: String,
    /// The node agent's service account (namespace, name).
    pub agent: (String, String),
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CA needs --kubernetes (tokens are reviewed and pods looked up there)")]
    NeedsKubernetes,
    #[error("CA root: {0}")]
    Root(#[from] identity::DevCaError),
    #[error("CA serving certificate: {0}")]
    Tls(#[from] rustls::Error),
    #[error("CA address {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Largest request body: a CSR and up to [`MAX_PERMITTED_IDS`] IDs.
const MAX_BODY: usize = 1024 * 1024;
/// Requests handled at once (each costs a TokenReview); past it, 429.
const MAX_IN_FLIGHT: usize = 16;
/// Lifetime of the serving certificate.
const SERVING_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

struct Ca {
    root: Arc<DevCa>,
    root_pem: String,
    opts: CaOptions,
    kube: Client,
    pods: watch::Receiver<Snapshot>,
    in_flight: tokio::sync::Semaphore,
}

/// A refusal: the status and why.
type Refusal = (StatusCode, Value);

fn refusal(status: StatusCode, error: impl Into<String>) -> Refusal {
    (status, json!({ "error": error.into() }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeCaRequest {
    csr: String,
    identities: Vec<String>,
}

impl Ca {
    /// The node the token's pod runs on, after a TokenReview says who the token is.
    async fn authenticate(&self, token: &str) -> Result<String, Refusal> {
        let review = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": token, "audiences": [self.opts.audience] },
        });
        let answer = self
            .kube
            .post_for(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                &review,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| {
                refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the token could not be reviewed: {e}"),
                )
            })?;
        let status = &answer["status"];
        if status["authenticated"] != Value::Bool(true) {
            let why = status["error"].as_str().unwrap_or("not authenticated");
            return Err(refusal(
                StatusCode::UNAUTHORIZED,
                format!("the token is not valid: {why}"),
            ));
        }
        let for_us = status["audiences"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(&self.opts.audience)));
        if !for_us {
            return Err(refusal(
                StatusCode::UNAUTHORIZED,
                format!("the token is not for the audience {}", self.opts.audience),
            ));
        }
        let user = &status["user"];
        let (ns, sa) = &self.opts.agent;
        let expected = format!("system:serviceaccount:{ns}:{sa}");
        let username = user["username"].as_str().unwrap_or("");
        if username != expected {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                format!("{username:?} is not the node agent's service account {expected}"),
            ));
        }
        // One value each, or none: a review with several is not one pod.
        let one = |key: &str| match user["extra"][key].as_array().map(Vec::as_slice) {
            Some([v]) => v.as_str().map(str::to_owned),
            _ => None,
        };
        let (Some(pod_name), Some(pod_uid)) = (
            one("authentication.kubernetes.io/pod-name"),
            one("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "the token is not bound to a pod (a projected service-account token is needed)",
            ));
        };
        let pods = self.pods.borrow();
        if !pods.synced {
            return Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "pods are not listed yet",
            ));
        }
        let pod = pods
            .objects
            .get(&(ns.clone(), pod_name.clone()))
            .filter(|p| p["metadata"]["uid"].as_str() == Some(&pod_uid))
            .ok_or_else(|| {
                refusal(
                    StatusCode::FORBIDDEN,
                    format!("the token's pod {ns}/{pod_name} ({pod_uid}) is not known"),
                )
            })?;
        let node = pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                refusal(
                    StatusCode::FORBIDDEN,
                    format!("the token's pod {ns}/{pod_name} is not scheduled"),
                )
            })?;
        if let Some(claimed) = one("authentication.kubernetes.io/node-name")
            && claimed != node
        {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                format!("the token names node {claimed:?}, its pod runs on {node:?}"),
            ));
        }
        Ok(node.to_owned())
    }

    /// Whether a pod of `namespace` running as `service_account` is scheduled on `node`.
    fn runs_on(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let pods = self.pods.borrow();
        pods.objects
            .range((namespace.to_owned(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .any(|(_, pod)| {
                pod["spec"]["nodeName"].as_str() == Some(node)
                    && pod["spec"]["serviceAccountName"]
                        .as_str()
                        .unwrap_or("default")
                        == service_account
                    && !matches!(
                        pod["status"]["phase"].as_str(),
                        Some("Succeeded" | "Failed")
                    )
            })
    }

    async fn node_ca(&self, token: &str, body: &[u8]) -> Result<Value, Refusal> {
        let req: NodeCaRequest = serde_json::from_slice(body).map_err(|e| {
            refusal(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"csr\": PEM, \"identities\": [SPIFFE IDs]}}: {e}"),
            )
        })?;
        if req.identities.is_empty() || req.identities.len() > MAX_PERMITTED_IDS {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "{} identities asked; between 1 and {MAX_PERMITTED_IDS}",
                    req.identities.len()
                ),
            ));
        }
        let td = self.root.trust_domain();
        let mut ids = BTreeSet::new();
        for s in &req.identities {
            let id = SpiffeId::parse(s)
                .map_err(|e| refusal(StatusCode::BAD_REQUEST, format!("{s:?}: {e}")))?;
            if workload_of(&id, td).is_none() {
                return Err(refusal(
                    StatusCode::BAD_REQUEST,
                    format!("{id} is not spiffe://{td}/ns/NAMESPACE/sa/SERVICE_ACCOUNT"),
                ));
            }
            ids.insert(id);
        }
        let csr = node_ca::parse_csr(&req.csr)
            .map_err(|e| refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
        let node = self.authenticate(token).await?;
        let refused: Vec<&SpiffeId> = ids
            .iter()
            .filter(|id| workload_of(id, td).is_none_or(|(ns, sa)| !self.runs_on(&node, ns, sa)))
            .collect();
        if !refused.is_empty() {
            tracing::warn!(%node, refused = ?refused.iter().map(|i| i.as_str()).collect::<Vec<_>>(), "node CA refused: identities of no pod on the node");
            return Err((
                StatusCode::FORBIDDEN,
                json!({
                    "error": format!("no pod on node {node} runs as {}", refused[0]),
                    "refused": refused.iter().map(|i| i.as_str()).collect::<Vec<_>>(),
                }),
            ));
        }
        let cert = self
            .root
            .issue_node_ca(&csr, &node, &ids, self.opts.node_ca_ttl)
            .map_err(|e| refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
        tracing::info!(%node, identities = ids.len(), "node CA issued");
        Ok(json!({
            "node": node,
            "certificate": node_ca::pem_block("CERTIFICATE", &cert),
            "root": self.root_pem,
        }))
    }
}

/// The namespace and service account of an Istio-shaped workload ID of `td`.
fn workload_of<'a>(id: &'a SpiffeId, td: &TrustDomain) -> Option<(&'a str, &'a str)> {
    if id.trust_domain_str() != td.as_str() {
        return None;
    }
    let rest = id.path().strip_prefix("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    (!ns.is_empty() && !sa.is_empty() && !ns.contains('/') && !sa.contains('/')).then_some((ns, sa))
}

/// A TLS server certificate minted by the root for some DNS names, renewed at half-life (the
/// CA's own, and the webhook's when no certificate is given).
pub struct MintedCert {
    root: Arc<DevCa>,
    dns_names: Vec<String>,
    current: ArcSwap<(Arc<CertifiedKey>, Instant)>,
}

impl std::fmt::Debug for MintedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedCert")
            .field("dns_names", &self.dns_names)
            .finish()
    }
}

fn mint_serving(
    root: &DevCa,
    dns_names: &[String],
) -> Result<(Arc<CertifiedKey>, Instant), CaError> {
    let (chain, key) = root.mint_server(dns_names, SERVING_TTL)?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider)?;
    Ok((Arc::new(ck), Instant::now() + SERVING_TTL / 2))
}

impl MintedCert {
    pub fn new(root: Arc<DevCa>, dns_names: Vec<String>) -> Result<Self, CaError> {
        let first = mint_serving(&root, &dns_names)?;
        Ok(Self {
            root,
            dns_names,
            current: ArcSwap::from_pointee(first),
        })
    }
}

impl ResolvesServerCert for MintedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.load();
        if Instant::now() < current.1 {
            return Some(current.0.clone());
        }
        match mint_serving(&self.root, &self.dns_names) {
            Ok(next) => {
                let ck = next.0.clone();
                self.current.store(Arc::new(next));
                Some(ck)
            }
            Err(e) => {
                tracing::error!(error = %e, "serving certificate not renewed");
                Some(current.0.clone())
            }
        }
    }
}

/// The trust domain's root from `dir` (created there if empty; `root.pem` written beside for
/// node agents), or one in memory.
pub fn load_root(
    dir: Option<&std::path::Path>,
    trust_domain: TrustDomain,
) -> Result<Arc<DevCa>, CaError> {
    let root = match dir {
        Some(dir) => DevCa::load_or_create(trust_domain, dir)?,
        None => {
            tracing::warn!(
                "no --ca-dir: the CA root lives in memory; node CAs die with this process"
            );
            DevCa::new(trust_domain)?
        }
    };
    if let Some(dir) = dir {
        // What node agents trust (`--ca-trust`); a read-only dir (a mounted Secret) keeps its own.
        let path = dir.join("root.pem");
        let pem = root.cert_pem();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(pem.as_str())
            && let Err(e) = std::fs::write(&path, &pem)
        {
            tracing::warn!(path = %path.display(), error = %e, "root certificate not written");
        }
    }
    Ok(Arc::new(root))
}

/// Binds and returns the serving future (it runs until `closing`).
pub async fn serve(
    opts: CaOptions,
    root: Arc<DevCa>,
    kube: Option<(Client, watch::Receiver<Snapshot>)>,
    mut closing: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, CaError> {
    let (kube, pods) = kube.ok_or(CaError::NeedsKubernetes)?;
    let root_pem = root.cert_pem();
    let ca = Arc::new(Ca {
        root,
        root_pem,
        opts: opts.clone(),
        kube,
        pods,
        in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
    });
    let serving = Arc::new(MintedCert::new(ca.root.clone(), opts.dns_names.clone())?);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(opts.address)
        .await
        .map_err(|source| CaError::Bind {
            address: opts.address,
            source,
        })?;
    tracing::info!(address = %opts.address, "serving the node CA (POST /v1/node-ca)");
    Ok(async move {
        loop {
            let tcp = tokio::select! {
                a = listener.accept() => match a {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "CA accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = async { let _ = closing.wait_for(|c| *c).await; } => return,
            };
            let (acceptor, ca) = (acceptor.clone(), ca.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let ca = ca.clone();
                    async move { Ok::<_, Infallible>(handle(&ca, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

async fn handle(ca: &Ca, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("POST", "/v1/node-ca") => {}
        ("GET", "/ready") => return reply(StatusCode::OK, json!({ "ready": true })),
        (_, "/v1/node-ca") => {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "POST only" }),
            );
        }
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                json!({ "error": "not found: POST /v1/node-ca" }),
            );
        }
    }
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "Authorization: Bearer <projected service-account token> needed" }),
        );
    };
    let Ok(_permit) = ca.in_flight.try_acquire() else {
        return reply(
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "error": "too many requests in flight; retry" }),
        );
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": format!("the body must be at most {MAX_BODY} bytes") }),
            );
        }
    };
    match ca.node_ca(&token, &body).await {
        Ok(v) => reply(StatusCode::OK, v),
        Err((status, v)) => {
            if status != StatusCode::FORBIDDEN {
                tracing::warn!(%status, error = %v["error"], "node CA request refused");
            }
            reply(status, v)
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
