//! The API inventory's cost per call: template lookup for a known path, and `Inventory::observe`
//! (lookup + row update) for a call of a known row, with a literal path and with a parameter.

use std::time::{Duration, SystemTime};

use apisec::{AuthScheme, Call, Inventory, Limits, Templates};
use criterion::{Criterion, criterion_group, criterion_main};

fn call(path: &str) -> Call<'_> {
    Call {
        service: "orders.shop.svc.cluster.local",
        method: "GET",
        path,
        status: 200,
        caller: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
        allowed: true,
        request_bytes: 0,
        response_bytes: 1024,
        latency: Duration::from_micros(300),
        request_type: None,
        response_type: Some("application/json"),
        auth: AuthScheme::BearerJwt,
        grpc: false,
    }
}

fn bench(c: &mut Criterion) {
    // The inventory alone (issue 14's figure); the BOLA detector (issue 15) is measured below.
    let mut inv = Inventory::new(Limits {
        bola: None,
        ..Limits::default()
    });
    let now = SystemTime::now();
    // A service with a realistic spread of operations.
    for i in 0..200 {
        inv.observe(&call(&format!("/api/v1/orders/{i}")), now);
        inv.observe(&call(&format!("/api/v1/orders/{i}/items")), now);
    }
    for p in [
        "/api/v1/status",
        "/api/v1/users/me",
        "/api/v1/catalog/search",
        "/healthz",
    ] {
        inv.observe(&call(p), now);
    }
    let mut templates = Templates::new(Default::default());
    for p in [
        "/api/v1/orders/1/items",
        "/api/v1/status",
        "/api/v1/users/me",
    ] {
        templates.learn(p);
    }
    c.bench_function(
        "apisec/lookup known template /api/v1/orders/{id}/items",
        |b| b.iter(|| templates.lookup(std::hint::black_box("/api/v1/orders/4711/items"))),
    );
    c.bench_function("apisec/observe known row, literal path", |b| {
        b.iter(|| inv.observe(&call(std::hint::black_box("/api/v1/status")), now))
    });
    c.bench_function("apisec/observe known row, parameter path", |b| {
        b.iter(|| {
            inv.observe(
                &call(std::hint::black_box("/api/v1/orders/4711/items")),
                now,
            )
        })
    });
    // The same with the BOLA / enumeration detector on (the default): the object ID is looked up
    // in the caller's state for the operation.
    let mut with_bola = Inventory::new(Limits::default());
    for i in 0..200 {
        with_bola.observe(&call(&format!("/api/v1/orders/{i}/items")), now);
    }
    c.bench_function(
        "apisec/observe known row, parameter path, with BOLA detection",
        |b| {
            b.iter(|| {
                with_bola.observe(
                    &call(std::hint::black_box("/api/v1/orders/4711/items")),
                    now,
                )
            })
        },
    );
}

/// The sensitive-data classifier's throughput on a 16 KiB JSON response (an order list with
/// emails, phone numbers, one card number, prices, IDs and free text) and on 16 KiB of plain text.
fn classify(c: &mut Criterion) {
    use apisec::sensitive::{Body, Classifier, Sample};
    let mut items = Vec::new();
    let mut n = 0;
    while serde_json::to_string(&items).map_or(0, |s| s.len()) < 16 * 1024 {
        items.push(serde_json::json!({
            "id": 100_000 + n, "sku": format!("SKU-{n:05}"), "price": 19.99, "qty": n % 5 + 1,
            "customer": {"email": format!("user{n}@shop.example"), "phone": "+44 20 7946 0958",
                          "note": "leave at the door, ring twice"},
            "card": if n == 3 { "4111 1111 1111 1111" } else { "" },
        }));
        n += 1;
    }
    let json = serde_json::to_vec(&items).unwrap_or_default();
    let text =
        "the quick brown fox jumps over the lazy dog 42 times; call +1 415 555 0100 ".repeat(220);
    let classifier = Classifier::default();
    let mut group = c.benchmark_group("apisec/classify");
    for (name, bytes, media) in [
        ("json 16 KiB", &json[..], "application/json"),
        ("text 16 KiB", text.as_bytes(), "text/plain"),
    ] {
        group.throughput(criterion::Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                classifier.classify(&Sample {
                    response_body: Some(Body {
                        bytes: std::hint::black_box(bytes),
                        media_type: Some(media),
                        encoded: false,
                        truncated: false,
                    }),
                    ..Default::default()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, classify);
criterion_main!(benches);
