//! HTTP/1.1 upgrades (WebSocket): the request goes to the upstream on a connection of its own;
//! after `101 Switching Protocols` both sides are joined as a byte stream.

use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::telemetry::CallGuard;
use crate::upstream::{ClusterRt, error_chain};

pub async fn forward(
    mut req: Request<Body>,
    protocol: HeaderValue,
    cluster: &ClusterRt,
    guard: &mut CallGuard,
) -> Result<Response<Body>, ProxyError> {
    let downstream = hyper::upgrade::on(&mut req);
    req.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    req.headers_mut().insert(header::UPGRADE, protocol.clone());
    let mut sent = cluster.send_upgrade(req).await?;
    guard.record.upstream_host = Some(sent.endpoint.to_string());
    guard.record.upstream_peer_uri_san = sent.peer.as_deref().map(Into::into);
    let status = sent.response.status();
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        // Refused upgrade: an ordinary response.
        let (mut parts, incoming) = sent.response.into_parts();
        crate::http::strip_hop_by_hop(&mut parts.headers);
        return Ok(Response::from_parts(parts, body::boxed(incoming)));
    }
    let upstream = hyper::upgrade::on(&mut sent.response);
    // The access-log record of an upgrade is written at the 101; the tunnel is counted in the
    // cluster's stats only.
    tokio::spawn(async move {
        let joined = async {
            let (d, u) = tokio::try_join!(downstream, upstream).map_err(|e| error_chain(&e))?;
            let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
            tokio::io::copy_bidirectional(&mut d, &mut u)
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = joined.await {
            tracing::debug!(error = %e, "upgraded stream ended with an error");
        }
    });
    let mut response = Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, protocol)
        .body(body::empty())
        .map_err(|e| ProxyError::Upgrade(e.to_string()))?;
    for (k, v) in sent.response.headers() {
        if k != header::CONNECTION && k != header::UPGRADE && k != header::TRANSFER_ENCODING {
            response.headers_mut().append(k.clone(), v.clone());
        }
    }
    Ok(response)
}
