//! AVX2 and AVX-512 versions of the attention kernel.
//!
//! The kernel itself is the generic [`PagedAttention::attend`]; here it is instantiated inside
//! functions compiled with the right target features, with the SIMD tokens as its
//! [`VectorOps`]. Everything inlines into those functions, so the primitives compile to plain
//! vector code without per-call dispatch.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m512, __mmask16, _mm256_add_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_set1_ps,
    _mm256_setzero_ps, _mm512_add_ps, _mm512_fmadd_ps, _mm512_mask_storeu_ps, _mm512_mul_ps,
    _mm512_set1_ps, _mm512_setzero_ps,
};

use super::{KvElement, PagedAttention, VectorOps};
use crate::cpu::{Avx2, Avx512};
use crate::x86::{load_f32x8, load_f32x16, store_f32x8, store_f32x16};

/// AVX-512 version of [`PagedAttention::attend`].
pub(super) fn attend_avx512<T: KvElement>(
    simd: Avx512,
    request: &PagedAttention<'_, T>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    // SAFETY: the `Avx512` token proves the CPU supports AVX-512F, AVX2, FMA and F16C.
    unsafe { attend_avx512_impl(simd, request, token, first_head, out) }
}

/// AVX2 version of [`PagedAttention::attend`].
pub(super) fn attend_avx2<T: KvElement>(
    simd: Avx2,
    request: &PagedAttention<'_, T>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
    unsafe { attend_avx2_impl(simd, request, token, first_head, out) }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn attend_avx512_impl<T: KvElement>(
    simd: Avx512,
    request: &PagedAttention<'_, T>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    request.attend(simd, token, first_head, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2_impl<T: KvElement>(
    simd: Avx2,
    request: &PagedAttention<'_, T>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    request.attend(simd, token, first_head, out);
}

impl VectorOps for Avx512 {
    #[inline(always)]
    fn scores<T: KvElement>(
        self,
        q: &[f32],
        keys: &[T],
        bs: usize,
        slot: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        // SAFETY: `self` proves the CPU supports AVX-512F, FMA and F16C.
        unsafe { scores_avx512(q, keys, bs, slot, scale, out) }
    }

    #[inline(always)]
    fn accumulate<T: KvElement>(self, y: &mut [f32], w: &[f32], x: &[T]) {
        // SAFETY: `self` proves the CPU supports AVX-512F, FMA and F16C.
        unsafe { accumulate_avx512(y, w, x) }
    }

    #[inline(always)]
    fn scale(self, y: &mut [f32], a: f32) {
        // SAFETY: `self` proves the CPU supports AVX-512F.
        unsafe { scale_avx512(y, a) }
    }
}

impl VectorOps for Avx2 {
    #[inline(always)]
    fn scores<T: KvElement>(
        self,
        q: &[f32],
        keys: &[T],
        bs: usize,
        slot: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        // SAFETY: `self` proves the CPU supports AVX2, FMA and F16C.
        unsafe { scores_avx2(q, keys, bs, slot, scale, out) }
    }

    #[inline(always)]
    fn accumulate<T: KvElement>(self, y: &mut [f32], w: &[f32], x: &[T]) {
        // SAFETY: `self` proves the CPU supports AVX2, FMA and F16C.
        unsafe { accumulate_avx2(y, w, x) }
    }

    #[inline(always)]
    fn scale(self, y: &mut [f32], a: f32) {
        // SAFETY: `self` proves the CPU supports AVX2.
        unsafe { scale_avx2(y, a) }
    }
}

/// Query dimensions whose products go to separate accumulators (then summed pairwise): four
/// independent chains of multiply-adds instead of one.
const CHAINS: usize = 4;

/// [`VectorOps::scores`] with AVX-512: 16 slots per vector (the last one masked), per query
/// dimension one multiply-add of the broadcast `q[d]` with that dimension's keys.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn scores_avx512<T: KvElement>(
    q: &[f32],
    keys: &[T],
    bs: usize,
    slot: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = out.len();
    let mut j = 0;
    while j < n {
        let len = (n - j).min(16);
        let mask: __mmask16 = if len == 16 { !0 } else { (1u16 << len) - 1 };
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for (d, (&q, keys)) in q.iter().zip(keys.chunks_exact(bs)).enumerate() {
            // SAFETY: this function's features are the ones `widen16_prefix` needs.
            let k = unsafe { T::widen16_prefix(&keys[slot + j..][..len]) };
            acc[d % CHAINS] = _mm512_fmadd_ps(_mm512_set1_ps(q), k, acc[d % CHAINS]);
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let sum = _mm512_mul_ps(sum, _mm512_set1_ps(scale));
        let o = &mut out[j..j + len];
        // SAFETY: the mask covers `len` floats, all inside `o`.
        unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), mask, sum) };
        j += len;
    }
}

/// [`VectorOps::accumulate`] with AVX-512: `y` in registers while the rows of `x` stream past
/// (for the usual head sizes; others go through memory, with the same operations).
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn accumulate_avx512<T: KvElement>(y: &mut [f32], w: &[f32], x: &[T]) {
    let width = y.len();
    let (vectors, tail) = y.as_chunks_mut::<16>();
    match vectors.len() {
        4 => accumulate_held_512::<4, T>(vectors, w, x, width),
        8 => accumulate_held_512::<8, T>(vectors, w, x, width),
        2 => accumulate_held_512::<2, T>(vectors, w, x, width),
        _ => {
            for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
                let w = _mm512_set1_ps(w);
                for (y, x) in vectors.iter_mut().zip(row.as_chunks::<16>().0) {
                    // SAFETY: this function's features are the ones `widen16` needs.
                    let x = unsafe { T::widen16(x) };
                    store_f32x16(y, _mm512_fmadd_ps(w, x, load_f32x16(y)));
                }
            }
        }
    }
    let start = width - tail.len();
    for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
        for (y, &x) in tail.iter_mut().zip(&row[start..]) {
            *y = w.mul_add(x.to_f32(), *y);
        }
    }
}

/// `V` vectors of `y` held in registers (a constant count, so the array is registers).
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn accumulate_held_512<const V: usize, T: KvElement>(
    y: &mut [[f32; 16]],
    w: &[f32],
    x: &[T],
    width: usize,
) {
    let mut acc: [__m512; V] = std::array::from_fn(|v| load_f32x16(&y[v]));
    for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
        let w = _mm512_set1_ps(w);
        let row = row.as_chunks::<16>().0;
        for v in 0..V {
            // SAFETY: this function's features are the ones `widen16` needs.
            acc[v] = _mm512_fmadd_ps(w, unsafe { T::widen16(&row[v]) }, acc[v]);
        }
    }
    for v in 0..V {
        store_f32x16(&mut y[v], acc[v]);
    }
}

/// [`VectorOps::scores`] with AVX2: 8 slots per vector.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn scores_avx2<T: KvElement>(
    q: &[f32],
    keys: &[T],
    bs: usize,
    slot: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = out.len();
    let (vectors, tail) = out.as_chunks_mut::<8>();
    for (v, o) in vectors.iter_mut().enumerate() {
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for (d, (&q, keys)) in q.iter().zip(keys.chunks_exact(bs)).enumerate() {
            let k = &keys[slot + 8 * v..].as_chunks::<8>().0[0];
            // SAFETY: this function's features are the ones `widen8` needs.
            let k = unsafe { T::widen8(k) };
            acc[d % CHAINS] = _mm256_fmadd_ps(_mm256_set1_ps(q), k, acc[d % CHAINS]);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        store_f32x8(o, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
    // The last slots, one at a time, with the same chains.
    let start = n - tail.len();
    for (j, o) in tail.iter_mut().enumerate() {
        let mut acc = [0.0f32; CHAINS];
        for (d, (&q, keys)) in q.iter().zip(keys.chunks_exact(bs)).enumerate() {
            acc[d % CHAINS] = q.mul_add(keys[slot + start + j].to_f32(), acc[d % CHAINS]);
        }
        *o = ((acc[0] + acc[1]) + (acc[2] + acc[3])) * scale;
    }
}

/// [`VectorOps::accumulate`] with AVX2: `y` in registers (up to 64 floats at a time).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn accumulate_avx2<T: KvElement>(y: &mut [f32], w: &[f32], x: &[T]) {
    const HELD: usize = 8;
    let width = y.len();
    let (vectors, tail) = y.as_chunks_mut::<8>();
    for (c, group) in vectors.chunks_mut(HELD).enumerate() {
        let mut acc = [_mm256_setzero_ps(); HELD];
        for (a, y) in acc.iter_mut().zip(group.iter()) {
            *a = load_f32x8(y);
        }
        for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
            let w = _mm256_set1_ps(w);
            let row = &row.as_chunks::<8>().0[c * HELD..][..group.len()];
            for (a, x) in acc.iter_mut().zip(row) {
                // SAFETY: this function's features are the ones `widen8` needs.
                *a = _mm256_fmadd_ps(w, unsafe { T::widen8(x) }, *a);
            }
        }
        for (a, y) in acc.iter().zip(group.iter_mut()) {
            store_f32x8(y, *a);
        }
    }
    let start = width - tail.len();
    for (&w, row) in w.iter().zip(x.chunks_exact(width)) {
        for (y, &x) in tail.iter_mut().zip(&row[start..]) {
            *y = w.mul_add(x.to_f32(), *y);
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn scale_avx512(y: &mut [f32], a: f32) {
    let a_v = _mm512_set1_ps(a);
    let (vectors, tail) = y.as_chunks_mut::<16>();
    for y in vectors {
        let product = _mm512_mul_ps(a_v, load_f32x16(y));
        store_f32x16(y, product);
    }
    for y in tail {
        *y *= a;
    }
}

#[target_feature(enable = "avx2")]
#[inline]
fn scale_avx2(y: &mut [f32], a: f32) {
    let a_v = _mm256_set1_ps(a);
    let (vectors, tail) = y.as_chunks_mut::<8>();
    for y in vectors {
        let product = _mm256_mul_ps(a_v, load_f32x8(y));
        store_f32x8(y, product);
    }
    for y in tail {
        *y *= a;
    }
}
