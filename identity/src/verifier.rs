//! rustls verifiers for X509-SVIDs (DESIGN §6).
//!
//! A peer is accepted only if its leaf satisfies the X509-SVID rules, its chain verifies against the
//! bundle of the trust domain named in the leaf (never another domain's), it is inside its validity
//! window, and (for upstreams) its SPIFFE ID is one of the IDs the upstream is expected to have.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{CredentialsRx, SpiffeId, SvidError};

/// Why a peer's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("peer certificate is not a valid X509-SVID: {0}")]
    NotAnSvid(#[from] SvidError),
    #[error("no trust bundle for trust domain {0:?}")]
    UnknownTrustDomain(String),
    #[error("no local credentials yet; refusing all peers")]
    NoCredentials,
    #[error("certificate chain does not verify against the {trust_domain} bundle: {reason}")]
    Chain {
        trust_domain: String,
        /// What went wrong, for the TLS alert.
        failure: ChainFailure,
        reason: String,
    },
    #[error("{0} is signed by a node CA that may not sign it (not a pod of that node)")]
    NotPermittedByIssuer(SpiffeId),
    #[error("an intermediate's permitted-IDs extension is malformed: {0}")]
    BadIssuerExtension(String),
    #[error("peer SPIFFE ID {got} is not one of the expected IDs [{expected}]")]
    UnexpectedId { got: SpiffeId, expected: String },
}

/// Which end of a connection is being verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Client,
    Server,
}

/// Verifies an X509-SVID chain presented by a peer and returns its SPIFFE ID.
pub fn verify_peer_svid(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    creds: &CredentialsRx,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, VerifyError> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let leaf = crate::svid::check_chain(&chain)?;
    let td = leaf.spiffe_id.trust_domain_str();
    let creds = creds.borrow();
    let creds = creds.as_ref().ok_or(VerifyError::NoCredentials)?;
    let bundle = creds
        .bundles
        .get(td)
        .ok_or_else(|| VerifyError::UnknownTrustDomain(td.to_owned()))?;
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| VerifyError::Chain {
        trust_domain: td.to_owned(),
        failure: ChainFailure::of(&e),
        reason: format!("{e:?}"),
    })?;
    let usage = match role {
        PeerRole::Client => webpki::KeyUsage::client_auth(),
        PeerRole::Server => webpki::KeyUsage::server_auth(),
    };
    let path = ee
        .verify_for_usage(
            algorithms().all,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| VerifyError::Chain {
            trust_domain: td.to_owned(),
            failure: ChainFailure::of(&e),
            reason: format!("{e:?}"),
        })?;
    // A node's intermediate may sign only the identities of its own pods (`node_ca`).
    for ca in path.intermediate_certificates() {
        match crate::node_ca::permitted_ids(ca.der().as_ref()) {
            Ok(None) => {}
            Ok(Some(ids)) if ids.contains(&leaf.spiffe_id) => {}
            Ok(Some(_)) => return Err(VerifyError::NotPermittedByIssuer(leaf.spiffe_id)),
            Err(reason) => return Err(VerifyError::BadIssuerExtension(reason)),
        }
    }
    Ok(leaf.spiffe_id)
}

pub(crate) fn algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGS: std::sync::LazyLock<WebPkiSupportedAlgorithms> = std::sync::LazyLock::new(|| {
        rustls::crypto::ring::default_provider().signature_verification_algorithms
    });
    &ALGS
}

/// The kind of a chain failure, which decides the TLS alert the peer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainFailure {
    Expired,
    NotValidYet,
    UnknownIssuer,
    Other,
}

impl ChainFailure {
    fn of(e: &webpki::Error) -> Self {
        match e {
            webpki::Error::CertExpired { .. } => Self::Expired,
            webpki::Error::CertNotValidYet { .. } => Self::NotValidYet,
            webpki::Error::UnknownIssuer => Self::UnknownIssuer,
            _ => Self::Other,
        }
    }
}

/// A refusal as rustls reports it: expiry, not-yet-valid and unknown issuer (or trust domain)
/// with their own certificate errors, so the peer gets the matching alert; the rest as ours.
pub fn to_rustls(e: VerifyError) -> rustls::Error {
    let cert_err = match &e {
        VerifyError::Chain { failure, .. } if *failure != ChainFailure::Other => match failure {
            ChainFailure::Expired => CertificateError::Expired,
            ChainFailure::NotValidYet => CertificateError::NotValidYet,
            _ => CertificateError::UnknownIssuer,
        },
        VerifyError::UnknownTrustDomain(_) => CertificateError::UnknownIssuer,
        _ => CertificateError::Other(rustls::OtherError(Arc::new(e.clone()))),
    };
    tracing::debug!(error = %e, "peer certificate refused");
    rustls::Error::InvalidCertificate(cert_err)
}

/// Server-side verifier: requires a client X509-SVID from any trust domain we hold a bundle for.
/// Which identities may do what is decided later, by policy.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    creds: CredentialsRx,
}

/// Client-side verifier: the upstream must present one of `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    creds: CredentialsRx,
    expected: Arc<[SpiffeId]>,
}

// === impl SpiffeClientVerifier ===

impl SpiffeClientVerifier {
    pub fn new(creds: CredentialsRx) -> Self {
        Self { creds }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer_svid(
            end_entity,
            intermediates,
            &self.creds,
            now,
            PeerRole::Client,
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

// === impl SpiffeServerVerifier ===

impl SpiffeServerVerifier {
    /// An empty `expected` list accepts no server at all (fail closed).
    pub fn new(creds: CredentialsRx, expected: Arc<[SpiffeId]>) -> Self {
        Self { creds, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = verify_peer_svid(
            end_entity,
            intermediates,
            &self.creds,
            now,
            PeerRole::Server,
        )
        .map_err(to_rustls)?;
        if !self.expected.contains(&id) {
            let expected = self
                .expected
                .iter()
                .map(SpiffeId::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(to_rustls(VerifyError::UnexpectedId { got: id, expected }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
