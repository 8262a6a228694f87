//! The authorization decision hook, end to end: a proxy running in-process with real mTLS and an
//! RBAC filter reports every decision (allowed and denied) with the verified caller and policy.

mod common;

use std::sync::{Arc, Mutex};

use common::{CLIENT, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_reach_the_hook() {
    let events: Arc<Mutex<Vec<eastguard_proxy::AuthzEvent>>> = Arc::default();
    let seen = events.clone();
    let opts = eastguard_proxy::RunOptions {
        authz_hook: Some(Arc::new(move |e: &eastguard_proxy::AuthzEvent| {
            seen.lock().unwrap().push(e.clone())
        })),
        ..Default::default()
    };
    let p = Proxy::start(opts).await;
    let denied = p.get("/x/../admin/keys", &[]).await;
    assert_eq!(
        (denied.status, denied.body.as_str()),
        (403, "RBAC: access denied")
    );
    let allowed = p.get("/orders", &[]).await;
    assert_eq!(allowed.status, 200, "{allowed:?}");

    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(!events[0].allowed);
    assert_eq!(events[0].policy.as_deref(), Some("deny-admin"));
    assert_eq!(events[0].path, "/admin/keys");
    assert_eq!(events[0].principal.as_deref(), Some(CLIENT));
    assert!(events[1].allowed && events[1].path == "/orders" && events[1].method == "GET");
    // Only the allowed request reached the app.
    let seen: Vec<String> = p.app.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen, ["/orders"]);
    p.stop().await;
}
