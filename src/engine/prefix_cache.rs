//! The prefix cache (SGLang's RadixAttention) over the paged KV cache: KV blocks of prompts
//! stay after their requests end, in a tree keyed by the token ids they hold, and a new
//! request whose prompt starts with those tokens reuses the blocks instead of prefilling
//! them again.
//!
//! The tree works on whole KV blocks: a node is one full block, keyed by its tokens, under
//! the node of the block before it (vLLM's block-hash chain, kept as SGLang's tree so that
//! matching, reference counts and leaf-first eviction are walks over it). Whole blocks need
//! no splitting of nodes and no copy-on-write: a cached block is never written again, and a
//! request writes only blocks of its own. A match ends at the last whole block before the
//! prompt's final token, which is always computed (its logits choose the first new token).
//!
//! Only blocks that prefill filled enter the tree (a prompt's whole blocks, once the prompt
//! is in the cache): prefill and decode may round differently (f32 panels vs one-token
//! products), so a block of generated tokens could differ in its last bits from the block a
//! fresh prefill of the same text gives. Cached blocks therefore always hold the bits a
//! request computes without the cache, and outputs are the same with the cache on or off.
//! A chat's earlier replies enter the tree as part of the next turn's prompt.
//!
//! Each node counts the running requests that use it; unused blocks stay until the pool
//! needs them, and then the least recently used leaves go first.

use super::kv_blocks::BlockPool;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// A node's index in the tree's arena.
pub type NodeId = usize;

const ROOT: NodeId = 0;

struct Node {
    parent: NodeId,
    /// The block's token ids (empty for the root).
    key: Box<[u32]>,
    block: u32,
    children: HashMap<Box<[u32]>, NodeId>,
    /// Running requests using this block.
    refs: u32,
    last_used: u64,
}

pub struct PrefixCache {
    block_size: usize,
    /// Nodes by id; `None` are free slots (reused before the arena grows).
    nodes: Vec<Option<Node>>,
    free_ids: Vec<NodeId>,
    /// Blocks held by the tree.
    blocks: usize,
    clock: u64,
}

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        let root = Node {
            parent: ROOT,
            key: Box::new([]),
            block: u32::MAX,
            children: HashMap::new(),
            refs: 1,
            last_used: 0,
        };
        PrefixCache {
            block_size,
            nodes: vec![Some(root)],
            free_ids: Vec::new(),
            blocks: 0,
            clock: 0,
        }
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes[id].as_ref().expect("a live node")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id].as_mut().expect("a live node")
    }

    /// Blocks the tree holds (in use or not).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub fn block(&self, id: NodeId) -> u32 {
        self.node(id).block
    }

    /// The nodes of the longest run of whole blocks cached for a prompt, first block first;
    /// the prompt's last token is never matched.
    pub fn match_prompt(&self, prompt: &[u32]) -> Vec<NodeId> {
        self.walk(prompt).collect()
    }

    /// Whole blocks [`Self::match_prompt`] would match, without collecting them (the lpm
    /// order asks this of every waiting prompt at every step).
    pub fn matched_blocks(&self, prompt: &[u32]) -> usize {
        self.walk(prompt).count()
    }

    fn walk<'a>(&'a self, prompt: &'a [u32]) -> impl Iterator<Item = NodeId> + 'a {
        let whole = prompt.len().saturating_sub(1) / self.block_size;
        let mut at = ROOT;
        prompt
            .chunks_exact(self.block_size)
            .take(whole)
            .map_while(move |key| {
                at = *self.node(at).children.get(key)?;
                Some(at)
            })
    }

    /// Marks `path` as used by one more request (it cannot be evicted until released).
    pub fn acquire(&mut self, path: &[NodeId]) {
        self.clock += 1;
        let now = self.clock;
        for &id in path {
            let n = self.node_mut(id);
            n.refs += 1;
            n.last_used = now;
        }
    }

    /// One request less uses `nodes`.
    pub fn release(&mut self, nodes: &[NodeId]) {
        self.clock += 1;
        let now = self.clock;
        for &id in nodes {
            let n = self.node_mut(id);
            n.refs = n.refs.checked_sub(1).expect("released more than acquired");
            n.last_used = now;
        }
    }

    /// Puts a prompt's whole blocks (`blocks[i]` holds `tokens[i·bs..(i+1)·bs]`) into the
    /// tree. Blocks whose tokens the tree already holds (under another block id) stay the
    /// caller's; the others become the tree's, used by the caller: their nodes are returned
    /// and `private[i]` is cleared for them.
    pub fn insert(&mut self, tokens: &[u32], blocks: &[u32], private: &mut [bool]) -> Vec<NodeId> {
        self.clock += 1;
        let now = self.clock;
        let mut added = Vec::new();
        let mut at = ROOT;
        for (i, key) in tokens.chunks_exact(self.block_size).enumerate() {
            if let Some(&child) = self.node(at).children.get(key) {
                at = child;
                continue;
            }
            if !private[i] {
                // Shared already, under another parent: cannot happen for a prompt's chain.
                break;
            }
            let id = self.new_node(Node {
                parent: at,
                key: key.into(),
                block: blocks[i],
                children: HashMap::new(),
                refs: 1,
                last_used: now,
            });
            self.node_mut(at).children.insert(key.into(), id);
            self.blocks += 1;
            private[i] = false;
            added.push(id);
            at = id;
        }
        added
    }

    fn new_node(&mut self, node: Node) -> NodeId {
        match self.free_ids.pop() {
            Some(id) => {
                self.nodes[id] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// Frees up to `n` blocks no request uses, least recently used leaves first, into
    /// `pool`; returns how many it freed.
    pub fn evict(&mut self, n: usize, pool: &mut BlockPool) -> usize {
        let mut heap: BinaryHeap<Reverse<(u64, NodeId)>> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(id, n)| n.as_ref().map(|n| (id, n)))
            .filter(|(_, n)| n.refs == 0 && n.children.is_empty())
            .map(|(id, n)| Reverse((n.last_used, id)))
            .collect();
        let mut freed = 0;
        while freed < n {
            let Some(Reverse((_, id))) = heap.pop() else {
                break;
            };
            let node = self.nodes[id].take().expect("a live node");
            self.free_ids.push(id);
            pool.give_back([node.block]);
            self.blocks -= 1;
            freed += 1;
            let parent = self.node_mut(node.parent);
            parent.children.remove(&node.key);
            if node.parent != ROOT && parent.refs == 0 && parent.children.is_empty() {
                heap.push(Reverse((parent.last_used, node.parent)));
            }
        }
        freed
    }

    /// Frees every block no request uses; returns how many.
    pub fn flush(&mut self, pool: &mut BlockPool) -> usize {
        self.evict(usize::MAX, pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    /// Caches `prompt`'s whole blocks as a request that owned all of them would.
    fn cache_prompt(cache: &mut PrefixCache, pool: &mut BlockPool, prompt: &[u32]) {
        let whole = prompt.len() / BS;
        let blocks = pool.take(whole).unwrap();
        let mut private = vec![true; whole];
        let added = cache.insert(&prompt[..whole * BS], &blocks, &mut private);
        cache.release(&added);
        pool.give_back(
            blocks
                .iter()
                .zip(&private)
                .filter(|(_, &p)| p)
                .map(|(&b, _)| b),
        );
    }

    #[test]
    fn a_shared_prefix_is_matched_by_whole_blocks_and_never_its_last_token() {
        let (mut cache, mut pool) = (PrefixCache::new(BS), BlockPool::new(64));
        let a: Vec<u32> = (0..11).collect();
        cache_prompt(&mut cache, &mut pool, &a);
        assert_eq!(cache.blocks(), 2);
        // 9 shared tokens: two whole blocks; 8 tokens: one block (the last is computed).
        let mut b = a[..9].to_vec();
        b.push(99);
        assert_eq!(cache.match_prompt(&b).len(), 2);
        assert_eq!(cache.match_prompt(&a[..8]).len(), 1);
        assert_eq!(cache.match_prompt(&[5, 1, 2, 3, 4]).len(), 0);
        // A match ending inside a block stops before it.
        let mut c = a[..6].to_vec();
        c.extend([7, 7, 7]);
        assert_eq!(cache.match_prompt(&c).len(), 1);
        // The same prompt again adds nothing: its blocks stay the caller's.
        cache_prompt(&mut cache, &mut pool, &a);
        assert_eq!(cache.blocks(), 2);
        assert_eq!(pool.free(), 62);
    }

    #[test]
    fn blocks_in_use_are_not_evicted_and_the_least_recent_leaf_goes_first() {
        let (mut cache, mut pool) = (PrefixCache::new(BS), BlockPool::new(16));
        let a: Vec<u32> = (0..9).collect();
        let b: Vec<u32> = (50..59).collect();
        let c: Vec<u32> = (80..89).collect();
        for p in [&a, &b, &c] {
            cache_prompt(&mut cache, &mut pool, p);
        }
        assert_eq!(cache.blocks(), 6);
        let in_use = cache.match_prompt(&a);
        cache.acquire(&in_use);
        cache.acquire(&cache.match_prompt(&c));
        cache.release(&cache.match_prompt(&c));
        // `b` is the least recent: its leaf, then its first block, go before `c`'s.
        assert_eq!(cache.evict(2, &mut pool), 2);
        assert_eq!(cache.match_prompt(&b).len(), 0);
        assert_eq!(cache.match_prompt(&c).len(), 2);
        // `a` is in use: only `c` can go.
        assert_eq!(cache.evict(10, &mut pool), 2);
        assert_eq!(cache.match_prompt(&a).len(), 2);
        cache.release(&in_use);
        assert_eq!(cache.flush(&mut pool), 2);
        assert_eq!(pool.free(), pool.total());
    }
}
