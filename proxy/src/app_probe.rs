//! Kubelet probes of the app, run by the sidecar (Istio's app-probe rewriting): the injector
//! points each probe at `/app-health/<container>/<kind>` on the status port (15020) and passes the
//! original in `ISTIO_KUBE_APP_PROBERS`; this module runs it against the app with kubelet's
//! rules (HTTP 200–399, a TCP connect, gRPC health `SERVING`) and answers 200 or the failure.
//!
//! Only the probes named in the variable are run: the endpoint cannot be made to connect
//! anywhere else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpStream;

/// The environment variable Istio's injector (and eastguard's) writes the probes to.
pub const ENV: &str = "ISTIO_KUBE_APP_PROBERS";

/// Why the probes could not be read; the sidecar does not start.
#[derive(Debug, thiserror::Error)]
#[error("{ENV}: {0}")]
pub struct BadProbers(String);

/// The probes, by the path kubelet calls.
#[derive(Debug, Default)]
pub struct Probers(HashMap<String, Prober>);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Prober {
    #[serde(default)]
    http_get: Option<HttpGet>,
    #[serde(default)]
    tcp_socket: Option<TcpSocket>,
    #[serde(default)]
    grpc: Option<Grpc>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpGet {
    port: u16,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<Header>,
}

#[derive(Debug, Clone, Deserialize)]
struct Header {
    name: String,
    value: String,
}

#[derive(Debug, Clone, Deserialize)]
struct TcpSocket {
    port: u16,
    #[serde(default)]
    host: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Grpc {
    port: u16,
    #[serde(default)]
    service: Option<String>,
}

/// A probe's answer for kubelet.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: StatusCode,
    pub detail: String,
}

impl Probers {
    /// From the environment; absent: no probes.
    pub fn from_env() -> Result<Self, BadProbers> {
        match std::env::var(ENV) {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v),
            _ => Ok(Self::default()),
        }
    }

    pub fn parse(text: &str) -> Result<Self, BadProbers> {
        let map: HashMap<String, Prober> =
            serde_json::from_str(text).map_err(|e| BadProbers(e.to_string()))?;
        for (path, p) in &map {
            if !(path.starts_with("/app-health/") || path.starts_with("/app-lifecycle/")) {
                return Err(BadProbers(format!(
                    "{path}: not an /app-health/ or /app-lifecycle/ path"
                )));
            }
            let kinds = [
                p.http_get.is_some(),
                p.tcp_socket.is_some(),
                p.grpc.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(BadProbers(format!(
                    "{path}: exactly one of httpGet, tcpSocket, grpc"
                )));
            }
            if let Some(h) = &p.http_get {
                if !matches!(h.scheme.as_deref(), None | Some("HTTP" | "HTTPS")) {
                    return Err(BadProbers(format!("{path}: scheme is HTTP or HTTPS")));
                }
                for hd in &h.http_headers {
                    if http::HeaderName::try_from(hd.name.as_str()).is_err()
                        || http::HeaderValue::try_from(hd.value.as_str()).is_err()
                    {
                        return Err(BadProbers(format!("{path}: bad header {:?}", hd.name)));
                    }
                }
                if let Some(p) = &h.path
                    && http::uri::PathAndQuery::try_from(p.as_str()).is_err()
                {
                    return Err(BadProbers(format!("{path}: bad path {p:?}")));
                }
            }
        }
        Ok(Self(map))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs the probe kubelet asked for; `None`: no such probe.
    pub async fn run(&self, path: &str) -> Option<Outcome> {
        let p = self.0.get(path)?;
        // Kubernetes' default timeout is 1 s; a minute at most.
        let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).clamp(1, 60));
        let work = async {
            if let Some(h) = &p.http_get {
                http_get(h).await
            } else if let Some(t) = &p.tcp_socket {
                let addr = target(t.host.as_deref(), t.port).await?;
                TcpStream::connect(addr)
                    .await
                    .map(|_| Outcome {
                        status: StatusCode::OK,
                        detail: format!("connected to {addr}"),
                    })
                    .map_err(|e| format!("connect {addr}: {e}"))
            } else if let Some(g) = &p.grpc {
                grpc(g).await
            } else {
                Err("no probe".into())
            }
        };
        Some(match tokio::time::timeout(timeout, work).await {
            Ok(Ok(o)) => o,
            Ok(Err(why)) => Outcome {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                detail: why,
            },
            Err(_) => Outcome {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                detail: format!("timed out after {}s", timeout.as_secs()),
            },
        })
    }
}

/// The app's address: the probe's host, else loopback (the app's containers share the pod's
/// network namespace).
async fn target(host: Option<&str>, port: u16) -> Result<SocketAddr, String> {
    let host = host.filter(|h| !h.is_empty()).unwrap_or("127.0.0.1");
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {host}: no address"))
}

async fn http_get(h: &HttpGet) -> Result<Outcome, String> {
    let addr = target(h.host.as_deref(), h.port).await?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let path = h.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let mut req = Request::get(&path)
        .header("user-agent", "kube-probe/1.29")
        .header("accept", "*/*");
    let mut host_set = false;
    for hd in &h.http_headers {
        host_set |= hd.name.eq_ignore_ascii_case("host");
        req = req.header(hd.name.as_str(), hd.value.as_str());
    }
    if !host_set {
        req = req.header("host", addr.to_string());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let status = if h.scheme.as_deref() == Some("HTTPS") {
        let tls =
            tokio_rustls::TlsConnector::from(Arc::new(kubelet_tls().map_err(|e| e.to_string())?))
                .connect(server_name(h.host.as_deref()), tcp)
                .await
                .map_err(|e| format!("TLS to {addr}: {e}"))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    // Kubelet's rule: 200–399 is success.
    let ok = (200..400).contains(&status.as_u16());
    Ok(Outcome {
        status: if ok {
            status
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        },
        detail: format!("GET {path} on {addr}: {status}"),
    })
}

async fn send<I>(io: I, req: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

fn server_name(host: Option<&str>) -> rustls_pki_types::ServerName<'static> {
    host.and_then(|h| rustls_pki_types::ServerName::try_from(h.to_owned()).ok())
        .unwrap_or(rustls_pki_types::ServerName::IpAddress(
            std::net::Ipv4Addr::LOCALHOST.into(),
        ))
}

/// Kubelet does not verify an HTTPS probe's certificate, and the app's is not a mesh one; the
/// probe's answer is its status code only, so nothing is trusted from the connection.
fn kubelet_tls() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// gRPC health checking (`grpc.health.v1.Health/Check`) over h2c, as kubelet's gRPC probe.
async fn grpc(g: &Grpc) -> Result<Outcome, String> {
    let addr = target(None, g.port).await?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    // HealthCheckRequest { service = 1 }: one length-delimited field.
    let service = g.service.as_deref().unwrap_or("");
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a);
        prost::encoding::encode_varint(service.len() as u64, &mut message);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "kube-probe/1.29")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let headers = resp.headers().clone();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let grpc_status = trailers
        .get("grpc-status")
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if grpc_status != "0" {
        return Err(format!(
            "gRPC health on {addr}: grpc-status {grpc_status:?}"
        ));
    }
    let body = collected.to_bytes();
    // HealthCheckResponse { status = 1 }: SERVING is 1.
    let serving = body.len() >= 5 && body[5..] == [0x08, 0x01];
    if serving {
        Ok(Outcome {
            status: StatusCode::OK,
            detail: format!("gRPC health on {addr}: SERVING"),
        })
    } else {
        Err(format!("gRPC health on {addr}: not SERVING"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_injectors_shape_is_read_and_anything_else_refused() {
        let p = Probers::parse(
            r#"{"/app-health/hello/livez":{"httpGet":{"port":80,"path":"/x","scheme":"HTTPS"},"timeoutSeconds":3},
                "/app-health/hello/readyz":{"tcpSocket":{"port":3333}},
                "/app-health/hello/startupz":{"grpc":{"port":9000,"service":"s"}}}"#,
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        for bad in [
            "not json",
            r#"{"/elsewhere":{"tcpSocket":{"port":1}}}"#,
            r#"{"/app-health/a/livez":{}}"#,
            r#"{"/app-health/a/livez":{"tcpSocket":{"port":1},"grpc":{"port":2}}}"#,
            r#"{"/app-health/a/livez":{"httpGet":{"port":70000}}}"#,
            r#"{"/app-health/a/livez":{"httpGet":{"port":1,"scheme":"FTP"}}}"#,
            r#"{"/app-health/a/livez":{"httpGet":{"port":1,"httpHeaders":[{"name":"a b","value":"c"}]}}}"#,
        ] {
            assert!(Probers::parse(bad).is_err(), "{bad}");
        }
    }
}
