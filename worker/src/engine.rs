//! Every stage of a plan in one process: the single-process engine behind `strata generate`,
//! `strata perplexity` and the benchmarks, and the reference the distributed pipeline must
//! match token for token. Stages pass tensors directly instead of frames.

use candle_core::Tensor;
use strata_shared::meta::ModelMeta;
use strata_shared::plan::Plan;
use strata_shared::wire::{Frame, SamplesFrame, SeqStep, StepFrame};

use crate::error::{CandleContext, Result, WorkerError};
use crate::model::{ModelSlice, Progress, SliceSpec};
use crate::stage::Stage;

/// All stages of a route, run in order in this process.
#[derive(Debug)]
pub struct Engine {
    stages: Vec<Stage>,
}

impl Engine {
    /// Loads every stage of `plan`, each with a KV cache of `kv_blocks` blocks.
    pub fn load(
        meta: &ModelMeta,
        plan: &Plan,
        kv_blocks: usize,
        progress: Progress<'_>,
    ) -> Result<Self> {
        let mut stages = Vec::with_capacity(plan.route.len());
        for s in &plan.route {
            let spec = SliceSpec::from_plan(plan, s.index)?;
            let slice = ModelSlice::load(meta, &spec, &mut *progress)?;
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
        Ok(Engine { stages })
    }

    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// Bytes of weights held by all stages.
    pub fn weight_bytes(&self) -> usize {
        self.stages.iter().map(|s| s.slice().weight_bytes()).sum()
    }

    /// Runs a step through every stage and returns the samples.
    pub fn step(&mut self, step: StepFrame) -> Result<SamplesFrame> {
        let x = self.hidden(&step)?;
        let last = self.last_mut()?;
        match last.finish(step, x)? {
            Frame::Samples(s) => Ok(s),
            _ => Err(WorkerError::Step(
                "the last stage did not produce samples".into(),
            )),
        }
    }

    /// Final hidden states of a step (before the final norm), `None` for an empty step.
    fn hidden(&mut self, step: &StepFrame) -> Result<Option<Tensor>> {
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

    /// Frees a sequence on every stage.
    pub fn release(&mut self, seq_id: u64) {
        for s in &mut self.stages {
            s.release(seq_id);
        }
    }

    /// Runs `tokens` as a new sequence `seq_id` (released afterwards) and returns the logits
    /// of the rows in `rows`, computed `chunk` rows at a time and handed to `each` as
    /// (row index, logits).
    pub fn logits_for(
        &mut self,
        seq_id: u64,
        tokens: &[u32],
        rows: &[u32],
        chunk: usize,
        mut each: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let step = StepFrame {
            step_id: 0,
            stage: 0,
            releases: Vec::new(),
            seqs: vec![SeqStep {
                seq_id,
                pos0: 0,
                prompt_len: tokens.len() as u32,
                tokens: tokens.to_vec(),
                sample: false,
                params: Default::default(),
            }],
            hidden: None,
        };
        let result = (|| {
            let x = self
                .hidden(&step)?
                .ok_or_else(|| WorkerError::Step("empty sequence".into()))?;
            let last = self.last_mut()?;
            for part in rows.chunks(chunk.max(1)) {
                let sel = ModelSlice::select_rows(&x, part)?;
                let logits = last.slice().logits(&sel)?;
                let logits = logits.to_vec2::<f32>().ctx(|| "reading logits".into())?;
                for (r, l) in part.iter().zip(&logits) {
                    each(*r as usize, l)?;
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
        self.logits_for(u64::MAX, tokens, &[last], 1, |_, l| {
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
        self.logits_for(u64::MAX, tokens, &rows, 64, |r, l| {
            let lp = crate::sampling::log_softmax(l);
            let target = tokens[r + 1] as usize;
            nll[r] = -f64::from(*lp.get(target).ok_or_else(|| {
                WorkerError::Step(format!("token id {target} is outside the vocabulary"))
            })?);
            Ok(())
        })?;
        Ok(nll)
    }
}
