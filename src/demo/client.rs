//! The demo's clients: plain HTTP/1.1 and h2c requests, a TCP round trip, and admin polling.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);

/// GET `path` with `Host: host` from `addr`, over HTTP/1.1 or h2c; returns status and body.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    h2: bool,
) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(TIMEOUT, get_inner(addr, host, path, headers, h2))
        .await
        .context("request timed out")?
}

async fn get_inner(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    h2: bool,
) -> anyhow::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut req = http::Request::get(if h2 {
        format!("http://{host}{path}")
    } else {
        path.to_owned()
    });
    if !h2 {
        req = req.header("host", host);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Writes `msg` and reads one reply.
pub async fn tcp_roundtrip(addr: SocketAddr, msg: &[u8]) -> anyhow::Result<String> {
    tokio::time::timeout(TIMEOUT, async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(msg).await?;
        let mut buf = vec![0u8; 1024];
        let n = tcp.read(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await
    .context("TCP round trip timed out")?
}

/// The caller principal of the TCP connections ledger's sidecar reported (Istio metric label).
pub async fn tcp_caller(admin: SocketAddr) -> anyhow::Result<String> {
    // The TCP connection closes after the round trip; its metrics are written when it does.
    for _ in 0..50 {
        let (_, text) = get(admin, "admin", "/stats/prometheus", &[], false).await?;
        let line = text.lines().find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
        });
        if let Some(principal) = line
            .and_then(|l| l.split("source_principal=\"").nth(1))
            .and_then(|r| r.split('"').next())
        {
            return Ok(principal.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no TCP connection reported by {admin}")
}

/// Polls the admin `/ready` until it answers 200.
pub async fn wait_ready(admin: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok((200, _)) = get(admin, "admin", "/ready", &[], false).await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{admin}/ready did not answer 200 within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
