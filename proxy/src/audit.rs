//! Audit events: every denial the sidecar makes, and every detection, as one OCSF event per
//! line (or CEF, for SIEMs that want it) to a file or standard output (`audit.path: "-"`).
//!
//! - A denied HTTP call (RBAC) is an **API Activity** (class 6003): activity from the method
//!   (Create/Read/Update/Delete/Other), status Failure, the verified caller as the actor, the
//!   deciding policy in `status_detail`.
//! - A refused connection — inbound mTLS that does not verify, a TCP connection RBAC closed — is a
//!   **Network Activity** (4001) with activity Refuse.
//! - A detection (sensitive data newly seen in an operation) is a **Detection Finding** (2004).
//!
//! Written by a thread of its own through a bounded queue, like the access log: a full queue
//! drops the event and counts it (`audit.dropped`), never blocking a call.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::access_log::Record;
use crate::stats::Stat;

const QUEUE: usize = 4096;
const OCSF_VERSION: &str = "1.3.0";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    #[default]
    Ocsf,
    Cef,
}

/// `audit:` in the bootstrap.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A file (appended to), or `-` for standard output.
    pub path: PathBuf,
    #[serde(default)]
    pub format: AuditFormat,
}

/// OCSF events waiting to be exported as OTLP logs (to the inventory's receiver), bounded.
#[derive(Debug, Default)]
pub struct Outbox {
    events: std::sync::Mutex<std::collections::VecDeque<Value>>,
}

/// Events kept for export while the receiver is away; older ones are dropped (counted).
const OUTBOX: usize = 1000;

impl Outbox {
    /// Everything waiting, and forget it.
    pub fn drain(&self) -> Vec<Value> {
        self.events
            .lock()
            .map(|mut e| e.drain(..).collect())
            .unwrap_or_default()
    }

    /// Puts back what could not be sent (in front; the oldest go first if full).
    pub fn requeue(&self, mut events: Vec<Value>, dropped: &Stat) {
        if let Ok(mut q) = self.events.lock() {
            while let Some(e) = events.pop() {
                if q.len() >= OUTBOX {
                    dropped.inc();
                    continue;
                }
                q.push_front(e);
            }
        }
    }

    fn push(&self, e: Value, dropped: &Stat) {
        if let Ok(mut q) = self.events.lock() {
            if q.len() >= OUTBOX {
                q.pop_front();
                dropped.inc();
            }
            q.push_back(e);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Audit {
    tx: Option<SyncSender<String>>,
    /// With an inventory export: events also go there, as OTLP logs.
    pub outbox: Option<std::sync::Arc<Outbox>>,
    format: AuditFormat,
    dropped: Stat,
    written: Stat,
    /// This sidecar, as `metadata.product` and the destination of inbound events.
    workload: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn endpoint(addr: Option<SocketAddr>) -> Value {
    match addr {
        Some(a) => json!({"ip": a.ip().to_string(), "port": a.port()}),
        None => json!({}),
    }
}

/// OCSF's actor for a verified caller (or an unauthenticated one).
fn actor(peer: Option<&str>) -> Value {
    match peer {
        Some(id) => json!({"user": {"uid": id, "name": id, "type": "Service", "type_id": 99}}),
        None => json!({"user": {"name": "unauthenticated", "type": "Unknown", "type_id": 0}}),
    }
}

/// CEF's escaping of header fields (`|`, `\`) and extension values (`=`, `\`, newlines).
fn cef_header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

fn cef_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace(['\n', '\r'], " ")
}

impl Audit {
    pub fn off(dropped: Stat) -> Self {
        Self {
            tx: None,
            outbox: None,
            format: AuditFormat::Ocsf,
            written: dropped.clone(),
            dropped,
            workload: String::new(),
        }
    }

    pub fn open(
        config: Option<&AuditConfig>,
        workload: &str,
        exported: bool,
        dropped: Stat,
        written: Stat,
    ) -> std::io::Result<Self> {
        let outbox = exported.then(|| std::sync::Arc::new(Outbox::default()));
        let Some(config) = config else {
            let mut a = Self::off(dropped);
            a.outbox = outbox;
            a.written = written;
            a.workload = workload.to_owned();
            return Ok(a);
        };
        let mut out: Box<dyn std::io::Write + Send> = if config.path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&config.path)?,
            )
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
                        tracing::warn!(error = %e, "audit write failed");
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            outbox,
            format: config.format,
            dropped,
            written,
            workload: workload.to_owned(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some() || self.outbox.is_some()
    }

    fn metadata(&self, uid: Option<&str>) -> Value {
        let mut m = json!({
            "version": OCSF_VERSION,
            "product": {"name": "eastguard", "vendor_name": "eastguard", "version": env!("CARGO_PKG_VERSION")},
            "log_name": "audit",
            "logged_time": now_ms(),
        });
        if let Some(u) = uid {
            m["uid"] = json!(u);
        }
        m
    }
}

/// What a Detection Finding says, beyond what every one has.
struct Detection<'a> {
    high: bool,
    title: String,
    message: String,
    uid: String,
    kind: &'static str,
    desc: String,
    /// The operation (`METHOD TEMPLATE`) on `service`.
    operation: String,
    service: &'a str,
    actor: Option<Option<&'a str>>,
    unmapped: Value,
}

impl Audit {
    /// An OCSF Detection Finding (2004).
    fn detection(&self, d: Detection<'_>) -> Value {
        let mut v = json!({
            "class_uid": 2004, "class_name": "Detection Finding",
            "category_uid": 2, "category_name": "Findings",
            "activity_id": 1, "activity_name": "Create",
            "type_uid": 200401, "type_name": "Detection Finding: Create",
            "time": now_ms(),
            "severity_id": if d.high { 4 } else { 3 },
            "severity": if d.high { "High" } else { "Medium" },
            "status_id": 1, "status": "New",
            "message": d.message,
            "metadata": self.metadata(None),
            "finding_info": {"uid": d.uid, "title": d.title, "types": [d.kind], "desc": d.desc},
            "resources": [{"name": d.operation, "type": "API Operation", "uid": d.service}],
            "unmapped": {"eastguard": d.unmapped},
        });
        v["unmapped"]["eastguard"]["workload"] = json!(self.workload);
        if let Some(a) = d.actor {
            v["actor"] = actor(a);
        }
        v
    }

    fn emit(&self, ocsf: Value, cef: impl FnOnce() -> String) {
        if let Some(outbox) = &self.outbox {
            outbox.push(ocsf.clone(), &self.dropped);
        }
        let Some(tx) = &self.tx else { return };
        let line = match self.format {
            AuditFormat::Ocsf => match serde_json::to_string(&ocsf) {
                Ok(mut s) => {
                    s.push('\n');
                    s
                }
                Err(_) => return,
            },
            AuditFormat::Cef => cef() + "\n",
        };
        match tx.try_send(line) {
            Ok(()) => self.written.inc(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// A call RBAC denied.
    pub fn call_denied(&self, r: &Record, service: Option<&str>) {
        if !self.enabled() {
            return;
        }
        let method = r.method.as_deref().unwrap_or("-");
        let (activity_id, activity) = match method {
            "POST" => (1, "Create"),
            "GET" | "HEAD" => (2, "Read"),
            "PUT" | "PATCH" => (3, "Update"),
            "DELETE" => (4, "Delete"),
            _ => (99, "Other"),
        };
        let policy = r.rbac_policy.as_deref();
        let detail = match policy {
            Some(p) => format!("denied by {p}"),
            None => "denied: no ALLOW policy matched".to_owned(),
        };
        let path = r.path.as_deref().unwrap_or("/");
        let peer = r.downstream_peer_uri_san.as_deref();
        let (src, dst) = (r.downstream_remote_address, r.downstream_local_address);
        let ocsf = json!({
            "class_uid": 6003, "class_name": "API Activity",
            "category_uid": 6, "category_name": "Application Activity",
            "activity_id": activity_id, "activity_name": activity,
            "type_uid": 600300 + activity_id, "type_name": format!("API Activity: {activity}"),
            "time": now_ms(),
            "severity_id": 3, "severity": "Medium",
            "status_id": 2, "status": "Failure",
            "status_code": r.response_code.to_string(),
            "status_detail": detail,
            "message": format!("{method} {path} from {} denied", peer.unwrap_or("an unauthenticated caller")),
            "metadata": self.metadata(r.request_id.as_deref()),
            "actor": actor(peer),
            "api": {
                "operation": method,
                "service": {"name": service.unwrap_or(&self.workload)},
                "request": {"uid": r.request_id.as_deref().unwrap_or("")},
                "response": {"code": r.response_code, "error": "RBAC: access denied"},
            },
            "src_endpoint": endpoint(src),
            "dst_endpoint": endpoint(dst),
            "http_request": {
                "http_method": method,
                "url": {"path": path, "hostname": r.authority.as_deref().unwrap_or("")},
                "user_agent": r.user_agent.as_deref().unwrap_or(""),
            },
            "http_response": {"code": r.response_code},
            "unmapped": {"eastguard": {"decision": "deny", "policy": policy, "workload": self.workload}},
        });
        self.emit(ocsf, || {
            format!(
                "CEF:0|eastguard|eastguard|{}|api-denied|API call denied|6|src={} spt={} suser={} request={} requestMethod={} cs1Label=policy cs1={} outcome=denied",
                cef_header(env!("CARGO_PKG_VERSION")),
                src.map(|a| a.ip().to_string()).unwrap_or_default(),
                src.map(|a| a.port()).unwrap_or(0),
                cef_value(peer.unwrap_or("unauthenticated")),
                cef_value(path),
                cef_value(method),
                cef_value(policy.unwrap_or("no ALLOW matched")),
            )
        });
    }

    /// A connection refused: mTLS that did not verify, or TCP that RBAC closed.
    pub fn connection_refused(
        &self,
        remote: SocketAddr,
        local: SocketAddr,
        peer: Option<&str>,
        reason: &str,
    ) {
        if !self.enabled() {
            return;
        }
        let ocsf = json!({
            "class_uid": 4001, "class_name": "Network Activity",
            "category_uid": 4, "category_name": "Network Activity",
            "activity_id": 5, "activity_name": "Refuse",
            "type_uid": 400105, "type_name": "Network Activity: Refuse",
            "time": now_ms(),
            "severity_id": 3, "severity": "Medium",
            "status_id": 2, "status": "Failure",
            "status_detail": reason,
            "message": format!("connection from {remote} refused: {reason}"),
            "metadata": self.metadata(None),
            "actor": actor(peer),
            "src_endpoint": endpoint(Some(remote)),
            "dst_endpoint": endpoint(Some(local)),
            "unmapped": {"eastguard": {"decision": "deny", "workload": self.workload}},
        });
        self.emit(ocsf, || {
            format!(
                "CEF:0|eastguard|eastguard|{}|connection-refused|Connection refused|6|src={} spt={} suser={} reason={} outcome=refused",
                cef_header(env!("CARGO_PKG_VERSION")),
                remote.ip(),
                remote.port(),
                cef_value(peer.unwrap_or("unauthenticated")),
                cef_value(reason),
            )
        });
    }

    /// A call on a caller → operation edge the baseline does not have (audit mode).
    pub fn drift(&self, e: &crate::drift::Edge, status: u16) {
        if !self.enabled() {
            return;
        }
        let ok = (200..300).contains(&status);
        let title = format!(
            "{} called {} {} on {}, which it never did in the baseline",
            e.caller, e.method, e.template, e.service
        );
        let ocsf = self.detection(Detection {
            high: ok,
            message: title.clone(),
            title,
            uid: format!(
                "drift {} {} {} {}",
                e.caller, e.service, e.method, e.template
            ),
            kind: "Authorization Drift",
            desc: format!("answered {status}"),
            operation: format!("{} {}", e.method, e.template),
            service: &e.service,
            actor: Some((e.caller != "plaintext").then_some(e.caller.as_str())),
            unmapped: json!({"status": status}),
        });
        self.emit(ocsf, || {
            format!(
                "CEF:0|eastguard|eastguard|{}|drift|Authorization drift|{}|suser={} dhost={} request={} requestMethod={} outcome={status}",
                cef_header(env!("CARGO_PKG_VERSION")),
                if ok { 8 } else { 6 },
                cef_value(&e.caller),
                cef_value(&e.service),
                cef_value(&e.template),
                cef_value(&e.method),
            )
        });
    }

    /// A BOLA / enumeration finding.
    pub fn bola(&self, f: &apisec::inventory::BolaEvent) {
        if !self.enabled() {
            return;
        }
        use apisec::bola::Pattern;
        let what = match f.finding.pattern {
            Pattern::Enumeration => format!(
                "{} distinct objects within the window",
                f.finding.distinct_ids
            ),
            Pattern::SequentialWalk => {
                format!("{} consecutive object IDs", f.finding.sequential_run)
            }
            Pattern::DeniedOrMissing => format!(
                "{} of {} calls answered 403/404",
                f.finding.denied_or_missing, f.finding.calls
            ),
        };
        let caller = f.caller.as_deref().unwrap_or("an unauthenticated caller");
        let title = format!("{caller} enumerates {} {}: {what}", f.method, f.template);
        let ocsf = self.detection(Detection {
            high: true,
            message: title.clone(),
            title,
            uid: format!("bola {caller} {} {} {}", f.service, f.method, f.template),
            kind: "Broken Object Level Authorization",
            desc: format!("examples (redacted): {}", f.finding.examples.join(", ")),
            operation: format!("{} {}", f.method, f.template),
            service: &f.service,
            actor: Some(f.caller.as_deref()),
            unmapped: json!({"pattern": f.finding.pattern, "distinct_ids": f.finding.distinct_ids,
                "sequential_run": f.finding.sequential_run, "calls": f.finding.calls,
                "denied_or_missing": f.finding.denied_or_missing, "examples": f.finding.examples}),
        });
        self.emit(ocsf, || {
            format!(
                "CEF:0|eastguard|eastguard|{}|bola|Object enumeration|8|suser={} dhost={} request={} requestMethod={} msg={}",
                cef_header(env!("CARGO_PKG_VERSION")),
                cef_value(caller),
                cef_value(&f.service),
                cef_value(&f.template),
                cef_value(&f.method),
                cef_value(&what),
            )
        });
    }

    /// Sensitive data seen for the first time in an operation.
    pub fn sensitive_data(
        &self,
        service: &str,
        method: &str,
        template: &str,
        data_type: &str,
        place: &str,
        response: bool,
    ) {
        if !self.enabled() {
            return;
        }
        let title = format!(
            "{data_type} in the {} of {method} {template}",
            if response { "response" } else { "request" }
        );
        let ocsf = self.detection(Detection {
            high: response,
            message: format!("sensitive data: {title} on {service}"),
            title,
            uid: format!("{service} {method} {template} {data_type} {place}"),
            kind: "Sensitive Data Exposure",
            desc: format!("{data_type} at {place}; the value is not kept"),
            operation: format!("{method} {template}"),
            service,
            actor: None,
            unmapped: json!({"data_type": data_type, "location": place}),
        });
        self.emit(ocsf, || {
            format!(
                "CEF:0|eastguard|eastguard|{}|sensitive-data|Sensitive data exposure|{}|dhost={} request={} requestMethod={} cs1Label=dataType cs1={} cs2Label=location cs2={}",
                cef_header(env!("CARGO_PKG_VERSION")),
                if response { 8 } else { 6 },
                cef_value(service),
                cef_value(template),
                cef_value(method),
                cef_value(data_type),
                cef_value(place),
            )
        });
    }
}
