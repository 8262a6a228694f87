//! Authorization decision latency with 1, 100 and 10,000 Istio-shaped policies.
//!
//! Each workload policy is what istiod generates for a typical ALLOW AuthorizationPolicy: one
//! caller principal, methods, a path prefix; plus one DENY policy on `/admin`. The request comes
//! from the caller named by the middle policy, with a path that policy allows (so the DENY filter
//! is checked, then the ALLOW filter finds its match).
#![expect(
    clippy::expect_used,
    reason = "benchmark setup: a broken fixture must stop the run"
)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use policy::istio::{self, Target};

fn policies(n: usize) -> String {
    policies_keyed(n, |i| {
        format!("principals: [\"cluster.local/ns/shop/sa/caller-{i}\"]")
    })
}

/// The same shape keyed on source namespaces (a regex on the principal, which the index cannot narrow).
fn namespace_policies(n: usize) -> String {
    policies_keyed(n, |i| format!("namespaces: [\"team-{i}\"]"))
}

fn policies_keyed(n: usize, source: impl Fn(usize) -> String) -> String {
    let mut yaml = String::from(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: shop}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\", \"/admin/*\"]}}]}]\n",
    );
    for i in 0..n {
        yaml.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{i}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  rules:\n  - from: [{{source: {{{}}}}}]\n    to: [{{operation: {{methods: [\"GET\", \"POST\"], paths: [\"/api/v1/items/*\"]}}}}]\n",
            source(i)
        ));
    }
    yaml
}

fn engine(yaml: &str) -> policy::Engine {
    let target = Target {
        namespace: "shop".into(),
        labels: [("app".to_owned(), "api".to_owned())].into(),
        root_namespace: "istio-system".into(),
        trust_domain: "cluster.local".into(),
        trust_domain_aliases: vec![],
    };
    let parsed = istio::parse(yaml).expect("generated policies parse");
    let filters = istio::translate(&parsed, &target, false).expect("generated policies translate");
    policy::Engine::compile(&filters).expect("generated filters compile")
}

fn decision(c: &mut Criterion) {
    run(c, "rbac_decision", &[1, 100, 10_000], policies, |n| {
        format!("spiffe://cluster.local/ns/shop/sa/caller-{}", n / 2)
    });
    // Worst case: nothing to index, every policy is tried in name order.
    run(
        c,
        "rbac_decision_by_namespace",
        &[1, 100, 1_000],
        namespace_policies,
        |n| format!("spiffe://cluster.local/ns/team-{}/sa/caller", n / 2),
    );
}

fn run(
    c: &mut Criterion,
    name: &str,
    sizes: &[usize],
    yaml: fn(usize) -> String,
    caller: fn(usize) -> String,
) {
    let mut group = c.benchmark_group(name);
    for &n in sizes {
        let engine = engine(&yaml(n));
        let caller = caller(n);
        let headers: Vec<(&str, &[u8])> = vec![
            (":authority", b"api.shop.svc.cluster.local"),
            (":method", b"GET"),
            (":path", b"/api/v1/items/42?x=1"),
            (":scheme", b"http"),
            ("user-agent", b"grpc-go/1.60"),
            ("x-request-id", b"0b9e1f0c-3f6e-4c1e-9a55-4d1a2f1f7c11"),
        ];
        let req = policy::Request {
            principal: Some(&caller),
            path: "/api/v1/items/42",
            headers: &headers,
            destination_port: 8080,
            ..Default::default()
        };
        assert!(
            engine.evaluate(&req).allowed,
            "the benchmark request must be allowed"
        );
        group.bench_with_input(BenchmarkId::from_parameter(n), &req, |b, req| {
            b.iter(|| std::hint::black_box(engine.evaluate(std::hint::black_box(req))))
        });
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
