//! AVX2 and AVX-512 versions of the attention kernel.
//!
//! The kernel itself is the generic [`PagedAttention::attend`]; here it is instantiated inside
//! functions compiled with the right target features, with the SIMD tokens as its
//! [`VectorOps`]. Everything inlines into those functions, so the primitives compile to plain
//! vector code without per-call dispatch.

#![allow(unsafe_code)]

mod columns;

use std::arch::x86_64::{
    __m256, __m512, _mm_cvtss_f32, _mm_max_ps, _mm_max_ss, _mm_movehdup_ps, _mm_movehl_ps,
    _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_max_ps,
    _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_sub_ps, _mm512_add_ps,
    _mm512_fmadd_ps, _mm512_max_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps,
    _mm512_sub_ps,
};

use super::{KvElement, PagedAttention, RUN, Run, VectorOps, Work};
use crate::cpu::{Avx2, Avx512};
use crate::math::x86::{exp8, exp16};
use crate::x86::{
    halves_f32x16, load_f32x8, load_f32x16, load_f32x16_prefix, load_f32x16_prefix_or, store_f32x8,
    store_f32x16, store_f32x16_prefix,
};
use std::ops::Range;

use super::ops::{Prepared, tile_scale_accumulate_rows, tile_scores_rows, tile_weights_rows};
use super::tile::{Column, RunScores};

/// AVX-512 version of [`PagedAttention::compute`].
pub(super) fn compute_avx512<T: KvElement>(
    simd: Avx512,
    request: &PagedAttention<'_, T>,
    work: Work,
    out: &mut [f32],
) {
    // SAFETY: the `Avx512` token proves the CPU supports AVX-512F, AVX2, FMA and F16C.
    unsafe { compute_avx512_impl(simd, request, work, out) }
}

/// AVX2 version of [`PagedAttention::compute`].
pub(super) fn compute_avx2<T: KvElement>(
    simd: Avx2,
    request: &PagedAttention<'_, T>,
    work: Work,
    out: &mut [f32],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
    unsafe { compute_avx2_impl(simd, request, work, out) }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn compute_avx512_impl<T: KvElement>(
    simd: Avx512,
    request: &PagedAttention<'_, T>,
    work: Work,
    out: &mut [f32],
) {
    request.compute(simd, work, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
fn compute_avx2_impl<T: KvElement>(
    simd: Avx2,
    request: &PagedAttention<'_, T>,
    work: Work,
    out: &mut [f32],
) {
    request.compute(simd, work, out);
}

impl VectorOps for Avx512 {
    #[inline(always)]
    fn scores<T: KvElement>(
        self,
        q: &[f32],
        run: &Run<'_, T>,
        scale: f32,
        scores: &mut [[f32; RUN]],
    ) {
        // SAFETY: `self` proves the CPU supports AVX-512F, FMA and F16C.
        unsafe { scores_avx512(q, run, scale, scores) }
    }

    #[inline(always)]
    fn accumulate<T: KvElement>(self, y: &mut [f32], w: &[[f32; RUN]], x: &[T]) {
        // SAFETY: `self` proves the CPU supports AVX-512F, FMA and F16C.
        unsafe { accumulate_avx512(y, w, x) }
    }

    #[inline(always)]
    fn scale(self, y: &mut [f32], a: f32) {
        // SAFETY: `self` proves the CPU supports AVX-512F.
        unsafe { scale_avx512(y, a) }
    }

    #[inline(always)]
    fn widen<T: KvElement>(self, x: &[T], y: &mut [f32]) {
        // SAFETY: `self` proves the CPU supports AVX-512F and F16C.
        unsafe { widen_avx512(x, y) }
    }

    #[inline(always)]
    fn max(self, xs: &[f32]) -> f32 {
        // SAFETY: `self` proves the CPU supports AVX-512F and AVX.
        unsafe { max_512(xs) }
    }

    #[inline(always)]
    fn exp_sum(self, xs: &mut [f32], max: f32) -> f32 {
        // SAFETY: `self` proves the CPU supports AVX-512F, AVX2 and FMA.
        unsafe { exp_sum_512(xs, max) }
    }

    #[inline(always)]
    fn tile_in_columns(self, hd: usize, stride: usize) -> bool {
        native_columns(hd, stride)
    }

    #[inline(always)]
    fn prepare_queries(self, q: &[f32], hd: usize, stride: usize, out: &mut Prepared) {
        if native_columns(hd, stride) {
            columns::transpose_queries(q, hd, out);
        } else {
            out.zeroed(q.len()).copy_from_slice(q);
        }
    }

    #[inline(always)]
    fn tile_scores(
        self,
        q: &[f32],
        hd: usize,
        (keys, stride, n): (&[f32], usize, usize),
        scale: f32,
        rows: Range<usize>,
        scores: &mut RunScores,
    ) {
        if scores.in_columns() {
            let cols = scores.columns_mut();
            // SAFETY: `self` proves the CPU supports AVX-512F and FMA.
            unsafe { columns::scores_columns_512(q, hd, (keys, n), scale, rows, cols) }
        } else {
            tile_scores_rows(self, q, hd, (keys, stride, n), scale, rows, scores);
        }
    }

    #[inline(always)]
    fn tile_weights(
        self,
        scores: &mut RunScores,
        n: usize,
        rows: Range<usize>,
        lens: &[usize],
        state: (&mut [f32], &mut [f32]),
        factors: &mut [f32],
    ) {
        if scores.in_columns() {
            let cols = &mut scores.columns_mut()[..n.min(16)];
            // SAFETY: `self` proves the CPU supports AVX-512F, AVX2 and FMA.
            unsafe { columns::weights_columns_512(cols, rows, lens, state, factors) }
        } else {
            tile_weights_rows(self, scores, rows, lens, state, factors);
        }
    }

    #[inline(always)]
    fn tile_scale_accumulate<const R: usize>(
        self,
        y: &mut [f32],
        rows: Range<usize>,
        factors: [&[f32]; R],
        scores: [&RunScores; R],
        x: [&[f32]; R],
    ) {
        if scores.iter().all(|s| s.in_columns()) {
            let cols = scores.map(RunScores::columns);
            // SAFETY: `self` proves the CPU supports AVX-512F, FMA and F16C.
            unsafe { scale_accumulate_columns_avx512(y, rows, factors, cols, x) }
        } else {
            tile_scale_accumulate_rows(self, y, rows, factors, scores, x);
        }
    }
}

/// Whether the AVX-512 column kernels take a tile's runs of keys `stride` slots apart with
/// heads of `hd` (its scores then lie in columns): whole blocks of 16 positions, the usual
/// head sizes.
fn native_columns(hd: usize, stride: usize) -> bool {
    stride == 16 && matches!(hd, 32 | 64 | 128)
}

impl VectorOps for Avx2 {
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
            let (keys, bs, slot) = (run.keys, run.block_size, run.slot);
            // SAFETY: `self` proves the CPU supports AVX2, FMA and F16C.
            unsafe { scores_avx2(q, keys, bs, slot, scale, &mut out[..run.len]) }
        }
    }

    #[inline(always)]
    fn accumulate<T: KvElement>(self, y: &mut [f32], w: &[[f32; RUN]], x: &[T]) {
        let hd = y.len() / w.len().max(1);
        let rows = x.len() / hd;
        for (y, w) in y.chunks_exact_mut(hd).zip(w) {
            // SAFETY: `self` proves the CPU supports AVX2, FMA and F16C.
            unsafe { accumulate_avx2(y, &w[..rows], x) }
        }
    }

    #[inline(always)]
    fn scale(self, y: &mut [f32], a: f32) {
        // SAFETY: `self` proves the CPU supports AVX2.
        unsafe { scale_avx2(y, a) }
    }

    #[inline(always)]
    fn widen<T: KvElement>(self, x: &[T], y: &mut [f32]) {
        // SAFETY: `self` proves the CPU supports AVX, F16C.
        unsafe { widen_avx2(x, y) }
    }

    #[inline(always)]
    fn max(self, xs: &[f32]) -> f32 {
        // SAFETY: `self` proves the CPU supports AVX2.
        unsafe { max_256(xs) }
    }

    #[inline(always)]
    fn exp_sum(self, xs: &mut [f32], max: f32) -> f32 {
        // SAFETY: `self` proves the CPU supports AVX2 and FMA.
        unsafe { exp_sum_256(xs, max) }
    }
}

/// Query heads (or rows of a tile) whose scores, or weighted values, one pass computes: each
/// key or value vector loaded is used by all of them, and their accumulators (24 at most) are
/// independent chains.
const HEADS: usize = 6;

/// Query dimensions whose products go to separate accumulators (then summed pairwise): four
/// independent chains of multiply-adds instead of one.
const CHAINS: usize = 4;

/// [`VectorOps::scores`] with AVX-512: for the usual head sizes, [`HEADS`] heads at a time;
/// others one head at a time, with the same operations.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn scores_avx512<T: KvElement>(q: &[f32], run: &Run<'_, T>, scale: f32, scores: &mut [[f32; RUN]]) {
    let hd = q.len() / scores.len().max(1);
    match hd {
        32 => scores_sized_512::<32, T>(q, run, scale, scores),
        64 => scores_sized_512::<64, T>(q, run, scale, scores),
        128 => scores_sized_512::<128, T>(q, run, scale, scores),
        _ => {
            for (q, out) in q.chunks_exact(hd).zip(scores) {
                scores_head_512(q, run, scale, &mut out[..run.len]);
            }
        }
    }
}

/// The scores of heads of `HD` dimensions, [`HEADS`] at a time.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn scores_sized_512<const HD: usize, T: KvElement>(
    q: &[f32],
    run: &Run<'_, T>,
    scale: f32,
    scores: &mut [[f32; RUN]],
) {
    let (q, _) = q.as_chunks::<HD>();
    for (q, scores) in q.chunks(HEADS).zip(scores.chunks_mut(HEADS)) {
        if let Ok(q) = <&[[f32; HD]; 6]>::try_from(q) {
            scores_heads_512::<6, HD, T>(q, run, scale, scores);
        } else if let Ok(q) = <&[[f32; HD]; 5]>::try_from(q) {
            scores_heads_512::<5, HD, T>(q, run, scale, scores);
        } else if let Ok(q) = <&[[f32; HD]; 4]>::try_from(q) {
            scores_heads_512::<4, HD, T>(q, run, scale, scores);
        } else if let Ok(q) = <&[[f32; HD]; 3]>::try_from(q) {
            scores_heads_512::<3, HD, T>(q, run, scale, scores);
        } else if let Ok(q) = <&[[f32; HD]; 2]>::try_from(q) {
            scores_heads_512::<2, HD, T>(q, run, scale, scores);
        } else if let Ok(q) = <&[[f32; HD]; 1]>::try_from(q) {
            scores_heads_512::<1, HD, T>(q, run, scale, scores);
        }
    }
}

/// The scores of `H` heads of `HD` (a multiple of [`CHAINS`]) dimensions: 16 slots per vector
/// (the last one masked); per query dimension one key vector, and for each head one
/// multiply-add of its broadcast `q[d]` with it into that head's chain `d mod 4`.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // the chains indexed by constants: registers
fn scores_heads_512<const H: usize, const HD: usize, T: KvElement>(
    q: &[[f32; HD]; H],
    run: &Run<'_, T>,
    scale: f32,
    scores: &mut [[f32; RUN]],
) {
    let (n, bs, slot) = (run.len, run.block_size, run.slot);
    if let Some(keys) = block_rows::<HD, T>(run) {
        scores_block_512(q, keys, scale, scores);
        return;
    }
    let mut j = 0;
    while j < n {
        let len = (n - j).min(16);
        let mut acc = [[_mm512_setzero_ps(); CHAINS]; H];
        for d0 in (0..HD).step_by(CHAINS) {
            for c in 0..CHAINS {
                let d = d0 + c;
                // SAFETY: this function's features are the ones `widen16_prefix` needs.
                let k = unsafe { T::widen16_prefix(&run.keys[d * bs + slot + j..][..len]) };
                for h in 0..H {
                    acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[h][d]), k, acc[h][c]);
                }
            }
        }
        for (acc, out) in acc.iter().zip(scores.iter_mut()) {
            store_scores_512(acc, scale, &mut out[j..j + len]);
        }
        j += len;
    }
}

/// The keys of the block of 16 positions that `run` starts at the first slot of, as `HD` rows
/// of 16 slots: every run of a context (the last one, too, from its block's start).
#[inline(always)]
fn block_rows<'a, const HD: usize, T: KvElement>(run: &Run<'a, T>) -> Option<&'a [[T; 16]; HD]> {
    if (run.block_size, run.slot) != (16, 0) || run.len > 16 {
        return None;
    }
    let rows = run.keys.get(..HD * 16)?.as_chunks::<16>().0;
    <&[[T; 16]; HD]>::try_from(rows).ok()
}

/// [`scores_heads_512`] of a run from the first slot of a block of 16 positions: the same
/// multiply-adds in the same chains, over rows whose bounds the types prove, so that the loop
/// is only loads, conversions and multiply-adds. Short of a whole block (the last run of a
/// context), the slots past the run (later positions, or none yet) are computed too, and their
/// lanes of `scores` written but never read: each lane's arithmetic is its own, so the run's
/// scores are the same bits, every key row is one plain load and every store a whole vector.
/// Loaded as a prefix instead, a row's elements went through the stack, and each vector load
/// of them waited for those stores to leave: on Zen 4 a decode of 16 sequences at 8 positions
/// spent about 1 µs a task on it (docs/benchmarks.md, "twelfth").
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // the chains indexed by constants: registers
fn scores_block_512<const H: usize, const HD: usize, T: KvElement>(
    q: &[[f32; HD]; H],
    keys: &[[T; 16]; HD],
    scale: f32,
    scores: &mut [[f32; RUN]],
) {
    let mut acc = [[_mm512_setzero_ps(); CHAINS]; H];
    for d0 in (0..HD).step_by(CHAINS) {
        for c in 0..CHAINS {
            let d = d0 + c;
            // SAFETY: this function's features are the ones `widen16` needs.
            let k = unsafe { T::widen16(&keys[d]) };
            for h in 0..H {
                acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[h][d]), k, acc[h][c]);
            }
        }
    }
    for (acc, out) in acc.iter().zip(scores.iter_mut()) {
        store_scores_512(acc, scale, &mut out[..16]);
    }
}

/// The scores of one head of any size, with the operations of [`scores_heads_512`].
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn scores_head_512<T: KvElement>(q: &[f32], run: &Run<'_, T>, scale: f32, out: &mut [f32]) {
    let (bs, slot) = (run.block_size, run.slot);
    let n = out.len();
    let mut j = 0;
    while j < n {
        let len = (n - j).min(16);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for (d, (&q, keys)) in q.iter().zip(run.keys.chunks_exact(bs)).enumerate() {
            // SAFETY: this function's features are the ones `widen16_prefix` needs.
            let k = unsafe { T::widen16_prefix(&keys[slot + j..][..len]) };
            acc[d % CHAINS] = _mm512_fmadd_ps(_mm512_set1_ps(q), k, acc[d % CHAINS]);
        }
        store_scores_512(&acc, scale, &mut out[j..j + len]);
        j += len;
    }
}

/// Stores `scale · ((c0 + c1) + (c2 + c3))`, the scores of up to 16 slots from their four
/// chains, to `out` (at most 16 floats).
#[target_feature(enable = "avx512f")]
#[inline]
fn store_scores_512(acc: &[__m512; CHAINS], scale: f32, out: &mut [f32]) {
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    store_f32x16_prefix(out, _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
}

/// [`VectorOps::accumulate`] with AVX-512: for the usual head sizes, up to [`HEADS`] heads'
/// outputs held in registers while the rows of `x` stream past once for all of them.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn accumulate_avx512<T: KvElement>(y: &mut [f32], w: &[[f32; RUN]], x: &[T]) {
    let hd = y.len() / w.len().max(1);
    let rows = x.len() / hd;
    // Heads per pass: at most HEADS, with at most 24 accumulators.
    let per_pass = if hd == 128 { 3 } else { HEADS };
    let passes = y.chunks_mut(per_pass * hd).zip(w.chunks(per_pass));
    match hd {
        32 => passes.for_each(|(y, w)| accumulate_heads_512::<2, T>(y, w, x)),
        64 => passes.for_each(|(y, w)| accumulate_heads_512::<4, T>(y, w, x)),
        128 => passes.for_each(|(y, w)| accumulate_heads_512::<8, T>(y, w, x)),
        _ => {
            for (y, w) in y.chunks_exact_mut(hd).zip(w) {
                accumulate_head_512(y, &w[..rows], x);
            }
        }
    }
}

/// The heads of `y` (up to [`HEADS`], `V` vectors each) against the rows of `x`.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn accumulate_heads_512<const V: usize, T: KvElement>(y: &mut [f32], w: &[[f32; RUN]], x: &[T]) {
    match w.len() {
        6 => accumulate_held_512::<6, V, T>(y, w, x),
        5 => accumulate_held_512::<5, V, T>(y, w, x),
        4 => accumulate_held_512::<4, V, T>(y, w, x),
        3 => accumulate_held_512::<3, V, T>(y, w, x),
        2 => accumulate_held_512::<2, V, T>(y, w, x),
        _ => accumulate_held_512::<1, V, T>(y, w, x),
    }
}

/// `H` heads of `V` vectors each held in registers: [`scale_accumulate_held_512`] of one run,
/// without factors.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn accumulate_held_512<const H: usize, const V: usize, T: KvElement>(
    y: &mut [f32],
    w: &[[f32; RUN]],
    x: &[T],
) {
    scale_accumulate_held_512::<H, V, 1, T, _>(y, None, [w], [x]);
}

/// The weight of head (or row) `h` of a pass for slot `j` of a run.
trait RunWeights: Copy {
    fn at(self, h: usize, j: usize) -> f32;
}

/// Weights in rows, `w[h][j]`.
impl RunWeights for &[[f32; RUN]] {
    #[inline(always)]
    fn at(self, h: usize, j: usize) -> f32 {
        self[h][j]
    }
}

/// A tile's weights in columns (`cols[j][row]`) from row `first`.
#[derive(Clone, Copy)]
struct ColumnWeights<'a> {
    cols: &'a [Column],
    first: usize,
}

impl RunWeights for ColumnWeights<'_> {
    #[inline(always)]
    fn at(self, h: usize, j: usize) -> f32 {
        self.cols[j][self.first + h]
    }
}

/// [`VectorOps::tile_scale_accumulate`] of weights in columns, with AVX-512, for the head sizes
/// whose scores lie in columns ([`native_columns`]): up to [`HEADS`] rows' outputs held in
/// registers through all `R` runs (3 for heads of 128: at most 24 accumulators), as
/// [`accumulate_avx512`] holds them through one.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn scale_accumulate_columns_avx512<const R: usize>(
    y: &mut [f32],
    rows: Range<usize>,
    factors: [&[f32]; R],
    cols: [&[Column]; R],
    x: [&[f32]; R],
) {
    let hd = y.len() / rows.len().max(1);
    match hd {
        32 => scale_accumulate_passes_512::<2, R>(y, rows, factors, cols, x),
        64 => scale_accumulate_passes_512::<4, R>(y, rows, factors, cols, x),
        128 => scale_accumulate_passes_512::<8, R>(y, rows, factors, cols, x),
        _ => {} // not in columns (`native_columns`)
    }
}

/// [`scale_accumulate_columns_avx512`] of rows of `V` vectors.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn scale_accumulate_passes_512<const V: usize, const R: usize>(
    y: &mut [f32],
    rows: Range<usize>,
    factors: [&[f32]; R],
    cols: [&[Column]; R],
    x: [&[f32]; R],
) {
    let per_pass = if V == 8 { 3 } else { HEADS };
    for (p, y) in y.chunks_mut(per_pass * V * 16).enumerate() {
        let first = rows.start + p * per_pass;
        let pass = first..first + y.len() / (V * 16);
        // Loops rather than `array::from_fn`, whose closures are not inlined here.
        let mut f: [&[f32]; R] = [&[]; R];
        let mut w = [ColumnWeights { cols: &[], first }; R];
        for r in 0..R {
            f[r] = &factors[r][pass.clone()];
            w[r].cols = cols[r];
        }
        match pass.len() {
            6 => scale_accumulate_held_512::<6, V, R, f32, _>(y, Some(f), w, x),
            5 => scale_accumulate_held_512::<5, V, R, f32, _>(y, Some(f), w, x),
            4 => scale_accumulate_held_512::<4, V, R, f32, _>(y, Some(f), w, x),
            3 => scale_accumulate_held_512::<3, V, R, f32, _>(y, Some(f), w, x),
            2 => scale_accumulate_held_512::<2, V, R, f32, _>(y, Some(f), w, x),
            _ => scale_accumulate_held_512::<1, V, R, f32, _>(y, Some(f), w, x),
        }
    }
}

/// `H` heads (or rows) of `V` vectors each held in registers (constant counts, so the arrays
/// are registers) through `R` runs: per run, each multiplied by its factor (when one of them
/// is not 1: a product by 1 is exact), then per row of the run's values, its `V` vectors
/// loaded once, and each head adds its weight times them.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn scale_accumulate_held_512<
    const H: usize,
    const V: usize,
    const R: usize,
    T: KvElement,
    W: RunWeights,
>(
    y: &mut [f32],
    factors: Option<[&[f32]; R]>,
    w: [W; R],
    x: [&[T]; R],
) {
    let (y, _) = y.as_chunks_mut::<16>();
    let mut acc: [[__m512; V]; H] =
        std::array::from_fn(|h| std::array::from_fn(|v| load_f32x16(&y[h * V + v])));
    for r in 0..R {
        if let Some(factors) = factors
            && let Ok(f) = <&[f32; H]>::try_from(factors[r])
            && f.iter().any(|&f| f != 1.0)
        {
            for (acc, &f) in acc.iter_mut().zip(f) {
                let f = _mm512_set1_ps(f);
                for a in acc.iter_mut() {
                    *a = _mm512_mul_ps(f, *a);
                }
            }
        }
        let w = w[r];
        for (j, row) in x[r].chunks_exact(16 * V).enumerate() {
            let row = row.as_chunks::<16>().0;
            // SAFETY: this function's features are the ones `widen16` needs.
            let xs: [__m512; V] = std::array::from_fn(|v| unsafe { T::widen16(&row[v]) });
            for (h, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(w.at(h, j));
                for (a, &x) in acc.iter_mut().zip(&xs) {
                    *a = _mm512_fmadd_ps(w, x, *a);
                }
            }
        }
    }
    for h in 0..H {
        for v in 0..V {
            store_f32x16(&mut y[h * V + v], acc[h][v]);
        }
    }
}

/// One head of any size: its vectors through memory, then the tail one element at a time,
/// with the same operations as [`accumulate_held_512`].
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn accumulate_head_512<T: KvElement>(y: &mut [f32], w: &[f32], x: &[T]) {
    let width = y.len();
    let (vectors, tail) = y.as_chunks_mut::<16>();
    for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
        let w = _mm512_set1_ps(w);
        for (y, x) in vectors.iter_mut().zip(row.as_chunks::<16>().0) {
            // SAFETY: this function's features are the ones `widen16` needs.
            let x = unsafe { T::widen16(x) };
            store_f32x16(y, _mm512_fmadd_ps(w, x, load_f32x16(y)));
        }
    }
    let start = width - tail.len();
    for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
        for (y, &x) in tail.iter_mut().zip(&row[start..]) {
            *y = w.mul_add(x.to_f32(), *y);
        }
    }
}

/// [`VectorOps::scores`] with AVX2: 8 slots per vector.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn scores_avx2<T: KvElement>(
    q: &[f32],
    keys: &[T],
    bs: usize,
    slot: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = out.len();
    let (vectors, tail) = out.as_chunks_mut::<8>();
    for (v, o) in vectors.iter_mut().enumerate() {
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for (d, (&q, keys)) in q.iter().zip(keys.chunks_exact(bs)).enumerate() {
            let k = &keys[slot + 8 * v..].as_chunks::<8>().0[0];
            // SAFETY: this function's features are the ones `widen8` needs.
            let k = unsafe { T::widen8(k) };
            acc[d % CHAINS] = _mm256_fmadd_ps(_mm256_set1_ps(q), k, acc[d % CHAINS]);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        store_f32x8(o, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
    // The last slots, one at a time, with the same chains.
    let start = n - tail.len();
    for (j, o) in tail.iter_mut().enumerate() {
        let mut acc = [0.0f32; CHAINS];
        for (d, (&q, keys)) in q.iter().zip(keys.chunks_exact(bs)).enumerate() {
            acc[d % CHAINS] = q.mul_add(keys[slot + start + j].to_f32(), acc[d % CHAINS]);
        }
        *o = ((acc[0] + acc[1]) + (acc[2] + acc[3])) * scale;
    }
}

/// [`VectorOps::accumulate`] with AVX2: `y` in registers (up to 64 floats at a time).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn accumulate_avx2<T: KvElement>(y: &mut [f32], w: &[f32], x: &[T]) {
    const HELD: usize = 8;
    let width = y.len();
    let (vectors, tail) = y.as_chunks_mut::<8>();
    for (c, group) in vectors.chunks_mut(HELD).enumerate() {
        let mut acc = [_mm256_setzero_ps(); HELD];
        for (a, y) in acc.iter_mut().zip(group.iter()) {
            *a = load_f32x8(y);
        }
        for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
            let w = _mm256_set1_ps(w);
            let row = &row.as_chunks::<8>().0[c * HELD..][..group.len()];
            for (a, x) in acc.iter_mut().zip(row) {
                // SAFETY: this function's features are the ones `widen8` needs.
                *a = _mm256_fmadd_ps(w, unsafe { T::widen8(x) }, *a);
            }
        }
        for (a, y) in acc.iter().zip(group.iter_mut()) {
            store_f32x8(y, *a);
        }
    }
    let start = width - tail.len();
    for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
        for (y, &x) in tail.iter_mut().zip(&row[start..]) {
            *y = w.mul_add(x.to_f32(), *y);
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn scale_avx512(y: &mut [f32], a: f32) {
    let a_v = _mm512_set1_ps(a);
    let (vectors, tail) = y.as_chunks_mut::<16>();
    for y in vectors {
        let product = _mm512_mul_ps(a_v, load_f32x16(y));
        store_f32x16(y, product);
    }
    for y in tail {
        *y *= a;
    }
}

#[target_feature(enable = "avx2")]
#[inline]
fn scale_avx2(y: &mut [f32], a: f32) {
    let a_v = _mm256_set1_ps(a);
    let (vectors, tail) = y.as_chunks_mut::<8>();
    for y in vectors {
        let product = _mm256_mul_ps(a_v, load_f32x8(y));
        store_f32x8(y, product);
    }
    for y in tail {
        *y *= a;
    }
}

/// [`VectorOps::widen`] with AVX-512: 16 elements per vector, the last vector masked.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
fn widen_avx512<T: KvElement>(x: &[T], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    let (vectors, tail) = y.as_chunks_mut::<16>();
    let (whole, rest) = x.as_chunks::<16>();
    for (y, x) in vectors.iter_mut().zip(whole) {
        // SAFETY: this function's features are the ones `widen16` needs.
        store_f32x16(y, unsafe { T::widen16(x) });
    }
    if !tail.is_empty() {
        // SAFETY: this function's features are the ones `widen16_prefix` needs.
        store_f32x16_prefix(tail, unsafe { T::widen16_prefix(rest) });
    }
}

/// [`VectorOps::widen`] with AVX2: 8 elements per vector, the tail one at a time.
#[target_feature(enable = "avx,f16c")]
#[inline]
fn widen_avx2<T: KvElement>(x: &[T], y: &mut [f32]) {
    let (vectors, tail) = y.as_chunks_mut::<8>();
    let (x_vectors, x_tail) = x.as_chunks::<8>();
    for (y, x) in vectors.iter_mut().zip(x_vectors) {
        // SAFETY: this function's features are the ones `widen8` needs.
        store_f32x8(y, unsafe { T::widen8(x) });
    }
    for (y, &x) in tail.iter_mut().zip(x_tail) {
        *y = x.to_f32();
    }
}

/// The largest of 8 lanes: lane `l` with lane `l + 4`, then `l + 2`, then 0 with 1.
#[target_feature(enable = "avx")]
#[inline]
fn max_of_lanes_256(v: __m256) -> f32 {
    let c = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let d = _mm_max_ps(c, _mm_movehl_ps(c, c));
    _mm_cvtss_f32(_mm_max_ss(d, _mm_movehdup_ps(d)))
}

/// [`VectorOps::max`] with AVX-512.
#[target_feature(enable = "avx512f,avx")]
#[inline]
fn max_512(xs: &[f32]) -> f32 {
    let low = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut lanes = low;
    for chunk in xs.chunks(16) {
        lanes = _mm512_max_ps(lanes, load_f32x16_prefix_or(chunk, low));
    }
    let (lo, hi) = halves_f32x16(lanes);
    max_of_lanes_256(_mm256_max_ps(lo, hi))
}

/// [`VectorOps::exp_sum`] with AVX-512: [`exp16`] of 16 slots at a time, then their sum.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn exp_sum_512(xs: &mut [f32], max: f32) -> f32 {
    let m = _mm512_set1_ps(max);
    for chunk in xs.chunks_mut(16) {
        let x = load_f32x16_prefix(chunk);
        store_f32x16_prefix(chunk, exp16(_mm512_sub_ps(x, m)));
    }
    super::ops::sum_in_order(xs)
}

/// Up to 8 floats of `xs` in a vector, the absent lanes −∞.
#[target_feature(enable = "avx")]
#[inline]
fn load_padded_256(xs: &[f32]) -> __m256 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let n = xs.len().min(8);
    lanes[..n].copy_from_slice(&xs[..n]);
    load_f32x8(&lanes)
}

/// [`VectorOps::max`] with AVX2: 16 lanes as two vectors.
#[target_feature(enable = "avx2")]
#[inline]
fn max_256(xs: &[f32]) -> f32 {
    let mut lanes = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
    for chunk in xs.chunks(16) {
        for (lanes, part) in lanes.iter_mut().zip(chunk.chunks(8)) {
            *lanes = _mm256_max_ps(*lanes, load_padded_256(part));
        }
    }
    max_of_lanes_256(_mm256_max_ps(lanes[0], lanes[1]))
}

/// [`VectorOps::exp_sum`] with AVX2: [`exp8`] of 8 slots at a time, then their sum.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp_sum_256(xs: &mut [f32], max: f32) -> f32 {
    let m = _mm256_set1_ps(max);
    for part in xs.chunks_mut(8) {
        let mut out = [0.0f32; 8];
        store_f32x8(&mut out, exp8(_mm256_sub_ps(load_padded_256(part), m)));
        let n = part.len();
        part.copy_from_slice(&out[..n]);
    }
    super::ops::sum_in_order(xs)
}
