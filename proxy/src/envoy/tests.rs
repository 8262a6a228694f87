use super::*;

fn listener_json(v: serde_json::Value) -> Listener {
    let mut v = v;
    v["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
    codec::unpack(&codec::json_to_any(v).unwrap()).unwrap()
}

fn hcm_filter(extra_filters: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": "in",
            "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}]}]},
            "http_filters": extra_filters,
        }
    })
}

#[test]
fn per_route_overrides_are_judged_by_type_not_by_filter_name() {
    let rc = |per_filter: serde_json::Value, weighted: bool| {
        let action = if weighted {
            serde_json::json!({"weighted_clusters": {"clusters": [
                {"name": "a", "weight": 1, "typed_per_filter_config": per_filter}]}})
        } else {
            serde_json::json!({"cluster": "a"})
        };
        let route = if weighted {
            serde_json::json!({"match": {"prefix": "/"}, "route": action})
        } else {
            serde_json::json!({"match": {"prefix": "/"}, "route": action,
                "typed_per_filter_config": per_filter})
        };
        let v = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": "r",
            "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}],
        });
        let pb: PbRouteConfiguration = codec::unpack(&codec::json_to_any(v).unwrap()).unwrap();
        let mut notes = Notes::default();
        route_configuration(&pb, &mut notes).map(|_| notes)
    };
    let rbac_override = serde_json::json!({"my-authz": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"}});
    let disabled = serde_json::json!({"anything": {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}});
    for weighted in [false, true] {
        for bad in [&rbac_override, &disabled] {
            let e = rc(bad.clone(), weighted).unwrap_err();
            assert!(e.to_string().contains("typed_per_filter_config"), "{e}");
        }
    }
    // An override of a filter this proxy does not run is skipped, with a note.
    let fault = serde_json::json!({"envoy.filters.http.fault": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}});
    let notes = rc(fault, false).unwrap();
    assert!(
        format!("{notes:?}").contains("HTTPFault override skipped"),
        "{notes:?}"
    );
}

#[test]
fn unevaluable_chains_refuse_and_specific_chains_come_first() {
    let l = listener_json(serde_json::json!({
        "name": "virtualOutbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
        "traffic_direction": "OUTBOUND",
        "filter_chains": [
            {"filters": [hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
                "typed_config": {"@type": ROUTER_TYPE}}]))]},
            {"filter_chain_match": {"source_prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}],
                "destination_port": 8080},
             "filters": [hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
                "typed_config": {"@type": ROUTER_TYPE}}]))]},
        ],
    }));
    let mut notes = Vec::new();
    let out = listener(&l, &mut notes).unwrap().unwrap();
    assert_eq!(out.filter_chains.len(), 2);
    assert_eq!(
        out.filter_chains[0].filter_chain_match.destination_port,
        Some(8080)
    );
    assert!(
        out.filter_chains[0]
            .refuse
            .as_deref()
            .unwrap()
            .contains("source_prefix_ranges")
    );
    assert!(out.filter_chains[1].refuse.is_none());
}

#[test]
fn capture_listeners_translate_for_hand_off() {
    let router = || {
        hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
            "typed_config": {"@type": ROUTER_TYPE}}]))
    };
    let virtual_outbound = listener_json(serde_json::json!({
        "name": "virtualOutbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
        "use_original_dst": true,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{"filters": [router()]}],
    }));
    let out = listener(&virtual_outbound, &mut Vec::new())
        .unwrap()
        .unwrap();
    assert!(out.use_original_dst && out.original_dst && out.bind_to_port);
    let target = listener_json(serde_json::json!({
        "name": "0.0.0.0_8080",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
        "bind_to_port": false,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{"filters": [router()]}],
    }));
    let out = listener(&target, &mut Vec::new()).unwrap().unwrap();
    assert!(!out.bind_to_port && !out.use_original_dst);
    // And back, for /config_dump.
    let pb = listener_pb(&out);
    assert_eq!(pb.bind_to_port.map(|b| b.value), Some(false));
    let inbound = listener_json(serde_json::json!({
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
        "listener_filters": [{"name": "envoy.filters.listener.original_dst"}],
        "traffic_direction": "INBOUND",
        "filter_chains": [{"filters": [router()]}],
    }));
    let out = listener(&inbound, &mut Vec::new()).unwrap().unwrap();
    assert!(out.original_dst && !out.use_original_dst);
}

#[test]
fn destination_prefix_ranges_translate_and_the_longest_prefix_comes_first() {
    let chain = |prefix: &str, len: u32, name: &str| {
        serde_json::json!({"name": name,
            "filter_chain_match": {"prefix_ranges": [{"address_prefix": prefix, "prefix_len": len}]},
            "filters": [hcm_filter(serde_json::json!([{"name": "envoy.filters.http.router",
                "typed_config": {"@type": ROUTER_TYPE}}]))]})
    };
    let l = listener_json(serde_json::json!({
        "name": "virtualOutbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
        "traffic_direction": "OUTBOUND",
        "filter_chains": [chain("10.0.0.0", 8, "wide"), chain("10.1.2.3", 32, "narrow"), chain("fd00::", 8, "v6")],
    }));
    let out = listener(&l, &mut Vec::new()).unwrap().unwrap();
    let names: Vec<&str> = out.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["narrow", "wide", "v6"]);
    assert!(out.filter_chains.iter().all(|c| c.refuse.is_none()));
    let narrow = &out.filter_chains[0].filter_chain_match.prefix_ranges[0];
    assert!(narrow.contains("10.1.2.3".parse().unwrap()));
    assert!(!narrow.contains("10.1.2.4".parse().unwrap()));
    assert!(narrow.contains("::ffff:10.1.2.3".parse().unwrap()));
    // A bad range is an error naming the field.
    let bad = listener_json(serde_json::json!({
        "name": "l",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
        "filter_chains": [chain("10.0.0.0", 33, "bad")],
    }));
    let err = listener(&bad, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("prefix_ranges[0]"), "{err}");
}

#[test]
fn unsupported_required_filters_and_bad_rbac_are_rejected_naming_the_field() {
    let with = |filters: serde_json::Value| {
        listener_json(serde_json::json!({
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [hcm_filter(filters)]}],
        }))
    };
    let ext_authz = with(serde_json::json!([
        {"name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]));
    let e = listener(&ext_authz, &mut Vec::new()).unwrap_err();
    assert_eq!(e.field, "filter_chains[0].filters[0].http_filters[0]");
    assert!(e.message.contains("not supported"));
    let bad_rbac = with(serde_json::json!([
        {"name": "envoy.filters.http.rbac", "typed_config": {"@type": policy::rbac::HTTP_RBAC_TYPE,
            "rules": {"action": "ALLOW", "policies": {"p": {"permissions": [{"any": true}],
            "principals": [{"direct_remote_ip": {"address_prefix": "not-an-ip", "prefix_len": 8}}]}}}}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]));
    let e = listener(&bad_rbac, &mut Vec::new()).unwrap_err();
    assert!(e.message.contains("RBAC does not compile"), "{e}");
    // Istio's observe-only filters are skipped and said so.
    let stats = with(serde_json::json!([
        {"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]));
    let mut notes = Vec::new();
    assert!(listener(&stats, &mut notes).unwrap().is_some());
    assert!(notes.iter().any(|n| n.contains("istio.stats skipped")));
}

#[test]
fn upstream_identity_must_be_exact_spiffe_ids() {
    let cluster_with = |matcher: serde_json::Value| -> Cluster {
        codec::unpack(&codec::json_to_any(serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "outbound|80||ledger.bank.svc.cluster.local",
            "type": "STATIC",
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": UPSTREAM_TLS_TYPE, "sni": "outbound_.80_._.ledger.bank.svc.cluster.local",
                "common_tls_context": {"combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": matcher}]},
                    "validation_context_sds_secret_config": {"name": "ROOTCA"}}}}},
        })).unwrap()).unwrap()
    };
    let ok = cluster(
        &cluster_with(serde_json::json!({"exact": "spiffe://cluster.local/ns/bank/sa/ledger"})),
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(
        ok.transport_socket.unwrap().match_spiffe_ids[0].as_str(),
        "spiffe://cluster.local/ns/bank/sa/ledger"
    );
    assert_eq!(
        ok.metadata.service.as_deref(),
        Some("ledger.bank.svc.cluster.local")
    );
    assert_eq!(ok.metadata.namespace.as_deref(), Some("bank"));
    let prefix = cluster(
        &cluster_with(serde_json::json!({"prefix": "spiffe://cluster.local/"})),
        &mut Vec::new(),
    );
    assert!(
        prefix
            .unwrap_err()
            .message
            .contains("non-exact SAN matchers are not supported")
    );
}

#[test]
fn inbound_clusters_name_their_service_from_istio_metadata() {
    let inbound = |metadata: serde_json::Value| {
        let c: xds::pb::envoy::config::cluster::v3::Cluster = codec::unpack(
            &codec::json_to_any(serde_json::json!({
                "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "name": "inbound|8080||",
                "type": "STATIC",
                "metadata": metadata,
            }))
            .unwrap(),
        )
        .unwrap();
        cluster(&c, &mut Vec::new()).unwrap().metadata
    };
    // As istiod writes it.
    let m = inbound(
        serde_json::json!({"filter_metadata": {"istio": {"services": [
        {"host": "ledger.bank.svc.cluster.local", "name": "ledger", "namespace": "bank"},
        {"host": "ledger-v2.bank.svc.cluster.local", "name": "ledger-v2", "namespace": "bank"}]}}}),
    );
    assert_eq!(m.service.as_deref(), Some("ledger.bank.svc.cluster.local"));
    assert_eq!(m.namespace.as_deref(), Some("bank"));
    // As eastguard's control plane writes it: the host only.
    let m = inbound(
        serde_json::json!({"filter_metadata": {"istio": {"services": [
        {"host": "ledger.bank.svc.cluster.local"}]}}}),
    );
    assert_eq!(m.namespace.as_deref(), Some("bank"));
    // Anything else labels nothing (and refuses nothing).
    for odd in [
        serde_json::json!({}),
        serde_json::json!({"filter_metadata": {"istio": {"services": "ledger"}}}),
        serde_json::json!({"filter_metadata": {"istio": {"services": [{"host": 7}]}}}),
    ] {
        assert_eq!(inbound(odd).service, None);
    }
}

#[test]
fn cluster_protocol_options_translate_as_envoy_reads_them() {
    let protocol = |options: Option<serde_json::Value>| {
        let mut c = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "outbound|80||ledger",
            "type": "STATIC",
        });
        if let Some(o) = options {
            // The options are a oneof: its field sits in the message itself.
            let mut options = serde_json::json!({
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            });
            if let (Some(options), Some(o)) = (options.as_object_mut(), o.as_object()) {
                options.extend(o.clone());
            }
            c["typed_extension_protocol_options"] = serde_json::json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options,
            });
        }
        let c: xds::pb::envoy::config::cluster::v3::Cluster =
            codec::unpack(&codec::json_to_any(c).unwrap()).unwrap();
        cluster(&c, &mut Vec::new()).unwrap().protocol
    };
    use crate::config::UpstreamProtocol as P;
    assert_eq!(protocol(None), P::Auto);
    let explicit = |k: &str| serde_json::json!({"explicit_http_config": {k: {}}});
    assert_eq!(protocol(Some(explicit("http2_protocol_options"))), P::Http2);
    assert_eq!(protocol(Some(explicit("http_protocol_options"))), P::Http1);
    assert_eq!(
        protocol(Some(serde_json::json!({"use_downstream_protocol_config": {
            "http_protocol_options": {}, "http2_protocol_options": {}}}))),
        P::Downstream
    );
    assert_eq!(
        protocol(Some(serde_json::json!({"auto_config": {}}))),
        P::Auto
    );
}

#[test]
fn access_loggers_translate_as_istio_sends_them_and_round_trip() {
    let router = serde_json::json!([{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]);
    let with = |logs: serde_json::Value| {
        let mut hcm = hcm_filter(router.clone());
        hcm["typed_config"]["access_log"] = logs;
        listener_json(serde_json::json!({
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [hcm]}],
        }))
    };
    const FILE: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
    // What Istio generates for meshConfig.accessLogFile (text) and accessLogEncoding JSON, an
    // older control plane's deprecated `format`, stdout, and a logger this proxy does not have.
    let logs = with(serde_json::json!([
        {"name": "envoy.access_loggers.file", "typed_config": {"@type": FILE, "path": "/tmp/a.log",
            "log_format": {"text_format_source": {"inline_string": "%RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN%\n"}}}},
        {"name": "envoy.access_loggers.file", "typed_config": {"@type": FILE, "path": "/tmp/b.log",
            "log_format": {"json_format": {"code": "%RESPONSE_CODE%", "peer": "%DOWNSTREAM_PEER_URI_SAN%"}}}},
        {"name": "envoy.access_loggers.file", "typed_config": {"@type": FILE, "path": "/tmp/c.log",
            "format": "%PROTOCOL%\n"}},
        {"name": "envoy.access_loggers.stdout", "filter": {"status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 400, "runtime_key": "k"}}}},
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}},
        {"name": "otel", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig"}},
    ]));
    let mut notes = Vec::new();
    let l = listener(&logs, &mut notes).unwrap().unwrap();
    let hcm = l.filter_chains[0].http_connection_manager.as_ref().unwrap();
    let got: Vec<_> = hcm
        .access_log
        .iter()
        .map(|a| {
            (
                a.path.display().to_string(),
                a.text_format.clone(),
                a.json_format.clone(),
            )
        })
        .collect();
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(
        got[0].1.as_deref(),
        Some("%RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN%\n")
    );
    assert_eq!(
        got[1].2.as_ref().map(|j| j["code"].as_str()),
        Some("%RESPONSE_CODE%")
    );
    assert_eq!(got[2].1.as_deref(), Some("%PROTOCOL%\n"));
    assert_eq!(
        (got[3].0.as_str(), got[3].1.as_deref()),
        ("/dev/stdout", None)
    );
    let notes = notes.join("\n");
    assert!(notes.contains("filter skipped"), "{notes}");
    assert!(
        notes.contains("OpenTelemetryAccessLogConfig) skipped"),
        "{notes}"
    );
    // The inverse, for /config_dump: the same loggers come back from Envoy's message.
    let mut back = listener_pb(&l);
    // (The dump shows no router filter; translation requires one.)
    let Some(filter::ConfigType::TypedConfig(tc)) = &back.filter_chains[0].filters[0].config_type
    else {
        panic!("no HCM in the dump");
    };
    let mut pb: PbHcm = codec::unpack(tc).unwrap();
    let router: PbHcm = codec::unpack(
        &codec::json_to_any(serde_json::json!({"@type": HCM_TYPE, "http_filters": router}))
            .unwrap(),
    )
    .unwrap();
    pb.http_filters = router.http_filters;
    back.filter_chains[0].filters[0].config_type =
        Some(filter::ConfigType::TypedConfig(codec::pack(&pb)));
    let mut again = Vec::new();
    let l2 = listener(&back, &mut again).unwrap().unwrap();
    assert_eq!(
        l2.filter_chains[0]
            .http_connection_manager
            .as_ref()
            .unwrap()
            .access_log,
        hcm.access_log
    );
    // A format this proxy cannot fill is invalid: the update is NACKed, naming the logger.
    let bad = with(serde_json::json!([
        {"name": "envoy.access_loggers.file", "typed_config": {"@type": FILE, "path": "/tmp/a.log",
            "log_format": {"text_format_source": {"inline_string": "%DYNAMIC_METADATA(istio.mixer:status)%"}}}}]));
    let e = listener(&bad, &mut Vec::new()).unwrap_err();
    assert!(
        e.field.contains("access_log[0]") && e.message.contains("unsupported operator"),
        "{e}"
    );
    let nested = with(serde_json::json!([
        {"name": "envoy.access_loggers.file", "typed_config": {"@type": FILE, "path": "/tmp/a.log",
            "log_format": {"json_format": {"a": {"b": "%RESPONSE_CODE%"}}}}}]));
    let e = listener(&nested, &mut Vec::new()).unwrap_err();
    assert!(e.message.contains("only string values"), "{e}");
}

#[test]
fn opentelemetry_tracing_translates_and_other_providers_are_skipped() {
    let router = serde_json::json!([{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]);
    let with = |tracing: serde_json::Value| {
        let mut hcm = hcm_filter(router.clone());
        hcm["typed_config"]["tracing"] = tracing;
        listener_json(serde_json::json!({
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [hcm]}],
        }))
    };
    const OTEL: &str = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig";
    let tracing_of = |l: &Listener, notes: &mut Vec<String>| {
        listener(l, notes).map(|l| {
            l.unwrap().filter_chains[0]
                .http_connection_manager
                .as_ref()
                .unwrap()
                .tracing
                .clone()
        })
    };
    // What istiod sends for an `opentelemetry` extension provider: a cluster and a sampling rate.
    let istio = with(
        serde_json::json!({"random_sampling": {"value": 10.0}, "provider": {
        "name": "envoy.tracers.opentelemetry", "typed_config": {"@type": OTEL,
        "grpc_service": {"envoy_grpc": {"cluster_name": "outbound|4317||otel.observability.svc.cluster.local"}},
        "service_name": "server.test"}}}),
    );
    let t = tracing_of(&istio, &mut Vec::new()).unwrap().unwrap();
    assert_eq!(t.sampling, 10.0);
    assert_eq!(
        t.cluster.as_deref(),
        Some("outbound|4317||otel.observability.svc.cluster.local")
    );
    // Round trip through /config_dump's message.
    let l = listener(&istio, &mut Vec::new()).unwrap().unwrap();
    let mut back = listener_pb(&l);
    let Some(filter::ConfigType::TypedConfig(tc)) = &back.filter_chains[0].filters[0].config_type
    else {
        panic!("no HCM in the dump");
    };
    let mut pb: PbHcm = codec::unpack(tc).unwrap();
    let r: PbHcm = codec::unpack(
        &codec::json_to_any(serde_json::json!({"@type": HCM_TYPE, "http_filters": router}))
            .unwrap(),
    )
    .unwrap();
    pb.http_filters = r.http_filters;
    back.filter_chains[0].filters[0].config_type =
        Some(filter::ConfigType::TypedConfig(codec::pack(&pb)));
    assert_eq!(tracing_of(&back, &mut Vec::new()).unwrap(), Some(t));
    // A direct target; no sampling given: Envoy's 100 %.
    let direct = with(
        serde_json::json!({"provider": {"name": "otel", "typed_config": {"@type": OTEL,
        "grpc_service": {"google_grpc": {"target_uri": "127.0.0.1:4317", "stat_prefix": "otel"}}}}}),
    );
    let t = tracing_of(&direct, &mut Vec::new()).unwrap().unwrap();
    assert_eq!(
        (t.sampling, t.address.as_deref()),
        (100.0, Some("127.0.0.1:4317"))
    );
    // Another provider: served, not traced, said so.
    let zipkin = with(
        serde_json::json!({"provider": {"name": "envoy.tracers.zipkin", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig", "collector_cluster": "z", "collector_endpoint": "/api/v2/spans"}}}),
    );
    let mut notes = Vec::new();
    assert_eq!(tracing_of(&zipkin, &mut notes).unwrap(), None);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("envoy.tracers.zipkin skipped")),
        "{notes:?}"
    );
    // Out-of-range sampling is invalid.
    let bad = with(serde_json::json!({"random_sampling": {"value": 150.0}}));
    let e = listener(&bad, &mut Vec::new()).unwrap_err();
    assert!(e.field.ends_with("tracing.random_sampling"), "{e}");
}
