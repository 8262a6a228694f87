//! The resource types this transport carries.

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

pub const ALL: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

pub fn is_known(type_url: &str) -> bool {
    ALL.contains(&type_url)
}

/// LDS and CDS subscribe to everything when they name nothing (the xDS wildcard).
pub fn wildcard_by_default(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

/// A short name for logs: `LDS`, `RDS`, `CDS`, `EDS`, `SDS`.
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        LISTENER => "LDS",
        ROUTE => "RDS",
        CLUSTER => "CDS",
        ENDPOINT => "EDS",
        SECRET => "SDS",
        _ => "?",
    }
}
