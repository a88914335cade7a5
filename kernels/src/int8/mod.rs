//! Products with int8 activations against weights repacked for integer dot products (the
//! approach of llama.cpp's and ik_llama.cpp's CPU kernels).
//!
//! **Activations** ([`QuantizedActivations`]) are quantized once per product input, row by row,
//! in blocks of [`QBLOCK`] = 32: `q = round(x / d)` with `d = max|x| / 127`, plus the block sum
//! `Σ q`. Products that read the same input (q, k and v; gate and up) share one quantization.
//!
//! **Weights** ([`PackedMatrix`]) are any format whose weight is `w = (c − offset) · s + m` per
//! block of 32 along a row, with an unsigned integer code `c`, a fixed integer `offset`, a scale
//! `s` and a minimum `m` (stored, or 0): the GGML types `Q4_0` (`offset` 8), `Q4_1`, `Q5_0`
//! (`offset` 16), `Q5_1`, `Q8_0` and `Q8_1` (codes `q + 128`, `offset` 128), `Q8_K`, the
//! k-quants with 32-wide sub-blocks (`Q4_K`, `Q5_K`), and HQQ's group-wise `(q − z) · s`. They are repacked at load into tiles of
//! [`TILE_ROWS`] = 16 rows: per tile and block, the codes of the 16 rows interleaved four at a
//! time (so that one 32-bit lane of a vector holds four consecutive codes of one row, what
//! `vpdpbusd` multiplies with four activation bytes), then the 16 scales, then the 16 minimums.
//! Codes of at most 4 bits are stored two per byte.
//!
//! **Product.** For output row `j` and activation row `i`, block by block in order:
//!
//! ```text
//! acc ← fma(f32(Σ c·q − offset · Σ q), s · d, acc)      (the integer sum is exact)
//! acc ← fma(m, d · Σ q, acc)                              (formats with a given minimum)
//! ```
//!
//! Every SIMD level computes exactly these operations on exactly these values, so results are
//! bit-identical across levels, thread counts and batch sizes: an output element depends on
//! its activation row and its weight row alone. A tile's codes are unpacked once per group of up
//! to four activation rows, so a batch of `m` rows reads the weights once.

#[cfg(target_arch = "x86_64")]
mod x86;

mod pack;
#[cfg(test)]
mod tests;

use std::fmt;

use half::f16;
use rayon::prelude::*;

use crate::cpu::{self, Int8Level};
use crate::error::KernelError;
use crate::matrix::{QuantMatrix, check_len, check_matmul, check_row, checked_len};

pub use pack::{Codes, KQuant, from_ggml_blocks, from_hqq, from_kquant_blocks};

/// Weights (and activations) per block.
pub const QBLOCK: usize = 32;
/// Weight rows per tile.
pub const TILE_ROWS: usize = 16;
/// Activation rows that share one unpacking of a tile's codes.
pub(crate) const ROW_GROUP: usize = 4;

/// How finely activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// One 8-bit code per value (llama.cpp's precision).
    #[default]
    Int8,
    /// Two: the 8-bit code of the value, then the 8-bit code of what it leaves (`x ≈ d·q +
    /// d'·q'`, about 15 bits). Twice the integer products, for f32-class accuracy where the
    /// product is bound by memory rather than compute.
    Int8x2,
}

/// One quantization of `[rows, cols]` values: codes, per-block scales and per-block code sums.
#[derive(Debug, Clone, Default)]
struct Plane {
    /// `[rows][cols / 4]` codes, four to a little-endian `i32` (what a 32-bit lane of
    /// `vpdpbusd` multiplies).
    q: Vec<i32>,
    /// `[rows][cols / 32]` scales `d`.
    d: Vec<f32>,
    /// `[rows][cols / 32]` block sums `Σ q`.
    sum: Vec<i32>,
}

impl Plane {
    fn resize(&mut self, values: usize, blocks: usize) {
        self.q.resize(values / 4, 0);
        self.d.resize(blocks, 0.0);
        self.sum.resize(blocks, 0);
    }

    fn row(&self, i: usize, cols: usize) -> PlaneRow<'_> {
        let blocks = cols / QBLOCK;
        PlaneRow {
            q: &self.q[i * cols / 4..][..cols / 4],
            d: &self.d[i * blocks..][..blocks],
            sum: &self.sum[i * blocks..][..blocks],
        }
    }
}

/// Activations `[rows, cols]` quantized to 8 bits per block of [`QBLOCK`]: once, or twice for
/// the rows quantized at [`Precision::Int8x2`].
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivations {
    rows: usize,
    cols: usize,
    hi: Plane,
    /// The residual's quantization, for the rows that have one.
    lo: Plane,
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
        let hi = &mut self.hi;
        for (((x, q), d), sum) in x
            .chunks_exact(QBLOCK)
            .zip(hi.q.chunks_exact_mut(QBLOCK / 4))
            .zip(&mut hi.d)
            .zip(&mut hi.sum)
        {
            (*d, *sum) = quantize_block(x, q);
        }
        if self.two.iter().any(|&t| t) {
            self.lo.resize(rows * cols, blocks);
            let per_row = cols / QBLOCK;
            let mut residual = [0.0f32; QBLOCK];
            for (b, x) in x.chunks_exact(QBLOCK).enumerate() {
                if !self.two[b / per_row] {
                    continue;
                }
                let q = quad_bytes(&self.hi.q[b * QBLOCK / 4..][..QBLOCK / 4]);
                let d = self.hi.d[b];
                for ((r, &x), &q) in residual.iter_mut().zip(x).zip(&q) {
                    *r = x - d * f32::from(q);
                }
                (self.lo.d[b], self.lo.sum[b]) =
                    quantize_block(&residual, &mut self.lo.q[b * QBLOCK / 4..][..QBLOCK / 4]);
            }
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
    fn row(&self, i: usize) -> ActRow<'_> {
        ActRow {
            hi: self.hi.row(i, self.cols),
            lo: self.two[i].then(|| self.lo.row(i, self.cols)),
        }
    }
}

/// The rows `range` of `rows` as runs of at most [`ROW_GROUP`] consecutive rows of one
/// precision (a row's result never depends on its run).
fn precision_runs(
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
    /// The row's planes: the value's codes, then (with [`Precision::Int8x2`]) the residual's.
    #[inline(always)]
    pub(crate) fn planes(&self) -> impl Iterator<Item = PlaneRow<'a>> + use<'a> {
        std::iter::once(self.hi).chain(self.lo)
    }
}

/// One plane of one activation row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlaneRow<'a> {
    /// Codes, four to an `i32`.
    pub(crate) q: &'a [i32],
    pub(crate) d: &'a [f32],
    pub(crate) sum: &'a [i32],
}

impl PlaneRow<'_> {
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

/// Quantizes one block into 8 quads: `(d, Σ q)`. Round half away from zero, as llama.cpp's
/// `roundf`.
fn quantize_block(x: &[f32], quads: &mut [i32]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (quad, x) in quads.iter_mut().zip(x.chunks_exact(4)) {
        let mut bytes = [0u8; 4];
        for (b, &x) in bytes.iter_mut().zip(x) {
            // |x · id| ≤ 127 (up to rounding of `id`), so the clamp only guards the last ulp.
            let v = (x * id).round().clamp(-127.0, 127.0) as i8;
            *b = v as u8;
            sum += i32::from(v);
        }
        *quad = i32::from_le_bytes(bytes);
    }
    (d, sum)
}

/// How a packed format stores its codes, scales and minimums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackFormat {
    /// The format's name, for logs (`Q4_1`, `HQQ4`).
    pub name: &'static str,
    /// Codes of at most 4 bits (two per byte) or 8.
    pub codes: Codes,
    /// Scales (and minimums) stored as f32 rather than f16.
    pub f32_scales: bool,
    /// Whether a minimum is stored per block.
    pub has_min: bool,
    /// The integer subtracted from every code (`w = (c − offset) · s + m`). 8-bit codes that
    /// reach 128 must use 128 (the AVX2 kernel then multiplies them as signed bytes).
    pub offset: i32,
}

impl PackFormat {
    pub(crate) fn scale_bytes(self) -> usize {
        if self.f32_scales { 4 } else { 2 }
    }

    /// Bytes of one tile's block: codes, scales, minimums.
    pub(crate) fn block_stride(self) -> usize {
        self.code_bytes() + TILE_ROWS * self.scale_bytes() * (1 + usize::from(self.has_min))
    }

    pub(crate) fn code_bytes(self) -> usize {
        match self.codes {
            Codes::Nibbles => TILE_ROWS * QBLOCK / 2,
            Codes::Bytes => TILE_ROWS * QBLOCK,
        }
    }
}

/// A `rows × cols` weight matrix repacked for int8 products (see the module documentation).
#[derive(Clone, PartialEq, Eq)]
pub struct PackedMatrix {
    pub(crate) format: PackFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("format", &self.format.name)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// One block of one tile, as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TileBlock<'a> {
    pub(crate) codes: &'a [u8],
    pub(crate) scales: &'a [u8],
    pub(crate) mins: &'a [u8],
}

impl PackedMatrix {
    /// Packs `rows` rows given by `row_fn(row, codes, scales, mins)`, which fills, for one row,
    /// its `cols` codes (each below 16 for [`Codes::Nibbles`]), and per block its scale and
    /// (with `has_min`) its minimum.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidShape`] for a zero dimension, a `cols` that is not a multiple of
    /// [`QBLOCK`] or a size that overflows; an error of `row_fn`, or a code too large for a
    /// nibble.
    pub fn pack<F>(
        format: PackFormat,
        rows: usize,
        cols: usize,
        row_fn: F,
    ) -> Result<Self, KernelError>
    where
        F: Fn(usize, &mut [u8], &mut [f32], &mut [f32]) -> Result<(), KernelError> + Sync,
    {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(QBLOCK) {
            return Err(KernelError::InvalidShape(format!(
                "an int8 weight needs rows and a multiple of {QBLOCK} columns, got {rows}x{cols}"
            )));
        }
        let blocks = cols / QBLOCK;
        let tiles = rows.div_ceil(TILE_ROWS);
        let tile_bytes = checked_len("tile", blocks, format.block_stride())?;
        let mut data = vec![0u8; checked_len("packed weight", tiles, tile_bytes)?];
        data.par_chunks_mut(tile_bytes)
            .enumerate()
            .try_for_each(|(tile, out)| pack::pack_tile(format, tile, rows, cols, out, &row_fn))?;
        Ok(PackedMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    pub fn format(&self) -> PackFormat {
        self.format
    }

    /// The matrices stacked row-wise into one (`[Σ rows, cols]`), so that products that read
    /// the same input (q, k and v; gate and up) run as one. Every part but the last must have
    /// a whole number of tiles; all must share the format and the column count.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidShape`] when they do not stack.
    pub fn stack(parts: &[&PackedMatrix]) -> Result<PackedMatrix, KernelError> {
        let first = parts
            .first()
            .ok_or_else(|| KernelError::InvalidShape("nothing to stack".into()))?;
        for (i, p) in parts.iter().enumerate() {
            if p.format != first.format || p.cols != first.cols {
                return Err(KernelError::InvalidShape(format!(
                    "part {i} is {} with {} columns, part 0 {} with {}",
                    p.format.name, p.cols, first.format.name, first.cols
                )));
            }
            if i + 1 < parts.len() && !p.rows.is_multiple_of(TILE_ROWS) {
                return Err(KernelError::InvalidShape(format!(
                    "part {i} has {} rows, not a whole number of {TILE_ROWS}-row tiles",
                    p.rows
                )));
            }
        }
        Ok(PackedMatrix {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        })
    }

    fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }

    fn blocks(&self) -> usize {
        self.cols / QBLOCK
    }

    /// The packed bytes of tile `t`.
    fn tile(&self, t: usize) -> &[u8] {
        let bytes = self.blocks() * self.format.block_stride();
        &self.data[t * bytes..][..bytes]
    }

    /// Block `b` of a tile's bytes.
    pub(crate) fn block<'a>(&self, tile: &'a [u8], b: usize) -> TileBlock<'a> {
        let f = self.format;
        let stride = f.block_stride();
        let block = &tile[b * stride..][..stride];
        let (codes, rest) = block.split_at(f.code_bytes());
        let (scales, mins) = rest.split_at(TILE_ROWS * f.scale_bytes());
        TileBlock {
            codes,
            scales,
            mins,
        }
    }

    /// Scale (or minimum) of lane `r` from a block's scale bytes.
    pub(crate) fn lane_value(&self, bytes: &[u8], r: usize) -> f32 {
        if self.format.f32_scales {
            f32::from_le_bytes([
                bytes[4 * r],
                bytes[4 * r + 1],
                bytes[4 * r + 2],
                bytes[4 * r + 3],
            ])
        } else {
            f16::from_le_bytes([bytes[2 * r], bytes[2 * r + 1]]).to_f32()
        }
    }

    /// `out[m, rows] = x · Wᵀ` for activations already quantized (shared by every product
    /// that reads the same input), at the best level of this CPU.
    ///
    /// # Errors
    ///
    /// [`KernelError::LengthMismatch`] if `x` does not have `cols` columns or `out` is not
    /// `x.rows() × rows`.
    pub fn matmul_quantized(
        &self,
        x: &QuantizedActivations,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        self.matmul_quantized_at(cpu::int8_level(), x, out)
    }

    pub(crate) fn matmul_quantized_at(
        &self,
        level: Int8Level,
        x: &QuantizedActivations,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_len("activation columns", x.cols, self.cols)?;
        let m = x.rows;
        check_len("output", out.len(), checked_len("output", m, self.rows)?)?;
        if m == 0 {
            return Ok(());
        }
        let rows: Vec<ActRow<'_>> = (0..m).map(|i| x.row(i)).collect();
        let macs = m.saturating_mul(self.rows).saturating_mul(self.cols);
        let threads = rayon::current_num_threads();
        let parallel = macs >= PARALLEL_MIN_MACS && threads > 1;
        if m > ROW_GROUP * 2 {
            // Many rows (prefill): tasks take groups of rows, and write their outputs in
            // place; every task reads the whole matrix (from cache: one matrix is small).
            let task = |(g, out): (usize, &mut [f32])| {
                let first = g * ROW_GROUP;
                let n = out.len() / self.rows;
                self.rows_against_all_tiles(level, &rows[first..first + n], out);
            };
            let chunk = ROW_GROUP * self.rows;
            if parallel {
                // A few groups per task: rayon's splitting costs microseconds a job.
                let groups = m.div_ceil(ROW_GROUP);
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .with_min_len(groups.div_ceil(threads * 4).max(1))
                    .for_each(task);
            } else {
                out.chunks_mut(chunk).enumerate().for_each(task);
            }
            return Ok(());
        }
        // Few rows (decode): tasks take pairs of tiles (the AVX-512 kernel shares each
        // activation broadcast between them), all rows; per tile, `[m][16]` results,
        // scattered into `out` at the end.
        let tiles = self.tiles();
        let mut scratch = vec![0.0f32; tiles * m * TILE_ROWS];
        let groups = precision_runs(&rows, 0..m);
        let task = |(pair, buf): (usize, &mut [f32])| {
            let n_tiles = buf.len() / (m * TILE_ROWS);
            let both = [self.tile(2 * pair), self.tile(2 * pair + n_tiles - 1)];
            let tiles = &both[..n_tiles];
            let mut tmp = [0.0f32; 2 * ROW_GROUP * TILE_ROWS];
            for g in &groups {
                let n = g.len();
                let tmp = &mut tmp[..n_tiles * n * TILE_ROWS];
                self.tiles_products(level, tiles, &rows[g.clone()], tmp);
                for t in 0..n_tiles {
                    for i in 0..n {
                        buf[(t * m + g.start + i) * TILE_ROWS..][..TILE_ROWS]
                            .copy_from_slice(&tmp[(t * n + i) * TILE_ROWS..][..TILE_ROWS]);
                    }
                }
            }
        };
        let pair_len = 2 * m * TILE_ROWS;
        if parallel {
            // One contiguous run of tiles per thread: few rows make short tasks, and rayon's
            // splitting costs microseconds a job.
            let pairs = tiles.div_ceil(2);
            scratch
                .par_chunks_mut(pair_len)
                .enumerate()
                .with_min_len(pairs.div_ceil(threads).max(1))
                .for_each(task);
        } else {
            scratch.chunks_mut(pair_len).enumerate().for_each(task);
        }
        for (t, tile) in scratch.chunks_exact(m * TILE_ROWS).enumerate() {
            let first = t * TILE_ROWS;
            let valid = TILE_ROWS.min(self.rows - first);
            for (i, lanes) in tile.chunks_exact(TILE_ROWS).enumerate() {
                out[i * self.rows + first..][..valid].copy_from_slice(&lanes[..valid]);
            }
        }
        Ok(())
    }

    /// Up to [`ROW_GROUP`] activation rows against every tile, into `out` (`[rows][self.rows]`).
    fn rows_against_all_tiles(&self, level: Int8Level, rows: &[ActRow<'_>], out: &mut [f32]) {
        let tiles = self.tiles();
        let mut tmp = [0.0f32; 2 * ROW_GROUP * TILE_ROWS];
        for g in precision_runs(rows, 0..rows.len()) {
            let n = g.len();
            for pair in 0..tiles.div_ceil(2) {
                let n_tiles = (tiles - 2 * pair).min(2);
                let both = [self.tile(2 * pair), self.tile(2 * pair + n_tiles - 1)];
                let tmp = &mut tmp[..n_tiles * n * TILE_ROWS];
                self.tiles_products(level, &both[..n_tiles], &rows[g.clone()], tmp);
                for t in 0..n_tiles {
                    let first = (2 * pair + t) * TILE_ROWS;
                    let valid = TILE_ROWS.min(self.rows - first);
                    for i in 0..n {
                        out[(g.start + i) * self.rows + first..][..valid]
                            .copy_from_slice(&tmp[(t * n + i) * TILE_ROWS..][..valid]);
                    }
                }
            }
        }
    }

    /// Results of 1 to [`ROW_GROUP`] activation rows against one or two tiles, into `out`
    /// (`[tiles][rows][16]`).
    fn tiles_products(
        &self,
        level: Int8Level,
        tiles: &[&[u8]],
        rows: &[ActRow<'_>],
        out: &mut [f32],
    ) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx512Vnni(token) => x86::tile_avx512vnni(token, self, tiles, rows, out),
            _ => {
                for (tile, out) in tiles.iter().zip(out.chunks_mut(rows.len() * TILE_ROWS)) {
                    self.tile_products(level, tile, rows, out);
                }
            }
        }
    }

    /// Results of 1 to [`ROW_GROUP`] activation rows against one tile, into `out`
    /// (`[rows][16]`).
    fn tile_products(&self, level: Int8Level, tile: &[u8], rows: &[ActRow<'_>], out: &mut [f32]) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx512Vnni(token) => x86::tile_avx512vnni(token, self, &[tile], rows, out),
            #[cfg(target_arch = "x86_64")]
            Int8Level::AvxVnni(token) => x86::tile_avxvnni(token, self, tile, rows, out),
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx2(token) => x86::tile_avx2(token, self, tile, rows, out),
            Int8Level::Scalar => self.tile_scalar(tile, rows, out),
        }
    }

    /// The portable kernel: the same operations as the SIMD ones, lane by lane.
    fn tile_scalar(&self, tile: &[u8], rows: &[ActRow<'_>], out: &mut [f32]) {
        let f = self.format;
        let mut acc = [[0.0f32; TILE_ROWS]; ROW_GROUP];
        let mut codes = [[0u8; QBLOCK]; TILE_ROWS];
        for b in 0..self.blocks() {
            let block = self.block(tile, b);
            pack::unpack_codes(f.codes, block.codes, &mut codes);
            for (acc, row) in acc.iter_mut().zip(rows) {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let s = self.lane_value(block.scales, r);
                    for p in row.planes() {
                        let q = p.block(b);
                        let dot: i32 = codes[r]
                            .iter()
                            .zip(&q)
                            .map(|(&c, &q)| i32::from(c) * i32::from(q))
                            .sum();
                        let isum = dot - f.offset * p.sum[b];
                        *acc = (isum as f32).mul_add(s * p.d[b], *acc);
                    }
                    if f.has_min {
                        let m = self.lane_value(block.mins, r);
                        for p in row.planes() {
                            *acc = m.mul_add(p.d[b] * p.sum[b] as f32, *acc);
                        }
                    }
                }
            }
        }
        for (out, acc) in out.chunks_exact_mut(TILE_ROWS).zip(&acc) {
            out.copy_from_slice(acc);
        }
    }
}

/// Products with fewer multiply-adds than this run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 17;

impl QuantMatrix for PackedMatrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    fn format(&self) -> String {
        format!("{} (int8 tiles)", self.format.name)
    }

    fn as_int8(&self) -> Option<&PackedMatrix> {
        Some(self)
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        check_row(self.rows, self.cols, row, out)?;
        let (tile, r) = (self.tile(row / TILE_ROWS), row % TILE_ROWS);
        let mut codes = [[0u8; QBLOCK]; TILE_ROWS];
        for (b, out) in out.chunks_exact_mut(QBLOCK).enumerate() {
            let block = self.block(tile, b);
            pack::unpack_codes(self.format.codes, block.codes, &mut codes);
            let s = self.lane_value(block.scales, r);
            if self.format.has_min {
                let m = self.lane_value(block.mins, r);
                for (w, &c) in out.iter_mut().zip(&codes[r]) {
                    *w = (i32::from(c) - self.format.offset) as f32 * s + m;
                }
            } else {
                // `(c − offset) · s`: exactly the stored format's `q · d`.
                for (w, &c) in out.iter_mut().zip(&codes[r]) {
                    *w = (i32::from(c) - self.format.offset) as f32 * s;
                }
            }
        }
        Ok(())
    }

    /// Quantizes `x` to int8 blocks at [`Precision::Int8x2`], then multiplies (see the module
    /// documentation).
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        check_matmul(self.rows, self.cols, x, m, out)?;
        let mut q = QuantizedActivations::default();
        q.quantize_from(x, m, self.cols, Precision::Int8x2)?;
        self.matmul_quantized(&q, out)
    }
}
