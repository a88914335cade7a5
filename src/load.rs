//! `strata load`: many concurrent streams against a running service, measured from a gRPC
//! client: aggregate generated tokens per second, time to first token (p50, p99) and the gap
//! between tokens. Prompts differ from stream to stream (no shared prefix flatters the cache).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{
    GenerateRequest, SamplingParameters, TokenIds, TokenizeRequest, generate_request,
    generate_response,
};

#[derive(Args)]
pub struct LoadArgs {
    /// The gateway's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Concurrent streams (several values run one after the other: `--streams 1,4,16,64`).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub streams: Vec<usize>,
    /// Prompt tokens per stream.
    #[arg(long, default_value_t = 8)]
    pub prompt_tokens: usize,
    /// Tokens generated per stream (greedy, past end-of-sequence).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: u32,
    /// Rounds per stream count; the best aggregate rate is reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Print one JSON object per stream count.
    #[arg(long)]
    pub json: bool,
}

/// What one stream saw.
struct Stream {
    ttft: Duration,
    tokens: u32,
    /// Mean gap between consecutive tokens.
    gap: Duration,
}

pub async fn load(a: LoadArgs) -> Result<()> {
    let client = StrataClient::connect(format!("http://{}", a.addr))
        .await
        .with_context(|| format!("connecting to {}", a.addr))?;
    let seed_text = "The history of computing is a story of layers, from machines programmed by rewiring panels to compilers, operating systems, networks and services that answer millions of people at once. ";
    let seed = client
        .clone()
        .tokenize(TokenizeRequest {
            text: seed_text.into(),
            add_special_tokens: false,
        })
        .await?
        .into_inner()
        .ids;
    anyhow::ensure!(!seed.is_empty(), "the seed text tokenizes to nothing");
    let mut out = std::io::stdout().lock();
    for &n in &a.streams {
        let mut best: Option<(f64, Vec<Stream>)> = None;
        for round in 0..a.rounds.max(1) {
            let started = Instant::now();
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                // A different rotation of the seed per stream and round: no two prompts share a
                // prefix.
                let offset = (i * 7 + round * 3) % seed.len();
                let prompt: Vec<u32> = seed
                    .iter()
                    .cycle()
                    .skip(offset)
                    .take(a.prompt_tokens)
                    .copied()
                    .collect();
                let mut c = client.clone();
                let gen_tokens = a.gen_tokens;
                tasks.push(tokio::spawn(async move {
                    one(&mut c, prompt, gen_tokens).await
                }));
            }
            let mut streams = Vec::with_capacity(n);
            for t in tasks {
                streams.push(t.await.context("stream task")??);
            }
            let wall = started.elapsed().as_secs_f64();
            let total: u32 = streams.iter().map(|s| s.tokens).sum();
            let rate = f64::from(total) / wall;
            if best.as_ref().is_none_or(|(r, _)| rate > *r) {
                best = Some((rate, streams));
            }
        }
        let Some((rate, streams)) = best else {
            continue;
        };
        let mut ttft: Vec<f64> = streams.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
        ttft.sort_by(f64::total_cmp);
        let pct = |p: f64| ttft[((ttft.len() as f64 * p).ceil() as usize).clamp(1, ttft.len()) - 1];
        let gap = streams
            .iter()
            .map(|s| s.gap.as_secs_f64() * 1e3)
            .sum::<f64>()
            / n as f64;
        if a.json {
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "streams": n, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                    "tokens_per_second": rate, "ttft_ms_p50": pct(0.5), "ttft_ms_p99": pct(0.99),
                    "inter_token_ms": gap,
                })
            )?;
        } else {
            writeln!(
                out,
                "{n:>3} streams: {rate:>8.1} tok/s aggregate; time to first token p50 {:.0} ms, p99 {:.0} ms; {gap:.1} ms between tokens",
                pct(0.5),
                pct(0.99),
            )?;
        }
    }
    Ok(())
}

async fn one(
    client: &mut StrataClient<tonic::transport::Channel>,
    prompt: Vec<u32>,
    gen_tokens: u32,
) -> Result<Stream> {
    let req = GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds { ids: prompt })),
        parameters: Some(SamplingParameters {
            max_tokens: Some(gen_tokens),
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
    Ok(Stream {
        ttft: first.duration_since(start),
        tokens: n,
        gap: if n > 1 {
            last.duration_since(first) / (n - 1)
        } else {
            Duration::ZERO
        },
    })
}
