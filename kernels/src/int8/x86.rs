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
    __m256, __m256i, __m512, __m512i, _mm256_abs_epi8, _mm256_add_epi32, _mm256_and_si256,
    _mm256_cvtepi32_ps, _mm256_cvtph_ps, _mm256_dpbusd_avx_epi32, _mm256_fmadd_ps,
    _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_mul_ps, _mm256_set1_epi8, _mm256_set1_epi16,
    _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_sign_epi8,
    _mm256_srli_epi16, _mm256_sub_epi32, _mm256_xor_si256, _mm512_add_epi32, _mm512_and_si512,
    _mm512_cvtepi32_ps, _mm512_cvtph_ps, _mm512_dpbusd_epi32, _mm512_fmadd_ps, _mm512_mul_ps,
    _mm512_set1_epi8, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512,
    _mm512_srli_epi16, _mm512_sub_epi32,
};

use super::{ActRow, Codes, PackedMatrix, PlaneRow, QBLOCK, TILE_ROWS};
use crate::cpu::{Avx2, Avx512Vnni, AvxVnni};
use crate::x86::{
    load_f32x8_le, load_f32x16_le, load_i256, load_i512, load_u8x16, store_f32x8, store_f32x16,
};

/// Four activation codes as one little-endian 32-bit lane.
#[inline(always)]
fn quad(q: &[i8; QBLOCK], k: usize) -> i32 {
    i32::from_le_bytes([
        q[4 * k] as u8,
        q[4 * k + 1] as u8,
        q[4 * k + 2] as u8,
        q[4 * k + 3] as u8,
    ])
}

/// Block `b` of a plane row's codes.
#[inline(always)]
fn codes_of<'a>(p: &PlaneRow<'a>, b: usize) -> &'a [i8; QBLOCK] {
    &p.q.as_chunks::<QBLOCK>().0[b]
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

/// One tile against 1 to 4 activation rows (`out` is `[rows][16]`), 16 weight rows per vector.
pub(super) fn tile_avx512vnni(
    token: Avx512Vnni,
    w: &PackedMatrix,
    tile: &[u8],
    rows: &[ActRow<'_>],
    out: &mut [f32],
) {
    // SAFETY: the `Avx512Vnni` token proves the CPU supports AVX-512F/BW/VNNI, AVX2, FMA and F16C.
    unsafe { tile_avx512vnni_impl(token, w, tile, rows, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn tile_avx512vnni_impl(
    _: Avx512Vnni,
    w: &PackedMatrix,
    tile: &[u8],
    rows: &[ActRow<'_>],
    out: &mut [f32],
) {
    dispatch!(tile_512, w, tile, rows, out);
}

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

/// `Σ_k c[k] · q[4k..4k + 4]` per lane, in two chains.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
fn dot_512(c: &[__m512i; 8], q: &[i8; QBLOCK]) -> __m512i {
    let mut a = _mm512_setzero_si512();
    let mut b = _mm512_setzero_si512();
    for k in (0..8).step_by(2) {
        a = _mm512_dpbusd_epi32(a, c[k], _mm512_set1_epi32(quad(q, k)));
        b = _mm512_dpbusd_epi32(b, c[k + 1], _mm512_set1_epi32(quad(q, k + 1)));
    }
    _mm512_add_epi32(a, b)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
fn tile_512<const N: usize, const NIB: bool, const TWO: bool>(
    w: &PackedMatrix,
    tile: &[u8],
    rows: &[ActRow<'_>],
    out: &mut [f32],
) {
    let f = w.format;
    let (offset, has_min, f32s) = (f.offset, f.has_min, f.f32_scales);
    let (code_bytes, scale_bytes) = (f.code_bytes(), TILE_ROWS * f.scale_bytes());
    let (hi, lo) = planes::<N>(rows);
    let mut acc = [_mm512_setzero_ps(); N];
    let low = _mm512_set1_epi8(0x0F);
    for (b, block) in tile.chunks_exact(f.block_stride()).enumerate() {
        let (codes, rest) = block.split_at(code_bytes);
        let g = codes.as_chunks::<64>().0;
        let mut c = [_mm512_setzero_si512(); 8];
        if NIB {
            for k in 0..4 {
                let p = load_i512(&g[k]);
                c[k] = _mm512_and_si512(p, low);
                c[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(p), low);
            }
        } else {
            for k in 0..8 {
                c[k] = load_i512(&g[k]);
            }
        }
        let s = lanes_512(rest, f32s);
        let m = if has_min {
            lanes_512(&rest[scale_bytes..], f32s)
        } else {
            _mm512_setzero_ps()
        };
        unroll_rows!(N, i, {
            let mut a = acc[i];
            let (h, l) = (&hi[i], &lo[i]);
            let isum = _mm512_sub_epi32(
                dot_512(&c, codes_of(h, b)),
                _mm512_set1_epi32(offset * h.sum[b]),
            );
            a = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(isum),
                _mm512_mul_ps(s, _mm512_set1_ps(h.d[b])),
                a,
            );
            if TWO {
                let isum = _mm512_sub_epi32(
                    dot_512(&c, codes_of(l, b)),
                    _mm512_set1_epi32(offset * l.sum[b]),
                );
                a = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(s, _mm512_set1_ps(l.d[b])),
                    a,
                );
            }
            if has_min {
                a = _mm512_fmadd_ps(m, _mm512_set1_ps(h.d[b] * h.sum[b] as f32), a);
                if TWO {
                    a = _mm512_fmadd_ps(m, _mm512_set1_ps(l.d[b] * l.sum[b] as f32), a);
                }
            }
            acc[i] = a;
        });
    }
    for (out, acc) in out.as_chunks_mut::<TILE_ROWS>().0.iter_mut().zip(acc) {
        store_f32x16(out, acc);
    }
}

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

/// `Σ_k c[k] · q[4k..4k + 4]` per lane with VNNI, in two chains.
#[target_feature(enable = "avx2,avxvnni")]
#[inline]
fn dot_vnni(c: &[__m256i; 8], q: &[i8; QBLOCK], _signed: bool) -> __m256i {
    let mut a = _mm256_setzero_si256();
    let mut b = _mm256_setzero_si256();
    for k in (0..8).step_by(2) {
        a = _mm256_dpbusd_avx_epi32(a, c[k], _mm256_set1_epi32(quad(q, k)));
        b = _mm256_dpbusd_avx_epi32(b, c[k + 1], _mm256_set1_epi32(quad(q, k + 1)));
    }
    _mm256_add_epi32(a, b)
}

/// `Σ_k c[k] · q[4k..4k + 4]` per lane with byte and word multiply-adds; with `signed`, `c`
/// holds signed codes.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_madd(c: &[__m256i; 8], q: &[i8; QBLOCK], signed: bool) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let mut a = _mm256_setzero_si256();
    for (k, c) in c.iter().enumerate() {
        let x = _mm256_set1_epi32(quad(q, k));
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
            let (has_min, f32s) = (f.has_min, f.f32_scales);
            let signed: bool = $signed_codes(f);
            // Signed codes already hold the offset.
            let offset = if signed { 0 } else { f.offset };
            let (code_bytes, scale_bytes) = (f.code_bytes(), TILE_ROWS * f.scale_bytes());
            let (hi, lo) = planes::<N>(rows);
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            let low = _mm256_set1_epi8(0x0F);
            let flip = _mm256_set1_epi8(-128);
            for (b, block) in tile.chunks_exact(f.block_stride()).enumerate() {
                let (codes, rest) = block.split_at(code_bytes);
                let g = codes.as_chunks::<64>().0;
                for h in 0..2 {
                    let mut c = [_mm256_setzero_si256(); 8];
                    if NIB {
                        for k in 0..4 {
                            let p = load_i256(&g[k].as_chunks::<32>().0[h]);
                            c[k] = _mm256_and_si256(p, low);
                            c[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(p), low);
                        }
                    } else {
                        for k in 0..8 {
                            let p = load_i256(&g[k].as_chunks::<32>().0[h]);
                            c[k] = if signed { _mm256_xor_si256(p, flip) } else { p };
                        }
                    }
                    let s = lanes_256(rest, h, f32s);
                    let m = if has_min {
                        lanes_256(&rest[scale_bytes..], h, f32s)
                    } else {
                        _mm256_setzero_ps()
                    };
                    unroll_rows!(N, i, {
                        let mut a = acc[i][h];
                        let (hp, lp) = (&hi[i], &lo[i]);
                        let isum = _mm256_sub_epi32(
                            $dot(&c, codes_of(hp, b), signed),
                            _mm256_set1_epi32(offset * hp.sum[b]),
                        );
                        a = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(isum),
                            _mm256_mul_ps(s, _mm256_set1_ps(hp.d[b])),
                            a,
                        );
                        if TWO {
                            let isum = _mm256_sub_epi32(
                                $dot(&c, codes_of(lp, b), signed),
                                _mm256_set1_epi32(offset * lp.sum[b]),
                            );
                            a = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(isum),
                                _mm256_mul_ps(s, _mm256_set1_ps(lp.d[b])),
                                a,
                            );
                        }
                        if has_min {
                            a = _mm256_fmadd_ps(m, _mm256_set1_ps(hp.d[b] * hp.sum[b] as f32), a);
                            if TWO {
                                a = _mm256_fmadd_ps(
                                    m,
                                    _mm256_set1_ps(lp.d[b] * lp.sum[b] as f32),
                                    a,
                                );
                            }
                        }
                        acc[i][h] = a;
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
