//! The agent's CA admin API on loopback, in SPIRE's local-authority terms:
//! `POST /ca/prepare` publishes a new CA in the bundle (not signing yet), `POST /ca/activate` signs
//! with the newest CA, `POST /ca/taint` stops publishing every CA but the signing one.
//! `GET /ca` lists the authorities.
//!
//! Every request needs `Authorization: Bearer TOKEN`, the token the agent writes (mode 0600) to
//! the file beside its Workload API socket (`<socket>.admin-token`): loopback alone would let any
//! local process taint the CA. At most [`MAX_PUBLISHED`] CAs are published at once.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use crate::Authorities;
use identity::{DevCa, TrustDomain};

/// CAs published at once (the signing one included): prepare refuses past it.
pub const MAX_PUBLISHED: usize = 3;

/// A random token for the admin API, as hex; `None` if the system has no randomness to give.
pub(super) fn new_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    ca: watch::Sender<Arc<Authorities>>,
    td: TrustDomain,
    token: String,
) {
    let ca = Arc::new(ca);
    let expected: Arc<[u8]> = format!("Bearer {token}").into_bytes().into();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (ca, td, expected) = (ca.clone(), td.clone(), expected.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let (ca, td) = (ca.clone(), td.clone());
                    let authorized = req
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .is_some_and(|v| same(v.as_bytes(), &expected));
                    async move {
                        Ok::<_, Infallible>(if authorized {
                            route(&ca, &td, req.method(), req.uri().path())
                        } else {
                            tracing::warn!(path = %req.uri().path(), "CA admin request without the token refused");
                            unauthorized()
                        })
                    }
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Equal, compared in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized() -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::from_static(
        b"the CA admin API needs Authorization: Bearer <token from <socket>.admin-token>\n",
    )));
    *r.status_mut() = http::StatusCode::UNAUTHORIZED;
    r
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
        ("/ca/prepare", true) if ca.borrow().published.len() >= MAX_PUBLISHED => reply(
            409,
            format!("{MAX_PUBLISHED} CAs are published already: activate and taint first\n"),
        ),
        ("/ca/prepare", true) => match DevCa::new(td.clone()) {
            Ok(new) => {
                ca.send_modify(|a| {
                    let mut published = a.published.clone();
                    published.push(Arc::new(new) as Arc<dyn identity::X509Authority>);
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
