//! The agent's signing key from the control plane's CA (`--ca-url`): a per-node intermediate
//! (`identity::node_ca`) that may sign only the identities of pods on this node.
//!
//! The agent asks for an intermediate naming the SPIFFE IDs of the entries in force, and asks
//! again whenever they change and at half the intermediate's life. Until the first one arrives
//! it signs nothing (the bundle, the root from `--ca-trust`, is published already). IDs the CA
//! refuses (no pod of this node runs as them, perhaps not yet as the control plane sees it) are
//! left out of the next request and retried later with backoff; the current intermediate stays
//! in force meanwhile, as it does while the CA cannot be reached.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::BodyExt as _;
use identity::node_ca::{NodeCa, NodeKey};
use identity::{DevCaError, MintedSvid, SpiffeId, TrustDomain, X509Authority};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use crate::Authorities;
use crate::entries::Entries;

/// How the agent reaches the CA.
#[derive(Debug, Clone)]
pub struct CaClientOptions {
    /// `https://HOST:PORT` of the control plane's `--ca-address`.
    pub url: String,
    /// The trust domain's root (PEM): the CA's serving certificate and every intermediate must
    /// chain to it, and it is the bundle the agent publishes.
    pub trust: PathBuf,
    /// The projected service-account token for the CA's audience (re-read per request).
    pub token: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("--ca-url {0:?}: expected https://HOST[:PORT]")]
    Url(String),
    #[error("--ca-trust {path}: {reason}")]
    Trust { path: String, reason: String },
}

/// Why a request did not give an intermediate.
#[derive(Debug)]
enum Failure {
    /// The CA refused these IDs (403 with a `refused` list).
    Refused(Vec<SpiffeId>, String),
    Other(String),
}

pub struct CaClient {
    opts: CaClientOptions,
    uri: http::Uri,
    trust_domain: TrustDomain,
    root: CertificateDer<'static>,
    tls: tokio_rustls::TlsConnector,
    name: rustls_pki_types::ServerName<'static>,
}

impl CaClient {
    pub fn new(opts: CaClientOptions, trust_domain: TrustDomain) -> Result<Self, CaClientError> {
        use rustls_pki_types::pem::PemObject as _;
        let bad_url = || CaClientError::Url(opts.url.clone());
        let uri: http::Uri = opts.url.parse().map_err(|_| bad_url())?;
        if uri.scheme_str() != Some("https") {
            return Err(bad_url());
        }
        let host = uri
            .host()
            .ok_or_else(bad_url)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let trust_err = |reason: String| CaClientError::Trust {
            path: opts.trust.display().to_string(),
            reason,
        };
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&opts.trust)
            .map_err(|e| trust_err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| trust_err(e.to_string()))?;
        let [root] = <[_; 1]>::try_from(roots)
            .map_err(|r| trust_err(format!("{} certificates; expected the root alone", r.len())))?;
        let mut store = rustls::RootCertStore::empty();
        store
            .add(root.clone())
            .map_err(|e| trust_err(e.to_string()))?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| trust_err(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(host).map_err(|_| bad_url())?;
        Ok(Self {
            opts,
            uri,
            trust_domain,
            root,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// What the agent publishes and signs with before its first intermediate: the root, nothing.
    pub fn pending(&self) -> Authorities {
        let pending: Arc<dyn X509Authority> = Arc::new(Pending {
            trust_domain: self.trust_domain.clone(),
            root: self.root.clone(),
        });
        Authorities {
            signing: pending.clone(),
            published: vec![pending],
        }
    }

    /// One request: a new key, its CSR, the intermediate for `ids`.
    async fn request(&self, ids: &BTreeSet<SpiffeId>) -> Result<NodeCa, Failure> {
        let other = |e: String| Failure::Other(e);
        let key = NodeKey::generate().map_err(|e| other(e.to_string()))?;
        let body = serde_json::json!({
            "csr": key.csr_pem().map_err(|e| other(e.to_string()))?,
            "identities": ids.iter().map(SpiffeId::as_str).collect::<Vec<_>>(),
        });
        let token = std::fs::read_to_string(&self.opts.token)
            .map_err(|e| other(format!("token {}: {e}", self.opts.token.display())))?;
        let port = self.uri.port_u16().unwrap_or(443);
        let host = self.uri.host().unwrap_or_default();
        let work = async {
            let tcp = tokio::net::TcpStream::connect((
                host.trim_start_matches('[').trim_end_matches(']'),
                port,
            ))
            .await
            .map_err(|e| other(format!("{}: {e}", self.opts.url)))?;
            let tls = self
                .tls
                .connect(self.name.clone(), tcp)
                .await
                .map_err(|e| other(format!("TLS to {}: {e}", self.opts.url)))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| other(e.to_string()))?;
            tokio::spawn(conn);
            let req = http::Request::post("/v1/node-ca")
                .header("host", self.uri.authority().map_or("", |a| a.as_str()))
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {}", token.trim()))
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_string(),
                )))
                .map_err(|e| other(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| other(e.to_string()))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), 1024 * 1024)
                .collect()
                .await
                .map_err(|e| other(e.to_string()))?
                .to_bytes();
            Ok::<_, Failure>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(Duration::from_secs(30), work)
            .await
            .map_err(|_| other("the CA did not answer in 30 s".into()))??;
        let answer: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| other(format!("{status}: the answer is not JSON: {e}")))?;
        if !status.is_success() {
            let message = format!("{status}: {}", answer["error"].as_str().unwrap_or(""));
            let refused: Vec<SpiffeId> = answer["refused"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().and_then(|s| SpiffeId::parse(s).ok()))
                        .collect()
                })
                .unwrap_or_default();
            return Err(if refused.is_empty() {
                Failure::Other(message)
            } else {
                Failure::Refused(refused, message)
            });
        }
        let (Some(node), Some(cert)) = (answer["node"].as_str(), answer["certificate"].as_str())
        else {
            return Err(other("the answer has no node or certificate".into()));
        };
        use rustls_pki_types::pem::PemObject as _;
        let cert = CertificateDer::from_pem_slice(cert.as_bytes())
            .map_err(|e| other(format!("the certificate: {e}")))?;
        NodeCa::new(
            self.trust_domain.clone(),
            node,
            key,
            cert,
            self.root.clone(),
        )
        .map_err(|e| other(e.to_string()))
    }
}

/// The root alone: published, signs nothing.
struct Pending {
    trust_domain: TrustDomain,
    root: CertificateDer<'static>,
}

impl X509Authority for Pending {
    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn cert_der(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    fn mint(&self, id: &SpiffeId, _ttl: Duration) -> Result<MintedSvid, DevCaError> {
        Err(DevCaError::NotPermitted(id.clone()))
    }
}

/// Keeps the agent's intermediate current for the entries in force (see the module doc).
pub async fn run(
    client: CaClient,
    mut entries: watch::Receiver<Arc<Entries>>,
    ca: watch::Sender<Arc<Authorities>>,
) {
    let mut refused: BTreeSet<SpiffeId> = BTreeSet::new();
    let mut retry_refused = backoff::Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
    let mut refused_until = Instant::now();
    let mut failures = backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut current: Option<(BTreeSet<SpiffeId>, Instant)> = None;
    loop {
        let wanted: BTreeSet<SpiffeId> = entries
            .borrow_and_update()
            .entries
            .iter()
            .map(|e| e.spiffe_id.clone())
            .collect();
        if !refused.is_empty() && Instant::now() >= refused_until {
            refused.clear();
        }
        let ask: BTreeSet<SpiffeId> = wanted.difference(&refused).cloned().collect();
        let due = match &current {
            None => true,
            Some((ids, renew_at)) => *ids != ask || Instant::now() >= *renew_at,
        };
        let mut wait = match &current {
            Some((_, renew_at)) => renew_at.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        if !refused.is_empty() {
            wait = wait.min(refused_until.saturating_duration_since(Instant::now()));
        }
        if ask.is_empty() && current.take().is_some() {
            // No identity left to sign: stop signing (the old intermediate expires on its own).
            ca.send_replace(Arc::new(client.pending()));
        }
        if due && !ask.is_empty() {
            match client.request(&ask).await {
                Ok(node_ca) => {
                    failures.reset();
                    let life = node_ca
                        .not_after()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tracing::info!(node = node_ca.node(), identities = ask.len(), valid_for = ?life, "node CA received");
                    current = Some((ask, Instant::now() + life / 2));
                    if refused.is_empty() {
                        retry_refused.reset();
                    }
                    let node_ca: Arc<dyn X509Authority> = Arc::new(node_ca);
                    ca.send_replace(Arc::new(Authorities {
                        signing: node_ca.clone(),
                        published: vec![node_ca],
                    }));
                    continue;
                }
                Err(Failure::Refused(ids, message)) => {
                    tracing::warn!(%message, refused = ?ids.iter().map(SpiffeId::as_str).collect::<Vec<_>>(), "the CA refused identities; asking without them");
                    let before = refused.len();
                    refused.extend(ids.into_iter().filter(|i| ask.contains(i)));
                    if refused.len() == before {
                        // Refusing what was not asked: do not spin.
                        wait = failures.next_delay();
                    } else {
                        refused_until = Instant::now() + retry_refused.next_delay();
                        continue;
                    }
                }
                Err(Failure::Other(message)) => {
                    wait = failures.next_delay();
                    tracing::warn!(%message, retry_in = ?wait, "no node CA from the control plane; keeping the current one");
                }
            }
        }
        tokio::select! {
            changed = entries.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
            () = ca.closed() => return,
        }
    }
}
