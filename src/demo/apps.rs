//! The demo's sample services: small HTTP apps that report who called them (from the XFCC header
//! their sidecar set) and, for orders, call the next service through their own sidecar.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// The SPIFFE ID in an XFCC `URI=` element.
fn xfcc_uri(xfcc: &str) -> Option<&str> {
    xfcc.split(';').find_map(|kv| kv.strip_prefix("URI="))
}

/// An HTTP app (HTTP/1.1 and HTTP/2) answering JSON. With `upstream`, it calls ledger through that
/// sidecar outbound address first and includes what ledger said.
pub async fn spawn_http(
    name: &'static str,
    addr: SocketAddr,
    upstream: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        let xfcc = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let mut body = serde_json::json!({
                            "service": name,
                            "path": req.uri().path(),
                            "protocol": format!("{:?}", req.version()),
                            "caller": xfcc_uri(&xfcc),
                            "xfcc": xfcc,
                        });
                        // The (deprecated) receipt carries the card it was paid with: the
                        // inventory's classifier flags it, and never keeps it.
                        if req.uri().path().ends_with("/receipt") {
                            body["payment"] = serde_json::json!({"card": "4111 1111 1111 1111", "holder": "J. Doe"});
                        }
                        if let Some(up) = upstream {
                            let (status, text) =
                                super::client::get(up, "ledger", "/ledger/entries", &[], false)
                                    .await
                                    .unwrap_or((0, String::new()));
                            let v: serde_json::Value =
                                serde_json::from_str(&text).unwrap_or_default();
                            body["upstream"] =
                                serde_json::json!({ "status": status, "caller": v["caller"] });
                        }
                        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// An opaque TCP service: answers `ledger-tcp:` followed by what it read.
pub async fn spawn_tcp_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut reply = b"ledger-tcp:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    if tcp.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}
