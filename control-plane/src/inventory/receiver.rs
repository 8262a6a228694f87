//! OTLP/gRPC `MetricsService/Export`, served beside ADS on the same ports. A report is taken
//! only from the workload it is about: on the mTLS port the reporting node must be a registered
//! workload whose SPIFFE ID is the caller's verified one (as for xDS); on the plaintext port
//! (loopback development) a node is who its id says. A report that claims calls for a service
//! of another workload is refused whole.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use tonic::{Request, Response, Status};
use xds::server::PeerIdentity;

use super::ApiInventory;
use crate::ControlPlane;

pub struct Receiver {
    pub control_plane: Arc<ControlPlane>,
    pub inventory: Arc<ApiInventory>,
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let peer = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.clone());
        let (reporter, mut rows, found) = apisec::otlp::decode_with(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A reporter's clock is its own: nothing is seen in the future (a row dated years ahead
        // would never expire).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for r in &mut rows {
            r.last_seen_unix = r.last_seen_unix.min(now);
            r.first_seen_unix = r.first_seen_unix.min(r.last_seen_unix);
        }
        let refused = |s: Status| {
            tracing::warn!(node = %reporter.node_id, ?peer, reason = %s.message(), "inventory report refused");
            s
        };
        let (workload, foreign) = self
            .control_plane
            .reporter(&reporter.node_id, peer.as_deref())
            .map_err(refused)?;
        let foreign_finding = found
            .iter()
            .find(|f| foreign.contains(&f.service))
            .map(|f| &f.service);
        if let Some(service) = rows
            .iter()
            .map(|r| &r.service)
            .find(|s| foreign.contains(*s))
            .or(foreign_finding)
        {
            return Err(refused(Status::permission_denied(format!(
                "{workload} reported calls for {}, a service of other workloads",
                service
            ))));
        }
        // The SVID it reports is taken only if it is the one it connected with (on mTLS).
        let svid = reporter
            .svid
            .clone()
            .filter(|s| peer.as_deref().is_none_or(|p| p == s.spiffe_id));
        let inventory = self.inventory.clone();
        let n = rows.len();
        let dropped = tokio::task::spawn_blocking(move || {
            if let Some(s) = &svid {
                inventory.set_cert(&workload, s)?;
            }
            Ok::<_, super::store::StoreError>(
                inventory.add(&workload, &rows)? + inventory.add_sensitive(&workload, &found)?,
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            tracing::error!(error = %e, "inventory store write failed");
            Status::unavailable(e.to_string())
        })?;
        tracing::debug!(node = %reporter.node_id, rows = n, dropped, "inventory report stored");
        let partial_success = (dropped > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: i64::try_from(dropped).unwrap_or(i64::MAX),
            error_message: format!("{dropped} rows past the store's bounds were dropped"),
        });
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success,
        }))
    }
}

/// OTLP/gRPC `LogsService/Export`: the sidecars' audit events (OCSF), taken like their inventory
/// reports — only from the workload they are about.
#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let peer = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.clone());
        let (reporter, events) = apisec::otlp::decode_events(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (workload, _) = self
            .control_plane
            .reporter(&reporter.node_id, peer.as_deref())
            .inspect_err(|s| {
                tracing::warn!(node = %reporter.node_id, ?peer, reason = %s.message(), "audit events refused");
            })?;
        let inventory = self.inventory.clone();
        tokio::task::spawn_blocking(move || inventory.add_events(&workload, &events))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}
