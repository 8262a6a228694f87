//! Trust bundles, kept per trust domain: a CA of one domain never vouches for an ID in another.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::TrustDomain;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle has no PEM certificate blocks")]
    NoCertificates,
    #[error("bundle PEM is malformed: {0}")]
    BadPem(String),
    #[error("bundle certificate {index} is not a valid X.509 CA certificate: {reason}")]
    BadCertificate { index: usize, reason: String },
    #[error("SPIFFE bundle is not valid JSON: {0}")]
    BadJson(String),
    #[error("expected a single certificate in x509-svid entry {index}; got {count}")]
    X5cCount { index: usize, count: usize },
    #[error("x509-svid entry {index} has a certificate that is not base64 DER")]
    X5cEncoding { index: usize },
    #[error("jwt-svid entry {index} has no key ID (kid)")]
    MissingKeyId { index: usize },
}

/// The X.509 authorities (and JWT keys) of one trust domain.
#[derive(Clone)]
pub struct Bundle {
    trust_domain: TrustDomain,
    certs: Vec<CertificateDer<'static>>,
    anchors: Arc<[TrustAnchor<'static>]>,
    /// JWT authorities by key ID, kept as their JWK JSON (used by the Workload API later).
    jwt_keys: BTreeMap<String, serde_json::Value>,
    refresh_hint: Option<u64>,
    sequence: Option<u64>,
}

/// Bundles of every trust domain this workload trusts (its own and federated ones).
#[derive(Clone, Default)]
pub struct BundleSet {
    by_domain: BTreeMap<TrustDomain, Bundle>,
}

#[derive(serde::Deserialize)]
struct Jwks {
    #[serde(default)]
    keys: Vec<serde_json::Map<String, serde_json::Value>>,
    spiffe_refresh_hint: Option<u64>,
    spiffe_sequence: Option<u64>,
}

// === impl Bundle ===

impl Bundle {
    pub fn from_certs(
        trust_domain: TrustDomain,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadCertificate {
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trust_domain,
            certs,
            anchors: anchors.into(),
            jwt_keys: BTreeMap::new(),
            refresh_hint: None,
            sequence: None,
        })
    }

    /// Parses a PEM file of CA certificates (go-spiffe's x509bundle format).
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let certs = parse_pem_certs(pem)?;
        Self::from_certs(trust_domain, certs)
    }

    /// Parses a SPIFFE bundle (a JWKS with `x509-svid` and `jwt-svid` keys).
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let jwks: Jwks =
            serde_json::from_slice(json).map_err(|e| BundleError::BadJson(e.to_string()))?;
        let mut certs = Vec::new();
        let mut jwt_keys = BTreeMap::new();
        for (index, key) in jwks.keys.into_iter().enumerate() {
            match key.get("use").and_then(|u| u.as_str()) {
                Some("x509-svid") => {
                    let x5c = key.get("x5c").and_then(|v| v.as_array());
                    let count = x5c.map_or(0, |v| v.len());
                    let Some([cert]) = x5c.map(Vec::as_slice) else {
                        return Err(BundleError::X5cCount { index, count });
                    };
                    let der = cert
                        .as_str()
                        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                        .ok_or(BundleError::X5cEncoding { index })?;
                    certs.push(CertificateDer::from(der));
                }
                Some("jwt-svid") => {
                    let kid = key.get("kid").and_then(|k| k.as_str()).unwrap_or_default();
                    if kid.is_empty() {
                        return Err(BundleError::MissingKeyId { index });
                    }
                    jwt_keys.insert(kid.to_owned(), serde_json::Value::Object(key));
                }
                // Other uses (e.g. "wit-svid") are not ours to interpret; like go-spiffe, skip them.
                _ => {}
            }
        }
        let mut bundle = Self::from_certs(trust_domain, certs)?;
        bundle.jwt_keys = jwt_keys;
        bundle.refresh_hint = jwks.spiffe_refresh_hint;
        bundle.sequence = jwks.spiffe_sequence;
        Ok(bundle)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn jwt_key_ids(&self) -> impl Iterator<Item = &str> {
        self.jwt_keys.keys().map(String::as_str)
    }

    pub fn refresh_hint(&self) -> Option<u64> {
        self.refresh_hint
    }

    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("trust_domain", &self.trust_domain)
            .field("x509_authorities", &self.certs.len())
            .field("jwt_authorities", &self.jwt_keys.len())
            .finish()
    }
}

// === impl BundleSet ===

impl BundleSet {
    pub fn new(bundles: impl IntoIterator<Item = Bundle>) -> Self {
        let mut set = Self::default();
        for b in bundles {
            set.insert(b);
        }
        set
    }

    /// Adds or replaces the bundle of `bundle.trust_domain()`.
    pub fn insert(&mut self, bundle: Bundle) {
        self.by_domain.insert(bundle.trust_domain.clone(), bundle);
    }

    pub fn get(&self, td: &str) -> Option<&Bundle> {
        // Keys are validated trust domains; look up by string without allocating a TrustDomain.
        self.by_domain
            .iter()
            .find(|(k, _)| k.as_str() == td)
            .map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.by_domain.values()
    }
}

impl std::fmt::Debug for BundleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_domain.values()).finish()
    }
}

/// Every `CERTIFICATE` block of a PEM text; anything else (keys) is skipped.
pub(crate) fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::BadPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(BundleError::NoCertificates);
    }
    for (index, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der).map_err(|e| BundleError::BadCertificate {
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}
