//! The scheduler's state, free of I/O and of the tokenizer: requests wait in a queue, are
//! admitted when the KV cache has room for their whole budget (prompt + max tokens, in blocks),
//! and every step batches one token of each running sequence with prompt chunks of newly
//! admitted ones, up to a token budget. Samples go to each sequence's [`SeqOutput`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use strata_proto::v1::{FinishReason, Timings};
use strata_shared::wire::{SamplesFrame, SeqStep, StepFrame};
use tonic::Status;

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
}

/// Live counters of the scheduler, readable from other tasks.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub reserved_blocks: AtomicUsize,
}

/// A request handed to the scheduler, with where its results go.
#[derive(Debug)]
pub struct NewRequest<O> {
    pub request: ValidRequest,
    pub output: O,
    pub arrived: Instant,
}

/// One sequence in flight.
#[derive(Debug)]
pub(super) struct Seq<O> {
    id: u64,
    req: ValidRequest,
    output: O,
    arrived: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    /// Prompt tokens already fed.
    prefilled: usize,
    generated: Vec<u32>,
    blocks: usize,
}

impl<O> Seq<O> {
    fn position(&self) -> usize {
        self.prefilled + self.generated.len().saturating_sub(1)
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

/// The scheduler's state: enqueue requests, ask for the next step, hand back its samples.
#[derive(Debug)]
pub struct SchedulerState<O> {
    pub(super) cfg: SchedulerConfig,
    eos_ids: Vec<u32>,
    pub(super) waiting: VecDeque<Seq<O>>,
    pub(super) running: Vec<Seq<O>>,
    pub(super) free_blocks: usize,
    releases: Vec<u64>,
    next_seq: u64,
    next_step: u64,
    stats: Arc<SchedulerStats>,
}

impl<O: SeqOutput> SchedulerState<O> {
    /// A state for a model whose end-of-sequence tokens are `eos_ids`.
    pub fn new(cfg: SchedulerConfig, eos_ids: Vec<u32>) -> Self {
        SchedulerState {
            stats: Arc::default(),
            cfg,
            eos_ids,
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
    pub fn enqueue(&mut self, new: NewRequest<O>) {
        let need = self.blocks_for(&new.request);
        if need > self.cfg.kv_blocks {
            let total = new.request.input_ids.len() + new.request.max_new_tokens as usize;
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
        let id = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back(Seq {
            id,
            req: new.request,
            output: new.output,
            arrived: new.arrived,
            scheduled: None,
            first_token: None,
            prefilled: 0,
            generated: Vec::new(),
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
        self.waiting.retain(|s| !s.output.is_closed());
        let gone: Vec<u64> = self
            .running
            .iter()
            .filter(|s| s.output.is_closed())
            .map(|s| s.id)
            .collect();
        for id in gone {
            tracing::debug!(seq = id, "client left; cancelling");
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Seq<O>> {
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

    /// Applies a step's samples: hands tokens to the outputs, finishes sequences.
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
                s.output
                    .fail(Status::from(GatewayError::Unavailable(err.to_string())));
            }
        }
    }

    /// Ends everything (shutdown): running sequences finish as cancelled, waiting ones get an
    /// error.
    pub fn cancel_all(&mut self) {
        let now = Instant::now();
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        for id in ids {
            if let Some(s) = self.remove(id) {
                let end = s.end(FinishReason::Cancelled, String::new(), now);
                s.output.finish(end);
            }
        }
        for s in self.waiting.drain(..) {
            s.output
                .fail(GatewayError::Cancelled("the server is shutting down".into()).into());
        }
    }
}
