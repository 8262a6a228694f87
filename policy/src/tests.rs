use super::*;

mod semantics;

fn engine(yaml: &str) -> Engine {
    Engine::compile(&parse_filters(yaml).unwrap()).unwrap()
}

const DENY_ADMIN_ALLOW_FRONTEND: &str = r#"
- name: envoy.filters.http.rbac
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      action: DENY
      policies:
        deny-admin:
          permissions:
            - orRules: { rules: [ { urlPath: { path: { prefix: /admin } } }, { header: { name: x-user, stringMatch: { exact: admin } } } ] }
          principals: [ { any: true } ]
- name: envoy.filters.http.rbac
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        allow-frontend:
          permissions: [ { any: true } ]
          principals: [ { authenticated: { principalName: { exact: "spiffe://td/ns/a/sa/frontend" } } } ]
        allow-role:
          permissions: [ { header: { name: x-role, stringMatch: { exact: reader } } } ]
          principals: [ { any: true } ]
"#;

fn req<'a>(
    principal: Option<&'a str>,
    path: &'a str,
    alt: Option<&'a str>,
    headers: &'a [(&'a str, &'a [u8])],
) -> Request<'a> {
    Request {
        principal,
        path,
        path_without_params: alt,
        headers,
        ..Default::default()
    }
}

#[test]
fn deny_then_allow_in_order() {
    let e = engine(DENY_ADMIN_ALLOW_FRONTEND);
    let fe = Some("spiffe://td/ns/a/sa/frontend");
    let d = e.evaluate(&req(fe, "/orders", None, &[]));
    assert!(d.allowed);
    assert_eq!(d.policy.as_deref(), Some("allow-frontend"));
    let d = e.evaluate(&req(fe, "/admin/x", None, &[]));
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("deny-admin"));
    let d = e.evaluate(&req(
        Some("spiffe://td/ns/a/sa/other"),
        "/orders",
        None,
        &[],
    ));
    assert!(!d.allowed && d.policy.is_none(), "no ALLOW policy matched");
}

#[test]
fn duplicate_headers_cannot_sidestep_deny_or_widen_allow() {
    let e = engine(DENY_ADMIN_ALLOW_FRONTEND);
    let fe = Some("spiffe://td/ns/a/sa/frontend");
    // DENY on x-user: admin, sent twice or joined: denied either way.
    let h: &[(&str, &[u8])] = &[("x-user", b"guest"), ("x-user", b"admin")];
    assert!(!e.evaluate(&req(fe, "/orders", None, h)).allowed);
    let h: &[(&str, &[u8])] = &[("x-user", b"admin")];
    assert!(!e.evaluate(&req(fe, "/orders", None, h)).allowed);
    let h: &[(&str, &[u8])] = &[("x-user", b"guest, admin")];
    assert!(!e.evaluate(&req(fe, "/orders", None, h)).allowed);
    // ALLOW on x-role: reader must hold for every value.
    let other = Some("spiffe://td/ns/a/sa/other");
    let h: &[(&str, &[u8])] = &[("x-role", b"reader")];
    assert!(e.evaluate(&req(other, "/orders", None, h)).allowed);
    let h: &[(&str, &[u8])] = &[("x-role", b"reader"), ("x-role", b"writer")];
    assert!(!e.evaluate(&req(other, "/orders", None, h)).allowed);
}

#[test]
fn path_parameters_cannot_sidestep_deny() {
    let e = engine(DENY_ADMIN_ALLOW_FRONTEND);
    let fe = Some("spiffe://td/ns/a/sa/frontend");
    let p = path::normalize("/x;a/../admin;x=y").unwrap();
    let alt = p.without_params();
    assert!(!e.evaluate(&req(fe, &p.path, alt.as_deref(), &[])).allowed);
}

#[test]
fn not_flips_the_mode() {
    // ALLOW unless x-user is admin (under any reading).
    let e = engine(
        r#"
- name: envoy.filters.http.rbac
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        not-admin:
          permissions: [ { notRule: { header: { name: x-user, stringMatch: { exact: admin } } } } ]
          principals: [ { any: true } ]
"#,
    );
    let h: &[(&str, &[u8])] = &[("x-user", b"guest"), ("x-user", b"admin")];
    assert!(!e.evaluate(&req(None, "/", None, h)).allowed);
    let h: &[(&str, &[u8])] = &[("x-user", b"guest")];
    assert!(e.evaluate(&req(None, "/", None, h)).allowed);
}

#[test]
fn log_and_shadow_never_change_the_decision() {
    let e = engine(
        r#"
- name: envoy.filters.http.rbac
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      action: LOG
      policies:
        audit: { permissions: [ { any: true } ], principals: [ { any: true } ] }
    shadowRules:
      action: DENY
      policies:
        would-deny: { permissions: [ { any: true } ], principals: [ { any: true } ] }
"#,
    );
    let d = e.evaluate(&req(None, "/", None, &[]));
    assert!(d.allowed && d.logged);
    assert_eq!(d.shadow, Some((false, Some("would-deny".into()))));
}

#[test]
fn bad_config_is_refused_not_partly_applied() {
    for (bad, why) in [
        (
            r#"[{name: x, typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {policies: {p: {permissions: [{any: true}], principals: [{authenticated: {principalName: {safeRegex: {regex: "("}}}}]}}}}}]"#,
            "bad regex",
        ),
        (
            r#"[{name: x, typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {policies: {p: {permissions: [{orRules: {rules: []}}], principals: [{any: true}]}}}}}]"#,
            "orRules is empty",
        ),
        (
            r#"[{name: x, typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {policies: {p: {permissions: [{destinationIp: {addressPrefix: "10.0.0.0", prefixLen: 40}}], principals: [{any: true}]}}}}}]"#,
            "prefix length",
        ),
        (
            r#"[{name: x, typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz, rules: {}}}]"#,
            "unsupported",
        ),
        (
            r#"[{name: x, typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {policies: {p: {permissions: [{any: false}], principals: [{any: true}]}}}}}]"#,
            "any must be true",
        ),
    ] {
        let err = Engine::compile(&parse_filters(bad).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{why}: {err}");
    }
    // Unknown fields are errors, never silently dropped.
    let err = parse_filters(r#"[{name: x, typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {policies: {p: {permissions: [{any: true}], principals: [{any: true}], condition: {}}}}}}]"#).unwrap_err();
    assert!(err.to_string().contains("condition"), "{err}");
}

#[test]
fn principal_index_never_changes_a_decision() {
    // Policies of every principal shape: exact, or of exacts, and with a regex, not, any, prefix.
    let shapes = [
        r#"{ authenticated: { principalName: { exact: "spiffe://td/a" } } }"#,
        r#"{ orIds: { ids: [ { authenticated: { principalName: { exact: "spiffe://td/a" } } }, { authenticated: { principalName: { exact: "spiffe://td/b" } } } ] } }"#,
        r#"{ andIds: { ids: [ { authenticated: { principalName: { exact: "spiffe://td/b" } } }, { header: { name: x, presentMatch: true } } ] } }"#,
        r#"{ notId: { authenticated: { principalName: { exact: "spiffe://td/a" } } } }"#,
        r#"{ authenticated: { principalName: { prefix: "spiffe://td/" } } }"#,
        r#"{ authenticated: { principalName: { exact: "SPIFFE://TD/A", ignoreCase: true } } }"#,
        r#"{ any: true }"#,
        r#"{ orIds: { ids: [ { authenticated: { principalName: { exact: "spiffe://td/c" } } }, { any: true } ] } }"#,
        r#"{ authenticated: { principalName: { safeRegex: { regex: ".*/ns/team/.*" } } } }"#,
        r#"{ orIds: { ids: [ { authenticated: { principalName: { safeRegex: { regex: ".*/ns/x/.*" } } } }, { authenticated: { principalName: { exact: "spiffe://td/a" } } } ] } }"#,
    ];
    for action in ["ALLOW", "DENY"] {
        let mut yaml = format!(
            "- name: f\n  typedConfig:\n    \"@type\": {}\n    rules:\n      action: {action}\n      policies:\n",
            rbac::HTTP_RBAC_TYPE
        );
        for (i, shape) in shapes.iter().enumerate() {
            yaml.push_str(&format!("        p{i}: {{ permissions: [ {{ header: {{ name: y, exactMatch: \"{i}\" }} }} ], principals: [ {shape} ] }}\n"));
        }
        let engine = engine(&yaml);
        let rules = engine.filters[0].rules.as_ref().unwrap();
        assert!(
            !rules.by_principal.is_empty()
                && !rules.by_namespace.is_empty()
                && !rules.unindexed.is_empty()
        );
        for principal in [
            None,
            Some("spiffe://td/a"),
            Some("spiffe://td/b"),
            Some("spiffe://td/c"),
            Some("spiffe://other/z"),
            Some("spiffe://td/ns/team/sa/x"),
            Some("spiffe://td/ns/evil/sa/ns/team/y"),
            Some("spiffe://td/ns/x/sa/y"),
            Some("spiffe://td/ns/teams/sa/x"),
        ] {
            for y in 0..shapes.len() + 1 {
                let ys = y.to_string();
                for with_x in [false, true] {
                    let mut h: Vec<(&str, &[u8])> = vec![("y", ys.as_bytes())];
                    if with_x {
                        h.push(("x", b"1"));
                    }
                    let r = req(principal, "/", None, &h);
                    assert_eq!(
                        eval::outcome_indexed(rules, &r),
                        eval::outcome_by_scan(rules, &r),
                        "{action} {principal:?} y={y} x={with_x}"
                    );
                }
            }
        }
    }
}

#[test]
fn header_values_match_as_bytes_so_obs_text_cannot_sidestep_deny() {
    // DENY on x-user prefix admin; ALLOW only x-role values that are not `blocked*`.
    let e = engine(
        r#"
- name: envoy.filters.http.rbac
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      action: DENY
      policies:
        deny-admin:
          permissions: [ { header: { name: x-user, stringMatch: { prefix: admin } } } ]
          principals: [ { any: true } ]
        deny-regex:
          permissions: [ { header: { name: x-tenant, stringMatch: { safeRegex: { regex: "root.*" } } } } ]
          principals: [ { any: true } ]
        deny-contains:
          permissions: [ { header: { name: x-path, stringMatch: { contains: secret, ignoreCase: true } } } ]
          principals: [ { any: true } ]
- name: envoy.filters.http.rbac
  typedConfig:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
    rules:
      policies:
        allow-not-blocked:
          permissions: [ { notRule: { header: { name: x-role, stringMatch: { prefix: blocked } } } } ]
          principals: [ { any: true } ]
"#,
    );
    let allowed = |h: &[(&str, &[u8])]| e.evaluate(&req(None, "/", None, h)).allowed;
    // Controls: plain values behave as written.
    assert!(allowed(&[("x-user", b"guest")]));
    assert!(!allowed(&[("x-user", b"admin")]));
    // Bytes that are not UTF-8 after (or inside) the matched part do not hide it.
    assert!(!allowed(&[("x-user", b"admin\xff")]));
    assert!(!allowed(&[("x-user", b"admin\xc3\x28")]));
    assert!(!allowed(&[("x-tenant", b"root\xfe")]));
    assert!(!allowed(&[("x-path", b"\x80/SeCrEt/\xff")]));
    // ALLOW keeps the strict reading: notRule on a blocked value with obs-text is still blocked.
    assert!(allowed(&[("x-role", b"reader\xff")]));
    assert!(!allowed(&[("x-role", b"blocked\xff")]));
}

#[test]
fn istio_path_templates_deny_what_envoy_matches_and_refuse_the_rest() {
    let target = istio::Target {
        namespace: "ns".into(),
        labels: [("app".to_owned(), "files".to_owned())].into(),
        root_namespace: "istio-system".into(),
        trust_domain: "td".into(),
        trust_domain_aliases: vec![],
    };
    let engine_for = |paths: &str| {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny, namespace: ns}}\nspec:\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: {paths}}}}}]}}]\n"
        );
        let policies = istio::parse(&yaml).unwrap();
        Engine::compile(&istio::translate(&policies, &target, false).unwrap()).unwrap()
    };
    let allowed = |e: &Engine, path: &str| e.evaluate(&req(None, path, None, &[])).allowed;
    // A supported template denies what Envoy's matcher matches, and only that.
    let e = engine_for(r#"["/files/{**}.pdf"]"#);
    assert!(!allowed(&e, "/files/a/b/report.pdf"));
    assert!(!allowed(&e, "/files/x.pdf"));
    assert!(allowed(&e, "/files/x.txt"));
    // Unsupported syntax cannot become a template that matches nothing: the rule denies all.
    for bad in [
        r#"["/v1/{*}/secret{*}"]"#,
        r#"["/a/{**}/{*}"]"#,
        r#"["/x/{y"]"#,
    ] {
        let e = engine_for(bad);
        assert!(!allowed(&e, "/anything"), "{bad} should deny everything");
        assert!(
            !allowed(&e, "/v1/a/secret1"),
            "{bad} should deny everything"
        );
    }
}
