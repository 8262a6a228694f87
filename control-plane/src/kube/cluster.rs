//! Namespaces and ServiceAccounts, reduced to what the API inventory reads from them: who owns
//! each, and which workload identities (`spiffe://TD/ns/NS/sa/SA`) the cluster has.
//!
//! Neither changes any sidecar's configuration, so they are kept apart from the registry: an
//! edited Namespace label never makes every sidecar's xDS be computed again.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::watch::Store;

/// Labels, then annotations, naming who owns a service, namespace or service account.
pub const OWNER_KEYS: [&str; 3] = ["eastguard.io/owner", "owner", "team"];

/// The owner named by `metadata`'s labels or annotations.
pub fn owner_of(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
) -> Option<String> {
    OWNER_KEYS.iter().find_map(|k| {
        labels
            .and_then(|l| l.get(*k))
            .or_else(|| annotations.and_then(|a| a.get(*k)))
            .cloned()
    })
}

fn owner_in(object: &Value) -> Option<String> {
    let map = |field: &str| -> Option<BTreeMap<String, String>> {
        serde_json::from_value(object["metadata"].get(field)?.clone()).ok()
    };
    owner_of(map("labels").as_ref(), map("annotations").as_ref())
}

/// What a caller's SPIFFE ID names in this cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Identity {
    /// A ServiceAccount that exists; its owner, else its namespace's.
    ServiceAccount { owner: Option<String> },
    /// Shaped as this trust domain's workload IDs, but no such ServiceAccount exists: deleted
    /// since the SVID was issued, or never there.
    Unknown,
    /// Another trust domain, or not a `/ns/NS/sa/SA` ID: nothing to say.
    Foreign,
}

#[derive(Debug, Default, Clone)]
pub struct Cluster {
    pub trust_domain: String,
    /// Namespace → its owner.
    namespaces: BTreeMap<String, Option<String>>,
    /// (namespace, name) → its owner.
    service_accounts: BTreeMap<(String, String), Option<String>>,
}

impl Cluster {
    pub fn new(trust_domain: &str, namespaces: &Store, service_accounts: &Store) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespaces: namespaces
                .iter()
                .map(|((_, name), o)| (name.clone(), owner_in(o)))
                .collect(),
            service_accounts: service_accounts
                .iter()
                .map(|(k, o)| (k.clone(), owner_in(o)))
                .collect(),
        }
    }

    /// The owner named on the namespace, if it exists and names one.
    pub fn namespace_owner(&self, namespace: &str) -> Option<&str> {
        self.namespaces.get(namespace)?.as_deref()
    }

    pub fn identity(&self, spiffe_id: &str) -> Identity {
        let Some(path) = spiffe_id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.strip_prefix(self.trust_domain.as_str()))
        else {
            return Identity::Foreign;
        };
        let parts: Vec<&str> = path.split('/').collect();
        let ["", "ns", ns, "sa", sa] = parts.as_slice() else {
            return Identity::Foreign;
        };
        match self
            .service_accounts
            .get(&((*ns).to_owned(), (*sa).to_owned()))
        {
            Some(owner) => Identity::ServiceAccount {
                owner: owner
                    .clone()
                    .or_else(|| self.namespace_owner(ns).map(str::to_owned)),
            },
            None => Identity::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(objects: &[Value]) -> Store {
        objects
            .iter()
            .map(|o| {
                let m = &o["metadata"];
                let ns = m["namespace"].as_str().unwrap_or_default().to_owned();
                ((ns, m["name"].as_str().unwrap().to_owned()), o.clone())
            })
            .collect()
    }

    #[test]
    fn identities_and_owners() {
        let ns = store(&[
            json!({"metadata": {"name": "shop", "labels": {"team": "payments"}}}),
            json!({"metadata": {"name": "bare"}}),
        ]);
        let sa = store(&[
            json!({"metadata": {"name": "web", "namespace": "shop"}}),
            json!({"metadata": {"name": "batch", "namespace": "shop", "annotations": {"eastguard.io/owner": "data"}}}),
            json!({"metadata": {"name": "default", "namespace": "bare"}}),
        ]);
        let c = Cluster::new("cluster.local", &ns, &sa);
        let owner = |o: &str| Identity::ServiceAccount {
            owner: Some(o.into()),
        };
        assert_eq!(
            c.identity("spiffe://cluster.local/ns/shop/sa/web"),
            owner("payments")
        );
        assert_eq!(
            c.identity("spiffe://cluster.local/ns/shop/sa/batch"),
            owner("data")
        );
        assert_eq!(
            c.identity("spiffe://cluster.local/ns/bare/sa/default"),
            Identity::ServiceAccount { owner: None }
        );
        assert_eq!(
            c.identity("spiffe://cluster.local/ns/shop/sa/gone"),
            Identity::Unknown
        );
        assert_eq!(
            c.identity("spiffe://cluster.local/ns/nowhere/sa/web"),
            Identity::Unknown
        );
        // A trust domain that only starts like ours, another one, other shapes.
        for foreign in [
            "spiffe://cluster.local.evil/ns/shop/sa/web",
            "spiffe://other.org/ns/shop/sa/gone",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/workload/x",
            "plaintext",
        ] {
            assert_eq!(c.identity(foreign), Identity::Foreign, "{foreign}");
        }
        assert_eq!(c.namespace_owner("shop"), Some("payments"));
        assert_eq!(c.namespace_owner("bare"), None);
        assert_eq!(c.namespace_owner("missing"), None);
    }
}
