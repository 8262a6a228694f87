//! In-process test harness for eastguard's crates (a dev-dependency only): what the Rust tests of
//! `proxy` and `xds` share instead of copying it from file to file.
//!
//! - [`pki::TestPki`]: a dev CA in a temporary directory, SVID files and in-memory credentials;
//! - [`ads::FakeAds`]: an ADS server on loopback whose per-node snapshots a test sets;
//! - [`app::hello`]: an HTTP/1.1 upstream that answers with what it received, as JSON;
//! - [`client`]: raw HTTP/1.1 requests, plaintext or over mTLS with an SVID;
//! - [`free_port`] and [`eventually`].
//!
//! Panics are the point here: a harness failure is a test failure with its reason.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test harness: a failed setup step is a failed test"
)]

use std::net::SocketAddr;
use std::time::Duration;

pub mod ads;
pub mod app;
pub mod client;
pub mod pki;

/// A loopback address with a port nothing listens on now.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `f` every 10 ms until it holds, for at most `limit`; panics naming `what` otherwise.
pub async fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
