//! The vector primitives the attention kernel is written in ([`VectorOps`], one implementation
//! per SIMD level; [`Portable`] here), and the online-softmax weights of a run built on them
//! ([`weights`], and [`weights_each`] for several rows).

use std::ops::Range;

use super::tile::RunScores;
use super::{KvElement, RUN, Run};
use crate::math;

/// The online-softmax weights of a run for one head (`scores`, replaced by the weights): the
/// run's maximum; if it raises the running maximum, the rescaling of the denominator to it;
/// then `exp(score − maximum)`, and their sum ([`VectorOps::exp_sum`]: in a fixed order, the
/// same on every path) added to the denominator. Returns the factor by which what the head has
/// accumulated so far must be rescaled: `exp(old maximum − new maximum)` if the run raised the
/// maximum (0 on the first run, where all is still 0), else 1 (and the caller skips it).
#[inline(always)]
pub(super) fn weights<V: VectorOps>(
    ops: V,
    scores: &mut [f32],
    (max, denominator): (&mut f32, &mut f32),
) -> f32 {
    let run_max = ops.max(scores);
    let mut factor = 1.0;
    if run_max > *max {
        factor = math::exp(*max - run_max);
        *denominator *= factor;
        *max = run_max;
    }
    *denominator += ops.exp_sum(scores, *max);
    factor
}

/// [`weights`] for one head of a decode, with what the head has accumulated (`out`) rescaled
/// where the run raises the maximum, before the weights. The same bits as scaling `out` by
/// [`weights`]' factor afterwards, but written out again on purpose: that form, and one
/// sharing this body through a closure, compile to a slower decode (`RAYON_NUM_THREADS=1
/// REPS=40 cargo run --release -p strata-kernels --example attention_speed 16 256 30`, five
/// alternating pairs: 8.86 to 9.39 ms this way, 9.37 to 10.08 scaling afterwards; four pairs:
/// 8.22 to 8.49 against 9.03 to 9.55 through a closure).
#[inline(always)]
pub(super) fn weights_scaling<V: VectorOps>(
    ops: V,
    scores: &mut [f32],
    (max, denominator): (&mut f32, &mut f32),
    out: &mut [f32],
) {
    let run_max = ops.max(scores);
    if run_max > *max {
        let factor = math::exp(*max - run_max);
        *denominator *= factor;
        ops.scale(out, factor);
        *max = run_max;
    }
    *denominator += ops.exp_sum(scores, *max);
}

/// A tile's queries in the form a level's [`VectorOps::tile_scores`] reads
/// ([`VectorOps::prepare_queries`]), starting on a cache line, so that no 64-byte load of them
/// straddles two.
#[derive(Default)]
pub(super) struct Prepared {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Prepared {
    /// `len` zeros from a 64-byte boundary, to fill.
    pub(super) fn zeroed(&mut self, len: usize) -> &mut [f32] {
        self.buf.clear();
        self.buf.resize(len + 15, 0.0);
        // Correct from any start; only the loads' speed depends on the alignment.
        self.start = self.buf.as_ptr().align_offset(64).min(15);
        self.len = len;
        &mut self.buf[self.start..self.start + len]
    }

    pub(super) fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// For each of `R` runs in order, each head of `y` rescaled by its factor (skipped where it
/// is 1), then [`VectorOps::accumulate`] of the run's weights `w[r]` and values `x[r]`.
#[inline(always)]
pub(super) fn scale_accumulate_each<V: VectorOps, const R: usize>(
    ops: V,
    y: &mut [f32],
    factors: [&[f32]; R],
    w: [&[[f32; RUN]]; R],
    x: [&[f32]; R],
) {
    let hd = y.len() / w.first().map_or(1, |w| w.len().max(1));
    for ((factors, w), x) in factors.into_iter().zip(w).zip(x) {
        for (y, &factor) in y.chunks_exact_mut(hd).zip(factors) {
            if factor != 1.0 {
                ops.scale(y, factor);
            }
        }
        ops.accumulate(y, w, x);
    }
}

/// [`weights`] of several rows, one after another: row `r` over its first `lens[r]` scores,
/// with its state `max[r]` and `denominator[r]`, its factor in `factors[r]`.
#[inline(always)]
pub(super) fn weights_each<V: VectorOps>(
    ops: V,
    scores: &mut [[f32; RUN]],
    lens: &[usize],
    (max, denominator): (&mut [f32], &mut [f32]),
    factors: &mut [f32],
) {
    let states = max.iter_mut().zip(denominator.iter_mut());
    let rows = scores.iter_mut().zip(lens).zip(states).zip(factors);
    for (((scores, &len), state), factor) in rows {
        *factor = weights(ops, &mut scores[..len], state);
    }
}

/// The sum of `xs` from 0, one element after another. A run's weights are summed this way on
/// every path. A tree of vector lanes is no less accurate, but it changes the bits, and
/// through the int8 activations that moves the default model's near-ties: the log-probability
/// of the first token of its answer to "What is the capital of France?" moves by 0.18, and the
/// answer turns from "The capital of France is Paris." to "L'Étoile, …". The chain costs little
/// (a build without the sum is 2% faster on a 4,000-token prefill).
#[inline(always)]
pub(super) fn sum_in_order(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0, |sum, &x| sum + x)
}

/// The vector primitives of the attention kernel, one implementation per SIMD level. They work
/// on several query heads at once (`q`, `y`: `[heads][head_dim]`; `scores`, `w`: one row per
/// head), each head's arithmetic the same whatever the others.
pub(super) trait VectorOps: Copy {
    /// The scores of the run's slots for each head: `scores[h][j] = scale · Σ_d q[h][d] ·
    /// keys[d][slot + j]` for `j < run.len`, the sum over `d` in a fixed order. The lanes of
    /// `scores` past `run.len` may be written too (with anything): no one reads them.
    fn scores<T: KvElement>(
        self,
        q: &[f32],
        run: &Run<'_, T>,
        scale: f32,
        scores: &mut [[f32; RUN]],
    );
    /// `y[h][i] += Σ_j w[h][j] · x[j][i]` over the `x.len() / head_dim` rows of `x`, each
    /// element's terms added in the order of `j`.
    fn accumulate<T: KvElement>(self, y: &mut [f32], w: &[[f32; RUN]], x: &[T]);
    /// `y[i] *= a`.
    fn scale(self, y: &mut [f32], a: f32);
    /// `y[i] = x[i]` as f32 (exact: every element widens to one f32).
    fn widen<T: KvElement>(self, x: &[T], y: &mut [f32]);
    /// The largest of `xs` (−∞ for none). A maximum does not depend on the order in which it
    /// is taken (NaN aside), so the SIMD levels take it over vector lanes, where a fold would
    /// wait on each element in turn.
    fn max(self, xs: &[f32]) -> f32;
    /// `xs[j] = exp(xs[j] − max)` ([`math::exp`]), and the sum of those weights in the order
    /// of `j` ([`sum_in_order`]). The same bits at every level.
    fn exp_sum(self, xs: &mut [f32], max: f32) -> f32;
    /// [`weights`] of the rows of a tile (see [`weights_each`] for the arguments): each row's
    /// bits are those it has alone, whichever rows go together.
    fn weights_rows(
        self,
        scores: &mut [[f32; RUN]],
        lens: &[usize],
        state: (&mut [f32], &mut [f32]),
        factors: &mut [f32],
    ) {
        weights_each(self, scores, lens, state, factors);
    }

    /// Whether this level's tile primitives take a run's scores in columns ([`RunScores`]) for
    /// heads of `hd` and runs of keys `stride` slots apart; here not: in rows, through the row
    /// primitives.
    fn tile_in_columns(self, _hd: usize, _stride: usize) -> bool {
        false
    }

    /// The queries of a tile's rows (`q`, `[rows][head_dim]`) in the form this level's
    /// [`VectorOps::tile_scores`] reads for runs of keys `stride` slots apart, into `out`:
    /// here the rows as they are.
    fn prepare_queries(self, q: &[f32], _hd: usize, _stride: usize, out: &mut Prepared) {
        out.zeroed(q.len()).copy_from_slice(q);
    }

    /// The scores of a run of `n` slots (`keys`, f32, `[head_dim][stride]`) for a tile's rows
    /// `rows` (`q` from [`VectorOps::prepare_queries`]) into `scores`: bit for bit
    /// [`VectorOps::scores`] of each row alone. Other rows' entries may change.
    fn tile_scores(
        self,
        q: &[f32],
        hd: usize,
        run: (&[f32], usize, usize),
        scale: f32,
        rows: Range<usize>,
        scores: &mut RunScores,
    ) {
        tile_scores_rows(self, q, hd, run, scale, rows, scores);
    }

    /// [`VectorOps::weights_rows`] of a tile's rows `rows` over their scores of a run of `n`
    /// slots (replaced by the weights): row `r` over its first `lens[r]` slots, its state
    /// `max[r]` and `denominator[r]`, its factor into `factors[r]` (all indexed by row). Each
    /// row's bits are those it has alone; other rows' entries may change, but not their state.
    fn tile_weights(
        self,
        scores: &mut RunScores,
        _n: usize,
        rows: Range<usize>,
        lens: &[usize],
        state: (&mut [f32], &mut [f32]),
        factors: &mut [f32],
    ) {
        tile_weights_rows(self, scores, rows, lens, state, factors);
    }

    /// For each of `R` runs in order, the outputs `y` of a tile's rows `rows` rescaled by their
    /// factors (`factors[run][r]`, skipped where 1), then the run's values `x[run]` weighted by
    /// its weights (`scores[run]`) added ([`VectorOps::accumulate`]): bit for bit those steps
    /// one after the other, where a level may keep `y` in registers through them all.
    fn tile_scale_accumulate<const R: usize>(
        self,
        y: &mut [f32],
        rows: Range<usize>,
        factors: [&[f32]; R],
        scores: [&RunScores; R],
        x: [&[f32]; R],
    ) {
        tile_scale_accumulate_rows(self, y, rows, factors, scores, x);
    }
}

/// [`VectorOps::tile_scores`] of scores in rows: [`VectorOps::scores`].
#[inline(always)]
pub(super) fn tile_scores_rows<V: VectorOps>(
    ops: V,
    q: &[f32],
    hd: usize,
    (keys, stride, n): (&[f32], usize, usize),
    scale: f32,
    rows: Range<usize>,
    scores: &mut RunScores,
) {
    debug_assert!(
        !scores.in_columns(),
        "the row primitives take scores in rows"
    );
    let run = Run {
        keys,
        block_size: stride,
        slot: 0,
        values: &[],
        len: n,
    };
    let q = &q[rows.start * hd..rows.end * hd];
    ops.scores(q, &run, scale, &mut scores.rows_mut()[rows]);
}

/// [`VectorOps::tile_weights`] of scores in rows: [`VectorOps::weights_rows`].
#[inline(always)]
pub(super) fn tile_weights_rows<V: VectorOps>(
    ops: V,
    scores: &mut RunScores,
    rows: Range<usize>,
    lens: &[usize],
    (max, denominator): (&mut [f32], &mut [f32]),
    factors: &mut [f32],
) {
    debug_assert!(
        !scores.in_columns(),
        "the row primitives take scores in rows"
    );
    let state = (&mut max[rows.clone()], &mut denominator[rows.clone()]);
    let (scores, lens) = (&mut scores.rows_mut()[rows.clone()], &lens[rows.clone()]);
    ops.weights_rows(scores, lens, state, &mut factors[rows]);
}

/// [`VectorOps::tile_scale_accumulate`] of weights in rows: [`scale_accumulate_each`].
#[inline(always)]
pub(super) fn tile_scale_accumulate_rows<V: VectorOps, const R: usize>(
    ops: V,
    y: &mut [f32],
    rows: Range<usize>,
    factors: [&[f32]; R],
    scores: [&RunScores; R],
    x: [&[f32]; R],
) {
    debug_assert!(scores.iter().all(|s| !s.in_columns()));
    let w = scores.map(|s| &s.rows()[rows.clone()]);
    let factors = factors.map(|f| &f[rows.clone()]);
    scale_accumulate_each(ops, y, factors, w, x);
}

/// Portable implementation: loops over independent elements, a shape LLVM vectorizes.
#[derive(Clone, Copy)]
pub(super) struct Portable;

impl VectorOps for Portable {
    #[inline(always)]
    fn scores<T: KvElement>(
        self,
        q: &[f32],
        run: &Run<'_, T>,
        scale: f32,
        scores: &mut [[f32; RUN]],
    ) {
        let hd = q.len() / scores.len().max(1);
        for (q, out) in q.chunks_exact(hd).zip(scores) {
            let out = &mut out[..run.len];
            out.fill(0.0);
            for (&q, keys) in q.iter().zip(run.keys.chunks_exact(run.block_size)) {
                for (o, &k) in out.iter_mut().zip(&keys[run.slot..]) {
                    *o += q * k.to_f32();
                }
            }
            out.iter_mut().for_each(|o| *o *= scale);
        }
    }

    #[inline(always)]
    fn accumulate<T: KvElement>(self, y: &mut [f32], w: &[[f32; RUN]], x: &[T]) {
        let hd = y.len() / w.len().max(1);
        for (y, w) in y.chunks_exact_mut(hd).zip(w) {
            for (&w, x) in w.iter().zip(x.chunks_exact(hd)) {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y += w * x.to_f32();
                }
            }
        }
    }

    #[inline(always)]
    fn scale(self, y: &mut [f32], a: f32) {
        for y in y.iter_mut() {
            *y *= a;
        }
    }

    #[inline(always)]
    fn widen<T: KvElement>(self, x: &[T], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x.to_f32();
        }
    }

    #[inline(always)]
    fn max(self, xs: &[f32]) -> f32 {
        xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    #[inline(always)]
    fn exp_sum(self, xs: &mut [f32], max: f32) -> f32 {
        xs.iter_mut().for_each(|x| *x = math::exp(*x - max));
        sum_in_order(xs)
    }
}
