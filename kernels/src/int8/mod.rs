//! Products with int8 activations against weights repacked for integer dot products (the
//! approach of llama.cpp's and ik_llama.cpp's CPU kernels).
//!
//! **Activations** ([`QuantizedActivations`]) are quantized once per product input, row by row,
//! in blocks of [`QBLOCK`] = 32: `q = round(x / d)` with `d = max|x| / 127`, plus the block sum
//! `Σ q` (and that of its first 16). Products that read the same input (q, k and v; gate and up)
//! share one quantization. At [`Precision::Int8x2`] a second plane quantizes the residual
//! `x − d·q` with step `d / 256`: a row's code is then the integer `256 · q_hi + q_lo` of step
//! `d / 256`, whose products are two `vpdpbusd` sums combined by a shift before one conversion.
//! Only the blocks whose scale is at least `REFINE_FROM` (0.35) of the row's largest get
//! residual codes (hidden states have a few outlier channels, whose blocks carry most of the
//! rounding); the others' are zero, and the kernels skip them. A block's treatment depends on
//! its row alone.
//!
//! **Weights** ([`PackedMatrix`]) are any format whose weight is `w = (c − offset) · s + m` per
//! block of 32 along a row, with an unsigned integer code `c`, a fixed integer `offset`, a scale
//! `s` and a minimum `m` (stored, or 0): the GGML types `Q4_0` (`offset` 8), `Q4_1`, `Q5_0`
//! (`offset` 16), `Q5_1`, `Q8_0` and `Q8_1` (codes `q + 128`, `offset` 128), `Q8_K`, the
//! k-quants (`Q4_K`, `Q5_K` on 32-wide sub-blocks; `Q2_K`, `Q3_K`, `Q6_K` on 16-wide ones, two
//! scales and minimums per block), and HQQ's group-wise `(q − z) · s`. They are repacked at
//! load into tiles of [`TILE_ROWS`] = 16 rows: per tile and block, the codes of the 16 rows interleaved four at a
//! time (so that one 32-bit lane of a vector holds four consecutive codes of one row, what
//! `vpdpbusd` multiplies with four activation bytes), then the 16 scales, then the 16 minimums.
//! Codes of at most 4 bits are stored two per byte.
//!
//! **Product.** For output row `j` and activation row `i`, block by block in order:
//!
//! ```text
//! acc ← fma(f32(Σ c·q − offset · Σ q), s · d, acc)      (per sub-block; the integer sum is exact)
//! acc ← fma(m, d · Σ q, acc)                              (formats with a given minimum)
//! ```
//!
//! Every SIMD level computes exactly these operations on exactly these values, so results are
//! bit-identical across levels, thread counts and batch sizes: an output element depends on
//! its activation row and its weight row alone. A tile's codes are unpacked once per group of up
//! to four activation rows, so a batch of `m` rows reads the weights once.

#[cfg(target_arch = "x86_64")]
mod x86;

mod act;
mod pack;
#[cfg(test)]
mod tests;

use std::fmt;

use half::f16;
use rayon::prelude::*;

use crate::aligned::AlignedBytes;
use crate::columns::{Columns, Strip};
use crate::cpu::{self, Int8Level};
use crate::error::KernelError;
use crate::matrix::{QuantMatrix, check_len, check_matmul, check_row, checked_len};
use crate::rowwise;

pub use act::QuantizedActivations;
pub(crate) use act::{ActRow, PlaneRow};
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
    /// d'·q'`, about 15 bits) in the blocks whose scale is near the row's largest (about 30%
    /// of them on the default model): about 1.3 times one plane's integer products, for
    /// f32-class accuracy.
    Int8x2,
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
    /// A scale (and minimum) per 16 weights, two per block: the k-quants `Q6_K`, `Q3_K` and
    /// `Q2_K`.
    pub sub16: bool,
}

impl PackFormat {
    pub(crate) fn scale_bytes(self) -> usize {
        if self.f32_scales { 4 } else { 2 }
    }

    /// Scales per block and row: 1, or 2 with [`PackFormat::sub16`].
    pub(crate) fn subs(self) -> usize {
        1 + usize::from(self.sub16)
    }

    /// Bytes of one tile's block: codes, scales, minimums.
    pub(crate) fn block_stride(self) -> usize {
        self.code_bytes()
            + TILE_ROWS * self.scale_bytes() * self.subs() * (1 + usize::from(self.has_min))
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
    /// Tile after tile, starting on a cache line.
    data: AlignedBytes,
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
    /// its `cols` codes (each below 16 for [`Codes::Nibbles`]), and per block (per half block
    /// with [`PackFormat::sub16`]) its scale and (with `has_min`) its minimum.
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
        let mut data =
            AlignedBytes::zeroed_for_streaming(checked_len("packed weight", tiles, tile_bytes)?);
        data.as_mut_slice()
            .par_chunks_mut(tile_bytes)
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
        let mut data = AlignedBytes::zeroed_for_streaming(parts.iter().map(|p| p.data.len()).sum());
        let mut rest = data.as_mut_slice();
        for p in parts {
            let (head, tail) = rest.split_at_mut(p.data.len());
            head.copy_from_slice(p.data.as_slice());
            rest = tail;
        }
        Ok(PackedMatrix {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data,
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
        &self.data.as_slice()[t * bytes..][..bytes]
    }

    /// Block `b` of a tile's bytes.
    pub(crate) fn block<'a>(&self, tile: &'a [u8], b: usize) -> TileBlock<'a> {
        let f = self.format;
        let stride = f.block_stride();
        let block = &tile[b * stride..][..stride];
        let (codes, rest) = block.split_at(f.code_bytes());
        let (scales, mins) = rest.split_at(TILE_ROWS * f.scale_bytes() * f.subs());
        TileBlock {
            codes,
            scales,
            mins,
        }
    }

    /// Scale (or minimum) of sub-block `h`, lane `r`, from a block's scale (or minimum) bytes
    /// (`[sub-block][lane]`).
    pub(crate) fn lane_value(&self, bytes: &[u8], h: usize, r: usize) -> f32 {
        let r = h * TILE_ROWS + r;
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

    /// [`PackedMatrix::matmul_quantized`] of a stacked matrix (see [`PackedMatrix::stack`])
    /// into one buffer per part: `outs[k]` gets the `widths[k]` output columns after the
    /// previous parts' (`x.rows() × widths[k]`), so that no stacked result is copied apart.
    ///
    /// # Errors
    ///
    /// [`KernelError::LengthMismatch`] if `x` does not have `cols` columns, the widths do not
    /// add up to `rows` or a buffer's length is not `x.rows()` times its width.
    pub fn matmul_quantized_parts(
        &self,
        x: &QuantizedActivations,
        outs: &mut [&mut [f32]],
        widths: &[usize],
    ) -> Result<(), KernelError> {
        let out = Columns::side_by_side(outs, widths, x.rows, self.rows)?;
        self.matmul_quantized_columns(cpu::int8_level(), cpu::single_stream(), x, out)
    }

    pub(crate) fn matmul_quantized_at(
        &self,
        level: Int8Level,
        x: &QuantizedActivations,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        self.matmul_quantized_with(level, cpu::single_stream(), x, out)
    }

    /// [`Self::matmul_quantized_at`], one group of activation rows reading its tiles as one
    /// stream or not (the same bits either way).
    pub(crate) fn matmul_quantized_with(
        &self,
        level: Int8Level,
        single_stream: bool,
        x: &QuantizedActivations,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let out = Columns::new(out, x.rows, self.rows)?;
        self.matmul_quantized_columns(level, single_stream, x, out)
    }

    fn matmul_quantized_columns(
        &self,
        level: Int8Level,
        single_stream: bool,
        x: &QuantizedActivations,
        mut out: Columns<'_>,
    ) -> Result<(), KernelError> {
        check_len("activation columns", x.cols, self.cols)?;
        let m = x.rows;
        if m == 0 {
            return Ok(());
        }
        let rows: Vec<ActRow<'_>> = (0..m).map(|i| x.row(i)).collect();
        let macs = m.saturating_mul(self.rows).saturating_mul(self.cols);
        let threads = rayon::current_num_threads();
        let parallel = macs >= PARALLEL_MIN_MACS && threads > 1;
        self.tile_pairs(level, &rows, &mut out, parallel, threads, single_stream);
        Ok(())
    }

    /// Every pair of tiles against every row, each task writing its tiles' columns of `out`.
    /// Tasks take pairs of tiles (the AVX-512 kernel shares each activation broadcast between
    /// them) against the rows, so that the weights are read from memory once per chunk of rows
    /// whatever the batch. A long prompt's rows go in chunks ([`rowwise::chunk_rows`]) whose
    /// activations stay in L2 while every tile passes by: without them, each pair of tiles
    /// streamed all the rows' activations from L3 again.
    fn tile_pairs(
        &self,
        level: Int8Level,
        rows: &[ActRow<'_>],
        out: &mut Columns<'_>,
        parallel: bool,
        threads: usize,
        single_stream: bool,
    ) {
        let m = rows.len();
        let tiles = self.tiles();
        let pairs = tiles.div_ceil(2);
        let two_planes = rows.iter().any(|r| r.lo.is_some());
        let chunk = rowwise::chunk_rows(m, self.activation_row_bytes(two_planes));
        // One group of rows (a decode of up to 4 sequences) reads each tile once, from memory,
        // and computes little on it. Where the prefetchers follow one stream better than two,
        // a pair's tiles go one after the other, with no prefetch of the kernel's own: the
        // hardware's runs ahead of a single stream, and asking on top of it made the decode
        // slower. More rows keep the pairs, whose shared broadcasts their arithmetic needs
        // (docs/benchmarks.md).
        let one_stream = m <= ROW_GROUP && single_stream;
        for start in (0..m).step_by(chunk) {
            let groups = act::precision_runs(rows, start..(start + chunk).min(m));
            let task = |strip: Strip<'_, '_>| {
                let first_tile = strip.first() / TILE_ROWS;
                let n_tiles = if first_tile + 1 < tiles { 2 } else { 1 };
                let both = [self.tile(first_tile), self.tile(first_tile + n_tiles - 1)];
                let mut tmp = [0.0f32; 2 * ROW_GROUP * TILE_ROWS];
                if one_stream && let [g] = groups.as_slice() {
                    // The tiles one after the other, each read from memory once.
                    let out = &mut tmp[..g.len() * TILE_ROWS];
                    for (t, &tile) in both[..n_tiles].iter().enumerate() {
                        self.tiles_products(level, &[tile], &rows[g.clone()], out, Prefetch::None);
                        for (i, lanes) in out.as_chunks::<TILE_ROWS>().0.iter().enumerate() {
                            strip.write(g.start + i, t * TILE_ROWS, lanes);
                        }
                    }
                    return;
                }
                // The (up to two) tiles after these (this task's next strip, or the next
                // task's first), which the first group of rows asks the memory for near its
                // tiles' end and the second all along, while it computes from cache.
                let after = first_tile + n_tiles;
                let next = [
                    self.tile(after.min(tiles - 1)),
                    self.tile((after + 1).min(tiles - 1)),
                ];
                let next = &next[..tiles.min(after + 2).saturating_sub(after)];
                let tiles = &both[..n_tiles];
                for (index, g) in groups.iter().enumerate() {
                    let n = g.len();
                    let tmp = &mut tmp[..n_tiles * n * TILE_ROWS];
                    let prefetch = match index {
                        0 => Prefetch::Own(next),
                        1 => Prefetch::Next(next),
                        _ => Prefetch::None,
                    };
                    self.tiles_products(level, tiles, &rows[g.clone()], tmp, prefetch);
                    // `tmp` is `[tiles][rows][16]`.
                    for (t, tile) in tmp.chunks_exact(n * TILE_ROWS).enumerate() {
                        for (i, lanes) in tile.as_chunks::<TILE_ROWS>().0.iter().enumerate() {
                            strip.write(g.start + i, t * TILE_ROWS, lanes);
                        }
                    }
                }
            };
            // Few rows make short tasks, and rayon's splitting costs microseconds a job: one
            // run of tiles per thread then; more, for balance, when the tasks are long.
            let per_thread = if groups.len() > 1 { 4 } else { 1 };
            let min_len = pairs.div_ceil(threads * per_thread);
            out.for_each_strip(2 * TILE_ROWS, parallel, min_len, task);
        }
    }

    /// The bytes of one row's quantized activations, one plane or two (`two_planes`).
    fn activation_row_bytes(&self, two_planes: bool) -> usize {
        let planes = if two_planes { 2 } else { 1 };
        // Per plane and block: the codes, the scale, the sums and the flag.
        planes * self.blocks() * (QBLOCK + 13)
    }

    /// Results of 1 to [`ROW_GROUP`] activation rows against one or two tiles, into `out`
    /// (`[tiles][rows][16]`).
    fn tiles_products(
        &self,
        level: Int8Level,
        tiles: &[&[u8]],
        rows: &[ActRow<'_>],
        out: &mut [f32],
        prefetch: Prefetch<'_>,
    ) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Int8Level::Avx512Vnni(token) => {
                x86::tile_avx512vnni(token, self, tiles, rows, out, prefetch)
            }
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
            Int8Level::Avx512Vnni(token) => {
                x86::tile_avx512vnni(token, self, &[tile], rows, out, Prefetch::Own(&[]))
            }
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
        let subs = f.subs();
        let width = QBLOCK / subs;
        let mut acc = [[0.0f32; TILE_ROWS]; ROW_GROUP];
        let mut codes = [[0u8; QBLOCK]; TILE_ROWS];
        for b in 0..self.blocks() {
            let block = self.block(tile, b);
            pack::unpack_codes(f.codes, block.codes, &mut codes);
            for (acc, row) in acc.iter_mut().zip(rows) {
                let e = row.scales();
                let (hi, lo) = (row.hi.block(b), row.lo.map(|p| p.block(b)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let dot = |q: &[i8; QBLOCK], h: usize| -> i32 {
                        codes[r][h * width..][..width]
                            .iter()
                            .zip(&q[h * width..][..width])
                            .map(|(&c, &q)| i32::from(c) * i32::from(q))
                            .sum()
                    };
                    for h in 0..subs {
                        let s = self.lane_value(block.scales, h, r);
                        let code_dot = ActRow::combine(dot(&hi, h), lo.as_ref().map(|q| dot(q, h)));
                        let isum = code_dot - f.offset * e.sub_sum(b, h, subs);
                        *acc = (isum as f32).mul_add(s * e.d[b], *acc);
                    }
                    if f.has_min {
                        for h in 0..subs {
                            let m = self.lane_value(block.mins, h, r);
                            *acc = m.mul_add(e.d[b] * e.sub_sum(b, h, subs) as f32, *acc);
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

/// What a kernel call asks the memory for while it goes through its tiles' blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Prefetch<'a> {
    /// Its own tiles, a few blocks ahead: they may still be in memory (the first group of rows
    /// to read them). Near their end, the same blocks of the tiles given (those that come
    /// next), so that a run of tiles streams in without a gap between them.
    Own(&'a [&'a [u8]]),
    /// The tiles that come next, block for block: its own are in cache.
    Next(&'a [&'a [u8]]),
    /// Nothing.
    None,
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
            let width = QBLOCK / self.format.subs();
            for (h, (out, codes)) in out
                .chunks_exact_mut(width)
                .zip(codes[r].chunks_exact(width))
                .enumerate()
            {
                let s = self.lane_value(block.scales, h, r);
                if self.format.has_min {
                    let m = self.lane_value(block.mins, h, r);
                    for (w, &c) in out.iter_mut().zip(codes) {
                        *w = (i32::from(c) - self.format.offset) as f32 * s + m;
                    }
                } else {
                    // `(c − offset) · s`: exactly the stored format's `q · d`.
                    for (w, &c) in out.iter_mut().zip(codes) {
                        *w = (i32::from(c) - self.format.offset) as f32 * s;
                    }
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
