use super::*;

const GOOD: &str = r#"
node: { id: orders, workload: orders, namespace: demo }
admin: { address: "127.0.0.1:15000" }
identity:
  files: { cert: c.pem, key: k.pem, bundle: b.pem }
listeners:
  - name: virtualInbound
    address: "127.0.0.1:15006"
    direction: INBOUND
    filter_chains:
      - http_connection_manager:
          stat_prefix: inbound_8080
          route_config:
            virtual_hosts:
              - name: local
                domains: ["*"]
                routes:
                  - match: { prefix: "/" }
                    route: { cluster: "inbound|8080||" }
clusters:
  - name: "inbound|8080||"
    endpoints: ["127.0.0.1:8080"]
"#;

#[test]
fn good_config_parses_with_defaults() {
    let c = Bootstrap::from_yaml("good.yaml", GOOD).unwrap();
    assert_eq!(c.listeners[0].direction, Direction::Inbound);
    assert_eq!(c.clusters[0].connect_timeout, Duration::from_secs(5));
    assert_eq!(c.limits.max_concurrent_streams, 100);
    assert_eq!(c.limits.initial_stream_window_size, 65536);
    assert_eq!(
        c.listeners[0].filter_chains[0]
            .http_connection_manager
            .as_ref()
            .unwrap()
            .route_config
            .virtual_hosts[0]
            .routes[0]
            .route
            .timeout,
        Duration::from_secs(15)
    );
}

#[test]
fn unknown_field_names_field_and_line() {
    let bad = GOOD.replace(
        "    direction: INBOUND",
        "    direction: INBOUND\n    adress: x",
    );
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listeners[0]") && e.contains("adress") && e.contains("line 10"),
        "{e}"
    );
}

#[test]
fn bad_value_names_field_and_line() {
    let bad = GOOD.replace("\"127.0.0.1:8080\"", "\"not-an-address\"");
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("clusters[0].endpoints[0]") && e.contains("line 22"),
        "{e}"
    );
}

#[test]
fn unknown_cluster_is_refused_with_line() {
    let bad = GOOD.replace(
        "route: { cluster: \"inbound|8080||\" }",
        "route: { cluster: \"nope\" }",
    );
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown cluster \"nope\"")
            && e.contains("routes[0].route.cluster")
            && e.contains("line 19"),
        "{e}"
    );
}

#[test]
fn admin_must_be_loopback() {
    let bad = GOOD.replace("127.0.0.1:15000", "0.0.0.0:15000");
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("admin.address") && e.contains("loopback"), "{e}");
}

#[test]
fn outbound_to_plaintext_cluster_is_refused() {
    let bad = GOOD.replace("direction: INBOUND", "direction: OUTBOUND");
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mTLS cluster"), "{e}");
}

#[test]
fn empty_expected_ids_are_refused() {
    let bad = format!(
        "{GOOD}  - name: peer\n    endpoints: [\"127.0.0.1:1\"]\n    transport_socket: {{ sni: x, match_spiffe_ids: [] }}\n"
    );
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("match_spiffe_ids"), "{e}");
}

#[test]
fn bad_spiffe_id_and_duration_are_refused() {
    let bad = format!(
        "{GOOD}  - name: peer\n    endpoints: [\"127.0.0.1:1\"]\n    transport_socket: {{ sni: x, match_spiffe_ids: [\"spiffe://A/x\"] }}\n"
    );
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("trust domain"), "{e}");
    let bad = GOOD.replace(
        "endpoints: [\"127.0.0.1:8080\"]",
        "endpoints: [\"127.0.0.1:8080\"]\n    connect_timeout: 5 parsecs",
    );
    let e = Bootstrap::from_yaml("bad.yaml", &bad)
        .unwrap_err()
        .to_string();
    // serde_yaml names the enclosing cluster for `with` fields; the value and its line are exact.
    assert!(
        e.contains("clusters[0]") && e.contains("\"5 parsecs\"") && e.contains("line 21"),
        "{e}"
    );
}
