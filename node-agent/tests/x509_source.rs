//! The `spiffe` crate's `X509Source` (an independent Rust Workload API client) against
//! eastguard's node agent, in-process, on a real unix socket.

use std::time::Duration;

use eastguard_node_agent::{AgentConfig, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_x509_source_gets_svid_and_bundle() {
    let dir = std::env::temp_dir().join(format!("eastguard-x509source-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let entries = dir.join("entries.yaml");
    std::fs::write(
        &entries,
        format!(
            "trust_domain: cluster.local\nentries:\n  - spiffe_id: spiffe://cluster.local/ns/test/sa/rust\n    selectors: [\"unix:uid:{uid}\"]\n"
        ),
    )
    .unwrap();
    let socket = dir.join("agent.sock");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run(
        AgentConfig {
            socket: socket.clone(),
            entries,
            poll: Duration::from_millis(200),
            admin: None,
            ca_dir: None,
            kubelet: None,
            ca: None,
            pods: None,
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let source = tokio::time::timeout(
        Duration::from_secs(10),
        spiffe::X509Source::builder()
            .endpoint(format!("unix:{}", socket.display()))
            .build(),
    )
    .await
    .unwrap()
    .unwrap();
    let svid = source.svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://cluster.local/ns/test/sa/rust"
    );
    let bundles = source.bundle_set().unwrap();
    let td = spiffe::TrustDomain::new("cluster.local").unwrap();
    let bundle = bundles.get(&td).unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    // The leaf chains to the published authority (our own verifier, per trust domain).
    let leaf = rustls_pki_types::CertificateDer::from(svid.cert_chain()[0].as_ref().to_vec());
    identity::check_leaf(&leaf).unwrap();

    source.shutdown().await;
    stop_tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
