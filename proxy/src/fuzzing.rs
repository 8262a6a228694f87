//! The check behind the `translate` fuzz target (`proxy/fuzz`), kept here so `cargo test` replays
//! its corpus. Input: one byte choosing the resource type, then the resource's protobuf bytes.
//!
//! Properties, beyond "never panics": translation rejects rather than widens —
//! - a listener keeps every filter chain (none silently dropped) and every RBAC filter;
//! - a chain whose match criteria cannot be evaluated refuses its connections;
//! - a cluster asked to use TLS gets mTLS with at least one expected SPIFFE ID;
//! - the resource renders for `/config_dump` or fails cleanly.

use prost::Message;
use xds::codec;
use xds::pb::envoy::config::cluster::v3::Cluster;
use xds::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds::pb::envoy::config::listener::v3::{Listener, filter};
use xds::pb::envoy::config::route::v3::RouteConfiguration;
use xds::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};

use crate::envoy;

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// Counts the RBAC filters a listener asks for (network and HTTP).
fn rbac_in(l: &Listener) -> usize {
    let mut n = 0;
    for fc in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        for f in &fc.filters {
            let Some(filter::ConfigType::TypedConfig(tc)) = &f.config_type else {
                continue;
            };
            let t = codec::effective_type_url(tc);
            if t == policy::rbac::NETWORK_RBAC_TYPE {
                n += 1;
            } else if t == HCM_TYPE
                && let Ok(hcm) = codec::unpack::<HttpConnectionManager>(tc)
            {
                n += hcm
                    .http_filters
                    .iter()
                    .filter(|h| {
                        matches!(&h.config_type, Some(http_filter::ConfigType::TypedConfig(a))
                            if codec::effective_type_url(a) == policy::rbac::HTTP_RBAC_TYPE)
                    })
                    .count();
            }
        }
    }
    n
}

/// An invariant of translation a fuzz input broke.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("{chains_in} chains in, {chains_out} out")]
    ChainsLost { chains_in: usize, chains_out: usize },
    #[error("{rbac_in} RBAC filters in, {rbac_out} out")]
    RbacFiltersLost { rbac_in: usize, rbac_out: usize },
    #[error("{unevaluable} chains cannot be evaluated but only {refusing} refuse")]
    UnevaluableChainServed { unevaluable: usize, refusing: usize },
    #[error("an accepted RBAC filter does not compile: {0}")]
    RbacDoesNotCompile(#[from] crate::config::ChainError),
    #[error("a TLS cluster translated without expected peer identities")]
    TlsWithoutPeerIds,
    #[error("an accepted route is invalid: {field}: {reason}")]
    BadRoute { field: String, reason: String },
}

pub fn check_translate(data: &[u8]) -> Result<(), Violation> {
    let Some((&kind, bytes)) = data.split_first() else {
        return Ok(());
    };
    let mut notes = Vec::new();
    match kind % 4 {
        0 => {
            let Ok(l) = Listener::decode(bytes) else {
                return Ok(());
            };
            let _ = codec::any_to_json(&codec::pack(&l));
            let Ok(Some(out)) = envoy::listener(&l, &mut notes) else {
                return Ok(());
            };
            let chains_in = l.filter_chains.len() + usize::from(l.default_filter_chain.is_some());
            if out.filter_chains.len() != chains_in {
                return Err(Violation::ChainsLost {
                    chains_in,
                    chains_out: out.filter_chains.len(),
                });
            }
            let rbac_out: usize = out
                .filter_chains
                .iter()
                .map(|c| {
                    c.rbac_filters.len()
                        + c.http_connection_manager
                            .as_ref()
                            .map_or(0, |h| h.http_filters.len())
                })
                .sum();
            if rbac_out != rbac_in(&l) {
                return Err(Violation::RbacFiltersLost {
                    rbac_in: rbac_in(&l),
                    rbac_out,
                });
            }
            let unevaluable = l
                .filter_chains
                .iter()
                .chain(l.default_filter_chain.iter())
                .filter(|fc| {
                    fc.filter_chain_match.as_ref().is_some_and(|m| {
                        !m.source_prefix_ranges.is_empty()
                            || !m.source_ports.is_empty()
                            || m.source_type != 0
                    })
                })
                .count();
            let refusing = out
                .filter_chains
                .iter()
                .filter(|c| c.refuse.is_some())
                .count();
            if refusing < unevaluable {
                return Err(Violation::UnevaluableChainServed {
                    unevaluable,
                    refusing,
                });
            }
            for c in &out.filter_chains {
                crate::config::compile_rbac(&c.rbac_filters)?;
                if let Some(h) = &c.http_connection_manager {
                    crate::config::compile_rbac(&h.http_filters)?;
                }
            }
        }
        1 => {
            let Ok(c) = Cluster::decode(bytes) else {
                return Ok(());
            };
            let _ = codec::any_to_json(&codec::pack(&c));
            let wants_tls = c
                .transport_socket
                .as_ref()
                .is_some_and(|t| t.name == "envoy.transport_sockets.tls" || t.name == "tls");
            let Ok(out) = envoy::cluster(&c, &mut notes) else {
                return Ok(());
            };
            if wants_tls
                && out
                    .transport_socket
                    .as_ref()
                    .is_none_or(|t| t.match_spiffe_ids.is_empty())
            {
                return Err(Violation::TlsWithoutPeerIds);
            }
        }
        2 => {
            let Ok(r) = RouteConfiguration::decode(bytes) else {
                return Ok(());
            };
            let _ = codec::any_to_json(&codec::pack(&r));
            if let Ok(out) = envoy::route_configuration(&r, &mut notes) {
                for vh in &out.virtual_hosts {
                    for route in &vh.routes {
                        crate::config::check_route(route).map_err(|(f, m)| {
                            Violation::BadRoute {
                                field: f.to_string(),
                                reason: m.to_string(),
                            }
                        })?;
                    }
                }
            }
        }
        _ => {
            let Ok(la) = ClusterLoadAssignment::decode(bytes) else {
                return Ok(());
            };
            let _ = codec::any_to_json(&codec::pack(&la));
            let _ = envoy::load_assignment(&la, &mut notes);
        }
    }
    Ok(())
}
