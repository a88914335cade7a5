//! `grpc.health.v1` alone, in plaintext, on a port of its own: what a probe that cannot present
//! a certificate or an API key (Kubernetes' gRPC probes) can ask, when the service's own port
//! requires one. It tells whether a process serves, nothing more.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// Serves the statuses `health` reports, alone, on `addr` (`--health-listen`; port 0 picks a
/// free one) for the life of the process; returns the address it listens on, `None` without an
/// address, or an error that names the flag.
pub async fn serve_plaintext(
    addr: Option<&str>,
    health: &HealthReporter,
) -> Result<Option<SocketAddr>, String> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let flag = |e: std::io::Error| format!("--health-listen {addr}: {e}");
    let service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
    let listener = TcpListener::bind(addr).await.map_err(flag)?;
    let local = listener.local_addr().map_err(flag)?;
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(crate::incoming(listener))
            .await;
        if let Err(e) = served {
            tracing::error!(%local, error = %e, "the health listener stopped");
        }
    });
    Ok(Some(local))
}
