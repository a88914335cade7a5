//! Figures, not a test: time of one decode step's attention for a batch of sequences over the
//! paged f16 KV cache of every layer of the default model's shape (9 query heads, 3 KV heads of
//! 64, blocks of 16 positions, 30 layers), and the rate at which it reads the cache.
//!
//! `cargo run --release -p strata-kernels --example attention_speed [SEQUENCES] [CONTEXT] [LAYERS]`
//! (defaults 16, 256 and 30; `REPS` steps a round, 20 by default, best of 5 rounds). With
//! `TOKENS=N`, each sequence attends its last `N` positions at once, as a prefill does (`TOKENS`
//! equal to `CONTEXT`: a whole prompt's attention), and the rate of multiply-adds is shown.

// A benchmark program over fixed, generated inputs: it prints, and a failure is a bug to see.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use half::f16;
use strata_kernels::attention::{AttentionShape, PagedAttention};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().unwrap());
    let seqs = args.next().unwrap_or(16);
    let ctx = args.next().unwrap_or(256);
    let layers = args.next().unwrap_or(30);
    let bs = 16;
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        block_size: bs,
    };
    let per_seq = ctx.div_ceil(bs);
    // Blocks handed out as a server does: each prompt's first half in one piece, then the
    // sequences' later blocks interleaved as they grow together.
    let prompt = per_seq / 2;
    let mut tables = vec![Vec::new(); seqs];
    let mut next = 0u32;
    for table in &mut tables {
        for _ in 0..prompt {
            table.push(next);
            next += 1;
        }
    }
    for _ in prompt..per_seq {
        for table in &mut tables {
            table.push(next);
            next += 1;
        }
    }
    let block_len = shape.n_kv_heads * bs * shape.head_dim;
    let pool_len = next as usize * block_len;
    let mut s = 1u64;
    let mut value = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
    };
    let pools: Vec<(Vec<f16>, Vec<f16>)> = (0..layers)
        .map(|_| {
            (
                (0..pool_len).map(|_| value()).collect(),
                (0..pool_len).map(|_| value()).collect(),
            )
        })
        .collect();
    let tokens = std::env::var("TOKENS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, ctx);
    let width = shape.n_heads * shape.head_dim;
    let q: Vec<f32> = (0..seqs * tokens * width)
        .map(|i| ((i % 13) as f32 - 6.0) / 8.0)
        .collect();
    let mut out = vec![0.0f32; seqs * tokens * width];
    let step = |out: &mut [f32]| {
        for (k_pool, v_pool) in &pools {
            let requests: Vec<PagedAttention<'_, f16>> = tables
                .iter()
                .enumerate()
                .map(|(i, table)| PagedAttention {
                    shape,
                    q: &q[i * tokens * width..][..tokens * width],
                    pos0: ctx - tokens,
                    k_pool,
                    v_pool,
                    block_table: table,
                    scale: 0.125,
                    window: None,
                })
                .collect();
            PagedAttention::run_batch(&requests, out).unwrap();
        }
    };
    let reps = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    // On a thread of the compute pool, as a step runs, so that a call's tasks are shared out
    // without the thread switches of a call from outside it.
    let best = strata_kernels::pool::install(|| {
        step(&mut out);
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                step(&mut out);
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        best
    });
    let bytes = (layers * seqs * ctx * 2 * shape.n_kv_heads * shape.head_dim * 2) as f64;
    // Each query token at position p: p + 1 scores and weighted values per head.
    let keys: usize = (ctx - tokens..ctx).map(|p| p + 1).sum();
    let macs = (layers * seqs * keys * shape.n_heads * shape.head_dim * 2) as f64;
    println!(
        "{seqs} sequences at {ctx} positions, {tokens} query tokens each, {layers} layers: {:7.3} ms a step, cache read at {:5.1} GB/s, {:5.1} GMAC/s ({} threads)",
        best * 1e3,
        bytes / best / 1e9,
        macs / best / 1e9,
        strata_kernels::pool::threads()
    );
}
