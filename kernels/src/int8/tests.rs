use half::f16;

use super::*;
use crate::cpu::{int8_levels, missing_int8_levels};
use crate::ggml::{BlockType, BlockWeight};
use crate::test_util::{Rng, naive_matmul};

const TYPES: [BlockType; 7] = [
    BlockType::Q4_0,
    BlockType::Q4_1,
    BlockType::Q5_0,
    BlockType::Q5_1,
    BlockType::Q8_0,
    BlockType::Q8_1,
    BlockType::Q8K,
];

/// Random but well-formed blocks: finite scales of a realistic size, random codes.
fn random_blocks(rng: &mut Rng, dtype: BlockType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols / dtype.block_size();
    let mut out = Vec::with_capacity(n * dtype.block_bytes());
    for _ in 0..n {
        let mut block: Vec<u8> = (0..dtype.block_bytes())
            .map(|_| rng.next_u64() as u8)
            .collect();
        let d = f16::from_f32(0.001 + rng.uniform() * 0.02).to_le_bytes();
        let m = f16::from_f32(-0.1 + rng.uniform() * 0.05).to_le_bytes();
        match dtype {
            BlockType::Q8K => {
                block[..4].copy_from_slice(&(0.001 + rng.uniform() * 0.01).to_le_bytes())
            }
            BlockType::Q4_1 | BlockType::Q5_1 | BlockType::Q8_1 => {
                block[..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&m);
            }
            _ => block[..2].copy_from_slice(&d),
        }
        out.extend_from_slice(&block);
    }
    out
}

fn activations(rng: &mut Rng, m: usize, cols: usize) -> Vec<f32> {
    let mut x = rng.normal_vec(m * cols, 1.0);
    // Some rows with an outlier and a zero block, as real hidden states have.
    if m > 1 {
        x[cols + 3] = 40.0;
    }
    for v in x.iter_mut().take(QBLOCK) {
        *v = 0.0;
    }
    x
}

#[test]
fn repacking_keeps_every_weight_exactly() {
    let mut rng = Rng::new(1);
    for dtype in TYPES {
        let cols = dtype.block_size().max(64);
        let rows = 19;
        let data = random_blocks(&mut rng, dtype, rows, cols);
        let ggml = BlockWeight::new(dtype, rows, cols, data.clone()).unwrap();
        let packed = from_ggml_blocks(dtype, rows, cols, &data).unwrap();
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for row in 0..rows {
            ggml.dequantize_row(row, &mut a).unwrap();
            packed.dequantize_row(row, &mut b).unwrap();
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{dtype:?} row {row}"
            );
        }
    }
}

/// The product as the module documentation defines it, in plain scalar code (independent of
/// the packed layout).
fn reference(
    packed: &PackedMatrix,
    w_codes: &[Vec<(Vec<u8>, f32, f32)>],
    x: &QuantizedActivations,
) -> Vec<f32> {
    let f = packed.format;
    let mut out = vec![0.0f32; x.rows() * packed.rows];
    for i in 0..x.rows() {
        let row = x.row(i);
        for (j, blocks) in w_codes.iter().enumerate() {
            let mut acc = 0.0f32;
            for (b, (codes, s, m)) in blocks.iter().enumerate() {
                for p in row.planes() {
                    let q = p.block(b);
                    let dot: i32 = codes
                        .iter()
                        .zip(&q)
                        .map(|(&c, &q)| i32::from(c) * i32::from(q))
                        .sum();
                    let isum = dot - f.offset * p.sum[b];
                    acc = (isum as f32).mul_add(s * p.d[b], acc);
                }
                if f.has_min {
                    for p in row.planes() {
                        acc = m.mul_add(p.d[b] * p.sum[b] as f32, acc);
                    }
                }
            }
            out[i * packed.rows + j] = acc;
        }
    }
    out
}

/// Codes, scale and minimum of every block of every row, read back from the packing.
fn unpacked(packed: &PackedMatrix) -> Vec<Vec<(Vec<u8>, f32, f32)>> {
    let mut rows = Vec::new();
    let mut codes = [[0u8; QBLOCK]; TILE_ROWS];
    for j in 0..packed.rows {
        let tile = packed.tile(j / TILE_ROWS);
        let r = j % TILE_ROWS;
        let mut blocks = Vec::new();
        for b in 0..packed.blocks() {
            let block = packed.block(tile, b);
            pack::unpack_codes(packed.format.codes, block.codes, &mut codes);
            let s = packed.lane_value(block.scales, r);
            let m = if packed.format.has_min {
                packed.lane_value(block.mins, r)
            } else {
                0.0
            };
            blocks.push((codes[r].to_vec(), s, m));
        }
        rows.push(blocks);
    }
    rows
}

#[test]
fn every_level_matches_the_definition_bit_for_bit() {
    let missing = missing_int8_levels();
    if !missing.is_empty() {
        eprintln!("int8 levels this CPU cannot run: {missing:?}");
    }
    let mut rng = Rng::new(2);
    for dtype in TYPES {
        for (rows, cols) in [(1usize, 256usize), (16, 256), (17, 512), (45, 256)] {
            if !cols.is_multiple_of(dtype.block_size()) {
                continue;
            }
            let data = random_blocks(&mut rng, dtype, rows, cols);
            let packed = from_ggml_blocks(dtype, rows, cols, &data).unwrap();
            let codes = unpacked(&packed);
            for (m, precision) in [
                (1, Precision::Int8),
                (2, Precision::Int8x2),
                (4, Precision::Int8),
                (5, Precision::Int8x2),
                (9, Precision::Int8),
            ] {
                let x = activations(&mut rng, m, cols);
                let mut q = QuantizedActivations::default();
                q.quantize_from(&x, m, cols, precision).unwrap();
                let want = reference(&packed, &codes, &q);
                for level in int8_levels() {
                    let mut out = vec![f32::NAN; m * rows];
                    packed.matmul_quantized_at(level, &q, &mut out).unwrap();
                    for (k, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{dtype:?} {rows}x{cols} m={m} {}: element {k}: {a} vs {b}",
                            level.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_row_gives_the_same_result_alone_or_in_any_batch() {
    let mut rng = Rng::new(3);
    for dtype in [BlockType::Q4_1, BlockType::Q8_0] {
        let (rows, cols) = (40, 576);
        let data = random_blocks(&mut rng, dtype, rows, cols);
        let packed = from_ggml_blocks(dtype, rows, cols, &data).unwrap();
        let m = 64;
        let x = activations(&mut rng, m, cols);
        let mut batch = vec![0.0; m * rows];
        packed.matmul(&x, m, &mut batch).unwrap();
        for i in 0..m {
            let mut alone = vec![0.0; rows];
            packed
                .matmul(&x[i * cols..][..cols], 1, &mut alone)
                .unwrap();
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                batch[i * rows..][..rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{dtype:?} row {i}"
            );
        }
    }
}

#[test]
fn products_are_close_to_the_f32_product() {
    let mut rng = Rng::new(4);
    for dtype in TYPES {
        let (rows, cols, m) = (33, 512, 3);
        let data = random_blocks(&mut rng, dtype, rows, cols);
        let packed = from_ggml_blocks(dtype, rows, cols, &data).unwrap();
        let w = packed.dequantize().unwrap();
        let x = rng.normal_vec(m * cols, 1.0);
        let exact = naive_matmul(&x, &w, m, rows, cols);
        let mut out = vec![0.0; m * rows];
        packed.matmul(&x, m, &mut out).unwrap();
        for i in 0..m {
            for j in 0..rows {
                let scale: f64 = (0..cols)
                    .map(|k| f64::from((x[i * cols + k] * w[j * cols + k]).abs()))
                    .sum();
                let err = f64::from((out[i * rows + j] - exact[i * rows + j]).abs());
                // 8-bit activations: each product is off by at most half a step of its block's
                // scale, about 0.4% of the block's largest value.
                assert!(
                    err <= 0.01 * scale,
                    "{dtype:?} ({i}, {j}): {err} of {scale}"
                );
            }
        }
    }
}

#[test]
fn quantization_rounds_to_the_nearest_step_and_sums_the_codes() {
    let mut x = vec![0.0f32; 64];
    x[0] = 1.27;
    x[1] = -0.5;
    x[2] = 0.005; // half a step: rounds away from zero
    let q = QuantizedActivations::quantize(&x, 1, 64).unwrap();
    let row = q.row(0);
    let hi = row.hi;
    assert_eq!(hi.d[0], 1.27 / 127.0);
    assert_eq!(&hi.block(0)[..3], &[127, -50, 1]);
    assert_eq!(hi.sum[0], 127 - 50 + 1);
    assert_eq!((hi.d[1], hi.sum[1]), (0.0, 0), "a zero block");
    assert!(hi.block(1).iter().all(|&v| v == 0));
    assert!(row.lo.is_none());
    assert_eq!(q.precision(0), Precision::Int8);
}

#[test]
fn bad_shapes_are_errors() {
    assert!(matches!(
        QuantizedActivations::quantize(&[0.0; 48], 1, 48),
        Err(KernelError::InvalidShape(_))
    ));
    assert!(matches!(
        QuantizedActivations::quantize(&[0.0; 63], 1, 64),
        Err(KernelError::LengthMismatch { .. })
    ));
    let data = vec![0u8; 2 * 18];
    assert!(from_ggml_blocks(BlockType::Q4_0, 1, 64, &data[1..]).is_err());
    let w = from_ggml_blocks(BlockType::Q4_0, 1, 64, &data).unwrap();
    let x = QuantizedActivations::quantize(&[0.0; 32], 1, 32).unwrap();
    assert!(matches!(
        w.matmul_quantized(&x, &mut [0.0]),
        Err(KernelError::LengthMismatch { .. })
    ));
    let x = QuantizedActivations::quantize(&[0.0; 64], 1, 64).unwrap();
    assert!(matches!(
        w.matmul_quantized(&x, &mut [0.0; 2]),
        Err(KernelError::LengthMismatch { .. })
    ));
    let mut out = [f32::NAN];
    w.matmul_quantized(&x, &mut out).unwrap();
    assert_eq!(out, [0.0]);
    let nibble = PackFormat {
        name: "test",
        codes: Codes::Nibbles,
        f32_scales: false,
        has_min: false,
        offset: 0,
    };
    let err = PackedMatrix::pack(nibble, 1, 32, |_, codes, _, _| {
        codes[5] = 16;
        Ok(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("does not fit in 4 bits"), "{err}");
}

#[test]
fn stacked_matrices_multiply_as_their_parts() {
    let mut rng = Rng::new(5);
    let cols = 64;
    let parts: Vec<PackedMatrix> = [32usize, 16, 7]
        .iter()
        .map(|&rows| {
            let data = random_blocks(&mut rng, BlockType::Q4_1, rows, cols);
            from_ggml_blocks(BlockType::Q4_1, rows, cols, &data).unwrap()
        })
        .collect();
    let refs: Vec<&PackedMatrix> = parts.iter().collect();
    let stacked = PackedMatrix::stack(&refs).unwrap();
    assert_eq!(stacked.rows(), 55);
    let x = activations(&mut rng, 3, cols);
    let mut all = vec![0.0; 3 * 55];
    stacked.matmul(&x, 3, &mut all).unwrap();
    let mut at = 0;
    for p in &parts {
        let mut out = vec![0.0; 3 * p.rows()];
        p.matmul(&x, 3, &mut out).unwrap();
        for i in 0..3 {
            assert_eq!(
                out[i * p.rows()..][..p.rows()],
                all[i * 55 + at..][..p.rows()]
            );
        }
        at += p.rows();
    }
    // A part with a partial tile can only come last; formats and widths must agree.
    assert!(PackedMatrix::stack(&[&parts[2], &parts[0]]).is_err());
    let q8 = from_ggml_blocks(
        BlockType::Q8_0,
        16,
        cols,
        &random_blocks(&mut rng, BlockType::Q8_0, 16, cols),
    )
    .unwrap();
    assert!(PackedMatrix::stack(&[&parts[0], &q8]).is_err());
    assert!(PackedMatrix::stack(&[]).is_err());
}

#[test]
fn rows_of_either_precision_mix_in_one_product() {
    let mut rng = Rng::new(6);
    let (rows, cols, m) = (20, 128, 7);
    let data = random_blocks(&mut rng, BlockType::Q4_1, rows, cols);
    let w = from_ggml_blocks(BlockType::Q4_1, rows, cols, &data).unwrap();
    let x = activations(&mut rng, m, cols);
    let precise = |i: usize| {
        if i % 3 == 1 {
            Precision::Int8x2
        } else {
            Precision::Int8
        }
    };
    let mut mixed = QuantizedActivations::default();
    mixed.quantize_rows(&x, m, cols, precise).unwrap();
    let mut out = vec![0.0; m * rows];
    w.matmul_quantized(&mixed, &mut out).unwrap();
    for i in 0..m {
        let mut alone = QuantizedActivations::default();
        alone
            .quantize_from(&x[i * cols..][..cols], 1, cols, precise(i))
            .unwrap();
        let mut one = vec![0.0; rows];
        w.matmul_quantized(&alone, &mut one).unwrap();
        assert_eq!(one, out[i * rows..][..rows], "row {i}");
    }
}

#[test]
fn k_quants_and_hqq_repack_to_the_same_weights() {
    use crate::hqq;
    let mut rng = Rng::new(7);
    let (rows, cols) = (18, 512);
    // Q4_K and Q5_K: random bytes with sane super-scales; compare with candle-free reference
    // dequantization of the packing against the f32 product of its own dequantized rows.
    for kind in [KQuant::Q4K, KQuant::Q5K] {
        let mut data = Vec::new();
        for _ in 0..rows * cols / 256 {
            let mut block: Vec<u8> = (0..kind.block_bytes())
                .map(|_| rng.next_u64() as u8)
                .collect();
            block[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            block[2..4].copy_from_slice(&f16::from_f32(0.005).to_le_bytes());
            data.extend_from_slice(&block);
        }
        let w = from_kquant_blocks(kind, rows, cols, &data).unwrap();
        // Sub-block 0 of row 0, by the ggml formula.
        let d = 0.01f32;
        let dmin = 0.005f32;
        let (sc, m) = scale_min_k4_ref(0, &data[4..16]);
        let mut row = vec![0.0; cols];
        w.dequantize_row(0, &mut row).unwrap();
        let qs0 = if kind == KQuant::Q4K {
            &data[16..]
        } else {
            &data[48..]
        };
        for l in 0..32 {
            let mut q = qs0[l] & 0x0F;
            if kind == KQuant::Q5K && data[16 + l] & 1 != 0 {
                q += 16;
            }
            let want = f32::from(q) * (f16::from_f32(d).to_f32() * f32::from(sc))
                - f16::from_f32(dmin).to_f32() * f32::from(m);
            assert!(
                (row[l] - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{kind:?} {l}"
            );
        }
        check_against_its_weights(&w, &mut rng);
    }
    for bits in [4, 8] {
        let group = if bits == 4 { 32 } else { 64 };
        let x = rng.normal_vec(rows * cols, 0.05);
        let h = hqq::quantize(&x, rows, cols, bits, group).unwrap();
        let w = from_hqq(&h).unwrap();
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in 0..rows {
            h.dequantize_row(r, &mut a).unwrap();
            w.dequantize_row(r, &mut b).unwrap();
            for (a, b) in a.iter().zip(&b) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
                    "HQQ{bits}: {a} vs {b}"
                );
            }
        }
        check_against_its_weights(&w, &mut rng);
    }
}

fn scale_min_k4_ref(j: usize, q: &[u8]) -> (u8, u8) {
    (q[j] & 63, q[j + 4] & 63)
}

/// The int8 product at every level is close to the f32 product with the matrix's own weights,
/// and the levels agree bit for bit.
fn check_against_its_weights(w: &PackedMatrix, rng: &mut Rng) {
    let (rows, cols, m) = (w.rows(), w.cols(), 3);
    let weights = w.dequantize().unwrap();
    let x = rng.normal_vec(m * cols, 1.0);
    let exact = naive_matmul(&x, &weights, m, rows, cols);
    let mut q = QuantizedActivations::default();
    q.quantize_from(&x, m, cols, Precision::Int8x2).unwrap();
    let mut first: Option<Vec<f32>> = None;
    for level in int8_levels() {
        let mut out = vec![0.0; m * rows];
        w.matmul_quantized_at(level, &q, &mut out).unwrap();
        for (k, (a, e)) in out.iter().zip(&exact).enumerate() {
            let scale: f32 = (0..cols)
                .map(|c| (x[(k / rows) * cols + c] * weights[(k % rows) * cols + c]).abs())
                .sum();
            assert!(
                (a - e).abs() <= 1e-3 * scale.max(1e-6),
                "{}: {a} vs {e}",
                w.format().name
            );
        }
        match &first {
            None => first = Some(out),
            Some(f) => assert_eq!(
                f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{} at {}",
                w.format().name,
                level.name()
            ),
        }
    }
}
