use super::ops::{Prepared, weights_each};
use super::tile::{RunScores, TILE_ROWS};
use super::*;
use crate::cpu::supported_levels;
use crate::test_util::Rng;

/// A sequence of `len` positions with its K/V written into a pool through a shuffled block
/// table (so that blocks are not contiguous).
struct Fixture {
    shape: AttentionShape,
    k_pool: Vec<f32>,
    v_pool: Vec<f32>,
    block_table: Vec<u32>,
    /// `[pos][kv_head][head_dim]`, for the reference.
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Fixture {
    fn new(shape: AttentionShape, len: usize, rng: &mut Rng) -> Self {
        let blocks = len.div_ceil(shape.block_size) + 3;
        let pool_len = blocks * shape.n_kv_heads * shape.block_size * shape.head_dim;
        // NaN everywhere that is not written: reading it would poison the result.
        let mut k_pool = vec![f32::NAN; pool_len];
        let mut v_pool = vec![f32::NAN; pool_len];
        let mut block_table: Vec<u32> = (0..blocks as u32).collect();
        rng.shuffle(&mut block_table);
        block_table.truncate(len.div_ceil(shape.block_size));
        let kv_len = len * shape.n_kv_heads * shape.head_dim;
        let keys = rng.normal_vec(kv_len, 1.0);
        let values = rng.normal_vec(kv_len, 1.0);
        // Write in two uneven pieces, as prefill followed by decode would.
        let split = len / 3;
        let cut = split * shape.n_kv_heads * shape.head_dim;
        for (pos0, range, n) in [(0, 0..cut, split), (split, cut..kv_len, len - split)] {
            write_kv(
                &shape,
                &mut k_pool,
                &mut v_pool,
                &block_table,
                pos0,
                &keys[range.clone()],
                &values[range],
                n,
            )
            .unwrap();
        }
        Fixture {
            shape,
            k_pool,
            v_pool,
            block_table,
            keys,
            values,
        }
    }

    /// Plain-loop attention in f64.
    fn reference(
        &self,
        q: &[f32],
        n_tokens: usize,
        pos0: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f32> {
        let AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            ..
        } = self.shape;
        let mut out = vec![0.0; q.len()];
        for t in 0..n_tokens {
            let p = pos0 + t;
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            for h in 0..n_heads {
                let kvh = h / (n_heads / n_kv_heads);
                let qh = &q[(t * n_heads + h) * hd..][..hd];
                let scores: Vec<f64> = (lo..=p)
                    .map(|s| {
                        let k = &self.keys[(s * n_kv_heads + kvh) * hd..][..hd];
                        qh.iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..hd {
                    let acc: f64 = (lo..=p)
                        .zip(&weights)
                        .map(|(s, w)| w * f64::from(self.values[(s * n_kv_heads + kvh) * hd + d]))
                        .sum();
                    out[(t * n_heads + h) * hd + d] = (acc / total) as f32;
                }
            }
        }
        out
    }

    fn run(
        &self,
        level: Level,
        q: &[f32],
        n_tokens: usize,
        pos0: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; q.len()];
        let request = PagedAttention {
            shape: self.shape,
            q,
            pos0,
            k_pool: &self.k_pool,
            v_pool: &self.v_pool,
            block_table: &self.block_table,
            scale,
            window,
        };
        request.run_at(level, n_tokens, &mut out).unwrap();
        out
    }
}

fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize, block_size: usize) -> AttentionShape {
    AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        block_size,
    }
}

#[test]
fn matches_reference_at_every_level() {
    let mut rng = Rng::new(21);
    // (shape, sequence length, queries at the end of the sequence, window)
    let cases = [
        (shape(4, 4, 16, 4), 13, 13, None),       // full prefill, MHA
        (shape(8, 2, 64, 16), 40, 40, None),      // GQA, partial last block
        (shape(8, 2, 64, 16), 40, 1, None),       // decode after prefill
        (shape(6, 3, 20, 5), 37, 4, None),        // head_dim with a SIMD tail
        (shape(4, 1, 128, 16), 100, 7, Some(24)), // MQA with a sliding window
        (shape(2, 2, 8, 3), 29, 29, Some(5)),     // window crossing tiny blocks
        (shape(2, 1, 32, 128), 300, 3, None),     // runs longer than RUN within a block
        (shape(2, 1, 264, 16), 35, 3, None),      // values held in registers in two groups
        (shape(4, 2, 48, 16), 33, 9, Some(1)),    // window of one: attends to itself
        (shape(4, 2, 48, 16), 33, 9, Some(1000)), // window longer than the context
        (shape(16, 1, 32, 8), 50, 2, None),       // two batches of 8 heads per KV head
        (shape(24, 2, 16, 4), 21, 5, Some(9)),    // 12 heads per KV head: batches of 6
        (shape(4, 2, 16, 1), 150, 3, None),       // keys in three segments of 64 blocks
        (shape(4, 2, 16, 2), 300, 40, Some(200)), // a window across segments
        (shape(9, 3, 64, 2), 300, 300, None),     // a prefill's tiles across segments
    ];
    for (shape, len, n_tokens, window) in cases {
        let fixture = Fixture::new(shape, len, &mut rng);
        let pos0 = len - n_tokens;
        let q = rng.normal_vec(n_tokens * shape.n_heads * shape.head_dim, 1.0);
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let expected = fixture.reference(&q, n_tokens, pos0, scale, window);
        for level in supported_levels() {
            let out = fixture.run(level, &q, n_tokens, pos0, scale, window);
            for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{shape:?} {level:?} [{i}]: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn large_scores_do_not_overflow() {
    // Scores in the thousands: only max subtraction keeps exp finite.
    let mut rng = Rng::new(22);
    let shape = shape(2, 1, 32, 8);
    let fixture = Fixture::new(shape, 70, &mut rng);
    let q: Vec<f32> = rng
        .normal_vec(2 * 2 * 32, 1.0)
        .iter()
        .map(|v| v * 300.0)
        .collect();
    let expected = fixture.reference(&q, 2, 68, 1.0, None);
    for level in supported_levels() {
        let out = fixture.run(level, &q, 2, 68, 1.0, None);
        assert!(out.iter().all(|v| v.is_finite()));
        for (a, b) in out.iter().zip(&expected) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{level:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn simd_levels_agree_and_threads_do_not_matter() {
    let mut rng = Rng::new(23);
    let shape = shape(8, 2, 128, 16);
    assert_eq!(head_batch(&shape), 4);
    let fixture = Fixture::new(shape, 200, &mut rng);
    let q = rng.normal_vec(50 * 8 * 128, 1.0);
    let scalar = fixture.run(Level::Scalar, &q, 50, 150, 0.09, None);
    let single_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for level in supported_levels() {
        let parallel = fixture.run(level, &q, 50, 150, 0.09, None);
        let serial = single_thread.install(|| fixture.run(level, &q, 50, 150, 0.09, None));
        assert_eq!(parallel, serial, "{level:?}");
        for (a, b) in parallel.iter().zip(&scalar) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{level:?}: {a} vs {b}"
            );
        }
        // A token's output does not depend on the other tokens of the call.
        let last = fixture.run(level, &q[49 * 8 * 128..], 1, 199, 0.09, None);
        assert_eq!(last, parallel[49 * 8 * 128..], "{level:?}");
        // Nor does a head's output depend on the heads it was batched with.
        let request = PagedAttention {
            shape,
            q: &q,
            pos0: 150,
            k_pool: &fixture.k_pool,
            v_pool: &fixture.v_pool,
            block_table: &fixture.block_table,
            scale: 0.09,
            window: None,
        };
        for (index, expected) in parallel.chunks_exact(128).enumerate().step_by(7) {
            let mut alone = vec![0.0; 128];
            let work = Work::Heads {
                token: index / 8,
                first_head: index % 8,
            };
            request.compute_at(level, work, &mut alone);
            assert_eq!(
                alone,
                expected,
                "{level:?} token {} head {}",
                index / 8,
                index % 8
            );
        }
    }
}

#[test]
fn write_kv_places_vectors_by_block_table() {
    let shape = shape(2, 2, 3, 2);
    let mut k_pool = vec![0.0; 3 * 2 * 2 * 3];
    let mut v_pool = k_pool.clone();
    let table = [2, 0];
    // Three tokens at positions 1, 2, 3: block 2 slot 1, block 0 slots 0 and 1.
    let k: Vec<f32> = (0..3 * 2 * 3).map(|i| i as f32 + 1.0).collect();
    let v: Vec<f32> = k.iter().map(|x| -x).collect();
    write_kv(&shape, &mut k_pool, &mut v_pool, &table, 1, &k, &v, 3).unwrap();
    // Values `[block][head][slot][dim]`; keys transposed within each block and head,
    // `[block][head][dim][slot]`.
    let head_at = |block: usize, head: usize| shape.head_offset(block, head);
    for (t, (block, slot)) in [(2, 1), (0, 0), (0, 1)].into_iter().enumerate() {
        for head in 0..2 {
            let src = (t * 2 + head) * 3;
            assert_eq!(
                v_pool[head_at(block, head) + slot * 3..][..3],
                v[src..src + 3]
            );
            for d in 0..3 {
                assert_eq!(k_pool[head_at(block, head) + d * 2 + slot], k[src + d]);
            }
        }
    }
    // Block 2 slot 0 and all of block 1 are untouched.
    for head in 0..2 {
        assert!(v_pool[head_at(2, head)..][..3].iter().all(|&x| x == 0.0));
        assert!((0..3).all(|d| k_pool[head_at(2, head) + d * 2] == 0.0));
    }
    assert!(
        k_pool[head_at(1, 0)..head_at(2, 0)]
            .iter()
            .all(|&x| x == 0.0)
    );
}

#[test]
fn bad_inputs_are_errors() {
    let s = shape(4, 2, 8, 4);
    let block = 2 * 4 * 8;
    let (k_pool, v_pool) = (vec![0.0; 3 * block], vec![0.0; 3 * block]);
    let q = vec![0.0; 2 * 4 * 8];
    let mut out = vec![0.0; q.len()];
    let attend = |shape: &AttentionShape,
                  table: &[u32],
                  pos0: usize,
                  window: Option<usize>,
                  out: &mut [f32]| {
        PagedAttention {
            shape: *shape,
            q: &q,
            pos0,
            k_pool: &k_pool,
            v_pool: &v_pool,
            block_table: table,
            scale: 1.0,
            window,
        }
        .run(2, out)
    };
    assert!(attend(&s, &[0, 1], 6, None, &mut out).is_ok());
    assert_eq!(
        attend(&s, &[0, 1], 7, None, &mut out),
        Err(KernelError::BlockTableTooShort { len: 2, needed: 3 })
    );
    assert_eq!(
        attend(&s, &[0, 3], 6, None, &mut out),
        Err(KernelError::BlockOutOfRange {
            index: 1,
            block: 3,
            num_blocks: 3
        })
    );
    // Blocks that fall out of the window are not read, so they are not checked either.
    assert!(attend(&s, &[u32::MAX, 1], 6, Some(2), &mut out).is_ok());
    assert!(matches!(
        attend(&s, &[0, 1], 6, Some(0), &mut out),
        Err(KernelError::InvalidShape(_))
    ));
    assert!(matches!(
        attend(&s, &[0, 1], usize::MAX, None, &mut out),
        Err(KernelError::InvalidShape(_))
    ));
    assert!(matches!(
        attend(&s, &[0, 1], 6, None, &mut out[1..]),
        Err(KernelError::LengthMismatch { what: "out", .. })
    ));
    for bad in [
        shape(4, 3, 8, 4),
        shape(0, 1, 8, 4),
        shape(4, 2, 0, 4),
        shape(4, 2, 8, 0),
    ] {
        assert!(
            matches!(
                attend(&bad, &[0, 1], 6, None, &mut out),
                Err(KernelError::InvalidShape(_))
            ),
            "{bad:?}"
        );
    }
    let with_pools = |k_pool, v_pool| PagedAttention {
        shape: s,
        q: &q,
        pos0: 0,
        k_pool,
        v_pool,
        block_table: &[0],
        scale: 1.0,
        window: None,
    };
    let short_pool = &k_pool[1..];
    assert!(matches!(
        with_pools(short_pool, short_pool).run(2, &mut out),
        Err(KernelError::InvalidShape(_))
    ));
    assert!(matches!(
        with_pools(&k_pool, &v_pool[block..]).run(2, &mut out),
        Err(KernelError::LengthMismatch { what: "v_pool", .. })
    ));
    let empty = PagedAttention {
        q: &[],
        block_table: &[],
        ..with_pools(&k_pool, &v_pool)
    };
    assert!(empty.run(0, &mut []).is_ok());

    let (mut kp, mut vp) = (k_pool.clone(), v_pool.clone());
    let kv = vec![1.0; 2 * 2 * 8];
    assert!(matches!(
        write_kv(&s, &mut kp, &mut vp, &[0], 3, &kv, &kv, 2),
        Err(KernelError::BlockTableTooShort { len: 1, needed: 2 })
    ));
    assert!(matches!(
        write_kv(&s, &mut kp, &mut vp, &[0], 0, &kv[1..], &kv, 2),
        Err(KernelError::LengthMismatch { what: "k", .. })
    ));
    assert!(matches!(
        write_kv(&s, &mut kp, &mut vp, &[9], 0, &kv, &kv, 2),
        Err(KernelError::BlockOutOfRange { block: 9, .. })
    ));
    assert_eq!(kp, k_pool, "nothing is written on error");
}

#[test]
fn a_batch_of_sequences_gives_each_its_own_result() {
    let s = shape(4, 2, 16, 4);
    let block = s.block_len().unwrap();
    let blocks = 12;
    let mut rng = Rng::new(11);
    let k_pool = rng.normal_vec(blocks * block, 1.0);
    let v_pool = rng.normal_vec(blocks * block, 1.0);
    let width = s.n_heads * s.head_dim;
    // (block table, pos0, tokens)
    let seqs: Vec<(Vec<u32>, usize, usize)> = vec![
        (vec![3, 0, 7], 9, 1),
        (vec![5], 0, 4),
        (vec![1, 2, 4, 6, 8], 13, 6),
    ];
    let qs: Vec<Vec<f32>> = seqs
        .iter()
        .map(|(_, _, n)| rng.normal_vec(n * width, 1.0))
        .collect();
    let requests: Vec<PagedAttention<'_>> = seqs
        .iter()
        .zip(&qs)
        .map(|((table, pos0, _), q)| PagedAttention {
            shape: s,
            q,
            pos0: *pos0,
            k_pool: &k_pool,
            v_pool: &v_pool,
            block_table: table,
            scale: 0.25,
            window: None,
        })
        .collect();
    let total: usize = seqs.iter().map(|(_, _, n)| n * width).sum();
    let mut batched = vec![f32::NAN; total];
    PagedAttention::run_batch(&requests, &mut batched).unwrap();
    let mut at = 0;
    for (r, (_, _, n)) in requests.iter().zip(&seqs) {
        let mut alone = vec![0.0; n * width];
        r.run(*n, &mut alone).unwrap();
        assert_eq!(alone, batched[at..at + n * width]);
        at += n * width;
    }
    // A bad request fails the whole batch and leaves `out` untouched.
    let mut bad = requests.clone();
    bad[1].block_table = &[];
    let mut out = vec![7.0; total];
    assert!(PagedAttention::run_batch(&bad, &mut out).is_err());
    assert!(out.iter().all(|&v| v == 7.0));
    assert!(PagedAttention::<f32>::run_batch(&[], &mut []).is_ok());
}

/// Attention over f16 pools is attention over f32 pools holding the same (rounded) values, bit
/// for bit, at every level, alone and in a batch, with odd head sizes (vector tails) and
/// partial runs; `write_kv` into f16 pools rounds each value to nearest.
#[test]
fn f16_pools_are_f32_pools_of_the_rounded_values() {
    let mut rng = Rng::new(31);
    for (s, len, n_tokens, window) in [
        (shape(8, 2, 64, 16), 70, 5, None),
        (shape(6, 3, 40, 16), 37, 3, Some(9)),
        (shape(4, 4, 19, 8), 23, 23, None),
    ] {
        let fixture = Fixture::new(s, len, &mut rng);
        // Written once as f16, and the same values widened back to f32.
        let blocks = fixture.k_pool.len() / s.block_len().unwrap();
        let mut k16 = vec![f16::from_f32(f32::NAN); blocks * s.block_len().unwrap()];
        let mut v16 = k16.clone();
        write_kv(
            &s,
            &mut k16,
            &mut v16,
            &fixture.block_table,
            0,
            &fixture.keys,
            &fixture.values,
            len,
        )
        .unwrap();
        let widen = |p: &[f16]| p.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let (k32, v32) = (widen(&k16), widen(&v16));
        for (a, b) in k32.iter().zip(&fixture.k_pool) {
            assert!(
                a.to_bits() == f16::from_f32(*b).to_f32().to_bits() || (a.is_nan() && b.is_nan()),
                "{a} is not {b} rounded to f16"
            );
        }
        let pos0 = len - n_tokens;
        let q = rng.normal_vec(n_tokens * s.n_heads * s.head_dim, 1.0);
        let request16 = PagedAttention {
            shape: s,
            q: &q,
            pos0,
            k_pool: &k16,
            v_pool: &v16,
            block_table: &fixture.block_table,
            scale: 0.125,
            window,
        };
        let request32 = PagedAttention {
            shape: s,
            q: &q,
            pos0,
            k_pool: &k32,
            v_pool: &v32,
            block_table: &fixture.block_table,
            scale: 0.125,
            window,
        };
        let reference = fixture.reference(&q, n_tokens, pos0, 0.125, window);
        for level in supported_levels() {
            let mut out16 = vec![f32::NAN; q.len()];
            let mut out32 = vec![f32::NAN; q.len()];
            request16.run_at(level, n_tokens, &mut out16).unwrap();
            request32.run_at(level, n_tokens, &mut out32).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out16), bits(&out32), "{level:?} {s:?}");
            let mut batched = vec![f32::NAN; 2 * q.len()];
            PagedAttention::run_batch_at(level, &[request16, request16], &mut batched).unwrap();
            assert_eq!(bits(&batched[..q.len()]), bits(&out16), "{level:?} batched");
            // f16 keeps about three decimal digits of each key and value.
            for (a, b) in out16.iter().zip(&reference) {
                assert!(
                    (a - b).abs() <= 2e-2 * (1.0 + b.abs()),
                    "{level:?}: {a} vs {b}"
                );
            }
        }
    }
}

/// A prefill's tiles, and a decode's segments of keys computed as separate tasks, give each
/// query token the bits it has alone (one token, the heads of one KV head, in one task:
/// [`PagedAttention::attend`]): at every level, over f32 and f16 pools, for tiles cut short by
/// the end of the call, runs cut by small and large blocks, head sizes with vector tails,
/// calls that start past position 0 (a prefill in chunks), and keys in several segments.
#[test]
fn tiles_of_query_tokens_give_each_token_its_bits_alone() {
    let mut rng = Rng::new(41);
    // (shape, sequence length, query tokens at its end)
    for (s, len, n_tokens) in [
        (shape(9, 3, 64, 16), 77, 77),  // SmolLM2's heads, a partial last tile
        (shape(9, 3, 64, 16), 150, 37), // a later chunk of a prefill
        (shape(8, 2, 20, 5), 41, 19),   // head size with a SIMD tail, blocks shorter than a run
        (shape(4, 4, 16, 128), 300, 9), // runs of RUN within a long block
        (shape(16, 1, 32, 8), 35, 2),   // two batches of 8 heads per KV head, a tile of two
        (shape(2, 1, 264, 16), 20, 10), // heads past the tile's buffers: one token at a time
        (shape(9, 3, 64, 2), 300, 300), // keys in three segments of 64 blocks
        (shape(9, 3, 64, 2), 300, 1),   // a decode: its segments are separate tasks
        (shape(8, 2, 20, 3), 500, 21),  // tiles that cross a segment's end in the middle
    ] {
        let fixture = Fixture::new(s, len, &mut rng);
        let blocks = fixture.k_pool.len() / s.block_len().unwrap();
        let mut k16 = vec![f16::ZERO; blocks * s.block_len().unwrap()];
        let mut v16 = k16.clone();
        let table = &fixture.block_table;
        write_kv(
            &s,
            &mut k16,
            &mut v16,
            table,
            0,
            &fixture.keys,
            &fixture.values,
            len,
        )
        .unwrap();
        let pos0 = len - n_tokens;
        let q = rng.normal_vec(n_tokens * s.n_heads * s.head_dim, 1.0);
        check_tiles_against_tokens_alone(&s, &q, pos0, &fixture.k_pool, &fixture.v_pool, table);
        check_tiles_against_tokens_alone(&s, &q, pos0, &k16, &v16, table);
    }
}

fn check_tiles_against_tokens_alone<T: KvElement>(
    s: &AttentionShape,
    q: &[f32],
    pos0: usize,
    k_pool: &[T],
    v_pool: &[T],
    block_table: &[u32],
) {
    let request = PagedAttention {
        shape: *s,
        q,
        pos0,
        k_pool,
        v_pool,
        block_table,
        scale: 0.125,
        window: None,
    };
    let n_tokens = q.len() / (s.n_heads * s.head_dim);
    let batch = head_batch(s);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for level in supported_levels() {
        let mut tiled = vec![f32::NAN; q.len()];
        request.run_at(level, n_tokens, &mut tiled).unwrap();
        let mut alone = vec![f32::NAN; q.len()];
        for (index, out) in alone.chunks_mut(batch * s.head_dim).enumerate() {
            let work = Work::Heads {
                token: index / (s.n_heads / batch),
                first_head: index % (s.n_heads / batch) * batch,
            };
            request.compute_at(level, work, out);
        }
        assert_eq!(bits(&tiled), bits(&alone), "{level:?} {s:?}");
    }
}

/// A run's maximum and `exp_sum` at `level`: `(maximum, weights, sum)`.
fn run_weights_at(level: Level, scores: &[f32], max: f32) -> (f32, Vec<f32>, f32) {
    fn with<V: VectorOps>(ops: V, scores: &[f32], max: f32) -> (f32, Vec<f32>, f32) {
        let mut weights = scores.to_vec();
        let sum = ops.exp_sum(&mut weights, max);
        (ops.max(scores), weights, sum)
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512(simd) => with(simd, scores, max),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(simd) => with(simd, scores, max),
        Level::Scalar => with(Portable, scores, max),
    }
}

#[test]
fn run_weights_and_their_sum_are_the_same_bits_at_every_level() {
    let mut rng = Rng::new(31);
    for n in 1..=RUN {
        let mut scores = rng.normal_vec(n, 6.0);
        if n % 5 == 0 {
            // A masked slot (a sliding window's) and one far below the others.
            scores[n / 2] = f32::NEG_INFINITY;
            scores[n - 1] = -200.0;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // The order `exp_sum` promises: slot after slot.
        let weights: Vec<f32> = scores.iter().map(|&s| math::exp(s - max)).collect();
        let mut sum = 0.0f32;
        for &w in &weights {
            sum += w;
        }
        for level in supported_levels() {
            let (got_max, got_weights, got_sum) = run_weights_at(level, &scores, max);
            assert_eq!(got_max.to_bits(), max.to_bits(), "{level:?}, {n} slots");
            assert_eq!(got_weights, weights, "{level:?}, {n} slots");
            assert_eq!(got_sum.to_bits(), sum.to_bits(), "{level:?}, {n} slots");
        }
    }
}

/// [`VectorOps::tile_weights`] at `level`, over a run of `n` slots (`scores`, in rows, replaced
/// by the weights) laid out as the level takes a tile's runs of keys `stride` slots apart.
#[allow(clippy::too_many_arguments)]
fn tile_weights_at(
    level: Level,
    scores: &mut [[f32; RUN]],
    (n, stride): (usize, usize),
    rows: std::ops::Range<usize>,
    lens: &[usize],
    state: (&mut [f32], &mut [f32]),
    factors: &mut [f32],
) {
    fn with<V: VectorOps>(
        ops: V,
        scores: &mut [[f32; RUN]],
        (n, stride): (usize, usize),
        rows: std::ops::Range<usize>,
        lens: &[usize],
        state: (&mut [f32], &mut [f32]),
        factors: &mut [f32],
    ) {
        let mut run = RunScores::new(ops.tile_in_columns(64, stride));
        for (r, row) in scores.iter().enumerate() {
            for (j, &score) in row.iter().enumerate().take(n) {
                run.set(r, j, score);
            }
        }
        ops.tile_weights(&mut run, n, rows, lens, state, factors);
        for (r, row) in scores.iter_mut().enumerate() {
            for (j, weight) in row.iter_mut().enumerate().take(n) {
                *weight = run.get(r, j);
            }
        }
    }
    let shape = (n, stride);
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512(simd) => with(simd, scores, shape, rows, lens, state, factors),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(simd) => with(simd, scores, shape, rows, lens, state, factors),
        Level::Scalar => with(Portable, scores, shape, rows, lens, state, factors),
    }
}

/// The weights of a tile's rows taken together (at AVX-512, in columns: 16 rows in the lanes
/// at a time) are each row's weights alone, bit for bit: the weights themselves, the new
/// maximum and denominator, and the factor of the row's output; the rows outside the range
/// keep their state. Rows of every length of a run, on a first run (maximum −∞), on runs that
/// raise the maximum and on runs that do not, ranges that start inside a group of 16, and runs
/// longer than 16 slots (which AVX-512 takes in rows).
#[test]
fn weights_of_rows_together_are_each_row_alone() {
    let mut rng = Rng::new(7);
    for (rows, start, slots) in [
        (1, 0, 16),
        (5, 0, 16),
        (16, 0, 16),
        (23, 0, 16),
        (48, 0, 16),
        (48, 21, 16),
        (128, 37, 16),
        (30, 3, 11),
        (20, 0, 32),
    ] {
        let mut scores = vec![[0.0f32; RUN]; TILE_ROWS];
        for row in &mut scores {
            row[..slots].copy_from_slice(&rng.normal_vec(slots, 3.0));
        }
        // Runs of up to 16 slots are a block of 16's (or a part of one); longer ones a part
        // of a longer block.
        let stride = slots.max(16);
        let lens: Vec<usize> = (0..TILE_ROWS)
            .map(|_| 1 + (rng.uniform() * slots as f32) as usize % slots)
            .map(|len| if rows == 16 { slots } else { len })
            .collect();
        let max: Vec<f32> = (0..TILE_ROWS)
            .map(|r| match r % 3 {
                0 => f32::NEG_INFINITY,
                1 => 10.0 + rng.uniform(),
                _ => rng.uniform() - 0.5,
            })
            .collect();
        let denominator: Vec<f32> = max
            .iter()
            .map(|m| {
                if m.is_finite() {
                    1.0 + rng.uniform()
                } else {
                    0.0
                }
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Each row alone, from the portable kernel.
        let mut want = scores.clone();
        let (mut want_max, mut want_den) = (max.clone(), denominator.clone());
        let mut want_factors = vec![0.0f32; TILE_ROWS];
        let range = start..rows;
        weights_each(
            Portable,
            &mut want[range.clone()],
            &lens[range.clone()],
            (&mut want_max[range.clone()], &mut want_den[range.clone()]),
            &mut want_factors[range.clone()],
        );
        for level in supported_levels() {
            let mut got = scores.clone();
            let (mut got_max, mut got_den) = (max.clone(), denominator.clone());
            let mut got_factors = vec![0.0f32; TILE_ROWS];
            let state = (&mut got_max[..], &mut got_den[..]);
            let shape = (slots, stride);
            tile_weights_at(
                level,
                &mut got,
                shape,
                range.clone(),
                &lens,
                state,
                &mut got_factors,
            );
            for r in range.clone() {
                let len = lens[r];
                assert_eq!(
                    bits(&got[r][..len]),
                    bits(&want[r][..len]),
                    "{level:?}: weights of row {r} of {range:?} (length {len})"
                );
            }
            assert_eq!(bits(&got_max), bits(&want_max), "{level:?}: maxima");
            assert_eq!(bits(&got_den), bits(&want_den), "{level:?}: denominators");
            assert_eq!(
                bits(&got_factors[range.clone()]),
                bits(&want_factors[range.clone()]),
                "{level:?}: factors"
            );
        }
    }
}

/// A run's scores for the rows `rows` of a tile (`q`, `[rows][hd]`), taken together as the
/// level takes a tile's, and each row's scores alone, at `ops`' level: `(together, alone)`,
/// each `[r][j]` for row `r` of `rows`.
fn tile_scores_and_alone<V: VectorOps>(
    ops: V,
    q: &[f32],
    hd: usize,
    (keys, stride, n): (&[f32], usize, usize),
    rows: std::ops::Range<usize>,
) -> (Vec<Vec<f32>>, Vec<[f32; RUN]>) {
    let mut prepared = Prepared::default();
    ops.prepare_queries(q, hd, stride, &mut prepared);
    let mut scores = RunScores::new(ops.tile_in_columns(hd, stride));
    let run = (keys, stride, n);
    ops.tile_scores(
        prepared.as_slice(),
        hd,
        run,
        0.125,
        rows.clone(),
        &mut scores,
    );
    let together = rows
        .clone()
        .map(|r| (0..n).map(|j| scores.get(r, j)).collect())
        .collect();
    let run = Run {
        keys,
        block_size: stride,
        slot: 0,
        values: &[],
        len: n,
    };
    let alone = rows
        .map(|r| {
            let mut one = [[f32::NAN; RUN]];
            ops.scores(&q[r * hd..(r + 1) * hd], &run, 0.125, &mut one);
            one[0]
        })
        .collect();
    (together, alone)
}

/// A run's scores computed for many rows at once (at AVX-512, in columns) give each row's
/// scores alone, bit for bit: head sizes with (32, 64, 128) and without (20) a sized kernel, whole blocks of 16,
/// parts of one, an odd number of slots, other block sizes, and ranges of rows that start
/// inside a group of 16.
#[test]
fn scores_in_columns_are_each_row_alone() {
    let mut rng = Rng::new(8);
    for hd in [20, 32, 64, 128] {
        for (rows, start) in [
            (1, 0),
            (2, 0),
            (3, 0),
            (7, 2),
            (48, 0),
            (48, 17),
            (128, 100),
        ] {
            for (stride, n) in [(16, 16), (16, 11), (16, 1), (5, 5), (32, 27)] {
                let q = rng.normal_vec(rows * hd, 1.0);
                let keys = rng.normal_vec(hd * stride, 1.0);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for level in supported_levels() {
                    let (together, alone) = match level {
                        #[cfg(target_arch = "x86_64")]
                        Level::Avx512(simd) => {
                            tile_scores_and_alone(simd, &q, hd, (&keys, stride, n), start..rows)
                        }
                        #[cfg(target_arch = "x86_64")]
                        Level::Avx2(simd) => {
                            tile_scores_and_alone(simd, &q, hd, (&keys, stride, n), start..rows)
                        }
                        Level::Scalar => {
                            tile_scores_and_alone(Portable, &q, hd, (&keys, stride, n), start..rows)
                        }
                    };
                    for ((r, together), alone) in (start..rows).zip(&together).zip(&alone) {
                        assert_eq!(
                            bits(together),
                            bits(&alone[..n]),
                            "{level:?}: row {r} of {start}..{rows} ({hd} dims), {n} slots of {stride}"
                        );
                    }
                }
            }
        }
    }
}
