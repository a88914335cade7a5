//! `strata worker`: the worker process's command line and main loop.

use std::future::Future;
use std::io::Write;

use strata_shared::tls::{LinkSecurity, TlsArgs};
use strata_shared::transport::TcpTransport;
use tokio::net::TcpListener;

use crate::error::WorkerError;

/// Options of `strata worker` (and `strata-worker`).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Control-plane (gRPC) address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:50061", env = "STRATA_WORKER_LISTEN")]
    pub listen: String,
    /// Data-plane address to listen on (default: the control host, any free port; with
    /// --insecure, loopback).
    #[arg(long, env = "STRATA_WORKER_DATA_LISTEN")]
    pub data_listen: Option<String>,
    /// Host to advertise in the data-plane address given to peers (e.g. the pod IP when
    /// listening on 0.0.0.0).
    #[arg(long, env = "STRATA_WORKER_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Serve Prometheus metrics on this address, at `/metrics` (port 0 picks a free one).
    #[arg(long, env = "STRATA_WORKER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Also serve `grpc.health.v1` alone, in plaintext, on this address: for probes that cannot
    /// present a certificate (Kubernetes' gRPC probes), when the control plane is under TLS.
    #[arg(long, env = "STRATA_WORKER_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Largest data-plane frame accepted, in MiB.
    #[arg(long, default_value_t = 256)]
    pub max_frame_mib: usize,
    /// Exit when standard input closes (set by `strata serve` so that workers never outlive it).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
}

/// Runs a worker until `shutdown` resolves (or stdin closes, with `--exit-with-stdin`).
pub async fn run(
    args: WorkerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let security = args.tls.security()?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| WorkerError::Load(format!("cannot listen on {}: {e}", args.listen)))?;
    let control = listener
        .local_addr()
        .map_err(|e| WorkerError::Load(format!("control listener: {e}")))?;
    let max_frame = args
        .max_frame_mib
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            WorkerError::Load(format!(
                "--max-frame-mib {} is out of range",
                args.max_frame_mib
            ))
        })?;
    let data_listen = args.data_listen.clone().unwrap_or_else(|| match &security {
        // Plaintext frames stay on this machine unless the user says otherwise.
        LinkSecurity::Plaintext => "127.0.0.1:0".to_string(),
        LinkSecurity::Mtls(_) => format!("{}:0", control.ip()),
    });
    let transport = TcpTransport {
        max_frame_bytes: max_frame,
        ..TcpTransport::new(security.clone())
    };
    let metrics = std::sync::Arc::new(crate::metrics::WorkerMetrics::new()?);
    let m = std::sync::Arc::clone(&metrics);
    let metrics_addr = strata_shared::telemetry::metrics::serve_if(
        args.metrics_listen.as_deref(),
        std::sync::Arc::new(move || m.render()),
    )
    .await
    .map_err(|e| WorkerError::Load(e.to_string()))?;
    let (service, data) = crate::service::start(
        &data_listen,
        args.advertise_host.as_deref(),
        transport,
        metrics,
    )
    .await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<strata_proto::worker::v1::worker_server::WorkerServer<crate::service::WorkerService>>()
        .await;
    let health_addr = strata_proto::health::serve_plaintext(args.health_listen.as_deref(), &health)
        .await
        .map_err(WorkerError::Load)?
        .map(|a| a.to_string());
    tracing::info!(%control, %data, links = security.as_str(), kernels = %strata_kernels::cpu::summary(), "worker listening");
    // The launcher reads this line to learn the addresses.
    let line = serde_json::json!({"event": "listening", "control": control.to_string(), "data": data, "metrics": metrics_addr, "health": health_addr});
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    drop(out);

    let exit_with_stdin = args.exit_with_stdin;
    let stop = async move {
        if exit_with_stdin {
            tokio::select! {
                () = shutdown => {}
                () = stdin_closed() => tracing::info!("stdin closed; exiting"),
            }
        } else {
            shutdown.await;
        }
    };
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(strata_proto::WORKER_V1_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| WorkerError::Load(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| WorkerError::Load(format!("reflection: {e}")))?;
    let mut server = tonic::transport::Server::builder();
    if let LinkSecurity::Mtls(tls) = &security {
        server = server
            .tls_config(strata_proto::server_tls(
                &tls.cert_pem,
                &tls.key_pem,
                Some(&tls.ca_pem),
            ))
            .map_err(|e| WorkerError::Load(format!("control plane TLS: {e}")))?;
    }
    server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(strata_proto::incoming(listener), stop)
        .await
        .map_err(|e| WorkerError::Load(format!("control plane: {e}")))
}

async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
