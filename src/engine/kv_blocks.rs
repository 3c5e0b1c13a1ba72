//! Who holds each KV block: the free pool, the prefix cache, or a running request.
//!
//! A request reserves, when admitted, every block its prompt and all its new tokens can
//! need, so memory never runs out mid-generation; blocks its prompt shares with the prefix
//! cache are not reserved again, and unused cached blocks are evicted to make room.

use super::prefix_cache::{NodeId, PrefixCache};

/// Free KV blocks, handed out whole.
pub struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

impl BlockPool {
    pub fn new(total: usize) -> Self {
        BlockPool {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    pub fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        (n <= self.free.len()).then(|| self.free.split_off(self.free.len() - n))
    }

    pub fn give_back(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

/// A running request's blocks.
#[derive(Default)]
pub struct BlockTable {
    /// Block `i` holds positions `i·block_size..`.
    pub blocks: Vec<u32>,
    /// Whether block `i` is the request's own (freed with it) rather than the cache's.
    private: Vec<bool>,
    /// Cache nodes the request uses (released with it).
    nodes: Vec<NodeId>,
    /// Prompt tokens found in the cache (never prefilled by this request).
    pub cached_tokens: usize,
}

/// What admission decided for a request.
pub enum Admission {
    Admitted(BlockTable),
    /// Not enough free blocks now; try again when requests finish.
    Wait,
    /// More blocks than the whole cache: never possible.
    TooLarge {
        needed: usize,
    },
}

/// The KV blocks of the scheduler: the pool, and the prefix cache unless it is disabled.
pub struct KvBlocks {
    pool: BlockPool,
    cache: Option<PrefixCache>,
    block_size: usize,
}

impl KvBlocks {
    pub fn new(total: usize, block_size: usize, prefix_cache: bool) -> Self {
        KvBlocks {
            pool: BlockPool::new(total),
            cache: prefix_cache.then(|| PrefixCache::new(block_size)),
            block_size,
        }
    }

    pub fn total(&self) -> usize {
        self.pool.total()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that hold something (running requests' or cached).
    pub fn used(&self) -> usize {
        self.pool.total() - self.pool.free()
    }

    /// Blocks the prefix cache holds.
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map_or(0, PrefixCache::blocks)
    }

    /// Prompt tokens the cache would give a request now.
    pub fn cached_prefix(&self, prompt: &[u32]) -> usize {
        self.cache
            .as_ref()
            .map_or(0, |c| c.matched_blocks(prompt) * self.block_size)
    }

    /// Blocks for a prompt and `max_new_tokens` more: the cached prefix's, then new ones
    /// (evicting unused cached blocks when the pool is short).
    pub fn admit(&mut self, prompt: &[u32], max_new_tokens: usize) -> Admission {
        let needed = (prompt.len() + max_new_tokens).div_ceil(self.block_size);
        if needed > self.pool.total() {
            return Admission::TooLarge { needed };
        }
        let path = self
            .cache
            .as_ref()
            .map_or(Vec::new(), |c| c.match_prompt(prompt));
        let new = needed - path.len();
        if let Some(cache) = &mut self.cache {
            cache.acquire(&path);
            if self.pool.free() < new {
                cache.evict(new - self.pool.free(), &mut self.pool);
            }
        }
        let Some(own) = self.pool.take(new) else {
            if let Some(cache) = &mut self.cache {
                cache.release(&path);
            }
            return Admission::Wait;
        };
        let cache = self.cache.as_ref();
        let mut blocks: Vec<u32> = path
            .iter()
            .map(|&id| cache.expect("matched").block(id))
            .collect();
        let mut private = vec![false; blocks.len()];
        private.resize(needed, true);
        blocks.extend(own);
        Admission::Admitted(BlockTable {
            blocks,
            private,
            cached_tokens: path.len() * self.block_size,
            nodes: path,
        })
    }

    /// The request's prompt is in its blocks: its whole blocks join the cache.
    pub fn prompt_filled(&mut self, table: &mut BlockTable, prompt: &[u32]) {
        if let Some(cache) = &mut self.cache {
            let whole = prompt.len() / self.block_size * self.block_size;
            let added = cache.insert(&prompt[..whole], &table.blocks, &mut table.private);
            table.nodes.extend(added);
        }
    }

    /// The request ended: its own blocks go back to the pool, the cache's stay cached.
    pub fn release(&mut self, table: BlockTable) {
        if let Some(cache) = &mut self.cache {
            cache.release(&table.nodes);
        }
        let own = table.blocks.iter().zip(&table.private).filter(|(_, &p)| p);
        self.pool.give_back(own.map(|(&b, _)| b));
    }

    /// Frees every cached block no request uses; returns how many (`None`: no cache).
    pub fn flush(&mut self) -> Option<usize> {
        let cache = self.cache.as_mut()?;
        Some(cache.flush(&mut self.pool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    const BS: usize = 4;

    /// Random prompts from a few shared stems, admitted and ended in random order under a
    /// small pool: every block is always in exactly one place (free, the cache, or a running
    /// request's own), a cached block holds the tokens it is matched for, and after a flush
    /// every block is free again.
    #[test]
    fn blocks_are_never_lost_or_shared_wrongly_under_eviction() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut kv = KvBlocks::new(24, BS, true);
        // What each block holds, written when a request owns it.
        let mut contents: HashMap<u32, Vec<u32>> = HashMap::new();
        let stems: Vec<Vec<u32>> = (0..3)
            .map(|s| (0..20).map(|i| s * 100 + i).collect())
            .collect();
        let mut running: Vec<(BlockTable, Vec<u32>)> = Vec::new();
        let (mut admitted, mut hits) = (0, 0);
        for _ in 0..3000 {
            if running.len() < 3 && rng.random_bool(0.6) {
                let stem = &stems[rng.random_range(0..3)];
                let mut prompt = stem[..rng.random_range(1..=stem.len())].to_vec();
                prompt.extend((0..rng.random_range(0..6)).map(|_| rng.random_range(1000..1003)));
                let Admission::Admitted(mut table) = kv.admit(&prompt, 3) else {
                    continue;
                };
                admitted += 1;
                hits += usize::from(table.cached_tokens > 0);
                for (i, &b) in table.blocks.iter().enumerate() {
                    let span = (i * BS).min(prompt.len())..((i + 1) * BS).min(prompt.len());
                    if table.private[i] {
                        contents.insert(b, prompt[span].to_vec());
                    } else {
                        assert_eq!(
                            contents[&b], prompt[span],
                            "a cached block holds other tokens"
                        );
                    }
                }
                kv.prompt_filled(&mut table, &prompt);
                running.push((table, prompt));
            } else if !running.is_empty() {
                let (table, _) = running.swap_remove(rng.random_range(0..running.len()));
                kv.release(table);
            }
            let own: usize = running
                .iter()
                .map(|(t, _)| t.private.iter().filter(|&&p| p).count())
                .sum();
            assert_eq!(kv.pool.free() + kv.cached() + own, kv.total());
        }
        assert!(
            admitted > 500 && hits > 100,
            "{admitted} admitted, {hits} hits"
        );
        for (table, _) in running.drain(..) {
            kv.release(table);
        }
        let held = kv.cached();
        assert_eq!(kv.flush(), Some(held));
        assert_eq!((kv.used(), kv.cached()), (0, 0));
    }

    #[test]
    fn without_the_cache_requests_hold_only_their_own_blocks() {
        let mut kv = KvBlocks::new(8, BS, false);
        let prompt: Vec<u32> = (0..9).collect();
        for _ in 0..3 {
            let Admission::Admitted(mut table) = kv.admit(&prompt, 3) else {
                panic!("room for one request");
            };
            assert_eq!((table.cached_tokens, table.blocks.len()), (0, 3));
            kv.prompt_filled(&mut table, &prompt);
            kv.release(table);
            assert_eq!(kv.used(), 0);
        }
        assert!(matches!(
            kv.admit(&prompt, 30),
            Admission::TooLarge { needed: 10 }
        ));
        assert_eq!(kv.flush(), None);
    }
}
