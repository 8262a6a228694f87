//! SPIFFE IDs and trust domains, parsed strictly by the SPIFFE-ID standard.

use std::fmt;
use std::sync::Arc;

/// Longest trust domain name the standard allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID accepted (the standard: IDs up to 2048 bytes must be accepted).
const MAX_ID_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain. Each variant names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain has the character {0:?}; only a-z, 0-9, '.', '-' and '_' are allowed")]
    BadTrustDomainChar(char),
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("path segment is empty (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("path segment \".\" or \"..\" is not allowed")]
    DotSegment,
    #[error("path has the character {0:?}; only a-z, A-Z, 0-9, '.', '-' and '_' are allowed")]
    BadPathChar(char),
    #[error("a trust domain cannot have a path")]
    TrustDomainHasPath,
}

/// A SPIFFE trust domain name, e.g. `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

/// A SPIFFE ID, e.g. `spiffe://cluster.local/ns/default/sa/frontend`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, as given (it is already canonical when valid).
    id: Arc<str>,
    /// Byte offset in `id` where the path starts.
    path_at: usize,
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a trust domain name; a SPIFFE ID with no path (`spiffe://example.org`) is accepted too.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.contains(":/") {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::TrustDomainHasPath);
            }
            return Ok(id.trust_domain());
        }
        check_trust_domain(s)?;
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<td>`).
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            path_at: SCHEME.len() + self.0.len(),
            id: format!("{SCHEME}{}", self.0).into(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            id: s.into(),
            path_at: SCHEME.len() + td.len(),
        })
    }

    /// Builds `spiffe://<td><path>` from parts; `path` must be empty or start with '/'.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("{SCHEME}{td}{path}"))
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_at]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().into())
    }

    /// The path, empty or starting with '/'.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split item is the empty string before it.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/a/sa/b");
        assert_eq!(id.trust_domain().id().as_str(), "spiffe://cluster.local");
    }

    #[test]
    fn named_errors() {
        assert_eq!(
            SpiffeId::parse("spiffe://a/b/"),
            Err(SpiffeIdError::EmptySegment)
        );
        assert_eq!(
            SpiffeId::parse("spiffe://a/.."),
            Err(SpiffeIdError::DotSegment)
        );
        assert_eq!(
            SpiffeId::parse("spiffe://A/x"),
            Err(SpiffeIdError::BadTrustDomainChar('A'))
        );
        assert_eq!(
            TrustDomain::parse("spiffe://a/x"),
            Err(SpiffeIdError::TrustDomainHasPath)
        );
    }
}
