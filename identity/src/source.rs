//! Where credentials come from: a fixed SVID, or PEM files watched for changes.
//!
//! Every source publishes `Option<Arc<Credentials>>` on a watch channel; `None` means "no SVID yet",
//! and TLS then refuses every handshake (fail closed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Bundle, BundleError, BundleSet, SvidError, TrustDomain, X509Svid};

/// An SVID and the bundles to verify peers with.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub svid: X509Svid,
    pub bundles: BundleSet,
}

pub type CredentialsRx = watch::Receiver<Option<Arc<Credentials>>>;
pub type CredentialsTx = watch::Sender<Option<Arc<Credentials>>>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Svid {
        path: PathBuf,
        #[source]
        source: SvidError,
    },
    #[error("{path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("SVID {id} is not in the trust domain of its bundle ({td})")]
    TrustDomainMismatch { id: String, td: String },
}

/// PEM files holding an SVID (`cert`, `key`) and the bundle of its trust domain, plus optional
/// federated bundles (trust domain → PEM file).
#[derive(Debug, Clone)]
pub struct FileSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    pub federated: Vec<(TrustDomain, PathBuf)>,
    pub poll_interval: Duration,
}

// === impl Credentials ===

impl Credentials {
    pub fn new(svid: X509Svid, bundles: BundleSet) -> Self {
        Self { svid, bundles }
    }

    /// Whether these credentials may be used at `now`: the SVID is inside its validity window.
    pub fn usable(&self, now: rustls_pki_types::UnixTime) -> bool {
        self.svid.is_valid_at(now)
    }

    /// A channel that always holds these credentials.
    pub fn fixed(self) -> (CredentialsTx, CredentialsRx) {
        watch::channel(Some(Arc::new(self)))
    }
}

// === impl FileSource ===

impl FileSource {
    /// Reads the files once; an error here means the proxy must not start.
    pub fn load(&self) -> Result<(Credentials, Vec<Vec<u8>>), SourceError> {
        let contents = self.read_all()?;
        let creds = self.parse(&contents)?;
        Ok((creds, contents))
    }

    /// Loads the files and keeps watching them: a complete, valid new set replaces the current
    /// credentials; an incomplete or invalid one (say, half-written) is logged and the current
    /// credentials stay until the next poll.
    pub fn watch(self) -> Result<CredentialsRx, SourceError> {
        let (creds, mut last) = self.load()?;
        let (tx, rx) = creds.fixed();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tx.is_closed() {
                    return;
                }
                let contents = match self.read_all() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "SVID files unreadable; keeping current SVID");
                        continue;
                    }
                };
                if contents == last {
                    continue;
                }
                match self.parse(&contents) {
                    Ok(creds) => {
                        tracing::info!(
                            spiffe_id = %creds.svid.spiffe_id(),
                            serial = %creds.svid.leaf().serial,
                            "SVID files changed; rotated credentials"
                        );
                        last = contents;
                        tx.send_replace(Some(Arc::new(creds)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "SVID files changed but are not valid; keeping current SVID");
                    }
                }
            }
        });
        Ok(rx)
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [
            self.cert.as_path(),
            self.key.as_path(),
            self.bundle.as_path(),
        ]
        .into_iter()
        .chain(self.federated.iter().map(|(_, p)| p.as_path()))
    }

    fn read_all(&self) -> Result<Vec<Vec<u8>>, SourceError> {
        self.paths()
            .map(|p| {
                std::fs::read(p).map_err(|source| SourceError::Read {
                    path: p.to_owned(),
                    source,
                })
            })
            .collect()
    }

    fn parse(&self, contents: &[Vec<u8>]) -> Result<Credentials, SourceError> {
        let svid =
            X509Svid::from_pem(&contents[0], &contents[1]).map_err(|source| SourceError::Svid {
                path: self.cert.clone(),
                source,
            })?;
        let td = svid.spiffe_id().trust_domain();
        let own = Bundle::from_pem(td, &contents[2]).map_err(|source| SourceError::Bundle {
            path: self.bundle.clone(),
            source,
        })?;
        let mut bundles = BundleSet::new([own]);
        for ((ftd, path), pem) in self.federated.iter().zip(&contents[3..]) {
            if ftd.as_str() == svid.spiffe_id().trust_domain_str() {
                return Err(SourceError::TrustDomainMismatch {
                    id: svid.spiffe_id().to_string(),
                    td: ftd.to_string(),
                });
            }
            let b = Bundle::from_pem(ftd.clone(), pem).map_err(|source| SourceError::Bundle {
                path: path.clone(),
                source,
            })?;
            bundles.insert(b);
        }
        Ok(Credentials::new(svid, bundles))
    }
}
