//! Credentials from the SPIFFE Workload API: a `FetchX509SVID` stream on a unix socket, reopened
//! with backoff when it breaks. The last SVID is kept while the agent is away (its expiry is the
//! caller's to check: `Credentials::usable`); before the first one there are no credentials.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use crate::workload_api as api;
use crate::{Bundle, BundleSet, Credentials, CredentialsRx, TrustDomain, X509Svid};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The Workload API endpoint to stream credentials from.
#[derive(Debug, Clone)]
pub struct WorkloadApiSource {
    pub socket: PathBuf,
}

/// Why the Workload API stream failed (the current SVID stays).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Status(#[from] tonic::Status),
}

/// Why one response of the Workload API could not be used.
#[derive(Debug, thiserror::Error)]
enum ResponseError {
    #[error("response has no SVID")]
    NoSvid,
    #[error("response names {named} but the certificate says {actual}")]
    IdMismatch { named: String, actual: String },
    #[error("bad certificate: {0}")]
    Certificate(String),
    #[error("no certificates")]
    NoCertificates,
    #[error(transparent)]
    Svid(#[from] crate::SvidError),
    #[error(transparent)]
    Bundle(#[from] crate::BundleError),
    #[error("federated bundle: {0}")]
    TrustDomain(#[from] crate::SpiffeIdError),
}

impl WorkloadApiSource {
    /// Starts streaming; the channel holds `None` until the first SVID arrives.
    pub fn watch(self) -> CredentialsRx {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let mut backoff = backoff::Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
            loop {
                match self.stream(&tx).await {
                    Ok(()) => tracing::warn!("Workload API stream ended; reconnecting"),
                    Err(e) => {
                        tracing::warn!(error = %e, socket = %self.socket.display(), "Workload API unavailable; keeping the current SVID")
                    }
                }
                if tx.is_closed() {
                    return;
                }
                // Until the first SVID, keep asking quickly: the proxy is not ready without one.
                if tx.borrow().is_none() {
                    backoff.reset();
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        });
        rx
    }

    async fn stream(
        &self,
        tx: &watch::Sender<Option<Arc<Credentials>>>,
    ) -> Result<(), StreamError> {
        let path = self.socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await?;
        let mut client = api::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
        let mut req = tonic::Request::new(api::X509svidRequest {});
        req.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let mut stream = client.fetch_x509svid(req).await?.into_inner();
        while let Some(resp) = stream.message().await? {
            match credentials(resp) {
                Ok(c) => {
                    tracing::info!(spiffe_id = %c.svid.spiffe_id(), serial = %c.svid.leaf().serial, "SVID from the Workload API");
                    tx.send_replace(Some(Arc::new(c)));
                }
                // A bad response never replaces good credentials.
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API sent an unusable SVID; keeping the current one")
                }
            }
        }
        Ok(())
    }
}

/// The first (default) SVID of a response, with its trust domain's bundle and federated bundles.
fn credentials(resp: api::X509svidResponse) -> Result<Credentials, ResponseError> {
    let first = resp.svids.into_iter().next().ok_or(ResponseError::NoSvid)?;
    let chain = split_der(&first.x509_svid)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(first.x509_svid_key));
    let svid = X509Svid::from_der(chain, key)?;
    if svid.spiffe_id().as_str() != first.spiffe_id {
        return Err(ResponseError::IdMismatch {
            named: first.spiffe_id,
            actual: svid.spiffe_id().to_string(),
        });
    }
    let own = Bundle::from_certs(svid.spiffe_id().trust_domain(), split_der(&first.bundle)?)?;
    let mut bundles = BundleSet::new([own]);
    for (td, der) in resp.federated_bundles {
        let td = TrustDomain::parse(&td)?;
        if td.as_str() == svid.spiffe_id().trust_domain_str() {
            continue; // the own domain's bundle comes with the SVID, never from a federation entry
        }
        bundles.insert(Bundle::from_certs(td, split_der(&der)?)?);
    }
    Ok(Credentials::new(svid, bundles))
}

/// Concatenated DER certificates → one per certificate.
fn split_der(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, ResponseError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| ResponseError::Certificate(e.to_string()))?;
        out.push(CertificateDer::from(der[..der.len() - rest.len()].to_vec()));
        der = rest;
    }
    if out.is_empty() {
        return Err(ResponseError::NoCertificates);
    }
    Ok(out)
}
