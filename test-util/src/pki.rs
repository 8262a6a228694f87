//! A dev CA for one trust domain, with SVIDs as files (for a proxy's `identity.files`) and as
//! in-memory credentials (for a client).

use std::path::{Path, PathBuf};
use std::time::Duration;

use identity::{BundleSet, Credentials, CredentialsRx, DevCa, SpiffeId, TrustDomain};

pub struct TestPki {
    pub ca: DevCa,
    dir: PathBuf,
}

/// The files of one SVID and the trust bundle, as `identity.files` takes them.
pub struct SvidFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl TestPki {
    /// A CA for `trust_domain` writing under a fresh directory named after `label`.
    pub fn new(trust_domain: &str, label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "eastguard-test-{label}-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = DevCa::new(TrustDomain::parse(trust_domain).unwrap()).unwrap();
        std::fs::write(dir.join("bundle.pem"), ca.cert_pem()).unwrap();
        Self { ca, dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Mints an SVID for `id` (valid 10 minutes) and writes it as `<name>.pem` / `<name>.key`.
    pub fn svid_files(&self, name: &str, id: &str) -> SvidFiles {
        let minted = self
            .ca
            .mint(&SpiffeId::parse(id).unwrap(), Duration::from_secs(600))
            .unwrap();
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert, &minted.cert_pem).unwrap();
        std::fs::write(&key, &minted.key_pem).unwrap();
        SvidFiles {
            cert,
            key,
            bundle: self.dir.join("bundle.pem"),
        }
    }

    /// Credentials for `id` that never rotate, trusting this CA.
    pub fn credentials(&self, id: &str) -> CredentialsRx {
        let minted = self
            .ca
            .mint(&SpiffeId::parse(id).unwrap(), Duration::from_secs(600))
            .unwrap();
        Credentials::new(minted.svid, BundleSet::new([self.ca.bundle().unwrap()]))
            .fixed()
            .1
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
