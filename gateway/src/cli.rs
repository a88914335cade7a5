//! The gateway's command-line options, shared by `strata serve`, `strata gateway` and the
//! `strata-gateway` binary.

use std::collections::HashMap;
use std::time::Duration;

use clap::Args;
use strata_shared::device::DeviceSpec;
use strata_shared::isq::IsqType;
use strata_shared::plan::FloatType;
use strata_shared::tls::{LinkSecurity, TlsArgs};

use crate::error::GatewayError;
use crate::server::{ApiTls, GatewayConfig, ModelChoice, TopologyChoice, WorkerSource};

/// Which model, topology and quantization.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A Hugging Face hub id, a local GGUF file or Hugging Face directory, or `default`
    /// (SmolLM2-135M-Instruct, fetched and cached on first use).
    #[arg(long, default_value = "default", env = "STRATA_MODEL")]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Topology YAML file; `default` (the built-in one for the default model) or `none`.
    #[arg(long, default_value = "default", env = "STRATA_TOPOLOGY")]
    pub topology: String,
    /// In-situ quantization for the layers the topology does not cover.
    #[arg(long, value_parser = parse_isq)]
    pub isq: Option<IsqType>,
    /// Convert weights without ISQ to this float type at load (f32, f16, bf16).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<FloatType>,
}

fn parse_isq(s: &str) -> Result<IsqType, String> {
    s.parse()
        .map_err(|e: strata_shared::isq::UnknownIsq| e.to_string())
}

fn parse_dtype(s: &str) -> Result<FloatType, String> {
    s.parse()
}

impl ModelArgs {
    pub fn choice(&self) -> ModelChoice {
        ModelChoice {
            model: self.model.clone(),
            revision: self.revision.clone(),
            topology: TopologyChoice::parse(&self.topology),
            isq: self.isq,
            dtype: self.dtype,
        }
    }
}

/// Serving limits.
#[derive(Args, Clone)]
pub struct ServingArgs {
    /// gRPC API address.
    #[arg(long, default_value = "127.0.0.1:50051", env = "STRATA_LISTEN")]
    pub listen: String,
    /// KV cache capacity, in tokens, shared by all running sequences.
    #[arg(long, default_value_t = 16384)]
    pub kv_cache_tokens: usize,
    /// Tokens one step may carry (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, default_value_t = 32)]
    pub max_running: usize,
    /// Requests waiting at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Steps in flight at once, each over its own sequences, fixed (default: one per stage, so
    /// that every stage computes at once, and up to four more while the hops between the
    /// stages take long enough to leave them waiting, measured from the steps' round trips).
    /// More hide slow links between stages, at the cost of smaller batches.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub steps_in_flight: Option<u32>,
    /// Compute every prompt in full, sharing no KV blocks between requests with a common
    /// prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Keep every hop between stages on TCP, even between GPU workers that could share an
    /// NCCL communicator.
    #[arg(long)]
    pub no_nccl: bool,
    /// `max_tokens` of requests that leave it unset.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Seconds a step may take before its ring counts as broken (and is rebuilt).
    #[arg(long, default_value_t = 300)]
    pub step_timeout_secs: u64,
    /// Seconds that rebuilding the ring after a worker failure may take (restarting a local
    /// worker, or waiting for a remote one at the same address, then reloading and relinking
    /// every worker) while the requests in flight wait to resume; past it they fail with
    /// UNAVAILABLE, and the gateway goes on trying. 0: never rebuild.
    #[arg(long, default_value_t = 120)]
    pub recovery_secs: u64,
    /// Seconds to wait for workers to start and become reachable.
    #[arg(long, default_value_t = 600)]
    pub connect_timeout_secs: u64,
    /// Serve Prometheus metrics on this address, at `/metrics` (port 0 picks a free one).
    #[arg(long, env = "STRATA_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// On SIGTERM, seconds the requests in flight may take to finish (no new ones are taken)
    /// before the rest are cancelled; 0 cancels at once. Ctrl-C always cancels at once.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Require an API key on the API (`authorization: Bearer KEY`), from this file of
    /// `NAME KEY [MAX_STREAMS]` lines; it is read again when it changes.
    #[arg(long, env = "STRATA_API_KEYS")]
    pub api_keys: Option<std::path::PathBuf>,
    /// With --api-keys: leave health checks and server reflection open (Kubernetes' gRPC
    /// probes present no credentials).
    #[arg(long)]
    pub open_health: bool,
    /// Serve the API over TLS with this certificate (PEM, chain first to last); with
    /// --api-tls-key.
    #[arg(
        long,
        env = "STRATA_API_TLS_CERT",
        value_name = "FILE",
        requires = "api_tls_key"
    )]
    pub api_tls_cert: Option<std::path::PathBuf>,
    /// The API certificate's private key (PEM).
    #[arg(
        long,
        env = "STRATA_API_TLS_KEY",
        value_name = "FILE",
        requires = "api_tls_cert"
    )]
    pub api_tls_key: Option<std::path::PathBuf>,
    /// With --api-tls-cert: require clients to present a certificate this CA (PEM) signed.
    #[arg(
        long,
        env = "STRATA_API_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "api_tls_cert"
    )]
    pub api_tls_client_ca: Option<std::path::PathBuf>,
    /// Also serve `grpc.health.v1` alone, in plaintext and without API keys, on this address:
    /// for probes that can present neither (Kubernetes' gRPC probes).
    #[arg(long, env = "STRATA_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
    /// A worker for a device of the topology: `cpu[0]=http://host:50061` (repeat per device).
    #[arg(long = "worker", value_parser = parse_worker, required = true)]
    pub workers: Vec<(DeviceSpec, String)>,
    /// Data-plane address the last stage sends its samples to (default: 0.0.0.0:50052; with
    /// --insecure, 127.0.0.1:50052).
    #[arg(long, env = "STRATA_DATA_LISTEN")]
    pub data_listen: Option<String>,
    /// Host workers should use to reach this gateway's data plane (e.g. the pod IP).
    #[arg(long, env = "STRATA_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
}

fn parse_worker(s: &str) -> Result<(DeviceSpec, String), String> {
    let (d, a) = s.split_once('=').ok_or_else(|| {
        format!("`{s}`: expected DEVICE=ADDRESS, e.g. cpu[0]=http://worker-0:50061")
    })?;
    let device = d
        .parse()
        .map_err(|e: strata_shared::device::InvalidDevice| e.to_string())?;
    Ok((device, a.to_string()))
}

impl GatewayArgs {
    /// The configuration of a gateway for workers started elsewhere.
    pub fn config(&self) -> Result<GatewayConfig, GatewayError> {
        let mut map: HashMap<DeviceSpec, String> = HashMap::new();
        for (device, address) in &self.workers {
            if let Some(first) = map.insert(*device, address.clone()) {
                return Err(GatewayError::invalid(
                    "--worker",
                    format!("{device} is given twice ({first} and {address})"),
                ));
            }
        }
        let links = self.serving.tls.security()?;
        let data_listen = self.data_listen.clone().unwrap_or_else(|| match links {
            // Plaintext frames stay on this machine unless the user says otherwise.
            LinkSecurity::Plaintext => "127.0.0.1:50052".into(),
            LinkSecurity::Mtls(_) => "0.0.0.0:50052".into(),
        });
        Ok(gateway_config(
            &self.model,
            &self.serving,
            WorkerSource::Remote(map),
            data_listen,
            self.advertise_host.clone(),
            links,
        ))
    }
}

/// A gateway configuration from the shared options.
pub fn gateway_config(
    model: &ModelArgs,
    s: &ServingArgs,
    workers: WorkerSource,
    data_listen: String,
    advertise_host: Option<String>,
    links: LinkSecurity,
) -> GatewayConfig {
    GatewayConfig {
        model: model.choice(),
        listen: s.listen.clone(),
        data_listen,
        advertise_host,
        kv_cache_tokens: s.kv_cache_tokens,
        max_batch_tokens: s.max_batch_tokens,
        max_running: s.max_running,
        max_waiting: s.max_waiting,
        steps_in_flight: s.steps_in_flight.map(|n| n as usize),
        prefix_caching: !s.no_prefix_caching,
        nccl: !s.no_nccl,
        default_max_tokens: s.default_max_tokens,
        step_timeout: Duration::from_secs(s.step_timeout_secs),
        connect_timeout: Duration::from_secs(s.connect_timeout_secs),
        recovery: Duration::from_secs(s.recovery_secs),
        workers,
        metrics_listen: s.metrics_listen.clone(),
        drain: Duration::from_secs(s.drain_secs),
        api_keys: s.api_keys.clone(),
        open_health: s.open_health,
        links,
        api_tls: s
            .api_tls_cert
            .clone()
            .zip(s.api_tls_key.clone())
            .map(|(cert, key)| ApiTls {
                cert,
                key,
                client_ca: s.api_tls_client_ca.clone(),
            }),
        health_listen: s.health_listen.clone(),
    }
}
