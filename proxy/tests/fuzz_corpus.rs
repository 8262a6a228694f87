//! Replays the committed `translate` fuzz corpus (`proxy/fuzz/corpus/translate`) through the fuzz
//! target's check, and the same check over every resource in Istio's config dumps (read in place).

use std::path::Path;

use eastguard_proxy::fuzzing::check_translate;

#[test]
fn translate_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/translate");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Err(e) = check_translate(&data) {
            panic!("{}: {e}", path.display());
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus");
    println!("translate corpus: {n} inputs");
}

/// Every listener, cluster, route and endpoint set of the Istio dumps, as protobuf, through the
/// fuzz check: the no-widening properties hold on real istiod output too.
#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn istio_dump_resources_keep_the_translation_properties() {
    let base = std::env::var_os("EASTGUARD_SHARED")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
        .join("conformance/istio-configdump");
    assert!(
        base.is_dir(),
        "{} is missing (put shared/ beside the repo or set EASTGUARD_SHARED)",
        base.display()
    );
    let mut n = 0;
    for file in ["sidecar-listeners.json", "waypoint-full.json"] {
        let dump: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(base.join(file)).unwrap()).unwrap();
        let mut found = Vec::new();
        collect(&dump, &mut found);
        for (kind, json) in found {
            let any = xds::codec::json_to_any(json).unwrap();
            let mut data = vec![kind];
            data.extend_from_slice(&any.value);
            check_translate(&data).unwrap_or_else(|e| panic!("{file}: {e}"));
            n += 1;
        }
    }
    println!("{n} Istio resources checked");
    assert!(n > 30);
}

fn collect(v: &serde_json::Value, out: &mut Vec<(u8, serde_json::Value)>) {
    match v {
        serde_json::Value::Object(o) => {
            let kind = match o.get("@type").and_then(|t| t.as_str()) {
                Some("type.googleapis.com/envoy.config.listener.v3.Listener") => Some(0),
                Some("type.googleapis.com/envoy.config.cluster.v3.Cluster") => Some(1),
                Some("type.googleapis.com/envoy.config.route.v3.RouteConfiguration") => Some(2),
                Some("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment") => {
                    Some(3)
                }
                _ => None,
            };
            match kind {
                Some(k) => out.push((k, v.clone())),
                None => o.values().for_each(|x| collect(x, out)),
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
        _ => {}
    }
}
