//! Corpora nobody here wrote (`../shared/conformance/`): SPIFFE ID verdicts, go-spiffe SVID and bundle
//! vectors. Read from the shared folder, never copied into the repo.

use std::path::PathBuf;

use eastguard_identity::{
    Bundle, BundleError, SpiffeId, SvidError, TrustDomain, X509Svid, check_chain,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// The shared corpus folder; a test that needs it fails when it is absent (these tests are
/// `#[ignore]`d, so a plain `cargo test` lists them as ignored; the test command runs them).
fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("EASTGUARD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
        .join("conformance");
    if dir.is_dir() {
        return Some(dir);
    }
    panic!(
        "conformance corpus missing at {} (put shared/ beside the repo or set EASTGUARD_SHARED)",
        dir.display()
    );
}

#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn spiffe_ids_json_verdicts() {
    let Some(dir) = corpus() else { return };
    let data: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("spiffe-ids.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in data["spiffe_ids"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let valid = case["valid"].as_bool().unwrap();
        let rule = case["rule"].as_str().unwrap();
        match SpiffeId::parse(id) {
            Ok(parsed) => {
                assert!(valid, "accepted invalid ID {id:?} ({rule})");
                assert_eq!(
                    parsed.trust_domain_str(),
                    case["trust_domain"].as_str().unwrap()
                );
                assert_eq!(parsed.path(), case["path"].as_str().unwrap());
                assert_eq!(parsed.as_str(), id);
            }
            Err(e) => assert!(!valid, "rejected valid ID {id:?} ({rule}): {e}"),
        }
        checked += 1;
    }
    for case in data["trust_domains"].as_array().unwrap() {
        let td = case["trust_domain"].as_str().unwrap();
        let valid = case["valid"].as_bool().unwrap();
        let got = TrustDomain::parse(td);
        assert_eq!(
            got.is_ok(),
            valid,
            "trust domain {td:?} ({}): {got:?}",
            case["rule"]
        );
        checked += 1;
    }
    println!("spiffe-ids.json: {checked} cases agree");
    assert!(checked > 500);
}

fn svid_dir(dir: &std::path::Path) -> PathBuf {
    dir.join("spiffe-vectors/svid/x509svid/testdata")
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn go_spiffe_svid_vectors() {
    let Some(dir) = corpus() else { return };
    let td = svid_dir(&dir);
    let read = |name: &str| std::fs::read(td.join(name)).unwrap();

    // Good SVIDs: certificate and key in one file, in either order.
    for name in ["good-cert-and-key.pem", "good-key-and-cert.pem"] {
        let pem = read(name);
        let svid = X509Svid::from_pem(&pem, &pem).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            svid.spiffe_id().as_str(),
            "spiffe://example.org/workload-1",
            "{name}"
        );
    }
    // Good chains: the structural rules hold, the key go-spiffe pairs each with matches (the
    // leaf-only SVID has an RSA key, the leaf+intermediate one an ECDSA key), and the other does not.
    for (name, key, other) in [
        (
            "good-leaf-only.pem",
            "key-pkcs8-rsa.pem",
            "key-pkcs8-ecdsa.pem",
        ),
        (
            "good-leaf-and-intermediate.pem",
            "key-pkcs8-ecdsa.pem",
            "key-pkcs8-rsa.pem",
        ),
    ] {
        let certs = read_certs(&td.join(name)).unwrap();
        let leaf = check_chain(&certs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(leaf.spiffe_id.trust_domain_str(), "example.org", "{name}");
        X509Svid::from_pem(&read(name), &read(key)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            X509Svid::from_pem(&read(name), &read(other)).unwrap_err(),
            SvidError::KeyMismatch,
            "{name} + {other}"
        );
    }
    // Each wrong-* breaks exactly one rule, and the error names it.
    let wrong = [
        ("wrong-leaf-ca-true.pem", SvidError::LeafIsCa),
        ("wrong-leaf-cert-sign.pem", SvidError::LeafKeyCertSign),
        ("wrong-leaf-crl-sign.pem", SvidError::LeafCrlSign),
        ("wrong-leaf-empty-id.pem", SvidError::NoUriSan),
        (
            "wrong-leaf-no-digital-signature.pem",
            SvidError::LeafNoDigitalSignature,
        ),
        (
            "wrong-intermediate-no-ca.pem",
            SvidError::IntermediateNotCa { index: 1 },
        ),
        (
            "wrong-intermediate-no-key-cert-sign.pem",
            SvidError::IntermediateNoKeyCertSign { index: 1 },
        ),
    ];
    for (name, expected) in &wrong {
        let certs = read_certs(&td.join(name)).unwrap();
        assert_eq!(check_chain(&certs).unwrap_err(), *expected, "{name}");
    }
    // Unparseable input.
    let key = read("key-pkcs8-ecdsa.pem");
    assert!(X509Svid::from_pem(&read("corrupt-cert.pem"), &key).is_err());
    assert_eq!(
        X509Svid::from_pem(&read("not-pem"), &key).unwrap_err(),
        SvidError::NoCertificates
    );
    let good = read("good-leaf-only.pem");
    assert!(X509Svid::from_pem(&good, &read("corrupt-key.pem")).is_err());
    assert_eq!(
        X509Svid::from_pem(&good, b"").unwrap_err(),
        SvidError::NoPrivateKey
    );
    println!("go-spiffe x509svid: {} vectors agree", 4 + wrong.len() + 4);
}

#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn go_spiffe_bundle_vectors() {
    let Some(dir) = corpus() else { return };
    let td = TrustDomain::parse("example.org").unwrap();
    let pem = dir.join("spiffe-vectors/bundle/x509bundle/testdata");
    let read = |name: &str| std::fs::read(pem.join(name)).unwrap();
    assert_eq!(
        Bundle::from_pem(td.clone(), &read("cert.pem"))
            .unwrap()
            .certs()
            .len(),
        1
    );
    assert_eq!(
        Bundle::from_pem(td.clone(), &read("certs.pem"))
            .unwrap()
            .certs()
            .len(),
        2
    );
    assert!(Bundle::from_pem(td.clone(), &read("corrupted.pem")).is_err());
    for name in ["empty.pem", "not-pem.pem", "key.pem"] {
        assert_eq!(
            Bundle::from_pem(td.clone(), &read(name)).unwrap_err(),
            BundleError::NoCertificates,
            "{name}"
        );
    }

    let json = dir.join("spiffe-vectors/bundle/spiffebundle/testdata");
    let read = |name: &str| std::fs::read(json.join(name)).unwrap();
    let b = Bundle::from_spiffe_json(td.clone(), &read("spiffebundle_valid_1.json")).unwrap();
    assert_eq!((b.certs().len(), b.jwt_key_ids().count()), (1, 1));
    let b = Bundle::from_spiffe_json(td.clone(), &read("spiffebundle_valid_2.json")).unwrap();
    assert_eq!((b.certs().len(), b.jwt_key_ids().count()), (1, 6));
    assert_eq!((b.refresh_hint(), b.sequence()), (Some(60), Some(1)));
    let b =
        Bundle::from_spiffe_json(td.clone(), &read("spiffebundle_valid_with_wit.json")).unwrap();
    assert_eq!((b.certs().len(), b.jwt_key_ids().count()), (1, 2));
    let b = Bundle::from_spiffe_json(td.clone(), &read("spiffebundle_no_keys.json")).unwrap();
    assert_eq!((b.certs().len(), b.jwt_key_ids().count()), (0, 0));
    assert_eq!(
        Bundle::from_spiffe_json(td.clone(), &read("spiffebundle_missing_kid.json")).unwrap_err(),
        BundleError::MissingKeyId { index: 1 }
    );
    assert_eq!(
        Bundle::from_spiffe_json(td, &read("spiffebundle_multiple_x509.json")).unwrap_err(),
        BundleError::X5cCount { index: 0, count: 2 }
    );
}
