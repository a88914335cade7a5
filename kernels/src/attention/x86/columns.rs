//! The AVX-512 kernels of a prefill's tiles, whose runs of scores lie in columns (a vector
//! holds one slot of 16 rows): the queries transposed once per tile ([`transpose_queries`]),
//! each run's scores computed straight into columns ([`scores_columns_512`]), and the weights
//! of 16 rows at once in the lanes ([`weights_columns_512`]). Each gives every row the bits it
//! has alone.

use std::arch::x86_64::{
    __mmask16, _CMP_GT_OQ, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_fmadd_ps, _mm512_mask_add_ps,
    _mm512_mask_blend_ps, _mm512_mask_cmp_ps_mask, _mm512_mask_max_ps, _mm512_mask_mul_ps,
    _mm512_set1_ps, _mm512_setzero_ps, _mm512_sub_ps,
};
use std::ops::Range;

use super::{CHAINS, store_scores_512};
use crate::attention::ops::Prepared;
use crate::attention::tile::Column;
use crate::math::x86::exp16;
use crate::x86::{
    load_f32x16, load_f32x16_prefix, load_f32x16_prefix_or, prefix_mask16, store_f32x16,
    store_f32x16_prefix,
};

/// A tile's queries (`q`, `[rows][hd]`) transposed into groups of 16 rows, `out[g][d][lane]`
/// = `q[16 · g + lane][d]`, the rows past the last zero.
pub(super) fn transpose_queries(q: &[f32], hd: usize, out: &mut Prepared) {
    let rows = q.len() / hd.max(1);
    let out = out.zeroed(rows.div_ceil(16) * hd * 16);
    for (r, q) in q.chunks_exact(hd).enumerate() {
        let (g, lane) = (r / 16, r % 16);
        for (d, &q) in q.iter().enumerate() {
            out[(g * hd + d) * 16 + lane] = q;
        }
    }
}

/// [`VectorOps::scores_columns`](crate::attention::ops::VectorOps::scores_columns) of a whole
/// block of 16 f32 keys (`keys`, `[hd][16]`; its first `n` slots) for heads of 32, 64 or 128
/// (others are left untouched, and the caller sends none), the queries from
/// [`transpose_queries`]: per slot, the row's chains `d mod 4` of the row kernels
/// ([`scores_block_512`](super::scores_block_512)), each lane a row's.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(super) fn scores_columns_512(
    qt: &[f32],
    hd: usize,
    (keys, n): (&[f32], usize),
    scale: f32,
    rows: Range<usize>,
    cols: &mut [Column],
) {
    match hd {
        32 => scores_columns_sized_512::<32>(qt, (keys, n), scale, rows, cols),
        64 => scores_columns_sized_512::<64>(qt, (keys, n), scale, rows, cols),
        128 => scores_columns_sized_512::<128>(qt, (keys, n), scale, rows, cols),
        _ => {}
    }
}

/// [`scores_columns_512`] of heads of `HD` dimensions: two slots at a time, for up to three
/// groups of 16 rows (24 chains).
#[target_feature(enable = "avx512f,fma")]
#[inline]
fn scores_columns_sized_512<const HD: usize>(
    qt: &[f32],
    (keys, n): (&[f32], usize),
    scale: f32,
    rows: Range<usize>,
    cols: &mut [Column],
) {
    let Ok(keys) = <&[[f32; 16]; HD]>::try_from(keys.as_chunks::<16>().0) else {
        return;
    };
    let groups = rows.start / 16..rows.end.div_ceil(16);
    let Some(qt) = qt
        .as_chunks::<16>()
        .0
        .as_chunks::<HD>()
        .0
        .get(groups.clone())
    else {
        return;
    };
    let n = n.min(16).min(cols.len());
    for j in (0..n).step_by(2) {
        // An odd last slot is taken twice; its second copy is not stored.
        let slots = (j, if j + 1 < n { j + 1 } else { j });
        for (c, qt) in qt.chunks(3).enumerate() {
            let first = 16 * (groups.start + 3 * c);
            if let Ok(qt) = <&[[[f32; 16]; HD]; 3]>::try_from(qt) {
                scores_columns_groups_512(qt, keys, slots, scale, first, cols);
            } else if let Ok(qt) = <&[[[f32; 16]; HD]; 2]>::try_from(qt) {
                scores_columns_groups_512(qt, keys, slots, scale, first, cols);
            } else if let Ok(qt) = <&[[[f32; 16]; HD]; 1]>::try_from(qt) {
                scores_columns_groups_512(qt, keys, slots, scale, first, cols);
            }
        }
    }
}

/// The scores of slots `j0` and `j1` for `G` groups of 16 rows from row `first`: per query
/// dimension `d`, both slots' keys broadcast, and per group its rows' `q[d]` multiplied with
/// each into the chain `d mod 4` of that slot.
#[target_feature(enable = "avx512f,fma")]
#[inline]
#[allow(clippy::needless_range_loop)] // the chains indexed by constants: registers
fn scores_columns_groups_512<const G: usize, const HD: usize>(
    qt: &[[[f32; 16]; HD]; G],
    keys: &[[f32; 16]; HD],
    (j0, j1): (usize, usize),
    scale: f32,
    first: usize,
    cols: &mut [Column],
) {
    if j0 >= 16 || j1 >= 16 {
        return;
    }
    let mut acc = [[[_mm512_setzero_ps(); CHAINS]; 2]; G];
    for d0 in (0..HD).step_by(CHAINS) {
        for c in 0..CHAINS {
            let d = d0 + c;
            let k = [_mm512_set1_ps(keys[d][j0]), _mm512_set1_ps(keys[d][j1])];
            for g in 0..G {
                let q = load_f32x16(&qt[g][d]);
                for s in 0..2 {
                    acc[g][s][c] = _mm512_fmadd_ps(q, k[s], acc[g][s][c]);
                }
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        let at = first + 16 * g;
        store_scores_512(&acc[0], scale, &mut cols[j0][at..at + 16]);
        if j1 != j0 {
            store_scores_512(&acc[1], scale, &mut cols[j1][at..at + 16]);
        }
    }
}

/// [`VectorOps::weights_columns`](crate::attention::ops::VectorOps::weights_columns) of runs
/// of at most 16 slots, 16 rows at a time in the lanes: lane `r` of column `j` is row `r`'s
/// score `j`. Lane by lane, the operations are those of
/// [`weights`](crate::attention::ops::weights) for that row alone: the maximum over its first
/// `lens[r]` scores (order-free), the factor and the new state, then each weight
/// `exp(score − maximum)` and their sum from 0 in the order of `j`. The lanes of a group outside
/// `rows` count as rows of length 0, whose state stays as it is.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) fn weights_columns_512(
    cols: &mut [Column],
    rows: Range<usize>,
    lens: &[usize],
    (max, denominator): (&mut [f32], &mut [f32]),
    factors: &mut [f32],
) {
    let n = cols.len().min(16);
    for base in (rows.start / 16 * 16..rows.end).step_by(16) {
        // The group's lanes up to the last of `rows` in it.
        let lanes = rows.end.min(base + 16) - base;
        let mut len = [0.0f32; 16];
        for (lane, l) in len.iter_mut().enumerate().take(lanes) {
            if rows.contains(&(base + lane)) {
                *l = lens[base + lane] as f32;
            }
        }
        let len = load_f32x16(&len);
        let mut columns = [_mm512_setzero_ps(); 16];
        for (column, col) in columns.iter_mut().zip(cols.iter()).take(n) {
            *column = load_f32x16(&col.as_chunks::<16>().0[base / 16]);
        }
        // Lanes of column `j` that lie within their row.
        let within: [__mmask16; 16] = std::array::from_fn(|j| {
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(len, _mm512_set1_ps(j as f32))
        });
        let low = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut run_max = low;
        for (column, &within) in columns.iter().zip(&within) {
            run_max = _mm512_mask_max_ps(run_max, within, run_max, *column);
        }
        let state = base..base + lanes;
        let old_max = load_f32x16_prefix_or(&max[state.clone()], low);
        let raised = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(prefix_mask16(lanes), run_max, old_max);
        let one = _mm512_set1_ps(1.0);
        let factor = _mm512_mask_blend_ps(raised, one, exp16(_mm512_sub_ps(old_max, run_max)));
        let new_max = _mm512_mask_blend_ps(raised, old_max, run_max);
        let mut sum = _mm512_setzero_ps();
        for (column, &within) in columns.iter_mut().zip(&within) {
            *column = exp16(_mm512_sub_ps(*column, new_max));
            sum = _mm512_mask_add_ps(sum, within, sum, *column);
        }
        let old_denominator = load_f32x16_prefix(&denominator[state.clone()]);
        let rescaled = _mm512_mask_mul_ps(old_denominator, raised, old_denominator, factor);
        store_f32x16_prefix(
            &mut denominator[state.clone()],
            _mm512_add_ps(rescaled, sum),
        );
        store_f32x16_prefix(&mut max[state.clone()], new_max);
        store_f32x16_prefix(&mut factors[state], factor);
        for (column, col) in columns.iter().zip(cols.iter_mut()).take(n) {
            store_f32x16(&mut col.as_chunks_mut::<16>().0[base / 16], *column);
        }
    }
}
