//! Putting the gateway together: resolve the model and the plan, start or reach the workers,
//! load and link them, then serve the API (with health and reflection) until shutdown.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strata_proto::v1::strata_server::StrataServer;
use strata_proto::v1::{
    ModelInfoResponse, SchedulerCounters, Stage, TensorPlan, WorkerInfo as WorkerInfoPb,
    WorkerState as WorkerStatePb,
};
use strata_shared::device::DeviceSpec;
use strata_shared::isq::IsqType;
use strata_shared::meta::ModelMeta;
use strata_shared::plan::{FloatType, Plan, PlanOptions};
use strata_shared::source::{DEFAULT_MODEL_SPEC, ModelFiles};
use strata_shared::telemetry;
use strata_shared::tls::{LinkSecurity, ServerIdentity};
use strata_shared::topology::Topology;
use strata_shared::transport::{FrameListener, TcpTransport, Transport, advertised_address};
use strata_shared::wire::{DEFAULT_MAX_FRAME_BYTES, KV_BLOCK_SIZE};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::ApiKeys;
use crate::error::GatewayError;
pub use crate::keeper::WorkerSource;
use crate::keeper::{Keeper, KeeperConfig, RingStatus};
use crate::launcher::LocalWorker;
use crate::metrics::GatewayMetrics;
use crate::pipeline::RingPipeline;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerState, SchedulerStats};
use crate::service::StrataService;
use crate::tokenizer::ModelTokenizer;
use crate::validation::Limits;
use crate::workers::{WorkerState, Workers};

/// Whether this build runs `cuda[N]` workers (the `cuda` feature).
const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The default topology, for the default model.
pub const DEFAULT_TOPOLOGY: &str = include_str!("../../topologies/default.yml");

/// Which topology to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologyChoice {
    /// The embedded default topology for the default model; none for other models.
    Default,
    /// No topology: one CPU worker with every layer.
    None,
    File(PathBuf),
}

impl TopologyChoice {
    /// Parses `--topology`: `default`, `none` or a file path.
    pub fn parse(s: &str) -> Self {
        match s {
            "default" => TopologyChoice::Default,
            "none" => TopologyChoice::None,
            path => TopologyChoice::File(PathBuf::from(path)),
        }
    }

    /// Loads the topology for `model`.
    pub fn load(&self, model: &str) -> Result<Topology, GatewayError> {
        let bad = |e: strata_shared::topology::TopologyError| GatewayError::InvalidArgument {
            field: "--topology".into(),
            message: e.to_string(),
        };
        match self {
            TopologyChoice::Default if model == DEFAULT_MODEL_SPEC => {
                Topology::parse(DEFAULT_TOPOLOGY, "topologies/default.yml (built in)").map_err(bad)
            }
            TopologyChoice::Default | TopologyChoice::None => Ok(Topology::empty()),
            TopologyChoice::File(p) => Topology::from_file(p).map_err(bad),
        }
    }

    pub fn describe(&self, model: &str) -> String {
        match self {
            TopologyChoice::Default if model == DEFAULT_MODEL_SPEC => {
                "default (topologies/default.yml)".into()
            }
            TopologyChoice::Default | TopologyChoice::None => "none".into(),
            TopologyChoice::File(p) => p.display().to_string(),
        }
    }
}

/// The model to serve and how to load it.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    /// `--model`: `default`, a path or a hub id.
    pub model: String,
    pub revision: Option<String>,
    pub topology: TopologyChoice,
    pub isq: Option<IsqType>,
    pub dtype: Option<FloatType>,
}

/// Everything `strata serve` / `strata gateway` needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub model: ModelChoice,
    /// gRPC API address.
    pub listen: String,
    /// Data-plane address the last stage sends to.
    pub data_listen: String,
    /// Host to advertise in the data-plane address (when listening on 0.0.0.0).
    pub advertise_host: Option<String>,
    pub kv_cache_tokens: usize,
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub max_waiting: usize,
    /// Steps in flight at once (`None`: one per stage).
    pub steps_in_flight: Option<usize>,
    pub prefix_caching: bool,
    pub default_max_tokens: u32,
    pub step_timeout: Duration,
    pub connect_timeout: Duration,
    pub workers: WorkerSource,
    /// How long rebuilding the ring after a worker failure may take before the requests
    /// waiting on it fail; zero: never rebuild.
    pub recovery: Duration,
    /// Where to serve Prometheus metrics (`/metrics`); `None`: nowhere.
    pub metrics_listen: Option<String>,
    /// How long SIGTERM lets the requests in flight finish.
    pub drain: Duration,
    /// The API key file (`--api-keys`); `None`: the API is open.
    pub api_keys: Option<PathBuf>,
    /// Health and reflection stay open with API keys.
    pub open_health: bool,
    /// Mutual TLS on the links to the workers (control and data plane), or plaintext.
    pub links: LinkSecurity,
    /// Activations between GPU workers over NCCL where both can (otherwise TCP).
    pub nccl: bool,
    /// TLS on the public API; `None`: plaintext.
    pub api_tls: Option<ApiTls>,
    /// Where to serve health alone in plaintext, for probes; `None`: nowhere.
    pub health_listen: Option<String>,
}

/// The public API's certificate files (`--api-tls-cert`, `--api-tls-key`,
/// `--api-tls-client-ca`).
#[derive(Debug, Clone)]
pub struct ApiTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// The model and plan the gateway serves (resolved from metadata only).
pub struct Resolved {
    pub meta: ModelMeta,
    pub plan: Plan,
    pub topology: Topology,
    pub tokenizer: Arc<ModelTokenizer>,
}

/// Resolves the model, the topology and the plan; nothing is loaded.
pub fn resolve(cfg: &ModelChoice) -> Result<Resolved, GatewayError> {
    let files = ModelFiles::resolve(&cfg.model, cfg.revision.as_deref())?;
    let meta = ModelMeta::open(files)?;
    let topology = cfg.topology.load(&cfg.model)?;
    let plan = Plan::resolve(
        &meta,
        &topology,
        &PlanOptions {
            isq: cfg.isq,
            dtype: cfg.dtype,
            default_device: DeviceSpec::Cpu(0),
        },
    )
    .map_err(|e| GatewayError::InvalidArgument {
        field: "--topology".into(),
        message: e.to_string(),
    })?;
    let tokenizer = Arc::new(ModelTokenizer::load(
        &meta.files,
        meta.gguf.as_ref(),
        &meta.config.eos_token_ids,
    )?);
    // Building the tokenizer leaves the heap full of holes.
    strata_shared::memory::release_idle_pages();
    Ok(Resolved {
        meta,
        plan,
        topology,
        tokenizer,
    })
}

impl Resolved {
    /// Logs what the plan changed from what was asked: block-size fallbacks, and a `--isq` that
    /// no tensor takes because the topology covers every layer.
    pub fn log_plan_notes(&self, isq: Option<IsqType>) {
        for line in self.plan.fallbacks() {
            tracing::warn!("ISQ fallback: {line}");
        }
        if let Some(q) = isq
            && !self.plan.tensors.iter().any(|t| t.reason == "--isq")
        {
            tracing::warn!(
                "--isq {q} applies to no tensor: the topology covers every layer (only layers no range covers take --isq)"
            );
        }
    }

    /// Checks that every device of the plan can run (a dry run such as `strata plan` need not):
    /// `cpu[N]` always; `cuda[N]` on workers started elsewhere (each says whether it can when
    /// it opens its device), and on workers this binary starts (`local`) when it was built with
    /// the `cuda` feature; never `metal[N]`. The error points at the topology entry that asked
    /// for the device.
    pub fn check_runnable(&self, local: bool) -> Result<(), GatewayError> {
        let runnable = |d: &DeviceSpec| match d {
            DeviceSpec::Cpu(_) => true,
            DeviceSpec::Cuda(_) => CUDA_BUILT || !local,
            DeviceSpec::Metal(_) => false,
        };
        let Some(d) = self.plan.devices.iter().find(|d| !runnable(d)) else {
            return Ok(());
        };
        let entry = self
            .topology
            .ranges()
            .iter()
            .filter(|r| r.entry.device == Some(*d))
            .map(|r| (r.line, r.key.as_str()))
            .chain(
                self.topology
                    .selectors()
                    .iter()
                    .filter(|s| s.entry.device == Some(*d))
                    .map(|s| (s.line, s.key.as_str())),
            )
            .next();
        let at = match entry {
            Some((line, key)) => format!("{}:{line}: key `{key}`: ", self.topology.origin()),
            None => String::new(),
        };
        let why = match d {
            DeviceSpec::Metal(_) => {
                "Metal devices are not supported; Strata runs `cpu[N]` and `cuda[N]` workers"
            }
            _ => {
                "this build runs CPU workers only (`cpu` or `cpu[N]`); build with `cargo build --release --features cuda` for `cuda[N]` workers"
            }
        };
        Err(GatewayError::FailedPrecondition(format!(
            "{at}device {d}: {why}; `strata plan` shows the plan without running it"
        )))
    }
}

fn model_info(
    cfg: &ModelChoice,
    r: &Resolved,
    workers: &Workers,
    stats: &SchedulerStats,
    rebuilds: &std::sync::atomic::AtomicU64,
    kv_tokens: usize,
    context: usize,
) -> ModelInfoResponse {
    let c = &r.meta.config;
    let ws = workers.snapshot();
    ModelInfoResponse {
        model: cfg.model.clone(),
        architecture: c.arch.name().into(),
        num_layers: c.num_layers as u32,
        hidden_size: c.hidden_size as u32,
        vocab_size: c.vocab_size as u32,
        context_length: context as u32,
        eos_token_ids: r.tokenizer.eos_ids().to_vec(),
        has_chat_template: r.tokenizer.has_chat_template(),
        topology: cfg.topology.describe(&cfg.model),
        route: r
            .plan
            .route
            .iter()
            .map(|s| Stage {
                index: s.index as u32,
                device: s.device.to_string(),
                layer_start: s.layer_start as u32,
                layer_end: s.layer_end as u32,
                embed: s.embed,
                head: s.head,
                worker: ws
                    .iter()
                    .find(|w| w.device == s.device)
                    .map(|w| w.address.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        tensors: r
            .plan
            .tensors
            .iter()
            .map(|t| TensorPlan {
                name: t.name.clone(),
                source: t.source.clone(),
                shape: t.shape.iter().map(|&d| d as u32).collect(),
                stored: t.stored.to_string(),
                isq: t.isq.map(|q| q.to_string()).unwrap_or_default(),
                requested: t.requested.map(|q| q.to_string()).unwrap_or_default(),
                dtype: t.dtype.map(|d| d.name().to_string()).unwrap_or_default(),
                device: t.device.to_string(),
                stage: t.stage as u32,
                bytes_stored: t.bytes_stored,
                bytes_loaded: t.bytes_loaded,
                reason: t.reason.clone(),
                note: t.note.clone().unwrap_or_default(),
            })
            .collect(),
        workers: ws
            .iter()
            .map(|w| WorkerInfoPb {
                device: w.device.to_string(),
                address: w.address.clone(),
                state: match w.state {
                    WorkerState::Loading => WorkerStatePb::Loading,
                    WorkerState::Ready => WorkerStatePb::Ready,
                    WorkerState::Failed => WorkerStatePb::Failed,
                } as i32,
                stages: w.stages.clone(),
                weight_bytes: w.weight_bytes,
                rss_bytes: w.rss_bytes,
                peak_rss_bytes: w.peak_rss_bytes,
                load_seconds: w.load_seconds,
                kernels: w.kernels.clone(),
                device_name: w.device_name.clone(),
                device_memory_bytes: w.device_memory_bytes,
                kv_cache_dtype: w.kv_cache_dtype.clone(),
                error: w.error.clone(),
            })
            .collect(),
        kv_cache_tokens: kv_tokens as u32,
        kv_cache_reserved_tokens: (stats.used_blocks.load(Ordering::Relaxed) * KV_BLOCK_SIZE)
            as u32,
        running: stats.running.load(Ordering::Relaxed) as u32,
        waiting: stats.waiting.load(Ordering::Relaxed) as u32,
        scheduler: Some(SchedulerCounters {
            steps: stats.steps.load(Ordering::Relaxed),
            max_step_sequences: stats.max_step_seqs.load(Ordering::Relaxed) as u32,
            max_steps_in_flight: stats.max_in_flight.load(Ordering::Relaxed) as u32,
            preemptions: stats.preemptions.load(Ordering::Relaxed),
            prefix_cache_queries: stats.prefix_queries.load(Ordering::Relaxed),
            prefix_cache_hits: stats.prefix_hits.load(Ordering::Relaxed),
            computed_tokens: stats.computed_tokens.load(Ordering::Relaxed),
            cached_prompt_tokens: stats.cached_tokens.load(Ordering::Relaxed),
            ring_rebuilds: rebuilds.load(Ordering::Relaxed),
            requeued_sequences: stats.requeued.load(Ordering::Relaxed),
            steps_in_flight: stats.steps_in_flight.load(Ordering::Relaxed) as u32,
        }),
    }
}

/// Runs the gateway until it is asked to stop (`stops`: SIGINT and SIGTERM, see
/// [`strata_shared::stop_signals`]). Prints `{"event":"ready","listen":ADDR}` on stdout once it
/// serves.
///
/// Ctrl-C stops at once: every stream in flight ends as cancelled. SIGTERM drains first: health
/// turns NOT_SERVING, new requests are refused with UNAVAILABLE, and the requests in flight may
/// finish for up to `cfg.drain`; then (or at a second signal) the rest are cancelled.
pub async fn run(
    cfg: GatewayConfig,
    mut stops: tokio::sync::mpsc::Receiver<strata_shared::Stop>,
) -> Result<(), GatewayError> {
    // A bad key file stops the gateway before any worker loads.
    let api_keys = cfg.api_keys.as_deref().map(ApiKeys::load).transpose()?;
    // So does an unusable API certificate.
    let api_tls = cfg
        .api_tls
        .as_ref()
        .map(|t| {
            ServerIdentity::load(
                ("--api-tls-cert", &t.cert),
                ("--api-tls-key", &t.key),
                t.client_ca.as_deref().map(|p| ("--api-tls-client-ca", p)),
            )
        })
        .transpose()?;
    // Listen for signals from the very start: one while workers load stops the startup
    // cleanly instead of killing the process mid-way.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let (drain_tx, drain_rx) = watch::channel(false);
    let drain = cfg.drain;
    let signal_stop = Arc::clone(&stop_tx);
    tokio::spawn(async move {
        let Some(first) = stops.recv().await else {
            return;
        };
        if first == strata_shared::Stop::Terminate && !drain.is_zero() {
            tracing::info!(
                seconds = drain.as_secs(),
                "SIGTERM: draining (no new requests; those in flight may finish)"
            );
            let _ = drain_tx.send(true);
            tokio::select! {
                _ = stops.recv() => tracing::info!("asked again: stopping now"),
                () = tokio::time::sleep(drain) => {
                    tracing::warn!("the drain time is up: cancelling the requests still running");
                }
            }
        }
        tracing::info!("shutting down");
        let _ = signal_stop.send(true);
    });
    let (mut stopped, mut draining) = (stop_rx.clone(), drain_rx.clone());
    // Before serving there is nothing to drain: either signal stops the startup.
    let asked_to_stop = async {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => {}
            _ = draining.wait_for(|d| *d) => {}
        }
    };
    let local = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = tokio::select! {
        r = start(&cfg, &local) => r,
        () = asked_to_stop => {
            tracing::info!("stopped before serving");
            stop_local_workers(&local).await;
            return Ok(());
        }
    };
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            stop_local_workers(&local).await;
            return Err(e);
        }
    };
    let keeper = started.keeper.abort_handle();
    let served = serve(&cfg, started, api_keys, api_tls, stop_rx, drain_rx, stop_tx).await;
    // Workers stopping now is no failure, and no ring is rebuilt.
    keeper.abort();
    stop_local_workers(&local).await;
    served
}

/// Closes the local workers' stdin and waits (a while) for all of them to exit.
async fn stop_local_workers(local: &std::sync::Mutex<Vec<LocalWorker>>) {
    let local = local
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    let mut stopping = tokio::task::JoinSet::new();
    for w in local {
        stopping.spawn(w.stop(Duration::from_secs(10)));
    }
    while stopping.join_next().await.is_some() {}
}

/// What startup hands to serving.
struct Started {
    resolved: Resolved,
    workers: Workers,
    pipeline: RingPipeline<TcpTransport>,
    ring: watch::Receiver<RingStatus>,
    recoveries: Arc<std::sync::atomic::AtomicU64>,
    kv_blocks: usize,
    /// The keeper, watching the workers and rebuilding the ring.
    keeper: tokio::task::JoinHandle<()>,
}

/// Resolves the plan, starts or reaches the workers, loads and links them and connects the
/// ring. Local workers go into `local` as they start, so the caller stops them whatever
/// happens here.
async fn start(
    cfg: &GatewayConfig,
    local: &Arc<std::sync::Mutex<Vec<LocalWorker>>>,
) -> Result<Started, GatewayError> {
    if cfg.max_running == 0 || cfg.max_batch_tokens < cfg.max_running {
        return Err(GatewayError::invalid(
            "--max-batch-tokens",
            format!(
                "{} tokens per step cannot carry one token of each of --max-running {} sequences",
                cfg.max_batch_tokens, cfg.max_running
            ),
        ));
    }
    let resolved = resolve(&cfg.model)?;
    resolved.check_runnable(matches!(cfg.workers, WorkerSource::Spawn(_)))?;
    // The largest step must fit one data-plane frame (activations are f32).
    let step_bytes = cfg.max_batch_tokens as u64 * resolved.meta.config.hidden_size as u64 * 4;
    if step_bytes + (1 << 20) > DEFAULT_MAX_FRAME_BYTES as u64 {
        return Err(GatewayError::invalid(
            "--max-batch-tokens",
            format!(
                "{} tokens of activations take {step_bytes} bytes, more than a data-plane frame holds ({DEFAULT_MAX_FRAME_BYTES})",
                cfg.max_batch_tokens
            ),
        ));
    }
    tracing::info!(model = %cfg.model.model, layers = resolved.meta.config.num_layers, "serving\n{}", route_summary(&resolved.plan));

    resolved.log_plan_notes(cfg.model.isq);

    let transport = TcpTransport::new(cfg.links.clone());
    let data_listener = transport.bind(&cfg.data_listen).await.map_err(|e| {
        GatewayError::Unavailable(format!("--data-listen {}: {e}", cfg.data_listen))
    })?;
    let data_address =
        advertised_address(&data_listener.local_addr(), cfg.advertise_host.as_deref());

    let kv_blocks = cfg.kv_cache_tokens.div_ceil(KV_BLOCK_SIZE).max(1);
    let kv_blocks_wire = u32::try_from(kv_blocks).map_err(|_| {
        GatewayError::invalid(
            "--kv-cache-tokens",
            format!("{} tokens is too many", cfg.kv_cache_tokens),
        )
    })?;
    let mut keeper = Keeper::new(
        KeeperConfig {
            plan: resolved.plan.clone(),
            model: cfg.model.model.clone(),
            revision: cfg.model.revision.clone(),
            fingerprint: resolved.meta.fingerprint()?,
            kv_blocks: kv_blocks_wire,
            kv_block_size: KV_BLOCK_SIZE as u32,
            gateway_data_address: data_address,
            connect_timeout: cfg.connect_timeout,
            links: cfg.links.clone(),
            nccl: cfg.nccl,
            source: cfg.workers.clone(),
            recovery: cfg.recovery,
            poll: Duration::from_millis(500),
        },
        Arc::clone(local),
    );
    // The listener accepts from now on: under TLS, the last stage's link completes its
    // handshake while the keeper links the ring.
    // One step in flight per stage, and up to a few more where the hops take long, unless the
    // operator fixed the count.
    let stages = resolved.plan.route.len();
    let mut pipeline = RingPipeline::new(
        transport,
        match cfg.steps_in_flight {
            Some(n) => n..=n,
            None => stages..=stages + crate::scheduler::EXTRA_STEPS_IN_FLIGHT,
        },
        data_listener,
        keeper.listener_session(),
        keeper.status(),
        keeper.failures(),
        cfg.step_timeout,
    );
    keeper.start().await?;
    let ring = keeper.status();
    pipeline.connect().await?;
    let workers = keeper.workers();
    let recoveries = keeper.recoveries();
    let keeper = tokio::spawn(keeper.run());
    Ok(Started {
        resolved,
        workers,
        pipeline,
        ring,
        recoveries,
        kv_blocks,
        keeper,
    })
}

/// Serves the API over a started ring until `stop` turns true.
async fn serve(
    cfg: &GatewayConfig,
    started: Started,
    api_keys: Option<Arc<ApiKeys>>,
    api_tls: Option<ServerIdentity>,
    stop: watch::Receiver<bool>,
    mut drain: watch::Receiver<bool>,
    stop_tx: Arc<watch::Sender<bool>>,
) -> Result<(), GatewayError> {
    let Started {
        resolved,
        workers,
        pipeline,
        mut ring,
        recoveries,
        kv_blocks,
        keeper: _,
    } = started;
    let kv_tokens = kv_blocks * KV_BLOCK_SIZE;
    let context = resolved.meta.config.max_position_embeddings.min(kv_tokens);
    let limits = Limits::new(
        context,
        resolved.meta.config.vocab_size,
        cfg.default_max_tokens,
    );
    let state = SchedulerState::new(
        SchedulerConfig {
            kv_blocks,
            block_size: KV_BLOCK_SIZE,
            max_batch_tokens: cfg.max_batch_tokens,
            max_running: cfg.max_running,
            max_waiting: cfg.max_waiting,
            prefix_caching: cfg.prefix_caching,
        },
        resolved.tokenizer.eos_ids().to_vec(),
    );
    let stats = state.stats();
    let metrics = Arc::new(GatewayMetrics::new(Some((
        Arc::clone(&stats),
        kv_blocks,
        KV_BLOCK_SIZE,
    )))?);
    let m = Arc::clone(&metrics);
    let metrics_addr =
        telemetry::metrics::serve_if(cfg.metrics_listen.as_deref(), Arc::new(move || m.render()))
            .await
            .map_err(|e| GatewayError::Unavailable(e.to_string()))?;
    let (scheduler, scheduler_task) = Scheduler::spawn(pipeline, state, stop.clone());
    let drain_stats = Arc::clone(&stats);

    let tokenizer = Arc::clone(&resolved.tokenizer);
    let info_cfg = cfg.model.clone();
    let info_workers = workers.clone();
    let resolved = Arc::new(resolved);
    let info_resolved = Arc::clone(&resolved);
    let info = Arc::new(move || {
        model_info(
            &info_cfg,
            &info_resolved,
            &info_workers,
            &stats,
            &recoveries,
            kv_tokens,
            context,
        )
    });
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = StrataService::new(
        tokenizer,
        limits,
        scheduler,
        info,
        metrics,
        Arc::clone(&draining),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StrataServer<StrataService>>().await;
    // NOT_SERVING while the ring is being rebuilt or is down; SERVING again once it is back
    // (unless draining). The `liveness` service (what a liveness probe asks) fails only while
    // the ring is down for good: a restart of the gateway then does no worse.
    health
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let health_watch = health.clone();
    let ring_draining = Arc::clone(&draining);
    tokio::spawn(async move {
        while ring.changed().await.is_ok() {
            let status = ring.borrow_and_update().clone();
            let alive = if matches!(status, RingStatus::Down { .. }) {
                tonic_health::ServingStatus::NotServing
            } else {
                tonic_health::ServingStatus::Serving
            };
            health_watch.set_service_status(LIVENESS, alive).await;
            if !matches!(status, RingStatus::Up { .. }) {
                not_serving(&health_watch).await;
            } else if !ring_draining.load(Ordering::SeqCst) {
                serving(&health_watch).await;
            }
        }
    });
    // Draining (SIGTERM): refuse new requests, report NOT_SERVING so that load balancers stop
    // sending, and stop once every request has finished.
    let drain_health = health.clone();
    tokio::spawn(async move {
        if drain.wait_for(|d| *d).await.is_err() {
            return;
        }
        draining.store(true, Ordering::SeqCst);
        not_serving(&drain_health).await;
        loop {
            let running = drain_stats.running.load(Ordering::SeqCst);
            let waiting = drain_stats.waiting.load(Ordering::SeqCst);
            if running == 0 && waiting == 0 {
                tracing::info!("drained: every request has finished");
                let _ = stop_tx.send(true);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| GatewayError::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| GatewayError::Internal(format!("reflection: {e}")))?;

    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| GatewayError::Unavailable(format!("--listen {}: {e}", cfg.listen)))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| GatewayError::Internal(format!("listener: {e}")))?;
    let health_addr = strata_proto::health::serve_plaintext(cfg.health_listen.as_deref(), &health)
        .await
        .map_err(GatewayError::Unavailable)?
        .map(|a| a.to_string());
    tracing::info!(listen = %local_addr, api_tls = api_tls.is_some(), links = cfg.links.as_str(), "gateway ready");
    {
        let mut out = std::io::stdout().lock();
        let line = serde_json::json!({"event": "ready", "listen": local_addr.to_string(), "metrics": metrics_addr, "health": health_addr});
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }

    // API keys: every call of the API presents one; health and reflection too, unless
    // --open-health.
    if let Some(keys) = &api_keys {
        keys.watch();
    }
    let api_auth = api_keys.clone();
    let authenticate = move |mut req: tonic::Request<()>| {
        if let Some(keys) = &api_auth {
            let caller = keys.check(req.metadata())?;
            req.extensions_mut().insert(caller);
        }
        Ok(req)
    };
    let tools_auth = api_keys.filter(|_| !cfg.open_health);
    let tools = move |req: tonic::Request<()>| {
        if let Some(keys) = &tools_auth {
            keys.check(req.metadata())?;
        }
        Ok(req)
    };
    use tonic::service::interceptor::InterceptedService;
    let mut server = tonic::transport::Server::builder();
    if let Some(id) = &api_tls {
        let config = strata_proto::server_tls(&id.cert_pem, &id.key_pem, id.client_ca_pem.as_ref());
        server = server
            .tls_config(config)
            .map_err(|e| GatewayError::Internal(format!("API TLS: {e}")))?;
    }
    let served = server
        .add_service(InterceptedService::new(health_service, tools.clone()))
        .add_service(InterceptedService::new(reflection_v1, tools.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, tools))
        .add_service(StrataServer::with_interceptor(service, authenticate))
        .serve_with_incoming_shutdown(strata_proto::incoming(listener), async move {
            let mut stop = stop;
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    // The scheduler has cancelled every stream and told the workers to free their sequences.
    let _ = tokio::time::timeout(Duration::from_secs(10), scheduler_task).await;
    served.map_err(|e| GatewayError::Internal(format!("gRPC server: {e}")))
}

/// The health service name a liveness probe asks about: SERVING while the gateway serves or is
/// rebuilding its ring, NOT_SERVING once rebuilding has given up.
pub const LIVENESS: &str = "liveness";

/// Turns health SERVING: both the API's own status and the server's overall one.
async fn serving(health: &tonic_health::server::HealthReporter) {
    health.set_serving::<StrataServer<StrataService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
}

/// Turns health NOT_SERVING: both the API's own status and the server's overall one (the empty
/// name, which plain `grpc.health.v1.Health/Check` calls and Kubernetes probes ask about).
async fn not_serving(health: &tonic_health::server::HealthReporter) {
    health
        .set_not_serving::<StrataServer<StrataService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

/// Server reflection for the public API and health, as grpcurl and other tools discover them.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(strata_proto::STRATA_V1_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// One line per route stage.
pub fn route_summary(plan: &Plan) -> String {
    plan.route
        .iter()
        .map(|s| {
            format!(
                "  stage {}: {} layers {}-{}{}{}",
                s.index,
                s.device,
                s.layer_start,
                s.layer_end,
                if s.embed { " +embedding" } else { "" },
                if s.head { " +head" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
