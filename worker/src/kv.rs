//! The paged KV cache of one stage: per layer, key and value pools of fixed-size blocks. Each
//! stage keeps the KV of its own layers only. Which blocks a sequence uses is the business of
//! the pool's one owner: the gateway, whose block tables come with every step, or — for the
//! single-process engine driven without a gateway — [`BlockOwner`].
//!
//! Pool layout (per layer): `[block][kv_head][slot][head_dim]` of f32 or f16 ([`KvDtype`]), as
//! the attention kernel in `strata_kernels::attention` expects. Pools are anonymous memory maps,
//! committed by the OS page by page as blocks are first written: an idle cache costs address
//! space, not memory.

use std::collections::HashMap;

use half::f16;
use strata_kernels::attention::AttentionShape;

use crate::error::{Result, WorkerError};

/// What the KV cache stores (`STRATA_KV_CACHE`: `auto`, the default, `f16` or `f32`).
///
/// `auto` is f16 unless every linear weight of the slice is f32: half the cache's memory, and
/// half what each step's attention reads, which dominates a batched decode step at long
/// contexts. On the default model (Q4_1) f16 keys and values move the perplexity by 0.001% and
/// keep top-1 agreement at 192 of 192; an f32 model keeps f32 end to end, whose logits match
/// the f32 reference within 5e-3 (with an f16 cache: 6e-3). llama.cpp's default is f16 too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    /// What `STRATA_KV_CACHE` asks for: `None` for `auto` (also when unset).
    ///
    /// # Errors
    ///
    /// [`WorkerError::Config`] naming the variable and its value when it is none of `auto`,
    /// `f16` and `f32`.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var("STRATA_KV_CACHE") {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Ok(v) if v == "auto" => Ok(None),
            Ok(v) if v == "f16" => Ok(Some(KvDtype::F16)),
            Ok(v) if v == "f32" => Ok(Some(KvDtype::F32)),
            Ok(v) => Err(WorkerError::Config(format!(
                "STRATA_KV_CACHE is `{v}`; it must be `auto` (f16, or f32 for a slice of f32 weights), `f16` or `f32`"
            ))),
            Err(e) => Err(WorkerError::Config(format!("STRATA_KV_CACHE: {e}"))),
        }
    }

    /// The cache of a slice whose linear weights are all f32 (`all_f32`) or not, as
    /// `STRATA_KV_CACHE` says.
    pub fn for_slice(all_f32: bool) -> Result<Self> {
        Ok(Self::from_env()?.unwrap_or(if all_f32 { KvDtype::F32 } else { KvDtype::F16 }))
    }
}

/// One layer's pools, typed.
pub enum Pools<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
}

/// One layer's key and value pools.
#[derive(Debug)]
pub struct LayerKv {
    dtype: KvDtype,
    k: memmap2::MmapMut,
    v: memmap2::MmapMut,
}

impl LayerKv {
    fn new(values: usize, dtype: KvDtype) -> Result<Self> {
        let bytes = values * dtype.bytes();
        let map = || {
            memmap2::MmapMut::map_anon(bytes.max(4)).map_err(|e| {
                WorkerError::Load(format!(
                    "cannot reserve {bytes} bytes for the KV cache: {e}"
                ))
            })
        };
        Ok(LayerKv {
            dtype,
            k: map()?,
            v: map()?,
        })
    }

    /// The key and value pools (page-aligned maps always cast).
    pub fn pools(&mut self) -> Result<Pools<'_>> {
        fn cast<T: bytemuck::Pod>(m: &mut memmap2::MmapMut) -> Result<&mut [T]> {
            bytemuck::try_cast_slice_mut::<u8, T>(&mut m[..])
                .map_err(|e| WorkerError::Step(format!("KV pool does not cast: {e}")))
        }
        Ok(match self.dtype {
            KvDtype::F32 => Pools::F32(cast(&mut self.k)?, cast(&mut self.v)?),
            KvDtype::F16 => Pools::F16(cast(&mut self.k)?, cast(&mut self.v)?),
        })
    }
}

/// The paged KV cache of one stage.
#[derive(Debug)]
pub struct KvCache {
    shape: AttentionShape,
    dtype: KvDtype,
    num_blocks: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// A cache of `num_blocks` blocks for `n_layers` layers.
    pub fn new(
        shape: AttentionShape,
        n_layers: usize,
        num_blocks: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let too_big = || {
            WorkerError::Load(format!(
                "a KV cache of {num_blocks} blocks does not fit in memory"
            ))
        };
        let per_layer = [shape.n_kv_heads, shape.block_size, shape.head_dim]
            .iter()
            .try_fold(num_blocks, |a, &b| a.checked_mul(b))
            .filter(|f| f.checked_mul(dtype.bytes() * 2 * n_layers.max(1)).is_some())
            .ok_or_else(too_big)?;
        if u32::try_from(num_blocks).is_err() {
            return Err(too_big());
        }
        let layers = (0..n_layers)
            .map(|_| LayerKv::new(per_layer, dtype))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            shape,
            dtype,
            num_blocks,
            layers,
        })
    }

    pub fn shape(&self) -> &AttentionShape {
        &self.shape
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Checks a sequence's block table before a step writes positions up to `end`: it covers
    /// them, and names blocks of this pool.
    pub fn check_table(&self, seq_id: u64, table: &[u32], end: usize) -> Result<()> {
        let needed = end.div_ceil(self.shape.block_size);
        if table.len() < needed {
            return Err(WorkerError::Sequence {
                seq_id,
                problem: format!(
                    "its {} KV blocks hold {} positions, the step reaches position {end}",
                    table.len(),
                    table.len() * self.shape.block_size
                ),
            });
        }
        if let Some(&bad) = table.iter().find(|&&b| b as usize >= self.num_blocks) {
            return Err(WorkerError::Sequence {
                seq_id,
                problem: format!(
                    "KV block {bad} is not one of the {} blocks",
                    self.num_blocks
                ),
            });
        }
        Ok(())
    }

    /// One layer's pools.
    pub fn layer(&mut self, layer: usize) -> Result<&mut LayerKv> {
        self.layers
            .get_mut(layer)
            .ok_or_else(|| WorkerError::Step(format!("KV cache has no layer {layer}")))
    }
}

/// Allocates blocks for sequences when no gateway does (the single-process engine driven
/// directly: `strata perplexity`, benchmarks, tests). Steps it fills in must continue where
/// the sequence left off.
#[derive(Debug)]
pub struct BlockOwner {
    block_size: usize,
    num_blocks: usize,
    /// Blocks `next_fresh..num_blocks` were never handed out.
    next_fresh: usize,
    /// Blocks handed back.
    free: Vec<u32>,
    seqs: HashMap<u64, SeqBlocks>,
}

/// A sequence's blocks and how many positions they hold.
#[derive(Debug, Default, Clone)]
struct SeqBlocks {
    blocks: Vec<u32>,
    len: usize,
}

impl BlockOwner {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockOwner {
            block_size,
            num_blocks,
            next_fresh: 0,
            free: Vec::new(),
            seqs: HashMap::new(),
        }
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len() + (self.num_blocks - self.next_fresh)
    }

    /// Makes room for positions `pos0..pos0 + n` of a sequence, which must continue exactly
    /// where it left off (a new sequence starts at 0), and returns its block table.
    pub fn reserve(&mut self, seq_id: u64, pos0: usize, n: usize) -> Result<&[u32]> {
        let held = self.seqs.get(&seq_id).map_or(0, |s| s.len);
        if pos0 != held {
            return Err(WorkerError::Sequence {
                seq_id,
                problem: format!(
                    "step starts at position {pos0}, but this stage holds {held} positions of it"
                ),
            });
        }
        let want = (pos0 + n).div_ceil(self.block_size);
        let have = self.seqs.get(&seq_id).map_or(0, |s| s.blocks.len());
        let needed = want.saturating_sub(have);
        let free = self.free_blocks();
        if needed > free {
            return Err(WorkerError::KvFull {
                seq_id,
                needed,
                free,
            });
        }
        let seq = self.seqs.entry(seq_id).or_default();
        for _ in 0..needed {
            let block = match self.free.pop() {
                Some(b) => b,
                None => {
                    self.next_fresh += 1;
                    (self.next_fresh - 1) as u32
                }
            };
            seq.blocks.push(block);
        }
        seq.len = pos0 + n;
        Ok(&seq.blocks)
    }

    /// Frees a sequence's blocks (unknown sequences are ignored).
    pub fn release(&mut self, seq_id: u64) {
        if let Some(s) = self.seqs.remove(&seq_id) {
            self.free.extend(s.blocks);
        }
    }

    /// Sequences holding blocks.
    pub fn active(&self) -> usize {
        self.seqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reserved_and_returned() {
        let mut kv = BlockOwner::new(3, 4);
        assert_eq!(kv.reserve(1, 0, 5).unwrap().len(), 2);
        assert_eq!(kv.reserve(1, 5, 3).unwrap().len(), 2);
        let err = kv.reserve(2, 0, 8).unwrap_err().to_string();
        assert!(err.contains("needs 2 more blocks, 1 are free"), "{err}");
        assert_eq!(kv.active(), 1);
        kv.release(1);
        assert_eq!(kv.free_blocks(), 3);
        kv.reserve(2, 0, 12).unwrap();
        assert_eq!(kv.free_blocks(), 0);
    }

    #[test]
    fn steps_must_continue_where_the_sequence_left_off() {
        let mut kv = BlockOwner::new(4, 4);
        let err = kv.reserve(7, 3, 1).unwrap_err().to_string();
        assert!(
            err.contains("sequence 7") && err.contains("starts at position 3"),
            "{err}"
        );
        kv.reserve(7, 0, 2).unwrap();
        assert!(kv.reserve(7, 1, 1).is_err());
    }

    #[test]
    fn tables_are_checked_against_the_pool() {
        let shape = AttentionShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
        };
        let kv = KvCache::new(shape, 1, 3, KvDtype::F16).unwrap();
        kv.check_table(1, &[2, 0], 8).unwrap();
        let short = kv.check_table(1, &[2], 5).unwrap_err().to_string();
        assert!(
            short.contains("hold 4 positions") && short.contains("position 5"),
            "{short}"
        );
        let bad = kv.check_table(1, &[3], 1).unwrap_err().to_string();
        assert!(bad.contains("KV block 3"), "{bad}");
    }
}
