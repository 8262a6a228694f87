//! xDS figures (prints them; `cargo bench -p eastguard-benches --bench xds`):
//!
//! 1. Applying CDS + EDS with 10,000 endpoints in a real `eastguard proxy` process (release build,
//!    `EASTGUARD_BIN` or `target/release/eastguard`): time from the push to the proxy's ACK, for the
//!    first update and for a one-endpoint change of the 10,000; the proxy's RSS before and after.
//! 2. Push fan-out: 100 ADS client streams (the proxy's own client, handlers that decode every
//!    resource) on one server; time from a change to the 100th ACK.
//!
//! Everything runs on 127.0.0.1 and is bounded in rounds; processes are killed at the end.

#![expect(clippy::unwrap_used, reason = "benchmark harness")]

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use identity::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use xds::client::{ClientConfig, Handler};
use xds::codec;
use xds::pb::envoy::config::cluster::v3::{Cluster, cluster};
use xds::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, Node, SocketAddress, address, config_source,
    socket_address,
};
use xds::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use xds::pb::google::protobuf::Any;
use xds::server::{AdsServer, Caller, ServerStats, Snapshot, SnapshotSource};
use xds::types;

struct Source {
    snap: Mutex<Arc<Snapshot>>,
    changes: watch::Sender<u64>,
}

impl Source {
    fn set(&self, snap: Snapshot) {
        *self.snap.lock().unwrap() = Arc::new(snap);
        self.changes.send_modify(|v| *v += 1);
    }
}

impl SnapshotSource for Source {
    fn snapshot(&self, _: &Caller) -> Result<Arc<Snapshot>, tonic::Status> {
        Ok(self.snap.lock().unwrap().clone())
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: 2,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// One EDS cluster with `n` endpoints (10.x.y.z:8080); `salt` changes one of them.
fn snapshot(n: usize, salt: u32) -> Snapshot {
    let mut snap = Snapshot::default();
    let name = "outbound|8080||big.bench.svc.cluster.local";
    let c = Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(3)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        ..Default::default()
    };
    let endpoint = |i: u32| LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let la = ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: (0..n as u32)
                .map(|i| endpoint(if i == 0 { 1_000_000 + salt } else { i }))
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    snap.resources
        .entry(types::CLUSTER.into())
        .or_default()
        .insert(name.into(), codec::pack(&c));
    snap.resources
        .entry(types::ENDPOINT.into())
        .or_default()
        .insert(name.into(), codec::pack(&la));
    snap
}

async fn serve(source: Arc<Source>) -> (std::net::SocketAddr, Arc<ServerStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = AdsServer::new(source);
    let stats = server.stats();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                AggregatedDiscoveryServiceServer::new(server).max_encoding_message_size(64 << 20),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, stats)
}

async fn wait_acks(stats: &ServerStats, target: u64, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while stats.acks.load(Ordering::Relaxed) < target {
        assert!(
            t0.elapsed() < limit,
            "no ACK within {limit:?} ({} of {target})",
            stats.acks.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    t0.elapsed()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn big_update() {
    let bin = std::env::var("EASTGUARD_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/eastguard").to_owned()
    });
    if !std::path::Path::new(&bin).exists() {
        println!("SKIPPED: proxy apply benchmark needs {bin} (cargo build --release)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("eastguard-xds-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = identity::DevCa::new(TrustDomain::parse("cluster.local").unwrap()).unwrap();
    let svid = ca
        .mint(
            &SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/proxy").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    std::fs::write(dir.join("cert.pem"), &svid.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &svid.key_pem).unwrap();
    std::fs::write(dir.join("bundle.pem"), ca.cert_pem()).unwrap();

    let source = Arc::new(Source {
        snap: Mutex::default(),
        changes: watch::channel(0).0,
    });
    let (addr, stats) = serve(source.clone()).await;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        "node: {{id: bench, workload: bench, namespace: bench}}\nadmin: {{address: \"{admin}\"}}\nidentity: {{files: {{cert: {d}/cert.pem, key: {d}/key.pem, bundle: {d}/bundle.pem}}}}\naccess_log: {{path: /dev/null}}\nxds: {{address: \"{addr}\"}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("proxy.yaml"), config).unwrap();
    let mut child = std::process::Command::new(&bin)
        .args(["--log-level", "warn", "proxy", "--config"])
        .arg(dir.join("proxy.yaml"))
        .spawn()
        .unwrap();
    let pid = child.id();
    // Empty CDS/LDS first: the process is up and subscribed.
    eprintln!("waiting for the proxy (pid {pid}) to subscribe");
    wait_acks(&stats, 1, Duration::from_secs(20)).await;
    eprintln!("subscribed; pushing {} endpoints", 10_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);

    const N: usize = 10_000;
    let acks = stats.acks.load(Ordering::Relaxed);
    let t = Instant::now();
    source.set(snapshot(N, 0));
    // CDS ACK, then EDS subscription and its ACK.
    wait_acks(&stats, acks + 2, Duration::from_secs(60)).await;
    let first = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = rss_kib(pid);

    let mut eds_times = Vec::new();
    for round in 1..=7u32 {
        let acks = stats.acks.load(Ordering::Relaxed);
        let t = Instant::now();
        source.set(snapshot(N, round));
        wait_acks(&stats, acks + 1, Duration::from_secs(60)).await;
        eds_times.push(t.elapsed());
    }
    eds_times.sort();
    // The allocator returns freed pages after a delay (mimalloc's purge delay): RSS once settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_settled = rss_kib(pid);
    println!(
        "CDS+EDS, {N} endpoints, first apply (push → proxy ACK of both): {:.1} ms",
        first.as_secs_f64() * 1e3
    );
    println!(
        "EDS update of {N} endpoints (one changed), push → ACK, 7 rounds: median {:.1} ms, max {:.1} ms",
        eds_times[3].as_secs_f64() * 1e3,
        eds_times[6].as_secs_f64() * 1e3
    );
    println!(
        "proxy RSS: {} KiB before, {} KiB after the 10,000-endpoint cluster (+{} KiB)",
        rss_before,
        rss_after,
        rss_after.saturating_sub(rss_before)
    );
    println!(
        "proxy RSS 3 s after the last update: {rss_settled} KiB (+{} KiB)",
        rss_settled.saturating_sub(rss_before)
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A simulated proxy: decodes every resource it is sent, subscribes to EDS for its clusters.
#[derive(Default)]
struct Sim {
    clusters: BTreeSet<String>,
}

impl Handler for Sim {
    type Error = String;

    fn apply(&mut self, type_url: &str, _: &str, resources: Vec<Any>) -> Result<(), String> {
        if type_url == types::CLUSTER {
            self.clusters = resources
                .iter()
                .map(|r| {
                    codec::unpack::<Cluster>(r)
                        .map(|c| c.name)
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<_, _>>()?;
        } else {
            for r in &resources {
                codec::unpack::<ClusterLoadAssignment>(r).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
    fn interest(&self) -> Vec<(&'static str, Option<BTreeSet<String>>)> {
        vec![
            (types::CLUSTER, None),
            (types::ENDPOINT, Some(self.clusters.clone())),
        ]
    }
}

async fn fan_out() {
    const PROXIES: u64 = 100;
    const ENDPOINTS: usize = 100;
    let source = Arc::new(Source {
        snap: Mutex::default(),
        changes: watch::channel(0).0,
    });
    source.set(snapshot(ENDPOINTS, 0));
    let (addr, stats) = serve(source.clone()).await;
    let (stop_tx, stop) = watch::channel(false);
    for i in 0..PROXIES {
        let node = Node {
            id: format!("sim-{i}"),
            ..Default::default()
        };
        tokio::spawn(xds::client::run(
            ClientConfig::new(format!("http://{addr}"), node),
            Sim::default(),
            stop.clone(),
        ));
    }
    wait_acks(&stats, PROXIES * 2, Duration::from_secs(60)).await;
    let mut times = Vec::new();
    for round in 1..=20u32 {
        let acks = stats.acks.load(Ordering::Relaxed);
        let t = Instant::now();
        source.set(snapshot(ENDPOINTS, round));
        wait_acks(&stats, acks + PROXIES, Duration::from_secs(60)).await;
        times.push(t.elapsed());
    }
    times.sort();
    let _ = stop_tx.send(true);
    println!(
        "push fan-out: EDS change ({ENDPOINTS} endpoints) to {PROXIES} ADS streams, change → 100th ACK, 20 rounds: median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        times[10].as_secs_f64() * 1e3,
        times[18].as_secs_f64() * 1e3,
        times[19].as_secs_f64() * 1e3
    );
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is ignored.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        big_update().await;
        fan_out().await;
    });
}
