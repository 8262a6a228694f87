//! Endpoints (EDS, or inline in a cluster).

use super::*;

/// An EDS resource: the healthy endpoints of priority 0, each repeated by its weight (bounded).
pub fn load_assignment(
    la: &ClusterLoadAssignment,
    notes: &mut Notes,
) -> Result<Vec<SocketAddr>, Invalid> {
    let mut cx = Ctx {
        resource: &format!("endpoints {}", la.cluster_name),
        notes,
    };
    if la.cluster_name.is_empty() {
        return Err(cx.invalid("cluster_name", "required"));
    }
    load_assignment_in(la, "", &mut cx)
}

pub(super) fn load_assignment_in(
    la: &ClusterLoadAssignment,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Result<Vec<SocketAddr>, Invalid> {
    let sep = if field.is_empty() { "" } else { "." };
    let mut out = Vec::new();
    let mut skipped = 0usize;
    let mut weighted = false;
    for (li, loc) in la.endpoints.iter().enumerate() {
        if loc.priority != 0 {
            skipped += loc.lb_endpoints.len();
            continue;
        }
        for (ei, e) in loc.lb_endpoints.iter().enumerate() {
            // HealthStatus: 0 UNKNOWN, 1 HEALTHY; anything else is not used.
            if e.health_status > 1 {
                skipped += 1;
                continue;
            }
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                skipped += 1;
                continue;
            };
            let addr = match socket_addr(ep.address.as_ref()) {
                Ok(a) => a,
                // A pipe or internal address is one this proxy cannot reach: skipped, counted.
                Err(FieldError::NotASocketAddress) => {
                    skipped += 1;
                    continue;
                }
                Err(m) => {
                    return Err(cx.invalid(
                        format!("{field}{sep}endpoints[{li}].lb_endpoints[{ei}].endpoint.address"),
                        m,
                    ));
                }
            };
            let w = e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |w| w.value)
                .clamp(1, 128);
            weighted |= w > 1;
            for _ in 0..w {
                out.push(addr);
            }
        }
    }
    if skipped > 0 {
        cx.note(format!(
            "{skipped} endpoint(s) not used (unhealthy, priority > 0, or not a socket address)"
        ));
    }
    if weighted {
        cx.note("endpoint weights applied by repetition (up to 128)");
    }
    Ok(out)
}

pub(super) fn dns_endpoints(
    la: &ClusterLoadAssignment,
    cx: &mut Ctx<'_>,
) -> Result<Vec<SocketAddr>, Invalid> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for loc in &la.endpoints {
        for e in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err(cx.invalid("load_assignment", "a port_value is required"));
            };
            let port = u16::try_from(port)
                .map_err(|_| cx.invalid("load_assignment", "port out of range"))?;
            match (sa.address.as_str(), port).to_socket_addrs() {
                Ok(addrs) => out.extend(addrs),
                Err(e) => cx.note(format!("{} does not resolve: {e}", sa.address)),
            }
        }
    }
    Ok(out)
}
