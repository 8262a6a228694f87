//! One resource kept in memory from the API: a LIST (paged), then a WATCH from its
//! resourceVersion, as client-go's reflector and kube-rs' do.
//!
//! - Bookmarks move the resourceVersion on, so a new watch resumes where the last one ended.
//! - `410 Gone` (an HTTP status at watch start, or an ERROR event) means the version is too old:
//!   list again.
//! - A watch that ends or is cut resumes from the last version it applied.
//! - API errors (429, 5xx, connection failures) back off, and the store keeps what it had: the
//!   control plane serves the last good state while the API is away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio::sync::watch;

use super::client::{Client, RequestError};

/// Objects by (namespace, name).
pub type Store = BTreeMap<(String, String), Value>;

/// A resource's collection path (`/api/v1/pods`, `/apis/security.istio.io/v1/authorizationpolicies`).
#[derive(Debug, Clone, Copy)]
pub struct Resource {
    pub path: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    /// A CRD that may not be installed: a 404 on LIST is "none", not an error.
    pub optional: bool,
    /// Keep only `metadata` (name, namespace, labels, annotations, resourceVersion): for kinds
    /// read for who owns what, whose specs nothing reads.
    pub metadata_only: bool,
}

/// What a reflector publishes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// False until the first LIST completed: nothing from Kubernetes is served before every
    /// resource has one (a policy missing for a moment would be access granted).
    pub synced: bool,
    pub objects: Arc<Store>,
}

/// Longest watch line taken (one object); past it the watch restarts from a LIST.
const MAX_LINE: usize = 16 * 1024 * 1024;
/// Objects kept per resource; past it new ones are dropped (and logged).
const MAX_OBJECTS: usize = 200_000;

enum WatchEnd {
    /// Ended or cut: watch again from the version reached.
    Resume,
    /// 410 Gone: list again.
    Relist,
}

pub struct Reflector {
    pub client: Client,
    pub resource: Resource,
    pub tx: watch::Sender<Snapshot>,
    /// Seconds the server keeps one watch open.
    pub watch_timeout: u32,
}

impl Reflector {
    pub async fn run(self) {
        let mut backoff =
            backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut objects: Arc<Store>;
        loop {
            let rv = match self.list().await {
                Ok((store, rv)) => {
                    backoff.reset();
                    objects = Arc::new(store);
                    self.tx.send_replace(Snapshot {
                        synced: true,
                        objects: objects.clone(),
                    });
                    tracing::info!(kind = self.resource.kind, objects = objects.len(), %rv, "listed");
                    rv
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(kind = self.resource.kind, error = %e, ?delay,
                        "cannot list; keeping what was known and retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let mut rv = rv;
            loop {
                match self.watch(&mut objects, &mut rv).await {
                    Ok(WatchEnd::Resume) => {
                        backoff.reset();
                        continue;
                    }
                    Ok(WatchEnd::Relist) => {
                        tracing::info!(
                            kind = self.resource.kind,
                            "resourceVersion too old (410 Gone); listing again"
                        );
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(kind = self.resource.kind, error = %e, ?delay, "watch failed; resuming");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    /// All pages of the collection; `Ok` with the list's resourceVersion.
    async fn list(&self) -> Result<(Store, String), RequestError> {
        let mut store = Store::new();
        let mut cont = String::new();
        loop {
            let mut path = format!("{}?limit=500", self.resource.path);
            if !cont.is_empty() {
                path.push_str("&continue=");
                path.push_str(&percent(&cont));
            }
            let resp = match self.client.get(&path, Duration::from_secs(60)).await {
                Err(RequestError::Status { status: 404, .. }) if self.resource.optional => {
                    // The CRD is not installed: there are none.
                    return Ok((Store::new(), String::new()));
                }
                Err(RequestError::Status { status: 410, .. }) if !cont.is_empty() => {
                    // The continue token expired: start the list over.
                    store.clear();
                    cont.clear();
                    continue;
                }
                r => r?,
            };
            let body = http_body_util::Limited::new(resp.into_body(), 512 * 1024 * 1024)
                .collect()
                .await
                .map_err(|e| RequestError::Transport(e.to_string()))?
                .to_bytes();
            let list: Value = serde_json::from_slice(&body)
                .map_err(|e| RequestError::Transport(format!("the list is not JSON: {e}")))?;
            for item in list["items"].as_array().into_iter().flatten() {
                if store.len() >= MAX_OBJECTS {
                    tracing::error!(
                        kind = self.resource.kind,
                        max = MAX_OBJECTS,
                        "too many objects; the rest are not read"
                    );
                    break;
                }
                store.insert(key(item), self.typed(item.clone()));
            }
            let meta = &list["metadata"];
            cont = meta["continue"].as_str().unwrap_or_default().to_owned();
            if cont.is_empty() {
                let rv = meta["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                return Ok((store, rv));
            }
        }
    }

    /// One watch, applied to `objects` (published after each event) until it ends.
    async fn watch(
        &self,
        objects: &mut Arc<Store>,
        rv: &mut String,
    ) -> Result<WatchEnd, RequestError> {
        if rv.is_empty() {
            // A resource listed as absent (CRD not installed): look again later.
            tokio::time::sleep(Duration::from_secs(30)).await;
            return Ok(WatchEnd::Relist);
        }
        let path = format!(
            "{}?watch=1&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}",
            self.resource.path,
            percent(rv),
            self.watch_timeout
        );
        let resp = match self.client.get(&path, Duration::from_secs(30)).await {
            Err(RequestError::Status { status: 410, .. }) => return Ok(WatchEnd::Relist),
            r => r?,
        };
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        // The server ends the watch at timeoutSeconds; a silent connection longer than that is dead.
        let idle = Duration::from_secs(u64::from(self.watch_timeout) + 30);
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => return Err(RequestError::Transport("the watch went silent".into())),
                Ok(None) => return Ok(WatchEnd::Resume),
                Ok(Some(Err(e))) => return Err(RequestError::Transport(format!("watch cut: {e}"))),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if let Some(end) = self.apply(&line, objects, rv)? {
                    return Ok(end);
                }
            }
            if buf.len() > MAX_LINE {
                tracing::error!(
                    kind = self.resource.kind,
                    "a watch event is larger than {MAX_LINE} bytes; listing again"
                );
                return Ok(WatchEnd::Relist);
            }
        }
    }

    /// List items come without `kind` and `apiVersion`; the registry reader needs them.
    fn typed(&self, mut object: Value) -> Value {
        if self.resource.metadata_only {
            object = metadata_only(object);
        }
        if let Some(o) = object.as_object_mut() {
            o.entry("kind").or_insert_with(|| self.resource.kind.into());
            o.entry("apiVersion")
                .or_insert_with(|| self.resource.api_version.into());
        }
        object
    }

    /// One watch event.
    fn apply(
        &self,
        line: &[u8],
        objects: &mut Arc<Store>,
        rv: &mut String,
    ) -> Result<Option<WatchEnd>, RequestError> {
        let event: Value = serde_json::from_slice(line)
            .map_err(|e| RequestError::Transport(format!("a watch event is not JSON: {e}")))?;
        let object = &event["object"];
        let version = object["metadata"]["resourceVersion"].as_str();
        match event["type"].as_str() {
            Some("ADDED" | "MODIFIED") => {
                let k = key(object);
                let store = Arc::make_mut(objects);
                if store.len() >= MAX_OBJECTS && !store.contains_key(&k) {
                    tracing::error!(
                        kind = self.resource.kind,
                        max = MAX_OBJECTS,
                        "too many objects; a new one is not kept"
                    );
                } else {
                    store.insert(k, self.typed(object.clone()));
                }
            }
            Some("DELETED") => {
                Arc::make_mut(objects).remove(&key(object));
            }
            Some("BOOKMARK") => {
                if let Some(v) = version {
                    *rv = v.to_owned();
                }
                return Ok(None);
            }
            Some("ERROR") => {
                if object["code"].as_u64() == Some(410) {
                    return Ok(Some(WatchEnd::Relist));
                }
                return Err(RequestError::Status {
                    status: object["code"].as_u64().unwrap_or(0) as u16,
                    message: object["message"].as_str().unwrap_or_default().to_owned(),
                });
            }
            other => {
                return Err(RequestError::Transport(format!(
                    "unknown watch event type {other:?}"
                )));
            }
        }
        if let Some(v) = version {
            *rv = v.to_owned();
        }
        self.tx.send_replace(Snapshot {
            synced: true,
            objects: objects.clone(),
        });
        Ok(None)
    }
}

fn metadata_only(mut object: Value) -> Value {
    let mut meta = serde_json::Map::new();
    if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "name",
            "namespace",
            "labels",
            "annotations",
            "resourceVersion",
        ] {
            if let Some(v) = m.remove(k) {
                meta.insert(k.to_owned(), v);
            }
        }
    }
    serde_json::json!({ "metadata": meta })
}

fn key(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_owned(),
        m["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Percent-encodes a query value (continue tokens are base64 with `=`, `+`, `/`).
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
