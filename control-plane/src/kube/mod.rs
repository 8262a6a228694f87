//! The control plane on the Kubernetes API (`--kubernetes`): Services, EndpointSlices and Pods,
//! and Istio's ServiceEntry, WorkloadEntry, AuthorizationPolicy, PeerAuthentication and Telemetry,
//! each kept by a reflector (`watch`), turned into the registry the files also feed (`convert`).
//! Namespaces and ServiceAccounts (their metadata only) feed the API inventory's owners and
//! caller identities (`cluster`), not the registry.
//!
//! Nothing from Kubernetes is served until every resource has been listed once: serving
//! services before their policies would grant access for a moment. After that, the last good
//! state is served while the API is away.

pub mod client;
pub mod cluster;
pub mod convert;
pub mod events;
pub mod watch;
pub mod webhook_config;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch as channel;

use crate::registry::Registry;
use watch::{Reflector, Resource, Snapshot};

const RESOURCES: [Resource; 8] = [
    Resource {
        path: "/api/v1/services",
        api_version: "v1",
        kind: "Service",
        optional: false,
        metadata_only: false,
    },
    Resource {
        path: "/api/v1/pods",
        api_version: "v1",
        kind: "Pod",
        optional: false,
        metadata_only: false,
    },
    Resource {
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        optional: false,
        metadata_only: false,
    },
    Resource {
        path: "/apis/networking.istio.io/v1/serviceentries",
        api_version: "networking.istio.io/v1",
        kind: "ServiceEntry",
        optional: true,
        metadata_only: false,
    },
    Resource {
        path: "/apis/networking.istio.io/v1/workloadentries",
        api_version: "networking.istio.io/v1",
        kind: "WorkloadEntry",
        optional: true,
        metadata_only: false,
    },
    Resource {
        path: "/apis/security.istio.io/v1/authorizationpolicies",
        api_version: "security.istio.io/v1",
        kind: "AuthorizationPolicy",
        optional: true,
        metadata_only: false,
    },
    Resource {
        path: "/apis/security.istio.io/v1/peerauthentications",
        api_version: "security.istio.io/v1",
        kind: "PeerAuthentication",
        optional: true,
        metadata_only: false,
    },
    Resource {
        path: "/apis/telemetry.istio.io/v1/telemetries",
        api_version: "telemetry.istio.io/v1",
        kind: "Telemetry",
        optional: true,
        metadata_only: false,
    },
];

/// Read for owners and identities (`cluster`), not for the registry.
const IDENTITY_RESOURCES: [Resource; 2] = [
    Resource {
        path: "/api/v1/namespaces",
        api_version: "v1",
        kind: "Namespace",
        optional: false,
        metadata_only: true,
    },
    Resource {
        path: "/api/v1/serviceaccounts",
        api_version: "v1",
        kind: "ServiceAccount",
        optional: false,
        metadata_only: true,
    },
];

/// How the control plane reaches the API.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// A kubeconfig; without one, the pod's service account (in-cluster).
    pub kubeconfig: Option<std::path::PathBuf>,
    pub cluster_domain: String,
    /// The trust domain of workload IDs (`spiffe://TD/ns/NS/sa/SA`).
    pub trust_domain: String,
    /// Seconds one watch stays open (the server's `timeoutSeconds`).
    pub watch_timeout: u32,
}

/// The API client the options name.
pub fn connect(opts: &KubeOptions) -> Result<client::Client, client::ConfigError> {
    match &opts.kubeconfig {
        Some(p) => client::Client::from_kubeconfig(p),
        None => client::Client::in_cluster(),
    }
}

/// What the reflectors publish: the registry and the pods as listed (the CA reads them).
pub struct Started {
    /// `None` until every resource is listed, then the registry from Kubernetes, republished
    /// (at most every 20 ms) as objects change.
    pub registry: channel::Receiver<Option<Arc<Registry>>>,
    pub pods: channel::Receiver<Snapshot>,
    /// `None` until Namespaces and ServiceAccounts are both listed.
    pub cluster: channel::Receiver<Option<Arc<cluster::Cluster>>>,
}

/// Starts the reflectors.
pub fn start(client: &client::Client, opts: KubeOptions) -> Started {
    let reflect = |resource: Resource| {
        let (tx, rx) = channel::channel(Snapshot::default());
        tokio::spawn(
            Reflector {
                client: client.clone(),
                resource,
                tx,
                watch_timeout: opts.watch_timeout,
            }
            .run(),
        );
        rx
    };
    let receivers: Vec<_> = RESOURCES.into_iter().map(reflect).collect();
    let identities: Vec<_> = IDENTITY_RESOURCES.into_iter().map(reflect).collect();
    let pods = receivers[1].clone();
    let (tx, rx) = channel::channel(None);
    tokio::spawn(aggregate(receivers, tx, opts.cluster_domain));
    let (cluster_tx, cluster_rx) = channel::channel(None);
    tokio::spawn(keep_cluster(identities, cluster_tx, opts.trust_domain));
    Started {
        registry: rx,
        pods,
        cluster: cluster_rx,
    }
}

/// Namespaces and ServiceAccounts → [`cluster::Cluster`], rebuilt (at most every second) as
/// they change.
async fn keep_cluster(
    mut receivers: Vec<channel::Receiver<Snapshot>>,
    tx: channel::Sender<Option<Arc<cluster::Cluster>>>,
    trust_domain: String,
) {
    loop {
        let [namespaces, accounts] = [0, 1].map(|i| receivers[i].borrow_and_update().clone());
        if namespaces.synced && accounts.synced {
            tx.send_replace(Some(Arc::new(cluster::Cluster::new(
                &trust_domain,
                &namespaces.objects,
                &accounts.objects,
            ))));
        }
        if !next_change(&mut receivers, &tx, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// Waits for any receiver to change, then `pause` more, so a burst of events is one rebuild.
/// `false` when a reflector or the consumer is gone.
async fn next_change<T>(
    receivers: &mut [channel::Receiver<Snapshot>],
    tx: &channel::Sender<T>,
    pause: Duration,
) -> bool {
    let changed =
        futures_util::future::select_all(receivers.iter_mut().map(|r| Box::pin(r.changed()))).await;
    if changed.0.is_err() || tx.is_closed() {
        return false;
    }
    tokio::time::sleep(pause).await;
    true
}

async fn aggregate(
    mut receivers: Vec<channel::Receiver<Snapshot>>,
    tx: channel::Sender<Option<Arc<Registry>>>,
    cluster_domain: String,
) {
    let mut converter = convert::Converter::new(cluster_domain);
    let mut announced = false;
    loop {
        let snapshots: Vec<Snapshot> = receivers
            .iter_mut()
            .map(|r| r.borrow_and_update().clone())
            .collect();
        if snapshots.iter().all(|s| s.synced) {
            if !announced {
                tracing::info!("every Kubernetes resource listed; serving what they say");
                announced = true;
            }
            let objects = convert::Objects {
                services: snapshots[0].objects.clone(),
                pods: snapshots[1].objects.clone(),
                endpoint_slices: snapshots[2].objects.clone(),
                istio: snapshots[3..].iter().map(|s| s.objects.clone()).collect(),
            };
            tx.send_replace(Some(Arc::new(converter.registry(&objects))));
        }
        if !next_change(&mut receivers, &tx, Duration::from_millis(20)).await {
            return;
        }
    }
}
