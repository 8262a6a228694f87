//! Who is on the other end of a Workload API connection, pinned when the connection is accepted.
//!
//! `SO_PEERCRED` names the process that connected, but a process can hand its socket to another
//! (fork a relay that keeps it) and then exec a different binary: reading `/proc/<pid>/exe` at each
//! RPC would then attest the relay as that binary. So the executable is read once, as the
//! connection is accepted, together with what makes the process unique (its start time) and the
//! executable's device and inode; each RPC re-checks that the process is still the one pinned
//! (same start time: not a reused PID) running the same file (not exec'd since). A caller that
//! fails the check gets nothing.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use crate::entries::Selector;

/// The caller as it was when its connection was accepted.
#[derive(Debug, Clone)]
pub struct PinnedCaller {
    uid: u32,
    gid: u32,
    process: Option<Process>,
}

/// A process, by what does not change while it runs the same program.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Process {
    pid: i32,
    /// `/proc/<pid>/stat` field 22, in clock ticks since boot.
    start_time: u64,
    exe: PathBuf,
    exe_dev: u64,
    exe_ino: u64,
}

impl Process {
    fn read(pid: i32) -> Option<Self> {
        let exe_link = format!("/proc/{pid}/exe");
        let before = start_time(pid)?;
        let exe = std::fs::read_link(&exe_link).ok()?;
        let meta = std::fs::metadata(&exe_link).ok()?;
        // Read again: the PID still names the same process after the executable was read.
        (start_time(pid)? == before).then_some(Self {
            pid,
            start_time: before,
            exe,
            exe_dev: meta.dev(),
            exe_ino: meta.ino(),
        })
    }
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Why a pinned caller is no longer the process that connected (no SVID is handed out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallerChanged {
    #[error("process {pid} runs {} now, not the {} it ran when it connected", now.display(), then.display())]
    Exec {
        pid: i32,
        now: std::path::PathBuf,
        then: std::path::PathBuf,
    },
    #[error("process {pid} is gone since it connected")]
    Gone { pid: i32 },
}

impl PinnedCaller {
    /// Pins the peer of an accepted connection.
    pub fn pin(stream: &tokio::net::UnixStream) -> Option<Self> {
        let cred = stream.peer_cred().ok()?;
        Some(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            process: cred.pid().and_then(Process::read),
        })
    }

    /// The caller's PID, when the kernel gave one.
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(|p| p.pid)
    }

    /// The caller's selectors, if it is still the process that connected; `Err` says why not.
    pub fn attest(&self) -> Result<BTreeSet<Selector>, CallerChanged> {
        let mut s = BTreeSet::from([Selector::UnixUid(self.uid), Selector::UnixGid(self.gid)]);
        if let Some(p) = &self.process {
            match Process::read(p.pid) {
                Some(now) if now == *p => {}
                Some(now) if now.start_time == p.start_time => {
                    return Err(CallerChanged::Exec {
                        pid: p.pid,
                        now: now.exe,
                        then: p.exe.clone(),
                    });
                }
                _ => return Err(CallerChanged::Gone { pid: p.pid }),
            }
            s.insert(Selector::UnixPath(p.exe.clone()));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_pins_and_attests_with_its_executable() {
        let me = Process::read(std::process::id() as i32).expect("own process");
        assert_eq!(me.exe, std::env::current_exe().unwrap());
        let pinned = PinnedCaller {
            uid: 1,
            gid: 2,
            process: Some(me.clone()),
        };
        let s = pinned.attest().unwrap();
        assert!(s.contains(&Selector::UnixPath(me.exe.clone())));
        // The same PID with another start time is another process; another file is an exec.
        let reused = PinnedCaller {
            process: Some(Process {
                start_time: me.start_time + 1,
                ..me.clone()
            }),
            ..pinned.clone()
        };
        assert!(matches!(reused.attest(), Err(CallerChanged::Gone { .. })));
        let execd = PinnedCaller {
            process: Some(Process {
                exe_ino: me.exe_ino + 1,
                ..me
            }),
            ..pinned
        };
        assert!(matches!(execd.attest(), Err(CallerChanged::Exec { .. })));
    }
}
