//! Exports the API inventory's deltas as OTLP metrics (`MetricsService/Export`) every interval:
//! to the control plane over the xDS client's mTLS by default, or to any OTLP/gRPC receiver.
//!
//! Off the request path: calls only ever take the inventory's lock for one `observe`; this task
//! drains under the same lock and sends from its own backlog. While the receiver is down the
//! backlog keeps rows merged by key, up to `max_backlog`; rows past it are dropped and counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apisec::Row;
use apisec::inventory::SensitiveRow;
use apisec::otlp::Reporter;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::stats::Stat;
use crate::telemetry::Telemetry;

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Exporter {
    pub server: String,
    pub tls: Option<xds::tls::ClientTls>,
    pub reporter: Reporter,
    pub interval: Duration,
    pub max_backlog: usize,
    /// The current SVID, reported with each export (the control plane's certificate inventory).
    pub creds: Option<identity::CredentialsRx>,
}

type Key = (String, String, String, Option<String>, String);

fn key(r: &Row) -> Key {
    (
        r.service.clone(),
        r.method.clone(),
        r.template.clone(),
        r.caller.clone(),
        r.status_class.clone(),
    )
}

/// Rows waiting to be sent, merged by key, bounded.
struct Backlog {
    rows: HashMap<Key, Row>,
    /// Sensitive-data findings waiting, by (service, method, template, type, direction, place).
    sensitive: HashMap<(String, String, String, String, bool, String), SensitiveRow>,
    max: usize,
    dropped: Stat,
}

impl Backlog {
    fn add_sensitive(&mut self, found: Vec<SensitiveRow>) {
        for f in found {
            let k = (
                f.service.clone(),
                f.method.clone(),
                f.template.clone(),
                f.data_type.clone(),
                f.direction == apisec::sensitive::Direction::Response,
                f.location.clone(),
            );
            if let Some(have) = self.sensitive.get_mut(&k) {
                have.count = have.count.saturating_add(f.count);
            } else if self.sensitive.len() < self.max {
                self.sensitive.insert(k, f);
            } else {
                self.dropped.add(1);
            }
        }
    }

    fn add(&mut self, rows: Vec<Row>) {
        for r in rows {
            let k = key(&r);
            if let Some(have) = self.rows.get_mut(&k) {
                have.absorb(r);
            } else if self.rows.len() < self.max {
                self.rows.insert(k, r);
            } else {
                self.dropped.add(1);
            }
        }
    }
}

fn channel(e: &Exporter) -> Result<Channel, tonic::transport::Error> {
    let server = if e.server.contains("://") {
        e.server.clone()
    } else {
        format!("http://{}", e.server)
    };
    let endpoint = Endpoint::from_shared(server)?
        .connect_timeout(EXPORT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT);
    Ok(match &e.tls {
        Some(tls) => endpoint.connect_with_connector_lazy(xds::tls::connector(tls.clone())),
        None => endpoint.connect_lazy(),
    })
}

/// Runs until `stop` turns true, then sends what is left once.
pub async fn run(mut e: Exporter, telemetry: Arc<Telemetry>, mut stop: watch::Receiver<bool>) {
    let Some(inventory) = &telemetry.inventory else {
        return;
    };
    let stats = &telemetry.stats;
    let (ok, failed, sent) = (
        stats.stat("inventory.export_ok"),
        stats.stat("inventory.export_failed"),
        stats.stat("inventory.export_rows"),
    );
    let backlog_rows = stats.stat("inventory.export_backlog_rows");
    let mut backlog = Backlog {
        rows: HashMap::new(),
        sensitive: HashMap::new(),
        max: e.max_backlog,
        dropped: stats.stat("inventory.export_dropped_rows"),
    };
    let (mut client, mut logs) = match channel(&e) {
        Ok(c) => (
            MetricsServiceClient::new(c.clone()),
            LogsServiceClient::new(c),
        ),
        Err(err) => {
            tracing::error!(error = %err, server = %e.server, "inventory export: bad receiver address; not exporting");
            return;
        }
    };
    let events_sent = stats.stat("audit.exported");
    let mut reported_serial: Option<String> = None;
    let events_dropped = stats.stat("audit.dropped");
    tracing::info!(server = %e.server, interval = ?e.interval, "exporting the API inventory (OTLP)");
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(e.interval) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let (rows, found) = {
            let mut inv = inventory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (inv.drain(), inv.drain_sensitive())
        };
        backlog.add(rows);
        backlog.add_sensitive(found);
        e.reporter.svid = e.creds.as_ref().and_then(|c| {
            c.borrow().as_ref().map(|c| {
                let leaf = c.svid.leaf();
                apisec::otlp::SvidInfo {
                    spiffe_id: leaf.spiffe_id.as_str().to_owned(),
                    serial: leaf.serial.clone(),
                    not_after_unix: leaf.not_after.as_secs(),
                }
            })
        });
        backlog_rows.set(backlog.rows.len() as u64);
        // A new SVID is reported even when no call came (the control plane's certificate
        // inventory); otherwise only when there is something to send.
        let serial = e.reporter.svid.as_ref().map(|s| s.serial.clone());
        if !backlog.rows.is_empty() || !backlog.sensitive.is_empty() || serial != reported_serial {
            let rows: Vec<Row> = backlog.rows.values().cloned().collect();
            let found: Vec<SensitiveRow> = backlog.sensitive.values().cloned().collect();
            let request = apisec::otlp::encode_with(&e.reporter, &rows, &found);
            match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await {
                Ok(Ok(_)) => {
                    ok.add(1);
                    sent.add(rows.len() as u64);
                    reported_serial = serial;
                    backlog.rows.clear();
                    backlog.sensitive.clear();
                    backlog_rows.set(0);
                }
                Ok(Err(status)) => {
                    failed.add(1);
                    tracing::warn!(code = ?status.code(), message = %status.message(), backlog = backlog.rows.len(), "inventory export refused; keeping the rows");
                }
                Err(_) => {
                    failed.add(1);
                    tracing::warn!(
                        backlog = backlog.rows.len(),
                        "inventory export timed out; keeping the rows"
                    );
                }
            }
        }
        // Audit events, as OTLP logs to the same receiver; kept (bounded) if it is away.
        if let Some(outbox) = &telemetry.audit.outbox {
            let events = outbox.drain();
            if !events.is_empty() {
                let request = apisec::otlp::encode_events(&e.reporter, &events);
                match tokio::time::timeout(EXPORT_TIMEOUT, logs.export(request)).await {
                    Ok(Ok(_)) => events_sent.add(events.len() as u64),
                    Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                        // Refused for what it is: sending it again would not help.
                        tracing::warn!(message = %status.message(), "audit events refused");
                        events_dropped.add(events.len() as u64);
                    }
                    _ => outbox.requeue(events, &events_dropped),
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(template: &str, calls: u64) -> Row {
        Row {
            service: "s".into(),
            method: "GET".into(),
            template: template.into(),
            caller: None,
            status_class: "2xx".into(),
            calls,
            denied: 0,
            request_bytes: 0,
            response_bytes: 0,
            latency_ms_total: 0.0,
            latency_ms_max: 0.0,
            auth_schemes: vec![],
            request_content_types: vec![],
            response_content_types: vec![],
            examples: vec![],
            first_seen_unix: 5,
            last_seen_unix: 6,
        }
    }

    #[test]
    fn the_backlog_merges_by_key_and_drops_past_its_bound() {
        let dropped = Stat::default();
        let mut b = Backlog {
            rows: HashMap::new(),
            sensitive: HashMap::new(),
            max: 2,
            dropped: dropped.clone(),
        };
        b.add(vec![row("/a", 1), row("/b", 1)]);
        b.add(vec![row("/a", 2), row("/c", 1), row("/d", 1)]);
        assert_eq!(b.rows.len(), 2);
        assert_eq!(b.rows[&key(&row("/a", 0))].calls, 3);
        assert_eq!(dropped.get(), 2);
    }
}
