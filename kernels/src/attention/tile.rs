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

use super::ops::Prepared;
use super::{
    HEAD_BATCH, KvElement, PagedAttention, RUN, VectorOps, Work, fold_segment, head_batch,
};

/// Query tokens per tile: each widened run serves 16 tokens' heads (48 rows for SmolLM2's three
/// query heads per KV head), 7% faster on a 4,000-token prompt's attention than 8. 32 (with
/// the scores in columns) made that attention 2% to 4% faster again, but prompts of 128 and
/// 512 tokens 4% and 2% slower end to end (fewer tiles to share among the threads).
const TILE_TOKENS: usize = 16;

/// Rows of a tile: a row per query head of each of its tokens.
pub(super) const TILE_ROWS: usize = TILE_TOKENS * HEAD_BATCH;

/// One slot's scores (or weights) for every row of a tile.
pub(super) type Column = [f32; TILE_ROWS];

/// A run's scores, then its weights, for every row of a tile (up to [`RUN`] slots each), laid
/// out as the level's tile primitives take them ([`VectorOps::tile_in_columns`]): in columns,
/// `[slot][row]`, a vector then holding one slot of 16 rows, whose online-softmax chains run
/// side by side in its lanes; or in rows, `[row][slot]`, for the levels that go through their
/// row primitives.
#[repr(C, align(64))]
pub(super) struct RunScores {
    values: [f32; RUN * TILE_ROWS],
    columns: bool,
}

impl RunScores {
    pub(super) fn new(columns: bool) -> Self {
        RunScores {
            values: [0.0; RUN * TILE_ROWS],
            columns,
        }
    }

    /// Whether the scores lie in columns.
    pub(super) fn in_columns(&self) -> bool {
        self.columns
    }

    /// The scores as [`RUN`] columns.
    pub(super) fn columns(&self) -> &[Column] {
        self.values.as_chunks::<TILE_ROWS>().0
    }

    pub(super) fn columns_mut(&mut self) -> &mut [Column] {
        self.values.as_chunks_mut::<TILE_ROWS>().0
    }

    /// The scores as [`TILE_ROWS`] rows.
    pub(super) fn rows(&self) -> &[[f32; RUN]] {
        self.values.as_chunks::<RUN>().0
    }

    pub(super) fn rows_mut(&mut self) -> &mut [[f32; RUN]] {
        self.values.as_chunks_mut::<RUN>().0
    }

    /// Row `r`'s score of slot `j`, in either layout.
    #[cfg(test)]
    pub(super) fn get(&self, r: usize, j: usize) -> f32 {
        if self.columns {
            self.columns()[j][r]
        } else {
            self.rows()[r][j]
        }
    }

    /// Sets row `r`'s score of slot `j`, in either layout.
    #[cfg(test)]
    pub(super) fn set(&mut self, r: usize, j: usize, value: f32) {
        if self.columns {
            self.columns_mut()[j][r] = value;
        } else {
            self.rows_mut()[r][j] = value;
        }
    }
}

/// A buffer that starts on a cache line, so that none of its 64-byte vectors straddles two.
#[repr(C, align(64))]
struct Line64<T>(T);

/// The largest head the tiled kernel takes: its buffers hold a run of keys and one of values
/// (2 · [`RUN`] · 256 floats, 64 KiB). Longer heads go through [`PagedAttention::attend`].
const TILE_HEAD_DIM: usize = 256;

/// One task of a call: what it computes, for which request, and the part of `out` (or, for a
/// segment of keys, of the partial states) it owns.
pub(super) struct Task<'a> {
    pub(super) request: usize,
    pub(super) work: Work,
    pub(super) out: &'a mut [f32],
}

/// A token's group of heads whose segments of keys were separate tasks ([`Work::Segment`]):
/// where their partial states lie, one after another, and the token's place in `out`, which
/// [`merge`] fills once they are done.
pub(super) struct Merge<'o> {
    at: usize,
    segments: usize,
    out: &'o mut [f32],
}

/// Floats of one segment's partial state for `batch` heads: the unnormalized outputs, then the
/// maxima, then the denominators.
fn partial_len(batch: usize, hd: usize) -> usize {
    batch * hd + 2 * batch
}

/// Whether a request goes in tiles of tokens (several tokens, no sliding window, heads that
/// fit the tile's buffers); otherwise a task takes one token and a group of heads.
fn tiled<T: KvElement>(r: &PagedAttention<'_, T>, n_tokens: usize) -> bool {
    n_tokens > 1 && r.window.is_none() && r.shape.head_dim <= TILE_HEAD_DIM
}

/// The floats the partial states of a call's segment tasks take ([`tasks`]).
pub(super) fn partials_len<T: KvElement>(requests: &[PagedAttention<'_, T>]) -> usize {
    let mut len = 0;
    for r in requests {
        let shape = &r.shape;
        let n_tokens = r.q.len() / (shape.n_heads * shape.head_dim);
        if tiled(r, n_tokens) {
            continue;
        }
        let batch = head_batch(shape);
        for token in 0..n_tokens {
            let segments = r.segments(token).count();
            if segments > 1 {
                len += shape.n_heads / batch * segments * partial_len(batch, shape.head_dim);
            }
        }
    }
    len
}

/// Cuts a call's work into tasks. A request of several tokens without a sliding window is cut
/// into tiles (every head of up to [`TILE_TOKENS`] tokens); any other request into tasks of one
/// token and the query heads that share a KV head (up to [`HEAD_BATCH`]), and where that
/// token's keys span several segments, one task per segment, writing to `partials`
/// ([`partials_len`] floats), and a [`Merge`] for after them. Which tasks compute an element
/// changes none of its bits. `out` holds every request's output, stacked.
pub(super) fn tasks<'o, 'p, 't, T: KvElement>(
    requests: &[PagedAttention<'_, T>],
    mut out: &'o mut [f32],
    mut partials: &'p mut [f32],
) -> (Vec<Task<'t>>, Vec<Merge<'o>>)
where
    'o: 't,
    'p: 't,
{
    let (mut tasks, mut merges) = (Vec::new(), Vec::new());
    let mut at = 0;
    for (request, r) in requests.iter().enumerate() {
        let shape = &r.shape;
        let width = shape.n_heads * shape.head_dim;
        let n_tokens = r.q.len() / width;
        let (mine, rest) = std::mem::take(&mut out).split_at_mut(n_tokens * width);
        out = rest;
        if tiled(r, n_tokens) {
            for (index, part) in mine.chunks_mut(TILE_TOKENS * width).enumerate() {
                let work = Work::Tile {
                    token: index * TILE_TOKENS,
                    tokens: part.len() / width,
                };
                tasks.push(Task {
                    request,
                    work,
                    out: part,
                });
            }
            continue;
        }
        let batch = head_batch(shape);
        let per_token = shape.n_heads / batch;
        for (index, part) in mine.chunks_mut(batch * shape.head_dim).enumerate() {
            let (token, first_head) = (index / per_token, index % per_token * batch);
            let segments = r.segments(token).count();
            if segments <= 1 {
                let work = Work::Heads { token, first_head };
                tasks.push(Task {
                    request,
                    work,
                    out: part,
                });
                continue;
            }
            merges.push(Merge {
                at,
                segments,
                out: part,
            });
            for segment in 0..segments {
                let len = partial_len(batch, shape.head_dim);
                let (slot, rest) = std::mem::take(&mut partials).split_at_mut(len);
                partials = rest;
                at += len;
                let work = Work::Segment {
                    token,
                    first_head,
                    segment,
                };
                tasks.push(Task {
                    request,
                    work,
                    out: slot,
                });
            }
        }
    }
    (tasks, merges)
}

/// Fills a merge's place in `out` from its segments' partial states: the first one's state,
/// the others merged into it in order ([`merge_segment`](super::merge_segment)), then
/// normalized, as [`PagedAttention::attend`] does in one task.
pub(super) fn merge(m: Merge<'_>, partials: &[f32], hd: usize) {
    let batch = m.out.len() / hd;
    let len = partial_len(batch, hd);
    let mut max = [f32::NEG_INFINITY; HEAD_BATCH];
    let mut denominator = [0.0f32; HEAD_BATCH];
    let (max, denominator) = (&mut max[..batch], &mut denominator[..batch]);
    let parts = partials[m.at..].chunks_exact(len).take(m.segments);
    for (index, part) in parts.enumerate() {
        let (part_out, state) = part.split_at(batch * hd);
        let (part_max, part_denominator) = state.split_at(batch);
        let state = (&mut *m.out, &mut *max, &mut *denominator);
        fold_segment(
            index == 0,
            hd,
            state,
            (part_out, part_max, part_denominator),
        );
    }
    for (out, denominator) in m.out.chunks_exact_mut(hd).zip(denominator.iter()) {
        let inverse = 1.0 / denominator;
        out.iter_mut().for_each(|o| *o *= inverse);
    }
}

impl<T: KvElement> PagedAttention<'_, T> {
    /// Segment `segment` of the keys of the heads from `first_head` of token `token`, into
    /// `out`: the partial state ([`partial_len`]) that [`merge`] folds with the others.
    #[inline(always)]
    pub(super) fn attend_segment<V: VectorOps>(
        &self,
        ops: V,
        (token, first_head, segment): (usize, usize, usize),
        out: &mut [f32],
    ) {
        let hd = self.shape.head_dim;
        let batch = out.len() / (hd + 2);
        let (part, state) = out.split_at_mut(batch * hd);
        let (max, denominator) = state.split_at_mut(batch);
        if let Some(positions) = self.segments(token).nth(segment) {
            self.attend_keys(ops, token, first_head, positions, part, (max, denominator));
        }
    }

    /// Attention of every head of tokens `token..token + tokens`, written to `out`
    /// (`[tokens][n_heads][head_dim]`); the request has been validated, has no sliding window,
    /// and its heads are at most [`TILE_HEAD_DIM`] long.
    ///
    /// For each group of heads sharing a KV head, the tile's queries and outputs of that group
    /// lie together, row `t · batch + h` for head `h` of token `t`, so that each step over a run
    /// goes through all of them in three passes: the scores of every row, then each row's
    /// weights, then the weighted values. The rows are independent chains side by side, where
    /// one token at a time would wait on its own chain; each row's arithmetic is the one
    /// [`PagedAttention::online_step`] gives its token alone.
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
        let mut keys = Line64([0.0f32; TILE_HEAD_DIM * RUN]);
        let mut values = Line64([0.0f32; RUN * TILE_HEAD_DIM]);
        let (keys, values) = (&mut keys.0, &mut values.0);
        let rows = tokens * batch;
        let mut qs = vec![0.0f32; rows * hd];
        let mut prepared = Prepared::default();
        let mut state = TileRows::new(first, tokens, batch, hd);
        // Runs of keys, widened: `[head_dim][stride]`, a whole block as it lies in the pool, a
        // part of one in rows as long as a block (at most `RUN`), the slots past it unused.
        let stride = bs.min(RUN);
        // The scores of a run, and of the second run of a pair.
        let columns = ops.tile_in_columns(hd, stride);
        let (mut scores, mut scores_b) = (RunScores::new(columns), RunScores::new(columns));

        let width = shape.n_heads * hd;
        let segment = shape.segment_len();
        // Past the end of a segment of keys, the merged state of each (token, head) of the
        // group over the segments before (outputs `[token][head][head_dim]`).
        let mut merged: Option<Merged> = None;
        for first_head in (0..shape.n_heads).step_by(batch) {
            let kv_head = first_head / group;
            for (t, q) in qs.chunks_exact_mut(batch * hd).enumerate() {
                q.copy_from_slice(&self.q[(token + t) * width + first_head * hd..][..batch * hd]);
            }
            ops.prepare_queries(&qs, hd, stride, &mut prepared);
            state.reset();
            let mut started = [false; TILE_TOKENS];
            let mut pos = 0;
            while pos <= last {
                if pos > 0 && pos.is_multiple_of(segment) {
                    // A segment ends: the tokens that go on past it fold it into their merged
                    // state, then start the next one afresh.
                    let merged = merged.get_or_insert_with(|| Merged::new(rows * hd));
                    let passing = started.iter_mut().enumerate().take(tokens);
                    for (t, started) in passing.skip(pos.saturating_sub(first)) {
                        merged.fold(t, batch, hd, *started, state.token(t));
                        *started = true;
                    }
                }
                // The run of the tile's last token; an earlier token's run is its prefix. Every
                // row's scores are taken over the whole run, from the first row whose token
                // attends to it: the scores of a slot do not depend on the others.
                let slot = pos % bs;
                let n = (bs - slot).min(last + 1 - pos).min(RUN);
                let at = shape.head_offset(self.block_table[pos / bs] as usize, kv_head);
                let live = pos.saturating_sub(first) * batch..rows;
                let next = pos + bs;
                let pair = slot == 0 && n == bs && 2 * bs <= RUN && next + bs <= last + 1;
                if pair && !next.is_multiple_of(segment) {
                    // Two whole blocks of one segment: the scores of each, then one step over
                    // both.
                    let at_b = shape.head_offset(self.block_table[next / bs] as usize, kv_head);
                    let (keys_a, keys_b) = keys[..2 * hd * bs].split_at_mut(hd * bs);
                    ops.widen(&self.k_pool[at..at + hd * bs], keys_a);
                    ops.widen(&self.k_pool[at_b..at_b + hd * bs], keys_b);
                    let (values_a, values_b) = values[..2 * bs * hd].split_at_mut(bs * hd);
                    ops.widen(&self.v_pool[at..at + bs * hd], values_a);
                    ops.widen(&self.v_pool[at_b..at_b + bs * hd], values_b);
                    let q = prepared.as_slice();
                    let scale = self.scale;
                    ops.tile_scores(q, hd, (keys_a, bs, bs), scale, live.clone(), &mut scores);
                    ops.tile_scores(q, hd, (keys_b, bs, bs), scale, live, &mut scores_b);
                    let values = [&*values_a, &*values_b];
                    state.step_pair(ops, pos, bs, [&mut scores, &mut scores_b], values);
                    pos += 2 * bs;
                    continue;
                }
                if n == bs {
                    ops.widen(&self.k_pool[at..at + hd * bs], &mut keys[..hd * bs]);
                } else {
                    for (d, row) in keys.chunks_exact_mut(stride).take(hd).enumerate() {
                        ops.widen(&self.k_pool[at + d * bs + slot..][..n], &mut row[..n]);
                    }
                }
                ops.widen(
                    &self.v_pool[at + slot * hd..][..n * hd],
                    &mut values[..n * hd],
                );
                let run = (&keys[..hd * stride], stride, n);
                ops.tile_scores(prepared.as_slice(), hd, run, self.scale, live, &mut scores);
                state.step(ops, pos, n, &mut scores, &values[..n * hd]);
                pos += n;
            }
            for (t, started) in started.iter().enumerate().take(tokens) {
                let (row, max, denominator) = state.token(t);
                let (row, denominator) = match (&mut merged, started) {
                    (Some(merged), true) => merged.finish(t, batch, hd, (row, max, denominator)),
                    _ => (row, &*denominator),
                };
                for (row, denominator) in row.chunks_exact_mut(hd).zip(denominator) {
                    ops.scale(row, 1.0 / denominator);
                }
                out[t * width + first_head * hd..][..batch * hd].copy_from_slice(row);
            }
        }
    }
}

/// The rows of a tile for one group of heads, row `t · batch + h` for head `h` of token `t`:
/// their outputs, their online-softmax state in the current segment, and, for the current
/// run, each row's length of it and the factor of its output.
struct TileRows {
    first: usize,
    tokens: usize,
    batch: usize,
    hd: usize,
    outs: Vec<f32>,
    max: [f32; TILE_ROWS],
    denominator: [f32; TILE_ROWS],
    lens: [usize; TILE_ROWS],
    /// Per row, the factors of its output for the current run (and the second of a pair).
    factors: [[f32; TILE_ROWS]; 2],
}

impl TileRows {
    /// The rows of `tokens` tokens from position `first`, `batch` heads of `hd` each.
    fn new(first: usize, tokens: usize, batch: usize, hd: usize) -> Self {
        TileRows {
            first,
            tokens,
            batch,
            hd,
            outs: vec![0.0; tokens * batch * hd],
            max: [f32::NEG_INFINITY; TILE_ROWS],
            denominator: [0.0; TILE_ROWS],
            lens: [0; TILE_ROWS],
            factors: [[1.0; TILE_ROWS]; 2],
        }
    }

    /// A fresh state, for the next group of heads.
    fn reset(&mut self) {
        self.outs.fill(0.0);
        self.max.fill(f32::NEG_INFINITY);
        self.denominator.fill(0.0);
    }

    /// Token `t`'s heads: their outputs, maxima and denominators.
    fn token(&mut self, t: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let heads = t * self.batch..(t + 1) * self.batch;
        (
            &mut self.outs[heads.start * self.hd..heads.end * self.hd],
            &mut self.max[heads.clone()],
            &mut self.denominator[heads],
        )
    }

    /// One online-softmax step ([`PagedAttention::online_step`]) of every row whose token
    /// attends to the run of `n` slots at `pos`, over its part of the run (up to the token's
    /// own position): `scores` hold the run's scores, `values` its values. The
    /// weights of every row, then the weighted values: the tokens that stop inside the run one
    /// by one, the others together.
    #[inline(always)]
    fn step<V: VectorOps>(
        &mut self,
        ops: V,
        pos: usize,
        n: usize,
        scores: &mut RunScores,
        values: &[f32],
    ) {
        let (from, whole) = self.weights(ops, 0, pos, n, scores);
        self.apply_each(ops, 0, (pos, n), from..whole, scores, values);
        let (rows, hd) = (whole * self.batch..self.tokens * self.batch, self.hd);
        ops.tile_scale_accumulate(
            &mut self.outs[rows.start * hd..rows.end * hd],
            rows,
            [&self.factors[0]],
            [scores],
            [&values[..n * hd]],
        );
    }

    /// [`TileRows::step`] over two whole blocks of `bs` slots from `pos` (the second ending at
    /// or before the tile's last token), their scores `scores[b]` and values `values[b]`: the
    /// weights of both, then the rows that attend to both whole go through both runs in one
    /// pass ([`VectorOps::tile_scale_accumulate`]), the others run by run. Each row's
    /// operations, and their order, are those of the two steps one after the other.
    #[inline(always)]
    fn step_pair<V: VectorOps>(
        &mut self,
        ops: V,
        pos: usize,
        bs: usize,
        [scores_a, scores_b]: [&mut RunScores; 2],
        [values_a, values_b]: [&[f32]; 2],
    ) {
        let (from_a, _) = self.weights(ops, 0, pos, bs, scores_a);
        let (from_b, whole) = self.weights(ops, 1, pos + bs, bs, scores_b);
        self.apply_each(ops, 0, (pos, bs), from_a..whole, scores_a, values_a);
        self.apply_each(ops, 1, (pos + bs, bs), from_b..whole, scores_b, values_b);
        let (rows, hd) = (whole * self.batch..self.tokens * self.batch, self.hd);
        let [factors_a, factors_b] = &self.factors;
        ops.tile_scale_accumulate(
            &mut self.outs[rows.start * hd..rows.end * hd],
            rows,
            [factors_a, factors_b],
            [scores_a, scores_b],
            [values_a, values_b],
        );
    }

    /// The weights of every row whose token attends to the run of `n` slots at `pos` (each
    /// over its part of the run; `scores`, the run's scores, replaced by them), its state
    /// updated and its factor in `self.factors[which]`. Returns the first token that attends
    /// to the run and the first that attends to all of it.
    #[inline(always)]
    fn weights<V: VectorOps>(
        &mut self,
        ops: V,
        which: usize,
        pos: usize,
        n: usize,
        scores: &mut RunScores,
    ) -> (usize, usize) {
        let (first, batch) = (self.first, self.batch);
        let from = pos.saturating_sub(first);
        let whole = (pos + n - 1).saturating_sub(first).max(from);
        for t in from..self.tokens {
            self.lens[t * batch..(t + 1) * batch].fill(n.min(first + t + 1 - pos));
        }
        let live = from * batch..self.tokens * batch;
        let state = (&mut self.max[..], &mut self.denominator[..]);
        ops.tile_weights(scores, n, live, &self.lens, state, &mut self.factors[which]);
        (from, whole)
    }

    /// The rescaling and weighted values of the run of `n` slots at `pos` (its weights in
    /// `scores`) for the rows of `tokens`, token by token, each over its part of the run
    /// (factors in `self.factors[which]`).
    #[inline(always)]
    fn apply_each<V: VectorOps>(
        &mut self,
        ops: V,
        which: usize,
        (pos, n): (usize, usize),
        tokens: std::ops::Range<usize>,
        scores: &RunScores,
        values: &[f32],
    ) {
        let (batch, hd) = (self.batch, self.hd);
        for t in tokens {
            let len = n.min(self.first + t + 1 - pos);
            let heads = t * batch..(t + 1) * batch;
            ops.tile_scale_accumulate(
                &mut self.outs[heads.start * hd..heads.end * hd],
                heads,
                [&self.factors[which]],
                [scores],
                [&values[..len * hd]],
            );
        }
    }
}

/// The merged online-softmax state of the segments a tile's queries have passed
/// ([`merge_segment`](super::merge_segment)): per (token, head) of one group, the unnormalized
/// output, the maximum and the denominator.
struct Merged {
    out: Vec<f32>,
    max: [f32; TILE_ROWS],
    denominator: [f32; TILE_ROWS],
}

impl Merged {
    fn new(len: usize) -> Self {
        Merged {
            out: vec![0.0; len],
            max: [f32::NEG_INFINITY; TILE_ROWS],
            denominator: [0.0; TILE_ROWS],
        }
    }

    /// Folds the finished segment of token `t` (its `batch` heads' state, `current`) into its
    /// merged state (which it becomes, if it is the token's first: `started` false), and
    /// clears `current` for the next segment.
    fn fold(
        &mut self,
        t: usize,
        batch: usize,
        hd: usize,
        started: bool,
        (out, max, denominator): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let heads = t * batch..(t + 1) * batch;
        let state = (
            &mut self.out[t * batch * hd..][..batch * hd],
            &mut self.max[heads.clone()],
            &mut self.denominator[heads],
        );
        fold_segment(!started, hd, state, (out, max, denominator));
        out.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        denominator.fill(0.0);
    }

    /// Folds token `t`'s last segment into its merged state and returns the merged output (in
    /// `out`, the token's place in the result) and denominators, to normalize.
    fn finish<'a>(
        &'a mut self,
        t: usize,
        batch: usize,
        hd: usize,
        (out, max, denominator): (&'a mut [f32], &mut [f32], &mut [f32]),
    ) -> (&'a mut [f32], &'a [f32]) {
        self.fold(t, batch, hd, true, (&mut *out, max, denominator));
        out.copy_from_slice(&self.out[t * batch * hd..][..batch * hd]);
        (out, &self.denominator[t * batch..(t + 1) * batch])
    }
}
