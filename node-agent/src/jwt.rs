//! JWT-SVIDs (SPIFFE JWT-SVID standard): ES256 tokens with `sub` = SPIFFE ID, `aud`, `exp`, `iat`,
//! signed by a key whose public half is published as a JWKS (`use: jwt-svid`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};

use identity::{SpiffeId, TrustDomain};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// JWT-SVID lifetime.
pub const JWT_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a JWT (three base64url parts)")]
    Malformed,
    #[error("token header: {0}")]
    Header(String),
    #[error("signing key {0:?} is not in the trust domain's JWT bundle")]
    UnknownKey(String),
    #[error("signature does not verify")]
    Signature,
    #[error("claims: {0}")]
    Claims(String),
    #[error("token has expired")]
    Expired,
    #[error("audience {0:?} is not in the token's aud")]
    Audience(String),
    #[error("key generation failed")]
    Key,
}

/// The agent's JWT signing key.
pub struct JwtAuthority {
    kid: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl JwtAuthority {
    pub fn generate() -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| JwtError::Key)?;
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|_| JwtError::Key)?;
        let mut id = [0u8; 16];
        rng.fill(&mut id).map_err(|_| JwtError::Key)?;
        Ok(Self {
            kid: B64.encode(id),
            key,
            rng,
        })
    }

    /// The JWKS of this key (the JWT bundle of its trust domain).
    pub fn jwks(&self) -> Vec<u8> {
        // Uncompressed point: 0x04 || X || Y.
        let public = self.key.public_key().as_ref();
        let jwk = serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&public[1..33]),
            "y": B64.encode(&public[33..65]),
            "kid": self.kid,
            "use": "jwt-svid",
        });
        serde_json::json!({ "keys": [jwk] })
            .to_string()
            .into_bytes()
    }

    pub fn sign(&self, sub: &SpiffeId, audience: &[String]) -> Result<String, JwtError> {
        let now = now_secs();
        let header = serde_json::json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" });
        let claims = serde_json::json!({
            "sub": sub.as_str(),
            "aud": audience,
            "iat": now,
            "exp": now + JWT_TTL.as_secs(),
        });
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| JwtError::Key)?;
        Ok(format!("{input}.{}", B64.encode(sig.as_ref())))
    }

    /// Checks signature, expiry, audience, and that `sub` is a SPIFFE ID of `trust_domain`.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        trust_domain: &TrustDomain,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let decode = |p: &str| B64.decode(p).map_err(|_| JwtError::Malformed);
        let header: serde_json::Value =
            serde_json::from_slice(&decode(h)?).map_err(|e| JwtError::Header(e.to_string()))?;
        if header["alg"] != "ES256" {
            return Err(JwtError::Header(format!(
                "unsupported alg {}",
                header["alg"]
            )));
        }
        let kid = header["kid"].as_str().unwrap_or_default();
        if kid != self.kid {
            return Err(JwtError::UnknownKey(kid.to_owned()));
        }
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        public
            .verify(format!("{h}.{c}").as_bytes(), &decode(s)?)
            .map_err(|_| JwtError::Signature)?;
        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&decode(c)?).map_err(|e| JwtError::Claims(e.to_string()))?;
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .ok_or_else(|| JwtError::Claims("no sub".into()))?;
        let id = SpiffeId::parse(sub).map_err(|e| JwtError::Claims(format!("sub: {e}")))?;
        if id.trust_domain_str() != trust_domain.as_str() {
            return Err(JwtError::Claims(format!(
                "sub {id} is not in {trust_domain}"
            )));
        }
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| JwtError::Claims("no exp".into()))?;
        if exp <= now_secs() {
            return Err(JwtError::Expired);
        }
        let aud_ok = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => a == audience,
            Some(serde_json::Value::Array(xs)) => xs.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(JwtError::Audience(audience.to_owned()));
        }
        Ok((id, claims))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// JSON → `google.protobuf.Value`, for ValidateJWTSVID's claims.
pub fn to_proto(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(xs) => Kind::ListValue(prost_types::ListValue {
            values: xs.iter().map(to_proto).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn to_struct(m: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), to_proto(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_validate() {
        let a = JwtAuthority::generate().unwrap();
        let td = TrustDomain::parse("cluster.local").unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let t = a.sign(&id, &["orders".into()]).unwrap();
        assert_eq!(a.validate(&t, "orders", &td).unwrap().0, id);
        assert_eq!(
            a.validate(&t, "ledger", &td).unwrap_err(),
            JwtError::Audience("ledger".into())
        );
        let other = TrustDomain::parse("other.td").unwrap();
        assert!(matches!(
            a.validate(&t, "orders", &other),
            Err(JwtError::Claims(_))
        ));
        // A flipped byte in the claims breaks the signature.
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut claims = B64.decode(&parts[1]).unwrap();
        claims[10] ^= 1;
        parts[1] = B64.encode(claims);
        assert_eq!(
            a.validate(&parts.join("."), "orders", &td).unwrap_err(),
            JwtError::Signature
        );
        assert_eq!(
            a.validate("a.b", "orders", &td).unwrap_err(),
            JwtError::Malformed
        );
        let b = JwtAuthority::generate().unwrap();
        assert!(matches!(
            b.validate(&t, "orders", &td),
            Err(JwtError::UnknownKey(_))
        ));
    }
}
