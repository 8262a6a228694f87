//! HTTP/1.1 upgrades (WebSocket): the request goes to the upstream on a connection of its own;
//! after `101 Switching Protocols` both sides are joined as a byte stream.
//!
//! A tunnel is still the connection it came from: it keeps the connection's place in the
//! listener's limit, obeys the connection idle timeout, closes when the listeners stop (the end of
//! the drain window), and is re-checked whenever its chain changes: if the new policy no longer
//! admits the request that opened it (or the chain is gone), it is closed, as a new request would
//! be refused.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper_util::rt::TokioIo;

use super::{ConnCtx, PolicyView};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::error::error_chain;
use crate::route::HttpChain;
use crate::telemetry::CallGuard;
use crate::upstream::ClusterRt;

/// The current HTTP chain of the name a connection was accepted on (`None`: removed), and a
/// watch that ticks whenever the listener's chains are replaced.
#[derive(Clone)]
pub struct ChainRecheck {
    pub changes: tokio::sync::watch::Receiver<u64>,
    pub current: Arc<dyn Fn() -> Option<Arc<HttpChain>> + Send + Sync>,
}

/// What a tunnel needs to keep being the connection it came from.
pub struct Tunnel {
    pub ctx: Arc<ConnCtx>,
    /// The chain that admitted the upgrade request.
    pub chain: Arc<HttpChain>,
    pub recheck: ChainRecheck,
    /// The upgrade request as policy read it.
    pub view: PolicyView,
}

pub async fn forward(
    mut req: Request<Body>,
    protocol: HeaderValue,
    cluster: &ClusterRt,
    guard: &mut CallGuard,
    tunnel: Tunnel,
) -> Result<Response<Body>, ProxyError> {
    let downstream = hyper::upgrade::on(&mut req);
    req.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    req.headers_mut().insert(header::UPGRADE, protocol.clone());
    let mut sent = cluster.send_upgrade(req).await?;
    guard.record.upstream_host = Some(sent.endpoint);
    guard.record.upstream_local_address = sent.local;
    guard.record.upstream_peer_uri_san = sent.peer.clone();
    let status = sent.response.status();
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        // Refused upgrade: an ordinary response.
        let (mut parts, incoming) = sent.response.into_parts();
        super::strip_hop_by_hop(&mut parts.headers);
        return Ok(Response::from_parts(parts, body::boxed(incoming)));
    }
    let upstream = hyper::upgrade::on(&mut sent.response);
    // The access-log record of an upgrade is written at the 101; the tunnel is counted in the
    // cluster's stats only.
    tokio::spawn(async move {
        let joined = async {
            let (d, u) = tokio::try_join!(downstream, upstream)
                .map_err(|e| TunnelError::Upgrade(error_chain(&e)))?;
            let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
            let copy = tokio::io::copy_bidirectional(&mut d, &mut u);
            run(copy, tunnel).await
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

/// Why a tunnel ended with an error (logged at debug: the peers saw the close).
#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("copy: {0}")]
    Copy(std::io::Error),
}

/// Why a configuration change closed an open tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Revoked {
    #[error("its filter chain was removed")]
    ChainRemoved,
    #[error("upgrades are no longer allowed on its chain")]
    UpgradesOff,
    #[error("denied by {0}")]
    Denied(String),
}

/// Runs the joined streams until either side ends, the connection idles out, the listeners
/// stop, or a chain change no longer admits the tunnel.
async fn run<F>(copy: F, tunnel: Tunnel) -> Result<(), TunnelError>
where
    F: Future<Output = std::io::Result<(u64, u64)>>,
{
    let Tunnel {
        ctx,
        chain,
        mut recheck,
        view,
    } = tunnel;
    let mut stop = ctx.stop.clone();
    tokio::pin!(copy);
    let mut watching = true;
    loop {
        let changed = async {
            if watching {
                recheck.changes.changed().await.is_ok()
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = &mut copy => return r.map(drop).map_err(TunnelError::Copy),
            () = ctx.activity.idle(ctx.connection_idle_timeout) => {
                tracing::debug!(timeout = ?ctx.connection_idle_timeout, "closing idle upgraded connection");
                return Ok(());
            }
            _ = stop.wait_for(|s| *s) => {
                tracing::debug!("closing upgraded connection: listeners stopped");
                return Ok(());
            }
            alive = changed => {
                if !alive {
                    watching = false;
                    continue;
                }
                if let Err(why) = still_admitted(&chain, (recheck.current)(), &view) {
                    tracing::info!(%why, "upgraded connection closed: the new configuration no longer admits it");
                    return Ok(());
                }
            }
        }
    }
}

/// Whether the chain as it is now still admits the request that opened the tunnel.
fn still_admitted(
    opened_by: &HttpChain,
    now: Option<Arc<HttpChain>>,
    view: &PolicyView,
) -> Result<(), Revoked> {
    let Some(now) = now else {
        return Err(Revoked::ChainRemoved);
    };
    if now.upgrade_types.is_empty() && !opened_by.upgrade_types.is_empty() {
        return Err(Revoked::UpgradesOff);
    }
    match &now.rbac {
        None => Ok(()),
        Some(engine) => {
            let d = view.decide(engine);
            if d.allowed {
                Ok(())
            } else {
                Err(Revoked::Denied(
                    d.policy
                        .as_deref()
                        .unwrap_or("(no ALLOW policy matched)")
                        .to_owned(),
                ))
            }
        }
    }
}
