//! Activations quantized for the int8 products: per row and block of [`QBLOCK`], one 8-bit
//! plane (or two, the second quantizing what the first leaves), with each block's scale, code
//! sum and the sum of its first half (what formats with 16-wide sub-blocks subtract).

use super::{Precision, QBLOCK, ROW_GROUP};
use crate::cpu::{self, Int8Level};
use crate::error::KernelError;
use crate::matrix::{check_len, checked_len};
use rayon::prelude::*;

/// One quantization of `[rows, cols]` values: codes, per-block scales and per-block code sums.
#[derive(Debug, Clone, Default)]
pub(super) struct Plane {
    /// `[rows][cols / 4]` codes, four to a little-endian `i32` (what a 32-bit lane of
    /// `vpdpbusd` multiplies).
    pub(super) q: Vec<i32>,
    /// `[rows][cols / 32]` scales `d`.
    pub(super) d: Vec<f32>,
    /// `[rows][cols / 32]` block sums `Σ q`.
    pub(super) sum: Vec<i32>,
    /// `[rows][cols / 32]` sums of the first 16 codes of each block.
    pub(super) half: Vec<i32>,
    /// `[rows][cols / 32]`: `false` where every code of the block is zero, so that a product
    /// may skip it (`true` where a code may not be).
    pub(super) coded: Vec<bool>,
}

impl Plane {
    fn resize(&mut self, values: usize, blocks: usize) {
        self.q.resize(values / 4, 0);
        self.d.resize(blocks, 0.0);
        self.sum.resize(blocks, 0);
        self.half.resize(blocks, 0);
        self.coded.resize(blocks, true);
    }

    /// The plane's buffers in chunks of `values` codes and `blocks` blocks (some rows each).
    fn chunks_mut(&mut self, values: usize, blocks: usize) -> impl Iterator<Item = PlaneMut<'_>> {
        let quads = self.q.chunks_mut((values / 4).max(1));
        let d = self.d.chunks_mut(blocks.max(1));
        let sum = self.sum.chunks_mut(blocks.max(1));
        let half = self.half.chunks_mut(blocks.max(1));
        let coded = self.coded.chunks_mut(blocks.max(1));
        quads
            .zip(d)
            .zip(sum)
            .zip(half)
            .zip(coded)
            .map(|((((q, d), sum), half), coded)| PlaneMut {
                q,
                d,
                sum,
                half,
                coded,
            })
    }

    fn row(&self, i: usize, cols: usize) -> PlaneRow<'_> {
        let blocks = cols / QBLOCK;
        PlaneRow {
            q: &self.q[i * cols / 4..][..cols / 4],
            d: &self.d[i * blocks..][..blocks],
            sum: &self.sum[i * blocks..][..blocks],
            half: &self.half[i * blocks..][..blocks],
            coded: &self.coded[i * blocks..][..blocks],
        }
    }
}

/// The buffers of some consecutive rows of a [`Plane`].
struct PlaneMut<'a> {
    q: &'a mut [i32],
    d: &'a mut [f32],
    sum: &'a mut [i32],
    half: &'a mut [i32],
    coded: &'a mut [bool],
}

/// Values from which a quantization splits its rows among threads.
pub(super) const PARALLEL_MIN_VALUES: usize = 1 << 15;

/// Some consecutive rows of a quantization: their values, whether each has the second plane,
/// and their buffers in both planes (`lo` where a row of the quantization has it).
struct RowChunk<'a> {
    x: &'a [f32],
    two: &'a [bool],
    hi: PlaneMut<'a>,
    lo: Option<PlaneMut<'a>>,
}

/// Quantizes the rows of a chunk (`cols` each) into `hi`, and the residual of those where `two`
/// says so into `lo`.
fn quantize_chunk(chunk: RowChunk<'_>, cols: usize) {
    let RowChunk { x, two, hi, lo } = chunk;
    match cpu::int8_level() {
        #[cfg(target_arch = "x86_64")]
        Int8Level::Avx512Vnni(t) => {
            super::x86::quantize_blocks_512(t, x, hi.q, hi.d, hi.sum, hi.half)
        }
        _ => {
            for ((((x, q), d), sum), half) in x
                .chunks_exact(QBLOCK)
                .zip(hi.q.chunks_exact_mut(QBLOCK / 4))
                .zip(hi.d.iter_mut())
                .zip(hi.sum.iter_mut())
                .zip(hi.half.iter_mut())
            {
                (*d, *sum, *half) = quantize_block(x, q);
            }
        }
    }
    let Some(lo) = lo else {
        return;
    };
    let per_row = cols / QBLOCK;
    for (i, x) in x.chunks_exact(cols).enumerate() {
        if !two[i] {
            continue;
        }
        let b = i * per_row..(i + 1) * per_row;
        // The blocks far below the row's largest keep one plane's codes: their rounding is
        // small beside the largest block's, which the residual removes. Only the others are
        // quantized twice.
        let cut = REFINE_FROM * hi.d[b.clone()].iter().fold(0.0f32, |a, &d| a.max(d));
        for b in b.clone() {
            lo.coded[b] = hi.d[b] > 0.0 && hi.d[b] >= cut;
        }
        let quads = b.start * QBLOCK / 4..b.end * QBLOCK / 4;
        let (hq, hd) = (&hi.q[quads.clone()], &hi.d[b.clone()]);
        let lq = &mut lo.q[quads];
        let (ls, lh) = (&mut lo.sum[b.clone()], &mut lo.half[b.clone()]);
        let refined = &lo.coded[b.clone()];
        match cpu::int8_level() {
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx512Vnni(t) => {
                super::x86::quantize_residual_512(t, x, hq, hd, refined, lq, ls, lh)
            }
            _ => quantize_residual(x, hq, hd, refined, lq, ls, lh),
        }
        for b in b {
            // The two planes as one code `256 · q_hi + q_lo` of step `d / 256`.
            lo.d[b] = hi.d[b] / RESIDUAL_STEPS;
            lo.sum[b] += hi.sum[b] << 8;
            lo.half[b] += hi.half[b] << 8;
        }
    }
}

/// Activations `[rows, cols]` quantized to 8 bits per block of [`QBLOCK`]: once, or twice for
/// the rows quantized at [`Precision::Int8x2`].
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivations {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) hi: Plane,
    /// The residual's quantization, for the rows that have one. Its codes step by `d / 256`
    /// for the value's step `d`, and its `d`, `sum` and `half` describe the two planes as one
    /// code `256 · q_hi + q_lo`: `d / 256` and the combined sums. A product then takes
    /// `(Σ c · q_hi) · 256 + Σ c · q_lo` in integers and converts once. Only the blocks whose
    /// scale is at least [`REFINE_FROM`] of the row's largest have residual codes; the others'
    /// are zero (and not `coded`), so a product skips their second plane.
    pub(super) lo: Plane,
    /// Per row, whether it has the second plane.
    two: Vec<bool>,
}

impl QuantizedActivations {
    /// Quantizes `x` (`[rows, cols]`, row-major) to one 8-bit code per value.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidShape`] if `cols` is not a multiple of [`QBLOCK`];
    /// [`KernelError::LengthMismatch`] if `x.len() != rows * cols`.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let mut q = QuantizedActivations::default();
        q.quantize_from(x, rows, cols, Precision::Int8)?;
        Ok(q)
    }

    /// Quantizes every row of `x` at `precision` into this value's buffers (no allocation once
    /// they are large enough).
    ///
    /// # Errors
    ///
    /// As [`QuantizedActivations::quantize`].
    pub fn quantize_from(
        &mut self,
        x: &[f32],
        rows: usize,
        cols: usize,
        precision: Precision,
    ) -> Result<(), KernelError> {
        self.quantize_rows(x, rows, cols, |_| precision)
    }

    /// Quantizes row `i` of `x` at `precision(i)`: a row's codes depend on the row alone.
    ///
    /// # Errors
    ///
    /// As [`QuantizedActivations::quantize`].
    pub fn quantize_rows(
        &mut self,
        x: &[f32],
        rows: usize,
        cols: usize,
        precision: impl Fn(usize) -> Precision,
    ) -> Result<(), KernelError> {
        if !cols.is_multiple_of(QBLOCK) {
            return Err(KernelError::InvalidShape(format!(
                "int8 activations need a multiple of {QBLOCK} columns, got {cols}"
            )));
        }
        check_len(
            "activations",
            x.len(),
            checked_len("activations", rows, cols)?,
        )?;
        let blocks = rows * (cols / QBLOCK);
        self.rows = rows;
        self.cols = cols;
        self.two.clear();
        self.two
            .extend((0..rows).map(|i| precision(i) == Precision::Int8x2));
        self.hi.resize(rows * cols, blocks);
        let any_two = self.two.iter().any(|&t| t);
        if any_two {
            self.lo.resize(rows * cols, blocks);
        }
        if rows * cols == 0 {
            return Ok(());
        }
        // Rows go in chunks, in parallel where there are many (a prefill): a row's codes
        // depend on the row alone, so the chunks change no bit.
        let per_chunk = crate::pool::rows_per_task(rows, cols, PARALLEL_MIN_VALUES);
        let per_row = cols / QBLOCK;
        let hi = self.hi.chunks_mut(per_chunk * cols, per_chunk * per_row);
        // The second plane's buffers hold these rows only where a row has it.
        let mut lo = any_two.then(|| self.lo.chunks_mut(per_chunk * cols, per_chunk * per_row));
        let chunks = x
            .chunks(per_chunk * cols)
            .zip(self.two.chunks(per_chunk))
            .zip(hi)
            .map(|((x, two), hi)| RowChunk {
                x,
                two,
                hi,
                lo: lo.as_mut().and_then(Iterator::next),
            });
        let work = |c: RowChunk<'_>| quantize_chunk(c, cols);
        if per_chunk < rows {
            chunks.collect::<Vec<_>>().into_par_iter().for_each(work);
        } else {
            chunks.for_each(work);
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The precision row `i` was quantized at.
    pub fn precision(&self, i: usize) -> Precision {
        if self.two.get(i).copied().unwrap_or(false) {
            Precision::Int8x2
        } else {
            Precision::Int8
        }
    }

    /// Row `i`: its planes.
    pub(super) fn row(&self, i: usize) -> ActRow<'_> {
        ActRow {
            hi: self.hi.row(i, self.cols),
            lo: self.two[i].then(|| self.lo.row(i, self.cols)),
        }
    }
}

/// The rows `range` of `rows` as runs of at most [`ROW_GROUP`] consecutive rows of one
/// precision (a row's result never depends on its run).
pub(super) fn precision_runs(
    rows: &[ActRow<'_>],
    range: std::ops::Range<usize>,
) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for i in range {
        match runs.last_mut() {
            Some(g)
                if g.len() < ROW_GROUP && rows[g.start].lo.is_some() == rows[i].lo.is_some() =>
            {
                g.end = i + 1
            }
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub(crate) hi: PlaneRow<'a>,
    pub(crate) lo: Option<PlaneRow<'a>>,
}

impl<'a> ActRow<'a> {
    /// The plane whose scales and sums describe the row's code: the value's alone, or (with
    /// [`Precision::Int8x2`]) the residual's, which describe both planes together.
    #[inline(always)]
    pub(crate) fn scales(&self) -> PlaneRow<'a> {
        self.lo.unwrap_or(self.hi)
    }

    /// The integer `Σ c · q` of the row's code from its planes' dots: `dot_hi`, or
    /// `256 · dot_hi + dot_lo`.
    #[inline(always)]
    pub(crate) fn combine(dot_hi: i32, dot_lo: Option<i32>) -> i32 {
        match dot_lo {
            Some(lo) => (dot_hi << 8) + lo,
            None => dot_hi,
        }
    }
}

/// One plane of one activation row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlaneRow<'a> {
    /// Codes, four to an `i32`.
    pub(crate) q: &'a [i32],
    pub(crate) d: &'a [f32],
    pub(crate) sum: &'a [i32],
    /// Sums of the first 16 codes of each block.
    pub(crate) half: &'a [i32],
    /// Per block, `false` where all its codes are zero.
    pub(crate) coded: &'a [bool],
}

impl PlaneRow<'_> {
    /// `Σ q` over sub-block `h` of block `b`: the whole block (`subs` 1) or its half `h`
    /// (`subs` 2).
    #[inline(always)]
    pub(crate) fn sub_sum(&self, b: usize, h: usize, subs: usize) -> i32 {
        match (subs, h) {
            (1, _) => self.sum[b],
            (_, 0) => self.half[b],
            _ => self.sum[b] - self.half[b],
        }
    }

    /// The codes of block `b`.
    pub(crate) fn block(&self, b: usize) -> [i8; QBLOCK] {
        quad_bytes(&self.q[b * QBLOCK / 4..][..QBLOCK / 4])
    }
}

/// The 32 codes of 8 quads.
fn quad_bytes(quads: &[i32]) -> [i8; QBLOCK] {
    let mut out = [0i8; QBLOCK];
    for (o, q) in out.chunks_exact_mut(4).zip(quads) {
        for (o, b) in o.iter_mut().zip(q.to_le_bytes()) {
            *o = b as i8;
        }
    }
    out
}

/// The residual plane of one row's blocks: `x − d · q_hi` quantized with step `d / 256`
/// (exactly: a power of two), codes into `quads`, `Σ q` and the first half's into `sum`, `half`,
/// for the blocks that `refined` marks; the others' codes and sums are zero.
pub(super) fn quantize_residual(
    x: &[f32],
    hi_quads: &[i32],
    hi_d: &[f32],
    refined: &[bool],
    quads: &mut [i32],
    sum: &mut [i32],
    half: &mut [i32],
) {
    let mut residual = [0.0f32; QBLOCK];
    for (b, x) in x.chunks_exact(QBLOCK).enumerate() {
        let codes = &mut quads[b * QBLOCK / 4..][..QBLOCK / 4];
        if !refined[b] {
            codes.fill(0);
            (sum[b], half[b]) = (0, 0);
            continue;
        }
        let q = quad_bytes(&hi_quads[b * QBLOCK / 4..][..QBLOCK / 4]);
        let d = hi_d[b];
        for ((r, &x), &q) in residual.iter_mut().zip(x).zip(&q) {
            *r = x - d * f32::from(q);
        }
        let id = if d > 0.0 { RESIDUAL_STEPS / d } else { 0.0 };
        (sum[b], half[b]) = quantize_codes(&residual, id, codes);
    }
}

/// Steps of the residual plane per step of the value's: `2^8`, so that the planes combine
/// into one integer (`256 · q_hi + q_lo`) by a shift.
pub(super) const RESIDUAL_STEPS: f32 = 256.0;

/// A block of a row at [`Precision::Int8x2`] gets residual codes when its scale is at least
/// this share of the row's largest block scale. Hidden states have a few outlier channels: on
/// the default model about 30% of the blocks reach it, so a product does about 1.3 instead of
/// 2 planes of integer work, and its perplexity moves by less than 0.2% with every ISQ type
/// (`docs/benchmarks.md`).
pub(super) const REFINE_FROM: f32 = 0.35;

/// Quantizes one block into 8 quads: `(d, Σ q, Σ q of the first 16)`. Rounds to nearest, ties
/// to even, as llama.cpp's SIMD quantizers (`_mm256_round_ps`) do.
pub(super) fn quantize_block(x: &[f32], quads: &mut [i32]) -> (f32, i32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (sum, half) = quantize_codes(x, id, quads);
    (d, sum, half)
}

/// The codes `round(x · id)`, clamped to ±127, into 8 quads: `(Σ q, Σ q of the first 16)`.
fn quantize_codes(x: &[f32], id: f32, quads: &mut [i32]) -> (i32, i32) {
    let (mut sum, mut half) = (0i32, 0i32);
    for (k, (quad, x)) in quads.iter_mut().zip(x.chunks_exact(4)).enumerate() {
        if k == QBLOCK / 8 {
            half = sum;
        }
        let mut bytes = [0u8; 4];
        for (b, &x) in bytes.iter_mut().zip(x) {
            // For a value, |x · id| ≤ 127 up to the rounding of `id`: the clamp only guards
            // the last ulp. A residual is within half a step of the value's (128 of its own)
            // and loses at most one of its steps to the clamp, rarely.
            let v = (x * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            *b = v as u8;
            sum += i32::from(v);
        }
        *quad = i32::from_le_bytes(bytes);
    }
    (sum, half)
}
