//! The scheduler's state, free of I/O and of the tokenizer (vLLM's scheduler, on a plain
//! struct): requests wait in a bounded queue; a running sequence holds the KV blocks its
//! computed tokens need and takes more as it grows; every step batches one token of each
//! decoding sequence with prompt chunks of the others, up to a token budget, from the
//! sequences that are not already in a step in flight. When blocks run out, the newest
//! sequence is preempted: its blocks go back and it waits again with the tokens it has, to be
//! recomputed (its output does not change: the kernels are batch-invariant and its sampler
//! draws by position). Full blocks are shared between sequences through the prefix cache
//! ([`BlockManager`]). Samples go to each sequence's [`SeqOutput`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use strata_proto::v1::{FinishReason, Timings};
use strata_shared::wire::{SamplesFrame, SeqStep, StepFrame};
use tonic::Status;

use super::blocks::BlockManager;
use super::output::{SeqEnd, SeqOutput, TokenVerdict};
use crate::error::GatewayError;
use crate::validation::ValidRequest;

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
    /// Requests waiting at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_waiting: usize,
    /// Whether full blocks are shared between sequences with the same prefix.
    pub prefix_caching: bool,
}

/// Live counters of the scheduler, readable from other tasks.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// KV blocks held by sequences.
    pub used_blocks: AtomicUsize,
    /// Steps sent.
    pub steps: AtomicU64,
    /// Most sequences one step carried.
    pub max_step_seqs: AtomicUsize,
    /// Most steps in flight at once.
    pub max_in_flight: AtomicUsize,
    /// Steps the scheduler keeps in flight now (see [`super::depth`]).
    pub steps_in_flight: AtomicUsize,
    /// Sequences preempted (their blocks taken back, to be recomputed).
    pub preemptions: AtomicU64,
    /// Sequences that waited for a rebuilt ring (to be recomputed).
    pub requeued: AtomicU64,
    /// Prompt blocks looked up in the prefix cache, and found.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    /// Tokens computed by the workers (prompt chunks, recomputation and decode).
    pub computed_tokens: AtomicU64,
    /// Prompt tokens served from the prefix cache instead.
    pub cached_tokens: AtomicU64,
}

/// The prompt tokens past which a step of a pipeline (several steps in flight) takes no
/// further prompt. A burst of prompts then passes the stages in many steps, each stage
/// computing one while the next computes the one before, rather than in one step per stage with
/// the other stage waiting: with two stages, sixteen 128-token prompts in 2 steps keep a stage
/// idle for a third of their prefill, in 16 steps for a seventeenth. Each step reads every
/// weight of a stage once more, a few milliseconds against the tens that 128 prompt tokens
/// take; and the sequences that decode meanwhile wait for one such step between their tokens,
/// not for the whole burst (`docs/benchmarks.md`: 256 tokens gave the same throughput with
/// twice the wait).
pub(super) const PIPELINED_STEP_TOKENS: usize = 128;

/// A request handed to the scheduler, with where its results go.
#[derive(Debug)]
pub struct NewRequest<O> {
    pub request: ValidRequest,
    pub output: O,
    pub arrived: Instant,
    /// When the client stops waiting (its gRPC deadline).
    pub deadline: Option<Instant>,
}

/// One sequence in flight.
#[derive(Debug)]
pub(super) struct Seq<O> {
    pub(super) id: u64,
    pub(super) req: ValidRequest,
    output: O,
    arrived: Instant,
    deadline: Option<Instant>,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    pub(super) generated: Vec<u32>,
    /// Tokens (prompt, then generated) whose keys and values the workers hold.
    pub(super) computed: usize,
    /// The KV blocks it holds.
    pub(super) table: Vec<u32>,
    /// Whether its next step is its first on the workers.
    fresh: bool,
    /// Whether the prefix cache was searched for it since it last queued.
    prefix_checked: bool,
    /// The step in flight that carries it.
    pub(super) in_flight: Option<u64>,
    /// Ended while in a step in flight: removed when that step completes.
    doomed: Option<Doom>,
}

/// Why a sequence ends once its step in flight completes.
#[derive(Debug, Clone)]
enum Doom {
    /// The client left: nothing to send.
    Gone,
    /// Its deadline passed.
    Deadline,
}

impl<O> Seq<O> {
    /// Tokens known: the prompt, then what was generated.
    fn len(&self) -> usize {
        self.req.input_ids.len() + self.generated.len()
    }

    fn token(&self, i: usize) -> u32 {
        let p = self.req.input_ids.len();
        if i < p {
            self.req.input_ids[i]
        } else {
            self.generated[i - p]
        }
    }

    fn tokens(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        range.map(|i| self.token(i)).collect()
    }

    /// Whether its next step feeds just its last sampled token.
    fn decoding(&self) -> bool {
        !self.generated.is_empty() && self.computed + 1 == self.len()
    }

    /// How it ended, at `now`.
    fn end(&self, reason: FinishReason, stop_sequence: String, now: Instant) -> SeqEnd {
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        let decode_tps = match self.first_token {
            Some(t) if self.generated.len() > 1 && now > t => {
                (self.generated.len() - 1) as f64 / now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        };
        SeqEnd {
            reason,
            stop_sequence,
            prompt_tokens: self.req.input_ids.len() as u32,
            completion_tokens: self.generated.len() as u32,
            timings: Timings {
                queue_ms: self.scheduled.map_or(0.0, |t| ms(self.arrived, t)),
                time_to_first_token_ms: self.first_token.map_or(0.0, |t| ms(self.arrived, t)),
                total_ms: ms(self.arrived, now),
                decode_tokens_per_second: decode_tps,
            },
            seed: self.req.params.seed,
        }
    }
}

/// The scheduler's state: enqueue requests, ask for steps, hand back their outcomes.
#[derive(Debug)]
pub struct SchedulerState<O> {
    pub(super) cfg: SchedulerConfig,
    eos_ids: Vec<u32>,
    pub(super) waiting: VecDeque<Seq<O>>,
    pub(super) running: Vec<Seq<O>>,
    pub(super) blocks: BlockManager,
    /// Sequence ids the workers should forget, sent with the next step.
    releases: Vec<u64>,
    /// Steps in flight, with the sequences each carries and the releases it sent.
    in_flight: HashMap<u64, (Vec<u64>, Vec<u64>)>,
    next_seq: u64,
    next_step: u64,
    stats: Arc<SchedulerStats>,
}

impl<O: SeqOutput> SchedulerState<O> {
    /// A state for a model whose end-of-sequence tokens are `eos_ids`.
    pub fn new(cfg: SchedulerConfig, eos_ids: Vec<u32>) -> Self {
        SchedulerState {
            stats: Arc::default(),
            blocks: BlockManager::new(cfg.kv_blocks, cfg.block_size),
            cfg,
            eos_ids,
            waiting: VecDeque::new(),
            running: Vec::new(),
            releases: Vec::new(),
            in_flight: HashMap::new(),
            next_seq: 1,
            next_step: 1,
        }
    }

    /// Largest request (prompt + max tokens) the KV cache can ever hold.
    pub fn capacity_tokens(&self) -> usize {
        self.cfg.kv_blocks * self.cfg.block_size
    }

    /// Queues a request. One that could never fit the KV cache, or that finds the queue full,
    /// is refused at once.
    pub fn enqueue(&mut self, new: NewRequest<O>) {
        let total = new.request.input_ids.len() + new.request.max_new_tokens as usize;
        if total > self.capacity_tokens() {
            new.output.fail(
                GatewayError::invalid(
                    "parameters.max_tokens",
                    format!(
                        "prompt plus max_tokens is {total} tokens, more than the KV cache holds ({} tokens)",
                        self.capacity_tokens()
                    ),
                )
                .into(),
            );
            return;
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            new.output.fail(
                GatewayError::ResourceExhausted(format!(
                    "{} requests are already waiting (the queue's limit); try again later",
                    self.waiting.len()
                ))
                .into(),
            );
            return;
        }
        let id = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back(Seq {
            id,
            req: new.request,
            output: new.output,
            arrived: new.arrived,
            deadline: new.deadline,
            scheduled: None,
            first_token: None,
            generated: Vec::new(),
            computed: 0,
            table: Vec::new(),
            fresh: true,
            prefix_checked: false,
            in_flight: None,
            doomed: None,
        });
    }

    /// The live counters (updated by [`SchedulerState::publish`]).
    pub fn stats(&self) -> Arc<SchedulerStats> {
        Arc::clone(&self.stats)
    }

    /// Publishes the counters.
    pub fn publish(&self) {
        let s = &self.stats;
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.waiting.store(self.waiting.len(), Ordering::Relaxed);
        s.used_blocks.store(self.blocks.held(), Ordering::Relaxed);
    }

    pub fn is_idle(&self) -> bool {
        !self.has_requests() && self.releases.is_empty() && self.in_flight.is_empty()
    }

    /// Whether any request waits or runs (as opposed to only releases left to send).
    pub fn has_requests(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Steps in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Drops sequences whose client has gone, and ends those past their deadline (at the
    /// end of their step in flight, if they are in one).
    pub fn reap(&mut self, now: Instant) {
        let expired = |d: Option<Instant>| d.is_some_and(|d| d <= now);
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for s in self.waiting.drain(..) {
            if s.output.is_closed() {
                self.blocks.release(&s.table);
            } else if expired(s.deadline) {
                self.blocks.release(&s.table);
                s.output.fail(deadline_status());
            } else {
                kept.push_back(s);
            }
        }
        self.waiting = kept;
        let ids: Vec<(u64, Doom)> = self
            .running
            .iter()
            .filter(|s| s.doomed.is_none())
            .filter_map(|s| {
                if s.output.is_closed() {
                    Some((s.id, Doom::Gone))
                } else if expired(s.deadline) {
                    Some((s.id, Doom::Deadline))
                } else {
                    None
                }
            })
            .collect();
        for (id, doom) in ids {
            self.doom(id, doom);
        }
    }

    /// Ends a running sequence now, or when its step in flight completes.
    fn doom(&mut self, id: u64, doom: Doom) {
        let Some(s) = self.running.iter_mut().find(|s| s.id == id) else {
            return;
        };
        if s.in_flight.is_some() {
            s.doomed = Some(doom);
            return;
        }
        if let Some(s) = self.remove(id) {
            match doom {
                Doom::Gone => tracing::debug!(seq = id, "client left; cancelling"),
                Doom::Deadline => s.output.fail(deadline_status()),
            }
        }
    }

    /// The earliest deadline of a request that is not in a step in flight.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .chain(self.running.iter().filter(|s| s.doomed.is_none()))
            .filter_map(|s| s.deadline)
            .min()
    }

    /// Removes a running sequence (not in flight): its blocks go back, the workers forget it.
    fn remove(&mut self, id: u64) -> Option<Seq<O>> {
        let at = self.running.iter().position(|s| s.id == id)?;
        let s = self.running.remove(at);
        self.blocks.release(&s.table);
        self.releases.push(id);
        Some(s)
    }

    /// Takes a running sequence's blocks back and queues it again at the front, to be
    /// recomputed from the tokens it has.
    fn preempt(&mut self, id: u64) {
        let Some(at) = self.running.iter().position(|s| s.id == id) else {
            return;
        };
        let mut s = self.running.remove(at);
        self.blocks.release(&s.table);
        s.table.clear();
        s.computed = 0;
        s.fresh = true;
        s.prefix_checked = false;
        self.releases.push(id);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(seq = id, tokens = s.len(), "preempted: KV cache full");
        self.waiting.push_front(s);
    }

    /// Makes `n` more blocks available for sequence `keep` by preempting the newest
    /// sequences not in flight, `keep` itself if it is the newest. Whether it succeeded.
    fn make_room(&mut self, n: usize, keep: u64) -> bool {
        while self.blocks.available() < n {
            let victim = self
                .running
                .iter()
                .filter(|s| s.in_flight.is_none() && s.doomed.is_none())
                .map(|s| s.id)
                .max();
            match victim {
                Some(v) => {
                    self.preempt(v);
                    if v == keep {
                        return false;
                    }
                }
                None => return false,
            }
        }
        true
    }

    /// Admits waiting requests while there is room: a running slot, and KV blocks for their
    /// whole prompt (beyond what the prefix cache already holds).
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(front) = self.waiting.front_mut() else {
                break;
            };
            // Prefix caching: share the cached full blocks of its tokens (all but the last
            // token, which must be computed for its logits).
            let mut looked_up = 0;
            if !front.prefix_checked && self.cfg.prefix_caching {
                front.prefix_checked = true;
                let tokens = front.tokens(0..front.len());
                looked_up = (front.len() - 1) / self.blocks.block_size();
                let shared = self.blocks.match_prefix(&tokens, looked_up);
                front.computed = shared.len() * self.blocks.block_size();
                front.table = shared;
            }
            let need = self.blocks.blocks_for(front.len()) - front.table.len();
            if need > self.blocks.available() {
                // It waits holding nothing: shared blocks held by waiting requests could
                // starve everyone. The next attempt looks again.
                let table = std::mem::take(&mut front.table);
                front.computed = 0;
                front.prefix_checked = false;
                self.blocks.release(&table);
                break;
            }
            let Some(s) = self.waiting.pop_front() else {
                break;
            };
            let hits = s.table.len() as u64;
            self.stats
                .prefix_queries
                .fetch_add(looked_up as u64, Ordering::Relaxed);
            self.stats
                .prefix_hits
                .fetch_add(if looked_up > 0 { hits } else { 0 }, Ordering::Relaxed);
            self.stats
                .cached_tokens
                .fetch_add(s.computed as u64, Ordering::Relaxed);
            self.running.push(s);
        }
    }

    /// Admits what fits and builds the next step from the sequences not in flight; `None`
    /// when there is nothing to send. For a pipeline that holds one step at a time.
    pub fn next_step(&mut self) -> Option<StepFrame> {
        self.next_step_of(1)
    }

    /// [`SchedulerState::next_step`] for a pipeline that holds `depth` steps at once (one per
    /// stage): a step takes at most its share of the running sequences, `⌈running / depth⌉`,
    /// so that the next steps find sequences too and every stage computes at once. Without
    /// the cap the first step would take every sequence, and in a steady decode the stages
    /// would take turns.
    ///
    /// With several steps in flight it also takes no more than its share of the prompt tokens
    /// waiting: once it holds `⌈waiting / steps still to send⌉` of them (the steps the pipeline
    /// can take before this one comes back), or [`PIPELINED_STEP_TOKENS`], it takes no further
    /// prompt. A burst of prompts then goes into steps of equal weight, 128 tokens each, instead
    /// of whole into the first step, with a few decode tokens in the second: a stage would
    /// compute the prompts while the other waited for them, and the decode step would wait
    /// behind them at the first stage. Decode tokens come first, bound by the share of sequences
    /// alone, and a step that has room under that share takes at least one prompt: a bound on
    /// all its tokens left the newest sequences behind the oldest, step after step. A prompt's
    /// chunk is not cut to the share (its remainder would wait for the step to come back), so a
    /// long prompt still goes in chunks of the whole budget.
    pub fn next_step_of(&mut self, depth: usize) -> Option<StepFrame> {
        self.admit();
        let share = self.running.len().div_ceil(depth.max(1)).max(1);
        let step_id = self.next_step;
        let mut budget = self.cfg.max_batch_tokens;
        let now = Instant::now();
        let ready = |s: &Seq<O>| s.in_flight.is_none() && s.doomed.is_none();
        let prompt_share = if depth > 1 {
            let waiting: usize = self
                .running
                .iter()
                .filter(|s| ready(s) && !s.decoding())
                .map(|s| s.len().saturating_sub(s.computed))
                .sum();
            let to_send = depth.saturating_sub(self.in_flight.len()).max(1);
            waiting.div_ceil(to_send).min(PIPELINED_STEP_TOKENS)
        } else {
            usize::MAX
        };
        let mut prompts_taken = 0;
        // Decode tokens first (oldest first): running sequences never starve behind long
        // prompts. Then prompt chunks.
        let mut order: Vec<(bool, u64)> = self
            .running
            .iter()
            .filter(|s| ready(s))
            .map(|s| (!s.decoding(), s.id))
            .collect();
        order.sort_unstable();
        let mut seqs = Vec::new();
        for (prompt, id) in order {
            if budget == 0 || seqs.len() == share || (prompt && prompts_taken >= prompt_share) {
                break;
            }
            let Some(s) = self.running.iter().find(|s| s.id == id) else {
                // Preempted to make room for an earlier one.
                continue;
            };
            let n = (s.len() - s.computed).min(budget);
            let need = self
                .blocks
                .blocks_for(s.computed + n)
                .saturating_sub(s.table.len());
            if need > 0 && !self.make_room(need, id) {
                continue;
            }
            let Some(s) = self.running.iter_mut().find(|s| s.id == id) else {
                continue;
            };
            if need > 0 {
                match self.blocks.allocate_n(need) {
                    Some(more) => s.table.extend(more),
                    None => continue,
                }
            }
            budget -= n;
            if prompt {
                prompts_taken += n;
            }
            s.scheduled.get_or_insert(now);
            let pos0 = s.computed;
            seqs.push(SeqStep {
                seq_id: s.id,
                pos0: pos0 as u32,
                prompt_len: s.req.input_ids.len() as u32,
                tokens: s.tokens(pos0..pos0 + n),
                sample: pos0 + n == s.len(),
                params: s.req.params,
                blocks: s.table.clone(),
                fresh: s.fresh,
                history: if s.fresh {
                    s.tokens(0..pos0)
                } else {
                    Vec::new()
                },
            });
            s.fresh = false;
            s.computed += n;
            s.in_flight = Some(step_id);
            self.stats
                .computed_tokens
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        if seqs.is_empty() && self.releases.is_empty() {
            return None;
        }
        self.next_step += 1;
        let releases = std::mem::take(&mut self.releases);
        self.in_flight.insert(
            step_id,
            (seqs.iter().map(|s| s.seq_id).collect(), releases.clone()),
        );
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .max_step_seqs
            .fetch_max(seqs.len(), Ordering::Relaxed);
        self.stats
            .max_in_flight
            .fetch_max(self.in_flight.len(), Ordering::Relaxed);
        Some(StepFrame {
            times: Default::default(),
            step_id,
            stage: 0,
            releases,
            seqs,
            hidden: None,
            trace: String::new(),
            concurrent: self.in_flight.len() as u32,
        })
    }

    /// Opens the span of `step` (just built by [`SchedulerState::next_step`]) and puts its
    /// W3C context in the frame, so that every stage's spans descend from it. The span is a
    /// child of its first sequence's request span; every sequence's output is told it was
    /// scheduled, and links its own step span to this one. The span lasts until it is dropped.
    pub fn trace_step(&mut self, step: &mut StepFrame) -> tracing::Span {
        let tokens: usize = step.seqs.iter().map(|s| s.tokens.len()).sum();
        let ids: Vec<u64> = step.seqs.iter().map(|s| s.seq_id).collect();
        let parent = self
            .running
            .iter()
            .find(|s| ids.first() == Some(&s.id))
            .and_then(|s| s.output.span())
            .cloned();
        let span = match &parent {
            Some(p) => {
                tracing::info_span!(parent: p, "batch_step", step_id = step.step_id, seqs = ids.len(), tokens)
            }
            None => {
                tracing::info_span!(parent: None, "batch_step", step_id = step.step_id, seqs = ids.len(), tokens)
            }
        };
        for s in self.running.iter_mut().filter(|s| ids.contains(&s.id)) {
            s.output.scheduled(step.step_id, &span);
        }
        step.trace = strata_shared::telemetry::traceparent_of(&span);
        span
    }

    /// Applies a completed step's samples: hands tokens to the outputs, finishes sequences,
    /// shares the blocks they have filled.
    pub fn on_samples(&mut self, samples: SamplesFrame) {
        let (ids, _) = self.complete(samples.step_id);
        // The blocks this step filled can serve later prompts (before any of its sequences
        // ends and lets them go).
        if self.cfg.prefix_caching {
            for s in self.running.iter().filter(|s| ids.contains(&s.id)) {
                let full = s.computed / self.blocks.block_size() * self.blocks.block_size();
                self.blocks
                    .register_full(&s.table, &s.tokens(0..full.min(s.len())));
            }
        }
        let now = Instant::now();
        for sample in samples.samples {
            if !ids.contains(&sample.seq_id) {
                tracing::warn!(
                    seq = sample.seq_id,
                    step = samples.step_id,
                    "sample for a sequence not in its step"
                );
                continue;
            }
            let Some(s) = self.running.iter_mut().find(|s| s.id == sample.seq_id) else {
                continue;
            };
            s.first_token.get_or_insert(now);
            s.generated.push(sample.token);
            let index = s.generated.len() as u32 - 1;
            let is_eos = !s.req.ignore_eos && self.eos_ids.contains(&sample.token);
            let mut finish: Option<(FinishReason, String)> = None;
            if is_eos {
                finish = Some((FinishReason::Eos, String::new()));
            } else {
                match s.output.token(&sample, index) {
                    TokenVerdict::Continue => {}
                    TokenVerdict::Stop { stop_sequence } => {
                        finish = Some((FinishReason::Stop, stop_sequence));
                    }
                    TokenVerdict::Gone => {
                        let id = s.id;
                        self.remove(id);
                        continue;
                    }
                }
            }
            if finish.is_none() && s.generated.len() >= s.req.max_new_tokens as usize {
                finish = Some((FinishReason::Length, String::new()));
            }
            if let Some((reason, stop)) = finish {
                let id = s.id;
                if let Some(s) = self.remove(id) {
                    let end = s.end(reason, stop, now);
                    s.output.finish(end);
                }
            }
        }
    }

    /// Marks a step complete: its sequences leave flight (and those doomed meanwhile end).
    /// Returns the ids it carried and the releases it sent.
    fn complete(&mut self, step_id: u64) -> (Vec<u64>, Vec<u64>) {
        let (ids, releases) = self.in_flight.remove(&step_id).unwrap_or_default();
        let mut doomed = Vec::new();
        for s in self.running.iter_mut().filter(|s| ids.contains(&s.id)) {
            s.in_flight = None;
            if let Some(d) = s.doomed.take() {
                doomed.push((s.id, d));
            }
        }
        for (id, d) in doomed {
            self.doom(id, d);
        }
        (ids, releases)
    }

    /// A step failed: its sequences end with the error (the others go on). Its releases are
    /// sent again (a failed step may not have reached every stage; releasing twice is
    /// harmless).
    pub fn on_step_failed(&mut self, step_id: u64, err: &GatewayError) {
        let (ids, releases) = self.complete(step_id);
        self.releases.extend(releases);
        for id in ids {
            if let Some(s) = self.remove(id) {
                s.output
                    .fail(Status::from(GatewayError::Unavailable(err.to_string())));
            }
        }
    }

    /// The ring broke, and every worker's KV cache with it: each running sequence waits again
    /// (in front of the queue, oldest first) with the tokens it has, to be recomputed once the
    /// ring is back; its output does not change. Steps in flight are forgotten, every block is
    /// free, the prefix cache is empty, and no release is owed (the rebuilt workers hold
    /// nothing). Sequences whose client left or whose deadline passed meanwhile end now.
    /// Returns how many sequences wait to be recomputed.
    pub fn requeue_all(&mut self) -> usize {
        self.in_flight.clear();
        for s in &mut self.running {
            s.in_flight = None;
        }
        let doomed: Vec<(u64, Doom)> = self
            .running
            .iter_mut()
            .filter_map(|s| s.doomed.take().map(|d| (s.id, d)))
            .collect();
        for (id, d) in doomed {
            self.doom(id, d);
        }
        let mut running = std::mem::take(&mut self.running);
        running.sort_unstable_by_key(|s| s.id);
        let n = running.len();
        for mut s in running.into_iter().rev() {
            s.table.clear();
            s.computed = 0;
            s.fresh = true;
            s.prefix_checked = false;
            self.waiting.push_front(s);
        }
        for s in &mut self.waiting {
            s.table.clear();
            s.computed = 0;
            s.prefix_checked = false;
        }
        self.blocks = BlockManager::new(self.cfg.kv_blocks, self.cfg.block_size);
        self.releases.clear();
        self.stats.requeued.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Ends every request with an error (the ring is lost): those running, in flight or not,
    /// and those waiting.
    pub fn fail_all(&mut self, err: &GatewayError) {
        for (_, (_, releases)) in self.in_flight.drain() {
            self.releases.extend(releases);
        }
        for s in &mut self.running {
            s.in_flight = None;
            s.doomed = None;
        }
        let status = || Status::from(GatewayError::Unavailable(err.to_string()));
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        for id in ids {
            if let Some(s) = self.remove(id) {
                s.output.fail(status());
            }
        }
        for s in self.waiting.drain(..) {
            self.blocks.release(&s.table);
            s.output.fail(status());
        }
    }

    /// Ends everything (shutdown): running sequences finish as cancelled, waiting ones get an
    /// error. Steps in flight are abandoned.
    pub fn cancel_all(&mut self) {
        let now = Instant::now();
        self.in_flight.clear();
        for s in &mut self.running {
            s.in_flight = None;
        }
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        for id in ids {
            if let Some(s) = self.remove(id) {
                let end = s.end(FinishReason::Cancelled, String::new(), now);
                s.output.finish(end);
            }
        }
        for s in self.waiting.drain(..) {
            self.blocks.release(&s.table);
            s.output
                .fail(GatewayError::Cancelled("the server is shutting down".into()).into());
        }
    }

    /// Checks the block accounting against the sequences' tables (tests).
    pub fn check_blocks(&self) -> Result<(), String> {
        let tables: Vec<&[u32]> = self
            .running
            .iter()
            .chain(&self.waiting)
            .map(|s| s.table.as_slice())
            .collect();
        self.blocks.check(&tables)
    }
}

fn deadline_status() -> Status {
    GatewayError::DeadlineExceeded("the request's deadline passed before it finished".into()).into()
}
