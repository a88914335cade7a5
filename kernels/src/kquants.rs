//! Reference quantizers for GGML k-quant blocks where llama.cpp's current algorithm beats the
//! one candle ships. Output bytes are the GGML block layout, readable by any GGML consumer.
//!
//! Q2_K: `quantize_row_q2_K_ref` of llama.cpp (`ggml-quants.c`): per 16-weight sub-block an
//! affine 2-bit fit searched by `make_qkx2_quants` (weights |x|, mean-absolute error), then
//! 4-bit sub-block scales and mins against one f16 super-block scale and min.

use half::f16;

use crate::KernelError;

/// Weights per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of one Q2_K block: scales[16], qs[64], d (f16), dmin (f16).
pub const Q2K_BLOCK_BYTES: usize = 84;

/// llama.cpp's `nearest_int`: round half to even via the float magic-number trick.
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// Fits `x ≈ scale * l + min` with `l` in `0..=nmax`, minimizing the weighted absolute error
/// over a small grid of scales; returns (scale, -min) and writes the levels to `levels`.
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], levels: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        best_error += weights[i] * (scale * l as f32 + min - x[i]).abs();
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur: f32 = (0..n)
                .map(|i| weights[i] * (this_scale * aux[i] as f32 + this_min - x[i]).abs())
                .sum();
            if cur < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Quantizes `x` (a multiple of 256 weights) to Q2_K blocks, written to `out`
/// (`x.len() / 256 * 84` bytes).
pub fn quantize_q2k(x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
    if x.len() % QK_K != 0 {
        return Err(KernelError::InvalidShape(format!("{} weights do not split into Q2_K blocks of {QK_K}", x.len())));
    }
    let nb = x.len() / QK_K;
    if out.len() != nb * Q2K_BLOCK_BYTES {
        return Err(KernelError::LengthMismatch {
            what: "Q2_K output",
            expected: nb * Q2K_BLOCK_BYTES,
            actual: out.len(),
        });
    }
    for (x, y) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q2K_BLOCK_BYTES)) {
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let mut mins = [0f32; QK_K / 16];
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            let weights: [f32; 16] = std::array::from_fn(|l| xs[l].abs());
            (scales[j], mins[j]) = make_qkx2_quants(3, xs, &weights, &mut levels[16 * j..16 * j + 16], -0.5, 0.1, 15);
        }
        let max_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
        let max_min = mins.iter().fold(0f32, |a, &b| a.max(b));
        let (sc, rest) = y.split_at_mut(16);
        let (qs, dd) = rest.split_at_mut(64);
        let d = if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            f16::from_f32(max_scale / 15.0)
        } else {
            sc.iter_mut().for_each(|s| *s = 0);
            f16::ZERO
        };
        let dmin = if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for j in 0..16 {
                sc[j] |= (nearest_int(iscale * mins[j]) as u8) << 4;
            }
            f16::from_f32(max_min / 15.0)
        } else {
            f16::ZERO
        };
        for j in 0..QK_K / 16 {
            let dl = d.to_f32() * f32::from(sc[j] & 0xF);
            if dl == 0.0 {
                continue;
            }
            let ml = dmin.to_f32() * f32::from(sc[j] >> 4);
            for ii in 0..16 {
                levels[16 * j + ii] = nearest_int((x[16 * j + ii] + ml) / dl).clamp(0, 3) as u8;
            }
        }
        for j in (0..QK_K).step_by(128) {
            for l in 0..32 {
                qs[j / 4 + l] = levels[j + l] | (levels[j + l + 32] << 2) | (levels[j + l + 64] << 4) | (levels[j + l + 96] << 6);
            }
        }
        dd[..2].copy_from_slice(&d.to_le_bytes());
        dd[2..].copy_from_slice(&dmin.to_le_bytes());
    }
    Ok(())
}

/// Dequantizes Q2_K blocks (llama.cpp's `dequantize_row_q2_K`).
pub fn dequantize_q2k(blocks: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let nb = blocks.len() / Q2K_BLOCK_BYTES;
    if blocks.len() % Q2K_BLOCK_BYTES != 0 || out.len() != nb * QK_K {
        return Err(KernelError::LengthMismatch {
            what: "Q2_K output",
            expected: nb * QK_K,
            actual: out.len(),
        });
    }
    for (b, y) in blocks.chunks_exact(Q2K_BLOCK_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let sc = &b[..16];
        let qs = &b[16..80];
        let d = f16::from_le_bytes([b[80], b[81]]).to_f32();
        let dmin = f16::from_le_bytes([b[82], b[83]]).to_f32();
        let mut i = 0;
        let mut is = 0;
        for half in 0..2 {
            let q = &qs[32 * half..32 * half + 32];
            for shift in [0, 2, 4, 6] {
                for part in 0..2 {
                    let s = sc[is];
                    is += 1;
                    let (dl, ml) = (d * f32::from(s & 0xF), dmin * f32::from(s >> 4));
                    for l in 0..16 {
                        y[i] = dl * f32::from((q[16 * part + l] >> shift) & 3) - ml;
                        i += 1;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q2k_round_trip_error_is_small_and_layout_is_ggml() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut q = vec![0u8; 2 * Q2K_BLOCK_BYTES];
        quantize_q2k(&x, &mut q).unwrap();
        let mut y = vec![0f32; 512];
        dequantize_q2k(&q, &mut y).unwrap();
        let mae = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).sum::<f32>() / 512.0;
        // Uniform data in [-0.5, 0.5) with 4 levels per 16 values: error well under a step.
        assert!(mae < 0.1, "mean abs error {mae}");
        assert!(quantize_q2k(&x[..100], &mut q).is_err());
    }
}
