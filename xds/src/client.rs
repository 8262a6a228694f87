//! ADS client, state of the world or delta (`ClientConfig::delta`). The [`Handler`] owns the resources: it validates and applies a
//! type's full state (an error is sent back as a NACK and the handler keeps what it had), and says
//! which names it wants next (RDS and EDS names follow from listeners and clusters).
//!
//! Every response is answered: ACK with its version and nonce, or NACK with the last accepted
//! version, the nonce and `error_detail`. A broken stream is reopened with exponential backoff and
//! jitter, resubscribing to everything with the versions already held, so the server need not resend
//! what is unchanged. HTTP/2 keepalive finds a dead control plane between pushes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

use crate::types;

/// What the proxy does with resources.
pub trait Handler: Send + 'static {
    /// Why an update is refused; its text is the NACK's `error_detail`.
    type Error: std::fmt::Display;
    /// A type's complete state. `Ok` is ACKed; `Err` is NACKed and must leave the handler's state
    /// as it was (or, for a partial rejection, leave in force only what it names as applied).
    fn apply(
        &mut self,
        type_url: &str,
        version: &str,
        resources: Vec<Any>,
    ) -> Result<(), Self::Error>;
    /// The names wanted per type now, in subscription order; `None` subscribes to all (LDS, CDS).
    fn interest(&self) -> Vec<(&'static str, Option<BTreeSet<String>>)>;
    /// The stream came up (`true`) or went down.
    fn connection(&mut self, _up: bool) {}
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port`.
    pub server: String,
    pub node: Node,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub keepalive: Duration,
    /// mTLS to the server (Istio's 15012); plaintext when `None`.
    pub tls: Option<crate::tls::ClientTls>,
    /// Use the delta variant (`DeltaAggregatedResources`) instead of state of the world.
    pub delta: bool,
}

impl ClientConfig {
    pub fn new(server: String, node: Node) -> Self {
        Self {
            server,
            node,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(15),
            keepalive: Duration::from_secs(15),
            tls: None,
            delta: false,
        }
    }
}

/// Per-type state of the client: what it asked for and what it holds.
#[derive(Default, Clone)]
struct Held {
    names: Option<BTreeSet<String>>,
    acked_version: String,
    last_nonce: String,
    requested: bool,
}

/// Runs until `shutdown` turns true: connect, subscribe, apply, reconnect.
pub async fn run<H: Handler>(
    config: ClientConfig,
    mut handler: H,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut held: HashMap<&'static str, Held> = HashMap::new();
    let mut delta_held: HashMap<&'static str, DeltaHeld> = HashMap::new();
    let mut backoff = backoff::Backoff::new(config.backoff_base, config.backoff_max);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let outcome = if config.delta {
            tokio::select! {
                o = delta_session(&config, &mut handler, &mut delta_held) => o,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        } else {
            tokio::select! {
                o = session(&config, &mut handler, &mut held) => o,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        };
        handler.connection(false);
        match outcome {
            Ok(()) => {
                tracing::warn!(server = %config.server, "xDS stream closed by the server; reconnecting");
                backoff.reset();
            }
            Err(SessionError { failure, received }) => {
                if received {
                    backoff.reset();
                }
                tracing::warn!(server = %config.server, error = %failure, "xDS stream failed; keeping the last good configuration");
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

struct SessionError {
    failure: StreamFailure,
    /// Whether the stream got as far as a response (resets the backoff).
    received: bool,
}

/// Why an xDS stream ended; the last good configuration stays in force.
#[derive(Debug, thiserror::Error)]
enum StreamFailure {
    #[error("bad xDS server address {server:?}: {reason}")]
    BadAddress { server: String, reason: String },
    #[error("connect {server}: {chain}")]
    Connect { server: String, chain: String },
    #[error("{stream}: {} {}", .status.code(), .status.message())]
    Rpc {
        stream: &'static str,
        status: tonic::Status,
    },
    #[error("request queue full")]
    QueueFull,
    #[error("request queue closed")]
    QueueClosed,
}

impl<T> From<mpsc::error::TrySendError<T>> for StreamFailure {
    fn from(e: mpsc::error::TrySendError<T>) -> Self {
        match e {
            mpsc::error::TrySendError::Full(_) => StreamFailure::QueueFull,
            mpsc::error::TrySendError::Closed(_) => StreamFailure::QueueClosed,
        }
    }
}

async fn connect(config: &ClientConfig) -> Result<Channel, StreamFailure> {
    let endpoint = Endpoint::from_shared(config.server.clone())
        .map_err(|e| StreamFailure::BadAddress {
            server: config.server.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(config.keepalive)
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = match &config.tls {
        Some(tls) => {
            endpoint
                .connect_with_connector(crate::tls::connector(tls.clone()))
                .await
        }
        None => endpoint.connect().await,
    };
    channel.map_err(|e| StreamFailure::Connect {
        server: config.server.clone(),
        chain: error_chain(&e),
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn session<H: Handler>(
    config: &ClientConfig,
    handler: &mut H,
    held: &mut HashMap<&'static str, Held>,
) -> Result<(), SessionError> {
    let fail = |failure: StreamFailure, received: bool| SessionError { failure, received };
    let channel = connect(config).await.map_err(|m| fail(m, false))?;
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
    // Resubscribe to everything, telling the server which versions are held.
    for h in held.values_mut() {
        h.last_nonce.clear();
        h.requested = false;
    }
    let mut first = true;
    send_interest(config, handler, held, &tx, &mut first).map_err(|m| fail(m, false))?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            fail(
                StreamFailure::Rpc {
                    stream: "ADS",
                    status: s,
                },
                false,
            )
        })?
        .into_inner();
    handler.connection(true);
    tracing::info!(server = %config.server, "xDS stream open");
    let mut received = false;
    while let Some(item) = responses.next().await {
        let response = item.map_err(|s| {
            fail(
                StreamFailure::Rpc {
                    stream: "ADS",
                    status: s,
                },
                received,
            )
        })?;
        received = true;
        on_response(config, handler, held, &tx, &mut first, response).map_err(|m| fail(m, true))?;
    }
    Ok(())
}

fn on_response<H: Handler>(
    config: &ClientConfig,
    handler: &mut H,
    held: &mut HashMap<&'static str, Held>,
    tx: &mpsc::Sender<DiscoveryRequest>,
    first: &mut bool,
    response: DiscoveryResponse,
) -> Result<(), StreamFailure> {
    let Some(type_url) = types::ALL.iter().copied().find(|t| *t == response.type_url) else {
        tracing::warn!(type_url = %response.type_url, "response of an unknown type ignored");
        return Ok(());
    };
    let outcome = match response.resources.iter().find(|r| r.type_url != type_url) {
        Some(r) => Err(format!(
            "a {} response carries a {} resource",
            types::short(type_url),
            r.type_url
        )),
        None => handler
            .apply(type_url, &response.version_info, response.resources)
            .map_err(|e| e.to_string()),
    };
    let h = held.entry(type_url).or_default();
    h.last_nonce = response.nonce.clone();
    let error_detail = match outcome {
        Ok(()) => {
            tracing::info!(r#type = types::short(type_url), version = %response.version_info, "xDS ACK");
            h.acked_version = response.version_info.clone();
            None
        }
        Err(detail) => {
            tracing::warn!(r#type = types::short(type_url), version = %response.version_info, error = %detail, "xDS NACK; keeping the previous configuration");
            Some(RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message: detail,
                details: Vec::new(),
            })
        }
    };
    // The answer carries the current names for this type, so a changed interest rides on it.
    let names = handler
        .interest()
        .into_iter()
        .find(|(t, _)| *t == type_url)
        .and_then(|(_, n)| n);
    let h = held.entry(type_url).or_default();
    h.names = names.clone();
    let request = DiscoveryRequest {
        version_info: h.acked_version.clone(),
        node: first_node(config, first),
        resource_names: names.map(|n| n.into_iter().collect()).unwrap_or_default(),
        type_url: type_url.to_owned(),
        response_nonce: response.nonce,
        error_detail,
        ..Default::default()
    };
    tx.try_send(request)?;
    send_interest(config, handler, held, tx, first)
}

/// Sends a request for every type whose wanted names differ from what was last asked.
fn send_interest<H: Handler>(
    config: &ClientConfig,
    handler: &H,
    held: &mut HashMap<&'static str, Held>,
    tx: &mpsc::Sender<DiscoveryRequest>,
    first: &mut bool,
) -> Result<(), StreamFailure> {
    for (type_url, names) in handler.interest() {
        let h = held.entry(type_url).or_default();
        if h.requested && h.names == names {
            continue;
        }
        // Nothing named and never asked: nothing to say for RDS / EDS.
        if !h.requested
            && !types::wildcard_by_default(type_url)
            && names.as_ref().is_none_or(BTreeSet::is_empty)
            && h.acked_version.is_empty()
        {
            continue;
        }
        h.requested = true;
        h.names = names.clone();
        let request = DiscoveryRequest {
            version_info: h.acked_version.clone(),
            node: first_node(config, first),
            resource_names: names.map(|n| n.into_iter().collect()).unwrap_or_default(),
            type_url: type_url.to_owned(),
            response_nonce: h.last_nonce.clone(),
            ..Default::default()
        };
        tx.try_send(request)?;
    }
    Ok(())
}

/// The node goes on the first request of a stream only.
fn first_node(config: &ClientConfig, first: &mut bool) -> Option<Node> {
    std::mem::take(first).then(|| config.node.clone())
}

/// Per-type state of a delta session: the resources held (name → version, resource) and the names
/// subscribed so far.
#[derive(Default, Clone)]
struct DeltaHeld {
    resources: BTreeMap<String, (String, Any)>,
    /// `None`: wildcard.
    names: Option<BTreeSet<String>>,
    requested: bool,
}

async fn delta_session<H: Handler>(
    config: &ClientConfig,
    handler: &mut H,
    held: &mut HashMap<&'static str, DeltaHeld>,
) -> Result<(), SessionError> {
    let fail = |failure: StreamFailure, received: bool| SessionError { failure, received };
    let channel = connect(config).await.map_err(|m| fail(m, false))?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    for h in held.values_mut() {
        h.requested = false;
    }
    let mut first = true;
    delta_interest(config, handler, held, &tx, &mut first).map_err(|m| fail(m, false))?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut responses = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            fail(
                StreamFailure::Rpc {
                    stream: "delta ADS",
                    status: s,
                },
                false,
            )
        })?
        .into_inner();
    handler.connection(true);
    tracing::info!(server = %config.server, "delta xDS stream open");
    let mut received = false;
    while let Some(item) = responses.next().await {
        let response = item.map_err(|s| {
            fail(
                StreamFailure::Rpc {
                    stream: "delta ADS",
                    status: s,
                },
                received,
            )
        })?;
        received = true;
        let Some(type_url) = types::ALL.iter().copied().find(|t| *t == response.type_url) else {
            continue;
        };
        let h = held.entry(type_url).or_default();
        let mut candidate = h.resources.clone();
        for name in &response.removed_resources {
            candidate.remove(name);
        }
        let mut bad = None;
        for r in &response.resources {
            match &r.resource {
                Some(any) if any.type_url == type_url => {
                    candidate.insert(r.name.clone(), (r.version.clone(), any.clone()));
                }
                Some(any) => {
                    bad = Some(format!(
                        "a {} response carries a {}",
                        types::short(type_url),
                        any.type_url
                    ))
                }
                None => {
                    candidate.remove(&r.name);
                }
            }
        }
        let outcome = match bad {
            Some(e) => Err(e),
            None => handler
                .apply(
                    type_url,
                    &response.system_version_info,
                    candidate.values().map(|(_, a)| a.clone()).collect(),
                )
                .map_err(|e| e.to_string()),
        };
        let error_detail = match outcome {
            Ok(()) => {
                tracing::info!(r#type = types::short(type_url), version = %response.system_version_info, "delta xDS ACK");
                held.entry(type_url).or_default().resources = candidate;
                None
            }
            Err(detail) => {
                tracing::warn!(r#type = types::short(type_url), error = %detail, "delta xDS NACK; keeping the previous configuration");
                Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message: detail,
                    details: Vec::new(),
                })
            }
        };
        tx.try_send(DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            response_nonce: response.nonce,
            error_detail,
            ..Default::default()
        })
        .map_err(|e| fail(e.into(), true))?;
        delta_interest(config, handler, held, &tx, &mut first).map_err(|m| fail(m, true))?;
    }
    Ok(())
}

/// Subscribes and unsubscribes as the handler's interest changes; a type's first request on a
/// stream carries the versions already held.
fn delta_interest<H: Handler>(
    config: &ClientConfig,
    handler: &H,
    held: &mut HashMap<&'static str, DeltaHeld>,
    tx: &mpsc::Sender<DeltaDiscoveryRequest>,
    first: &mut bool,
) -> Result<(), StreamFailure> {
    for (type_url, names) in handler.interest() {
        let h = held.entry(type_url).or_default();
        let mut request = DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            ..Default::default()
        };
        if !h.requested {
            if names.is_none() && !types::wildcard_by_default(type_url) {
                continue;
            }
            if names.as_ref().is_some_and(BTreeSet::is_empty)
                && !types::wildcard_by_default(type_url)
            {
                continue;
            }
            request.initial_resource_versions = h
                .resources
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect();
            request.resource_names_subscribe = match &names {
                None => vec!["*".into()],
                Some(n) => n.iter().cloned().collect(),
            };
            h.requested = true;
        } else {
            match (&h.names, &names) {
                (Some(old), Some(new)) if old != new => {
                    request.resource_names_subscribe = new.difference(old).cloned().collect();
                    request.resource_names_unsubscribe = old.difference(new).cloned().collect();
                    for n in &request.resource_names_unsubscribe {
                        h.resources.remove(n);
                    }
                }
                _ => {
                    h.names = names;
                    continue;
                }
            }
        }
        h.names = names;
        request.node = first_node(config, first);
        tx.try_send(request)?;
    }
    Ok(())
}
