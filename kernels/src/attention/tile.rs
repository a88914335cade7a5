//! Attention tiled over query tokens, for prefill: the tasks of a call, and
//! [`PagedAttention::attend_tile`].
//!
//! In a prefill, every query token reads the same keys and values, up to its own position. A
//! tile of [`TILE_TOKENS`] consecutive tokens widens each run of keys and values to f32 once
//! (into buffers on the stack, which then stay in L1), and every query head of every token of
//! the tile goes over it there. Each query's arithmetic is the one it has alone: its runs are
//! the tile's runs cut at its own position (causal attention from position 0 cuts every query's
//! keys into the same runs), and attention over f16 pools is attention over f32 pools holding
//! the widened values, bit for bit. The tile only saves the widening and the reads.

use super::{HEAD_BATCH, KvElement, PagedAttention, RUN, Run, VectorOps, Work, head_batch};

/// Query tokens per tile.
const TILE_TOKENS: usize = 8;

/// The largest head the tiled kernel takes: its buffers hold a run of keys and one of values
/// (2 · [`RUN`] · 256 floats, 64 KiB). Longer heads go through [`PagedAttention::attend`].
const TILE_HEAD_DIM: usize = 256;

/// One task of a call: what it computes, for which request, and the part of `out` it owns.
pub(super) struct Task<'o> {
    pub(super) request: usize,
    pub(super) work: Work,
    pub(super) out: &'o mut [f32],
}

/// Cuts a call's work into tasks. A request of several tokens without a sliding window is cut
/// into tiles (every head of up to [`TILE_TOKENS`] tokens); any other request into tasks of one
/// token and the query heads that share a KV head (up to [`HEAD_BATCH`]). Which tasks compute
/// an element changes none of its bits. `out` holds every request's output, stacked.
pub(super) fn tasks<'o, T: KvElement>(
    requests: &[PagedAttention<'_, T>],
    mut out: &'o mut [f32],
) -> Vec<Task<'o>> {
    let mut tasks = Vec::new();
    for (request, r) in requests.iter().enumerate() {
        let shape = &r.shape;
        let width = shape.n_heads * shape.head_dim;
        let n_tokens = r.q.len() / width;
        let tiled = n_tokens > 1 && r.window.is_none() && shape.head_dim <= TILE_HEAD_DIM;
        let (step, chunk) = if tiled {
            (TILE_TOKENS, TILE_TOKENS * width)
        } else {
            let batch = head_batch(shape);
            (batch, batch * shape.head_dim)
        };
        let (mine, rest) = std::mem::take(&mut out).split_at_mut(n_tokens * width);
        out = rest;
        for (index, part) in mine.chunks_mut(chunk).enumerate() {
            let work = if tiled {
                Work::Tile {
                    token: index * TILE_TOKENS,
                    tokens: part.len() / width,
                }
            } else {
                let per_token = shape.n_heads / step;
                Work::Heads {
                    token: index / per_token,
                    first_head: index % per_token * step,
                }
            };
            tasks.push(Task {
                request,
                work,
                out: part,
            });
        }
    }
    tasks
}

impl<T: KvElement> PagedAttention<'_, T> {
    /// Attention of every head of tokens `token..token + tokens`, written to `out`
    /// (`[tokens][n_heads][head_dim]`); the request has been validated, has no sliding window,
    /// and its heads are at most [`TILE_HEAD_DIM`] long.
    #[inline(always)]
    pub(super) fn attend_tile<V: VectorOps>(
        &self,
        ops: V,
        token: usize,
        tokens: usize,
        out: &mut [f32],
    ) {
        let shape = &self.shape;
        let (hd, bs) = (shape.head_dim, shape.block_size);
        let group = shape.n_heads / shape.n_kv_heads;
        let batch = head_batch(shape);
        let first = self.pos0 + token;
        let last = first + tokens - 1;
        debug_assert!(self.window.is_none() && hd <= TILE_HEAD_DIM && tokens <= TILE_TOKENS);
        let mut keys = [0.0f32; TILE_HEAD_DIM * RUN];
        let mut values = [0.0f32; RUN * TILE_HEAD_DIM];
        let mut scores = [[0.0f32; RUN]; HEAD_BATCH];

        out.fill(0.0);
        let width = shape.n_heads * hd;
        for first_head in (0..shape.n_heads).step_by(batch) {
            let kv_head = first_head / group;
            // Online-softmax state of each (token, head) of the tile.
            let mut max = [f32::NEG_INFINITY; TILE_TOKENS * HEAD_BATCH];
            let mut denominator = [0.0f32; TILE_TOKENS * HEAD_BATCH];
            let mut pos = 0;
            while pos <= last {
                // The run of the tile's last token; an earlier token's run is its prefix.
                let slot = pos % bs;
                let n = (bs - slot).min(last + 1 - pos).min(RUN);
                let block = self.block_table[pos / bs] as usize;
                let at = shape.head_offset(block, kv_head);
                // The run's keys, `[head_dim][stride]`: a whole block in one piece, as it lies in
                // the pool; a part of one row by row.
                let stride = if n == bs { bs } else { RUN };
                if n == bs {
                    ops.widen(&self.k_pool[at..at + hd * bs], &mut keys[..hd * bs]);
                } else {
                    for (d, row) in keys.chunks_exact_mut(RUN).take(hd).enumerate() {
                        ops.widen(&self.k_pool[at + d * bs + slot..][..n], &mut row[..n]);
                    }
                }
                ops.widen(
                    &self.v_pool[at + slot * hd..][..n * hd],
                    &mut values[..n * hd],
                );
                // The tokens that attend to this run (all but those before `pos`).
                for t in pos.saturating_sub(first)..tokens {
                    let n = n.min(first + t + 1 - pos);
                    let run = Run {
                        keys: &keys[..hd * stride],
                        block_size: stride,
                        slot: 0,
                        values: &values[..n * hd],
                        len: n,
                    };
                    let heads = batch * hd;
                    let q = &self.q[(token + t) * width + first_head * hd..][..heads];
                    let out = &mut out[t * width + first_head * hd..][..heads];
                    let state = t * batch..(t + 1) * batch;
                    let state = (&mut max[state.clone()], &mut denominator[state]);
                    self.online_step(ops, q, &run, state, &mut scores[..batch], out);
                }
                pos += n;
            }
            for t in 0..tokens {
                for h in 0..batch {
                    let out = &mut out[(t * shape.n_heads + first_head + h) * hd..][..hd];
                    ops.scale(out, 1.0 / denominator[t * batch + h]);
                }
            }
        }
    }
}
