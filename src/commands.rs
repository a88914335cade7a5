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
    /// Compute threads per process (default: one per core).
    #[arg(long, global = true, env = "STRATA_THREADS")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Log level when RUST_LOG is unset (logs go to stderr; results to stdout).
    pub fn default_log_filter(&self) -> &'static str {
        "info"
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
    Bench(BenchArgs),
    /// Single-stream figures of a running service, measured from a gRPC client.
    BenchServe(BenchServeArgs),
    /// Fetch the default model into the cache (idempotent) and print its path.
    FetchModel,
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

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Repetitions (the best is reported, as llama-bench does with its mean).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchServeArgs {
    /// The gateway's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Prompt tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: u32,
    /// Repetitions after one untimed warm-up; the best is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve(a) => rt.block_on(serve(a)),
        Command::Gateway(a) => rt.block_on(gateway(a)),
        Command::Worker(a) => {
            Ok(rt.block_on(strata_worker::cli::run(a, strata_shared::shutdown_signal()))?)
        }
        Command::Plan(a) => plan(a),
        Command::Generate(a) => rt.block_on(generate(a)),
        Command::Perplexity(a) => perplexity(a),
        Command::Bench(a) => bench(a),
        Command::BenchServe(a) => rt.block_on(bench_serve(a)),
        Command::FetchModel => {
            let path = strata_shared::source::fetch_default_model()?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", path.display())?;
            Ok(())
        }
    }
}

async fn serve(a: ServeArgs) -> Result<()> {
    let program = std::env::current_exe().context("locating the strata executable")?;
    // Workers inherit this process's environment, thread settings included.
    let cmd = WorkerCommand {
        program,
        args: vec!["worker".into()],
    };
    let cfg = gateway_config(
        &a.model,
        &a.serving,
        WorkerSource::Spawn(cmd),
        "127.0.0.1:0".into(),
        None,
    );
    Ok(strata_gateway::server::run(cfg, strata_shared::shutdown_signal()).await?)
}

async fn gateway(a: GatewayArgs) -> Result<()> {
    Ok(strata_gateway::server::run(a.config()?, strata_shared::shutdown_signal()).await?)
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
        if let Err(e) = r.check_runnable() {
            writeln!(out, "\nnote: `strata serve` would refuse this plan: {e}")?;
        }
    }
    Ok(())
}

/// Loads every stage of the plan in this process, with a progress bar on a terminal and log
/// lines otherwise.
fn load_engine(r: &Resolved, isq: Option<IsqType>, kv_tokens: usize) -> Result<Engine> {
    r.check_runnable()?;
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

fn bench(a: BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let r = strata_gateway::server::resolve(&a.model.choice())?;
    let kv = a.prompt_tokens + a.gen_tokens + KV_BLOCK_SIZE;
    let mut engine = load_engine(&r, a.model.isq, kv)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let rss_after_load = strata_worker::memory::rss();
    let seed_text = "The history of computing is a story of layers, from machines programmed by rewiring panels to compilers, operating systems and networks. ";
    let mut prompt = Vec::new();
    while prompt.len() < a.prompt_tokens {
        prompt.extend(r.tokenizer.encode(seed_text, false)?);
    }
    prompt.truncate(a.prompt_tokens);
    let (mut best_prefill, mut best_decode) = (0f64, 0f64);
    // One untimed round warms the thread pools and caches.
    for rep in 0..=a.reps.max(1) {
        let seq = rep as u64 + 1;
        let step = |pos0: usize, tokens: Vec<u32>| strata_shared::wire::StepFrame {
            step_id: 0,
            stage: 0,
            releases: vec![],
            seqs: vec![strata_shared::wire::SeqStep {
                seq_id: seq,
                pos0: pos0 as u32,
                prompt_len: prompt.len() as u32,
                tokens,
                sample: true,
                params: Default::default(),
                // The engine allocates the blocks.
                blocks: vec![],
                fresh: pos0 == 0,
                history: vec![],
            }],
            hidden: None,
        };
        let t = Instant::now();
        let s = engine.step(step(0, prompt.clone()))?;
        let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
        let mut tok = s.samples.first().map(|x| x.token).unwrap_or(0);
        let t = Instant::now();
        for i in 0..a.gen_tokens {
            let s = engine.step(step(prompt.len() + i, vec![tok]))?;
            tok = s.samples.first().map(|x| x.token).unwrap_or(0);
        }
        let decode = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
        engine.release(seq);
        if rep > 0 {
            best_prefill = best_prefill.max(prefill);
            best_decode = best_decode.max(decode);
        }
    }
    let rss = strata_worker::memory::rss();
    let mut out = std::io::stdout().lock();
    let threads = rayon_threads();
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"model": a.model.model, "topology": a.model.topology, "isq": a.model.isq.map(|q| q.to_string()),
                "dtype": a.model.dtype.map(|d| d.name()), "threads": threads, "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens, "prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode,
                "load_seconds": load_seconds, "weight_bytes": engine.weight_bytes(),
                "rss_after_load_bytes": rss_after_load.current, "peak_rss_bytes": rss.peak,
                "cpu_kernels": strata_worker::cpu_features()})
        )?;
    } else {
        writeln!(
            out,
            "prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), best of {}; load {:.2} s; weights {:.1} MiB; peak RSS {:.1} MiB; threads {threads}",
            best_prefill,
            a.prompt_tokens,
            best_decode,
            a.gen_tokens,
            a.reps,
            load_seconds,
            engine.weight_bytes() as f64 / 1048576.0,
            rss.peak as f64 / 1048576.0
        )?;
    }
    Ok(())
}

async fn bench_serve(a: BenchServeArgs) -> Result<()> {
    use strata_proto::v1::strata_client::StrataClient;
    use strata_proto::v1::{ModelInfoRequest, TokenIds, TokenizeRequest};
    let mut client = StrataClient::connect(format!("http://{}", a.addr))
        .await
        .with_context(|| format!("connecting to {}", a.addr))?;
    let info = client.model_info(ModelInfoRequest {}).await?.into_inner();
    let seed_text = "The history of computing is a story of layers, from machines programmed by rewiring panels to compilers, operating systems and networks. ";
    let seed = client
        .tokenize(TokenizeRequest {
            text: seed_text.into(),
            add_special_tokens: false,
        })
        .await?
        .into_inner()
        .ids;
    let prompt: Vec<u32> = seed.iter().cycle().take(a.prompt_tokens).copied().collect();
    let (mut best_ttft, mut best_decode) = (f64::INFINITY, 0f64);
    for rep in 0..=a.reps.max(1) {
        let req = GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds {
                ids: prompt.clone(),
            })),
            parameters: Some(SamplingParameters {
                max_tokens: Some(a.gen_tokens),
                temperature: Some(0.0),
                ignore_eos: true,
                ..Default::default()
            }),
            add_special_tokens: false,
        };
        let start = Instant::now();
        let mut stream = client.generate(req).await?.into_inner();
        let (mut first, mut last, mut n) = (None, start, 0u32);
        while let Some(msg) = stream.message().await? {
            if let Some(generate_response::Event::Token(_)) = msg.event {
                last = Instant::now();
                first.get_or_insert(last);
                n += 1;
            }
        }
        let first = first.context("no tokens came back")?;
        if rep == 0 {
            continue;
        }
        best_ttft = best_ttft.min(first.duration_since(start).as_secs_f64() * 1e3);
        if n > 1 {
            best_decode =
                best_decode.max((n - 1) as f64 / last.duration_since(first).as_secs_f64());
        }
    }
    // Bytes one decode step of one sequence sends over each hop, from the frame encoder itself.
    let step = |hidden: Option<strata_shared::wire::Activations>| {
        strata_shared::wire::Frame::Step(strata_shared::wire::StepFrame {
            step_id: 1,
            stage: 1,
            releases: vec![],
            seqs: vec![strata_shared::wire::SeqStep {
                seq_id: 1,
                pos0: prompt.len() as u32,
                prompt_len: prompt.len() as u32,
                tokens: vec![0],
                sample: true,
                params: Default::default(),
                // A block table as long as the gateway would send.
                blocks: (0..(prompt.len() + 1).div_ceil(KV_BLOCK_SIZE) as u32).collect(),
                fresh: false,
                history: vec![],
            }],
            hidden,
        })
    };
    let frame_len = |f: strata_shared::wire::Frame| f.to_bytes().map_or(0, |b| b.len());
    let activations = strata_shared::wire::Activations {
        dtype: strata_shared::wire::ActDType::F32,
        rows: 1,
        cols: info.hidden_size,
        data: vec![0u8; info.hidden_size as usize * 4].into(),
    };
    let into_first = frame_len(step(None));
    let between = frame_len(step(Some(activations)));
    let back = frame_len(strata_shared::wire::Frame::Samples(
        strata_shared::wire::SamplesFrame {
            step_id: 1,
            samples: vec![strata_shared::wire::Sample {
                seq_id: 1,
                token: 0,
                logprob: 0.0,
                top: vec![],
            }],
        },
    ));
    let mut out = std::io::stdout().lock();
    let workers = info.workers.len();
    let stages = info.route.len();
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"workers": workers, "stages": stages, "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens, "ttft_ms": best_ttft, "decode_tokens_per_s": best_decode,
                "bytes_per_token_into_first_stage": into_first, "bytes_per_token_between_stages": between,
                "bytes_per_token_back_to_gateway": back})
        )?;
    } else {
        writeln!(
            out,
            "{workers} workers, {stages} stages: time to first token {best_ttft:.1} ms ({} prompt tokens), decode {best_decode:.1} tok/s ({} tokens), best of {}; bytes per token per hop: {into_first} into the first stage, {between} between stages, {back} back to the gateway",
            a.prompt_tokens, a.gen_tokens, a.reps
        )?;
    }
    Ok(())
}

/// Compute threads of this process.
fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "one per core".into())
}
