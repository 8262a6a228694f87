//! Kubernetes Events from the control plane: what the webhook admitted without a sidecar, or
//! refused, shows in `kubectl get events` of the pod's namespace.
//!
//! Events are posted off the admission path, from a bounded queue: a slow or absent API never
//! delays an answer to the API server, and past the bound events are dropped (and counted in the
//! log), never queued without limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::client::Client;

const QUEUE: usize = 256;
/// Kubernetes keeps an event's message at most this long.
const MAX_MESSAGE: usize = 1024;

/// Where events go.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Value>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// Starts the task that posts events through `client`.
    pub fn start(client: Client) -> Self {
        let (tx, mut rx) = mpsc::channel::<Value>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let seen_dropped = dropped.clone();
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(event) = rx.recv().await {
                let ns = event["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned();
                let path = format!("/api/v1/namespaces/{ns}/events");
                match client.post(&path, &event, Duration::from_secs(5)).await {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot write Kubernetes events");
                    }
                    Err(_) => {}
                }
                let n = seen_dropped.swap(0, Ordering::Relaxed);
                if n > 0 {
                    tracing::warn!(dropped = n, "Kubernetes events dropped (queue full)");
                }
            }
        });
        Self { tx, dropped }
    }

    /// A Warning event about a pod (by name, or the prefix its controller gives it).
    pub fn warn_pod(&self, namespace: &str, pod: &str, reason: &str, message: &str) {
        if namespace.is_empty() {
            return;
        }
        let now = apisec::time::format_time(SystemTime::now());
        let mut message = message.to_owned();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "eastguard-injection.", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": pod},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "eastguard-sidecar-injector"},
            "reportingComponent": "eastguard-sidecar-injector",
            "reportingInstance": std::env::var("HOSTNAME").unwrap_or_else(|_| "eastguard-control-plane".into()),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
