//! An ADS server on loopback (the real `xds::server`, plain gRPC) whose snapshot per node id a
//! test sets and replaces; it records the NACKs it receives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use xds::pb::google::protobuf::Any;
use xds::server::{AdsServer, Caller, ServerStats, Snapshot, SnapshotSource};

/// Snapshots by node id.
pub struct Source {
    nodes: Mutex<BTreeMap<String, Arc<Snapshot>>>,
    changes: watch::Sender<u64>,
    nacks: Mutex<Vec<String>>,
    refused: std::sync::atomic::AtomicU64,
}

impl Source {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            nodes: Mutex::default(),
            changes: watch::channel(0).0,
            nacks: Mutex::default(),
            refused: Default::default(),
        })
    }

    /// Streams refused so far (a node with no snapshot).
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces `node`'s snapshot and tells its streams.
    pub fn set(&self, node: &str, snapshot: Snapshot) {
        self.nodes
            .lock()
            .unwrap()
            .insert(node.into(), Arc::new(snapshot));
        self.changes.send_modify(|v| *v += 1);
    }

    /// `"<node> <type> <detail>"` for every NACK so far.
    pub fn nacks(&self) -> Vec<String> {
        self.nacks.lock().unwrap().clone()
    }
}

impl SnapshotSource for Source {
    fn snapshot(&self, caller: &Caller) -> Result<Arc<Snapshot>, tonic::Status> {
        self.nodes
            .lock()
            .unwrap()
            .get(&caller.node.id)
            .cloned()
            .ok_or_else(|| {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tonic::Status::permission_denied("unknown node")
            })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn nacked(&self, caller: &Caller, type_url: &str, _version: &str, detail: &str) {
        self.nacks.lock().unwrap().push(format!(
            "{} {} {detail}",
            caller.node.id,
            xds::types::short(type_url)
        ));
    }
}

/// A snapshot from `(type_url, name, resource)` triples.
pub fn snapshot<'a>(resources: impl IntoIterator<Item = (&'a str, &'a str, Any)>) -> Snapshot {
    let mut snap = Snapshot::default();
    for (type_url, name, any) in resources {
        snap.resources
            .entry(type_url.to_owned())
            .or_default()
            .insert(name.to_owned(), any);
    }
    snap
}

/// A running server: its address, counters, and a stop that closes its streams.
pub struct FakeAds {
    pub addr: SocketAddr,
    pub source: Arc<Source>,
    pub stats: Arc<ServerStats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAds {
    /// Serves `source` on `listener` (bind it first to restart on the same address).
    pub async fn serve(source: Arc<Source>, listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let (stop, closing) = watch::channel(false);
        let server = AdsServer::new(source.clone()).with_shutdown(closing.clone());
        let stats = server.stats();
        let mut closing2 = closing;
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(server))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = closing2.wait_for(|c| *c).await;
                    },
                )
                .await;
        });
        Self {
            addr,
            source,
            stats,
            stop,
            task,
        }
    }

    /// A new server on a free loopback port.
    pub async fn start(source: Arc<Source>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(source, listener).await
    }

    /// Closes the streams and the listener.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}
