//! An in-process inbound sidecar for the Rust tests: `eastguard_proxy::run` with an mTLS inbound
//! listener for host `server` only, a DENY on `/admin`, and the harness app behind it.
#![expect(clippy::unwrap_used, reason = "test fixture setup")]

use std::net::SocketAddr;
use std::time::Duration;

use test_util::app::{Hello, hello};
use test_util::client::{Response, mtls_get};
use test_util::pki::TestPki;
use test_util::{free_port, listening};

pub const SERVER: &str = "spiffe://test.local/ns/t/sa/server";
pub const CLIENT: &str = "spiffe://test.local/ns/t/sa/client";

pub struct Proxy {
    pub pki: TestPki,
    pub app: Hello,
    pub inbound: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: tokio::task::JoinHandle<Result<(), eastguard_proxy::StartError>>,
}

impl Proxy {
    /// An inbound listener for host `server` only, behind a DENY on `/admin`.
    pub async fn start(opts: eastguard_proxy::RunOptions) -> Self {
        let pki = TestPki::new("test.local", "request-path");
        let files = pki.svid_files("server", SERVER);
        let app = hello().await;
        let (admin, inbound) = (free_port(), free_port());
        let yaml = format!(
            r#"
node: {{ id: server, workload: server, namespace: t }}
admin: {{ address: "{admin}" }}
identity: {{ files: {{ cert: "{cert}", key: "{key}", bundle: "{bundle}" }} }}
listeners:
  - name: inbound
    address: "{inbound}"
    direction: INBOUND
    filter_chains:
      - http_connection_manager:
          stat_prefix: inbound
          route_config: {{ virtual_hosts: [ {{ name: server, domains: ["server"], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: app }} }} ] }} ] }}
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
            cert = files.cert.display(),
            key = files.key.display(),
            bundle = files.bundle.display(),
            app = app.addr,
        );
        let config = eastguard_proxy::Bootstrap::from_yaml("request-path.yaml", &yaml).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(eastguard_proxy::run(
            config,
            async move {
                let _ = stopped.await;
            },
            opts,
        ));
        listening(inbound).await;
        Self {
            pki,
            app,
            inbound,
            stop: Some(stop),
            running,
        }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        let creds = self.pki.credentials(CLIENT);
        mtls_get(self.inbound, creds, SERVER, path, headers).await
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), self.running)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
