//! AVX2 and AVX-512 kernels for FP8 E4M3 products.
//!
//! 16 codes at a time are zero-extended to 16-bit lanes and rearranged into the f16 bit
//! pattern `((b & 0x7F) << 7) | ((b & 0x80) << 8)`, which is `e4m3(b) · 2⁻⁸` (see the parent
//! module), then converted to f32 by hardware and multiplied into the activations with FMA. The
//! sum is scaled back by 2⁸ (exact) at the end; the columns past the last multiple of 16 are
//! added from the decode table. Up to [`TILE`] activation rows share each decoded vector; every
//! row gets the same sequence of operations whatever the tile size.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m256i, _mm256_add_ps, _mm256_and_si256, _mm256_castsi256_si128, _mm256_cvtepu8_epi16,
    _mm256_cvtph_ps, _mm256_extracti128_si256, _mm256_fmadd_ps, _mm256_or_si256, _mm256_set1_epi16,
    _mm256_setzero_ps, _mm256_slli_epi16, _mm512_add_ps, _mm512_cvtph_ps, _mm512_fmadd_ps,
    _mm512_reduce_add_ps, _mm512_setzero_ps,
};
use std::array;

use super::decode_e4m3;
use crate::cpu::{Avx2, Avx512};
use crate::rowwise::TILE;
use crate::x86::{hsum_f32x8, load_f32x8, load_f32x16, load_u8x16};

/// AVX-512 kernel: `col[i] = Σ_k e4m3(codes[k]) · x[i][k]` for every activation row `i` of the
/// row-major `x` (rows of `codes.len()` values).
pub(super) fn row_dots_avx512(_: Avx512, codes: &[u8], x: &[f32], col: &mut [f32]) {
    // SAFETY: the `Avx512` token proves the CPU supports AVX-512F, AVX2, FMA and F16C.
    unsafe { dots_avx512(codes, x, col) }
}

/// AVX2 kernel: `col[i] = Σ_k e4m3(codes[k]) · x[i][k]` for every activation row `i` of the
/// row-major `x` (rows of `codes.len()` values).
pub(super) fn row_dots_avx2(_: Avx2, codes: &[u8], x: &[f32], col: &mut [f32]) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
    unsafe { dots_avx2(codes, x, col) }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn dots_avx512(codes: &[u8], x: &[f32], col: &mut [f32]) {
    let cols = codes.len();
    let (tiles, rest) = col.as_chunks_mut::<TILE>();
    let tiled = tiles.len() * TILE;
    for (out, x) in tiles.iter_mut().zip(x.chunks_exact(TILE * cols)) {
        *out = tile_avx512::<TILE>(codes, x);
    }
    for (out, x) in rest.iter_mut().zip(x[tiled * cols..].chunks_exact(cols)) {
        [*out] = tile_avx512::<1>(codes, x);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dots_avx2(codes: &[u8], x: &[f32], col: &mut [f32]) {
    let cols = codes.len();
    let (tiles, rest) = col.as_chunks_mut::<TILE>();
    let tiled = tiles.len() * TILE;
    for (out, x) in tiles.iter_mut().zip(x.chunks_exact(TILE * cols)) {
        *out = tile_avx2::<TILE>(codes, x);
    }
    for (out, x) in rest.iter_mut().zip(x[tiled * cols..].chunks_exact(cols)) {
        [*out] = tile_avx2::<1>(codes, x);
    }
}

/// 16 codes as the f16 bit patterns of `e4m3(code) · 2⁻⁸`, in 16-bit lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn f16_bits_x16(codes: &[u8; 16]) -> __m256i {
    let bytes = _mm256_cvtepu8_epi16(load_u8x16(codes));
    let magnitude = _mm256_slli_epi16::<7>(_mm256_and_si256(bytes, _mm256_set1_epi16(0x7F)));
    let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(bytes, _mm256_set1_epi16(0x80)));
    _mm256_or_si256(magnitude, sign)
}

/// `Σ_k e4m3(codes[k]) · x[k]` over the columns the vector loop leaves (`codes.len() % 16`).
fn tail_dot(codes: &[u8], x: &[f32]) -> f32 {
    codes.iter().zip(x).map(|(&c, &x)| decode_e4m3(c) * x).sum()
}

/// The dot products of `codes` with the `R` consecutive activation rows in `x`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
fn tile_avx512<const R: usize>(codes: &[u8], x: &[f32]) -> [f32; R] {
    let cols = codes.len();
    let rows: [&[f32]; R] = array::from_fn(|r| &x[r * cols..][..cols]);
    let (units, tail) = codes.as_chunks::<16>();
    let x_units: [&[[f32; 16]]; R] = array::from_fn(|r| rows[r].as_chunks().0);
    // Two accumulators per row (even and odd units) halve the FMA dependency chain.
    let mut even = [_mm512_setzero_ps(); R];
    let mut odd = [_mm512_setzero_ps(); R];
    let (pairs, last) = units.as_chunks::<2>();
    for (p, [unit0, unit1]) in pairs.iter().enumerate() {
        let w0 = _mm512_cvtph_ps(f16_bits_x16(unit0));
        let w1 = _mm512_cvtph_ps(f16_bits_x16(unit1));
        for ((even, odd), x) in even.iter_mut().zip(&mut odd).zip(&x_units) {
            *even = _mm512_fmadd_ps(w0, load_f32x16(&x[2 * p]), *even);
            *odd = _mm512_fmadd_ps(w1, load_f32x16(&x[2 * p + 1]), *odd);
        }
    }
    if let [unit] = last {
        let w = _mm512_cvtph_ps(f16_bits_x16(unit));
        for (even, x) in even.iter_mut().zip(&x_units) {
            *even = _mm512_fmadd_ps(w, load_f32x16(&x[2 * pairs.len()]), *even);
        }
    }
    let mut result = [0.0; R];
    for r in 0..R {
        let vector = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])) * 256.0;
        result[r] = vector + tail_dot(tail, &rows[r][16 * units.len()..]);
    }
    result
}

/// The dot products of `codes` with the `R` consecutive activation rows in `x`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn tile_avx2<const R: usize>(codes: &[u8], x: &[f32]) -> [f32; R] {
    let cols = codes.len();
    let rows: [&[f32]; R] = array::from_fn(|r| &x[r * cols..][..cols]);
    let (units, tail) = codes.as_chunks::<16>();
    let x_halves: [&[[f32; 8]]; R] = array::from_fn(|r| rows[r].as_chunks().0);
    // Codes 0..8 and 8..16 of each unit go to separate accumulators.
    let mut low = [_mm256_setzero_ps(); R];
    let mut high = [_mm256_setzero_ps(); R];
    for (u, unit) in units.iter().enumerate() {
        let bits = f16_bits_x16(unit);
        let w_low = _mm256_cvtph_ps(_mm256_castsi256_si128(bits));
        let w_high = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(bits));
        for ((low, high), x) in low.iter_mut().zip(&mut high).zip(&x_halves) {
            *low = _mm256_fmadd_ps(w_low, load_f32x8(&x[2 * u]), *low);
            *high = _mm256_fmadd_ps(w_high, load_f32x8(&x[2 * u + 1]), *high);
        }
    }
    let mut result = [0.0; R];
    for r in 0..R {
        let vector = hsum_f32x8(_mm256_add_ps(low[r], high[r])) * 256.0;
        result[r] = vector + tail_dot(tail, &rows[r][16 * units.len()..]);
    }
    result
}
