//! `strata bench` (one process: prefill, decode of one sequence and of a batch, memory) and
//! `strata bench-serve` (one stream through a running service, and the bytes each hop carries).

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use strata_gateway::cli::ModelArgs;
use strata_shared::wire::KV_BLOCK_SIZE;

use crate::commands::{load_engine, rayon_threads};

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
    /// Repetitions after one untimed warm-up (at least one; the best is reported, as llama-bench
    /// does with its mean).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also decode this many sequences together, one token each per step (0: skip).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
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
    /// Repetitions after one untimed warm-up (at least one); the best is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let r = strata_gateway::server::resolve(&a.model.choice())?;
    let per_seq = a.prompt_tokens + a.gen_tokens + KV_BLOCK_SIZE;
    let mut engine = load_engine(&r, a.model.isq, per_seq * a.batch.max(1))?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let rss_after_load = strata_worker::memory::rss();
    let seed_text = "The history of computing is a story of layers, from machines programmed by rewiring panels to compilers, operating systems and networks. ";
    let seed = r.tokenizer.encode(seed_text, false)?;
    anyhow::ensure!(!seed.is_empty(), "the seed text tokenizes to nothing");
    // Sequence `i`'s prompt starts `i` tokens into the seed: no two are alike.
    let prompt = |i: usize| -> Vec<u32> {
        seed.iter()
            .cycle()
            .skip(i)
            .take(a.prompt_tokens)
            .copied()
            .collect()
    };
    let (mut best_prefill, mut best_decode, mut best_batch) = (0f64, 0f64, 0f64);
    // One untimed round warms the thread pools and caches.
    for rep in 0..=a.reps.max(1) {
        let seq = rep as u64 + 1;
        let t = Instant::now();
        let first = engine.step(step(&[(seq, 0, prompt(0))], a.prompt_tokens))?;
        let prefill = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let mut tok = first.samples.first().map_or(0, |x| x.token);
        let t = Instant::now();
        for i in 0..a.gen_tokens {
            let s = engine.step(step(
                &[(seq, a.prompt_tokens + i, vec![tok])],
                a.prompt_tokens,
            ))?;
            tok = s.samples.first().map_or(0, |x| x.token);
        }
        let decode = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
        engine.release(seq);
        let batch = if a.batch > 0 {
            batch_decode(&mut engine, &a, seq, &prompt)?
        } else {
            0.0
        };
        if rep > 0 {
            best_prefill = best_prefill.max(prefill);
            best_decode = best_decode.max(decode);
            best_batch = best_batch.max(batch);
        }
    }
    let rss = strata_worker::memory::rss();
    let huge_pages = strata_worker::memory::huge_page_bytes();
    let kv_dtype = engine
        .stages()
        .first()
        .map_or("", |s| s.kv().dtype().name());
    let mut out = std::io::stdout().lock();
    let threads = rayon_threads();
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"model": a.model.model, "topology": a.model.topology, "isq": a.model.isq.map(|q| q.to_string()),
                "dtype": a.model.dtype.map(|d| d.name()), "threads": threads, "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens, "prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode,
                "batch": a.batch, "batch_decode_tokens_per_s": best_batch,
                "load_seconds": load_seconds, "weight_bytes": engine.weight_bytes(),
                "rss_after_load_bytes": rss_after_load.current, "peak_rss_bytes": rss.peak, "huge_page_bytes": huge_pages,
                "cpu_kernels": strata_worker::cpu_features(), "kv_cache_dtype": kv_dtype})
        )?;
    } else {
        let batch = if a.batch > 0 {
            format!(", batch of {} {best_batch:.1} tok/s in all", a.batch)
        } else {
            String::new()
        };
        writeln!(
            out,
            "prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens){batch}, best of {}; load {:.2} s; weights {:.1} MiB; peak RSS {:.1} MiB ({:.1} MiB on huge pages); threads {threads}; kernels {}; KV cache {kv_dtype}",
            best_prefill,
            a.prompt_tokens,
            best_decode,
            a.gen_tokens,
            a.reps.max(1),
            load_seconds,
            engine.weight_bytes() as f64 / 1048576.0,
            rss.peak as f64 / 1048576.0,
            huge_pages as f64 / 1048576.0,
            strata_worker::cpu_features()
        )?;
    }
    Ok(())
}

/// One step of the sequences `(id, first position, tokens)`, each sampling its next token;
/// the engine allocates their KV blocks.
fn step(seqs: &[(u64, usize, Vec<u32>)], prompt_len: usize) -> strata_shared::wire::StepFrame {
    strata_shared::wire::StepFrame {
        times: Default::default(),
        step_id: 0,
        stage: 0,
        releases: vec![],
        seqs: seqs
            .iter()
            .map(|(id, pos0, tokens)| strata_shared::wire::SeqStep {
                seq_id: *id,
                pos0: *pos0 as u32,
                prompt_len: prompt_len as u32,
                tokens: tokens.clone(),
                sample: true,
                params: Default::default(),
                blocks: vec![],
                fresh: *pos0 == 0,
                history: vec![],
            })
            .collect(),
        hidden: None,
        trace: String::new(),
        concurrent: 1,
    }
}

/// Aggregate decode speed of `a.batch` sequences decoding together (each prefilled alone
/// first, untimed): tokens of all sequences per second of the decode steps.
fn batch_decode(
    engine: &mut strata_worker::Engine,
    a: &BenchArgs,
    rep: u64,
    prompt: &dyn Fn(usize) -> Vec<u32>,
) -> Result<f64> {
    let ids: Vec<u64> = (0..a.batch as u64).map(|i| (rep << 32) | (i + 1)).collect();
    let mut next = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        let s = engine.step(step(&[(id, 0, prompt(i))], a.prompt_tokens))?;
        next.push(s.samples.first().map_or(0, |x| x.token));
    }
    let t = Instant::now();
    for g in 0..a.gen_tokens {
        let seqs: Vec<(u64, usize, Vec<u32>)> = ids
            .iter()
            .zip(&next)
            .map(|(&id, &tok)| (id, a.prompt_tokens + g, vec![tok]))
            .collect();
        let s = engine.step(step(&seqs, a.prompt_tokens))?;
        for sample in &s.samples {
            if let Some(i) = ids.iter().position(|&id| id == sample.seq_id) {
                next[i] = sample.token;
            }
        }
    }
    let rate = (a.gen_tokens * a.batch) as f64 / t.elapsed().as_secs_f64();
    for id in ids {
        engine.release(id);
    }
    Ok(rate)
}

pub async fn bench_serve(a: BenchServeArgs) -> Result<()> {
    use strata_proto::v1::strata_client::StrataClient;
    use strata_proto::v1::{ModelInfoRequest, TokenizeRequest};
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
        let outcome = crate::load::one(
            &mut client,
            crate::load::Request {
                prompt: prompt.clone(),
                gen_tokens: a.gen_tokens,
            },
        )
        .await;
        let (ttft, gaps) = match outcome {
            crate::load::Outcome::Done { ttft, gaps, .. } => (ttft, gaps),
            crate::load::Outcome::Failed(code) => anyhow::bail!("generation failed: {code:?}"),
        };
        if rep == 0 {
            continue;
        }
        best_ttft = best_ttft.min(ttft.as_secs_f64() * 1e3);
        let decoding: std::time::Duration = gaps.iter().sum();
        if !gaps.is_empty() {
            best_decode = best_decode.max(gaps.len() as f64 / decoding.as_secs_f64());
        }
    }
    // Bytes one decode step of one sequence sends over each hop, from the frame encoder itself.
    let step = |hidden: Option<strata_shared::wire::Activations>| {
        strata_shared::wire::Frame::Step(strata_shared::wire::StepFrame {
            times: Default::default(),
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
            trace: String::new(),
            concurrent: 1,
        })
    };
    let frame_len = |f: strata_shared::wire::Frame| f.to_bytes().map_or(0, |b| b.len());
    let activations = strata_shared::wire::Activations::in_frame(
        strata_shared::wire::ActDType::F32,
        1,
        info.hidden_size,
        vec![0u8; info.hidden_size as usize * 4].into(),
    );
    let into_first = frame_len(step(None));
    let between = frame_len(step(Some(activations)));
    let back = frame_len(strata_shared::wire::Frame::Samples(
        strata_shared::wire::SamplesFrame {
            times: Default::default(),
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
            a.prompt_tokens,
            a.gen_tokens,
            a.reps.max(1)
        )?;
    }
    Ok(())
}
