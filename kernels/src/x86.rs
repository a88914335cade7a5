//! Safe wrappers around the x86-64 SIMD loads, stores and reductions the kernels share.
//!
//! Loads and stores take fixed-size arrays, so the type system proves the memory they touch is
//! in bounds; that is what makes the pointer-taking intrinsics inside them sound. Each wrapper
//! enables the features it needs, so the kernels (compiled with a superset of them) call these
//! safely and inline them.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m128i, __m256, __m256i, __m512, __m512i, __mmask16, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32,
    _mm_loadu_si128, _mm_movehl_ps, _mm_shuffle_ps, _mm_storeu_si128, _mm256_castpd_ps,
    _mm256_castps256_ps128, _mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_cvtph_ps,
    _mm256_extractf128_ps, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_slli_epi32,
    _mm256_storeu_ps, _mm512_castps_pd, _mm512_castps512_ps256, _mm512_castsi512_ps,
    _mm512_cvtepu16_epi32, _mm512_cvtph_ps, _mm512_extractf64x4_pd, _mm512_loadu_ps,
    _mm512_loadu_si512, _mm512_mask_loadu_ps, _mm512_mask_storeu_ps, _mm512_setzero_ps,
    _mm512_slli_epi32, _mm512_storeu_ps, _mm512_storeu_si512,
};

use half::{bf16, f16};

/// Loads 16 bytes (SSE2, part of the x86-64 baseline).
#[inline]
pub(crate) fn load_u8x16(bytes: &[u8; 16]) -> __m128i {
    // SAFETY: `bytes` is 16 readable bytes, and `_mm_loadu_si128` has no alignment requirement.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

/// Loads four `i32` (16 bytes) (SSE2).
#[inline]
pub(crate) fn load_i128(src: &[i32; 4]) -> __m128i {
    // SAFETY: `src` is 16 readable bytes, and `_mm_loadu_si128` has no alignment requirement.
    unsafe { _mm_loadu_si128(src.as_ptr().cast()) }
}

/// Stores 16 bytes as four `i32` (SSE2).
#[inline]
pub(crate) fn store_i128(dst: &mut [i32; 4], v: __m128i) {
    // SAFETY: `dst` is 16 writable bytes, and `_mm_storeu_si128` has no alignment requirement.
    unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), v) }
}

/// Loads 32 bytes.
#[target_feature(enable = "avx")]
#[inline]
pub(crate) fn load_i256(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: `bytes` is 32 readable bytes, and `_mm256_loadu_si256` has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

/// Loads 64 bytes.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn load_i512(bytes: &[u8; 64]) -> __m512i {
    // SAFETY: `bytes` is 64 readable bytes, and `_mm512_loadu_si512` has no alignment requirement.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

/// Loads 8 little-endian floats from 32 bytes (x86 is little-endian).
#[target_feature(enable = "avx")]
#[inline]
pub(crate) fn load_f32x8_le(bytes: &[u8; 32]) -> __m256 {
    // SAFETY: `bytes` is 32 readable bytes, and `_mm256_loadu_ps` has no alignment requirement.
    unsafe { _mm256_loadu_ps(bytes.as_ptr().cast()) }
}

/// Loads 16 little-endian floats from 64 bytes.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn load_f32x16_le(bytes: &[u8; 64]) -> __m512 {
    // SAFETY: `bytes` is 64 readable bytes, and `_mm512_loadu_ps` has no alignment requirement.
    unsafe { _mm512_loadu_ps(bytes.as_ptr().cast()) }
}

/// Loads 8 floats.
#[target_feature(enable = "avx")]
#[inline]
pub(crate) fn load_f32x8(values: &[f32; 8]) -> __m256 {
    // SAFETY: `values` is 8 readable floats, and `_mm256_loadu_ps` has no alignment requirement.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

/// Stores 8 floats.
#[target_feature(enable = "avx")]
#[inline]
pub(crate) fn store_f32x8(dst: &mut [f32; 8], v: __m256) {
    // SAFETY: `dst` is 8 writable floats, and `_mm256_storeu_ps` has no alignment requirement.
    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) }
}

/// Loads 16 floats.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn load_f32x16(values: &[f32; 16]) -> __m512 {
    // SAFETY: `values` is 16 readable floats, and `_mm512_loadu_ps` has no alignment requirement.
    unsafe { _mm512_loadu_ps(values.as_ptr()) }
}

/// Stores 16 floats.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn store_f32x16(dst: &mut [f32; 16], v: __m512) {
    // SAFETY: `dst` is 16 writable floats, and `_mm512_storeu_ps` has no alignment requirement.
    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
}

/// Stores 16 `i32`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn store_i32x16(dst: &mut [i32; 16], v: __m512i) {
    // SAFETY: `dst` is 64 writable bytes, and `_mm512_storeu_si512` has no alignment requirement.
    unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) }
}

/// The mask of the first `len` lanes of 16 (all of them from 16 on).
#[inline(always)]
pub(crate) fn prefix_mask16(len: usize) -> __mmask16 {
    if len >= 16 { !0 } else { (1u16 << len) - 1 }
}

/// Loads the first `values.len()` (at most 16) lanes from `values`, the others 0.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn load_f32x16_prefix(values: &[f32]) -> __m512 {
    load_f32x16_prefix_or(values, _mm512_setzero_ps())
}

/// Loads the first `values.len()` (at most 16) lanes from `values`, the others those of `fill`;
/// 16 of them with a plain load.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn load_f32x16_prefix_or(values: &[f32], fill: __m512) -> __m512 {
    let values = &values[..values.len().min(16)];
    if let Ok(whole) = <&[f32; 16]>::try_from(values) {
        return load_f32x16(whole);
    }
    // SAFETY: the mask covers the floats of `values` (fewer than 16).
    unsafe { _mm512_mask_loadu_ps(fill, prefix_mask16(values.len()), values.as_ptr()) }
}

/// Stores the first `dst.len()` (at most 16) lanes of `v`: 16 of them with a plain store, since
/// a masked store does not forward its data to the loads that follow (on AMD's cores, those
/// loads wait until the store has left).
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn store_f32x16_prefix(dst: &mut [f32], v: __m512) {
    let n = dst.len().min(16);
    let dst = &mut dst[..n];
    if let Ok(whole) = <&mut [f32; 16]>::try_from(&mut *dst) {
        return store_f32x16(whole, v);
    }
    // SAFETY: the mask covers the floats of `dst` (fewer than 16).
    unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), prefix_mask16(n), v) };
}

/// The two 8-lane halves of a vector: lanes `0..8` and `8..16`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn halves_f32x16(v: __m512) -> (__m256, __m256) {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    (_mm512_castps512_ps256(v), hi)
}

/// Loads 16 halves, widened to floats (exactly).
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn widen_f16x16(values: &[f16; 16]) -> __m512 {
    // SAFETY: `values` is 32 readable bytes, and `_mm256_loadu_si256` has no alignment
    // requirement.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(values.as_ptr().cast()) })
}

/// Loads 16 bfloat16 values, widened to floats (exactly: a bfloat16 is a float's high half).
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn widen_bf16x16(values: &[bf16; 16]) -> __m512 {
    // SAFETY: `values` is 32 readable bytes, and `_mm256_loadu_si256` has no alignment
    // requirement.
    let bits = unsafe { _mm256_loadu_si256(values.as_ptr().cast()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
}

/// Loads 8 bfloat16 values, widened to floats (exactly).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn widen_bf16x8(values: &[bf16; 8]) -> __m256 {
    // SAFETY: `values` is 16 readable bytes, and `_mm_loadu_si128` has no alignment requirement.
    let bits = unsafe { _mm_loadu_si128(values.as_ptr().cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
}

/// Loads 8 halves, widened to floats (exactly).
#[target_feature(enable = "avx,f16c")]
#[inline]
pub(crate) fn widen_f16x8(values: &[f16; 8]) -> __m256 {
    // SAFETY: `values` is 16 readable bytes, and `_mm_loadu_si128` has no alignment requirement.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(values.as_ptr().cast()) })
}

/// Sum of the 8 lanes, in a fixed order (halves, then pairs, then the last two).
#[target_feature(enable = "avx")]
#[inline]
pub(crate) fn hsum_f32x8(v: __m256) -> f32 {
    let sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    _mm_cvtss_f32(_mm_add_ss(sum2, _mm_shuffle_ps::<1>(sum2, sum2)))
}
