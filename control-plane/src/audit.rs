//! Policy changes as audit events: when the registry changes, each AuthorizationPolicy and
//! PeerAuthentication created, updated or deleted is one OCSF Entity Management event (3004),
//! written to `--audit-log` (one per line) and kept with the sidecars' events (`/apis/events`,
//! the UI) under the workload `control-plane`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::registry::Registry;

/// (kind, namespace/name) → the policy as read (its Debug form: equal text, equal policy).
fn policies(reg: &Registry) -> BTreeMap<(&'static str, String), String> {
    let mut out = BTreeMap::new();
    for p in &reg.authorization {
        out.insert(
            (
                "AuthorizationPolicy",
                format!("{}/{}", p.namespace(), p.name()),
            ),
            format!("{p:?}"),
        );
    }
    for p in &reg.peer_authentication {
        out.insert(
            (
                "PeerAuthentication",
                format!("{}/{}", p.namespace(), p.name()),
            ),
            format!("{p:?}"),
        );
    }
    out
}

/// What changed between two registries: (activity id and name, kind, namespace/name).
pub fn changes(old: &Registry, new: &Registry) -> Vec<(u8, &'static str, &'static str, String)> {
    let (a, b) = (policies(old), policies(new));
    let mut out = Vec::new();
    for (k, v) in &b {
        match a.get(k) {
            None => out.push((1, "Create", k.0, k.1.clone())),
            Some(old) if old != v => out.push((3, "Update", k.0, k.1.clone())),
            Some(_) => {}
        }
    }
    for k in a.keys().filter(|k| !b.contains_key(*k)) {
        out.push((4, "Delete", k.0, k.1.clone()));
    }
    out
}

/// An OCSF Entity Management event for one policy change.
pub fn event(activity_id: u8, activity: &str, kind: &str, id: &str) -> Value {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({
        "class_uid": 3004, "class_name": "Entity Management",
        "category_uid": 3, "category_name": "Identity & Access Management",
        "activity_id": activity_id, "activity_name": activity,
        "type_uid": 300400 + u32::from(activity_id),
        "type_name": format!("Entity Management: {activity}"),
        "time": time,
        "severity_id": 2, "severity": "Low",
        "status_id": 1, "status": "Success",
        "message": format!("{kind} {id}: {}", activity.to_lowercase()),
        "metadata": {
            "version": "1.3.0",
            "product": {"name": "eastguard", "vendor_name": "eastguard", "version": env!("CARGO_PKG_VERSION")},
            "log_name": "audit",
        },
        "actor": {"app_name": "eastguard control-plane"},
        "entity": {"name": id, "type": kind, "uid": format!("{kind}/{id}")},
    })
}

/// `--audit-log`: events appended one per line.
pub struct AuditLog {
    file: Option<Mutex<std::fs::File>>,
}

impl AuditLog {
    pub fn open(path: Option<&PathBuf>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
            None => None,
        };
        Ok(Self { file })
    }

    pub fn write(&self, e: &Value) {
        if let Some(f) = &self.file
            && let Ok(mut f) = f.lock()
            && let Err(err) = writeln!(f, "{e}")
        {
            tracing::warn!(error = %err, "audit log write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(yaml: &str) -> Registry {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("eg-cp-audit-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("r.yaml"), yaml).unwrap();
        let mut d = crate::registry::Directory::new(dir.clone());
        d.refresh().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        d.registry()
    }

    const A: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: bank}\nspec: {action: ALLOW, rules: [{}]}\n";
    const B: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: bank}\nspec: {action: DENY, rules: [{}]}\n";

    #[test]
    fn creations_updates_and_deletions() {
        let old = registry(&format!("{A}---\n{B}"));
        let new = registry(&format!(
            "{}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: bank}}\nspec: {{mtls: {{mode: STRICT}}}}\n",
            A.replace(
                "rules: [{}]",
                "rules: [{from: [{source: {principals: [x]}}]}]"
            )
        ));
        let mut got: Vec<(u8, &str, String)> = changes(&old, &new)
            .into_iter()
            .map(|(a, _, k, id)| (a, k, id))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (1, "PeerAuthentication", "bank/p".into()),
                (3, "AuthorizationPolicy", "bank/a".into()),
                (4, "AuthorizationPolicy", "bank/b".into()),
            ]
        );
        assert!(changes(&new, &new).is_empty());
        let e = event(3, "Update", "AuthorizationPolicy", "bank/a");
        assert_eq!(e["type_uid"], 300403);
    }
}
