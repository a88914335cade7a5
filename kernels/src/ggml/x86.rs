//! AVX2 and AVX-512 kernels for products against GGML blocks.
//!
//! (Longer than our ~800-line guide: it holds one kernel per block format at both SIMD levels,
//! which read best side by side, since each AVX-512 kernel mirrors its AVX2 twin.)
//!
//! Two ways to turn a block into f32 vectors:
//!
//! - 4- and 5-bit formats on AVX-512: the block's scale and minimum are applied to a table of
//!   the 32 code values (`value · d`, then `+ m`, exactly ggml's dequantization), and the codes
//!   of `qs` (with their fifth bit from `qh`) are looked up in it 16 at a time with a
//!   cross-lane permutation. The looked-up weights are multiplied into the activations with
//!   FMA, two accumulators per activation row (weights 0..16 and 16..32 of every block).
//! - Everything else (all formats on AVX2, the 8-bit ones on AVX-512): each unit of 16 codes is
//!   decoded with SSE2 into 16 signed bytes (nibble split, fifth-bit expansion and offset for
//!   the 4- and 5-bit formats, a plain load for the 8-bit ones), sign-extended to 32-bit
//!   lanes, converted to f32 and multiplied into the activations with FMA. The block's partial
//!   products are scaled by `d` into a vector total; the `m · Σ x` term of the formats with a
//!   minimum is accumulated as a scalar and added at the end.
//!
//! Up to [`TILE`] activation rows share each decoded block; every row gets the same sequence of
//! operations whatever the tile size, so results do not depend on how rows were tiled.

#![allow(unsafe_code)]

use super::BlockType;
use crate::cpu::{Avx2, Avx512};
use crate::rowwise::Activations;
use crate::rowwise::TILE;
#[cfg(test)]
use crate::x86::store_f32x16;
use crate::x86::{hsum_f32x8, load_f32x8, load_f32x16, load_u8x16};
use std::arch::x86_64::{
    __m128, __m128i, __m256, __m512, _mm_and_si128, _mm_andnot_si128, _mm_castsi128_ps,
    _mm_cmpeq_epi8, _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32, _mm_movehdup_ps, _mm_or_si128,
    _mm_set1_epi8, _mm_set1_epi64x, _mm_srli_epi16, _mm_sub_epi8, _mm_unpackhi_epi32,
    _mm_unpackhi_epi64, _mm_unpacklo_epi8, _mm_unpacklo_epi16, _mm_unpacklo_epi32, _mm256_add_ps,
    _mm256_broadcastss_ps, _mm256_cvtepi8_epi32, _mm256_cvtepi32_ps, _mm256_fmadd_ps,
    _mm256_mul_ps, _mm256_setzero_ps, _mm512_add_ps, _mm512_broadcastss_ps, _mm512_cvtepi8_epi32,
    _mm512_cvtepi32_ps, _mm512_cvtepu8_epi32, _mm512_fmadd_ps, _mm512_mul_ps,
    _mm512_permutex2var_ps, _mm512_permutexvar_ps, _mm512_reduce_add_ps, _mm512_rorv_epi32,
    _mm512_set1_epi32, _mm512_setr_epi32, _mm512_setzero_ps, _mm512_srli_epi32,
    _mm512_ternarylogic_epi32,
};

/// A block format as the kernels see it.
///
/// The methods use SSE2 only (part of the x86-64 baseline), so they are plain functions that
/// inline into the kernels.
trait Format {
    /// The bytes of one block.
    type Block;
    /// Pairs of 16-weight units per block: 1, or 8 for `Q8_K`.
    const PAIRS: usize;
    /// Whether a weight is `q · d + m` rather than `q · d`.
    const HAS_MIN: bool;
    /// Whether `d` is an f32 (`Q8_K`) rather than an f16.
    const F32_SCALE: bool = false;
    /// For the 4- and 5-bit formats, the value of every code (entry `c` is `c`, minus 8 or 16
    /// for `Q4_0` and `Q5_0`), which the AVX-512 kernel decodes by table look-up; `None` for
    /// the 8-bit formats.
    const TABLE: Option<[f32; 32]> = None;
    /// Whether the codes have a fifth bit, in `qh`.
    const FIVE_BITS: bool = false;

    /// `row` as blocks; the caller passes a whole number of them.
    fn blocks(row: &[u8]) -> &[Self::Block];
    /// The first 16 bytes of the block: `d`, then `m` for the formats with a minimum.
    fn head(block: &Self::Block) -> &[u8; 16];
    /// The codes of units `2p` and `2p + 1` (`p < PAIRS`) as 16 signed bytes each, in order,
    /// already minus 8 or 16 for `Q4_0` and `Q5_0`.
    fn pair(block: &Self::Block, p: usize) -> (__m128i, __m128i);
    /// The nibbles `qs` and the fifth bits `qh` (0 for 4 bits) of a 4- or 5-bit block. Only
    /// called when `TABLE` is `Some`.
    fn packed(block: &Self::Block) -> (&[u8; 16], u32) {
        let _ = block;
        (&[0; 16], 0)
    }
}

/// The values of codes `0..32`, plus `offset`.
const fn code_table(offset: i32) -> [f32; 32] {
    let mut table = [0.0; 32];
    let mut code = 0;
    while code < 32 {
        table[code] = (code as i32 + offset) as f32;
        code += 1;
    }
    table
}

/// The first 16 bytes of a block.
#[inline(always)]
fn head<const N: usize>(block: &[u8; N]) -> &[u8; 16] {
    &block.as_chunks::<16>().0[0]
}

/// The scale `d` of a block in lane 0, and its minimum `m` in lane 1 (meaningless for the
/// formats without one), in f32.
///
/// The conversion reads the block's first bytes as a whole vector: converting one f16 on its
/// own would leave the compiler free to fill the unused lanes from any register, and that
/// false dependency can chain every block to the previous block's accumulator.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn params<F: Format>(block: &F::Block) -> __m128 {
    let head = load_u8x16(F::head(block));
    if F::F32_SCALE {
        _mm_castsi128_ps(head)
    } else {
        _mm_cvtph_ps(head)
    }
}

/// The low and high nibbles of the 16 bytes `qs`, one per byte: codes 0..16 and 16..32 of a 4-
/// or 5-bit block.
#[inline(always)]
fn nibbles(qs: &[u8; 16]) -> (__m128i, __m128i) {
    let packed = load_u8x16(qs);
    // SAFETY: these are SSE2 instructions, part of the x86-64 baseline that every x86_64
    // target enables.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        (
            _mm_and_si128(packed, mask),
            _mm_and_si128(_mm_srli_epi16::<4>(packed), mask),
        )
    }
}

/// Byte masks of the bits of `qh` (little-endian): byte `j` of the first vector is `0xFF` if
/// bit `j` is set, byte `j` of the second if bit `j + 16` is, `0` otherwise.
#[inline(always)]
fn bit_masks(qh: [u8; 4]) -> (__m128i, __m128i) {
    // SAFETY: SSE2 instructions, part of the x86-64 baseline.
    unsafe {
        let v = _mm_cvtsi32_si128(i32::from_le_bytes(qh));
        // Every byte of qh repeated 4 times, then 8 times: [b0 ×8, b1 ×8] and [b2 ×8, b3 ×8].
        let twice = _mm_unpacklo_epi8(v, v);
        let four = _mm_unpacklo_epi16(twice, twice);
        let (low, high) = (
            _mm_unpacklo_epi32(four, four),
            _mm_unpackhi_epi32(four, four),
        );
        // Byte k of every 8 picks bit k.
        let bit = _mm_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        (
            _mm_cmpeq_epi8(_mm_and_si128(low, bit), bit),
            _mm_cmpeq_epi8(_mm_and_si128(high, bit), bit),
        )
    }
}

/// The two units of 32 signed 8-bit codes.
#[inline(always)]
fn bytes_pair(qs: &[u8; 32]) -> (__m128i, __m128i) {
    let units = qs.as_chunks::<16>().0;
    (load_u8x16(&units[0]), load_u8x16(&units[1]))
}

/// `Q4_0`: `(q − 8) · d`.
struct Q4_0;

impl Format for Q4_0 {
    type Block = [u8; 18];
    const PAIRS: usize = 1;
    const HAS_MIN: bool = false;
    const TABLE: Option<[f32; 32]> = Some(code_table(-8));

    #[inline(always)]
    fn blocks(row: &[u8]) -> &[[u8; 18]] {
        row.as_chunks().0
    }

    #[inline(always)]
    fn head(block: &[u8; 18]) -> &[u8; 16] {
        head(block)
    }

    #[inline(always)]
    fn pair([_, _, qs @ ..]: &[u8; 18], _: usize) -> (__m128i, __m128i) {
        let (low, high) = nibbles(qs);
        // SAFETY: SSE2 instructions, part of the x86-64 baseline.
        unsafe {
            let eight = _mm_set1_epi8(8);
            (_mm_sub_epi8(low, eight), _mm_sub_epi8(high, eight))
        }
    }

    #[inline(always)]
    fn packed([_, _, qs @ ..]: &[u8; 18]) -> (&[u8; 16], u32) {
        (qs, 0)
    }
}

/// `Q4_1`: `q · d + m`.
struct Q4_1;

impl Format for Q4_1 {
    type Block = [u8; 20];
    const PAIRS: usize = 1;
    const HAS_MIN: bool = true;
    const TABLE: Option<[f32; 32]> = Some(code_table(0));

    #[inline(always)]
    fn blocks(row: &[u8]) -> &[[u8; 20]] {
        row.as_chunks().0
    }

    #[inline(always)]
    fn head(block: &[u8; 20]) -> &[u8; 16] {
        head(block)
    }

    #[inline(always)]
    fn pair([_, _, _, _, qs @ ..]: &[u8; 20], _: usize) -> (__m128i, __m128i) {
        nibbles(qs)
    }

    #[inline(always)]
    fn packed([_, _, _, _, qs @ ..]: &[u8; 20]) -> (&[u8; 16], u32) {
        (qs, 0)
    }
}

/// `Q5_0`: `(q − 16) · d`.
struct Q5_0;

impl Format for Q5_0 {
    type Block = [u8; 22];
    const PAIRS: usize = 1;
    const HAS_MIN: bool = false;
    const TABLE: Option<[f32; 32]> = Some(code_table(-16));
    const FIVE_BITS: bool = true;

    #[inline(always)]
    fn blocks(row: &[u8]) -> &[[u8; 22]] {
        row.as_chunks().0
    }

    #[inline(always)]
    fn head(block: &[u8; 22]) -> &[u8; 16] {
        head(block)
    }

    #[inline(always)]
    fn pair([_, _, h0, h1, h2, h3, qs @ ..]: &[u8; 22], _: usize) -> (__m128i, __m128i) {
        let (low, high) = nibbles(qs);
        let (low_set, high_set) = bit_masks([*h0, *h1, *h2, *h3]);
        // `(q | fifth) − 16` is `q` when the fifth bit is set and `q − 16` when it is clear.
        // SAFETY: SSE2 instructions, part of the x86-64 baseline.
        unsafe {
            let sixteen = _mm_set1_epi8(0x10);
            (
                _mm_sub_epi8(low, _mm_andnot_si128(low_set, sixteen)),
                _mm_sub_epi8(high, _mm_andnot_si128(high_set, sixteen)),
            )
        }
    }

    #[inline(always)]
    fn packed([_, _, h0, h1, h2, h3, qs @ ..]: &[u8; 22]) -> (&[u8; 16], u32) {
        (qs, u32::from_le_bytes([*h0, *h1, *h2, *h3]))
    }
}

/// `Q5_1`: `q · d + m`.
struct Q5_1;

impl Format for Q5_1 {
    type Block = [u8; 24];
    const PAIRS: usize = 1;
    const HAS_MIN: bool = true;
    const TABLE: Option<[f32; 32]> = Some(code_table(0));
    const FIVE_BITS: bool = true;

    #[inline(always)]
    fn blocks(row: &[u8]) -> &[[u8; 24]] {
        row.as_chunks().0
    }

    #[inline(always)]
    fn head(block: &[u8; 24]) -> &[u8; 16] {
        head(block)
    }

    #[inline(always)]
    fn pair([_, _, _, _, h0, h1, h2, h3, qs @ ..]: &[u8; 24], _: usize) -> (__m128i, __m128i) {
        let (low, high) = nibbles(qs);
        let (low_set, high_set) = bit_masks([*h0, *h1, *h2, *h3]);
        // SAFETY: SSE2 instructions, part of the x86-64 baseline.
        unsafe {
            let sixteen = _mm_set1_epi8(0x10);
            (
                _mm_or_si128(low, _mm_and_si128(low_set, sixteen)),
                _mm_or_si128(high, _mm_and_si128(high_set, sixteen)),
            )
        }
    }

    #[inline(always)]
    fn packed([_, _, _, _, h0, h1, h2, h3, qs @ ..]: &[u8; 24]) -> (&[u8; 16], u32) {
        (qs, u32::from_le_bytes([*h0, *h1, *h2, *h3]))
    }
}

/// `Q8_0`: `q · d`.
struct Q8_0;

impl Format for Q8_0 {
    type Block = [u8; 34];
    const PAIRS: usize = 1;
    const HAS_MIN: bool = false;

    #[inline(always)]
    fn blocks(row: &[u8]) -> &[[u8; 34]] {
        row.as_chunks().0
    }

    #[inline(always)]
    fn head(block: &[u8; 34]) -> &[u8; 16] {
        head(block)
    }

    #[inline(always)]
    fn pair([_, _, qs @ ..]: &[u8; 34], _: usize) -> (__m128i, __m128i) {
        bytes_pair(qs)
    }
}

/// `Q8_1`: `q · d` (the block sum `s` is not used).
struct Q8_1;

impl Format for Q8_1 {
    type Block = [u8; 36];
    const PAIRS: usize = 1;
    const HAS_MIN: bool = false;

    #[inline(always)]
    fn blocks(row: &[u8]) -> &[[u8; 36]] {
        row.as_chunks().0
    }

    #[inline(always)]
    fn head(block: &[u8; 36]) -> &[u8; 16] {
        head(block)
    }

    #[inline(always)]
    fn pair([_, _, _, _, qs @ ..]: &[u8; 36], _: usize) -> (__m128i, __m128i) {
        bytes_pair(qs)
    }
}

/// `Q8_K`: `q · d` with an f32 `d` (the partial sums `bsums` are not used).
struct Q8K;

impl Format for Q8K {
    type Block = [u8; 292];
    const PAIRS: usize = 8;
    const HAS_MIN: bool = false;
    const F32_SCALE: bool = true;

    #[inline(always)]
    fn blocks(row: &[u8]) -> &[[u8; 292]] {
        row.as_chunks().0
    }

    #[inline(always)]
    fn head(block: &[u8; 292]) -> &[u8; 16] {
        head(block)
    }

    #[inline(always)]
    fn pair([_, _, _, _, rest @ ..]: &[u8; 292], p: usize) -> (__m128i, __m128i) {
        // `rest` is qs (16 units) followed by bsums (2 units).
        let units = rest.as_chunks::<16>().0;
        (load_u8x16(&units[2 * p]), load_u8x16(&units[2 * p + 1]))
    }
}

/// AVX-512 kernel: `col[i] = x[i] · W[row]` for every activation row `i`, where `row` holds the
/// blocks of one weight row.
pub(super) fn row_products_avx512(
    _: Avx512,
    dtype: BlockType,
    row: &[u8],
    acts: &Activations<'_>,
    col: &mut [f32],
) {
    // SAFETY: the `Avx512` token proves the CPU supports AVX-512F, AVX2, FMA and F16C.
    unsafe {
        match dtype {
            BlockType::Q4_0 => products_avx512::<Q4_0>(row, acts, col),
            BlockType::Q4_1 => products_avx512::<Q4_1>(row, acts, col),
            BlockType::Q5_0 => products_avx512::<Q5_0>(row, acts, col),
            BlockType::Q5_1 => products_avx512::<Q5_1>(row, acts, col),
            BlockType::Q8_0 => products_avx512::<Q8_0>(row, acts, col),
            BlockType::Q8_1 => products_avx512::<Q8_1>(row, acts, col),
            BlockType::Q8K => products_avx512::<Q8K>(row, acts, col),
        }
    }
}

/// AVX2 kernel: `col[i] = x[i] · W[row]` for every activation row `i`, where `row` holds the
/// blocks of one weight row.
pub(super) fn row_products_avx2(
    _: Avx2,
    dtype: BlockType,
    row: &[u8],
    acts: &Activations<'_>,
    col: &mut [f32],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2, FMA and F16C.
    unsafe {
        match dtype {
            BlockType::Q4_0 => products_avx2::<Q4_0>(row, acts, col),
            BlockType::Q4_1 => products_avx2::<Q4_1>(row, acts, col),
            BlockType::Q5_0 => products_avx2::<Q5_0>(row, acts, col),
            BlockType::Q5_1 => products_avx2::<Q5_1>(row, acts, col),
            BlockType::Q8_0 => products_avx2::<Q8_0>(row, acts, col),
            BlockType::Q8_1 => products_avx2::<Q8_1>(row, acts, col),
            BlockType::Q8K => products_avx2::<Q8K>(row, acts, col),
        }
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn products_avx512<F: Format>(row: &[u8], acts: &Activations<'_>, col: &mut [f32]) {
    let blocks = F::blocks(row);
    let (tiles, rest) = col.as_chunks_mut::<TILE>();
    let tiled = tiles.len() * TILE;
    for (t, out) in tiles.iter_mut().enumerate() {
        *out = tile_avx512::<F, TILE>(blocks, acts, t * TILE);
    }
    for (k, out) in rest.iter_mut().enumerate() {
        [*out] = tile_avx512::<F, 1>(blocks, acts, tiled + k);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn products_avx2<F: Format>(row: &[u8], acts: &Activations<'_>, col: &mut [f32]) {
    let blocks = F::blocks(row);
    let (tiles, rest) = col.as_chunks_mut::<TILE>();
    let tiled = tiles.len() * TILE;
    for (t, out) in tiles.iter_mut().enumerate() {
        *out = tile_avx2::<F, TILE>(blocks, acts, t * TILE);
    }
    for (k, out) in rest.iter_mut().enumerate() {
        [*out] = tile_avx2::<F, 1>(blocks, acts, tiled + k);
    }
}

/// 16 signed byte codes as 16 f32 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
fn widen_x16(codes: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes))
}

/// 16 signed byte codes as two vectors of 8 f32 lanes (codes 0..8, then 8..16).
#[target_feature(enable = "avx2")]
#[inline]
fn widen_2x8(codes: __m128i) -> (__m256, __m256) {
    (
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(codes, codes))),
    )
}

/// `F::TABLE` in two vectors (codes 0..16 and 16..32); zeros for the formats without a table.
#[target_feature(enable = "avx512f")]
#[inline]
fn code_tables<F: Format>() -> [__m512; 2] {
    match F::TABLE {
        Some(table) => {
            let halves = table.as_chunks::<16>().0;
            [load_f32x16(&halves[0]), load_f32x16(&halves[1])]
        }
        None => [_mm512_setzero_ps(); 2],
    }
}

/// The 32 codes of a 4- or 5-bit block (codes 0..16, then 16..32), replaced by their entries
/// in `tables`: the values of codes 0..16 and 16..32 (see [`code_tables`]).
///
/// The bytes of `qs` are zero-extended to 32-bit lanes; a lane indexes the table with its low
/// nibble, and, shifted right by 4, with its high nibble (the look-ups ignore the index bits
/// above the table size). For 5-bit codes, bit `j` of `qh` is rotated to bit 4 of lane `j`, and
/// a bitwise select builds the 5-bit index.
#[target_feature(enable = "avx512f")]
#[inline]
fn decode_packed_avx512<F: Format>(block: &F::Block, [low, high]: [__m512; 2]) -> [__m512; 2] {
    let (qs, qh) = F::packed(block);
    let bytes = _mm512_cvtepu8_epi32(load_u8x16(qs));
    let high_nibbles = _mm512_srli_epi32::<4>(bytes);
    if F::FIVE_BITS {
        let qh = _mm512_set1_epi32(qh as i32);
        // Lane j of the first half takes bit j, lane j of the second half bit j + 16.
        let rotate0 = _mm512_setr_epi32(28, 29, 30, 31, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);
        let rotate1 = _mm512_setr_epi32(
            12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
        );
        let fifth0 = _mm512_rorv_epi32(qh, rotate0);
        let fifth1 = _mm512_rorv_epi32(qh, rotate1);
        // Bitwise `mask ? a : b` with mask 0x0F: bits 0..4 from the nibble, bit 4 (and the
        // ignored bits above it) from the rotated `qh`.
        const SELECT: i32 = 0xE4;
        let nibble = _mm512_set1_epi32(0x0F);
        let index0 = _mm512_ternarylogic_epi32::<SELECT>(bytes, fifth0, nibble);
        let index1 = _mm512_ternarylogic_epi32::<SELECT>(high_nibbles, fifth1, nibble);
        [
            _mm512_permutex2var_ps(low, index0, high),
            _mm512_permutex2var_ps(low, index1, high),
        ]
    } else {
        [
            _mm512_permutexvar_ps(bytes, low),
            _mm512_permutexvar_ps(high_nibbles, low),
        ]
    }
}

/// `R` activation rows as groups of `G` vectors of `N` floats (one group per pair of 16-weight
/// units), and their block sums.
type Rows<'a, const R: usize, const N: usize, const G: usize> =
    ([&'a [[[f32; N]; G]]; R], [&'a [f32]; R]);

/// Activation rows `first..first + R`, as the kernels read them.
///
/// A plain loop rather than `array::from_fn`: a closure written inside a kernel inherits its
/// target features, which keeps `from_fn` from inlining it.
#[inline(always)]
fn activation_rows<'a, const R: usize, const N: usize, const G: usize>(
    acts: &'a Activations<'_>,
    first: usize,
) -> Rows<'a, R, N, G> {
    let mut x: [&[[[f32; N]; G]]; R] = [&[]; R];
    let mut sums: [&[f32]; R] = [&[]; R];
    for (r, (x, sums)) in x.iter_mut().zip(&mut sums).enumerate() {
        let (row, row_sums) = acts.row(first + r);
        *x = row.as_chunks::<N>().0.as_chunks::<G>().0;
        *sums = row_sums;
    }
    (x, sums)
}

/// The activations of `R` rows, as the AVX-512 kernel reads them: pairs of 16-float units, and
/// the block sums.
type RowsX16<'a, const R: usize> = Rows<'a, R, 16, 2>;

/// The products of the weight row `blocks` with activation rows `first..first + R`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
fn tile_avx512<F: Format, const R: usize>(
    blocks: &[F::Block],
    acts: &Activations<'_>,
    first: usize,
) -> [f32; R] {
    let x: RowsX16<'_, R> = activation_rows(acts, first);
    if F::TABLE.is_some() {
        return tile_table_avx512::<F, R>(blocks, &x.0);
    }
    // Even and odd blocks go to separate totals, halving the dependency chain through them.
    let mut totals = [[_mm512_setzero_ps(); R]; 2];
    let mut corrections = [[0.0f32; R]; 2];
    let (pairs, last) = blocks.as_chunks::<2>();
    for (i, [block0, block1]) in pairs.iter().enumerate() {
        let ([total0, total1], [correction0, correction1]) = (&mut totals, &mut corrections);
        block_avx512::<F, R>(block0, 2 * i, &x, total0, correction0);
        block_avx512::<F, R>(block1, 2 * i + 1, &x, total1, correction1);
    }
    if let [block] = last {
        let index = 2 * pairs.len();
        let (total, correction) = (&mut totals[0], &mut corrections[0]);
        block_avx512::<F, R>(block, index, &x, total, correction);
    }
    let mut result = [0.0; R];
    for (r, out) in result.iter_mut().enumerate() {
        let vector = _mm512_reduce_add_ps(_mm512_add_ps(totals[0][r], totals[1][r]));
        *out = vector + (corrections[0][r] + corrections[1][r]);
    }
    result
}

/// [`tile_avx512`] for the formats with a code table (4 and 5 bits): every block's table is
/// turned into its weights, `value · d` (then `+ m`), exactly as ggml dequantizes them, and the
/// weights looked up are multiplied into the activations. Each row has one accumulator for
/// weights 0..16 of every block and one for weights 16..32.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
fn tile_table_avx512<F: Format, const R: usize>(
    blocks: &[F::Block],
    x: &[&[[[f32; 16]; 2]]; R],
) -> [f32; R] {
    let [table0, table1] = code_tables::<F>();
    let mut low = [_mm512_setzero_ps(); R];
    let mut high = [_mm512_setzero_ps(); R];
    for (index, block) in blocks.iter().enumerate() {
        let params = params::<F>(block);
        let d = _mm512_broadcastss_ps(params);
        let mut weights = [_mm512_mul_ps(table0, d), _mm512_mul_ps(table1, d)];
        if F::HAS_MIN {
            let m = _mm512_broadcastss_ps(_mm_movehdup_ps(params));
            weights = [_mm512_add_ps(weights[0], m), _mm512_add_ps(weights[1], m)];
        }
        let [w0, w1] = decode_packed_avx512::<F>(block, weights);
        for ((low, high), x) in low.iter_mut().zip(&mut high).zip(x) {
            let [x0, x1] = &x[index];
            *low = _mm512_fmadd_ps(w0, load_f32x16(x0), *low);
            *high = _mm512_fmadd_ps(w1, load_f32x16(x1), *high);
        }
    }
    let mut result = [0.0; R];
    for ((out, low), high) in result.iter_mut().zip(low).zip(high) {
        *out = _mm512_reduce_add_ps(_mm512_add_ps(low, high));
    }
    result
}

/// Adds block `index` of a weight row, `block`, to the totals of `R` activation rows.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
fn block_avx512<F: Format, const R: usize>(
    block: &F::Block,
    index: usize,
    (x, sums): &RowsX16<'_, R>,
    total: &mut [__m512; R],
    correction: &mut [f32; R],
) {
    let mut partial = [_mm512_setzero_ps(); R];
    if F::PAIRS == 1 {
        let (q0, q1) = F::pair(block, 0);
        let (w0, w1) = (widen_x16(q0), widen_x16(q1));
        for (partial, x) in partial.iter_mut().zip(x) {
            let [x0, x1] = &x[index];
            *partial = _mm512_fmadd_ps(w1, load_f32x16(x1), _mm512_mul_ps(w0, load_f32x16(x0)));
        }
    } else {
        // Two accumulators per row (even and odd units) halve the FMA dependency chain.
        let mut odd = [_mm512_setzero_ps(); R];
        for p in 0..F::PAIRS {
            let (q0, q1) = F::pair(block, p);
            let (w0, w1) = (widen_x16(q0), widen_x16(q1));
            for ((even, odd), x) in partial.iter_mut().zip(&mut odd).zip(x) {
                let [x0, x1] = &x[index * F::PAIRS + p];
                *even = _mm512_fmadd_ps(w0, load_f32x16(x0), *even);
                *odd = _mm512_fmadd_ps(w1, load_f32x16(x1), *odd);
            }
        }
        for (even, odd) in partial.iter_mut().zip(odd) {
            *even = _mm512_add_ps(*even, odd);
        }
    }
    let params = params::<F>(block);
    let d = _mm512_broadcastss_ps(params);
    for (total, partial) in total.iter_mut().zip(partial) {
        *total = _mm512_fmadd_ps(d, partial, *total);
    }
    if F::HAS_MIN {
        let m = _mm_cvtss_f32(_mm_movehdup_ps(params));
        for (correction, sums) in correction.iter_mut().zip(sums) {
            *correction = m.mul_add(sums[index], *correction);
        }
    }
}

/// The activations of `R` rows, as the AVX2 kernel reads them: groups of four 8-float vectors
/// (one pair of units), and the block sums.
type RowsX8<'a, const R: usize> = Rows<'a, R, 8, 4>;

/// The products of the weight row `blocks` with activation rows `first..first + R`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn tile_avx2<F: Format, const R: usize>(
    blocks: &[F::Block],
    acts: &Activations<'_>,
    first: usize,
) -> [f32; R] {
    let x: RowsX8<'_, R> = activation_rows(acts, first);
    let mut total = [_mm256_setzero_ps(); R];
    let mut correction = [0.0f32; R];
    for (index, block) in blocks.iter().enumerate() {
        block_avx2::<F, R>(block, index, &x, &mut total, &mut correction);
    }
    let mut result = [0.0; R];
    for ((out, total), correction) in result.iter_mut().zip(total).zip(correction) {
        *out = hsum_f32x8(total) + correction;
    }
    result
}

/// Adds block `index` of a weight row, `block`, to the totals of `R` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn block_avx2<F: Format, const R: usize>(
    block: &F::Block,
    index: usize,
    (x, sums): &RowsX8<'_, R>,
    total: &mut [__m256; R],
    correction: &mut [f32; R],
) {
    let mut partial = [_mm256_setzero_ps(); R];
    if F::PAIRS == 1 {
        let (q0, q1) = F::pair(block, 0);
        let ((w0, w1), (w2, w3)) = (widen_2x8(q0), widen_2x8(q1));
        for (partial, x) in partial.iter_mut().zip(x) {
            let [x0, x1, x2, x3] = &x[index];
            let mut sum = _mm256_mul_ps(w0, load_f32x8(x0));
            sum = _mm256_fmadd_ps(w1, load_f32x8(x1), sum);
            sum = _mm256_fmadd_ps(w2, load_f32x8(x2), sum);
            *partial = _mm256_fmadd_ps(w3, load_f32x8(x3), sum);
        }
    } else {
        // Codes 0..8 and 8..16 of each unit go to separate accumulators.
        let mut high = [_mm256_setzero_ps(); R];
        for p in 0..F::PAIRS {
            let (q0, q1) = F::pair(block, p);
            let ((w0, w1), (w2, w3)) = (widen_2x8(q0), widen_2x8(q1));
            for ((low, high), x) in partial.iter_mut().zip(&mut high).zip(x) {
                let [x0, x1, x2, x3] = &x[index * F::PAIRS + p];
                *low = _mm256_fmadd_ps(w0, load_f32x8(x0), *low);
                *high = _mm256_fmadd_ps(w1, load_f32x8(x1), *high);
                *low = _mm256_fmadd_ps(w2, load_f32x8(x2), *low);
                *high = _mm256_fmadd_ps(w3, load_f32x8(x3), *high);
            }
        }
        for (low, high) in partial.iter_mut().zip(high) {
            *low = _mm256_add_ps(*low, high);
        }
    }
    let params = params::<F>(block);
    let d = _mm256_broadcastss_ps(params);
    for (total, partial) in total.iter_mut().zip(partial) {
        *total = _mm256_fmadd_ps(d, partial, *total);
    }
    if F::HAS_MIN {
        let m = _mm_cvtss_f32(_mm_movehdup_ps(params));
        for (correction, sums) in correction.iter_mut().zip(sums) {
            *correction = m.mul_add(sums[index], *correction);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::arch::x86_64::_mm_storeu_ps;

    use crate::cpu::{Level, supported_levels};
    use crate::ggml::tests::random_blocks;
    use crate::ggml::{QK_K, decode_block};
    use crate::test_util::Rng;

    fn m128i_bytes(v: __m128i) -> [u8; 16] {
        use std::arch::x86_64::_mm_storeu_si128;
        let mut bytes = [0u8; 16];
        // SAFETY: `bytes` is 16 writable bytes, `_mm_storeu_si128` has no alignment requirement,
        // and SSE2 is part of the x86-64 baseline.
        unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), v) };
        bytes
    }

    /// The AVX2 and AVX-512 tokens, if this CPU supports them.
    fn tokens() -> (Option<Avx2>, Option<Avx512>) {
        let mut tokens = (None, None);
        for level in supported_levels() {
            match level {
                Level::Avx2(token) => tokens.0 = Some(token),
                Level::Avx512(token) => tokens.1 = Some(token),
                Level::Scalar => {}
            }
        }
        tokens
    }

    /// The lanes of [`params`].
    fn params_lanes<F: Format>(_: Avx2, block: &F::Block) -> [f32; 4] {
        // SAFETY: the token proves the CPU supports AVX2 and F16C.
        let v = unsafe { params::<F>(block) };
        let mut lanes = [0.0; 4];
        // SAFETY: `lanes` is 4 writable floats, `_mm_storeu_ps` has no alignment requirement,
        // and SSE is part of the x86-64 baseline.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes
    }

    /// The codes of a 4- or 5-bit block as decoded by the AVX-512 table look-up.
    #[target_feature(enable = "avx512f")]
    fn table_codes<F: Format>(block: &F::Block) -> [[f32; 16]; 2] {
        let [low, high] = decode_packed_avx512::<F>(block, code_tables::<F>());
        let mut out = [[0.0; 16]; 2];
        store_f32x16(&mut out[0], low);
        store_f32x16(&mut out[1], high);
        out
    }

    /// Every unit, scale, minimum and table look-up decoded by `F` equals what the scalar
    /// decoder reads.
    fn check_decoding<F: Format>(dtype: BlockType) {
        let (avx2, avx512) = tokens();
        let mut rng = Rng::new(21);
        let data = random_blocks(&mut rng, dtype, 50);
        let blocks = F::blocks(&data);
        assert_eq!(blocks.len(), 50);
        assert_eq!(F::HAS_MIN, dtype.has_min());
        assert_eq!(32 * F::PAIRS, dtype.block_size());
        assert_eq!(
            F::TABLE.is_some(),
            dtype.block_size() == 32 && dtype.block_bytes() <= 24
        );
        let mut codes = [0.0; QK_K];
        for (block, bytes) in blocks.iter().zip(data.chunks_exact(dtype.block_bytes())) {
            let (d, m) = decode_block(dtype, bytes, &mut codes);
            let codes = &codes[..dtype.block_size()];
            let simd: Vec<f32> = (0..F::PAIRS)
                .flat_map(|p| {
                    let (a, b) = F::pair(block, p);
                    [m128i_bytes(a), m128i_bytes(b)]
                })
                .flatten()
                .map(|q| f32::from(q as i8))
                .collect();
            assert_eq!(simd, codes, "{dtype:?}");
            if let Some(token) = avx2 {
                let [scale, min, ..] = params_lanes::<F>(token, block);
                assert_eq!(scale.to_bits(), d.to_bits(), "{dtype:?}");
                if F::HAS_MIN {
                    assert_eq!(min.to_bits(), m.to_bits(), "{dtype:?}");
                }
            }
            if let (Some(_), true) = (avx512, F::TABLE.is_some()) {
                // SAFETY: the `Avx512` token proves the CPU supports AVX-512F.
                let table = unsafe { table_codes::<F>(block) };
                assert_eq!(table.as_flattened(), codes, "{dtype:?}");
            }
        }
    }

    #[test]
    fn simd_decoding_matches_scalar() {
        check_decoding::<Q4_0>(BlockType::Q4_0);
        check_decoding::<Q4_1>(BlockType::Q4_1);
        check_decoding::<Q5_0>(BlockType::Q5_0);
        check_decoding::<Q5_1>(BlockType::Q5_1);
        check_decoding::<Q8_0>(BlockType::Q8_0);
        check_decoding::<Q8_1>(BlockType::Q8_1);
        check_decoding::<Q8K>(BlockType::Q8K);
    }

    #[test]
    fn bit_masks_pick_bits_in_order() {
        let qh = 0x8001_4003_u32;
        let (low, high) = bit_masks(qh.to_le_bytes());
        let (low, high) = (m128i_bytes(low), m128i_bytes(high));
        for j in 0..16 {
            assert_eq!(low[j] == 0xFF, qh >> j & 1 == 1, "bit {j}");
            assert_eq!(high[j] == 0xFF, qh >> (j + 16) & 1 == 1, "bit {}", j + 16);
            assert!(matches!(low[j], 0 | 0xFF) && matches!(high[j], 0 | 0xFF));
        }
    }
}
