//! The HTTP request path, one straight line per request: check the request, strip what a client
//! must not set, route, forward to the cluster, and return the response with its telemetry guard.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::Clusters;
use crate::body::{self, Body, Counting};
use crate::config::ForwardClientCertDetails;
use crate::error::{ProxyError, local_reply};
use crate::idle::StreamIdleTimeout;
use crate::route::HttpChain;
use crate::telemetry::{CallGuard, Guarded, Peer, Reporter, Telemetry};
use crate::upstream::ClusterRt;

mod authz;
mod headers;
pub(crate) mod upgrade;

pub use headers::strip_hop_by_hop;

use authz::{PolicyView, RequestView};
use headers::{REQUEST_ID, XFCC, ensure_request_id, strip_request_headers, tokens, xfcc_value};

/// Set by an outbound sidecar for its peer's metrics (Istio's metadata exchange, reduced).
static SOURCE_WORKLOAD: HeaderName = HeaderName::from_static("x-eastguard-source-workload");
static SOURCE_APP: HeaderName = HeaderName::from_static("x-eastguard-source-app");

/// What a connection knows about itself; shared by the requests on it.
#[derive(Debug)]
pub struct ConnCtx {
    pub reporter: Reporter,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// Verified SPIFFE ID of the downstream peer (inbound mTLS).
    pub peer_id: Option<Arc<str>>,
    /// SHA-256 of the peer's leaf certificate, hex, for XFCC `Hash=`.
    pub peer_cert_hash: Option<String>,
    pub sni: Option<Arc<str>>,
    /// This proxy's own SPIFFE ID (XFCC `By=`), and workload (for peers' metrics).
    pub local_id: Arc<str>,
    pub local_workload: Option<HeaderValue>,
    pub local_app: Option<HeaderValue>,
    /// Draining: HTTP/1.x responses get `Connection: close` so clients reconnect elsewhere.
    pub drain: crate::drain::Watch,
    /// Flips when the listeners stop (the end of the drain window): tunnels close then.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// The process-wide connection count: near the limit, keep-alive is shed.
    pub overload: crate::conn_slot::Overload,
    /// The connection's place in its listener's limit, kept by a tunnel it becomes.
    #[expect(dead_code, reason = "held for its Drop, which frees the slot")]
    pub slot: Arc<crate::conn_slot::ConnSlot>,
    /// Bytes and requests in flight, for the connection idle timeout.
    pub activity: std::sync::Arc<crate::idle::Activity>,
    /// Streams the client reset early (HTTP/2): too many close the connection.
    pub resets: Arc<crate::idle::StreamResets>,
    pub stream_idle_timeout: std::time::Duration,
    /// Envoy's connection idle timeout (zero: none); tunnels obey it too.
    pub connection_idle_timeout: std::time::Duration,
    /// The XFCC value for this connection's verified peer, written once when first needed.
    pub xfcc: std::sync::OnceLock<Option<HeaderValue>>,
}

/// Serves one request. Never fails: every error becomes a local reply.
pub async fn handle(
    ctx: Arc<ConnCtx>,
    chain: Option<Arc<HttpChain>>,
    clusters: Clusters,
    telemetry: Arc<Telemetry>,
    hook: Option<crate::AuthzHook>,
    recheck: upgrade::ChainRecheck,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let mut guard = telemetry.start(ctx.reporter, ctx.local_id.clone());
    guard.inflight = Some(crate::idle::InFlight::new(&ctx.activity));
    guard.stream_resets = Some(ctx.resets.clone());
    describe_request(&mut guard, &ctx, &req);
    if guard.api.is_some()
        && let Some(sensitive) = &telemetry.sensitive
        && sensitive.sample()
    {
        guard.sample = Some(Box::new(crate::sampling::SampleCopy::of_request(
            &req,
            sensitive.body_bytes,
        )));
    }
    let tee = guard.sample.as_ref().map(|s| s.request.clone());
    let (parts, incoming) = req.into_parts();
    let counted = StreamIdleTimeout::wrap(
        Counting::boxed_tee(incoming, guard.request_bytes.clone(), tee),
        ctx.stream_idle_timeout,
    );
    let req = Request::from_parts(parts, counted);
    if let Some(chain) = chain.as_ref().filter(|c| !c.access_logs.is_empty()) {
        guard.chain_logs = Some(chain.access_logs.clone());
    }
    let forwarded = match &chain {
        Some(chain) => {
            let cx = Forwarding {
                ctx: &ctx,
                chain,
                clusters: &clusters,
                hook: hook.as_ref(),
                recheck,
            };
            forward(&cx, &mut guard, req).await
        }
        None => Err(ProxyError::ChainRemoved),
    };
    let response = match forwarded {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "local reply");
            guard.fail(&e);
            local_reply(&e, guard.grpc)
        }
    };
    guard.record.response_code = response.status().as_u16();
    if let Some(api) = guard.api.as_mut() {
        api.response_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| apisec::call::media_type(v.as_bytes()));
    }
    if let Some(copy) = guard.sample.as_mut() {
        copy.response_head(response.headers());
    }
    if guard.grpc && guard.grpc_status.is_none() {
        guard.grpc_status = grpc_status(response.headers());
    }
    if let Some(chain) = &chain {
        chain.count_status(guard.record.response_code);
    }
    let (mut parts, body) = response.into_parts();
    if (ctx.drain.is_draining() || ctx.overload.shedding())
        && guard.record.protocol.starts_with("HTTP/1")
    {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let body = StreamIdleTimeout::wrap(body, ctx.stream_idle_timeout);
    Ok(Response::from_parts(parts, Guarded::boxed(body, guard)))
}

/// What one request is forwarded with.
struct Forwarding<'a> {
    ctx: &'a Arc<ConnCtx>,
    chain: &'a Arc<HttpChain>,
    clusters: &'a Clusters,
    hook: Option<&'a crate::AuthzHook>,
    recheck: upgrade::ChainRecheck,
}

async fn forward(
    cx: &Forwarding<'_>,
    guard: &mut CallGuard,
    mut req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let (ctx, chain, clusters, hook) = (&**cx.ctx, &**cx.chain, cx.clusters, cx.hook);
    check_request(&req)?;
    let upgrade = upgrade_protocol(&req, &chain.upgrade_types)?;
    if ctx.reporter == Reporter::Destination {
        // Peer metadata headers are a sidecar's word, so only an mTLS peer's count; a plaintext
        // (raw_buffer) caller could write anything there. They are stripped below either way.
        let from_peer = |name: &HeaderName| {
            ctx.peer_id
                .as_ref()
                .and(header_str(req.headers(), name))
                .filter(|v| crate::telemetry::plausible_name(v))
                .map(Into::into)
        };
        guard.peer = Peer {
            workload: from_peer(&SOURCE_WORKLOAD),
            app: from_peer(&SOURCE_APP),
            ..Peer::default()
        }
        .with_principal(ctx.peer_id.clone());
    }
    strip_request_headers(req.headers_mut());
    ensure_request_id(req.headers_mut(), guard);
    guard.start_span(req.headers_mut(), chain.tracer.as_ref());

    // One view of the request for routing, policy and the upstream (DESIGN §7).
    let raw_authority =
        authority(&req).ok_or(ProxyError::BadRequest("request has no authority"))?;
    let authority = policy::path::normalize_authority(&raw_authority);
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let normalized = policy::path::normalize(target)
        .map_err(|_| ProxyError::BadRequest("path cannot be normalized"))?;
    if chain.reject_ambiguous_paths && policy::path::ambiguous(target, &normalized.path) {
        return Err(ProxyError::BadRequest(
            "the path can be read more than one way",
        ));
    }
    if let Some(api) = guard.api.as_mut() {
        api.path = Some(normalized.path.clone());
    }
    let selected = chain.select(&authority, &normalized.path, req.headers());
    let routed = selected.as_ref().and_then(|s| clusters.get(s.cluster));
    // Telemetry and the inventory name the service a denied call was for, too.
    if let Some(c) = routed {
        guard.destination_service = c.service.clone();
    }
    // Authorization runs before a missing route is reported: an unauthorized caller must not be
    // able to tell which routes exist.
    if let Some(engine) = &chain.rbac {
        let view = RequestView {
            ctx,
            req: &req,
            authority: &authority,
            normalized: &normalized,
            cluster: routed.map(|c| &**c),
        };
        authz::authorize(engine, chain, guard, hook, &view)?;
    }
    // Authorization drift, enforce mode: only edges in the baseline (after RBAC allowed it).
    if ctx.reporter == Reporter::Destination
        && let Some(drift) = &guard.telemetry_drift_enforce()
    {
        let caller = ctx.peer_id.as_deref().unwrap_or("plaintext");
        let service = guard.service_name();
        let method = req.method().as_str();
        if !drift.known(caller, service, method, &normalized.path) {
            guard.record.rbac_decision = Some("denied");
            guard.record.rbac_policy = Some("authorization-drift".into());
            return Err(ProxyError::Drift {
                caller: caller.to_owned(),
                operation: format!("{method} {}", normalized.path),
            });
        }
    }
    let selected = selected.ok_or_else(|| ProxyError::NoRoute {
        authority: authority.clone(),
        path: normalized.path.clone(),
    })?;
    guard.record.route_name = Some(selected.route_name.clone());
    let cluster = routed
        .ok_or_else(|| ProxyError::NoCluster {
            cluster: selected.cluster.to_owned(),
        })?
        .clone();
    if ctx.reporter == Reporter::Source && !cluster.is_mtls() {
        // The app's traffic leaves this pod only over mTLS (checked at load for static config;
        // here for xDS, where a listener may name a cluster that arrives later).
        return Err(ProxyError::PlaintextOutbound {
            cluster: cluster.config.name.clone(),
        });
    }
    let timeout = selected.timeout;
    guard.record.upstream_cluster = Some(cluster.name.clone());
    if ctx.reporter == Reporter::Source {
        guard.peer = cluster.peer.clone();
    }

    match (ctx.reporter, chain.forward_client_cert) {
        (Reporter::Destination, ForwardClientCertDetails::SanitizeSet) => {
            if let Some(v) = ctx.xfcc.get_or_init(|| xfcc_value(ctx)) {
                req.headers_mut().insert(XFCC.clone(), v.clone());
            }
        }
        (Reporter::Destination, ForwardClientCertDetails::Sanitize) | (Reporter::Source, _) => {}
    }
    if ctx.reporter == Reporter::Source && cluster.is_mtls() {
        for (name, value) in [
            (&SOURCE_WORKLOAD, &ctx.local_workload),
            (&SOURCE_APP, &ctx.local_app),
        ] {
            if let Some(v) = value {
                req.headers_mut().insert(name.clone(), v.clone());
            }
        }
    }
    // Absolute form (HTTP/2 upstreams need scheme and authority), with the normalized view.
    *req.uri_mut() = absolute_uri(&authority, normalized.path_and_query())
        .ok_or(ProxyError::BadRequest("request target cannot be forwarded"))?;
    if req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&authority)
    {
        req.headers_mut().insert(header::HOST, v);
    }

    if let Some(proto) = upgrade {
        // The tunnel is re-checked against the chain's policy as it changes: this request's view,
        // as the policy read it.
        let view = PolicyView::of(&RequestView {
            ctx,
            req: &req,
            authority: &authority,
            normalized: &normalized,
            cluster: Some(&cluster),
        });
        let tunnel = upgrade::Tunnel {
            ctx: cx.ctx.clone(),
            chain: cx.chain.clone(),
            recheck: cx.recheck.clone(),
            view,
        };
        // Boxed: rare, and large enough to double every request's future.
        return Box::pin(upgrade::forward(req, proto, &cluster, guard, tunnel)).await;
    }
    let started = tokio::time::Instant::now();
    let send = cluster.send(req, guard.grpc);
    let sent = if timeout.is_zero() {
        send.await
    } else {
        tokio::time::timeout(timeout, send)
            .await
            .unwrap_or_else(|_| {
                cluster.stats.upstream_rq_timeout.inc();
                Err(ProxyError::UpstreamTimeout(timeout))
            })
    };
    let sent = sent.inspect_err(|e| note_upstream_failure(guard, &cluster, e))?;
    guard.record.upstream_service_time = Some(started.elapsed().as_millis() as u64);
    guard.record.upstream_host = Some(sent.endpoint);
    guard.record.upstream_local_address = sent.local;
    if ctx.reporter == Reporter::Source {
        guard.record.upstream_peer_uri_san = sent.peer.clone();
        let peer = std::mem::take(&mut guard.peer);
        guard.peer = peer.with_principal(sent.peer.clone());
    }
    if sent.response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Nothing was asked to switch: an app that switches anyway would get a connection the
        // proxy no longer sees into.
        return Err(ProxyError::Upgrade(
            "the upstream switched protocols on a request that asked for no upgrade".into(),
        ));
    }
    let (mut parts, incoming) = sent.response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body::boxed(incoming)))
}

/// The port a request is for: on the inbound side, the app port it is delivered to (Istio's
/// `destination.port`); on the outbound side, the listener's.
pub(crate) fn destination_port(ctx: &ConnCtx, cluster: &ClusterRt) -> u16 {
    match ctx.reporter {
        Reporter::Destination => cluster
            .config
            .endpoints
            .first()
            .map_or(ctx.local.port(), |e| e.port()),
        Reporter::Source => ctx.local.port(),
    }
}

fn note_upstream_failure(guard: &mut CallGuard, cluster: &ClusterRt, e: &ProxyError) {
    if let ProxyError::UpstreamConnect { endpoint, .. }
    | ProxyError::UpstreamConnectTimeout { endpoint }
    | ProxyError::UpstreamTls { endpoint, .. } = e
    {
        guard.record.upstream_host = endpoint.parse().ok();
    }
    tracing::warn!(cluster = %cluster.config.name, error = %e, "upstream request failed");
}

/// `http://{authority}{path_and_query}`, from its parts (nothing formatted and parsed again).
fn absolute_uri(authority: &str, path_and_query: String) -> Option<http::Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(http::uri::Authority::try_from(authority).ok()?);
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(path_and_query).ok()?);
    http::Uri::from_parts(parts).ok()
}

/// A method's name, borrowed for the standard ones (nothing allocated per request).
fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT",
    ];
    let name = m.as_str();
    KNOWN.iter().find(|k| **k == name).map_or_else(
        || std::borrow::Cow::Owned(name.to_owned()),
        |k| std::borrow::Cow::Borrowed(*k),
    )
}

fn describe_request(guard: &mut CallGuard, ctx: &ConnCtx, req: &Request<Incoming>) {
    let h = req.headers();
    let r = &mut guard.record;
    r.method = Some(method_name(req.method()));
    r.path = Some(
        req.uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
    );
    r.protocol = protocol_name(req.version());
    r.authority = authority(req);
    r.user_agent = header_str(h, &header::USER_AGENT).map(Into::into);
    r.x_forwarded_for = header_str(h, &HeaderName::from_static("x-forwarded-for")).map(Into::into);
    r.request_id = header_str(h, &REQUEST_ID).map(Into::into);
    r.downstream_remote_address = Some(ctx.remote);
    r.downstream_local_address = Some(ctx.local);
    r.downstream_peer_uri_san = ctx.peer_id.clone();
    r.requested_server_name = ctx.sni.clone();
    guard.mtls = ctx.peer_id.is_some();
    guard.grpc = h
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if let Some(api) = guard.api.as_mut() {
        // The scheme of the credentials the request carried, read before any header is
        // stripped; nothing of the value is kept.
        api.auth = Some(apisec::AuthScheme::detect(
            h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        ));
        api.request_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| apisec::call::media_type(v.as_bytes()));
    }
}

/// Requests the proxy refuses outright (DESIGN §5): underscores in header names, and
/// Content-Length together with Transfer-Encoding (request smuggling).
fn check_request<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let h = req.headers();
    if h.keys().any(|k| k.as_str().contains('_')) {
        return Err(ProxyError::BadRequest("header name with underscore"));
    }
    if h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING) {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not supported"));
    }
    Ok(())
}

/// The `Upgrade` protocol to tunnel, if this is an HTTP/1.1 upgrade request for one of the
/// connection manager's upgrade types. `h2c` is never tunnelled (as in Envoy, the request goes on
/// as a plain one, its `Upgrade` stripped with the other hop-by-hop headers); any other type not
/// in the list is refused, so nothing reaches the app that could switch the connection to a
/// protocol the proxy does not see into.
fn upgrade_protocol<B>(
    req: &Request<B>,
    allowed: &[String],
) -> Result<Option<HeaderValue>, ProxyError> {
    if req.version() != http::Version::HTTP_11 {
        return Ok(None);
    }
    let conn_upgrade =
        tokens(req.headers(), &header::CONNECTION).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    let requested: Vec<&[u8]> = tokens(req.headers(), &header::UPGRADE).collect();
    if !conn_upgrade || requested.is_empty() {
        return Ok(None);
    }
    if requested.iter().any(|t| t.eq_ignore_ascii_case(b"h2c")) {
        return Ok(None);
    }
    match requested.as_slice() {
        [one]
            if allowed
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(one)) =>
        {
            Ok(req.headers().get(header::UPGRADE).cloned())
        }
        _ => Err(ProxyError::UpgradeRefused {
            protocol: String::from_utf8_lossy(&requested.join(&b","[..])).into_owned(),
        }),
    }
}

fn authority<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| header_str(req.headers(), &header::HOST).map(Into::into))
}

/// Envoy's `%PROTOCOL%` spelling.
fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn grpc_status(h: &HeaderMap) -> Option<String> {
    header_str(h, &HeaderName::from_static("grpc-status")).map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_smuggling_and_underscores() {
        let req = Request::builder()
            .header("content-length", "1")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        assert!(check_request(&req).is_err());
        let req = Request::builder().header("x_user", "a").body(()).unwrap();
        assert!(check_request(&req).is_err());
        let req = Request::builder().header("x-user", "a").body(()).unwrap();
        assert!(check_request(&req).is_ok());
    }
}
