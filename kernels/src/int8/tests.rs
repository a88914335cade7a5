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
    // Rows with an outlier and a zero block, as real hidden states have. Four rows in five
    // have an outlier, so that at two planes some groups of rows have no residual codes in
    // most blocks, and others have them in every block.
    for i in (0..m).filter(|i| i % 5 != 4) {
        x[i * cols + (i * 37 + 3) % cols] = 40.0;
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

/// One block of one weight row, read back from the packing: its codes, and per sub-block its
/// scale and minimum.
type RowBlock = (Vec<u8>, Vec<f32>, Vec<f32>);

/// The product as the module documentation defines it, in plain scalar code (independent of
/// the packed layout).
fn reference(
    packed: &PackedMatrix,
    w_codes: &[Vec<RowBlock>],
    x: &QuantizedActivations,
) -> Vec<f32> {
    let f = packed.format;
    let subs = f.subs();
    let width = QBLOCK / subs;
    let mut out = vec![0.0f32; x.rows() * packed.rows];
    for i in 0..x.rows() {
        let row = x.row(i);
        for (j, blocks) in w_codes.iter().enumerate() {
            let mut acc = 0.0f32;
            for (b, (codes, s, m)) in blocks.iter().enumerate() {
                // The row's code per value: `q_hi`, or `256 · q_hi + q_lo` with two planes.
                let hi = row.hi.block(b);
                let lo = row.lo.map(|p| p.block(b));
                let q: Vec<i32> = (0..QBLOCK)
                    .map(|k| match &lo {
                        Some(lo) => 256 * i32::from(hi[k]) + i32::from(lo[k]),
                        None => i32::from(hi[k]),
                    })
                    .collect();
                let d = row.scales().d[b];
                for (h, &s) in s.iter().enumerate().take(subs) {
                    let range = h * width..(h + 1) * width;
                    let dot: i32 = codes[range.clone()]
                        .iter()
                        .zip(&q[range.clone()])
                        .map(|(&c, &q)| i32::from(c) * q)
                        .sum();
                    let qsum: i32 = q[range].iter().sum();
                    let isum = dot - f.offset * qsum;
                    acc = (isum as f32).mul_add(s * d, acc);
                }
                if f.has_min {
                    for h in 0..subs {
                        let qsum: i32 = q[h * width..][..width].iter().sum();
                        acc = m[h].mul_add(d * qsum as f32, acc);
                    }
                }
            }
            out[i * packed.rows + j] = acc;
        }
    }
    out
}

/// Codes, scales and minimums of every block of every row, read back from the packing.
fn unpacked(packed: &PackedMatrix) -> Vec<Vec<RowBlock>> {
    let mut rows = Vec::new();
    let mut codes = [[0u8; QBLOCK]; TILE_ROWS];
    let subs = packed.format.subs();
    for j in 0..packed.rows {
        let tile = packed.tile(j / TILE_ROWS);
        let r = j % TILE_ROWS;
        let mut blocks = Vec::new();
        for b in 0..packed.blocks() {
            let block = packed.block(tile, b);
            pack::unpack_codes(packed.format.codes, block.codes, &mut codes);
            let s = (0..subs).map(|h| packed.lane_value(block.scales, h, r));
            let m = (0..subs).map(|h| {
                if packed.format.has_min {
                    packed.lane_value(block.mins, h, r)
                } else {
                    0.0
                }
            });
            blocks.push((codes[r].to_vec(), s.collect(), m.collect()));
        }
        rows.push(blocks);
    }
    rows
}

/// Checks every level against [`reference`], bit for bit, for activations of several batch
/// sizes and both precisions.
fn check_levels(packed: &PackedMatrix, name: &str, rng: &mut Rng) {
    let (rows, cols) = (packed.rows, packed.cols);
    let codes = unpacked(packed);
    for (m, precision) in [
        (1, Precision::Int8),
        (2, Precision::Int8x2),
        (4, Precision::Int8),
        (5, Precision::Int8x2),
        (9, Precision::Int8),
        (21, Precision::Int8),
        (35, Precision::Int8x2),
    ] {
        let x = activations(rng, m, cols);
        let mut q = QuantizedActivations::default();
        q.quantize_from(&x, m, cols, precision).unwrap();
        let want = reference(packed, &codes, &q);
        // Each level, a single row's tiles read side by side and as one stream.
        for level in int8_levels() {
            for single_stream in [false, true] {
                let mut out = vec![f32::NAN; m * rows];
                packed
                    .matmul_quantized_with(level, single_stream, &q, &mut out)
                    .unwrap();
                for (k, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{name} {rows}x{cols} m={m} {} single stream {single_stream}: \
                         element {k}: {a} vs {b}",
                        level.name()
                    );
                }
            }
        }
    }
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
            check_levels(&packed, &format!("{dtype:?}"), &mut rng);
        }
    }
    for kind in KQUANTS {
        for (rows, cols) in [(1usize, 256usize), (17, 512), (45, 256)] {
            let data = random_kquant_blocks(&mut rng, kind, rows, cols);
            let packed = from_kquant_blocks(kind, rows, cols, &data).unwrap();
            check_levels(&packed, &format!("{kind:?}"), &mut rng);
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

/// A long prompt's rows go through the tiles in chunks: every row still gets the bits it has
/// alone, at either precision or both mixed, across the chunks' boundaries.
#[test]
fn rows_in_chunks_give_each_row_its_result_alone() {
    let mut rng = Rng::new(13);
    let (rows, cols, m) = (40, 576, 1400);
    let data = random_blocks(&mut rng, BlockType::Q4_1, rows, cols);
    let packed = from_ggml_blocks(BlockType::Q4_1, rows, cols, &data).unwrap();
    let x = activations(&mut rng, m, cols);
    let one_or_two = |i: usize| [Precision::Int8, Precision::Int8x2][usize::from(i % 7 < 3)];
    let policies: [&dyn Fn(usize) -> Precision; 3] =
        [&|_| Precision::Int8, &|_| Precision::Int8x2, &one_or_two];
    for precision in policies {
        let row_bytes = packed.activation_row_bytes(precision(1) == Precision::Int8x2);
        assert!(crate::rowwise::chunk_rows(m, row_bytes) < m / 2);
        let mut all = QuantizedActivations::default();
        all.quantize_rows(&x, m, cols, precision).unwrap();
        let mut batch = vec![0.0; m * rows];
        packed.matmul_quantized(&all, &mut batch).unwrap();
        // Into one buffer per part, as a layer's fused projections: the same results.
        let mut parts = [vec![f32::NAN; m * 24], vec![f32::NAN; m * 16]];
        let [a, b] = &mut parts;
        packed
            .matmul_quantized_parts(&all, &mut [&mut a[..], &mut b[..]], &[24, 16])
            .unwrap();
        for i in 0..m {
            assert_eq!(parts[0][i * 24..][..24], batch[i * rows..][..24], "row {i}");
            assert_eq!(
                parts[1][i * 16..][..16],
                batch[i * rows + 24..][..16],
                "row {i}"
            );
        }
        for i in (0..m).step_by(3) {
            let mut one = QuantizedActivations::default();
            one.quantize_from(&x[i * cols..][..cols], 1, cols, precision(i))
                .unwrap();
            let mut alone = vec![0.0; rows];
            packed.matmul_quantized(&one, &mut alone).unwrap();
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                batch[i * rows..][..rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{:?} row {i}",
                precision(i)
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
    x[0] = 127.0;
    x[1] = -50.4;
    x[2] = 2.5; // half a step: ties go to even
    x[3] = 3.5;
    x[20] = -1.0;
    let q = QuantizedActivations::quantize(&x, 1, 64).unwrap();
    let row = q.row(0);
    let hi = row.hi;
    assert_eq!(hi.d[0], 1.0);
    assert_eq!(&hi.block(0)[..4], &[127, -50, 2, 4]);
    assert_eq!(hi.block(0)[20], -1);
    assert_eq!(hi.sum[0], 127 - 50 + 2 + 4 - 1);
    assert_eq!(hi.half[0], 127 - 50 + 2 + 4);
    assert_eq!((hi.d[1], hi.sum[1]), (0.0, 0), "a zero block");
    assert!(hi.block(1).iter().all(|&v| v == 0));
    assert!(row.lo.is_none());
    assert_eq!(q.precision(0), Precision::Int8);
}

#[test]
fn every_level_quantizes_alike() {
    let mut rng = Rng::new(10);
    // Blocks in whole groups of 16 (which the AVX-512 quantizer reduces together) and not.
    for (rows, cols) in [(1, 32), (1, 576), (16, 576), (3, 1536), (5, 320)] {
        let x = activations(&mut rng, rows, cols);
        let q = QuantizedActivations::quantize(&x, rows, cols).unwrap();
        for (b, x) in x.chunks_exact(QBLOCK).enumerate() {
            let mut quads = [0i32; QBLOCK / 4];
            let (d, sum, half) = act::quantize_block(x, &mut quads);
            assert_eq!(
                (d.to_bits(), sum, half),
                (q.hi.d[b].to_bits(), q.hi.sum[b], q.hi.half[b]),
                "{rows}x{cols}: block {b}"
            );
            assert_eq!(
                &quads[..],
                &q.hi.q[b * QBLOCK / 4..][..QBLOCK / 4],
                "{rows}x{cols}: block {b}"
            );
        }
    }
    let mut rng = Rng::new(9);
    let (rows, cols) = (5, 320);
    let x = activations(&mut rng, rows, cols);
    let q = QuantizedActivations::quantize(&x, rows, cols).unwrap();
    // The residual plane: the portable quantizer's codes and sums, whatever this CPU ran.
    let mut two = QuantizedActivations::default();
    two.quantize_from(&x, rows, cols, Precision::Int8x2)
        .unwrap();
    let blocks = rows * cols / QBLOCK;
    let (mut quads, mut sum, mut half) =
        (vec![0; rows * cols / 4], vec![0; blocks], vec![0; blocks]);
    let every = vec![true; blocks];
    act::quantize_residual(
        &x, &q.hi.q, &q.hi.d, &every, &mut quads, &mut sum, &mut half,
    );
    let per_row = cols / QBLOCK;
    let (mut refined, mut plain) = (0, 0);
    for b in 0..blocks {
        let row = b / per_row * per_row..(b / per_row + 1) * per_row;
        let largest = q.hi.d[row].iter().fold(0.0f32, |a, &d| a.max(d));
        let codes = b * QBLOCK / 4..(b + 1) * QBLOCK / 4;
        // Blocks near the row's largest scale have the residual's codes; the others none.
        if q.hi.d[b] >= act::REFINE_FROM * largest && q.hi.d[b] > 0.0 {
            refined += 1;
            assert!(two.lo.coded[b], "block {b}");
            assert_eq!(two.lo.q[codes.clone()], quads[codes], "block {b}");
            assert_eq!(two.lo.sum[b], (q.hi.sum[b] << 8) + sum[b], "block {b}");
            assert_eq!(two.lo.half[b], (q.hi.half[b] << 8) + half[b], "block {b}");
        } else {
            plain += 1;
            assert!(!two.lo.coded[b], "block {b}");
            assert!(two.lo.q[codes].iter().all(|&q| q == 0), "block {b}");
            assert_eq!(two.lo.sum[b], q.hi.sum[b] << 8, "block {b}");
            assert_eq!(two.lo.half[b], q.hi.half[b] << 8, "block {b}");
        }
        assert_eq!(two.lo.d[b], q.hi.d[b] / 256.0, "block {b}");
    }
    // Rows 1 to 3 have an outlier: one refined block each. Rows 0 (its outlier fell in its
    // zero block) and 4 have none: every block but the zero one is refined.
    assert_eq!(
        (refined, plain),
        (3 + 2 * per_row - 1, 3 * (per_row - 1) + 1)
    );
}

#[test]
fn the_residual_goes_where_the_large_blocks_are() {
    // One row: a block of scale 1, one of 0.5, one of 0.3, one of 0.01 and a zero block.
    let mut x = vec![0.0f32; 5 * QBLOCK];
    for (b, amax) in [1.0f32, 0.5, 0.3, 0.01].into_iter().enumerate() {
        for k in 0..QBLOCK {
            x[b * QBLOCK + k] = amax * 127.0 * ((k as f32 * 0.37).sin());
        }
        x[b * QBLOCK] = amax * 127.0;
    }
    let mut q = QuantizedActivations::default();
    q.quantize_from(&x, 1, x.len(), Precision::Int8x2).unwrap();
    assert_eq!(q.lo.coded, [true, true, false, false, false]);
    // Each refined block's value is within 1/256 of a step of the value's plane alone.
    let two = q.row(0);
    let lo = two.lo.unwrap();
    for b in 0..2 {
        let (h, l) = (two.hi.block(b), lo.block(b));
        for k in 0..QBLOCK {
            let v = (256.0 * f32::from(h[k]) + f32::from(l[k])) * lo.d[b];
            let step = two.hi.d[b];
            assert!(
                (v - x[b * QBLOCK + k]).abs() <= step / 256.0,
                "block {b} value {k}"
            );
        }
    }
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
        sub16: false,
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
    // Into one buffer per part, in place: the same results.
    let mut q = QuantizedActivations::default();
    q.quantize_from(&x, 3, cols, Precision::Int8x2).unwrap();
    let mut whole = vec![0.0; 3 * 55];
    stacked.matmul_quantized(&q, &mut whole).unwrap();
    let widths = [32, 16, 7];
    let mut bufs: Vec<Vec<f32>> = widths.iter().map(|w| vec![f32::NAN; 3 * w]).collect();
    let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    stacked
        .matmul_quantized_parts(&q, &mut outs, &widths)
        .unwrap();
    let mut at = 0;
    for (buf, w) in bufs.iter().zip(widths) {
        for i in 0..3 {
            assert_eq!(buf[i * w..][..w], whole[i * 55 + at..][..w], "row {i}");
        }
        at += w;
    }
    // Widths that do not add up to the rows, or a buffer of the wrong length, are refused.
    let mut bufs: Vec<Vec<f32>> = [32, 16, 6].iter().map(|w| vec![0.0; 3 * w]).collect();
    let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    assert!(
        stacked
            .matmul_quantized_parts(&q, &mut outs, &[32, 16, 6])
            .is_err()
    );
    let mut short = vec![0.0; 2 * 55];
    assert!(
        stacked
            .matmul_quantized_parts(&q, &mut [&mut short[..]], &[55])
            .is_err()
    );
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

/// A quantization large enough to split its rows among threads gives each row the codes,
/// scales, sums and flags it has alone, in both planes.
#[test]
fn many_rows_quantize_in_parallel_as_each_alone() {
    let mut rng = Rng::new(7);
    let (m, cols) = (300, 192);
    assert!(m * cols >= super::act::PARALLEL_MIN_VALUES);
    let x = activations(&mut rng, m, cols);
    let precise = |i: usize| {
        if i % 5 < 2 {
            Precision::Int8x2
        } else {
            Precision::Int8
        }
    };
    let mut many = QuantizedActivations::default();
    many.quantize_rows(&x, m, cols, precise).unwrap();
    for i in 0..m {
        let mut alone = QuantizedActivations::default();
        alone
            .quantize_from(&x[i * cols..][..cols], 1, cols, precise(i))
            .unwrap();
        let (a, b) = (many.row(i), alone.row(0));
        assert_eq!(many.precision(i), precise(i), "row {i}");
        for (p, q) in [(a.hi, b.hi)].into_iter().chain(a.lo.zip(b.lo)) {
            assert_eq!(p.q, q.q, "row {i} codes");
            assert_eq!(p.d, q.d, "row {i} scales");
            assert_eq!(p.sum, q.sum, "row {i} sums");
            assert_eq!(p.half, q.half, "row {i} half sums");
            assert_eq!(p.coded, q.coded, "row {i} coded blocks");
        }
        assert_eq!(a.lo.is_some(), b.lo.is_some(), "row {i}");
    }
}

const KQUANTS: [KQuant; 5] = [
    KQuant::Q2K,
    KQuant::Q3K,
    KQuant::Q4K,
    KQuant::Q5K,
    KQuant::Q6K,
];

/// Random k-quant blocks with sane super-scales.
fn random_kquant_blocks(rng: &mut Rng, kind: KQuant, rows: usize, cols: usize) -> Vec<u8> {
    let mut data = Vec::new();
    for _ in 0..rows * cols / 256 {
        let mut block: Vec<u8> = (0..kind.block_bytes())
            .map(|_| rng.next_u64() as u8)
            .collect();
        let d = f16::from_f32(0.001 + rng.uniform() * 0.01).to_le_bytes();
        let dmin = f16::from_f32(0.001 + rng.uniform() * 0.005).to_le_bytes();
        let (at_d, at_dmin) = match kind {
            KQuant::Q2K => (80, Some(82)),
            KQuant::Q3K => (108, None),
            KQuant::Q4K | KQuant::Q5K => (0, Some(2)),
            KQuant::Q6K => (208, None),
        };
        block[at_d..at_d + 2].copy_from_slice(&d);
        if let Some(at) = at_dmin {
            block[at..at + 2].copy_from_slice(&dmin);
        }
        data.extend_from_slice(&block);
    }
    data
}

/// ggml's `dequantize_row_q*_K` for one block, transcribed loop for loop.
// A transcription of ggml's C loops, index for index, so that it can be read against them.
#[allow(clippy::needless_range_loop)]
fn ggml_kquant(kind: KQuant, x: &[u8]) -> Vec<f32> {
    let half = |at: usize| f16::from_le_bytes([x[at], x[at + 1]]).to_f32();
    let mut y = Vec::with_capacity(256);
    match kind {
        KQuant::Q2K => {
            let (d, min) = (half(80), half(82));
            let (scales, qs) = (&x[..16], &x[16..80]);
            let mut is = 0;
            for n in 0..2 {
                let q = &qs[32 * n..];
                for shift in [0, 2, 4, 6] {
                    for off in [0, 16] {
                        let sc = scales[is];
                        is += 1;
                        let (dl, ml) = (d * f32::from(sc & 0xF), min * f32::from(sc >> 4));
                        for l in 0..16 {
                            y.push(dl * f32::from((q[l + off] >> shift) & 3) - ml);
                        }
                    }
                }
            }
        }
        KQuant::Q3K => {
            let d = half(108);
            let (hm, qs, raw) = (&x[..32], &x[32..96], &x[96..108]);
            let mut aux = [0u32; 4];
            for (k, a) in aux.iter_mut().take(3).enumerate() {
                *a = u32::from_le_bytes([
                    raw[4 * k],
                    raw[4 * k + 1],
                    raw[4 * k + 2],
                    raw[4 * k + 3],
                ]);
            }
            let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
            let tmp = aux[2];
            aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
            aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
            aux[0] = (aux[0] & kmask2) | ((tmp & kmask1) << 4);
            aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
            let scales: Vec<i8> = aux
                .iter()
                .flat_map(|a| a.to_le_bytes())
                .map(|b| b as i8)
                .collect();
            let (mut is, mut m) = (0, 1u8);
            for n in 0..2 {
                let q = &qs[32 * n..];
                for shift in [0, 2, 4, 6] {
                    for off in [0, 16] {
                        let dl = d * f32::from(i16::from(scales[is]) - 32);
                        is += 1;
                        for l in 0..16 {
                            let v = ((q[l + off] >> shift) & 3) as i8
                                - if hm[l + off] & m != 0 { 0 } else { 4 };
                            y.push(dl * f32::from(v));
                        }
                    }
                    m <<= 1;
                }
            }
        }
        KQuant::Q4K | KQuant::Q5K => {
            let (d, min) = (half(0), half(2));
            let sc = &x[4..16];
            let (qh, ql) = if kind == KQuant::Q4K {
                (&[][..], &x[16..144])
            } else {
                (&x[16..48], &x[48..176])
            };
            for (j, is) in [0usize, 2, 4, 6].into_iter().enumerate() {
                let (s1, m1) = scale_min_k4_ref(is, sc);
                let (s2, m2) = scale_min_k4_ref(is + 1, sc);
                let (d1, m1) = (d * f32::from(s1), min * f32::from(m1));
                let (d2, m2) = (d * f32::from(s2), min * f32::from(m2));
                let q = &ql[32 * j..];
                let high = |l: usize, u: u8| {
                    if !qh.is_empty() && qh[l] & u != 0 {
                        16
                    } else {
                        0
                    }
                };
                for l in 0..32 {
                    y.push(d1 * f32::from((q[l] & 0xF) + high(l, 1 << (2 * j))) - m1);
                }
                for l in 0..32 {
                    y.push(d2 * f32::from((q[l] >> 4) + high(l, 2 << (2 * j))) - m2);
                }
            }
        }
        KQuant::Q6K => {
            let d = half(208);
            let mut out = [0.0f32; 256];
            for n in 0..2 {
                let (ql, qh, sc) = (&x[64 * n..], &x[128 + 32 * n..], &x[192 + 8 * n..]);
                let sc = |i: usize| f32::from(sc[i] as i8);
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    let y = &mut out[128 * n..];
                    y[l] = d * sc(is) * f32::from(q1);
                    y[l + 32] = d * sc(is + 2) * f32::from(q2);
                    y[l + 64] = d * sc(is + 4) * f32::from(q3);
                    y[l + 96] = d * sc(is + 6) * f32::from(q4);
                }
            }
            y.extend_from_slice(&out);
        }
    }
    y
}

/// ggml's `get_scale_min_k4`.
fn scale_min_k4_ref(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[test]
fn k_quants_repack_to_ggml_weights_exactly() {
    let mut rng = Rng::new(7);
    let (rows, cols) = (18, 512);
    for kind in KQUANTS {
        let data = random_kquant_blocks(&mut rng, kind, rows, cols);
        let w = from_kquant_blocks(kind, rows, cols, &data).unwrap();
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut row).unwrap();
            let want: Vec<f32> = data[r * cols / 256 * kind.block_bytes()..]
                .chunks_exact(kind.block_bytes())
                .take(cols / 256)
                .flat_map(|b| ggml_kquant(kind, b))
                .collect();
            assert_eq!(
                row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{kind:?} row {r}"
            );
        }
        check_against_its_weights(&w, &mut rng);
    }
}

#[test]
fn hqq_repacks_to_the_same_weights() {
    use crate::hqq;
    let mut rng = Rng::new(8);
    let (rows, cols) = (18, 512);
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

#[test]
fn products_nested_on_one_thread_by_work_stealing_give_their_own_results() {
    // Several threads hand products to one pool (as tests, or several stages, do). A pool
    // thread that waits for its product's tasks runs other queued work meanwhile, here whole
    // products of other callers: each must still give its own result (and not find the first
    // one's buffer in use).
    let mut rng = Rng::new(31);
    let (rows, cols, m) = (2056, 256, 5);
    let data = random_blocks(&mut rng, BlockType::Q4_1, rows, cols);
    let w = from_ggml_blocks(BlockType::Q4_1, rows, cols, &data).unwrap();
    let inputs: Vec<QuantizedActivations> = (0..6)
        .map(|_| QuantizedActivations::quantize(&activations(&mut rng, m, cols), m, cols).unwrap())
        .collect();
    let product = |q: &QuantizedActivations| {
        let mut out = vec![0.0; m * rows];
        w.matmul_quantized(q, &mut out).map(|()| out)
    };
    let expected: Vec<Vec<f32>> = inputs.iter().map(|q| product(q).unwrap()).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    std::thread::scope(|s| {
        for (q, expected) in inputs.iter().zip(&expected) {
            let (pool, product) = (&pool, &product);
            s.spawn(move || {
                for _ in 0..200 {
                    assert_eq!(&pool.install(|| product(q)).unwrap(), expected);
                }
            });
        }
    });
}
