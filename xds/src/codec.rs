//! proto3 JSON for Envoy's messages, driven by the descriptor set `envoy-types` ships (DESIGN §4):
//! `/config_dump` is written with it and Istio's golden dumps are read with it. The pool it builds
//! is large (~45 MiB resident), so nothing on the configuration path uses it: translation reads
//! the prost messages (RBAC through `policy::rbac::envoy`), and a sidecar builds the pool only when
//! an operator asks for `/config_dump`. Field names are
//! written as in the `.proto` (snake_case), as Envoy's admin API writes them; both spellings are read.
//!
//! A typed config whose type is not in the descriptor set (Istio's own extensions, say) cannot be
//! decoded field by field. [`json_to_any`] keeps it as a `google.protobuf.Struct` of its fields plus
//! its type URL (the descriptor set has no `TypedStruct`); [`effective_type_url`] reads it back, and
//! translation then decides whether the extension may be skipped.

use std::sync::OnceLock;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use serde_json::Value;

/// The descriptor set `envoy-types` ships (`src/generated/types.bin`), kept in this crate so the
/// build reads no other package's files: `tests/descriptor_set.rs` checks it is byte for byte the
/// one of the `envoy-types` version in `Cargo.lock`.
static DESCRIPTORS: &[u8] = include_bytes!("../envoy-types-0.7.7.descriptors.bin");

const TYPE_PREFIX: &str = "type.googleapis.com/";
const STRUCT: &str = "type.googleapis.com/google.protobuf.Struct";
/// The key under which an unknown typed config's own type URL is kept.
pub const UNKNOWN_TYPE_KEY: &str = "@eastguard_unknown_type";

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("descriptor set: {0}")]
    Descriptors(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("{type_url}: {message}")]
    Decode { type_url: String, message: String },
    #[error("JSON: {0}")]
    Json(String),
}

/// Every message of Envoy's API (and its dependencies: xds, udpa, validate, google.*).
pub fn pool() -> Result<&'static DescriptorPool, CodecError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| CodecError::Descriptors(e.clone()))
}

fn message_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, n)| n)
}

/// Whether the descriptor set knows the message a type URL names.
pub fn knows(type_url: &str) -> bool {
    pool().is_ok_and(|p| p.get_message_by_name(message_name(type_url)).is_some())
}

fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true)
}

/// An `Any` as Envoy's admin API writes it: `{"@type": ..., fields...}`, nested `Any`s expanded.
pub fn any_to_json(any: &Any) -> Result<Value, CodecError> {
    any_to_json_in(pool()?, any)
}

fn any_to_json_in(pool: &DescriptorPool, any: &Any) -> Result<Value, CodecError> {
    let desc = pool
        .get_message_by_name("google.protobuf.Any")
        .ok_or_else(|| CodecError::UnknownType("google.protobuf.Any".into()))?;
    let msg = DynamicMessage::decode(desc, any.encode_to_vec().as_slice()).map_err(|e| {
        CodecError::Decode {
            type_url: any.type_url.clone(),
            message: e.to_string(),
        }
    })?;
    msg.serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .map_err(|e| CodecError::Decode {
            type_url: any.type_url.clone(),
            message: e.to_string(),
        })
}

/// A message as proto3 JSON (snake_case names), without the `@type` key.
pub fn message_to_json<M: Message + prost::Name>(m: &M) -> Result<Value, CodecError> {
    let mut v = any_to_json(&Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    })?;
    if let Some(o) = v.as_object_mut() {
        o.remove("@type");
    }
    Ok(v)
}

/// An `Any` from proto3 JSON with an `@type`. Nested typed configs of types the descriptor set does
/// not know become `xds.type.v3.TypedStruct` (see the module comment); unknown fields of known
/// types are errors.
pub fn json_to_any(value: Value) -> Result<Any, CodecError> {
    json_to_any_in(pool()?, value)
}

fn json_to_any_in(pool: &DescriptorPool, mut value: Value) -> Result<Any, CodecError> {
    wrap_unknown_anys(pool, &mut value);
    let desc = pool
        .get_message_by_name("google.protobuf.Any")
        .ok_or_else(|| CodecError::UnknownType("google.protobuf.Any".into()))?;
    let type_url = value
        .get("@type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let msg = DynamicMessage::deserialize_with_options(desc, value, &DeserializeOptions::new())
        .map_err(|e| CodecError::Decode {
            type_url: type_url.clone(),
            message: e.to_string(),
        })?;
    Any::decode(msg.encode_to_vec().as_slice()).map_err(|e| CodecError::Decode {
        type_url,
        message: e.to_string(),
    })
}

/// A typed message from proto3 JSON (no `@type` needed).
pub fn json_to_message<M: Message + prost::Name + Default>(value: Value) -> Result<M, CodecError> {
    let mut value = value;
    if let Some(o) = value.as_object_mut() {
        o.insert("@type".into(), Value::String(M::type_url()));
    }
    let any = json_to_any(value)?;
    unpack(&any)
}

/// Decodes an `Any` into the message it must hold; a different type URL is an error.
pub fn unpack<M: Message + prost::Name + Default>(any: &Any) -> Result<M, CodecError> {
    if message_name(&any.type_url) != M::full_name() {
        return Err(CodecError::Decode {
            type_url: any.type_url.clone(),
            message: format!("expected {}", M::full_name()),
        });
    }
    M::decode(any.value.as_slice()).map_err(|e| CodecError::Decode {
        type_url: any.type_url.clone(),
        message: e.to_string(),
    })
}

pub fn pack<M: Message + prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Rewrites every JSON object whose `@type` the pool does not know into a `google.protobuf.Struct`
/// holding its fields and, under [`UNKNOWN_TYPE_KEY`], its type URL.
fn wrap_unknown_anys(pool: &DescriptorPool, value: &mut Value) {
    match value {
        Value::Object(o) => {
            let unknown = o
                .get("@type")
                .and_then(Value::as_str)
                .filter(|t| {
                    t.starts_with(TYPE_PREFIX)
                        && pool.get_message_by_name(message_name(t)).is_none()
                })
                .map(str::to_owned);
            if let Some(type_url) = unknown {
                o.remove("@type");
                let mut fields = std::mem::take(o);
                fields.insert(UNKNOWN_TYPE_KEY.into(), Value::String(type_url));
                o.insert("@type".into(), Value::String(STRUCT.into()));
                o.insert("value".into(), Value::Object(fields));
                return;
            }
            for v in o.values_mut() {
                wrap_unknown_anys(pool, v);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| wrap_unknown_anys(pool, v)),
        _ => {}
    }
}

/// The type URL a typed config really holds: that of an unknown typed config kept as a Struct
/// (see [`json_to_any`]), or its own.
pub fn effective_type_url(any: &Any) -> String {
    if any.type_url == STRUCT
        && let Ok(s) = envoy_types::pb::google::protobuf::Struct::decode(any.value.as_slice())
        && let Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(url)) =
            s.fields.get(UNKNOWN_TYPE_KEY).and_then(|v| v.kind.as_ref())
    {
        return url.clone();
    }
    any.type_url.clone()
}

#[cfg(test)]
mod tests {

    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn round_trips_a_cluster_through_proto3_json() {
        let json = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "outbound|80||a.ns.svc.cluster.local",
            "type": "EDS",
            "connectTimeout": "1.5s",
            "eds_cluster_config": {"eds_config": {"ads": {}}},
        });
        let any = json_to_any(json).unwrap();
        let c: Cluster = unpack(&any).unwrap();
        assert_eq!(c.name, "outbound|80||a.ns.svc.cluster.local");
        assert_eq!(c.connect_timeout.unwrap().nanos, 500_000_000);
        let back = any_to_json(&any).unwrap();
        assert_eq!(back["connect_timeout"], "1.500s");
        assert_eq!(back["type"], "EDS");
        assert_eq!(
            back["@type"],
            "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        );
    }

    #[test]
    fn unknown_fields_of_known_types_are_errors() {
        let json = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "c",
            "allow_everything": true,
        });
        assert!(json_to_any(json).is_err());
    }

    #[test]
    fn unknown_typed_configs_become_typed_structs() {
        let json = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "l",
            "filter_chains": [{"filters": [{
                "name": "istio.stats",
                "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig", "x": 1}
            }]}],
        });
        let any = json_to_any(json).unwrap();
        let l: envoy_types::pb::envoy::config::listener::v3::Listener = unpack(&any).unwrap();
        let filter = &l.filter_chains[0].filters[0];
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(tc)) =
            &filter.config_type
        else {
            panic!("typed config lost");
        };
        assert_eq!(tc.type_url, STRUCT);
        assert_eq!(
            effective_type_url(tc),
            "type.googleapis.com/stats.PluginConfig"
        );
    }
}
