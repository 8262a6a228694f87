//! istiod's golden files (`../shared/conformance/istio-authz`): each case's AuthorizationPolicies,
//! translated for the case's workload, must equal the expected Envoy filters as typed messages.
#![expect(clippy::unwrap_used, reason = "test helpers panic on a broken corpus")]

use std::path::PathBuf;

use eastguard_policy::istio::{self, IstioError, Target};
use eastguard_policy::rbac::Filter;

fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("EASTGUARD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
        .join("conformance/istio-authz");
    if dir.is_dir() {
        return Some(dir);
    }
    panic!(
        "istio-authz corpus missing at {} (put shared/ beside the repo or set EASTGUARD_SHARED)",
        dir.display()
    );
}

fn read_filter(path: &std::path::Path) -> Filter {
    let text = std::fs::read_to_string(path).unwrap();
    let value: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    serde_json::from_value(eastguard_policy::proto_json_keys(value))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
#[ignore = "reads ../shared/conformance (or EASTGUARD_SHARED); the test command runs it with --include-ignored"]
fn istio_authz_golden_cases() {
    let Some(dir) = corpus() else { return };
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    let labels = cases["proxy"]["labels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let (mut passed, mut unsupported, mut failed) = (0, 0, Vec::new());
    for (kind, tcp) in [("http", false), ("tcp", true)] {
        for case in cases[kind].as_array().unwrap() {
            let name = format!("{kind}/{}", case["name"].as_str().unwrap());
            let target = Target {
                namespace: cases["proxy"]["namespace"].as_str().unwrap().into(),
                labels: std::collections::BTreeMap::clone(&labels),
                root_namespace: cases["root_namespace"].as_str().unwrap().into(),
                trust_domain: case["trust_domain"].as_str().unwrap().into(),
                trust_domain_aliases: case["trust_domain_aliases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().into())
                    .collect(),
            };
            let input =
                std::fs::read_to_string(dir.join(kind).join(case["input"].as_str().unwrap()))
                    .unwrap();
            let policies = istio::parse(&input).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = istio::translate(&policies, &target, tcp);
            if case.get("extension_provider").is_some() {
                // CUSTOM (ext_authz): explicitly unsupported, never silently skipped.
                assert!(
                    matches!(got, Err(IstioError::CustomUnsupported { .. })),
                    "{name}: {got:?}"
                );
                unsupported += 1;
                continue;
            }
            let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            let want: Vec<Filter> = case["want"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| read_filter(&dir.join(kind).join(w.as_str().unwrap())))
                .collect();
            if got == want {
                passed += 1;
            } else {
                let g = serde_json::to_string(&got).unwrap();
                let w = serde_json::to_string(&want).unwrap();
                let at = g
                    .bytes()
                    .zip(w.bytes())
                    .position(|(a, b)| a != b)
                    .unwrap_or(g.len().min(w.len()));
                let lo = at.saturating_sub(200);
                failed.push(format!(
                    "{name}:\n   got  …{}\n   want …{}",
                    &g[lo..(at + 200).min(g.len())],
                    &w[lo..(at + 200).min(w.len())]
                ));
            }
        }
    }
    println!(
        "istio-authz: {passed} cases equal istiod's filters, {unsupported} CUSTOM cases reported unsupported, {} differ",
        failed.len()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
