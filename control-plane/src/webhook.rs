//! The injection webhook over HTTPS (Istio's 15017): `POST /inject` takes an AdmissionReview and
//! answers one (`inject::review`); `GET /ready` says it is serving.
//!
//! The certificate is the one given (PEM files, as cert-manager or the chart writes them),
//! re-read when the files change, so a renewed certificate needs no restart. So is the
//! injection template (`--injection-template`, a mounted ConfigMap): a changed file that parses
//! applies to the next pods; one that does not is logged and the template in force stays. The API server
//! presents no client certificate; the webhook changes nothing but the pod it is shown, so it
//! needs none.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::inject::{Template, review};

/// Where and how the webhook serves.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub address: std::net::SocketAddr,
    pub cert: WebhookCert,
    pub template: Template,
    /// Where `template` was read from, re-read when it changes; none: the built-in one.
    pub template_file: Option<PathBuf>,
    /// Kubernetes Events for pods admitted without a sidecar or refused (with `--kubernetes`).
    pub events: Option<crate::kube::events::EventSink>,
}

/// Where the webhook's certificate comes from.
#[derive(Debug, Clone)]
pub enum WebhookCert {
    /// PEM files (cert-manager's), re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// Minted by the control plane's CA root (`--ca-address`) for these names and renewed; the
    /// root is written into the `caBundle` of the MutatingWebhookConfiguration named.
    FromCa {
        dns_names: Vec<String>,
        configuration: String,
    },
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook certificate {path}: {reason}")]
    Credentials { path: String, reason: String },
    #[error("webhook TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(
        "a webhook certificate from the CA needs --ca-address (or give --webhook-cert and --webhook-key)"
    )]
    NeedsCa,
    #[error("webhook certificate from the CA: {0}")]
    Minted(#[from] crate::ca::CaError),
    #[error("webhook address {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    stamp: std::sync::Mutex<Option<(SystemTime, SystemTime)>>,
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files").field("cert", &self.cert).finish()
    }
}

fn load(cert: &PathBuf, key: &PathBuf) -> Result<CertifiedKey, WebhookError> {
    let bad = |path: &PathBuf, reason: String| WebhookError::Credentials {
        path: path.display().to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in the file".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, der, &provider).map_err(|e| bad(key, e.to_string()))?;
    Ok(ck)
}

fn stamp(files: &Files) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

impl Files {
    /// Re-reads the files when they changed; a pair that does not load keeps the current one.
    fn refresh(&self) {
        let now = stamp(self);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_none() || *last == now {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok(ck) => {
                self.current.store(Arc::new(ck));
                *last = now;
                tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook certificate not reloaded; keeping the current one")
            }
        }
    }
}

impl ResolvesServerCert for Files {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The template's file and when it was last read.
struct TemplateFile {
    path: PathBuf,
    stamp: std::sync::Mutex<Option<SystemTime>>,
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl TemplateFile {
    /// Re-reads the template when its file changed; one that does not load keeps the current.
    fn refresh(&self, current: &ArcSwap<Template>) {
        let now = modified(&self.path);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_none() || *last == now {
            return;
        }
        *last = now;
        match Template::from_file(&self.path) {
            Ok(t) => {
                current.store(Arc::new(t));
                tracing::info!(template = %self.path.display(), "injection template reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "injection template not reloaded; keeping the current one")
            }
        }
    }
}

/// Binds and loads the certificate, then returns the serving future (it runs until `closing`).
pub async fn serve(
    opts: WebhookOptions,
    root: Option<Arc<identity::DevCa>>,
    mut closing: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, WebhookError> {
    let (resolver, files): (Arc<dyn ResolvesServerCert>, Option<Arc<Files>>) = match &opts.cert {
        WebhookCert::Files { cert, key } => {
            let first = load(cert, key)?;
            let files = Arc::new(Files {
                stamp: std::sync::Mutex::new(None),
                current: ArcSwap::from_pointee(first),
                cert: cert.clone(),
                key: key.clone(),
            });
            *files.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp(&files);
            (files.clone(), Some(files))
        }
        WebhookCert::FromCa { dns_names, .. } => {
            let root = root.ok_or(WebhookError::NeedsCa)?;
            (
                Arc::new(crate::ca::MintedCert::new(root, dns_names.clone())?),
                None,
            )
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(opts.address)
        .await
        .map_err(|source| WebhookError::Bind {
            address: opts.address,
            source,
        })?;
    tracing::info!(address = %opts.address, "serving the injection webhook (POST /inject)");
    let template = Arc::new(ArcSwap::from_pointee(opts.template));
    let template_file = opts.template_file.map(|path| {
        let stamp = modified(&path);
        Arc::new(TemplateFile {
            path,
            stamp: std::sync::Mutex::new(stamp),
        })
    });
    let events = opts.events;
    Ok(async move {
        let mut reload = tokio::time::interval(Duration::from_secs(5));
        loop {
            let tcp = tokio::select! {
                a = listener.accept() => match a {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = reload.tick() => {
                    let f = files.clone();
                    let t = template_file.clone().map(|tf| (tf, template.clone()));
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Some(f) = f {
                            f.refresh();
                        }
                        if let Some((tf, template)) = t {
                            tf.refresh(&template);
                        }
                    })
                    .await;
                    continue;
                }
                _ = async { let _ = closing.wait_for(|c| *c).await; } => return,
            };
            let (acceptor, template, events) = (acceptor.clone(), template.clone(), events.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                };
                let service = hyper::service::service_fn(move |req| {
                    let (template, events) = (template.load_full(), events.clone());
                    async move { Ok::<_, Infallible>(handle(req, template, events.as_ref()).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    template: Arc<Template>,
    events: Option<&crate::kube::events::EventSink>,
) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("POST", "/inject") => {}
        ("GET", "/ready" | "/healthz/ready") => {
            return reply(StatusCode::OK, "text/plain", "ready\n");
        }
        (_, "/inject") => {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "POST only\n");
        }
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: POST /inject\n",
            );
        }
    }
    let body = match Limited::new(req.into_body(), review::MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Some(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "webhook request body not read");
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "the body could not be read\n",
            );
        }
    };
    // Building the patch of a large pod is CPU work: off the async workers.
    let answered = tokio::task::spawn_blocking(move || match body {
        Some(b) => review::answer_with_pod(&b, &template),
        None => {
            let (v, o) = review::too_large();
            (v, o, None)
        }
    })
    .await;
    let (value, outcome, pod) = match answered {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "the webhook failed on a request");
            review::answer_with_pod(b"", &Template::default())
        }
    };
    if let (Some(sink), Some(pod)) = (events, &pod) {
        let warning = value["response"]["warnings"][0].as_str();
        match (&outcome, warning) {
            (review::Outcome::Refused(why), _) => {
                sink.warn_pod(&pod.namespace, &pod.name, "InjectionRefused", why)
            }
            (review::Outcome::Skipped(_), Some(w)) => {
                sink.warn_pod(&pod.namespace, &pod.name, "InjectionSkipped", w)
            }
            _ => {}
        }
    }
    match &outcome {
        review::Outcome::Injected => tracing::info!("sidecar injected"),
        review::Outcome::Skipped(why) => tracing::debug!(why, "not injected"),
        review::Outcome::Refused(why) => tracing::warn!(why, "pod refused"),
        review::Outcome::Unreadable(why) => {
            tracing::warn!(why, "admission request not understood; admitted unchanged")
        }
    }
    reply(StatusCode::OK, "application/json", value.to_string())
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
