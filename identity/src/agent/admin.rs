//! The agent's CA admin API on loopback, in SPIRE's local-authority terms:
//! `POST /ca/prepare` publishes a new CA in the bundle (not signing yet), `POST /ca/activate` signs
//! with the newest CA, `POST /ca/taint` stops publishing every CA but the signing one.
//! `GET /ca` lists the authorities.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use super::Authorities;
use crate::{DevCa, TrustDomain};

pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    ca: watch::Sender<Arc<Authorities>>,
    td: TrustDomain,
) {
    let ca = Arc::new(ca);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (ca, td) = (ca.clone(), td.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let (ca, td) = (ca.clone(), td.clone());
                    async move { Ok::<_, Infallible>(route(&ca, &td, req.method(), req.uri().path())) }
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn route(
    ca: &watch::Sender<Arc<Authorities>>,
    td: &TrustDomain,
    method: &http::Method,
    path: &str,
) -> http::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        let mut r = http::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        r
    };
    let post = method == http::Method::POST;
    match (path, post) {
        ("/ca", false) => reply(200, describe(&ca.borrow())),
        ("/ca/prepare", true) => match DevCa::new(td.clone()) {
            Ok(new) => {
                ca.send_modify(|a| {
                    let mut published = a.published.clone();
                    published.push(Arc::new(new) as Arc<dyn crate::X509Authority>);
                    *a = Arc::new(Authorities {
                        signing: a.signing.clone(),
                        published,
                    });
                });
                tracing::info!("CA prepared: published in the bundle, not signing yet");
                reply(200, describe(&ca.borrow()))
            }
            Err(e) => reply(500, format!("{e}\n")),
        },
        ("/ca/activate", true) => {
            ca.send_modify(|a| {
                let newest = a
                    .published
                    .last()
                    .cloned()
                    .unwrap_or_else(|| a.signing.clone());
                *a = Arc::new(Authorities {
                    signing: newest,
                    published: a.published.clone(),
                });
            });
            tracing::info!("newest CA activated: new SVIDs are signed by it");
            reply(200, describe(&ca.borrow()))
        }
        ("/ca/taint", true) => {
            ca.send_modify(|a| {
                *a = Arc::new(Authorities {
                    signing: a.signing.clone(),
                    published: vec![a.signing.clone()],
                });
            });
            tracing::info!("older CAs removed from the bundle");
            reply(200, describe(&ca.borrow()))
        }
        ("/ca" | "/ca/prepare" | "/ca/activate" | "/ca/taint", _) => {
            reply(405, "wrong method\n".into())
        }
        _ => reply(404, "not found\n".into()),
    }
}

/// One line per published CA: its SHA-256 fingerprint, and whether it signs.
fn describe(a: &Authorities) -> String {
    a.published
        .iter()
        .map(|c| {
            let fp: String = ring::digest::digest(&ring::digest::SHA256, &c.cert_der())
                .as_ref()
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect();
            let signing = if Arc::ptr_eq(c, &a.signing) {
                " signing"
            } else {
                ""
            };
            format!("{fp}{signing}\n")
        })
        .collect()
}
