//! Istio's config dumps (`../shared/conformance/istio-configdump/`, read in place) through the
//! Envoy → model translation: every listener, route, cluster and endpoint set either translates
//! (optional pieces it skips are reported) or is rejected naming the resource, the field and the
//! unsupported piece; every RBAC filter anywhere in the sidecar dump compiles; nothing panics.
#![expect(clippy::unwrap_used, reason = "test")]

use std::path::PathBuf;

use eastguard_proxy::envoy;
use serde_json::Value;
use xds::codec;
use xds::pb::envoy::config::cluster::v3::Cluster;
use xds::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds::pb::envoy::config::listener::v3::Listener;
use xds::pb::envoy::config::route::v3::RouteConfiguration;
use xds::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

fn corpus(name: &str) -> Option<Value> {
    let path = std::env::var_os("EASTGUARD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
        .join("conformance/istio-configdump")
        .join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) => Some(serde_json::from_str(&t).unwrap()),
        Err(e) => panic!(
            "{}: {e} (put shared/ beside the repo or set EASTGUARD_SHARED)",
            path.display()
        ),
    }
}

#[derive(Default, Debug)]
struct Counts {
    translated: usize,
    not_served: usize,
    rejected: Vec<String>,
    notes: usize,
}

/// The resources of one kind in a dump: (static, dynamic) wrappers → the inner resource JSON.
fn resources(dump: &Value, config_type: &str, key: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for c in dump["configs"].as_array().unwrap() {
        if c["@type"].as_str() != Some(config_type) {
            continue;
        }
        for (_, list) in c.as_object().unwrap() {
            for item in list.as_array().into_iter().flatten() {
                for candidate in [&item[key], &item["active_state"][key], &item["secret"]] {
                    if candidate.is_object() {
                        out.push(candidate.clone());
                    }
                }
            }
        }
    }
    out
}

fn listeners(dump: &Value, counts: &mut Counts) {
    for v in resources(
        dump,
        "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "listener",
    ) {
        let any = codec::json_to_any(v).unwrap();
        let l: Listener = codec::unpack(&any).unwrap();
        let mut notes = Vec::new();
        match envoy::listener(&l, &mut notes) {
            Ok(Some(_)) => counts.translated += 1,
            Ok(None) => counts.not_served += 1,
            Err(e) => counts.rejected.push(e.to_string()),
        }
        counts.notes += notes.len();
    }
}

fn walk_rbac(v: &Value, found: &mut Vec<Value>) {
    match v {
        Value::Object(o) => {
            let t = o.get("@type").and_then(Value::as_str).unwrap_or("");
            if t == policy::rbac::HTTP_RBAC_TYPE || t == policy::rbac::NETWORK_RBAC_TYPE {
                found.push(v.clone());
            }
            o.values().for_each(|x| walk_rbac(x, found));
        }
        Value::Array(a) => a.iter().for_each(|x| walk_rbac(x, found)),
        _ => {}
    }
}

#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn sidecar_listeners_translate_and_every_rbac_filter_compiles() {
    let Some(dump) = corpus("sidecar-listeners.json") else {
        return;
    };
    let mut counts = Counts::default();
    listeners(&dump, &mut counts);
    let mut rbac = Vec::new();
    walk_rbac(&dump, &mut rbac);
    let mut compiled = 0;
    for json in &rbac {
        // Through the proto codec first (as xDS delivers it), then the policy compiler.
        let any = codec::json_to_any(json.clone()).unwrap();
        let back = codec::any_to_json(&any).unwrap();
        let name = if any.type_url == policy::rbac::HTTP_RBAC_TYPE {
            policy::rbac::HTTP_RBAC_FILTER
        } else {
            policy::rbac::NETWORK_RBAC_FILTER
        };
        let filter = eastguard_proxy::config::FilterConfig {
            name: name.into(),
            typed_config: Some(back),
            rbac: None,
        };
        eastguard_proxy::config::compile_rbac(std::slice::from_ref(&filter))
            .unwrap_or_else(|e| panic!("RBAC filter does not compile: {e}\n{json}"));
        compiled += 1;
    }
    println!(
        "sidecar listeners: {} translated, {} not served by a sidecar proxy (reported), {} rejected, {} optional items reported; RBAC filters compiled: {compiled}/{}",
        counts.translated,
        counts.not_served,
        counts.rejected.len(),
        counts.notes,
        rbac.len()
    );
    for r in &counts.rejected {
        println!("  rejected: {r}");
    }
    assert_eq!(compiled, rbac.len());
    assert!(
        rbac.len() >= 13,
        "the corpus has RBAC filters: {}",
        rbac.len()
    );
    assert!(counts.translated > 0);
    for r in &counts.rejected {
        assert!(
            r.contains("not supported"),
            "a rejection must name an unsupported piece: {r}"
        );
    }
}

#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn waypoint_dump_translates() {
    let Some(dump) = corpus("waypoint-full.json") else {
        return;
    };
    let mut counts = Counts::default();
    listeners(&dump, &mut counts);
    let mut notes = Vec::new();
    let (mut clusters, mut routes, mut endpoints, mut rejected) = (0, 0, 0, Vec::new());
    for v in resources(
        &dump,
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
        "cluster",
    ) {
        let c: Cluster = codec::unpack(&codec::json_to_any(v).unwrap()).unwrap();
        match envoy::cluster(&c, &mut notes) {
            Ok(_) => clusters += 1,
            Err(e) => rejected.push(e.to_string()),
        }
    }
    for v in resources(
        &dump,
        "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        "route_config",
    ) {
        let r: RouteConfiguration = codec::unpack(&codec::json_to_any(v).unwrap()).unwrap();
        match envoy::route_configuration(&r, &mut notes) {
            Ok(_) => routes += 1,
            Err(e) => rejected.push(e.to_string()),
        }
    }
    for v in resources(
        &dump,
        "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
        "endpoint_config",
    ) {
        let la: ClusterLoadAssignment = codec::unpack(&codec::json_to_any(v).unwrap()).unwrap();
        match envoy::load_assignment(&la, &mut notes) {
            Ok(_) => endpoints += 1,
            Err(e) => rejected.push(e.to_string()),
        }
    }
    let mut secrets = 0;
    for v in resources(
        &dump,
        "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        "secret",
    ) {
        let _s: Secret = codec::unpack(&codec::json_to_any(v).unwrap()).unwrap();
        secrets += 1;
    }
    println!(
        "waypoint: listeners {} translated / {} not served / {} rejected; clusters {clusters}, routes {routes}, endpoint sets {endpoints}, secrets {secrets} decoded; {} rejected; {} optional items reported",
        counts.translated,
        counts.not_served,
        counts.rejected.len(),
        rejected.len(),
        notes.len() + counts.notes
    );
    for r in counts.rejected.iter().chain(&rejected) {
        println!("  rejected: {r}");
    }
    for n in &notes {
        println!("  note: {n}");
    }
    assert!(clusters > 0 && routes > 0 && endpoints > 0);
    for r in counts.rejected.iter().chain(&rejected) {
        assert!(
            r.contains("not supported"),
            "a rejection must name an unsupported piece: {r}"
        );
    }
}
