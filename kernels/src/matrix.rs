//! What every quantized weight matrix of this crate offers, and the checks they share.

use std::fmt;

use rayon::prelude::*;

use crate::KernelError;

/// A `[rows, cols]` weight matrix in some quantized format: rows dequantize to f32 on demand, and
/// products against f32 activations run without materializing the matrix.
pub trait QuantMatrix: Send + Sync + fmt::Debug {
    /// Number of rows (output features).
    fn rows(&self) -> usize;

    /// Number of columns (input features).
    fn cols(&self) -> usize;

    /// Bytes of storage.
    fn storage_bytes(&self) -> usize;

    /// A short name of the format (`HQQ4`, `FP8`, `Q4_0`).
    fn format(&self) -> String;

    /// Writes row `row` in f32 to `out` (`cols` values).
    ///
    /// # Errors
    ///
    /// [`KernelError::RowOutOfRange`] if `row >= rows`, [`KernelError::LengthMismatch`] if
    /// `out.len() != cols`.
    fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError>;

    /// `out[m, rows] = x[m, cols] · Wᵀ`, i.e. `out[i][j] = Σ_k x[i][k] · W[j][k]` with W the
    /// dequantized weight, using the best SIMD level of the CPU and rayon when the product is
    /// large. Deterministic: `out[i][j]` depends only on row `i` of `x` and row `j` of W, not on
    /// `m` or on the number of threads.
    ///
    /// # Errors
    ///
    /// [`KernelError::LengthMismatch`] if `x.len() != m * cols` or `out.len() != m * rows`.
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError>;

    /// This matrix as int8 tiles, when it is one: its products can then take activations
    /// quantized once for several matrices, and it can be stacked with others.
    fn as_int8(&self) -> Option<&crate::int8::PackedMatrix> {
        None
    }

    /// Whether the weights are f32 values (neither quantized nor a narrower float).
    fn is_f32(&self) -> bool {
        false
    }

    /// The whole matrix in f32, row-major `[rows, cols]`.
    fn dequantize(&self) -> Result<Vec<f32>, KernelError> {
        let cols = self.cols();
        let mut out = vec![0.0; checked_len("matrix", self.rows(), cols)?];
        out.par_chunks_mut(cols.max(1))
            .enumerate()
            .try_for_each(|(row, out)| self.dequantize_row(row, out))?;
        Ok(out)
    }
}

/// `Ok` when a buffer has the length its shape implies.
pub(crate) fn check_len(
    what: &'static str,
    actual: usize,
    expected: usize,
) -> Result<(), KernelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// `a * b`, or an error naming `what` when it overflows.
pub(crate) fn checked_len(what: &str, a: usize, b: usize) -> Result<usize, KernelError> {
    a.checked_mul(b)
        .ok_or_else(|| KernelError::InvalidShape(format!("{what}: {a}x{b} overflows usize")))
}

/// The checks of [`QuantMatrix::dequantize_row`].
pub(crate) fn check_row(
    rows: usize,
    cols: usize,
    row: usize,
    out: &[f32],
) -> Result<(), KernelError> {
    if row >= rows {
        return Err(KernelError::RowOutOfRange { row, rows });
    }
    check_len("output row", out.len(), cols)
}

/// The checks of [`QuantMatrix::matmul`].
pub(crate) fn check_matmul(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &[f32],
) -> Result<(), KernelError> {
    check_len("activations", x.len(), checked_len("activations", m, cols)?)?;
    check_len("output", out.len(), checked_len("output", m, rows)?)
}
