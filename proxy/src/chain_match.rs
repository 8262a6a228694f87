//! Envoy's filter-chain selection: criteria are applied level by level — destination port,
//! destination address, server name, transport protocol, application protocol — and at each level
//! only the most specific chains that match go on to the next (an exact port before "any port", the
//! longest matching address prefix before "any address", an exact server name before the longest
//! matching `*.` wildcard before "any name", …). A connection that the most specific set cannot
//! take at a later level matches nothing: selection never falls back to a wider chain of an earlier
//! level (`listener_components.proto`, `FilterChainMatch`).
//!
//! One difference, by design: on an inbound listener a chain without `transport_protocol` takes
//! TLS only (mTLS is the default here); plaintext needs a `raw_buffer` chain.

use std::net::SocketAddr;

use crate::config::FilterChainMatch;

/// What is known about a connection when its chain is chosen.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// The local address, or the original destination on an `original_dst` listener.
    pub local: SocketAddr,
    pub sni: Option<&'a str>,
    /// `tls` or `raw_buffer`.
    pub transport: &'a str,
    /// Inbound: a chain without `transport_protocol` takes TLS only.
    pub inbound: bool,
    /// Negotiated ALPN (inbound) or sniffed protocol (outbound: `http/1.1`, `h2c`, `tcp`).
    pub protocol: Option<&'a str>,
}

/// The chains (by index, in config order) that the connection selects; empty when none does.
/// More than one only when their criteria are identical, and the caller picks among those.
pub fn select<'a, T>(
    chains: &'a [T],
    matcher: impl Fn(&T) -> &FilterChainMatch,
    conn: &Conn<'_>,
) -> Vec<&'a T> {
    let mut set: Vec<&T> = chains.iter().collect();
    // Destination port: exact, else unconstrained.
    set = narrow(set, |c| match matcher(c).destination_port {
        Some(p) if p == conn.local.port() => Some(1),
        Some(_) => None,
        None => Some(0),
    });
    // Destination address: the longest matching prefix, else unconstrained.
    let ip = conn.local.ip();
    set = narrow(set, |c| {
        let fcm = matcher(c);
        if fcm.prefix_ranges.is_empty() {
            return Some(0);
        }
        fcm.prefix_ranges
            .iter()
            .filter(|r| r.contains(ip))
            .map(|r| 1 + u32::from(r.prefix_len) + if r.address.is_ipv4() { 96 } else { 0 })
            .max()
    });
    // Server name: exact, else the longest `*.` suffix that matches, else unconstrained.
    set = narrow(set, |c| {
        let fcm = matcher(c);
        if fcm.server_names.is_empty() {
            return Some(0);
        }
        let sni = conn.sni?;
        fcm.server_names
            .iter()
            .filter_map(|n| {
                if n.eq_ignore_ascii_case(sni) {
                    Some(u32::MAX)
                } else {
                    let suffix = n.strip_prefix('*')?;
                    (suffix.starts_with('.')
                        && sni.len() > suffix.len()
                        && sni[sni.len() - suffix.len()..].eq_ignore_ascii_case(suffix))
                    .then(|| 1 + suffix.len() as u32)
                }
            })
            .max()
    });
    // Transport protocol: exact, else unconstrained (which is TLS only).
    set = narrow(set, |c| match matcher(c).transport_protocol.as_deref() {
        Some(t) if t == conn.transport => Some(1),
        Some(_) => None,
        None if conn.transport == "tls" || !conn.inbound => Some(0),
        None => None,
    });
    // Application protocol: listed, else unconstrained.
    narrow(set, |c| {
        let fcm = matcher(c);
        if fcm.application_protocols.is_empty() {
            return Some(0);
        }
        let p = conn.protocol?;
        fcm.application_protocols
            .iter()
            .any(|a| a == p)
            .then_some(1)
    })
}

/// Keeps the chains with the highest rank (`None`: does not match at this level).
fn narrow<T>(set: Vec<T>, rank: impl Fn(&T) -> Option<u32>) -> Vec<T> {
    let ranked: Vec<(Option<u32>, T)> = set.into_iter().map(|c| (rank(&c), c)).collect();
    let Some(best) = ranked.iter().filter_map(|(r, _)| *r).max() else {
        return Vec::new();
    };
    ranked
        .into_iter()
        .filter(|(r, _)| *r == Some(best))
        .map(|(_, c)| c)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CidrRange;

    fn fcm(
        port: Option<u16>,
        ranges: &[&str],
        names: &[&str],
        transport: Option<&str>,
        alpn: &[&str],
    ) -> FilterChainMatch {
        FilterChainMatch {
            destination_port: port,
            prefix_ranges: ranges
                .iter()
                .map(|r| {
                    let (a, l) = r.split_once('/').unwrap();
                    CidrRange {
                        address: a.parse().unwrap(),
                        prefix_len: l.parse().unwrap(),
                    }
                })
                .collect(),
            server_names: names.iter().map(|s| s.to_string()).collect(),
            transport_protocol: transport.map(Into::into),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn conn<'a>(
        local: &str,
        sni: Option<&'a str>,
        transport: &'a str,
        protocol: Option<&'a str>,
    ) -> Conn<'a> {
        Conn {
            local: local.parse().unwrap(),
            sni,
            transport,
            protocol,
            inbound: true,
        }
    }

    fn pick(chains: &[(&'static str, FilterChainMatch)], c: &Conn<'_>) -> Option<&'static str> {
        select(chains, |(_, m)| m, c).first().map(|(n, _)| *n)
    }

    #[test]
    fn envoy_filter_chain_match_table() {
        let chains = vec![
            (
                "port443-www",
                fcm(Some(443), &[], &["www.example.com"], None, &[]),
            ),
            ("any-port", fcm(None, &[], &[], None, &[])),
            ("port8080-h2", fcm(Some(8080), &[], &[], None, &["h2"])),
            ("port8080-any", fcm(Some(8080), &[], &[], None, &[])),
            (
                "port9000-net",
                fcm(Some(9000), &["10.0.0.0/8"], &[], None, &[]),
            ),
            (
                "port9000-host",
                fcm(Some(9000), &["10.1.2.3/32"], &[], None, &[]),
            ),
            (
                "port7000-wild",
                fcm(Some(7000), &[], &["*.example.com"], None, &[]),
            ),
            (
                "port7000-wilder",
                fcm(Some(7000), &[], &["*.svc.example.com"], None, &[]),
            ),
            (
                "port6000-raw",
                fcm(Some(6000), &[], &[], Some("raw_buffer"), &[]),
            ),
        ];
        let cases: &[(Conn<'_>, Option<&str>)] = &[
            // Envoy's own example: the port-443 chains are chosen, and none takes another name:
            // no fallback to the chain without a port.
            (
                conn("10.0.0.1:443", Some("www.example.com"), "tls", None),
                Some("port443-www"),
            ),
            (
                conn("10.0.0.1:443", Some("www.another.com"), "tls", None),
                None,
            ),
            (conn("10.0.0.1:443", None, "tls", None), None),
            (
                conn("10.0.0.1:444", Some("www.another.com"), "tls", None),
                Some("any-port"),
            ),
            // Application protocol: listed first, else the unconstrained chain of the same port.
            (
                conn("10.0.0.1:8080", None, "tls", Some("h2")),
                Some("port8080-h2"),
            ),
            (
                conn("10.0.0.1:8080", None, "tls", Some("http/1.1")),
                Some("port8080-any"),
            ),
            // Address: the longest prefix; outside every range of the port → nothing.
            (
                conn("10.1.2.3:9000", None, "tls", None),
                Some("port9000-host"),
            ),
            (
                conn("10.9.9.9:9000", None, "tls", None),
                Some("port9000-net"),
            ),
            (conn("192.168.0.1:9000", None, "tls", None), None),
            // Server names: the longest wildcard suffix; a bare suffix does not match.
            (
                conn("10.0.0.1:7000", Some("a.svc.example.com"), "tls", None),
                Some("port7000-wilder"),
            ),
            (
                conn("10.0.0.1:7000", Some("a.example.com"), "tls", None),
                Some("port7000-wild"),
            ),
            (
                conn("10.0.0.1:7000", Some("example.com"), "tls", None),
                None,
            ),
            // Transport: plaintext only on raw_buffer chains; TLS never on them.
            (
                conn("10.0.0.1:6000", None, "raw_buffer", None),
                Some("port6000-raw"),
            ),
            (conn("10.0.0.1:6000", None, "tls", None), None),
            (conn("10.0.0.1:8080", None, "raw_buffer", None), None),
        ];
        for (c, want) in cases {
            assert_eq!(pick(&chains, c), *want, "{c:?}");
        }
        // Outbound (the app's plaintext): unconstrained chains take it.
        let outbound = Conn {
            inbound: false,
            ..conn("10.0.0.1:8080", None, "raw_buffer", Some("http/1.1"))
        };
        assert_eq!(pick(&chains, &outbound), Some("port8080-any"));
    }
}
