//! The key/value cache of one rank: only the kv heads that rank owns.

/// Keys and values per layer, laid out `[position][local kv head][head_dim]`.
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    row: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for `capacity` positions of `kv_heads` heads of `head_dim` in `layers` layers.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let row = kv_heads * head_dim;
        KvCache {
            keys: (0..layers).map(|_| vec![0.0; row * capacity]).collect(),
            values: (0..layers).map(|_| vec![0.0; row * capacity]).collect(),
            row,
            capacity,
        }
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn bytes(&self) -> usize {
        2 * self.keys.len() * self.row * self.capacity * std::mem::size_of::<f32>()
    }

    /// Stores one position's keys and values (`kv_heads × head_dim` each).
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = pos * self.row;
        self.keys[layer][at..at + self.row].copy_from_slice(k);
        self.values[layer][at..at + self.row].copy_from_slice(v);
    }

    /// Keys and values of a layer, `[position][kv head][head_dim]`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}
