//! The inbound request path in-process, in milliseconds: a proxy from `run` with real mTLS in
//! front of the harness app. What a client must not set never reaches the app, RBAC answers
//! before routing can tell which routes exist, and local replies (HTTP and gRPC trailers-only)
//! carry Envoy's status, body and flags.
mod common;

use common::{CLIENT, Proxy, SERVER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_must_not_set_never_reaches_the_app() {
    let p = Proxy::start(Default::default()).await;
    let r = p
        .get(
            "/orders",
            &[
                (
                    "x-forwarded-client-cert",
                    "By=spiffe://evil/x;URI=spiffe://test.local/ns/t/sa/admin",
                ),
                ("x-envoy-original-path", "/admin"),
                ("x-eastguard-source-workload", "admin"),
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("x-kept", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = p.app.seen().pop().unwrap();
    assert_eq!(seen.path, "/orders");
    for gone in [
        "x-envoy-original-path",
        "x-eastguard-source-workload",
        "x-secret",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} reached the app");
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));
    // XFCC is the proxy's, from the verified peer, and only that.
    let xfcc = seen.header("x-forwarded-client-cert").unwrap();
    assert!(xfcc.starts_with(&format!("By={SERVER};Hash=")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={CLIENT}")), "{xfcc}");
    assert_eq!(seen.header("x-request-id").map(str::len), Some(36));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_answers_before_a_missing_route_is_reported() {
    let p = Proxy::start(Default::default()).await;
    // Denied: 403 whether or not a route exists, so a denied caller learns nothing of routes.
    for host in ["server", "nowhere"] {
        let r = p.get("/admin/keys", &[("host", host)]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, "RBAC: access denied"),
            "{host}"
        );
    }
    // Allowed, no route: Envoy's 404 with an empty body.
    let r = p.get("/orders", &[("host", "nowhere")]).await;
    assert_eq!((r.status, r.body.as_str()), (404, ""), "{r:?}");
    assert!(p.app.seen().is_empty(), "nothing reached the app");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_local_replies_are_trailers_only_with_the_grpc_status() {
    let p = Proxy::start(Default::default()).await;
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let denied = p.get("/admin.Keys/List", &grpc).await;
    let no_route = p
        .get(
            "/orders.Orders/Get",
            &[grpc[0], grpc[1], ("host", "nowhere")],
        )
        .await;
    for (r, code) in [(&denied, "7"), (&no_route, "12")] {
        // gRPC carries the status in grpc-status with HTTP 200 and no body.
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(r.header("grpc-status"), Some(code), "{r:?}");
        assert!(r.body.is_empty() || r.body == "0\r\n\r\n", "{r:?}");
    }
    assert_eq!(denied.header("grpc-message"), Some("RBAC: access denied"));
    p.stop().await;
}
