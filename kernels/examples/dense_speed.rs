//! Figures, not a test: the f32 dense products of one decoder layer of the default model's shape
//! (hidden 576, intermediate 1536) at several batch sizes, in G multiply-adds per second, and a
//! decode's products over 24 layers' weights read from memory, in GB/s.
//!
//! `cargo run --release -p strata-kernels --example dense_speed [THREADS]`

// A benchmark program over fixed, generated inputs: it prints, and a failure is a bug to see.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use strata_kernels::QuantMatrix;
use strata_kernels::dense::{DenseData, DenseMatrix};

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    // SAFETY: no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    println!("cpu: {}; threads {threads}", strata_kernels::cpu::summary());
    strata_kernels::pool::install(run);
}

fn run() {
    let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)];
    let weights: Vec<DenseMatrix> = shapes
        .iter()
        .map(|&(r, c)| {
            let w = (0..r * c)
                .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
                .collect();
            DenseMatrix::new(r, c, DenseData::F32(w)).unwrap()
        })
        .collect();
    // A decode's products over 24 layers' weights (340 MB of f32): from memory, as in a model.
    let layers: Vec<Vec<DenseMatrix>> = (0..24)
        .map(|l| {
            [
                (576, 576),
                (192, 576),
                (192, 576),
                (576, 576),
                (1536, 576),
                (1536, 576),
                (576, 1536),
            ]
            .iter()
            .map(|&(r, c)| {
                let w = (0..r * c)
                    .map(|i| ((i * 31 + l) % 1013) as f32 / 1013.0)
                    .collect();
                DenseMatrix::new(r, c, DenseData::F32(w)).unwrap()
            })
            .collect()
        })
        .collect();
    let x: Vec<f32> = (0..1536).map(|i| (i % 7) as f32 / 7.0).collect();
    let mut out = vec![0f32; 1536];
    let bytes: usize = layers.iter().flatten().map(|w| w.storage_bytes()).sum();
    for _ in 0..5 {
        let t = Instant::now();
        for w in layers.iter().flatten() {
            w.matmul(&x[..w.cols()], 1, &mut out[..w.rows()]).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "m    1  {} MB of weights from memory: {:6.2} ms  {:5.1} GB/s",
            bytes / 1_000_000,
            s * 1e3,
            bytes as f64 / s / 1e9
        );
    }
    for m in [1usize, 16, 128] {
        let x: Vec<f32> = (0..m * 1536)
            .map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for w in &weights {
            let mut out = vec![0f32; m * w.rows()];
            let x = &x[..m * w.cols()];
            let reps = (2048 / m).max(8);
            w.matmul(x, m, &mut out).unwrap();
            let best = (0..7)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..reps {
                        w.matmul(x, m, &mut out).unwrap();
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min);
            let macs = (m * w.rows() * w.cols()) as f64;
            println!(
                "m {m:4}  {:4} x {:4}: {:8.1} us  {:6.1} GMAC/s",
                w.rows(),
                w.cols(),
                best * 1e6,
                macs / best / 1e9
            );
        }
    }
}
