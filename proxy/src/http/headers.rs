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

/// Removes hop-by-hop headers (and whatever `Connection` names), which never cross a proxy.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = tokens(h, &header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    let keep_te = h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !keep_te {
        h.remove(header::TE);
    }
}

/// Strips what a client must never set: hop-by-hop headers, XFCC, and proxy-internal headers
/// (`x-envoy-*`, `x-eastguard-*`).
pub(super) fn strip_request_headers(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    h.remove(&XFCC);
    let internal: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-envoy-") || k.as_str().starts_with("x-eastguard-"))
        .cloned()
        .collect();
    for k in internal {
        h.remove(k);
    }
}

pub(super) fn ensure_request_id(h: &mut HeaderMap, guard: &mut CallGuard) {
    if let Some(id) = header_str(h, &REQUEST_ID) {
        guard.record.request_id = Some(id.to_owned());
        return;
    }
    let id = uuid_v4();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(REQUEST_ID.clone(), v);
    }
    guard.record.request_id = Some(id);
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
    fn request_ids_are_v4_uuids() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_eq!(id.matches('-').count(), 4, "{id}");
        assert_ne!(id, uuid_v4());
    }
}
