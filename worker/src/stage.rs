//! One stage of the pipeline route: a model slice, the KV cache of its layers, and — on the
//! last stage — the per-sequence samplers. `run` turns an incoming step frame into the frame
//! to send on: the next stage's step, or the samples for the gateway.

use std::collections::HashMap;

use bytes::Bytes;
use rayon::prelude::*;
use strata_shared::wire::{ActDType, Activations, Frame, Sample, SamplesFrame, SeqStep, StepFrame};

use crate::error::{Result, WorkerError};
use crate::kv::KvCache;
use crate::layers::Hidden;
use crate::model::{Batch, HeadScratch, LayerScratch, ModelSlice};
use crate::sampling::SeqSampler;

/// Most tokens one step may carry through a stage (all sequences together).
pub const MAX_STEP_TOKENS: usize = 1 << 16;

/// A loaded stage.
#[derive(Debug)]
pub struct Stage {
    index: u32,
    slice: ModelSlice,
    kv: KvCache,
    samplers: HashMap<u64, SeqSampler>,
    /// The layers' and the head's buffers, kept from step to step (`scratch.rs`).
    scratch: LayerScratch,
    head: HeadScratch,
}

impl Stage {
    pub fn new(index: u32, slice: ModelSlice, kv_blocks: usize) -> Result<Self> {
        let kv = slice.new_kv_cache(kv_blocks)?;
        Ok(Stage {
            index,
            slice,
            kv,
            samplers: HashMap::new(),
            scratch: LayerScratch::default(),
            head: HeadScratch::default(),
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn slice(&self) -> &ModelSlice {
        &self.slice
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Forgets a sequence (its sampler; its KV blocks are its owner's business).
    pub fn release(&mut self, seq_id: u64) {
        self.samplers.remove(&seq_id);
    }

    /// Frees every sequence a step releases.
    pub fn release_all(&mut self, seq_ids: &[u64]) {
        for id in seq_ids {
            self.release(*id);
        }
    }

    /// Runs one step addressed to this stage.
    pub fn run(&mut self, step: StepFrame) -> Result<Frame> {
        if step.stage != self.index {
            return Err(WorkerError::Step(format!(
                "frame for stage {} reached stage {}",
                step.stage, self.index
            )));
        }
        self.release_all(&step.releases);
        let hidden = self.forward(&step)?;
        self.finish(step, hidden)
    }

    /// Turns this stage's output into the frame to send on.
    pub fn finish(&mut self, step: StepFrame, hidden: Option<Hidden>) -> Result<Frame> {
        if !self.slice.has_head() {
            let activations = match hidden {
                Some(x) => Some(to_activations(&x)?),
                None => None,
            };
            return Ok(Frame::Step(StepFrame {
                times: step.times,
                step_id: step.step_id,
                stage: self.index + 1,
                releases: step.releases,
                seqs: step.seqs,
                hidden: activations,
                trace: step.trace,
                concurrent: step.concurrent,
            }));
        }
        let samples = match hidden {
            Some(x) => self.sample(&step, &x)?,
            None => Vec::new(),
        };
        Ok(Frame::Samples(SamplesFrame {
            times: step.times,
            step_id: step.step_id,
            samples,
        }))
    }

    /// Runs the slice's layers over the step (reading its activations); `None` for an empty step.
    pub fn forward(&mut self, step: &StepFrame) -> Result<Option<Hidden>> {
        let input = match (&step.hidden, self.slice.has_embedding()) {
            (Some(_), true) => {
                return Err(WorkerError::Step(
                    "the first stage received activations instead of token ids".into(),
                ));
            }
            (Some(a), false) => {
                let rows = step.seqs.iter().map(|s| s.tokens.len()).sum();
                Some(from_activations(a, rows, self.slice.config().hidden_size)?)
            }
            (None, _) => None,
        };
        self.forward_tensor(step, input)
    }

    /// Runs the slice's layers over the step, with the previous stage's output given as a
    /// tensor (in-process pipelines skip serialization); `None` for an empty step.
    pub fn forward_tensor(
        &mut self,
        step: &StepFrame,
        input: Option<Hidden>,
    ) -> Result<Option<Hidden>> {
        if step.seqs.is_empty() {
            return Ok(None);
        }
        self.check(step)?;
        for s in &step.seqs {
            self.kv
                .check_table(s.seq_id, &s.blocks, s.pos0 as usize + s.tokens.len())?;
        }
        let batch = Batch::new(step.seqs.iter().map(|s| {
            (
                s.seq_id,
                s.pos0 as usize,
                s.tokens.len(),
                s.prompt_len as usize,
                s.blocks.clone(),
            )
        }));
        let x = match input {
            None if self.slice.has_embedding() => {
                let tokens: Vec<u32> = step
                    .seqs
                    .iter()
                    .flat_map(|s| s.tokens.iter().copied())
                    .collect();
                self.slice.embed(&tokens)?
            }
            None => {
                return Err(WorkerError::Step(format!(
                    "stage {} received no activations",
                    self.index
                )));
            }
            Some(x) => x,
        };
        let x = self
            .slice
            .forward_layers(x, &batch, &mut self.kv, &mut self.scratch);
        self.scratch.after_step(batch.rows(), step.seqs.len());
        Ok(Some(x?))
    }

    /// Checks a step against this stage before any work: token counts, positions within the
    /// context, each sequence at most once.
    fn check(&self, step: &StepFrame) -> Result<()> {
        let context = self.slice.config().max_position_embeddings;
        let mut total = 0usize;
        let mut seen = std::collections::HashSet::with_capacity(step.seqs.len());
        for s in &step.seqs {
            let fail = |problem: String| WorkerError::Sequence {
                seq_id: s.seq_id,
                problem,
            };
            if s.tokens.is_empty() {
                return Err(fail("step carries no tokens".into()));
            }
            if !seen.insert(s.seq_id) {
                return Err(fail("appears twice in one step".into()));
            }
            let end = s.pos0 as usize + s.tokens.len();
            if end > context {
                return Err(fail(format!(
                    "positions {}..{end} run past the model's context length {context}",
                    s.pos0
                )));
            }
            total += s.tokens.len();
        }
        if total > MAX_STEP_TOKENS {
            return Err(WorkerError::Step(format!(
                "{total} tokens in one step; a step carries at most {MAX_STEP_TOKENS}"
            )));
        }
        Ok(())
    }

    pub(crate) fn sample(&mut self, step: &StepFrame, x: &Hidden) -> Result<Vec<Sample>> {
        let mut rows = Vec::new();
        let mut row = 0u32;
        for s in &step.seqs {
            if s.fresh {
                self.samplers.remove(&s.seq_id);
            }
            let sampler = match self.samplers.entry(s.seq_id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    if !s.fresh && s.pos0 != 0 {
                        return Err(WorkerError::Sequence {
                            seq_id: s.seq_id,
                            problem: format!(
                                "unknown to the last stage, but its step starts at position {} and is not its first",
                                s.pos0
                            ),
                        });
                    }
                    if s.history.len() != s.pos0 as usize {
                        return Err(WorkerError::Sequence {
                            seq_id: s.seq_id,
                            problem: format!(
                                "its first step starts at position {} with {} tokens of history",
                                s.pos0,
                                s.history.len()
                            ),
                        });
                    }
                    let mut sampler = SeqSampler::new(s.params.seed, s.prompt_len as usize);
                    sampler.feed(&s.history);
                    e.insert(sampler)
                }
            };
            sampler.feed(&s.tokens);
            row += s.tokens.len() as u32;
            if s.sample {
                rows.push(row - 1);
            }
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let last = x.select_rows(&rows)?;
        self.slice.logits_into(&last, &mut self.head)?;
        let logits = &self.head;
        let sampled: Vec<_> = step.seqs.iter().filter(|s| s.sample).collect();
        if logits.rows() != sampled.len()
            || sampled
                .iter()
                .any(|s| !self.samplers.contains_key(&s.seq_id))
        {
            return Err(WorkerError::Step(
                "logits rows do not match the sequences".into(),
            ));
        }
        // Each sequence draws from its own sampler (its own seed's stream), so the rows go in
        // parallel: a batch's softmaxes over the vocabulary are most of what follows the head.
        // `run` refused a sequence that appears twice, so every one has its sampler here.
        let mut jobs: Vec<_> = sampled
            .into_iter()
            .filter_map(|s| Some((s, self.samplers.remove(&s.seq_id)?)))
            .collect();
        let draw = |(r, (s, sampler)): (usize, &mut (&SeqStep, SeqSampler))| {
            sampler.sample(s.seq_id, logits.row(r), &s.params)
        };
        let out = if jobs.len() > 1 {
            strata_kernels::pool::install(|| jobs.par_iter_mut().enumerate().map(draw).collect())
        } else {
            jobs.iter_mut().enumerate().map(draw).collect()
        };
        for (s, sampler) in jobs {
            self.samplers.insert(s.seq_id, sampler);
        }
        self.head.after_step();
        Ok(out)
    }
}

/// Serializes f32 hidden states `[rows, cols]` for the wire.
pub fn to_activations(x: &Hidden) -> Result<Activations> {
    let mut data = Vec::with_capacity(x.data.len() * 4);
    for f in &x.data {
        data.extend_from_slice(&f.to_le_bytes());
    }
    Ok(Activations::in_frame(
        ActDType::F32,
        x.rows as u32,
        x.cols as u32,
        Bytes::from(data),
    ))
}

/// Deserializes activations, checking their shape against the step.
pub fn from_activations(a: &Activations, rows: usize, cols: usize) -> Result<Hidden> {
    if a.rows as usize != rows || a.cols as usize != cols {
        return Err(WorkerError::Step(format!(
            "activations are {}x{}, the step needs {rows}x{cols}",
            a.rows, a.cols
        )));
    }
    if a.data.len() as u64 != a.expected_len() {
        return Err(WorkerError::Step(format!(
            "activations {}x{} of {:?} (carried by {:?}) need {} bytes, {} arrived",
            a.rows,
            a.cols,
            a.dtype,
            a.carrier,
            a.expected_len(),
            a.data.len()
        )));
    }
    let data: Vec<f32> = match a.dtype {
        ActDType::F32 => a
            .data
            .as_chunks::<4>()
            .0
            .iter()
            .map(|b| f32::from_le_bytes(*b))
            .collect(),
        ActDType::F16 => a
            .data
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| half::f16::from_le_bytes(*b).to_f32())
            .collect(),
        ActDType::BF16 => a
            .data
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| half::bf16::from_le_bytes(*b).to_f32())
            .collect(),
    };
    Hidden::new(rows, cols, data)
}
