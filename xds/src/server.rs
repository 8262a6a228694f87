//! ADS server, state of the world: each stream is one node; its resources come from a
//! [`SnapshotSource`] that computes that node's configuration (so a proxy never receives another
//! workload's), and are pushed again whenever the source announces a change.
//!
//! The delta variant (`DeltaAggregatedResources`) sends only resources whose version changed, and
//! removals by name; a reconnecting client's `initial_resource_versions` say what it holds.
//!
//! Versions are content hashes of exactly the resources sent, so they are the same across control
//! plane restarts: a proxy that reconnects with the version it already holds is not sent it again.
//! Nonces follow the protocol: a request whose nonce is not the latest one sent for its type is
//! stale and ignored; `error_detail` marks a NACK, which is logged and not answered until the
//! configuration changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::types;

/// One type's resources for one node, by name.
pub type Resources = BTreeMap<String, Any>;

/// Everything one node is to receive, by type URL.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub resources: BTreeMap<String, Resources>,
}

/// Who is asking: the node as it describes itself, and the SPIFFE ID its mTLS certificate proved
/// (`None` on the plaintext development port).
#[derive(Debug, Clone)]
pub struct Caller {
    pub node: Node,
    pub peer_id: Option<String>,
}

/// The peer's verified SPIFFE ID, put in request extensions by the transport.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Option<String>);

/// Computes each node's configuration.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The caller's snapshot; an error refuses the stream (unknown workload, identity mismatch).
    fn snapshot(&self, caller: &Caller) -> Result<Arc<Snapshot>, Status>;
    /// Bumped whenever any snapshot may have changed.
    fn changes(&self) -> watch::Receiver<u64>;
    /// A NACK arrived (already logged here).
    fn nacked(&self, _caller: &Caller, _type_url: &str, _version: &str, _detail: &str) {}
}

/// `envoy.service.discovery.v3.AggregatedDiscoveryService` over a [`SnapshotSource`].
pub struct AdsServer<S> {
    source: Arc<S>,
    stats: Arc<ServerStats>,
    closing: watch::Receiver<bool>,
    sync: Arc<crate::sync::SyncRegistry>,
}

/// Counters for tests and benchmarks.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub responses: std::sync::atomic::AtomicU64,
    pub acks: std::sync::atomic::AtomicU64,
    pub nacks: std::sync::atomic::AtomicU64,
    pub streams: std::sync::atomic::AtomicU64,
}

impl<S: SnapshotSource> AdsServer<S> {
    pub fn new(source: Arc<S>) -> Self {
        Self {
            source,
            stats: Arc::default(),
            closing: watch::channel(false).1,
            sync: Arc::default(),
        }
    }

    /// Records each stream's sent / ACKed / NACKed versions in `sync` (one registry may serve
    /// several servers).
    pub fn with_sync(mut self, sync: Arc<crate::sync::SyncRegistry>) -> Self {
        self.sync = sync;
        self
    }

    /// Ends every stream when `closing` turns true (ADS streams never end on their own, so a
    /// graceful server shutdown needs this).
    pub fn with_shutdown(mut self, closing: watch::Receiver<bool>) -> Self {
        self.closing = closing;
        self
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }
}

type ResponseStream<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: SnapshotSource> AggregatedDiscoveryService for AdsServer<S> {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer_id = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.clone());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = Stream {
            sync: self.sync.open(false),
            source: self.source.clone(),
            stats: self.stats.clone(),
            peer_id,
            caller: None,
            snapshot: Arc::default(),
            types: HashMap::new(),
            nonce: 0,
            tx,
        };
        tokio::spawn(stream.run(inbound, self.closing.clone()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer_id = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.clone());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = DeltaStream {
            sync: self.sync.open(true),
            source: self.source.clone(),
            stats: self.stats.clone(),
            peer_id,
            caller: None,
            snapshot: Arc::default(),
            types: HashMap::new(),
            nonce: 0,
            tx,
        };
        tokio::spawn(stream.run(inbound, self.closing.clone()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Per-type state of one stream.
#[derive(Default)]
struct TypeState {
    /// `None`: wildcard (LDS / CDS with no names).
    names: Option<BTreeSet<String>>,
    sent_version: String,
    sent_nonce: String,
    acked_version: String,
}

struct Stream<S> {
    sync: crate::sync::StreamSync,
    source: Arc<S>,
    stats: Arc<ServerStats>,
    peer_id: Option<String>,
    caller: Option<Caller>,
    snapshot: Arc<Snapshot>,
    types: HashMap<String, TypeState>,
    nonce: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl<S: SnapshotSource> Stream<S> {
    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        mut closing: watch::Receiver<bool>,
    ) {
        let _open = OpenStream::new(&self.stats);
        let mut changes = self.source.changes();
        changes.mark_unchanged();
        loop {
            let result = match next_event(&mut inbound, &mut changes, &mut closing, &self.tx).await
            {
                Event::Request(req) => self.on_request(req).await,
                Event::Changed => self.on_change().await,
                Event::End => break,
            };
            if let Err(status) = result {
                let _ = self.tx.send(Err(status)).await;
                break;
            }
        }
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        if self.caller.is_none() {
            let (caller, snapshot) = open(&*self.source, req.node.as_ref(), &self.peer_id)?;
            self.snapshot = snapshot;
            self.sync.caller(&caller);
            self.caller = Some(caller);
        }
        if !types::is_known(&req.type_url) {
            tracing::warn!(type_url = %req.type_url, "request for an unknown type ignored");
            return Ok(());
        }
        let type_url = req.type_url.clone();
        let state = self.types.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce != state.sent_nonce {
            // Stale: an answer to a response that a newer one superseded.
            return Ok(());
        }
        if let Some(err) = &req.error_detail {
            self.stats
                .nacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let node = self
                .caller
                .as_ref()
                .map(|c| c.node.id.as_str())
                .unwrap_or("");
            tracing::warn!(
                node,
                type_url = %type_url,
                rejected_version = %state.sent_version,
                kept_version = %req.version_info,
                error = %err.message,
                "NACK: the proxy rejected the configuration and keeps its previous one"
            );
            if let Some(c) = &self.caller {
                self.source
                    .nacked(c, &type_url, &state.sent_version, &err.message);
            }
            self.sync
                .nacked(&type_url, &state.sent_version, &err.message);
        } else if !req.response_nonce.is_empty() {
            self.stats
                .acks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            state.acked_version = req.version_info.clone();
            self.sync.acked(&type_url, &req.version_info);
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let new_names = if names.is_empty() && types::wildcard_by_default(&type_url) {
            None
        } else {
            Some(names)
        };
        let names_changed = state.names != new_names;
        state.names = new_names;
        if req.response_nonce.is_empty() {
            // A (re)subscription: the client says what it holds; do not send that again.
            state.sent_version = req.version_info.clone();
            if !req.version_info.is_empty() {
                self.sync.sent(&type_url, &req.version_info);
                self.sync.acked(&type_url, &req.version_info);
            }
            self.respond(&type_url).await
        } else if names_changed {
            self.respond(&type_url).await
        } else {
            Ok(())
        }
    }

    async fn on_change(&mut self) -> Result<(), Status> {
        let Some(caller) = &self.caller else {
            return Ok(());
        };
        self.snapshot = self.source.snapshot(caller)?;
        let types: Vec<String> = self.types.keys().cloned().collect();
        for t in types {
            self.respond(&t).await?;
        }
        Ok(())
    }

    /// Sends the type's current resources unless the client already has exactly them.
    async fn respond(&mut self, type_url: &str) -> Result<(), Status> {
        let empty = Resources::new();
        let all = self.snapshot.resources.get(type_url).unwrap_or(&empty);
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let items: Vec<&Any> = match &state.names {
            None => all.values().collect(),
            Some(names) => names.iter().filter_map(|n| all.get(n)).collect(),
        };
        let version = version_of(all, state.names.as_ref());
        // A (re)subscription is answered unless the client already holds this version; a change
        // that changes nothing for this client is not pushed.
        if version == state.sent_version {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        state.sent_version = version.clone();
        state.sent_nonce = nonce.clone();
        self.sync.sent(type_url, &version);
        self.sync.pushed(type_url);
        let response = DiscoveryResponse {
            version_info: version,
            resources: items.into_iter().cloned().collect(),
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        };
        self.stats
            .responses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("stream closed"))
    }
}

/// Per-type state of a delta stream: what is subscribed and which version of each resource the
/// client holds (as far as this server knows).
#[derive(Default)]
struct DeltaType {
    /// `None`: wildcard.
    names: Option<BTreeSet<String>>,
    held: BTreeMap<String, String>,
    sent_nonce: String,
    /// The `system_version_info` of the last response (what a proxy-status view compares).
    sent_system: String,
    /// What the client held before the last response, restored if that response is NACKed.
    before: Option<BTreeMap<String, String>>,
}

/// The delta variant: only changed resources are sent, removals by name.
struct DeltaStream<S> {
    sync: crate::sync::StreamSync,
    source: Arc<S>,
    stats: Arc<ServerStats>,
    peer_id: Option<String>,
    caller: Option<Caller>,
    snapshot: Arc<Snapshot>,
    types: HashMap<String, DeltaType>,
    nonce: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl<S: SnapshotSource> DeltaStream<S> {
    async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut closing: watch::Receiver<bool>,
    ) {
        let _open = OpenStream::new(&self.stats);
        let mut changes = self.source.changes();
        changes.mark_unchanged();
        loop {
            let result = match next_event(&mut inbound, &mut changes, &mut closing, &self.tx).await
            {
                Event::Request(req) => self.on_request(req).await,
                Event::Changed => self.on_change().await,
                Event::End => break,
            };
            if let Err(status) = result {
                let _ = self.tx.send(Err(status)).await;
                break;
            }
        }
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        if self.caller.is_none() {
            let (caller, snapshot) = open(&*self.source, req.node.as_ref(), &self.peer_id)?;
            self.snapshot = snapshot;
            self.sync.caller(&caller);
            self.caller = Some(caller);
        }
        if !types::is_known(&req.type_url) {
            return Ok(());
        }
        let type_url = req.type_url.clone();
        let fresh = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            if req.response_nonce != state.sent_nonce {
                return Ok(());
            }
            if let Some(err) = &req.error_detail {
                self.stats
                    .nacks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let node = self
                    .caller
                    .as_ref()
                    .map(|c| c.node.id.as_str())
                    .unwrap_or("");
                tracing::warn!(node, type_url = %type_url, error = %err.message, "delta NACK: the proxy rejected the configuration and keeps its previous one");
                if let Some(c) = &self.caller {
                    self.source.nacked(c, &type_url, "", &err.message);
                }
                self.sync
                    .nacked(&type_url, &state.sent_system, &err.message);
                if let Some(before) = state.before.take() {
                    state.held = before;
                }
                return Ok(());
            }
            state.before = None;
            self.stats
                .acks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.sync.acked(&type_url, &state.sent_system);
        }
        if fresh {
            state.held = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let wildcard = req.resource_names_subscribe.iter().any(|n| n == "*")
                || (req.resource_names_subscribe.is_empty()
                    && types::wildcard_by_default(&type_url));
            state.names = if wildcard {
                None
            } else {
                Some(BTreeSet::new())
            };
        }
        let mut changed_names = fresh;
        if let Some(names) = &mut state.names {
            for n in &req.resource_names_subscribe {
                changed_names |= names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if let Some(names) = &mut state.names {
                changed_names |= names.remove(n);
            }
            state.held.remove(n);
        }
        if changed_names {
            // A new client gets an answer even if empty; a resuming one only what it lacks.
            let always = fresh && req.initial_resource_versions.is_empty();
            self.respond(&type_url, always).await
        } else {
            Ok(())
        }
    }

    async fn on_change(&mut self) -> Result<(), Status> {
        let Some(caller) = &self.caller else {
            return Ok(());
        };
        self.snapshot = self.source.snapshot(caller)?;
        let types: Vec<String> = self.types.keys().cloned().collect();
        for t in types {
            self.respond(&t, false).await?;
        }
        Ok(())
    }

    /// Sends what changed for this client: new or different resources, and removals. A first
    /// subscription is always answered (possibly empty), so the client knows where it stands.
    async fn respond(&mut self, type_url: &str, always: bool) -> Result<(), Status> {
        let empty = Resources::new();
        let all = self.snapshot.resources.get(type_url).unwrap_or(&empty);
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let wanted: Vec<(&String, &Any)> = match &state.names {
            None => all.iter().collect(),
            Some(names) => names.iter().filter_map(|n| all.get_key_value(n)).collect(),
        };
        let before = state.held.clone();
        let mut resources = Vec::new();
        for (name, any) in &wanted {
            let version = version_of(&BTreeMap::from([((*name).clone(), (*any).clone())]), None);
            if state.held.get(*name) != Some(&version) {
                state.held.insert((*name).clone(), version.clone());
                resources.push(envoy_types::pb::envoy::service::discovery::v3::Resource {
                    name: (*name).clone(),
                    version,
                    resource: Some((*any).clone()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = state
            .held
            .keys()
            .filter(|n| !wanted.iter().any(|(w, _)| w == n))
            .cloned()
            .collect();
        for n in &removed {
            state.held.remove(n);
        }
        if resources.is_empty() && removed.is_empty() && !always {
            if state.before.is_none() {
                // Nothing in flight and nothing to send: the client holds what it should (after a
                // NACK, too, once the rejected resources are gone from the snapshot).
                state.sent_system = version_of(all, state.names.as_ref());
                self.sync.sent(type_url, &state.sent_system);
                self.sync.acked(type_url, &state.sent_system);
            }
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        state.sent_nonce = nonce.clone();
        state.before = Some(before);
        state.sent_system = version_of(all, state.names.as_ref());
        self.sync.sent(type_url, &state.sent_system);
        self.sync.pushed(type_url);
        let response = DeltaDiscoveryResponse {
            system_version_info: state.sent_system.clone(),
            resources,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.stats
            .responses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("stream closed"))
    }
}

/// What wakes a stream up.
enum Event<R> {
    Request(R),
    Changed,
    End,
}

/// The next thing a stream must handle: a request, a configuration change, or its end (the client
/// went away or failed, the source is gone, or the server is shutting down).
async fn next_event<R, T>(
    inbound: &mut Streaming<R>,
    changes: &mut watch::Receiver<u64>,
    closing: &mut watch::Receiver<bool>,
    tx: &mpsc::Sender<Result<T, Status>>,
) -> Event<R> {
    tokio::select! {
        req = inbound.next() => match req {
            Some(Ok(req)) => Event::Request(req),
            Some(Err(status)) => {
                tracing::debug!(%status, "xDS stream ended by the client");
                Event::End
            }
            None => Event::End,
        },
        changed = changes.changed() => if changed.is_ok() { Event::Changed } else { Event::End },
        () = tx.closed() => Event::End,
        () = until_true(closing) => Event::End,
    }
}

/// Counts a stream as open for as long as it lives.
struct OpenStream(Arc<ServerStats>);

impl OpenStream {
    fn new(stats: &Arc<ServerStats>) -> Self {
        stats
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The caller of a new stream (its first request must name a node) and its first snapshot.
fn open<S: SnapshotSource>(
    source: &S,
    node: Option<&Node>,
    peer_id: &Option<String>,
) -> Result<(Caller, Arc<Snapshot>), Status> {
    let node = node
        .cloned()
        .ok_or_else(|| Status::invalid_argument("the first request must carry a node"))?;
    if node.id.is_empty() {
        return Err(Status::invalid_argument("node.id is required"));
    }
    let caller = Caller {
        node,
        peer_id: peer_id.clone(),
    };
    let snapshot = source.snapshot(&caller)?;
    tracing::info!(node = %caller.node.id, peer = ?caller.peer_id, "xDS stream opened");
    Ok((caller, snapshot))
}

/// Resolves when the flag turns true; never, if nobody can set it any more (a server built
/// without [`AdsServer::with_shutdown`]).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A content hash of the resources a subscription selects (names and bytes), stable across runs.
pub fn version_of(all: &Resources, names: Option<&BTreeSet<String>>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut feed = |name: &str, any: &Any| {
        for part in [
            name.as_bytes(),
            any.type_url.as_bytes(),
            any.value.as_slice(),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    };
    match names {
        None => all.iter().for_each(|(n, a)| feed(n, a)),
        Some(names) => names
            .iter()
            .filter_map(|n| all.get(n).map(|a| (n, a)))
            .for_each(|(n, a)| feed(n, a)),
    }
    let digest = ctx.finish();
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
