//! Opaque TCP proxying (Envoy's tcp_proxy): one upstream stream per downstream connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::ConnCtx;
use crate::telemetry::{Peer, Reporter, Telemetry};
use crate::upstream::ClusterRt;

/// The current RBAC of the chain a connection was accepted on: `None` if the chain is gone,
/// `Some(None)` if it has no RBAC filter.
pub type CurrentRbac = Box<dyn Fn() -> Option<Option<Arc<policy::Engine>>> + Send + Sync>;

/// Re-checks a live connection whenever the listener's chains change (xDS): a policy that no
/// longer admits the caller closes the connection, as a new connection would be refused.
pub struct Recheck {
    pub changes: tokio::sync::watch::Receiver<u64>,
    pub current: CurrentRbac,
}

fn decide(engine: &policy::Engine, ctx: &ConnCtx, cluster: &ClusterRt) -> policy::Decision {
    engine.evaluate(&policy::Request {
        principal: ctx.peer_id.as_deref(),
        direct_remote_ip: Some(ctx.remote.ip()),
        remote_ip: Some(ctx.remote.ip()),
        destination_ip: Some(ctx.local.ip()),
        destination_port: crate::http::destination_port(ctx, cluster),
        sni: ctx.sni.as_deref(),
        ..Default::default()
    })
}

pub async fn proxy<D>(
    mut down: D,
    ctx: &ConnCtx,
    cluster: &ClusterRt,
    rbac: Option<&policy::Engine>,
    telemetry: &Arc<Telemetry>,
    mut recheck: Option<Recheck>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let mut guard = telemetry.start(ctx.reporter, ctx.local_id.clone());
    guard.mtls = ctx.peer_id.is_some();
    guard.peer = match ctx.reporter {
        Reporter::Source => cluster.peer.clone(),
        Reporter::Destination => Peer::default().with_principal(ctx.peer_id.clone()),
    };
    let r = &mut guard.record;
    r.protocol = "tcp";
    r.downstream_remote_address = Some(ctx.remote);
    r.downstream_local_address = Some(ctx.local);
    r.downstream_peer_uri_san = ctx.peer_id.clone();
    r.requested_server_name = ctx.sni.clone();
    r.upstream_cluster = Some(cluster.name.clone());
    guard.destination_service = cluster.service.clone();
    guard.tcp_opened();
    if let Some(engine) = rbac {
        let decision = decide(engine, ctx, cluster);
        guard.record.rbac_policy = decision.policy.clone();
        if !decision.allowed {
            // Envoy's network RBAC: a denied connection is closed, nothing reaches the upstream.
            tracing::debug!(policy = ?decision.policy, "TCP connection denied by RBAC");
            guard.record.response_flags = "RBAC";
            guard.record.rbac_decision = Some("denied");
            guard.completed = true;
            return;
        }
        guard.record.rbac_decision = Some("allowed");
    }
    let (up, endpoint, peer) = match cluster.open_tcp().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(cluster = %cluster.config.name, error = %e, "TCP upstream connect failed");
            guard.fail(&e);
            guard.completed = true;
            return;
        }
    };
    guard.record.upstream_host = Some(endpoint);
    guard.record.upstream_local_address = up.local_addr();
    guard.record.upstream_peer_uri_san = peer.clone();
    if ctx.reporter == Reporter::Source {
        let p = std::mem::take(&mut guard.peer);
        guard.peer = p.with_principal(peer);
    }
    let mut up = up;
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    loop {
        let changed = async {
            match recheck.as_mut() {
                Some(r) => r.changes.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut copy => {
                match result {
                    Ok((sent_up, sent_down)) => {
                        guard.request_bytes.fetch_add(sent_up, Ordering::Relaxed);
                        guard.response_bytes.fetch_add(sent_down, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, "TCP proxy stream ended with an error"),
                }
                break;
            }
            alive = changed => {
                if !alive {
                    recheck = None;
                    continue;
                }
                let Some(r) = recheck.as_ref() else { continue };
                let verdict = match (r.current)() {
                    None => Err(None),
                    Some(None) => Ok(()),
                    Some(Some(engine)) => {
                        let d = decide(&engine, ctx, cluster);
                        if d.allowed { Ok(()) } else { Err(d.policy) }
                    }
                };
                if let Err(policy) = verdict {
                    tracing::info!(?policy, "live TCP connection closed: the new configuration no longer admits it");
                    guard.record.response_flags = "RBAC";
                    guard.record.rbac_decision = Some("denied");
                    guard.record.rbac_policy = policy;
                    break;
                }
            }
        }
    }
    guard.completed = true;
}
