//! X509-SVIDs: a certificate chain whose leaf carries exactly one SPIFFE ID, and its private key.
//!
//! The structural rules are those of the X509-SVID standard; each violation has its own error.

use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::*;

use crate::{SpiffeId, SpiffeIdError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("no certificates found")]
    NoCertificates,
    #[error("no private key found")]
    NoPrivateKey,
    #[error("PEM is malformed: {0}")]
    BadPem(String),
    #[error("certificate {index} cannot be parsed: {reason}")]
    BadCertificate { index: usize, reason: String },
    #[error("private key cannot be used: {0}")]
    BadPrivateKey(String),
    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,
    #[error("leaf certificate has no URI SAN (an X509-SVID needs exactly one SPIFFE ID)")]
    NoUriSan,
    #[error("leaf certificate has {0} URI SANs (an X509-SVID needs exactly one)")]
    MultipleUriSans(usize),
    #[error("leaf certificate's URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeIdError),
    #[error("leaf certificate's SPIFFE ID has no path (it names a trust domain, not a workload)")]
    TrustDomainOnlyId,
    #[error("leaf certificate must not be a CA (basicConstraints CA=true)")]
    LeafIsCa,
    #[error("leaf certificate must have the digitalSignature key usage")]
    LeafNoDigitalSignature,
    #[error("leaf certificate must not have the keyCertSign key usage")]
    LeafKeyCertSign,
    #[error("leaf certificate must not have the cRLSign key usage")]
    LeafCrlSign,
    #[error("signing certificate {index} is not a CA (basicConstraints CA=false or missing)")]
    IntermediateNotCa { index: usize },
    #[error("signing certificate {index} must have the keyCertSign key usage")]
    IntermediateNoKeyCertSign { index: usize },
    #[error("certificate {index} has a malformed extension: {reason}")]
    BadExtension { index: usize, reason: String },
}

/// What the leaf of an X509-SVID says, after the structural rules have been checked.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    /// Serial number, lowercase hex with ':' separators (like openssl).
    pub serial: String,
}

/// An X509-SVID with its private key, ready to present in TLS.
#[derive(Clone)]
pub struct X509Svid {
    leaf: LeafInfo,
    chain: Vec<CertificateDer<'static>>,
    certified_key: Arc<CertifiedKey>,
}

// === impl X509Svid ===

impl X509Svid {
    /// Parses an SVID from PEM: the certificate chain (leaf first) and a PKCS#8 / SEC1 / PKCS#1 key,
    /// which may be in the same text or separate ones.
    pub fn from_pem(certs_pem: &[u8], key_pem: &[u8]) -> Result<Self, SvidError> {
        let chain = CertificateDer::pem_slice_iter(certs_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::BadPem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => SvidError::NoPrivateKey,
            e => SvidError::BadPem(e.to_string()),
        })?;
        Self::from_der(chain, key)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let leaf = check_chain(&chain)?;
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| SvidError::BadPrivateKey(e.to_string()))?;
        let spki = signing_key.public_key().ok_or_else(|| {
            SvidError::BadPrivateKey("key type cannot report its public key".into())
        })?;
        let (_, cert) =
            parse_x509_certificate(&chain[0]).map_err(|e| SvidError::BadCertificate {
                index: 0,
                reason: e.to_string(),
            })?;
        if cert.public_key().raw != spki.as_ref() {
            return Err(SvidError::KeyMismatch);
        }
        let certified_key = Arc::new(CertifiedKey::new(chain.clone(), signing_key));
        Ok(Self {
            leaf,
            chain,
            certified_key,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.leaf.spiffe_id
    }

    pub fn leaf(&self) -> &LeafInfo {
        &self.leaf
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// True while `now` is inside the leaf's validity window.
    pub fn is_valid_at(&self, now: UnixTime) -> bool {
        self.leaf.not_before <= now && now < self.leaf.not_after
    }
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("leaf", &self.leaf)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Checks the X509-SVID rules for a chain (leaf first) and returns what the leaf says.
/// Signatures and validity are checked by the verifier, against a bundle, not here.
pub fn check_chain(chain: &[CertificateDer<'_>]) -> Result<LeafInfo, SvidError> {
    let (leaf_der, signers) = chain.split_first().ok_or(SvidError::NoCertificates)?;
    let leaf = check_leaf(leaf_der)?;
    for (i, der) in signers.iter().enumerate() {
        let index = i + 1;
        let (_, cert) = parse_x509_certificate(der).map_err(|e| SvidError::BadCertificate {
            index,
            reason: e.to_string(),
        })?;
        let bad_ext = |e: X509Error| SvidError::BadExtension {
            index,
            reason: e.to_string(),
        };
        let is_ca = cert
            .basic_constraints()
            .map_err(bad_ext)?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(SvidError::IntermediateNotCa { index });
        }
        let cert_sign = cert
            .key_usage()
            .map_err(bad_ext)?
            .is_some_and(|ku| ku.value.key_cert_sign());
        if !cert_sign {
            return Err(SvidError::IntermediateNoKeyCertSign { index });
        }
    }
    Ok(leaf)
}

/// Checks the leaf rules of the X509-SVID standard.
pub fn check_leaf(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let (_, cert) = parse_x509_certificate(der).map_err(|e| SvidError::BadCertificate {
        index: 0,
        reason: e.to_string(),
    })?;
    let bad_ext = |e: X509Error| SvidError::BadExtension {
        index: 0,
        reason: e.to_string(),
    };
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(bad_ext)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    let spiffe_id = SpiffeId::parse(uri)?;
    if spiffe_id.path().is_empty() {
        return Err(SvidError::TrustDomainOnlyId);
    }
    if cert
        .basic_constraints()
        .map_err(bad_ext)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::LeafIsCa);
    }
    // The standard requires the key usage extension on leaves, with digitalSignature set.
    let ku = cert.key_usage().map_err(bad_ext)?.map(|ku| *ku.value);
    let ku = ku.ok_or(SvidError::LeafNoDigitalSignature)?;
    if !ku.digital_signature() {
        return Err(SvidError::LeafNoDigitalSignature);
    }
    if ku.key_cert_sign() {
        return Err(SvidError::LeafKeyCertSign);
    }
    if ku.crl_sign() {
        return Err(SvidError::LeafCrlSign);
    }
    let validity = cert.validity();
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(LeafInfo {
        spiffe_id,
        not_before: unix_time(validity.not_before.timestamp()),
        not_after: unix_time(validity.not_after.timestamp()),
        serial,
    })
}

fn unix_time(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs.max(0).unsigned_abs()))
}
