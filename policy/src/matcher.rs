//! Compiled leaf matchers: strings (exact, prefix, suffix, contains, RE2-style regex, ignore-case),
//! CIDR ranges, and URI templates.

use std::net::IpAddr;

use crate::CompileError;
use crate::rbac;

/// Regexes larger than this (compiled) are refused: a policy must not be a memory bomb.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub(crate) enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// A regex of the form `.*LITERAL.*` (Istio's namespace matcher): the value contains LITERAL
    /// and, since `.` does not match it, no newline.
    ContainsNoNewline(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub(crate) struct StringMatcher {
    kind: StrMatch,
    ignore_case: bool,
}

impl StringMatcher {
    pub(crate) fn compile(m: &rbac::StringMatcher, at: &str) -> Result<Self, CompileError> {
        let set = [
            m.exact.is_some(),
            m.prefix.is_some(),
            m.suffix.is_some(),
            m.contains.is_some(),
            m.safe_regex.is_some(),
        ];
        if set.iter().filter(|b| **b).count() != 1 {
            return Err(CompileError::invalid(
                at,
                "a string matcher needs exactly one of exact, prefix, suffix, contains, safeRegex",
            ));
        }
        let fold = |s: &String| {
            if m.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        let kind = if let Some(s) = &m.exact {
            StrMatch::Exact(fold(s))
        } else if let Some(s) = &m.prefix {
            StrMatch::Prefix(fold(s))
        } else if let Some(s) = &m.suffix {
            StrMatch::Suffix(fold(s))
        } else if let Some(s) = &m.contains {
            StrMatch::Contains(fold(s))
        } else if let Some(r) = &m.safe_regex {
            // Validate as a regex in every case, then take the literal fast path when it applies.
            let compiled = compile_regex(&r.regex, m.ignore_case, at)?;
            match dot_star_literal(&r.regex) {
                Some(lit) if !m.ignore_case => StrMatch::ContainsNoNewline(lit),
                _ => StrMatch::Regex(compiled),
            }
        } else {
            return Err(CompileError::invalid(at, "empty string matcher"));
        };
        Ok(Self {
            kind,
            ignore_case: m.ignore_case,
        })
    }

    /// The exact value this matcher accepts, when it accepts only that one value.
    pub(crate) fn exact_case_sensitive(&self) -> Option<&str> {
        match &self.kind {
            StrMatch::Exact(s) if !self.ignore_case => Some(s),
            _ => None,
        }
    }

    /// `X` when this matcher is Istio's namespace matcher `.*/ns/X/.*` (X without '/').
    pub(crate) fn namespace_segment(&self) -> Option<&str> {
        match &self.kind {
            StrMatch::ContainsNoNewline(lit) => lit
                .strip_prefix("/ns/")?
                .strip_suffix('/')
                .filter(|ns| !ns.is_empty() && !ns.contains('/')),
            _ => None,
        }
    }

    /// Matches the value as bytes, as Envoy does: a header value may hold obs-text (bytes
    /// 0x80–0xFF that are not UTF-8), and `admin\xff` must still start with `admin`. A regex runs on
    /// the value with each invalid byte read as U+FFFD, the way RE2 reads it, so `admin.*` matches.
    pub(crate) fn matches(&self, value: &[u8]) -> bool {
        if let StrMatch::Regex(r) = &self.kind {
            return match std::str::from_utf8(value) {
                Ok(v) => r.is_match(v),
                Err(_) => r.is_match(&String::from_utf8_lossy(value)),
            };
        }
        let folded;
        let v = if self.ignore_case {
            folded = value.to_ascii_lowercase();
            folded.as_slice()
        } else {
            value
        };
        match &self.kind {
            StrMatch::Exact(s) => v == s.as_bytes(),
            StrMatch::Prefix(s) => v.starts_with(s.as_bytes()),
            StrMatch::Suffix(s) => v.ends_with(s.as_bytes()),
            StrMatch::Contains(s) => contains(v, s.as_bytes()),
            StrMatch::ContainsNoNewline(s) => !v.contains(&b'\n') && contains(v, s.as_bytes()),
            StrMatch::Regex(_) => false, // answered above
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// `.*LIT.*` where LIT has only literal characters (escaped metacharacters allowed) → LIT.
fn dot_star_literal(pattern: &str) -> Option<String> {
    let inner = pattern.strip_prefix(".*")?.strip_suffix(".*")?;
    let mut lit = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let next = chars.next()?;
                if !"\\.+*?()|[]{}^$#&-~".contains(next) {
                    return None; // \d, \w, \b …: a class, not a literal
                }
                lit.push(next);
            }
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => {
                return None;
            }
            c => lit.push(c),
        }
    }
    (!lit.is_empty()).then_some(lit)
}

/// Envoy's safe_regex matches the whole value.
fn compile_regex(pattern: &str, ignore_case: bool, at: &str) -> Result<regex::Regex, CompileError> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| CompileError::invalid(at, &format!("bad regex {pattern:?}: {e}")))
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Cidr {
    addr: IpAddr,
    len: u32,
}

impl Cidr {
    pub(crate) fn compile(c: &rbac::CidrRange, at: &str) -> Result<Self, CompileError> {
        let addr: IpAddr = c.address_prefix.parse().map_err(|_| {
            CompileError::invalid(at, &format!("bad IP address {:?}", c.address_prefix))
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if c.prefix_len > max {
            return Err(CompileError::invalid(
                at,
                &format!("prefix length {} > {max}", c.prefix_len),
            ));
        }
        Ok(Self {
            addr,
            len: c.prefix_len,
        })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => mask_eq(&net.octets(), &a.octets(), self.len),
            (IpAddr::V6(net), IpAddr::V6(a)) => mask_eq(&net.octets(), &a.octets(), self.len),
            _ => false,
        }
    }
}

fn mask_eq(net: &[u8], a: &[u8], len: u32) -> bool {
    let full = (len / 8) as usize;
    if net[..full] != a[..full] {
        return false;
    }
    let rem = len % 8;
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    (net[full] & mask) == (a[full] & mask)
}

/// Envoy's URI template matcher (`envoy.path.match.uri_template`), whole: `*` is one path segment,
/// `**` any number of segments (the last operator), `{name}` / `{name=*}` / `{name=**}` /
/// `{name=a/*/b}` are variables matching the same, and the last segment may end in a literal
/// suffix after an operator or variable (`/{lang}/{path=**}.m3u8`, `/files/**.pdf`). Anything
/// else (a literal before an operator in one segment, `**` before another operator, bad names,
/// more than five variables, stray braces) is refused, so a DENY rule never silently becomes a
/// template that matches nothing.
#[derive(Debug, Clone)]
pub(crate) struct UriTemplate {
    regex: regex::Regex,
}

/// Envoy's limit on variables in one template.
const MAX_TEMPLATE_VARIABLES: usize = 5;

impl UriTemplate {
    pub(crate) fn compile(t: &rbac::TypedExtensionConfig, at: &str) -> Result<Self, CompileError> {
        if t.typed_config.type_url != rbac::URI_TEMPLATE_TYPE {
            return Err(CompileError::Unsupported {
                at: at.to_owned(),
                what: format!("uriTemplate of type {}", t.typed_config.type_url),
            });
        }
        Self::parse(&t.typed_config.path_template).map_err(|why| {
            CompileError::invalid(
                at,
                &format!("path template {:?}: {why}", t.typed_config.path_template),
            )
        })
    }

    /// Parses a path template; the error says what is wrong with it.
    pub(crate) fn parse(tpl: &str) -> Result<Self, BadTemplate> {
        let rest = tpl.strip_prefix('/').ok_or(BadTemplate::NoLeadingSlash)?;
        let segments = split_template(rest)?;
        let mut re = String::from("^");
        let mut names: Vec<&str> = Vec::new();
        let mut seen_double_star = false;
        let last = segments.len() - 1;
        for (i, seg) in segments.iter().enumerate() {
            re.push('/');
            let (head, suffix) = split_operator(seg)?;
            if !suffix.is_empty() && i != last {
                return Err(BadTemplate::SuffixNotLast((*seg).to_owned()));
            }
            if matches!(head, Head::Operator("**")) && suffix.is_empty() && i != last {
                // `/**/x`: zero segments read as `/x` too.
                if seen_double_star {
                    return Err(BadTemplate::DoubleStarNotLast);
                }
                seen_double_star = true;
                re.pop();
                re.push_str("(?:/.*)?");
                continue;
            }
            let parts: Vec<&str> = match head {
                Head::Literal(lit) => {
                    check_literal(lit)?;
                    re.push_str(&regex::escape(lit));
                    continue;
                }
                Head::Operator(op) => vec![op],
                Head::Variable { name, pattern } => {
                    if seen_double_star {
                        return Err(BadTemplate::DoubleStarNotLast);
                    }
                    check_variable_name(name)?;
                    if names.contains(&name) {
                        return Err(BadTemplate::RepeatedVariable(name.to_owned()));
                    }
                    names.push(name);
                    if names.len() > MAX_TEMPLATE_VARIABLES {
                        return Err(BadTemplate::TooManyVariables);
                    }
                    pattern.split('/').collect()
                }
            };
            for (j, part) in parts.iter().enumerate() {
                if j > 0 {
                    re.push('/');
                }
                if seen_double_star && part.contains('*') {
                    return Err(BadTemplate::DoubleStarNotLast);
                }
                match *part {
                    "*" => re.push_str("[^/]+"),
                    "**" => {
                        seen_double_star = true;
                        re.push_str(".*");
                    }
                    lit => {
                        if lit.contains('*') {
                            return Err(BadTemplate::PartialOperator(lit.to_owned()));
                        }
                        check_literal(lit)?;
                        re.push_str(&regex::escape(lit));
                    }
                }
            }
            if !suffix.is_empty() {
                check_literal(suffix)?;
                re.push_str(&regex::escape(suffix));
            }
        }
        re.push('$');
        let regex = regex::RegexBuilder::new(&format!("(?s){re}"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| BadTemplate::Regex(e.to_string()))?;
        Ok(Self { regex })
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        self.regex.is_match(path)
    }
}

/// Why a path template (Envoy's `uri_template` syntax) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadTemplate {
    #[error("a path template starts with '/'")]
    NoLeadingSlash,
    #[error("{0:?}: only the last segment may have text after an operator")]
    SuffixNotLast(String),
    #[error("`**` must be the last operator")]
    DoubleStarNotLast,
    #[error("variable {0:?} appears twice")]
    RepeatedVariable(String),
    #[error("more than {MAX_TEMPLATE_VARIABLES} variables")]
    TooManyVariables,
    #[error("{0:?}: operators fill a whole segment")]
    PartialOperator(String),
    #[error("does not compile: {0}")]
    Regex(String),
    #[error("{0}")]
    Braces(&'static str),
    #[error("variable {0:?} has an empty pattern")]
    EmptyPattern(String),
    #[error("{0:?}: text before an operator or variable in one segment is not supported")]
    PrefixBeforeOperator(String),
    #[error("{0:?} holds a character a path template literal may not")]
    BadLiteral(String),
    #[error("{0:?} is not a variable name")]
    BadVariableName(String),
}

/// The start of a template segment: a literal, an operator, or a variable.
enum Head<'a> {
    Literal(&'a str),
    Operator(&'a str),
    Variable { name: &'a str, pattern: &'a str },
}

/// Segments, with `/` inside `{…}` kept inside its variable.
fn split_template(rest: &str) -> Result<Vec<&str>, BadTemplate> {
    let mut out = Vec::new();
    let (mut start, mut depth) = (0, 0usize);
    for (i, c) in rest.char_indices() {
        match c {
            '{' if depth == 0 => depth = 1,
            '{' => return Err(BadTemplate::Braces("nested '{'")),
            '}' if depth == 1 => depth = 0,
            '}' => return Err(BadTemplate::Braces("'}' without '{'")),
            '/' if depth == 0 => {
                out.push(&rest[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(BadTemplate::Braces("'{' without '}'"));
    }
    out.push(&rest[start..]);
    Ok(out)
}

/// A segment's operator or variable and the literal suffix after it (`**.pdf` → `**`, `.pdf`).
fn split_operator(seg: &str) -> Result<(Head<'_>, &str), BadTemplate> {
    if let Some(body) = seg.strip_prefix('{') {
        let close = body
            .find('}')
            .ok_or(BadTemplate::Braces("'{' without '}'"))?;
        let (inner, suffix) = (&body[..close], &body[close + 1..]);
        let (name, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
        if pattern.is_empty() {
            return Err(BadTemplate::EmptyPattern(name.to_owned()));
        }
        return Ok((Head::Variable { name, pattern }, suffix));
    }
    if let Some(suffix) = seg.strip_prefix("**") {
        return Ok((Head::Operator("**"), suffix));
    }
    if let Some(suffix) = seg.strip_prefix('*') {
        return Ok((Head::Operator("*"), suffix));
    }
    if seg.contains(['*', '{', '}']) {
        return Err(BadTemplate::PrefixBeforeOperator(seg.to_owned()));
    }
    Ok((Head::Literal(seg), ""))
}

/// Path characters a template literal may hold (RFC 3986 pchar, escapes as `%XX`).
fn check_literal(lit: &str) -> Result<(), BadTemplate> {
    let ok = lit
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BadTemplate::BadLiteral(lit.to_owned()))
    }
}

fn check_variable_name(name: &str) -> Result<(), BadTemplate> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(BadTemplate::BadVariableName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_templates_match_as_envoy_does() {
        let t = |tpl: &str| UriTemplate::parse(tpl).unwrap_or_else(|e| panic!("{tpl}: {e}"));
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "/files/**.pdf",
                &["/files/a.pdf", "/files/a/b/c.pdf", "/files/.pdf"],
                &["/files/a.txt", "/file/a.pdf", "/files"],
            ),
            (
                "/v1/*/secret",
                &["/v1/x/secret"],
                &["/v1//secret", "/v1/x/y/secret", "/v1/secret"],
            ),
            ("/api/{id}", &["/api/7"], &["/api/7/8", "/api/"]),
            (
                "/{lang}/{path=**}.m3u8",
                &["/en/a/b.m3u8", "/en/.m3u8"],
                &["/en/a/b.mp4"],
            ),
            ("/videos/{seg=**}.ts", &["/videos/1/2.ts"], &["/video/1.ts"]),
            (
                "/{x=shelves/*}/books",
                &["/shelves/1/books"],
                &["/shelves/books", "/shelves/1/2/books"],
            ),
            ("/foo/**", &["/foo/", "/foo/a/b"], &["/foo", "/foobar"]),
            ("/a.b/*", &["/a.b/c"], &["/axb/c"]),
            ("/a/**/b", &["/a/b", "/a/x/y/b"], &["/a/bb", "/a/x/c"]),
        ];
        for (tpl, yes, no) in cases {
            let m = t(tpl);
            for p in *yes {
                assert!(m.matches(p), "{tpl} should match {p}");
            }
            for p in *no {
                assert!(!m.matches(p), "{tpl} should not match {p}");
            }
        }
    }

    #[test]
    fn unsupported_template_syntax_is_refused() {
        for tpl in [
            "/v1/*/secret*",
            "/v1/x{*}",
            "/a/**/*",
            "/a/**/{x}",
            "/**/b/**",
            "/{a}/{a}",
            "/{1x}",
            "/{a=}",
            "/{a",
            "/a}",
            "/{a{b}}",
            "/x/*.pdf/y",
            "no-slash",
            "/{a}/{b}/{c}/{d}/{e}/{f}",
            "/sp ace",
        ] {
            assert!(UriTemplate::parse(tpl).is_err(), "{tpl} should be refused");
        }
    }

    fn sm(m: rbac::StringMatcher) -> StringMatcher {
        StringMatcher::compile(&m, "t").unwrap()
    }

    #[test]
    fn strings() {
        let m = sm(rbac::StringMatcher {
            exact: Some("Admin".into()),
            ignore_case: true,
            ..Default::default()
        });
        assert!(m.matches(b"ADMIN") && !m.matches(b"admins"));
        let m = sm(rbac::StringMatcher {
            safe_regex: Some(rbac::RegexMatcher {
                regex: ".*/ns/foo/.*".into(),
                google_re2: None,
            }),
            ..Default::default()
        });
        assert!(m.matches(b"spiffe://td/ns/foo/sa/x") && !m.matches(b"spiffe://td/ns/foobar/sa/x"));
        assert!(
            !sm(rbac::StringMatcher {
                exact: Some("a".into()),
                ..Default::default()
            })
            .matches(&[0x61, 0xff])
        );
        assert!(StringMatcher::compile(&rbac::StringMatcher::default(), "t").is_err());
        assert!(
            StringMatcher::compile(
                &rbac::StringMatcher {
                    safe_regex: Some(rbac::RegexMatcher {
                        regex: "(".into(),
                        google_re2: None
                    }),
                    ..Default::default()
                },
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn dot_star_literal_is_the_same_as_the_regex() {
        let re = |r: &str| {
            sm(rbac::StringMatcher {
                safe_regex: Some(rbac::RegexMatcher {
                    regex: r.into(),
                    google_re2: None,
                }),
                ..Default::default()
            })
        };
        for pattern in [
            ".*/ns/foo/.*",
            r".*/ns/rule\[0\]/.*",
            ".*/ns/a.b/.*",
            r".*\d.*",
            ".*(a|b).*",
            ".*",
        ] {
            let fast = re(pattern);
            let slow = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
            for v in [
                "spiffe://td/ns/foo/sa/x",
                "spiffe://td/ns/foo/sa/x\n",
                "/ns/rule[0]/",
                "x/ns/aXb/y",
                "/ns/a.b/",
                "7",
                "a",
                "",
            ] {
                assert_eq!(
                    fast.matches(v.as_bytes()),
                    slow.is_match(v),
                    "{pattern} on {v:?}"
                );
            }
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::compile(
            &rbac::CidrRange {
                address_prefix: "10.80.64.0".into(),
                prefix_len: 18,
            },
            "t",
        )
        .unwrap();
        assert!(
            c.contains("10.80.127.255".parse().unwrap())
                && !c.contains("10.80.128.0".parse().unwrap())
        );
        assert!(c.contains("::ffff:10.80.64.1".parse().unwrap()));
        assert!(
            Cidr::compile(
                &rbac::CidrRange {
                    address_prefix: "10.0.0.0".into(),
                    prefix_len: 33
                },
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn templates() {
        let t = |p: &str| UriTemplate::parse(p).unwrap();
        assert!(t("/path/template/*").matches("/path/template/x"));
        assert!(!t("/path/template/*").matches("/path/template/x/y"));
        assert!(t("/**/path/template").matches("/a/b/path/template"));
        assert!(t("/**/path/template").matches("/path/template"));
        assert!(!t("/**/path/template").matches("/a/path/templatex"));
    }
}
