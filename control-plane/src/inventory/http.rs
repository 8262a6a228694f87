//! The inventory's HTTP API (`--http-address`), read by `eastguard apis` and by anyone with curl:
//!
//! - `GET /apis[?service=&status=&owner=&caller=]`: the view (operations with status, owner,
//!   callers; a summary per status; refused spec files);
//! - `GET /apis/openapi?service=HOST`: the service's observed operations as OpenAPI 3.1;
//! - `GET /apis/policy/suggest[?window_hours=]`: AuthorizationPolicies allowing exactly the
//!   observed calls (YAML); `GET /apis/policy/unused[?window_hours=]`: ALLOW rules that admitted
//!   nothing (JSON);
//! - `GET /apis/events[?class=2004&limit=200]`: the sidecars' audit events (OCSF), newest first;
//! - `GET /report`: the evidence report (PCI DSS / SOC 2), self-contained HTML;
//! - `GET /ui/`: the web UI (embedded; service graph, operations with filters, operation detail);
//! - `GET /healthz`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use apisec::sensitive::form_decode;

use super::ApiInventory;
use crate::ControlPlane;

// The web UI, embedded: no CDN, works air-gapped.
const UI_HTML: &str = include_str!("ui/index.html");
const UI_JS: &str = include_str!("ui/app.js");
const UI_CSS: &str = include_str!("ui/app.css");

/// Only the UI's own files run or load; nothing inline, nothing from elsewhere, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &str, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The longest query string read.
const MAX_QUERY: usize = 4096;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

fn json(v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => reply(StatusCode::OK, "application/json", s + "\n"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn query(q: Option<&str>) -> Option<HashMap<String, String>> {
    let q = q.unwrap_or("");
    if q.len() > MAX_QUERY {
        return None;
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((form_decode(k)?, form_decode(v)?))
        })
        .collect()
}

fn handle(
    req: &Request<hyper::body::Incoming>,
    cp: &ControlPlane,
    inventory: &ApiInventory,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let Some(q) = query(req.uri().query()) else {
        return text(StatusCode::BAD_REQUEST, "bad query string\n");
    };
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // Per connected proxy and resource type: sent, ACKed, NACKed (istiod's /debug/syncz).
        "/debug/syncz" => json(&cp.sync.view()),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(cp),
        ),
        "/" | "/ui" => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", "/ui/")
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        "/ui/" => asset("text/html; charset=utf-8", UI_HTML),
        "/favicon.ico" => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        "/ui/app.js" => asset("text/javascript; charset=utf-8", UI_JS),
        "/ui/app.css" => asset("text/css; charset=utf-8", UI_CSS),
        "/apis" => {
            let mut view = match inventory.view(&cp.registry()) {
                Ok(v) => v,
                Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            };
            view.operations.retain(|e| {
                q.get("service").is_none_or(|s| &e.service == s)
                    && q.get("status").is_none_or(|s| e.status.as_str() == s)
                    && q.get("owner").is_none_or(|o| {
                        e.owner.as_deref() == Some(o.as_str()) || (o == "none" && e.orphan)
                    })
                    && q.get("caller").is_none_or(|c| {
                        e.seen
                            .as_ref()
                            .is_some_and(|s| s.callers.iter().any(|x| &x.id == c))
                    })
            });
            json(&view)
        }
        "/report" => match super::report::html(cp, inventory, inventory.retention.as_secs() / 3600)
        {
            Ok(h) => reply(StatusCode::OK, "text/html; charset=utf-8", h),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        "/apis/events" => {
            let class = match q.get("class").map(|c| c.parse::<u32>()) {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "class: an OCSF class_uid\n"),
            };
            let limit = q
                .get("limit")
                .and_then(|l| l.parse::<u32>().ok())
                .unwrap_or(200)
                .min(1000);
            match inventory.events(class, limit) {
                Ok(e) => json(&e),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            }
        }
        "/apis/policy/suggest" | "/apis/policy/unused" => {
            let hours: i64 = match q.get("window_hours").map(|h| h.parse::<i64>()) {
                None => 24 * 365 * 10,
                Some(Ok(h)) if (1..=24 * 365 * 10).contains(&h) => h,
                Some(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "window_hours: a number of hours from 1\n",
                    );
                }
            };
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
                - hours * 3600;
            let edges = match inventory.edges(since) {
                Ok(e) => e,
                Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            };
            let reg = cp.registry();
            if req.uri().path().ends_with("suggest") {
                let s = super::least_privilege::suggest(&edges, &reg);
                let mut out = String::from(
                    "# Istio AuthorizationPolicies allowing exactly the calls eastguard observed.\n",
                );
                for n in &s.notes {
                    out.push_str(&format!("# left out: {}\n", n.replace('\n', " ")));
                }
                out.push_str(&s.yaml);
                reply(StatusCode::OK, "application/yaml", out)
            } else {
                match super::least_privilege::unused(&edges, &reg, cp.mesh()) {
                    Ok(u) => json(&u),
                    Err(e) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
                }
            }
        }
        "/apis/openapi" => {
            let Some(service) = q.get("service") else {
                return text(StatusCode::BAD_REQUEST, "?service=HOST is required\n");
            };
            match inventory.openapi(service) {
                Ok(doc) if doc["paths"].as_object().is_some_and(|p| !p.is_empty()) => json(&doc),
                Ok(_) => text(
                    StatusCode::NOT_FOUND,
                    format!("no operations observed for {service}\n"),
                ),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /apis, /apis/openapi, /healthz\n",
        ),
    }
}

/// Serves until `closing` turns true.
pub async fn serve(
    listener: TcpListener,
    cp: Arc<ControlPlane>,
    inventory: Arc<ApiInventory>,
    mut closing: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "inventory API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = closing.wait_for(|c| *c).await; } => return,
        };
        let (cp, inventory) = (cp.clone(), inventory.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (cp, inventory) = (cp.clone(), inventory.clone());
                async move {
                    // The store is SQLite: read it off the async workers.
                    let resp = tokio::task::spawn_blocking(move || handle(&req, &cp, &inventory))
                        .await
                        .unwrap_or_else(|e| {
                            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
                        });
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = conn.await;
        });
    }
}

/// The control plane's metrics under istiod's names, so Istio's control-plane dashboards read
/// them: `pilot_xds` (connected proxies), `pilot_xds_pushes{type}` (responses sent) and
/// `pilot_total_xds_rejects{type}` (NACKs). istiod exports its counters without a `_total`
/// suffix; they are written as gauges here to keep those names.
fn metrics(cp: &ControlPlane) -> String {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    type Labels = Vec<(&'static str, String)>;
    let totals = cp.sync.totals();
    let mut registry = prometheus_client::registry::Registry::default();
    let connected = Family::<Labels, Gauge>::default();
    connected
        .get_or_create(&vec![(
            "version",
            format!("eastguard-{}", env!("CARGO_PKG_VERSION")),
        )])
        .set(i64::try_from(totals.connected).unwrap_or(i64::MAX));
    registry.register("pilot_xds", "Proxies connected over ADS", connected);
    for (name, help, by_type) in [
        (
            "pilot_xds_pushes",
            "xDS responses sent, by type",
            &totals.pushes,
        ),
        (
            "pilot_total_xds_rejects",
            "xDS responses the proxies rejected (NACK), by type",
            &totals.rejects,
        ),
    ] {
        let family = Family::<Labels, Gauge>::default();
        for t in ["cds", "eds", "lds", "rds"] {
            let n = by_type.get(t).copied().unwrap_or(0);
            family
                .get_or_create(&vec![("type", t.to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        registry.register(name, help, family);
    }
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_and_bad_ones_are_refused() {
        let q = query(Some("service=a.b&caller=spiffe%3A%2F%2Ftd%2Fns%2Fx&x")).unwrap();
        assert_eq!(q["caller"], "spiffe://td/ns/x");
        assert_eq!(q["x"], "");
        assert!(query(Some("a=%zz")).is_none());
        assert!(query(Some("a=%ff")).is_none(), "not UTF-8");
        assert!(query(Some(&"a".repeat(MAX_QUERY + 1))).is_none());
    }
}
