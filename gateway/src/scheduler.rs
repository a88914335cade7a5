//! Continuous batching. A scheduler actor owns a plain [`SchedulerState`]: requests wait in a
//! queue, are admitted when the KV cache has room for their whole budget (prompt + max tokens,
//! in blocks), and every step batches one token of each running sequence with prompt chunks of
//! newly admitted ones, up to a token budget. Samples come back as token events on each client's
//! stream; a client that is gone (its stream closed) is cancelled and its KV released.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use strata_proto::v1::{
    FinishReason, Finished, GenerateResponse, Timings, Token, TopLogprob, Usage, generate_response,
};
use strata_shared::wire::{SamplesFrame, SeqStep, StepFrame};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::error::GatewayError;
use crate::pipeline::Pipeline;
use crate::tokenizer::{ModelTokenizer, StopMatcher, StopOutcome, StreamDecoder};
use crate::validation::ValidRequest;

/// Where a request's events go.
pub type EventSender = mpsc::Sender<Result<GenerateResponse, Status>>;

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// KV cache capacity of every stage, in blocks.
    pub kv_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Tokens one step may carry (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
}

/// Live counters of the scheduler, readable from other tasks.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub reserved_blocks: AtomicUsize,
}

/// A request handed to the scheduler.
#[derive(Debug)]
pub struct NewRequest {
    pub request: ValidRequest,
    pub events: EventSender,
    pub arrived: Instant,
}

/// One sequence in flight.
#[derive(Debug)]
struct Seq {
    id: u64,
    req: ValidRequest,
    events: EventSender,
    arrived: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    /// Prompt tokens already fed.
    prefilled: usize,
    generated: Vec<u32>,
    decoder: StreamDecoder,
    stop: StopMatcher,
    blocks: usize,
}

impl Seq {
    fn position(&self) -> usize {
        self.prefilled + self.generated.len().saturating_sub(1)
    }
}

/// The scheduler's state, free of I/O: enqueue requests, ask for the next step, hand back its
/// samples.
#[derive(Debug)]
pub struct SchedulerState {
    cfg: SchedulerConfig,
    tokenizer: Arc<ModelTokenizer>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    free_blocks: usize,
    releases: Vec<u64>,
    next_seq: u64,
    next_step: u64,
    stats: Arc<SchedulerStats>,
}

impl SchedulerState {
    pub fn new(cfg: SchedulerConfig, tokenizer: Arc<ModelTokenizer>) -> Self {
        SchedulerState {
            stats: Arc::default(),
            cfg,
            tokenizer,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_blocks: cfg.kv_blocks,
            releases: Vec::new(),
            next_seq: 1,
            next_step: 1,
        }
    }

    /// KV blocks a request reserves: its whole prompt and output budget.
    fn blocks_for(&self, r: &ValidRequest) -> usize {
        (r.input_ids.len() + r.max_new_tokens as usize).div_ceil(self.cfg.block_size)
    }

    /// Largest request (prompt + max tokens) the KV cache can ever hold.
    pub fn capacity_tokens(&self) -> usize {
        self.cfg.kv_blocks * self.cfg.block_size
    }

    /// Queues a request. One that could never fit the KV cache is refused at once.
    pub fn enqueue(&mut self, new: NewRequest) {
        let need = self.blocks_for(&new.request);
        if need > self.cfg.kv_blocks {
            let total = new.request.input_ids.len() + new.request.max_new_tokens as usize;
            let _ = new.events.try_send(Err(GatewayError::invalid(
                "parameters.max_tokens",
                format!(
                    "prompt plus max_tokens is {total} tokens, more than the KV cache holds ({} tokens)",
                    self.capacity_tokens()
                ),
            )
            .into()));
            return;
        }
        let id = self.next_seq;
        self.next_seq += 1;
        let decoder = self
            .tokenizer
            .stream_decoder(&new.request.input_ids, !new.request.include_special_tokens);
        let stop = StopMatcher::new(new.request.stop.clone());
        self.waiting.push_back(Seq {
            id,
            req: new.request,
            events: new.events,
            arrived: new.arrived,
            scheduled: None,
            first_token: None,
            prefilled: 0,
            generated: Vec::new(),
            decoder,
            stop,
            blocks: 0,
        });
    }

    /// The live counters (updated by [`SchedulerState::publish`]).
    pub fn stats(&self) -> Arc<SchedulerStats> {
        Arc::clone(&self.stats)
    }

    /// Publishes the counters.
    pub fn publish(&self) {
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats.waiting.store(self.waiting.len(), Ordering::Relaxed);
        self.stats
            .reserved_blocks
            .store(self.cfg.kv_blocks - self.free_blocks, Ordering::Relaxed);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.releases.is_empty()
    }

    /// Drops sequences whose client has gone.
    pub fn reap_disconnected(&mut self) {
        self.waiting.retain(|s| !s.events.is_closed());
        let gone: Vec<u64> = self.running.iter().filter(|s| s.events.is_closed()).map(|s| s.id).collect();
        for id in gone {
            tracing::debug!(seq = id, "client left; cancelling");
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Seq> {
        let at = self.running.iter().position(|s| s.id == id)?;
        let s = self.running.remove(at);
        self.free_blocks += s.blocks;
        self.releases.push(id);
        Some(s)
    }

    /// Admits what fits and builds the next step; `None` when there is nothing to do.
    pub fn next_step(&mut self) -> Option<StepFrame> {
        while let Some(front) = self.waiting.front() {
            let need = self.blocks_for(&front.req);
            if self.running.len() >= self.cfg.max_running || need > self.free_blocks {
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else { break };
            s.blocks = need;
            self.free_blocks -= need;
            self.running.push(s);
        }
        let mut budget = self.cfg.max_batch_tokens;
        let mut seqs = Vec::new();
        let now = Instant::now();
        // Decode tokens first: running sequences never starve behind long prompts.
        for s in self.running.iter_mut().filter(|s| s.prefilled == s.req.input_ids.len()) {
            let Some(&last) = s.generated.last() else { continue };
            if budget == 0 {
                break;
            }
            budget -= 1;
            seqs.push(SeqStep {
                seq_id: s.id,
                pos0: s.position() as u32,
                prompt_len: s.req.input_ids.len() as u32,
                tokens: vec![last],
                sample: true,
                params: s.req.params,
            });
        }
        for s in self.running.iter_mut().filter(|s| s.prefilled < s.req.input_ids.len()) {
            if budget == 0 {
                break;
            }
            let left = s.req.input_ids.len() - s.prefilled;
            let n = left.min(budget);
            budget -= n;
            s.scheduled.get_or_insert(now);
            seqs.push(SeqStep {
                seq_id: s.id,
                pos0: s.prefilled as u32,
                prompt_len: s.req.input_ids.len() as u32,
                tokens: s.req.input_ids[s.prefilled..s.prefilled + n].to_vec(),
                sample: n == left,
                params: s.req.params,
            });
            s.prefilled += n;
        }
        if seqs.is_empty() && self.releases.is_empty() {
            return None;
        }
        let step_id = self.next_step;
        self.next_step += 1;
        Some(StepFrame {
            step_id,
            stage: 0,
            releases: std::mem::take(&mut self.releases),
            seqs,
            hidden: None,
        })
    }

    /// Applies a step's samples: streams tokens, finishes sequences.
    pub fn on_samples(&mut self, samples: SamplesFrame) {
        for sample in samples.samples {
            let Some(s) = self.running.iter_mut().find(|s| s.id == sample.seq_id) else {
                tracing::warn!(seq = sample.seq_id, "sample for an unknown sequence");
                continue;
            };
            let now = Instant::now();
            s.first_token.get_or_insert(now);
            s.generated.push(sample.token);
            let index = s.generated.len() as u32 - 1;
            let is_eos = !s.req.ignore_eos && self.tokenizer.eos_ids().contains(&sample.token);
            let mut finish: Option<(FinishReason, String)> = None;
            if is_eos {
                finish = Some((FinishReason::Eos, String::new()));
            } else {
                let delta = match s.decoder.push(sample.token) {
                    Ok(d) => d,
                    Err(e) => {
                        let id = s.id;
                        let _ = s.events.try_send(Err(e.into()));
                        self.remove(id);
                        continue;
                    }
                };
                let text = match s.stop.push(&delta) {
                    StopOutcome::Continue(t) => t,
                    StopOutcome::Stopped { text, stop } => {
                        finish = Some((FinishReason::Stop, stop));
                        text
                    }
                };
                let (logprob, top_logprobs) = if s.req.logprobs {
                    let top = sample
                        .top
                        .iter()
                        .map(|&(id, lp)| TopLogprob {
                            id,
                            text: self.tokenizer.decode(&[id], false).unwrap_or_default(),
                            logprob: lp,
                        })
                        .collect();
                    (Some(sample.logprob), top)
                } else {
                    (None, Vec::new())
                };
                let event = generate_response::Event::Token(Token {
                    id: sample.token,
                    text,
                    logprob,
                    top_logprobs,
                    index,
                });
                if s.events.try_send(Ok(GenerateResponse { event: Some(event) })).is_err() {
                    let id = s.id;
                    self.remove(id);
                    continue;
                }
            }
            if finish.is_none() && s.generated.len() >= s.req.max_new_tokens as usize {
                finish = Some((FinishReason::Length, String::new()));
            }
            if let Some((reason, stop)) = finish {
                let id = s.id;
                if let Some(mut s) = self.remove(id) {
                    let text = if reason == FinishReason::Stop { String::new() } else { s.stop.flush() };
                    let _ = s.events.try_send(Ok(finished(&s, reason, text, stop, now)));
                }
            }
        }
    }

    /// Ends every running sequence with an error (the pipeline failed under them); their KV is
    /// released on the next step.
    pub fn fail_running(&mut self, err: &GatewayError) {
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        for id in ids {
            if let Some(s) = self.remove(id) {
                let _ = s.events.try_send(Err(Status::from(GatewayError::Unavailable(err.to_string()))));
            }
        }
    }

    /// Ends everything (shutdown): running sequences finish as cancelled, waiting ones get an error.
    pub fn cancel_all(&mut self) {
        let now = Instant::now();
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        for id in ids {
            if let Some(mut s) = self.remove(id) {
                let text = s.stop.flush();
                let _ = s.events.try_send(Ok(finished(&s, FinishReason::Cancelled, text, String::new(), now)));
            }
        }
        for s in self.waiting.drain(..) {
            let _ = s
                .events
                .try_send(Err(GatewayError::Cancelled("the server is shutting down".into()).into()));
        }
    }
}

fn finished(s: &Seq, reason: FinishReason, text: String, stop_sequence: String, now: Instant) -> GenerateResponse {
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    let decode_tps = match s.first_token {
        Some(t) if s.generated.len() > 1 && now > t => (s.generated.len() - 1) as f64 / now.duration_since(t).as_secs_f64(),
        _ => 0.0,
    };
    GenerateResponse {
        event: Some(generate_response::Event::Finished(Finished {
            reason: reason as i32,
            usage: Some(Usage {
                prompt_tokens: s.req.input_ids.len() as u32,
                completion_tokens: s.generated.len() as u32,
            }),
            timings: Some(Timings {
                queue_ms: s.scheduled.map_or(0.0, |t| ms(s.arrived, t)),
                time_to_first_token_ms: s.first_token.map_or(0.0, |t| ms(s.arrived, t)),
                total_ms: ms(s.arrived, now),
                decode_tokens_per_second: decode_tps,
            }),
            seed: s.req.params.seed,
            text,
            stop_sequence,
        })),
    }
}

/// Handle to the scheduler actor.
#[derive(Debug, Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<NewRequest>,
}

impl Scheduler {
    /// Starts the actor over `pipeline`. It runs until `shutdown` turns true (then cancels
    /// everything) or every handle is dropped.
    pub fn spawn<P: Pipeline>(
        pipeline: P,
        state: SchedulerState,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let handle = tokio::spawn(run(pipeline, state, rx, shutdown));
        (Scheduler { tx }, handle)
    }

    /// Submits a validated request; its events arrive on `events`.
    pub async fn submit(&self, request: ValidRequest, events: EventSender) -> Result<(), GatewayError> {
        self.tx
            .send(NewRequest {
                request,
                events,
                arrived: Instant::now(),
            })
            .await
            .map_err(|_| GatewayError::Unavailable("the scheduler has stopped".into()))
    }
}

async fn run<P: Pipeline>(
    mut pipeline: P,
    mut state: SchedulerState,
    mut rx: mpsc::Receiver<NewRequest>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            break;
        }
        while let Ok(r) = rx.try_recv() {
            state.enqueue(r);
        }
        state.reap_disconnected();
        state.publish();
        match state.next_step() {
            Some(step) => match pipeline.step(step).await {
                Ok(samples) => state.on_samples(samples),
                Err(e) => {
                    tracing::error!(error = %e, "step failed; failing the running requests");
                    state.fail_running(&e);
                }
            },
            None => {
                state.publish();
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => state.enqueue(r),
                        None => break,
                    },
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
    state.cancel_all();
    state.publish();
    // Let the workers free what the cancelled sequences held.
    if let Some(step) = state.next_step() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), pipeline.step(step)).await;
    }
}
