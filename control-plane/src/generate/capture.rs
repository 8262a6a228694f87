//! A captured sidecar's outbound listeners (Istio's capture shape): `virtualOutbound` with
//! `use_original_dst`, a hand-off listener (`bind_to_port: false`) per service VIP:port and member
//! pod IP:app port, and a black hole for every other destination (REGISTRY_ONLY).

use super::*;

pub(super) fn listeners(
    w: &WorkloadEntry,
    handoff: &outbound::Handoff,
    access_log: &[xds::pb::envoy::config::accesslog::v3::AccessLog],
    snap: &mut Snapshot,
) {
    for ((ip, port), (cluster, http)) in handoff {
        let l = handoff_listener(ip, *port, cluster, *http, access_log);
        put(snap, types::LISTENER, &l.name, &l);
    }
    let l = Listener {
        name: "virtualOutbound".into(),
        address: Some(socket("127.0.0.1", outbound_port(w))),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: vec![blackhole()],
        traffic_direction: 2,
        ..Default::default()
    };
    put(snap, types::LISTENER, &l.name, &l);
}

/// A hand-off target (`bind_to_port: false`) at `ip:port` for one service port: HTTP routed to
/// its cluster whatever the Host, or TCP proxied to it.
fn handoff_listener(
    ip: &str,
    port: u16,
    cluster: &str,
    http: bool,
    access_log: &[xds::pb::envoy::config::accesslog::v3::AccessLog],
) -> Listener {
    let name = format!("outbound_{ip}_{port}");
    let filter = if http {
        let hcm = HttpConnectionManager {
            stat_prefix: name.clone(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                RouteConfiguration {
                    name: name.clone(),
                    virtual_hosts: vec![VirtualHost {
                        name: format!("{ip}:{port}"),
                        domains: vec!["*".into()],
                        routes: vec![route_to(cluster)],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            http_filters: vec![router()],
            upgrade_configs: websocket(),
            access_log: access_log.to_vec(),
            ..Default::default()
        };
        Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&hcm))),
        }
    } else {
        Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&TcpProxy {
                stat_prefix: name.clone(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            }))),
        }
    };
    Listener {
        name,
        address: Some(socket(ip, port)),
        bind_to_port: Some(BoolValue { value: false }),
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        traffic_direction: 2,
        ..Default::default()
    }
}

/// A chain that refuses every connection (Istio's BlackHoleCluster).
fn blackhole() -> FilterChain {
    FilterChain {
        name: "BlackHoleCluster".into(),
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(codec::pack(&TcpProxy {
                stat_prefix: "BlackHoleCluster".into(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                    "BlackHoleCluster".into(),
                )),
                ..Default::default()
            }))),
        }],
        ..Default::default()
    }
}
