//! Figures, not a test: time of the weight products of one decoder layer of the default model's
//! shape (hidden 576, intermediate 1536; q 576, k and v 192 rows) at several batch sizes, for the
//! f32-activation GGML kernels and the int8 ones.
//!
//! `cargo run --release -p strata-kernels --example products [THREADS]`

// A benchmark program over fixed, generated inputs: it prints, and a failure is a bug to see.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use strata_kernels::QuantMatrix;
use strata_kernels::ggml::{BlockType, BlockWeight};
use strata_kernels::int8::{self, Precision, QuantizedActivations};

fn blocks(dtype: BlockType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let n = rows * cols / dtype.block_size();
    let mut out = Vec::with_capacity(n * dtype.block_bytes());
    for _ in 0..n {
        for i in 0..dtype.block_bytes() {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.push(if i < 2 {
                [0x00, 0x1c][i]
            } else {
                (s >> 33) as u8
            });
        }
    }
    out
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    // SAFETY: no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    println!("cpu: {}; threads {threads}", strata_kernels::cpu::summary());
    // On the compute pool, as the worker runs its products.
    strata_kernels::pool::install(run);
}

fn run() {
    let shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    for dtype in [BlockType::Q4_1, BlockType::Q4_0, BlockType::Q8_0] {
        let f32_path: Vec<BlockWeight> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                BlockWeight::new(dtype, r, c, blocks(dtype, r, c, i as u64)).unwrap()
            })
            .collect();
        let int8_path: Vec<_> = f32_path
            .iter()
            .map(|w| int8::from_ggml_blocks(dtype, w.rows(), w.cols(), w.data()).unwrap())
            .collect();
        for m in [1usize, 4, 16, 64, 128] {
            let x: Vec<f32> = (0..m * 1536)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let reps = (256 / m).max(4);
            // The best of 7 trials: the machines are shared and noisy.
            let time = |f: &mut dyn FnMut()| {
                f();
                (0..7)
                    .map(|_| {
                        let t = Instant::now();
                        for _ in 0..reps {
                            f();
                        }
                        t.elapsed().as_secs_f64() / reps as f64
                    })
                    .fold(f64::INFINITY, f64::min)
            };
            let a = time(&mut || {
                for w in &f32_path {
                    let mut out = vec![0.0; m * w.rows()];
                    w.matmul(&x[..m * w.cols()], m, &mut out).unwrap();
                }
            });
            let int8 = |precision| {
                let mut q576 = QuantizedActivations::default();
                let mut q1536 = QuantizedActivations::default();
                q576.quantize_from(&x[..m * 576], m, 576, precision)
                    .unwrap();
                q1536
                    .quantize_from(&x[..m * 1536], m, 1536, precision)
                    .unwrap();
                for w in &int8_path {
                    let mut out = vec![0.0; m * w.rows()];
                    let q = if w.cols() == 576 { &q576 } else { &q1536 };
                    w.matmul_quantized(q, &mut out).unwrap();
                }
            };
            let b = time(&mut || int8(Precision::Int8));
            let c = time(&mut || int8(Precision::Int8x2));
            let us = |t: f64| t * 1e6 / m as f64;
            println!(
                "{dtype:?} m={m:>3}: us per row and layer: f32 acts {:>7.1}, int8 {:>7.1}, int8x2 {:>7.1}",
                us(a),
                us(b),
                us(c),
            );
        }
    }
}
