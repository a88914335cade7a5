//! `strata load`: a load generator over real gRPC against a running service.
//!
//! Two ways to drive it:
//! - **closed loop** (`--streams 1,4,16`): N clients, each sending `--per-stream` requests one
//!   after the other, so N streams are always in flight;
//! - **open loop** (`--rate R`): `--requests` requests arriving as a Poisson process of R per
//!   second, whatever the service's speed (queueing shows in the time to first token).
//!
//! Prompt and output lengths are fixed (`8`) or drawn uniformly from a range (`64-256`). Prompt
//! tokens are drawn at random from a seed text's tokens, so no two prompts share a prefix unless
//! `--shared-prefix N` puts the same N tokens in front of every prompt (a system prompt: the
//! prefix cache's case). Reported: generated tokens per second, requests per second, time to
//! first token and inter-token latency (p50, p99), and failed requests by gRPC status.

use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{
    GenerateRequest, SamplingParameters, TokenIds, TokenizeRequest, generate_request,
    generate_response,
};
use tonic::transport::Channel;

#[derive(Args)]
pub struct LoadArgs {
    /// The gateway's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Closed loop: concurrent streams (several values run one after the other:
    /// `--streams 1,4,16,64`).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub streams: Vec<usize>,
    /// Closed loop: requests each stream sends, one after the other.
    #[arg(long, default_value_t = 1)]
    pub per_stream: usize,
    /// Open loop instead: requests arrive as a Poisson process of this many per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: how many requests arrive in all.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Prompt tokens per request: `N`, or `MIN-MAX` drawn uniformly.
    #[arg(long, default_value = "8")]
    pub prompt_tokens: Lengths,
    /// Tokens generated per request (greedy, past end-of-sequence): `N` or `MIN-MAX`.
    #[arg(long, default_value = "128")]
    pub gen_tokens: Lengths,
    /// Tokens every prompt starts with (a shared system prompt), before its own tokens.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,
    /// Rounds per setting; the round with the best aggregate rate is reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Seed of the prompts, lengths and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object per setting.
    #[arg(long)]
    pub json: bool,
}

/// A length, fixed or drawn uniformly from `min..=max`.
#[derive(Clone, Copy, Debug)]
pub struct Lengths {
    min: usize,
    max: usize,
}

impl FromStr for Lengths {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}` is not a length: expected `N` or `MIN-MAX`"))
        };
        let (min, max) = match s.split_once('-') {
            Some((lo, hi)) => (number(lo)?, number(hi)?),
            None => (number(s)?, number(s)?),
        };
        if min == 0 || min > max {
            return Err(format!(
                "`{s}`: lengths must be at least 1, and MIN at most MAX"
            ));
        }
        Ok(Lengths { min, max })
    }
}

impl Lengths {
    fn draw(self, rng: &mut StdRng) -> usize {
        rng.random_range(self.min..=self.max)
    }
}

/// One request to send (greedy, past end-of-sequence).
pub(crate) struct Request {
    pub(crate) prompt: Vec<u32>,
    pub(crate) gen_tokens: u32,
}

/// What one request saw.
pub(crate) enum Outcome {
    Done {
        ttft: Duration,
        tokens: u32,
        /// Gaps between consecutive tokens.
        gaps: Vec<Duration>,
    },
    Failed(tonic::Code),
}

pub async fn load(a: LoadArgs) -> Result<()> {
    if a.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of requests per second");
    }
    if a.streams.contains(&0) || a.per_stream == 0 || a.requests == 0 {
        bail!("--streams, --per-stream and --requests must be at least 1");
    }
    let client = StrataClient::connect(format!("http://{}", a.addr))
        .await
        .with_context(|| format!("connecting to {}", a.addr))?;
    let seed_text = "The history of computing is a story of layers, from machines programmed by rewiring panels to compilers, operating systems, networks and services that answer millions of people at once. ";
    let vocabulary = client
        .clone()
        .tokenize(TokenizeRequest {
            text: seed_text.into(),
            add_special_tokens: false,
        })
        .await?
        .into_inner()
        .ids;
    anyhow::ensure!(!vocabulary.is_empty(), "the seed text tokenizes to nothing");
    let mut rng = StdRng::seed_from_u64(a.seed);
    let prefix: Vec<u32> = (0..a.shared_prefix)
        .map(|_| vocabulary[rng.random_range(0..vocabulary.len())])
        .collect();
    let make_request = |rng: &mut StdRng| {
        let mut prompt = prefix.clone();
        let own = a.prompt_tokens.draw(rng);
        prompt.extend((0..own).map(|_| vocabulary[rng.random_range(0..vocabulary.len())]));
        Request {
            prompt,
            gen_tokens: u32::try_from(a.gen_tokens.draw(rng)).unwrap_or(u32::MAX),
        }
    };

    let settings: Vec<Option<usize>> = match a.rate {
        Some(_) => vec![None],
        None => a.streams.iter().copied().map(Some).collect(),
    };
    let mut out = std::io::stdout().lock();
    for streams in settings {
        let mut best: Option<(f64, f64, Vec<Outcome>)> = None;
        for _ in 0..a.rounds.max(1) {
            let started = Instant::now();
            let outcomes = match (streams, a.rate) {
                (Some(n), _) => {
                    let mut clients = Vec::with_capacity(n);
                    for _ in 0..n {
                        let requests: Vec<Request> =
                            (0..a.per_stream).map(|_| make_request(&mut rng)).collect();
                        let mut c = client.clone();
                        clients.push(tokio::spawn(async move {
                            let mut outcomes = Vec::with_capacity(requests.len());
                            for r in requests {
                                outcomes.push(one(&mut c, r).await);
                            }
                            outcomes
                        }));
                    }
                    let mut outcomes = Vec::new();
                    for c in clients {
                        outcomes.extend(c.await.context("stream task")?);
                    }
                    outcomes
                }
                (None, Some(rate)) => {
                    let mut tasks = Vec::with_capacity(a.requests);
                    let mut at = Duration::ZERO;
                    for _ in 0..a.requests {
                        // Exponential gaps: a Poisson process of `rate` arrivals per second.
                        let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                        at += Duration::from_secs_f64(-u.ln() / rate);
                        tokio::time::sleep_until((started + at).into()).await;
                        let r = make_request(&mut rng);
                        let mut c = client.clone();
                        tasks.push(tokio::spawn(async move { one(&mut c, r).await }));
                    }
                    let mut outcomes = Vec::with_capacity(tasks.len());
                    for t in tasks {
                        outcomes.push(t.await.context("request task")?);
                    }
                    outcomes
                }
                (None, None) => Vec::new(),
            };
            let wall = started.elapsed().as_secs_f64();
            let tokens: u32 = outcomes
                .iter()
                .map(|o| match o {
                    Outcome::Done { tokens, .. } => *tokens,
                    Outcome::Failed(_) => 0,
                })
                .sum();
            let rate = f64::from(tokens) / wall;
            if best.as_ref().is_none_or(|(r, _, _)| rate > *r) {
                best = Some((rate, wall, outcomes));
            }
        }
        let Some((rate, wall, outcomes)) = best else {
            continue;
        };
        let report = Report::new(rate, wall, &outcomes);
        let setting = match (streams, a.rate) {
            (Some(n), _) => format!("{n:>3} streams"),
            (None, Some(r)) => format!("{r} req/s"),
            (None, None) => String::new(),
        };
        if a.json {
            let mut json = serde_json::json!({
                "prompt_tokens": a.prompt_tokens.to_string(),
                "gen_tokens": a.gen_tokens.to_string(),
                "shared_prefix": a.shared_prefix,
                "requests": outcomes.len(),
                "tokens_per_second": report.tokens_per_second,
                "requests_per_second": report.requests_per_second,
                "ttft_ms_p50": report.ttft_ms.0, "ttft_ms_p99": report.ttft_ms.1,
                "inter_token_ms_p50": report.itl_ms.0, "inter_token_ms_p99": report.itl_ms.1,
                "inter_token_ms_max": report.itl_ms_max,
                "errors": report.errors,
            });
            match (streams, a.rate) {
                (Some(n), _) => json["streams"] = n.into(),
                (_, Some(r)) => json["rate"] = r.into(),
                _ => {}
            }
            writeln!(out, "{json}")?;
        } else {
            let errors = if report.errors.is_empty() {
                String::new()
            } else {
                format!("; failed: {:?}", report.errors)
            };
            writeln!(
                out,
                "{setting}: {:>8.1} tok/s, {:.2} req/s; time to first token p50 {:.0} ms, p99 {:.0} ms; between tokens p50 {:.1} ms, p99 {:.1} ms{errors}",
                report.tokens_per_second,
                report.requests_per_second,
                report.ttft_ms.0,
                report.ttft_ms.1,
                report.itl_ms.0,
                report.itl_ms.1,
            )?;
        }
    }
    Ok(())
}

impl std::fmt::Display for Lengths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// The figures of one setting.
struct Report {
    tokens_per_second: f64,
    requests_per_second: f64,
    /// Time to first token, p50 and p99, in milliseconds.
    ttft_ms: (f64, f64),
    /// Gap between consecutive tokens of a stream, p50 and p99, in milliseconds.
    itl_ms: (f64, f64),
    /// The longest such gap (a stall, or a ring being rebuilt, shows here).
    itl_ms_max: f64,
    /// Failed requests by gRPC status.
    errors: BTreeMap<String, usize>,
}

impl Report {
    fn new(tokens_per_second: f64, wall: f64, outcomes: &[Outcome]) -> Report {
        let (mut ttft, mut gaps, mut errors) = (Vec::new(), Vec::new(), BTreeMap::new());
        for o in outcomes {
            match o {
                Outcome::Done {
                    ttft: t, gaps: g, ..
                } => {
                    ttft.push(t.as_secs_f64() * 1e3);
                    gaps.extend(g.iter().map(|g| g.as_secs_f64() * 1e3));
                }
                Outcome::Failed(code) => {
                    *errors.entry(format!("{code:?}")).or_insert(0) += 1;
                }
            }
        }
        Report {
            tokens_per_second,
            requests_per_second: ttft.len() as f64 / wall,
            ttft_ms: (percentile(&mut ttft, 0.5), percentile(&mut ttft, 0.99)),
            itl_ms: (percentile(&mut gaps, 0.5), percentile(&mut gaps, 0.99)),
            itl_ms_max: percentile(&mut gaps, 1.0),
            errors,
        }
    }
}

/// The `p` quantile (nearest rank) of `values`; 0 for none.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (values.len() as f64 * p).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Sends one request and times its stream.
pub(crate) async fn one(client: &mut StrataClient<Channel>, r: Request) -> Outcome {
    let req = GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds {
            ids: r.prompt,
        })),
        parameters: Some(SamplingParameters {
            max_tokens: Some(r.gen_tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        add_special_tokens: false,
    };
    let start = Instant::now();
    let mut stream = match client.generate(req).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Outcome::Failed(status.code()),
    };
    let (mut first, mut last, mut tokens) = (None, start, 0u32);
    let mut gaps = Vec::with_capacity(r.gen_tokens as usize);
    loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                if let Some(generate_response::Event::Token(_)) = msg.event {
                    let now = Instant::now();
                    if first.is_some() {
                        gaps.push(now - last);
                    }
                    first.get_or_insert(now);
                    last = now;
                    tokens += 1;
                }
            }
            Ok(None) => break,
            Err(status) => return Outcome::Failed(status.code()),
        }
    }
    match first {
        Some(first) => Outcome::Done {
            ttft: first - start,
            tokens,
            gaps,
        },
        None => Outcome::Failed(tonic::Code::Unknown),
    }
}
