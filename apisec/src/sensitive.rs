//! Sensitive-data classification of a call's sampled copy: JSON bodies (by JSON pointer), form
//! bodies and query strings (by key), and headers (by name).
//!
//! Types: email, phone (E.164), US SSN, payment card (Luhn-checked, known issuer ranges), IBAN
//! (length per country, mod-97), JWT (its header decodes to JSON with `alg`), AWS access key IDs,
//! PEM private keys (GCP service-account JSON carries one), IPv4/IPv6 addresses — plus custom
//! types from config (a key regex and/or a value regex). Position-aware: JWTs and IP addresses
//! count only in responses (a request carrying its own token or a client IP says nothing).
//!
//! A finding is (type, location, count) — **never the value**. Everything is bounded: bytes looked
//! at, JSON depth, strings per body, findings per call; what is past a bound or cannot be read
//! (not UTF-8, compressed, malformed) is counted as unclassified, never an error.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Serialize;

/// Where in a call a value was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Request,
    Response,
}

/// What a value is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    Email,
    Phone,
    UsSsn,
    PaymentCard,
    Iban,
    Jwt,
    AwsAccessKey,
    PrivateKey,
    IpAddress,
    /// A type from config, by name.
    Custom(String),
}

impl DataType {
    pub fn name(&self) -> &str {
        match self {
            DataType::Email => "email",
            DataType::Phone => "phone",
            DataType::UsSsn => "us_ssn",
            DataType::PaymentCard => "payment_card",
            DataType::Iban => "iban",
            DataType::Jwt => "jwt",
            DataType::AwsAccessKey => "aws_access_key",
            DataType::PrivateKey => "private_key",
            DataType::IpAddress => "ip_address",
            DataType::Custom(n) => n,
        }
    }
}

/// A custom type: values whose key matches `key` (if set) and whose text matches `value` (if set).
#[derive(Debug, Clone)]
pub struct CustomType {
    pub name: String,
    pub key: Option<regex::Regex>,
    pub value: Option<regex::Regex>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of a body looked at.
    pub body_bytes: usize,
    /// JSON nesting looked into.
    pub depth: usize,
    /// Strings (JSON values, form/query values, headers) looked at per body.
    pub strings: usize,
    /// Distinct (type, location) findings kept per call.
    pub findings: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 64 * 1024,
            depth: 32,
            strings: 4096,
            findings: 64,
        }
    }
}

/// One kind of value at one place.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub data_type: DataType,
    pub direction: Direction,
    /// `body:/user/email` (JSON pointer), `body:card` (form key), `query:ssn`, `header:x-api-key`.
    pub location: String,
    pub count: u32,
}

/// What a classification found, and what it could not look at.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Bodies (or parts) not classified: too large, not UTF-8, compressed, malformed, too deep.
    pub unclassified: u32,
}

/// The classifier, with its custom types and bounds.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    pub custom: Vec<CustomType>,
    pub limits: Limits,
}

/// What one call's sampled copy holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample<'a> {
    /// The raw query string (no `?`).
    pub query: Option<&'a str>,
    pub request_headers: &'a [(&'a str, &'a [u8])],
    pub request_body: Option<Body<'a>>,
    pub response_headers: &'a [(&'a str, &'a [u8])],
    pub response_body: Option<Body<'a>>,
}

/// A sampled body: its bytes (possibly truncated), media type and content encoding.
#[derive(Debug, Clone, Copy)]
pub struct Body<'a> {
    pub bytes: &'a [u8],
    pub media_type: Option<&'a str>,
    /// `content-encoding` other than identity: not looked into.
    pub encoded: bool,
    /// The copy stopped short of the whole body.
    pub truncated: bool,
}

struct Acc<'c> {
    classifier: &'c Classifier,
    found: BTreeMap<(DataType, Direction, String), u32>,
    strings: usize,
    unclassified: u32,
}

impl Acc<'_> {
    fn add(&mut self, t: DataType, d: Direction, location: &str) {
        let key = (t, d, location.to_owned());
        if let Some(n) = self.found.get_mut(&key) {
            *n = n.saturating_add(1);
        } else if self.found.len() < self.classifier.limits.findings {
            self.found.insert(key, 1);
        }
    }

    /// Classifies one string value at `location` (its key, if any, for custom types).
    fn value(&mut self, key: Option<&str>, text: &str, d: Direction, location: &str) {
        self.strings += 1;
        if self.strings > self.classifier.limits.strings {
            return;
        }
        for t in builtin(text) {
            if matches!(t, DataType::Jwt | DataType::IpAddress) && d == Direction::Request {
                continue;
            }
            self.add(t, d, location);
        }
        for c in &self.classifier.custom {
            let key_ok = c
                .key
                .as_ref()
                .is_none_or(|k| key.is_some_and(|key| k.is_match(key)));
            let value_ok = c.value.as_ref().is_none_or(|v| v.is_match(text));
            if key_ok && value_ok && (c.key.is_some() || c.value.is_some()) {
                self.add(DataType::Custom(c.name.clone()), d, location);
            }
        }
    }

    fn json(&mut self, v: &serde_json::Value, pointer: &mut String, depth: usize, d: Direction) {
        if depth > self.classifier.limits.depth {
            self.unclassified += 1;
            return;
        }
        match v {
            serde_json::Value::String(s) => {
                let key = pointer.rsplit('/').next().map(str::to_owned);
                let loc = format!("body:{pointer}");
                self.value(key.as_deref(), s, d, &loc);
            }
            serde_json::Value::Number(n) => {
                // Card numbers and phone numbers are sent as numbers too.
                let key = pointer.rsplit('/').next().map(str::to_owned);
                let loc = format!("body:{pointer}");
                self.value(key.as_deref(), &n.to_string(), d, &loc);
            }
            serde_json::Value::Array(a) => {
                // Arrays are one place: `/items/*/email` counts every element.
                let len = pointer.len();
                pointer.push_str("/*");
                for x in a {
                    self.json(x, pointer, depth + 1, d);
                }
                pointer.truncate(len);
            }
            serde_json::Value::Object(o) => {
                for (k, x) in o {
                    let len = pointer.len();
                    pointer.push('/');
                    // JSON pointer escaping (RFC 6901).
                    pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    self.json(x, pointer, depth + 1, d);
                    pointer.truncate(len);
                }
            }
            _ => {}
        }
    }

    fn pairs(&mut self, text: &str, prefix: &str, d: Direction) {
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (form_decode(k), form_decode(v)) else {
                self.unclassified += 1;
                continue;
            };
            let loc = format!("{prefix}:{k}");
            self.value(Some(&k), &v, d, &loc);
        }
    }

    fn body(&mut self, b: &Body<'_>, d: Direction) {
        if b.encoded {
            self.unclassified += 1;
            return;
        }
        let bytes = &b.bytes[..b.bytes.len().min(self.classifier.limits.body_bytes)];
        let cut = b.truncated || bytes.len() < b.bytes.len();
        let media = b.media_type.unwrap_or("");
        if media == "application/json" || media.ends_with("+json") {
            // A cut JSON document does not parse: its text is scanned instead.
            match serde_json::from_slice::<serde_json::Value>(bytes) {
                Ok(v) if !cut => {
                    let mut p = String::new();
                    self.json(&v, &mut p, 0, d);
                    return;
                }
                _ => self.unclassified += 1,
            }
        }
        let Ok(text) = std::str::from_utf8(bytes).or_else(|e| {
            // A copy cut in the middle of a character is still text up to there.
            std::str::from_utf8(&bytes[..e.valid_up_to()]).map_err(|_| e)
        }) else {
            self.unclassified += 1;
            return;
        };
        if text.len() < bytes.len().saturating_sub(3) {
            self.unclassified += 1;
            return;
        }
        if media == "application/x-www-form-urlencoded" {
            self.pairs(text, "body", d);
            return;
        }
        // Any other text: scanned token by token.
        for token in text
            .split(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';' | '<' | '>' | '(' | ')')
            })
            .filter(|t| !t.is_empty())
        {
            self.value(None, token, d, "body");
        }
        if text.contains("PRIVATE KEY-----") {
            self.add(DataType::PrivateKey, d, "body");
        }
    }
}

/// `application/x-www-form-urlencoded` decoding (`%XX`, `+`); `None` if malformed or not UTF-8.
pub fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

impl Classifier {
    pub fn classify(&self, s: &Sample<'_>) -> Report {
        let mut acc = Acc {
            classifier: self,
            found: BTreeMap::new(),
            strings: 0,
            unclassified: 0,
        };
        if let Some(q) = s.query {
            acc.pairs(q, "query", Direction::Request);
        }
        for (headers, d) in [
            (s.request_headers, Direction::Request),
            (s.response_headers, Direction::Response),
        ] {
            for (name, value) in headers {
                // Credentials the request carries are the auth scheme's business (by scheme only).
                if matches!(
                    *name,
                    "authorization" | "cookie" | "set-cookie" | "proxy-authorization"
                ) {
                    continue;
                }
                if let Ok(v) = std::str::from_utf8(value) {
                    acc.value(Some(name), v, d, &format!("header:{name}"));
                }
            }
        }
        if let Some(b) = &s.request_body {
            acc.body(b, Direction::Request);
        }
        if let Some(b) = &s.response_body {
            acc.body(b, Direction::Response);
        }
        Report {
            findings: acc
                .found
                .into_iter()
                .map(|((data_type, direction, location), count)| Finding {
                    data_type,
                    direction,
                    location,
                    count,
                })
                .collect(),
            unclassified: acc.unclassified,
        }
    }
}

/// The built-in types one string value is (usually none; a value is one thing).
pub fn builtin(text: &str) -> Vec<DataType> {
    let t = text.trim();
    if t.len() < 6 || t.len() > 8192 {
        return Vec::new();
    }
    let mut out = Vec::new();
    if t.contains("-----BEGIN") && t.contains("PRIVATE KEY-----") {
        out.push(DataType::PrivateKey);
        return out;
    }
    if is_jwt(t) {
        out.push(DataType::Jwt);
    } else if is_email(t) {
        out.push(DataType::Email);
    } else if is_aws_key(t) {
        out.push(DataType::AwsAccessKey);
    } else if is_iban(t) {
        out.push(DataType::Iban);
    } else if is_card(t) {
        out.push(DataType::PaymentCard);
    } else if is_ssn(t) {
        out.push(DataType::UsSsn);
    } else if is_phone(t) {
        out.push(DataType::Phone);
    } else if is_ip(t) {
        out.push(DataType::IpAddress);
    }
    out
}

fn is_email(t: &str) -> bool {
    let Some((user, domain)) = t.split_once('@') else {
        return false;
    };
    let user_ok = !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._%+-'".contains(&c))
        && !user.starts_with('.')
        && !user.ends_with('.');
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.bytes().all(|c| c.is_ascii_alphabetic()));
    user_ok && domain_ok
}

/// E.164: `+`, country code not starting with 0, 8–15 digits in all; spaces, dashes, dots and
/// parentheses between digit groups allowed.
fn is_phone(t: &str) -> bool {
    let Some(rest) = t.strip_prefix('+') else {
        return false;
    };
    if !rest
        .bytes()
        .all(|c| c.is_ascii_digit() || b" -.()".contains(&c))
    {
        return false;
    }
    let digits: Vec<u8> = rest.bytes().filter(u8::is_ascii_digit).collect();
    (8..=15).contains(&digits.len()) && digits[0] != b'0'
}

/// `AAA-GG-SSSS` with the SSA's rules: area not 000, 666 or 9xx; group not 00; serial not 0000.
fn is_ssn(t: &str) -> bool {
    let b = t.as_bytes();
    if b.len() != 11 || b[3] != b'-' || b[6] != b'-' {
        return false;
    }
    let (area, group, serial) = (&t[..3], &t[4..6], &t[7..]);
    let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    digits(area)
        && digits(group)
        && digits(serial)
        && area != "000"
        && area != "666"
        && !area.starts_with('9')
        && group != "00"
        && serial != "0000"
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// 13–19 digits (groups separated by single spaces or dashes), Luhn-valid, in an issuer range
/// (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro).
fn is_card(t: &str) -> bool {
    let b = t.as_bytes();
    if !b
        .iter()
        .all(|c| c.is_ascii_digit() || *c == b' ' || *c == b'-')
    {
        return false;
    }
    if !b[0].is_ascii_digit()
        || !b[b.len() - 1].is_ascii_digit()
        || t.contains("  ")
        || t.contains("--")
    {
        return false;
    }
    let digits: Vec<u8> = b.iter().copied().filter(u8::is_ascii_digit).collect();
    if !(13..=19).contains(&digits.len()) || !luhn(&digits) {
        return false;
    }
    // A run of one digit is a placeholder, not a card.
    if digits.iter().all(|d| *d == digits[0]) {
        return false;
    }
    let n = |k: usize| {
        digits[..k]
            .iter()
            .fold(0u32, |a, d| a * 10 + u32::from(d - b'0'))
    };
    let len = digits.len();
    match digits[0] {
        b'4' => matches!(len, 13 | 16 | 19),
        b'5' => (51..=55).contains(&n(2)) && len == 16 || (50..=59).contains(&n(2)) && len >= 12,
        b'2' => (2221..=2720).contains(&n(4)) && len == 16,
        b'3' => {
            matches!(n(2), 34 | 37) && len == 15
                || (3528..=3589).contains(&n(4)) && len >= 16
                || (300..=305).contains(&n(3)) && len >= 14
                || matches!(n(2), 36 | 38 | 39) && len >= 14
        }
        b'6' => {
            n(4) == 6011 || n(2) == 65 || (644..=649).contains(&n(3)) || n(2) == 62 || n(2) == 67
        }
        _ => false,
    }
}

/// IBAN lengths per country (ISO 13616 registry, the common ones).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AT", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("CH", 21),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("EE", 20),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IS", 26),
    ("IT", 27),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MT", 31),
    ("NL", 18),
    ("NO", 15),
    ("PK", 24),
    ("PL", 28),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("TR", 26),
    ("UA", 29),
];

fn is_iban(t: &str) -> bool {
    let compact: Vec<u8> = t.bytes().filter(|c| *c != b' ').collect();
    if compact.len() < 15 || compact.len() > 34 || t.contains("  ") {
        return false;
    }
    if !compact.iter().all(u8::is_ascii_alphanumeric)
        || !compact[..2].iter().all(u8::is_ascii_uppercase)
        || !compact[2..4].iter().all(u8::is_ascii_digit)
    {
        return false;
    }
    let country = std::str::from_utf8(&compact[..2]).unwrap_or("");
    let Some((_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| *c == country) else {
        return false;
    };
    if compact.len() != *len {
        return false;
    }
    // Move the first four characters to the end, letters → 10..35, mod 97 must be 1.
    let mut rem = 0u32;
    for c in compact[4..].iter().chain(&compact[..4]) {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Three base64url parts, the first decoding to a JSON object with `alg`.
fn is_jwt(t: &str) -> bool {
    let parts: Vec<&str> = t.split('.').collect();
    if parts.len() != 3 || parts[0].len() < 10 || parts[1].is_empty() {
        return false;
    }
    let b64 = |s: &str| {
        s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    if !parts.iter().all(|p| b64(p)) {
        return false;
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[0])
        .ok()
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .is_some_and(|h| h.get("alg").is_some_and(serde_json::Value::is_string))
}

/// AWS access key IDs: `AKIA` (long-term) or `ASIA` (temporary) and 16 upper-case base32 chars.
fn is_aws_key(t: &str) -> bool {
    t.len() == 20
        && (t.starts_with("AKIA") || t.starts_with("ASIA"))
        && t[4..]
            .bytes()
            .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c))
}

fn is_ip(t: &str) -> bool {
    if let Ok(v4) = t.parse::<std::net::Ipv4Addr>() {
        // Versions like 1.2.3.4 are addresses too, but 0.0.0.0 is nobody's.
        return !v4.is_unspecified();
    }
    t.contains(':')
        && t.parse::<std::net::Ipv6Addr>()
            .is_ok_and(|v6| !v6.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(t: &str) -> Option<DataType> {
        builtin(t).into_iter().next()
    }

    #[test]
    fn each_type_and_its_look_alikes() {
        assert_eq!(one("jane.doe@example.com"), Some(DataType::Email));
        assert_eq!(one("not-an-email@localhost"), None);
        assert_eq!(one("+44 20 7946 0958"), Some(DataType::Phone));
        assert_eq!(one("+0123456789"), None);
        assert_eq!(one("123-45-6789"), Some(DataType::UsSsn));
        assert_eq!(one("666-45-6789"), None);
        assert_eq!(one("4111 1111 1111 1111"), Some(DataType::PaymentCard));
        assert_eq!(one("4111 1111 1111 1112"), None, "Luhn-invalid");
        assert_eq!(one("0000000000000000"), None);
        assert_eq!(one("GB82 WEST 1234 5698 7654 32"), Some(DataType::Iban));
        assert_eq!(one("GB82 WEST 1234 5698 7654 33"), None, "mod-97");
        assert_eq!(
            one("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"),
            Some(DataType::Jwt)
        );
        assert_eq!(one("AKIAIOSFODNN7EXAMPLE"), Some(DataType::AwsAccessKey));
        assert_eq!(one("10.1.2.3"), Some(DataType::IpAddress));
        assert_eq!(one("2001:db8::1"), Some(DataType::IpAddress));
        assert_eq!(one("12:30:45"), None);
    }

    #[test]
    fn findings_have_places_never_values_and_jwts_count_only_in_responses() {
        let c = Classifier::default();
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln";
        let req = format!(
            r#"{{"user": {{"email": "a@b.example", "token": "{jwt}"}}, "cards": [4111111111111111, "5500 0000 0000 0004"]}}"#
        );
        let resp = format!(r#"{{"session": "{jwt}", "ip": "10.0.0.7"}}"#);
        let r = c.classify(&Sample {
            query: Some("ssn=123-45-6789&q=shoes"),
            request_body: Some(Body {
                bytes: req.as_bytes(),
                media_type: Some("application/json"),
                encoded: false,
                truncated: false,
            }),
            response_body: Some(Body {
                bytes: resp.as_bytes(),
                media_type: Some("application/json"),
                encoded: false,
                truncated: false,
            }),
            ..Default::default()
        });
        let got: Vec<(String, Direction, String, u32)> = r
            .findings
            .iter()
            .map(|f| {
                (
                    f.data_type.name().to_owned(),
                    f.direction,
                    f.location.clone(),
                    f.count,
                )
            })
            .collect();
        let want: Vec<(String, Direction, String, u32)> = vec![
            (
                "email".into(),
                Direction::Request,
                "body:/user/email".into(),
                1,
            ),
            ("us_ssn".into(), Direction::Request, "query:ssn".into(), 1),
            (
                "payment_card".into(),
                Direction::Request,
                "body:/cards/*".into(),
                2,
            ),
            ("jwt".into(), Direction::Response, "body:/session".into(), 1),
            (
                "ip_address".into(),
                Direction::Response,
                "body:/ip".into(),
                1,
            ),
        ];
        assert_eq!(got, want, "the request's own JWT is not a finding");
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("123-45-6789") && !text.contains("4111") && !text.contains(jwt));
    }
}
