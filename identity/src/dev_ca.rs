//! A development CA that mints short-lived X509-SVIDs (tests, demo, local mode).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{Bundle, SpiffeId, TrustDomain, X509Svid};

#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("minted SVID is not valid: {0}")]
    Svid(#[from] crate::SvidError),
    #[error("CA bundle is not valid: {0}")]
    Bundle(#[from] crate::BundleError),
    #[error("{0} is not in the CA's trust domain {1}")]
    WrongTrustDomain(SpiffeId, TrustDomain),
    #[error("{0} is not among the identities this CA may sign")]
    NotPermitted(SpiffeId),
    #[error("the CA's certificate has expired")]
    Expired,
    #[error("persisted CA: {0}")]
    Persist(String),
}

/// What signs X509-SVIDs. The node agent holds one per published CA; a control plane can later
/// hold the root and give each node an intermediate behind the same trait (SPIRE's server/agent).
pub trait X509Authority: Send + Sync {
    fn trust_domain(&self) -> &TrustDomain;
    /// The authority's certificate as published in the bundle.
    fn cert_der(&self) -> CertificateDer<'static>;
    /// Mints an SVID for `id` (in the authority's trust domain), valid for `ttl`.
    fn mint(&self, id: &SpiffeId, ttl: Duration) -> Result<MintedSvid, DevCaError>;
}

/// A self-signed CA for one trust domain.
pub struct DevCa {
    trust_domain: TrustDomain,
    cert: rcgen::Certificate,
    key: KeyPair,
    serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

/// What the CA hands out: an SVID with its PEM forms (for writing to disk).
pub struct MintedSvid {
    pub svid: X509Svid,
    pub cert_pem: String,
    pub key_pem: String,
}

// === impl DevCa ===

/// What is persisted of a CA besides its key: enough to re-create an equivalent certificate.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    trust_domain: String,
    serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

impl DevCa {
    pub fn new(trust_domain: TrustDomain) -> Result<Self, DevCaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = time::OffsetDateTime::now_utc();
        let serial = random_serial();
        Self::build(
            trust_domain,
            key,
            serial,
            now - time::Duration::minutes(5),
            now + time::Duration::days(365),
        )
    }

    /// Loads the CA persisted in `dir` (`ca.key.pem`, `ca.json`), or creates and persists one.
    /// rcgen cannot re-read a certificate, so the CA certificate is re-created from the persisted
    /// key, subject, serial and validity: leaves issued before verify against it, since a
    /// verifier checks the issuer's name and key.
    pub fn load_or_create(
        trust_domain: TrustDomain,
        dir: &std::path::Path,
    ) -> Result<Self, DevCaError> {
        let (key_path, meta_path) = (dir.join("ca.key.pem"), dir.join("ca.json"));
        if key_path.exists() || meta_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path)
                .map_err(|e| DevCaError::Persist(format!("{}: {e}", key_path.display())))?;
            let meta: Persisted = serde_json::from_slice(
                &std::fs::read(&meta_path)
                    .map_err(|e| DevCaError::Persist(format!("{}: {e}", meta_path.display())))?,
            )
            .map_err(|e| DevCaError::Persist(format!("{}: {e}", meta_path.display())))?;
            if meta.trust_domain != trust_domain.as_str() {
                return Err(DevCaError::Persist(format!(
                    "{} holds a CA for {}, not {trust_domain}",
                    dir.display(),
                    meta.trust_domain
                )));
            }
            let key = KeyPair::from_pem(&key_pem)?;
            let at = |t: i64| {
                time::OffsetDateTime::from_unix_timestamp(t)
                    .map_err(|e| DevCaError::Persist(e.to_string()))
            };
            return Self::build(
                trust_domain,
                key,
                SerialNumber::from_slice(&meta.serial),
                at(meta.not_before)?,
                at(meta.not_after)?,
            );
        }
        let ca = Self::new(trust_domain)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| DevCaError::Persist(format!("{}: {e}", dir.display())))?;
        let meta = Persisted {
            trust_domain: ca.trust_domain.to_string(),
            serial: ca.serial.clone(),
            not_before: ca.not_before,
            not_after: ca.not_after,
        };
        let write = |path: &std::path::Path, data: &[u8]| {
            std::fs::write(path, data)
                .map_err(|e| DevCaError::Persist(format!("{}: {e}", path.display())))
        };
        // The key file is created 0600: written first and restricted after, it would be readable
        // by others for a moment (and for ever if the process died in between).
        {
            use std::io::Write as _;
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            let key_err =
                |e: std::io::Error| DevCaError::Persist(format!("{}: {e}", key_path.display()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(key_err)?;
            // An existing file keeps its mode through `open`: restrict it before writing.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(key_err)?;
            f.write_all(ca.key.serialize_pem().as_bytes())
                .map_err(key_err)?;
        }
        write(
            &meta_path,
            &serde_json::to_vec(&meta).map_err(|e| DevCaError::Persist(e.to_string()))?,
        )?;
        Ok(ca)
    }

    fn build(
        trust_domain: TrustDomain,
        key: KeyPair,
        serial: SerialNumber,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Self, DevCaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "eastguard dev CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(trust_domain.id().as_str().try_into()?)];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial.clone());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain,
            cert,
            key,
            serial: serial.to_bytes(),
            not_before: not_before.unix_timestamp(),
            not_after: not_after.unix_timestamp(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn bundle(&self) -> Result<Bundle, DevCaError> {
        Ok(Bundle::from_certs(
            self.trust_domain.clone(),
            vec![self.cert_der()],
        )?)
    }

    /// Mints an SVID for `id`, valid from one minute ago for `ttl`.
    pub fn mint(&self, id: &SpiffeId, ttl: Duration) -> Result<MintedSvid, DevCaError> {
        if id.trust_domain_str() != self.trust_domain.as_str() {
            return Err(DevCaError::WrongTrustDomain(
                id.clone(),
                self.trust_domain.clone(),
            ));
        }
        self.mint_with(id, ttl, |_| {})
    }

    /// Mints a certificate for `id` after letting `edit` change its parameters. Tests use this to
    /// produce deliberately broken SVIDs (two URI SANs, CA=true, expired …); the result is not
    /// checked against the SVID rules.
    pub fn mint_with(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Result<MintedSvid, DevCaError> {
        let (cert_pem, key_pem, chain, key) = self.mint_raw(id, ttl, edit)?;
        let svid = X509Svid::from_der(chain, key)?;
        Ok(MintedSvid {
            svid,
            cert_pem,
            key_pem,
        })
    }

    /// Like [`DevCa::mint_with`] but returns only PEM (cert, key), without the SVID checks.
    pub fn mint_pem_unchecked(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Result<(String, String), DevCaError> {
        let (cert_pem, key_pem, _, _) = self.mint_raw(id, ttl, edit)?;
        Ok((cert_pem, key_pem))
    }

    /// A TLS server certificate for `dns_names` (the control plane's own endpoints), valid for
    /// `ttl`: the chain and its PKCS#8 key.
    pub fn mint_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), DevCaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    fn mint_raw(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Result<RawLeaf, DevCaError> {
        mint_leaf(id, ttl, None, &self.cert, &self.key, edit)
    }

    /// The CA's certificate and key, for [`crate::node_ca`] to sign intermediates with.
    pub(crate) fn signer(&self) -> (&rcgen::Certificate, &KeyPair, i64) {
        (&self.cert, &self.key, self.not_after)
    }
}

/// A leaf as minted: PEM certificate, PEM key, the chain (the leaf alone) and the key.
pub(crate) type RawLeaf = (
    String,
    String,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
);

/// Mints an X509-SVID leaf for `id` signed by `issuer`, valid from one minute ago for `ttl`
/// (ending at `not_after` at the latest), after `edit` changes its parameters.
pub(crate) fn mint_leaf(
    id: &SpiffeId,
    ttl: Duration,
    not_after: Option<time::OffsetDateTime>,
    issuer: &rcgen::Certificate,
    issuer_key: &KeyPair,
    edit: impl FnOnce(&mut CertificateParams),
) -> Result<RawLeaf, DevCaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    // basicConstraints with cA false, in DER: an empty SEQUENCE, marked critical. (rcgen's
    // ExplicitNoCa encodes `cA: FALSE`, a default value, which is not DER and strict parsers
    // refuse; leaving the extension out breaks the X509-SVID rule that it be present.)
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = match not_after {
        Some(limit) => (now + ttl).min(limit),
        None => now + ttl,
    };
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    edit(&mut params);
    if matches!(params.is_ca, IsCa::NoCa) {
        let mut bc = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
        bc.set_criticality(true);
        params.custom_extensions.push(bc);
    }
    let cert = params.signed_by(&key, issuer, issuer_key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((
        cert.pem(),
        key.serialize_pem(),
        vec![cert.der().clone()],
        key_der,
    ))
}

impl X509Authority for DevCa {
    fn trust_domain(&self) -> &TrustDomain {
        DevCa::trust_domain(self)
    }

    fn cert_der(&self) -> CertificateDer<'static> {
        DevCa::cert_der(self)
    }

    fn mint(&self, id: &SpiffeId, ttl: Duration) -> Result<MintedSvid, DevCaError> {
        DevCa::mint(self, id, ttl)
    }
}

pub(crate) fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    // A failing system RNG leaves zeros; serials then only lose uniqueness, not security.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes[0] &= 0x7f; // keep the DER INTEGER positive
    SerialNumber::from_slice(&bytes)
}
