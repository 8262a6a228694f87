//! How every long-running command starts and stops: SIGTERM and SIGINT both mean "stop gracefully,
//! then exit 0", and a process this binary starts never outlives it, even when it is killed with
//! SIGKILL.
//!
//! A child started through [`child`] carries its parent's PID in `EASTGUARD_PARENT_PID`. When the
//! child is an eastguard process, [`follow_parent`] (the first thing `main` does) asks the kernel
//! to send it SIGTERM when that parent dies (`PR_SET_PDEATHSIG`), and stops at once if the parent
//! died before the request could be made. The variable survives `sh -c … exec` and `ip netns exec`,
//! so pod processes started through them are covered too.

use std::ffi::OsStr;

use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// The environment variable naming the PID a child must not outlive.
pub const PARENT_PID_ENV: &str = "EASTGUARD_PARENT_PID";

/// Whether this process may go on running.
pub enum Parent {
    /// No eastguard parent, or one that is alive and will be followed.
    Alive,
    /// The eastguard process that started this one is already gone.
    Gone(u32),
}

/// Ties this process's life to the eastguard process that started it (if one did).
pub fn follow_parent() -> anyhow::Result<Parent> {
    let Some(raw) = std::env::var_os(PARENT_PID_ENV) else {
        return Ok(Parent::Alive);
    };
    let expected: u32 = raw
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{PARENT_PID_ENV}={raw:?} is not a process id"))?;
    rustix::process::set_parent_process_death_signal(Some(Signal::TERM))
        .map_err(|e| anyhow::anyhow!("asking for a signal when the parent dies: {e}"))?;
    // Checked after the request: a parent that died before it is seen here, one that dies after
    // it sends the signal.
    let parent = rustix::process::getppid().map(Pid::as_raw_pid);
    if parent.and_then(|p| u32::try_from(p).ok()) == Some(expected) {
        Ok(Parent::Alive)
    } else {
        Ok(Parent::Gone(expected))
    }
}

/// A command for a child that must not outlive this process: killed when its handle is dropped,
/// and (if it is an eastguard process) signalled by the kernel when this process dies.
pub fn child(program: impl AsRef<OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.env(PARENT_PID_ENV, std::process::id().to_string())
        .kill_on_drop(true);
    cmd
}

/// Asks a child to stop gracefully (SIGTERM); a child that has already exited is left alone.
pub fn terminate(child: &tokio::process::Child) {
    if let Some(pid) = child
        .id()
        .and_then(|p| Pid::from_raw(i32::try_from(p).ok()?))
    {
        let _ = rustix::process::kill_process(pid, Signal::TERM);
    }
}

/// SIGTERM or SIGINT, whichever comes first, seen by every clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Installs the handlers now (call inside the runtime): from here on neither signal kills the
    /// process outright; each asks for the graceful stop.
    pub fn listen() -> anyhow::Result<Self> {
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| anyhow::anyhow!("cannot listen for SIGTERM: {e}"))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| anyhow::anyhow!("cannot listen for SIGINT: {e}"))?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "stopping");
            let _ = tx.send(true);
            // Later signals are absorbed while the stop runs; it is bounded in time.
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
        });
        Ok(Self(rx))
    }

    /// Resolves once a stop was asked for (at once if it already was).
    pub fn requested(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            // An error means the sender is gone, which never happens while the process runs.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}
