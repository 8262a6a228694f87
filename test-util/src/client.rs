//! Raw HTTP/1.1 requests (`Connection: close`), plaintext or over mTLS with an SVID, returning the
//! response as the wire had it.

use std::net::SocketAddr;
use std::sync::Arc;

use identity::{CredentialsRx, SpiffeId};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// A response: status, headers (lowercase names, in order) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` with `headers` (a `host` among them, or `host: server` is added) to a plaintext
/// listener.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(tcp, path, headers).await
}

/// The same over mTLS, presenting `creds` and expecting the server to be `server_id`.
pub async fn mtls_get(
    addr: SocketAddr,
    creds: CredentialsRx,
    server_id: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Response {
    let expected: Arc<[SpiffeId]> = vec![SpiffeId::parse(server_id).unwrap()].into();
    let config = identity::tls::client_config(creds, expected, &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("server").unwrap(), tcp)
        .await
        .unwrap();
    exchange(tls, path, headers).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    path: &str,
    headers: &[(&str, &str)],
) -> Response {
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str("host: server\r\n");
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    parse(&raw)
}

fn parse(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}
