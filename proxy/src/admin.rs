//! Envoy-compatible admin API on loopback, plus Istio's health (15021) and Prometheus (15090) ports.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{self, Body};
use crate::config::Bootstrap;
use crate::telemetry::Telemetry;
use identity::CredentialsRx;

/// Changes the log filter (`/logging?level=debug`); given by the binary, which owns the subscriber.
pub type LogControl =
    Arc<dyn Fn(&str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// What the admin API reads and the switches it flips.
pub struct AdminState {
    pub config: Arc<Bootstrap>,
    pub telemetry: Arc<Telemetry>,
    pub creds: CredentialsRx,
    pub draining: AtomicBool,
    pub healthcheck_failed: AtomicBool,
    pub started: Instant,
    pub quit: Notify,
    pub log_control: Option<LogControl>,
    pub command_line: Vec<String>,
    pub runtime: Arc<crate::runtime::Runtime>,
    /// Present when configuration comes from xDS.
    pub xds: Option<Arc<crate::ads::XdsState>>,
    /// The app's kubelet probes (status port, `/app-health/…`).
    pub app_probes: Arc<crate::app_probe::Probers>,
}

/// Which routes a port serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Everything (15000).
    Admin,
    /// `/healthz/ready` only (15021).
    Health,
    /// `/stats/prometheus` only (15090).
    Prometheus,
    /// Istio's status port (15020): readiness, metrics and the app's rewritten probes.
    Status,
}

impl AdminState {
    /// Ready: an SVID is held and valid, not draining, health checks not failed by hand.
    pub fn is_ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("DRAINING");
        }
        if self.healthcheck_failed.load(Ordering::Relaxed) {
            return Err("HEALTHCHECK_FAILED");
        }
        if let Some(x) = &self.xds
            && !x.synced.load(Ordering::Relaxed)
        {
            return Err("WAITING_FOR_XDS");
        }
        if let Some(c) = &self.config.capture {
            let attached = std::fs::read_to_string(&c.status_file)
                .is_ok_and(|s| s.lines().next() == Some("attached"));
            if !attached {
                return Err("CAPTURE_NOT_ATTACHED");
            }
        }
        let creds = self.creds.borrow();
        match creds.as_ref() {
            Some(c) if c.svid.is_valid_at(rustls_pki_types::UnixTime::now()) => Ok(()),
            Some(_) => Err("SVID_EXPIRED"),
            None => Err("PRE_INITIALIZING"),
        }
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, port: Port) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let remote = tcp.peer_addr().ok();
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, port, remote, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn route(
    state: &AdminState,
    port: Port,
    remote: Option<SocketAddr>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let post_only = [
        "/quitquitquit",
        "/healthcheck/fail",
        "/healthcheck/ok",
        "/logging",
        "/drain_listeners",
    ];
    let allowed = match port {
        Port::Admin => true,
        Port::Health => path == "/healthz/ready",
        Port::Prometheus => path == "/stats/prometheus",
        Port::Status => {
            matches!(path.as_str(), "/healthz/ready" | "/stats/prometheus")
                || path.starts_with("/app-health/")
                || path.starts_with("/app-lifecycle/")
        }
    };
    if !allowed {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if post_only.contains(&path.as_str()) {
        if req.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "This endpoint requires POST\n",
            );
        }
        // Mutations only from loopback (the admin listener is loopback-only, but say so twice).
        if !remote.is_some_and(|r| r.ip().is_loopback()) {
            return text(StatusCode::FORBIDDEN, "admin mutations are loopback-only\n");
        }
    }
    if path.starts_with("/app-health/") || path.starts_with("/app-lifecycle/") {
        return match state.app_probes.run(&path).await {
            Some(o) => text(o.status, &format!("{}\n", o.detail)),
            None => text(StatusCode::NOT_FOUND, "no such probe\n"),
        };
    }
    match path.as_str() {
        "/ready" | "/healthz/ready" => match state.is_ready() {
            Ok(()) => text(StatusCode::OK, "LIVE\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
        },
        "/server_info" => json_response(server_info(state)),
        "/memory" => json_response(memory()),
        "/config_dump" => json_response(config_dump(state)),
        "/stats" => {
            let mut s = state.telemetry.stats.render_text();
            s.push_str(&format!(
                "server.live: {}\n",
                u8::from(state.is_ready().is_ok())
            ));
            s.push_str(&format!(
                "server.uptime: {}\n",
                state.started.elapsed().as_secs()
            ));
            text(StatusCode::OK, &s)
        }
        "/stats/prometheus" => {
            let s = state.telemetry.metrics.render();
            Response::builder()
                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                .body(body::full(s))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
        }
        "/listeners" => listeners(state, &query),
        "/clusters" => clusters(state, &query),
        "/quitquitquit" => {
            state.quit.notify_one();
            text(StatusCode::OK, "OK\n")
        }
        "/healthcheck/fail" => {
            state.healthcheck_failed.store(true, Ordering::Relaxed);
            text(StatusCode::OK, "OK\n")
        }
        "/healthcheck/ok" => {
            state.healthcheck_failed.store(false, Ordering::Relaxed);
            text(StatusCode::OK, "OK\n")
        }
        // Envoy's drain_listeners stops listeners but keeps the process; draining here always
        // ends in exit, so say so instead of exiting on a call that should not.
        "/drain_listeners" => text(
            StatusCode::NOT_IMPLEMENTED,
            "listener-only draining is not supported; POST /quitquitquit drains and exits\n",
        ),
        "/logging" => logging(state, &query),
        "/apis" => apis(state),
        "/drift/baseline" => match &state.telemetry.drift {
            Some(d) => json_response(serde_json::json!(d.baseline())),
            None => text(
                StatusCode::NOT_FOUND,
                "authorization drift is off (inventory.drift.mode)\n",
            ),
        },
        "/" => text(
            StatusCode::OK,
            "eastguard admin: /ready /server_info /memory /config_dump /stats /stats/prometheus /listeners /clusters /apis; POST /quitquitquit /healthcheck/fail /healthcheck/ok /logging\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, s: &str) -> Response<Body> {
    let mut r = Response::new(body::full(s.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The API inventory of inbound calls: rows per (service, method, path template, verified
/// caller, status class), the templates with example paths, and the calls past a cap.
fn apis(state: &AdminState) -> Response<Body> {
    let Some(inventory) = &state.telemetry.inventory else {
        return text(
            StatusCode::NOT_FOUND,
            "the API inventory is off (inventory.enabled)\n",
        );
    };
    let inv = inventory
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let templates: Vec<Value> = inv
        .templates()
        .into_iter()
        .map(|(service, template, examples)| {
            serde_json::json!({"service": service, "template": template, "examples": examples})
        })
        .collect();
    json_response(serde_json::json!({
        "rows": inv.rows(),
        "templates": templates,
        "overflow_calls": inv.overflow_calls(),
        "sensitive": inv.sensitive(),
        "detections": state
            .telemetry
            .detections
            .lock()
            .map(|d| d.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default(),
    }))
}

fn json_response(v: Value) -> Response<Body> {
    let s = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into());
    let mut r = Response::new(body::full(s));
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn uptime(state: &AdminState) -> String {
    format!("{}s", state.started.elapsed().as_secs())
}

fn node_json(state: &AdminState) -> Value {
    let n = &state.config.node;
    json!({
        "id": n.id,
        "cluster": n.workload,
        "metadata": {
            "WORKLOAD_NAME": n.workload,
            "NAMESPACE": n.namespace,
            "CLUSTER_ID": n.cluster,
        },
        "user_agent_name": "eastguard",
        "user_agent_build_version": { "version": { "major_number": 0, "minor_number": 1 } },
    })
}

fn server_info(state: &AdminState) -> Value {
    let st = match state.is_ready() {
        Ok(()) => "LIVE",
        Err("DRAINING") => "DRAINING",
        Err(_) => "PRE_INITIALIZING",
    };
    json!({
        "version": format!("eastguard/{}", env!("CARGO_PKG_VERSION")),
        "state": st,
        "hot_restart_version": "disabled",
        "command_line_options": { "args": state.command_line },
        "node": node_json(state),
        "uptime_current_epoch": uptime(state),
        "uptime_all_epochs": uptime(state),
    })
}

/// Envoy's `/memory` keys, from the kernel's view of this process (`/proc/self/status`): eastguard
/// uses the system allocator, which keeps no counters of its own. `allocated` is the resident
/// anonymous memory (heap and stacks), `heap_size` the data segment, `total_physical_bytes` the
/// resident set; the page-heap fields have no counterpart and read 0. Values are decimal strings
/// of bytes, as Envoy writes them.
fn memory() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    let s = |v: u64| Value::String(v.to_string());
    json!({
        "allocated": s(kib("RssAnon")),
        "heap_size": s(kib("VmData")),
        "pageheap_unmapped": s(0),
        "pageheap_free": s(0),
        "total_thread_cache": s(0),
        "total_physical_bytes": s(kib("VmRSS")),
        "peak_physical_bytes": s(kib("VmHWM")),
    })
}

fn socket_address(a: &SocketAddr) -> Value {
    json!({ "socket_address": { "address": a.ip().to_string(), "port_value": a.port() } })
}

/// Envoy's ConfigDump: bootstrap, static listeners and clusters, and the SDS secret metadata.
/// Private keys never appear.
fn config_dump(state: &AdminState) -> Value {
    let c = &state.config;
    // Secrets as Envoy shows SDS secrets: the SVID chain and the trust bundles in PEM, the private
    // key replaced by "[redacted]"; `version_info` is the leaf's serial number.
    use xds::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use xds::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
    let secrets: Vec<xds::pb::envoy::admin::v3::secrets_config_dump::DynamicSecret> = state
        .creds
        .borrow()
        .as_ref()
        .map(|creds| {
            let serial = creds.svid.leaf().serial.clone();
            let inline = |certs: &mut dyn Iterator<
                Item = &rustls_pki_types::CertificateDer<'_>,
            >| DataSource {
                specifier: Some(Specifier::InlineBytes(pem(certs).into_bytes())),
                ..Default::default()
            };
            let svid = tls_pb::Secret {
                name: "default".into(),
                r#type: Some(tls_pb::secret::Type::TlsCertificate(
                    tls_pb::TlsCertificate {
                        certificate_chain: Some(inline(&mut creds.svid.chain().iter())),
                        private_key: Some(DataSource {
                            specifier: Some(Specifier::InlineString("[redacted]".into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                )),
            };
            let roots = tls_pb::Secret {
                name: "ROOTCA".into(),
                r#type: Some(tls_pb::secret::Type::ValidationContext(
                    tls_pb::CertificateValidationContext {
                        trusted_ca: Some(inline(
                            &mut creds.bundles.iter().flat_map(|b| b.certs().iter()),
                        )),
                        ..Default::default()
                    },
                )),
            };
            [("default", svid), ("ROOTCA", roots)]
                .into_iter()
                .map(|(name, secret)| {
                    xds::pb::envoy::admin::v3::secrets_config_dump::DynamicSecret {
                        name: name.into(),
                        version_info: serial.clone(),
                        secret: Some(xds::codec::pack(&secret)),
                        ..Default::default()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    // Bootstrap, static listeners and clusters: the model as Envoy's messages, written by the
    // descriptor-based codec.
    use xds::pb::envoy::admin::v3 as admin_pb;
    let static_configs = [
        xds::codec::pack(&admin_pb::BootstrapConfigDump {
            bootstrap: Some(xds::pb::envoy::config::bootstrap::v3::Bootstrap {
                node: Some(crate::xds_node(&c.node)),
                admin: Some(xds::pb::envoy::config::bootstrap::v3::Admin {
                    address: Some(crate::envoy::socket_address_pb(c.admin.address)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            last_updated: None,
        }),
        xds::codec::pack(&admin_pb::ListenersConfigDump {
            static_listeners: c
                .listeners
                .iter()
                .map(|l| admin_pb::listeners_config_dump::StaticListener {
                    listener: Some(xds::codec::pack(&crate::envoy::listener_pb(l))),
                    last_updated: None,
                })
                .collect(),
            ..Default::default()
        }),
        xds::codec::pack(&admin_pb::ClustersConfigDump {
            static_clusters: c
                .clusters
                .iter()
                .map(|cl| admin_pb::clusters_config_dump::StaticCluster {
                    cluster: Some(xds::codec::pack(&crate::envoy::cluster_pb(cl))),
                    last_updated: None,
                })
                .collect(),
            ..Default::default()
        }),
    ];
    let mut configs: Vec<Value> = static_configs
        .iter()
        .map(|a| {
            xds::codec::any_to_json(a)
                .unwrap_or_else(|e| json!({ "@type": a.type_url, "error": e.to_string() }))
        })
        .collect();
    let secrets = xds::codec::pack(&xds::pb::envoy::admin::v3::SecretsConfigDump {
        dynamic_active_secrets: secrets,
        ..Default::default()
    });
    configs.push(
        xds::codec::any_to_json(&secrets)
            .unwrap_or_else(|e| json!({ "@type": secrets.type_url, "error": e.to_string() })),
    );
    let mut dump = json!({ "configs": configs });
    // The xDS resources, written by the descriptor-based codec; merged into the config of the
    // same type (static and dynamic listeners in one ListenersConfigDump, as Envoy does).
    if let Some(x) = &state.xds
        && let Some(configs) = dump["configs"].as_array_mut()
    {
        for d in x.config_dump() {
            let Some(obj) = d.as_object() else { continue };
            match configs.iter_mut().find(|c| c["@type"] == d["@type"]) {
                Some(existing) => {
                    if let Some(e) = existing.as_object_mut() {
                        for (k, v) in obj {
                            if k != "@type" {
                                e.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
                None => {
                    let at = configs.len().saturating_sub(1);
                    configs.insert(at, d.clone());
                }
            }
        }
    }
    dump
}

/// Certificates as PEM.
fn pem(certs: &mut dyn Iterator<Item = &rustls_pki_types::CertificateDer<'_>>) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for c in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

fn listeners(state: &AdminState, query: &str) -> Response<Body> {
    let ls = state.runtime.listeners();
    if query.contains("format=json") {
        return json_response(json!({
            "listener_statuses": ls.iter().map(|(name, address)| json!({
                "name": name,
                "local_address": socket_address(address),
            })).collect::<Vec<_>>()
        }));
    }
    let s: String = ls
        .iter()
        .map(|(name, address)| format!("{name}::{address}\n"))
        .collect();
    text(StatusCode::OK, &s)
}

fn clusters(state: &AdminState, query: &str) -> Response<Body> {
    let cs = state.runtime.clusters();
    if query.contains("format=json") {
        return json_response(json!({
            "cluster_statuses": cs.iter().map(|c| json!({
                "name": c.name,
                "host_statuses": c.endpoints.iter().map(|e| json!({
                    "address": socket_address(e),
                    "health_status": { "eds_health_status": "HEALTHY" },
                })).collect::<Vec<_>>()
            })).collect::<Vec<_>>()
        }));
    }
    let mut s = String::new();
    for c in &cs {
        for e in &c.endpoints {
            s.push_str(&format!("{}::{e}::health_flags::healthy\n", c.name));
        }
    }
    text(StatusCode::OK, &s)
}

fn logging(state: &AdminState, query: &str) -> Response<Body> {
    let level = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("level="))
        .map(str::to_owned);
    let Some(level) = level else {
        return text(
            StatusCode::BAD_REQUEST,
            "usage: POST /logging?level=<trace|debug|info|warn|error|off>\n",
        );
    };
    if ![
        "trace", "debug", "info", "warn", "warning", "error", "critical", "off",
    ]
    .contains(&level.as_str())
    {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("unknown level {level:?}\n"),
        );
    }
    let level = match level.as_str() {
        "warning" => "warn",
        "critical" => "error",
        l => l,
    };
    match &state.log_control {
        Some(set) => match set(level) {
            Ok(()) => text(StatusCode::OK, &format!("active loggers: all at {level}\n")),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        },
        None => text(
            StatusCode::NOT_IMPLEMENTED,
            "log level control is not available\n",
        ),
    }
}
