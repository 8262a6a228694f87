//! The verifier's trust rules, with certificates minted by the dev CA at test time.
#![expect(clippy::unwrap_used, reason = "test helpers panic on broken fixtures")]

use std::sync::Arc;
use std::time::Duration;

use eastguard_identity::verifier::{PeerRole, VerifyError, verify_peer_svid};
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
        matches!(err, VerifyError::Chain { ref reason, .. } if reason.contains("Expired")),
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
