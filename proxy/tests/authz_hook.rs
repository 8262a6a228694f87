//! The authorization decision hook, end to end: a proxy running in-process with real mTLS and an
//! RBAC filter reports every decision (allowed and denied) with the verified caller and policy.
#![expect(clippy::unwrap_used, reason = "test fixture setup")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use identity::{DevCa, SpiffeId, TrustDomain};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

async fn get(inbound: SocketAddr, creds: identity::CredentialsRx, path: &str) -> String {
    let server_id: Arc<[SpiffeId]> =
        vec![SpiffeId::parse("spiffe://test.local/ns/t/sa/server").unwrap()].into();
    let config = identity::tls::client_config(creds, server_id, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("server").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_reach_the_hook() {
    let dir = std::env::temp_dir().join(format!("eastguard-hook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = DevCa::new(TrustDomain::parse("test.local").unwrap()).unwrap();
    let server = ca
        .mint(
            &SpiffeId::parse("spiffe://test.local/ns/t/sa/server").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let client = ca
        .mint(
            &SpiffeId::parse("spiffe://test.local/ns/t/sa/client").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
    std::fs::write(dir.join("bundle.pem"), ca.cert_pem()).unwrap();

    let app = upstream().await;
    let (admin, inbound) = (free_port(), free_port());
    let yaml = format!(
        r#"
node: {{ id: server, workload: server, namespace: t }}
admin: {{ address: "{admin}" }}
identity: {{ files: {{ cert: "{d}/server.pem", key: "{d}/server.key", bundle: "{d}/bundle.pem" }} }}
listeners:
  - name: inbound
    address: "{inbound}"
    direction: INBOUND
    filter_chains:
      - http_connection_manager:
          stat_prefix: inbound
          route_config: {{ virtual_hosts: [ {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: app }} }} ] }} ] }}
          http_filters:
            - name: envoy.filters.http.rbac
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
                rules:
                  action: DENY
                  policies:
                    deny-admin:
                      permissions: [ {{ url_path: {{ path: {{ prefix: /admin }} }} }} ]
                      principals: [ {{ any: true }} ]
clusters:
  - name: app
    endpoints: ["{app}"]
"#,
        d = dir.display()
    );
    let config = eastguard_proxy::Bootstrap::from_yaml("hook.yaml", &yaml).unwrap();
    let events: Arc<Mutex<Vec<eastguard_proxy::AuthzEvent>>> = Arc::default();
    let seen = events.clone();
    let opts = eastguard_proxy::RunOptions {
        authz_hook: Some(Arc::new(move |e: &eastguard_proxy::AuthzEvent| {
            seen.lock().unwrap().push(e.clone())
        })),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(eastguard_proxy::run(
        config,
        async move {
            let _ = stop_rx.await;
        },
        opts,
    ));
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(inbound).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client_creds = identity::Credentials::new(
        client.svid,
        identity::BundleSet::new([ca.bundle().unwrap()]),
    )
    .fixed()
    .1;
    let denied = get(inbound, client_creds.clone(), "/x/../admin/keys").await;
    assert!(
        denied.starts_with("HTTP/1.1 403") && denied.ends_with("RBAC: access denied"),
        "{denied}"
    );
    let allowed = get(inbound, client_creds, "/orders").await;
    assert!(
        allowed.starts_with("HTTP/1.1 200") && allowed.ends_with("ok"),
        "{allowed}"
    );

    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(!events[0].allowed);
    assert_eq!(events[0].policy.as_deref(), Some("deny-admin"));
    assert_eq!(events[0].path, "/admin/keys");
    assert_eq!(
        events[0].principal.as_deref(),
        Some("spiffe://test.local/ns/t/sa/client")
    );
    assert!(events[1].allowed && events[1].path == "/orders" && events[1].method == "GET");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
