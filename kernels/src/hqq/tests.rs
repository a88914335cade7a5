use super::*;
use crate::QuantMatrix;
use crate::cpu::supported_levels;
use crate::test_util::assert_shape_checks;
use crate::test_util::{Rng, assert_close_dot, naive_matmul};

fn mean_abs_error(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).sum();
    sum / a.len() as f64
}

fn mean_sq_error(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    sum / a.len() as f64
}

/// Plain round-to-nearest min-max quantization with the same groups, in f32 (no f16
/// rounding of its parameters, which only flatters it).
fn rtn_dequantized(w: &[f32], bits: u8, group: usize) -> Vec<f32> {
    let qmax = f32::from((1u16 << bits) - 1);
    let mut out = Vec::with_capacity(w.len());
    for g in w.chunks(group) {
        let min = g.iter().copied().fold(f32::INFINITY, f32::min);
        let max = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s = qmax / (max - min);
        let z = -min * s;
        out.extend(
            g.iter()
                .map(|&v| ((v * s + z).round().clamp(0.0, qmax) - z) / s),
        );
    }
    out
}

#[test]
fn hqq_beats_min_max_rounding_on_gaussian_weights() {
    let (rows, cols) = (64, 512);
    let w = Rng::new(1).normal_vec(rows * cols, 0.02);
    for bits in [4, 8] {
        let hqq = quantize(&w, rows, cols, bits, 64)
            .unwrap()
            .dequantize()
            .unwrap();
        let rtn = rtn_dequantized(&w, bits, 64);
        let (hqq_l1, rtn_l1) = (mean_abs_error(&w, &hqq), mean_abs_error(&w, &rtn));
        let (hqq_l2, rtn_l2) = (mean_sq_error(&w, &hqq), mean_sq_error(&w, &rtn));
        // Measured: about 4% lower mean absolute error and 8% lower mean squared error, for
        // both bit widths.
        assert!(
            hqq_l1 < 0.975 * rtn_l1,
            "{bits}-bit l1: hqq {hqq_l1:e} vs rtn {rtn_l1:e}"
        );
        assert!(
            hqq_l2 < 0.95 * rtn_l2,
            "{bits}-bit l2: hqq {hqq_l2:e} vs rtn {rtn_l2:e}"
        );
    }
}

#[test]
fn iterations_improve_every_group_over_their_starting_point() {
    let w = Rng::new(2).normal_vec(64 * 200, 1.0);
    let mut improved = 0;
    for g in w.chunks(64) {
        let (min, max) = g
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let inv_scale = 15.0 / (max - min);
        let start = -min * inv_scale;
        let error = |zero: f32| -> f32 {
            g.iter()
                .map(|&v| (v - (quantize_value(v, inv_scale, zero, 15.0) - zero) / inv_scale).abs())
                .sum()
        };
        let optimized = optimize_zero(g, inv_scale, start, 15.0);
        assert!(error(optimized) <= error(start));
        improved += usize::from(error(optimized) < error(start));
    }
    assert!(improved > 100, "only {improved} of 200 groups improved");
}

#[test]
fn hqq8_error_is_within_half_a_step() {
    let (rows, cols) = (16, 256);
    let w = Rng::new(3).normal_vec(rows * cols, 1.0);
    let q = quantize(&w, rows, cols, 8, 64).unwrap();
    let deq = q.dequantize().unwrap();
    for (g, (orig, back)) in w.chunks(64).zip(deq.chunks(64)).enumerate() {
        let scale = q.scales()[g].to_f32();
        for (a, b) in orig.iter().zip(back) {
            // Half a step, plus the slack of an f16 zero point at the edges of the grid.
            assert!(
                (a - b).abs() <= 0.55 * scale,
                "group {g}: {a} vs {b}, step {scale}"
            );
        }
    }
}

#[test]
fn shrink_matches_its_definition() {
    for beta in [10.0f32, 10.0 * 1.01f32.powi(19)] {
        let threshold = shrink_threshold(beta);
        for x in [0.0f32, 1e-6, -0.05, 0.1, -0.2, 0.5, 3.0, -40.0] {
            let a = f64::from(x.abs());
            let expected = (a - a.powf(f64::from(LP_NORM) - 1.0) / f64::from(beta)).max(0.0)
                * f64::from(x.signum());
            let got = f64::from(shrink_lp(x, beta, threshold));
            assert!(
                (got - expected).abs() <= 1e-6 * (1.0 + a),
                "x={x} beta={beta}"
            );
        }
        // The operator is continuous at the threshold (slope 1 + (1 − p) = 1.3 just above).
        assert_eq!(shrink_lp(threshold, beta, threshold), 0.0);
        let above = shrink_lp(threshold * 1.001, beta, threshold);
        assert!(above > 0.0 && above < 1.4e-3 * threshold, "{above}");
    }
}

#[test]
fn constant_groups_dequantize_to_their_value() {
    // (value, allowed relative error): exact for f16 values, about 2⁻²³ in f16's normal
    // range, looser in its subnormal range (below 6.1e-5), and below f16's range the value
    // comes back as 0.
    let cases = [
        (0.0f32, 0.0),
        (-0.0, 0.0),
        (1.5, 0.0),
        (-3.25, 0.0),
        (60000.0, 0.0),
        (0.1, 2e-7),
        (-7.3e-3, 2e-7),
        (300.7, 2e-7),
        (-1.234_567e4, 2e-7),
        (1e-6, 1e-5),
        (1e-30, 1.0),
    ];
    for bits in [4, 8] {
        let w: Vec<f32> = cases.iter().flat_map(|&(v, _)| [v; 16]).collect();
        let q = quantize(&w, cases.len(), 16, bits, 16).unwrap();
        let deq = q.dequantize().unwrap();
        for (&(v, relative), back) in cases.iter().zip(deq.chunks(16)) {
            for &b in back {
                assert!(
                    (b - v).abs() <= relative * v.abs(),
                    "{bits}-bit constant {v} came back as {b}"
                );
            }
        }
    }
}

#[test]
fn narrow_groups_far_from_zero_stay_accurate() {
    // hqq's own parameters would put these zero points beyond f16's range.
    let mut rng = Rng::new(4);
    let w: Vec<f32> = (0..128)
        .map(|i| if i < 64 { 4.0 } else { -9.0 } + 5e-4 * rng.uniform())
        .collect();
    let q = quantize(&w, 1, 128, 4, 64).unwrap();
    assert!(
        q.zeros()
            .iter()
            .all(|z| z.is_finite() && z.to_f32().abs() <= MAX_ABS_ZERO)
    );
    for (a, b) in w.iter().zip(q.dequantize().unwrap()) {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "{a} vs {b}");
    }
}

#[test]
fn codes_are_packed_low_nibble_first() {
    let w: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
    let q = quantize(&w, 1, 32, 4, 16).unwrap();
    // 0..=15 spans the 4-bit grid exactly: codes equal values, scale 1, zero 0.
    assert_eq!(q.scales(), &[f16::ONE, f16::ONE]);
    assert_eq!(q.zeros(), &[f16::ZERO, f16::ZERO]);
    assert_eq!(&q.codes()[..3], &[0x10, 0x32, 0x54]);
    assert_eq!(q.dequantize().unwrap(), w);
    assert_eq!(q.storage_bytes(), 16 + 2 * 2 + 2 * 2);
}

#[test]
fn odd_sizes_pack_across_rows() {
    // 3 × 7 = 21 codes in 11 bytes; rows start mid-byte.
    let w = Rng::new(5).normal_vec(21, 1.0);
    let q = quantize(&w, 3, 7, 4, 7).unwrap();
    assert_eq!(q.codes().len(), 11);
    let deq = q.dequantize().unwrap();
    let mut row = vec![0.0; 7];
    for r in 0..3 {
        q.dequantize_row(r, &mut row).unwrap();
        assert_eq!(row, deq[r * 7..(r + 1) * 7]);
    }
    let back = HqqWeight::from_parts(
        3,
        7,
        4,
        7,
        q.codes().to_vec(),
        q.scales().to_vec(),
        q.zeros().to_vec(),
    )
    .unwrap();
    assert_eq!(back, q);
}

#[test]
fn matmul_matches_dequantized_product_at_every_level() {
    let mut rng = Rng::new(6);
    // (rows, cols, bits, group): SIMD-eligible groups and scalar-only ones.
    let cases = [
        (37, 256, 4, 64),
        (19, 128, 8, 64),
        (8, 96, 4, 32),
        (5, 48, 8, 16),
        (9, 42, 4, 7),
        (6, 30, 8, 10),
    ];
    for (rows, cols, bits, group) in cases {
        let w = rng.normal_vec(rows * cols, 0.5);
        let q = quantize(&w, rows, cols, bits, group).unwrap();
        let deq = q.dequantize().unwrap();
        for m in [1, 3, 4, 9] {
            let x = rng.normal_vec(m * cols, 1.0);
            let expected = naive_matmul(&x, &deq, m, rows, cols);
            for level in supported_levels() {
                let mut out = vec![f32::NAN; m * rows];
                q.matmul_at(level, &x, m, &mut out).unwrap();
                assert_close_dot(&out, &expected, &x, &deq, m, rows, cols, 1e-4);
            }
        }
    }
}

#[test]
fn simd_levels_agree_with_scalar() {
    let mut rng = Rng::new(7);
    for bits in [4, 8] {
        let (rows, cols) = (33, 1024);
        let q = quantize(&rng.normal_vec(rows * cols, 1.0), rows, cols, bits, 64).unwrap();
        let x = rng.normal_vec(5 * cols, 1.0);
        let mut scalar = vec![0.0; 5 * rows];
        q.matmul_at(Level::Scalar, &x, 5, &mut scalar).unwrap();
        for level in supported_levels() {
            let mut out = vec![0.0; 5 * rows];
            q.matmul_at(level, &x, 5, &mut out).unwrap();
            for (a, b) in out.iter().zip(&scalar) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{level:?}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn matmul_is_independent_of_batch_size_and_threads() {
    let mut rng = Rng::new(8);
    let (rows, cols, m) = (200, 512, 7);
    for bits in [4, 8] {
        let q = quantize(&rng.normal_vec(rows * cols, 1.0), rows, cols, bits, 64).unwrap();
        let x = rng.normal_vec(m * cols, 1.0);
        for level in supported_levels() {
            let mut batched = vec![0.0; m * rows];
            q.matmul_at(level, &x, m, &mut batched).unwrap();
            let single_thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut serial = vec![0.0; m * rows];
            single_thread
                .install(|| q.matmul_at(level, &x, m, &mut serial))
                .unwrap();
            assert_eq!(batched, serial, "{level:?}");
            for i in 0..m {
                let mut one = vec![0.0; rows];
                q.matmul_at(level, &x[i * cols..(i + 1) * cols], 1, &mut one)
                    .unwrap();
                assert_eq!(one, batched[i * rows..(i + 1) * rows], "{level:?} row {i}");
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let w = vec![0.5; 4 * 64];
    assert_eq!(
        quantize(&w, 4, 64, 3, 64),
        Err(KernelError::UnsupportedBits(3))
    );
    assert!(matches!(
        quantize(&w, 4, 64, 4, 48),
        Err(KernelError::InvalidShape(_))
    ));
    assert!(matches!(
        quantize(&w, 4, 64, 4, 0),
        Err(KernelError::InvalidShape(_))
    ));
    assert!(matches!(
        quantize(&[], 0, 64, 4, 64),
        Err(KernelError::InvalidShape(_))
    ));
    assert!(matches!(
        quantize(&w, 5, 64, 4, 64),
        Err(KernelError::LengthMismatch { .. })
    ));
    let mut bad = w.clone();
    bad[70] = f32::NAN;
    assert_eq!(
        quantize(&bad, 4, 64, 4, 64),
        Err(KernelError::NonFinite {
            what: "weight",
            index: 70
        })
    );
    let mut wide = w.clone();
    wide[1] = 1e7;
    wide[2] = -1e7;
    assert_eq!(
        quantize(&wide, 4, 64, 4, 64),
        Err(KernelError::ScaleOverflow { group: 0 })
    );

    let q = quantize(&w, 4, 64, 4, 64).unwrap();
    assert_shape_checks(&q);

    let parts = || (q.codes().to_vec(), q.scales().to_vec(), q.zeros().to_vec());
    let (codes, scales, zeros) = parts();
    assert!(matches!(
        HqqWeight::from_parts(4, 64, 4, 64, codes[1..].to_vec(), scales, zeros),
        Err(KernelError::LengthMismatch { what: "codes", .. })
    ));
    let (codes, scales, mut zeros) = parts();
    zeros[3] = f16::NAN;
    assert_eq!(
        HqqWeight::from_parts(4, 64, 4, 64, codes, scales, zeros),
        Err(KernelError::NonFinite {
            what: "zero",
            index: 3
        })
    );
}
