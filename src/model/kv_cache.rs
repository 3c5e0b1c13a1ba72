//! The key/value cache of one rank, paged: fixed-size blocks of positions, handed to
//! sequences by the scheduler through block tables. A rank stores only its kv heads.

/// Keys and values per layer, laid out `[block][position in block][local kv head][head_dim]`.
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Floats per position (`kv_heads × head_dim`).
    row: usize,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Self {
        let row = kv_heads * head_dim;
        let len = row * num_blocks * block_size;
        KvCache {
            keys: (0..layers).map(|_| vec![0.0; len]).collect(),
            values: (0..layers).map(|_| vec![0.0; len]).collect(),
            row,
            block_size,
            num_blocks,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn bytes(&self) -> usize {
        2 * self.keys.len() * self.row * self.num_blocks * self.block_size * 4
    }

    /// The cache slot of position `pos` of a sequence with block table `blocks`.
    pub fn slot(&self, blocks: &[u32], pos: usize) -> usize {
        blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Stores one position's keys and values (`kv_heads × head_dim` each) at `slot`.
    pub fn store(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let at = slot * self.row;
        self.keys[layer][at..at + self.row].copy_from_slice(k);
        self.values[layer][at..at + self.row].copy_from_slice(v);
    }

    /// Keys and values of a layer, `[slot][kv head][head_dim]`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}
