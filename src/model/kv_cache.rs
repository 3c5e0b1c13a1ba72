//! The key/value cache of one rank, paged: fixed-size blocks of positions, handed to
//! sequences by the scheduler through block tables. A rank stores only its kv heads, in
//! f16 by default (half the memory and half the reads of f32, as llama.cpp), or bf16 / f32
//! (`--kv-cache-dtype`). Every rank converts the same values alike, so tp N == tp 1 and a
//! sequence alone == batched hold for each type.

use crate::kernels::buffer::LargeArray;
use anyhow::{anyhow, bail, Result};
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// How cached keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F16,
    BF16,
    F32,
}

impl KvDtype {
    /// SGLang's `--kv-cache-dtype` values; `auto` is f16.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" | "f16" | "float16" | "fp16" => KvDtype::F16,
            "bf16" | "bfloat16" => KvDtype::BF16,
            "f32" | "float32" | "float" => KvDtype::F32,
            other => bail!("--kv-cache-dtype {other} is not one of auto, f16, bf16, f32"),
        })
    }

    /// Bytes per cached value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::BF16 => 2,
        }
    }
}

/// One layer's keys or values, `[slot][kv head][head_dim]`.
/// On huge pages ([`LargeArray`]): attention reads it block by block, all over the place.
enum Rows {
    F32(LargeArray<f32>),
    F16(LargeArray<f16>),
    BF16(LargeArray<bf16>),
}

impl Rows {
    fn new(dtype: KvDtype, len: usize) -> Result<Self> {
        let too_large = |e| anyhow!("cannot map {len} KV cache values: {e}");
        Ok(match dtype {
            KvDtype::F32 => Rows::F32(LargeArray::zeroed(len).map_err(too_large)?),
            KvDtype::F16 => Rows::F16(LargeArray::zeroed(len).map_err(too_large)?),
            KvDtype::BF16 => Rows::BF16(LargeArray::zeroed(len).map_err(too_large)?),
        })
    }

    fn store(&mut self, at: usize, x: &[f32]) {
        let end = at + x.len();
        match self {
            Rows::F32(v) => v[at..end].copy_from_slice(x),
            Rows::F16(v) => v[at..end].convert_from_f32_slice(x),
            Rows::BF16(v) => v[at..end].convert_from_f32_slice(x),
        }
    }
}

/// A layer's keys and values as stored.
pub enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
    BF16(&'a [bf16], &'a [bf16]),
}

pub struct KvCache {
    keys: Vec<Rows>,
    values: Vec<Rows>,
    dtype: KvDtype,
    /// Values per position (`kv_heads × head_dim`).
    row: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    /// A zeroed cache; an impossible size is an error, never an abort in the allocator.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let row = kv_heads * head_dim;
        let len = row
            .checked_mul(num_blocks)
            .and_then(|n| n.checked_mul(block_size))
            .filter(|n| n.checked_mul(2 * layers * dtype.bytes()).is_some())
            .ok_or_else(|| {
                anyhow!("a KV cache of {num_blocks} blocks of {block_size} positions is too large")
            })?;
        Ok(KvCache {
            keys: (0..layers)
                .map(|_| Rows::new(dtype, len))
                .collect::<Result<_>>()?,
            values: (0..layers)
                .map(|_| Rows::new(dtype, len))
                .collect::<Result<_>>()?,
            dtype,
            row,
            head_dim,
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    pub fn bytes(&self) -> usize {
        2 * self.keys.len() * self.row * self.num_blocks * self.block_size * self.dtype.bytes()
    }

    /// The cache slot of position `pos` of a sequence with block table `blocks`.
    pub fn slot(&self, blocks: &[u32], pos: usize) -> usize {
        blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Stores one position's keys and values (`kv_heads × head_dim` each) at `slot`.
    pub fn store(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (bs, d) = (self.block_size, self.head_dim);
        let (block, offset) = (slot / bs, slot % bs);
        let heads = k[..self.row]
            .chunks_exact(d)
            .zip(v[..self.row].chunks_exact(d));
        for (h, (k, v)) in heads.enumerate() {
            let at = ((block * (self.row / d) + h) * bs + offset) * d;
            self.keys[layer].store(at, k);
            self.values[layer].store(at, v);
        }
    }

    /// Keys and values of a layer, `[block][kv head][position in block][head_dim]`: one
    /// head's rows of a block lie together, so attention reads them in one sweep.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match (&self.keys[layer], &self.values[layer]) {
            (Rows::F32(k), Rows::F32(v)) => KvLayer::F32(k, v),
            (Rows::F16(k), Rows::F16(v)) => KvLayer::F16(k, v),
            (Rows::BF16(k), Rows::BF16(v)) => KvLayer::BF16(k, v),
            _ => unreachable!("keys and values share one type"),
        }
    }
}
