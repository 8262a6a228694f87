//! SPIFFE workload identity for eastguard: SPIFFE IDs and trust domains, per-domain trust bundles,
//! X509-SVIDs, credential sources (PEM files with hot reload, a dev CA) and the rustls configs and
//! verifiers that make every sidecar connection mutually authenticated.
//!
//! This crate must never accept a peer it cannot tie to a bundle of the trust domain named in the
//! peer's own certificate, and never hands out a TLS config that falls back to "any certificate".

mod bundle;
mod dev_ca;
pub mod node_ca;
mod source;
mod spiffe_id;
mod svid;
pub mod tls;
pub mod verifier;

pub use bundle::{Bundle, BundleError, BundleSet};
pub use dev_ca::{DevCa, DevCaError, MintedSvid, X509Authority};
pub use source::{Credentials, CredentialsRx, CredentialsTx, FileSource, SourceError};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{LeafInfo, SvidError, X509Svid, check_chain, check_leaf};

/// Re-exported so callers can edit dev-CA certificate parameters in tests.
pub use rcgen;
pub mod workload_api;
mod workload_source;
pub use workload_source::WorkloadApiSource;
