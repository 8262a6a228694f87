//! Envoy RBAC semantics, one matcher at a time, each with a request that must match and one that
//! must not. Written against the mutants `cargo mutants -p eastguard-policy` found unkilled (see
//! the README's mutation score): every case here fails when one operator of the evaluator or
//! compiler is flipped.

use super::*;
use crate::rbac::Action;
use std::net::IpAddr;

/// One filter with one policy `p` of `action`.
fn one(action: &str, permission: &str, principal: &str) -> Engine {
    engine(&format!(
        r#"
- name: f
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      action: {action}
      policies:
        p:
          permissions: [ {permission} ]
          principals: [ {principal} ]
"#
    ))
}

fn compile_err(permission: &str, principal: &str) -> CompileError {
    let yaml = format!(
        r#"
- name: f
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        p:
          permissions: [ {permission} ]
          principals: [ {principal} ]
"#
    );
    Engine::compile(&parse_filters(&yaml).unwrap()).unwrap_err()
}

fn at(path: &str) -> Request<'_> {
    Request {
        path,
        ..Default::default()
    }
}

fn with_headers<'a>(headers: &'a [(&'a str, &'a [u8])]) -> Request<'a> {
    Request {
        path: "/",
        headers,
        ..Default::default()
    }
}

fn as_caller(principal: &str) -> Request<'_> {
    Request {
        path: "/",
        principal: Some(principal),
        ..Default::default()
    }
}

const ANY: &str = "{ any: true }";

// === configuration keys and the engine's own API ===

#[test]
fn snake_case_field_names_are_read_and_policy_names_kept() {
    let e = engine(
        r#"
- name: f
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      action: DENY
      policies:
        deny_admin_paths:
          permissions: [ { url_path: { path: { prefix: /admin } } } ]
          principals: [ { not_id: { any: true } }, { any: true } ]
"#,
    );
    let d = e.evaluate(&at("/admin/x"));
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("deny_admin_paths"));
    assert!(e.evaluate(&at("/public")).allowed);
}

#[test]
fn compile_one_is_empty_and_policy_count() {
    let filters = parse_filters(
        r#"
- name: f
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      action: DENY
      policies:
        a: { permissions: [ { urlPath: { path: { prefix: /a } } } ], principals: [ { any: true } ] }
        b: { permissions: [ { urlPath: { path: { prefix: /b } } } ], principals: [ { any: true } ] }
    shadowRules:
      policies:
        s: { permissions: [ { any: true } ], principals: [ { any: true } ] }
"#,
    )
    .unwrap();
    let e = Engine::compile_one("only", &filters[0].typed_config.rbac).unwrap();
    let d = e.evaluate(&at("/b/1"));
    assert!(!d.allowed);
    assert_eq!(d.denied_by.as_deref(), Some("only"));
    assert!(e.evaluate(&at("/c")).allowed);
    assert!(!e.is_empty());
    assert_eq!(e.policy_count(), 3);
    let none = Engine::compile(&[]).unwrap();
    assert!(none.is_empty());
    assert_eq!(none.policy_count(), 0);
}

#[test]
fn a_policy_needs_permissions_and_principals() {
    for (perm, principal) in [("", ANY), (ANY, "")] {
        let yaml = format!(
            r#"
- name: f
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        p: {{ permissions: [ {perm} ], principals: [ {principal} ] }}
"#
        );
        let err = Engine::compile(&parse_filters(&yaml).unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("at least one permission and one principal"),
            "{err}"
        );
    }
}

// === ports and addresses ===

#[test]
fn destination_port_is_exact_and_bounded() {
    let e = one("ALLOW", "{ destinationPort: 8080 }", ANY);
    let r = |port| Request {
        path: "/",
        destination_port: port,
        ..Default::default()
    };
    assert!(e.evaluate(&r(8080)).allowed);
    assert!(!e.evaluate(&r(8081)).allowed);
    assert!(
        one("ALLOW", "{ destinationPort: 65535 }", ANY)
            .evaluate(&r(65535))
            .allowed
    );
    let err = compile_err("{ destinationPort: 65536 }", ANY);
    assert!(err.to_string().contains("port 65536 > 65535"), "{err}");
}

#[test]
fn cidr_ranges_match_by_prefix_bits() {
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let r = |remote: Option<IpAddr>| Request {
        path: "/",
        direct_remote_ip: remote,
        ..Default::default()
    };
    let e = one(
        "ALLOW",
        ANY,
        "{ directRemoteIp: { addressPrefix: 10.1.0.0, prefixLen: 20 } }",
    );
    assert!(e.evaluate(&r(ip("10.1.0.1"))).allowed);
    assert!(e.evaluate(&r(ip("10.1.15.255"))).allowed);
    assert!(!e.evaluate(&r(ip("10.1.16.0"))).allowed);
    assert!(!e.evaluate(&r(ip("10.2.0.1"))).allowed);
    // An IPv4-mapped IPv6 address is the IPv4 address.
    assert!(e.evaluate(&r(ip("::ffff:10.1.2.3"))).allowed);
    let host = one(
        "ALLOW",
        ANY,
        "{ directRemoteIp: { addressPrefix: 10.1.2.3, prefixLen: 32 } }",
    );
    assert!(host.evaluate(&r(ip("10.1.2.3"))).allowed);
    assert!(!host.evaluate(&r(ip("10.1.2.4"))).allowed);
    let v6 = one(
        "ALLOW",
        ANY,
        "{ remoteIp: { addressPrefix: \"fd00:1::\", prefixLen: 36 } }",
    );
    assert!(v6.evaluate(&r(ip("fd00:1:fff::1"))).allowed);
    assert!(!v6.evaluate(&r(ip("fd00:1:1000::1"))).allowed);
    assert!(!v6.evaluate(&r(ip("10.1.2.3"))).allowed);
    let err = compile_err(
        ANY,
        "{ directRemoteIp: { addressPrefix: 10.0.0.0, prefixLen: 33 } }",
    );
    assert!(err.to_string().contains("prefix length 33 > 32"), "{err}");
}

// === principals ===

#[test]
fn not_id_inverts_the_caller_match() {
    let e = one(
        "ALLOW",
        ANY,
        r#"{ notId: { authenticated: { principalName: { exact: "spiffe://td/ns/a/sa/bad" } } } }"#,
    );
    assert!(e.evaluate(&as_caller("spiffe://td/ns/a/sa/good")).allowed);
    assert!(!e.evaluate(&as_caller("spiffe://td/ns/a/sa/bad")).allowed);
}

#[test]
fn case_insensitive_principals_are_not_looked_up_by_exact_id() {
    let e = one(
        "ALLOW",
        ANY,
        r#"{ authenticated: { principalName: { exact: "spiffe://td/ns/a/sa/FE", ignoreCase: true } } }"#,
    );
    assert!(e.evaluate(&as_caller("spiffe://td/ns/a/sa/Fe")).allowed);
    assert!(e.evaluate(&as_caller("spiffe://td/ns/a/sa/fe")).allowed);
    assert!(!e.evaluate(&as_caller("spiffe://td/ns/a/sa/other")).allowed);
}

#[test]
fn a_namespace_regex_with_a_slash_is_not_a_namespace_key() {
    let e = one(
        "ALLOW",
        ANY,
        r#"{ authenticated: { principalName: { safeRegex: { regex: ".*/ns/a/b/.*" } } } }"#,
    );
    assert!(e.evaluate(&as_caller("spiffe://td/ns/a/b/x")).allowed);
    assert!(!e.evaluate(&as_caller("spiffe://td/ns/a/sa/x")).allowed);
}

#[test]
fn and_and_or_principals_are_indexed_by_what_they_require() {
    let e = engine(
        r#"
- name: f
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        both:
          permissions: [ { any: true } ]
          principals:
            - andIds: { ids: [ { authenticated: { principalName: { exact: "spiffe://td/ns/a/sa/x" } } }, { header: { name: x-a } } ] }
        either:
          permissions: [ { any: true } ]
          principals:
            - orIds: { ids: [ { authenticated: { principalName: { exact: "spiffe://td/ns/a/sa/y" } } }, { authenticated: { principalName: { exact: "spiffe://td/ns/a/sa/z" } } } ] }
"#,
    );
    let rules = e.filters[0].rules.as_ref().unwrap();
    assert!(
        rules.unindexed.is_empty(),
        "both policies have a required caller ID"
    );
    let keys: std::collections::BTreeSet<&str> = rules.by_principal.keys().map(|k| &**k).collect();
    assert_eq!(
        keys,
        [
            "spiffe://td/ns/a/sa/x",
            "spiffe://td/ns/a/sa/y",
            "spiffe://td/ns/a/sa/z"
        ]
        .into()
    );
    let h: &[(&str, &[u8])] = &[("x-a", b"1")];
    let r = Request {
        principal: Some("spiffe://td/ns/a/sa/x"),
        ..with_headers(h)
    };
    assert!(e.evaluate(&r).allowed);
    assert!(!e.evaluate(&as_caller("spiffe://td/ns/a/sa/x")).allowed);
    assert!(e.evaluate(&as_caller("spiffe://td/ns/a/sa/z")).allowed);
}

#[test]
fn the_deciding_policy_is_the_first_by_name_indexed_or_not() {
    // `a` and `b`, one keyed by the caller's ID and one not, both match: `a` decides, in either
    // arrangement.
    let exact = r#"permissions: [ { any: true } ], principals: [ { authenticated: { principalName: { exact: "spiffe://td/ns/a/sa/x" } } } ]"#;
    let open = "permissions: [ { any: true } ], principals: [ { any: true } ]";
    for (a, b) in [(exact, open), (open, exact)] {
        let e = engine(&format!(
            r#"
- name: f
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        a: {{ {a} }}
        b: {{ {b} }}
"#
        ));
        let d = e.evaluate(&as_caller("spiffe://td/ns/a/sa/x"));
        assert!(d.allowed);
        assert_eq!(d.policy.as_deref(), Some("a"));
    }
}

// === paths ===

#[test]
fn deny_matches_lenient_readings_of_the_path_and_allow_does_not() {
    let deny = one("DENY", "{ urlPath: { path: { prefix: /admin } } }", ANY);
    assert!(
        !deny.evaluate(&at("/ADMIN/keys")).allowed,
        "a case-folding backend reads /admin"
    );
    assert!(deny.evaluate(&at("/public")).allowed);
    let allow = one("ALLOW", "{ urlPath: { path: { prefix: /admin } } }", ANY);
    assert!(!allow.evaluate(&at("/ADMIN/keys")).allowed);
    assert!(allow.evaluate(&at("/admin/keys")).allowed);
}

#[test]
fn paths_with_parameters_are_read_both_ways() {
    let r = |path, alt| Request {
        path,
        path_without_params: Some(alt),
        ..Default::default()
    };
    // DENY: either reading.
    let deny = one("DENY", "{ urlPath: { path: { exact: /admin } } }", ANY);
    assert!(!deny.evaluate(&r("/admin;x", "/admin")).allowed);
    let deny_main = one(
        "DENY",
        "{ urlPath: { path: { exact: \"/admin;x\" } } }",
        ANY,
    );
    assert!(!deny_main.evaluate(&r("/admin;x", "/admin")).allowed);
    // … and the lenient readings of the main path, with parameters present too.
    let deny_prefix = one("DENY", "{ urlPath: { path: { prefix: /admin } } }", ANY);
    assert!(!deny_prefix.evaluate(&r("/ADMIN;x", "/ADMIN")).allowed);
    assert!(deny_prefix.evaluate(&r("/public;x", "/public")).allowed);
    // ALLOW: both readings.
    let allow = one("ALLOW", "{ urlPath: { path: { exact: /public } } }", ANY);
    assert!(!allow.evaluate(&r("/public;x", "/public")).allowed);
    let allow_prefix = one("ALLOW", "{ urlPath: { path: { prefix: /public } } }", ANY);
    assert!(allow_prefix.evaluate(&r("/public;x", "/public")).allowed);
    assert!(!allow_prefix.evaluate(&r("/public;x", "/admin")).allowed);
}

#[test]
fn path_and_query_and_control_characters() {
    let p = crate::path::normalize("/a/./b?x=1&y").unwrap();
    assert_eq!(p.path_and_query(), "/a/b?x=1&y");
    assert_eq!(
        crate::path::normalize("/a/b").unwrap().path_and_query(),
        "/a/b"
    );
    // Control characters are refused; a space (0x20) is not one.
    assert!(crate::path::normalize("/a\x1fb").is_err());
    assert!(crate::path::normalize("/a\x7fb").is_err());
    assert_eq!(crate::path::normalize("/a b").unwrap().path, "/a b");
}

// === headers ===

#[test]
fn each_legacy_header_match_field_is_its_own_matcher() {
    let h = |v: &'static [u8]| -> [(&'static str, &'static [u8]); 1] { [("x-a", v)] };
    let cases: [(&str, &[u8], &[u8]); 6] = [
        ("exactMatch: admin", b"admin", b"admin2"),
        ("prefixMatch: adm", b"admin", b"xadmin"),
        ("suffixMatch: min", b"admin", b"admins"),
        ("containsMatch: dmi", b"xadminx", b"amdin"),
        ("safeRegexMatch: { regex: \"a.m+in\" }", b"admmin", b"amin"),
        (
            "stringMatch: { exact: admin, ignoreCase: true }",
            b"ADMIN",
            b"admi",
        ),
    ];
    for (field, yes, no) in cases {
        let e = one(
            "ALLOW",
            &format!("{{ header: {{ name: x-a, {field} }} }}"),
            ANY,
        );
        assert!(
            e.evaluate(&with_headers(&h(yes))).allowed,
            "{field} on {yes:?}"
        );
        assert!(
            !e.evaluate(&with_headers(&h(no))).allowed,
            "{field} on {no:?}"
        );
        assert!(
            !e.evaluate(&with_headers(&[])).allowed,
            "{field} on a missing header"
        );
    }
}

#[test]
fn a_header_matcher_with_only_a_name_means_present() {
    let h: &[(&str, &[u8])] = &[("x-a", b"")];
    for m in [
        "{ header: { name: x-a } }",
        "{ header: { name: x-a, presentMatch: true } }",
    ] {
        let e = one("ALLOW", m, ANY);
        assert!(e.evaluate(&with_headers(h)).allowed, "{m}");
        assert!(!e.evaluate(&with_headers(&[])).allowed, "{m}");
    }
    let absent = one(
        "ALLOW",
        "{ header: { name: x-a, presentMatch: false } }",
        ANY,
    );
    assert!(!absent.evaluate(&with_headers(h)).allowed);
    assert!(absent.evaluate(&with_headers(&[])).allowed);
    let two = compile_err(
        "{ header: { name: x-a, exactMatch: a, prefixMatch: b } }",
        ANY,
    );
    assert!(
        two.to_string().contains("more than one match kind"),
        "{two}"
    );
}

#[test]
fn a_missing_header_matches_only_when_treated_as_empty() {
    let anything = one(
        "ALLOW",
        "{ header: { name: x-a, safeRegexMatch: { regex: \".*\" } } }",
        ANY,
    );
    assert!(!anything.evaluate(&with_headers(&[])).allowed);
    let empty_ok = one(
        "ALLOW",
        "{ header: { name: x-a, exactMatch: \"\", treatMissingHeaderAsEmpty: true } }",
        ANY,
    );
    assert!(empty_ok.evaluate(&with_headers(&[])).allowed);
    let needs_x = one(
        "ALLOW",
        "{ header: { name: x-a, exactMatch: x, treatMissingHeaderAsEmpty: true } }",
        ANY,
    );
    assert!(!needs_x.evaluate(&with_headers(&[])).allowed);
}

#[test]
fn allow_on_a_repeated_header_needs_every_value() {
    let e = one(
        "ALLOW",
        "{ header: { name: x-role, prefixMatch: reader } }",
        ANY,
    );
    let both: &[(&str, &[u8])] = &[("x-role", b"reader"), ("x-role", b"writer")];
    assert!(!e.evaluate(&with_headers(both)).allowed);
    let same: &[(&str, &[u8])] = &[("x-role", b"reader"), ("x-role", b"reader2")];
    assert!(e.evaluate(&with_headers(same)).allowed);
}

#[test]
fn deny_on_a_header_matches_a_value_a_backend_trims() {
    let e = one(
        "DENY",
        "{ header: { name: x-user, exactMatch: admin } }",
        ANY,
    );
    for v in [&b" admin"[..], b"admin ", b"guest, admin", b"admin"] {
        let h: &[(&str, &[u8])] = &[("x-user", v)];
        assert!(
            !e.evaluate(&with_headers(h)).allowed,
            "{:?}",
            String::from_utf8_lossy(v)
        );
    }
    let h: &[(&str, &[u8])] = &[("x-user", b"guest")];
    assert!(e.evaluate(&with_headers(h)).allowed);
}

#[test]
fn the_authority_is_matched_with_and_without_its_port() {
    let authority =
        |v: &'static str| -> [(&'static str, &'static [u8]); 1] { [(":authority", v.as_bytes())] };
    let deny = one(
        "DENY",
        "{ header: { name: \":authority\", exactMatch: admin.internal } }",
        ANY,
    );
    for host in ["admin.internal", "admin.internal:8080"] {
        assert!(
            !deny.evaluate(&with_headers(&authority(host))).allowed,
            "{host}"
        );
    }
    for host in ["admin.internal:", "admin.internal:x1", "other:8080"] {
        assert!(
            deny.evaluate(&with_headers(&authority(host))).allowed,
            "{host}"
        );
    }
    let deny6 = one(
        "DENY",
        "{ header: { name: \":authority\", exactMatch: \"[::1]\" } }",
        ANY,
    );
    assert!(
        !deny6
            .evaluate(&with_headers(&authority("[::1]:8080")))
            .allowed
    );
    assert!(!deny6.evaluate(&with_headers(&authority("[::1]"))).allowed);
    // An unclosed bracket is not a host with a port.
    let open = one(
        "DENY",
        "{ header: { name: \":authority\", exactMatch: \"[::1\" } }",
        ANY,
    );
    assert!(
        open.evaluate(&with_headers(&authority("[::1:8080")))
            .allowed
    );
    // ALLOW holds only if both readings match.
    let allow = one(
        "ALLOW",
        "{ header: { name: \":authority\", exactMatch: admin.internal } }",
        ANY,
    );
    assert!(
        allow
            .evaluate(&with_headers(&authority("admin.internal")))
            .allowed
    );
    assert!(
        !allow
            .evaluate(&with_headers(&authority("admin.internal:8080")))
            .allowed
    );
}

#[test]
fn a_case_insensitive_literal_regex_is_not_taken_as_case_sensitive() {
    let e = one(
        "ALLOW",
        ANY,
        r#"{ header: { name: x-a, stringMatch: { safeRegex: { regex: ".*ADMIN.*" }, ignoreCase: true } } }"#,
    );
    let h: &[(&str, &[u8])] = &[("x-a", b"the Admin user")];
    assert!(e.evaluate(&with_headers(h)).allowed);
    let h: &[(&str, &[u8])] = &[("x-a", b"the user")];
    assert!(!e.evaluate(&with_headers(h)).allowed);
}

// === dynamic metadata ===

#[test]
fn metadata_matchers() {
    let md: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        r#"{"jwt": {"payload": {"iss": "https://issuer", "admin": true, "groups": ["ops", "dev"]}}}"#,
    )
    .unwrap();
    let r = Request {
        path: "/",
        metadata: Some(&md),
        ..Default::default()
    };
    let bare = at("/");
    let meta = |path: &str, value: &str, invert: bool| {
        let keys: Vec<String> = path.split('.').map(|k| format!("{{ key: {k} }}")).collect();
        one(
            "ALLOW",
            &format!(
                "{{ metadata: {{ filter: jwt, path: [ {} ], value: {value}, invert: {invert} }} }}",
                keys.join(", ")
            ),
            ANY,
        )
    };
    let iss = meta(
        "payload.iss",
        "{ stringMatch: { exact: \"https://issuer\" } }",
        false,
    );
    assert!(iss.evaluate(&r).allowed);
    assert!(!iss.evaluate(&bare).allowed);
    let other = meta("payload.iss", "{ stringMatch: { exact: other } }", false);
    assert!(!other.evaluate(&r).allowed);
    let inverted = meta("payload.iss", "{ stringMatch: { exact: other } }", true);
    assert!(inverted.evaluate(&r).allowed);
    assert!(
        meta("payload.admin", "{ boolMatch: true }", false)
            .evaluate(&r)
            .allowed
    );
    assert!(
        !meta("payload.admin", "{ boolMatch: false }", false)
            .evaluate(&r)
            .allowed
    );
    assert!(
        meta(
            "payload.groups",
            "{ listMatch: { oneOf: { stringMatch: { exact: dev } } } }",
            false
        )
        .evaluate(&r)
        .allowed
    );
    assert!(
        !meta(
            "payload.groups",
            "{ listMatch: { oneOf: { stringMatch: { exact: qa } } } }",
            false
        )
        .evaluate(&r)
        .allowed
    );
    assert!(
        meta("payload.iss", "{ presentMatch: true }", false)
            .evaluate(&r)
            .allowed
    );
    assert!(
        !meta("payload.nope", "{ presentMatch: true }", false)
            .evaluate(&r)
            .allowed
    );
    assert!(
        meta("payload.nope", "{ presentMatch: false }", false)
            .evaluate(&r)
            .allowed
    );
    assert!(
        !meta("payload.iss", "{ presentMatch: false }", false)
            .evaluate(&r)
            .allowed
    );
}

// === URI templates ===

fn template(t: &str) -> Result<Engine, CompileError> {
    let yaml = format!(
        r#"
- name: f
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        p:
          permissions:
            - uriTemplate:
                name: envoy.path.match.uri_template.uri_template_matcher
                typedConfig:
                  "@type": type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig
                  pathTemplate: "{t}"
          principals: [ {{ any: true }} ]
"#
    );
    Engine::compile(&parse_filters(&yaml).unwrap())
}

#[test]
fn uri_template_variables_and_their_limits() {
    let e = template("/v1/{id}/items/{item_id}").unwrap();
    assert!(e.evaluate(&at("/v1/7/items/x")).allowed);
    assert!(!e.evaluate(&at("/v1/7/8/items/x")).allowed);
    let five = template("/{a}/{b}/{c}/{d}/{e}").unwrap();
    assert!(five.evaluate(&at("/1/2/3/4/5")).allowed);
    let six = template("/{a}/{b}/{c}/{d}/{e}/{f}").unwrap_err();
    assert!(six.to_string().contains("more than 5 variables"), "{six}");
    let glob = template("/files/{path=**}.pdf").unwrap();
    assert!(glob.evaluate(&at("/files/a/b.pdf")).allowed);
    assert!(!glob.evaluate(&at("/files/a/b.txt")).allowed);
    for bad in ["/{a{b}}", "/a}", "/{a}}", "/{1a}", "/{a-b}"] {
        assert!(template(bad).is_err(), "{bad} must be refused");
    }
}

// === Istio AuthorizationPolicy selection ===

#[test]
fn istio_policies_apply_by_namespace_root_namespace_and_selector() {
    let doc = |name: &str, ns: &str, selector: &str, rules: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{action: DENY{selector}{rules}}}\n"
        )
    };
    let to = |path: &str| format!(", rules: [{{to: [{{operation: {{paths: [\"{path}\"]}}}}]}}]");
    let yaml = [
        doc("here", "test", "", &to("/here")),
        doc("root", "istio-system", "", &to("/root")),
        doc("elsewhere", "other", "", &to("/elsewhere")),
        doc(
            "selected",
            "test",
            ", selector: {matchLabels: {app: server}}",
            &to("/selected"),
        ),
        doc(
            "not-selected",
            "test",
            ", selector: {matchLabels: {app: client}}",
            &to("/not-selected"),
        ),
        doc("no-rules", "test", "", ""),
    ]
    .join("---\n");
    let policies = crate::istio::parse(&yaml).unwrap();
    let names: Vec<&str> = policies.iter().map(|p| p.name()).collect();
    assert_eq!(
        names,
        [
            "here",
            "root",
            "elsewhere",
            "selected",
            "not-selected",
            "no-rules"
        ]
    );
    let target = crate::istio::Target {
        namespace: "test".into(),
        labels: [("app".to_owned(), "server".to_owned())].into(),
        root_namespace: "istio-system".into(),
        trust_domain: "cluster.local".into(),
        trust_domain_aliases: vec![],
    };
    let e = Engine::compile(&crate::istio::translate(&policies, &target, false).unwrap()).unwrap();
    for path in ["/here", "/root", "/selected"] {
        assert!(!e.evaluate(&at(path)).allowed, "{path}");
    }
    for path in ["/elsewhere", "/not-selected", "/other"] {
        assert!(e.evaluate(&at(path)).allowed, "{path}");
    }
    // A DENY policy without rules matches nothing and adds no policy (an ALLOW one would deny all).
    assert_eq!(e.policy_count(), 3);
    assert_eq!(e.filters[0].rules.as_ref().unwrap().action, Action::Deny);
}

// === Istio translation details ===

fn istio_engine(yaml: &str, aliases: &[&str]) -> Engine {
    let target = crate::istio::Target {
        namespace: "test".into(),
        labels: [("app".to_owned(), "server".to_owned())].into(),
        root_namespace: "istio-system".into(),
        trust_domain: "cluster.local".into(),
        trust_domain_aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
    };
    let policies = crate::istio::parse(yaml).unwrap();
    Engine::compile(&crate::istio::translate(&policies, &target, false).unwrap()).unwrap()
}

const AP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: test}\n";

#[test]
fn an_allow_policy_with_an_empty_rule_list_allows_nothing() {
    let e = istio_engine(&format!("{AP}spec: {{action: ALLOW, rules: []}}\n"), &[]);
    assert!(
        !e.evaluate(&as_caller("spiffe://cluster.local/ns/test/sa/a"))
            .allowed
    );
}

#[test]
fn an_untranslatable_rule_grants_nothing_in_allow_and_denies_all_in_deny() {
    let rule = "rules: [{when: [{key: request.unknown, values: [x]}]}]";
    let allow = istio_engine(&format!("{AP}spec: {{action: ALLOW, {rule}}}\n"), &[]);
    assert!(
        !allow
            .evaluate(&as_caller("spiffe://cluster.local/ns/test/sa/a"))
            .allowed
    );
    let deny = istio_engine(&format!("{AP}spec: {{action: DENY, {rule}}}\n"), &[]);
    assert!(
        !deny
            .evaluate(&as_caller("spiffe://cluster.local/ns/test/sa/a"))
            .allowed
    );
    // An `experimental.` key that is not `experimental.envoy.filters.…` is unknown: the rule
    // grants nothing even to a request whose metadata would match it read as a filter path.
    let e = istio_engine(
        &format!(
            "{AP}spec: {{action: ALLOW, rules: [{{when: [{{key: \"experimental.other[x]\", values: [y]}}]}}]}}\n"
        ),
        &[],
    );
    let md: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"other": {"x": "y"}}"#).unwrap();
    let r = Request {
        path: "/",
        metadata: Some(&md),
        ..Default::default()
    };
    assert!(!e.evaluate(&r).allowed);
}

#[test]
fn any_request_principal_means_an_authenticated_request() {
    let e = istio_engine(
        &format!(
            "{AP}spec: {{action: ALLOW, rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]}}\n"
        ),
        &[],
    );
    let md: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        r#"{"envoy.filters.http.jwt_authn": {"payload": {"iss": "https://issuer", "sub": "user"}}}"#,
    )
    .unwrap();
    let with = Request {
        path: "/",
        metadata: Some(&md),
        ..Default::default()
    };
    assert!(e.evaluate(&with).allowed);
    assert!(!e.evaluate(&at("/")).allowed);
    // `iss/sub` names one issuer and subject.
    let one = istio_engine(
        &format!(
            "{AP}spec: {{action: ALLOW, rules: [{{from: [{{source: {{requestPrincipals: [\"https://issuer/user\"]}}}}]}}]}}\n"
        ),
        &[],
    );
    assert!(one.evaluate(&with).allowed);
    let other: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        r#"{"envoy.filters.http.jwt_authn": {"payload": {"iss": "https://issuer", "sub": "other"}}}"#,
    )
    .unwrap();
    let r = Request {
        path: "/",
        metadata: Some(&other),
        ..Default::default()
    };
    assert!(!one.evaluate(&r).allowed);
}

#[test]
fn principals_are_expanded_to_trust_domain_aliases() {
    let yaml = format!(
        "{AP}spec: {{action: ALLOW, rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/a/sa/x\", \"other.td/ns/a/sa/y\", \"*\"]}}}}]}}]}}\n"
    );
    let e = istio_engine(&yaml, &["old.td"]);
    assert!(
        e.evaluate(&as_caller("spiffe://cluster.local/ns/a/sa/x"))
            .allowed
    );
    assert!(e.evaluate(&as_caller("spiffe://old.td/ns/a/sa/x")).allowed);
    // An unknown trust domain is kept as written, not expanded.
    assert!(
        e.evaluate(&as_caller("spiffe://other.td/ns/a/sa/y"))
            .allowed
    );
    let strict = istio_engine(
        &format!(
            "{AP}spec: {{action: ALLOW, rules: [{{from: [{{source: {{principals: [\"other.td/ns/a/sa/y\"]}}}}]}}]}}\n"
        ),
        &["old.td"],
    );
    assert!(
        !strict
            .evaluate(&as_caller("spiffe://old.td/ns/a/sa/y"))
            .allowed
    );
    assert!(
        !strict
            .evaluate(&as_caller("spiffe://cluster.local/ns/a/sa/y"))
            .allowed
    );
    // Without aliases, only the principal itself.
    let plain = istio_engine(
        &format!(
            "{AP}spec: {{action: ALLOW, rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/a/sa/x\"]}}}}]}}]}}\n"
        ),
        &[],
    );
    assert!(
        plain
            .evaluate(&as_caller("spiffe://cluster.local/ns/a/sa/x"))
            .allowed
    );
    assert!(
        !plain
            .evaluate(&as_caller("spiffe://old.td/ns/a/sa/x"))
            .allowed
    );
}

#[test]
fn a_selected_peer_authentication_applies_only_in_its_namespace() {
    use crate::istio::peer_authn::{self, MtlsMode};
    let yaml = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: other, namespace: elsewhere}\n\
                spec: {selector: {matchLabels: {app: server}}, mtls: {mode: DISABLE}}\n";
    let target = crate::istio::Target {
        namespace: "test".into(),
        labels: [("app".to_owned(), "server".to_owned())].into(),
        root_namespace: "istio-system".into(),
        trust_domain: "cluster.local".into(),
        trust_domain_aliases: vec![],
    };
    let ps = peer_authn::parse(yaml).unwrap();
    let s = peer_authn::effective_with_default(&ps, &target, MtlsMode::Strict);
    assert_eq!(s.mode, MtlsMode::Strict);
}

#[test]
fn rbac_action_allow_is_the_omitted_default() {
    let allow: crate::rbac::Rbac = serde_json::from_str("{}").unwrap();
    assert_eq!(allow.action, Action::Allow);
    assert_eq!(serde_json::to_string(&allow).unwrap(), "{}");
    let deny = crate::rbac::Rbac {
        action: Action::Deny,
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_string(&deny).unwrap(),
        r#"{"action":"DENY"}"#
    );
}

// === path normalization corners ===

#[test]
fn dot_segments_at_the_end_keep_the_trailing_slash() {
    let n = |p: &str| crate::path::normalize(p).unwrap().path;
    assert_eq!(n("/a/."), "/a/");
    assert_eq!(n("/a/b/.."), "/a/");
    assert_eq!(n("/a/./b"), "/a/b");
    assert_eq!(n("/a/../b"), "/b");
    assert_eq!(n("/a//b"), "/a/b");
    assert_eq!(n("/a/"), "/a/");
}

#[test]
fn an_authority_with_a_non_numeric_port_part_is_not_split() {
    let a = crate::path::normalize_authority;
    assert_eq!(a("Admin.Internal.:8080"), "admin.internal:8080");
    assert_eq!(a("admin.internal."), "admin.internal");
    assert_eq!(a("admin.internal.:"), "admin.internal.:");
    assert_eq!(a("admin.internal.:x"), "admin.internal.:x");
    assert_eq!(a("[::1]:80"), "[::1]:80");
}

#[test]
fn another_namespaces_peer_authentication_never_applies() {
    use crate::istio::peer_authn::{self, MtlsMode};
    let yaml = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: all, namespace: elsewhere}\n\
                spec: {mtls: {mode: DISABLE}}\n";
    let target = crate::istio::Target {
        namespace: "test".into(),
        labels: Default::default(),
        root_namespace: "istio-system".into(),
        trust_domain: "cluster.local".into(),
        trust_domain_aliases: vec![],
    };
    let ps = peer_authn::parse(yaml).unwrap();
    assert_eq!(
        peer_authn::effective_with_default(&ps, &target, MtlsMode::Strict).mode,
        MtlsMode::Strict
    );
}

#[test]
fn wildcard_principals_are_not_expanded_to_aliases() {
    let rule = |p: &str| {
        format!(
            "{AP}spec: {{action: ALLOW, rules: [{{from: [{{source: {{principals: [\"{p}\"]}}}}]}}]}}\n"
        )
    };
    // `*/ns/a/sa/x`: any trust domain, this service account.
    let any_td = istio_engine(&rule("*/ns/a/sa/x"), &["old.td"]);
    for id in [
        "spiffe://cluster.local/ns/a/sa/x",
        "spiffe://third.td/ns/a/sa/x",
    ] {
        assert!(any_td.evaluate(&as_caller(id)).allowed, "{id}");
    }
    assert!(
        !any_td
            .evaluate(&as_caller("spiffe://cluster.local/ns/a/sa/y"))
            .allowed
    );
    // `*`: any authenticated caller.
    let anyone = istio_engine(&rule("*"), &["old.td"]);
    assert!(
        anyone
            .evaluate(&as_caller("spiffe://third.td/ns/b/sa/z"))
            .allowed
    );
    assert!(
        !anyone.evaluate(&at("/")).allowed,
        "a plaintext caller has no principal"
    );
    // A prefix wildcard in the trust domain matches the aliases it covers, not others.
    let suffix = istio_engine(&rule("cluster.local/ns/a/sa/*"), &["old.td"]);
    assert!(
        suffix
            .evaluate(&as_caller("spiffe://old.td/ns/a/sa/q"))
            .allowed
    );
    assert!(
        !suffix
            .evaluate(&as_caller("spiffe://third.td/ns/a/sa/q"))
            .allowed
    );
}
