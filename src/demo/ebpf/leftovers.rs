//! What `demo --ebpf` creates, found by the tag every object carries (`egdemo<pid>`), and removed:
//! by a run when it stops, and by the next run for a run that died without stopping (SIGKILL, a
//! crash). A live run's objects are never touched.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::TAG_PREFIX;

/// Where `ip netns add` keeps named network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Objects of one or more runs.
#[derive(Debug, Default)]
pub struct Found {
    /// Named network namespaces (their veths go with them).
    pub namespaces: Vec<String>,
    /// Cgroup directories (each a run's root, with its pods below).
    pub cgroups: Vec<PathBuf>,
    /// bpffs mounts (the capture pins live in them).
    pub mounts: Vec<PathBuf>,
}

impl Found {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.cgroups.is_empty() && self.mounts.is_empty()
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.namespaces.is_empty() {
            parts.push(format!("network namespaces {}", self.namespaces.join(", ")));
        }
        if !self.cgroups.is_empty() {
            parts.push(format!("cgroups {}", join_paths(&self.cgroups)));
        }
        if !self.mounts.is_empty() {
            parts.push(format!("bpffs mounts {}", join_paths(&self.mounts)));
        }
        f.write_str(&parts.join("; "))
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The objects of runs that are no longer running.
pub fn find(cgroup2: &Path) -> Found {
    let dead = |name: &str| tag_pid(name).is_some_and(|pid| !run_alive(pid));
    let mut found = Found::default();
    for name in dir_names(Path::new(NETNS_DIR)) {
        if dead(&name) {
            found.namespaces.push(name);
        }
    }
    for name in dir_names(cgroup2) {
        if name.strip_prefix("eastguard-").is_some_and(dead) {
            found.cgroups.push(cgroup2.join(name));
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [source, target, "bpf", ..] = f.as_slice()
            && dead(source)
        {
            found
                .mounts
                .push(PathBuf::from(unescape_mount_path(target)));
        }
    }
    found
}

/// Removes the objects: processes in them first (SIGKILL: their run is over), then cgroups,
/// namespaces and mounts. Best effort; what cannot be removed is logged.
pub fn remove(found: &Found) {
    for cgroup in &found.cgroups {
        kill_cgroup(cgroup);
    }
    for ns in &found.namespaces {
        kill_netns(ns);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for cgroup in &found.cgroups {
        while !cgroup_empty(cgroup) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        remove_cgroup(cgroup);
    }
    for ns in &found.namespaces {
        if Path::new(NETNS_DIR).join(ns).exists() {
            run_logged(&["ip", "netns", "del", ns]);
        }
    }
    for mount in &found.mounts {
        let target = mount.to_string_lossy();
        if !run_quiet(&["umount", &target]) {
            run_logged(&["umount", "-l", &target]);
        }
        let _ = std::fs::remove_dir(mount);
    }
}

/// The PID in a tagged name: `egdemo<pid>` followed by anything that is not a digit.
fn tag_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TAG_PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether `pid` is a running `demo --ebpf` other than this process (a PID of this process in a
/// tag was left by an earlier process that had the same PID).
fn run_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.contains(&b"demo".as_slice()) && args.contains(&b"--ebpf".as_slice())
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// `/proc/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every cgroup directory at and below `root`, deepest first.
fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(cgroup_tree(&entry.path()));
        }
    }
    out.push(root.to_path_buf());
    out
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill_pid(pid: i32) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

fn kill_cgroup(root: &Path) {
    // cgroup.kill (Linux 5.14+) kills the whole subtree at once; each PID as well, for older
    // kernels and for processes that raced in.
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
    for dir in cgroup_tree(root) {
        cgroup_pids(&dir).into_iter().for_each(kill_pid);
    }
}

fn cgroup_empty(root: &Path) -> bool {
    cgroup_tree(root).iter().all(|d| cgroup_pids(d).is_empty())
}

fn remove_cgroup(root: &Path) {
    for dir in cgroup_tree(root) {
        if let Err(e) = std::fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove cgroup");
        }
    }
}

fn kill_netns(ns: &str) {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
    else {
        return;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .for_each(kill_pid);
}

fn run_quiet(args: &[&str]) -> bool {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_logged(args: &[&str]) {
    match std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            command = args.join(" "),
            error = %String::from_utf8_lossy(&o.stderr).trim(),
            "cleanup step failed"
        ),
        Err(e) => tracing::warn!(command = args.join(" "), error = %e, "cleanup step failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_their_run() {
        assert_eq!(tag_pid("egdemo4242-orders"), Some(4242));
        assert_eq!(tag_pid("egdemo17"), Some(17));
        assert_eq!(tag_pid("eastguard-egdemo17"), None);
        assert_eq!(tag_pid("egdemo-x"), None);
        assert_eq!(tag_pid("netpod-a"), None);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/tmp/a\\040b/bpffs"), "/tmp/a b/bpffs");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/odd\\04"), "/odd\\04");
    }

    #[test]
    fn this_process_is_not_a_live_run() {
        assert!(!run_alive(std::process::id()));
        assert!(!run_alive(u32::MAX));
    }
}
