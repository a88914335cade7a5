//! Weights stored in GGML block formats, and products of f32 activations against them.
//!
//! The formats are the legacy GGML quantizations plus `Q8_K`, with exactly the byte layouts of
//! ggml's `ggml-common.h` (packed `#[repr(C)]` blocks, little-endian, `f16` = IEEE half). Each
//! block holds [`BlockType::block_size`] consecutive weights of a row:
//!
//! | type   | bytes | fields                                          | weight `j`               |
//! |--------|-------|-------------------------------------------------|--------------------------|
//! | `Q4_0` | 18    | `d: f16, qs: [u8; 16]`                          | `(q_j − 8) · d`          |
//! | `Q4_1` | 20    | `d: f16, m: f16, qs: [u8; 16]`                  | `q_j · d + m`            |
//! | `Q5_0` | 22    | `d: f16, qh: [u8; 4], qs: [u8; 16]`             | `(q_j − 16) · d`         |
//! | `Q5_1` | 24    | `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`     | `q_j · d + m`            |
//! | `Q8_0` | 34    | `d: f16, qs: [i8; 32]`                          | `q_j · d`                |
//! | `Q8_1` | 36    | `d: f16, s: f16, qs: [i8; 32]`                  | `q_j · d` (`s` unused)   |
//! | `Q8_K` | 292   | `d: f32, qs: [i8; 256], bsums: [i16; 16]`       | `q_j · d` (`bsums` unused) |
//!
//! In the 4- and 5-bit formats, `qs[j]` holds weight `j` in its low nibble and weight `j + 16`
//! in its high nibble; the 5-bit formats take the fifth bit of weight `j` from bit `j` of the
//! little-endian `u32` `qh`. The result is computed in f32 as written (`q · d`, then `+ m`,
//! not fused), as ggml's `dequantize_row_*` do; see [`BlockWeight::dequantize_row`].
//!
//! Products ([`BlockWeight::matmul`]) do not quantize the activations: they equal the f32
//! product of the activations with the dequantized weights up to the reassociation of the
//! sums, and never materialise a dequantized matrix. The AVX-512 kernel of the 4- and 5-bit
//! formats multiplies the activations by exactly the dequantized weights (it applies `d` and
//! `m` to a table of the 32 code values per block, then looks the codes up); the other kernels
//! compute `d · Σ q·x` per block, plus `m · Σ x` for the formats with a minimum (with the block
//! sums of `x` computed once per call). Blocks are accumulated in f32 in a fixed order, so a
//! result does not depend on the batch size or the thread count.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;

use half::f16;

use crate::cpu::{self, Level};
use crate::error::KernelError;
use crate::matrix::{QuantMatrix, check_len, check_matmul, check_row, checked_len};
use crate::rowwise::{self, Activations};

/// Weights per `Q8_K` block (ggml's `QK_K`).
const QK_K: usize = 256;

/// A GGML block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// 4-bit codes with one f16 scale per block of 32: `(q − 8) · d`.
    Q4_0,
    /// 4-bit codes with an f16 scale and minimum per block of 32: `q · d + m`.
    Q4_1,
    /// 5-bit codes with one f16 scale per block of 32: `(q − 16) · d`.
    Q5_0,
    /// 5-bit codes with an f16 scale and minimum per block of 32: `q · d + m`.
    Q5_1,
    /// 8-bit signed codes with one f16 scale per block of 32: `q · d`.
    Q8_0,
    /// 8-bit signed codes with an f16 scale (and an f16 sum, unused here) per block of 32:
    /// `q · d`.
    Q8_1,
    /// 8-bit signed codes with one f32 scale (and 16 partial sums, unused here) per block of
    /// 256: `q · d`.
    Q8K,
}

impl BlockType {
    /// Weights per block: 256 for [`BlockType::Q8K`], 32 for the others.
    pub fn block_size(self) -> usize {
        match self {
            BlockType::Q8K => QK_K,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q5_0 => 22,
            BlockType::Q5_1 => 24,
            BlockType::Q8_0 => 34,
            BlockType::Q8_1 => 36,
            BlockType::Q8K => 4 + QK_K + 2 * 16,
        }
    }

    /// Whether a weight is `q · d + m` (rather than `q · d`).
    fn has_min(self) -> bool {
        matches!(self, BlockType::Q4_1 | BlockType::Q5_1)
    }
}

/// A `rows × cols` weight matrix stored in a GGML block format, rows made of consecutive
/// blocks.
#[derive(Clone, PartialEq, Eq)]
pub struct BlockWeight {
    dtype: BlockType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl fmt::Debug for BlockWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockWeight")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// The f16 stored little-endian in `bytes`, in f32 (exact).
fn f16_le(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
}

impl BlockWeight {
    /// Wraps GGML block data.
    ///
    /// `data` holds `rows * cols / block_size` blocks, row-major (each row is
    /// `cols / block_size` consecutive blocks), in the layout of `dtype` (see the module
    /// documentation). Only sizes are checked: scales and minimums that are NaN or infinite are
    /// accepted (and propagate into the results), as ggml does.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidShape`] for a zero dimension, a `cols` that is not a multiple of
    /// the block size, or a size that overflows `usize`; [`KernelError::LengthMismatch`] if
    /// `data` does not hold exactly the blocks of the matrix.
    pub fn new(
        dtype: BlockType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, KernelError> {
        if rows == 0 || cols == 0 {
            return Err(KernelError::InvalidShape(format!(
                "a weight needs at least one row and one column, got {rows}x{cols}"
            )));
        }
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(KernelError::InvalidShape(format!(
                "{dtype:?} blocks of {block} weights do not divide the {cols} columns"
            )));
        }
        let row_bytes = checked_len("row bytes", cols / block, dtype.block_bytes())?;
        let bytes = checked_len("weight bytes", rows, row_bytes)?;
        check_len("data", data.len(), bytes)?;
        Ok(BlockWeight {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// The block format.
    pub fn dtype(&self) -> BlockType {
        self.dtype
    }

    /// The blocks, row-major, as passed to [`BlockWeight::new`].
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes of one row of blocks.
    fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.block_bytes()
    }

    /// The blocks of row `row` (`row < rows`).
    fn row_data(&self, row: usize) -> &[u8] {
        let row_bytes = self.row_bytes();
        &self.data[row * row_bytes..][..row_bytes]
    }

    /// [`BlockWeight::matmul`] at a given SIMD level.
    pub(crate) fn matmul_at(
        &self,
        level: Level,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_matmul(self.rows, self.cols, x, m, out)?;
        let size = self.dtype.block_size();
        let n_blocks = self.cols / size;
        // The block sums of `x`, for the `m · Σ x` term of the types with a minimum.
        let (sums, sums_stride) = if self.dtype.has_min() {
            let sums: Vec<f32> = x.chunks_exact(size).map(|b| b.iter().sum()).collect();
            (sums, n_blocks)
        } else {
            (Vec::new(), 0)
        };
        let acts = Activations {
            x,
            sums: &sums,
            cols: self.cols,
            stride: sums_stride,
        };
        rowwise::for_each_weight_row(self.rows, self.cols, m, out, |row, col| {
            self.row_products(level, row, &acts, col);
        });
        Ok(())
    }

    /// `col[i] = x[i] · W[row]` for every activation row `i`.
    fn row_products(&self, level: Level, row: usize, acts: &Activations<'_>, col: &mut [f32]) {
        let data = self.row_data(row);
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512(token) => x86::row_products_avx512(token, self.dtype, data, acts, col),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2(token) => x86::row_products_avx2(token, self.dtype, data, acts, col),
            Level::Scalar => {
                for (i, out) in col.iter_mut().enumerate() {
                    let (x, sums) = acts.row(i);
                    *out = self.dot_scalar(data, x, sums);
                }
            }
        }
    }

    /// The portable kernel: `x · W[row]`, for the blocks `data` of the row, given the block
    /// sums of `x` (empty for the types without a minimum).
    fn dot_scalar(&self, data: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let (size, bytes) = (self.dtype.block_size(), self.dtype.block_bytes());
        let mut codes = [0.0; QK_K];
        let mut total = 0.0;
        let mut correction = 0.0;
        let blocks = data.chunks_exact(bytes).zip(x.chunks_exact(size));
        for (b, (block, x)) in blocks.enumerate() {
            let (d, m) = decode_block(self.dtype, block, &mut codes);
            let dot: f32 = codes.iter().zip(x).map(|(q, x)| q * x).sum();
            total += d * dot;
            if let Some(&sum) = sums.get(b) {
                correction += m * sum;
            }
        }
        total + correction
    }
}

impl QuantMatrix for BlockWeight {
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
        format!("{:?}", self.dtype)
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        check_row(self.rows, self.cols, row, out)?;
        let (size, bytes) = (self.dtype.block_size(), self.dtype.block_bytes());
        let mut codes = [0.0; QK_K];
        for (block, out) in self
            .row_data(row)
            .chunks_exact(bytes)
            .zip(out.chunks_exact_mut(size))
        {
            let (d, m) = decode_block(self.dtype, block, &mut codes);
            if self.dtype.has_min() {
                for (w, &q) in out.iter_mut().zip(&codes) {
                    *w = q * d + m;
                }
            } else {
                for (w, &q) in out.iter_mut().zip(&codes) {
                    *w = q * d;
                }
            }
        }
        Ok(())
    }

    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_at(cpu::level(), x, m, out)
    }
}

/// Decodes one block (`dtype.block_bytes()` bytes): writes its integer codes as f32 to the
/// first `dtype.block_size()` entries of `codes` (already minus 8 or 16 for `Q4_0` and
/// `Q5_0`) and returns `(d, m)` (`m` is 0 for the types without a minimum).
fn decode_block(dtype: BlockType, block: &[u8], codes: &mut [f32; QK_K]) -> (f32, f32) {
    let d = f16_le([block[0], block[1]]);
    match dtype {
        BlockType::Q4_0 => {
            decode_nibbles(&block[2..18], 0, -8, codes);
            (d, 0.0)
        }
        BlockType::Q4_1 => {
            decode_nibbles(&block[4..20], 0, 0, codes);
            (d, f16_le([block[2], block[3]]))
        }
        BlockType::Q5_0 => {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            decode_nibbles(&block[6..22], qh, -16, codes);
            (d, 0.0)
        }
        BlockType::Q5_1 => {
            let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
            decode_nibbles(&block[8..24], qh, 0, codes);
            (d, f16_le([block[2], block[3]]))
        }
        BlockType::Q8_0 => {
            decode_bytes(&block[2..34], codes);
            (d, 0.0)
        }
        BlockType::Q8_1 => {
            decode_bytes(&block[4..36], codes);
            (d, 0.0)
        }
        BlockType::Q8K => {
            decode_bytes(&block[4..4 + QK_K], codes);
            (
                f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
                0.0,
            )
        }
    }
}

/// The 32 codes of a 4- or 5-bit block: `qs[j]` holds codes `j` (low nibble) and `j + 16`
/// (high nibble), bit `j` of `qh` is the fifth bit of code `j` (all zero for 4 bits), and
/// `offset` is added to every code.
fn decode_nibbles(qs: &[u8], qh: u32, offset: i32, codes: &mut [f32; QK_K]) {
    let (low, high) = codes.split_at_mut(16);
    for (j, ((&q, low), high)) in qs.iter().zip(low).zip(high).enumerate() {
        let high_bit = |bit: usize| (((qh >> bit) & 1) << 4) as i32;
        *low = (i32::from(q & 0x0F) + high_bit(j) + offset) as f32;
        *high = (i32::from(q >> 4) + high_bit(j + 16) + offset) as f32;
    }
}

/// The signed 8-bit codes `qs`.
fn decode_bytes(qs: &[u8], codes: &mut [f32; QK_K]) {
    for (code, &q) in codes.iter_mut().zip(qs) {
        *code = f32::from(q as i8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::supported_levels;
    use crate::test_util::assert_shape_checks;
    use crate::test_util::{Rng, assert_close_dot, naive_matmul};

    const ALL: [BlockType; 7] = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q8_0,
        BlockType::Q8_1,
        BlockType::Q8K,
    ];

    /// A finite random f16, normal with standard deviation `std`, as little-endian bytes.
    fn random_f16(rng: &mut Rng, std: f32) -> [u8; 2] {
        f16::from_f32(rng.normal(std)).to_le_bytes()
    }

    /// `n_blocks` blocks of `dtype` with random codes (and random unused fields) and finite
    /// random scales and minimums.
    pub(super) fn random_blocks(rng: &mut Rng, dtype: BlockType, n_blocks: usize) -> Vec<u8> {
        let bytes = dtype.block_bytes();
        let mut data: Vec<u8> = (0..n_blocks * bytes)
            .map(|_| rng.next_u64() as u8)
            .collect();
        for block in data.chunks_exact_mut(bytes) {
            match dtype {
                BlockType::Q8K => {
                    block[..4].copy_from_slice(&rng.normal(0.01).to_le_bytes());
                }
                _ => {
                    block[..2].copy_from_slice(&random_f16(rng, 0.01));
                    if dtype.has_min() {
                        block[2..4].copy_from_slice(&random_f16(rng, 0.08));
                    }
                }
            }
        }
        data
    }

    fn random_weight(rng: &mut Rng, dtype: BlockType, rows: usize, n_blocks: usize) -> BlockWeight {
        let data = random_blocks(rng, dtype, rows * n_blocks);
        BlockWeight::new(dtype, rows, n_blocks * dtype.block_size(), data).unwrap()
    }

    fn dequantize(w: &BlockWeight) -> Vec<f32> {
        let mut out = vec![0.0; w.rows() * w.cols()];
        for (row, out) in out.chunks_exact_mut(w.cols()).enumerate() {
            w.dequantize_row(row, out).unwrap();
        }
        out
    }

    fn f16_at(b: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }

    /// ggml's `dequantize_row_*` (ggml-quants.c), transcribed line by line for one block.
    fn ggml_dequantize_block(dtype: BlockType, b: &[u8], y: &mut [f32]) {
        let qk = 32;
        match dtype {
            BlockType::Q4_0 => {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                for j in 0..qk / 2 {
                    let x0 = (qs[j] & 0x0F) as i32 - 8;
                    let x1 = (qs[j] >> 4) as i32 - 8;
                    y[j] = x0 as f32 * d;
                    y[j + qk / 2] = x1 as f32 * d;
                }
            }
            BlockType::Q4_1 => {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..];
                for j in 0..qk / 2 {
                    let x0 = (qs[j] & 0x0F) as i32;
                    let x1 = (qs[j] >> 4) as i32;
                    y[j] = x0 as f32 * d + m;
                    y[j + qk / 2] = x1 as f32 * d + m;
                }
            }
            BlockType::Q5_0 => {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..];
                for j in 0..qk / 2 {
                    let xh_0 = ((qh >> j) << 4) & 0x10;
                    let xh_1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((qs[j] as u32 & 0x0F) | xh_0) as i32 - 16;
                    let x1 = ((qs[j] as u32 >> 4) | xh_1) as i32 - 16;
                    y[j] = x0 as f32 * d;
                    y[j + qk / 2] = x1 as f32 * d;
                }
            }
            BlockType::Q5_1 => {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..];
                for j in 0..qk / 2 {
                    let xh_0 = ((qh >> j) << 4) & 0x10;
                    let xh_1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((qs[j] as u32 & 0x0F) | xh_0) as i32;
                    let x1 = ((qs[j] as u32 >> 4) | xh_1) as i32;
                    y[j] = x0 as f32 * d + m;
                    y[j + qk / 2] = x1 as f32 * d + m;
                }
            }
            BlockType::Q8_0 => {
                let d = f16_at(b, 0);
                for j in 0..qk {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
            BlockType::Q8_1 => {
                let d = f16_at(b, 0);
                for j in 0..qk {
                    y[j] = (b[4 + j] as i8) as f32 * d;
                }
            }
            BlockType::Q8K => {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for j in 0..QK_K {
                    y[j] = d * (b[4 + j] as i8) as f32;
                }
            }
        }
    }

    #[test]
    fn block_sizes_match_ggml() {
        let sizes: Vec<_> = ALL
            .iter()
            .map(|t| (t.block_size(), t.block_bytes()))
            .collect();
        assert_eq!(
            sizes,
            [
                (32, 18),
                (32, 20),
                (32, 22),
                (32, 24),
                (32, 34),
                (32, 36),
                (256, 292)
            ]
        );
    }

    #[test]
    fn dequantize_row_is_bit_exact_with_ggml() {
        let mut rng = Rng::new(11);
        for dtype in ALL {
            let (rows, n_blocks) = (5, 7);
            let w = random_weight(&mut rng, dtype, rows, n_blocks);
            let mut got = vec![0.0; w.cols()];
            let mut expected = vec![f32::NAN; w.cols()];
            for row in 0..rows {
                w.dequantize_row(row, &mut got).unwrap();
                let blocks = w.row_data(row).chunks_exact(dtype.block_bytes());
                for (block, y) in blocks.zip(expected.chunks_exact_mut(dtype.block_size())) {
                    ggml_dequantize_block(dtype, block, y);
                }
                let got_bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                let expected_bits: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got_bits, expected_bits, "{dtype:?} row {row}");
            }
        }
    }

    #[test]
    fn dequantize_row_decodes_known_blocks() {
        // Q4_0, d = 0.5: byte 0x9F is code 15 (weight 3.5) low and code 9 (weight 0.5) high.
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 0x9F;
        let w = BlockWeight::new(BlockType::Q4_0, 1, 32, block).unwrap();
        let mut out = vec![0.0; 32];
        w.dequantize_row(0, &mut out).unwrap();
        assert_eq!((out[0], out[16]), (3.5, 0.5));
        assert!(out[1..16].iter().chain(&out[17..]).all(|&v| v == -4.0));

        // Q5_1, d = 1, m = -16: qh bit 0 and bit 17 set give codes 16 + 0 and 16 + 1.
        let mut block = vec![0u8; 24];
        block[..2].copy_from_slice(&f16::ONE.to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(-16.0).to_le_bytes());
        block[4..8].copy_from_slice(&(1u32 | 1 << 17).to_le_bytes());
        block[8 + 1] = 0x10;
        let w = BlockWeight::new(BlockType::Q5_1, 1, 32, block).unwrap();
        w.dequantize_row(0, &mut out).unwrap();
        assert_eq!((out[0], out[1], out[16], out[17]), (0.0, -16.0, -16.0, 1.0));
    }

    /// `(rows, blocks per row)` of the product tests: one block, tile remainders, and rows that
    /// are not a multiple of the rows per task.
    const SHAPES: [(usize, usize); 4] = [(37, 8), (5, 1), (19, 3), (40, 18)];

    #[test]
    fn matmul_matches_dequantized_product_at_every_level() {
        let mut rng = Rng::new(12);
        for dtype in ALL {
            for (rows, n_blocks) in SHAPES {
                let w = random_weight(&mut rng, dtype, rows, n_blocks);
                let cols = w.cols();
                let deq = dequantize(&w);
                for m in [1, 3, 4, 9] {
                    let x = rng.normal_vec(m * cols, 1.0);
                    let expected = naive_matmul(&x, &deq, m, rows, cols);
                    for level in supported_levels() {
                        let mut out = vec![f32::NAN; m * rows];
                        w.matmul_at(level, &x, m, &mut out).unwrap();
                        assert_close_dot(&out, &expected, &x, &deq, m, rows, cols, 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn simd_levels_agree_with_scalar() {
        let mut rng = Rng::new(13);
        for dtype in ALL {
            let (rows, n_blocks, m) = (33, 4096 / dtype.block_size(), 5);
            let w = random_weight(&mut rng, dtype, rows, n_blocks);
            let deq = dequantize(&w);
            let x = rng.normal_vec(m * w.cols(), 1.0);
            let mut scalar = vec![0.0; m * rows];
            w.matmul_at(Level::Scalar, &x, m, &mut scalar).unwrap();
            for level in supported_levels() {
                let mut out = vec![0.0; m * rows];
                w.matmul_at(level, &x, m, &mut out).unwrap();
                assert_close_dot(&out, &scalar, &x, &deq, m, rows, w.cols(), 1e-5);
            }
        }
    }

    #[test]
    fn matmul_is_independent_of_batch_size_and_threads() {
        let mut rng = Rng::new(14);
        let single_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for dtype in ALL {
            let (rows, m) = (200, 7);
            let w = random_weight(&mut rng, dtype, rows, 1024 / dtype.block_size());
            let cols = w.cols();
            let x = rng.normal_vec(m * cols, 1.0);
            for level in supported_levels() {
                let mut batched = vec![0.0; m * rows];
                w.matmul_at(level, &x, m, &mut batched).unwrap();
                let mut serial = vec![0.0; m * rows];
                single_thread
                    .install(|| w.matmul_at(level, &x, m, &mut serial))
                    .unwrap();
                assert_eq!(batched, serial, "{dtype:?} {level:?}");
                for i in 0..m {
                    let mut one = vec![0.0; rows];
                    w.matmul_at(level, &x[i * cols..(i + 1) * cols], 1, &mut one)
                        .unwrap();
                    assert_eq!(
                        one,
                        batched[i * rows..(i + 1) * rows],
                        "{dtype:?} {level:?} row {i}"
                    );
                }
                // Rows 2..6 are tiled differently when they are the start of the batch.
                let mut shifted = vec![0.0; 4 * rows];
                w.matmul_at(level, &x[2 * cols..6 * cols], 4, &mut shifted)
                    .unwrap();
                assert_eq!(shifted, batched[2 * rows..6 * rows], "{dtype:?} {level:?}");
            }
        }
    }

    #[test]
    fn non_finite_scales_are_accepted_and_propagate() {
        let mut rng = Rng::new(15);
        let mut data = random_blocks(&mut rng, BlockType::Q8_0, 2);
        data[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        data[34..36].copy_from_slice(&f16::INFINITY.to_le_bytes());
        let w = BlockWeight::new(BlockType::Q8_0, 2, 32, data).unwrap();
        let mut row = vec![0.0; 32];
        w.dequantize_row(0, &mut row).unwrap();
        assert!(row.iter().all(|v| v.is_nan()));
        for level in supported_levels() {
            let mut out = vec![0.0; 2];
            w.matmul_at(level, &[1.0; 32], 1, &mut out).unwrap();
            assert!(out[0].is_nan() && !out[1].is_finite(), "{level:?}");
        }
    }

    #[test]
    fn accessors_report_the_construction() {
        let mut rng = Rng::new(16);
        let data = random_blocks(&mut rng, BlockType::Q5_1, 6);
        let w = BlockWeight::new(BlockType::Q5_1, 3, 64, data.clone()).unwrap();
        assert_eq!(
            (w.dtype(), w.rows(), w.cols(), w.storage_bytes()),
            (BlockType::Q5_1, 3, 64, 6 * 24)
        );
        assert_eq!(w.data(), data);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let q4 = |rows, cols, len| BlockWeight::new(BlockType::Q4_0, rows, cols, vec![0; len]);
        assert!(matches!(q4(0, 32, 0), Err(KernelError::InvalidShape(_))));
        assert!(matches!(q4(2, 0, 0), Err(KernelError::InvalidShape(_))));
        assert!(matches!(q4(2, 48, 36), Err(KernelError::InvalidShape(_))));
        assert!(matches!(
            BlockWeight::new(BlockType::Q8K, 1, 32, vec![0; 36]),
            Err(KernelError::InvalidShape(_))
        ));
        assert!(matches!(
            q4(usize::MAX, 64, 36),
            Err(KernelError::InvalidShape(_))
        ));
        assert!(matches!(
            BlockWeight::new(BlockType::Q8K, 1, usize::MAX / 256 * 256, vec![0; 292]),
            Err(KernelError::InvalidShape(_))
        ));
        assert_eq!(
            q4(2, 64, 71),
            Err(KernelError::LengthMismatch {
                what: "data",
                expected: 72,
                actual: 71
            })
        );

        let w = q4(4, 64, 4 * 36).unwrap();
        assert_shape_checks(&w);
    }
}
