//! AVX-512 VNNI, AVX-VNNI and AVX2 versions of the int8 tile kernel.
//!
//! All three compute, per output lane, the integer block sums `Σ c·q − offset · Σ q` exactly and
//! then the same two f32 fused multiply-adds as the scalar kernel, so their results are
//! bit-identical to it. AVX-512 takes a tile's 16 rows in one vector; the 256-bit kernels take
//! them as two halves of 8. Without VNNI, `vpmaddubsw` (unsigned × signed bytes, pairs summed
//! into i16) and `vpmaddwd` (pairs of i16 into i32) make the four-byte dot product; codes above
//! 127 would overflow the i16 pairs, so formats with `offset` 128 are multiplied as signed
//! codes `c − 128` instead (`|c − 128| · sign(q)`), which is the same integer.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m256, __m256i, __m512, __m512i, _CMP_GT_OQ, _mm256_abs_epi8, _mm256_add_epi32,
    _mm256_and_si256, _mm256_cvtepi32_ps, _mm256_cvtph_ps, _mm256_dpbusd_avx_epi32,
    _mm256_fmadd_ps, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_mul_ps, _mm256_set1_epi8,
    _mm256_set1_epi16, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_setzero_si256,
    _mm256_sign_epi8, _mm256_slli_epi32, _mm256_srli_epi16, _mm256_sub_epi32, _mm256_xor_si256,
    _mm512_abs_ps, _mm512_add_epi32, _mm512_and_si512, _mm512_castps_si512, _mm512_castsi512_ps,
    _mm512_cmp_ps_mask, _mm512_cvtepi8_epi32, _mm512_cvtepi32_epi8, _mm512_cvtepi32_ps,
    _mm512_cvtph_ps, _mm512_cvtps_epi32, _mm512_div_ps, _mm512_fmadd_ps, _mm512_maskz_div_ps,
    _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps, _mm512_permutexvar_ps, _mm512_reduce_add_epi32,
    _mm512_reduce_max_ps, _mm512_set1_epi8, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setr_epi32,
    _mm512_setzero_ps, _mm512_setzero_si512, _mm512_shuffle_f32x4, _mm512_shuffle_ps,
    _mm512_slli_epi32, _mm512_srli_epi16, _mm512_sub_epi32, _mm512_sub_ps,
};

use super::{ActRow, Codes, PackedMatrix, PlaneRow, Prefetch, QBLOCK, TILE_ROWS};
use crate::cpu::{Avx2, Avx512Vnni, AvxVnni};
use crate::x86::{
    load_f32x8_le, load_f32x16, load_f32x16_le, load_i128, load_i256, load_i512, load_u8x16,
    store_f32x8, store_f32x16, store_i32x16, store_i128,
};

/// The 8 quads (four codes each, what one `vpdpbusd` lane multiplies) of block `b` of a plane
/// row.
#[inline(always)]
fn codes_of<'a>(p: &PlaneRow<'a>, b: usize) -> &'a [i32; 8] {
    &p.q.as_chunks::<8>().0[b]
}

/// The planes of `N` activation rows, as arrays (the second plane repeats the first when the
/// activations have one).
#[inline(always)]
fn planes<'a, const N: usize>(rows: &[ActRow<'a>]) -> ([PlaneRow<'a>; N], [PlaneRow<'a>; N]) {
    (
        std::array::from_fn(|i| rows[i].hi),
        std::array::from_fn(|i| rows[i].lo.unwrap_or(rows[i].hi)),
    )
}

/// Runs `$body` with `$i` = 0, 1, 2 and 3 in turn, where `$i < $n` (a constant): the rows of a
/// group, unrolled, so that their accumulators stay in registers.
macro_rules! unroll_rows {
    ($n:expr, $i:ident, $body:block) => {{
        {
            let $i = 0;
            if $i < $n $body
        }
        {
            let $i = 1;
            if $i < $n $body
        }
        {
            let $i = 2;
            if $i < $n $body
        }
        {
            let $i = 3;
            if $i < $n $body
        }
    }};
}

/// Calls `$kernel::<N, NIB, TWO>($w, $tile, $rows, $out)` with the constants of this call: `N`
/// the number of rows (1 to 4), `NIB` whether codes are nibbles, `TWO` whether activations have
/// two planes.
macro_rules! dispatch {
    ($kernel:ident, $w:expr, $tile:expr, $rows:expr, $out:expr) => {{
        let nib = $w.format.codes == Codes::Nibbles;
        let two = $rows.first().is_some_and(|r| r.lo.is_some());
        match ($rows.len(), nib, two) {
            (1, true, false) => $kernel::<1, true, false>($w, $tile, $rows, $out),
            (2, true, false) => $kernel::<2, true, false>($w, $tile, $rows, $out),
            (3, true, false) => $kernel::<3, true, false>($w, $tile, $rows, $out),
            (4, true, false) => $kernel::<4, true, false>($w, $tile, $rows, $out),
            (1, false, false) => $kernel::<1, false, false>($w, $tile, $rows, $out),
            (2, false, false) => $kernel::<2, false, false>($w, $tile, $rows, $out),
            (3, false, false) => $kernel::<3, false, false>($w, $tile, $rows, $out),
            (4, false, false) => $kernel::<4, false, false>($w, $tile, $rows, $out),
            (1, true, true) => $kernel::<1, true, true>($w, $tile, $rows, $out),
            (2, true, true) => $kernel::<2, true, true>($w, $tile, $rows, $out),
            (3, true, true) => $kernel::<3, true, true>($w, $tile, $rows, $out),
            (4, true, true) => $kernel::<4, true, true>($w, $tile, $rows, $out),
            (1, false, true) => $kernel::<1, false, true>($w, $tile, $rows, $out),
            (2, false, true) => $kernel::<2, false, true>($w, $tile, $rows, $out),
            (3, false, true) => $kernel::<3, false, true>($w, $tile, $rows, $out),
            (4, false, true) => $kernel::<4, false, true>($w, $tile, $rows, $out),
            _ => {}
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

/// One or two tiles against 1 to 4 activation rows (`out` is `[tiles][rows][16]`), 16 weight
/// rows per vector. `prefetch`: whether the tiles' blocks may still be in memory rather than
/// cache (the first group of rows to read them), so that the kernel asks for them ahead.
pub(super) fn tile_avx512vnni(
    token: Avx512Vnni,
    w: &PackedMatrix,
    tiles: &[&[u8]],
    rows: &[ActRow<'_>],
    out: &mut [f32],
    prefetch: Prefetch<'_>,
) {
    // SAFETY: the `Avx512Vnni` token proves the CPU supports AVX-512F/BW/VNNI, AVX2, FMA and F16C.
    unsafe { tile_avx512vnni_impl(token, w, tiles, rows, out, prefetch) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn tile_avx512vnni_impl(
    _: Avx512Vnni,
    w: &PackedMatrix,
    tiles: &[&[u8]],
    rows: &[ActRow<'_>],
    out: &mut [f32],
    prefetch: Prefetch<'_>,
) {
    let nib = w.format.codes == Codes::Nibbles;
    let two = rows.first().is_some_and(|r| r.lo.is_some());
    // The kernel for the constants `T`, `N`, `NIB`, `TWO` and `SUB` of this call.
    macro_rules! call {
        ($t:literal, $n:literal, $nib:literal, $two:literal, $sub:literal) => {
            tile_512::<$t, $n, $nib, $two, $sub>(w, tiles, rows, out, prefetch)
        };
    }
    macro_rules! go {
        ($t:literal, $n:literal) => {
            match (nib, two, w.format.sub16) {
                (true, false, false) => call!($t, $n, true, false, false),
                (false, false, false) => call!($t, $n, false, false, false),
                (true, true, false) => call!($t, $n, true, true, false),
                (false, true, false) => call!($t, $n, false, true, false),
                (true, false, true) => call!($t, $n, true, false, true),
                (false, false, true) => call!($t, $n, false, false, true),
                (true, true, true) => call!($t, $n, true, true, true),
                (false, true, true) => call!($t, $n, false, true, true),
            }
        };
    }
    match (tiles.len(), rows.len()) {
        (1, 1) => go!(1, 1),
        (1, 2) => go!(1, 2),
        (1, 3) => go!(1, 3),
        (1, 4) => go!(1, 4),
        (2, 1) => go!(2, 1),
        (2, 2) => go!(2, 2),
        (2, 3) => go!(2, 3),
        (2, 4) => go!(2, 4),
        _ => {}
    }
}

/// Runs `$body` with `$t` = 0 and 1 in turn, where `$t < $n` (a constant): the tiles of a
/// call, unrolled.
macro_rules! unroll_tiles {
    ($n:expr, $t:ident, $body:block) => {{
        {
            let $t = 0;
            if $t < $n $body
        }
        {
            let $t = 1;
            if $t < $n $body
        }
    }};
}

/// The integer sums `Σ c · q` over quads `$from..$to` of one block (all 8, or the 4 of one
/// half), for `$T` tiles (their block bytes `$blocks`) and `$N` activation rows (one plane
/// each, the quads `$q`; the rows where `$rows[i]` is false are left as they start, as for
/// codes that are all zero), added to `$init` (`[[__m512i; N]; T]`, what the sums start from):
/// `[[__m512i; N]; T]`. Straight-line
/// code with constant indices, so that the `T × N` sums (independent chains) stay in registers
/// and each activation quad is broadcast once for all tiles. A macro rather than a function:
/// a function would not be inlined (target features forbid `inline(always)`), and would return
/// its vectors through memory.
macro_rules! isums {
    ($T:expr, $N:expr, $nib:expr, $blocks:expr, $code_bytes:expr, $q:expr, $from:expr, $to:expr, $rows:expr, $init:expr) => {{
        let low = _mm512_set1_epi8(0x0F);
        // With few chains (one or two rows), even and odd quads go to separate sums, halving
        // the chain of dependent `vpdpbusd`s.
        let split = $N <= 2;
        let mut a = [$init, [[_mm512_setzero_si512(); $N]; $T]];
        let mut g: [&[[u8; 64]]; $T] = [&[]; $T];
        unroll_tiles!($T, t, {
            g[t] = $blocks[t][..$code_bytes].as_chunks::<64>().0;
        });
        macro_rules! k {
            ($k:literal) => {{
                if $from <= $k && $k < $to {
                    let mut c = [_mm512_setzero_si512(); $T];
                    unroll_tiles!($T, t, {
                        c[t] = if $nib {
                            let p = load_i512(&g[t][$k % 4]);
                            if $k < 4 {
                                _mm512_and_si512(p, low)
                            } else {
                                _mm512_and_si512(_mm512_srli_epi16::<4>(p), low)
                            }
                        } else {
                            load_i512(&g[t][$k])
                        };
                    });
                    let h = if split { $k % 2 } else { 0 };
                    unroll_rows!($N, i, {
                        if $rows[i] {
                            let x: &i32 = &$q[i][$k];
                            // Pairs for three or four rows. With one or two, the loop is
                            // bound by the weights' memory, and pairs there did not pay: a
                            // decode with the default topology's types measured 0.93×,
                            // 0.93× and 0.97× with them (Q4_1 alone 1.05×).
                            if $T == 2 && $N >= 3 {
                                let (a0, a1) = dpbusd_pair!(a[h][0][i], a[h][1][i], c[0], c[1], x);
                                a[h][0][i] = a0;
                                a[h][1][i] = a1;
                            } else {
                                unroll_tiles!($T, t, {
                                    a[h][t][i] = dpbusd_bcst!(a[h][t][i], c[t], x);
                                });
                            }
                        }
                    });
                }
            }};
        }
        k!(0);
        k!(1);
        k!(2);
        k!(3);
        k!(4);
        k!(5);
        k!(6);
        k!(7);
        if split {
            unroll_tiles!($T, t, {
                unroll_rows!($N, i, {
                    a[0][t][i] = _mm512_add_epi32(a[0][t][i], a[1][t][i]);
                });
            });
        }
        a[0]
    }};
}

/// `vpdpbusd` of `$c` with the quad `$x` (an `&i32`) broadcast from memory by the instruction
/// itself (`{1to16}`): left to the compiler, the broadcasts of a block are hoisted into
/// registers that do not exist, and spilled.
macro_rules! dpbusd_bcst {
    ($a:expr, $c:expr, $x:expr) => {{
        let mut a: __m512i = $a;
        let x: *const i32 = $x;
        // SAFETY: `x` points at a live `i32` (a reference); the instruction reads those 4 bytes
        // and writes only `a`. The caller's target features include AVX-512 VNNI.
        unsafe {
            std::arch::asm!(
                "vpdpbusd {a}, {c}, dword ptr [{x}]{{1to16}}",
                a = inout(zmm_reg) a,
                c = in(zmm_reg) $c,
                x = in(reg) x,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        a
    }};
}

/// [`dpbusd_bcst!`] of two tiles' code vectors `$c0` and `$c1` with one quad `$x` (an `&i32`),
/// broadcast once into a register for both: `($a0, $a1)` after. One 4-byte load for two
/// products rather than two: with the tiles' 64-byte code loads, loads are what bounds the
/// loop on Zen 5 (8 products with 2 vector loads ran at 6.0 G `vpdpbusd`/s with 8 broadcast
/// operands, 8.1 with 4 broadcasts to registers; 8.1 without the vector loads either way).
/// Inside one `asm!` block the broadcast cannot be hoisted, as [`dpbusd_bcst!`] says of the
/// compiler's own.
macro_rules! dpbusd_pair {
    ($a0:expr, $a1:expr, $c0:expr, $c1:expr, $x:expr) => {{
        let (mut a0, mut a1): (__m512i, __m512i) = ($a0, $a1);
        let x: *const i32 = $x;
        // The broadcast's register, a named output: with AVX-512 in the baseline (`-C
        // target-cpu=native` on these machines, or `x86-64-v4`), LLVM wrote a discarded one
        // (`out(zmm_reg) _`) as a byte register (`R31BH`), which no instruction takes.
        let _q: __m512i;
        // SAFETY: `x` points at a live `i32` (a reference); the block reads those 4 bytes and
        // writes only `a0`, `a1` and its scratch register. The caller's target features include
        // AVX-512F and VNNI.
        unsafe {
            std::arch::asm!(
                "vpbroadcastd {q}, dword ptr [{x}]",
                "vpdpbusd {a0}, {c0}, {q}",
                "vpdpbusd {a1}, {c1}, {q}",
                a0 = inout(zmm_reg) a0,
                a1 = inout(zmm_reg) a1,
                c0 = in(zmm_reg) $c0,
                c1 = in(zmm_reg) $c1,
                x = in(reg) x,
                q = out(zmm_reg) _q,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        (a0, a1)
    }};
}

/// How far ahead, in blocks of a tile, the kernel prefetches (at most a tile's blocks: then it
/// stays one run of tiles ahead). Far enough to cover the memory's latency at a decode's pace:
/// on a Zen 5 EPYC, 4 blocks gave 0.86× the decode of 16 (Q4_1, 2 threads), 8 0.94×; 12 and 16
/// about the same; 24 and 32, before the bound, left the blocks past the next tiles' start
/// unasked for the default model's rows of 18 blocks (0.87× and 0.81×).
const PREFETCH_BLOCKS: usize = 16;

/// 16 scales (or minimums) from `bytes`, stored as f32 or f16.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
fn lanes_512(bytes: &[u8], f32s: bool) -> __m512 {
    if f32s {
        load_f32x16_le(&bytes.as_chunks::<64>().0[0])
    } else {
        _mm512_cvtph_ps(load_i256(&bytes.as_chunks::<32>().0[0]))
    }
}

/// `T` tiles (16 weight rows each) against `N` activation rows: per block, each code vector is
/// unpacked once and each activation quad broadcast once for all `T × N` integer sums, which
/// run as independent chains. `out` is `[T][N][16]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
fn tile_512<const T: usize, const N: usize, const NIB: bool, const TWO: bool, const SUB: bool>(
    w: &PackedMatrix,
    tiles: &[&[u8]],
    rows: &[ActRow<'_>],
    out: &mut [f32],
    prefetch: Prefetch<'_>,
) {
    let f = w.format;
    let (offset, has_min, f32s) = (f.offset, f.has_min, f.f32_scales);
    // The codes' bytes per block: a constant of the kernel, so that their vectors are read
    // without checks.
    let code_bytes = if NIB {
        TILE_ROWS * QBLOCK / 2
    } else {
        TILE_ROWS * QBLOCK
    };
    let (scale_bytes, stride) = (TILE_ROWS * f.scale_bytes(), f.block_stride());
    let subs = if SUB { 2 } else { 1 };
    let (hi, lo) = planes::<N>(rows);
    let sc: [PlaneRow<'_>; N] = std::array::from_fn(|i| rows[i].scales());
    let mut acc = [[_mm512_setzero_ps(); N]; T];
    // No closures below: they would not inherit the target features, and would not inline.
    let mut blocks: [&[u8]; T] = [&[]; T];
    let mut hq: [&[i32; 8]; N] = [&[0; 8]; N];
    let mut lq: [&[i32; 8]; N] = [&[0; 8]; N];
    let n_blocks = w.blocks();
    for b in 0..n_blocks {
        unroll_tiles!(T, t, {
            blocks[t] = &tiles[t][b * stride..][..stride];
            // The first group of rows streams the weights from memory: ask for a few blocks
            // ahead (past the tiles' end, the next tiles' first ones). Later groups find them in
            // cache, where a prefetch of them only costs.
            if let Prefetch::Own(next) = prefetch {
                let ahead = b + PREFETCH_BLOCKS.min(n_blocks);
                let (tile, block) = if ahead < n_blocks {
                    (Some(tiles[t]), ahead)
                } else {
                    (next.get(t).copied(), ahead - n_blocks)
                };
                if let Some(tile) = tile
                    && let Some(bytes) = tile.get(block * stride..)
                {
                    crate::prefetch::lines(&bytes[..stride.min(bytes.len())]);
                }
            }
        });
        // Or, a later group: the same block of the tiles that come next, so that they stream
        // in from memory while this group computes from cache.
        if let Prefetch::Next(next) = prefetch {
            for tile in next {
                if let Some(block) = tile.get(b * stride..) {
                    crate::prefetch::lines(&block[..stride.min(block.len())]);
                }
            }
        }
        let mut lc = [false; N];
        unroll_rows!(N, i, {
            hq[i] = codes_of(&hi[i], b);
            if TWO {
                lq[i] = codes_of(&lo[i], b);
                lc[i] = lo[i].coded[b];
            }
        });
        let coded = lc.contains(&true);
        // One sub-block at a time: the integer sums of the value's plane, then (two planes)
        // `256 · Σ_hi + Σ_lo`, converted once: `acc ← fma(Σ, s·d)`; then the minimums' terms:
        // the scalar kernel's order.
        for h in 0..subs {
            let (from, to) = if SUB { (4 * h, 4 * h + 4) } else { (0, 8) };
            let zero = [[_mm512_setzero_si512(); N]; T];
            let mut sums = isums!(T, N, NIB, blocks, code_bytes, hq, from, to, [true; N], zero);
            if TWO {
                unroll_tiles!(T, t, {
                    unroll_rows!(N, i, {
                        sums[t][i] = _mm512_slli_epi32::<8>(sums[t][i]);
                    });
                });
                // The residual's sums, of the rows whose residual codes in the block are not
                // all zero (the others' are zero), added by the products themselves onto
                // `256 · Σ_hi` (integers: the same sum in any order), in no registers of their
                // own.
                if coded {
                    sums = isums!(T, N, NIB, blocks, code_bytes, lq, from, to, lc, sums);
                }
            }
            // Per row, once for every tile: its scale and (with an offset) its code sum.
            let mut dv = [_mm512_setzero_ps(); N];
            let mut qv = [_mm512_setzero_si512(); N];
            unroll_rows!(N, i, {
                dv[i] = _mm512_set1_ps(sc[i].d[b]);
                if offset != 0 {
                    qv[i] = _mm512_set1_epi32(offset * sc[i].sub_sum(b, h, subs));
                }
            });
            unroll_tiles!(T, t, {
                let s = lanes_512(&blocks[t][code_bytes + h * scale_bytes..], f32s);
                unroll_rows!(N, i, {
                    let isum = if offset != 0 {
                        _mm512_sub_epi32(sums[t][i], qv[i])
                    } else {
                        sums[t][i]
                    };
                    let sd = _mm512_mul_ps(s, dv[i]);
                    acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sd, acc[t][i]);
                });
            });
        }
        if has_min {
            for h in 0..subs {
                // Per row, once for every tile: `d · Σ q` of the sub-block.
                let mut ds = [_mm512_setzero_ps(); N];
                unroll_rows!(N, i, {
                    ds[i] = _mm512_set1_ps(sc[i].d[b] * sc[i].sub_sum(b, h, subs) as f32);
                });
                unroll_tiles!(T, t, {
                    let m = lanes_512(&blocks[t][code_bytes + (subs + h) * scale_bytes..], f32s);
                    unroll_rows!(N, i, {
                        acc[t][i] = _mm512_fmadd_ps(m, ds[i], acc[t][i]);
                    });
                });
            }
        }
    }
    let out = out.as_chunks_mut::<TILE_ROWS>().0;
    for t in 0..T {
        for i in 0..N {
            store_f32x16(&mut out[t * N + i], acc[t][i]);
        }
    }
}

//
// ---------------------------------------------------------------------------------------------
// 256-bit: AVX-VNNI and AVX2

/// One tile with AVX-VNNI.
pub(super) fn tile_avxvnni(
    token: AvxVnni,
    w: &PackedMatrix,
    tile: &[u8],
    rows: &[ActRow<'_>],
    out: &mut [f32],
) {
    // SAFETY: the `AvxVnni` token proves the CPU supports AVX-VNNI, AVX2, FMA and F16C.
    unsafe { tile_avxvnni_impl(token, w, tile, rows, out) }
}

#[target_feature(enable = "avx2,avxvnni,fma,f16c")]
fn tile_avxvnni_impl(
    _: AvxVnni,
    w: &PackedMatrix,
    tile: &[u8],
    rows: &[ActRow<'_>],
    out: &mut [f32],
) {
    dispatch!(tile_vnni, w, tile, rows, out);
}

/// One tile with AVX2 alone. Codes above 127 (formats with offset 128) go as signed codes.
pub(super) fn tile_avx2(
    token: Avx2,
    w: &PackedMatrix,
    tile: &[u8],
    rows: &[ActRow<'_>],
    out: &mut [f32],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
    unsafe { tile_avx2_impl(token, w, tile, rows, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_avx2_impl(_: Avx2, w: &PackedMatrix, tile: &[u8], rows: &[ActRow<'_>], out: &mut [f32]) {
    dispatch!(tile_madd, w, tile, rows, out);
}

/// Eight scales (or minimums): lanes `8h..8h + 8` of a block's.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn lanes_256(bytes: &[u8], h: usize, f32s: bool) -> __m256 {
    if f32s {
        load_f32x8_le(&bytes.as_chunks::<32>().0[h])
    } else {
        _mm256_cvtph_ps(load_u8x16(&bytes.as_chunks::<16>().0[h]))
    }
}

/// `Σ_k c[k] · q[4k..4k + 4]` per lane with VNNI, in two chains (`c` and `q` of an even
/// length).
#[target_feature(enable = "avx2,avxvnni")]
#[inline]
fn dot_vnni(c: &[__m256i], q: &[i32], _signed: bool) -> __m256i {
    let mut a = _mm256_setzero_si256();
    let mut b = _mm256_setzero_si256();
    for (c, q) in c.chunks_exact(2).zip(q.chunks_exact(2)) {
        a = _mm256_dpbusd_avx_epi32(a, c[0], _mm256_set1_epi32(q[0]));
        b = _mm256_dpbusd_avx_epi32(b, c[1], _mm256_set1_epi32(q[1]));
    }
    _mm256_add_epi32(a, b)
}

/// `Σ_k c[k] · q[4k..4k + 4]` per lane with byte and word multiply-adds; with `signed`, `c`
/// holds signed codes.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_madd(c: &[__m256i], q: &[i32], signed: bool) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let mut a = _mm256_setzero_si256();
    for (c, &q) in c.iter().zip(q) {
        let x = _mm256_set1_epi32(q);
        let pairs = if signed {
            _mm256_maddubs_epi16(_mm256_abs_epi8(*c), _mm256_sign_epi8(x, *c))
        } else {
            _mm256_maddubs_epi16(*c, x)
        };
        a = _mm256_add_epi32(a, _mm256_madd_epi16(pairs, ones));
    }
    a
}

/// The 256-bit tile kernel, compiled once per way of making the dot products (`$dot`, with
/// the target features it needs): a tile's 16 rows as two halves of 8 lanes.
macro_rules! tile_256 {
    ($name:ident, $features:literal, $dot:ident, $signed_codes:expr) => {
        #[target_feature(enable = $features)]
        #[inline]
        fn $name<const N: usize, const NIB: bool, const TWO: bool>(
            w: &PackedMatrix,
            tile: &[u8],
            rows: &[ActRow<'_>],
            out: &mut [f32],
        ) {
            let f = w.format;
            let (has_min, f32s, subs) = (f.has_min, f.f32_scales, f.subs());
            // Quads per sub-block.
            let width = 8 / subs;
            let signed: bool = $signed_codes(f);
            // Signed codes already hold the offset.
            let offset = if signed { 0 } else { f.offset };
            let (code_bytes, scale_bytes) = (f.code_bytes(), TILE_ROWS * f.scale_bytes());
            let (hi, lo) = planes::<N>(rows);
            let sc: [PlaneRow<'_>; N] = std::array::from_fn(|i| rows[i].scales());
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            let low = _mm256_set1_epi8(0x0F);
            let flip = _mm256_set1_epi8(-128);
            for (b, block) in tile.chunks_exact(f.block_stride()).enumerate() {
                let (codes, scales) = block.split_at(code_bytes);
                let mins = &scales[subs * scale_bytes..];
                let g = codes.as_chunks::<64>().0;
                for half in 0..2 {
                    let mut c = [_mm256_setzero_si256(); 8];
                    if NIB {
                        for k in 0..4 {
                            let p = load_i256(&g[k].as_chunks::<32>().0[half]);
                            c[k] = _mm256_and_si256(p, low);
                            c[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(p), low);
                        }
                    } else {
                        for k in 0..8 {
                            let p = load_i256(&g[k].as_chunks::<32>().0[half]);
                            c[k] = if signed { _mm256_xor_si256(p, flip) } else { p };
                        }
                    }
                    unroll_rows!(N, i, {
                        let mut a = acc[i][half];
                        let e = &sc[i];
                        let (qh, ql) = (codes_of(&hi[i], b), codes_of(&lo[i], b));
                        for h in 0..subs {
                            let s = lanes_256(&scales[h * scale_bytes..], half, f32s);
                            let k = h * width..(h + 1) * width;
                            let mut dot = $dot(&c[k.clone()], &qh[k.clone()], signed);
                            if TWO {
                                dot = _mm256_slli_epi32::<8>(dot);
                                // Zero residual codes add nothing.
                                if lo[i].coded[b] {
                                    dot =
                                        _mm256_add_epi32(dot, $dot(&c[k.clone()], &ql[k], signed));
                                }
                            }
                            let isum = _mm256_sub_epi32(
                                dot,
                                _mm256_set1_epi32(offset * e.sub_sum(b, h, subs)),
                            );
                            a = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(isum),
                                _mm256_mul_ps(s, _mm256_set1_ps(e.d[b])),
                                a,
                            );
                        }
                        if has_min {
                            for h in 0..subs {
                                let m = lanes_256(&mins[h * scale_bytes..], half, f32s);
                                let ds = e.d[b] * e.sub_sum(b, h, subs) as f32;
                                a = _mm256_fmadd_ps(m, _mm256_set1_ps(ds), a);
                            }
                        }
                        acc[i][half] = a;
                    });
                }
            }
            for (out, acc) in out.as_chunks_mut::<TILE_ROWS>().0.iter_mut().zip(acc) {
                let halves = out.as_chunks_mut::<8>().0;
                store_f32x8(&mut halves[0], acc[0]);
                store_f32x8(&mut halves[1], acc[1]);
            }
        }
    };
}

/// VNNI multiplies codes up to 255 as they are.
fn no_signed_codes(_: super::PackFormat) -> bool {
    false
}

/// Without VNNI, 8-bit codes with offset 128 go as signed codes (see the module documentation).
fn signed_codes(f: super::PackFormat) -> bool {
    f.codes == Codes::Bytes && f.offset == 128
}

tile_256!(
    tile_vnni,
    "avx2,avxvnni,fma,f16c",
    dot_vnni,
    no_signed_codes
);
tile_256!(tile_madd, "avx2,fma,f16c", dot_madd, signed_codes);

// ---------------------------------------------------------------------------------------------
// Activation quantization

/// [`super::act::quantize_block`] for every block of `x`, 32 values as two vectors, with the
/// same operations (so the same codes, scales and sums).
pub(super) fn quantize_blocks_512(
    token: Avx512Vnni,
    x: &[f32],
    q: &mut [i32],
    d: &mut [f32],
    sum: &mut [i32],
    half: &mut [i32],
) {
    // SAFETY: the `Avx512Vnni` token proves the CPU supports AVX-512F/BW, AVX2 and FMA.
    unsafe { quantize_blocks_512_impl(token, x, q, d, sum, half) }
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn quantize_blocks_512_impl(
    _: Avx512Vnni,
    x: &[f32],
    q: &mut [i32],
    d: &mut [f32],
    sum: &mut [i32],
    half: &mut [i32],
) {
    let (groups, tail) = x.as_chunks::<{ 16 * QBLOCK }>();
    let (quad_groups, quad_tail) = q.as_chunks_mut::<{ 16 * QBLOCK / 4 }>();
    let (d_groups, d_tail) = d.as_chunks_mut::<16>();
    let (sum_groups, sum_tail) = sum.as_chunks_mut::<16>();
    let (half_groups, half_tail) = half.as_chunks_mut::<16>();
    let whole = groups
        .iter()
        .zip(quad_groups)
        .zip(d_groups)
        .zip(sum_groups)
        .zip(half_groups);
    for ((((x, q), d), sum), half) in whole {
        quantize_16_blocks_512(x, q, d, sum, half);
    }
    let blocks = tail.as_chunks::<32>().0;
    let quads = quad_tail.as_chunks_mut::<8>().0;
    let rest = blocks
        .iter()
        .zip(quads)
        .zip(d_tail)
        .zip(sum_tail)
        .zip(half_tail);
    for ((((x, q), d), sum), half) in rest {
        quantize_block_512(x, q, d, sum, half);
    }
}

/// `v · id` rounded to the nearest integer (ties to even) and clamped to ±127: the scalar's
/// codes. The conversion rounds (to nearest even, the mode Rust never changes), and clamping
/// to integers before rounding gives what clamping after it does.
#[target_feature(enable = "avx512f")]
#[inline]
fn code_512(v: __m512, id: __m512) -> __m512i {
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, id), lo), hi))
}

/// One block, its reductions horizontal: the blocks after the last whole group of 16.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[inline]
fn quantize_block_512(x: &[f32; 32], q: &mut [i32; 8], d: &mut f32, sum: &mut i32, half: &mut i32) {
    let [a, b] = x.as_chunks::<16>().0 else {
        return;
    };
    let (a, b) = (load_f32x16(a), load_f32x16(b));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    *d = amax / 127.0;
    let id = _mm512_set1_ps(if *d > 0.0 { 1.0 / *d } else { 0.0 });
    let (qa, qb) = (code_512(a, id), code_512(b, id));
    store_block_512(qa, qb, q, sum, half);
}

/// A block's codes (its two halves' 16 each) stored as bytes in `q`, their sum and the first
/// half's in `sum` and `half`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn store_block_512(qa: __m512i, qb: __m512i, q: &mut [i32; 8], sum: &mut i32, half: &mut i32) {
    *half = _mm512_reduce_add_epi32(qa);
    *sum = *half + _mm512_reduce_add_epi32(qb);
    let bytes = [_mm512_cvtepi32_epi8(qa), _mm512_cvtepi32_epi8(qb)];
    for (quads, v) in q.as_chunks_mut::<4>().0.iter_mut().zip(bytes) {
        store_i128(quads, v);
    }
}

/// 16 blocks at once: their maxima, scales and code sums reduced 16 vectors to one (lane `j`
/// for block `j`), so that the divisions run once for all of them and no reduction ends in a
/// scalar. Maxima and integer sums do not depend on their order: the same scales, codes and
/// sums as one block at a time.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[inline]
fn quantize_16_blocks_512(
    x: &[f32; 16 * QBLOCK],
    q: &mut [i32; 16 * QBLOCK / 4],
    d: &mut [f32; 16],
    sum: &mut [i32; 16],
    half: &mut [i32; 16],
) {
    let blocks = x.as_chunks::<16>().0;
    let mut pairs = [_mm512_setzero_ps(); 8];
    for (pair, v) in pairs.iter_mut().zip(blocks.as_chunks::<4>().0) {
        let [a0, b0, a1, b1] = v.each_ref().map(|v| _mm512_abs_ps(load_f32x16(v)));
        *pair = fold_pair_512::<MAX>(_mm512_max_ps(a0, b0), _mm512_max_ps(a1, b1));
    }
    let amax = fold_eight_512::<MAX>(pairs);
    let dv = _mm512_div_ps(amax, _mm512_set1_ps(127.0));
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(dv, _mm512_setzero_ps());
    let idv = _mm512_maskz_div_ps(positive, _mm512_set1_ps(1.0), dv);
    store_f32x16(d, dv);
    let mut ids = [0.0f32; 16];
    store_f32x16(&mut ids, idv);
    let (mut first, mut second) = ([_mm512_setzero_ps(); 8], [_mm512_setzero_ps(); 8]);
    let quads = q.as_chunks_mut::<4>().0;
    for (p, (v, quads)) in blocks
        .as_chunks::<4>()
        .0
        .iter()
        .zip(quads.as_chunks_mut::<4>().0)
        .enumerate()
    {
        let mut codes = [_mm512_setzero_si512(); 4];
        for (k, (code, v)) in codes.iter_mut().zip(v).enumerate() {
            *code = code_512(load_f32x16(v), _mm512_set1_ps(ids[2 * p + k / 2]));
        }
        for (quads, code) in quads.iter_mut().zip(codes) {
            store_i128(quads, _mm512_cvtepi32_epi8(code));
        }
        let [a0, b0, a1, b1] = codes.map(|c| _mm512_castsi512_ps(c));
        first[p] = fold_pair_512::<ADD>(a0, a1);
        second[p] = fold_pair_512::<ADD>(b0, b1);
    }
    let h = _mm512_castps_si512(fold_eight_512::<ADD>(first));
    let s = _mm512_add_epi32(h, _mm512_castps_si512(fold_eight_512::<ADD>(second)));
    store_i32x16(half, h);
    store_i32x16(sum, s);
}

/// Which reduction [`fold_pair_512`] and [`fold_eight_512`] apply: the maximum of floats, or
/// the sum of `i32` lanes.
const MAX: bool = true;
const ADD: bool = false;

/// The lanes of two vectors combined pairwise, `MAX` or `ADD`: 128-bit chunks 0 and 2 of `x`
/// with 1 and 3, then the same of `y`, so that `x` is left in chunks 0–1 (8 lanes) and `y`
/// in 2–3.
#[target_feature(enable = "avx512f")]
#[inline]
fn fold_pair_512<const OP: bool>(x: __m512, y: __m512) -> __m512 {
    let lo = _mm512_shuffle_f32x4::<0x44>(x, y);
    let hi = _mm512_shuffle_f32x4::<0xEE>(x, y);
    fold_op::<OP>(lo, hi)
}

#[target_feature(enable = "avx512f")]
#[inline]
fn fold_op<const OP: bool>(a: __m512, b: __m512) -> __m512 {
    if OP == MAX {
        _mm512_max_ps(a, b)
    } else {
        _mm512_castsi512_ps(_mm512_add_epi32(
            _mm512_castps_si512(a),
            _mm512_castps_si512(b),
        ))
    }
}

/// Eight [`fold_pair_512`]s of 16 vectors (pair `i` of vectors `2i` and `2i + 1`) reduced to
/// one vector whose lane `j` is the reduction of vector `j`'s 16 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
fn fold_eight_512<const OP: bool>(r: [__m512; 8]) -> __m512 {
    // Chunk `c` of `s[i]`: four lanes of vector `4i + c`.
    let s: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (r[2 * i], r[2 * i + 1]);
        let lo = _mm512_shuffle_f32x4::<0x88>(a, b);
        let hi = _mm512_shuffle_f32x4::<0xDD>(a, b);
        fold_op::<OP>(lo, hi)
    });
    // Chunk `c` of `t[i]`: two lanes of vector `8i + c`, then two of vector `8i + 4 + c`.
    let t: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (s[2 * i], s[2 * i + 1]);
        fold_op::<OP>(
            _mm512_shuffle_ps::<0x88>(a, b),
            _mm512_shuffle_ps::<0xDD>(a, b),
        )
    });
    // Lane `4c + k` of `u`: vector `4k + c`; back to lane `j` for vector `j`.
    let u = fold_op::<OP>(
        _mm512_shuffle_ps::<0x88>(t[0], t[1]),
        _mm512_shuffle_ps::<0xDD>(t[0], t[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, u)
}

/// [`super::act::quantize_residual`] with the same operations (the same codes and sums): the
/// residual `x − d · q` (a product, then a difference: no fused multiply-add), scaled by
/// `256 / d`, rounded to nearest even, clamped; zero in the blocks `refined` leaves out.
#[allow(clippy::too_many_arguments)]
pub(super) fn quantize_residual_512(
    token: Avx512Vnni,
    x: &[f32],
    hi_quads: &[i32],
    hi_d: &[f32],
    refined: &[bool],
    q: &mut [i32],
    sum: &mut [i32],
    half: &mut [i32],
) {
    // SAFETY: the `Avx512Vnni` token proves the CPU supports AVX-512F/BW, AVX2 and FMA.
    unsafe { quantize_residual_512_impl(token, x, hi_quads, hi_d, refined, q, sum, half) }
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn quantize_residual_512_impl(
    _: Avx512Vnni,
    x: &[f32],
    hi_quads: &[i32],
    hi_d: &[f32],
    refined: &[bool],
    q: &mut [i32],
    sum: &mut [i32],
    half: &mut [i32],
) {
    let blocks = x.as_chunks::<32>().0;
    let his = hi_quads.as_chunks::<8>().0;
    let quads = q.as_chunks_mut::<8>().0;
    let rows = blocks
        .iter()
        .zip(his)
        .zip(hi_d.iter().zip(refined))
        .zip(quads)
        .zip(sum)
        .zip(half);
    for (((((x, h), (&d, &refined)), q), sum), half) in rows {
        if !refined {
            *q = [0; 8];
            (*sum, *half) = (0, 0);
            continue;
        }
        let [a, b] = x.as_chunks::<16>().0 else {
            continue;
        };
        let [ha, hb] = h.as_chunks::<4>().0 else {
            continue;
        };
        let dv = _mm512_set1_ps(d);
        let id = _mm512_set1_ps(if d > 0.0 {
            super::act::RESIDUAL_STEPS / d
        } else {
            0.0
        });
        let residual = |v: __m512, h: &[i32; 4]| {
            let hq = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_i128(h)));
            _mm512_sub_ps(v, _mm512_mul_ps(dv, hq))
        };
        let qa = code_512(residual(load_f32x16(a), ha), id);
        let qb = code_512(residual(load_f32x16(b), hb), id);
        store_block_512(qa, qb, q, sum, half);
    }
}
