//! Block bookkeeping for the paged KV cache: a free list, reference counts, and a prefix cache of
//! full blocks keyed by a hash chained over their tokens and their parent's hash.
//!
//! The backend holds the K/V bytes; this holds which block belongs to whom. Block hashes are
//! [`pdfleet_api::prefix`]'s, which the router computes too.

use std::collections::{BTreeMap, HashMap, VecDeque};

pub type BlockId = u32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens looked up in the prefix cache.
    pub queries: u64,
    /// Of those, tokens found cached.
    pub hits: u64,
}

pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Blocks holding nothing reusable.
    free: VecDeque<BlockId>,
    /// Full blocks by prefix hash, whether in use or evictable.
    cached: HashMap<u64, BlockId>,
    block_hash: Vec<Option<u64>>,
    /// Cached blocks nobody references, oldest release first (least recently used).
    evictable: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    clock: u64,
    pub stats: PrefixStats,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            cached: HashMap::new(),
            block_hash: vec![None; num_blocks],
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_available()
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Takes a block, evicting the least recently released cached block when none is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                let h = self.block_hash[b as usize]
                    .take()
                    .expect("evictable blocks are cached");
                self.cached.remove(&h);
                b
            }
        };
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    pub fn release(&mut self, block: BlockId) {
        let b = block as usize;
        assert!(
            self.ref_counts[b] > 0,
            "block {block} released more often than taken"
        );
        self.ref_counts[b] -= 1;
        if self.ref_counts[b] == 0 {
            if self.block_hash[b].is_some() {
                self.clock += 1;
                self.released_at[b] = self.clock;
                self.evictable.insert(self.clock, block);
            } else {
                self.free.push_back(block);
            }
        }
    }

    /// Releases a sequence's blocks, last first, so that its tail is evicted before its prefix.
    pub fn release_all(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            self.release(b);
        }
    }

    /// Takes a reference on each cached leading block of `hashes`, stopping at the first miss.
    pub fn acquire_prefix(&mut self, hashes: &[u64]) -> Vec<BlockId> {
        let mut blocks = Vec::new();
        for h in hashes {
            let Some(&b) = self.cached.get(h) else { break };
            if self.ref_counts[b as usize] == 0 {
                self.evictable.remove(&self.released_at[b as usize]);
            }
            self.ref_counts[b as usize] += 1;
            blocks.push(b);
        }
        blocks
    }

    /// Counts a prompt's lookup: `queried` tokens, of which `hit` were cached.
    pub fn record_lookup(&mut self, queried: usize, hit: usize) {
        self.stats.queries += queried as u64;
        self.stats.hits += hit as u64;
    }

    /// Makes a block that has just become full reusable under `hash`. If an equal block is already
    /// cached (two sequences computed the same prefix at once) this one stays private.
    pub fn register_full(&mut self, block: BlockId, hash: u64) {
        if self.block_hash[block as usize].is_none() && !self.cached.contains_key(&hash) {
            self.cached.insert(hash, block);
            self.block_hash[block as usize] = Some(hash);
        }
    }

    /// Number of blocks of `hashes` that are cached, without taking them.
    pub fn cached_prefix_len(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdfleet_api::prefix::prefix_hashes;

    #[test]
    fn allocate_and_release_round_trip() {
        let mut m = BlockManager::new(4, 16);
        let a: Vec<_> = (0..4).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(m.allocate(), None);
        assert_eq!(m.num_used(), 4);
        m.release_all(&a);
        assert_eq!(m.num_available(), 4);
    }

    #[test]
    fn cached_blocks_are_shared_then_evicted_lru() {
        let mut m = BlockManager::new(3, 2);
        let hashes = prefix_hashes(&[1, 2, 3, 4], 2);
        let (a, b) = (m.allocate().unwrap(), m.allocate().unwrap());
        m.register_full(a, hashes[0]);
        m.register_full(b, hashes[1]);
        assert_eq!(m.acquire_prefix(&hashes), vec![a, b]);
        assert_eq!(m.ref_count(a), 2);
        m.release_all(&[a, b]);
        m.release_all(&[a, b]);
        // Both cached and unreferenced: still findable, and counted as available.
        assert_eq!(m.num_available(), 3);
        assert_eq!(m.cached_prefix_len(&hashes), 2);
        // The free block goes first, then the tail block (released first) is evicted.
        let c = m.allocate().unwrap();
        assert!(c != a && c != b);
        assert_eq!(m.allocate(), Some(b));
        assert_eq!(m.cached_prefix_len(&hashes), 1);
        assert_eq!(m.acquire_prefix(&hashes), vec![a]);
    }
}
