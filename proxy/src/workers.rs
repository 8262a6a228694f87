//! Data-plane workers, as Envoy's: N threads, each running its own single-threaded tokio runtime.
//!
//! Each worker accepts on its own socket of every listener (`SO_REUSEPORT`: the kernel spreads
//! connections over them), so a downstream connection is on one worker from its accept, and
//! everything it does (TLS, HTTP, the upstream request, the response) runs on that worker's
//! thread, as do the pooled upstream connections the worker opened ([`slot`] keys the pools). A
//! request therefore never wakes another thread. On a multi-threaded runtime a hop between tasks
//! (request → pooled connection → response) could land on another thread and cost a futex wake
//! and a context switch: about one per request (benches/RESULTS.md).
//!
//! Without [`start`] (tests, the demo's in-process proxies) there are no workers: a listener has
//! one socket, connections run where they were accepted, and every pool is shared ([`slot`] is 0).

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

struct Workers {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
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
        .set(Workers { senders })
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
        // A worker that is gone (it cannot be, but a panic would): serve here.
        tokio::spawn(job());
    }
}
