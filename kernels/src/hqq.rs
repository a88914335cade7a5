//! Half-Quadratic Quantization (HQQ) of weight matrices, and products against them.
//!
//! HQQ (Badri & Shaji, 2023) is a calibration-free, group-wise asymmetric quantizer. Each group
//! of `group` consecutive weights along a row gets a scale and a zero point; the zero point is
//! then refined by proximal iterations that minimise an ℓp reconstruction error with p = 0.7.
//! That sparsity-promoting loss lets a few outliers keep a large error instead of dragging the
//! whole grid towards them, which is where plain min-max rounding loses accuracy. The iteration
//! is the one of `optimize_weights_proximal_legacy` in the reference implementation
//! (mobiusml/hqq), with its defaults; see [`quantize`] for the details and the few places where
//! this implementation differs.
//!
//! Layout: a weight dequantizes as `(code - zero) * scale`, with one f16 `scale` and one f16
//! `zero` per group. Codes are stored in the row-major order of the whole matrix; 4-bit codes
//! are packed two per byte, the element with the even index in the low nibble.
//!
//! Products ([`HqqWeight::matmul`]) never materialise f32 weights. Per group they compute
//! `scale · (Σ code·x − zero · Σ x)`, with the `Σ x` of every group computed once per call.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;

use half::f16;
use rayon::prelude::*;

use crate::cpu::{self, Level};
use crate::error::KernelError;
use crate::matrix::{QuantMatrix, check_len, check_matmul, check_row};
use crate::rowwise::{self, Activations};

/// Exponent p of the ℓp reconstruction loss (hqq's `lp_norm`).
const LP_NORM: f32 = 0.7;
/// Initial weight of the quadratic coupling term (hqq's `beta`).
const BETA: f32 = 10.0;
/// Growth factor of `BETA` per iteration (hqq's `kappa`).
const KAPPA: f32 = 1.01;
/// Maximum number of proximal iterations (hqq's `iters`).
const ITERS: usize = 20;
/// Upper bound on the inverse scale, as in hqq: keeps near-constant groups from getting an
/// enormous one.
const MAX_INV_SCALE: f32 = 2e4;
/// Upper bound on `|zero|`, in code units. A narrow group far from zero (say all weights in
/// [4.0, 4.0005]) would otherwise get a zero point beyond f16's range, or one so large that f16
/// cannot place it to within a code. Groups that contain 0 are never affected, since their
/// zero point lies in `[0, 2^bits - 1]`.
const MAX_ABS_ZERO: f32 = 1024.0;
/// The SIMD kernels consume codes 16 at a time, so they need group sizes that are multiples of
/// 16 (every group size used in practice); other group sizes use the scalar kernel.
const SIMD_GROUP_MULTIPLE: usize = 16;

/// A weight matrix quantized with HQQ: `rows × cols` codes of `bits` bits, with an f16 scale and
/// zero point per group of `group` consecutive weights along a row.
#[derive(Clone, PartialEq)]
pub struct HqqWeight {
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    zeros: Vec<f16>,
}

impl fmt::Debug for HqqWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HqqWeight")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bits", &self.bits)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// Quantizes the row-major `rows × cols` matrix `w` to `bits` ∈ {4, 8} bits with HQQ, in groups
/// of `group` consecutive weights along a row (`cols % group == 0`).
///
/// Per group, with `qmax = 2^bits − 1`:
///
/// 1. min-max initialisation as in hqq: inverse scale `s = qmax / (max − min)`, clamped to at
///    most 2·10⁴, and zero point `z = −min · s`;
/// 2. up to 20 proximal iterations, exactly hqq's update (p = 0.7, β = 10, κ = 1.01):
///    `q = clamp(round(w·s + z), 0, qmax)`, `r = (q − z)/s`, `e = shrink_p(w − r, β)`,
///    `z = mean(q − (w − e)·s)`, `β ← κβ`, stopping as soon as the error `mean|w − r|` stops
///    improving;
/// 3. codes `clamp(round(w·s + z), 0, qmax)`, stored with `scale = 1/s` and `zero = z` in f16.
///
/// Differences from the reference implementation, all deliberate:
///
/// - the stopping test and the error are per group rather than over the whole tensor, and the
///   zero point kept is the best one seen (hqq keeps the one computed in the iteration that
///   failed to improve). A group's result therefore does not depend on the rest of the matrix,
///   and its ℓ1 error is never worse than that of the min-max initialisation (up to the f16
///   rounding of the zero point);
/// - the scale is rounded to f16 *before* the iterations, and the final codes are computed with
///   the f16 zero point, so that the codes are optimal for the values actually stored;
/// - the inverse scale is also clamped so that `|zero| ≤ 1024` (see `MAX_ABS_ZERO`);
/// - a constant group is stored so that it dequantizes to its value: exactly when that value is
///   an f16 (zero included), otherwise with a relative error below 10⁻⁵ (about 10⁻⁷ in f16's
///   normal range).
///
/// Rounding is to nearest, ties to even (as `torch.round`). Groups are quantized in parallel.
///
/// # Errors
///
/// [`KernelError::UnsupportedBits`] for `bits` other than 4 or 8, [`KernelError::InvalidShape`]
/// for a zero dimension or a `group` that does not divide `cols`,
/// [`KernelError::LengthMismatch`] if `w.len() != rows * cols`, [`KernelError::NonFinite`] for
/// NaN or infinite weights, and [`KernelError::ScaleOverflow`] for a group whose range is too
/// wide for an f16 scale (beyond about 65504 · qmax).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
) -> Result<HqqWeight, KernelError> {
    let len = checked_shape(rows, cols, bits, group)?;
    check_len("weights", w.len(), len)?;
    if let Some(index) = w.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::NonFinite {
            what: "weight",
            index,
        });
    }
    let qmax = f32::from((1u16 << bits) - 1);
    let n_groups = len / group;
    let mut codes = vec![0u8; len];
    let mut scales = vec![f16::ZERO; n_groups];
    let mut zeros = vec![f16::ZERO; n_groups];
    w.par_chunks(group)
        .zip(codes.par_chunks_mut(group))
        .zip(scales.par_iter_mut().zip(zeros.par_iter_mut()))
        .enumerate()
        .try_for_each(|(index, ((weights, codes), (scale, zero)))| {
            let params = quantize_group(weights, qmax, codes)
                .ok_or(KernelError::ScaleOverflow { group: index })?;
            (*scale, *zero) = params;
            Ok(())
        })?;
    if bits == 4 {
        // Low nibble first: the pair [even, odd] becomes `odd << 4 | even` (a final unpaired
        // code keeps the high nibble zero).
        codes = codes
            .chunks(2)
            .map(|pair| {
                pair.iter()
                    .rev()
                    .fold(0u8, |byte, &code| (byte << 4) | code)
            })
            .collect();
    }
    Ok(HqqWeight {
        rows,
        cols,
        bits,
        group,
        codes,
        scales,
        zeros,
    })
}

/// Quantizes one group into `codes` (one code per byte) and returns its f16 (scale, zero), or
/// `None` if the scale does not fit in an f16.
fn quantize_group(w: &[f32], qmax: f32, codes: &mut [u8]) -> Option<(f16, f16)> {
    let (min, max) = w
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if min == max {
        return constant_group(min, codes);
    }
    let abs_max = min.abs().max(max.abs());
    let inv_scale = (qmax / (max - min))
        .min(MAX_INV_SCALE)
        .min(MAX_ABS_ZERO / abs_max);
    let scale = f16::from_f32(1.0 / inv_scale);
    if !scale.is_finite() {
        return None;
    }
    // From here on, work with the scale that will be stored.
    let scale_f32 = scale.to_f32();
    let inv_scale = 1.0 / scale_f32;
    let zero = f16::from_f32(optimize_zero(w, inv_scale, -min * inv_scale, qmax));
    let zero_f32 = zero.to_f32();
    for (code, &v) in codes.iter_mut().zip(w) {
        // In [0, qmax] ⊂ [0, 255] after the clamp, so the cast is exact.
        *code = quantize_value(v, inv_scale, zero_f32, qmax) as u8;
    }
    Some((scale, zero))
}

/// Parameters for a group whose weights all equal `v`.
///
/// Every code is 1; the scale is `v` rounded to f16 and the zero point absorbs that rounding:
/// `(1 − zero) · scale` is `v` exactly when `v` is an f16, and otherwise off only by the f16
/// rounding of the small correction `zero`. Returns `None` if `v` is beyond f16's range.
fn constant_group(v: f32, codes: &mut [u8]) -> Option<(f16, f16)> {
    codes.fill(1);
    let scale = f16::from_f32(v);
    if scale.is_infinite() {
        return None;
    }
    if scale == f16::ZERO {
        // `v` is 0 (or too small for f16): (1 − 1) · 1 = 0.
        return Some((f16::ONE, f16::ONE));
    }
    Some((scale, f16::from_f32(1.0 - v / scale.to_f32())))
}

/// `clamp(round(w · inv_scale + zero), 0, qmax)`, the code of `w`.
fn quantize_value(w: f32, inv_scale: f32, zero: f32, qmax: f32) -> f32 {
    (w * inv_scale + zero).round_ties_even().clamp(0.0, qmax)
}

/// hqq's proximal iterations for the zero point of one group, from the initial `zero`, for the
/// inverse scale `inv_scale`. Returns the zero point with the lowest mean absolute error.
fn optimize_zero(w: &[f32], inv_scale: f32, mut zero: f32, qmax: f32) -> f32 {
    let n = w.len() as f32;
    let mut beta = BETA;
    let mut best = (f32::INFINITY, zero);
    for _ in 0..ITERS {
        let threshold = shrink_threshold(beta);
        let mut abs_error = 0.0;
        let mut zero_sum = 0.0;
        for &v in w {
            let q = quantize_value(v, inv_scale, zero, qmax);
            let residual = v - (q - zero) / inv_scale;
            let sparse_error = shrink_lp(residual, beta, threshold);
            zero_sum += q - (v - sparse_error) * inv_scale;
            abs_error += residual.abs();
        }
        let error = abs_error / n;
        if error >= best.0 {
            break;
        }
        best = (error, zero);
        zero = zero_sum / n;
        beta *= KAPPA;
    }
    best.1
}

/// The magnitude at or below which [`shrink_lp`] returns 0: `|x| − |x|^(p−1)/β ≤ 0` exactly when
/// `|x|^(2−p) ≤ 1/β`, i.e. `|x| ≤ β^(−1/(2−p))`.
fn shrink_threshold(beta: f32) -> f32 {
    beta.powf(-1.0 / (2.0 - LP_NORM))
}

/// hqq's generalised soft-thresholding operator `sign(x) · max(|x| − |x|^(p−1)/β, 0)`, the
/// proximal operator of the ℓp penalty. `threshold` is [`shrink_threshold`]`(beta)`: testing it
/// first skips the `powf` for the (usual) small residuals and handles `x = 0`, where
/// `|x|^(p−1)` is infinite.
fn shrink_lp(x: f32, beta: f32, threshold: f32) -> f32 {
    let magnitude = x.abs();
    if magnitude <= threshold {
        return 0.0;
    }
    (magnitude - magnitude.powf(LP_NORM - 1.0) / beta)
        .max(0.0)
        .copysign(x)
}

/// The number of elements of a valid `rows × cols` matrix quantized to `bits` in groups of
/// `group`.
fn checked_shape(rows: usize, cols: usize, bits: u8, group: usize) -> Result<usize, KernelError> {
    if bits != 4 && bits != 8 {
        return Err(KernelError::UnsupportedBits(bits));
    }
    if rows == 0 || cols == 0 {
        return Err(KernelError::InvalidShape(format!(
            "a weight needs at least one row and one column, got {rows}x{cols}"
        )));
    }
    if group == 0 || !cols.is_multiple_of(group) {
        return Err(KernelError::InvalidShape(format!(
            "group size {group} does not divide the {cols} columns"
        )));
    }
    rows.checked_mul(cols)
        .ok_or_else(|| KernelError::InvalidShape(format!("{rows}x{cols} elements overflow usize")))
}

/// Bytes taken by `len` codes of `bits` bits.
fn code_bytes(len: usize, bits: u8) -> usize {
    if bits == 4 { len.div_ceil(2) } else { len }
}

impl HqqWeight {
    /// Reassembles a quantized weight from its parts, as returned by [`HqqWeight::codes`],
    /// [`HqqWeight::scales`] and [`HqqWeight::zeros`] (for deserialization).
    ///
    /// `codes` holds `rows * cols` codes in row-major order (4-bit codes two per byte, low
    /// nibble first, `ceil(rows * cols / 2)` bytes); `scales` and `zeros` hold one value per
    /// group, in the same order.
    ///
    /// # Errors
    ///
    /// The shape errors of [`quantize`]; [`KernelError::LengthMismatch`] if a buffer has the
    /// wrong length; [`KernelError::NonFinite`] for a NaN or infinite scale or zero point.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        bits: u8,
        group: usize,
        codes: Vec<u8>,
        scales: Vec<f16>,
        zeros: Vec<f16>,
    ) -> Result<HqqWeight, KernelError> {
        let len = checked_shape(rows, cols, bits, group)?;
        check_len("codes", codes.len(), code_bytes(len, bits))?;
        check_len("scales", scales.len(), len / group)?;
        check_len("zeros", zeros.len(), len / group)?;
        for (what, values) in [("scale", &scales), ("zero", &zeros)] {
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                return Err(KernelError::NonFinite { what, index });
            }
        }
        Ok(HqqWeight {
            rows,
            cols,
            bits,
            group,
            codes,
            scales,
            zeros,
        })
    }

    /// Bits per code: 4 or 8.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Number of consecutive weights along a row that share a scale and zero point.
    pub fn group(&self) -> usize {
        self.group
    }

    /// The codes, row-major; 4-bit codes are packed two per byte, low nibble first.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The scale of every group, row-major.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }

    /// The zero point of every group, row-major.
    pub fn zeros(&self) -> &[f16] {
        &self.zeros
    }

    /// `dequantize_row` without the checks; `row < rows` and `out.len() == cols`.
    fn dequantize_into(&self, row: usize, out: &mut [f32]) {
        let first = row * self.cols;
        let first_group = first / self.group;
        let params = self.scales[first_group..]
            .iter()
            .zip(&self.zeros[first_group..]);
        for (g, (out, (scale, zero))) in out.chunks_exact_mut(self.group).zip(params).enumerate() {
            let (scale, zero) = (scale.to_f32(), zero.to_f32());
            let base = first + g * self.group;
            for (k, value) in out.iter_mut().enumerate() {
                *value = (f32::from(self.code(base + k)) - zero) * scale;
            }
        }
    }

    /// The code of element `index` of the row-major matrix.
    pub(crate) fn code(&self, index: usize) -> u8 {
        if self.bits == 4 {
            (self.codes[index / 2] >> (4 * (index % 2))) & 0x0F
        } else {
            self.codes[index]
        }
    }

    /// [`HqqWeight::matmul`] at a given SIMD level.
    pub(crate) fn matmul_at(
        &self,
        level: Level,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_matmul(self.rows, self.cols, x, m, out)?;
        let sums: Vec<f32> = x
            .chunks_exact(self.group)
            .map(|group| group.iter().sum())
            .collect();
        let acts = Activations {
            x,
            sums: &sums,
            cols: self.cols,
            stride: self.cols / self.group,
        };
        let level = if self.group.is_multiple_of(SIMD_GROUP_MULTIPLE) {
            level
        } else {
            Level::Scalar
        };
        rowwise::for_each_weight_row(self.rows, self.cols, m, out, |row, col| {
            self.row_products(level, row, &acts, col);
        });
        Ok(())
    }

    /// `col[i] = x[i] · W[row]` for every activation row `i`.
    fn row_products(&self, level: Level, row: usize, acts: &Activations<'_>, col: &mut [f32]) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512(token) => {
                x86::row_products_avx512(token, &self.packed_row(row), acts, col)
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2(token) => x86::row_products_avx2(token, &self.packed_row(row), acts, col),
            Level::Scalar => {
                for (i, out) in col.iter_mut().enumerate() {
                    let (x, sums) = acts.row(i);
                    *out = self.dot_scalar(row, x, sums);
                }
            }
        }
    }

    /// The portable kernel: `x · W[row]`, given the group sums of `x`.
    fn dot_scalar(&self, row: usize, x: &[f32], sums: &[f32]) -> f32 {
        let first = row * self.cols;
        let first_group = first / self.group;
        let mut total = 0.0;
        for (g, (x, &sum)) in x.chunks_exact(self.group).zip(sums).enumerate() {
            let base = first + g * self.group;
            let dot: f32 = x
                .iter()
                .enumerate()
                .map(|(k, &x)| f32::from(self.code(base + k)) * x)
                .sum();
            let scale = self.scales[first_group + g].to_f32();
            let zero = self.zeros[first_group + g].to_f32();
            total += scale * (dot - zero * sum);
        }
        total
    }

    /// Row `row` in the byte-aligned form the SIMD kernels read. Only valid when the group size
    /// is a multiple of 16, which makes every row start on a byte boundary.
    #[cfg(target_arch = "x86_64")]
    fn packed_row(&self, row: usize) -> PackedRow<'_> {
        let row_bytes = code_bytes(self.cols, self.bits);
        let n_groups = self.cols / self.group;
        PackedRow {
            codes: &self.codes[row * row_bytes..][..row_bytes],
            scales: &self.scales[row * n_groups..][..n_groups],
            zeros: &self.zeros[row * n_groups..][..n_groups],
            bits: self.bits,
            group: self.group,
        }
    }
}

impl QuantMatrix for HqqWeight {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn storage_bytes(&self) -> usize {
        self.codes.len() + size_of::<f16>() * (self.scales.len() + self.zeros.len())
    }

    fn format(&self) -> String {
        format!("HQQ{}", self.bits)
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

/// One weight row, for the SIMD kernels.
#[cfg(target_arch = "x86_64")]
struct PackedRow<'a> {
    /// `cols` codes, byte-aligned.
    codes: &'a [u8],
    scales: &'a [f16],
    zeros: &'a [f16],
    /// 4 or 8.
    bits: u8,
    /// A multiple of 16.
    group: usize,
}

#[cfg(test)]
mod tests;
