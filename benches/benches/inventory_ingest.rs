//! The control plane's inventory ingest: one sidecar's export of 200 rows (OTLP decode + one SQLite
//! transaction) into a file-backed store that already holds 1,000 workloads × 200 rows. The issue's
//! load — 1,000 sidecars, 200 rows each, every 10 s — is 100 such exports a second: the core share
//! is the time per export × 100 / 1 s (printed; the goal is ≤ 0.5 core).
#![expect(clippy::expect_used, reason = "benchmark harness")]

use std::time::{Duration, Instant};

use apisec::Row;
use apisec::otlp::{Reporter, decode, encode};
use control_plane::inventory::store::{Store, StoreLimits};
use criterion::{Criterion, criterion_group, criterion_main};

const WORKLOADS: usize = 1000;
const ROWS: usize = 200;

fn rows(w: usize) -> Vec<Row> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (0..ROWS)
        .map(|i| Row {
            service: format!("svc{w}.shop.svc.cluster.local"),
            method: ["GET", "POST", "PUT", "DELETE"][i % 4].into(),
            template: format!("/api/v1/resource{}/{{id}}", i / 4),
            caller: Some(format!("spiffe://cluster.local/ns/shop/sa/caller{}", i % 7)),
            status_class: ["2xx", "4xx"][i % 2].into(),
            calls: 10,
            denied: (i % 2) as u64,
            request_bytes: 100,
            response_bytes: 1000,
            latency_ms_total: 12.5,
            latency_ms_max: 3.0,
            auth_schemes: vec!["bearer-jwt"],
            request_content_types: vec!["application/json".into()],
            response_content_types: vec!["application/json".into()],
            examples: vec![format!("/api/v1/resource{}/42", i / 4)],
            first_seen_unix: now - 10,
            last_seen_unix: now,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("eg-ingest-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut store = Store::open(Some(&dir), StoreLimits::default()).expect("store");
    let started = Instant::now();
    for w in 0..WORKLOADS {
        store.add(&format!("shop/w{w}"), &rows(w)).expect("preload");
    }
    eprintln!(
        "preloaded {} rows in {:.1} s",
        store.rows().expect("count"),
        started.elapsed().as_secs_f64()
    );
    let requests: Vec<_> = (0..WORKLOADS)
        .map(|w| {
            encode(
                &Reporter {
                    node_id: format!("sidecar~10.0.0.1~w{w}.shop~shop.svc.cluster.local"),
                    service_name: format!("w{w}"),
                    svid: None,
                },
                &rows(w),
            )
        })
        .collect();
    let mut next = 0;
    let mut group = c.benchmark_group("inventory_ingest");
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(30);
    group.bench_function("export_200_rows_into_200k", |b| {
        b.iter(|| {
            let (_, rows) = decode(&requests[next % WORKLOADS]).expect("decode");
            store
                .add(&format!("shop/w{}", next % WORKLOADS), &rows)
                .expect("add");
            next += 1;
        })
    });
    group.finish();
    // The same loop timed directly, to print the core share at the rate.
    let n = 300;
    let t = Instant::now();
    for i in 0..n {
        let (_, rows) = decode(&requests[i % WORKLOADS]).expect("decode");
        store
            .add(&format!("shop/w{}", i % WORKLOADS), &rows)
            .expect("add");
    }
    let per_export = t.elapsed() / n as u32;
    eprintln!(
        "per export of {ROWS} rows: {per_export:?}; 1,000 sidecars every 10 s = 100 exports/s = {:.2} core",
        per_export.as_secs_f64() * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
