use super::*;
use crate::registry::{Meta, ServicePort, WorkloadSpec};

fn sample() -> Registry {
    let meta = |name: &str, labels: &[(&str, &str)]| Meta {
        name: name.into(),
        namespace: "bank".into(),
        labels: BTreeMap::new(),
        annotations: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    };
    let workload = |name: &str, app: &str| WorkloadEntry {
        meta: meta(name, &[]),
        spec: WorkloadSpec {
            address: "127.0.0.1".into(),
            ports: BTreeMap::from([("http".into(), 8080)]),
            labels: BTreeMap::from([("app".into(), app.into())]),
            service_account: Some(app.into()),
            ..Default::default()
        },
    };
    let policies = policy::istio::parse(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: bank}\nspec:\n  selector: {matchLabels: {app: ledger}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/bank/sa/web]}}], to: [{operation: {paths: [/api/*]}}]}]\n",
    )
    .unwrap_or_default();
    Registry {
        services: vec![ServiceEntry {
            meta: meta("ledger", &[]),
            hosts: vec!["ledger.bank.svc.cluster.local".into()],
            addresses: vec!["10.96.0.20".parse().expect("ip")],
            ports: vec![
                ServicePort {
                    number: 80,
                    name: "http".into(),
                    protocol: Some("HTTP".into()),
                    target_port: None,
                },
                ServicePort {
                    number: 9000,
                    name: "tcp".into(),
                    protocol: Some("TCP".into()),
                    target_port: None,
                },
            ],
            selector: Some(BTreeMap::from([("app".into(), "ledger".into())])),
            endpoints: vec![],
            ready: None,
        }],
        workloads: vec![workload("ledger-1", "ledger"), workload("web-1", "web")],
        authorization: policies,
        peer_authentication: vec![],
        telemetry: vec![],
    }
}

fn mesh() -> Mesh {
    Mesh {
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        default_mtls: MtlsMode::Strict,
        h2_upgrade: true,
        access_log: None,
    }
}

#[test]
fn sidecar_config_has_the_inbound_outbound_shape_and_binds_identities() {
    let reg = sample();
    let w = workload_for_node(
        "sidecar~127.0.0.1~ledger-1.bank~bank.svc.cluster.local",
        &reg,
    );
    let (snap, _) = sidecar(w.expect("known node"), &reg, &mesh());
    let listeners = &snap.resources[types::LISTENER];
    assert!(listeners.contains_key("virtualInbound") && listeners.contains_key("virtualOutbound"));
    let clusters = &snap.resources[types::CLUSTER];
    assert!(clusters.contains_key("inbound|8080||"));
    let c: Cluster =
        codec::unpack(&clusters["outbound|80||ledger.bank.svc.cluster.local"]).expect("cluster");
    let json = codec::any_to_json(&codec::pack(&c))
        .expect("json")
        .to_string();
    assert!(
        json.contains("spiffe://cluster.local/ns/bank/sa/ledger"),
        "{json}"
    );
    // The service's VIP is one of its names: a captured app calling it is routed the same.
    let routes: RouteConfiguration =
        codec::unpack(&snap.resources[types::ROUTE]["outbound"]).expect("routes");
    let vh = routes
        .virtual_hosts
        .iter()
        .find(|v| v.name == "ledger.bank.svc.cluster.local:80")
        .expect("ledger vhost");
    for d in ["10.96.0.20", "10.96.0.20:80", "ledger", "ledger:80"] {
        assert!(
            vh.domains.iter().any(|x| x == d),
            "{d} not in {:?}",
            vh.domains
        );
    }
    assert!(workload_for_node("sidecar~1.2.3.4~nobody.bank~x", &reg).is_none());
    // Deterministic: the same registry gives byte-identical resources (versions are hashes).
    let (again, _) = sidecar(w.expect("known node"), &reg, &mesh());
    assert_eq!(
        format!("{:?}", snap.resources),
        format!("{:?}", again.resources)
    );
}

#[test]
fn captured_workloads_get_istio_hand_off_listeners() {
    let mut reg = sample();
    reg.workloads[1]
        .meta
        .annotations
        .insert(CAPTURE_ANNOTATION.into(), "ebpf".into());
    let (snap, _) = sidecar(&reg.workloads[1], &reg, &mesh());
    let listeners = &snap.resources[types::LISTENER];
    let vo: Listener = codec::unpack(&listeners["virtualOutbound"]).expect("listener");
    assert_eq!(vo.use_original_dst.map(|b| b.value), Some(true));
    // The VIP (service port) and the workload's app port, each a hand-off target.
    for (name, port) in [
        ("outbound_10.96.0.20_80", 80),
        ("outbound_127.0.0.1_8080", 8080),
    ] {
        let l: Listener = codec::unpack(&listeners[name]).expect(name);
        assert_eq!(l.bind_to_port.map(|b| b.value), Some(false), "{name}");
        let json = codec::any_to_json(&listeners[name])
            .expect("json")
            .to_string();
        assert!(json.contains(&format!("\"port_value\":{port}")), "{json}");
        assert!(
            json.contains("outbound|80||ledger.bank.svc.cluster.local"),
            "{json}"
        );
    }
    // TCP port: proxied, not HTTP.
    let tcp = codec::any_to_json(&listeners["outbound_10.96.0.20_9000"])
        .expect("json")
        .to_string();
    assert!(
        tcp.contains("tcp_proxy") && tcp.contains("outbound|9000||ledger"),
        "{tcp}"
    );
    // Without the annotation: the host-routed listener, no hand-off targets.
    let (plain, _) = sidecar(&sample().workloads[1], &sample(), &mesh());
    assert!(!plain.resources[types::LISTENER].contains_key("outbound_10.96.0.20_80"));
}

/// Writes fuzz seeds for `proxy/fuzz` (type byte + protobuf) when asked:
/// `EASTGUARD_WRITE_SEEDS=proxy/fuzz/corpus/translate cargo test -p eastguard-control-plane seeds`.
#[test]
fn seeds() {
    let Some(dir) = std::env::var_os("EASTGUARD_WRITE_SEEDS") else {
        return;
    };
    let reg = sample();
    let (snap, _) = sidecar(&reg.workloads[0], &reg, &mesh());
    let proxyless = proxyless(&reg);
    for s in [&snap, &proxyless] {
        for (t, kind) in [
            (types::LISTENER, 0u8),
            (types::CLUSTER, 1),
            (types::ROUTE, 2),
            (types::ENDPOINT, 3),
        ] {
            for (name, any) in s.resources.get(t).into_iter().flatten() {
                let mut bytes = vec![kind];
                bytes.extend_from_slice(&any.value);
                let file = format!("seed-{kind}-{}", name.replace(['|', '/', ':', '.'], "_"));
                std::fs::write(std::path::Path::new(&dir).join(file), bytes).expect("write seed");
            }
        }
    }
}

#[test]
fn outbound_clusters_follow_the_h2_upgrade_policy() {
    use xds::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions, http_protocol_options::UpstreamProtocolOptions,
    };
    let mut reg = sample();
    reg.services[0].ports.push(ServicePort {
        number: 9090,
        name: "grpc".into(),
        protocol: Some("GRPC".into()),
        target_port: None,
    });
    // DO_NOT_UPGRADE (Istio's meshConfig default).
    let mesh = Mesh {
        h2_upgrade: false,
        ..mesh()
    };
    let (snap, _) = sidecar(&reg.workloads[1], &reg, &mesh);
    let clusters = &snap.resources[types::CLUSTER];
    let protocol = |port: u16| {
        let name = format!("outbound|{port}||ledger.bank.svc.cluster.local");
        let c: Cluster = codec::unpack(&clusters[&name]).expect("cluster");
        c.typed_extension_protocol_options
            .get(HTTP_PROTOCOL_OPTIONS)
            .map(|o| codec::unpack::<HttpProtocolOptions>(o).expect("options"))
            .and_then(|o| o.upstream_protocol_options)
    };
    // As istiod without an h2 upgrade: an HTTP port carries each request as it came.
    assert!(matches!(
        protocol(80),
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_))
    ));
    assert!(matches!(
        protocol(9090),
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(_))
    ));
    assert!(protocol(9000).is_none(), "TCP is not HTTP");
    // UPGRADE (eastguard's default): every HTTP port is multiplexed HTTP/2 between the sidecars.
    let (snap, _) = sidecar(&reg.workloads[1], &reg, &self::mesh());
    let c: Cluster = codec::unpack(
        &snap.resources[types::CLUSTER]["outbound|80||ledger.bank.svc.cluster.local"],
    )
    .expect("cluster");
    let options: HttpProtocolOptions = codec::unpack(
        c.typed_extension_protocol_options
            .get(HTTP_PROTOCOL_OPTIONS)
            .expect("options"),
    )
    .expect("options");
    assert!(matches!(
        options.upstream_protocol_options,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(_))
    ));
}
