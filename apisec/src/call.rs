//! One observed call, and the auth scheme a request carried.

use std::time::Duration;

/// An inbound call as the sidecar saw it, after routing and policy. Borrowed: observing allocates
/// only when the call opens a new row.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The service the call was for (the routed cluster's service, or the authority).
    pub service: &'a str,
    pub method: &'a str,
    /// The normalized path, no query.
    pub path: &'a str,
    pub status: u16,
    /// The verified peer SPIFFE ID; `None` for a plaintext caller.
    pub caller: Option<&'a str>,
    /// Whether RBAC allowed the call (a denied call is observed too: it says who tried).
    pub allowed: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub latency: Duration,
    /// `content-type` of the request and the response, parameters dropped.
    pub request_type: Option<&'a str>,
    pub response_type: Option<&'a str>,
    pub auth: AuthScheme,
    /// A gRPC call: its path is `/package.Service/Method`, never templated.
    pub grpc: bool,
}

/// How a request authenticated itself at the application layer, by scheme only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthScheme {
    None,
    Basic,
    /// `Authorization: Bearer` with a JWT (three base64url parts).
    BearerJwt,
    /// `Authorization: Bearer` with an opaque token.
    Bearer,
    /// Another `Authorization` scheme (Digest, Negotiate, AWS4-HMAC-SHA256 …).
    OtherAuthorization,
    /// An API-key header (`x-api-key`, `api-key`, `x-auth-token`, `apikey`, `x-access-token`).
    ApiKey,
    Cookie,
}

/// Headers that carry an API key by convention.
const API_KEY_HEADERS: &[&str] = &[
    "x-api-key",
    "api-key",
    "apikey",
    "x-auth-token",
    "x-access-token",
];

impl AuthScheme {
    /// The scheme of a request from its headers (lowercase names). The value is read only to tell
    /// the scheme; nothing of it is kept.
    pub fn detect<'h>(headers: impl IntoIterator<Item = (&'h str, &'h [u8])>) -> Self {
        let mut best = AuthScheme::None;
        for (name, value) in headers {
            let found = match name {
                "authorization" => Self::of_authorization(value),
                "cookie" => AuthScheme::Cookie,
                n if API_KEY_HEADERS.contains(&n) => AuthScheme::ApiKey,
                _ => continue,
            };
            // Authorization says most; an API key next; a cookie last.
            if rank(found) > rank(best) {
                best = found;
            }
        }
        best
    }

    fn of_authorization(value: &[u8]) -> Self {
        let value = value.trim_ascii();
        let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
            Some(i) => (&value[..i], value[i + 1..].trim_ascii()),
            None => (value, &b""[..]),
        };
        if scheme.eq_ignore_ascii_case(b"basic") {
            AuthScheme::Basic
        } else if scheme.eq_ignore_ascii_case(b"bearer") {
            if is_jwt(rest) {
                AuthScheme::BearerJwt
            } else {
                AuthScheme::Bearer
            }
        } else {
            AuthScheme::OtherAuthorization
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthScheme::None => "none",
            AuthScheme::Basic => "basic",
            AuthScheme::BearerJwt => "bearer-jwt",
            AuthScheme::Bearer => "bearer",
            AuthScheme::OtherAuthorization => "authorization",
            AuthScheme::ApiKey => "api-key",
            AuthScheme::Cookie => "cookie",
        }
    }

    /// The scheme [`Self::as_str`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            AuthScheme::None,
            AuthScheme::Basic,
            AuthScheme::BearerJwt,
            AuthScheme::Bearer,
            AuthScheme::OtherAuthorization,
            AuthScheme::ApiKey,
            AuthScheme::Cookie,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// A bit per scheme, for a set of them in one byte.
    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub(crate) const ALL: [AuthScheme; 7] = [
        AuthScheme::None,
        AuthScheme::Basic,
        AuthScheme::BearerJwt,
        AuthScheme::Bearer,
        AuthScheme::OtherAuthorization,
        AuthScheme::ApiKey,
        AuthScheme::Cookie,
    ];
}

fn rank(s: AuthScheme) -> u8 {
    match s {
        AuthScheme::None => 0,
        AuthScheme::Cookie => 1,
        AuthScheme::ApiKey => 2,
        AuthScheme::OtherAuthorization => 3,
        AuthScheme::Bearer | AuthScheme::Basic => 4,
        AuthScheme::BearerJwt => 5,
    }
}

/// Three non-empty base64url parts, the first a JSON object header (`eyJ`).
fn is_jwt(token: &[u8]) -> bool {
    let mut parts = 0;
    for part in token.split(|b| *b == b'.') {
        if part.is_empty()
            || !part
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return false;
        }
        parts += 1;
    }
    parts == 3 && token.starts_with(b"eyJ")
}

/// `type/subtype` of a content type, lowercase, parameters dropped; `None` if it is not one.
pub fn media_type(value: &[u8]) -> Option<String> {
    let main = value.split(|b| *b == b';').next()?.trim_ascii();
    let ok = !main.is_empty()
        && main.len() <= 100
        && main.iter().filter(|b| **b == b'/').count() == 1
        && main
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"/.+-_".contains(b));
    ok.then(|| String::from_utf8_lossy(main).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(h: &[(&str, &str)]) -> AuthScheme {
        AuthScheme::detect(h.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    #[test]
    fn schemes_are_told_apart_without_keeping_values() {
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        assert_eq!(detect(&[]), AuthScheme::None);
        assert_eq!(
            detect(&[("authorization", "Basic dXNlcjpwYXNz")]),
            AuthScheme::Basic
        );
        assert_eq!(
            detect(&[("authorization", &format!("Bearer {jwt}"))]),
            AuthScheme::BearerJwt
        );
        assert_eq!(
            detect(&[("authorization", "bearer opaque-token-1")]),
            AuthScheme::Bearer
        );
        assert_eq!(
            detect(&[("authorization", "Bearer a.b")]),
            AuthScheme::Bearer
        );
        assert_eq!(
            detect(&[("authorization", "Digest username=x")]),
            AuthScheme::OtherAuthorization
        );
        assert_eq!(detect(&[("x-api-key", "k")]), AuthScheme::ApiKey);
        assert_eq!(detect(&[("cookie", "session=1")]), AuthScheme::Cookie);
        // The strongest statement wins, whatever the order.
        assert_eq!(
            detect(&[
                ("cookie", "s=1"),
                ("authorization", &format!("Bearer {jwt}"))
            ]),
            AuthScheme::BearerJwt
        );
        assert_eq!(
            detect(&[("x-api-key", "k"), ("cookie", "s")]),
            AuthScheme::ApiKey
        );
    }

    #[test]
    fn media_types_drop_parameters() {
        assert_eq!(
            media_type(b"Application/JSON; charset=utf-8").as_deref(),
            Some("application/json")
        );
        assert_eq!(
            media_type(b"application/grpc+proto").as_deref(),
            Some("application/grpc+proto")
        );
        assert_eq!(media_type(b"nonsense"), None);
        assert_eq!(media_type(b"a/b/c"), None);
        assert_eq!(media_type(b""), None);
    }
}
