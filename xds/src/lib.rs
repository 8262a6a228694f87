//! The xDS protocol only (DESIGN §8): an ADS client and an ADS server speaking the
//! state-of-the-world variant of `envoy.service.discovery.v3.AggregatedDiscoveryService`.
//! Resources are opaque `Any` here; translating them is the job of their producer and consumer.

pub mod codec;

pub use envoy_types::pb;
pub mod client;
pub mod server;
pub mod sync;
pub mod tls;
pub mod types;
