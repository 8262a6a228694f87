//! Authorization for eastguard: Envoy RBAC filters compiled to an evaluation IR and evaluated per
//! request; the one normalized view of a request path; and (in `istio`) Istio's
//! AuthorizationPolicy translated to Envoy RBAC exactly as istiod does it.
//!
//! This crate must never do I/O or async work, never panic on any input, and never widen access:
//! a configuration it does not fully understand is refused, not partly applied.

mod compile;
mod eval;
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

/// Parses RBAC filters from YAML or JSON in proto3 JSON form (a list of `{name, typedConfig}`).
pub fn parse_filters(text: &str) -> Result<Vec<rbac::Filter>, String> {
    let value: serde_json::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
