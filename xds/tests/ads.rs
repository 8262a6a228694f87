//! The ADS client against the ADS server over real gRPC on loopback: wildcard and derived
//! subscriptions, ACK and NACK, per-node snapshots, and reconnection without duplicate pushes.
#![expect(clippy::unwrap_used, reason = "test helpers")]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eastguard_xds::client::{self, ClientConfig, Handler};
use eastguard_xds::pb::envoy::config::cluster::v3::Cluster;
use eastguard_xds::pb::envoy::config::core::v3::Node;
use eastguard_xds::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use eastguard_xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use eastguard_xds::pb::google::protobuf::Any;
use eastguard_xds::server::AdsServer;
use eastguard_xds::{codec, types};
use test_util::ads::{FakeAds, Source, snapshot};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Node `node` gets clusters and endpoints (CLA) of these names.
fn set(source: &Source, node: &str, clusters: &[&str], endpoints: &[&str]) {
    let c = clusters.iter().map(|n| {
        let any = codec::pack(&Cluster {
            name: (*n).into(),
            ..Default::default()
        });
        (types::CLUSTER, *n, any)
    });
    let e = endpoints.iter().map(|n| {
        let any = codec::pack(&ClusterLoadAssignment {
            cluster_name: (*n).into(),
            ..Default::default()
        });
        (types::ENDPOINT, *n, any)
    });
    source.set(node, snapshot(c.chain(e)));
}

/// Applies CDS then subscribes to EDS for the clusters it holds; refuses names starting "bad".
#[derive(Clone, Default)]
struct Recorder {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    clusters: BTreeSet<String>,
    endpoints: BTreeSet<String>,
    applied: Vec<(String, String)>,
}

impl Handler for Recorder {
    type Error = String;

    fn apply(&mut self, type_url: &str, version: &str, resources: Vec<Any>) -> Result<(), String> {
        let mut names = BTreeSet::new();
        for r in &resources {
            let name = if type_url == types::CLUSTER {
                codec::unpack::<Cluster>(r).map_err(|e| e.to_string())?.name
            } else {
                codec::unpack::<ClusterLoadAssignment>(r)
                    .map_err(|e| e.to_string())?
                    .cluster_name
            };
            if name.starts_with("bad") {
                return Err(format!("{name}: refused"));
            }
            names.insert(name);
        }
        let mut s = self.state.lock().unwrap();
        if type_url == types::CLUSTER {
            s.clusters = names;
        } else {
            s.endpoints = names;
        }
        s.applied
            .push((types::short(type_url).into(), version.into()));
        Ok(())
    }

    fn interest(&self) -> Vec<(&'static str, Option<BTreeSet<String>>)> {
        let s = self.state.lock().unwrap();
        vec![
            (types::CLUSTER, None),
            (types::ENDPOINT, Some(s.clusters.clone())),
        ]
    }
}

fn config(addr: std::net::SocketAddr, node: &str, delta: bool) -> ClientConfig {
    let mut c = ClientConfig::new(
        format!("http://{addr}"),
        Node {
            id: node.into(),
            ..Default::default()
        },
    );
    c.backoff_base = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(100);
    c.delta = delta;
    c
}

async fn eventually(what: &str, f: impl FnMut() -> bool) {
    test_util::eventually(what, Duration::from_secs(3), f).await;
}

#[tokio::test]
async fn sotw_derived_subscriptions_ack_nack_and_per_node_snapshots() {
    derived_subscriptions_ack_nack_and_per_node_snapshots(false).await;
}

#[tokio::test]
async fn delta_derived_subscriptions_ack_nack_and_per_node_snapshots() {
    derived_subscriptions_ack_nack_and_per_node_snapshots(true).await;
}

#[tokio::test]
async fn sotw_restarted_server_does_not_push_what_the_client_holds() {
    a_restarted_server_does_not_push_what_the_client_holds(false).await;
}

#[tokio::test]
async fn delta_restarted_server_does_not_push_what_the_client_holds() {
    a_restarted_server_does_not_push_what_the_client_holds(true).await;
}

/// A server built without a shutdown signal keeps its streams open.
#[tokio::test]
async fn streams_stay_open_without_a_shutdown_signal() {
    let source = Source::new();
    set(&source, "a", &["c1"], &["c1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = AdsServer::new(source.clone());
    let stats = server.stats();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (stop_tx, stop) = watch::channel(false);
    let rec = Recorder::default();
    tokio::spawn(client::run(config(addr, "a", false), rec.clone(), stop));
    let st = rec.state.clone();
    eventually("sync", || st.lock().unwrap().endpoints.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.streams.load(std::sync::atomic::Ordering::Relaxed), 1);
    set(&source, "a", &["c1", "c2"], &["c1", "c2"]);
    eventually("push on the same stream", || {
        st.lock().unwrap().endpoints.len() == 2
    })
    .await;
    stop_tx.send_replace(true);
}

async fn derived_subscriptions_ack_nack_and_per_node_snapshots(delta: bool) {
    let source = Source::new();
    set(&source, "a", &["c1", "c2"], &["c1", "c2", "c3"]);
    set(&source, "b", &["other"], &["other"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = FakeAds::serve(source.clone(), listener).await;
    let stats = server.stats.clone();
    let (stop_tx, stop) = watch::channel(false);

    let rec = Recorder::default();
    tokio::spawn(client::run(
        config(addr, "a", delta),
        rec.clone(),
        stop.clone(),
    ));
    let st = rec.state.clone();
    eventually("CDS and EDS", || {
        let s = st.lock().unwrap();
        s.clusters.len() == 2 && s.endpoints.len() == 2
    })
    .await;
    {
        let s = st.lock().unwrap();
        // Only what node "a" is given, and only the endpoints of its clusters.
        assert_eq!(s.clusters, BTreeSet::from(["c1".into(), "c2".into()]));
        assert_eq!(s.endpoints, BTreeSet::from(["c1".into(), "c2".into()]));
    }

    // A bad update is NACKed; the handler keeps what it had; the server hears about it.
    set(&source, "a", &["c1", "bad"], &["c1"]);
    eventually("NACK", || !source.nacks().is_empty()).await;
    assert!(source.nacks()[0].starts_with("a CDS bad: refused"));
    assert_eq!(st.lock().unwrap().clusters.len(), 2);
    assert_eq!(stats.nacks.load(std::sync::atomic::Ordering::Relaxed), 1);

    // Fixed: ACKed, and EDS follows the new cluster set.
    set(&source, "a", &["c3"], &["c1", "c3"]);
    eventually("recovery", || {
        let s = st.lock().unwrap();
        s.clusters == BTreeSet::from(["c3".into()]) && s.endpoints == BTreeSet::from(["c3".into()])
    })
    .await;

    // An unknown node is refused; it gets nothing.
    let stranger = Recorder::default();
    tokio::spawn(client::run(
        config(addr, "nobody", delta),
        stranger.clone(),
        stop.clone(),
    ));
    eventually("the stranger's stream refused", || source.refused() >= 1).await;
    assert!(stranger.state.lock().unwrap().applied.is_empty());
    stop_tx.send_replace(true);
}

async fn a_restarted_server_does_not_push_what_the_client_holds(delta: bool) {
    let source = Source::new();
    set(&source, "a", &["c1"], &["c1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = FakeAds::serve(source.clone(), listener).await;
    let (stop_tx, stop) = watch::channel(false);
    let rec = Recorder::default();
    tokio::spawn(client::run(
        config(addr, "a", delta),
        rec.clone(),
        stop.clone(),
    ));
    let st = rec.state.clone();
    eventually("first sync", || st.lock().unwrap().applied.len() == 2).await;

    server.stop().await;
    // A fresh server (same content, versions are content hashes) on the same address.
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let server2 = FakeAds::serve(source.clone(), listener).await;
    let stats2 = server2.stats.clone();
    eventually("resubscription", || {
        stats2.streams.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(st.lock().unwrap().applied.len(), 2);

    // A change after the restart arrives, and it is all the new server ever sent: nothing was
    // pushed again for what the client already held.
    set(&source, "a", &["c1", "c2"], &["c1", "c2"]);
    eventually("push after restart", || {
        st.lock().unwrap().endpoints.len() == 2
    })
    .await;
    assert_eq!(
        st.lock().unwrap().applied.len(),
        4,
        "one CDS and one EDS update more"
    );
    assert_eq!(
        stats2.responses.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the new server sent only the change"
    );
    stop_tx.send_replace(true);
}
