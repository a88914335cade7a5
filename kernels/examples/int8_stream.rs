//! Figures, not a test: a decode's int8 products over 30 layers of the default model's shapes
//! (hidden 576, intermediate 1536, 3 KV heads of 64), read from memory as in a model, in GB/s of
//! weights and tokens per second of those products alone, per format and activation precision.
//! `int8_speed` times one matrix over and over, from cache; this reads every weight once a
//! token, as a decode does, so that what it measures is how the kernels stream memory.
//!
//! `cargo run --release -p strata-kernels --example int8_stream [THREADS] [ROWS]`

// A benchmark program over fixed, generated inputs: it prints, and a failure is a bug to see.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use strata_kernels::QuantMatrix;
use strata_kernels::ggml::BlockType;
use strata_kernels::int8::{PackedMatrix, Precision, QuantizedActivations, from_ggml_blocks};

mod common;

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let m: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    // SAFETY: no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    println!(
        "cpu: {}; threads {threads}; rows {m}",
        strata_kernels::cpu::summary()
    );
    strata_kernels::pool::install(|| run(m));
}

fn run(m: usize) {
    let mut next = common::xorshift();
    // One layer's products as the model runs them: q, k and v stacked; o; gate and up stacked;
    // down.
    let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
    for dtype in [BlockType::Q4_1, BlockType::Q8_0] {
        let layers: Vec<PackedMatrix> = (0..30)
            .flat_map(|_| shapes.iter())
            .map(|&(rows, cols)| {
                let data = common::ggml_blocks(dtype, rows, cols, &mut next);
                from_ggml_blocks(dtype, rows, cols, &data).unwrap()
            })
            .collect();
        let bytes: usize = layers.iter().map(|w| w.storage_bytes()).sum();
        for precision in [Precision::Int8, Precision::Int8x2] {
            let mut xs = Vec::new();
            for cols in [576usize, 1536] {
                let mut x: Vec<f32> = (0..m * cols)
                    .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                // Hidden states' outliers: one in every fifth block.
                for v in x.iter_mut().step_by(5 * 32) {
                    *v = 20.0;
                }
                let mut q = QuantizedActivations::default();
                q.quantize_from(&x, m, cols, precision).unwrap();
                xs.push(q);
            }
            let mut out = vec![0f32; m * 3072];
            let mut best = f64::INFINITY;
            for _ in 0..7 {
                let t = Instant::now();
                for w in &layers {
                    let x = if w.cols() == 576 { &xs[0] } else { &xs[1] };
                    w.matmul_quantized(x, &mut out[..m * w.rows()]).unwrap();
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{dtype:?} {precision:?}: {} MB of weights from memory: {:6.2} ms  {:5.1} GB/s  {:6.1} tok/s",
                bytes / 1_000_000,
                best * 1e3,
                bytes as f64 / best / 1e9,
                m as f64 / best
            );
        }
    }
}
