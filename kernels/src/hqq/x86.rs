//! AVX2 and AVX-512 kernels for HQQ products.
//!
//! Codes are expanded 16 at a time into 16 bytes (for 4-bit codes, by splitting and
//! interleaving the nibbles), widened to 32-bit lanes, converted to f32 and multiplied into the
//! activations with FMA. Per group the partial dot products stay in vector registers and are
//! scaled into a vector total; the `scale · zero · Σx` correction is accumulated as a scalar and
//! subtracted once at the end. Up to [`TILE`] activation rows share each expanded code vector;
//! every row gets the same sequence of operations whatever the tile size, so results do not
//! depend on how rows were tiled.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m128i, __m512, _mm_and_si128, _mm_cvtsi64_si128, _mm_set1_epi8, _mm_srli_epi16,
    _mm_unpackhi_epi64, _mm_unpacklo_epi8, _mm256_add_ps, _mm256_cvtepi32_ps, _mm256_cvtepu8_epi32,
    _mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm512_add_ps, _mm512_cvtepi32_ps,
    _mm512_cvtepu8_epi32, _mm512_fmadd_ps, _mm512_reduce_add_ps, _mm512_set1_ps, _mm512_setzero_ps,
};
use std::array;

use super::PackedRow;
use crate::cpu::{Avx2, Avx512};
use crate::rowwise::Activations;
use crate::rowwise::TILE;
use crate::x86::{hsum_f32x8, load_f32x8, load_f32x16, load_u8x16};

/// A code format: how the bytes holding 16 codes expand to one code per byte.
trait Unpack {
    /// The bytes holding 16 codes.
    type Unit;
    /// `size_of::<Self::Unit>()`.
    const UNIT_BYTES: usize;
    /// `codes` as units; the caller passes a whole number of them.
    fn units(codes: &[u8]) -> &[Self::Unit];
    /// The 16 codes of `unit`, one per byte, in order.
    fn expand(unit: &Self::Unit) -> __m128i;
}

/// 4-bit codes, two per byte, low nibble first.
struct Q4;

impl Unpack for Q4 {
    type Unit = [u8; 8];
    const UNIT_BYTES: usize = 8;

    #[inline(always)]
    fn units(codes: &[u8]) -> &[[u8; 8]] {
        codes.as_chunks().0
    }

    #[inline(always)]
    fn expand(unit: &[u8; 8]) -> __m128i {
        // SAFETY: these are SSE2 instructions, part of the x86-64 baseline that every x86_64
        // target enables.
        unsafe {
            let packed = _mm_cvtsi64_si128(i64::from_le_bytes(*unit));
            let nibble = _mm_set1_epi8(0x0F);
            let low = _mm_and_si128(packed, nibble);
            let high = _mm_and_si128(_mm_srli_epi16::<4>(packed), nibble);
            // Byte k of `low` is code 2k and byte k of `high` is code 2k + 1: interleave them.
            _mm_unpacklo_epi8(low, high)
        }
    }
}

/// 8-bit codes, one per byte.
struct Q8;

impl Unpack for Q8 {
    type Unit = [u8; 16];
    const UNIT_BYTES: usize = 16;

    #[inline(always)]
    fn units(codes: &[u8]) -> &[[u8; 16]] {
        codes.as_chunks().0
    }

    #[inline(always)]
    fn expand(unit: &[u8; 16]) -> __m128i {
        load_u8x16(unit)
    }
}

/// AVX-512 kernel: `col[i] = x[i] · W[row]` for every activation row `i`.
pub(super) fn row_products_avx512(
    _: Avx512,
    row: &PackedRow<'_>,
    acts: &Activations<'_>,
    col: &mut [f32],
) {
    // SAFETY: the `Avx512` token proves the CPU supports AVX-512F, AVX2, FMA and F16C.
    unsafe {
        if row.bits == 4 {
            products_avx512::<Q4>(row, acts, col);
        } else {
            products_avx512::<Q8>(row, acts, col);
        }
    }
}

/// AVX2 kernel: `col[i] = x[i] · W[row]` for every activation row `i`.
pub(super) fn row_products_avx2(
    _: Avx2,
    row: &PackedRow<'_>,
    acts: &Activations<'_>,
    col: &mut [f32],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
    unsafe {
        if row.bits == 4 {
            products_avx2::<Q4>(row, acts, col);
        } else {
            products_avx2::<Q8>(row, acts, col);
        }
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn products_avx512<U: Unpack>(row: &PackedRow<'_>, acts: &Activations<'_>, col: &mut [f32]) {
    let (tiles, rest) = col.as_chunks_mut::<TILE>();
    let tiled = tiles.len() * TILE;
    for (t, out) in tiles.iter_mut().enumerate() {
        *out = tile_avx512::<U, TILE>(row, acts, t * TILE);
    }
    for (k, out) in rest.iter_mut().enumerate() {
        [*out] = tile_avx512::<U, 1>(row, acts, tiled + k);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn products_avx2<U: Unpack>(row: &PackedRow<'_>, acts: &Activations<'_>, col: &mut [f32]) {
    let (tiles, rest) = col.as_chunks_mut::<TILE>();
    let tiled = tiles.len() * TILE;
    for (t, out) in tiles.iter_mut().enumerate() {
        *out = tile_avx2::<U, TILE>(row, acts, t * TILE);
    }
    for (k, out) in rest.iter_mut().enumerate() {
        [*out] = tile_avx2::<U, 1>(row, acts, tiled + k);
    }
}

/// 16 codes (one per byte) as 16 f32 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
fn widen_x16(codes: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes))
}

/// The products of weight row `row` with activation rows `first..first + R`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
fn tile_avx512<U: Unpack, const R: usize>(
    row: &PackedRow<'_>,
    acts: &Activations<'_>,
    first: usize,
) -> [f32; R] {
    let rows: [(&[f32], &[f32]); R] = array::from_fn(|r| acts.row(first + r));
    let x: [&[[f32; 16]]; R] = array::from_fn(|r| rows[r].0.as_chunks().0);
    let units_per_group = row.group / 16;
    let mut total = [_mm512_setzero_ps(); R];
    let mut correction = [0.0f32; R];
    let group_bytes = units_per_group * U::UNIT_BYTES;
    let params = row.scales.iter().zip(row.zeros);
    for (g, (codes, (scale, zero))) in row.codes.chunks_exact(group_bytes).zip(params).enumerate() {
        // Index of the group's first 16 activations in `x`.
        let base = g * units_per_group;
        // Two accumulators per row (even and odd units) halve the FMA dependency chain.
        let mut even = [_mm512_setzero_ps(); R];
        let mut odd = [_mm512_setzero_ps(); R];
        let (pairs, last) = U::units(codes).as_chunks::<2>();
        for (p, [unit0, unit1]) in pairs.iter().enumerate() {
            let q0 = widen_x16(U::expand(unit0));
            let q1 = widen_x16(U::expand(unit1));
            for ((even, odd), x) in even.iter_mut().zip(&mut odd).zip(&x) {
                *even = _mm512_fmadd_ps(q0, load_f32x16(&x[base + 2 * p]), *even);
                *odd = _mm512_fmadd_ps(q1, load_f32x16(&x[base + 2 * p + 1]), *odd);
            }
        }
        if let [unit] = last {
            let q = widen_x16(U::expand(unit));
            for (even, x) in even.iter_mut().zip(&x) {
                *even = _mm512_fmadd_ps(q, load_f32x16(&x[base + 2 * pairs.len()]), *even);
            }
        }
        let (scale, zero) = (scale.to_f32(), zero.to_f32());
        let scale_v = _mm512_set1_ps(scale);
        for r in 0..R {
            total[r] = _mm512_fmadd_ps(scale_v, _mm512_add_ps(even[r], odd[r]), total[r]);
            correction[r] += scale * zero * rows[r].1[g];
        }
    }
    let mut result = [0.0; R];
    for ((out, total), correction) in result.iter_mut().zip(total).zip(correction) {
        *out = _mm512_reduce_add_ps(total) - correction;
    }
    result
}

/// The products of weight row `row` with activation rows `first..first + R`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn tile_avx2<U: Unpack, const R: usize>(
    row: &PackedRow<'_>,
    acts: &Activations<'_>,
    first: usize,
) -> [f32; R] {
    let rows: [(&[f32], &[f32]); R] = array::from_fn(|r| acts.row(first + r));
    let x: [&[[f32; 8]]; R] = array::from_fn(|r| rows[r].0.as_chunks().0);
    let units_per_group = row.group / 16;
    let mut total = [_mm256_setzero_ps(); R];
    let mut correction = [0.0f32; R];
    let group_bytes = units_per_group * U::UNIT_BYTES;
    let params = row.scales.iter().zip(row.zeros);
    for (g, (codes, (scale, zero))) in row.codes.chunks_exact(group_bytes).zip(params).enumerate() {
        // Index of the group's first 8 activations in `x`.
        let base = 2 * g * units_per_group;
        // Codes 0..8 and 8..16 of each unit go to separate accumulators.
        let mut low = [_mm256_setzero_ps(); R];
        let mut high = [_mm256_setzero_ps(); R];
        for (u, unit) in U::units(codes).iter().enumerate() {
            let codes = U::expand(unit);
            let q_low = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
            let q_high = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)));
            for ((low, high), x) in low.iter_mut().zip(&mut high).zip(&x) {
                *low = _mm256_fmadd_ps(q_low, load_f32x8(&x[base + 2 * u]), *low);
                *high = _mm256_fmadd_ps(q_high, load_f32x8(&x[base + 2 * u + 1]), *high);
            }
        }
        let (scale, zero) = (scale.to_f32(), zero.to_f32());
        let scale_v = _mm256_set1_ps(scale);
        for r in 0..R {
            total[r] = _mm256_fmadd_ps(scale_v, _mm256_add_ps(low[r], high[r]), total[r]);
            correction[r] += scale * zero * rows[r].1[g];
        }
    }
    let mut result = [0.0; R];
    for ((out, total), correction) in result.iter_mut().zip(total).zip(correction) {
        *out = hsum_f32x8(total) - correction;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_expansion_interleaves_nibbles_in_order() {
        let unit: [u8; 8] = [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE];
        let bytes = m128i_to_u128(Q4::expand(&unit)).to_le_bytes();
        assert_eq!(bytes, array::from_fn(|k| k as u8));
    }

    fn m128i_to_u128(v: __m128i) -> u128 {
        use std::arch::x86_64::_mm_cvtsi128_si64;
        // SAFETY: SSE2 instructions, part of the x86-64 baseline.
        let (low, high) = unsafe {
            (
                _mm_cvtsi128_si64(v),
                _mm_cvtsi128_si64(_mm_unpackhi_epi64(v, v)),
            )
        };
        u128::from(low as u64) | (u128::from(high as u64) << 64)
    }
}
