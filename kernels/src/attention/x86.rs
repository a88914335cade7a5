//! AVX2 and AVX-512 versions of the attention kernel.
//!
//! The kernel itself is the generic [`PagedAttention::attend`]; here it is instantiated inside
//! functions compiled with the right target features, with the SIMD tokens as its
//! [`VectorOps`]. Everything inlines into those functions, so the primitives compile to plain
//! vector code without per-call dispatch.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    _mm256_add_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps,
    _mm512_add_ps, _mm512_fmadd_ps, _mm512_mul_ps, _mm512_reduce_add_ps, _mm512_set1_ps,
    _mm512_setzero_ps,
};

use super::{PagedAttention, VectorOps};
use crate::cpu::{Avx2, Avx512};
use crate::x86::{hsum_f32x8, load_f32x8, load_f32x16, store_f32x8, store_f32x16};

/// AVX-512 version of [`PagedAttention::attend`].
pub(super) fn attend_avx512(
    simd: Avx512,
    request: &PagedAttention<'_>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    // SAFETY: the `Avx512` token proves the CPU supports AVX-512F, AVX2, FMA and F16C.
    unsafe { attend_avx512_impl(simd, request, token, first_head, out) }
}

/// AVX2 version of [`PagedAttention::attend`].
pub(super) fn attend_avx2(
    simd: Avx2,
    request: &PagedAttention<'_>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
    unsafe { attend_avx2_impl(simd, request, token, first_head, out) }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn attend_avx512_impl(
    simd: Avx512,
    request: &PagedAttention<'_>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    request.attend(simd, token, first_head, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2_impl(
    simd: Avx2,
    request: &PagedAttention<'_>,
    token: usize,
    first_head: usize,
    out: &mut [f32],
) {
    request.attend(simd, token, first_head, out);
}

impl VectorOps for Avx512 {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `self` proves the CPU supports AVX-512F and FMA.
        unsafe { dot_avx512(a, b) }
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: `self` proves the CPU supports AVX-512F and FMA.
        unsafe { axpy_avx512(y, a, x) }
    }

    #[inline(always)]
    fn scale(self, y: &mut [f32], a: f32) {
        // SAFETY: `self` proves the CPU supports AVX-512F.
        unsafe { scale_avx512(y, a) }
    }
}

impl VectorOps for Avx2 {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `self` proves the CPU supports AVX2 and FMA.
        unsafe { dot_avx2(a, b) }
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: `self` proves the CPU supports AVX2 and FMA.
        unsafe { axpy_avx2(y, a, x) }
    }

    #[inline(always)]
    fn scale(self, y: &mut [f32], a: f32) {
        // SAFETY: `self` proves the CPU supports AVX2.
        unsafe { scale_avx2(y, a) }
    }
}

#[target_feature(enable = "avx512f,fma")]
#[inline]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    let (a_vectors, a_tail) = a.as_chunks::<16>();
    let (b_vectors, b_tail) = b.as_chunks::<16>();
    // Two accumulators (even and odd vectors) halve the FMA dependency chain.
    let (a_pairs, a_last) = a_vectors.as_chunks::<2>();
    let (b_pairs, b_last) = b_vectors.as_chunks::<2>();
    let mut even = _mm512_setzero_ps();
    let mut odd = _mm512_setzero_ps();
    for ([a0, a1], [b0, b1]) in a_pairs.iter().zip(b_pairs) {
        even = _mm512_fmadd_ps(load_f32x16(a0), load_f32x16(b0), even);
        odd = _mm512_fmadd_ps(load_f32x16(a1), load_f32x16(b1), odd);
    }
    if let ([a], [b]) = (a_last, b_last) {
        even = _mm512_fmadd_ps(load_f32x16(a), load_f32x16(b), even);
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    _mm512_reduce_add_ps(_mm512_add_ps(even, odd)) + tail
}

#[target_feature(enable = "avx512f,fma")]
#[inline]
fn axpy_avx512(y: &mut [f32], a: f32, x: &[f32]) {
    let a_v = _mm512_set1_ps(a);
    let (y_vectors, y_tail) = y.as_chunks_mut::<16>();
    let (x_vectors, x_tail) = x.as_chunks::<16>();
    for (y, x) in y_vectors.iter_mut().zip(x_vectors) {
        let sum = _mm512_fmadd_ps(a_v, load_f32x16(x), load_f32x16(y));
        store_f32x16(y, sum);
    }
    for (y, x) in y_tail.iter_mut().zip(x_tail) {
        *y += a * x;
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

#[target_feature(enable = "avx2,fma")]
#[inline]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let (a_vectors, a_tail) = a.as_chunks::<8>();
    let (b_vectors, b_tail) = b.as_chunks::<8>();
    // Two accumulators (even and odd vectors) halve the FMA dependency chain.
    let (a_pairs, a_last) = a_vectors.as_chunks::<2>();
    let (b_pairs, b_last) = b_vectors.as_chunks::<2>();
    let mut even = _mm256_setzero_ps();
    let mut odd = _mm256_setzero_ps();
    for ([a0, a1], [b0, b1]) in a_pairs.iter().zip(b_pairs) {
        even = _mm256_fmadd_ps(load_f32x8(a0), load_f32x8(b0), even);
        odd = _mm256_fmadd_ps(load_f32x8(a1), load_f32x8(b1), odd);
    }
    if let ([a], [b]) = (a_last, b_last) {
        even = _mm256_fmadd_ps(load_f32x8(a), load_f32x8(b), even);
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    hsum_f32x8(_mm256_add_ps(even, odd)) + tail
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    let a_v = _mm256_set1_ps(a);
    let (y_vectors, y_tail) = y.as_chunks_mut::<8>();
    let (x_vectors, x_tail) = x.as_chunks::<8>();
    for (y, x) in y_vectors.iter_mut().zip(x_vectors) {
        let sum = _mm256_fmadd_ps(a_v, load_f32x8(x), load_f32x8(y));
        store_f32x8(y, sum);
    }
    for (y, x) in y_tail.iter_mut().zip(x_tail) {
        *y += a * x;
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
