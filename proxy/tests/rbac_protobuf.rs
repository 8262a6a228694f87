//! RBAC filters are read from their protobuf messages (`policy::rbac::envoy`), not through proto3
//! JSON and a descriptor pool. These tests hold the two readings side by side: for Istio's golden
//! filters and for messages using every field the model knows, the protobuf reading must give the
//! very model the JSON reading gives, refuse what it refuses, and write back the same message.
#![expect(clippy::unwrap_used, reason = "test helpers panic on a broken corpus")]

use std::path::PathBuf;

use policy::rbac::{self, envoy as conv};
use prost::Message;
use xds::codec;
use xds::pb::envoy::config::rbac::v3 as pb;
use xds::pb::envoy::extensions::filters::{http, network};
use xds::pb::google::protobuf::Any;

/// The reading translation used before: proto3 JSON from the full descriptor pool, then serde.
fn through_json(any: &Any) -> Result<rbac::TypedFilterConfig, String> {
    let json = codec::any_to_json(any).map_err(|e| e.to_string())?;
    let name = if any.type_url == rbac::HTTP_RBAC_TYPE {
        rbac::HTTP_RBAC_FILTER
    } else {
        rbac::NETWORK_RBAC_FILTER
    };
    let value = policy::proto_json_keys(serde_json::json!({ "name": name, "typedConfig": json }));
    serde_json::from_value::<rbac::Filter>(value)
        .map(|f| f.typed_config)
        .map_err(|e| e.to_string())
}

/// Both readings agree, and writing the model back gives the message that was read.
fn check_same(any: &Any, what: &str) {
    let json = through_json(any);
    let proto = conv::from_any(any);
    match (&json, &proto) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}: the two readings differ"),
        (Err(_), Err(_)) => return,
        _ => panic!("{what}: JSON reading {json:?}, protobuf reading {proto:?}"),
    }
    let back = conv::to_any(&proto.unwrap()).unwrap();
    assert_eq!(back.type_url, any.type_url, "{what}");
    if any.type_url == rbac::HTTP_RBAC_TYPE {
        assert_eq!(
            http::rbac::v3::Rbac::decode(back.value.as_slice()).unwrap(),
            normalized_http(http::rbac::v3::Rbac::decode(any.value.as_slice()).unwrap()),
            "{what}: written back differently"
        );
    } else {
        assert_eq!(
            network::rbac::v3::Rbac::decode(back.value.as_slice()).unwrap(),
            normalized_network(network::rbac::v3::Rbac::decode(any.value.as_slice()).unwrap()),
            "{what}: written back differently"
        );
    }
}

/// The model keeps a CIDR's prefix length as a number (absent reads as 0): the message written
/// back always carries it.
fn normalized_rbac(r: &mut pb::Rbac) {
    fn cidr(c: &mut xds::pb::envoy::config::core::v3::CidrRange) {
        c.prefix_len.get_or_insert_with(Default::default);
    }
    fn principal(p: &mut pb::Principal) {
        use pb::principal::Identifier as I;
        match p.identifier.as_mut() {
            Some(I::AndIds(s) | I::OrIds(s)) => s.ids.iter_mut().for_each(principal),
            Some(I::NotId(p)) => principal(p),
            #[allow(deprecated)]
            Some(I::SourceIp(c) | I::DirectRemoteIp(c) | I::RemoteIp(c)) => cidr(c),
            _ => {}
        }
    }
    fn permission(p: &mut pb::Permission) {
        use pb::permission::Rule as R;
        match p.rule.as_mut() {
            Some(R::AndRules(s) | R::OrRules(s)) => s.rules.iter_mut().for_each(permission),
            Some(R::NotRule(p)) => permission(p),
            Some(R::DestinationIp(c)) => cidr(c),
            _ => {}
        }
    }
    for p in r.policies.values_mut() {
        p.principals.iter_mut().for_each(principal);
        p.permissions.iter_mut().for_each(permission);
    }
}

fn normalized_http(mut f: http::rbac::v3::Rbac) -> http::rbac::v3::Rbac {
    f.rules.iter_mut().for_each(normalized_rbac);
    f.shadow_rules.iter_mut().for_each(normalized_rbac);
    f
}

fn normalized_network(mut f: network::rbac::v3::Rbac) -> network::rbac::v3::Rbac {
    f.rules.iter_mut().for_each(normalized_rbac);
    f.shadow_rules.iter_mut().for_each(normalized_rbac);
    f
}

fn http_any(rules: pb::Rbac) -> Any {
    codec::pack(&http::rbac::v3::Rbac {
        rules: Some(rules),
        shadow_rules_stat_prefix: "istio_dry_run_allow_".into(),
        ..Default::default()
    })
}

fn one_policy(permission: serde_json::Value, principal: serde_json::Value) -> Any {
    let any = codec::json_to_any(serde_json::json!({
        "@type": rbac::HTTP_RBAC_TYPE,
        "rules": {
            "action": "DENY",
            "policies": { "p": { "permissions": [permission], "principals": [principal] } }
        },
        "shadow_rules_stat_prefix": "x_",
    }))
    .unwrap();
    assert_eq!(any.type_url, rbac::HTTP_RBAC_TYPE);
    any
}

#[test]
fn every_field_the_model_knows_reads_the_same_from_protobuf_as_from_json() {
    let sm = serde_json::json!({"safe_regex": {"regex": "spiffe://.+/ns/a/.*"}});
    let permissions = [
        serde_json::json!({"any": true}),
        serde_json::json!({"any": false}),
        serde_json::json!({"header": {"name": ":method", "exact_match": "GET"}}),
        serde_json::json!({"header": {"name": "x", "prefix_match": "a", "invert_match": true}}),
        serde_json::json!({"header": {"name": "x", "suffix_match": "a"}}),
        serde_json::json!({"header": {"name": "x", "contains_match": "a"}}),
        serde_json::json!({"header": {"name": "x", "present_match": true}}),
        serde_json::json!({"header": {"name": "x", "safe_regex_match": {"regex": "a.*", "google_re2": {}}}}),
        serde_json::json!({"header": {"name": "x", "string_match": {"exact": "a", "ignore_case": true}, "treat_missing_header_as_empty": true}}),
        serde_json::json!({"url_path": {"path": {"prefix": "/api/"}}}),
        serde_json::json!({"destination_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}),
        serde_json::json!({"destination_ip": {"address_prefix": "10.0.0.1"}}),
        serde_json::json!({"destination_port": 8080}),
        serde_json::json!({"destination_port_range": {"start": 8000, "end": 9000}}),
        serde_json::json!({"requested_server_name": {"suffix": ".svc"}}),
        serde_json::json!({"not_rule": {"or_rules": {"rules": [{"destination_port": 1}, {"and_rules": {"rules": [{"any": true}]}}]}}}),
        serde_json::json!({"metadata": {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": "payload"}, {"key": "sub"}], "value": {"list_match": {"one_of": {"string_match": {"exact": "u"}}}}, "invert": true}}),
        serde_json::json!({"metadata": {"filter": "f", "path": [{"key": "k"}], "value": {"or_match": {"value_matchers": [{"bool_match": true}, {"present_match": true}]}}}}),
        serde_json::json!({"uri_template": {"name": "uri-template", "typed_config": {"@type": rbac::URI_TEMPLATE_TYPE, "path_template": "/v1/{id}/*"}}}),
    ];
    let principals = [
        serde_json::json!({"any": true}),
        serde_json::json!({"authenticated": {"principal_name": sm}}),
        serde_json::json!({"authenticated": {}}),
        serde_json::json!({"source_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}}),
        serde_json::json!({"direct_remote_ip": {"address_prefix": "::1", "prefix_len": 128}}),
        serde_json::json!({"remote_ip": {"address_prefix": "192.168.0.0", "prefix_len": 24}}),
        serde_json::json!({"header": {"name": "x-user", "exact_match": "a"}}),
        serde_json::json!({"url_path": {"path": {"exact": "/a", "ignore_case": true}}}),
        serde_json::json!({"filter_state": {"key": "io.istio.peer_principal", "string_match": {"exact": "spiffe://td/ns/a/sa/b"}}}),
        serde_json::json!({"not_id": {"and_ids": {"ids": [{"or_ids": {"ids": [{"any": true}]}}]}}}),
        serde_json::json!({"metadata": {"filter": "istio_authn", "path": [{"key": "request.auth.principal"}], "value": {"string_match": {"contains": "x"}}}}),
    ];
    for (i, p) in permissions.iter().enumerate() {
        for (j, q) in principals.iter().enumerate() {
            let any = one_policy(p.clone(), q.clone());
            check_same(&any, &format!("permission {i}, principal {j}"));
            conv::from_any(&any).unwrap_or_else(|e| panic!("permission {i}, principal {j}: {e}"));
        }
    }
    // The network filter, its own fields, and every action.
    for action in 0..3 {
        let any = codec::pack(&network::rbac::v3::Rbac {
            rules: Some(pb::Rbac {
                action,
                ..Default::default()
            }),
            shadow_rules: Some(pb::Rbac::default()),
            stat_prefix: "tcp.".into(),
            shadow_rules_stat_prefix: "s_".into(),
            ..Default::default()
        });
        check_same(&any, &format!("network filter, action {action}"));
        conv::from_any(&any).unwrap();
    }
    let any = codec::pack(&http::rbac::v3::Rbac {
        rules_stat_prefix: "r_".into(),
        ..Default::default()
    });
    check_same(&any, "HTTP filter without rules");
}

/// Fields the model does not hold are refused by the protobuf reading, as by the JSON one: never
/// read as if they were not there (each of these would narrow or widen what a policy matches).
#[test]
fn a_field_the_model_does_not_hold_is_refused_by_both_readings() {
    let refused = [
        (
            "a CEL condition",
            codec::json_to_any(
                serde_json::json!({"@type": rbac::HTTP_RBAC_TYPE, "rules": {"policies": {"p": {
                "permissions": [{"any": true}], "principals": [{"any": true}],
                "condition": {"const_expr": {"bool_value": false}}}}}}),
            )
            .unwrap(),
        ),
        (
            "a header range match",
            one_policy(
                serde_json::json!({"header": {"name": "x", "range_match": {"start": 1, "end": 5}}}),
                serde_json::json!({"any": true}),
            ),
        ),
        (
            "a sourced_metadata permission",
            one_policy(
                serde_json::json!({"sourced_metadata": {"metadata_matcher": {"filter": "f", "path": [{"key": "k"}], "value": {"present_match": true}}}}),
                serde_json::json!({"any": true}),
            ),
        ),
        (
            "a double value match",
            one_policy(
                serde_json::json!({"any": true}),
                serde_json::json!({"metadata": {"filter": "f", "path": [{"key": "k"}], "value": {"double_match": {"exact": 1.0}}}}),
            ),
        ),
        (
            "a permission without a rule",
            http_any(pb::Rbac {
                policies: [(
                    "p".to_owned(),
                    pb::Policy {
                        permissions: vec![pb::Permission::default()],
                        principals: vec![pb::Principal {
                            identifier: Some(pb::principal::Identifier::Any(true)),
                        }],
                        ..Default::default()
                    },
                )]
                .into(),
                ..Default::default()
            }),
        ),
        (
            "audit logging options",
            http_any(pb::Rbac {
                audit_logging_options: Some(Default::default()),
                ..Default::default()
            }),
        ),
        (
            "an action this build does not know",
            http_any(pb::Rbac {
                action: 7,
                ..Default::default()
            }),
        ),
        (
            "per-rule stats",
            codec::pack(&http::rbac::v3::Rbac {
                track_per_rule_stats: true,
                ..Default::default()
            }),
        ),
        (
            "a network filter's continuous enforcement",
            codec::pack(&network::rbac::v3::Rbac {
                enforcement_type: 1,
                ..Default::default()
            }),
        ),
        (
            "a network filter's delayed deny",
            codec::pack(&network::rbac::v3::Rbac {
                delay_deny: Some(Default::default()),
                ..Default::default()
            }),
        ),
        (
            "a URI template of another type",
            one_policy(
                serde_json::json!({"uri_template": {"name": "t", "typed_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}}}),
                serde_json::json!({"any": true}),
            ),
        ),
        (
            "a message that is not an RBAC filter",
            codec::pack(&pb::Rbac::default()),
        ),
    ];
    for (what, any) in refused {
        let e = conv::from_any(&any).expect_err(what);
        assert!(!e.field.is_empty(), "{what}: {e}");
        if any.type_url == rbac::HTTP_RBAC_TYPE || any.type_url == rbac::NETWORK_RBAC_TYPE {
            assert!(
                through_json(&any).is_err(),
                "{what}: the JSON reading took it"
            );
        }
    }
    let e = conv::from_any(&one_policy(
        serde_json::json!({"header": {"name": "x", "range_match": {"start": 1, "end": 5}}}),
        serde_json::json!({"any": true}),
    ))
    .unwrap_err();
    assert_eq!(
        e.field,
        "rules.policies[p].permissions[0].header.range_match"
    );
}

/// Two match kinds on one matcher cannot be written as Envoy's oneof: refused, not one chosen.
#[test]
fn the_model_with_two_match_kinds_is_not_written_as_one() {
    let value = policy::proto_json_keys(serde_json::json!({
        "name": rbac::HTTP_RBAC_FILTER,
        "typedConfig": {"@type": rbac::HTTP_RBAC_TYPE, "rules": {"action": "DENY", "policies": {"p": {
            "permissions": [{"header": {"name": "x", "exact_match": "a", "prefix_match": "b"}}],
            "principals": [{"any": true}]}}}},
    }));
    let f: rbac::Filter = serde_json::from_value(value).unwrap();
    assert!(conv::to_any(&f.typed_config).is_err());
}

fn corpus() -> PathBuf {
    let dir = std::env::var_os("EASTGUARD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
        .join("conformance/istio-authz");
    assert!(
        dir.is_dir(),
        "{} is missing (put shared/ beside the repo or set EASTGUARD_SHARED)",
        dir.display()
    );
    dir
}

#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn istio_golden_filters_read_the_same_from_protobuf_as_from_json() {
    let dir = corpus();
    let mut checked = 0;
    for kind in ["http", "tcp"] {
        for entry in std::fs::read_dir(dir.join(kind)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.contains("-out") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let value: serde_json::Value = serde_yaml::from_str(&text).unwrap();
            let Some(tc) = value.get("typedConfig") else {
                continue;
            };
            let type_url = tc["@type"].as_str().unwrap_or_default();
            if type_url != rbac::HTTP_RBAC_TYPE && type_url != rbac::NETWORK_RBAC_TYPE {
                continue;
            }
            let any = codec::json_to_any(tc.clone()).unwrap();
            check_same(&any, &format!("{kind}/{name}"));
            conv::from_any(&any).unwrap_or_else(|e| panic!("{kind}/{name}: {e}"));
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} golden RBAC filters found");
}
