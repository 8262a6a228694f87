//! A peer sidecar that refuses a request it never processed (a GOAWAY whose last stream is below
//! the request's, or REFUSED_STREAM) must not cost the caller a 503: the outbound sidecar sends
//! the request once more on a fresh connection. A request the peer reset for any other reason may
//! have been processed, so it is not sent again.
//!
//! The refusing peer is a scripted HTTP/2 endpoint behind real mTLS: it reads the client's frames
//! and, on the first HEADERS, answers with the frame under test. Every later connection is served
//! by hyper.
#![expect(clippy::unwrap_used, reason = "test setup")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use test_util::client::{Response, get};
use test_util::pki::TestPki;
use test_util::{free_port, listening};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SERVER: &str = "spiffe://test.local/ns/t/sa/server";
const CLIENT: &str = "spiffe://test.local/ns/t/sa/client";

/// What the scripted peer sends when the first request's HEADERS arrive.
#[derive(Clone, Copy)]
enum Refusal {
    /// GOAWAY with last stream 0: stream 1 was never processed.
    GoAway,
    /// RST_STREAM on stream 1 with this error code.
    Reset(u32),
}

const REFUSED_STREAM: u32 = 0x7;
const INTERNAL_ERROR: u32 = 0x2;

struct Peer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Requests hyper served on the connections after the first.
    served: Arc<AtomicUsize>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The first connection refuses as told; the rest are served by hyper with 200 "second".
async fn refusing_peer(pki: &TestPki, refusal: Refusal) -> Peer {
    let tls = identity::tls::server_config(pki.credentials(SERVER), &[b"h2"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let (conns, srv) = (connections.clone(), served.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            if conns.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::spawn(refuse_first_request(tls, refusal));
                continue;
            }
            let srv = srv.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    srv.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(hyper::body::Bytes::from_static(b"second")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Peer {
        addr,
        connections,
        served,
    }
}

async fn refuse_first_request<S>(mut s: S, refusal: Refusal)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    s.write_all(&frame(0x4, 0, 0, &[])).await.unwrap(); // our SETTINGS
    loop {
        let mut head = [0u8; 9];
        if s.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        match head[3] {
            // The client's SETTINGS: acknowledged.
            0x4 if head[4] & 0x1 == 0 => s.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
            0x1 => {
                let reply = match refusal {
                    Refusal::GoAway => frame(0x7, 0, 0, &[0; 8]),
                    Refusal::Reset(code) => frame(0x3, 0, 1, &code.to_be_bytes()),
                };
                s.write_all(&reply).await.unwrap();
                // Keep the connection open a moment, as a draining peer does.
                let mut rest = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
                return;
            }
            _ => {}
        }
    }
}

struct Outbound {
    addr: SocketAddr,
    admin: SocketAddr,
}

async fn outbound_to(pki: &TestPki, peer: SocketAddr) -> Outbound {
    let files = pki.svid_files("client", CLIENT);
    let (admin, addr) = (free_port(), free_port());
    let yaml = format!(
        r#"
node: {{ id: client, workload: client, namespace: t }}
admin: {{ address: "{admin}" }}
identity: {{ files: {{ cert: "{cert}", key: "{key}", bundle: "{bundle}" }} }}
listeners:
  - name: outbound
    address: "{addr}"
    direction: OUTBOUND
    filter_chains:
      - http_connection_manager:
          stat_prefix: outbound
          route_config: {{ virtual_hosts: [ {{ name: server, domains: ["server"], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: peer }} }} ] }} ] }}
clusters:
  - name: peer
    endpoints: ["{peer}"]
    transport_socket: {{ sni: server, match_spiffe_ids: ["{SERVER}"] }}
"#,
        cert = files.cert.display(),
        key = files.key.display(),
        bundle = files.bundle.display(),
    );
    let config = eastguard_proxy::Bootstrap::from_yaml("upstream-refusal.yaml", &yaml).unwrap();
    tokio::spawn(eastguard_proxy::run(
        config,
        std::future::pending(),
        Default::default(),
    ));
    listening(addr).await;
    Outbound { addr, admin }
}

async fn stat(admin: SocketAddr, name: &str) -> u64 {
    let r = get(admin, "/stats", &[]).await;
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /stats"))
}

async fn call(refusal: Refusal) -> (Response, Peer, u64) {
    let pki = TestPki::new("test.local", "upstream-refusal");
    let peer = refusing_peer(&pki, refusal).await;
    let out = outbound_to(&pki, peer.addr).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        get(out.addr, "/orders/1", &[("host", "server")]),
    )
    .await
    .unwrap();
    let retries = stat(out.admin, "cluster.peer.upstream_rq_retry").await;
    (r, peer, retries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_goaway_is_sent_again_on_a_new_connection() {
    let (r, peer, retries) = call(Refusal::GoAway).await;
    assert_eq!((r.status, r.body.as_str()), (200, "second"), "{r:?}");
    assert_eq!(peer.connections.load(Ordering::SeqCst), 2);
    assert_eq!(peer.served.load(Ordering::SeqCst), 1);
    assert_eq!(retries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_with_refused_stream_is_sent_again() {
    let (r, peer, retries) = call(Refusal::Reset(REFUSED_STREAM)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "second"), "{r:?}");
    assert_eq!(peer.served.load(Ordering::SeqCst), 1);
    assert_eq!(retries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_reset_for_another_reason_is_not_sent_again() {
    // INTERNAL_ERROR: the peer may have acted on it, so the caller gets Envoy's reset reply.
    let (r, peer, retries) = call(Refusal::Reset(INTERNAL_ERROR)).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body
            .starts_with("upstream connect error or disconnect/reset before headers"),
        "{r:?}"
    );
    assert_eq!(peer.served.load(Ordering::SeqCst), 0);
    assert_eq!(retries, 0);
}
