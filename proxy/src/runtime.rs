//! The listeners and clusters in force, and the one way to change them: [`Runtime::apply`] takes a
//! whole model (static bootstrap resources plus the xDS ones), binds what is new before touching
//! anything (a port in use rejects the update), then swaps clusters and listener chains atomically.
//! Connections keep the listener they were accepted on; HTTP requests read their chain and the
//! clusters when they start, so in-flight requests finish on the configuration they began with.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::config::{self, Direction};
use crate::drain;
use crate::listener::{ListenerRt, Shared};
use crate::telemetry::Telemetry;
use crate::upstream::ClusterRt;

/// What [`Runtime::apply`] installs.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub listeners: Vec<config::Listener>,
    pub clusters: Vec<config::Cluster>,
}

struct Running {
    rt: Arc<ListenerRt>,
    /// The configuration its chains were last built from.
    config: config::Listener,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Why a configuration could not be installed (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("{kind} {name}: defined twice")]
    DefinedTwice { kind: &'static str, name: String },
    #[error("cluster {name}: TLS setup: {source}")]
    ClusterTls {
        name: String,
        #[source]
        source: rustls::Error,
    },
    #[error("listener {name}: another listener that binds no port has address {address}")]
    HandoffAddressTaken {
        name: String,
        address: std::net::SocketAddr,
    },
    #[error(transparent)]
    Bind(#[from] Box<crate::StartError>),
}

pub struct Runtime {
    shared: Arc<Shared>,
    telemetry: Arc<Telemetry>,
    server_tls: Arc<rustls::ServerConfig>,
    drain: Arc<drain::Signal>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    listeners: BTreeMap<String, Running>,
    /// `bind_to_port: false` listeners (no socket, no task), by name.
    /// With the configuration its chains were last built from.
    virtuals: BTreeMap<String, (Arc<ListenerRt>, config::Listener)>,
    clusters: crate::ClusterMap,
    stopped: bool,
}

impl Runtime {
    pub fn new(
        shared: Arc<Shared>,
        telemetry: Arc<Telemetry>,
        server_tls: Arc<rustls::ServerConfig>,
        drain: Arc<drain::Signal>,
    ) -> Self {
        Self {
            shared,
            telemetry,
            server_tls,
            drain,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Installs `model` in place of what runs now. On error nothing has changed.
    pub fn apply(&self, model: &Model) -> Result<(), ApplyError> {
        let mut inner = self.lock();
        if inner.stopped {
            return Err(ApplyError::ShuttingDown);
        }
        // Clusters: keep the runtime (and its connection pool) of every unchanged cluster.
        let mut clusters = crate::ClusterMap::default();
        for c in &model.clusters {
            let rt = match inner.clusters.get(&c.name) {
                Some(old) if old.config == *c => old.clone(),
                _ => Arc::new(
                    ClusterRt::new(
                        c.clone(),
                        &self.shared.creds,
                        &self.shared.limits,
                        &self.telemetry.stats,
                    )
                    .map_err(|source| ApplyError::ClusterTls {
                        name: c.name.clone(),
                        source,
                    })?,
                ),
            };
            if clusters.insert(c.name.clone(), rt).is_some() {
                return Err(ApplyError::DefinedTwice {
                    kind: "cluster",
                    name: c.name.clone(),
                });
            }
        }
        // Listeners: a changed address or direction is a new listener; bind those first.
        let mut wanted = BTreeMap::new();
        for l in &model.listeners {
            if wanted.insert(l.name.clone(), l).is_some() {
                return Err(ApplyError::DefinedTwice {
                    kind: "listener",
                    name: l.name.clone(),
                });
            }
        }
        // Not bound: reached by hand-off. Reuse each unchanged one; addresses must be unique.
        let mut virtuals = BTreeMap::new();
        let mut handoff = HashMap::new();
        for (name, l) in wanted.iter().filter(|(_, l)| !l.bind_to_port) {
            let (rt, built_from) = match inner.virtuals.get(name.as_str()) {
                Some((rt, built_from))
                    if rt.config.address == l.address && rt.config.direction == l.direction =>
                {
                    (rt.clone(), Some(built_from))
                }
                _ => (self.listener_rt(l), None),
            };
            if handoff.insert(l.address, rt.clone()).is_some() {
                return Err(ApplyError::HandoffAddressTaken {
                    name: (*name).clone(),
                    address: l.address,
                });
            }
            // Chains to rebuild at commit: reused with a changed configuration.
            let stale = built_from.is_some_and(|b| b != *l);
            virtuals.insert((*name).clone(), (rt, (*l).clone(), stale));
        }
        let mut to_bind = Vec::new();
        let mut replaced = Vec::new();
        for (name, l) in wanted.iter().filter(|(_, l)| l.bind_to_port) {
            match inner.listeners.get(name) {
                Some(r)
                    if r.rt.config.address == l.address && r.rt.config.direction == l.direction => {
                }
                Some(_) => {
                    // A new address: bind it now too (a failure must leave everything as it was).
                    replaced.push(name.clone());
                    to_bind.push(*l);
                }
                None => to_bind.push(*l),
            }
        }
        let mut bound = Vec::new();
        for l in to_bind {
            let tcp = crate::listener::bind_listening(&l.name, l.address).map_err(Box::new)?;
            bound.push((l, tcp));
        }

        // Committed from here on.
        self.shared.clusters.set(Arc::new(clusters.clone()));
        inner.clusters = clusters;
        for (rt, l, stale) in virtuals.values() {
            if *stale {
                rt.update(l);
            }
        }
        self.shared.handoff.set(handoff);
        inner.virtuals = virtuals
            .into_iter()
            .map(|(name, (rt, l, _))| (name, (rt, l)))
            .collect();
        let removed: Vec<String> = inner
            .listeners
            .keys()
            .filter(|n| !wanted.get(*n).is_some_and(|l| l.bind_to_port) || replaced.contains(n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(r) = inner.listeners.remove(&name) {
                tracing::info!(listener = %name, "listener removed");
                r.stop.send_replace(true);
            }
        }
        for (name, l) in wanted.iter().filter(|(_, l)| l.bind_to_port) {
            if let Some(r) = inner.listeners.get_mut(name)
                && !replaced.contains(name)
                && r.config != **l
            {
                r.rt.update(l);
                r.config = (*l).clone();
            }
        }
        for (l, tcp) in bound {
            let running = self.start(l, tcp);
            inner.listeners.insert(l.name.clone(), running);
        }
        Ok(())
    }

    fn listener_rt(&self, l: &config::Listener) -> Arc<ListenerRt> {
        let tls = (l.direction == Direction::Inbound)
            .then(|| tokio_rustls::TlsAcceptor::from(self.server_tls.clone()));
        Arc::new(ListenerRt::new(
            l.clone(),
            tls,
            self.shared.clone(),
            &self.telemetry.stats,
        ))
    }

    fn start(&self, l: &config::Listener, sockets: crate::listener::Listening) -> Running {
        let rt = self.listener_rt(l);
        let (stop, stop_rx) = watch::channel(false);
        tracing::info!(listener = %l.name, address = %l.address, direction = ?l.direction, "listening");
        let task = match sockets {
            crate::listener::Listening::One(tcp) => {
                let handle = drain::Signal::from_watch(&self.drain);
                tokio::spawn(rt.clone().serve(tcp, stop_rx, handle))
            }
            // Each worker accepts on its own socket; the task ends when every loop has.
            crate::listener::Listening::PerWorker(sockets) => {
                let mut ended = Vec::new();
                for (i, socket) in sockets.into_iter().enumerate() {
                    let (done, wait) = tokio::sync::oneshot::channel::<()>();
                    let (rt, stop_rx) = (rt.clone(), stop_rx.clone());
                    let handle = drain::Signal::from_watch(&self.drain);
                    crate::workers::spawn_on(i, move || async move {
                        match tokio::net::TcpListener::from_std(socket) {
                            Ok(tcp) => rt.serve(tcp, stop_rx, handle).await,
                            Err(e) => {
                                tracing::error!(error = %e, "a worker cannot accept on its socket")
                            }
                        }
                        drop(done);
                    });
                    ended.push(wait);
                }
                tokio::spawn(async move {
                    for wait in ended {
                        let _ = wait.await;
                    }
                })
            }
        };
        Running {
            rt,
            config: l.clone(),
            stop,
            task,
        }
    }

    /// Names and addresses of the listeners that are up.
    pub fn listeners(&self) -> Vec<(String, std::net::SocketAddr)> {
        let inner = self.lock();
        let bound = inner.listeners.values().map(|r| &r.rt);
        let virtuals = inner.virtuals.values().map(|(rt, _)| rt);
        bound
            .chain(virtuals)
            .map(|rt| (rt.config.name.clone(), rt.config.address))
            .collect()
    }

    /// The cluster configurations in force.
    pub fn clusters(&self) -> Vec<config::Cluster> {
        let mut v: Vec<_> = self
            .lock()
            .clusters
            .values()
            .map(|c| c.config.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Stops accepting on every listener; returns when their accept loops have ended. No listener
    /// is started after this.
    pub async fn stop(&self) {
        let tasks: Vec<_> = {
            let mut inner = self.lock();
            inner.stopped = true;
            inner.virtuals.clear();
            self.shared.handoff.set(HashMap::new());
            std::mem::take(&mut inner.listeners)
                .into_values()
                .map(|r| {
                    r.stop.send_replace(true);
                    r.task
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
    }
}
