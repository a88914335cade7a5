//! What the int8 examples share: generated inputs.

use strata_kernels::ggml::BlockType;

/// A xorshift generator of the examples' pseudo-random inputs, always the same sequence.
pub fn xorshift() -> impl FnMut() -> u64 {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// `rows × cols` weights as GGML blocks of `dtype`: random codes, every block's scale 0.01
/// (and, for Q4_1, its minimum −0.05).
pub fn ggml_blocks(
    dtype: BlockType,
    rows: usize,
    cols: usize,
    next: &mut impl FnMut() -> u64,
) -> Vec<u8> {
    let blocks = rows * cols / dtype.block_size();
    let mut data = Vec::with_capacity(blocks * dtype.block_bytes());
    for _ in 0..blocks {
        let mut b: Vec<u8> = (0..dtype.block_bytes()).map(|_| next() as u8).collect();
        b[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        if dtype == BlockType::Q4_1 {
            b[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
        data.extend_from_slice(&b);
    }
    data
}
