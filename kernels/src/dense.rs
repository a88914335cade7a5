//! Weights kept in a float format (f32, f16 or bf16), and their products against f32
//! activations: the weights a model runs without in-situ quantization.
//!
//! Every output element `out[i][j] = Σ_k W[j][k] · x[i][k]` has one sequence of operations, at
//! every SIMD level and for any batch size or thread count:
//! 1. 16 lanes, lane `l` accumulating the fused multiply-adds of columns `l, l + 16, l + 32, …`
//!    in that order (a half or bfloat16 weight widens to f32 exactly first);
//! 2. the lanes summed in a fixed tree: `l + (l + 8)`, then `+ 4`, then `+ 2`, then the last two;
//! 3. the columns past the last multiple of 16, one at a time (a multiply, then an add).
//!
//! So the AVX-512, AVX2 and scalar kernels agree bit for bit, and a row's result does not
//! depend on the rows it was computed with. The SIMD kernels block 4 weight rows by 4
//! activation rows, so each loaded vector serves four multiply-adds. A single activation row (a
//! decode, which reads every weight from memory) reads its weight rows 4 side by side, or one
//! by one where the CPU's prefetcher follows one stream better than four short ones (Zen 4:
//! [`crate::cpu::dense_single_row_side_by_side`]); the bits are the same.

#[cfg(target_arch = "x86_64")]
mod x86;

use half::{bf16, f16};

use crate::KernelError;
use crate::aligned::AlignedValues;
use crate::cpu::{self, Level};
use crate::matrix::{QuantMatrix, check_len, check_matmul, checked_len};
use crate::rowwise;

/// The values of a dense matrix, row-major.
#[derive(Clone, PartialEq)]
pub enum DenseData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl DenseData {
    fn len(&self) -> usize {
        match self {
            DenseData::F32(v) => v.len(),
            DenseData::F16(v) => v.len(),
            DenseData::Bf16(v) => v.len(),
        }
    }

    /// The format's name (`f32`, `f16`, `bf16`).
    pub fn name(&self) -> &'static str {
        match self {
            DenseData::F32(_) => "f32",
            DenseData::F16(_) => "f16",
            DenseData::Bf16(_) => "bf16",
        }
    }
}

impl std::fmt::Debug for DenseData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.name(), self.len())
    }
}

/// A `[rows, cols]` weight matrix of f32, f16 or bf16 values.
#[derive(Clone)]
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    data: Values,
}

impl std::fmt::Debug for DenseMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DenseMatrix({}[{}x{}])",
            self.data.name(),
            self.rows,
            self.cols
        )
    }
}

/// The values as a product reads them: on a cache line, and on transparent huge pages where
/// there are enough of them (as the int8 tiles are, `crate::huge`): a decode streams them.
#[derive(Clone)]
enum Values {
    F32(AlignedValues<f32>),
    F16(AlignedValues<f16>),
    Bf16(AlignedValues<bf16>),
}

impl Values {
    fn new(data: &DenseData) -> Self {
        match data {
            DenseData::F32(v) => Values::F32(AlignedValues::for_streaming(v)),
            DenseData::F16(v) => Values::F16(AlignedValues::for_streaming(v)),
            DenseData::Bf16(v) => Values::Bf16(AlignedValues::for_streaming(v)),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Values::F32(_) => "f32",
            Values::F16(_) => "f16",
            Values::Bf16(_) => "bf16",
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Values::F32(v) => std::mem::size_of_val(v.as_slice()),
            Values::F16(v) => std::mem::size_of_val(v.as_slice()),
            Values::Bf16(v) => std::mem::size_of_val(v.as_slice()),
        }
    }
}

/// Weight rows one kernel call covers: half a task's, so that they (8 rows of this model's
/// 576 f32 columns, 18 KiB) and a block of 4 activation rows stay in L1 together while the
/// call passes every block by (a whole task's 16 rows did not fit: f32 prefill 1.08–1.17× with
/// 8, `docs/benchmarks.md`).
const WEIGHT_ROWS: usize = rowwise::ROWS_PER_TASK / 2;

impl DenseMatrix {
    /// `data` as `[rows, cols]`, copied to where the products stream it from (transparent
    /// huge pages where it is large enough, `crate::huge`); `data` is dropped on return.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidShape`] if `rows * cols` overflows, [`KernelError::LengthMismatch`]
    /// if `data` does not hold `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: DenseData) -> Result<Self, KernelError> {
        check_len(
            "dense weight",
            data.len(),
            checked_len("dense weight", rows, cols)?,
        )?;
        Ok(DenseMatrix {
            rows,
            cols,
            data: Values::new(&data),
        })
    }

    /// The product at a given SIMD level (tests force each level the CPU has).
    pub(crate) fn matmul_at(
        &self,
        level: Level,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let side = cpu::dense_single_row_side_by_side();
        self.matmul_with(level, side, x, m, out)
    }

    /// [`Self::matmul_at`], reading `side` weight rows side by side for a single activation row
    /// at AVX-512 (the same bits whatever `side`).
    pub(crate) fn matmul_with(
        &self,
        level: Level,
        side: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_matmul(self.rows, self.cols, x, m, out)?;
        let (rows, cols) = (self.rows, self.cols);
        // A long prompt's rows in chunks whose activations stay in L2 while every weight row
        // passes by (each output element is computed alike in any chunk).
        let chunk = rowwise::chunk_rows(m, 4 * cols);
        if m > chunk && rows > 0 && cols > 0 {
            for (x, out) in x.chunks(chunk * cols).zip(out.chunks_mut(chunk * rows)) {
                self.matmul_with(level, side, x, x.len() / cols, out)?;
            }
            return Ok(());
        }
        on_cache_lines(x, |x| self.matmul_groups(level, side, x, m, out));
        Ok(())
    }

    /// The product of activations the callers have checked, weight rows in groups.
    fn matmul_groups(&self, level: Level, side: usize, x: &[f32], m: usize, out: &mut [f32]) {
        let cols = self.cols;
        // The kernel of a weight format at a level, on the group of weight rows at `j0`.
        macro_rules! on_group {
            ($w:expr, $avx512:ident, $avx2:ident) => {
                rowwise::for_each_weight_group(self.rows, cols, m, out, WEIGHT_ROWS, |j0, buf| {
                    let w = &$w[j0 * cols..][..buf.len() / m * cols];
                    match level {
                        #[cfg(target_arch = "x86_64")]
                        Level::Avx512(token) => x86::$avx512(token, side, w, cols, x, m, buf),
                        #[cfg(target_arch = "x86_64")]
                        Level::Avx2(token) => x86::$avx2(token, w, cols, x, m, buf),
                        Level::Scalar => group_scalar(w, cols, x, m, buf),
                    }
                })
            };
        }
        match &self.data {
            Values::F32(w) => on_group!(w.as_slice(), group_avx512_f32, group_avx2_f32),
            Values::F16(w) => on_group!(w.as_slice(), group_avx512_f16, group_avx2_f16),
            Values::Bf16(w) => on_group!(w.as_slice(), group_avx512_bf16, group_avx2_bf16),
        }
    }
}

/// The most activation values a product copies onto a cache line ([`on_cache_lines`]): 16 rows
/// of the default model's widest input (96 KiB).
const ALIGNED_COPY_MAX: usize = 16 * 1536;

std::thread_local! {
    /// A thread's copy of the activations of its last small product ([`on_cache_lines`]).
    static ALIGNED_COPY: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `x`, or on a copy of it that starts on a cache line where `x` does not and is
/// small (a decode's, or a small batch's).
///
/// Every weight vector is multiplied with a 64-byte vector of the activations, which a
/// buffer from the allocator rarely holds on a cache line (glibc aligns to 16 bytes), so
/// that each of those loads straddles two. They come from L1, but on Zen 4 a decode's products
/// of f32 weights, one thread, read their weights at 22.3 to 26.0 GB/s with the activations 32
/// bytes into a line against 25.1 to 31.4 with this copy (`dense_speed 1`, three interleaved
/// rounds; `docs/benchmarks.md`). The copy is a few KiB against megabytes of weights.
fn on_cache_lines<R>(x: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
    const LANES: usize = 16;
    if x.as_ptr().addr().is_multiple_of(64) || x.len() > ALIGNED_COPY_MAX {
        return f(x);
    }
    ALIGNED_COPY.with(|cell| {
        // A product within a product's closure (none today) reads its input where it lies.
        let Ok(mut copy) = cell.try_borrow_mut() else {
            return f(x);
        };
        if copy.len() < x.len() + LANES {
            copy.resize(x.len() + LANES, 0.0);
        }
        let skip = copy.as_ptr().align_offset(64).min(LANES);
        let aligned = &mut copy[skip..][..x.len()];
        aligned.copy_from_slice(x);
        f(aligned)
    })
}

/// A float format a weight can be stored in.
pub(crate) trait Element: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Element for f32 {
    fn widen(self) -> f32 {
        self
    }
}

impl Element for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Element for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Fills `buf[t * m + i]` with the dot product of weight row `t` of `w` (rows of `cols`) and
/// activation row `i` of `x`, in portable Rust.
fn group_scalar<E: Element>(w: &[E], cols: usize, x: &[f32], m: usize, buf: &mut [f32]) {
    if cols == 0 {
        buf.fill(0.0);
        return;
    }
    for (t, row) in w.chunks_exact(cols).enumerate() {
        for (i, x) in x.chunks_exact(cols).enumerate().take(m) {
            buf[t * m + i] = dot_scalar(row, x);
        }
    }
}

/// One dot product with the module's sequence of operations, in portable Rust.
pub(crate) fn dot_scalar<E: Element>(w: &[E], x: &[f32]) -> f32 {
    let full = w.len() / 16 * 16;
    let mut lanes = [0f32; 16];
    for (w, x) in w[..full].chunks_exact(16).zip(x[..full].chunks_exact(16)) {
        for l in 0..16 {
            lanes[l] = w[l].widen().mul_add(x[l], lanes[l]);
        }
    }
    let mut sum = reduce16(&lanes);
    for (w, x) in w[full..].iter().zip(&x[full..]) {
        sum += w.widen() * x;
    }
    sum
}

/// The lanes' sum in the module's fixed tree (what the SIMD kernels' reductions compute).
pub(crate) fn reduce16(lanes: &[f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|i| lanes[i] + lanes[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

impl QuantMatrix for DenseMatrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn storage_bytes(&self) -> usize {
        self.data.bytes()
    }

    fn format(&self) -> String {
        self.data.name().to_string()
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if row >= self.rows {
            return Err(KernelError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        check_len("row", out.len(), self.cols)?;
        fn widen_into<E: Element>(row: &[E], out: &mut [f32]) {
            out.iter_mut().zip(row).for_each(|(o, w)| *o = w.widen());
        }
        let at = row * self.cols;
        match &self.data {
            Values::F32(w) => widen_into(&w.as_slice()[at..][..self.cols], out),
            Values::F16(w) => widen_into(&w.as_slice()[at..][..self.cols], out),
            Values::Bf16(w) => widen_into(&w.as_slice()[at..][..self.cols], out),
        }
        Ok(())
    }

    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_at(cpu::level(), x, m, out)
    }

    fn is_f32(&self) -> bool {
        matches!(self.data, Values::F32(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::supported_levels;
    use crate::test_util::{Rng, assert_close_dot, assert_shape_checks, naive_matmul};

    fn matrices(w: &[f32], rows: usize, cols: usize) -> Vec<(DenseMatrix, Vec<f32>)> {
        let f16s: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let bf16s: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let as_f32 = |d: &DenseData| {
            let m = DenseMatrix::new(rows, cols, d.clone()).unwrap();
            let mut all = vec![0.0; rows * cols];
            for (r, out) in all.chunks_exact_mut(cols.max(1)).enumerate() {
                m.dequantize_row(r, out).unwrap();
            }
            (m, all)
        };
        [
            DenseData::F32(w.to_vec()),
            DenseData::F16(f16s),
            DenseData::Bf16(bf16s),
        ]
        .iter()
        .map(as_f32)
        .collect()
    }

    /// Every level, every format, odd shapes and tails, m from 1 to 9: bit for bit the scalar
    /// kernel, and within f32 rounding of an f64 product of the stored values.
    #[test]
    fn every_level_gives_the_scalar_kernels_bits() {
        let mut rng = Rng::new(7);
        for (rows, cols) in [
            (1, 1),
            (3, 15),
            (5, 16),
            (7, 17),
            (9, 33),
            (13, 200),
            (6, 581),
        ] {
            let w = rng.normal_vec(rows * cols, 1.0);
            for (matrix, stored) in matrices(&w, rows, cols) {
                for m in [1, 2, 3, 4, 5, 8, 9] {
                    let x = rng.normal_vec(m * cols, 1.0);
                    let mut want = vec![0.0; m * rows];
                    matrix.matmul_at(Level::Scalar, &x, m, &mut want).unwrap();
                    let exact = naive_matmul(&x, &stored, m, rows, cols);
                    assert_close_dot(&want, &exact, &x, &stored, m, rows, cols, 1e-5);
                    // Every level, and at AVX-512 each number of weight rows side by side.
                    for level in supported_levels() {
                        for side in 1..=4 {
                            let mut got = vec![f32::NAN; m * rows];
                            matrix.matmul_with(level, side, &x, m, &mut got).unwrap();
                            let same = got
                                .iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(
                                same,
                                "{:?} {} {rows}x{cols} m={m} side {side}: {got:?} != {want:?}",
                                level,
                                matrix.format()
                            );
                        }
                    }
                }
            }
        }
    }

    /// A row computed alone equals the same row computed in a batch, bit for bit, including a
    /// product big enough to run on several threads.
    #[test]
    fn a_row_alone_equals_it_in_a_batch() {
        let mut rng = Rng::new(11);
        let (rows, cols, m) = (300, 576, 13);
        let w = rng.normal_vec(rows * cols, 0.05);
        let x = rng.normal_vec(m * cols, 1.0);
        for (matrix, _) in matrices(&w, rows, cols) {
            let mut all = vec![0.0; m * rows];
            matrix.matmul(&x, m, &mut all).unwrap();
            for i in 0..m {
                let mut one = vec![0.0; rows];
                matrix.matmul(&x[i * cols..][..cols], 1, &mut one).unwrap();
                assert_eq!(
                    one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    all[i * rows..][..rows]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{} row {i}",
                    matrix.format()
                );
            }
        }
    }

    /// A long prompt's rows go through the weights in chunks: every row still gets the bits
    /// it has alone, across the chunks' boundaries.
    #[test]
    fn rows_in_chunks_give_each_row_its_result_alone() {
        let mut rng = Rng::new(12);
        let (rows, cols, m) = (20, 576, 500);
        assert!(rowwise::chunk_rows(m, 4 * cols) < m / 2);
        let w = rng.normal_vec(rows * cols, 0.05);
        let x = rng.normal_vec(m * cols, 1.0);
        for (matrix, _) in matrices(&w, rows, cols) {
            let mut all = vec![0.0; m * rows];
            matrix.matmul(&x, m, &mut all).unwrap();
            for i in (0..m).step_by(3) {
                let mut one = vec![0.0; rows];
                matrix.matmul(&x[i * cols..][..cols], 1, &mut one).unwrap();
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&one),
                    bits(&all[i * rows..][..rows]),
                    "{} row {i}",
                    matrix.format()
                );
            }
        }
    }

    /// Activations anywhere in memory give the same bits: a small product reads a copy of them
    /// that starts on a cache line, a large one reads them where they lie.
    #[test]
    fn activations_off_a_cache_line_give_the_same_bits() {
        let mut rng = Rng::new(13);
        let (rows, cols) = (40, 200);
        let w = rng.normal_vec(rows * cols, 0.1);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for m in [1, 3, 16, ALIGNED_COPY_MAX / cols + 1] {
            let x = rng.normal_vec(m * cols, 1.0);
            // The same values at every offset from a cache line, in floats.
            let mut room = vec![0.0f32; x.len() + 16];
            let first = room.as_ptr().align_offset(64);
            for (matrix, _) in matrices(&w, rows, cols) {
                let mut want = vec![0.0; m * rows];
                matrix.matmul_at(Level::Scalar, &x, m, &mut want).unwrap();
                for shift in 0..16 {
                    let at = (first + shift) % 16;
                    room[at..][..x.len()].copy_from_slice(&x);
                    let moved = &room[at..][..x.len()];
                    let copied = on_cache_lines(moved, |seen| {
                        assert_eq!(bits(seen), bits(&x));
                        seen.as_ptr() != moved.as_ptr()
                    });
                    let aligned = moved.as_ptr().addr().is_multiple_of(64);
                    assert_eq!(
                        copied,
                        !aligned && x.len() <= ALIGNED_COPY_MAX,
                        "m={m} shift {shift}"
                    );
                    let mut got = vec![f32::NAN; m * rows];
                    matrix.matmul(moved, m, &mut got).unwrap();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{} m={m} shift {shift}",
                        matrix.format()
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        let w = vec![0.5; 4 * 64];
        for (matrix, _) in matrices(&w, 4, 64) {
            assert_shape_checks(&matrix);
        }
        assert!(matches!(
            DenseMatrix::new(2, 3, DenseData::F32(vec![0.0; 5])),
            Err(KernelError::LengthMismatch { .. })
        ));
        assert!(matches!(
            DenseMatrix::new(usize::MAX, 2, DenseData::F32(vec![])),
            Err(KernelError::InvalidShape(_))
        ));
    }
}
