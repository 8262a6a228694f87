//! Listeners: accept, pick a filter chain, and serve the connection as HTTP or TCP.
//!
//! Inbound listeners terminate mTLS (a client X509-SVID is required) and choose the chain by SNI
//! and ALPN; outbound listeners take plaintext from the app and choose by sniffing the first bytes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::Clusters;
use crate::config::{Direction, FilterChainMatch, Limits, Listener};
use crate::conn_slot::ConnSlot;
use crate::drain;
use crate::error::error_chain;
use crate::http::ConnCtx;
use crate::route::HttpChain;
use crate::stats::{EnvoyStats, Stat};
use crate::telemetry::{Reporter, Telemetry};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the outbound side waits for a client's first bytes before calling it opaque TCP, on a
/// listener with somewhere for opaque TCP to go (server-first protocols send nothing); a listener
/// of HTTP chains alone waits the header read timeout.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a connection closed for premature resets gets for its streams in flight.
const PREMATURE_RESET_CLOSE: Duration = Duration::from_secs(1);
/// Connections accepted while draining get this long before their HTTP/2 GOAWAY.
const DRAIN_GOAWAY_DELAY: Duration = Duration::from_secs(1);

/// A listener with its compiled filter chains. The chains are swapped whole when xDS changes the
/// listener; a connection picks its chain at accept, and each HTTP request re-reads it (by name), so
/// new policy applies to requests on connections that are already open.
pub struct ListenerRt {
    pub config: Listener,
    chains: Arc<ChainTable>,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    stats: ListenerStats,
    slots: Arc<Semaphore>,
}

/// A listener's chains, replaceable as a whole; `changes` ticks at each replacement.
pub struct ChainTable {
    chains: ArcSwap<Vec<ChainRt>>,
    changes: watch::Sender<u64>,
}

impl Default for ChainTable {
    fn default() -> Self {
        Self {
            chains: ArcSwap::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl ChainTable {
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The RBAC of the TCP chain of this name now (`None`: the chain is gone).
    fn tcp_rbac(&self, name: &str) -> Option<Option<Arc<policy::Engine>>> {
        self.chains.load().iter().find_map(|c| match &c.kind {
            ChainKind::Tcp { rbac, .. } if c.name == name => Some(rbac.clone()),
            _ => None,
        })
    }

    fn get(&self) -> Arc<Vec<ChainRt>> {
        self.chains.load_full()
    }

    fn set(&self, chains: Vec<ChainRt>) {
        self.chains.store(Arc::new(chains));
        self.changes.send_modify(|g| *g += 1);
    }

    /// The HTTP chain of this name now, if there still is one.
    fn http(&self, name: &str) -> Option<Arc<HttpChain>> {
        self.chains.load().iter().find_map(|c| match &c.kind {
            ChainKind::Http(h) if c.name == name => Some(h.clone()),
            _ => None,
        })
    }
}

/// The clusters in force, replaceable as a whole.
#[derive(Default)]
pub struct LiveClusters(ArcSwap<crate::ClusterMap>);

impl LiveClusters {
    pub fn get(&self) -> Clusters {
        self.0.load_full()
    }

    pub fn set(&self, clusters: Clusters) {
        self.0.store(clusters);
    }
}

/// What every connection of every listener needs.
pub struct Shared {
    pub clusters: LiveClusters,
    pub telemetry: Arc<Telemetry>,
    pub limits: Limits,
    /// This workload's name and app as the metadata headers its outbound requests carry (none
    /// if a name cannot be a header value).
    pub local_workload: Option<http::HeaderValue>,
    pub local_app: Option<http::HeaderValue>,
    /// Connections open across all listeners (Envoy's `server.total_connections`).
    pub total_connections: Stat,
    /// That count against `limits.global_max_connections`.
    pub overload: crate::conn_slot::Overload,
    pub authz_hook: Option<crate::AuthzHook>,
    /// The current SVID (rotates); connections are refused while there is no usable one.
    pub creds: identity::CredentialsRx,
    /// Listeners that bind nothing (`bind_to_port: false`), by address: where `use_original_dst`
    /// listeners hand connections.
    pub handoff: HandoffTable,
}

/// `bind_to_port: false` listeners by address, replaced as a whole by `Runtime::apply`.
#[derive(Default)]
pub struct HandoffTable(ArcSwap<HashMap<SocketAddr, Arc<ListenerRt>>>);

impl HandoffTable {
    pub fn set(&self, table: HashMap<SocketAddr, Arc<ListenerRt>>) {
        self.0.store(Arc::new(table));
    }

    /// The listener for a connection going to `dst`: the exact address, else the wildcard address
    /// of its family on that port (Envoy's order).
    pub fn find(&self, dst: SocketAddr) -> Option<Arc<ListenerRt>> {
        let table = self.0.load();
        let any: IpAddr = if dst.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        table
            .get(&dst)
            .or_else(|| table.get(&SocketAddr::new(any, dst.port())))
            .cloned()
    }
}

impl Shared {
    /// This proxy's SPIFFE ID now, if it holds a usable SVID.
    fn usable_id(&self) -> Option<Arc<str>> {
        let creds = self.creds.borrow();
        let c = creds.as_ref()?;
        c.usable(rustls_pki_types::UnixTime::now())
            .then(|| c.svid.spiffe_id().as_str().into())
    }
}

#[derive(Clone)]
pub struct ChainRt {
    name: String,
    matcher: FilterChainMatch,
    kind: ChainKind,
}

#[derive(Clone)]
enum ChainKind {
    Http(Arc<HttpChain>),
    Tcp {
        cluster: String,
        rbac: Option<Arc<policy::Engine>>,
    },
    /// Closes the connection (an xDS chain asking for something unsupported).
    Refuse(Arc<str>),
}

/// Compiles a listener's chains. Chains that fail to compile are left out (the config was validated
/// before it got here; this only guards against a bug turning into a wider chain).
/// A connection manager's own tracer (xDS `tracing`), exporting to its address or to the first
/// endpoint of its cluster as the cluster is now; its export task ends with the last handle.
fn chain_tracer(
    hcm: &crate::config::HttpConnectionManager,
    shared: &Shared,
) -> Option<Arc<crate::trace::Tracer>> {
    let t = hcm.tracing.as_ref()?;
    let address = match (&t.address, &t.cluster) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => match shared
            .clusters
            .get()
            .get(c)
            .and_then(|rt| rt.config.endpoints.first().copied())
        {
            Some(e) => e.to_string(),
            None => {
                tracing::warn!(cluster = %c, "tracing cluster has no endpoint (yet); calls on this chain are not traced");
                return None;
            }
        },
        (None, None) => return None,
    };
    let config = crate::trace::TracingConfig {
        sampling: t.sampling,
        address,
        max_queue: 2048,
    };
    let telemetry = &shared.telemetry;
    match crate::trace::Tracer::new(&config, &telemetry.node.trace_origin(), &telemetry.stats) {
        Ok((tracer, export)) => {
            tokio::spawn(export.run_until_dropped());
            Some(Arc::new(tracer))
        }
        Err(e) => {
            tracing::warn!(error = %e, "connection manager tracing not started");
            None
        }
    }
}

pub fn build_chains(config: &Listener, shared: &Shared) -> Vec<ChainRt> {
    let stats = &shared.telemetry.stats;
    config
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, fc)| {
            // Requests find their chain again by name, so names must be unique: an empty or
            // repeated name gets the chain's position.
            let repeated = config.filter_chains[..i].iter().any(|o| o.name == fc.name);
            let name = if fc.name.is_empty() || repeated {
                format!("{}#{i}", config.name)
            } else {
                fc.name.clone()
            };
            let kind = if let Some(reason) = &fc.refuse {
                ChainKind::Refuse(reason.as_str().into())
            } else {
                match (&fc.http_connection_manager, &fc.tcp_proxy) {
                    (Some(hcm), _) => match HttpChain::new(hcm, stats, chain_tracer(hcm, shared)) {
                        Ok(h) => ChainKind::Http(h),
                        Err(e) => ChainKind::Refuse(e.to_string().into()),
                    },
                    (None, Some(tcp)) => match crate::config::compile_rbac(&fc.rbac_filters) {
                        Ok(rbac) => ChainKind::Tcp {
                            cluster: tcp.cluster.clone(),
                            rbac: rbac.map(Arc::new),
                        },
                        Err(e) => ChainKind::Refuse(e.to_string().into()),
                    },
                    (None, None) => ChainKind::Refuse("no network filter".into()),
                }
            };
            ChainRt {
                name,
                matcher: fc.filter_chain_match.clone(),
                kind,
            }
        })
        .collect()
}

struct ListenerStats {
    downstream_cx_total: Stat,
    downstream_cx_active: Stat,
    /// Envoy's `downstream_rq_too_many_premature_resets`.
    premature_resets: Stat,
    downstream_global_cx_overflow: Stat,
    downstream_cx_overflow: Stat,
    no_filter_chain_match: Stat,
    /// eastguard: redirected connections whose original destination could not be read.
    original_dst_missing: Stat,
    ssl_handshake_error: Stat,
    downstream_cx_no_svid: Stat,
    /// Envoy's `downstream_rq_header_timeout`: request headers not complete within
    /// `limits.header_read_timeout` (HTTP/1.1; the connection is closed).
    downstream_rq_header_timeout: Stat,
}

/// What the TLS handshake established about the downstream peer (nothing, for plaintext).
#[derive(Default)]
struct Peer {
    id: Option<Arc<str>>,
    cert_hash: Option<String>,
    sni: Option<Arc<str>>,
}

/// The two drain signals a connection watches (drain started, and listeners stopped), and its
/// place in the listener's limit.
struct Draining {
    watch: drain::Watch,
    stop: watch::Receiver<bool>,
    slot: Arc<ConnSlot>,
}

/// What the first bytes from an app look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    Http1,
    H2c,
    Tcp,
}

// === impl ListenerRt ===

impl ListenerRt {
    pub fn new(
        config: Listener,
        tls: Option<TlsAcceptor>,
        shared: Arc<Shared>,
        stats: &EnvoyStats,
    ) -> Self {
        let chains = Arc::new(ChainTable::default());
        chains.set(build_chains(&config, &shared));
        let s = |n: &str| stats.stat(&format!("listener.{}.{n}", config.address));
        let stats = ListenerStats {
            downstream_cx_total: s("downstream_cx_total"),
            downstream_cx_active: s("downstream_cx_active"),
            premature_resets: s("downstream_rq_too_many_premature_resets"),
            downstream_global_cx_overflow: s("downstream_global_cx_overflow"),
            downstream_cx_overflow: s("downstream_cx_overflow"),
            no_filter_chain_match: s("no_filter_chain_match"),
            original_dst_missing: s("original_dst_missing"),
            ssl_handshake_error: s("ssl.handshake_error"),
            downstream_cx_no_svid: s("downstream_cx_no_svid"),
            downstream_rq_header_timeout: s("downstream_rq_header_timeout"),
        };
        Self {
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            chains,
            tls,
            shared,
            stats,
        }
    }

    /// Replaces the chains (same name, address and direction; xDS updates).
    pub fn update(&self, config: &Listener) {
        self.chains.set(build_chains(config, &self.shared));
    }

    /// Accepts until `stop` flips; each connection watches `drain`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
        drain: drain::ListenerHandle,
    ) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %self.config.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.shared.overload.full() {
                self.stats.downstream_global_cx_overflow.inc();
                drop(tcp);
                continue;
            }
            // Fail closed: no usable SVID (none yet, or expired without renewal) → no traffic.
            let Some(local_id) = self.shared.usable_id() else {
                self.stats.downstream_cx_no_svid.inc();
                drop(tcp);
                continue;
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.stats.downstream_cx_overflow.inc();
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let watch = drain.watch();
            let stop = stop.clone();
            // Every log line of the connection carries its listener, peer address and (once the
            // handshake verified it) peer SPIFFE ID.
            let span = tracing::info_span!(
                "conn",
                listener = %self.config.name,
                remote = %remote,
                peer = tracing::field::Empty,
            );
            // Served where it was accepted: on a worker, its socket's own (`workers`).
            // Boxed before it is spawned: the connection's state machine is about 11 KiB, and
            // spawning moves a future several times (and once more when it ends).
            tokio::spawn(Box::pin(
                async move {
                    this.stats.downstream_cx_total.inc();
                    let slot = Arc::new(ConnSlot::new(
                        permit,
                        vec![
                            this.stats.downstream_cx_active.clone(),
                            this.shared.total_connections.clone(),
                        ],
                    ));
                    this.serve_conn(tcp, remote, local_id, Draining { watch, stop, slot })
                        .await;
                }
                .instrument(span),
            ));
        }
        tracing::info!(listener = %self.config.name, "listener closed");
    }

    async fn serve_conn(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        local_id: Arc<str>,
        drain: Draining,
    ) {
        let mut local = tcp.local_addr().unwrap_or(self.config.address);
        if self.config.original_dst || self.config.use_original_dst {
            match original_dst(&tcp, local) {
                Ok(dst) => local = dst,
                Err(e) => {
                    // As Envoy's original_dst filter: the connection keeps its local address (and
                    // only chains that match it serve it). Sidecar-generated outbound chains name
                    // destinations, so a connection that was not redirected matches none of them.
                    self.stats.original_dst_missing.inc();
                    tracing::debug!(%remote, error = %e, listener = %self.config.name, "no original destination");
                }
            }
        }
        if self.config.use_original_dst
            && let Some(target) = self.shared.handoff.find(local)
        {
            // Envoy's hand-off: the listener at the original destination serves it.
            tracing::trace!(from = %self.config.name, to = %target.config.name, %local, "hand-off");
            target.stats.downstream_cx_total.inc();
            return target.dispatch(tcp, remote, local, local_id, drain).await;
        }
        self.dispatch(tcp, remote, local, local_id, drain).await
    }

    async fn dispatch(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        local: SocketAddr,
        local_id: Arc<str>,
        drain: Draining,
    ) {
        // Each direction's future boxed on its own: as one enum, an outbound plaintext
        // connection would hold as much memory as an inbound TLS one.
        match self.config.direction {
            Direction::Inbound => {
                Box::pin(self.serve_inbound(tcp, remote, local, local_id, drain)).await
            }
            Direction::Outbound => {
                Box::pin(self.serve_outbound(tcp, remote, local, local_id, drain)).await
            }
        }
    }

    async fn serve_inbound(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        local: SocketAddr,
        local_id: Arc<str>,
        drain: Draining,
    ) {
        let Some(acceptor) = &self.tls else { return };
        // Envoy's tls_inspector: a TLS connection starts with a handshake record (0x16).
        let mut first = [0u8; 1];
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 0x16 => {}
            Ok(Ok(1)) => {
                return self
                    .serve_plaintext_inbound(tcp, remote, local, local_id, drain)
                    .await;
            }
            _ => return,
        }
        let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.stats.ssl_handshake_error.inc();
                tracing::debug!(%remote, error = %e, "inbound TLS handshake failed");
                self.shared.telemetry.audit.connection_refused(
                    remote,
                    local,
                    None,
                    &format!("mTLS handshake failed: {e}"),
                );
                return;
            }
            Err(_) => {
                self.stats.ssl_handshake_error.inc();
                self.shared.telemetry.audit.connection_refused(
                    remote,
                    local,
                    None,
                    "mTLS handshake timed out",
                );
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let sni: Option<Arc<str>> = session.server_name().map(Into::into);
        let alpn = session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let leaf = session.peer_certificates().and_then(|c| c.first());
        let peer_cert_hash =
            leaf.map(|c| hex(ring::digest::digest(&ring::digest::SHA256, c).as_ref()));
        let peer_id = identity::tls::peer_spiffe_id(session.peer_certificates())
            .map(|id| Arc::<str>::from(id.as_str()));
        if let Some(id) = &peer_id {
            tracing::Span::current().record("peer", &**id);
        }
        let chains = self.chains.get();
        let conn = crate::chain_match::Conn {
            local,
            sni: sni.as_deref(),
            transport: "tls",
            protocol: alpn.as_deref(),
            inbound: true,
        };
        let Some(chain) = crate::chain_match::select(&chains, |c| &c.matcher, &conn)
            .into_iter()
            .next()
        else {
            self.stats.no_filter_chain_match.inc();
            tracing::debug!(%remote, ?sni, ?alpn, "no inbound filter chain matches");
            return;
        };
        let ctx = self.conn_ctx(
            Reporter::Destination,
            remote,
            local,
            local_id,
            Peer {
                id: peer_id,
                cert_hash: peer_cert_hash,
                sni,
            },
            &drain,
        );
        tracing::trace!(chain = %chain.name, "inbound connection");
        self.serve_chain(tls, ctx, chain, drain, Wire::of_alpn(alpn.as_deref()))
            .await;
    }

    /// Plaintext on an inbound listener: only a `raw_buffer` chain (Istio PERMISSIVE / DISABLE)
    /// takes it, and the caller has no identity. Without such a chain (STRICT) it is closed.
    async fn serve_plaintext_inbound(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        local: SocketAddr,
        local_id: Arc<str>,
        drain: Draining,
    ) {
        let chains = self.chains.get();
        let conn = crate::chain_match::Conn {
            local,
            sni: None,
            transport: "raw_buffer",
            protocol: None,
            inbound: true,
        };
        let Some(chain) = crate::chain_match::select(&chains, |c| &c.matcher, &conn)
            .into_iter()
            .next()
        else {
            self.stats.no_filter_chain_match.inc();
            tracing::debug!(%remote, "plaintext on an mTLS-only inbound listener; closing");
            return;
        };
        let ctx = self.conn_ctx(
            Reporter::Destination,
            remote,
            local,
            local_id,
            Peer::default(),
            &drain,
        );
        self.serve_chain(tcp, ctx, chain, drain, Wire::Detect).await;
    }

    async fn serve_outbound(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        local: SocketAddr,
        local_id: Arc<str>,
        drain: Draining,
    ) {
        // Protocol detection gives up early only where opaque TCP has somewhere to go: a client
        // that waits for the server to speak first. On a listener of HTTP chains alone, a client
        // slow to send its first bytes is still an HTTP client, so it gets the header read timeout.
        let tcp_possible = self
            .chains
            .get()
            .iter()
            .any(|c| matches!(c.kind, ChainKind::Tcp { .. } | ChainKind::Refuse(_)));
        let patience = if tcp_possible {
            SNIFF_TIMEOUT
        } else {
            self.shared.limits.header_read_timeout.max(SNIFF_TIMEOUT)
        };
        let sniffed = sniff(&tcp, patience).await;
        let chains = self.chains.get();
        let conn = crate::chain_match::Conn {
            local,
            sni: None,
            transport: "raw_buffer",
            inbound: false,
            protocol: Some(match sniffed {
                Sniffed::Http1 => "http/1.1",
                Sniffed::H2c => "h2c",
                Sniffed::Tcp => "tcp",
            }),
        };
        // Among equally specific chains, the first whose filter can speak what was sniffed.
        let Some(chain) = crate::chain_match::select(&chains, |c| &c.matcher, &conn)
            .into_iter()
            .find(|c| {
                matches!(
                    (&c.kind, sniffed),
                    (ChainKind::Tcp { .. } | ChainKind::Refuse(_), _)
                        | (ChainKind::Http(_), Sniffed::Http1 | Sniffed::H2c)
                )
            })
        else {
            self.stats.no_filter_chain_match.inc();
            tracing::debug!(%remote, ?sniffed, "no outbound filter chain matches");
            return;
        };
        let ctx = self.conn_ctx(
            Reporter::Source,
            remote,
            local,
            local_id,
            Peer::default(),
            &drain,
        );
        let wire = match sniffed {
            Sniffed::H2c => Wire::H2,
            Sniffed::Http1 => Wire::Http1,
            Sniffed::Tcp => Wire::Detect,
        };
        self.serve_chain(tcp, ctx, chain, drain, wire).await;
    }

    fn conn_ctx(
        &self,
        reporter: Reporter,
        remote: SocketAddr,
        local: SocketAddr,
        local_id: Arc<str>,
        peer: Peer,
        drain: &Draining,
    ) -> Arc<ConnCtx> {
        Arc::new(ConnCtx {
            reporter,
            remote,
            local,
            peer_id: peer.id,
            peer_cert_hash: peer.cert_hash,
            sni: peer.sni,
            local_id,
            local_workload: self.shared.local_workload.clone(),
            local_app: self.shared.local_app.clone(),
            drain: drain.watch.clone(),
            stop: drain.stop.clone(),
            slot: drain.slot.clone(),
            overload: self.shared.overload.clone(),
            activity: crate::idle::Activity::new(),
            resets: Arc::default(),
            stream_idle_timeout: self.shared.limits.stream_idle_timeout,
            connection_idle_timeout: self.shared.limits.connection_idle_timeout,
            xfcc: std::sync::OnceLock::new(),
        })
    }

    /// Runs a chain's network filter on the connection: HTTP or TCP proxy.
    async fn serve_chain<I>(
        &self,
        io: I,
        ctx: Arc<ConnCtx>,
        chain: &ChainRt,
        drain: Draining,
        wire: Wire,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match &chain.kind {
            ChainKind::Http(_) => {
                self.serve_http(io, ctx, chain.name.clone(), drain, wire)
                    .await
            }
            ChainKind::Tcp { cluster, rbac } => {
                let Some(cluster) = self.shared.clusters.get().get(cluster).cloned() else {
                    tracing::debug!(%cluster, "TCP proxy to a cluster that does not exist; closing");
                    return;
                };
                let table = self.chains.clone();
                let name = chain.name.clone();
                let recheck = crate::tcp::Recheck {
                    changes: self.chains.changes(),
                    current: Box::new(move || table.tcp_rbac(&name)),
                };
                crate::tcp::proxy(
                    io,
                    &ctx,
                    &cluster,
                    rbac.as_deref(),
                    &self.shared.telemetry,
                    Some(recheck),
                )
                .await
            }
            ChainKind::Refuse(reason) => {
                tracing::debug!(chain = %chain.name, %reason, "connection refused by chain");
            }
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 (detected by preface) until the peer closes or a drain ends it.
    ///
    /// Draining: HTTP/2 gets GOAWAY at once (in-flight streams finish; clients open a new
    /// connection for new ones). HTTP/1.1 gets `Connection: close` on its next response (see
    /// `http::handle`), and an idle keep-alive connection is closed only when the drain window
    /// ends: closing it earlier races with a request the client may be sending on it.
    async fn serve_http<I>(
        &self,
        io: I,
        ctx: Arc<ConnCtx>,
        chain_name: String,
        drain: Draining,
        wire: Wire,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Draining {
            watch: mut drain,
            mut stop,
            slot: _,
        } = drain;
        let draining_at_accept = drain.is_draining();
        let h2 = wire == Wire::H2;
        let limits = &self.shared.limits;
        let shared = self.shared.clone();
        let chains = self.chains.clone();
        let telemetry = self.shared.telemetry.clone();
        let hook = self.shared.authz_hook.clone();
        let activity = ctx.activity.clone();
        let resets = ctx.resets.clone();
        let remote = ctx.remote;
        let io = crate::idle::ActivityIo::new(io, activity.clone());
        let idle_timeout = self.shared.limits.connection_idle_timeout;
        let recheck = {
            let table = chains.clone();
            let name = chain_name.clone();
            crate::http::upgrade::ChainRecheck {
                changes: chains.changes(),
                current: Arc::new(move || table.http(&name)),
            }
        };
        // A request's future, as `$wrap` gives it to hyper. HTTP/2: boxed, since hyper moves it
        // into the task it spawns per stream, and moving the whole state machine costs more than
        // allocating it once. HTTP/1.1: as it is; hyper keeps it in one allocation per
        // connection, and a box per request (several KiB: glibc's slow path) cost more than the
        // move.
        macro_rules! service {
            ($wrap:path) => {
                hyper::service::service_fn(move |req| {
                    $wrap(crate::http::handle(
                        ctx.clone(),
                        chains.http(&chain_name),
                        shared.clusters.get(),
                        telemetry.clone(),
                        hook.clone(),
                        recheck.clone(),
                        req,
                    ))
                })
            };
        }
        let io = TokioIo::new(io);
        // One body for the three kinds of connection below.
        macro_rules! serve {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                let result: Result<(), BoxError> = tokio::select! {
                    r = conn.as_mut() => r.map_err(Into::into),
                    () = activity.idle(idle_timeout) => {
                        tracing::debug!(timeout = ?idle_timeout, "closing idle connection");
                        conn.as_mut().graceful_shutdown();
                        conn.await.map_err(Into::into)
                    }
                    () = resets.tripped() => {
                        // GOAWAY, and a short wait for streams in flight; the client gets no more.
                        tracing::warn!(remote = %remote, "closing a connection whose client resets most streams early");
                        self.stats.premature_resets.inc();
                        conn.as_mut().graceful_shutdown();
                        tokio::time::timeout(PREMATURE_RESET_CLOSE, conn)
                            .await
                            .unwrap_or(Ok(()))
                            .map_err(Into::into)
                    }
                    _ = async {
                        if h2 {
                            drain.signaled().await;
                            if draining_at_accept {
                                tokio::time::sleep(DRAIN_GOAWAY_DELAY).await;
                            }
                        } else {
                            let _ = stop.wait_for(|s| *s).await;
                        }
                    } => {
                        // HTTP/2: GOAWAY; HTTP/1.1: `Connection: close` on the response in flight.
                        conn.as_mut().graceful_shutdown();
                        conn.await.map_err(Into::into)
                    }
                };
                result
            }};
        }
        // A protocol known from ALPN or the sniffed first bytes is served as it is; hyper-util's
        // detection would read the first bytes once more and hand them back through a wrapper,
        // and HTTP/1.1 would then grow its read buffer to 16 KiB on every connection.
        let result = match wire {
            Wire::Http1 => serve!(
                http1_server(limits, draining_at_accept)
                    .serve_connection(io, service!(std::convert::identity))
                    .with_upgrades()
            ),
            Wire::H2 => serve!(http2_server(limits).serve_connection(io, service!(Box::pin))),
            Wire::Detect => {
                let builder = server_builder(limits, draining_at_accept);
                serve!(builder.serve_connection_with_upgrades(io, service!(Box::pin)))
            }
        };
        if let Err(e) = result {
            if e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
            {
                self.stats.downstream_rq_header_timeout.inc();
            }
            tracing::debug!(error = %error_chain(&*e), "downstream connection ended with an error");
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a downstream HTTP connection is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Http1,
    H2,
    /// Unknown (plaintext inbound, TLS without ALPN): told apart by the HTTP/2 preface.
    Detect,
}

impl Wire {
    /// As Envoy's codec `AUTO` does with TLS: the protocol ALPN settled on is the one spoken.
    fn of_alpn(alpn: Option<&str>) -> Self {
        match alpn {
            Some("h2" | "istio-h2") => Self::H2,
            Some("http/1.1" | "http/1.0" | "istio-http/1.1" | "istio-http/1.0") => Self::Http1,
            _ => Self::Detect,
        }
    }
}

// The same settings for a connection of known protocol (hyper's builders) and one detected
// (hyper-util's, whose per-protocol builders take the same calls).
macro_rules! http1_settings {
    ($b:expr, $limits:expr, $draining:expr) => {
        $b.timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size(($limits.max_request_headers_kb as usize * 1024).max(8192))
            .max_headers($limits.max_headers_count)
            .keep_alive(!$draining)
    };
}

macro_rules! http2_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams($limits.max_concurrent_streams)
            .initial_stream_window_size($limits.initial_stream_window_size)
            .initial_connection_window_size($limits.initial_connection_window_size)
            .max_header_list_size($limits.max_request_headers_kb * 1024)
            .max_pending_accept_reset_streams($limits.max_pending_accept_reset_streams)
            .max_local_error_reset_streams($limits.max_local_error_reset_streams)
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

fn http1_server(limits: &Limits, draining: bool) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    http1_settings!(b, limits, draining);
    b
}

fn http2_server(limits: &Limits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2_settings!(b, limits);
    b
}

fn server_builder(limits: &Limits, draining: bool) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_settings!(b.http1(), limits, draining);
    http2_settings!(b.http2(), limits);
    b
}

/// Looks at an app's first bytes without consuming them.
async fn sniff(tcp: &TcpStream, patience: Duration) -> Sniffed {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"CONNECT ",
    ];
    let deadline = tokio::time::Instant::now() + patience;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Sniffed::Tcp,
        };
        let seen = &buf[..n];
        if seen.starts_with(H2_PREFACE) {
            return Sniffed::H2c;
        }
        if METHODS.iter().any(|m| seen.starts_with(m)) {
            return Sniffed::Http1;
        }
        let could_be = H2_PREFACE.starts_with(seen) || METHODS.iter().any(|m| m.starts_with(seen));
        if !could_be || n == buf.len() {
            return Sniffed::Tcp;
        }
        // A prefix of something HTTP: wait for more bytes, until the deadline.
        if tokio::time::Instant::now() >= deadline {
            return Sniffed::Tcp;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The destination a redirected connection had before capture sent it here: eBPF capture's
/// `cgroup/getsockopt` program and iptables' REDIRECT both answer `SO_ORIGINAL_DST`.
fn original_dst(tcp: &TcpStream, local: SocketAddr) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }?;
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("SO_ORIGINAL_DST gave a non-IP address"))
}

/// A listener's sockets: one, or with workers one per worker in a `SO_REUSEPORT` group.
pub enum Listening {
    One(TcpListener),
    PerWorker(Vec<std::net::TcpListener>),
}

/// Binds a listener's address for the data plane: one socket per worker when workers run.
///
/// A plain bind comes first, so a port that anything holds (with `SO_REUSEPORT` or without) is
/// refused as in use: the listener never joins another socket's group. Linux admits only sockets
/// of the same user to a group, and that user is the sidecar's own.
pub fn bind_listening(name: &str, addr: SocketAddr) -> Result<Listening, crate::StartError> {
    match crate::workers::count() {
        0 => bind(name, addr).map(Listening::One),
        n => bind_group(name, addr, n).map(Listening::PerWorker),
    }
}

/// `n` listening sockets in one `SO_REUSEPORT` group at `addr` (its port chosen once if 0).
fn bind_group(
    name: &str,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, crate::StartError> {
    let probe = socket(name, addr, false, false)?;
    let addr = probe.local_addr().unwrap_or(addr);
    drop(probe);
    (0..n).map(|_| socket(name, addr, true, true)).collect()
}

/// Binds a listener's address (errors say which listener). An IPv6 address binds IPv6 only, as
/// Envoy does, so `0.0.0.0:P` and `[::]:P` can be two listeners.
pub fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, crate::StartError> {
    let std = socket(name, addr, false, true)?;
    TcpListener::from_std(std).map_err(|source| crate::StartError::Bind {
        name: name.to_owned(),
        addr,
        source,
    })
}

/// A bound, non-blocking socket; listening if `listen`.
fn socket(
    name: &str,
    addr: SocketAddr,
    reuse_port: bool,
    listen: bool,
) -> Result<std::net::TcpListener, crate::StartError> {
    let err = |source| crate::StartError::Bind {
        name: name.to_owned(),
        addr,
        source,
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    sock.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        sock.set_reuse_port(true).map_err(err)?;
    }
    sock.bind(&addr.into()).map_err(err)?;
    if listen {
        sock.listen(1024).map_err(err)?;
    }
    sock.set_nonblocking(true).map_err(err)?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_group_shares_one_port_and_never_joins_another_group() {
        let group = bind_group("l", "127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(group.iter().all(|s| s.local_addr().unwrap().port() == port));
        // Someone else's SO_REUSEPORT socket holds the port: refused as in use, not joined.
        let theirs =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        theirs.set_reuse_port(true).unwrap();
        theirs
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        theirs.listen(8).unwrap();
        let taken = theirs.local_addr().unwrap().as_socket().unwrap();
        let err = bind_group("l", taken, 2).expect_err("joined another group");
        assert!(err.to_string().contains("in use"), "{err}");
        // Our own group holds its port the same way.
        assert!(bind_group("l", group[0].local_addr().unwrap(), 1).is_err());
    }
}
