//! The one normalized view of a request path (DESIGN §7), used by routing, RBAC and apisec.
//!
//! Steps, in Envoy's order with Istio's `DECODE_AND_MERGE_SLASHES`: drop the fragment; split off the
//! query; percent-decode unreserved characters and escaped slashes (`%2F`, `%5C`); turn `\` into `/`;
//! merge repeated slashes; remove `.` and `..` segments (RFC 3986 §5.2.4). Other escapes stay
//! encoded (uppercased). A path that cannot be normalized safely (NUL, bad escapes, not starting
//! with `/`) is an error: the request is refused, never passed through.

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("path has a malformed percent-escape")]
    BadEscape,
    #[error("path has a control character")]
    ControlChar,
}

/// A normalized path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// The normalized path, no query, no fragment.
    pub path: String,
    /// The query, without '?', as received.
    pub query: Option<String>,
}

impl NormalizedPath {
    /// The path and query to forward upstream.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    /// The path with `;parameters` removed from every segment: how many servers (Tomcat, Jetty)
    /// read `/admin;x=y`. Policy matching considers this view too (see `eval`).
    pub fn without_params(&self) -> Option<String> {
        self.path.contains(';').then(|| strip_params(&self.path))
    }
}

/// Normalizes a request target's path (`origin-form`: `/a/b?q#f`).
pub fn normalize(target: &str) -> Result<NormalizedPath, PathError> {
    let target = target.split('#').next().unwrap_or("");
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    if !raw_path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode(raw_path)?;
    Ok(NormalizedPath {
        path: merge_and_resolve(&decoded),
        query,
    })
}

/// Percent-decodes unreserved characters and `/` `\`; keeps other escapes (uppercased).
fn decode(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x20 || b == 0x7f {
            return Err(PathError::ControlChar);
        }
        if b >= 0x80 {
            // A URI is ASCII: raw non-ASCII bytes are percent-encoded, as their escape would be.
            out.push_str(&format!("%{b:02X}"));
            i += 1;
            continue;
        }
        if b != b'%' {
            out.push(if b == b'\\' { '/' } else { b as char });
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
        let v = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or(PathError::BadEscape)?;
        match v {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(v as char)
            }
            b'/' | b'\\' => out.push('/'),
            0x00..=0x1f | 0x7f => return Err(PathError::ControlChar),
            _ => {
                out.push('%');
                out.push_str(&format!("{v:02X}"));
            }
        }
        i += 3;
    }
    Ok(out)
}

/// Merges repeated slashes and removes dot segments; keeps a trailing slash.
fn merge_and_resolve(path: &str) -> String {
    let mut stack: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate().skip(1) {
        match *seg {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                stack.pop();
                trailing_slash = i == last;
            }
            s => {
                stack.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &stack {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

/// How many times a lenient backend might decode a path (`%25252F` is three).
const MAX_DECODES: usize = 4;

/// The other ways a lenient backend may read a normalized path, for DENY rules, which must hold
/// under every reading (ALLOW keeps the normalized path alone): escapes decoded again up to a
/// fixed point (`%2561dmin` → `admin`, `%252e%252e` → `..`), a `?` or `#` that decoding reveals
/// ending the path, a `;` that decoding reveals starting parameters, `;parameters` dropped, trailing
/// dots and spaces dropped from each segment (Windows servers), and the path lowercased
/// (case-insensitive servers). Each reading is normalized again; the normalized path itself is
/// not repeated. Empty for the common path that no backend reads two ways.
pub fn lenient_readings(path: &str) -> Vec<String> {
    let trailing_dot = path.contains("./") || path.ends_with('.');
    if !trailing_dot
        && !path
            .bytes()
            .any(|b| b == b'%' || b == b';' || b.is_ascii_uppercase())
    {
        return Vec::new();
    }
    let mut bases = vec![path.to_owned()];
    let mut current = path.to_owned();
    for _ in 0..MAX_DECODES {
        let decoded = decode_all(&current);
        if decoded == current {
            break;
        }
        let cut = decoded.split(['?', '#']).next().unwrap_or("");
        let mut reading = merge_and_resolve(&cut.replace('\\', "/"));
        if !reading.starts_with('/') {
            reading.insert(0, '/');
        }
        bases.push(reading);
        current = decoded;
    }
    let mut out = std::collections::BTreeSet::new();
    for base in bases {
        let without_params = strip_params(&base);
        for a in [base, without_params] {
            let trimmed = trim_segments(&a);
            for b in [a, trimmed] {
                let lower = b.to_ascii_lowercase();
                out.insert(b);
                out.insert(lower);
            }
        }
    }
    out.remove(path);
    out.into_iter().collect()
}

/// Whether backends may read this request's path differently in more than letter case: an
/// escaped slash or backslash, a raw backslash, or a normalized path with readings beyond case
/// folding (escapes that decode again, `;parameters`, trailing dots or spaces). A listener set to
/// refuse ambiguous paths (Envoy's `REJECT_REQUEST`) answers these 400.
pub fn ambiguous(raw_path: &str, normalized: &str) -> bool {
    let raw = raw_path.split(['?', '#']).next().unwrap_or("");
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || raw.contains('\\') {
        return true;
    }
    let folded = normalized.to_ascii_lowercase();
    lenient_readings(normalized)
        .iter()
        .any(|r| r.to_ascii_lowercase() != folded)
}

/// Every percent-escape decoded (bytes that are not UTF-8 read as U+FFFD).
fn decode_all(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn strip_params(path: &str) -> String {
    if !path.contains(';') {
        return path.to_owned();
    }
    let stripped: Vec<&str> = path
        .split('/')
        .map(|s| s.split(';').next().unwrap_or(""))
        .collect();
    merge_and_resolve(&stripped.join("/"))
}

/// Trailing dots and spaces (and their escapes) dropped from every segment.
fn trim_segments(path: &str) -> String {
    let trimmed: Vec<String> = path
        .split('/')
        .map(|seg| {
            if seg == "." || seg == ".." {
                return seg.to_owned();
            }
            let mut s = seg;
            loop {
                let next = s
                    .trim_end_matches(['.', ' '])
                    .trim_end_matches("%20")
                    .trim_end_matches("%2E")
                    .trim_end_matches("%2e");
                if next.len() == s.len() {
                    break;
                }
                s = next;
            }
            s.to_owned()
        })
        .collect();
    merge_and_resolve(&trimmed.join("/"))
}

/// Authority as matched by routing and policy: lowercase, no trailing dot on the host.
pub fn normalize_authority(authority: &str) -> String {
    // Split before lowercasing (neither the brackets, the colon nor the digits change with
    // case), so one string is built.
    let (host, port) = split_port(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    let mut out = String::with_capacity(authority.len());
    out.push_str(host);
    out.make_ascii_lowercase();
    if let Some(p) = port {
        out.push(':');
        out.push_str(p);
    }
    out
}

fn split_port(a: &str) -> (&str, Option<&str>) {
    if a.starts_with('[') {
        return match a.rfind("]:") {
            Some(i) => (&a[..=i], Some(&a[i + 2..])),
            None => (a, None),
        };
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (a, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).unwrap().path
    }

    #[test]
    fn bypass_shapes_normalize_to_the_plain_path() {
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/admin/./x"), "/admin/x");
        assert_eq!(n("//admin"), "/admin");
        assert_eq!(n("/%61dmin"), "/admin");
        assert_eq!(n("/admin%2Fx"), "/admin/x");
        assert_eq!(n("/admin%2fx"), "/admin/x");
        assert_eq!(n("/admin%5Cx"), "/admin/x");
        assert_eq!(n("/admin\\x"), "/admin/x");
        assert_eq!(n("/admin#x"), "/admin");
        assert_eq!(n("/admin?x"), "/admin");
        assert_eq!(n("/a/b/../../../admin"), "/admin");
        assert_eq!(n("/%2e%2e/admin"), "/admin");
        assert_eq!(n("/admin/"), "/admin/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(n("/a%c3%a9"), "/a%C3%A9");
        assert_eq!(n("/aé"), "/a%C3%A9");
    }

    #[test]
    fn path_params_view() {
        let p = normalize("/admin;x=y").unwrap();
        assert_eq!(p.path, "/admin;x=y");
        assert_eq!(p.without_params().as_deref(), Some("/admin"));
        let p = normalize("/public;a/..;b/admin").unwrap();
        assert_eq!(p.without_params().as_deref(), Some("/admin"));
    }

    #[test]
    fn refusals() {
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%00"), Err(PathError::ControlChar));
        assert_eq!(normalize("/a\u{0}"), Err(PathError::ControlChar));
    }

    #[test]
    fn idempotent() {
        for p in [
            "/public/../admin",
            "/a//b/./c/..",
            "/%61%2F%2e%2e/x;y/../z",
            "/x/%41%2541",
        ] {
            let once = normalize(p).unwrap().path;
            assert_eq!(normalize(&once).unwrap().path, once, "{p}");
        }
    }

    #[test]
    fn lenient_readings_cover_what_lenient_backends_do() {
        let r = |p: &str| lenient_readings(&n(p));
        for (raw, reading) in [
            ("/ADMIN", "/admin"),
            ("/Admin/keys", "/admin/keys"),
            ("/%2561dmin", "/admin"),
            ("/%252e%252e/admin", "/admin"),
            ("/x/%252E%252E/admin", "/admin"),
            ("/admin%3Fx=1", "/admin"),
            ("/admin%23frag", "/admin"),
            ("/admin%3Bjsessionid=1", "/admin"),
            ("/admin;x=1/keys", "/admin/keys"),
            ("/admin./keys", "/admin/keys"),
            ("/admin%20/keys", "/admin/keys"),
            ("/admin...", "/admin"),
            ("/%2541dmin.", "/admin"),
        ] {
            assert!(r(raw).contains(&reading.to_owned()), "{raw}: {:?}", r(raw));
        }
        assert!(r("/plain/path").is_empty());
        assert!(r("/x").is_empty());
        // Bounded, whatever the input.
        let nasty = format!("/{}", "%2525252541.;A/".repeat(200));
        assert!(lenient_readings(&nasty).len() <= 40);
    }

    #[test]
    fn ambiguity_is_more_than_case() {
        let amb = |raw: &str| ambiguous(raw, &n(raw));
        for raw in [
            "/admin%2Fx",
            "/a%5cb",
            "/a\\b",
            "/%2561dmin",
            "/admin;x=1",
            "/admin./x",
            "/admin%20",
        ] {
            assert!(amb(raw), "{raw}");
        }
        for raw in [
            "/ADMIN",
            "/orders/ABC-12",
            "/index.html",
            "/v1.2/x",
            "/a?b=%2F",
            "/%61dmin",
        ] {
            assert!(!amb(raw), "{raw}");
        }
    }

    #[test]
    fn authority() {
        assert_eq!(normalize_authority("ADMIN.Internal."), "admin.internal");
        assert_eq!(
            normalize_authority("Admin.internal.:8080"),
            "admin.internal:8080"
        );
        assert_eq!(normalize_authority("[::1]:80"), "[::1]:80");
    }
}
