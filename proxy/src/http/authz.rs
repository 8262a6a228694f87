//! The connection manager's RBAC filters on one request, and the owned view a tunnel keeps to be
//! re-checked when policy changes.

use std::sync::Arc;

use http::Request;
use http::header;

use super::{ConnCtx, destination_port};
use crate::body::Body;
use crate::error::ProxyError;
use crate::route::HttpChain;
use crate::telemetry::CallGuard;
use crate::upstream::ClusterRt;

/// A request as routing left it, for policy: the connection it came on, its one normalized
/// path and authority (DESIGN §7), and the cluster it is routed to (its port is Istio's
/// `destination.port`), if any.
pub(super) struct RequestView<'a> {
    pub ctx: &'a ConnCtx,
    pub req: &'a Request<Body>,
    pub authority: &'a str,
    pub normalized: &'a policy::path::NormalizedPath,
    pub cluster: Option<&'a ClusterRt>,
}

impl RequestView<'_> {
    fn destination_port(&self) -> u16 {
        self.cluster
            .map_or(self.ctx.local.port(), |c| destination_port(self.ctx, c))
    }
}

/// Runs the connection manager's RBAC filters; a denial is a 403 (`RBAC: access denied`).
pub(super) fn authorize(
    engine: &policy::Engine,
    chain: &HttpChain,
    guard: &mut CallGuard,
    hook: Option<&crate::AuthzHook>,
    view: &RequestView<'_>,
) -> Result<(), ProxyError> {
    let RequestView {
        ctx,
        req,
        authority,
        normalized,
        ..
    } = *view;
    let full_path = normalized.path_and_query();
    let without_params = normalized.without_params();
    let headers = policy_headers(req, authority, &full_path);
    let decision = engine.evaluate(&policy::Request {
        principal: ctx.peer_id.as_deref(),
        path: &normalized.path,
        path_without_params: without_params.as_deref(),
        lenient_paths: &[],
        headers: &headers,
        direct_remote_ip: Some(ctx.remote.ip()),
        remote_ip: Some(ctx.remote.ip()),
        destination_ip: Some(ctx.local.ip()),
        destination_port: view.destination_port(),
        sni: ctx.sni.as_deref(),
        metadata: None,
    });
    if let Some((shadow_allowed, shadow_policy)) = &decision.shadow {
        let stat = if *shadow_allowed {
            &chain.stats.rbac_shadow_allowed
        } else {
            &chain.stats.rbac_shadow_denied
        };
        stat.inc();
        guard.record.rbac_shadow_decision =
            Some(if *shadow_allowed { "allowed" } else { "denied" });
        guard.record.rbac_shadow_policy = shadow_policy.clone();
    }
    guard.record.rbac_policy = decision.policy.clone();
    if let Some(hook) = hook {
        hook(&crate::AuthzEvent {
            allowed: decision.allowed,
            policy: decision.policy.as_deref().map(Into::into),
            principal: ctx.peer_id.as_deref().map(Into::into),
            method: req.method().as_str().to_owned(),
            path: normalized.path.clone(),
            authority: authority.to_owned(),
            dry_run: decision
                .shadow
                .as_ref()
                .map(|(a, p)| (*a, p.as_deref().map(Into::into))),
        });
    }
    if decision.allowed {
        chain.stats.rbac_allowed.inc();
        guard.record.rbac_decision = Some("allowed");
        return Ok(());
    }
    chain.stats.rbac_denied.inc();
    guard.record.rbac_decision = Some("denied");
    Err(ProxyError::RbacDenied {
        policy: decision.policy.as_deref().map(Into::into),
    })
}

/// The headers policy reads: the pseudo-headers, then the request's own (`Host` is `:authority`).
fn policy_headers<'a>(
    req: &'a Request<Body>,
    authority: &'a str,
    full_path: &'a str,
) -> Vec<(&'a str, &'a [u8])> {
    let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(req.headers().len() + 4);
    headers.push((":authority", authority.as_bytes()));
    headers.push((":method", req.method().as_str().as_bytes()));
    headers.push((":path", full_path.as_bytes()));
    headers.push((":scheme", b"http"));
    headers.extend(
        req.headers()
            .iter()
            .filter(|(k, _)| **k != header::HOST)
            .map(|(k, v)| (k.as_str(), v.as_bytes())),
    );
    headers
}

/// A request as policy read it, owned: a tunnel keeps it to be re-checked when policy changes.
#[derive(Debug)]
pub(crate) struct PolicyView {
    principal: Option<Arc<str>>,
    path: String,
    path_without_params: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    remote: std::net::IpAddr,
    local: std::net::IpAddr,
    destination_port: u16,
    sni: Option<std::sync::Arc<str>>,
}

impl PolicyView {
    /// The owned copy of what policy read.
    pub(super) fn of(view: &RequestView<'_>) -> Self {
        let full_path = view.normalized.path_and_query();
        Self {
            principal: view.ctx.peer_id.clone(),
            path: view.normalized.path.clone(),
            path_without_params: view.normalized.without_params(),
            headers: policy_headers(view.req, view.authority, &full_path)
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                .collect(),
            remote: view.ctx.remote.ip(),
            local: view.ctx.local.ip(),
            destination_port: view.destination_port(),
            sni: view.ctx.sni.clone(),
        }
    }

    pub(crate) fn decide(&self, engine: &policy::Engine) -> policy::Decision {
        let headers: Vec<(&str, &[u8])> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        engine.evaluate(&policy::Request {
            principal: self.principal.as_deref(),
            path: &self.path,
            path_without_params: self.path_without_params.as_deref(),
            lenient_paths: &[],
            headers: &headers,
            direct_remote_ip: Some(self.remote),
            remote_ip: Some(self.remote),
            destination_ip: Some(self.local),
            destination_port: self.destination_port,
            sni: self.sni.as_deref(),
            metadata: None,
        })
    }
}
