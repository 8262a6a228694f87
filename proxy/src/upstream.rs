//! Connections to upstreams: pooled HTTP/2 (one multiplexed connection per endpoint and worker)
//! or pooled keep-alive HTTP/1.1 (a connection per request in flight), over mTLS to peer sidecars
//! or plaintext to the local app, and one-off connections for upgrades and TCP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use identity::{CredentialsRx, SpiffeId};
use rustls_pki_types::{ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::body::Body;
use crate::config::{Cluster, Limits, UpstreamProtocol};
use crate::error::{ProxyError, error_chain};
use crate::stats::{EnvoyStats, Stat};

/// One pooled HTTP/2 connection's place; the async mutex is held across a connect.
type H2Slot = Arc<tokio::sync::Mutex<Option<H2Conn>>>;

/// One worker slot's keep-alive HTTP/1.1 connections by endpoint.
type H1Pool = Mutex<HashMap<SocketAddr, H1Conns, foldhash::fast::RandomState>>;

/// An endpoint's keep-alive HTTP/1.1 connections, busy and idle ones together: a request takes
/// the newest one that is ready for another.
#[derive(Default)]
struct H1Conns {
    conns: Vec<H1Conn>,
    /// When closed, expired and idle connections were last dropped; that is done at most once
    /// per [`H1_SWEEP`], not on every request.
    swept: Option<Instant>,
}

/// What sending on an HTTP/1.1 connection comes back with: the response, or the request when the
/// connection closed before it was written.
type H1Sent = Result<
    http::Response<hyper::body::Incoming>,
    hyper::client::conn::TrySendError<http::Request<Body>>,
>;

/// What [`ClusterRt::h1_send`] did with a request.
enum H1Dispatch<F> {
    /// Sent on a connection: the response to come, and the connection's local end and peer.
    Sent(F, Option<SocketAddr>, Option<Arc<str>>),
    /// No pooled connection was ready for it: the request, back.
    Unsent(http::Request<Body>),
}

/// The most HTTP/1.1 connections one worker keeps to one endpoint; past it a connection serves
/// its one request and closes (Envoy's default `max_connections` circuit breaker is 1024).
const H1_POOL_MAX: usize = 1024;
/// An HTTP/1.1 connection unused this long is closed by its endpoint's next sweep.
const H1_IDLE: Duration = Duration::from_secs(60);
/// How often an endpoint's HTTP/1.1 connections are swept for closed, expired and idle ones.
const H1_SWEEP: Duration = Duration::from_secs(1);

/// ALPN offered to peer sidecars for multiplexed HTTP.
const ALPN_H2: &[&[u8]] = &[b"h2"];
/// ALPN for a one-off HTTP/1.1 connection (upgrades such as WebSocket).
const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN for opaque TCP between sidecars (Istio's value).
const ALPN_TCP: &[&[u8]] = &[b"istio"];

/// A cluster ready to send to: its config, TLS settings, pool and stats.
pub struct ClusterRt {
    pub config: Cluster,
    /// The cluster's name, shared with each request's log record (`%UPSTREAM_CLUSTER%`).
    pub name: Arc<str>,
    /// Who its metadata says the callee is, and the service: made once, shared by each call's
    /// telemetry.
    pub peer: crate::telemetry::Peer,
    pub service: Option<Arc<str>>,
    creds: CredentialsRx,
    tls: Option<PeerTls>,
    /// Pooled HTTP/2 connections by (worker slot, endpoint): a worker's requests ride only on
    /// connections its own thread drives (`workers`). Keys come from the configuration.
    pool: Mutex<HashMap<(usize, SocketAddr), H2Slot, foldhash::fast::RandomState>>,
    /// Pooled HTTP/1.1 connections, a pool per worker slot for the same reason (and so that
    /// workers never share its lock).
    h1: Box<[H1Pool]>,
    next: AtomicUsize,
    limits: Limits,
    pub stats: ClusterStats,
}

struct PeerTls {
    server_name: ServerName<'static>,
    h2: TlsConnector,
    http1: TlsConnector,
    tcp: TlsConnector,
}

/// Tells pooled connections apart, so a retry evicts the one that refused it and not a newer one.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(0);

struct H1Conn {
    sender: http1::SendRequest<Body>,
    local: Option<SocketAddr>,
    peer: Option<Arc<str>>,
    /// As for [`H2Conn`]: no request is sent on it from then on.
    expires: Option<UnixTime>,
    last_used: Instant,
}

#[derive(Clone)]
struct H2Conn {
    id: u64,
    sender: http2::SendRequest<Body>,
    local: Option<SocketAddr>,
    peer: Option<Arc<str>>,
    /// When the first of the two certificates it was authenticated with expires; the pool opens a
    /// new connection from then on, so no request rides on an expired identity.
    expires: Option<UnixTime>,
}

pub struct ClusterStats {
    pub upstream_cx_total: Stat,
    pub upstream_cx_active: Stat,
    pub upstream_cx_connect_fail: Stat,
    /// Connects (TCP, or TCP + TLS) not done within the cluster's `connect_timeout`; also counted
    /// in `upstream_cx_connect_fail`, as in Envoy.
    pub upstream_cx_connect_timeout: Stat,
    pub upstream_rq_total: Stat,
    pub upstream_rq_timeout: Stat,
    /// Requests sent once more because the peer refused them unprocessed (GOAWAY, REFUSED_STREAM).
    pub upstream_rq_retry: Stat,
}

/// An upstream connection for a byte stream (TCP proxy, upgrades).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// What a sent request came back with.
pub struct Sent {
    pub response: http::Response<hyper::body::Incoming>,
    pub endpoint: SocketAddr,
    /// The verified SPIFFE ID of the peer, for mTLS upstreams.
    pub peer: Option<Arc<str>>,
    /// This proxy's end of the upstream connection (`%UPSTREAM_LOCAL_ADDRESS%`).
    pub local: Option<SocketAddr>,
}

// === impl ClusterRt ===

impl ClusterRt {
    pub fn new(
        config: Cluster,
        creds: &CredentialsRx,
        limits: &Limits,
        stats: &EnvoyStats,
    ) -> Result<Self, rustls::Error> {
        let tls = match &config.transport_socket {
            None => None,
            Some(t) => {
                let expected: Arc<[SpiffeId]> = t.match_spiffe_ids.clone().into();
                let connector = |alpn| -> Result<TlsConnector, rustls::Error> {
                    let cfg = identity::tls::client_config(creds.clone(), expected.clone(), alpn)?;
                    Ok(TlsConnector::from(Arc::new(cfg)))
                };
                let server_name = ServerName::try_from(t.sni.clone()).map_err(|_| {
                    rustls::Error::General(format!(
                        "cluster {}: invalid SNI {:?}",
                        config.name, t.sni
                    ))
                })?;
                Some(PeerTls {
                    server_name,
                    h2: connector(ALPN_H2)?,
                    http1: connector(ALPN_HTTP1)?,
                    tcp: connector(ALPN_TCP)?,
                })
            }
        };
        let s = |n: &str| stats.stat(&format!("cluster.{}.{n}", config.name));
        let cstats = ClusterStats {
            upstream_cx_total: s("upstream_cx_total"),
            upstream_cx_active: s("upstream_cx_active"),
            upstream_cx_connect_fail: s("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: s("upstream_cx_connect_timeout"),
            upstream_rq_total: s("upstream_rq_total"),
            upstream_rq_timeout: s("upstream_rq_timeout"),
            upstream_rq_retry: s("upstream_rq_retry"),
        };
        Ok(Self {
            name: config.name.as_str().into(),
            peer: crate::telemetry::Peer::from_metadata(&config.metadata),
            service: config.metadata.service.as_deref().map(Into::into),
            config,
            creds: creds.clone(),
            tls,
            pool: Mutex::default(),
            h1: (0..crate::workers::slots())
                .map(|_| H1Pool::default())
                .collect(),
            next: AtomicUsize::new(0),
            limits: limits.clone(),
            stats: cstats,
        })
    }

    pub fn is_mtls(&self) -> bool {
        self.tls.is_some()
    }

    /// Round-robin over the endpoints.
    fn pick(&self) -> Result<SocketAddr, ProxyError> {
        let eps = &self.config.endpoints;
        if eps.is_empty() {
            return Err(ProxyError::NoHealthyUpstream {
                cluster: self.config.name.clone(),
            });
        }
        Ok(eps[self.next.fetch_add(1, Ordering::Relaxed) % eps.len()])
    }

    /// Sends a request, over HTTP/2 or HTTP/1.1 by the cluster's protocol: `HTTP1` / `HTTP2` as
    /// configured; `DOWNSTREAM` the protocol the request arrived with (Envoy's
    /// `use_downstream_protocol_config`); `AUTO` HTTP/2 to mTLS peers and for gRPC, HTTP/1.1
    /// otherwise.
    pub async fn send(&self, req: http::Request<Body>, grpc: bool) -> Result<Sent, ProxyError> {
        let endpoint = self.pick()?;
        self.stats.upstream_rq_total.inc();
        let use_h2 = match self.config.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Downstream => req.version() == http::Version::HTTP_2,
            UpstreamProtocol::Auto => self.tls.is_some() || grpc,
        };
        if use_h2 {
            self.send_h2(endpoint, req).await
        } else {
            self.send_h1(endpoint, req).await
        }
    }

    /// HTTP/1.1 on a pooled keep-alive connection, or a new one when none is ready.
    async fn send_h1(
        &self,
        endpoint: SocketAddr,
        mut req: http::Request<Body>,
    ) -> Result<Sent, ProxyError> {
        // Origin form on the wire; Host keeps the authority.
        set_host_from_uri(&mut req);
        *req.version_mut() = http::Version::HTTP_11;
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = http::Uri::from(path);
        // A pooled connection that closed before the request was written hands it back (the
        // peer closed it as idle, or is draining): it is sent once more on a fresh connection.
        for attempt in 0..2 {
            let pooled = if attempt == 0 {
                self.h1_send(endpoint, req, None)
            } else {
                H1Dispatch::Unsent(req)
            };
            let (sending, local, peer) = match pooled {
                H1Dispatch::Sent(sending, local, peer) => (sending, local, peer),
                H1Dispatch::Unsent(unsent) => {
                    let conn = Box::pin(self.h1_connect(endpoint)).await?;
                    // A fresh connection always takes the request.
                    match self.h1_send(endpoint, unsent, Some(conn)) {
                        H1Dispatch::Sent(sending, local, peer) => (sending, local, peer),
                        H1Dispatch::Unsent(_) => {
                            return Err(ProxyError::UpstreamReset(
                                "new connection refused the request".into(),
                            ));
                        }
                    }
                }
            };
            match sending.await {
                Ok(response) => {
                    return Ok(Sent {
                        response,
                        endpoint,
                        peer,
                        local,
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 0 => {
                        self.stats.upstream_rq_retry.inc();
                        req = unsent;
                    }
                    _ => return Err(ProxyError::UpstreamReset(error_chain(e.error()))),
                },
            }
        }
        Err(ProxyError::UpstreamReset(
            "connection closed before the request was sent, twice".into(),
        ))
    }

    /// Sends `req` on `fresh`, kept in the pool unless it is full, or else on the newest pooled
    /// connection ready for it whose identity has not expired (closed, expired and idle ones are
    /// dropped once per [`H1_SWEEP`]); hands `req` back when none is ready.
    fn h1_send(
        &self,
        endpoint: SocketAddr,
        req: http::Request<Body>,
        fresh: Option<H1Conn>,
    ) -> H1Dispatch<impl Future<Output = H1Sent> + use<>> {
        let pool = &self.h1[crate::workers::slot().min(self.h1.len() - 1)];
        let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
        let pooled = pool.entry(endpoint).or_default();
        if let Some(mut c) = fresh {
            let sent = H1Dispatch::Sent(c.sender.try_send_request(req), c.local, c.peer.clone());
            if pooled.conns.len() < H1_POOL_MAX {
                pooled.conns.push(c);
            }
            return sent;
        }
        let (now, wall) = (Instant::now(), UnixTime::now());
        let live = |c: &H1Conn| c.expires.is_none_or(|t| wall < t);
        if pooled
            .swept
            .is_none_or(|t| now.duration_since(t) >= H1_SWEEP)
        {
            pooled.swept = Some(now);
            pooled.conns.retain(|c| {
                !c.sender.is_closed() && live(c) && now.duration_since(c.last_used) < H1_IDLE
            });
        }
        // Between sweeps the one taken is checked: no request rides on an expired identity.
        let Some(c) = pooled
            .conns
            .iter_mut()
            .rev()
            .find(|c| c.sender.is_ready() && live(c))
        else {
            return H1Dispatch::Unsent(req);
        };
        c.last_used = now;
        H1Dispatch::Sent(c.sender.try_send_request(req), c.local, c.peer.clone())
    }

    /// A new HTTP/1.1 connection to `endpoint` (mTLS for peer clusters).
    async fn h1_connect(&self, endpoint: SocketAddr) -> Result<H1Conn, ProxyError> {
        let (io, peer) = self.connect(endpoint, StreamKind::Http1).await?;
        let expires = self.identity_expiry(&io);
        let local = io.local_addr();
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(handshake_failed(endpoint))?;
        self.drive(conn, endpoint);
        Ok(H1Conn {
            sender,
            local,
            peer,
            expires,
            last_used: Instant::now(),
        })
    }

    /// HTTP/2 on the pooled multiplexed connection to `endpoint`.
    async fn send_h2(
        &self,
        endpoint: SocketAddr,
        mut req: http::Request<Body>,
    ) -> Result<Sent, ProxyError> {
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(http::header::HOST);
        // A request the peer never processed is sent once more on a fresh connection: one hyper
        // hands back unsent, and one the peer refused by GOAWAY (a draining sidecar) or
        // REFUSED_STREAM. The latter come back without the request, so only a request without a
        // body (kept as its head) can be sent again; one with a body fails as it did.
        let mut req = req;
        let mut conn_id = None;
        for attempt in 0..2 {
            if let Some(id) = conn_id.take() {
                self.evict(endpoint, id).await;
                self.stats.upstream_rq_retry.inc();
            }
            let mut conn = self.h2_conn(endpoint).await?;
            if let Err(e) = conn.sender.ready().await {
                if attempt == 0 {
                    conn_id = Some(conn.id);
                    continue;
                }
                return Err(ProxyError::UpstreamReset(error_chain(&e)));
            }
            let replay = http_body::Body::is_end_stream(req.body()).then(|| head_of(&req));
            match conn.sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(Sent {
                        response,
                        endpoint,
                        peer: conn.peer,
                        local: conn.local,
                    });
                }
                Err(mut e) => {
                    let again = e
                        .take_message()
                        .or_else(|| replay.filter(|_| unprocessed(e.error())));
                    match again {
                        Some(r) if attempt == 0 => {
                            conn_id = Some(conn.id);
                            req = r;
                        }
                        _ => return Err(ProxyError::UpstreamReset(error_chain(e.error()))),
                    }
                }
            }
        }
        Err(ProxyError::UpstreamReset(
            "connection refused the request twice".into(),
        ))
    }

    fn slot(&self, endpoint: SocketAddr) -> H2Slot {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.entry((crate::workers::slot(), endpoint))
            .or_default()
            .clone()
    }

    /// Drops the pooled connection `id` to `endpoint`, unless another request has already put a
    /// newer one in its place.
    async fn evict(&self, endpoint: SocketAddr, id: u64) {
        let slot = self.slot(endpoint);
        let mut slot = slot.lock().await;
        if slot.as_ref().is_some_and(|c| c.id == id) {
            *slot = None;
        }
    }

    /// The pooled HTTP/2 connection to `endpoint`, connecting if there is none (one connect at a
    /// time per endpoint: the async mutex is held across the connect on purpose, so concurrent
    /// requests wait for it instead of opening connections of their own).
    async fn h2_conn(&self, endpoint: SocketAddr) -> Result<H2Conn, ProxyError> {
        let slot = self.slot(endpoint);
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.sender.is_closed()
            && c.expires.is_none_or(|t| UnixTime::now() < t)
        {
            return Ok(c.clone());
        }
        if let Some(c) = slot.as_ref() {
            tracing::debug!(
                %endpoint,
                closed = c.sender.is_closed(),
                expired = c.expires.is_some_and(|t| UnixTime::now() >= t),
                "replacing pooled upstream connection"
            );
        }
        // Boxed, as every connect here: it is rare, and its future is large; inline, every
        // request's future would carry it, and be copied with it.
        let c = Box::pin(self.h2_open(endpoint)).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A new HTTP/2 connection to `endpoint`, driven on this worker.
    async fn h2_open(&self, endpoint: SocketAddr) -> Result<H2Conn, ProxyError> {
        let (io, peer) = self.connect(endpoint, StreamKind::H2).await?;
        let expires = self.identity_expiry(&io);
        let local = io.local_addr();
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(self.limits.initial_stream_window_size)
            .initial_connection_window_size(self.limits.initial_connection_window_size)
            .max_header_list_size(self.limits.max_request_headers_kb * 1024)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let (sender, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(handshake_failed(endpoint))?;
        self.drive(conn, endpoint);
        Ok(H2Conn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            sender,
            local,
            peer,
            expires,
        })
    }

    /// Runs a new upstream connection's I/O on this worker, counted in `upstream_cx_active` while
    /// it lives.
    fn drive(
        &self,
        conn: impl Future<Output = hyper::Result<()>> + Send + 'static,
        endpoint: SocketAddr,
    ) {
        let active = self.stats.upstream_cx_active.clone();
        active.inc();
        tokio::spawn(Box::pin(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %endpoint, "upstream connection ended");
            }
            active.dec();
        }));
    }

    /// The earlier of our SVID's and the peer's leaf expiry, for an mTLS stream.
    fn identity_expiry(&self, io: &Stream) -> Option<UnixTime> {
        let Stream::Tls(s) = io else { return None };
        let peer = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| identity::check_leaf(leaf).ok())
            .map(|l| l.not_after);
        let own = self
            .creds
            .borrow()
            .as_ref()
            .map(|c| c.svid.leaf().not_after);
        match (peer, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A fresh stream to an endpoint: TCP, then mTLS for peer clusters (with the ALPN that says
    /// what will be spoken). Returns the verified peer SPIFFE ID for mTLS.
    pub async fn connect(
        &self,
        endpoint: SocketAddr,
        kind: StreamKind,
    ) -> Result<(Stream, Option<Arc<str>>), ProxyError> {
        self.stats.upstream_cx_total.inc();
        let connect_fail = |reason: String| {
            self.stats.upstream_cx_connect_fail.inc();
            ProxyError::UpstreamConnect {
                endpoint: endpoint.to_string(),
                reason,
            }
        };
        let timed_out = || {
            self.stats.upstream_cx_connect_fail.inc();
            self.stats.upstream_cx_connect_timeout.inc();
            ProxyError::UpstreamConnectTimeout {
                endpoint: endpoint.to_string(),
            }
        };
        let tcp = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(endpoint))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| connect_fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok((Stream::Plain(tcp), None));
        };
        let connector = match kind {
            StreamKind::H2 => &tls.h2,
            StreamKind::Http1 => &tls.http1,
            StreamKind::Tcp => &tls.tcp,
        };
        let stream = tokio::time::timeout(
            self.config.connect_timeout,
            connector.connect(tls.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| {
            self.stats.upstream_cx_connect_fail.inc();
            ProxyError::UpstreamTls {
                endpoint: endpoint.to_string(),
                reason: error_chain(&e),
            }
        })?;
        let peer = identity::tls::peer_spiffe_id(stream.get_ref().1.peer_certificates())
            .map(|id| Arc::<str>::from(id.as_str()));
        Ok((Stream::Tls(Box::new(stream)), peer))
    }

    /// A one-off HTTP/1.1 connection for an upgrade (WebSocket): sends `req` and returns the
    /// response, whose upgrade the caller takes.
    pub async fn send_upgrade(&self, mut req: http::Request<Body>) -> Result<Sent, ProxyError> {
        let endpoint = self.pick()?;
        self.stats.upstream_rq_total.inc();
        let (io, peer) = self.connect(endpoint, StreamKind::Http1).await?;
        let local = io.local_addr();
        let handshake = |e: hyper::Error| ProxyError::Upgrade(error_chain(&e));
        set_host_from_uri(&mut req);
        *req.version_mut() = http::Version::HTTP_11;
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = path
            .parse()
            .map_err(|_| ProxyError::BadRequest("bad path"))?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(handshake)?;
        tokio::spawn(conn.with_upgrades());
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| ProxyError::UpstreamReset(error_chain(&e)))?;
        Ok(Sent {
            response,
            endpoint,
            peer,
            local,
        })
    }

    /// Picks an endpoint and opens a byte stream to it (TCP proxy).
    pub async fn open_tcp(&self) -> Result<(Stream, SocketAddr, Option<Arc<str>>), ProxyError> {
        let endpoint = self.pick()?;
        let (s, peer) = self.connect(endpoint, StreamKind::Tcp).await?;
        Ok((s, endpoint, peer))
    }
}

// === impl Stream ===

impl Stream {
    /// This proxy's end of the connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Plain(t) => t.local_addr().ok(),
            Self::Tls(t) => t.get_ref().0.local_addr().ok(),
        }
    }
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// What a fresh connection will carry (selects the ALPN offered to a peer).
#[derive(Debug, Clone, Copy)]
pub enum StreamKind {
    H2,
    Http1,
    Tcp,
}

/// A failed HTTP handshake on a new connection to `endpoint`, as an error.
fn handshake_failed(endpoint: SocketAddr) -> impl FnOnce(hyper::Error) -> ProxyError {
    move |e| ProxyError::UpstreamConnect {
        endpoint: endpoint.to_string(),
        reason: error_chain(&e),
    }
}

/// A copy of a request without a body: what is sent again when the peer refused the original.
fn head_of(req: &http::Request<Body>) -> http::Request<Body> {
    let mut copy = http::Request::new(crate::body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// Whether an HTTP/2 error says the peer did not process the stream: it arrived after (or was
/// opened past the last stream of) the peer's GOAWAY, or was refused with REFUSED_STREAM
/// (RFC 9113 §8.7). A reset or a closed connection says nothing of the kind.
fn unprocessed(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// HTTP/2 carries the authority in the URI; HTTP/1.1 needs it in Host.
fn set_host_from_uri(req: &mut http::Request<Body>) {
    if !req.headers().contains_key(http::header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
}
