//! Capture on Kubernetes: which of this node's pods eBPF capture takes, from the kubelet's pod
//! list (no hand-written capture registry).
//!
//! A pod is captured when the injection webhook recorded capture settings on it
//! (`sidecar.eastguard.io/capture-settings`, `enabled: true`) and its sidecar container
//! (`eastguard-proxy`) runs: its cgroup directory is found in the host tree by pod UID and
//! container ID (every kubelet layout), the pod's cgroup is its parent, and the network
//! namespace is the one of the sidecar's process. The settings' exclusions are kept; Istio's
//! include lists and excluded interfaces are not something the programs do, so such a pod is
//! captured whole (more captured, never less) and the agent says so.
//!
//! A pod that is listed but cannot be placed right now (its sidecar restarting, its cgroup not
//! visible for a moment) keeps the target it had: dropping it would detach its capture, guard
//! included, and let the app's traffic around the sidecar. Only a pod gone from the list, or
//! finished, is dropped.
//!
//! Capture is decided once per pod, as istio-init decides it when the pod starts: the settings
//! a pod was first captured with stay for its life. Editing or removing the annotation later
//! changes nothing (otherwise whoever may edit a pod's annotations could take it out of
//! capture while it runs); a restarted sidecar only moves the cgroup and network namespace.
//! The decision outlives the agent: the pods an earlier agent left pinned are adopted
//! ([`CaptureTargets::adopt`]) with the exclusions their pinned maps hold, whatever their
//! annotation says now, and their pins are held until they are placed again or leave the list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::k8s::{PodContainer, Pods, SIDECAR, container_dirs};

/// The annotation the webhook writes.
pub const CAPTURE_SETTINGS: &str = "sidecar.eastguard.io/capture-settings";

/// One pod to capture, in the terms of the capture registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureTarget {
    /// `namespace/name`, for messages.
    pub pod: String,
    pub uid: String,
    pub cgroup: PathBuf,
    pub sidecar_cgroup: PathBuf,
    pub netns: PathBuf,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
    /// What of the settings is not applied (include lists, interfaces).
    pub ignored: Vec<&'static str>,
}

/// The webhook's `Capture`, as it serializes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Settings {
    enabled: bool,
    include_inbound_ports: Option<Vec<u16>>,
    exclude_inbound_ports: Vec<u16>,
    include_outbound_cidrs: Option<Vec<String>>,
    exclude_outbound_cidrs: Vec<String>,
    include_outbound_ports: Option<Vec<u16>>,
    exclude_outbound_ports: Vec<u16>,
    exclude_interfaces: Vec<String>,
}

/// What a pod was captured with, as an earlier agent's pinned maps hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub inbound_ports: Vec<u16>,
    pub outbound_ports: Vec<u16>,
    pub outbound_cidrs: Vec<String>,
}

/// Keeps the pods' capture targets across pod lists (see the module doc).
#[derive(Debug, Default)]
pub struct CaptureTargets {
    by_uid: BTreeMap<String, CaptureTarget>,
    /// Pods an earlier agent captured, by UID, until placed or gone from the list.
    adopted: BTreeMap<String, Exclusions>,
}

/// Why a pod that asks to be captured has no target now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotPlaced {
    pub pod: String,
    pub reason: String,
}

impl CaptureTargets {
    /// A pod an earlier agent captured with `exclusions`: it stays captured, with them, for its
    /// life, whatever its annotation says now.
    pub fn adopt(&mut self, uid: &str, exclusions: Exclusions) {
        self.adopted.insert(uid.to_owned(), exclusions);
    }

    /// Adopted pods not placed yet: their earlier capture must be left as it is.
    pub fn held(&self) -> impl Iterator<Item = &str> {
        self.adopted.keys().map(String::as_str)
    }

    /// The targets for this list, and the pods that ask for capture but could not be placed
    /// (those keep an earlier target if they had one). `None` before the kubelet's first list:
    /// nothing is known, so nothing may be detached.
    pub fn update(
        &mut self,
        pods: &Pods,
        cgroup_root: &Path,
    ) -> Option<(Vec<CaptureTarget>, Vec<NotPlaced>)> {
        if !pods.is_listed() {
            return None;
        }
        let mut next = BTreeMap::new();
        let mut adopted = BTreeMap::new();
        let mut failed = Vec::new();
        for pod in pods.items() {
            let Some(uid) = pod["metadata"]["uid"].as_str() else {
                continue;
            };
            if matches!(
                pod["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            ) {
                continue;
            }
            let name = name_of(pod);
            // What it was first captured with, if it was: by this agent, or an earlier one.
            let decided = match (self.by_uid.get(uid), self.adopted.get(uid)) {
                (Some(old), _) => Some(Decided::Target(old)),
                (None, Some(excl)) => Some(Decided::Adopted(excl)),
                (None, None) => None,
            };
            let asked = settings(pod);
            let placed = match (&decided, &asked) {
                (None, Ok(None)) => continue,
                (None, Err(reason)) => {
                    failed.push(NotPlaced {
                        pod: name,
                        reason: reason.clone(),
                    });
                    continue;
                }
                _ => place(pod, uid, cgroup_root),
            };
            if decided.is_some() && !matches!(asked, Ok(Some(_))) {
                failed.push(NotPlaced {
                    pod: name.clone(),
                    reason: "its capture settings were removed, turned off or broken after it started; it keeps the capture it started with".into(),
                });
            }
            let placed = match placed {
                Ok(p) => p,
                Err(reason) => {
                    match decided {
                        Some(Decided::Target(old)) => {
                            next.insert(uid.to_owned(), old.clone());
                        }
                        Some(Decided::Adopted(excl)) => {
                            adopted.insert(uid.to_owned(), excl.clone());
                        }
                        None => {}
                    }
                    failed.push(NotPlaced { pod: name, reason });
                    continue;
                }
            };
            let target = match (decided, asked) {
                // Where it runs now, with what it started with.
                (Some(Decided::Target(old)), _) => CaptureTarget {
                    cgroup: placed.cgroup,
                    sidecar_cgroup: placed.sidecar_cgroup,
                    netns: placed.netns,
                    ..old.clone()
                },
                (Some(Decided::Adopted(excl)), _) => CaptureTarget {
                    pod: name,
                    uid: uid.to_owned(),
                    cgroup: placed.cgroup,
                    sidecar_cgroup: placed.sidecar_cgroup,
                    netns: placed.netns,
                    exclude_inbound_ports: excl.inbound_ports.clone(),
                    exclude_outbound_ports: excl.outbound_ports.clone(),
                    exclude_outbound_cidrs: excl.outbound_cidrs.clone(),
                    ignored: Vec::new(),
                },
                (None, Ok(Some(settings))) => settings.target(name, uid, placed),
                (None, _) => continue,
            };
            next.insert(uid.to_owned(), target);
        }
        self.by_uid = next;
        self.adopted = adopted;
        Some((self.by_uid.values().cloned().collect(), failed))
    }
}

enum Decided<'a> {
    Target(&'a CaptureTarget),
    Adopted(&'a Exclusions),
}

/// Where a pod's sidecar runs now.
struct Placement {
    cgroup: PathBuf,
    sidecar_cgroup: PathBuf,
    netns: PathBuf,
}

impl Settings {
    fn target(self, pod: String, uid: &str, placed: Placement) -> CaptureTarget {
        let mut ignored = Vec::new();
        if self.include_inbound_ports.is_some() {
            ignored.push("includeInboundPorts");
        }
        if self.include_outbound_ports.is_some() {
            ignored.push("includeOutboundPorts");
        }
        if self.include_outbound_cidrs.is_some() {
            ignored.push("includeOutboundIPRanges");
        }
        if !self.exclude_interfaces.is_empty() {
            ignored.push("excludeInterfaces");
        }
        CaptureTarget {
            pod,
            uid: uid.to_owned(),
            cgroup: placed.cgroup,
            sidecar_cgroup: placed.sidecar_cgroup,
            netns: placed.netns,
            exclude_inbound_ports: self.exclude_inbound_ports,
            exclude_outbound_ports: self.exclude_outbound_ports,
            exclude_outbound_cidrs: self.exclude_outbound_cidrs,
            ignored,
        }
    }
}

fn name_of(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or(""),
        pod["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// The capture settings the pod asks for; `Ok(None)`: it does not ask to be captured.
fn settings(pod: &Value) -> Result<Option<Settings>, String> {
    let Some(text) = pod["metadata"]["annotations"][CAPTURE_SETTINGS].as_str() else {
        return Ok(None);
    };
    let settings: Settings =
        serde_json::from_str(text).map_err(|e| format!("{CAPTURE_SETTINGS}: {e}"))?;
    Ok(settings.enabled.then_some(settings))
}

/// The pod's cgroup and its running sidecar's cgroup and network namespace.
fn place(pod: &Value, uid: &str, cgroup_root: &Path) -> Result<Placement, String> {
    let status = &pod["status"];
    let sidecar = ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|k| status[*k].as_array())
        .flatten()
        .find(|c| c["name"].as_str() == Some(SIDECAR))
        .ok_or("its sidecar has no status yet")?;
    if sidecar["state"]["running"].is_null() {
        return Err("its sidecar is not running".into());
    }
    let container_id = sidecar["containerID"]
        .as_str()
        .and_then(|id| id.split_once("://"))
        .map(|(_, id)| id.to_ascii_lowercase())
        .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("its sidecar has no container ID")?;
    let pc = PodContainer {
        pod_uid: uid.to_ascii_lowercase(),
        container_id,
    };
    let sidecar_cgroup = container_dirs(cgroup_root, &pc)
        .into_iter()
        .find(|d| d.is_dir())
        .ok_or("its sidecar's cgroup is not in the host tree")?;
    let cgroup = sidecar_cgroup
        .parent()
        .ok_or("its sidecar's cgroup has no parent")?
        .to_owned();
    let pid = std::fs::read_to_string(sidecar_cgroup.join("cgroup.procs"))
        .ok()
        .and_then(|procs| procs.lines().find_map(|l| l.trim().parse::<u32>().ok()))
        .ok_or("its sidecar has no process")?;
    Ok(Placement {
        cgroup,
        sidecar_cgroup,
        netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b3c2f1e-1111-4222-8333-944455556666";

    fn id(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn list(pods: Vec<Value>) -> Pods {
        Pods::parse(&serde_json::to_vec(&serde_json::json!({ "items": pods })).unwrap()).unwrap()
    }

    fn pod(settings: Option<&str>, sidecar_id: &str, running: bool, phase: &str) -> Value {
        let mut notes = serde_json::Map::new();
        if let Some(s) = settings {
            notes.insert(CAPTURE_SETTINGS.into(), Value::String(s.into()));
        }
        let state = if running {
            serde_json::json!({"running": {"startedAt": "2026-12-07T07:00:00Z"}})
        } else {
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}})
        };
        serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": UID, "annotations": notes},
            "status": {"phase": phase, "initContainerStatuses": [
                {"name": SIDECAR, "containerID": format!("containerd://{sidecar_id}"), "state": state}
            ]},
        })
    }

    const ON: &str = r#"{"enabled":true,"includeInboundPorts":null,"excludeInboundPorts":[15020,15021,15090],"includeOutboundCidrs":null,"excludeOutboundCidrs":["10.0.0.0/8"],"includeOutboundPorts":null,"excludeOutboundPorts":[5432],"excludeInterfaces":[]}"#;

    /// A kubelet-shaped tree (systemd driver) with the sidecar's cgroup and one "process".
    fn tree(sidecar_id: &str) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        tree_with(&d, sidecar_id, "4242");
        d
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "eastguard-capture-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn an_injected_pod_with_a_running_sidecar_is_captured_with_its_exclusions() {
        let t = tree(&id('a'));
        let mut targets = CaptureTargets::default();
        let (got, failed) = targets
            .update(&list(vec![pod(Some(ON), &id('a'), true, "Running")]), &t.0)
            .unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        let [one] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!(one.pod, "shop/web-1");
        assert!(
            one.sidecar_cgroup
                .ends_with(format!("cri-containerd-{}.scope", id('a')))
        );
        assert_eq!(one.cgroup, one.sidecar_cgroup.parent().unwrap());
        assert_eq!(one.netns, PathBuf::from("/proc/4242/ns/net"));
        assert_eq!(one.exclude_outbound_ports, [5432]);
        assert_eq!(one.exclude_outbound_cidrs, ["10.0.0.0/8"]);
        assert_eq!(one.exclude_inbound_ports, [15020, 15021, 15090]);
        assert!(one.ignored.is_empty());
    }

    #[test]
    fn pods_that_do_not_ask_or_are_done_are_not_captured() {
        let t = tree(&id('a'));
        let off = ON.replace(r#""enabled":true"#, r#""enabled":false"#);
        let mut targets = CaptureTargets::default();
        for p in [
            pod(None, &id('a'), true, "Running"),
            pod(Some(&off), &id('a'), true, "Running"),
            pod(Some(ON), &id('a'), true, "Succeeded"),
        ] {
            let (got, failed) = targets.update(&list(vec![p]), &t.0).unwrap();
            assert!(got.is_empty() && failed.is_empty());
        }
    }

    #[test]
    fn nothing_is_decided_before_the_first_list() {
        assert!(
            CaptureTargets::default()
                .update(&Pods::default(), Path::new("/"))
                .is_none()
        );
    }

    #[test]
    fn a_listed_pod_that_cannot_be_placed_keeps_its_target_until_it_is_gone() {
        let t = tree(&id('a'));
        let mut targets = CaptureTargets::default();
        let (got, _) = targets
            .update(&list(vec![pod(Some(ON), &id('a'), true, "Running")]), &t.0)
            .unwrap();
        assert_eq!(got.len(), 1);
        // The sidecar restarts: not running, then a new container not yet in the tree.
        for p in [
            pod(Some(ON), &id('a'), false, "Running"),
            pod(Some(ON), &id('b'), true, "Running"),
            pod(Some("{garbage"), &id('a'), true, "Running"),
        ] {
            let (again, failed) = targets.update(&list(vec![p]), &t.0).unwrap();
            assert_eq!(again, got);
            assert_eq!(failed.len(), 1);
        }
        // Gone from the list: dropped.
        let (none, _) = targets.update(&list(vec![]), &t.0).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn capture_is_decided_once_per_pod() {
        let t = tree(&id('a'));
        let mut targets = CaptureTargets::default();
        let (first, _) = targets
            .update(&list(vec![pod(Some(ON), &id('a'), true, "Running")]), &t.0)
            .unwrap();
        // The annotation edited to exclude everything, turned off, or removed: no effect.
        let wider = ON.replace(
            r#""excludeOutboundPorts":[5432]"#,
            r#""excludeOutboundPorts":[1,2,3]"#,
        );
        let off = ON.replace(r#""enabled":true"#, r#""enabled":false"#);
        for p in [
            pod(Some(&wider), &id('a'), true, "Running"),
            pod(Some(&off), &id('a'), true, "Running"),
            pod(None, &id('a'), true, "Running"),
        ] {
            let (again, _) = targets.update(&list(vec![p]), &t.0).unwrap();
            assert_eq!(again, first);
        }
        // A restarted sidecar moves the cgroup and namespace; the settings stay.
        let moved = tree_with(&t, &id('c'), "777");
        let (after, failed) = targets
            .update(
                &list(vec![pod(Some(&wider), &id('c'), true, "Running")]),
                &t.0,
            )
            .unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(after[0].sidecar_cgroup, moved);
        assert_eq!(after[0].netns, PathBuf::from("/proc/777/ns/net"));
        assert_eq!(after[0].exclude_outbound_ports, [5432]);
    }

    #[test]
    fn a_pod_an_earlier_agent_captured_keeps_what_it_was_captured_with() {
        let t = tree(&id('a'));
        let pinned = Exclusions {
            inbound_ports: vec![15020],
            outbound_ports: vec![],
            outbound_cidrs: vec![],
        };
        // The annotation removed, turned off, broken or widened before the agent restarted.
        let wider = ON.replace(
            r#""excludeOutboundCidrs":["10.0.0.0/8"]"#,
            r#""excludeOutboundCidrs":["0.0.0.0/0"]"#,
        );
        let off = ON.replace(r#""enabled":true"#, r#""enabled":false"#);
        for settings in [
            None,
            Some(off.as_str()),
            Some("{broken"),
            Some(wider.as_str()),
        ] {
            let mut targets = CaptureTargets::default();
            targets.adopt(UID, pinned.clone());
            assert_eq!(targets.held().collect::<Vec<_>>(), [UID]);
            let (found, _) = targets
                .update(&list(vec![pod(settings, &id('a'), true, "Running")]), &t.0)
                .unwrap();
            assert_eq!(found.len(), 1, "{settings:?}");
            assert_eq!(found[0].exclude_inbound_ports, [15020]);
            assert!(found[0].exclude_outbound_cidrs.is_empty(), "{settings:?}");
            assert!(found[0].exclude_outbound_ports.is_empty());
            // Placed: a target now, no longer held as pinned.
            assert_eq!(targets.held().count(), 0);
        }
    }

    #[test]
    fn an_adopted_pod_that_cannot_be_placed_is_held_until_it_leaves_the_list() {
        let t = tree(&id('a'));
        let mut targets = CaptureTargets::default();
        targets.adopt(UID, Exclusions::default());
        // Its sidecar restarting while the agent starts: not a target, but its pins are held.
        let (found, failed) = targets
            .update(&list(vec![pod(None, &id('a'), false, "Running")]), &t.0)
            .unwrap();
        assert!(found.is_empty());
        assert!(
            failed.iter().any(|f| f.reason.contains("not running")),
            "{failed:?}"
        );
        assert_eq!(targets.held().collect::<Vec<_>>(), [UID]);
        // Back: captured with what it had, though its annotation is gone.
        let (found, _) = targets
            .update(&list(vec![pod(None, &id('a'), true, "Running")]), &t.0)
            .unwrap();
        assert_eq!(found.len(), 1);
        // Gone from the list (or finished): neither held nor a target.
        let mut gone = CaptureTargets::default();
        gone.adopt(UID, Exclusions::default());
        let (found, _) = gone.update(&list(vec![]), &t.0).unwrap();
        assert!(found.is_empty());
        assert_eq!(gone.held().count(), 0);
        let mut done = CaptureTargets::default();
        done.adopt(UID, Exclusions::default());
        let (found, _) = done
            .update(
                &list(vec![pod(Some(ON), &id('a'), true, "Succeeded")]),
                &t.0,
            )
            .unwrap();
        assert!(found.is_empty());
        assert_eq!(done.held().count(), 0);
    }

    /// A sidecar container's cgroup in the pod's directory under `t`, with one process.
    fn tree_with(t: &tempdir::Dir, sidecar_id: &str, pid: &str) -> PathBuf {
        let u = UID.replace('-', "_");
        let c =
            t.0.join("kubepods.slice/kubepods-burstable.slice")
                .join(format!("kubepods-burstable-pod{u}.slice"))
                .join(format!("cri-containerd-{sidecar_id}.scope"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("cgroup.procs"), format!("{pid}\n")).unwrap();
        c
    }

    #[test]
    fn include_lists_are_reported_and_everything_else_is_captured() {
        let t = tree(&id('a'));
        let some = ON
            .replace(
                r#""includeInboundPorts":null"#,
                r#""includeInboundPorts":[8080]"#,
            )
            .replace(
                r#""excludeInterfaces":[]"#,
                r#""excludeInterfaces":["net1"]"#,
            );
        let (got, _) = CaptureTargets::default()
            .update(
                &list(vec![pod(Some(&some), &id('a'), true, "Running")]),
                &t.0,
            )
            .unwrap();
        assert_eq!(got[0].ignored, ["includeInboundPorts", "excludeInterfaces"]);
    }
}
