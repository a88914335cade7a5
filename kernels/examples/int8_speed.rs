//! Speed of the int8 products on this CPU: `cargo run --release -p strata-kernels --example
//! int8_speed`. Prints, per format, shape and batch, the time of one product and its rate in
//! billions of weight-activation multiply-adds per second (per activation plane); then the time
//! of the activations' quantization alone (`quantize`), per shape and precision. Hidden states
//! have outliers: the generated rows have one in every fifth block. `M="128 4000"` times those
//! batches instead of 1, 4, 16 and 64.

// A benchmark program over fixed, generated inputs: it prints its figures.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use strata_kernels::ggml::BlockType;
use strata_kernels::int8::{Precision, QuantizedActivations, from_ggml_blocks};

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut next = common::xorshift();
    // `M="128 4000"`: other batches (activation rows) than the default ones.
    let batches: Vec<usize> = match std::env::var("M") {
        Ok(list) => list
            .split_whitespace()
            .filter_map(|m| m.parse().ok())
            .collect(),
        Err(_) => vec![1, 4, 16, 64],
    };
    for dtype in [BlockType::Q4_1, BlockType::Q8_0] {
        for (rows, cols) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
            let data = common::ggml_blocks(dtype, rows, cols, &mut next);
            let w = from_ggml_blocks(dtype, rows, cols, &data)?;
            for &m in &batches {
                for precision in [Precision::Int8, Precision::Int8x2] {
                    let x: Vec<f32> = (0..m * cols)
                        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                        .collect();
                    let mut q = QuantizedActivations::default();
                    let mut out = vec![0.0f32; m * rows];
                    q.quantize_from(&x, m, cols, precision)?;
                    w.matmul_quantized(&q, &mut out)?;
                    // The best of several rounds: other tenants of the machine only slow a
                    // round down.
                    let reps = (400_000_000 / (m * rows * cols)).clamp(2, 400);
                    let mut s = f64::INFINITY;
                    for _ in 0..7 {
                        let t = Instant::now();
                        for _ in 0..reps {
                            q.quantize_from(&x, m, cols, precision)?;
                            w.matmul_quantized(&q, &mut out)?;
                        }
                        s = s.min(t.elapsed().as_secs_f64() / reps as f64);
                    }
                    println!(
                        "{dtype:?} {rows}x{cols} m={m:<3} {precision:?}: {:8.1} us, {:6.1} GMAC/s",
                        s * 1e6,
                        (m * rows * cols) as f64 / s / 1e9
                    );
                }
            }
        }
    }
    for cols in [576usize, 1536] {
        for m in [1usize, 16, 128] {
            for precision in [Precision::Int8, Precision::Int8x2] {
                let mut x: Vec<f32> = (0..m * cols)
                    .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                for v in x.iter_mut().step_by(5 * 32) {
                    *v = 20.0;
                }
                let mut q = QuantizedActivations::default();
                let reps = (20_000_000 / (m * cols)).clamp(2, 20_000);
                let mut s = f64::INFINITY;
                for _ in 0..7 {
                    let t = Instant::now();
                    for _ in 0..reps {
                        q.quantize_from(&x, m, cols, precision)?;
                    }
                    s = s.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                println!(
                    "quantize {m}x{cols} {precision:?}: {:8.2} us, {:6.2} ns a block",
                    s * 1e6,
                    s * 1e9 / (m * cols / 32) as f64
                );
            }
        }
    }
    Ok(())
}
