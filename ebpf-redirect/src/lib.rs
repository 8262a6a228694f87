//! eBPF traffic capture: the programs in `bpf/capture.bpf.c` (committed as `capture.bpf.o`, so no
//! build needs clang), loaded with aya and attached per pod by [`Manager`].
//!
//! Everything a pod's capture needs is pinned under `<bpffs>/eastguard/<pod>/`: programs
//! (`prog_*`), maps (`eg_*`) and links (`link_*`). Links are bpf_links, so capture stays in force
//! when the node-agent exits or crashes; a restarted agent re-adopts the pins, checks every link
//! still points at the pod's cgroup or netns, and re-creates any that do not. Removing a pod
//! detaches its links and removes its pins.
//!
//! Fail closed: the `eg_guard` program (cgroup egress) is attached first and removed last; it
//! drops TCP leaving the pod from anything but the sidecar unless it is loopback or excluded, so
//! a pod whose redirect is missing or was detached cannot reach the network around its sidecar.
//! The sidecar reads the original destination of a redirected connection with
//! `getsockopt(SO_ORIGINAL_DST)`, answered by `eg_getsockopt`, the same call it makes behind an
//! iptables REDIRECT.

pub mod procfs;
pub mod registry;
// The only module with `unsafe`: raw bpf(2) calls, each with its SAFETY note.
#[allow(unsafe_code)]
mod sys;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, SockMap, lpm_trie::Key};
use aya::programs::Program;
use serde::Serialize;

pub use registry::{PodSpec, Registry};
use sys::AttachType;

/// The compiled programs (see `bpf/build.sh`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/capture.bpf.o");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Cgroup,
    Netns,
    SockHash,
}

struct ProgDef {
    name: &'static str,
    attach: AttachType,
    target: Target,
}

/// Attach order: the guard first, the redirect after everything it relies on.
const PROGRAMS: [ProgDef; 7] = [
    ProgDef {
        name: "eg_guard",
        attach: AttachType::CgroupInetEgress,
        target: Target::Cgroup,
    },
    ProgDef {
        name: "eg_getsockopt",
        attach: AttachType::CgroupGetsockopt,
        target: Target::Cgroup,
    },
    ProgDef {
        name: "eg_sockops",
        attach: AttachType::CgroupSockOps,
        target: Target::Cgroup,
    },
    ProgDef {
        name: "eg_sk_msg",
        attach: AttachType::SkMsgVerdict,
        target: Target::SockHash,
    },
    ProgDef {
        name: "eg_connect4",
        attach: AttachType::CgroupInet4Connect,
        target: Target::Cgroup,
    },
    ProgDef {
        name: "eg_connect6",
        attach: AttachType::CgroupInet6Connect,
        target: Target::Cgroup,
    },
    ProgDef {
        name: "eg_sk_lookup",
        attach: AttachType::SkLookup,
        target: Target::Netns,
    },
];

const MAPS: [&str; 9] = [
    "eg_config",
    "eg_counters",
    "eg_orig_cookie",
    "eg_orig_tuple",
    "eg_skip_out",
    "eg_skip_in",
    "eg_skip_cidr",
    "eg_inbound",
    "eg_socks",
];

/// `enum eg_counter` in the programs, in order.
pub const COUNTERS: [&str; 10] = [
    "outbound_redirected",
    "outbound_passthrough",
    "outbound_denied",
    "inbound_steered",
    "inbound_passthrough",
    "inbound_dropped",
    "original_dst_found",
    "original_dst_missing",
    "guard_dropped",
    "short_circuit_sockets",
];

const FLAG_SHORT_CIRCUIT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpffs {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("pod {pod}: {step}: {message}")]
    Pod {
        pod: String,
        step: String,
        message: String,
    },
}

fn pod_err(pod: &str, step: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Pod {
        pod: pod.to_owned(),
        step: step.into(),
        message: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Every program attached and the sidecar's inbound listener registered.
    Attached,
    /// Attached (egress fails closed) but not yet ready: the reason is in `error`.
    NotReady,
    /// The capture could not be set up; the guard, where it attached, keeps the pod closed.
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Program name → attached to this pod's cgroup / netns / sockhash.
    pub links: BTreeMap<&'static str, bool>,
    pub inbound_ipv4: bool,
    pub inbound_ipv6: bool,
    /// Times a link was found detached or pointing elsewhere and re-created.
    pub repairs: u64,
    pub counters: BTreeMap<&'static str, u64>,
}

struct Pod {
    spec: PodSpec,
    /// The sidecar listeners registered in `eg_inbound` (IPv4, IPv6).
    inbound: [Option<procfs::Found>; 2],
    repairs: u64,
    /// Programs and maps are loaded and pinned (freshly, or adopted from a complete pin dir).
    loaded: bool,
    status: PodStatus,
}

/// Attaches, re-adopts and removes pods' capture, following a [`Registry`].
pub struct Manager {
    root: PathBuf,
    pods: BTreeMap<String, Pod>,
}

impl Manager {
    /// `bpffs` is a mounted bpf filesystem (normally `/sys/fs/bpf`); pins go to `bpffs/eastguard`.
    pub fn new(bpffs: &Path) -> Result<Manager, Error> {
        let bad = |message: String| Error::Bpffs {
            path: bpffs.to_owned(),
            message,
        };
        let fs = rustix::fs::statfs(bpffs).map_err(|e| bad(e.to_string()))?;
        // BPF_FS_MAGIC
        if fs.f_type as u64 != 0xcafe_4a11 {
            return Err(bad(
                "not a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)".to_owned()
            ));
        }
        let root = bpffs.join("eastguard");
        std::fs::create_dir_all(&root).map_err(|e| bad(e.to_string()))?;
        Ok(Manager {
            root,
            pods: BTreeMap::new(),
        })
    }

    pub fn pin_dir(&self, pod: &str) -> PathBuf {
        self.root.join(pod)
    }

    /// The pods an earlier agent left pinned, with the exclusions their maps hold: what they
    /// were captured with. A pod whose maps cannot be read is listed with none (captured whole).
    pub fn pinned(&self) -> BTreeMap<String, Exclusions> {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let excl = read_exclusions(&e.path(), &name).unwrap_or_else(|err| {
                tracing::warn!(pod = %name, error = %err, "pinned exclusions unreadable; none kept");
                Exclusions::default()
            });
            out.insert(name, excl);
        }
        out
    }

    /// Brings the attached pods in line with `registry`: removes pods no longer listed (also
    /// ones pinned by an earlier agent) unless named in `keep`, attaches or re-adopts the listed
    /// ones, repairs links, registers sidecar listeners and refreshes counters. `keep`: pods
    /// pinned by an earlier agent that must stay as they are until they can be placed again.
    pub fn reconcile(&mut self, registry: &Registry, keep: &[String]) -> Vec<PodStatus> {
        let wanted: BTreeMap<&str, &PodSpec> =
            registry.pods.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut stale: Vec<String> = self
            .pods
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        if let Ok(dir) = std::fs::read_dir(&self.root) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !wanted.contains_key(name.as_str())
                    && !stale.contains(&name)
                    && !keep.contains(&name)
                {
                    stale.push(name);
                }
            }
        }
        for name in stale {
            if let Err(e) = self.remove(&name) {
                tracing::warn!(error = %e, "removing capture");
            }
        }
        for spec in &registry.pods {
            self.ensure(spec);
        }
        self.status()
    }

    pub fn status(&self) -> Vec<PodStatus> {
        self.pods.values().map(|p| p.status.clone()).collect()
    }

    fn ensure(&mut self, spec: &PodSpec) {
        let dir = self.pin_dir(&spec.name);
        let known = self.pods.get(&spec.name).is_some_and(|p| &p.spec == spec);
        let pod = self.pods.entry(spec.name.clone()).or_insert_with(|| Pod {
            spec: spec.clone(),
            inbound: [None, None],
            repairs: 0,
            loaded: false,
            status: PodStatus {
                name: spec.name.clone(),
                state: State::Error,
                error: None,
                links: BTreeMap::new(),
                inbound_ipv4: false,
                inbound_ipv6: false,
                repairs: 0,
                counters: BTreeMap::new(),
            },
        });
        if !known {
            pod.spec = spec.clone();
            pod.inbound = [None, None];
        }
        let result = (|| {
            if !pod.loaded && !complete(&dir) {
                if dir.exists() {
                    teardown(&dir, spec);
                }
                load_and_pin(&dir, spec)?;
                pod.loaded = true;
                // Not ready: app egress is denied until every program is attached. An error here
                // (no sidecar cgroup yet) is reported below, after the guard is attached.
                let _ = write_config(&dir, spec, false, true);
            }
            pod.loaded = true;
            let mut links = BTreeMap::new();
            let linked = check_links(&dir, spec, &mut pod.repairs, &mut links);
            let all = linked.is_ok() && links.len() == PROGRAMS.len();
            pod.status.links = links;
            write_config(&dir, spec, all, !known)?;
            linked?;
            register_inbound(&dir, spec, &mut pod.inbound)?;
            Ok::<_, Error>(())
        })();
        pod.status.inbound_ipv4 = pod.inbound[0].is_some();
        pod.status.inbound_ipv6 = pod.inbound[1].is_some();
        pod.status.repairs = pod.repairs;
        pod.status.counters = read_counters(&dir).unwrap_or_default();
        let all_linked = !pod.status.links.is_empty() && pod.status.links.values().all(|ok| *ok);
        (pod.status.state, pod.status.error) = match result {
            Err(e) => (State::Error, Some(e.to_string())),
            Ok(()) if !all_linked => (State::Error, Some("not every program is attached".into())),
            Ok(()) if pod.inbound.iter().all(Option::is_none) => (
                State::NotReady,
                Some(format!(
                    "the sidecar is not listening on inbound port {} (cgroup {})",
                    spec.inbound_port,
                    spec.sidecar_cgroup.display()
                )),
            ),
            Ok(()) => (State::Attached, None),
        };
        if let Some(file) = &spec.status_file {
            let text = match (&pod.status.state, &pod.status.error) {
                (State::Attached, _) => "attached\n".to_owned(),
                (_, e) => format!("not-ready: {}\n", e.as_deref().unwrap_or("unknown")),
            };
            if std::fs::read_to_string(file).ok().as_deref() != Some(text.as_str()) {
                let tmp = file.with_extension("tmp");
                if let Err(e) =
                    std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, file))
                {
                    tracing::warn!(pod = %spec.name, file = %file.display(), error = %e, "writing capture status");
                }
            }
        }
        if pod.status.state != State::Attached {
            tracing::debug!(pod = %spec.name, error = ?pod.status.error, "capture not ready");
        }
    }

    /// Detaches and unpins a pod's capture (the guard last).
    pub fn remove(&mut self, name: &str) -> Result<(), Error> {
        let spec = self.pods.remove(name).map(|p| p.spec);
        let dir = self.pin_dir(name);
        if let Some(file) = spec.as_ref().and_then(|s| s.status_file.as_ref()) {
            let _ = std::fs::remove_file(file);
        }
        if dir.exists() {
            teardown_dir(&dir);
            std::fs::remove_dir(&dir).map_err(|e| pod_err(name, "removing pin directory", e))?;
        }
        tracing::info!(pod = name, "capture removed");
        Ok(())
    }
}

fn complete(dir: &Path) -> bool {
    PROGRAMS
        .iter()
        .all(|p| dir.join(format!("prog_{}", p.name)).exists())
        && MAPS.iter().all(|m| dir.join(m).exists())
}

fn teardown(dir: &Path, spec: &PodSpec) {
    tracing::warn!(pod = %spec.name, "incomplete pinned state: attaching afresh");
    teardown_dir(dir);
}

/// Detaches every pinned link (redirect first, guard last) and removes all pins.
fn teardown_dir(dir: &Path) {
    for p in PROGRAMS.iter().rev() {
        let path = dir.join(format!("link_{}", p.name));
        if let Ok(fd) = sys::obj_get(&path) {
            let _ = sys::link_detach(&fd);
        }
        let _ = std::fs::remove_file(&path);
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn load_and_pin(dir: &Path, spec: &PodSpec) -> Result<(), Error> {
    let pod = spec.name.as_str();
    std::fs::create_dir_all(dir).map_err(|e| pod_err(pod, "creating pin directory", e))?;
    let mut ebpf = aya::Ebpf::load(OBJECT).map_err(|e| pod_err(pod, "loading object", e))?;
    for m in MAPS {
        let map = ebpf
            .map(m)
            .ok_or_else(|| pod_err(pod, "loading object", format!("map {m} missing")))?;
        map.pin(dir.join(m))
            .map_err(|e| pod_err(pod, format!("pinning {m}"), e))?;
    }
    for def in &PROGRAMS {
        let prog = ebpf.program_mut(def.name).ok_or_else(|| {
            pod_err(
                pod,
                "loading object",
                format!("program {} missing", def.name),
            )
        })?;
        let loaded = match prog {
            Program::CgroupSkb(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSockopt(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::SkLookup(p) => p.load(),
            Program::SkMsg(p) => p.load(),
            other => {
                return Err(pod_err(
                    pod,
                    format!("loading {}", def.name),
                    format!("unexpected program type {:?}", other.prog_type()),
                ));
            }
        };
        loaded.map_err(|e| pod_err(pod, format!("loading {}", def.name), verifier(&e)))?;
        let fd = prog
            .fd()
            .map_err(|e| pod_err(pod, format!("loading {}", def.name), e))?;
        sys::obj_pin(fd.as_fd(), &dir.join(format!("prog_{}", def.name)))
            .map_err(|e| pod_err(pod, format!("pinning {}", def.name), e))?;
    }
    Ok(())
}

fn verifier(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!("{io_error}\n{verifier_log}"),
        other => other.to_string(),
    }
}

/// A pod's exclusions as its pinned maps hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub inbound_ports: Vec<u16>,
    pub outbound_ports: Vec<u16>,
    pub outbound_cidrs: Vec<String>,
}

fn read_exclusions(dir: &Path, pod: &str) -> Result<Exclusions, Error> {
    let ports = |map: &str| -> Result<Vec<u16>, Error> {
        let m: HashMap<MapData, u32, u32> =
            HashMap::try_from(Map::HashMap(open_map(dir, map, pod)?))
                .map_err(|e| pod_err(pod, map, e))?;
        let mut v: Vec<u16> = m
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| u16::try_from(k).ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    };
    let cidrs: LpmTrie<MapData, [u8; 16], u32> =
        LpmTrie::try_from(Map::LpmTrie(open_map(dir, "eg_skip_cidr", pod)?))
            .map_err(|e| pod_err(pod, "eg_skip_cidr", e))?;
    let mut outbound_cidrs: Vec<String> = cidrs
        .keys()
        .filter_map(Result::ok)
        .map(|k| {
            registry::Cidr {
                ip: k.data(),
                prefix_len: k.prefix_len(),
            }
            .to_string()
        })
        .collect();
    outbound_cidrs.sort();
    Ok(Exclusions {
        inbound_ports: ports("eg_skip_in")?,
        outbound_ports: ports("eg_skip_out")?,
        outbound_cidrs,
    })
}

fn open_map(dir: &Path, name: &str, pod: &str) -> Result<MapData, Error> {
    MapData::from_pin(dir.join(name)).map_err(|e| pod_err(pod, format!("opening {name}"), e))
}

fn write_config(dir: &Path, spec: &PodSpec, ready: bool, sync: bool) -> Result<(), Error> {
    let pod = spec.name.as_str();
    // Without the sidecar's cgroup nothing is exempt and nothing is ready: all app egress is
    // denied until it exists.
    let sidecar = std::fs::metadata(&spec.sidecar_cgroup)
        .map(|m| m.ino())
        .map_err(|e| {
            pod_err(
                pod,
                format!("sidecar cgroup {}", spec.sidecar_cgroup.display()),
                e,
            )
        });
    let (sidecar_cgroup, ready) = match &sidecar {
        Ok(id) => (*id, ready),
        Err(_) => (0, false),
    };
    let mut value = [0u8; 24];
    value[0..8].copy_from_slice(&sidecar_cgroup.to_ne_bytes());
    value[8..12].copy_from_slice(&u32::from(ready).to_ne_bytes());
    value[12..14].copy_from_slice(&spec.outbound_port.to_ne_bytes());
    value[14..16].copy_from_slice(&spec.inbound_port.to_ne_bytes());
    let flags = if spec.short_circuit {
        FLAG_SHORT_CIRCUIT
    } else {
        0
    };
    value[16..20].copy_from_slice(&flags.to_ne_bytes());
    let mut config: Array<MapData, [u8; 24]> =
        Array::try_from(Map::Array(open_map(dir, "eg_config", pod)?))
            .map_err(|e| pod_err(pod, "eg_config", e))?;
    if sync {
        // Exclusions first: a ready redirect never runs against an older exclusion list.
        sync_ports(dir, pod, "eg_skip_out", &spec.exclude_outbound_ports)?;
        sync_ports(dir, pod, "eg_skip_in", &spec.exclude_inbound_ports)?;
        sync_cidrs(dir, spec)?;
    }
    if config.get(&0, 0).ok() == Some(value) {
        return sidecar.map(drop);
    }
    config
        .set(0, value, 0)
        .map_err(|e| pod_err(pod, "writing eg_config", e))?;
    tracing::info!(pod, ready, "capture configuration written");
    sidecar.map(drop)
}

fn sync_ports(dir: &Path, pod: &str, map: &str, ports: &[u16]) -> Result<(), Error> {
    let mut m: HashMap<MapData, u32, u32> =
        HashMap::try_from(Map::HashMap(open_map(dir, map, pod)?))
            .map_err(|e| pod_err(pod, map, e))?;
    let want: Vec<u32> = ports.iter().map(|p| u32::from(*p)).collect();
    let have: Vec<u32> = m.keys().filter_map(Result::ok).collect();
    for k in have.iter().filter(|k| !want.contains(k)) {
        m.remove(k).map_err(|e| pod_err(pod, map, e))?;
    }
    for k in &want {
        m.insert(k, 1, 0).map_err(|e| pod_err(pod, map, e))?;
    }
    Ok(())
}

fn sync_cidrs(dir: &Path, spec: &PodSpec) -> Result<(), Error> {
    let pod = spec.name.as_str();
    let mut m: LpmTrie<MapData, [u8; 16], u32> =
        LpmTrie::try_from(Map::LpmTrie(open_map(dir, "eg_skip_cidr", pod)?))
            .map_err(|e| pod_err(pod, "eg_skip_cidr", e))?;
    let want: Vec<registry::Cidr> = spec
        .exclude_outbound_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let have: Vec<Key<[u8; 16]>> = m.keys().filter_map(Result::ok).collect();
    for k in &have {
        let keep = want
            .iter()
            .any(|c| c.prefix_len == k.prefix_len() && c.ip == k.data());
        if !keep {
            m.remove(k).map_err(|e| pod_err(pod, "eg_skip_cidr", e))?;
        }
    }
    for c in &want {
        m.insert(&Key::new(c.prefix_len, c.ip), 1, 0)
            .map_err(|e| pod_err(pod, "eg_skip_cidr", e))?;
    }
    Ok(())
}

/// Checks each link points at this pod's cgroup / netns and re-creates any that does not.
fn check_links(
    dir: &Path,
    spec: &PodSpec,
    repairs: &mut u64,
    out: &mut BTreeMap<&'static str, bool>,
) -> Result<(), Error> {
    let pod = spec.name.as_str();
    let cgroup = File::open(&spec.cgroup)
        .map_err(|e| pod_err(pod, format!("cgroup {}", spec.cgroup.display()), e))?;
    let cgroup_id = cgroup
        .metadata()
        .map_err(|e| pod_err(pod, "cgroup", e))?
        .ino();
    // The netns is opened only when its program is reached: a missing one must not keep the
    // cgroup programs (the guard first) from attaching.
    let mut netns: Option<(File, u64)> = None;
    for def in &PROGRAMS {
        let prog_path = dir.join(format!("prog_{}", def.name));
        if def.target == Target::SockHash {
            // Attached to the pinned sockhash once, when loaded; it lives as long as the map.
            let path = dir.join(format!("link_{}", def.name));
            if !path.exists() {
                let prog = sys::obj_get(&prog_path)
                    .map_err(|e| pod_err(pod, format!("opening {}", def.name), e))?;
                let map = sys::obj_get(&dir.join("eg_socks"))
                    .map_err(|e| pod_err(pod, "opening eg_socks", e))?;
                sys::prog_attach(&prog, &map, def.attach)
                    .map_err(|e| pod_err(pod, format!("attaching {}", def.name), e))?;
                // A marker: the attachment itself cannot be pinned.
                sys::obj_pin(&prog, &path)
                    .map_err(|e| pod_err(pod, format!("pinning {}", def.name), e))?;
            }
            out.insert(def.name, true);
            continue;
        }
        if def.target == Target::Netns && netns.is_none() {
            let f = File::open(&spec.netns)
                .map_err(|e| pod_err(pod, format!("netns {}", spec.netns.display()), e))?;
            let ino = f.metadata().map_err(|e| pod_err(pod, "netns", e))?.ino();
            netns = Some((f, u64::from(ino as u32)));
        }
        let (target_fd, expected) = match (&netns, def.target) {
            (Some((f, ino)), Target::Netns) => (f.as_fd(), *ino),
            _ => (cgroup.as_fd(), cgroup_id),
        };
        let path = dir.join(format!("link_{}", def.name));
        let current = sys::obj_get(&path).ok().and_then(|fd| {
            sys::link_info(&fd, def.target == Target::Netns)
                .ok()
                .map(|i| (fd, i))
        });
        match current {
            Some((_, info)) if info.target == expected => {
                out.insert(def.name, true);
                continue;
            }
            Some((fd, info)) => {
                tracing::warn!(
                    pod,
                    program = def.name,
                    target = info.target,
                    expected,
                    "link detached or moved: re-attaching"
                );
                let _ = sys::link_detach(&fd);
                let _ = std::fs::remove_file(&path);
                *repairs += 1;
            }
            None if path.exists() => {
                let _ = std::fs::remove_file(&path);
                *repairs += 1;
            }
            None => {}
        }
        let prog = sys::obj_get(&prog_path)
            .map_err(|e| pod_err(pod, format!("opening {}", def.name), e))?;
        let link = sys::link_create(&prog, target_fd, def.attach);
        match link {
            Ok(link) => {
                sys::obj_pin(&link, &path)
                    .map_err(|e| pod_err(pod, format!("pinning link {}", def.name), e))?;
                tracing::info!(pod, program = def.name, "attached");
                out.insert(def.name, true);
            }
            Err(e) => {
                // Later programs are not attached without this one (the guard stays).
                return Err(pod_err(pod, format!("attaching {}", def.name), e));
            }
        }
    }
    Ok(())
}

/// Puts the sidecar's inbound listeners into `eg_inbound` when they appear or change.
fn register_inbound(
    dir: &Path,
    spec: &PodSpec,
    known: &mut [Option<procfs::Found>; 2],
) -> Result<(), Error> {
    let pod = spec.name.as_str();
    for (slot, v6) in [(0u32, false), (1u32, true)] {
        let i = slot as usize;
        if known[i].is_some_and(|f| f.still_held()) {
            continue;
        }
        known[i] = None;
        let Some(found) = procfs::find_listener(&spec.sidecar_cgroup, spec.inbound_port, v6)
            .map_err(|e| pod_err(pod, "finding the sidecar's inbound listener", e))?
        else {
            continue;
        };
        let sock = procfs::dup_socket(&found)
            .map_err(|e| pod_err(pod, "taking the sidecar's inbound listener", e))?;
        let mut map: SockMap<MapData> =
            SockMap::try_from(Map::SockMap(open_map(dir, "eg_inbound", pod)?))
                .map_err(|e| pod_err(pod, "eg_inbound", e))?;
        map.set(slot, &sock.fd, 0)
            .map_err(|e| pod_err(pod, "registering the inbound listener", e))?;
        tracing::info!(
            pod,
            inode = found.inode,
            ipv6 = v6,
            "sidecar inbound listener registered"
        );
        known[i] = Some(found);
    }
    Ok(())
}

fn read_counters(dir: &Path) -> Option<BTreeMap<&'static str, u64>> {
    let data = MapData::from_pin(dir.join("eg_counters")).ok()?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data)).ok()?;
    let mut out = BTreeMap::new();
    for (i, name) in COUNTERS.iter().enumerate() {
        let values = map.get(&(i as u32), 0).ok()?;
        out.insert(*name, values.iter().sum());
    }
    Some(out)
}

/// Program names in [`OBJECT`] (parsed, not loaded: no kernel needed).
pub fn object_programs() -> Vec<String> {
    match aya_obj::Object::parse(OBJECT) {
        Ok(o) => o.programs.keys().cloned().collect(),
        Err(_) => Vec::new(),
    }
}
