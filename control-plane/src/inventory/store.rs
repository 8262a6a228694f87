//! The inventory store: SQLite (a file in `--data-dir`, or in memory), one row per (reporting
//! workload, service, method, template, caller, status class), counters added up from each
//! sidecar's deltas. Survives restarts; rows not seen within the retention are deleted.
//!
//! Bounded whatever sidecars send: at most `max_rows_per_workload` keys per reporting workload
//! and `max_rows` in all; rows past either are dropped and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apisec::Row;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("inventory store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("inventory store: {0}")]
    Sql(#[from] rusqlite::Error),
}

#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub max_rows: u64,
    pub max_rows_per_workload: u64,
    pub retention: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_rows: 1_000_000,
            max_rows_per_workload: 20_000,
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

pub struct Store {
    db: Connection,
    limits: StoreLimits,
    /// Rows refused for a bound since start.
    pub dropped: u64,
    /// Rows in all and per reporting workload (counting them per export would scan the table).
    total: u64,
    per_workload: std::collections::HashMap<String, u64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS calls (
    workload TEXT NOT NULL,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    template TEXT NOT NULL,
    caller TEXT NOT NULL,
    status_class TEXT NOT NULL,
    calls INTEGER NOT NULL,
    denied INTEGER NOT NULL,
    request_bytes INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    auth_schemes TEXT NOT NULL,
    request_types TEXT NOT NULL,
    response_types TEXT NOT NULL,
    examples TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (workload, service, method, template, caller, status_class)
);
CREATE INDEX IF NOT EXISTS calls_last_seen ON calls (last_seen);
CREATE TABLE IF NOT EXISTS sensitive (
    workload TEXT NOT NULL,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    template TEXT NOT NULL,
    data_type TEXT NOT NULL,
    direction TEXT NOT NULL,
    location TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (workload, service, method, template, data_type, direction, location)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workload TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    class_uid INTEGER NOT NULL,
    class_name TEXT NOT NULL,
    severity_id INTEGER NOT NULL,
    message TEXT NOT NULL,
    ocsf TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_workload ON events (workload, id);
CREATE TABLE IF NOT EXISTS certs (
    workload TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    reported INTEGER NOT NULL
);
";

/// Audit events kept per reporting workload: the newest; older ones are deleted.
const EVENTS_PER_WORKLOAD: i64 = 10_000;

/// Findings kept per reporting workload (more are dropped and counted).
const SENSITIVE_PER_WORKLOAD: i64 = 10_000;

/// Lists are kept as JSON arrays of at most this many entries.
const LIST_MAX: usize = 16;

fn union(old: &str, new: &[String]) -> String {
    let mut v: Vec<String> = serde_json::from_str(old).unwrap_or_default();
    for n in new {
        if v.len() < LIST_MAX && !v.contains(n) {
            v.push(n.clone());
        }
    }
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".into())
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The SVID a workload's sidecar reported last.
#[derive(Debug, Clone, Serialize)]
pub struct CertRow {
    pub workload: String,
    pub spiffe_id: String,
    pub serial: String,
    pub not_after: i64,
    pub reported: i64,
}

/// An audit event a sidecar reported.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub workload: String,
    pub time_ms: i64,
    pub class_uid: u32,
    pub class_name: String,
    pub severity_id: u8,
    pub message: String,
    pub ocsf: serde_json::Value,
}

/// Calls from one caller to one operation of one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    /// `namespace/name` of the reporting (called) workload.
    pub workload: String,
    /// The verified SPIFFE ID; `None` for plaintext callers.
    pub caller: Option<String>,
    pub service: String,
    pub method: String,
    pub template: String,
    /// Calls the policy let through.
    pub allowed: u64,
    pub denied: u64,
    pub examples: Vec<String>,
}

/// One caller of an operation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallerCount {
    /// The verified SPIFFE ID; `plaintext` for callers without one.
    pub id: String,
    pub calls: u64,
    pub denied: u64,
    /// What the ID names in the cluster (with `--kubernetes`): a ServiceAccount and its owner,
    /// or none (`unknown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::kube::cluster::Identity>,
}

/// An API operation (service, method, template) over all reporting workloads.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Operation {
    pub service: String,
    pub method: String,
    pub template: String,
    pub calls: u64,
    pub denied: u64,
    /// Calls per status class (`2xx` → n), denied calls included.
    pub status_classes: BTreeMap<String, u64>,
    /// Status classes of calls the application answered (not denied by RBAC).
    #[serde(skip)]
    pub app_classes: BTreeSet<u16>,
    pub auth_schemes: Vec<String>,
    pub request_content_types: Vec<String>,
    pub response_content_types: Vec<String>,
    pub callers: Vec<CallerCount>,
    pub workloads: Vec<String>,
    pub examples: Vec<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Sensitive data seen in its calls: type, direction, place, count (never a value).
    pub sensitive: Vec<SensitiveCount>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SensitiveCount {
    pub data_type: String,
    pub direction: String,
    pub location: String,
    pub count: u64,
}

impl Store {
    /// Opens (creating) `dir/inventory.sqlite3`, or an in-memory store without a directory.
    pub fn open(dir: Option<&Path>, limits: StoreLimits) -> Result<Self, StoreError> {
        let db = match dir {
            Some(d) => {
                let path = d.join("inventory.sqlite3");
                let open = |e| StoreError::Open {
                    path: path.display().to_string(),
                    source: e,
                };
                let db = Connection::open(&path).map_err(open)?;
                db.pragma_update(None, "journal_mode", "WAL")
                    .map_err(open)?;
                db.pragma_update(None, "synchronous", "NORMAL")
                    .map_err(open)?;
                db
            }
            None => Connection::open_in_memory().map_err(|e| StoreError::Open {
                path: ":memory:".into(),
                source: e,
            })?,
        };
        db.execute_batch(SCHEMA)?;
        let mut store = Self {
            db,
            limits,
            dropped: 0,
            total: 0,
            per_workload: std::collections::HashMap::new(),
        };
        store.expire()?;
        Ok(store)
    }

    fn count(&mut self) -> Result<(), StoreError> {
        let mut stmt = self
            .db
            .prepare("SELECT workload, COUNT(*) FROM calls GROUP BY workload")?;
        let counts = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?
            .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
        drop(stmt);
        self.total = counts.values().sum();
        self.per_workload = counts;
        Ok(())
    }

    /// Adds a sidecar's deltas. Returns how many rows were dropped for a bound.
    pub fn add(&mut self, workload: &str, rows: &[Row]) -> Result<u64, StoreError> {
        let limits = self.limits;
        let mut total = self.total;
        let mut mine = self.per_workload.get(workload).copied().unwrap_or(0);
        let tx = self.db.transaction()?;
        let mut dropped = 0;
        for r in rows {
            let caller = r.caller.as_deref().unwrap_or("");
            let key = params![
                workload,
                r.service,
                r.method,
                r.template,
                caller,
                r.status_class
            ];
            let existing: Option<(String, String, String, String)> = tx
                .prepare_cached(
                    "SELECT auth_schemes, request_types, response_types, examples FROM calls
                     WHERE workload = ?1 AND service = ?2 AND method = ?3 AND template = ?4
                       AND caller = ?5 AND status_class = ?6",
                )?
                .query_row(key, |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?)))
                .optional()?;
            let known = existing.is_some();
            if !known && (total >= limits.max_rows || mine >= limits.max_rows_per_workload) {
                dropped += 1;
                continue;
            }
            // Counters add up; lists are the union (read above), capped.
            let (a, rq, rs, ex) = existing.unwrap_or_else(|| {
                let empty = || "[]".to_owned();
                (empty(), empty(), empty(), empty())
            });
            let auth: Vec<String> = r.auth_schemes.iter().map(|s| (*s).to_owned()).collect();
            tx.prepare_cached(
                "INSERT INTO calls VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
                   ?14, ?15, ?16, ?17)
                 ON CONFLICT (workload, service, method, template, caller, status_class) DO UPDATE
                 SET calls = calls + excluded.calls, denied = denied + excluded.denied,
                   request_bytes = request_bytes + excluded.request_bytes,
                   response_bytes = response_bytes + excluded.response_bytes,
                   latency_ms = latency_ms + excluded.latency_ms,
                   auth_schemes = excluded.auth_schemes, request_types = excluded.request_types,
                   response_types = excluded.response_types, examples = excluded.examples,
                   first_seen = MIN(first_seen, excluded.first_seen),
                   last_seen = MAX(last_seen, excluded.last_seen)",
            )?
            .execute(params![
                workload,
                r.service,
                r.method,
                r.template,
                caller,
                r.status_class,
                i(r.calls),
                i(r.denied),
                i(r.request_bytes),
                i(r.response_bytes),
                r.latency_ms_total,
                union(&a, &auth),
                union(&rq, &r.request_content_types),
                union(&rs, &r.response_content_types),
                union(&ex, &r.examples),
                i(r.first_seen_unix),
                i(r.last_seen_unix),
            ])?;
            if !known {
                total += 1;
                mine += 1;
            }
        }
        tx.commit()?;
        self.total = total;
        if mine > 0 {
            self.per_workload.insert(workload.to_owned(), mine);
        }
        self.dropped += dropped;
        Ok(dropped)
    }

    /// Adds a workload's sensitive-data findings; how many were dropped for the bound.
    pub fn add_sensitive(
        &mut self,
        workload: &str,
        found: &[apisec::inventory::SensitiveRow],
    ) -> Result<u64, StoreError> {
        if found.is_empty() {
            return Ok(0);
        }
        let now = now_unix();
        let tx = self.db.transaction()?;
        let mut have: i64 = tx.query_row(
            "SELECT COUNT(*) FROM sensitive WHERE workload = ?1",
            [workload],
            |r| r.get(0),
        )?;
        let mut dropped = 0;
        for f in found {
            let direction = match f.direction {
                apisec::sensitive::Direction::Request => "request",
                apisec::sensitive::Direction::Response => "response",
            };
            let updated = tx
                .prepare_cached(
                    "UPDATE sensitive SET count = count + ?8, last_seen = ?9
                     WHERE workload = ?1 AND service = ?2 AND method = ?3 AND template = ?4
                       AND data_type = ?5 AND direction = ?6 AND location = ?7",
                )?
                .execute(params![
                    workload,
                    f.service,
                    f.method,
                    f.template,
                    f.data_type,
                    direction,
                    f.location,
                    i(f.count),
                    now
                ])?;
            if updated > 0 {
                continue;
            }
            if have >= SENSITIVE_PER_WORKLOAD {
                dropped += 1;
                continue;
            }
            tx.prepare_cached("INSERT INTO sensitive VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")?
                .execute(params![
                    workload,
                    f.service,
                    f.method,
                    f.template,
                    f.data_type,
                    direction,
                    f.location,
                    i(f.count),
                    now
                ])?;
            have += 1;
        }
        tx.commit()?;
        self.dropped += dropped;
        Ok(dropped)
    }

    /// Adds a workload's audit events, keeping its newest [`EVENTS_PER_WORKLOAD`].
    pub fn add_events(
        &mut self,
        workload: &str,
        events: &[apisec::otlp::Event],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let tx = self.db.transaction()?;
        for e in events {
            tx.prepare_cached(
                "INSERT INTO events (workload, time_ms, class_uid, class_name, severity_id, message, ocsf)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                workload,
                i(e.time_ms),
                e.class_uid,
                e.class_name,
                e.severity_id,
                e.message,
                e.ocsf.to_string()
            ])?;
        }
        tx.execute(
            "DELETE FROM events WHERE workload = ?1 AND id <= (
                 SELECT id FROM events WHERE workload = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![workload, EVENTS_PER_WORKLOAD],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The newest `limit` events, of one OCSF class if given.
    pub fn events(
        &self,
        class_uid: Option<u32>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT workload, time_ms, class_uid, class_name, severity_id, message, ocsf FROM events
             WHERE ?1 IS NULL OR class_uid = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![class_uid, limit], |r| {
            Ok(StoredEvent {
                workload: r.get(0)?,
                time_ms: r.get(1)?,
                class_uid: r.get(2)?,
                class_name: r.get(3)?,
                severity_id: r.get(4)?,
                message: r.get(5)?,
                ocsf: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The SVID a workload's sidecar reported last (one row per workload: bounded by the registry).
    pub fn set_cert(
        &mut self,
        workload: &str,
        svid: &apisec::otlp::SvidInfo,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO certs VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (workload) DO UPDATE SET spiffe_id = ?2, serial = ?3, not_after = ?4,
               reported = ?5",
            params![
                workload,
                svid.spiffe_id,
                svid.serial,
                i(svid.not_after_unix),
                now_unix()
            ],
        )?;
        Ok(())
    }

    /// Every workload's last reported SVID.
    pub fn certs(&self) -> Result<Vec<CertRow>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT workload, spiffe_id, serial, not_after, reported FROM certs ORDER BY workload",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(CertRow {
                workload: r.get(0)?,
                spiffe_id: r.get(1)?,
                serial: r.get(2)?,
                not_after: r.get(3)?,
                reported: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes rows last seen before the retention window.
    pub fn expire(&mut self) -> Result<usize, StoreError> {
        let cutoff = now_unix() - self.limits.retention.as_secs() as i64;
        let deleted = self
            .db
            .execute("DELETE FROM calls WHERE last_seen < ?1", [cutoff])?;
        self.db
            .execute("DELETE FROM sensitive WHERE last_seen < ?1", [cutoff])?;
        self.db.execute(
            "DELETE FROM events WHERE time_ms < ?1",
            [cutoff.saturating_mul(1000)],
        )?;
        self.count()?;
        Ok(deleted)
    }

    pub fn rows(&self) -> Result<u64, StoreError> {
        Ok(self
            .db
            .query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))?)
    }

    /// Who called what on which workload, with calls the policy allowed, since `since` (unix).
    pub fn edges(&self, since: i64) -> Result<Vec<Edge>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT workload, caller, service, method, template, SUM(calls - denied), SUM(denied),
                    MAX(examples)
             FROM calls WHERE last_seen >= ?1
             GROUP BY workload, caller, service, method, template
             ORDER BY workload, caller, service, method, template",
        )?;
        let rows = stmt.query_map([since], |r| {
            Ok(Edge {
                workload: r.get(0)?,
                caller: Some(r.get::<_, String>(1)?).filter(|c| !c.is_empty()),
                service: r.get(2)?,
                method: r.get(3)?,
                template: r.get(4)?,
                allowed: r.get::<_, i64>(5)?.max(0) as u64,
                denied: r.get::<_, i64>(6)?.max(0) as u64,
                examples: serde_json::from_str(&r.get::<_, String>(7)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every operation, its callers and what was seen of it, sorted by (service, template, method).
    pub fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT service, method, template, caller, status_class, calls, denied, auth_schemes,
                    request_types, response_types, examples, first_seen, last_seen, workload
             FROM calls ORDER BY service, template, method, caller",
        )?;
        let mut ops: BTreeMap<(String, String, String), Operation> = BTreeMap::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (service, method, template): (String, String, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?);
            let caller: String = r.get(3)?;
            let class: String = r.get(4)?;
            let calls = r.get::<_, i64>(5)?.max(0) as u64;
            let denied = r.get::<_, i64>(6)?.max(0) as u64;
            let op = ops
                .entry((service.clone(), template.clone(), method.clone()))
                .or_insert_with(|| Operation {
                    service,
                    method,
                    template,
                    calls: 0,
                    denied: 0,
                    status_classes: BTreeMap::new(),
                    app_classes: BTreeSet::new(),
                    auth_schemes: Vec::new(),
                    request_content_types: Vec::new(),
                    response_content_types: Vec::new(),
                    callers: Vec::new(),
                    workloads: Vec::new(),
                    examples: Vec::new(),
                    first_seen: i64::MAX,
                    last_seen: 0,
                    sensitive: Vec::new(),
                });
            op.calls += calls;
            op.denied += denied;
            *op.status_classes.entry(class.clone()).or_default() += calls;
            if calls > denied
                && let Some(c) = class.strip_suffix("xx").and_then(|c| c.parse().ok())
            {
                op.app_classes.insert(c);
            }
            let id = if caller.is_empty() {
                "plaintext".to_owned()
            } else {
                caller
            };
            match op.callers.iter_mut().find(|c| c.id == id) {
                Some(c) => {
                    c.calls += calls;
                    c.denied += denied;
                }
                None => op.callers.push(CallerCount {
                    id,
                    calls,
                    denied,
                    identity: None,
                }),
            }
            for (col, into) in [
                (7, &mut op.auth_schemes),
                (8, &mut op.request_content_types),
                (9, &mut op.response_content_types),
                (10, &mut op.examples),
            ] {
                let v: Vec<String> =
                    serde_json::from_str(&r.get::<_, String>(col)?).unwrap_or_default();
                for s in v {
                    if into.len() < LIST_MAX && !into.contains(&s) {
                        into.push(s);
                    }
                }
            }
            op.first_seen = op.first_seen.min(r.get(11)?);
            op.last_seen = op.last_seen.max(r.get(12)?);
            let w: String = r.get(13)?;
            if !op.workloads.contains(&w) {
                op.workloads.push(w);
            }
        }
        drop(rows);
        drop(stmt);
        let mut stmt = self.db.prepare(
            "SELECT service, method, template, data_type, direction, location, SUM(count)
             FROM sensitive GROUP BY service, method, template, data_type, direction, location
             ORDER BY data_type, direction, location",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key: (String, String, String) = (r.get(0)?, r.get(2)?, r.get(1)?);
            if let Some(op) = ops.get_mut(&key) {
                op.sensitive.push(SensitiveCount {
                    data_type: r.get(3)?,
                    direction: r.get(4)?,
                    location: r.get(5)?,
                    count: r.get::<_, i64>(6)?.max(0) as u64,
                });
            }
        }
        Ok(ops.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(template: &str, caller: Option<&str>, class: &str, calls: u64, denied: u64) -> Row {
        Row {
            service: "orders.shop".into(),
            method: "GET".into(),
            template: template.into(),
            caller: caller.map(Into::into),
            status_class: class.into(),
            calls,
            denied,
            request_bytes: 1,
            response_bytes: 2,
            latency_ms_total: 1.0,
            latency_ms_max: 1.0,
            auth_schemes: vec!["bearer"],
            request_content_types: vec![],
            response_content_types: vec!["application/json".into()],
            examples: vec![format!("{template}-ex")],
            first_seen_unix: now_unix() as u64 - 5,
            last_seen_unix: now_unix() as u64,
        }
    }

    #[test]
    fn deltas_add_up_across_restarts() {
        let dir = std::env::temp_dir().join(format!("eg-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let web_id = "spiffe://td/ns/shop/sa/web";
        let web = Some(web_id);
        {
            let mut s = Store::open(Some(&dir), StoreLimits::default()).unwrap();
            s.add("shop/orders", &[row("/o/{id}", web, "2xx", 3, 0)])
                .unwrap();
            s.add(
                "shop/orders",
                &[
                    row("/o/{id}", web, "2xx", 2, 0),
                    row("/o/{id}", None, "4xx", 1, 1),
                ],
            )
            .unwrap();
        }
        let s = Store::open(Some(&dir), StoreLimits::default()).unwrap();
        let ops = s.operations().unwrap();
        assert_eq!(ops.len(), 1);
        let op = &ops[0];
        assert_eq!((op.calls, op.denied), (6, 1));
        assert_eq!(
            op.status_classes,
            BTreeMap::from([("2xx".into(), 5), ("4xx".into(), 1)])
        );
        assert_eq!(
            op.app_classes,
            BTreeSet::from([2]),
            "a denied-only class is not the app's"
        );
        assert_eq!(
            op.callers,
            vec![
                CallerCount {
                    id: "plaintext".into(),
                    calls: 1,
                    denied: 1,
                    identity: None,
                },
                CallerCount {
                    id: web_id.into(),
                    calls: 5,
                    denied: 0,
                    identity: None,
                },
            ]
        );
        assert_eq!(op.auth_schemes, vec!["bearer"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bounds_hold_and_old_rows_expire() {
        let limits = StoreLimits {
            max_rows: 3,
            max_rows_per_workload: 2,
            retention: Duration::from_secs(60),
        };
        let mut s = Store::open(None, limits).unwrap();
        let rows: Vec<Row> = (0..5)
            .map(|n| row(&format!("/r{n}"), None, "2xx", 1, 0))
            .collect();
        assert_eq!(s.add("a/a", &rows).unwrap(), 3);
        assert_eq!(s.add("b/b", &rows).unwrap(), 4, "3 in all");
        // Known keys still add up past the bound.
        assert_eq!(s.add("a/a", &rows[..2]).unwrap(), 0);
        assert_eq!(s.rows().unwrap(), 3);
        let mut old = row("/old", None, "2xx", 1, 0);
        old.first_seen_unix = 1;
        old.last_seen_unix = 2;
        let mut s = Store::open(None, StoreLimits::default()).unwrap();
        s.add("a/a", &[old, row("/new", None, "2xx", 1, 0)])
            .unwrap();
        assert_eq!(s.expire().unwrap(), 1);
        assert_eq!(s.operations().unwrap()[0].template, "/new");
    }
}
