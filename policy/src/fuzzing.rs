//! The checks behind the fuzz targets (`policy/fuzz`), shared with `cargo test`, which replays the
//! committed corpora through them. Each returns `Err` with a reason when an invariant breaks.

use crate::eval::{Mode, policy_matches};
use crate::{Engine, Request, path, rbac};

/// An invariant a fuzz input broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("{input:?} → {path:?} is not absolute")]
    NotAbsolute { input: String, path: String },
    #[error("{input:?} → {path:?} keeps an empty or dot segment")]
    DotSegment { input: String, path: String },
    #[error("{input:?} → {path:?} → {again}: not idempotent")]
    NotIdempotent {
        input: String,
        path: String,
        again: String,
    },
    #[error("{input:?}: {count} lenient readings")]
    TooManyReadings { input: String, count: usize },
    #[error("{input:?}: lenient reading {reading:?} of {path:?}")]
    BadReading {
        input: String,
        reading: String,
        path: String,
    },
    #[error("{input:?}: without_params kept a ';' in {stripped:?}")]
    ParamKept { input: String, stripped: String },
    #[error("DENY policy {0} matches but the request was allowed")]
    DenyBypassed(String),
}

/// Normalization never panics, and a normalized path is a fixed point: absolute, no empty, `.` or
/// `..` segments, and normalizing it again changes nothing.
pub fn check_normalize(input: &[u8]) -> Result<(), Violation> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(());
    };
    let Ok(n) = path::normalize(text) else {
        return Ok(());
    };
    if !n.path.starts_with('/') {
        return Err(Violation::NotAbsolute {
            input: text.to_owned(),
            path: n.path.clone(),
        });
    }
    if n.path.contains("//") || n.path.split('/').any(|s| s == "." || s == "..") {
        return Err(Violation::DotSegment {
            input: text.to_owned(),
            path: n.path.clone(),
        });
    }
    match path::normalize(&n.path) {
        Ok(again) if again.path == n.path => {}
        other => {
            return Err(Violation::NotIdempotent {
                input: text.to_owned(),
                path: n.path.clone(),
                again: format!("{other:?}"),
            });
        }
    }
    // Lenient readings: bounded, absolute, and never the normalized path itself.
    let readings = path::lenient_readings(&n.path);
    if readings.len() > 40 {
        return Err(Violation::TooManyReadings {
            input: text.to_owned(),
            count: readings.len(),
        });
    }
    if let Some(r) = readings
        .iter()
        .find(|r| !r.starts_with('/') || **r == n.path)
    {
        return Err(Violation::BadReading {
            input: text.to_owned(),
            reading: r.clone(),
            path: n.path.clone(),
        });
    }
    let _ = path::ambiguous(text, &n.path);
    if let Some(stripped) = n.without_params()
        && stripped.contains(';')
    {
        return Err(Violation::ParamKept {
            input: text.to_owned(),
            stripped: stripped.to_string(),
        });
    }
    Ok(())
}

/// Compile and evaluate never panic, and a request that a DENY policy matches is never allowed.
///
/// Input: RBAC filters as YAML/JSON, then a line `---`, then request lines: `principal=…`,
/// `path=…` (a request target), `h=name:value` (repeatable), `port=…`.
pub fn check_compile_evaluate(input: &[u8]) -> Result<(), Violation> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(());
    };
    let (filters_text, request_text) = text.split_once("\n---\n").unwrap_or((text, ""));
    let Ok(filters) = crate::parse_filters(filters_text) else {
        return Ok(());
    };
    let Ok(engine) = Engine::compile(&filters) else {
        return Ok(());
    };
    let mut principal = None;
    let mut target = "/";
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    let mut port = 8080u16;
    for line in request_text.lines() {
        match line.split_once('=') {
            Some(("principal", v)) => principal = Some(v),
            Some(("path", v)) => target = v,
            Some(("h", v)) => {
                if let Some((k, val)) = v.split_once(':') {
                    headers.push((k.to_ascii_lowercase(), val.as_bytes().to_vec()));
                }
            }
            Some(("port", v)) => port = v.parse().unwrap_or(port),
            _ => {}
        }
    }
    let Ok(n) = path::normalize(target) else {
        return Ok(());
    };
    let without = n.without_params();
    let full = n.path_and_query();
    let mut hs: Vec<(&str, &[u8])> = vec![(":path", full.as_bytes()), (":method", b"GET")];
    hs.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let req = Request {
        principal,
        path: &n.path,
        path_without_params: without.as_deref(),
        headers: &hs,
        destination_port: port,
        ..Default::default()
    };
    let decision = engine.evaluate(&req);
    for f in &engine.filters {
        let Some(rules) = &f.rules else { continue };
        if rules.action != rbac::Action::Deny {
            continue;
        }
        if let Some((name, _)) = rules
            .policies
            .iter()
            .find(|(_, p)| policy_matches(p, &req, Mode::Lenient))
            && decision.allowed
        {
            return Err(Violation::DenyBypassed(name.to_string()));
        }
    }
    Ok(())
}
