//! The AVX-512 kernels a prefill's tiles use on top of the per-run ones: two blocks' scores in
//! one pass ([`scores_pair_512`]), and the weights of 16 rows at once, with the rows in the
//! vector lanes ([`weights_columns_512`]). Each gives every row the bits it has alone.

use std::arch::x86_64::{
    __m512, __mmask16, _CMP_GT_OQ, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_fmadd_ps,
    _mm512_mask_add_ps, _mm512_mask_blend_ps, _mm512_mask_cmp_ps_mask, _mm512_mask_max_ps,
    _mm512_mask_mul_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps,
    _mm512_sub_ps, _mm512_unpackhi_ps, _mm512_unpacklo_ps,
};

use super::{CHAINS, store_scores_512};
use crate::attention::RUN;
use crate::math::x86::exp16;
use crate::x86::{
    load_f32x16, load_f32x16_prefix, load_f32x16_prefix_or, prefix_mask16, store_f32x16,
    store_f32x16_prefix,
};

/// [`VectorOps::scores_pair`](crate::attention::ops::VectorOps::scores_pair) of two whole
/// blocks of 16 f32 keys, for heads of 32, 64 or 128 (others are left untouched, and the
/// caller sends none): three heads at a time, each with both blocks' chains.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(super) fn scores_pair_512(
    q: &[f32],
    keys: [&[f32]; 2],
    scale: f32,
    scores: [&mut [[f32; RUN]]; 2],
) {
    let keys = keys.map(|k| k.as_chunks::<16>().0);
    match q.len() / scores[0].len().max(1) {
        32 => scores_pair_sized_512::<32>(q, keys, scale, scores),
        64 => scores_pair_sized_512::<64>(q, keys, scale, scores),
        128 => scores_pair_sized_512::<128>(q, keys, scale, scores),
        _ => {}
    }
}

/// [`scores_pair_512`] of heads of `HD` dimensions.
#[target_feature(enable = "avx512f,fma")]
#[inline]
fn scores_pair_sized_512<const HD: usize>(
    q: &[f32],
    keys: [&[[f32; 16]]; 2],
    scale: f32,
    scores: [&mut [[f32; RUN]]; 2],
) {
    let (Ok(a), Ok(b)) = (
        <&[[f32; 16]; HD]>::try_from(keys[0]),
        <&[[f32; 16]; HD]>::try_from(keys[1]),
    ) else {
        return;
    };
    let (q, _) = q.as_chunks::<HD>();
    let [scores_a, scores_b] = scores;
    let groups = q
        .chunks(3)
        .zip(scores_a.chunks_mut(3).zip(scores_b.chunks_mut(3)));
    for (q, (scores_a, scores_b)) in groups {
        let scores = [scores_a, scores_b];
        if let Ok(q) = <&[[f32; HD]; 3]>::try_from(q) {
            scores_pair_heads_512::<3, HD>(q, [a, b], scale, scores);
        } else if let Ok(q) = <&[[f32; HD]; 2]>::try_from(q) {
            scores_pair_heads_512::<2, HD>(q, [a, b], scale, scores);
        } else if let Ok(q) = <&[[f32; HD]; 1]>::try_from(q) {
            scores_pair_heads_512::<1, HD>(q, [a, b], scale, scores);
        }
    }
}

/// [`scores_block_512`](super::scores_block_512) of `H` heads over two blocks at once: per
/// query dimension, both blocks' key vectors and the head's broadcast `q[d]` into each block's
/// chain `d mod 4`, the chains of each block the ones it has alone.
#[target_feature(enable = "avx512f,fma")]
#[inline]
#[allow(clippy::needless_range_loop)] // the chains indexed by constants: registers
fn scores_pair_heads_512<const H: usize, const HD: usize>(
    q: &[[f32; HD]; H],
    keys: [&[[f32; 16]; HD]; 2],
    scale: f32,
    scores: [&mut [[f32; RUN]]; 2],
) {
    let mut acc = [[[_mm512_setzero_ps(); CHAINS]; 2]; H];
    for d0 in (0..HD).step_by(CHAINS) {
        for c in 0..CHAINS {
            let d = d0 + c;
            let k = [load_f32x16(&keys[0][d]), load_f32x16(&keys[1][d])];
            for h in 0..H {
                let q = _mm512_set1_ps(q[h][d]);
                for b in 0..2 {
                    acc[h][b][c] = _mm512_fmadd_ps(q, k[b], acc[h][b][c]);
                }
            }
        }
    }
    for (b, scores) in scores.into_iter().enumerate() {
        for (acc, out) in acc.iter().zip(scores.iter_mut()) {
            store_scores_512(&acc[b], scale, &mut out[..16]);
        }
    }
}

/// [`VectorOps::weights_rows`](crate::attention::ops::VectorOps::weights_rows) of up to 16
/// rows of at most 16 scores each, turned into columns so that the rows' chains run side by
/// side in the lanes: lane `r` of column `j` is row `r`'s score `j`. Lane by lane, the
/// operations are those of [`weights`](crate::attention::ops::weights) for that row alone: the
/// maximum over its first `lens[r]` scores (order-free), the factor and the new state, then
/// each weight `exp(score − maximum)` and their sum from 0 in the order of `j`.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) fn weights_columns_512(
    scores: &mut [[f32; RUN]],
    lens: &[usize],
    (max, denominator): (&mut [f32], &mut [f32]),
    factors: &mut [f32],
) {
    let rows = scores.len().min(16);
    let mut columns = [_mm512_setzero_ps(); 16];
    for (column, scores) in columns.iter_mut().zip(scores.iter()) {
        *column = load_f32x16(&scores.as_chunks::<16>().0[0]);
    }
    let mut columns = transpose16(columns);
    let mut len = [0.0f32; 16];
    for (l, &n) in len.iter_mut().zip(lens) {
        *l = n as f32;
    }
    let len = load_f32x16(&len);
    // Lanes of column `j` that lie within their row.
    let within: [__mmask16; 16] =
        std::array::from_fn(|j| _mm512_cmp_ps_mask::<_CMP_GT_OQ>(len, _mm512_set1_ps(j as f32)));
    let low = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut run_max = low;
    for (column, &within) in columns.iter().zip(&within) {
        run_max = _mm512_mask_max_ps(run_max, within, run_max, *column);
    }
    let old_max = load_f32x16_prefix_or(&max[..rows], low);
    let raised = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(prefix_mask16(rows), run_max, old_max);
    let one = _mm512_set1_ps(1.0);
    let factor = _mm512_mask_blend_ps(raised, one, exp16(_mm512_sub_ps(old_max, run_max)));
    let new_max = _mm512_mask_blend_ps(raised, old_max, run_max);
    let mut sum = _mm512_setzero_ps();
    for (column, &within) in columns.iter_mut().zip(&within) {
        *column = exp16(_mm512_sub_ps(*column, new_max));
        sum = _mm512_mask_add_ps(sum, within, sum, *column);
    }
    let old_denominator = load_f32x16_prefix(&denominator[..rows]);
    let rescaled = _mm512_mask_mul_ps(old_denominator, raised, old_denominator, factor);
    store_f32x16_prefix(&mut denominator[..rows], _mm512_add_ps(rescaled, sum));
    store_f32x16_prefix(&mut max[..rows], new_max);
    store_f32x16_prefix(&mut factors[..rows], factor);
    let weights = transpose16(columns);
    for (scores, weights) in scores.iter_mut().zip(weights) {
        store_f32x16(&mut scores.as_chunks_mut::<16>().0[0], weights);
    }
}

/// The transpose of 16 vectors of 16 floats: lane `r` of vector `c` of the result is lane `c`
/// of vector `r`. Pairs of rows interleaved, then quadruples within 128-bit lanes, then the
/// 128-bit lanes moved across in two rounds.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(rows: [__m512; 16]) -> [__m512; 16] {
    let pairs: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i / 2 * 2], rows[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // quads[4 · block + k]: in 128-bit lane g, column 4g + k of rows 4 · block to 4 · block + 3.
    let quads: [__m512; 16] = std::array::from_fn(|i| {
        let (block, k) = (i / 4, i % 4);
        let (a, b) = (pairs[4 * block + k / 2], pairs[4 * block + 2 + k / 2]);
        if k % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    // halves[8 · h + 2 · k + e]: the 128-bit lanes of blocks 2h and 2h + 1 for column k,
    // the even (e = 0) or odd (e = 1) lanes.
    let halves: [__m512; 16] = std::array::from_fn(|i| {
        let (h, k, e) = (i / 8, i % 8 / 2, i % 2);
        let (a, b) = (quads[8 * h + k], quads[8 * h + 4 + k]);
        if e == 0 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        }
    });
    std::array::from_fn(|c| {
        let (g, k) = (c / 4, c % 4);
        let (a, b) = (halves[2 * k + g % 2], halves[8 + 2 * k + g % 2]);
        if g < 2 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(a, b)
        }
    })
}
