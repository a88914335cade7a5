//! The buffers a stage keeps from one step to the next: the layers' activations and the
//! head's logits.
//!
//! A decode step of a batch needs the same buffers every time, so they stay allocated and a
//! step writes into them without asking the allocator for anything (a batch of 16 sequences
//! needs 3 MiB of logits alone); logits far larger than the steps now need, left by a burst of
//! sequences, go back ([`HeadScratch::after_step`]). A step that prefills needs up to [`LAYER_CHUNK_ROWS`] rows of
//! every layer buffer, 2.3 MiB on the default model: those go back once it is done
//! ([`LayerScratch::after_step`]), so that what a prompt needed once is not kept resident for
//! the decode that follows.
//!
//! [`LAYER_CHUNK_ROWS`]: crate::batch::LAYER_CHUNK_ROWS

use crate::layers::{Hidden, Scratch};

/// Buffers one forward pass reuses from layer to layer, from one run of rows to the next and,
/// while the steps decode, from one step to the next.
#[derive(Debug, Default)]
pub struct LayerScratch {
    pub(crate) products: Scratch,
    pub(crate) normed: Vec<f32>,
    /// q, k and v.
    pub(crate) proj: [Vec<f32>; 3],
    /// gate and up: buffers of their own, so that no layer resizes q's and k's to theirs and
    /// back (growing a buffer zeroes what it adds: 37 MB a layer at 4,000 tokens).
    pub(crate) gate_up: [Vec<f32>; 2],
    /// The attention's output, then SwiGLU's.
    pub(crate) attn: Vec<f32>,
    pub(crate) out: Vec<f32>,
}

impl LayerScratch {
    /// Called once a step of `rows` rows over `seqs` sequences is done: a step that prefilled
    /// (more rows than sequences) gives its buffers back, to the system too (they lie among
    /// the allocator's other blocks, where only `malloc_trim` returns them); a decode step
    /// keeps them for the next.
    pub fn after_step(&mut self, rows: usize, seqs: usize) {
        if rows > seqs {
            *self = LayerScratch::default();
            strata_shared::memory::release_free_heap();
        }
    }
}

/// The output head's buffers: its input normalized and quantized, and the logits, `[rows,
/// vocab]`, of the step's last call ([`crate::model::ModelSlice::logits_into`]).
#[derive(Debug, Default)]
pub struct HeadScratch {
    pub(crate) normed: Vec<f32>,
    pub(crate) products: Scratch,
    pub(crate) logits: Vec<f32>,
    pub(crate) rows: usize,
    pub(crate) vocab: usize,
}

/// Rows of logits a stage keeps between steps, whatever the batch: a burst of sequences gives
/// back what it needed beyond this once the steps need a quarter of it or less.
pub const KEEP_LOGITS_ROWS: usize = 16;

impl HeadScratch {
    /// Called once a step's logits are sampled: keeps them for the next step unless they hold
    /// more than [`KEEP_LOGITS_ROWS`] rows and four times what this step needed (a batch of 64
    /// sequences holds 12 MiB on the default model).
    pub fn after_step(&mut self) {
        let keep = KEEP_LOGITS_ROWS.max(4 * self.rows) * self.vocab;
        if self.logits.capacity() > keep {
            self.logits = Vec::new();
            self.rows = 0;
        }
    }

    /// Rows of logits the last call computed.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `r` of the logits (empty past the last).
    pub fn row(&self, r: usize) -> &[f32] {
        self.logits
            .get(r * self.vocab..(r + 1) * self.vocab)
            .unwrap_or_default()
    }

    /// The logits as hidden states of their own, leaving the buffer empty.
    pub fn take(&mut self) -> crate::Result<Hidden> {
        let rows = std::mem::take(&mut self.rows);
        Hidden::new(rows, self.vocab, std::mem::take(&mut self.logits))
    }
}

#[cfg(test)]
mod tests {
    use super::{HeadScratch, KEEP_LOGITS_ROWS, LayerScratch};

    #[test]
    fn a_prefill_gives_its_buffers_back_and_a_decode_keeps_them() {
        let mut s = LayerScratch::default();
        s.gate_up[0].resize(64 * 1536, 0.0);
        s.after_step(16, 16);
        assert_eq!(s.gate_up[0].len(), 64 * 1536, "decode: kept");
        s.after_step(100, 1);
        assert_eq!(s.gate_up[0].capacity(), 0, "prefill: given back");
    }

    #[test]
    fn the_head_keeps_its_logits_unless_a_burst_left_far_more() {
        let vocab = 10;
        let mut h = HeadScratch {
            logits: vec![0.0; 64 * vocab],
            rows: 64,
            vocab,
            ..HeadScratch::default()
        };
        h.after_step();
        assert_eq!(h.logits.capacity(), 64 * vocab, "the batch's own: kept");
        h.rows = 16;
        h.after_step();
        assert_eq!(h.logits.capacity(), 64 * vocab, "a quarter of them: kept");
        h.rows = 15;
        h.after_step();
        assert_eq!(h.logits.capacity(), 0, "less: given back");
        h.logits = vec![0.0; KEEP_LOGITS_ROWS * vocab];
        h.rows = 1;
        h.after_step();
        assert_eq!(
            h.logits.capacity(),
            KEEP_LOGITS_ROWS * vocab,
            "a small batch's: kept"
        );
    }

    #[test]
    fn rows_of_the_head_are_read_within_bounds() {
        let mut h = HeadScratch {
            logits: (0..6).map(|v| v as f32).collect(),
            rows: 2,
            vocab: 3,
            ..HeadScratch::default()
        };
        assert_eq!(h.row(1), &[3.0, 4.0, 5.0]);
        assert!(h.row(2).is_empty());
        let x = h.take().unwrap();
        assert_eq!((x.rows, x.cols, x.data.len()), (2, 3, 6));
        assert_eq!(h.rows(), 0);
    }
}
