//! The HTTP request path, one straight line per request: check the request, strip what a client
//! must not set, route, forward to the cluster, and return the response with its telemetry guard.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::Clusters;
use crate::body::{self, Body, Counting, Guarded};
use crate::config::ForwardClientCertDetails;
use crate::error::ProxyError;
use crate::idle::StreamIdleTimeout;
use crate::route::HttpChain;
use crate::telemetry::{CallGuard, Peer, Reporter, Telemetry};
use crate::upstream::ClusterRt;

static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
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
    pub sni: Option<String>,
    /// This proxy's own SPIFFE ID (XFCC `By=`), and workload (for peers' metrics).
    pub local_id: Arc<str>,
    pub local_workload: Arc<str>,
    pub local_app: Arc<str>,
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
}

/// Serves one request. Never fails: every error becomes a local reply.
pub async fn handle(
    ctx: Arc<ConnCtx>,
    chain: Option<Arc<HttpChain>>,
    clusters: Clusters,
    telemetry: Arc<Telemetry>,
    hook: Option<crate::AuthzHook>,
    recheck: crate::upgrade::ChainRecheck,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let mut guard = telemetry.start(ctx.reporter, ctx.local_id.clone());
    guard.inflight = Some(crate::idle::InFlight::new(&ctx.activity));
    guard.stream_resets = Some(ctx.resets.clone());
    describe_request(&mut guard, &ctx, &req);
    let (parts, incoming) = req.into_parts();
    let counted = StreamIdleTimeout::wrap(
        Counting::boxed(incoming, guard.request_bytes.clone()),
        ctx.stream_idle_timeout,
    );
    let req = Request::from_parts(parts, counted);
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
    recheck: crate::upgrade::ChainRecheck,
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
    let selected = chain.select(&authority, &normalized.path, req.headers());
    let routed = selected.as_ref().and_then(|s| clusters.get(s.cluster));
    // Authorization runs before a missing route is reported: an unauthorized caller must not be
    // able to tell which routes exist.
    if let Some(engine) = &chain.rbac {
        authorize(
            engine,
            ctx,
            chain,
            guard,
            hook,
            &req,
            &authority,
            &normalized,
            routed.map(|c| &**c),
        )?;
    }
    let selected = selected.ok_or_else(|| ProxyError::NoRoute {
        authority: authority.clone(),
        path: normalized.path.clone(),
    })?;
    guard.record.route_name = Some(selected.route_name.to_owned());
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
    guard.record.upstream_cluster = Some(cluster.config.name.clone());
    guard.destination_service = cluster.config.metadata.service.as_deref().map(Into::into);
    if ctx.reporter == Reporter::Source {
        guard.peer = Peer::from_metadata(&cluster.config.metadata);
    }

    match (ctx.reporter, chain.forward_client_cert) {
        (Reporter::Destination, ForwardClientCertDetails::SanitizeSet) => {
            if let Some(v) = xfcc_value(ctx) {
                req.headers_mut().insert(XFCC.clone(), v);
            }
        }
        (Reporter::Destination, ForwardClientCertDetails::Sanitize) | (Reporter::Source, _) => {}
    }
    if ctx.reporter == Reporter::Source && cluster.is_mtls() {
        insert_str(req.headers_mut(), &SOURCE_WORKLOAD, &ctx.local_workload);
        insert_str(req.headers_mut(), &SOURCE_APP, &ctx.local_app);
    }
    // Absolute form (HTTP/2 upstreams need scheme and authority), with the normalized view.
    *req.uri_mut() = format!("http://{authority}{}", normalized.path_and_query())
        .parse()
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?;
    if req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&authority)
    {
        req.headers_mut().insert(header::HOST, v);
    }

    if let Some(proto) = upgrade {
        // The tunnel is re-checked against the chain's policy as it changes: this request's view,
        // as the policy read it.
        let view = policy_view(ctx, &req, &authority, &normalized, Some(&cluster));
        let tunnel = crate::upgrade::Tunnel {
            ctx: cx.ctx.clone(),
            chain: cx.chain.clone(),
            recheck: cx.recheck.clone(),
            view,
        };
        return crate::upgrade::forward(req, proto, &cluster, guard, tunnel).await;
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
    guard.record.upstream_host = Some(sent.endpoint.to_string());
    if ctx.reporter == Reporter::Source {
        guard.record.upstream_peer_uri_san = sent.peer.as_deref().map(Into::into);
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

/// Runs the connection manager's RBAC filters; a denial is a 403 (`RBAC: access denied`).
#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts, each needed by policy"
)]
fn authorize(
    engine: &policy::Engine,
    ctx: &ConnCtx,
    chain: &HttpChain,
    guard: &mut CallGuard,
    hook: Option<&crate::AuthzHook>,
    req: &Request<Body>,
    authority: &str,
    normalized: &policy::path::NormalizedPath,
    cluster: Option<&ClusterRt>,
) -> Result<(), ProxyError> {
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
        destination_port: cluster.map_or(ctx.local.port(), |c| destination_port(ctx, c)),
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
            Some(if *shadow_allowed { "allowed" } else { "denied" }.into());
        guard.record.rbac_shadow_policy = shadow_policy.as_deref().map(Into::into);
    }
    guard.record.rbac_policy = decision.policy.as_deref().map(Into::into);
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
        guard.record.rbac_decision = Some("allowed".into());
        return Ok(());
    }
    chain.stats.rbac_denied.inc();
    guard.record.rbac_decision = Some("denied".into());
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
    sni: Option<String>,
}

impl PolicyView {
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

fn policy_view(
    ctx: &ConnCtx,
    req: &Request<Body>,
    authority: &str,
    normalized: &policy::path::NormalizedPath,
    cluster: Option<&ClusterRt>,
) -> PolicyView {
    let full_path = normalized.path_and_query();
    PolicyView {
        principal: ctx.peer_id.clone(),
        path: normalized.path.clone(),
        path_without_params: normalized.without_params(),
        headers: policy_headers(req, authority, &full_path)
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v.to_vec()))
            .collect(),
        remote: ctx.remote.ip(),
        local: ctx.local.ip(),
        destination_port: cluster.map_or(ctx.local.port(), |c| destination_port(ctx, c)),
        sni: ctx.sni.clone(),
    }
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
    if let ProxyError::UpstreamConnect { endpoint, .. } | ProxyError::UpstreamTls { endpoint, .. } =
        e
    {
        guard.record.upstream_host = Some(endpoint.clone());
    }
    tracing::warn!(cluster = %cluster.config.name, error = %e, "upstream request failed");
}

fn describe_request(guard: &mut CallGuard, ctx: &ConnCtx, req: &Request<Incoming>) {
    let h = req.headers();
    let r = &mut guard.record;
    r.method = Some(req.method().as_str().to_owned());
    r.path = Some(
        req.uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
    );
    r.protocol = protocol_name(req.version()).to_owned();
    r.authority = authority(req);
    r.user_agent = header_str(h, &header::USER_AGENT).map(Into::into);
    r.x_forwarded_for = header_str(h, &HeaderName::from_static("x-forwarded-for")).map(Into::into);
    r.request_id = header_str(h, &REQUEST_ID).map(Into::into);
    r.downstream_remote_address = ctx.remote.to_string();
    r.downstream_local_address = ctx.local.to_string();
    r.downstream_peer_uri_san = ctx.peer_id.as_deref().map(Into::into);
    r.requested_server_name = ctx.sni.clone();
    guard.mtls = ctx.peer_id.is_some();
    guard.grpc = h
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
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

/// The comma-separated tokens of every value of a header, as bytes (a value need not be UTF-8).
fn tokens<'a>(h: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
    h.get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers (and whatever `Connection` names), which never cross a proxy.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = tokens(h, &header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    let keep_te = h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !keep_te {
        h.remove(header::TE);
    }
}

/// Strips what a client must never set: hop-by-hop headers, XFCC, and proxy-internal headers
/// (`x-envoy-*`, `x-eastguard-*`).
fn strip_request_headers(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    h.remove(&XFCC);
    let internal: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-envoy-") || k.as_str().starts_with("x-eastguard-"))
        .cloned()
        .collect();
    for k in internal {
        h.remove(k);
    }
}

fn ensure_request_id(h: &mut HeaderMap, guard: &mut CallGuard) {
    if let Some(id) = header_str(h, &REQUEST_ID) {
        guard.record.request_id = Some(id.to_owned());
        return;
    }
    let id = uuid_v4();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(REQUEST_ID.clone(), v);
    }
    guard.record.request_id = Some(id);
}

/// A random RFC 4122 version-4 UUID.
fn uuid_v4() -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    // Request IDs are for correlation, not security: a failed RNG call still gives a usable ID.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Envoy's XFCC for SANITIZE_SET with Hash, Subject and URI: the verified peer, nothing the client said.
fn xfcc_value(ctx: &ConnCtx) -> Option<HeaderValue> {
    let peer = ctx.peer_id.as_deref()?;
    let hash = ctx.peer_cert_hash.as_deref().unwrap_or_default();
    HeaderValue::from_str(&format!(
        "By={};Hash={hash};Subject=\"\";URI={peer}",
        ctx.local_id
    ))
    .ok()
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

fn insert_str(h: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name.clone(), v);
    }
}

fn grpc_status(h: &HeaderMap) -> Option<String> {
    header_str(h, &HeaderName::from_static("grpc-status")).map(Into::into)
}

/// The response for a request the proxy answers itself.
pub fn local_reply(e: &ProxyError, grpc: bool) -> Response<Body> {
    let r = e.response();
    let mut builder = Response::builder();
    if r.close {
        builder = builder.header(header::CONNECTION, "close");
    }
    let message = match e {
        ProxyError::UpstreamConnect { .. }
        | ProxyError::UpstreamTls { .. }
        | ProxyError::UpstreamReset(_) => {
            format!(
                "upstream connect error or disconnect/reset before headers. reset reason: {}",
                r.details
            )
        }
        ProxyError::UpstreamTimeout(_) => "upstream request timeout".to_owned(),
        ProxyError::NoHealthyUpstream { .. } => "no healthy upstream".to_owned(),
        ProxyError::NoCluster { .. } | ProxyError::ChainRemoved => "no cluster".to_owned(),
        ProxyError::PlaintextOutbound { .. } => "outbound traffic requires mTLS".to_owned(),
        ProxyError::NoRoute { .. } => String::new(),
        ProxyError::BadRequest(why) => format!("Bad Request: {why}"),
        ProxyError::Upgrade(_) | ProxyError::UpgradeRefused { .. } => "upgrade failed".to_owned(),
        ProxyError::RbacDenied { .. } => "RBAC: access denied".to_owned(),
    };
    let built = if grpc {
        // gRPC: a trailers-only response carrying the status.
        builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", r.grpc_status.to_string())
            .header("grpc-message", message.replace(['\r', '\n'], " "))
            .body(body::empty())
    } else {
        builder
            .status(r.status)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(body::full(message))
    };
    built.unwrap_or_else(|_| {
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_internal_and_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            (
                "x-forwarded-client-cert",
                "By=spiffe://evil/x;URI=spiffe://cluster.local/ns/a/sa/admin",
            ),
            ("x-envoy-original-path", "/admin"),
            ("x-eastguard-source-workload", "admin"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("x-ok", "yes"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_request_headers(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-ok"]);
    }

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

    #[test]
    fn request_ids_are_v4_uuids() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, uuid_v4());
    }
}
