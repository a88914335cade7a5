//! AVX-512 and AVX2 kernels of the dense products (see the parent module for the sequence of
//! operations they share with the scalar kernel).
//!
//! A call covers a group of weight rows (half a task's). AVX-512 takes the activations 4 rows at a
//! time and, for each such block, the weight rows 4 at a time: 16 accumulators, each weight
//! vector widened once and each activation vector loaded once per 16 columns for 4
//! multiply-adds, the activation block staying in L1 while the weight rows pass by; the 16
//! accumulators' lanes are then summed together ([`reduce_16x16`]). AVX2 holds a lane set of 16
//! as two 8-lane halves, so it blocks 2 weight rows by 2 activation rows.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m256, __m512, _mm256_add_ps, _mm256_fmadd_ps, _mm256_setzero_ps, _mm512_add_ps,
    _mm512_fmadd_ps, _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps, _mm512_storeu_ps,
};

use half::{bf16, f16};

use super::Element;
use crate::cpu::{Avx2, Avx512};
use crate::x86::{
    halves_f32x16, hsum_f32x8, load_f32x8, load_f32x16, widen_bf16x8, widen_bf16x16, widen_f16x8,
    widen_f16x16,
};

/// The 16 lanes' sum in the parent module's tree: halves first, then [`hsum_f32x8`]'s order.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
fn reduce_512(v: __m512) -> f32 {
    let (lo, hi) = halves_f32x16(v);
    hsum_f32x8(_mm256_add_ps(lo, hi))
}

/// The sums of 16 vectors' lanes, each in [`reduce_512`]'s tree, as the lanes of one vector:
/// lane `j` is `a[j]`'s sum. Each level of the tree is done for every vector at once, pairs of
/// vectors shuffled so that one add makes the level's sums of two (then four, eight, sixteen)
/// of them: 45 operations where 16 reductions one by one take over a hundred, most of them in
/// chains. The same adds of the same values, so the same bits.
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce_16x16(a: &[__m512; 16]) -> __m512 {
    // Quarters (128 bits) are picked by `_mm512_shuffle_f32x4`, lanes within quarters by
    // `_mm512_shuffle_ps`. Fed in the order below, the last level's lane `4q + k` is the sum
    // of its input `4k + q`: so input `4k + q` is `a[4q + k]`.
    let b: [__m512; 16] = std::array::from_fn(|i| a[(i % 4) * 4 + i / 4]);
    // Lanes `l + (l + 8)`: per pair, the first vector's 8 sums, then the second's.
    let s8: [__m512; 8] = std::array::from_fn(|k| {
        let (x, y) = (b[2 * k], b[2 * k + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        )
    });
    // `+ 4`: per pair of those, four vectors' 4 sums, a quarter each.
    let s4: [__m512; 4] = std::array::from_fn(|j| {
        let (x, y) = (s8[2 * j], s8[2 * j + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        )
    });
    // `+ 2`, within each quarter: two lanes for each of two vectors.
    let s2: [__m512; 2] = std::array::from_fn(|i| {
        let (x, y) = (s4[2 * i], s4[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(x, y),
            _mm512_shuffle_ps::<0xEE>(x, y),
        )
    });
    // The last two.
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(s2[0], s2[1]),
        _mm512_shuffle_ps::<0xDD>(s2[0], s2[1]),
    )
}

/// The columns past the last multiple of 16, added one at a time to `sum`.
#[inline]
fn tail<E: Element>(mut sum: f32, w: &[E], x: &[f32]) -> f32 {
    for (w, x) in w.iter().zip(x) {
        sum += w.widen() * x;
    }
    sum
}

macro_rules! dense_kernels {
    ($elem:ty, $avx512:ident, $avx2:ident, $widen16:ident, $widen8:ident) => {
        /// AVX-512: fills `buf[t * m + i]` for the group of weight rows `w` (rows of `cols`),
        /// reading `side` weight rows side by side (1 to 4) for a single activation row and 4
        /// for more ([`crate::cpu::dense_single_row_side_by_side`]): the same bits either way.
        pub(crate) fn $avx512(
            _: Avx512,
            side: usize,
            w: &[$elem],
            cols: usize,
            x: &[f32],
            m: usize,
            buf: &mut [f32],
        ) {
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            fn group(side: usize, w: &[$elem], cols: usize, x: &[f32], m: usize, buf: &mut [f32]) {
                // Activation blocks outside, weight rows inside: a block of 4 activation rows
                // stays in L1 while the group's weight rows pass by.
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(4);
                    let x = &x[i * cols..][..r * cols];
                    match r {
                        4 => rows::<4>(4, w, cols, x, i, m, buf),
                        3 => rows::<3>(4, w, cols, x, i, m, buf),
                        2 => rows::<2>(4, w, cols, x, i, m, buf),
                        _ => rows::<1>(side.clamp(1, 4), w, cols, x, i, m, buf),
                    }
                    i += r;
                }
            }

            /// The group's weight rows, `side` at a time, against the `R` activation rows `x`
            /// (rows `i0..` of the product).
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            #[inline]
            fn rows<const R: usize>(
                side: usize,
                w: &[$elem],
                cols: usize,
                x: &[f32],
                i0: usize,
                m: usize,
                buf: &mut [f32],
            ) {
                let n = w.len() / cols;
                let mut t = 0;
                while t < n {
                    let wn = (n - t).min(side);
                    let (wt, out) = (&w[t * cols..][..wn * cols], &mut buf[t * m..]);
                    match wn {
                        4 => put(block::<4, R>(wt, x, cols), i0, m, out),
                        3 => put(block::<3, R>(wt, x, cols), i0, m, out),
                        2 => put(block::<2, R>(wt, x, cols), i0, m, out),
                        _ => put(block::<1, R>(wt, x, cols), i0, m, out),
                    }
                    t += wn;
                }
            }

            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            #[inline]
            fn block<const W: usize, const R: usize>(
                w: &[$elem],
                x: &[f32],
                cols: usize,
            ) -> [[f32; R]; W] {
                let full = cols / 16;
                let mut wc: [&[[$elem; 16]]; W] = [&[]; W];
                for (t, wc) in wc.iter_mut().enumerate() {
                    *wc = w[t * cols..][..cols].as_chunks::<16>().0;
                }
                let mut xc: [&[[f32; 16]]; R] = [&[]; R];
                for (r, xc) in xc.iter_mut().enumerate() {
                    *xc = x[r * cols..][..cols].as_chunks::<16>().0;
                }
                let mut acc = [[_mm512_setzero_ps(); R]; W];
                for c in 0..full {
                    let mut wv = [_mm512_setzero_ps(); W];
                    for t in 0..W {
                        wv[t] = $widen16(&wc[t][c]);
                    }
                    for r in 0..R {
                        let xv = load_f32x16(&xc[r][c]);
                        for t in 0..W {
                            acc[t][r] = _mm512_fmadd_ps(wv[t], xv, acc[t][r]);
                        }
                    }
                }
                // A whole block's 16 sums in one reduction (lane `4t + r`), else one by one.
                let mut sums = [0f32; 16];
                if W == 4 && R == 4 {
                    let all = std::array::from_fn(|j| acc[j / 4 % W][j % 4 % R]);
                    // SAFETY: `sums` is 16 writable floats; no alignment is required.
                    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce_16x16(&all)) };
                } else {
                    for t in 0..W {
                        for r in 0..R {
                            sums[4 * t + r] = reduce_512(acc[t][r]);
                        }
                    }
                }
                let mut out = [[0f32; R]; W];
                for t in 0..W {
                    for r in 0..R {
                        out[t][r] = tail(
                            sums[4 * t + r],
                            &w[t * cols + full * 16..][..cols - full * 16],
                            &x[r * cols + full * 16..][..cols - full * 16],
                        );
                    }
                }
                out
            }

            if cols == 0 {
                buf.fill(0.0);
                return;
            }
            // SAFETY: the `Avx512` token proves the CPU supports AVX-512F, AVX2, FMA and F16C.
            unsafe { group(side, w, cols, x, m, buf) }
        }

        /// AVX2: fills `buf[t * m + i]` for the group of weight rows `w` (rows of `cols`).
        pub(crate) fn $avx2(
            _: Avx2,
            w: &[$elem],
            cols: usize,
            x: &[f32],
            m: usize,
            buf: &mut [f32],
        ) {
            #[target_feature(enable = "avx2,fma,f16c")]
            fn group(w: &[$elem], cols: usize, x: &[f32], m: usize, buf: &mut [f32]) {
                let n = w.len() / cols;
                let mut t = 0;
                while t < n {
                    let w = &w[t * cols..];
                    let mut i = 0;
                    while i < m {
                        let r = (m - i).min(2);
                        let x = &x[i * cols..][..r * cols];
                        let out = &mut buf[t * m..];
                        match ((n - t).min(2), r) {
                            (2, 2) => put(block::<2, 2>(&w[..2 * cols], x, cols), i, m, out),
                            (2, _) => put(block::<2, 1>(&w[..2 * cols], x, cols), i, m, out),
                            (_, 2) => put(block::<1, 2>(&w[..cols], x, cols), i, m, out),
                            _ => put(block::<1, 1>(&w[..cols], x, cols), i, m, out),
                        }
                        i += r;
                    }
                    t += 2;
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            #[inline]
            fn block<const W: usize, const R: usize>(
                w: &[$elem],
                x: &[f32],
                cols: usize,
            ) -> [[f32; R]; W] {
                let full = cols / 16;
                let mut wc: [&[[$elem; 8]]; W] = [&[]; W];
                for (t, wc) in wc.iter_mut().enumerate() {
                    *wc = w[t * cols..][..full * 16].as_chunks::<8>().0;
                }
                let mut xc: [&[[f32; 8]]; R] = [&[]; R];
                for (r, xc) in xc.iter_mut().enumerate() {
                    *xc = x[r * cols..][..full * 16].as_chunks::<8>().0;
                }
                let mut lo = [[_mm256_setzero_ps(); R]; W];
                let mut hi = [[_mm256_setzero_ps(); R]; W];
                for c in 0..full {
                    let mut wlo: [__m256; W] = [_mm256_setzero_ps(); W];
                    let mut whi: [__m256; W] = [_mm256_setzero_ps(); W];
                    for t in 0..W {
                        wlo[t] = $widen8(&wc[t][2 * c]);
                        whi[t] = $widen8(&wc[t][2 * c + 1]);
                    }
                    for r in 0..R {
                        let xlo = load_f32x8(&xc[r][2 * c]);
                        let xhi = load_f32x8(&xc[r][2 * c + 1]);
                        for t in 0..W {
                            lo[t][r] = _mm256_fmadd_ps(wlo[t], xlo, lo[t][r]);
                            hi[t][r] = _mm256_fmadd_ps(whi[t], xhi, hi[t][r]);
                        }
                    }
                }
                let mut out = [[0f32; R]; W];
                for t in 0..W {
                    for r in 0..R {
                        out[t][r] = tail(
                            hsum_f32x8(_mm256_add_ps(lo[t][r], hi[t][r])),
                            &w[t * cols + full * 16..][..cols - full * 16],
                            &x[r * cols + full * 16..][..cols - full * 16],
                        );
                    }
                }
                out
            }

            if cols == 0 {
                buf.fill(0.0);
                return;
            }
            // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
            unsafe { group(w, cols, x, m, buf) }
        }
    };
}

/// Writes a block's results: `buf[t * m + i0 + r] = b[t][r]`.
#[inline]
fn put<const W: usize, const R: usize>(b: [[f32; R]; W], i0: usize, m: usize, buf: &mut [f32]) {
    for (t, row) in b.iter().enumerate() {
        buf[t * m + i0..][..R].copy_from_slice(row);
    }
}

dense_kernels!(
    f32,
    group_avx512_f32,
    group_avx2_f32,
    load_f32x16,
    load_f32x8
);
dense_kernels!(
    f16,
    group_avx512_f16,
    group_avx2_f16,
    widen_f16x16,
    widen_f16x8
);
dense_kernels!(
    bf16,
    group_avx512_bf16,
    group_avx2_bf16,
    widen_bf16x16,
    widen_bf16x8
);
