//! Headers a proxy owns: hop-by-hop headers, what a client must never set (XFCC, `x-envoy-*`,
//! `x-eastguard-*`), the request ID, and XFCC from the verified peer.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::{ConnCtx, header_str};
use crate::telemetry::CallGuard;

pub(super) static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub(super) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The comma-separated tokens of every value of a header, as bytes (a value need not be UTF-8).
pub(super) fn tokens<'a>(
    h: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    h.get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a header is hop-by-hop by name (besides what `Connection` names).
fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TRAILER
        || name == header::TE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes hop-by-hop headers (and whatever `Connection` names), which never cross a proxy.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip(h, |_| false);
}

/// Strips what a client must never set: hop-by-hop headers, XFCC, and proxy-internal headers
/// (`x-envoy-*`, `x-eastguard-*`).
pub(super) fn strip_request_headers(h: &mut HeaderMap) {
    strip(h, |k| {
        k == XFCC || k.as_str().starts_with("x-envoy-") || k.as_str().starts_with("x-eastguard-")
    });
}

/// Removes the hop-by-hop headers and those `also` picks, finding them in one pass over the
/// names (a request usually has none to remove, so nothing is looked up or allocated).
fn strip(h: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    let keep_te = || {
        h.get_all(header::TE).iter().count() == 1
            && h.get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    };
    let mut drop: Vec<HeaderName> = h
        .keys()
        .filter(|k| (hop_by_hop(k) && !(*k == header::TE && keep_te())) || also(k))
        .cloned()
        .collect();
    drop.extend(tokens(h, &header::CONNECTION).filter_map(|t| HeaderName::from_bytes(t).ok()));
    for n in drop {
        h.remove(n);
    }
}

pub(super) fn ensure_request_id(h: &mut HeaderMap, guard: &mut CallGuard) {
    if let Some(id) = header_str(h, &REQUEST_ID) {
        guard.record.request_id = Some(id.to_owned());
    } else {
        let id = uuid_v4();
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert(REQUEST_ID.clone(), v);
        }
        guard.record.request_id = Some(id);
    }
    // One value per request: HPACK would only evict reusable entries to index it.
    if let Some(v) = h.get_mut(&REQUEST_ID) {
        v.set_sensitive(true);
    }
}

/// A random RFC 4122 version-4 UUID (the bytes from the system's random source, batched per
/// thread by `rng`; the `uuid` crate sets the version and variant bits and writes it).
fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    // Request IDs are for correlation, not security: a failed RNG call still gives a usable ID.
    let _ = crate::rng::fill(&mut b);
    uuid::Builder::from_random_bytes(b)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// Envoy's XFCC for SANITIZE_SET with Hash, Subject and URI: the verified peer, nothing the client said.
pub(super) fn xfcc_value(ctx: &ConnCtx) -> Option<HeaderValue> {
    let peer = ctx.peer_id.as_deref()?;
    let hash = ctx.peer_cert_hash.as_deref().unwrap_or_default();
    HeaderValue::from_str(&format!(
        "By={};Hash={hash};Subject=\"\";URI={peer}",
        ctx.local_id
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_internal_and_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            (
                "x-forwarded-client-cert",
                "By=spiffe://evil/x;URI=spiffe://cluster.local/ns/a/sa/admin",
            ),
            ("x-envoy-original-path", "/admin"),
            ("x-eastguard-source-workload", "admin"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("x-ok", "yes"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_request_headers(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-ok"]);
    }

    #[test]
    fn te_trailers_alone_crosses_and_hop_by_hop_headers_go_in_any_case() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            h
        };
        let mut h = headers(&[
            ("te", "Trailers"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("trailer", "grpc-status"),
            ("content-type", "application/grpc"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["te", "content-type"]);
        // A second TE value is not `trailers`: none of them crosses.
        let mut h = headers(&[("te", "trailers"), ("te", "gzip"), ("x-ok", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-ok"]);
        // What Connection names goes, even a header the proxy would otherwise keep.
        let mut h = headers(&[("connection", "x-ok"), ("x-ok", "1"), ("x-keep", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
    }

    #[test]
    fn request_ids_are_never_indexed_by_hpack() {
        let id = "0b4a3c1e-1111-4222-8333-444455556666";
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID.clone(), HeaderValue::from_static(id));
        let t = crate::telemetry::tests::telemetry(10);
        let mut g = t.start(crate::telemetry::Reporter::Source, "spiffe://td/x".into());
        ensure_request_id(&mut h, &mut g);
        assert!(h.get(&REQUEST_ID).unwrap().is_sensitive());
        assert_eq!(g.record.request_id.as_deref(), Some(id));
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h, &mut g);
        assert!(h.get(&REQUEST_ID).unwrap().is_sensitive());
    }

    #[test]
    fn request_ids_are_v4_uuids() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_eq!(id.matches('-').count(), 4, "{id}");
        assert_ne!(id, uuid_v4());
    }
}
