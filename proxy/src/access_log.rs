//! Access log in Envoy's default text format, or JSON with Istio's key names. One record per request
//! (or TCP connection), written by the call's drop guard on a dedicated writer thread.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use serde::{Deserialize, Serialize};

pub mod format;

use crate::stats::Stat;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file to append to; `/dev/stdout` by default.
    #[serde(default = "default_access_log_path")]
    pub path: std::path::PathBuf,
    #[serde(default)]
    pub format: AccessLogFormat,
    /// A format string of Envoy operators (`%START_TIME%`, `%REQ(:AUTHORITY)%`, …).
    #[serde(default)]
    pub text_format: Option<String>,
    /// JSON lines: key → format string (Envoy's `json_format`).
    #[serde(default)]
    pub json_format: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessLogFormat {
    /// Envoy's default text format.
    #[default]
    Text,
    /// Every field, with Istio's JSON key names.
    Json,
    /// Istio's default text format (`meshConfig.accessLogFile` without a format).
    Istio,
}

fn default_access_log_path() -> std::path::PathBuf {
    std::path::PathBuf::from("/dev/stdout")
}

/// Lines waiting for the writer; past this, records are dropped and counted, never blocking a request.
const QUEUE: usize = 16 * 1024;

/// Envoy's `%...%` fields for one request or connection. `None` prints as `-`.
#[derive(Debug, Default, Serialize)]
pub struct Record {
    pub start_time: String,
    /// Borrowed for the standard methods.
    pub method: Option<std::borrow::Cow<'static, str>>,
    pub path: Option<String>,
    pub protocol: &'static str,
    pub response_code: u16,
    /// Envoy's response flags (`-` when none).
    pub response_flags: &'static str,
    pub response_code_details: Option<String>,
    pub upstream_transport_failure_reason: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: u64,
    pub upstream_service_time: Option<u64>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: Option<String>,
    pub upstream_host: Option<std::net::SocketAddr>,
    pub upstream_cluster: Option<Arc<str>>,
    /// Kept as addresses and formatted only when a log line, span or event is written.
    pub upstream_local_address: Option<std::net::SocketAddr>,
    pub downstream_remote_address: Option<std::net::SocketAddr>,
    pub downstream_local_address: Option<std::net::SocketAddr>,
    pub downstream_peer_uri_san: Option<Arc<str>>,
    pub upstream_peer_uri_san: Option<Arc<str>>,
    pub requested_server_name: Option<Arc<str>>,
    pub route_name: Option<Arc<str>>,
    /// RBAC outcome (`allowed` / `denied`) and the deciding policy, when RBAC ran.
    pub rbac_decision: Option<&'static str>,
    pub rbac_policy: Option<Arc<str>>,
    /// What the dry-run (shadow) rules would have done, and by which policy.
    pub rbac_shadow_decision: Option<&'static str>,
    pub rbac_shadow_policy: Option<Arc<str>>,
}

/// Where records go.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    format: std::sync::Arc<Formatter>,
    dropped: Stat,
}

/// How a record becomes a line.
#[derive(Debug)]
pub enum Formatter {
    /// Envoy's default text format.
    EnvoyText,
    /// JSON with Istio's key names (every field of the record).
    IstioJson,
    /// A format string of Envoy operators (`text_format`, or Istio's default with `ISTIO`).
    Text(format::Template),
    /// `json_format`: key → format string, typed as Envoy types them.
    Json(Vec<(String, format::Template)>),
}

impl Formatter {
    /// The formatter a config asks for; errors name the field.
    pub fn of(config: &AccessLogConfig) -> Result<Self, (&'static str, String)> {
        match (&config.text_format, &config.json_format) {
            (Some(_), Some(_)) => Err((
                "access_log",
                "text_format and json_format cannot both be set".into(),
            )),
            (Some(t), None) => format::Template::parse(t)
                .map(Self::Text)
                .map_err(|e| ("access_log.text_format", e.to_string())),
            (None, Some(j)) => j
                .iter()
                .map(|(k, v)| {
                    format::Template::parse(v)
                        .map(|t| (k.clone(), t))
                        .map_err(|e| ("access_log.json_format", format!("{k}: {e}")))
                })
                .collect::<Result<_, _>>()
                .map(Self::Json),
            (None, None) => Ok(match config.format {
                AccessLogFormat::Text => Self::EnvoyText,
                AccessLogFormat::Json => Self::IstioJson,
                AccessLogFormat::Istio => Self::Text(
                    format::Template::parse(format::ISTIO_TEXT)
                        .map_err(|e| ("access_log.format", e.to_string()))?,
                ),
            }),
        }
    }

    pub fn line(&self, record: &Record) -> Option<String> {
        Some(match self {
            Self::EnvoyText => record.to_text(),
            Self::Text(t) => t.render(record),
            Self::IstioJson => serde_json::to_string(record).ok()? + "\n",
            Self::Json(fields) => {
                let map: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(k, t)| (k.clone(), t.render_json(record)))
                    .collect();
                serde_json::to_string(&map).ok()? + "\n"
            }
        })
    }
}

// === impl AccessLog ===

impl AccessLog {
    /// Opens the log (appending) and starts its writer thread.
    pub fn open(config: Option<&AccessLogConfig>, dropped: Stat) -> std::io::Result<Self> {
        let Some(config) = config else {
            return Ok(Self {
                tx: None,
                format: std::sync::Arc::new(Formatter::EnvoyText),
                dropped,
            });
        };
        // Checked when the config was read; an error here still stops the start.
        let format = Formatter::of(config)
            .map_err(|(field, e)| std::io::Error::other(format!("{field}: {e}")))?;
        let tx = writer(&config.path)?;
        Ok(Self {
            tx: Some(tx),
            format: std::sync::Arc::new(format),
            dropped,
        })
    }

    /// A connection manager's own log (from xDS): same file, same writer as any other log of
    /// that path.
    pub fn shared(config: &AccessLogConfig, dropped: Stat) -> std::io::Result<Self> {
        Self::open(Some(config), dropped)
    }

    /// Whether records are written at all (no file configured: the access log is off).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, record: &Record) {
        let Some(tx) = &self.tx else { return };
        let Some(line) = self.format.line(record) else {
            return;
        };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Distinct access-log files one process writes; a config naming more is refused (each file has
/// a writer thread, and the paths come from the control plane).
pub const MAX_FILES: usize = 16;

/// The writer of `path`: one thread per file, shared by every log that names it.
fn writer(path: &std::path::Path) -> std::io::Result<SyncSender<String>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static WRITERS: OnceLock<Mutex<HashMap<std::path::PathBuf, SyncSender<String>>>> =
        OnceLock::new();
    let mut writers = WRITERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = writers.get(path) {
        return Ok(tx.clone());
    }
    if writers.len() >= MAX_FILES {
        return Err(std::io::Error::other(format!(
            "more than {MAX_FILES} access log files"
        )));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let (tx, rx) = sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            while let Ok(line) = rx.recv() {
                if let Err(e) = file.write_all(line.as_bytes()) {
                    tracing::warn!(error = %e, "access log write failed");
                }
            }
        })?;
    writers.insert(path.to_owned(), tx.clone());
    Ok(tx)
}

// === impl Record ===

fn dash<S: AsRef<str>>(v: &Option<S>) -> &str {
    v.as_ref().map_or("-", AsRef::as_ref)
}

impl Record {
    /// Envoy's default format:
    /// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    /// %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
    /// "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%"
    /// "%UPSTREAM_HOST%"`
    pub fn to_text(&self) -> String {
        let ust = self
            .upstream_service_time
            .map_or_else(|| "-".to_owned(), |t| t.to_string());
        format!(
            "[{}] \"{} {} {}\" {} {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"\n",
            self.start_time,
            dash(&self.method),
            dash(&self.path),
            self.protocol,
            self.response_code,
            self.response_flags,
            self.bytes_received,
            self.bytes_sent,
            self.duration,
            ust,
            dash(&self.x_forwarded_for),
            dash(&self.user_agent),
            dash(&self.request_id),
            dash(&self.authority),
            self.upstream_host
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        )
    }
}

/// RFC 3339 UTC with milliseconds, like Envoy's `%START_TIME%` (shared with the control plane).
pub use apisec::time::format_time;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        use std::time::SystemTime;
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_389_409_123);
        assert_eq!(format_time(t), "2025-11-29T04:10:09.123Z");
        assert_eq!(
            format_time(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn text_format_has_dashes_for_missing() {
        let r = Record {
            start_time: "T".into(),
            method: Some("GET".into()),
            path: Some("/x".into()),
            protocol: "HTTP/1.1",
            response_code: 200,
            response_flags: "-",
            ..Default::default()
        };
        assert_eq!(
            r.to_text(),
            "[T] \"GET /x HTTP/1.1\" 200 - 0 0 0 - \"-\" \"-\" \"-\" \"-\" \"-\"\n"
        );
    }
}
