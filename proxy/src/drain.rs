//! Graceful drain: one signal that every listener and connection watches, and a way for the
//! signaller to wait until every watcher has finished (or a deadline passes).

use tokio::sync::watch;

/// Held by the process; starts the drain and waits for it.
#[derive(Debug)]
pub struct Signal(watch::Sender<bool>);

/// Held by each listener and connection; dropping it says "I am done".
#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<bool>);

/// What a listener holds: it mints a [`Watch`] for each connection it accepts.
#[derive(Debug)]
pub struct ListenerHandle(Watch);

impl ListenerHandle {
    pub fn watch(&self) -> Watch {
        self.0.clone()
    }
}

pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal(tx), Watch(rx))
}

impl Signal {
    /// Tells every watcher to drain.
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once every [`Watch`] has been dropped.
    pub async fn finished(&self) {
        self.0.closed().await;
    }

    /// A new watcher (for connections accepted after the drain started, too).
    pub fn watch(&self) -> Watch {
        Watch(self.0.subscribe())
    }

    /// A handle for a listener: it can mint watchers, and it counts as one itself until dropped.
    pub fn from_watch(signal: &Signal) -> ListenerHandle {
        ListenerHandle(signal.watch())
    }
}

impl Watch {
    /// Resolves when the drain starts (at once if it already has).
    pub async fn signaled(&mut self) {
        // An error means the signal was dropped: the process is going away, which is a drain too.
        let _ = self.0.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finished_waits_for_every_watch() {
        let (signal, watch) = channel();
        let mut w2 = signal.watch();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            drop(w2);
        });
        signal.start();
        drop(watch);
        let t0 = tokio::time::Instant::now();
        signal.finished().await;
        assert!(t0.elapsed() >= std::time::Duration::from_secs(1));
        task.await.unwrap();
    }
}
