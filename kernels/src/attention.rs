//! Causal attention over a paged KV cache, in f32 arithmetic over pools of f32 or f16
//! ([`KvElement`]).
//!
//! The cache of one layer is a pool of fixed-size blocks shared by all sequences, `block_size`
//! slots per block. `v_pool` is laid out `[block][kv_head][slot][head_dim]`; `k_pool` holds each
//! block's keys transposed, `[block][kv_head][head_dim][slot]`, so that the scores of a run of
//! slots are one vector per dimension of the query (`Σ_d q[d] · K[d][slots]`: broadcast
//! multiply-adds, no horizontal sums). A sequence owns the blocks listed in its block table:
//! position `p` lives in block `block_table[p / block_size]`, slot `p % block_size`.
//!
//! Each (query token, head) pair is computed with an online softmax (as in FlashAttention):
//! keys are visited in runs of consecutive slots, the scores of a run are kept on the stack, and
//! the output accumulator is rescaled only when a run raises the running maximum. A task handles
//! one token and up to eight query heads that share a KV head (grouped-query attention), or, in
//! a prefill, a tile of tokens and all their heads ([`tile`]), so the cached keys and values are
//! read from memory once per group (or tile) rather than once per head; the vector primitives
//! take several heads at once, so each key or value vector loaded serves all of them. No
//! allocation happens per task (but for the partial states of segments), and each output
//! element's arithmetic is fixed: the result does not depend on the thread count, on how heads
//! or tokens were grouped, or on the other sequences of the call.
//!
//! Keys are attended in segments of [`SEGMENT_BLOCKS`] blocks, each from a fresh state, the
//! segments' states merged in order ([`merge_segment`]). One task may go through them all (a
//! tile does), or each segment of a token's keys may be its own task (a decode at a long
//! context, so that one sequence keeps every thread busy); the arithmetic is the same.

mod ops;
mod tile;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;
use rayon::prelude::*;

use crate::cpu::{self, Level};
use crate::error::KernelError;
use crate::math;
use crate::matrix::check_len;
use crate::prefetch;
use ops::{Portable, VectorOps, weights_scaling};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// What the KV pools hold: `f32`, or `f16` (half the memory, and half what every step's
/// attention reads). Each `f16` widens to exactly one `f32`, so attention over `f16` pools is
/// the same f32 arithmetic as over `f32` pools holding the rounded values, bit for bit, at
/// every SIMD level.
#[allow(unsafe_code)] // the hidden widening loads, for the SIMD kernels
pub trait KvElement: Copy + Default + Send + Sync + 'static + sealed::Sealed {
    /// The element nearest `x` (round to nearest even).
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// 16 elements as f32 lanes.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512F and F16C.
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen16(x: &[Self; 16]) -> std::arch::x86_64::__m512;
    /// 8 elements as f32 lanes.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX and F16C.
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen8(x: &[Self; 8]) -> std::arch::x86_64::__m256;
    /// The first `x.len()` (at most 16) lanes from `x`, the others 0.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX-512F and F16C.
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16_prefix(x: &[Self]) -> std::arch::x86_64::__m512 {
        if let Ok(full) = <&[Self; 16]>::try_from(x) {
            // SAFETY: the caller guarantees the CPU features.
            return unsafe { Self::widen16(full) };
        }
        let n = x.len().min(16);
        let mut lanes = [Self::default(); 16];
        lanes[..n].copy_from_slice(&x[..n]);
        // SAFETY: the caller guarantees the CPU features.
        unsafe { Self::widen16(&lanes) }
    }
}

#[allow(unsafe_code)]
impl KvElement for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(x: &[f32; 16]) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { crate::x86::load_f32x16(x) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(x: &[f32; 8]) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees AVX.
        unsafe { crate::x86::load_f32x8(x) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16_prefix(x: &[f32]) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { crate::x86::load_f32x16_prefix(x) }
    }
}

#[allow(unsafe_code)]
impl KvElement for f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(x: &[f16; 16]) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees AVX-512F and F16C.
        unsafe { crate::x86::widen_f16x16(x) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(x: &[f16; 8]) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees AVX and F16C.
        unsafe { crate::x86::widen_f16x8(x) }
    }
}

/// Shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; divides `n_heads` (grouped-query attention when smaller). Query head `h`
    /// reads KV head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Size of each head vector.
    pub head_dim: usize,
    /// Positions per KV cache block.
    pub block_size: usize,
}

impl AttentionShape {
    fn validate(&self) -> Result<(), KernelError> {
        let AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim,
            block_size,
        } = *self;
        if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 || block_size == 0 {
            return Err(KernelError::InvalidShape(format!(
                "attention dimensions must be positive, got {self:?}"
            )));
        }
        if !n_heads.is_multiple_of(n_kv_heads) {
            return Err(KernelError::InvalidShape(format!(
                "{n_kv_heads} KV heads do not divide {n_heads} query heads"
            )));
        }
        Ok(())
    }

    /// Floats per pool block: `n_kv_heads * block_size * head_dim`.
    fn block_len(&self) -> Result<usize, KernelError> {
        self.n_kv_heads
            .checked_mul(self.block_size)
            .and_then(|n| n.checked_mul(self.head_dim))
            .ok_or_else(|| overflow("KV block"))
    }

    /// Positions per segment of keys ([`SEGMENT_BLOCKS`] blocks).
    fn segment_len(&self) -> usize {
        SEGMENT_BLOCKS.saturating_mul(self.block_size)
    }

    /// Offset in a pool of the part of `block` that holds `kv_head`: in `v_pool` its first
    /// value vector, in `k_pool` its `[head_dim][block_size]` transposed keys.
    fn head_offset(&self, block: usize, kv_head: usize) -> usize {
        (block * self.n_kv_heads + kv_head) * self.block_size * self.head_dim
    }
}

fn overflow(what: &str) -> KernelError {
    KernelError::InvalidShape(format!("{what} size overflows usize"))
}

/// `n_tokens * heads * head_dim`, the length of a per-token tensor.
fn token_tensor_len(n_tokens: usize, heads: usize, head_dim: usize) -> Result<usize, KernelError> {
    n_tokens
        .checked_mul(heads)
        .and_then(|n| n.checked_mul(head_dim))
        .ok_or_else(|| overflow("token tensor"))
}

/// Checks the pools and returns the number of blocks they hold.
fn pool_blocks(shape: &AttentionShape, k_len: usize, v_len: usize) -> Result<usize, KernelError> {
    let block_len = shape.block_len()?;
    if !k_len.is_multiple_of(block_len) {
        return Err(KernelError::InvalidShape(format!(
            "k_pool length {k_len} is not a whole number of {block_len}-element blocks"
        )));
    }
    check_len("v_pool", v_len, k_len)?;
    Ok(k_len / block_len)
}

/// Checks that the block table maps every position in `first..end` to a block of the pool.
fn check_block_table(
    block_table: &[u32],
    block_size: usize,
    first: usize,
    end: usize,
    num_blocks: usize,
) -> Result<(), KernelError> {
    let needed = end.div_ceil(block_size);
    if block_table.len() < needed {
        return Err(KernelError::BlockTableTooShort {
            len: block_table.len(),
            needed,
        });
    }
    let first_entry = first / block_size;
    for (index, &block) in block_table
        .iter()
        .enumerate()
        .take(needed)
        .skip(first_entry)
    {
        if !usize::try_from(block).is_ok_and(|b| b < num_blocks) {
            return Err(KernelError::BlockOutOfRange {
                index,
                block,
                num_blocks,
            });
        }
    }
    Ok(())
}

/// Writes the keys and values of `n_tokens` new tokens into the pools: token `t` goes to
/// position `pos0 + t` of the sequence whose blocks are `block_table`, each value rounded to
/// the pools' element type.
///
/// `k` and `v` are `[n_tokens][n_kv_heads][head_dim]`; the pools are as described in the
/// [module documentation](self).
///
/// # Errors
///
/// [`KernelError::InvalidShape`] for an invalid shape or a pool that is not a whole number of
/// blocks; [`KernelError::LengthMismatch`] for `k`, `v` or pools of the wrong length;
/// [`KernelError::BlockTableTooShort`] or [`KernelError::BlockOutOfRange`] if a position has no
/// valid block. Nothing is written on error.
#[allow(clippy::too_many_arguments)]
pub fn write_kv<T: KvElement>(
    shape: &AttentionShape,
    k_pool: &mut [T],
    v_pool: &mut [T],
    block_table: &[u32],
    pos0: usize,
    k: &[f32],
    v: &[f32],
    n_tokens: usize,
) -> Result<(), KernelError> {
    shape.validate()?;
    let num_blocks = pool_blocks(shape, k_pool.len(), v_pool.len())?;
    let len = token_tensor_len(n_tokens, shape.n_kv_heads, shape.head_dim)?;
    check_len("k", k.len(), len)?;
    check_len("v", v.len(), len)?;
    if n_tokens == 0 {
        return Ok(());
    }
    let end = pos0
        .checked_add(n_tokens)
        .ok_or_else(|| overflow("position"))?;
    check_block_table(block_table, shape.block_size, pos0, end, num_blocks)?;
    let hd = shape.head_dim;
    let token_len = shape.n_kv_heads * hd;
    for (t, (k, v)) in k
        .chunks_exact(token_len)
        .zip(v.chunks_exact(token_len))
        .enumerate()
    {
        let pos = pos0 + t;
        let block = block_table[pos / shape.block_size] as usize;
        let slot = pos % shape.block_size;
        for (kv_head, (k, v)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
            let at = shape.head_offset(block, kv_head);
            let keys = &mut k_pool[at..at + hd * shape.block_size];
            for (d, &k) in k.iter().enumerate() {
                keys[d * shape.block_size + slot] = T::from_f32(k);
            }
            for (to, &v) in v_pool[at + slot * hd..][..hd].iter_mut().zip(v) {
                *to = T::from_f32(v);
            }
        }
    }
    Ok(())
}

/// Keys visited per online-softmax step; their scores live on the stack, and a run of keys and
/// values (2 · 32 · head_dim floats, 32 KiB at head_dim 128) stays in L1 while the heads of a
/// batch go over it.
const RUN: usize = 32;

/// Blocks of keys and values a decode asks the memory for ahead of the one it attends (into
/// L2: [`prefetch::lines_l2`]), and that a task asks for at the start of the next one. Further
/// ahead (4 or 8) made no difference.
const PREFETCH_BLOCKS: usize = 2;

/// Most query heads processed together (see [`head_batch`]).
const HEAD_BATCH: usize = 8;

/// Blocks per segment of keys. A query attends to its keys segment by segment, each from a
/// fresh online-softmax state, and merges the segments' states in order ([`merge_segment`]);
/// so the segments of a long context can be separate tasks (one sequence's decode then keeps
/// every thread busy) with the same result as one task going through them. 64 blocks are 1,024
/// positions at 16 per block; a context within one segment is attended as a single run.
const SEGMENT_BLOCKS: usize = 64;

/// Work (multiply-adds) below which attention runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Causal attention of the query tokens of one sequence against the cached keys and values of
/// that sequence, over a paged KV cache: [`PagedAttention::run`].
///
/// `q` and `out` are `[n_tokens][n_heads][head_dim]`. Query token `t` sits at position
/// `p = pos0 + t` and attends to the keys at positions `lo..=p`, where `lo = 0`, or with
/// `window: Some(w)`, `lo = max(p + 1 − w, 0)`: the last `w` positions, itself included
/// (Hugging Face Mistral semantics). The keys and values of all those positions must already be
/// in the pools (see [`write_kv`]). Per head, `out = softmax(scale · q·Kᵀ) · V`, with the
/// maximum subtracted before exponentiation and f32 accumulation.
///
/// Tasks (a token and the query heads sharing one KV head, up to eight) run in parallel on
/// rayon when the work is large; each output element is computed by one task in a fixed order,
/// so the result does not depend on the thread count.
///
/// # Errors
///
/// [`KernelError::InvalidShape`] for an invalid shape, a pool that is not a whole number of
/// blocks, or a window of 0; [`KernelError::LengthMismatch`] for `q`, `out` or pools of the
/// wrong length; [`KernelError::BlockTableTooShort`] or [`KernelError::BlockOutOfRange`] if an
/// attended position has no valid block. `out` is untouched on error.
#[derive(Clone, Copy)]
pub struct PagedAttention<'a, T: KvElement = f32> {
    pub shape: AttentionShape,
    /// Queries, `[n_tokens][n_heads][head_dim]`.
    pub q: &'a [f32],
    /// Position of the first query token.
    pub pos0: usize,
    /// The key and value pools of the layer (whole blocks).
    pub k_pool: &'a [T],
    pub v_pool: &'a [T],
    /// The sequence's blocks, in position order.
    pub block_table: &'a [u32],
    /// Score scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Sliding window (Mistral): attend to the last `w` positions only.
    pub window: Option<usize>,
}

impl<T: KvElement> PagedAttention<'_, T> {
    /// Computes `out` for `n_tokens` query tokens, at the best SIMD level this CPU has.
    pub fn run(&self, n_tokens: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.run_at(cpu::level(), n_tokens, out)
    }

    /// Attention of several sequences (a step's) in one parallel region: `out` is every
    /// request's output, stacked in order (request `i` has `q.len() / (n_heads · head_dim)`
    /// query tokens). Each output element is computed exactly as [`PagedAttention::run`]
    /// computes it alone. All requests must share one shape.
    ///
    /// # Errors
    ///
    /// As [`PagedAttention::run`], for the first request that has one; `out` is then
    /// untouched. [`KernelError::InvalidShape`] if the shapes differ.
    pub fn run_batch(
        requests: &[PagedAttention<'_, T>],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        Self::run_batch_at(cpu::level(), requests, out)
    }

    fn run_batch_at(
        level: Level,
        requests: &[PagedAttention<'_, T>],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let Some(first) = requests.first() else {
            return check_len("out", out.len(), 0);
        };
        let shape = first.shape;
        shape.validate()?;
        let width = shape.n_heads * shape.head_dim;
        let mut work = 0usize;
        for r in requests {
            if (
                r.shape.n_heads,
                r.shape.n_kv_heads,
                r.shape.head_dim,
                r.shape.block_size,
            ) != (
                shape.n_heads,
                shape.n_kv_heads,
                shape.head_dim,
                shape.block_size,
            ) {
                return Err(KernelError::InvalidShape(
                    "attention requests of one batch must share their shape".into(),
                ));
            }
            let n_tokens = r.q.len() / width;
            r.check(n_tokens)?;
            let end = r.pos0 + n_tokens;
            work = work.saturating_add(
                (n_tokens * width)
                    .saturating_mul(r.window.map_or(end, |w| w.min(end)))
                    .saturating_mul(2),
            );
        }
        let total: usize = requests.iter().map(|r| r.q.len()).sum();
        check_len("out", out.len(), total)?;
        let mut partials = vec![0.0f32; tile::partials_len(requests)];
        let (tasks, merges) = tile::tasks(requests, out, &mut partials);
        // What each task starts on, so that the task before it asks for it (a thread's tasks
        // are consecutive ones).
        let starts: Vec<(usize, Work)> = tasks.iter().map(|t| (t.request, t.work)).collect();
        let task = |(i, task): (usize, tile::Task<'_>)| {
            if let Some(&(request, work)) = starts.get(i + 1) {
                requests[request].prefetch_start(work);
            }
            requests[task.request].compute_at(level, task.work, task.out);
        };
        if work >= PARALLEL_MIN_WORK {
            tasks.into_par_iter().enumerate().for_each(task);
        } else {
            tasks.into_iter().enumerate().for_each(task);
        }
        for m in merges {
            tile::merge(m, &partials, shape.head_dim);
        }
        Ok(())
    }

    /// The checks of [`PagedAttention::run`] for `n_tokens` query tokens.
    fn check(&self, n_tokens: usize) -> Result<(), KernelError> {
        let shape = &self.shape;
        shape.validate()?;
        let num_blocks = pool_blocks(shape, self.k_pool.len(), self.v_pool.len())?;
        let len = token_tensor_len(n_tokens, shape.n_heads, shape.head_dim)?;
        check_len("q", self.q.len(), len)?;
        if self.window == Some(0) {
            return Err(KernelError::InvalidShape(
                "a sliding window must hold at least one position".into(),
            ));
        }
        if n_tokens == 0 {
            return Ok(());
        }
        let end = self
            .pos0
            .checked_add(n_tokens)
            .ok_or_else(|| overflow("position"))?;
        check_block_table(
            self.block_table,
            shape.block_size,
            self.first_key(self.pos0),
            end,
            num_blocks,
        )
    }

    /// Validates the request, then computes `out` at the given SIMD level.
    fn run_at(&self, level: Level, n_tokens: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.shape.validate()?;
        let len = token_tensor_len(n_tokens, self.shape.n_heads, self.shape.head_dim)?;
        check_len("q", self.q.len(), len)?;
        check_len("out", out.len(), len)?;
        Self::run_batch_at(level, std::slice::from_ref(self), out)
    }

    /// Asks the memory (into L2) for the keys and values of the first blocks that `work` reads
    /// one token's heads over (a tile's rows ask for their own). The walk itself asks for each
    /// block [`PREFETCH_BLOCKS`] ahead, but not for its first ones: the task before this one
    /// does, so that a decode of many short contexts does not wait on memory at the start of
    /// each. The request has been validated.
    fn prefetch_start(&self, work: Work) {
        let (token, first_head, segment) = match work {
            Work::Heads { token, first_head } => (token, first_head, 0),
            Work::Segment {
                token,
                first_head,
                segment,
            } => (token, first_head, segment),
            Work::Tile { .. } => return,
        };
        let Some(positions) = self.segments(token).nth(segment) else {
            return;
        };
        let shape = &self.shape;
        let bs = shape.block_size;
        let kv_head = first_head / (shape.n_heads / shape.n_kv_heads);
        let blocks = positions.start / bs..=positions.end.saturating_sub(1) / bs;
        for index in blocks.take(PREFETCH_BLOCKS) {
            self.prefetch_block(index, kv_head);
        }
    }

    /// Asks the memory (into L2) for the keys and values of KV head `kv_head` in the block at
    /// entry `index` of the block table (a validated one).
    #[inline(always)]
    fn prefetch_block(&self, index: usize, kv_head: usize) {
        let shape = &self.shape;
        let len = shape.head_dim * shape.block_size;
        let at = shape.head_offset(self.block_table[index] as usize, kv_head);
        prefetch::lines_l2(&self.k_pool[at..at + len]);
        prefetch::lines_l2(&self.v_pool[at..at + len]);
    }

    /// The first position the query at `pos` attends to.
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// Computes one task's `out` at the given SIMD level; the request has been validated.
    fn compute_at(&self, level: Level, work: Work, out: &mut [f32]) {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512(simd) => x86::compute_avx512(simd, self, work, out),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2(simd) => x86::compute_avx2(simd, self, work, out),
            Level::Scalar => self.compute(Portable, work, out),
        }
    }

    #[inline(always)]
    fn compute<V: VectorOps>(&self, ops: V, work: Work, out: &mut [f32]) {
        match work {
            Work::Heads { token, first_head } => self.attend(ops, token, first_head, out),
            Work::Tile { token, tokens } => self.attend_tile(ops, token, tokens, out),
            Work::Segment {
                token,
                first_head,
                segment,
            } => self.attend_segment(ops, (token, first_head, segment), out),
        }
    }

    /// Attention of query heads `first_head..first_head + out.len() / head_dim` of token
    /// `token`, written to `out`. These heads share one KV head (see [`head_batch`]); the
    /// request has been validated.
    ///
    /// Each run of keys and values is visited once for all the heads, which then find it in L1,
    /// but every head's arithmetic is exactly what it would be alone. The keys are attended
    /// segment by segment ([`SEGMENT_BLOCKS`]), the segments merged in order.
    #[inline(always)]
    fn attend<V: VectorOps>(&self, ops: V, token: usize, first_head: usize, out: &mut [f32]) {
        let hd = self.shape.head_dim;
        let heads = out.len() / hd;
        debug_assert!(
            heads <= HEAD_BATCH,
            "more heads than the softmax state holds"
        );
        let segments = self.segments(token);
        let mut max = [f32::NEG_INFINITY; HEAD_BATCH];
        let mut denominator = [0.0f32; HEAD_BATCH];
        let (max, denominator) = (&mut max[..heads], &mut denominator[..heads]);
        let mut later: Option<(Vec<f32>, [f32; HEAD_BATCH], [f32; HEAD_BATCH])> = None;
        for (index, segment) in segments.enumerate() {
            if index == 0 {
                self.attend_keys(ops, token, first_head, segment, out, (max, denominator));
                continue;
            }
            let (part, part_max, part_denominator) = later.get_or_insert_with(|| {
                (vec![0.0; out.len()], [0.0; HEAD_BATCH], [0.0; HEAD_BATCH])
            });
            let part_state = (&mut part_max[..heads], &mut part_denominator[..heads]);
            self.attend_keys(ops, token, first_head, segment, part, part_state);
            merge_segment(
                hd,
                (out, max, denominator),
                (part, &part_max[..heads], &part_denominator[..heads]),
            );
        }
        for (out, denominator) in out.chunks_exact_mut(hd).zip(denominator.iter()) {
            ops.scale(out, 1.0 / denominator);
        }
    }

    /// The segments of keys that token `token` attends to, in order: the positions from its
    /// first key to itself, cut at every multiple of [`AttentionShape::segment_len`].
    fn segments(&self, token: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let last = self.pos0 + token;
        let len = self.shape.segment_len();
        let mut lo = self.first_key(last);
        std::iter::from_fn(move || {
            (lo <= last).then(|| {
                let hi = ((lo / len + 1) * len).min(last + 1);
                let segment = lo..hi;
                lo = hi;
                segment
            })
        })
    }

    /// The online softmax of the heads from `first_head` of token `token` over the keys at
    /// `positions` (within one segment), from a fresh state: `out` (cleared here) receives the
    /// unnormalized output, `max` and `denominator` the state.
    #[inline(always)]
    fn attend_keys<V: VectorOps>(
        &self,
        ops: V,
        token: usize,
        first_head: usize,
        positions: std::ops::Range<usize>,
        out: &mut [f32],
        (max, denominator): (&mut [f32], &mut [f32]),
    ) {
        let shape = &self.shape;
        let (hd, bs) = (shape.head_dim, shape.block_size);
        let heads = out.len() / hd;
        let kv_head = first_head / (shape.n_heads / shape.n_kv_heads);
        let q = &self.q[(token * shape.n_heads + first_head) * hd..][..out.len()];
        out.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        denominator.fill(0.0);
        let mut scores = [[0.0f32; RUN]; HEAD_BATCH];
        let mut pos = positions.start;
        // The next table entry whose keys and values to ask the memory for (the first block is
        // read at once), and the last one of the walk. The table scatters the blocks where the
        // hardware prefetchers cannot follow; its entries up to the walk's end are validated.
        let (mut ahead, last) = (pos / bs + 1, positions.end.saturating_sub(1) / bs);
        while pos < positions.end {
            while ahead <= (pos / bs + PREFETCH_BLOCKS).min(last) {
                self.prefetch_block(ahead, kv_head);
                ahead += 1;
            }
            // A run of consecutive slots of one block, at most RUN long.
            let slot = pos % bs;
            let n = (bs - slot).min(positions.end - pos).min(RUN);
            let block = self.block_table[pos / bs] as usize;
            let at = shape.head_offset(block, kv_head);
            let run = Run {
                keys: &self.k_pool[at..at + hd * bs],
                block_size: bs,
                slot,
                values: &self.v_pool[at + slot * hd..][..n * hd],
                len: n,
            };
            let state = (&mut *max, &mut *denominator);
            self.online_step(ops, q, &run, state, &mut scores[..heads], out);
            pos += n;
        }
    }

    /// One online-softmax step of query heads `q` (`[heads][head_dim]`, their outputs `out`)
    /// over a run of keys and values: the scores of the run, then per head the rescaling of
    /// `out` and the denominator if the run raises the maximum and the run's weights, then the
    /// weighted values added to `out`. Every path computes every head this way; the heads go
    /// through it together only so that each key and value is loaded once for all of them.
    #[inline(always)]
    fn online_step<V: VectorOps, K: KvElement>(
        &self,
        ops: V,
        q: &[f32],
        run: &Run<'_, K>,
        (max, denominator): (&mut [f32], &mut [f32]),
        scores: &mut [[f32; RUN]],
        out: &mut [f32],
    ) {
        let hd = self.shape.head_dim;
        ops.scores(q, run, self.scale, scores);
        let heads = out.chunks_exact_mut(hd).zip(scores.iter_mut());
        for ((out, scores), state) in heads.zip(max.iter_mut().zip(denominator)) {
            weights_scaling(ops, &mut scores[..run.len], state, out);
        }
        ops.accumulate(out, scores, run.values);
    }
}

/// Folds `later`, the online-softmax state of a later segment of keys for some heads (their
/// unnormalized outputs `[heads][head_dim]`, maxima and denominators), into `state`, that of
/// the segments before it: both rescaled to the larger maximum, then added. Every path merges
/// segments with this function, in their order; its plain multiplies and adds (Rust never
/// fuses them) give the same bits however they are vectorized.
fn merge_segment(
    hd: usize,
    (out, max, denominator): (&mut [f32], &mut [f32], &mut [f32]),
    (later, later_max, later_denominator): (&[f32], &[f32], &[f32]),
) {
    let heads = out.chunks_exact_mut(hd).zip(later.chunks_exact(hd));
    for (h, (out, later)) in heads.enumerate() {
        let joint = max[h].max(later_max[h]);
        let (a, b) = (math::exp(max[h] - joint), math::exp(later_max[h] - joint));
        denominator[h] = denominator[h] * a + later_denominator[h] * b;
        for (o, &l) in out.iter_mut().zip(later) {
            *o = *o * a + l * b;
        }
        max[h] = joint;
    }
}

/// The state of a query's segments so far, given the next one: `later` itself if it is the
/// first (`first`), else `later` merged into `state` ([`merge_segment`]).
fn fold_segment(
    first: bool,
    hd: usize,
    (out, max, denominator): (&mut [f32], &mut [f32], &mut [f32]),
    later: (&[f32], &[f32], &[f32]),
) {
    if first {
        out.copy_from_slice(later.0);
        max.copy_from_slice(later.1);
        denominator.copy_from_slice(later.2);
    } else {
        merge_segment(hd, (out, max, denominator), later);
    }
}

/// What one task computes: [`PagedAttention::attend`] or [`PagedAttention::attend_tile`].
#[derive(Debug, Clone, Copy)]
enum Work {
    /// Query heads from `first_head` (sharing one KV head) of one token.
    Heads { token: usize, first_head: usize },
    /// Every head of `tokens` consecutive tokens from `token`.
    Tile { token: usize, tokens: usize },
    /// Segment `segment` of the keys of query heads from `first_head` of one token: a partial
    /// state, merged with the token's other segments after the call's tasks.
    Segment {
        token: usize,
        first_head: usize,
        segment: usize,
    },
}

/// A run of `len` consecutive key slots (at most [`RUN`]): `keys` transposed (`keys[d ·
/// block_size + slot + j]` for `j < len`), `values` the run's `len` value vectors one after
/// another.
struct Run<'a, K> {
    keys: &'a [K],
    block_size: usize,
    slot: usize,
    values: &'a [K],
    len: usize,
}

/// The number of query heads one task processes together: the largest divisor of the group of
/// heads sharing a KV head that is at most [`HEAD_BATCH`].
fn head_batch(shape: &AttentionShape) -> usize {
    let group = shape.n_heads / shape.n_kv_heads;
    (1..=HEAD_BATCH)
        .rev()
        .find(|&batch| group.is_multiple_of(batch))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests;
