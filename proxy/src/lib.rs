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

pub mod access_log;
pub mod admin;
mod ads;
pub mod app_probe;
pub mod audit;
mod body;
mod chain_match;
pub mod config;
mod conn_slot;
mod drain;
pub mod drift;
pub mod envoy;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod idle;
mod inventory_export;
mod listener;
mod rng;
mod route;
pub mod runtime;
mod sampling;
pub mod stats;
mod tcp;
mod telemetry;
pub mod trace;
mod upstream;
pub mod workers;

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
use crate::listener::Shared;
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

/// Clusters by name, shared by every listener. Names come from the configuration and each
/// request looks one up, so the hash is foldhash (seeded per map), not SipHash.
pub(crate) type ClusterMap = HashMap<String, Arc<ClusterRt>, foldhash::fast::RandomState>;
pub(crate) type Clusters = Arc<ClusterMap>;

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
    #[error("sensitive-data sampling: {0}")]
    Sampling(std::io::Error),
    #[error("audit log: {0}")]
    Audit(std::io::Error),
    #[error("tracing: {0}")]
    Tracing(#[from] trace::BadCollector),
    #[error("app probes: {0}")]
    AppProbes(#[from] app_probe::BadProbers),
    #[error("authorization drift baseline: {0}")]
    Drift(#[from] drift::BaselineError),
    #[error("configuration: {0}")]
    Config(#[from] runtime::ApplyError),
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

/// How long a draining proxy must see no open connection before it stops accepting early.
const DRAIN_QUIET: Duration = Duration::from_secs(1);

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
    let mut telemetry = telemetry::Telemetry::new(
        &config.node,
        access_log,
        stats,
        config.limits.max_metric_series,
        config.inventory.enabled.then(|| config.inventory.limits()),
    );
    // Audit events also go to the inventory's receiver when the inventory is exported.
    let exported = config.inventory.enabled
        && (config.inventory.export.address.is_some() || config.xds.is_some());
    telemetry.audit = audit::Audit::open(
        config.audit.as_ref(),
        &config.node.workload,
        exported,
        telemetry.stats.stat("audit.dropped"),
        telemetry.stats.stat("audit.written"),
    )
    .map_err(StartError::Audit)?;
    if config.inventory.enabled && config.inventory.drift.mode != drift::DriftMode::Off {
        telemetry.drift = Some(drift::Drift::load(&config.inventory.drift)?);
    }
    if let Some(inventory) = &telemetry.inventory
        && config.inventory.sensitive.sample_rate > 0.0
    {
        // Checked when the config was read; a failure here is a start failure all the same.
        let classifier = config
            .inventory
            .sensitive
            .classifier()
            .map_err(|(field, e)| {
                StartError::Sampling(std::io::Error::other(format!("{field}: {e}")))
            })?;
        telemetry.sensitive = Some(
            sampling::Sensitive::start(
                &config.inventory.sensitive,
                classifier,
                inventory.clone(),
                &telemetry.stats,
                telemetry.audit.clone(),
            )
            .map_err(StartError::Sampling)?,
        );
    }
    let trace_export = match &config.tracing {
        Some(t) => {
            let (tracer, export) =
                trace::Tracer::new(t, &config.node.trace_origin(), &telemetry.stats)?;
            telemetry.tracer = Some(Arc::new(tracer));
            tracing::info!(collector = %t.address, sampling = t.sampling, "tracing on (OTLP)");
            Some(export)
        }
        None => None,
    };
    let telemetry = Arc::new(telemetry);

    let total_connections = telemetry.stats.stat("server.total_connections");
    let shared = Arc::new(Shared {
        clusters: listener::LiveClusters::default(),
        telemetry: telemetry.clone(),
        limits: config.limits.clone(),
        local_workload: ::http::HeaderValue::from_str(&config.node.workload).ok(),
        local_app: ::http::HeaderValue::from_str(
            config.node.app.as_deref().unwrap_or(&config.node.workload),
        )
        .ok(),
        total_connections: total_connections.clone(),
        overload: conn_slot::Overload::new(total_connections, config.limits.global_max_connections),
        creds: creds.clone(),
        authz_hook: opts.authz_hook,
        handoff: listener::HandoffTable::default(),
    });
    let server_tls = Arc::new(identity::tls::server_config(creds.clone(), INBOUND_ALPN)?);
    let (drain_signal, drain_watch) = drain::channel();
    let drain_signal = Arc::new(drain_signal);
    let runtime = Arc::new(runtime::Runtime::new(
        shared.clone(),
        telemetry.clone(),
        server_tls,
        drain_signal.clone(),
    ));

    // Bind everything before serving anything: a port in use is a start failure, not a half-up proxy.
    let admin_ports = [
        (Some(config.admin.address), Port::Admin),
        (config.admin.health_address, Port::Health),
        (config.admin.prometheus_address, Port::Prometheus),
        (config.admin.status_address, Port::Status),
    ];
    // The app's kubelet probes, when the injector rewrote them through the status port.
    let app_probes = match config.admin.status_address {
        Some(_) => app_probe::Probers::from_env()?,
        None => app_probe::Probers::default(),
    };
    if !app_probes.is_empty() {
        tracing::info!(
            probes = app_probes.len(),
            "serving the app's probes on the status port"
        );
    }
    let mut admin_bound = Vec::new();
    for (addr, port) in admin_ports {
        if let Some(addr) = addr {
            admin_bound.push((listener::bind("admin", addr)?, port));
        }
    }
    let base = runtime::Model {
        listeners: config.listeners.clone(),
        clusters: config.clusters.clone(),
    };
    runtime.apply(&base).map_err(StartError::Config)?;

    let xds_state = config
        .xds
        .as_ref()
        .map(|_| Arc::new(ads::XdsState::default()));
    let (xds_stop, xds_stop_rx) = watch::channel(false);
    if let Some(export) = trace_export {
        tokio::spawn(export.run(xds_stop_rx.clone()));
    }
    let mut export_tls = None;
    if let (Some(x), Some(state)) = (&config.xds, &xds_state) {
        let server = if x.address.contains("://") {
            x.address.clone()
        } else {
            format!("http://{}", x.address)
        };
        tracing::info!(%server, node = %config.node.id, "configuration from xDS (ADS); not ready until the first listeners and clusters");
        let handler = ads::Handler::new(
            runtime.clone(),
            base.clone(),
            state.clone(),
            &telemetry.stats,
        );
        let mut client = xds::client::ClientConfig::new(server, xds_node(&config.node));
        client.delta = x.delta;
        if !x.control_plane_ids.is_empty() {
            let tls = identity::tls::client_config(
                creds.clone(),
                x.control_plane_ids.clone().into(),
                &[b"h2"],
            )?;
            client.tls = Some(xds::tls::ClientTls {
                config: Arc::new(tls),
                server_name: x.server_name.clone(),
            });
        }
        export_tls = client.tls.clone();
        tokio::spawn(xds::client::run(client, handler, xds_stop_rx.clone()));
    }
    let export = &config.inventory.export;
    let export_server = export
        .address
        .clone()
        .map(|a| (a, None))
        .or_else(|| config.xds.as_ref().map(|x| (x.address.clone(), export_tls)));
    if let Some((server, tls)) = export_server
        && telemetry.inventory.is_some()
    {
        let exporter = inventory_export::Exporter {
            server,
            tls,
            reporter: apisec::otlp::Reporter {
                node_id: config.node.id.clone(),
                service_name: config
                    .node
                    .app
                    .clone()
                    .unwrap_or_else(|| config.node.workload.clone()),
                svid: None,
            },
            interval: export.interval,
            max_backlog: export.max_backlog,
            creds: Some(creds.clone()),
        };
        tokio::spawn(inventory_export::run(
            exporter,
            telemetry.clone(),
            xds_stop_rx,
        ));
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
        runtime: runtime.clone(),
        xds: xds_state,
        app_probes: Arc::new(app_probes),
    });
    let mut admin_tasks = Vec::new();
    for (tcp, port) in admin_bound {
        admin_tasks.push(tokio::spawn(admin::serve(tcp, state.clone(), port)));
    }
    drop(drain_watch);
    tracing::info!(admin = %config.admin.address, "eastguard proxy started");

    tokio::select! {
        () = shutdown => tracing::info!("shutdown signal received; draining"),
        () = state.quit.notified() => tracing::info!("/quitquitquit received; draining"),
    }
    state.draining.store(true, Ordering::Relaxed);
    xds_stop.send_replace(true);
    drain_signal.start();
    let drain_cfg = &config.drain;
    // Keep accepting (each new connection told to close) for the drain window, or until no
    // connection has been open for a quiet period: clients told to close reconnect, so a moment
    // with none open does not mean they are gone.
    let started = tokio::time::Instant::now();
    let window_end = started + drain_cfg.duration;
    let quiet = DRAIN_QUIET.min(drain_cfg.duration);
    let mut last_busy = started;
    loop {
        let now = tokio::time::Instant::now();
        if shared.total_connections.get() > 0 {
            last_busy = now;
        }
        if now >= window_end || now.duration_since(last_busy) >= quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runtime.stop().await;
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

/// The node as xDS servers expect it (Istio's metadata keys).
pub(crate) fn xds_node(n: &config::Node) -> xds::pb::envoy::config::core::v3::Node {
    use xds::pb::google::protobuf::{Struct, Value, value::Kind};
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("NAMESPACE".to_owned(), s(&n.namespace));
    fields.insert("WORKLOAD_NAME".to_owned(), s(&n.workload));
    fields.insert("CLUSTER_ID".to_owned(), s(&n.cluster));
    if let Some(app) = &n.app {
        fields.insert("APP".to_owned(), s(app));
    }
    xds::pb::envoy::config::core::v3::Node {
        id: n.id.clone(),
        cluster: format!("{}.{}", n.workload, n.namespace),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        user_agent_name: "eastguard".into(),
        ..Default::default()
    }
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
