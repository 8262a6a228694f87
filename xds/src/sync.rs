//! What each connected proxy holds, per resource type: the version the server last sent, the one
//! the proxy last ACKed, and its last NACK — the data behind `istioctl proxy-status`-style views.
//!
//! One entry per open ADS stream, removed when the stream ends, so the registry is bounded by the
//! streams the server holds. NACK details are cut to [`MAX_DETAIL`] bytes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::server::Caller;

/// A NACK's error message is kept up to this many bytes.
pub const MAX_DETAIL: usize = 512;

/// Shared by the ADS servers of one control plane.
#[derive(Debug, Default)]
pub struct SyncRegistry {
    next: AtomicU64,
    streams: Mutex<BTreeMap<u64, ProxySync>>,
    /// Since start, by short type name (`cds`, …): responses sent, and NACKs received.
    totals: Mutex<BTreeMap<&'static str, (u64, u64)>>,
}

/// Counters for a control plane's `/metrics` (Istio's `pilot_xds*` names).
#[derive(Debug, Default)]
pub struct SyncTotals {
    /// Streams whose node has said who it is.
    pub connected: u64,
    /// By lowercase short type name: responses sent.
    pub pushes: BTreeMap<String, u64>,
    /// By lowercase short type name: NACKs received.
    pub rejects: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct ProxySync {
    node: String,
    cluster: String,
    version: String,
    peer_id: Option<String>,
    delta: bool,
    connected: u64,
    types: BTreeMap<String, TypeSync>,
}

#[derive(Debug, Default)]
struct TypeSync {
    sent: String,
    acked: String,
    nack: Option<(String, String)>,
}

/// One stream's handle; dropping it removes the stream's entry.
#[derive(Debug)]
pub struct StreamSync {
    registry: Arc<SyncRegistry>,
    id: u64,
}

impl SyncRegistry {
    pub fn open(self: &Arc<Self>, delta: bool) -> StreamSync {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.with(|s| {
            s.insert(
                id,
                ProxySync {
                    delta,
                    connected: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    ..Default::default()
                },
            );
        });
        StreamSync {
            registry: self.clone(),
            id,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<u64, ProxySync>) -> T) -> T {
        f(&mut self.streams.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn count(&self, type_url: &str, push: bool) {
        let short = short_lower(type_url);
        let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let e = t.entry(short).or_default();
        if push {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    pub fn totals(&self) -> SyncTotals {
        let connected = self.with(|s| s.values().filter(|p| !p.node.is_empty()).count()) as u64;
        let t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        SyncTotals {
            connected,
            pushes: t.iter().map(|(k, v)| ((*k).to_owned(), v.0)).collect(),
            rejects: t.iter().map(|(k, v)| ((*k).to_owned(), v.1)).collect(),
        }
    }

    /// Every stream that has said who it is: node, cluster, version, and per short type name
    /// (`CDS`, `LDS`, …) its status (`SYNCED`, `STALE`, `NACKED`), versions and last NACK.
    pub fn view(&self) -> Value {
        self.with(|streams| {
            let proxies: Vec<Value> = streams
                .values()
                .filter(|p| !p.node.is_empty())
                .map(|p| {
                    let types: serde_json::Map<String, Value> = p
                        .types
                        .iter()
                        .map(|(t, s)| {
                            let status = if s.nack.is_some() {
                                "NACKED"
                            } else if s.acked == s.sent {
                                "SYNCED"
                            } else {
                                "STALE"
                            };
                            let mut v = json!({
                                "status": status,
                                "sent": s.sent,
                                "acked": s.acked,
                            });
                            if let Some((version, detail)) = &s.nack {
                                v["nacked_version"] = json!(version);
                                v["nack"] = json!(detail);
                            }
                            (crate::types::short(t).to_owned(), v)
                        })
                        .collect();
                    json!({
                        "node": p.node,
                        "cluster": p.cluster,
                        "version": p.version,
                        "peer_id": p.peer_id,
                        "delta": p.delta,
                        "connected_unix": p.connected,
                        "types": types,
                    })
                })
                .collect();
            json!({ "proxies": proxies })
        })
    }
}

impl StreamSync {
    fn update(&self, f: impl FnOnce(&mut ProxySync)) {
        self.registry.with(|s| {
            if let Some(p) = s.get_mut(&self.id) {
                f(p);
            }
        });
    }

    pub fn caller(&self, caller: &Caller) {
        let n = &caller.node;
        let version = n
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ISTIO_VERSION"))
            .and_then(|v| match &v.kind {
                Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .or_else(|| match &n.user_agent_version_type {
                Some(
                    envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                        v,
                    ),
                ) => Some(v.clone()),
                _ => None,
            })
            .unwrap_or_default();
        self.update(|p| {
            p.node = cut(&n.id);
            p.cluster = cut(&n.cluster);
            p.version = cut(&version);
            p.peer_id = caller.peer_id.clone();
        });
    }

    pub fn sent(&self, type_url: &str, version: &str) {
        self.update(|p| p.types.entry(type_url.to_owned()).or_default().sent = version.to_owned());
    }

    /// A response went out (counted; [`Self::sent`] records what it holds).
    pub fn pushed(&self, type_url: &str) {
        self.registry.count(type_url, true);
    }

    pub fn acked(&self, type_url: &str, version: &str) {
        self.update(|p| {
            let t = p.types.entry(type_url.to_owned()).or_default();
            t.acked = version.to_owned();
            t.nack = None;
        });
    }

    pub fn nacked(&self, type_url: &str, version: &str, detail: &str) {
        self.registry.count(type_url, false);
        self.update(|p| {
            p.types.entry(type_url.to_owned()).or_default().nack =
                Some((version.to_owned(), cut(detail)));
        });
    }
}

impl Drop for StreamSync {
    fn drop(&mut self) {
        self.registry.with(|s| s.remove(&self.id));
    }
}

/// `cds`, `lds`, … — a fixed set, so the counters stay bounded whatever type URLs arrive.
fn short_lower(type_url: &str) -> &'static str {
    match crate::types::short(type_url) {
        "CDS" => "cds",
        "LDS" => "lds",
        "EDS" => "eds",
        "RDS" => "rds",
        "SDS" => "sds",
        _ => "other",
    }
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_DETAIL);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
