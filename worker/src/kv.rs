//! The paged KV cache of one stage: per layer, key and value pools of fixed-size blocks, and per
//! sequence a block table. Each stage keeps the KV of its own layers only.
//!
//! Pool layout (per layer): `[block][kv_head][slot][head_dim]` f32, as the attention kernel in
//! `strata_kernels::attention` expects. Pools are anonymous memory maps, committed by the OS page
//! by page as blocks are first written: an idle cache costs address space, not memory.

use std::collections::HashMap;

use strata_kernels::attention::AttentionShape;

use crate::error::{Result, WorkerError};

/// One layer's key and value pools.
#[derive(Debug)]
pub struct LayerKv {
    k: memmap2::MmapMut,
    v: memmap2::MmapMut,
}

impl LayerKv {
    fn new(floats: usize) -> Result<Self> {
        let map = || {
            memmap2::MmapMut::map_anon((floats * 4).max(4)).map_err(|e| {
                WorkerError::Load(format!(
                    "cannot reserve {} bytes for the KV cache: {e}",
                    floats * 4
                ))
            })
        };
        Ok(LayerKv {
            k: map()?,
            v: map()?,
        })
    }

    /// The key and value pools as f32 (page-aligned maps always cast).
    pub fn pools(&mut self) -> Result<(&mut [f32], &mut [f32])> {
        fn cast(m: &mut memmap2::MmapMut) -> Result<&mut [f32]> {
            bytemuck::try_cast_slice_mut::<u8, f32>(&mut m[..])
                .map_err(|e| WorkerError::Step(format!("KV pool is not f32-aligned: {e}")))
        }
        Ok((cast(&mut self.k)?, cast(&mut self.v)?))
    }
}

/// A sequence's blocks and how many positions they hold.
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    pub blocks: Vec<u32>,
    pub len: usize,
}

/// The block tables of a cache's sequences.
#[derive(Debug, Clone, Copy)]
pub struct BlockTables<'a>(&'a HashMap<u64, SeqBlocks>);

impl<'a> BlockTables<'a> {
    /// A sequence's blocks (none for an unknown one).
    pub fn get(&self, seq_id: u64) -> &'a [u32] {
        self.0.get(&seq_id).map_or(&[], |s| &s.blocks)
    }
}

/// The paged KV cache of one stage.
#[derive(Debug)]
pub struct KvCache {
    shape: AttentionShape,
    num_blocks: usize,
    /// Blocks `next_fresh..num_blocks` were never handed out.
    next_fresh: usize,
    /// Blocks handed back.
    free: Vec<u32>,
    seqs: HashMap<u64, SeqBlocks>,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// A cache of `num_blocks` blocks for `n_layers` layers.
    pub fn new(shape: AttentionShape, n_layers: usize, num_blocks: usize) -> Result<Self> {
        let too_big = || {
            WorkerError::Load(format!(
                "a KV cache of {num_blocks} blocks does not fit in memory"
            ))
        };
        let per_layer = [shape.n_kv_heads, shape.block_size, shape.head_dim]
            .iter()
            .try_fold(num_blocks, |a, &b| a.checked_mul(b))
            .filter(|f| f.checked_mul(4 * 2 * n_layers.max(1)).is_some())
            .ok_or_else(too_big)?;
        if u32::try_from(num_blocks).is_err() {
            return Err(too_big());
        }
        let layers = (0..n_layers)
            .map(|_| LayerKv::new(per_layer))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            shape,
            num_blocks,
            next_fresh: 0,
            free: Vec::new(),
            seqs: HashMap::new(),
            layers,
        })
    }

    pub fn shape(&self) -> &AttentionShape {
        &self.shape
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len() + (self.num_blocks - self.next_fresh)
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Positions the sequence holds (0 for an unknown sequence).
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).map_or(0, |s| s.len)
    }

    /// Makes room for positions `pos0..pos0 + n` of a sequence, which must continue exactly
    /// where the cache left it (a new sequence starts at 0).
    pub fn reserve(&mut self, seq_id: u64, pos0: usize, n: usize) -> Result<()> {
        let held = self.seq_len(seq_id);
        if pos0 != held {
            return Err(WorkerError::Sequence {
                seq_id,
                problem: format!(
                    "step starts at position {pos0}, but this stage holds {held} positions of it"
                ),
            });
        }
        let seq = self.seqs.entry(seq_id).or_default();
        let want = (pos0 + n).div_ceil(self.shape.block_size);
        let needed = want.saturating_sub(seq.blocks.len());
        let free = self.free.len() + (self.num_blocks - self.next_fresh);
        if needed > free {
            if seq.blocks.is_empty() {
                self.seqs.remove(&seq_id);
            }
            return Err(WorkerError::KvFull {
                seq_id,
                needed,
                free,
            });
        }
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
        Ok(())
    }

    /// Marks positions up to `len` as written.
    pub fn commit(&mut self, seq_id: u64, len: usize) {
        if let Some(s) = self.seqs.get_mut(&seq_id) {
            s.len = len;
        }
    }

    /// Frees a sequence's blocks (unknown sequences are ignored).
    pub fn release(&mut self, seq_id: u64) {
        if let Some(s) = self.seqs.remove(&seq_id) {
            self.free.extend(s.blocks);
        }
    }

    /// The block table of a sequence.
    pub fn blocks(&self, seq_id: u64) -> &[u32] {
        self.seqs.get(&seq_id).map_or(&[], |s| &s.blocks)
    }

    /// One layer's pools and a sequence's block table, for the attention kernel.
    pub fn layer_mut(&mut self, layer: usize, seq_id: u64) -> Result<(&mut LayerKv, &[u32])> {
        let blocks = self.seqs.get(&seq_id).map_or(&[][..], |s| &s.blocks);
        let kv = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| WorkerError::Step(format!("KV cache has no layer {layer}")))?;
        Ok((kv, blocks))
    }

    /// One layer's pools, and every sequence's block table.
    pub fn layer_and_tables(&mut self, layer: usize) -> Result<(&mut LayerKv, BlockTables<'_>)> {
        let kv = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| WorkerError::Step(format!("KV cache has no layer {layer}")))?;
        Ok((kv, BlockTables(&self.seqs)))
    }

    /// Sequences holding blocks.
    pub fn active(&self) -> usize {
        self.seqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(blocks: usize) -> KvCache {
        KvCache::new(
            AttentionShape {
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                block_size: 4,
            },
            2,
            blocks,
        )
        .unwrap()
    }

    #[test]
    fn blocks_are_reserved_and_returned() {
        let mut kv = cache(3);
        kv.reserve(1, 0, 5).unwrap();
        assert_eq!(kv.blocks(1).len(), 2);
        kv.commit(1, 5);
        kv.reserve(1, 5, 3).unwrap();
        assert_eq!(kv.blocks(1).len(), 2);
        kv.commit(1, 8);
        let err = kv.reserve(2, 0, 8).unwrap_err().to_string();
        assert!(err.contains("needs 2 more blocks, 1 are free"), "{err}");
        assert_eq!(kv.active(), 1);
        kv.release(1);
        assert_eq!(kv.free_blocks(), 3);
        kv.reserve(2, 0, 12).unwrap();
        assert_eq!(kv.free_blocks(), 0);
    }

    #[test]
    fn steps_must_continue_where_the_cache_left_off() {
        let mut kv = cache(4);
        let err = kv.reserve(7, 3, 1).unwrap_err().to_string();
        assert!(
            err.contains("sequence 7") && err.contains("starts at position 3"),
            "{err}"
        );
        kv.reserve(7, 0, 2).unwrap();
        kv.commit(7, 2);
        assert!(kv.reserve(7, 1, 1).is_err());
    }
}
