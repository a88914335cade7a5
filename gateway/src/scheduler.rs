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
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.stats
            .reserved_blocks
            .store(self.cfg.kv_blocks - self.free_blocks, Ordering::Relaxed);
    }

    pub fn is_idle(&self) -> bool {
        !self.has_requests() && self.releases.is_empty()
    }

    /// Whether any request waits or runs (as opposed to only releases left to send).
    pub fn has_requests(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Drops sequences whose client has gone.
    pub fn reap_disconnected(&mut self) {
        self.waiting.retain(|s| !s.events.is_closed());
        let gone: Vec<u64> = self
            .running
            .iter()
            .filter(|s| s.events.is_closed())
            .map(|s| s.id)
            .collect();
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
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            s.blocks = need;
            self.free_blocks -= need;
            self.running.push(s);
        }
        let mut budget = self.cfg.max_batch_tokens;
        let mut seqs = Vec::new();
        let now = Instant::now();
        // Decode tokens first: running sequences never starve behind long prompts.
        for s in self
            .running
            .iter_mut()
            .filter(|s| s.prefilled == s.req.input_ids.len())
        {
            let Some(&last) = s.generated.last() else {
                continue;
            };
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
        for s in self
            .running
            .iter_mut()
            .filter(|s| s.prefilled < s.req.input_ids.len())
        {
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
                if s.events
                    .try_send(Ok(GenerateResponse { event: Some(event) }))
                    .is_err()
                {
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
                    let text = if reason == FinishReason::Stop {
                        String::new()
                    } else {
                        s.stop.flush()
                    };
                    let _ = s.events.try_send(Ok(finished(&s, reason, text, stop, now)));
                }
            }
        }
    }

    /// Releases to send again (a failed step may not have reached every stage; releasing twice
    /// is harmless).
    pub fn requeue_releases(&mut self, ids: Vec<u64>) {
        self.releases.extend(ids);
    }

    /// Ends every running sequence with an error (the pipeline failed under them); their KV is
    /// released on the next step.
    pub fn fail_running(&mut self, err: &GatewayError) {
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        for id in ids {
            if let Some(s) = self.remove(id) {
                let _ = s
                    .events
                    .try_send(Err(Status::from(GatewayError::Unavailable(
                        err.to_string(),
                    ))));
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
                let _ = s.events.try_send(Ok(finished(
                    &s,
                    FinishReason::Cancelled,
                    text,
                    String::new(),
                    now,
                )));
            }
        }
        for s in self.waiting.drain(..) {
            let _ = s.events.try_send(Err(GatewayError::Cancelled(
                "the server is shutting down".into(),
            )
            .into()));
        }
    }
}

fn finished(
    s: &Seq,
    reason: FinishReason,
    text: String,
    stop_sequence: String,
    now: Instant,
) -> GenerateResponse {
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    let decode_tps = match s.first_token {
        Some(t) if s.generated.len() > 1 && now > t => {
            (s.generated.len() - 1) as f64 / now.duration_since(t).as_secs_f64()
        }
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
    pub async fn submit(
        &self,
        request: ValidRequest,
        events: EventSender,
    ) -> Result<(), GatewayError> {
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
    // After a failed step, releases alone are retried only this much later: a broken ring
    // fails every step at once, and must not be asked again in a hot loop.
    const RELEASE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
    let mut retry_releases_at: Option<tokio::time::Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        while let Ok(r) = rx.try_recv() {
            state.enqueue(r);
        }
        state.reap_disconnected();
        state.publish();
        if let Some(at) = retry_releases_at
            && !state.has_requests()
        {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => state.enqueue(r),
                    None => break,
                },
                _ = shutdown.changed() => {}
                () = tokio::time::sleep_until(at) => retry_releases_at = None,
            }
            continue;
        }
        match state.next_step() {
            Some(step) => {
                let releases = step.releases.clone();
                match pipeline.step(step).await {
                    Ok(samples) => {
                        retry_releases_at = None;
                        state.on_samples(samples);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "step failed; failing the running requests");
                        // Stages past the failure never saw the releases: send them again.
                        state.requeue_releases(releases);
                        state.fail_running(&e);
                        retry_releases_at = Some(tokio::time::Instant::now() + RELEASE_RETRY);
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use strata_proto::v1::TopLogprob;
    use strata_shared::source::{ModelFiles, WeightFormat};
    use strata_shared::wire::{Sample, SamplingParams};
    use tonic::Code;

    use super::*;

    /// `<|im_end|>`, the golden model's EOS.
    const EOS: u32 = 2;

    type Events = mpsc::Receiver<Result<GenerateResponse, Status>>;

    /// The golden SmolLM2 tokenizer with EOS = 2.
    fn tok() -> Arc<ModelTokenizer> {
        static TOK: OnceLock<Arc<ModelTokenizer>> = OnceLock::new();
        Arc::clone(TOK.get_or_init(|| {
            let hf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/golden/smollm2/hf");
            let files = ModelFiles {
                spec: "smollm2".into(),
                format: WeightFormat::Safetensors,
                weights: vec![],
                config: Some(hf.join("config.json")),
                tokenizer_json: Some(hf.join("tokenizer.json")),
                tokenizer_config: Some(hf.join("tokenizer_config.json")),
                chat_template: None,
                generation_config: None,
            };
            Arc::new(ModelTokenizer::load(&files, None, &[EOS]).unwrap())
        }))
    }

    fn ids(text: &str) -> Vec<u32> {
        tok().encode(text, false).unwrap()
    }

    fn state(kv_blocks: usize, max_batch_tokens: usize, max_running: usize) -> SchedulerState {
        let st = SchedulerState::new(
            SchedulerConfig {
                kv_blocks,
                block_size: 16,
                max_batch_tokens,
                max_running,
            },
            tok(),
        );
        assert_eq!(tok().eos_ids(), &[EOS]);
        st
    }

    /// A request with a `prompt_len`-token prompt (ids 100, 101, ...).
    fn request(prompt_len: usize, max_new_tokens: u32) -> ValidRequest {
        prompt(
            &(0..prompt_len as u32).map(|i| 100 + i).collect::<Vec<_>>(),
            max_new_tokens,
        )
    }

    fn prompt(input_ids: &[u32], max_new_tokens: u32) -> ValidRequest {
        ValidRequest {
            input_ids: input_ids.to_vec(),
            max_new_tokens,
            params: SamplingParams::default(),
            stop: vec![],
            ignore_eos: false,
            logprobs: false,
            include_special_tokens: false,
        }
    }

    fn submit(st: &mut SchedulerState, request: ValidRequest) -> Events {
        let (tx, rx) = mpsc::channel(256);
        st.enqueue(NewRequest {
            request,
            events: tx,
            arrived: Instant::now(),
        });
        rx
    }

    fn sample(seq_id: u64, token: u32) -> Sample {
        Sample {
            seq_id,
            token,
            logprob: -0.25,
            top: vec![],
        }
    }

    fn feed(st: &mut SchedulerState, step: &StepFrame, samples: Vec<Sample>) {
        st.on_samples(SamplesFrame {
            step_id: step.step_id,
            samples,
        });
    }

    fn decode_step(seq_id: u64, pos0: u32, prompt_len: u32, token: u32) -> SeqStep {
        SeqStep {
            seq_id,
            pos0,
            prompt_len,
            tokens: vec![token],
            sample: true,
            params: SamplingParams::default(),
        }
    }

    /// What a client received.
    #[derive(Debug, Default)]
    struct Received {
        tokens: Vec<Token>,
        finished: Option<Finished>,
        error: Option<Status>,
    }

    impl Received {
        fn text(&self) -> String {
            let mut t: String = self.tokens.iter().map(|t| t.text.as_str()).collect();
            if let Some(f) = &self.finished {
                t.push_str(&f.text);
            }
            t
        }

        fn finished(&self) -> &Finished {
            self.finished
                .as_ref()
                .unwrap_or_else(|| panic!("not finished: {self:?}"))
        }

        fn usage(&self) -> (u32, u32) {
            let u = self.finished().usage.unwrap_or_default();
            (u.prompt_tokens, u.completion_tokens)
        }
    }

    /// Everything queued on a client's stream; nothing may follow the end.
    fn drain(rx: &mut Events) -> Received {
        let mut r = Received::default();
        while let Ok(ev) = rx.try_recv() {
            assert!(
                r.finished.is_none() && r.error.is_none(),
                "event after the end: {ev:?}"
            );
            match ev {
                Ok(GenerateResponse {
                    event: Some(generate_response::Event::Token(t)),
                }) => r.tokens.push(t),
                Ok(GenerateResponse {
                    event: Some(generate_response::Event::Finished(f)),
                }) => r.finished = Some(f),
                Ok(other) => panic!("unexpected event {other:?}"),
                Err(e) => r.error = Some(e),
            }
        }
        r
    }

    fn reason(r: &Received) -> FinishReason {
        FinishReason::try_from(r.finished().reason).unwrap()
    }

    #[test]
    fn prefill_then_decode_positions() {
        let mut st = state(64, 64, 4);
        let input = ids("The capital of France is");
        let out = ids(" Paris. The");
        assert_eq!((input.len(), out.len()), (5, 3));
        let mut rx = submit(&mut st, prompt(&input, 3));
        assert_eq!(st.free_blocks, 64, "blocks are reserved at admission");

        let step = st.next_step().unwrap();
        assert_eq!(
            step,
            StepFrame {
                step_id: 1,
                stage: 0,
                releases: vec![],
                seqs: vec![SeqStep {
                    seq_id: 1,
                    pos0: 0,
                    prompt_len: 5,
                    tokens: input.clone(),
                    sample: true,
                    params: SamplingParams::default(),
                }],
                hidden: None,
            }
        );
        assert_eq!(st.free_blocks, 63, "5 + 3 tokens take one 16-token block");
        feed(&mut st, &step, vec![sample(1, out[0])]);
        for i in 1..out.len() {
            let step = st.next_step().unwrap();
            assert_eq!(step.step_id, 1 + i as u64);
            assert!(step.releases.is_empty());
            assert_eq!(step.seqs, vec![decode_step(1, 4 + i as u32, 5, out[i - 1])]);
            feed(&mut st, &step, vec![sample(1, out[i])]);
        }

        let r = drain(&mut rx);
        assert_eq!(r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), out);
        assert_eq!(
            r.tokens.iter().map(|t| t.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(
            r.tokens
                .iter()
                .all(|t| t.logprob.is_none() && t.top_logprobs.is_empty())
        );
        assert_eq!(r.text(), " Paris. The");
        assert_eq!(reason(&r), FinishReason::Length);
        assert_eq!(r.usage(), (5, 3));
        let f = r.finished();
        assert_eq!((f.text.as_str(), f.stop_sequence.as_str()), ("", ""));
        assert_eq!(f.seed, SamplingParams::default().seed);
        let t = f.timings.unwrap_or_default();
        assert!(
            t.total_ms >= t.time_to_first_token_ms && t.time_to_first_token_ms >= t.queue_ms,
            "{t:?}"
        );

        // The next step releases the sequence; then there is nothing left to do.
        let step = st.next_step().unwrap();
        assert_eq!(
            (step.step_id, step.releases.clone(), step.seqs.len()),
            (4, vec![1], 0)
        );
        assert_eq!(st.free_blocks, 64);
        assert!(st.is_idle());
        assert!(st.next_step().is_none());
    }

    #[test]
    fn long_prompts_are_chunked_behind_decode_tokens() {
        let mut st = state(64, 8, 4);
        let mut rx_a = submit(&mut st, request(3, 10));
        let step = st.next_step().unwrap();
        assert_eq!(step.seqs.len(), 1);
        assert_eq!(
            (
                step.seqs[0].pos0,
                step.seqs[0].tokens.len(),
                step.seqs[0].sample
            ),
            (0, 3, true)
        );
        feed(&mut st, &step, vec![sample(1, 500)]);

        let mut rx_b = submit(&mut st, request(20, 5));
        let b_prompt: Vec<u32> = (100..120).collect();
        // 20 prompt tokens, 7 per step (one of the 8 goes to A's decode token, scheduled first).
        let chunks = [(0usize, 7usize, false), (7, 7, false), (14, 6, true)];
        for (i, (pos0, n, samples)) in chunks.into_iter().enumerate() {
            let step = st.next_step().unwrap();
            let a_tok = 500 + i as u32;
            assert_eq!(step.seqs.len(), 2, "{step:?}");
            assert_eq!(step.seqs[0], decode_step(1, 3 + i as u32, 3, a_tok));
            let b = &step.seqs[1];
            assert_eq!(
                (b.seq_id, b.pos0 as usize, b.prompt_len, b.sample),
                (2, pos0, 20, samples)
            );
            assert_eq!(b.tokens, b_prompt[pos0..pos0 + n]);
            assert!(step.seqs.iter().map(|s| s.tokens.len()).sum::<usize>() <= 8);
            let mut samples_out = vec![sample(1, a_tok + 1)];
            if samples {
                samples_out.push(sample(2, 600));
            }
            feed(&mut st, &step, samples_out);
        }
        // Both decode now.
        let step = st.next_step().unwrap();
        assert_eq!(
            step.seqs,
            vec![decode_step(1, 6, 3, 503), decode_step(2, 20, 20, 600)]
        );
        assert_eq!(drain(&mut rx_a).tokens.len(), 4);
        let b = drain(&mut rx_b);
        assert_eq!(b.tokens.len(), 1, "B samples only after its last chunk");
        assert_eq!(b.tokens[0].id, 600);
    }

    #[test]
    fn decode_tokens_fill_the_budget_before_prompt_chunks() {
        let mut st = state(64, 2, 4);
        let _a = submit(&mut st, request(2, 10));
        let step = st.next_step().unwrap();
        feed(&mut st, &step, vec![sample(1, 500)]);
        let _b = submit(&mut st, request(2, 10));
        let step = st.next_step().unwrap();
        assert_eq!(step.seqs.len(), 2);
        assert_eq!(
            step.seqs[1].tokens.len(),
            1,
            "one decode token leaves one prompt token"
        );
        feed(&mut st, &step, vec![sample(1, 501)]);
        let step = st.next_step().unwrap();
        assert_eq!(step.seqs[1].tokens, vec![101]);
        assert!(step.seqs[1].sample);
        feed(&mut st, &step, vec![sample(1, 502), sample(2, 700)]);
        let _c = submit(&mut st, request(4, 10));
        // Two decode tokens take the whole budget: C's prompt waits.
        let step = st.next_step().unwrap();
        assert_eq!(
            step.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            st.running.len(),
            3,
            "C is admitted (it has KV room) but gets no tokens"
        );
    }

    #[test]
    fn admission_waits_for_kv_blocks_in_fifo_order() {
        // 4 blocks of 16 tokens.
        let mut st = state(4, 64, 8);
        let mut a = submit(&mut st, request(4, 40)); // 3 blocks
        let mut b = submit(&mut st, request(4, 20)); // 2 blocks: does not fit next to A
        let mut c = submit(&mut st, request(4, 4)); // 1 block: would fit, but waits behind B
        let step = st.next_step().unwrap();
        assert_eq!(
            step.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(
            (st.running.len(), st.waiting.len(), st.free_blocks),
            (1, 2, 1)
        );

        // A ends with EOS; B and C are admitted once its blocks are back.
        feed(&mut st, &step, vec![sample(1, EOS)]);
        let ra = drain(&mut a);
        assert_eq!(reason(&ra), FinishReason::Eos);
        assert_eq!(st.free_blocks, 4);
        let step = st.next_step().unwrap();
        assert_eq!(step.releases, vec![1]);
        assert_eq!(
            step.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            (st.running.len(), st.waiting.len(), st.free_blocks),
            (2, 0, 1)
        );
        assert!(drain(&mut b).tokens.is_empty() && drain(&mut c).tokens.is_empty());
    }

    #[test]
    fn admission_waits_for_a_running_slot() {
        let mut st = state(64, 64, 2);
        let mut rxs: Vec<Events> = (0..4).map(|_| submit(&mut st, request(3, 1))).collect();
        let step = st.next_step().unwrap();
        assert_eq!(
            step.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(st.waiting.len(), 2);
        // Max tokens 1: both finish on their first sample; 3 and 4 take their slots, in order.
        feed(&mut st, &step, vec![sample(1, 500), sample(2, 501)]);
        let step = st.next_step().unwrap();
        assert_eq!(step.releases, vec![1, 2]);
        assert_eq!(
            step.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
            vec![3, 4]
        );
        feed(&mut st, &step, vec![sample(4, 503), sample(3, 502)]);
        for (i, rx) in rxs.iter_mut().enumerate() {
            let r = drain(rx);
            assert_eq!(
                r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
                vec![500 + i as u32]
            );
            assert_eq!(reason(&r), FinishReason::Length);
            assert_eq!(r.usage(), (3, 1));
        }
        let step = st.next_step().unwrap();
        assert_eq!(
            step.releases,
            vec![4, 3],
            "released in the order they finished"
        );
        assert!(st.next_step().is_none());
        // Ids keep increasing.
        let _rx = submit(&mut st, request(3, 1));
        assert_eq!(st.next_step().unwrap().seqs[0].seq_id, 5);
    }

    #[test]
    fn eos_counts_in_usage_but_is_not_streamed() {
        let mut st = state(64, 64, 4);
        let mut rx = submit(&mut st, request(4, 10));
        let step = st.next_step().unwrap();
        let hello = ids(" Hello");
        feed(&mut st, &step, vec![sample(1, hello[0])]);
        let step = st.next_step().unwrap();
        feed(&mut st, &step, vec![sample(1, EOS)]);
        let r = drain(&mut rx);
        assert_eq!(
            r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            hello,
            "no token event for EOS"
        );
        assert_eq!(reason(&r), FinishReason::Eos);
        assert_eq!(r.usage(), (4, 2));
        assert_eq!(r.text(), " Hello");
        assert_eq!(r.finished().stop_sequence, "");
        assert_eq!(st.next_step().unwrap().releases, vec![1]);
    }

    #[test]
    fn ignore_eos_keeps_going() {
        let mut st = state(64, 64, 4);
        let mut req = request(4, 3);
        req.ignore_eos = true;
        let mut rx = submit(&mut st, req.clone());
        req.include_special_tokens = true;
        let mut rx_special = submit(&mut st, req);
        for _ in 0..3 {
            let step = st.next_step().unwrap();
            assert_eq!(step.seqs.len(), 2);
            feed(&mut st, &step, vec![sample(1, EOS), sample(2, EOS)]);
        }
        let r = drain(&mut rx);
        assert_eq!(
            r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![EOS; 3]
        );
        assert_eq!(r.text(), "", "special tokens are skipped in the text");
        assert_eq!(reason(&r), FinishReason::Length);
        assert_eq!(r.usage(), (4, 3));
        let r = drain(&mut rx_special);
        assert_eq!(r.text(), "<|im_end|>".repeat(3));
        assert_eq!(reason(&r), FinishReason::Length);
    }

    #[test]
    fn a_stop_sequence_split_across_tokens_is_never_emitted() {
        let mut st = state(64, 64, 4);
        let out = ids(" Paris.\n\nThe answer");
        let mut req = request(5, 20);
        req.stop = vec![".\n\nThe".into(), "never".into()];
        let mut rx = submit(&mut st, req);
        let mut fed = 0;
        while let Some(step) = st.next_step() {
            if step.seqs.is_empty() {
                assert_eq!(step.releases, vec![1]);
                break;
            }
            feed(&mut st, &step, vec![sample(1, out[fed])]);
            fed += 1;
        }
        let r = drain(&mut rx);
        assert_eq!(fed, r.tokens.len());
        assert!(fed < out.len(), "stopped before ` answer`");
        assert_eq!(reason(&r), FinishReason::Stop);
        assert_eq!(r.finished().stop_sequence, ".\n\nThe");
        assert_eq!(r.text(), " Paris");
        assert!(
            r.tokens
                .iter()
                .all(|t| !t.text.contains('.') && !t.text.contains('\n')),
            "{r:?}"
        );
        assert_eq!(r.usage(), (5, fed as u32));
        assert_eq!(st.free_blocks, 64);
        assert!(st.is_idle());
    }

    #[test]
    fn held_back_text_is_flushed_at_the_end() {
        let mut st = state(64, 64, 4);
        let out = ids(" Paris.");
        let mut req = request(5, out.len() as u32);
        req.stop = vec![". Nope".into()];
        let mut rx = submit(&mut st, req);
        for &t in &out {
            let step = st.next_step().unwrap();
            feed(&mut st, &step, vec![sample(1, t)]);
        }
        let r = drain(&mut rx);
        assert_eq!(reason(&r), FinishReason::Length);
        assert_eq!(
            r.tokens.last().map(|t| t.text.as_str()),
            Some(""),
            "`.` may start the stop sequence"
        );
        assert_eq!(r.finished().text, ".");
        assert_eq!(r.text(), " Paris.");
    }

    #[test]
    fn logprobs_come_with_tokens_when_asked() {
        let mut st = state(64, 64, 4);
        let mut req = request(4, 1);
        req.logprobs = true;
        let mut rx = submit(&mut st, req);
        let paris = ids(" Paris")[0];
        let step = st.next_step().unwrap();
        feed(
            &mut st,
            &step,
            vec![Sample {
                seq_id: 1,
                token: paris,
                logprob: -0.5,
                top: vec![(paris, -0.5), (EOS, -2.0)],
            }],
        );
        let r = drain(&mut rx);
        assert_eq!(r.tokens[0].logprob, Some(-0.5));
        assert_eq!(
            r.tokens[0].top_logprobs,
            vec![
                TopLogprob {
                    id: paris,
                    text: " Paris".into(),
                    logprob: -0.5
                },
                TopLogprob {
                    id: EOS,
                    text: "<|im_end|>".into(),
                    logprob: -2.0
                },
            ]
        );
    }

    #[test]
    fn a_gone_client_is_cancelled_and_released() {
        let mut st = state(64, 64, 4);
        let a = submit(&mut st, request(4, 10));
        let mut b = submit(&mut st, request(4, 10));
        let step = st.next_step().unwrap();
        feed(&mut st, &step, vec![sample(1, 500), sample(2, 500)]);
        let c = submit(&mut st, request(4, 10)); // waiting: never admitted
        st.cfg.max_running = 2;
        drop(a);
        drop(c);
        st.reap_disconnected();
        assert_eq!(
            (st.running.len(), st.waiting.len(), st.free_blocks),
            (1, 0, 63)
        );
        let step = st.next_step().unwrap();
        assert_eq!(step.releases, vec![1]);
        assert_eq!(step.seqs, vec![decode_step(2, 4, 4, 500)]);
        // A client that goes away between steps: its next token cannot be sent.
        feed(&mut st, &step, vec![sample(2, 501)]);
        assert_eq!(drain(&mut b).tokens.len(), 2);
        drop(b);
        let step = st.next_step().unwrap();
        feed(&mut st, &step, vec![sample(2, 502)]);
        assert!(st.running.is_empty());
        assert_eq!(st.next_step().unwrap().releases, vec![2]);
        assert!(st.is_idle());
        assert_eq!(st.free_blocks, 64);
    }

    #[test]
    fn a_request_larger_than_the_kv_cache_is_refused_at_once() {
        let mut st = state(2, 64, 4);
        let mut rx = submit(&mut st, request(10, 23)); // 33 tokens > 32
        let r = drain(&mut rx);
        let e = r.error.unwrap();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message()
                .starts_with("parameters.max_tokens: prompt plus max_tokens is 33 tokens"),
            "{e:?}"
        );
        assert!(e.message().contains("(32 tokens)"), "{e:?}");
        assert!(rx.try_recv().is_err());
        assert!(st.is_idle());
        assert!(st.next_step().is_none());
        // Exactly the capacity fits, and takes the first id.
        let _rx = submit(&mut st, request(10, 22));
        let step = st.next_step().unwrap();
        assert_eq!(step.seqs[0].seq_id, 1);
        assert_eq!(st.free_blocks, 0);
    }

    #[test]
    fn fail_running_errors_every_running_stream() {
        let mut st = state(64, 64, 2);
        let mut a = submit(&mut st, request(4, 10));
        let mut b = submit(&mut st, request(4, 10));
        let mut c = submit(&mut st, request(4, 10)); // waits for a slot
        let step = st.next_step().unwrap();
        feed(&mut st, &step, vec![sample(1, 500), sample(2, 500)]);
        st.fail_running(&GatewayError::Unavailable("worker cpu[1] died".into()));
        for rx in [&mut a, &mut b] {
            let r = drain(rx);
            assert_eq!(r.tokens.len(), 1);
            assert!(r.finished.is_none());
            let e = r.error.unwrap();
            assert_eq!(e.code(), Code::Unavailable);
            assert!(e.message().contains("worker cpu[1] died"), "{e:?}");
        }
        // Their KV is released with the next step, which runs the waiting request.
        let step = st.next_step().unwrap();
        assert_eq!(step.releases, vec![1, 2]);
        assert_eq!(
            step.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
            vec![3]
        );
        assert!(drain(&mut c).error.is_none());
    }

    #[test]
    fn cancel_all_finishes_running_and_refuses_waiting() {
        let mut st = state(64, 64, 1);
        let mut a = submit(&mut st, request(4, 10));
        let mut b = submit(&mut st, request(4, 10));
        let step = st.next_step().unwrap();
        let hello = ids(" Hello");
        feed(&mut st, &step, vec![sample(1, hello[0])]);
        st.cancel_all();
        let r = drain(&mut a);
        assert_eq!(reason(&r), FinishReason::Cancelled);
        assert_eq!(r.usage(), (4, 1));
        assert_eq!(r.text(), " Hello");
        let r = drain(&mut b);
        assert!(r.tokens.is_empty() && r.finished.is_none());
        assert_eq!(r.error.unwrap().code(), Code::Cancelled);
        let step = st.next_step().unwrap();
        assert_eq!((step.releases, step.seqs.len()), (vec![1], 0));
        assert!(st.is_idle());
        assert_eq!(st.free_blocks, 64);
    }

    #[test]
    fn multibyte_text_streams_whole_characters() {
        let mut st = state(64, 64, 4);
        let text = "日本語 🤖 ✓";
        let out = ids(text);
        assert!(
            out.len() > text.chars().count(),
            "some character spans tokens"
        );
        let mut rx = submit(&mut st, request(3, out.len() as u32));
        for &t in &out {
            let step = st.next_step().unwrap();
            feed(&mut st, &step, vec![sample(1, t)]);
        }
        let r = drain(&mut rx);
        assert_eq!(r.tokens.len(), out.len());
        assert!(
            r.tokens.iter().all(|t| !t.text.contains('\u{FFFD}')),
            "{r:?}"
        );
        assert!(r.tokens.iter().any(|t| t.text.is_empty()));
        assert_eq!(r.text(), text);
    }

    #[test]
    fn samples_for_unknown_sequences_are_ignored() {
        let mut st = state(64, 64, 4);
        let mut rx = submit(&mut st, request(3, 2));
        let step = st.next_step().unwrap();
        feed(&mut st, &step, vec![sample(99, 500), sample(1, 501)]);
        assert_eq!(drain(&mut rx).tokens.len(), 1);
        assert_eq!(st.running.len(), 1);
    }

    /// A ring that is broken for good: every step fails at once.
    struct BrokenRing {
        steps: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl crate::pipeline::Pipeline for BrokenRing {
        async fn step(&mut self, _step: StepFrame) -> Result<SamplesFrame, GatewayError> {
            self.steps.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Err(GatewayError::Unavailable(
                "the worker for cpu[1] exited".into(),
            ))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_ring_fails_requests_without_spinning_on_releases() {
        let steps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (_stop_tx, stop_rx) = watch::channel(false);
        let pipeline = BrokenRing {
            steps: Arc::clone(&steps),
        };
        let (scheduler, task) = Scheduler::spawn(pipeline, state(64, 64, 4), stop_rx);
        let (tx, mut rx) = mpsc::channel(16);
        scheduler.submit(request(3, 4), tx).await.unwrap();
        let err = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("cpu[1] exited"), "{err:?}");
        // The failed sequence's release is pending, and the ring still fails: it is retried
        // once a second, not in a loop.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let n = steps.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} steps in 300 ms");
        // A new request still gets its answer at once.
        let (tx, mut rx) = mpsc::channel(16);
        scheduler.submit(request(3, 4), tx).await.unwrap();
        assert!(rx.recv().await.unwrap().is_err());
        drop(scheduler);
        task.await.unwrap();
    }
}
