//! Observing a call of a row the inventory already has allocates nothing (the per-call cost the
//! sidecar pays), counted by `allocation-counter`'s global allocator.

use std::time::{Duration, SystemTime};

use eastguard_apisec::{AuthScheme, Call, Inventory, Limits};

fn call(path: &str) -> Call<'_> {
    Call {
        service: "orders",
        method: "GET",
        path,
        status: 200,
        caller: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
        allowed: true,
        request_bytes: 0,
        response_bytes: 10,
        latency: Duration::from_micros(300),
        request_type: None,
        response_type: Some("application/json"),
        auth: AuthScheme::Bearer,
        grpc: false,
    }
}

#[test]
fn a_known_row_is_observed_without_allocating() {
    let mut inv = Inventory::new(Limits::default());
    let now = SystemTime::now();
    for i in 0..10 {
        inv.observe(&call(&format!("/orders/{i}/items")), now);
    }
    inv.observe(&call("/status"), now);
    inv.observe(&call("/orders/4711/items"), now);
    inv.observe(&call("/orders/4713/items"), now);
    let info = allocation_counter::measure(|| {
        for _ in 0..1000 {
            inv.observe(&call("/orders/4711/items"), now);
            inv.observe(&call("/status"), now);
        }
    });
    assert_eq!(
        info.count_total, 0,
        "allocations while observing known rows"
    );
    // New object IDs on a known row (the BOLA detector's state has its room reserved and its
    // three redacted examples) allocate nothing either, short of a finding.
    let paths: Vec<String> = (0..30)
        .map(|i| format!("/orders/{}/items", 5000 + 2 * i))
        .collect();
    let info = allocation_counter::measure(|| {
        for p in &paths {
            inv.observe(&call(p), now);
        }
    });
    assert_eq!(info.count_total, 0, "allocations for new object IDs");
    // A new row does allocate (its key's caller is interned once, its counters once).
    let info = allocation_counter::measure(|| {
        let mut c = call("/status");
        c.status = 503;
        inv.observe(&c, now);
    });
    assert!(info.count_total > 0);
}
