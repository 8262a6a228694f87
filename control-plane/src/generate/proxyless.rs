//! A proxyless gRPC client's configuration (node metadata `GENERATOR: grpc`, as Istio's).

use super::*;

/// A proxyless gRPC client's configuration: API listeners `host:port` for every gRPC/HTTP port.
pub fn proxyless(reg: &Registry) -> Snapshot {
    let mut snap = Snapshot::default();
    for s in &reg.services {
        let peers = members(s, reg);
        for p in s.ports.iter().filter(|p| p.is_http()) {
            for h in &s.hosts {
                let name = format!("{h}:{}", p.number);
                let cluster = format!("outbound|{}||{h}", p.number);
                let hcm = HttpConnectionManager {
                    route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                        config_source: Some(ads()),
                        route_config_name: name.clone(),
                    })),
                    http_filters: vec![router()],
                    ..Default::default()
                };
                let l = Listener {
                    name: name.clone(),
                    api_listener: Some(ApiListener {
                        api_listener: Some(codec::pack(&hcm)),
                    }),
                    ..Default::default()
                };
                put(&mut snap, types::LISTENER, &name, &l);
                let rc = RouteConfiguration {
                    name: name.clone(),
                    virtual_hosts: vec![VirtualHost {
                        name: name.clone(),
                        domains: vec![h.clone(), name.clone()],
                        routes: vec![route_to(&cluster)],
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                put(&mut snap, types::ROUTE, &name, &rc);
                put(&mut snap, types::CLUSTER, &cluster, &eds_cluster(&cluster));
                let eps: Vec<(String, u16)> = peers
                    .iter()
                    .map(|m| (m.spec.address.clone(), target_port(p, m)))
                    .collect();
                put(
                    &mut snap,
                    types::ENDPOINT,
                    &cluster,
                    &load_assignment(&cluster, &eps),
                );
            }
        }
    }
    snap
}
