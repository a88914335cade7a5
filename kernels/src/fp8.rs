//! FP8 E4M3 weights with one f32 scale per row, and products against them.
//!
//! The format is OCP's E4M3 ("E4M3FN"): 1 sign bit, 4 exponent bits with bias 7, 3 mantissa
//! bits, subnormals, no infinities, and a single NaN pattern per sign (`0x7F`, `0xFF`). The
//! largest finite magnitude is 448. A row is stored as `code[k]` with a scale such that
//! `w[k] ≈ e4m3(code[k]) · scale`; quantization picks `scale = max|w| / 448` so that the row's
//! largest weight lands on the largest code.
//!
//! The SIMD kernels decode 16 codes at a time with an exact bit trick: for a byte `b`, the f16
//! with bits `((b & 0x7F) << 7) | ((b & 0x80) << 8)` equals `e4m3(b) · 2⁻⁸`, for normal and
//! subnormal codes alike (E4M3's exponent field lands in the low four bits of f16's, whose bias
//! is 8 larger, and the mantissa bits line up). A hardware f16 → f32 conversion then yields the
//! scaled weights, and the dot product is multiplied by `2⁸ · scale` at the end. The scalar
//! kernel uses a 256-entry table instead.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;

use rayon::prelude::*;

use crate::cpu::{self, Level};
use crate::error::KernelError;
use crate::matrix::{QuantMatrix, check_len, check_matmul, check_row};
use crate::rowwise;

/// The largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The code of +448, the largest finite E4M3 value.
const MAX_CODE: u8 = 0x7E;
/// The NaN code (with the sign bit clear).
const NAN_CODE: u8 = 0x7F;
/// The smallest positive normal E4M3 value, 2⁻⁶.
const MIN_NORMAL: f32 = 1.0 / 64.0;

/// The value of every E4M3 code.
static DECODE: [f32; 256] = decode_table();

const fn decode_table() -> [f32; 256] {
    let mut table = [0.0; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_slow(code as u8);
        code += 1;
    }
    table
}

/// E4M3 decoding from the definition of the format.
const fn decode_slow(code: u8) -> f32 {
    if code & 0x7F == NAN_CODE {
        return f32::NAN;
    }
    let exponent = ((code >> 3) & 0x0F) as u32;
    let mantissa = (code & 0x07) as u32;
    let magnitude = if exponent == 0 {
        // Subnormal: mantissa · 2⁻⁹ (exact).
        mantissa as f32 / 512.0
    } else {
        // Normal: 2^(exponent − 7) · (1 + mantissa/8), rebiased to f32's exponent bias of 127.
        f32::from_bits(((exponent + 120) << 23) | (mantissa << 20))
    };
    f32::from_bits(magnitude.to_bits() | (((code & 0x80) as u32) << 24))
}

/// The value of the E4M3 byte `code` (NaN for `0x7F` and `0xFF`).
pub fn decode_e4m3(code: u8) -> f32 {
    DECODE[usize::from(code)]
}

/// The E4M3 byte nearest to `x`, ties to even.
///
/// Magnitudes of 448 and above (infinity included) saturate to ±448; values below half the
/// smallest subnormal (2⁻¹⁰) round to a zero of the same sign; NaN maps to the NaN code.
pub fn encode_e4m3(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let magnitude = x.abs();
    if magnitude.is_nan() {
        return sign | NAN_CODE;
    }
    if magnitude >= E4M3_MAX {
        return sign | MAX_CODE;
    }
    let code = if magnitude < MIN_NORMAL {
        // Subnormal range: codes 0..=8 are consecutive multiples of 2⁻⁹ (8 being the smallest
        // normal, 2⁻⁶), so scaling by 2⁹ (exact) and rounding to an integer gives the code.
        (magnitude * 512.0).round_ties_even() as u8
    } else {
        // A normal f32 in [2⁻⁶, 448): the top 11 bits below the sign are the f32 exponent and
        // the 3 leading mantissa bits; rebiasing the exponent (127 → 7) makes them the E4M3
        // code, truncated. Round the 20 dropped bits to nearest even; a carry out of the
        // mantissa correctly bumps the exponent, and cannot pass 448 since magnitude < 448.
        let bits = magnitude.to_bits();
        let truncated = (bits >> 20) - (120 << 3);
        let dropped = bits & 0x000F_FFFF;
        let half = 0x0008_0000;
        let round_up = dropped > half || (dropped == half && truncated & 1 == 1);
        (truncated + u32::from(round_up)) as u8
    };
    sign | code
}

/// A weight matrix in FP8 E4M3 with one f32 scale per row: `w[j][k] ≈ e4m3(data[j][k]) · scales[j]`.
#[derive(Clone, PartialEq)]
pub struct Fp8Weight {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
}

impl fmt::Debug for Fp8Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fp8Weight")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// Quantizes the row-major `rows × cols` matrix `w` to E4M3 with one scale per row.
///
/// Each row gets `scale = max|w| / 448` (1 for an all-zero row), and each weight the code
/// nearest to `w / scale` (ties to even, saturating at ±448). Rows are quantized in parallel.
///
/// # Errors
///
/// [`KernelError::InvalidShape`] for a zero dimension, [`KernelError::LengthMismatch`] if
/// `w.len() != rows * cols`, [`KernelError::NonFinite`] for NaN or infinite weights.
pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Fp8Weight, KernelError> {
    let len = checked_shape(rows, cols)?;
    check_len("weights", w.len(), len)?;
    if let Some(index) = w.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::NonFinite {
            what: "weight",
            index,
        });
    }
    let mut data = vec![0u8; len];
    let mut scales = vec![0.0f32; rows];
    data.par_chunks_mut(cols)
        .zip(scales.par_iter_mut())
        .zip(w.par_chunks(cols))
        .for_each(|((codes, scale), row)| {
            let abs_max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // The `max` keeps the scale positive if the division underflows (denormal rows).
            *scale = if abs_max > 0.0 {
                (abs_max / E4M3_MAX).max(f32::from_bits(1))
            } else {
                1.0
            };
            for (code, &v) in codes.iter_mut().zip(row) {
                *code = encode_e4m3(v / *scale);
            }
        });
    Ok(Fp8Weight {
        rows,
        cols,
        data,
        scales,
    })
}

fn checked_shape(rows: usize, cols: usize) -> Result<usize, KernelError> {
    if rows == 0 || cols == 0 {
        return Err(KernelError::InvalidShape(format!(
            "a weight needs at least one row and one column, got {rows}x{cols}"
        )));
    }
    rows.checked_mul(cols)
        .ok_or_else(|| KernelError::InvalidShape(format!("{rows}x{cols} elements overflow usize")))
}

impl Fp8Weight {
    /// Reassembles a weight from its parts, as returned by [`Fp8Weight::data`] and
    /// [`Fp8Weight::scales`] (for deserialization): `rows * cols` E4M3 bytes, row-major, and
    /// one scale per row.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidShape`] for a zero dimension, [`KernelError::LengthMismatch`] for a
    /// buffer of the wrong length, [`KernelError::NonFinite`] for a NaN or infinite scale, and
    /// [`KernelError::NanCode`] for a NaN byte: weights must be finite, and rejecting NaN codes
    /// here keeps every kernel free of the case.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        scales: Vec<f32>,
    ) -> Result<Fp8Weight, KernelError> {
        let len = checked_shape(rows, cols)?;
        check_len("data", data.len(), len)?;
        check_len("scales", scales.len(), rows)?;
        if let Some(index) = scales.iter().position(|s| !s.is_finite()) {
            return Err(KernelError::NonFinite {
                what: "scale",
                index,
            });
        }
        if let Some(index) = data.iter().position(|&b| b & 0x7F == NAN_CODE) {
            return Err(KernelError::NanCode {
                index,
                code: data[index],
            });
        }
        Ok(Fp8Weight {
            rows,
            cols,
            data,
            scales,
        })
    }

    /// The E4M3 codes, row-major.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The scale of every row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// `dequantize_row` without the checks; `row < rows` and `out.len() == cols`.
    fn dequantize_into(&self, row: usize, out: &mut [f32]) {
        let scale = self.scales[row];
        for (value, &code) in out.iter_mut().zip(self.row_codes(row)) {
            *value = decode_e4m3(code) * scale;
        }
    }

    /// The codes of row `row`.
    fn row_codes(&self, row: usize) -> &[u8] {
        &self.data[row * self.cols..][..self.cols]
    }

    /// [`Fp8Weight::matmul`] at a given SIMD level.
    pub(crate) fn matmul_at(
        &self,
        level: Level,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_matmul(self.rows, self.cols, x, m, out)?;
        rowwise::for_each_weight_row(self.rows, self.cols, m, out, |row, col| {
            let codes = self.row_codes(row);
            match level {
                #[cfg(target_arch = "x86_64")]
                Level::Avx512(token) => x86::row_dots_avx512(token, codes, x, col),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2(token) => x86::row_dots_avx2(token, codes, x, col),
                Level::Scalar => {
                    for (out, x) in col.iter_mut().zip(x.chunks_exact(self.cols)) {
                        *out = codes.iter().zip(x).map(|(&c, &x)| decode_e4m3(c) * x).sum();
                    }
                }
            }
            let scale = self.scales[row];
            for out in col.iter_mut() {
                *out *= scale;
            }
        });
        Ok(())
    }
}

impl QuantMatrix for Fp8Weight {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn storage_bytes(&self) -> usize {
        self.data.len() + size_of::<f32>() * self.scales.len()
    }

    fn format(&self) -> String {
        "FP8".to_string()
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        check_row(self.rows, self.cols, row, out)?;
        self.dequantize_into(row, out);
        Ok(())
    }

    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_at(cpu::level(), x, m, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantMatrix;
    use crate::cpu::supported_levels;
    use crate::test_util::{Rng, assert_close_dot, naive_matmul};
    use half::f16;

    /// Every finite code, in increasing order of value: -448 … -0, +0 … 448.
    fn finite_codes_ascending() -> Vec<u8> {
        let negative = (0x80..=0xFE).rev();
        let positive = 0x00..=0x7E;
        negative.chain(positive).collect()
    }

    #[test]
    fn decoding_follows_the_format() {
        assert_eq!(decode_e4m3(0x00), 0.0);
        assert!(decode_e4m3(0x80).is_sign_negative() && decode_e4m3(0x80) == 0.0);
        assert_eq!(decode_e4m3(0x01), 2f32.powi(-9));
        assert_eq!(decode_e4m3(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(decode_e4m3(0x08), 2f32.powi(-6));
        assert_eq!(decode_e4m3(0x38), 1.0);
        assert_eq!(decode_e4m3(0x3C), 1.5);
        assert_eq!(decode_e4m3(0xC2), -2.5);
        assert_eq!(decode_e4m3(0xC4), -3.0);
        assert_eq!(decode_e4m3(0x7E), 448.0);
        assert_eq!(decode_e4m3(0xFE), -448.0);
        assert!(decode_e4m3(0x7F).is_nan() && decode_e4m3(0xFF).is_nan());
        // Values strictly increase along the code order.
        let values: Vec<f32> = finite_codes_ascending()
            .into_iter()
            .map(decode_e4m3)
            .collect();
        assert_eq!(values.len(), 254);
        assert!(
            values
                .windows(2)
                .all(|w| w[0] < w[1] || (w[0] == 0.0 && w[1] == 0.0))
        );
    }

    #[test]
    fn every_finite_code_round_trips() {
        for code in finite_codes_ascending() {
            assert_eq!(encode_e4m3(decode_e4m3(code)), code, "code 0x{code:02x}");
        }
        assert_eq!(encode_e4m3(f32::NAN), NAN_CODE);
        assert_eq!(encode_e4m3(-f32::NAN), 0xFF);
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        let codes = finite_codes_ascending();
        for pair in codes.windows(2) {
            let (lo, hi) = (pair[0], pair[1]);
            let (a, b) = (decode_e4m3(lo), decode_e4m3(hi));
            if a == 0.0 && b == 0.0 {
                continue;
            }
            // Midpoints need at most 5 significant bits: exact in f32.
            let mid = (a + b) / 2.0;
            let even = if lo & 1 == 0 { lo } else { hi };
            assert_eq!(
                encode_e4m3(mid),
                even,
                "midpoint of 0x{lo:02x} and 0x{hi:02x}"
            );
            let below = f32::from_bits(mid.abs().to_bits() - 1).copysign(mid);
            let above = f32::from_bits(mid.abs().to_bits() + 1).copysign(mid);
            let (toward_lo, toward_hi) = if mid > 0.0 {
                (below, above)
            } else {
                (above, below)
            };
            assert_eq!(
                encode_e4m3(toward_lo),
                lo,
                "just past the midpoint, towards 0x{lo:02x}"
            );
            assert_eq!(
                encode_e4m3(toward_hi),
                hi,
                "just past the midpoint, towards 0x{hi:02x}"
            );
        }
        // Below half the smallest subnormal: signed zero; exactly half: ties to even (zero).
        assert_eq!(encode_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(encode_e4m3(-2f32.powi(-10)), 0x80);
        assert_eq!(encode_e4m3(1e-30), 0x00);
        assert_eq!(encode_e4m3(f32::from_bits(1)), 0x00);
    }

    #[test]
    fn large_values_saturate() {
        for (x, code) in [
            (448.0, 0x7E),
            (449.0, 0x7E),
            (464.0, 0x7E),
            (1e30, 0x7E),
            (f32::INFINITY, 0x7E),
        ] {
            assert_eq!(encode_e4m3(x), code, "{x}");
            assert_eq!(encode_e4m3(-x), code | 0x80, "{}", -x);
        }
        assert_eq!(encode_e4m3(440.0), 0x7E); // between 416 and 448, nearer 448
        assert_eq!(encode_e4m3(432.0), 0x7E); // tie: 448 has the even mantissa
        assert_eq!(encode_e4m3(431.0), 0x7D);
    }

    #[test]
    fn f16_decode_trick_is_exact() {
        for code in finite_codes_ascending() {
            let bits = ((u16::from(code) & 0x7F) << 7) | ((u16::from(code) & 0x80) << 8);
            assert_eq!(
                f16::from_bits(bits).to_f32() * 256.0,
                decode_e4m3(code),
                "0x{code:02x}"
            );
        }
    }

    #[test]
    fn quantization_error_is_within_half_an_ulp() {
        let (rows, cols) = (8, 300);
        let mut w = Rng::new(11).normal_vec(rows * cols, 1.0);
        w[5] = 0.0;
        w[cols + 7] = 1e-4; // subnormal after scaling
        let q = quantize(&w, rows, cols).unwrap();
        let deq = q.dequantize().unwrap();
        for (row, (orig, back)) in w.chunks(cols).zip(deq.chunks(cols)).enumerate() {
            let scale = q.scales()[row];
            let abs_max = orig.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!((scale * 448.0 - abs_max).abs() <= 1e-6 * abs_max);
            for (a, b) in orig.iter().zip(back) {
                // 3 mantissa bits: relative error ≤ 2⁻⁴ for normals, 2⁻¹⁰·scale for subnormals.
                let bound = (a.abs() / 16.0).max(scale / 1024.0) * 1.0001;
                assert!((a - b).abs() <= bound, "row {row}: {a} vs {b}");
            }
        }
        let zero = quantize(&[0.0; 4], 1, 4).unwrap();
        assert_eq!(zero.scales(), &[1.0]);
        assert_eq!(zero.dequantize().unwrap(), vec![0.0; 4]);
        assert_eq!(zero.storage_bytes(), 4 + 4);
    }

    #[test]
    fn matmul_matches_dequantized_product_at_every_level() {
        let mut rng = Rng::new(12);
        for (rows, cols) in [(37, 256), (5, 16), (9, 100), (3, 7), (20, 1000)] {
            let q = quantize(&rng.normal_vec(rows * cols, 0.3), rows, cols).unwrap();
            let deq = q.dequantize().unwrap();
            for m in [1, 3, 4, 9] {
                let x = rng.normal_vec(m * cols, 1.0);
                let expected = naive_matmul(&x, &deq, m, rows, cols);
                for level in supported_levels() {
                    let mut out = vec![f32::NAN; m * rows];
                    q.matmul_at(level, &x, m, &mut out).unwrap();
                    assert_close_dot(&out, &expected, &x, &deq, m, rows, cols, 1e-4);
                }
            }
        }
    }

    #[test]
    fn matmul_is_independent_of_batch_size_and_threads() {
        let mut rng = Rng::new(13);
        let (rows, cols, m) = (150, 1000, 6);
        let q = quantize(&rng.normal_vec(rows * cols, 1.0), rows, cols).unwrap();
        let x = rng.normal_vec(m * cols, 1.0);
        for level in supported_levels() {
            let mut batched = vec![0.0; m * rows];
            q.matmul_at(level, &x, m, &mut batched).unwrap();
            let single_thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut serial = vec![0.0; m * rows];
            single_thread
                .install(|| q.matmul_at(level, &x, m, &mut serial))
                .unwrap();
            assert_eq!(batched, serial, "{level:?}");
            for i in 0..m {
                let mut one = vec![0.0; rows];
                q.matmul_at(level, &x[i * cols..(i + 1) * cols], 1, &mut one)
                    .unwrap();
                assert_eq!(one, batched[i * rows..(i + 1) * rows], "{level:?} row {i}");
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            quantize(&[], 0, 4),
            Err(KernelError::InvalidShape(_))
        ));
        assert!(matches!(
            quantize(&[1.0; 7], 2, 4),
            Err(KernelError::LengthMismatch { .. })
        ));
        assert_eq!(
            quantize(&[1.0, f32::INFINITY], 1, 2),
            Err(KernelError::NonFinite {
                what: "weight",
                index: 1
            })
        );
        let q = quantize(&[1.0, -2.0, 3.0, 0.5, 0.25, 8.0], 2, 3).unwrap();
        let back = Fp8Weight::from_parts(2, 3, q.data().to_vec(), q.scales().to_vec()).unwrap();
        assert_eq!(back, q);
        assert_eq!(
            Fp8Weight::from_parts(2, 3, vec![0, 1, 2, 0xFF, 4, 5], vec![1.0, 1.0]),
            Err(KernelError::NanCode {
                index: 3,
                code: 0xFF
            })
        );
        assert_eq!(
            Fp8Weight::from_parts(2, 3, vec![0; 6], vec![1.0, f32::NAN]),
            Err(KernelError::NonFinite {
                what: "scale",
                index: 1
            })
        );
        assert!(matches!(
            Fp8Weight::from_parts(2, 3, vec![0; 5], vec![1.0; 2]),
            Err(KernelError::LengthMismatch { .. })
        ));
        let mut out = vec![0.0; 4];
        assert!(matches!(
            q.matmul(&[0.0; 5], 2, &mut out),
            Err(KernelError::LengthMismatch { .. })
        ));
        assert!(matches!(
            q.matmul(&[0.0; 6], 2, &mut out[..3]),
            Err(KernelError::LengthMismatch { .. })
        ));
        assert!(q.matmul(&[], 0, &mut []).is_ok());
        let mut row = vec![0.0; 3];
        assert_eq!(
            q.dequantize_row(2, &mut row),
            Err(KernelError::RowOutOfRange { row: 2, rows: 2 })
        );
        q.dequantize_row(1, &mut row).unwrap();
        assert_eq!(row, q.dequantize().unwrap()[3..]);
    }
}
