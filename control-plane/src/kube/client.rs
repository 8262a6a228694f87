//! A small Kubernetes API client: what list and watch need, nothing else. Credentials come from
//! the pod's service account (in-cluster) or a kubeconfig (its current context: server, CA,
//! bearer token or token file, client certificate).
//!
//! kube-rs was measured for this and not taken: with its client and runtime it brought second
//! copies of `syn`, `json-patch`, `base64`, `getrandom`, `pem` and `hashbrown` into the build.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

const IN_CLUSTER: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why the API cannot be reached as configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

#[derive(Clone)]
enum Token {
    None,
    Fixed(String),
    /// Re-read at every request: projected service-account tokens rotate.
    File(PathBuf),
}

/// Where the API server is and how to authenticate to it.
#[derive(Clone)]
pub struct Client {
    host: String,
    port: u16,
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    token: Token,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// One API request's failure.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
}

impl Client {
    /// From the pod's service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, token and CA).
    pub fn in_cluster() -> Result<Self, ConfigError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| invalid("in-cluster config", "KUBERNETES_SERVICE_HOST is not set"))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let ca = read(&Path::new(IN_CLUSTER).join("ca.crt"))?;
        Self::build(
            &format!("https://{host}:{port}"),
            Some(&ca),
            None,
            Token::File(Path::new(IN_CLUSTER).join("token")),
        )
    }

    /// From a kubeconfig file's current context.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        let doc: Value = serde_yaml::from_slice(&text)
            .map_err(|e| invalid(path.display().to_string(), e.to_string()))?;
        let what = path.display().to_string();
        let named = |list: &str, name: &str| -> Result<Value, ConfigError> {
            doc[list]
                .as_array()
                .and_then(|l| l.iter().find(|e| e["name"].as_str() == Some(name)))
                .cloned()
                .ok_or_else(|| invalid(&what, format!("no {list} entry named {name:?}")))
        };
        let current = doc["current-context"]
            .as_str()
            .ok_or_else(|| invalid(&what, "no current-context"))?;
        let context = named("contexts", current)?;
        let cluster = named(
            "clusters",
            context["context"]["cluster"].as_str().unwrap_or_default(),
        )?;
        let cluster = &cluster["cluster"];
        let user = match context["context"]["user"].as_str() {
            Some(u) => named("users", u)?["user"].clone(),
            None => Value::Null,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let file_or_data =
            |file: &Value, data: &Value, field: &str| -> Result<Option<Vec<u8>>, ConfigError> {
                if let Some(d) = data.as_str() {
                    return base64::engine::general_purpose::STANDARD
                        .decode(d.trim())
                        .map(Some)
                        .map_err(|e| invalid(&what, format!("{field}-data: {e}")));
                }
                file.as_str().map(|f| read(&base.join(f))).transpose()
            };
        if cluster["insecure-skip-tls-verify"].as_bool() == Some(true) {
            return Err(invalid(
                &what,
                "insecure-skip-tls-verify is not supported: give the cluster's CA",
            ));
        }
        if !user["exec"].is_null() || !user["auth-provider"].is_null() {
            return Err(invalid(
                &what,
                "exec and auth-provider credentials are not supported: use a token, a token file or a client certificate",
            ));
        }
        let ca = file_or_data(
            &cluster["certificate-authority"],
            &cluster["certificate-authority-data"],
            "certificate-authority",
        )?;
        let cert = file_or_data(
            &user["client-certificate"],
            &user["client-certificate-data"],
            "client-certificate",
        )?;
        let key = file_or_data(&user["client-key"], &user["client-key-data"], "client-key")?;
        let token = match (user["token"].as_str(), user["tokenFile"].as_str()) {
            (Some(t), _) => Token::Fixed(t.to_owned()),
            (None, Some(f)) => Token::File(base.join(f)),
            _ => Token::None,
        };
        let server = cluster["server"]
            .as_str()
            .ok_or_else(|| invalid(&what, "the cluster has no server"))?;
        let client_auth = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    &what,
                    "a client certificate needs its key, and a key its certificate",
                ));
            }
        };
        Self::build(server, ca.as_deref(), client_auth, token)
    }

    fn build(
        server: &str,
        ca: Option<&[u8]>,
        client_auth: Option<(Vec<u8>, Vec<u8>)>,
        token: Token,
    ) -> Result<Self, ConfigError> {
        let uri: http::Uri = server
            .parse()
            .map_err(|_| invalid("server", format!("{server:?} is not a URL")))?;
        let host = uri
            .host()
            .ok_or_else(|| invalid("server", format!("{server:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => {
                // Plain HTTP only to this machine (a proxy such as `kubectl proxy`, or a stand-in).
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(invalid(
                        "server",
                        format!("{server}: plain HTTP is only taken to a loopback address"),
                    ));
                }
                false
            }
            _ => return Err(invalid("server", format!("{server:?}: not http(s)"))),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let ca = ca.ok_or_else(|| invalid("server", "an https server needs its CA"))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                let c = c.map_err(|e| invalid("certificate-authority", e.to_string()))?;
                roots
                    .add(c)
                    .map_err(|e| invalid("certificate-authority", e.to_string()))?;
            }
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS", e.to_string()))?
            .with_root_certificates(roots);
            let mut config = match client_auth {
                Some((cert, key)) => {
                    let chain = CertificateDer::pem_slice_iter(&cert)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| invalid("client-certificate", e.to_string()))?;
                    let key = PrivateKeyDer::from_pem_slice(&key)
                        .map_err(|e| invalid("client-key", e.to_string()))?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| invalid("client-certificate", e.to_string()))?
                }
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("server", format!("{host:?} is not a server name")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            authority: uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| host.clone()),
            host,
            port,
            tls,
            token,
        })
    }

    /// `GET path`; the response's body is streamed (watches) by the caller. A status other than
    /// 200 is an error carrying the Status object's message.
    pub async fn get(
        &self,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, RequestError> {
        self.request(http::Method::GET, path_and_query, None, None, timeout)
            .await
    }

    /// `POST path` with a JSON body (creating an object); 200 or 201 is success.
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<(), RequestError> {
        let body = Bytes::from(body.to_string());
        self.request(http::Method::POST, path, Some(body), None, timeout)
            .await
            .map(drop)
    }

    /// `POST path` with a JSON body, returning the JSON answer (a review: TokenReview).
    pub async fn post_for(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, RequestError> {
        let resp = self
            .request(
                http::Method::POST,
                path,
                Some(Bytes::from(body.to_string())),
                None,
                timeout,
            )
            .await?;
        json_body(resp, timeout).await
    }

    /// `GET path` of one object, as JSON.
    pub async fn get_json(&self, path: &str, timeout: Duration) -> Result<Value, RequestError> {
        let resp = self
            .request(http::Method::GET, path, None, None, timeout)
            .await?;
        json_body(resp, timeout).await
    }

    /// `PATCH path` with a JSON Patch (RFC 6902), returning the object after it.
    pub async fn json_patch(
        &self,
        path: &str,
        ops: &Value,
        timeout: Duration,
    ) -> Result<Value, RequestError> {
        let resp = self
            .request(
                http::Method::PATCH,
                path,
                Some(Bytes::from(ops.to_string())),
                Some("application/json-patch+json"),
                timeout,
            )
            .await?;
        json_body(resp, timeout).await
    }

    async fn request(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Option<Bytes>,
        content_type: Option<&'static str>,
        timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, RequestError> {
        let t = |e: String| RequestError::Transport(e);
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| t(format!("connecting to {} timed out", self.authority)))?
        .map_err(|e| t(format!("{}: {e}", self.authority)))?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", &self.authority)
            .header("accept", "application/json")
            .header("user-agent", "eastguard-control-plane");
        match &self.token {
            Token::None => {}
            Token::Fixed(tok) => req = req.header("authorization", format!("Bearer {tok}")),
            Token::File(p) => {
                let tok = std::fs::read_to_string(p)
                    .map_err(|e| t(format!("token {}: {e}", p.display())))?;
                req = req.header("authorization", format!("Bearer {}", tok.trim()));
            }
        }
        if body.is_some() {
            req = req.header("content-type", content_type.unwrap_or("application/json"));
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| t(e.to_string()))?;
        let send = async {
            match &self.tls {
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| t(format!("TLS to {}: {e}", self.authority)))?;
                    send(TokioIo::new(tls), req).await
                }
                None => send(TokioIo::new(tcp), req).await,
            }
        };
        let resp = tokio::time::timeout(timeout, send)
            .await
            .map_err(|_| t("no response in time".into()))??;
        if !matches!(
            resp.status(),
            http::StatusCode::OK | http::StatusCode::CREATED
        ) {
            use http_body_util::BodyExt as _;
            let status = resp.status().as_u16();
            let body = tokio::time::timeout(
                Duration::from_secs(5),
                http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect(),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .unwrap_or_default();
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(RequestError::Status { status, message });
        }
        Ok(resp)
    }
}

/// A response's body as JSON (at most 1 MiB).
async fn json_body(
    resp: http::Response<hyper::body::Incoming>,
    timeout: Duration,
) -> Result<Value, RequestError> {
    use http_body_util::BodyExt as _;
    let body = tokio::time::timeout(
        timeout,
        http_body_util::Limited::new(resp.into_body(), 1024 * 1024).collect(),
    )
    .await
    .map_err(|_| RequestError::Transport("no response body in time".into()))?
    .map_err(|e| RequestError::Transport(e.to_string()))?
    .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| RequestError::Transport(format!("the answer is not JSON: {e}")))
}

async fn send<I>(
    io: I,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, RequestError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| RequestError::Transport(e.to_string()))?;
    tokio::spawn(conn);
    sender
        .send_request(req)
        .await
        .map_err(|e| RequestError::Transport(e.to_string()))
}
