//! Helpers shared by the unit tests: a small deterministic RNG and reference products.

/// SplitMix64: deterministic, dependency-free, good enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Normal with mean 0 and standard deviation `std` (Box-Muller).
    pub(crate) fn normal(&mut self, std: f32) -> f32 {
        let u1 = 1.0 - f64::from(self.uniform());
        let u2 = f64::from(self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
    }

    pub(crate) fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(std)).collect()
    }

    /// Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// `x[m, cols] · w[rows, cols]ᵀ` with plain loops, accumulated in f64.
pub(crate) fn naive_matmul(x: &[f32], w: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * rows];
    for i in 0..m {
        for j in 0..rows {
            let dot: f64 = (0..cols)
                .map(|k| f64::from(x[i * cols + k]) * f64::from(w[j * cols + k]))
                .sum();
            out[i * rows + j] = dot as f32;
        }
    }
    out
}

/// Asserts `|actual − expected| ≤ rel · Σ_k |x[i][k] · w[j][k]|` for every output: a relative
/// tolerance on the dot product's own magnitude scale, which (unlike `|expected|`) stays
/// meaningful when the terms cancel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn assert_close_dot(
    actual: &[f32],
    expected: &[f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    rows: usize,
    cols: usize,
    rel: f64,
) {
    for i in 0..m {
        for j in 0..rows {
            let magnitude: f64 = (0..cols)
                .map(|k| f64::from((x[i * cols + k] * w[j * cols + k]).abs()))
                .sum();
            let (a, e) = (actual[i * rows + j], expected[i * rows + j]);
            assert!(
                f64::from((a - e).abs()) <= rel * magnitude,
                "out[{i}][{j}] = {a}, expected {e} (magnitude {magnitude})"
            );
        }
    }
}

/// The shape checks every [`crate::QuantMatrix`] shares, on a 4 x 64 matrix.
pub(crate) fn assert_shape_checks(w: &dyn crate::QuantMatrix) {
    use crate::KernelError;
    assert_eq!((w.rows(), w.cols()), (4, 64));
    let mut out = vec![0.0; 8];
    assert!(matches!(
        w.matmul(&[0.0; 64], 2, &mut out),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        w.matmul(&[0.0; 128], 2, &mut out[..7]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(w.matmul(&[], 0, &mut []).is_ok());
    assert!(matches!(
        w.matmul(&[], usize::MAX, &mut []),
        Err(KernelError::InvalidShape(_))
    ));
    let mut row = vec![0.0; 64];
    assert_eq!(
        w.dequantize_row(4, &mut row),
        Err(KernelError::RowOutOfRange { row: 4, rows: 4 })
    );
    assert!(matches!(
        w.dequantize_row(0, &mut row[..63]),
        Err(KernelError::LengthMismatch { .. })
    ));
}
