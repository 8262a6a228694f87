//! The verifier's trust rules, with certificates minted by the dev CA at test time.
#![expect(clippy::unwrap_used, reason = "test helpers panic on broken fixtures")]

use std::sync::Arc;
use std::time::Duration;

use eastguard_identity::verifier::{
    ChainFailure, PeerRole, VerifyError, to_rustls, verify_peer_svid,
};
use eastguard_identity::{BundleSet, Credentials, DevCa, SpiffeId, TrustDomain};
use rustls_pki_types::{CertificateDer, UnixTime};

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// Credentials trusting both domains, A and B.
fn creds(a: &DevCa, b: &DevCa) -> eastguard_identity::CredentialsRx {
    let own = a
        .mint(
            &id("spiffe://a.test/ns/x/sa/self"),
            Duration::from_secs(600),
        )
        .unwrap();
    let bundles = BundleSet::new([a.bundle().unwrap(), b.bundle().unwrap()]);
    Credentials::new(own.svid, bundles).fixed().1
}

fn leaf_of(pem: &str) -> CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[test]
fn each_domain_is_vouched_for_only_by_its_own_bundle() {
    let a = DevCa::new(td("a.test")).unwrap();
    let b = DevCa::new(td("b.test")).unwrap();
    let rx = creds(&a, &b);
    let now = UnixTime::now();

    let good_b = b
        .mint(
            &id("spiffe://b.test/ns/y/sa/peer"),
            Duration::from_secs(600),
        )
        .unwrap();
    let got = verify_peer_svid(&good_b.svid.chain()[0], &[], &rx, now, PeerRole::Client).unwrap();
    assert_eq!(got.as_str(), "spiffe://b.test/ns/y/sa/peer");

    // A's CA signs a certificate claiming an ID in B: A is trusted, but not for B.
    let (forged, _) = a
        .mint_pem_unchecked(
            &id("spiffe://b.test/ns/y/sa/peer"),
            Duration::from_secs(600),
            |_| {},
        )
        .unwrap();
    let err = verify_peer_svid(&leaf_of(&forged), &[], &rx, now, PeerRole::Client).unwrap_err();
    assert!(
        matches!(err, VerifyError::Chain { ref trust_domain, .. } if trust_domain == "b.test"),
        "{err}"
    );

    // A domain with no bundle at all.
    let c = DevCa::new(td("c.test")).unwrap();
    let (other, _) = c
        .mint_pem_unchecked(&id("spiffe://c.test/w"), Duration::from_secs(600), |_| {})
        .unwrap();
    let err = verify_peer_svid(&leaf_of(&other), &[], &rx, now, PeerRole::Client).unwrap_err();
    assert_eq!(err, VerifyError::UnknownTrustDomain("c.test".into()));
}

#[test]
fn expired_and_rule_breaking_leaves_are_refused() {
    let a = DevCa::new(td("a.test")).unwrap();
    let b = DevCa::new(td("b.test")).unwrap();
    let rx = creds(&a, &b);
    let peer = id("spiffe://a.test/ns/x/sa/peer");

    let minted = a.mint(&peer, Duration::from_secs(60)).unwrap();
    let later = UnixTime::since_unix_epoch(Duration::from_secs(UnixTime::now().as_secs() + 3600));
    let err =
        verify_peer_svid(&minted.svid.chain()[0], &[], &rx, later, PeerRole::Client).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Chain {
                failure: ChainFailure::Expired,
                ..
            }
        ),
        "{err}"
    );

    let (two_sans, _) = a
        .mint_pem_unchecked(&peer, Duration::from_secs(60), |p| {
            p.subject_alt_names
                .push(eastguard_identity::rcgen::SanType::URI(
                    "spiffe://a.test/other".try_into().unwrap(),
                ));
        })
        .unwrap();
    let err = verify_peer_svid(
        &leaf_of(&two_sans),
        &[],
        &rx,
        UnixTime::now(),
        PeerRole::Client,
    )
    .unwrap_err();
    assert_eq!(
        err,
        VerifyError::NotAnSvid(eastguard_identity::SvidError::MultipleUriSans(2))
    );

    let (ca_leaf, _) = a
        .mint_pem_unchecked(&peer, Duration::from_secs(60), |p| {
            p.is_ca = eastguard_identity::rcgen::IsCa::Ca(
                eastguard_identity::rcgen::BasicConstraints::Unconstrained,
            );
        })
        .unwrap();
    let err = verify_peer_svid(
        &leaf_of(&ca_leaf),
        &[],
        &rx,
        UnixTime::now(),
        PeerRole::Client,
    )
    .unwrap_err();
    assert_eq!(
        err,
        VerifyError::NotAnSvid(eastguard_identity::SvidError::LeafIsCa)
    );
}

#[test]
fn no_credentials_refuses_everyone() {
    let a = DevCa::new(td("a.test")).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel::<Option<Arc<Credentials>>>(None);
    let peer = a
        .mint(&id("spiffe://a.test/w"), Duration::from_secs(60))
        .unwrap();
    let err = verify_peer_svid(
        &peer.svid.chain()[0],
        &[],
        &rx,
        UnixTime::now(),
        PeerRole::Client,
    )
    .unwrap_err();
    assert_eq!(err, VerifyError::NoCredentials);
}

#[test]
fn a_persisted_ca_keeps_earlier_svids_valid_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("eastguard-persisted-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = DevCa::load_or_create(td("a.test"), &dir).unwrap();
    let issued = first
        .mint(
            &id("spiffe://a.test/ns/x/sa/peer"),
            Duration::from_secs(600),
        )
        .unwrap();
    drop(first);
    // "Restart": the CA comes back from the directory; the SVID issued before verifies against it.
    let again = DevCa::load_or_create(td("a.test"), &dir).unwrap();
    let b = DevCa::new(td("b.test")).unwrap();
    let rx = creds(&again, &b);
    let got = verify_peer_svid(
        &issued.svid.chain()[0],
        &[],
        &rx,
        UnixTime::now(),
        PeerRole::Client,
    )
    .unwrap();
    assert_eq!(got.as_str(), "spiffe://a.test/ns/x/sa/peer");
    // A fresh CA (another key) does not vouch for it.
    let other = DevCa::new(td("a.test")).unwrap();
    let rx = creds(&other, &b);
    assert!(
        verify_peer_svid(
            &issued.svid.chain()[0],
            &[],
            &rx,
            UnixTime::now(),
            PeerRole::Client
        )
        .is_err()
    );
    // The directory belongs to a.test; another trust domain is refused.
    let err = DevCa::load_or_create(td("c.test"), &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not c.test"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// === handshakes, in memory, with the configs the proxy uses ===

/// Runs a TLS handshake between two rustls connections over in-memory buffers; the first error
/// either side raises.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<Option<String>, rustls::Error> {
    let name = rustls_pki_types::ServerName::try_from("server").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
        }
        let mut back = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut back).unwrap();
        }
        if !back.is_empty() {
            c.read_tls(&mut back.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            let peer = eastguard_identity::tls::peer_spiffe_id(s.peer_certificates());
            return Ok(peer.map(|p| p.to_string()));
        }
    }
    panic!("handshake did not finish");
}

fn own(ca: &DevCa, who: &str) -> eastguard_identity::CredentialsRx {
    let minted = ca.mint(&id(who), Duration::from_secs(600)).unwrap();
    Credentials::new(minted.svid, BundleSet::new([ca.bundle().unwrap()]))
        .fixed()
        .1
}

#[test]
fn mtls_handshake_checks_both_sides() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = DevCa::new(td("a.test")).unwrap();
    let server = || {
        eastguard_identity::tls::server_config(own(&a, "spiffe://a.test/ns/x/sa/server"), &[b"h2"])
            .unwrap()
    };
    let client = |expected: &str| {
        eastguard_identity::tls::client_config(
            own(&a, "spiffe://a.test/ns/x/sa/client"),
            vec![id(expected)].into(),
            &[b"h2"],
        )
        .unwrap()
    };
    // The expected server, and the server learns the client's verified ID.
    assert_eq!(
        handshake(client("spiffe://a.test/ns/x/sa/server"), server()).unwrap(),
        Some("spiffe://a.test/ns/x/sa/client".into())
    );
    // Another server ID than expected: refused by the client, naming both.
    let err = handshake(client("spiffe://a.test/ns/x/sa/other"), server()).unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("UnexpectedId") && text.contains("sa/server"),
        "{text}"
    );
    // A client without a certificate: the server requires one.
    let anonymous = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            eastguard_identity::verifier::SpiffeServerVerifier::new(
                own(&a, "spiffe://a.test/ns/x/sa/client"),
                vec![id("spiffe://a.test/ns/x/sa/server")].into(),
            ),
        ))
        .with_no_client_auth();
    let err = handshake(anonymous, server()).unwrap_err();
    assert_eq!(err, rustls::Error::NoCertificatesPresented, "{err:?}");
}

#[test]
fn refusals_carry_the_certificate_error_that_picks_the_alert() {
    let a = DevCa::new(td("a.test")).unwrap();
    let b = DevCa::new(td("b.test")).unwrap();
    let rx = creds(&a, &b);
    let peer = id("spiffe://a.test/ns/x/sa/peer");
    let minted = a.mint(&peer, Duration::from_secs(60)).unwrap();
    let leaf = &minted.svid.chain()[0];
    let at = |secs_from_now: i64| {
        UnixTime::since_unix_epoch(Duration::from_secs(
            (UnixTime::now().as_secs() as i64 + secs_from_now) as u64,
        ))
    };
    let cert_err = |e: VerifyError| match to_rustls(e) {
        rustls::Error::InvalidCertificate(c) => c,
        other => panic!("{other:?}"),
    };
    let expired = verify_peer_svid(leaf, &[], &rx, at(3600), PeerRole::Client).unwrap_err();
    assert_eq!(cert_err(expired), rustls::CertificateError::Expired);
    let early = verify_peer_svid(leaf, &[], &rx, at(-3 * 86400), PeerRole::Client).unwrap_err();
    assert_eq!(cert_err(early), rustls::CertificateError::NotValidYet);
    // Signed by a CA the a.test bundle does not name: unknown issuer.
    let cross = {
        use eastguard_identity::rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "some other CA");
        ca.distinguished_name = dn;
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name = DistinguishedName::new();
        leaf.subject_alt_names = vec![SanType::URI(peer.as_str().try_into().unwrap())];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.signed_by(&key, &ca_cert, &ca_key)
            .unwrap()
            .der()
            .clone()
    };
    let err = verify_peer_svid(&cross, &[], &rx, UnixTime::now(), PeerRole::Client).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Chain {
                failure: ChainFailure::UnknownIssuer,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cert_err(err), rustls::CertificateError::UnknownIssuer);
    // Signed by another CA with the same name: a bad signature, reported as ours.
    let impostor = DevCa::new(td("a.test")).unwrap();
    let forged = impostor.mint(&peer, Duration::from_secs(60)).unwrap();
    let err = verify_peer_svid(
        &forged.svid.chain()[0],
        &[],
        &rx,
        UnixTime::now(),
        PeerRole::Client,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Chain {
                failure: ChainFailure::Other,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(cert_err(err), rustls::CertificateError::Other(_)));
    // A trust domain with no bundle: unknown issuer too.
    let stranger = DevCa::new(td("c.test")).unwrap();
    let other = stranger
        .mint(&id("spiffe://c.test/ns/x/sa/peer"), Duration::from_secs(60))
        .unwrap();
    let err = verify_peer_svid(
        &other.svid.chain()[0],
        &[],
        &rx,
        UnixTime::now(),
        PeerRole::Client,
    )
    .unwrap_err();
    assert_eq!(cert_err(err), rustls::CertificateError::UnknownIssuer);
}

#[test]
fn an_svid_is_valid_from_not_before_until_just_before_not_after() {
    let a = DevCa::new(td("a.test")).unwrap();
    let minted = a
        .mint(
            &id("spiffe://a.test/ns/x/sa/peer"),
            Duration::from_secs(600),
        )
        .unwrap();
    let leaf = minted.svid.leaf();
    let (from, until) = (leaf.not_before, leaf.not_after);
    let secs = |t: UnixTime, d: i64| {
        UnixTime::since_unix_epoch(Duration::from_secs((t.as_secs() as i64 + d) as u64))
    };
    assert!(minted.svid.is_valid_at(from));
    assert!(minted.svid.is_valid_at(secs(until, -1)));
    assert!(!minted.svid.is_valid_at(secs(from, -1)));
    assert!(!minted.svid.is_valid_at(until));
}

#[test]
fn debug_forms_name_the_value() {
    let t = td("example.org");
    assert_eq!(format!("{t:?}"), "TrustDomain(example.org)");
    let i = id("spiffe://example.org/ns/a/sa/b");
    assert_eq!(format!("{i:?}"), "SpiffeId(spiffe://example.org/ns/a/sa/b)");
    // The trust domain's own ID has an empty path.
    assert_eq!(t.id().as_str(), "spiffe://example.org");
    assert_eq!(t.id().path(), "");
    assert_eq!(t.id().trust_domain(), t);
    let a = DevCa::new(td("a.test")).unwrap();
    let minted = a
        .mint(&id("spiffe://a.test/ns/x/sa/peer"), Duration::from_secs(60))
        .unwrap();
    let debug = format!("{:?}", minted.svid);
    assert!(
        debug.starts_with("X509Svid {") && debug.contains("chain_len: 1"),
        "{debug}"
    );
    assert!(!debug.contains("PRIVATE"), "no key material in Debug");
}
