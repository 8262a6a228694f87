//! Authorization for eastguard: Envoy RBAC filters compiled to an evaluation IR and evaluated per
//! request; the one normalized view of a request path; and (in `istio`) Istio's
//! AuthorizationPolicy translated to Envoy RBAC exactly as istiod does it.
//!
//! This crate must never do I/O or async work, never panic on any input, and never widen access:
//! a configuration it does not fully understand is refused, not partly applied.

mod compile;
mod eval;
#[doc(hidden)]
pub mod fuzzing;
pub mod istio;
mod matcher;
pub mod path;
pub mod rbac;

pub use compile::Engine;
pub use eval::{Decision, Request};

/// Why RBAC configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    #[error("{at}: unsupported {what}")]
    Unsupported { at: String, what: String },
}

impl CompileError {
    pub(crate) fn invalid(at: &str, message: &str) -> Self {
        Self::Invalid {
            at: at.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// Why a text of RBAC filters was refused.
#[derive(Debug, thiserror::Error)]
pub enum FiltersError {
    #[error("not YAML or JSON: {0}")]
    Syntax(#[from] serde_yaml::Error),
    #[error("{0}")]
    Model(#[from] serde_json::Error),
}

/// Parses RBAC filters from YAML or JSON in proto3 JSON form (a list of `{name, typedConfig}`).
pub fn parse_filters(text: &str) -> Result<Vec<rbac::Filter>, FiltersError> {
    let value: serde_json::Value = serde_yaml::from_str(text)?;
    Ok(serde_json::from_value(proto_json_keys(value))?)
}

/// Proto3 JSON accepts a field's original `snake_case` name as well as `lowerCamelCase`; this
/// rewrites keys to the camelCase form the typed model reads. Keys under `policies` are names,
/// not fields, and are kept.
pub fn proto_json_keys(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if k == "policies" {
                        match v {
                            Value::Object(m) => Value::Object(
                                m.into_iter()
                                    .map(|(n, p)| (n, proto_json_keys(p)))
                                    .collect(),
                            ),
                            other => other,
                        }
                    } else {
                        proto_json_keys(v)
                    };
                    (camel(&k), v)
                })
                .collect(),
        ),
        Value::Array(xs) => Value::Array(xs.into_iter().map(proto_json_keys).collect()),
        other => other,
    }
}

fn camel(k: &str) -> String {
    if k.starts_with('@') || !k.contains('_') {
        return k.to_owned();
    }
    let mut out = String::with_capacity(k.len());
    let mut upper = false;
    for c in k.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
