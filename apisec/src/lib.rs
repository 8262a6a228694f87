//! eastguard's API inventory, as pure logic (no I/O, no async, like `policy`): what a sidecar
//! observes of each inbound call, the path templates it infers from live traffic, and the bounded
//! aggregation it keeps and exports.
//!
//! - [`call`]: one call as observed — method, service, normalized path, status, the *verified*
//!   caller SPIFFE ID, sizes, latency, content types, and the auth scheme the request carried
//!   (the scheme only, never a credential);
//! - [`template`]: raw paths → templates (`/orders/{id}/items`), by token type and by cardinality,
//!   in a per-service trie whose size is capped;
//! - [`inventory`]: per (service, method, template, caller, status class) counters, capped, with an
//!   overflow row, read as a snapshot or drained as deltas;
//! - [`otlp`]: rows as OTLP metric data points (what a sidecar exports) and back (what the control
//!   plane receives), with size checks on the way in;
//! - [`spec`]: OpenAPI 3.x / Swagger 2.0 specs, matched against live templates, and each
//!   operation's status (documented, shadow, zombie, unused, drift);
//! - [`openapi`]: live operations written out as an OpenAPI 3.1 document;
//! - [`bola`]: broken object-level authorization and enumeration per (caller, operation);
//! - [`sensitive`]: sensitive-data classification of a call's sampled copy (types and places,
//!   never values).
//!
//! Every structure keyed by what a client sends is bounded; the bounds are in [`Limits`] and the
//! README states the memory they imply.

pub mod bola;
pub mod call;
pub mod inventory;
pub mod openapi;
pub mod otlp;
pub mod sensitive;
pub mod spec;
pub mod template;
pub mod time;

pub use call::{AuthScheme, Call};
pub use inventory::{Inventory, Limits, Row};
pub use template::{Kind, Templates};
