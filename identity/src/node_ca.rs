//! Per-node intermediate CAs, and the rule they carry: **a node can mint only the identities of
//! pods scheduled on it.**
//!
//! The control plane holds the trust domain's root. A node agent asks it for an intermediate CA
//! (an authenticated CSR call, `control-plane/src/ca.rs`) and names the SPIFFE IDs it needs; the
//! control plane signs only IDs of pods on that node and writes them into the intermediate, in
//! the extension [`PERMITTED_IDS_OID`] (a DER `SEQUENCE OF IA5String`). eastguard's verifier
//! refuses a leaf whose verified chain passes through an intermediate carrying the extension
//! unless the leaf's SPIFFE ID is listed there. X.509 name constraints cannot say this: a URI
//! constraint binds only the host of the name (the trust domain), never its path.
//!
//! The extension is not critical. A verifier that does not know it (Envoy, another mesh) accepts
//! the chain as it accepts any intermediate's and so keeps only the trust-domain guarantee;
//! marked critical, every such verifier (webpki included) would refuse the chain outright.
//! The intermediate's pathLenConstraint is 0, so a node cannot make CAs of its own, and its
//! lifetime bounds how long a node keeps an identity after its last pod with it has gone.

use std::collections::BTreeSet;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::FromDer as _;

use crate::dev_ca::{MintedSvid, X509Authority, mint_leaf, random_serial};
use crate::{DevCa, DevCaError, SpiffeId, TrustDomain, X509Svid};

/// The permitted-identities extension. A private OID made from a random GUID in the arc
/// 1.2.840.113556.1.8000.2554, which exists for GUID-derived OIDs that need no registration.
pub const PERMITTED_IDS_OID: &[u64] = &[
    1, 2, 840, 113556, 1, 8000, 2554, 39537, 11886, 64328, 18257, 48373, 10986937, 9572679,
];
const PERMITTED_IDS_OID_STR: &str =
    "1.2.840.113556.1.8000.2554.39537.11886.64328.18257.48373.10986937.9572679";

/// Identities one node CA may carry (a node runs ~110 pods; each pod has one).
pub const MAX_PERMITTED_IDS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NodeCaError {
    #[error("CSR: {0}")]
    Csr(String),
    #[error("the CSR's key must be ECDSA P-256 and its signature ECDSA with SHA-256")]
    CsrAlgorithm,
    #[error("the CSR's signature does not verify with its own key")]
    CsrSignature,
    #[error("no SPIFFE ID requested")]
    NoIds,
    #[error("{0} SPIFFE IDs requested; a node CA carries at most {MAX_PERMITTED_IDS}")]
    TooManyIds(usize),
    #[error("{0} is not in the trust domain {1}")]
    WrongTrustDomain(SpiffeId, TrustDomain),
    #[error("the node CA certificate: {0}")]
    Intermediate(String),
    #[error(transparent)]
    Ca(#[from] DevCaError),
}

/// The subject of a node's intermediate, on both sides: the control plane issues it, and the
/// agent names it as the issuer of its leaves (rcgen re-encodes it identically).
fn node_ca_dn(node: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "eastguard node CA");
    // ub-common-name is 64 characters; node names may be longer.
    dn.push(
        DnType::CommonName,
        node.chars().take(64).collect::<String>(),
    );
    dn
}

// === the extension ===

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// The extension's value: `SEQUENCE OF IA5String`, one SPIFFE ID each.
pub fn encode_permitted(ids: &BTreeSet<SpiffeId>) -> Vec<u8> {
    let mut body = Vec::new();
    for id in ids {
        body.push(0x16);
        push_len(&mut body, id.as_str().len());
        body.extend_from_slice(id.as_str().as_bytes());
    }
    let mut out = vec![0x30];
    push_len(&mut out, body.len());
    out.extend(body);
    out
}

/// One DER TLV: (tag, content, rest). Definite, minimal lengths only.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let (&tag, rest) = input.split_first().ok_or("truncated")?;
    let (&first, mut rest) = rest.split_first().ok_or("truncated")?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad length".into());
        }
        let (bytes, r) = rest.split_at(n);
        rest = r;
        let len = bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        if bytes[0] == 0 || len < 0x80 {
            return Err("length not in its shortest form".into());
        }
        len
    };
    if rest.len() < len {
        return Err("truncated".into());
    }
    let (content, rest) = rest.split_at(len);
    Ok((tag, content, rest))
}

/// Reads the extension's value; anything but a well-formed list of SPIFFE IDs is an error.
pub fn decode_permitted(der: &[u8]) -> Result<BTreeSet<SpiffeId>, String> {
    let (tag, mut content, rest) = tlv(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return Err("not a single SEQUENCE".into());
    }
    let mut ids = BTreeSet::new();
    while !content.is_empty() {
        let (tag, value, rest) = tlv(content)?;
        content = rest;
        if tag != 0x16 {
            return Err(format!("element with tag {tag:#x}, not IA5String"));
        }
        let s = std::str::from_utf8(value)
            .ok()
            .filter(|s| s.is_ascii())
            .ok_or("an element is not ASCII")?;
        ids.insert(SpiffeId::parse(s).map_err(|e| format!("{s:?}: {e}"))?);
        if ids.len() > MAX_PERMITTED_IDS {
            return Err(format!("more than {MAX_PERMITTED_IDS} IDs"));
        }
    }
    if ids.is_empty() {
        return Err("no ID".into());
    }
    Ok(ids)
}

/// The identities a CA certificate may sign: `None` when it carries no permitted-IDs extension
/// (any ID of its trust domain), an error when the extension is there twice or malformed.
pub fn permitted_ids(cert_der: &[u8]) -> Result<Option<BTreeSet<SpiffeId>>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| e.to_string())?;
    let mut found = None;
    for ext in cert.extensions() {
        if ext.oid.to_id_string() == PERMITTED_IDS_OID_STR {
            if found.is_some() {
                return Err("the permitted-IDs extension appears twice".into());
            }
            found = Some(decode_permitted(ext.value)?);
        }
    }
    Ok(found)
}

// === the agent's key and CSR ===

/// A node agent's new intermediate key, before the control plane has signed it.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    pub fn generate() -> Result<Self, NodeCaError> {
        Ok(Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(DevCaError::from)?,
        })
    }

    /// A PKCS#10 request for the key, in PEM (its subject is ignored: the control plane names
    /// the CA after the node it authenticated).
    pub fn csr_pem(&self) -> Result<String, NodeCaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "eastguard node agent");
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(&self.key)
            .map_err(DevCaError::from)?;
        Ok(csr.pem().map_err(DevCaError::from)?)
    }
}

/// The public key of a CSR whose signature verified: what the control plane signs.
pub struct CsrKey(Vec<u8>);

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Reads a PKCS#10 CSR (PEM) and checks it is signed by its own key (proof of possession).
/// Only ECDSA P-256 with SHA-256 is taken, which is what node agents make.
pub fn parse_csr(pem: &str) -> Result<CsrKey, NodeCaError> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| NodeCaError::Csr(format!("not a PEM certificate request: {e}")))?;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| NodeCaError::Csr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(NodeCaError::Csr("trailing bytes".into()));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let p256 = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|o| o == x509_parser::oid_registry::OID_EC_P256);
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        || !p256
        || csr.signature_algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
    {
        return Err(NodeCaError::CsrAlgorithm);
    }
    let point = spki.subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &point)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| NodeCaError::CsrSignature)?;
    Ok(CsrKey(point))
}

// === the control plane's side ===

impl DevCa {
    /// Signs `csr` as the intermediate CA of `node`, permitted to sign exactly `ids` (all of
    /// this CA's trust domain), valid for `ttl` and never past the root.
    pub fn issue_node_ca(
        &self,
        csr: &CsrKey,
        node: &str,
        ids: &BTreeSet<SpiffeId>,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, NodeCaError> {
        if ids.is_empty() {
            return Err(NodeCaError::NoIds);
        }
        if ids.len() > MAX_PERMITTED_IDS {
            return Err(NodeCaError::TooManyIds(ids.len()));
        }
        if let Some(id) = ids
            .iter()
            .find(|id| id.trust_domain_str() != self.trust_domain().as_str())
        {
            return Err(NodeCaError::WrongTrustDomain(
                id.clone(),
                self.trust_domain().clone(),
            ));
        }
        let (root, root_key, root_not_after) = self.signer();
        let mut params = CertificateParams::default();
        params.distinguished_name = node_ca_dn(node);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            self.trust_domain()
                .id()
                .as_str()
                .try_into()
                .map_err(DevCaError::from)?,
        )];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        let root_end = time::OffsetDateTime::from_unix_timestamp(root_not_after)
            .map_err(|e| NodeCaError::Intermediate(e.to_string()))?;
        params.not_after = (now + ttl).min(root_end);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                PERMITTED_IDS_OID,
                encode_permitted(ids),
            ));
        let cert = params
            .signed_by(csr, root, root_key)
            .map_err(DevCaError::from)?;
        Ok(cert.der().clone())
    }
}

// === the agent's side ===

/// A node's intermediate CA as the agent holds it: signs leaves for the permitted IDs only,
/// chained to the intermediate; publishes the root.
pub struct NodeCa {
    trust_domain: TrustDomain,
    node: String,
    root: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    /// rcgen signs with an issuer `Certificate`; it cannot read one, so this is a stand-in
    /// with the intermediate's subject and key, which is all a leaf takes from its issuer.
    issuer: rcgen::Certificate,
    key: KeyPair,
    permitted: BTreeSet<SpiffeId>,
    not_after: time::OffsetDateTime,
}

impl NodeCa {
    /// Takes the intermediate the control plane issued for `key`, after checking it is for
    /// that key, is a CA carrying the permitted IDs, and that a leaf it signs verifies
    /// against `root`.
    pub fn new(
        trust_domain: TrustDomain,
        node: &str,
        key: NodeKey,
        cert: CertificateDer<'static>,
        root: CertificateDer<'static>,
    ) -> Result<Self, NodeCaError> {
        let bad = |s: String| NodeCaError::Intermediate(s);
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert).map_err(|e| bad(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.key.public_key_raw() {
            return Err(bad("it is not for this node's key".into()));
        }
        let permitted = permitted_ids(&cert)
            .map_err(bad)?
            .ok_or_else(|| bad("it carries no permitted-IDs extension".into()))?;
        let not_after =
            time::OffsetDateTime::from_unix_timestamp(parsed.validity().not_after.timestamp())
                .map_err(|e| bad(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = node_ca_dn(node);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = params.self_signed(&key.key).map_err(DevCaError::from)?;
        let ca = Self {
            trust_domain,
            node: node.to_owned(),
            root,
            cert,
            issuer,
            key: key.key,
            permitted,
            not_after,
        };
        // A leaf it signs must verify as peers will verify it (names, keys, validity).
        let probe = ca
            .permitted
            .iter()
            .next()
            .cloned()
            .ok_or(NodeCaError::NoIds)?;
        let minted = ca.mint(&probe, Duration::from_secs(60))?;
        let anchor = webpki::anchor_from_trusted_cert(&ca.root).map_err(|e| bad(e.to_string()))?;
        let leaf = &minted.svid.chain()[0];
        webpki::EndEntityCert::try_from(leaf)
            .and_then(|ee| {
                ee.verify_for_usage(
                    crate::verifier::algorithms().all,
                    &[anchor],
                    &minted.svid.chain()[1..],
                    UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .map(drop)
            })
            .map_err(|e| {
                bad(format!(
                    "a leaf it signs does not verify against the root: {e:?}"
                ))
            })?;
        Ok(ca)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn permitted(&self) -> &BTreeSet<SpiffeId> {
        &self.permitted
    }

    /// When the intermediate expires (leaves never outlive it).
    pub fn not_after(&self) -> std::time::SystemTime {
        std::time::SystemTime::UNIX_EPOCH
            + Duration::from_secs(self.not_after.unix_timestamp().max(0) as u64)
    }

    pub fn intermediate_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }
}

impl X509Authority for NodeCa {
    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root: what is published in the bundle.
    fn cert_der(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    fn mint(&self, id: &SpiffeId, ttl: Duration) -> Result<MintedSvid, DevCaError> {
        if !self.permitted.contains(id) {
            return Err(DevCaError::NotPermitted(id.clone()));
        }
        // A renewal that never came: sign nothing rather than leaves no peer accepts.
        if time::OffsetDateTime::now_utc() >= self.not_after {
            return Err(DevCaError::Expired);
        }
        let (leaf_pem, key_pem, mut chain, key) = mint_leaf(
            id,
            ttl,
            Some(self.not_after),
            &self.issuer,
            &self.key,
            |_| {},
        )?;
        chain.push(self.cert.clone());
        let svid = X509Svid::from_der(chain, key)?;
        let cert_pem = format!("{leaf_pem}{}", pem_block("CERTIFICATE", &self.cert));
        Ok(MintedSvid {
            svid,
            cert_pem,
            key_pem,
        })
    }
}

/// DER as a PEM block with `label` (`CERTIFICATE`, `CERTIFICATE REQUEST`).
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifier::{PeerRole, VerifyError, verify_peer_svid};
    use crate::{BundleSet, Credentials};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn ids(list: &[&str]) -> BTreeSet<SpiffeId> {
        list.iter().map(|s| id(s)).collect()
    }

    fn root() -> DevCa {
        DevCa::new(TrustDomain::parse("td.test").unwrap()).unwrap()
    }

    /// node-a's CA, permitted to sign shop/web only.
    fn node_a(root: &DevCa) -> NodeCa {
        let key = NodeKey::generate().unwrap();
        let csr = parse_csr(&key.csr_pem().unwrap()).unwrap();
        let cert = root
            .issue_node_ca(
                &csr,
                "node-a",
                &ids(&["spiffe://td.test/ns/shop/sa/web"]),
                Duration::from_secs(3600),
            )
            .unwrap();
        NodeCa::new(
            root.trust_domain().clone(),
            "node-a",
            key,
            cert,
            root.cert_der(),
        )
        .unwrap()
    }

    fn verify(root: &DevCa, chain: &[CertificateDer<'static>]) -> Result<SpiffeId, VerifyError> {
        let own = root
            .mint(
                &id("spiffe://td.test/ns/x/sa/self"),
                Duration::from_secs(600),
            )
            .unwrap();
        let creds = Credentials::new(own.svid, BundleSet::new([root.bundle().unwrap()]))
            .fixed()
            .1;
        verify_peer_svid(
            &chain[0],
            &chain[1..],
            &creds,
            UnixTime::now(),
            PeerRole::Client,
        )
    }

    #[test]
    fn a_node_ca_signs_its_pods_identities_and_they_verify() {
        let root = root();
        let ca = node_a(&root);
        let web = id("spiffe://td.test/ns/shop/sa/web");
        let minted = ca.mint(&web, Duration::from_secs(600)).unwrap();
        assert_eq!(minted.svid.chain().len(), 2);
        assert_eq!(verify(&root, minted.svid.chain()).unwrap(), web);
        // The bundle it publishes is the root.
        assert_eq!(ca.cert_der(), root.cert_der());
        // Leaves never outlive the intermediate.
        let long = ca.mint(&web, Duration::from_secs(86_400)).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&long.svid.chain()[0]).unwrap();
        assert!(leaf.validity().not_after.timestamp() <= ca.not_after.unix_timestamp());
    }

    #[test]
    fn a_node_ca_refuses_to_mint_another_nodes_identity() {
        let root = root();
        let ca = node_a(&root);
        assert!(matches!(
            ca.mint(
                &id("spiffe://td.test/ns/bank/sa/ledger"),
                Duration::from_secs(60)
            ),
            Err(DevCaError::NotPermitted(_))
        ));
    }

    /// A compromised node holds its intermediate's key and signs whatever it likes: verifiers
    /// refuse every ID the intermediate does not list.
    #[test]
    fn a_compromised_node_cannot_mint_an_identity_of_another_node() {
        let root = root();
        let ca = node_a(&root);
        let ledger = id("spiffe://td.test/ns/bank/sa/ledger");
        let (_, _, mut chain, _) = mint_leaf(
            &ledger,
            Duration::from_secs(600),
            None,
            &ca.issuer,
            &ca.key,
            |_| {},
        )
        .unwrap();
        chain.push(ca.cert.clone());
        assert_eq!(
            verify(&root, &chain),
            Err(VerifyError::NotPermittedByIssuer(ledger))
        );
        // Nor can it make a CA of its own below the intermediate (pathLenConstraint 0).
        let sub_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = node_ca_dn("sub");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let sub = p.signed_by(&sub_key, &ca.issuer, &ca.key).unwrap();
        let web = id("spiffe://td.test/ns/shop/sa/web");
        let (_, _, mut chain, _) =
            mint_leaf(&web, Duration::from_secs(600), None, &sub, &sub_key, |_| {}).unwrap();
        chain.push(sub.der().clone());
        chain.push(ca.cert.clone());
        assert!(matches!(
            verify(&root, &chain),
            Err(VerifyError::Chain { .. })
        ));
    }

    fn intermediate_with(root: &DevCa, content: Vec<Vec<u8>>) -> NodeCaWithKey {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = node_ca_dn("node-x");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        for c in content {
            p.custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    PERMITTED_IDS_OID,
                    c,
                ));
        }
        let (r, rk, _) = root.signer();
        let cert = p.signed_by(&key, r, rk).unwrap();
        (cert, key)
    }

    type NodeCaWithKey = (rcgen::Certificate, KeyPair);

    #[test]
    fn a_malformed_or_repeated_extension_refuses_the_chain() {
        let root = root();
        let web = id("spiffe://td.test/ns/shop/sa/web");
        let good = encode_permitted(&ids(&["spiffe://td.test/ns/shop/sa/web"]));
        for content in [
            vec![b"garbage".to_vec()],
            vec![vec![0x30, 0x00]],                   // no ID
            vec![vec![0x30, 0x03, 0x0c, 0x01, b'x']], // UTF8String, not IA5String
            vec![good.clone(), good.clone()],         // twice
        ] {
            let (ca, key) = intermediate_with(&root, content);
            let (_, _, mut chain, _) =
                mint_leaf(&web, Duration::from_secs(600), None, &ca, &key, |_| {}).unwrap();
            chain.push(ca.der().clone());
            assert!(
                matches!(
                    verify(&root, &chain),
                    Err(VerifyError::BadIssuerExtension(_))
                ),
                "{:?}",
                verify(&root, &chain)
            );
        }
        // The same intermediate with one well-formed extension is accepted.
        let (ca, key) = intermediate_with(&root, vec![good]);
        let (_, _, mut chain, _) =
            mint_leaf(&web, Duration::from_secs(600), None, &ca, &key, |_| {}).unwrap();
        chain.push(ca.der().clone());
        assert_eq!(verify(&root, &chain).unwrap(), web);
    }

    #[test]
    fn the_extension_decodes_strictly() {
        let set = ids(&["spiffe://td.test/ns/a/sa/b", "spiffe://td.test/ns/c/sa/d"]);
        assert_eq!(decode_permitted(&encode_permitted(&set)).unwrap(), set);
        // Long enough for a multi-byte length.
        let many: BTreeSet<SpiffeId> = (0..100)
            .map(|i| id(&format!("spiffe://td.test/ns/n{i}/sa/s")))
            .collect();
        assert_eq!(decode_permitted(&encode_permitted(&many)).unwrap(), many);
        let mut trailing = encode_permitted(&set);
        trailing.push(0);
        for bad in [
            &trailing[..],
            &[0x30, 0x81, 0x03, 0x16, 0x01, b'x'][..], // long form for a short length
            &[0x30, 0x80, 0x00, 0x00][..],             // indefinite length
            &[0x30, 0x05, 0x16, 0x01][..],             // truncated
            &[0x30, 0x03, 0x16, 0x01, b'x'][..],       // not a SPIFFE ID
            &[0x31, 0x00][..],                         // a SET
        ] {
            assert!(decode_permitted(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_csr_must_be_signed_by_its_own_p256_key() {
        let key = NodeKey::generate().unwrap();
        let pem = key.csr_pem().unwrap();
        assert!(parse_csr(&pem).is_ok());
        // Flip a bit in the signature (the last bytes of the DER).
        use rustls_pki_types::pem::PemObject as _;
        let mut der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = pem_block("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            parse_csr(&tampered),
            Err(NodeCaError::CsrSignature)
        ));
        // Another curve.
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let other = CertificateParams::default()
            .serialize_request(&p384)
            .unwrap()
            .pem()
            .unwrap();
        assert!(matches!(parse_csr(&other), Err(NodeCaError::CsrAlgorithm)));
        assert!(matches!(parse_csr("nonsense"), Err(NodeCaError::Csr(_))));
    }

    #[test]
    fn the_control_plane_refuses_what_a_node_ca_may_not_carry() {
        let root = root();
        let key = NodeKey::generate().unwrap();
        let csr = parse_csr(&key.csr_pem().unwrap()).unwrap();
        let ttl = Duration::from_secs(60);
        assert!(matches!(
            root.issue_node_ca(&csr, "n", &BTreeSet::new(), ttl),
            Err(NodeCaError::NoIds)
        ));
        assert!(matches!(
            root.issue_node_ca(&csr, "n", &ids(&["spiffe://other.test/ns/a/sa/b"]), ttl),
            Err(NodeCaError::WrongTrustDomain(..))
        ));
        let too_many: BTreeSet<SpiffeId> = (0..=MAX_PERMITTED_IDS)
            .map(|i| id(&format!("spiffe://td.test/ns/n/sa/s{i}")))
            .collect();
        assert!(matches!(
            root.issue_node_ca(&csr, "n", &too_many, ttl),
            Err(NodeCaError::TooManyIds(_))
        ));
    }

    #[test]
    fn an_agent_takes_only_an_intermediate_for_its_own_key() {
        let root = root();
        let theirs = NodeKey::generate().unwrap();
        let csr = parse_csr(&theirs.csr_pem().unwrap()).unwrap();
        let cert = root
            .issue_node_ca(
                &csr,
                "node-a",
                &ids(&["spiffe://td.test/ns/shop/sa/web"]),
                Duration::from_secs(60),
            )
            .unwrap();
        let mine = NodeKey::generate().unwrap();
        assert!(matches!(
            NodeCa::new(
                root.trust_domain().clone(),
                "node-a",
                mine,
                cert,
                root.cert_der()
            ),
            Err(NodeCaError::Intermediate(_))
        ));
    }
}
