//! The SPIFFE Workload API: generated types and service stubs.
#![allow(clippy::all, missing_docs, unreachable_pub)]

tonic::include_proto!("_");
