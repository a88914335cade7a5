//! Every stage of a plan in one process: the single-process engine behind `strata generate`,
//! `strata perplexity` and the benchmarks, and the reference the distributed pipeline must
//! match token for token. Stages pass tensors directly instead of frames.

use std::collections::HashMap;

use strata_shared::meta::ModelMeta;
use strata_shared::plan::Plan;
use strata_shared::wire::{Frame, KV_BLOCK_SIZE, SamplesFrame, SeqStep, StepFrame};

use crate::device::Placement;
use crate::error::{Result, WorkerError};
use crate::kv::BlockOwner;
use crate::layers::Hidden;
use crate::model::{ModelSlice, Progress, SliceSpec};
use crate::stage::Stage;

/// All stages of a route, run in order in this process.
#[derive(Debug)]
pub struct Engine {
    stages: Vec<Stage>,
    /// Blocks for steps that come without block tables (the engine driven directly).
    owner: BlockOwner,
}

impl Engine {
    /// Loads every stage of `plan`, each with a KV cache of `kv_blocks` blocks. `progress`
    /// counts tensors over all stages together.
    pub fn load(
        meta: &ModelMeta,
        plan: &Plan,
        kv_blocks: usize,
        progress: Progress<'_>,
    ) -> Result<Self> {
        let total = plan.tensors.len();
        let mut before = 0;
        let mut stages = Vec::with_capacity(plan.route.len());
        // Every device opens before any weight loads, once, whichever stages it runs.
        let placements = plan
            .devices
            .iter()
            .map(|&d| Ok((d, Placement::open_spec(d)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        for s in &plan.route {
            let spec = SliceSpec::from_plan(plan, s.index)?;
            let mut done_here = 0;
            let placement = placements.get(&s.device).ok_or_else(|| {
                WorkerError::Load(format!(
                    "stage {} runs on {}, which the plan does not list",
                    s.index, s.device
                ))
            })?;
            let slice = ModelSlice::load_on(meta, &spec, placement, &mut |name, done, _| {
                done_here = done;
                progress(name, before + done, total);
            })?;
            before += done_here;
            stages.push(Stage::new(s.index as u32, slice, kv_blocks)?);
        }
        Self::from_stages(stages)
    }

    /// An engine over already loaded stages (indices 0, 1, ... in order).
    pub fn from_stages(stages: Vec<Stage>) -> Result<Self> {
        let ok = !stages.is_empty()
            && stages
                .iter()
                .enumerate()
                .all(|(i, s)| s.index() as usize == i)
            && stages.first().is_some_and(|s| s.slice().has_embedding())
            && stages.last().is_some_and(|s| s.slice().has_head());
        if !ok {
            return Err(WorkerError::Load(
                "an engine needs stages 0..n in order, the first with the embedding and the last with the head".into(),
            ));
        }
        let blocks = stages.first().map_or(0, |s| s.kv().num_blocks());
        Ok(Engine {
            stages,
            owner: BlockOwner::new(blocks, KV_BLOCK_SIZE),
        })
    }

    /// Free blocks of the engine's own allocation (for steps without block tables).
    pub fn free_blocks(&self) -> usize {
        self.owner.free_blocks()
    }

    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// Bytes of weights held by all stages.
    pub fn weight_bytes(&self) -> usize {
        self.stages.iter().map(|s| s.slice().weight_bytes()).sum()
    }

    /// Runs a step through every stage and returns the samples. Sequences without a block
    /// table get blocks from the engine's own allocation.
    pub fn step(&mut self, mut step: StepFrame) -> Result<SamplesFrame> {
        self.fill_tables(&mut step)?;
        let x = self.hidden(&step)?;
        let last = self.last_mut()?;
        match last.finish(step, x)? {
            Frame::Samples(s) => Ok(s),
            _ => Err(WorkerError::Step(
                "the last stage did not produce samples".into(),
            )),
        }
    }

    /// Gives every sequence of `step` that has no block table one from the engine's own
    /// allocation (releases first).
    fn fill_tables(&mut self, step: &mut StepFrame) -> Result<()> {
        for &id in &step.releases {
            self.owner.release(id);
        }
        for s in step.seqs.iter_mut().filter(|s| s.blocks.is_empty()) {
            s.blocks = self
                .owner
                .reserve(s.seq_id, s.pos0 as usize, s.tokens.len())?
                .to_vec();
        }
        Ok(())
    }

    /// Final hidden states of a step (before the final norm), `None` for an empty step.
    fn hidden(&mut self, step: &StepFrame) -> Result<Option<Hidden>> {
        let mut x = None;
        for stage in &mut self.stages {
            stage.release_all(&step.releases);
            x = stage.forward_tensor(step, x)?;
        }
        Ok(x)
    }

    fn last_mut(&mut self) -> Result<&mut Stage> {
        self.stages
            .last_mut()
            .ok_or_else(|| WorkerError::Load("engine has no stages".into()))
    }

    /// Frees a sequence on every stage, and its blocks of the engine's own allocation.
    pub fn release(&mut self, seq_id: u64) {
        self.owner.release(seq_id);
        for s in &mut self.stages {
            s.release(seq_id);
        }
    }

    /// Runs `tokens` as a new sequence `seq_id` (released afterwards) whose first `prompt_len`
    /// tokens are its prompt (the rest count as generated: teacher forcing), and returns the
    /// logits of the rows in `rows`, computed `chunk` rows at a time and handed to `each` as
    /// (row index, logits).
    pub fn logits_for(
        &mut self,
        seq_id: u64,
        tokens: &[u32],
        prompt_len: usize,
        rows: &[u32],
        chunk: usize,
        mut each: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let mut step = StepFrame {
            times: Default::default(),
            step_id: 0,
            stage: 0,
            releases: Vec::new(),
            seqs: vec![SeqStep {
                seq_id,
                pos0: 0,
                prompt_len: prompt_len.min(tokens.len()) as u32,
                tokens: tokens.to_vec(),
                sample: false,
                params: Default::default(),
                blocks: Vec::new(),
                fresh: true,
                history: Vec::new(),
            }],
            hidden: None,
            trace: String::new(),
            concurrent: 1,
        };
        let result = (|| {
            self.fill_tables(&mut step)?;
            let x = self
                .hidden(&step)?
                .ok_or_else(|| WorkerError::Step("empty sequence".into()))?;
            let last = self.last_mut()?;
            for part in rows.chunks(chunk.max(1)) {
                let sel = x.select_rows(part)?;
                let logits = last.slice().logits(&sel)?;
                for (i, r) in part.iter().enumerate() {
                    each(*r as usize, logits.row(i))?;
                }
            }
            Ok(())
        })();
        self.release(seq_id);
        result
    }

    /// Logits at the last position of `tokens`.
    pub fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let last = tokens
            .len()
            .checked_sub(1)
            .ok_or_else(|| WorkerError::Step("empty prompt".into()))? as u32;
        let mut out = Vec::new();
        self.logits_for(u64::MAX, tokens, tokens.len(), &[last], 1, |_, l| {
            out = l.to_vec();
            Ok(())
        })?;
        Ok(out)
    }

    /// Negative log-likelihood of each token after the first given its prefix, in nats.
    pub fn token_nll(&mut self, tokens: &[u32]) -> Result<Vec<f64>> {
        let n = tokens.len();
        if n < 2 {
            return Ok(Vec::new());
        }
        let rows: Vec<u32> = (0..n as u32 - 1).collect();
        let mut nll = vec![0f64; n - 1];
        self.logits_for(u64::MAX, tokens, tokens.len(), &rows, 64, |r, l| {
            let lp = crate::sampling::log_softmax(l);
            let target = tokens[r + 1] as usize;
            nll[r] = -f64::from(*lp.get(target).ok_or_else(|| {
                WorkerError::Step(format!("token id {target} is outside the vocabulary"))
            })?);
            Ok(())
        })?;
        Ok(nll)
    }

    /// Perplexity of `tokens` over sliding windows of `context` tokens, `stride` apart: each
    /// window scores only the tokens no earlier window scored, so every token but the first is
    /// scored exactly once, given up to `context - 1` tokens before it.
    pub fn perplexity(
        &mut self,
        tokens: &[u32],
        context: usize,
        stride: usize,
    ) -> Result<Perplexity> {
        let mut sum = 0f64;
        let mut scored = 0usize;
        let plan = windows(tokens.len(), context, stride);
        for w in &plan {
            let nll = self.token_nll(&tokens[w.begin..w.end])?;
            // nll[i] scores token begin + i + 1.
            for v in nll.iter().skip(w.first_scored - w.begin - 1) {
                sum += v;
                scored += 1;
            }
        }
        Ok(Perplexity {
            perplexity: (sum / scored.max(1) as f64).exp(),
            scored,
            windows: plan.len(),
        })
    }
}

/// A perplexity measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Tokens scored (all but the first).
    pub scored: usize,
    pub windows: usize,
}

/// One window of a sliding-window evaluation: tokens `[begin, end)` are fed, and tokens
/// `[first_scored, end)` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub first_scored: usize,
}

/// The windows over `n` tokens: `context` tokens each (at least 2), starting `stride` apart
/// (clamped to `1..=context - 1`, so that consecutive windows overlap and no token goes
/// unscored).
pub fn windows(n: usize, context: usize, stride: usize) -> Vec<Window> {
    let context = context.max(2);
    let stride = stride.clamp(1, context - 1);
    let mut out = Vec::new();
    let (mut begin, mut done_until) = (0, 1); // token 0 has no prefix
    while done_until < n {
        let end = (begin + context).min(n);
        out.push(Window {
            begin,
            end,
            first_scored: done_until,
        });
        done_until = end;
        begin += stride;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_score_every_token_but_the_first_exactly_once() {
        for n in [0, 1, 2, 3, 10, 100, 1191] {
            for context in [2, 3, 7, 64, 256, 2048] {
                for stride in [1, 2, 5, 32, 128, 256, 4096] {
                    let ws = windows(n, context, stride);
                    let mut scored = vec![0u32; n];
                    for w in &ws {
                        assert!(w.end - w.begin <= context.max(2), "{w:?}");
                        assert!(w.begin < w.first_scored && w.first_scored < w.end, "{w:?}");
                        for count in &mut scored[w.first_scored..w.end] {
                            *count += 1;
                        }
                    }
                    let want: Vec<u32> = (0..n).map(|t| u32::from(t > 0)).collect();
                    assert_eq!(scored, want, "n {n}, context {context}, stride {stride}");
                }
            }
        }
        // One window when the text fits; half-overlapping windows otherwise.
        assert_eq!(windows(1191, 2048, 1024).len(), 1);
        let ws = windows(1000, 256, 128);
        assert_eq!(ws.len(), 7);
        assert_eq!(
            (ws[1].begin, ws[1].end, ws[1].first_scored),
            (128, 384, 256)
        );
        // A stride as long as the context still leaves no token unscored.
        let ws = windows(10, 4, 4);
        assert_eq!(ws.iter().map(|w| w.begin).collect::<Vec<_>>(), [0, 3, 6]);
    }
}
