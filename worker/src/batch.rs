//! The rows of a step: sequences stacked row-wise ([`Batch`]), each row's activation precision
//! ([`ActivationPolicy`]), and the runs of rows a layer takes at a time ([`LAYER_CHUNK_ROWS`]).

use std::borrow::Cow;

use strata_kernels::int8::Precision;

use crate::error::{Result, WorkerError};

/// One sequence's tokens within a batch: positions `pos0..pos0 + len`, rows `row..row + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub seq_id: u64,
    pub pos0: usize,
    pub len: usize,
    pub row: usize,
}

/// How finely rows are quantized for the int8 products (`STRATA_ACTIVATIONS`: `int8x2`, the
/// default, or `int8`).
///
/// Two 8-bit planes (the second only in the blocks whose scale is near the row's largest,
/// where the outlier channels are) are f32-class: perplexity within 0.2% of full two planes'
/// with every ISQ type, top-1 agreement 192 of 192 on the golden prompts. One plane is
/// llama.cpp's precision (perplexity within 0.4%, top-1 189 of 192) for less integer work. It
/// is not the default because near-ties flip: asked for the capital of France, SmolLM2-135M
/// answers "The capital of France is Paris." with two planes and "L'Étoile, …" with one (the
/// first token's logit moves by 0.3). The policy is per process (workers inherit it), and a
/// row's precision never depends on its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationPolicy {
    /// One 8-bit plane for every row (llama.cpp's precision).
    Int8,
    /// Two planes for every row.
    Int8x2,
}

impl ActivationPolicy {
    /// The process's policy, from `STRATA_ACTIVATIONS` (the default where it is unset or
    /// invalid: [`ActivationPolicy::from_env`] is what reports an invalid value).
    pub fn current() -> Self {
        static POLICY: std::sync::OnceLock<ActivationPolicy> = std::sync::OnceLock::new();
        *POLICY.get_or_init(|| Self::from_env().unwrap_or(ActivationPolicy::Int8x2))
    }

    /// The policy `STRATA_ACTIVATIONS` names (`int8x2` when unset).
    ///
    /// # Errors
    ///
    /// [`WorkerError::Config`] naming the variable and its value when it is neither `int8`
    /// nor `int8x2`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("STRATA_ACTIVATIONS") {
            Err(std::env::VarError::NotPresent) => Ok(ActivationPolicy::Int8x2),
            Ok(v) if v == "int8" => Ok(ActivationPolicy::Int8),
            Ok(v) if v == "int8x2" => Ok(ActivationPolicy::Int8x2),
            Ok(v) => Err(WorkerError::Config(format!(
                "STRATA_ACTIVATIONS is `{v}`; it must be `int8x2` (two 8-bit planes, the default) or `int8` (one)"
            ))),
            Err(e) => Err(WorkerError::Config(format!("STRATA_ACTIVATIONS: {e}"))),
        }
    }

    /// The precision of a row at `position` of a sequence whose prompt is `prompt_len` long.
    pub fn precision(self, _position: usize, _prompt_len: usize) -> Precision {
        match self {
            ActivationPolicy::Int8 => Precision::Int8,
            ActivationPolicy::Int8x2 => Precision::Int8x2,
        }
    }
}

/// The layout of a micro-batch: sequences stacked row-wise.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub spans: Vec<Span>,
    /// Per span, its sequence's KV block table.
    pub tables: Vec<Vec<u32>>,
    pub positions: Vec<u32>,
    /// Per row, the precision of its int8 activations.
    pub precision: Vec<Precision>,
}

impl Batch {
    /// Sequences as `(seq_id, pos0, len, prompt_len, block table)`.
    pub fn new(seqs: impl IntoIterator<Item = (u64, usize, usize, usize, Vec<u32>)>) -> Self {
        let policy = ActivationPolicy::current();
        let mut b = Batch::default();
        for (seq_id, pos0, len, prompt_len, table) in seqs {
            b.tables.push(table);
            b.spans.push(Span {
                seq_id,
                pos0,
                len,
                row: b.positions.len(),
            });
            b.positions.extend((pos0..pos0 + len).map(|p| p as u32));
            b.precision
                .extend((pos0..pos0 + len).map(|p| policy.precision(p, prompt_len)));
        }
        b
    }

    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    /// The batch as consecutive runs of at most `max_rows` rows (at least one): each the rows
    /// `first..first + n` of this batch as a batch of its own, whose spans are the parts of
    /// this batch's spans within those rows (a sequence's later part starting at a later
    /// position, its earlier part then in the KV cache). A batch that fits is borrowed whole.
    pub fn row_chunks(&self, max_rows: usize) -> Vec<(usize, Cow<'_, Batch>)> {
        let rows = self.rows();
        let max_rows = max_rows.max(1);
        if rows <= max_rows {
            return vec![(0, Cow::Borrowed(self))];
        }
        (0..rows)
            .step_by(max_rows)
            .map(|first| {
                let end = (first + max_rows).min(rows);
                let mut chunk = Batch {
                    positions: self.positions[first..end].to_vec(),
                    precision: self.precision[first..end].to_vec(),
                    ..Batch::default()
                };
                for (span, table) in self.spans.iter().zip(&self.tables) {
                    let (from, to) = (span.row.max(first), (span.row + span.len).min(end));
                    if from < to {
                        chunk.spans.push(Span {
                            seq_id: span.seq_id,
                            pos0: span.pos0 + (from - span.row),
                            len: to - from,
                            row: from - first,
                        });
                        chunk.tables.push(table.clone());
                    }
                }
                (first, Cow::Owned(chunk))
            })
            .collect()
    }
}

/// Rows a layer takes at a time. A long step runs each layer over runs of this many rows, one
/// after the other (a run's attention reading the keys and values its predecessors wrote), so
/// that the step's buffers hold this many rows rather than the whole prompt: some 30 KiB a
/// row on the default model (q, k, v, the attention's output, gate and up, their int8
/// quantization), 60 MiB for a 2,048-token step in one run. Each row's arithmetic is the same
/// whatever rows it runs with (the products' and the attention's batch invariance), so the bits
/// do not change; the layer's weights stay in cache from one run to the next, and a run's
/// activations in L2 (runs of 64 prefilled a 1,024-token prompt 1.07× faster than runs of 256
/// on Zen 4, 128 rows 1.00×; docs/benchmarks.md).
pub const LAYER_CHUNK_ROWS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_rows_hold_each_row_once_at_its_position() {
        // A prompt of 5, a decode token at position 9, a prompt's second part at 3..7.
        let b = Batch::new([
            (1, 0, 5, 5, vec![10]),
            (2, 9, 1, 4, vec![20, 21]),
            (3, 3, 4, 7, vec![30]),
        ]);
        for max in 0..=12 {
            let runs = b.row_chunks(max);
            let mut next = 0;
            for (first, run) in &runs {
                assert_eq!(*first, next, "max {max}");
                assert!(run.rows() > 0 && run.rows() <= max.max(1), "max {max}");
                let rows = *first..*first + run.rows();
                assert_eq!(run.positions, b.positions[rows.clone()], "max {max}");
                assert_eq!(run.precision, b.precision[rows], "max {max}");
                // The spans tile the run's rows in order, each at its own positions with its
                // sequence's whole block table.
                let mut row = 0;
                for (span, table) in run.spans.iter().zip(&run.tables) {
                    assert_eq!(span.row, row, "max {max}");
                    let whole = b.spans.iter().position(|s| s.seq_id == span.seq_id);
                    let whole = whole.map(|i| (b.spans[i], &b.tables[i]));
                    let Some((whole, whole_table)) = whole else {
                        panic!("max {max}: a span of no sequence: {span:?}");
                    };
                    assert_eq!(table, whole_table, "max {max}");
                    assert_eq!(
                        span.pos0 - whole.pos0,
                        first + span.row - whole.row,
                        "max {max}"
                    );
                    row += span.len;
                }
                assert_eq!(row, run.rows(), "max {max}");
                next += run.rows();
            }
            assert_eq!(next, b.rows(), "max {max}");
            assert_eq!(
                matches!(runs[0].1, Cow::Borrowed(_)),
                max >= b.rows(),
                "max {max}"
            );
        }
    }
}
