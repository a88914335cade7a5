//! Repacking weights into int8 tiles: the tile layout, and the GGML block formats as codes,
//! scales and minimums.

use half::f16;

use super::{PackFormat, PackedMatrix, QBLOCK, TILE_ROWS};
use crate::error::KernelError;
use crate::ggml::BlockType;
use crate::hqq::HqqWeight;
use crate::matrix::QuantMatrix;
use crate::matrix::{check_len, checked_len};

/// How codes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codes {
    /// Codes below 16, two per byte: within each 32-bit lane, byte `t` of group `k` holds
    /// code `4k + t` in its low nibble and code `16 + 4k + t` in its high nibble.
    Nibbles,
    /// One code per byte: group `k`, lane `r`, byte `t` is code `4k + t` of row `r`.
    Bytes,
}

/// Fills one tile (`out`, every block of it) from `row_fn`.
pub(super) fn pack_tile<F>(
    format: PackFormat,
    tile: usize,
    rows: usize,
    cols: usize,
    out: &mut [u8],
    row_fn: &F,
) -> Result<(), KernelError>
where
    F: Fn(usize, &mut [u8], &mut [f32], &mut [f32]) -> Result<(), KernelError> + Sync,
{
    // Scales (and minimums) per row: one per sub-block.
    let subs = format.subs();
    let blocks = cols / QBLOCK * subs;
    let mut codes = vec![0u8; checked_len("tile codes", TILE_ROWS, cols)?];
    let mut scales = vec![0f32; TILE_ROWS * blocks];
    let mut mins = vec![0f32; TILE_ROWS * blocks];
    for r in 0..TILE_ROWS {
        let row = tile * TILE_ROWS + r;
        if row >= rows {
            break;
        }
        let c = &mut codes[r * cols..][..cols];
        row_fn(
            row,
            c,
            &mut scales[r * blocks..][..blocks],
            &mut mins[r * blocks..][..blocks],
        )?;
        if format.codes == Codes::Nibbles
            && let Some(bad) = c.iter().find(|&&c| c >= 16)
        {
            return Err(KernelError::InvalidShape(format!(
                "row {row}: code {bad} does not fit in 4 bits"
            )));
        }
    }
    let stride = format.block_stride();
    let scale_bytes = format.scale_bytes();
    for b in 0..cols / QBLOCK {
        let block = &mut out[b * stride..][..stride];
        let (code_out, rest) = block.split_at_mut(format.code_bytes());
        let code = |r: usize, j: usize| codes[r * cols + b * QBLOCK + j];
        match format.codes {
            Codes::Nibbles => {
                for k in 0..4 {
                    for r in 0..TILE_ROWS {
                        for t in 0..4 {
                            code_out[k * 64 + 4 * r + t] =
                                code(r, 4 * k + t) | (code(r, 16 + 4 * k + t) << 4);
                        }
                    }
                }
            }
            Codes::Bytes => {
                for k in 0..8 {
                    for r in 0..TILE_ROWS {
                        for t in 0..4 {
                            code_out[k * 64 + 4 * r + t] = code(r, 4 * k + t);
                        }
                    }
                }
            }
        }
        // `[sub-block][lane]`.
        let (scale_out, min_out) = rest.split_at_mut(TILE_ROWS * scale_bytes * subs);
        for h in 0..subs {
            for r in 0..TILE_ROWS {
                let (at, from) = ((h * TILE_ROWS + r) * scale_bytes, r * blocks + b * subs + h);
                put_value(format, &mut scale_out[at..], scales[from]);
                if format.has_min {
                    put_value(format, &mut min_out[at..], mins[from]);
                }
            }
        }
    }
    Ok(())
}

fn put_value(format: PackFormat, out: &mut [u8], v: f32) {
    if format.f32_scales {
        out[..4].copy_from_slice(&v.to_le_bytes());
    } else {
        out[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }
}

/// The codes of one tile's block, per row (the inverse of [`pack_tile`]'s code layout).
pub(super) fn unpack_codes(kind: Codes, bytes: &[u8], out: &mut [[u8; QBLOCK]; TILE_ROWS]) {
    match kind {
        Codes::Nibbles => {
            for k in 0..4 {
                for (r, row) in out.iter_mut().enumerate() {
                    for t in 0..4 {
                        let b = bytes[k * 64 + 4 * r + t];
                        row[4 * k + t] = b & 0x0F;
                        row[16 + 4 * k + t] = b >> 4;
                    }
                }
            }
        }
        Codes::Bytes => {
            for k in 0..8 {
                for (r, row) in out.iter_mut().enumerate() {
                    row[4 * k..4 * k + 4].copy_from_slice(&bytes[k * 64 + 4 * r..][..4]);
                }
            }
        }
    }
}

/// The packed form of a GGML block format.
pub fn ggml_format(dtype: BlockType) -> PackFormat {
    let (name, codes, f32_scales, has_min, offset) = match dtype {
        BlockType::Q4_0 => ("Q4_0", Codes::Nibbles, false, false, 8),
        BlockType::Q4_1 => ("Q4_1", Codes::Nibbles, false, true, 0),
        BlockType::Q5_0 => ("Q5_0", Codes::Bytes, false, false, 16),
        BlockType::Q5_1 => ("Q5_1", Codes::Bytes, false, true, 0),
        BlockType::Q8_0 => ("Q8_0", Codes::Bytes, false, false, 128),
        BlockType::Q8_1 => ("Q8_1", Codes::Bytes, false, false, 128),
        BlockType::Q8K => ("Q8K", Codes::Bytes, true, false, 128),
    };
    PackFormat {
        name,
        codes,
        f32_scales,
        has_min,
        offset,
        sub16: false,
    }
}

/// Repacks a `rows × cols` matrix of GGML blocks (row-major, as [`crate::ggml::BlockWeight`]
/// takes them): the same weights, exactly (`w = (c − offset) · d` or `c · d + m` with the
/// block's own `d` and `m`).
///
/// # Errors
///
/// [`KernelError::InvalidShape`] for a zero dimension or a `cols` that is not a multiple of the
/// block size; [`KernelError::LengthMismatch`] if `data` does not hold exactly the blocks.
pub fn from_ggml_blocks(
    dtype: BlockType,
    rows: usize,
    cols: usize,
    data: &[u8],
) -> Result<PackedMatrix, KernelError> {
    let size = dtype.block_size();
    if rows == 0 || cols == 0 || !cols.is_multiple_of(size) {
        return Err(KernelError::InvalidShape(format!(
            "{dtype:?} blocks of {size} weights do not divide a {rows}x{cols} matrix"
        )));
    }
    let row_bytes = checked_len("row bytes", cols / size, dtype.block_bytes())?;
    check_len(
        "data",
        data.len(),
        checked_len("weight bytes", rows, row_bytes)?,
    )?;
    PackedMatrix::pack(
        ggml_format(dtype),
        rows,
        cols,
        |row, codes, scales, mins| {
            let row = &data[row * row_bytes..][..row_bytes];
            for (b, block) in row.chunks_exact(dtype.block_bytes()).enumerate() {
                let first = b * size / QBLOCK;
                let codes = &mut codes[b * size..][..size];
                let (d, m) = decode(dtype, block, codes);
                for g in 0..size / QBLOCK {
                    scales[first + g] = d;
                    mins[first + g] = m;
                }
            }
            Ok(())
        },
    )
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// One GGML block's unsigned codes (into `codes`), scale and minimum.
fn decode(dtype: BlockType, block: &[u8], codes: &mut [u8]) -> (f32, f32) {
    let nibbles = |qs: &[u8], codes: &mut [u8]| {
        for (j, &b) in qs.iter().enumerate().take(16) {
            codes[j] = b & 0x0F;
            codes[j + 16] = b >> 4;
        }
    };
    let fifth_bits = |qh: &[u8], codes: &mut [u8]| {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (j, c) in codes.iter_mut().enumerate().take(32) {
            *c |= (((qh >> j) & 1) as u8) << 4;
        }
    };
    let signed = |qs: &[u8], codes: &mut [u8]| {
        for (c, &q) in codes.iter_mut().zip(qs) {
            *c = q ^ 0x80;
        }
    };
    match dtype {
        BlockType::Q4_0 => {
            nibbles(&block[2..18], codes);
            (f16_at(block, 0), 0.0)
        }
        BlockType::Q4_1 => {
            nibbles(&block[4..20], codes);
            (f16_at(block, 0), f16_at(block, 2))
        }
        BlockType::Q5_0 => {
            nibbles(&block[6..22], codes);
            fifth_bits(&block[2..6], codes);
            (f16_at(block, 0), 0.0)
        }
        BlockType::Q5_1 => {
            nibbles(&block[8..24], codes);
            fifth_bits(&block[4..8], codes);
            (f16_at(block, 0), f16_at(block, 2))
        }
        BlockType::Q8_0 => {
            signed(&block[2..34], codes);
            (f16_at(block, 0), 0.0)
        }
        BlockType::Q8_1 => {
            signed(&block[4..36], codes);
            (f16_at(block, 0), 0.0)
        }
        BlockType::Q8K => {
            signed(&block[4..4 + 256], codes);
            (
                f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
                0.0,
            )
        }
    }
}

/// The k-quant block formats (super-blocks of 256 weights), which all repack exactly into int8
/// tiles: those with 32-wide sub-blocks as one scale per block, those with 16-wide sub-blocks
/// (`Q6_K`, `Q3_K`, `Q2_K`) as two ([`PackFormat::sub16`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KQuant {
    /// 2-bit codes, a 4-bit scale and minimum per 16 weights (84 bytes per 256).
    Q2K,
    /// 3-bit codes, a 6-bit signed scale per 16 weights (110 bytes per 256).
    Q3K,
    /// 4-bit codes, a 6-bit scale and minimum per 32 weights (144 bytes per 256).
    Q4K,
    /// 5-bit codes, otherwise as `Q4_K` (176 bytes per 256).
    Q5K,
    /// 6-bit codes, an 8-bit signed scale per 16 weights (210 bytes per 256).
    Q6K,
}

/// Weights per k-quant super-block.
const QK_K: usize = 256;

impl KQuant {
    /// Bytes of one block of 256 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            KQuant::Q2K => 84,
            KQuant::Q3K => 110,
            KQuant::Q4K => 144,
            KQuant::Q5K => 176,
            KQuant::Q6K => 210,
        }
    }

    /// The packed form: codes, scales and minimums as ggml dequantizes them.
    fn format(self) -> PackFormat {
        let (name, codes, has_min, offset, sub16) = match self {
            KQuant::Q2K => ("Q2K", Codes::Nibbles, true, 0, true),
            KQuant::Q3K => ("Q3K", Codes::Nibbles, false, 4, true),
            KQuant::Q4K => ("Q4K", Codes::Nibbles, true, 0, false),
            KQuant::Q5K => ("Q5K", Codes::Bytes, true, 0, false),
            KQuant::Q6K => ("Q6K", Codes::Bytes, false, 32, true),
        };
        PackFormat {
            name,
            codes,
            // `d · sc` (an f16 times a small integer) is exact in f32.
            f32_scales: true,
            has_min,
            offset,
            sub16,
        }
    }

    /// One super-block's 256 codes (into `codes`), and its per-sub-block scales and
    /// minimums (8 or 16 of each), as ggml's `dequantize_row_*` defines the weights.
    fn decode(self, block: &[u8], codes: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
        match self {
            KQuant::Q4K | KQuant::Q5K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let sc = &block[4..16];
                let (qh, qs) = match self {
                    KQuant::Q4K => (&[][..], &block[16..144]),
                    _ => (&block[16..48], &block[48..176]),
                };
                for j in 0..4 {
                    for half in 0..2 {
                        let sub = 2 * j + half;
                        let (s, m) = scale_min_k4(sub, sc);
                        scales[sub] = d * f32::from(s);
                        mins[sub] = -(dmin * f32::from(m));
                        for (l, c) in codes[32 * sub..][..32].iter_mut().enumerate() {
                            let q = qs[32 * j + l];
                            let mut v = if half == 0 { q & 0x0F } else { q >> 4 };
                            if self == KQuant::Q5K && qh[l] & (1 << sub) != 0 {
                                v += 16;
                            }
                            *c = v;
                        }
                    }
                }
            }
            KQuant::Q6K => {
                // ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8), d.
                let (ql, qh, sc) = (&block[..128], &block[128..192], &block[192..208]);
                let d = f16_at(block, 208);
                for n in 0..2 {
                    let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                    for l in 0..32 {
                        let c = &mut codes[128 * n..];
                        c[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                        c[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                        c[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        c[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                for (s, &sc) in scales.iter_mut().zip(sc) {
                    *s = d * f32::from(sc as i8);
                }
            }
            KQuant::Q3K => {
                // hmask[32], qs[64], scales[12] (16 6-bit values), d.
                let (hmask, qs, sc) = (&block[..32], &block[32..96], &block[96..108]);
                let d = f16_at(block, 108);
                for (sub, s) in scales.iter_mut().enumerate() {
                    *s = d * f32::from(i16::from(q3k_scale(sc, sub)) - 32);
                }
                // Sub-block 2j (+1) of half n: bits `2j` of qs[32n + l] (l + 16), high bit
                // `4n + j` of hmask[l] (l + 16).
                for (i, c) in codes[..QK_K].iter_mut().enumerate() {
                    let (n, j, l) = (i / 128, (i % 128) / 32, i % 32);
                    let low = (qs[32 * n + l] >> (2 * j)) & 3;
                    let high = (hmask[l] >> (4 * n + j)) & 1;
                    *c = low | (high << 2);
                }
            }
            KQuant::Q2K => {
                // scales[16] (scale low nibble, minimum high nibble), qs[64], d, dmin.
                let (sc, qs) = (&block[..16], &block[16..80]);
                let (d, dmin) = (f16_at(block, 80), f16_at(block, 82));
                for (sub, (s, m)) in scales.iter_mut().zip(mins.iter_mut()).enumerate() {
                    *s = d * f32::from(sc[sub] & 0x0F);
                    *m = -(dmin * f32::from(sc[sub] >> 4));
                }
                for (i, c) in codes[..QK_K].iter_mut().enumerate() {
                    let (n, j, l) = (i / 128, (i % 128) / 32, i % 32);
                    *c = (qs[32 * n + l] >> (2 * j)) & 3;
                }
            }
        }
    }
}

/// The scale and minimum of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 6-bit scale of sub-block `j` of a `Q3_K` block (12 bytes: the low nibbles of all 16
/// in bytes 0..8, their two high bits in bytes 8..12), unsigned before the `− 32`.
fn q3k_scale(sc: &[u8], j: usize) -> u8 {
    let low = if j < 8 { sc[j] & 0x0F } else { sc[j - 8] >> 4 };
    let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
    low | (high << 4)
}

/// Repacks a `rows × cols` matrix of k-quant blocks (row-major): the same weights, exactly
/// (per sub-block, `w = (c − offset) · (d · sc)` or `c · (d · sc) − dmin · m`).
///
/// # Errors
///
/// As [`from_ggml_blocks`].
pub fn from_kquant_blocks(
    kind: KQuant,
    rows: usize,
    cols: usize,
    data: &[u8],
) -> Result<PackedMatrix, KernelError> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(QK_K) {
        return Err(KernelError::InvalidShape(format!(
            "{kind:?} blocks of {QK_K} weights do not divide a {rows}x{cols} matrix"
        )));
    }
    let row_bytes = checked_len("row bytes", cols / QK_K, kind.block_bytes())?;
    check_len(
        "data",
        data.len(),
        checked_len("weight bytes", rows, row_bytes)?,
    )?;
    let format = kind.format();
    // Sub-blocks per super-block.
    let subs = QK_K / QBLOCK * format.subs();
    PackedMatrix::pack(format, rows, cols, |row, codes, scales, mins| {
        let row = &data[row * row_bytes..][..row_bytes];
        for (b, block) in row.chunks_exact(kind.block_bytes()).enumerate() {
            kind.decode(
                block,
                &mut codes[b * QK_K..][..QK_K],
                &mut scales[b * subs..][..subs],
                &mut mins[b * subs..][..subs],
            );
        }
        Ok(())
    })
}

/// Repacks an HQQ matrix (`w = (q − z) · s` per group): 4-bit codes as nibbles with the minimum
/// `−z · s`, 8-bit codes with offset 128 and the minimum `(128 − z) · s`.
///
/// # Errors
///
/// [`KernelError::InvalidShape`] when the group size is not a multiple of [`QBLOCK`].
pub fn from_hqq(w: &HqqWeight) -> Result<PackedMatrix, KernelError> {
    let group = w.group();
    if !group.is_multiple_of(QBLOCK) {
        return Err(KernelError::InvalidShape(format!(
            "HQQ groups of {group} do not split into {QBLOCK}-wide blocks"
        )));
    }
    let eight = w.bits() == 8;
    let format = PackFormat {
        name: if eight { "HQQ8" } else { "HQQ4" },
        codes: if eight { Codes::Bytes } else { Codes::Nibbles },
        f32_scales: true,
        has_min: true,
        offset: if eight { 128 } else { 0 },
        sub16: false,
    };
    let cols = w.cols();
    PackedMatrix::pack(format, w.rows(), cols, |row, codes, scales, mins| {
        for (col, c) in codes.iter_mut().enumerate() {
            *c = w.code(row * cols + col);
        }
        let groups = cols / group;
        for (b, (s, m)) in scales.iter_mut().zip(mins.iter_mut()).enumerate() {
            let g = row * groups + b * QBLOCK / group;
            let (scale, zero) = (w.scales()[g].to_f32(), w.zeros()[g].to_f32());
            *s = scale;
            *m = if eight {
                (128.0 - zero) * scale
            } else {
                -zero * scale
            };
        }
        Ok(())
    })
}
