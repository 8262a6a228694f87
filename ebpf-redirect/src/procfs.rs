//! Finds the sidecar's inbound listening sockets: the processes in the sidecar's cgroup, their
//! `/proc/<pid>/net/tcp{,6}` LISTEN entries on the inbound port, and the descriptor that holds
//! that socket, duplicated into the agent with `pidfd_getfd` (the agent is privileged; the
//! sidecar needs no access to bpffs).

use std::os::fd::OwnedFd;
use std::path::Path;

/// A listening socket found in a sidecar process.
#[derive(Debug)]
pub struct Listener {
    pub inode: u64,
    pub fd: OwnedFd,
}

/// LISTEN sockets on `port` in `/proc/<pid>/net/tcp` or `tcp6`: their inodes.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let state = f.get(3)?;
            let inode = f.get(9)?.parse::<u64>().ok()?;
            let (_, p) = local.rsplit_once(':')?;
            let p = u16::from_str_radix(p, 16).ok()?;
            (*state == "0A" && p == port && inode != 0).then_some(inode)
        })
        .collect()
}

fn pids(cgroup: &Path) -> std::io::Result<Vec<i32>> {
    let text = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// A listening socket held by a sidecar process: where, and which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
}

impl Found {
    /// Still open in the same process under the same descriptor: one readlink, not a table scan
    /// (`/proc/net/tcp` lists every socket of the namespace, TIME_WAIT included).
    pub fn still_held(&self) -> bool {
        let path = Path::new("/proc")
            .join(self.pid.to_string())
            .join("fd")
            .join(self.fd.to_string());
        std::fs::read_link(path)
            .is_ok_and(|l| l.as_os_str() == format!("socket:[{}]", self.inode).as_str())
    }
}

/// The sidecar's listener on `port` for one family (`v6` reads `tcp6`), if it is listening.
pub fn find_listener(sidecar_cgroup: &Path, port: u16, v6: bool) -> std::io::Result<Option<Found>> {
    for pid in pids(sidecar_cgroup)? {
        let table = Path::new("/proc")
            .join(pid.to_string())
            .join("net")
            .join(if v6 { "tcp6" } else { "tcp" });
        let Ok(text) = std::fs::read_to_string(&table) else {
            continue; // the process went away
        };
        for inode in listening_inodes(&text, port) {
            if let Some(fd) = socket_fd(pid, inode) {
                return Ok(Some(Found { pid, fd, inode }));
            }
        }
    }
    Ok(None)
}

/// The descriptor number in `pid` that holds socket `inode`.
fn socket_fd(pid: i32, inode: u64) -> Option<i32> {
    let want = format!("socket:[{inode}]");
    let dir = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")).ok()?;
    dir.flatten().find_map(|entry| {
        let link = std::fs::read_link(entry.path()).ok()?;
        (link.as_os_str() == want.as_str())
            .then(|| entry.file_name().to_str()?.parse::<i32>().ok())
            .flatten()
    })
}

/// Duplicates the found socket into this process.
pub fn dup_socket(found: &Found) -> std::io::Result<Listener> {
    let p = rustix::process::Pid::from_raw(found.pid)
        .ok_or_else(|| std::io::Error::other("invalid pid"))?;
    let pidfd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())?;
    let fd =
        rustix::process::pidfd_getfd(&pidfd, found.fd, rustix::process::PidfdGetfdFlags::empty())?;
    // The descriptor number may have been reused between the scan and the dup.
    if !found.still_held() {
        return Err(std::io::Error::other(
            "the sidecar closed its listener meanwhile",
        ));
    }
    Ok(Listener {
        inode: found.inode,
        fd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:3A9E 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n\
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 15006), vec![4242]);
        assert_eq!(listening_inodes(table, 8080), vec![4444]);
        assert!(listening_inodes(table, 15001).is_empty());
        assert!(listening_inodes("garbage\nmore garbage : 0A x", 1).is_empty());
    }
}
