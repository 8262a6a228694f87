//! Data-plane workers, as Envoy's: N threads, each running its own single-threaded tokio runtime.
//!
//! Each worker accepts on its own socket of every listener (`SO_REUSEPORT`: the kernel spreads
//! connections over them), so a downstream connection is on one worker from its accept, and
//! everything it does (TLS, HTTP, the upstream request, the response) runs on that worker's
//! thread, as do the pooled upstream connections the worker opened ([`slot`] keys the pools). A request therefore never
//! wakes another thread: on a multi-threaded runtime every hop between tasks (request → pooled
//! connection → response) could land on another worker and cost a futex wake and a context
//! switch, which was most of the sidecar's CPU per request (benches/RESULTS.md).
//!
//! Without [`start`] (tests, the demo's in-process proxies) there are no workers: connections run
//! where they were accepted and every pool is shared ([`slot`] is 0).

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

struct Workers {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    /// 1-based index of the worker this thread is; 0 elsewhere.
    static SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Why the workers could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    #[error("data-plane workers were already started")]
    AlreadyStarted,
    #[error("starting data-plane worker {index}: {source}")]
    Start {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Starts `n` (≥ 1) worker threads for the process; connections accepted from then on are
/// served on them. The threads live as long as the process.
pub fn start(n: usize) -> Result<(), WorkersError> {
    if WORKERS.get().is_some() {
        return Err(WorkersError::AlreadyStarted);
    }
    let mut senders = Vec::with_capacity(n.max(1));
    for index in 1..=n.max(1) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| WorkersError::Start { index, source })?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new()
            .name(format!("eg-worker-{index}"))
            .spawn(move || {
                SLOT.with(|s| s.set(index));
                runtime.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job());
                    }
                });
            })
            .map_err(|source| WorkersError::Start { index, source })?;
        senders.push(tx);
    }
    WORKERS
        .set(Workers {
            senders,
            next: AtomicUsize::new(0),
        })
        .map_err(|_| WorkersError::AlreadyStarted)
}

/// How many pool slots there are: one per worker, plus slot 0 for everything else.
pub fn slots() -> usize {
    WORKERS.get().map_or(0, |w| w.senders.len()) + 1
}

/// The pool slot of the calling thread: its worker's index, or 0 off the workers.
pub fn slot() -> usize {
    SLOT.with(std::cell::Cell::get)
}

/// Runs `make()`'s future on the next worker (round robin), or spawns it here when there are no
/// workers (a listener that could not get one socket per worker hands its connections over). `make` runs on the worker, so what it creates (a `TcpStream` from a std one) is
/// registered with that worker's runtime.
pub fn spawn<F, Fut>(make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(w) = WORKERS.get() else {
        tokio::spawn(make());
        return;
    };
    let i = w.next.fetch_add(1, Ordering::Relaxed) % w.senders.len();
    let job: Job = Box::new(move || Box::pin(make()));
    if let Err(tokio::sync::mpsc::error::SendError(job)) = w.senders[i].send(job) {
        // A worker that is gone (it cannot be, but a panic would): serve here.
        tokio::spawn(job());
    }
}

/// Whether connections are served on workers.
pub fn running() -> bool {
    WORKERS.get().is_some()
}

/// How many workers run (0 without [`start`]).
pub fn count() -> usize {
    WORKERS.get().map_or(0, |w| w.senders.len())
}

/// Runs `make()`'s future on worker `i` (0-based, modulo the count), or here without workers.
pub fn spawn_on<F, Fut>(i: usize, make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(w) = WORKERS.get() else {
        tokio::spawn(make());
        return;
    };
    let job: Job = Box::new(move || Box::pin(make()));
    if let Err(tokio::sync::mpsc::error::SendError(job)) = w.senders[i % w.senders.len()].send(job)
    {
        tokio::spawn(job());
    }
}
