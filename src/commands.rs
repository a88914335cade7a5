//! The subcommands of `strata`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use strata_gateway::cli::{GatewayArgs, ModelArgs, ServingArgs, gateway_config};
use strata_gateway::launcher::WorkerCommand;
use strata_gateway::progress::Progress;
use strata_gateway::scheduler::{Scheduler, SchedulerConfig, SchedulerState, StreamOutput};
use strata_gateway::server::{Resolved, TopologyChoice, WorkerSource};
use strata_gateway::validation::{self, Limits};
use strata_proto::v1::{
    ChatMessage, ChatRequest, GenerateRequest, SamplingParameters, StopSequence, generate_request,
    generate_response, stop_sequence,
};
use strata_shared::isq::IsqType;
use strata_shared::telemetry::LogFormat;
use strata_shared::wire::KV_BLOCK_SIZE;
use strata_worker::Engine;
use strata_worker::cli::WorkerArgs;
use tokio::sync::{mpsc, watch};

use crate::local::LocalPipeline;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Layer-sharded LLM inference: serve, plan, generate, measure"
)]
pub struct Cli {
    /// Compute threads per process (default: one per core; the workers `serve` starts on one
    /// host keep to an equal share of them while several compute at once).
    #[arg(long, global = true, env = "STRATA_THREADS")]
    pub threads: Option<usize>,
    /// Log lines as `text` (coloured only on a terminal) or `json` (one object per line).
    #[arg(long, global = true, env = "STRATA_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Log level when RUST_LOG is unset (logs go to stderr; results to stdout).
    pub fn default_log_filter(&self) -> &'static str {
        "info"
    }

    /// The process's name in traces (unless `OTEL_SERVICE_NAME` says otherwise).
    pub fn service_name(&self) -> &'static str {
        match self.command {
            Command::Serve(_) | Command::Gateway(_) => "strata-gateway",
            Command::Worker(_) => "strata-worker",
            _ => "strata",
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the model: the gateway plus one worker process per device of the topology.
    Serve(ServeArgs),
    /// Serve the model with workers started elsewhere (`strata worker` on each host).
    Gateway(GatewayArgs),
    /// Run a worker: it loads and runs the layers a gateway assigns to it.
    Worker(WorkerArgs),
    /// Print the load plan of a model and topology (a dry run: only metadata is read).
    Plan(PlanArgs),
    /// Generate from a prompt in this process (all stages local).
    Generate(GenerateArgs),
    /// Perplexity of a model and topology over a text file.
    Perplexity(PerplexityArgs),
    /// Single-process speed and memory figures.
    Bench(crate::bench::BenchArgs),
    /// Single-stream figures of a running service, measured from a gRPC client.
    BenchServe(crate::bench::BenchServeArgs),
    /// Many concurrent streams against a running service: aggregate tokens/s and latencies.
    Load(crate::load::LoadArgs),
    /// Fetch the default model into the cache (idempotent) and print its path.
    FetchModel,
    /// Make a CA and one certificate it signed, for the mutual TLS between a gateway and its
    /// workers: `tls.crt`, `tls.key` and `ca.crt` in a directory (a test or small cluster's
    /// set; in Kubernetes the Helm chart makes its own).
    Certs(CertsArgs),
}

#[derive(Args)]
pub struct CertsArgs {
    /// Directory to write into (created if missing; existing files are never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// A DNS name or IP address the certificate is valid for (repeat); peers check the one
    /// they dial, or the gateway's and workers' --tls-server-name.
    #[arg(long = "name", required = true)]
    pub names: Vec<String>,
    /// Days the certificates are valid for.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (raw text, no chat template).
    #[arg(long, conflicts_with = "chat")]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop sequence (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Keep special tokens (e.g. `<|im_end|>`) in the printed text.
    #[arg(long)]
    pub include_special_tokens: bool,
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window (default: the model's context length).
    #[arg(long)]
    pub context: Option<usize>,
    /// Tokens the window advances by (default: half a window; at most one less than the window,
    /// so that windows overlap and every token is scored).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve(a) => rt.block_on(serve(a, cli.log_format)),
        Command::Gateway(a) => rt.block_on(gateway(a)),
        Command::Worker(a) => {
            Ok(rt.block_on(strata_worker::cli::run(a, strata_shared::shutdown_signal()))?)
        }
        Command::Plan(a) => plan(a),
        Command::Generate(a) => rt.block_on(generate(a)),
        Command::Perplexity(a) => perplexity(a),
        Command::Bench(a) => crate::bench::bench(a),
        Command::BenchServe(a) => rt.block_on(crate::bench::bench_serve(a)),
        Command::Load(a) => rt.block_on(crate::load::load(a)),
        Command::Certs(a) => {
            let files = strata_shared::tls::CertSet::generate(&a.names, a.days)?.write(&a.out)?;
            let mut out = std::io::stdout().lock();
            for p in [&files.cert, &files.key, &files.ca] {
                writeln!(out, "{}", p.display())?;
            }
            Ok(())
        }
        Command::FetchModel => {
            let path = strata_shared::source::fetch_default_model()?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", path.display())?;
            Ok(())
        }
    }
}

async fn serve(a: ServeArgs, log_format: LogFormat) -> Result<()> {
    let program = std::env::current_exe().context("locating the strata executable")?;
    // Links to the local workers are mutual TLS too: with the certificates given, or else a
    // set made now, for this run alone, in a directory only this user can read (removed when
    // the gateway exits).
    let mut tls = a.serving.tls.clone();
    let _ephemeral = if tls.files()?.is_none() && !tls.insecure {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("strata-tls-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .context("making a directory for this run's certificates")?;
        let names = ["127.0.0.1", "localhost", "::1"].map(String::from);
        let files = strata_shared::tls::CertSet::generate(&names, 30)?.write(dir.path())?;
        tls.tls_cert = Some(files.cert);
        tls.tls_key = Some(files.key);
        tls.tls_ca = Some(files.ca);
        Some(dir)
    } else {
        None
    };
    let links = tls.security()?;
    // Workers inherit this process's environment (thread settings and OpenTelemetry's among
    // them) and log as the gateway does.
    let mut args = vec![
        "--log-format".into(),
        log_format.as_str().into(),
        "worker".into(),
    ];
    args.extend(tls.to_args());
    let cmd = WorkerCommand { program, args };
    let cfg = gateway_config(
        &a.model,
        &a.serving,
        WorkerSource::Spawn(cmd),
        "127.0.0.1:0".into(),
        None,
        links,
    );
    Ok(strata_gateway::server::run(cfg, strata_shared::stop_signals()).await?)
}

async fn gateway(a: GatewayArgs) -> Result<()> {
    Ok(strata_gateway::server::run(a.config()?, strata_shared::stop_signals()).await?)
}

fn plan(a: PlanArgs) -> Result<()> {
    let r = strata_gateway::server::resolve(&a.model.choice())?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &r.plan)?;
        writeln!(out)?;
    } else {
        let c = &r.meta.config;
        writeln!(
            out,
            "model {} ({}, {} layers, hidden {}, {} heads / {} KV heads)\ntopology: {}\n",
            a.model.model,
            c.arch.name(),
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            TopologyChoice::parse(&a.model.topology).describe(&a.model.model)
        )?;
        write!(out, "{}", r.plan.table())?;
        if let Err(e) = r.check_runnable(true) {
            writeln!(out, "\nnote: `strata serve` would refuse this plan: {e}")?;
        }
    }
    Ok(())
}

/// Loads every stage of the plan in this process, with a progress bar on a terminal and log
/// lines otherwise.
pub(crate) fn load_engine(r: &Resolved, isq: Option<IsqType>, kv_tokens: usize) -> Result<Engine> {
    r.check_runnable(true)?;
    r.log_plan_notes(isq);
    let started = Instant::now();
    let mut task = Progress::new().task("local");
    let engine = Engine::load(
        &r.meta,
        &r.plan,
        kv_tokens.div_ceil(KV_BLOCK_SIZE),
        &mut |tensor, done, total| task.update(done, total, tensor),
    )?;
    drop(task);
    strata_worker::memory::release_idle_pages();
    strata_worker::memory::fix_heap_thresholds();
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        weight_bytes = engine.weight_bytes(),
        "loaded"
    );
    Ok(engine)
}

async fn generate(a: GenerateArgs) -> Result<()> {
    let r = strata_gateway::server::resolve(&a.model.choice())?;
    let kv_tokens = r.meta.config.max_position_embeddings.min(1 << 15);
    let engine = load_engine(&r, a.model.isq, kv_tokens)?;
    let limits = Limits::new(
        r.meta.config.max_position_embeddings.min(kv_tokens),
        r.meta.config.vocab_size,
        a.max_tokens,
    );
    let params = SamplingParameters {
        max_tokens: Some(a.max_tokens),
        temperature: Some(a.temperature),
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
        seed: a.seed,
        stop: a
            .stop
            .iter()
            .map(|s| StopSequence {
                kind: Some(stop_sequence::Kind::Text(s.clone())),
            })
            .collect(),
        ignore_eos: a.ignore_eos,
        include_special_tokens: a.include_special_tokens,
        ..Default::default()
    };
    let req = match (&a.prompt, &a.chat) {
        (Some(p), None) => validation::generate(
            GenerateRequest {
                input: Some(generate_request::Input::Prompt(p.clone())),
                parameters: Some(params),
                add_special_tokens: false,
            },
            &r.tokenizer,
            &limits,
        )?,
        (None, Some(m)) => validation::chat(
            ChatRequest {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: m.clone(),
                }],
                parameters: Some(params),
                add_generation_prompt: Some(true),
            },
            &r.tokenizer,
            &limits,
        )?,
        _ => bail!("give --prompt TEXT or --chat MESSAGE"),
    };
    let state = SchedulerState::new(
        SchedulerConfig {
            kv_blocks: kv_tokens.div_ceil(KV_BLOCK_SIZE),
            block_size: KV_BLOCK_SIZE,
            max_batch_tokens: 4096,
            max_running: 1,
            max_waiting: 1,
            prefix_caching: false,
        },
        r.tokenizer.eos_ids().to_vec(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let (scheduler, task) = Scheduler::spawn(LocalPipeline::new(engine), state, stop_rx);
    let (tx, mut rx) = mpsc::channel(a.max_tokens as usize + 2);
    let output = StreamOutput::new(&r.tokenizer, &req, tx);
    scheduler.submit(req, output, None).await?;
    let mut out = std::io::stdout();
    while let Some(event) = rx.recv().await {
        match event?.event {
            Some(generate_response::Event::Token(t)) => {
                write!(out, "{}", t.text)?;
                out.flush()?;
            }
            Some(generate_response::Event::Finished(f)) => {
                writeln!(out, "{}", f.text)?;
                let reason = strata_proto::v1::FinishReason::try_from(f.reason)
                    .map(|r| {
                        r.as_str_name()
                            .trim_start_matches("FINISH_REASON_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                let usage = f.usage.unwrap_or_default();
                let t = f.timings.unwrap_or_default();
                eprintln!(
                    "[{reason}: {} prompt + {} generated tokens, first token {:.0} ms, {:.1} tokens/s, seed {}]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    t.time_to_first_token_ms,
                    t.decode_tokens_per_second,
                    f.seed
                );
                break;
            }
            None => {}
        }
    }
    let _ = stop_tx.send(true);
    let _ = task.await;
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let r = strata_gateway::server::resolve(&a.model.choice())?;
    let ids = r.tokenizer.encode(&text, false)?;
    if ids.len() < 2 {
        bail!(
            "{}: needs at least 2 tokens, has {}",
            a.text.display(),
            ids.len()
        );
    }
    let context = a
        .context
        .unwrap_or(r.meta.config.max_position_embeddings)
        .min(r.meta.config.max_position_embeddings);
    if context < 2 {
        bail!("--context must be at least 2");
    }
    let stride = a.stride.unwrap_or(context / 2).clamp(1, context - 1);
    let load_start = Instant::now();
    let mut engine = load_engine(&r, a.model.isq, context)?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let start = Instant::now();
    let strata_worker::engine::Perplexity {
        perplexity: ppl,
        scored,
        windows,
    } = engine.perplexity(&ids, context, stride)?;
    let seconds = start.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"perplexity": ppl, "tokens": ids.len(), "scored": scored, "windows": windows,
                "context": context, "stride": stride, "weight_bytes": engine.weight_bytes(),
                "load_seconds": load_seconds, "seconds": seconds})
        )?;
    } else {
        writeln!(
            out,
            "perplexity {ppl:.4} over {scored} tokens ({} tokens, {windows} windows of {context}, stride {stride}) in {seconds:.1} s",
            ids.len()
        )?;
    }
    Ok(())
}

/// Compute threads of this process.
pub(crate) fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "one per core".into())
}
