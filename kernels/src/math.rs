//! Element-wise math on f32 slices, vectorized: `exp` (one algorithm, Cephes' `expf`, whose
//! every operation the SIMD versions repeat, so that an element's result is the same bits at
//! every level), SiLU-gated products, and the reductions softmax needs.
//!
//! glibc's `expf` is correctly rounded but scalar; these take about as many cycles per 16
//! values as it takes per one, and stay within 2 ulp of it (for inputs above −87; below, the
//! result is 0, as it nearly is).

use crate::cpu::{self, Level};
use rayon::prelude::*;

/// `exp(x)` for `x` in `[−87, 88]` within 2 ulp; 0 below −87 (and for −∞), `exp(88)` above 88.
#[inline]
pub fn exp(x: f32) -> f32 {
    // Not `clamp`: NaN must become `LOW`, as `vmaxps` makes it.
    #[allow(clippy::manual_clamp)]
    let c = x.max(LOW).min(HIGH);
    let n = (c * LOG2E).round_ties_even();
    let r = (-n).mul_add(C1, c);
    let r = (-n).mul_add(C2, r);
    let z = r * r;
    let mut p = P[0];
    for &k in &P[1..] {
        p = p.mul_add(r, k);
    }
    let y = p.mul_add(z, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    // (Written so that NaN gives 0, as the SIMD versions' ordered comparison does.)
    if x >= LOW { y * scale } else { 0.0 }
}

/// Below this, `exp` returns 0 (`exp(−87)` ≈ 1.6e−38, the smallest normal f32's order).
const LOW: f32 = -87.0;
const HIGH: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts (Cephes): `n · C1` is exact for the `n` that occur.
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `(exp(r) − 1 − r) / r²` on `[−ln2/2, ln2/2]`, highest degree first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    // Cephes' 5.0000001201e-1, which is 0.5 in f32.
    0.5,
];

/// `xs[i] = exp(xs[i])` (see [`exp`]).
pub fn exp_in_place(xs: &mut [f32]) {
    exp_in_place_at(cpu::level(), xs);
}

fn exp_in_place_at(level: Level, xs: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512(t) => x86::exp_in_place_512(t, xs),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(t) => x86::exp_in_place_256(t, xs),
        Level::Scalar => xs.iter_mut().for_each(|x| *x = exp(*x)),
    }
}

/// `out[i] = gate[i] / (1 + exp(−gate[i])) · up[i]`: SiLU of the gate times the up projection
/// (the Llama MLP's activation). All three slices have one length (`out` is cleared and
/// refilled).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut Vec<f32>) {
    silu_mul_at(cpu::level(), gate, up, out);
}

fn silu_mul_at(level: Level, gate: &[f32], up: &[f32], out: &mut Vec<f32>) {
    let n = gate.len().min(up.len());
    // Every element is written below: a buffer of the right length needs no clearing.
    out.resize(n, 0.0);
    let (gate, up) = (&gate[..n], &up[..n]);
    // Each element's arithmetic is its own (the vector bodies and the tails compute the same
    // bits), so the split changes nothing.
    let chunk = crate::pool::rows_per_task(n, 1, PARALLEL_MIN_VALUES).next_multiple_of(16);
    if chunk < n {
        let parts = out.par_chunks_mut(chunk).zip(gate.par_chunks(chunk));
        parts
            .zip(up.par_chunks(chunk))
            .for_each(|((out, gate), up)| silu_mul_slices(level, gate, up, out));
    } else {
        silu_mul_slices(level, gate, up, out);
    }
}

/// Elements from which [`silu_mul`] splits its work among threads.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

fn silu_mul_slices(level: Level, gate: &[f32], up: &[f32], out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512(t) => x86::silu_mul_512(t, gate, up, out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(t) => x86::silu_mul_256(t, gate, up, out),
        Level::Scalar => silu_mul_scalar(gate, up, out),
    }
}

fn silu_mul_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// `ln Σ exp(x)`, stably (the maximum taken out first); −∞ for an empty slice. The sum is
/// taken in f64 from f32 terms.
pub fn log_sum_exp(xs: &[f32]) -> f64 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::from(max);
    }
    let mut buf = [0.0f32; 256];
    let mut sum = 0.0f64;
    for chunk in xs.chunks(buf.len()) {
        let buf = &mut buf[..chunk.len()];
        for (b, &x) in buf.iter_mut().zip(chunk) {
            *b = x - max;
        }
        exp_in_place(buf);
        sum += buf.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    f64::from(max) + sum.ln()
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod x86 {
    use std::arch::x86_64::{
        __m256, __m512, _CMP_GE_OQ, _mm256_add_epi32, _mm256_add_ps, _mm256_and_ps,
        _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtps_epi32, _mm256_div_ps, _mm256_fmadd_ps,
        _mm256_fnmadd_ps, _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_round_ps,
        _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_slli_epi32, _mm256_sub_ps,
        _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_div_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps,
        _mm512_maskz_scalef_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps, _mm512_roundscale_ps,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_sub_ps,
    };

    use super::{C1, C2, HIGH, LOG2E, LOW, P, exp, silu_mul_scalar};
    use crate::cpu::{Avx2, Avx512};
    use crate::x86::{load_f32x8, load_f32x16, store_f32x8, store_f32x16};

    /// [`super::exp`] on 16 lanes, operation for operation.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        let c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LOW)), _mm512_set1_ps(HIGH));
        // Round to nearest, ties to even, without exceptions.
        let n = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(c, _mm512_set1_ps(LOG2E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C1), c);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C2), r);
        let z = _mm512_mul_ps(r, r);
        let mut p = _mm512_set1_ps(P[0]);
        for &k in &P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, z, r), _mm512_set1_ps(1.0));
        // `y · 2ⁿ` by `vscalefps`, zero where `x < LOW`: one instruction for the scalar
        // path's exponent bits, multiply and select. `n` lies in [−126, 127], so `2ⁿ` is the
        // normal float the scalar path builds, and both round the same exact product.
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(LOW));
        _mm512_maskz_scalef_ps(keep, y, n)
    }

    /// [`super::exp`] on 8 lanes, operation for operation.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn exp8(x: __m256) -> __m256 {
        let c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LOW)), _mm256_set1_ps(HIGH));
        let n = _mm256_round_ps::<0x08>(_mm256_mul_ps(c, _mm256_set1_ps(LOG2E)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C1), c);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C2), r);
        let z = _mm256_mul_ps(r, r);
        let mut p = _mm256_set1_ps(P[0]);
        for &k in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(k));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, z, r), _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(LOW));
        _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)))
    }

    pub(super) fn exp_in_place_512(t: Avx512, xs: &mut [f32]) {
        // SAFETY: the token proves AVX-512F (and AVX2, FMA).
        unsafe { exp_in_place_512_impl(t, xs) }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn exp_in_place_512_impl(_: Avx512, xs: &mut [f32]) {
        let (vectors, tail) = xs.as_chunks_mut::<16>();
        for v in vectors {
            store_f32x16(v, exp16(load_f32x16(v)));
        }
        tail.iter_mut().for_each(|x| *x = exp(*x));
    }

    pub(super) fn exp_in_place_256(t: Avx2, xs: &mut [f32]) {
        // SAFETY: the token proves AVX2 and FMA.
        unsafe { exp_in_place_256_impl(t, xs) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn exp_in_place_256_impl(_: Avx2, xs: &mut [f32]) {
        let (vectors, tail) = xs.as_chunks_mut::<8>();
        for v in vectors {
            store_f32x8(v, exp8(load_f32x8(v)));
        }
        tail.iter_mut().for_each(|x| *x = exp(*x));
    }

    pub(super) fn silu_mul_512(t: Avx512, gate: &[f32], up: &[f32], out: &mut [f32]) {
        // SAFETY: the token proves AVX-512F (and AVX2, FMA).
        unsafe { silu_mul_512_impl(t, gate, up, out) }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn silu_mul_512_impl(_: Avx512, gate: &[f32], up: &[f32], out: &mut [f32]) {
        let (g, g_tail) = gate.as_chunks::<16>();
        let (u, u_tail) = up.as_chunks::<16>();
        let (o, o_tail) = out.as_chunks_mut::<16>();
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            let g = load_f32x16(g);
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            store_f32x16(o, _mm512_mul_ps(s, load_f32x16(u)));
        }
        silu_mul_scalar(g_tail, u_tail, o_tail);
    }

    pub(super) fn silu_mul_256(t: Avx2, gate: &[f32], up: &[f32], out: &mut [f32]) {
        // SAFETY: the token proves AVX2 and FMA.
        unsafe { silu_mul_256_impl(t, gate, up, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn silu_mul_256_impl(_: Avx2, gate: &[f32], up: &[f32], out: &mut [f32]) {
        let (g, g_tail) = gate.as_chunks::<8>();
        let (u, u_tail) = up.as_chunks::<8>();
        let (o, o_tail) = out.as_chunks_mut::<8>();
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            let g = load_f32x8(g);
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            store_f32x8(o, _mm256_mul_ps(s, load_f32x8(u)));
        }
        silu_mul_scalar(g_tail, u_tail, o_tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_every_level_agrees() {
        let mut rng = Rng::new(11);
        let mut xs: Vec<f32> = (0..20_000).map(|_| rng.uniform() * 175.0 - 87.0).collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 88.0, -87.0, 1e-8, -1e-8, 0.5, -0.5]);
        // The range's low end, where `n` is smallest (−126), and its high end, where it is
        // largest.
        xs.extend((0..4000).map(|i| -87.0 + i as f32 * 1e-3));
        xs.extend((0..1000).map(|i| 88.0 - i as f32 * 1e-3));
        for &x in &xs {
            let (got, want) = (exp(x), x.exp());
            assert!(ulps(got, want) <= 2, "exp({x}) = {got}, libm {want}");
        }
        for level in cpu::supported_levels() {
            let mut v = xs.clone();
            exp_in_place_at(level, &mut v);
            for (x, v) in xs.iter().zip(&v) {
                assert_eq!(v.to_bits(), exp(*x).to_bits(), "exp({x}) at {level:?}");
            }
        }
    }

    #[test]
    fn exp_saturates_outside_its_range() {
        for x in [-87.5, -100.0, -1e30, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "{x}");
            for level in cpu::supported_levels() {
                let mut v = [x; 17];
                exp_in_place_at(level, &mut v);
                assert!(v.iter().all(|&y| y == 0.0), "{x} at {level:?}");
            }
        }
        assert_eq!(exp(1000.0), exp(88.0));
        assert!(exp(88.0).is_finite());
    }

    #[test]
    fn silu_mul_matches_its_definition_bit_for_bit() {
        let mut rng = Rng::new(12);
        // Short, and long enough to be split among threads (`PARALLEL_MIN_VALUES`).
        for n in [1001, PARALLEL_MIN_VALUES + 1001] {
            let gate = rng.normal_vec(n, 4.0);
            let up = rng.normal_vec(n, 1.0);
            for level in cpu::supported_levels() {
                let mut out = Vec::new();
                silu_mul_at(level, &gate, &up, &mut out);
                assert_eq!(out.len(), n);
                for ((g, u), o) in gate.iter().zip(&up).zip(&out) {
                    assert_eq!(
                        o.to_bits(),
                        (g / (1.0 + exp(-g)) * u).to_bits(),
                        "{level:?}, {n} values"
                    );
                }
            }
        }
    }

    #[test]
    fn log_sum_exp_is_stable() {
        let xs = [1000.0f32, 1000.0];
        assert!((log_sum_exp(&xs) - (1000.0 + 2f64.ln())).abs() < 1e-6);
        let xs: Vec<f32> = (0..5000).map(|i| (i % 13) as f32 * 0.25 - 2.0).collect();
        let want = xs.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&xs) - want).abs() < 1e-6);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
    }
}
