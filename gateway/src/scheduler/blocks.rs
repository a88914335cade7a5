//! The KV cache's blocks, as the gateway owns them (vLLM's block manager): every stage keeps a
//! pool of the same number of blocks, and follows the block tables the gateway sends with each
//! step. A sequence holds the blocks its tokens need now and takes one more as it grows.
//!
//! **Prefix caching.** A block full of tokens is registered under a hash chained from the
//! hashes of the blocks before it (`h_i = H(h_{i−1}, tokens of block i)`), so that a sequence
//! whose prompt starts with the same tokens takes the same blocks instead of computing them
//! again: their keys and values depend on those tokens alone (the kernels are batch-invariant).
//! A registered block whose last holder lets it go stays cached until its space is needed;
//! then the least recently used one is evicted. Each cached block also keeps its tokens, and a
//! match compares them: a hash collision never shares a block.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// A block's bookkeeping.
#[derive(Debug, Clone, Default)]
struct Block {
    /// Sequences holding it.
    refs: u32,
    /// Its prefix hash and tokens, once registered.
    cached: Option<(u64, Vec<u32>)>,
    /// When it was last released (for LRU eviction), while cached and unheld.
    released_at: Option<u64>,
}

/// The gateway's view of every stage's KV pool.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Unheld and uncached: take these first, the most recently freed first (its pages are
    /// resident in every stage and likely still in the CPU's caches; untouched blocks stay
    /// untouched, costing address space but no memory, until the load needs them).
    free: VecDeque<u32>,
    /// Unheld but cached, by release time: evicted oldest first.
    evictable: BTreeMap<u64, u32>,
    /// Registered blocks by prefix hash.
    by_hash: HashMap<u64, u32>,
    clock: u64,
}

/// The hash of a full block of `tokens` following the prefix hashed `parent`.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free: (0..num_blocks as u32).collect(),
            evictable: BTreeMap::new(),
            by_hash: HashMap::new(),
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks a new holder could take now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks some sequence holds.
    pub fn held(&self) -> usize {
        self.blocks.iter().filter(|b| b.refs > 0).count()
    }

    /// Blocks holding cached prefixes that no sequence holds.
    pub fn cached_unheld(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks needed for `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes one block for a holder: a free one, else the least recently released cached one
    /// (which is then forgotten). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = match self.free.pop_front() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                let b = &mut self.blocks[id as usize];
                if let Some((hash, _)) = b.cached.take() {
                    self.by_hash.remove(&hash);
                }
                b.released_at = None;
                id
            }
        };
        self.blocks[id as usize].refs = 1;
        Some(id)
    }

    /// Takes `n` blocks, or none at all.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.available() < n {
            return None;
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// The cached blocks that hold the longest prefix of `tokens` made of full blocks, at most
    /// `max_blocks` of them, each now held once more.
    pub fn match_prefix(&mut self, tokens: &[u32], max_blocks: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut parent = 0u64;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = chain_hash(parent, chunk);
            let Some(&id) = self.by_hash.get(&hash) else {
                break;
            };
            let b = &mut self.blocks[id as usize];
            if b.cached.as_ref().is_none_or(|(_, t)| t.as_slice() != chunk) {
                break;
            }
            if b.refs == 0
                && let Some(at) = b.released_at.take()
            {
                self.evictable.remove(&at);
            }
            b.refs += 1;
            out.push(id);
            parent = hash;
        }
        out
    }

    /// Registers the full blocks of `table` (holding `tokens`, the sequence's tokens from
    /// position 0) that are not registered yet, so that later prompts can share them. A block
    /// whose hash another block already holds stays private.
    pub fn register_full(&mut self, table: &[u32], tokens: &[u32]) {
        let mut parent = 0u64;
        for (chunk, &id) in tokens.chunks_exact(self.block_size).zip(table) {
            let hash = chain_hash(parent, chunk);
            parent = hash;
            let b = &mut self.blocks[id as usize];
            if b.cached.is_some() {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
                e.insert(id);
                b.cached = Some((hash, chunk.to_vec()));
            }
        }
    }

    /// Lets go of every block of `table` once. Unheld blocks become free, or evictable when
    /// they hold a cached prefix.
    pub fn release(&mut self, table: &[u32]) {
        for &id in table {
            let Some(b) = self.blocks.get_mut(id as usize) else {
                continue;
            };
            if b.refs == 0 {
                continue;
            }
            b.refs -= 1;
            if b.refs == 0 {
                if b.cached.is_some() {
                    self.clock += 1;
                    b.released_at = Some(self.clock);
                    self.evictable.insert(self.clock, id);
                } else {
                    self.free.push_front(id);
                }
            }
        }
    }

    /// Checks the bookkeeping against the holders' tables (tests and debug assertions): every
    /// block held exactly as often as the tables list it, and every block in exactly one of
    /// held, free or evictable.
    pub fn check(&self, tables: &[&[u32]]) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for t in tables {
            for &id in *t {
                *refs
                    .get_mut(id as usize)
                    .ok_or_else(|| format!("block {id} does not exist"))? += 1;
            }
        }
        let mut seen = vec![0u8; self.blocks.len()];
        for &id in &self.free {
            seen[id as usize] += 1;
        }
        for &id in self.evictable.values() {
            seen[id as usize] += 1;
        }
        for (id, b) in self.blocks.iter().enumerate() {
            if b.refs != refs[id] {
                return Err(format!(
                    "block {id}: {} holders recorded, {} in tables",
                    b.refs, refs[id]
                ));
            }
            let places = seen[id] + u8::from(b.refs > 0);
            if places != 1 {
                return Err(format!("block {id} is in {places} places"));
            }
            if self.free.contains(&(id as u32)) && b.cached.is_some() {
                return Err(format!("block {id} is free but cached"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, from: u32) -> Vec<u32> {
        (from..from + n as u32).collect()
    }

    #[test]
    fn blocks_are_taken_and_given_back() {
        let mut m = BlockManager::new(4, 16);
        let a = m.allocate_n(3).unwrap();
        assert_eq!(m.available(), 1);
        assert!(m.allocate_n(2).is_none(), "all or nothing");
        assert_eq!(m.available(), 1);
        m.check(&[&a]).unwrap();
        m.release(&a);
        assert_eq!((m.available(), m.held()), (4, 0));
        m.check(&[]).unwrap();
    }

    #[test]
    fn freed_blocks_are_taken_again_before_untouched_ones() {
        let mut m = BlockManager::new(8, 16);
        let a = m.allocate_n(3).unwrap();
        assert_eq!(a, [0, 1, 2], "the pool is taken from its start");
        m.release(&a[1..]);
        // The most recently freed first, then the pool's untouched rest.
        assert_eq!(m.allocate_n(3).unwrap(), [2, 1, 3]);
    }

    #[test]
    fn full_prompt_blocks_are_shared_by_the_next_prompt() {
        let mut m = BlockManager::new(8, 4);
        let prompt = toks(10, 100); // two full blocks and a partial one
        let a = m.allocate_n(3).unwrap();
        m.register_full(&a, &prompt);
        // Same first 8 tokens, then different ones.
        let mut other = toks(8, 100);
        other.extend([7, 7, 7]);
        let shared = m.match_prefix(&other, 2);
        assert_eq!(shared, a[..2]);
        m.check(&[&a, &shared]).unwrap();
        // The first holder goes; the shared blocks stay held by the second.
        m.release(&a);
        m.check(&[&shared]).unwrap();
        assert_eq!(m.cached_unheld(), 0);
        m.release(&shared);
        assert_eq!(m.cached_unheld(), 2, "cached, evictable");
        m.check(&[]).unwrap();
        // A different prefix does not match; the same one does, even unheld.
        assert!(m.match_prefix(&toks(8, 500), 2).is_empty());
        let again = m.match_prefix(&prompt, 2);
        assert_eq!(again, a[..2]);
        m.check(&[&again]).unwrap();
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_released_first() {
        let mut m = BlockManager::new(3, 2);
        let (x, y) = (toks(2, 1), toks(2, 50));
        let a = m.allocate_n(1).unwrap();
        m.register_full(&a, &x);
        let b = m.allocate_n(1).unwrap();
        m.register_full(&b, &y);
        m.release(&a);
        m.release(&b);
        // Two cached and one free: the free one goes first, then `a`'s (released first).
        let c = m.allocate_n(2).unwrap();
        assert_eq!(c[1], a[0]);
        assert!(m.match_prefix(&x, 1).is_empty(), "evicted");
        let hit = m.match_prefix(&y, 1);
        assert_eq!(hit, b);
        m.check(&[&c, &hit]).unwrap();
    }

    #[test]
    fn a_colliding_hash_never_shares_a_block() {
        let mut m = BlockManager::new(2, 2);
        let a = m.allocate_n(1).unwrap();
        m.register_full(&a, &[1, 2]);
        // Forge the collision: register other tokens under the same hash.
        let hash = chain_hash(0, &[9, 9]);
        m.by_hash.insert(hash, a[0]);
        assert!(m.match_prefix(&[9, 9], 1).is_empty());
    }

    #[test]
    fn the_limit_on_matched_blocks_holds() {
        let mut m = BlockManager::new(4, 2);
        let t = toks(6, 0);
        let a = m.allocate_n(3).unwrap();
        m.register_full(&a, &t);
        assert_eq!(m.match_prefix(&t, 2).len(), 2);
        assert_eq!(m.match_prefix(&t, 0).len(), 0);
    }
}
