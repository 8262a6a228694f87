//! eastguard's data plane: the sidecar proxy.
//!
//! Inbound listeners terminate mTLS with SPIFFE X509-SVIDs and forward to the local app; outbound
//! listeners take the app's plaintext (HTTP/1.1, h2c or opaque TCP, sniffed) and carry it to peer
//! sidecars over pooled, multiplexed HTTP/2 on mTLS. Configuration is an Envoy-shaped model; the
//! admin API, metrics and access log follow Envoy and Istio so existing tools work.
//!
//! This crate must never forward a request whose peer it could not verify, never pass a
//! client-supplied identity header (XFCC, `x-envoy-*`, `x-eastguard-*`) upstream, and never panic on
//! anything a peer sends.

mod access_log;
pub mod admin;
mod body;
pub mod config;
mod drain;
pub mod envoy;
mod error;
mod http;
mod idle;
mod listener;
mod route;
mod stats;
mod tcp;
mod telemetry;
mod upgrade;
mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use identity::{CredentialsRx, FileSource, TrustDomain};
use tokio::sync::watch;

pub use admin::LogControl;
pub use config::{Bootstrap, ConfigError};
pub use error::{ErrorResponse, ProxyError};

use crate::admin::{AdminState, Port};
use crate::listener::{ListenerRt, Shared};
use crate::upstream::ClusterRt;

/// ALPN the inbound listener accepts: HTTP/2 and HTTP/1.1, with Istio's names, and Istio's TCP value.
const INBOUND_ALPN: &[&[u8]] = &[
    b"h2",
    b"istio-h2",
    b"http/1.1",
    b"istio-http/1.1",
    b"istio",
    b"istio-peer-exchange",
];

/// Clusters by name, shared by every listener.
pub(crate) type Clusters = Arc<HashMap<String, Arc<ClusterRt>>>;

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("identity: {0}")]
    Identity(#[from] identity::SourceError),
    #[error("identity: trust domain {name:?}: {source}")]
    TrustDomain {
        name: String,
        #[source]
        source: identity::SpiffeIdError,
    },
    #[error(
        "identity: no identity source configured (identity.files, or identity.workload_api with a socket or SPIFFE_ENDPOINT_SOCKET)"
    )]
    NoIdentitySource,
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listener {name} cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("access log: {0}")]
    AccessLog(std::io::Error),
}

/// Knobs the binary passes in.
#[derive(Default)]
pub struct RunOptions {
    pub log_control: Option<LogControl>,
    pub command_line: Vec<String>,
    /// Called with every authorization decision (audit events build on this).
    pub authz_hook: Option<AuthzHook>,
}

/// One authorization decision, as the decision hook sees it.
#[derive(Debug, Clone)]
pub struct AuthzEvent {
    pub allowed: bool,
    /// The deciding policy, if one decided.
    pub policy: Option<String>,
    /// The verified caller SPIFFE ID (`None` for a plaintext caller).
    pub principal: Option<String>,
    pub method: String,
    /// The normalized path the decision was made on.
    pub path: String,
    pub authority: String,
    pub dry_run: Option<(bool, Option<String>)>,
}

/// Receives every authorization decision; must be quick (it runs on the request path).
pub type AuthzHook = std::sync::Arc<dyn Fn(&AuthzEvent) + Send + Sync>;

/// Starts the proxy and runs until `shutdown` resolves (SIGTERM) or `/quitquitquit`, then drains:
/// not ready at once, connections told to close (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`),
/// listeners open for `drain.duration`, in-flight requests given `drain.grace` more, then return.
pub async fn run(
    config: Bootstrap,
    shutdown: impl Future<Output = ()>,
    opts: RunOptions,
) -> Result<(), StartError> {
    let creds = credentials(&config)?;
    let stats = stats::EnvoyStats::default();
    let access_log =
        access_log::AccessLog::open(config.access_log.as_ref(), stats.stat("access_log.dropped"))
            .map_err(StartError::AccessLog)?;
    let telemetry = Arc::new(telemetry::Telemetry::new(&config.node, access_log, stats));

    let mut clusters = HashMap::new();
    for c in &config.clusters {
        let rt = ClusterRt::new(c.clone(), &creds, &config.limits, &telemetry.stats)?;
        clusters.insert(c.name.clone(), Arc::new(rt));
    }
    let live_clusters = Arc::new(clusters);
    let shared = Arc::new(Shared {
        clusters: listener::LiveClusters::default(),
        telemetry: telemetry.clone(),
        limits: config.limits.clone(),
        local_workload: config.node.workload.as_str().into(),
        local_app: config
            .node
            .app
            .as_deref()
            .unwrap_or(&config.node.workload)
            .into(),
        total_connections: telemetry.stats.stat("server.total_connections"),
        creds: creds.clone(),
        authz_hook: opts.authz_hook,
    });
    shared.clusters.set(live_clusters);
    let server_tls = Arc::new(identity::tls::server_config(creds.clone(), INBOUND_ALPN)?);

    // Bind everything before serving anything: a port in use is a start failure, not a half-up proxy.
    let mut bound = Vec::new();
    for l in &config.listeners {
        let tcp = listener::bind(&l.name, l.address)?;
        let tls = (l.direction == config::Direction::Inbound)
            .then(|| tokio_rustls::TlsAcceptor::from(server_tls.clone()));
        bound.push((
            Arc::new(ListenerRt::new(
                l.clone(),
                tls,
                shared.clone(),
                &telemetry.stats,
            )),
            tcp,
        ));
    }
    let admin_ports = [
        (Some(config.admin.address), Port::Admin),
        (config.admin.health_address, Port::Health),
        (config.admin.prometheus_address, Port::Prometheus),
    ];
    let mut admin_bound = Vec::new();
    for (addr, port) in admin_ports {
        if let Some(addr) = addr {
            admin_bound.push((listener::bind("admin", addr)?, port));
        }
    }

    let config = Arc::new(config);
    let state = Arc::new(AdminState {
        config: config.clone(),
        telemetry: telemetry.clone(),
        creds,
        draining: false.into(),
        healthcheck_failed: false.into(),
        started: tokio::time::Instant::now(),
        quit: tokio::sync::Notify::new(),
        log_control: opts.log_control,
        command_line: opts.command_line,
    });
    let mut admin_tasks = Vec::new();
    for (tcp, port) in admin_bound {
        admin_tasks.push(tokio::spawn(admin::serve(tcp, state.clone(), port)));
    }

    let (drain_signal, drain_watch) = drain::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut listener_tasks = Vec::new();
    for (rt, tcp) in bound {
        tracing::info!(listener = %rt.config.name, address = %rt.config.address, direction = ?rt.config.direction, "listening");
        let signal = drain::Signal::from_watch(&drain_signal);
        listener_tasks.push(tokio::spawn(rt.serve(tcp, stop_rx.clone(), signal)));
    }
    drop(drain_watch);
    tracing::info!(admin = %config.admin.address, "eastguard proxy started");

    tokio::select! {
        () = shutdown => tracing::info!("shutdown signal received; draining"),
        () = state.quit.notified() => tracing::info!("/quitquitquit received; draining"),
    }
    state.draining.store(true, Ordering::Relaxed);
    drain_signal.start();
    let drain_cfg = &config.drain;
    // Keep accepting (each new connection told to close) for the drain window, or until idle.
    let window_end = tokio::time::Instant::now() + drain_cfg.duration;
    while tokio::time::Instant::now() < window_end && shared.total_connections.get() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send_replace(true);
    for t in listener_tasks {
        let _ = t.await;
    }
    if tokio::time::timeout(drain_cfg.grace, drain_signal.finished())
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.total_connections.get(),
            "drain grace period over; closing remaining connections"
        );
    }
    for t in admin_tasks {
        t.abort();
    }
    tracing::info!("drained; exiting");
    Ok(())
}

fn credentials(config: &Bootstrap) -> Result<CredentialsRx, StartError> {
    if let Some(api) = &config.identity.workload_api {
        let socket = api
            .socket
            .clone()
            .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
            .ok_or(StartError::NoIdentitySource)?;
        let path = socket
            .strip_prefix("unix://")
            .or_else(|| socket.strip_prefix("unix:"))
            .unwrap_or(&socket);
        tracing::info!(
            socket = path,
            "identity from the SPIFFE Workload API; not ready until the first SVID"
        );
        return Ok(identity::WorkloadApiSource {
            socket: path.into(),
        }
        .watch());
    }
    let Some(files) = &config.identity.files else {
        // Validation requires a source; without one there is nothing to present, so refuse.
        return Err(StartError::NoIdentitySource);
    };
    let federated = files
        .federated_bundles
        .iter()
        .map(|(td, path)| {
            TrustDomain::parse(td)
                .map(|td| (td, path.clone()))
                .map_err(|source| StartError::TrustDomain {
                    name: td.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let source = FileSource {
        cert: files.cert.clone(),
        key: files.key.clone(),
        bundle: files.bundle.clone(),
        federated,
        poll_interval: files.poll_interval,
    };
    Ok(source.watch()?)
}
