//! ADS over mTLS (Istio's 15012): the server side hands tonic connections whose verified peer
//! identity rides along as [`PeerIdentity`] (the snapshot source decides what that peer may get);
//! the client side dials with a caller-built rustls config. Certificate policy (which CAs, which
//! SPIFFE IDs) belongs to the caller; this module only moves bytes and the peer's name.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;

use crate::server::PeerIdentity;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server-side mTLS connection and who is on the other end.
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Names the peer from the certificates a verified handshake produced (SPIFFE ID of the leaf).
pub type PeerNamer = fn(Option<&[CertificateDer<'_>]>) -> Option<String>;

/// Accepts TCP connections and completes their TLS handshakes off the accept loop; connections
/// that fail the handshake (no client certificate, untrusted CA …) are dropped and logged, never
/// handed to the gRPC server.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    name: PeerNamer,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "xDS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => {
                        let peer = PeerIdentity(name(io.get_ref().1.peer_certificates()));
                        let _ = tx.send(Ok(TlsConn { io, peer })).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%remote, error = %e, "xDS mTLS handshake failed"),
                    Err(_) => tracing::warn!(%remote, "xDS mTLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// What the ADS client needs to dial over mTLS.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    /// SNI sent to the server.
    pub server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// A tonic connector: TCP to the URI's host and port, then TLS with `tls`.
pub fn connector(
    tls: ClientTls,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Future<
        Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error>,
    > + Send,
> + Send
+ Clone
+ 'static {
    tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or("127.0.0.1")
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(15012);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(tls.server_name.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let io = TlsConnector::from(tls.config.clone())
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(io))
        }
    })
}
