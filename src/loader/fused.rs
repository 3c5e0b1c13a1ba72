//! Checkpoints that store several projections as one tensor (Phi-3's `qkv_proj` and
//! `gate_up_proj`), shown to the layers as the separate tensors they load: each part is a
//! range of the fused tensor's rows, so a rank reads only its own rows of each part, as
//! vLLM's `QKVParallelLinear` / `MergedColumnParallelLinear` do with a fused checkpoint.

use super::{ModelConfig, TensorSource};
use crate::kernels::Storage;
use anyhow::Result;
use std::ops::Range;

/// A separate tensor that is rows `rows` of the fused tensor `fused` (of `fused_rows`).
struct Part {
    fused: String,
    fused_rows: usize,
    rows: Range<usize>,
}

pub struct FusedParts {
    inner: Box<dyn TensorSource>,
    parts: std::collections::HashMap<String, Part>,
}

impl FusedParts {
    /// Phi-3's layout: q, k, v stacked in `self_attn.qkv_proj`, gate and up in
    /// `mlp.gate_up_proj`, in that order.
    pub fn phi3(inner: Box<dyn TensorSource>, cfg: &ModelConfig) -> Self {
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let i = cfg.intermediate_size;
        let mut parts = std::collections::HashMap::new();
        for l in 0..cfg.num_layers {
            let layer = format!("model.layers.{l}");
            let mut split = |fused: &str, names: &[(&str, usize)]| {
                let fused = format!("{layer}.{fused}.weight");
                let fused_rows = names.iter().map(|(_, len)| len).sum();
                let mut at = 0;
                for &(name, len) in names {
                    let part = Part {
                        fused: fused.clone(),
                        fused_rows,
                        rows: at..at + len,
                    };
                    parts.insert(format!("{layer}.{name}.weight"), part);
                    at += len;
                }
            };
            split(
                "self_attn.qkv_proj",
                &[
                    ("self_attn.q_proj", q),
                    ("self_attn.k_proj", kv),
                    ("self_attn.v_proj", kv),
                ],
            );
            split(
                "mlp.gate_up_proj",
                &[("mlp.gate_proj", i), ("mlp.up_proj", i)],
            );
        }
        FusedParts { inner, parts }
    }

    /// The fused tensor and row offset behind `name`, when it is a part that the fused
    /// tensor really holds (its rows the parts' sum; otherwise the layers' shape check
    /// names the missing part).
    fn part(&self, name: &str) -> Option<(&str, usize)> {
        let part = self.parts.get(name)?;
        let shape = self.inner.shape(&part.fused)?;
        (shape.len() == 2 && shape[0] == part.fused_rows)
            .then_some((part.fused.as_str(), part.rows.start))
    }
}

impl TensorSource for FusedParts {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self.part(name) {
            Some((fused, _)) => {
                let cols = self.inner.shape(fused)?[1];
                Some(vec![self.parts[name].rows.len(), cols])
            }
            None => self.inner.shape(name),
        }
    }

    fn read_block(&self, name: &str, rows: Range<usize>, cols: Range<usize>) -> Result<Storage> {
        match self.part(name) {
            Some((fused, at)) => {
                let len = self.parts[name].rows.len();
                if rows.end > len || rows.start > rows.end {
                    anyhow::bail!("rows {rows:?} are outside `{name}` ({len} rows)");
                }
                self.inner
                    .read_block(fused, at + rows.start..at + rows.end, cols)
            }
            None => self.inner.read_block(name, rows, cols),
        }
    }

    fn block_size(&self, name: &str) -> usize {
        match self.part(name) {
            Some((fused, _)) => self.inner.block_size(fused),
            None => self.inner.block_size(name),
        }
    }

    fn slice_bytes(&self, name: &str, rows: usize, cols: usize) -> Result<usize> {
        match self.part(name) {
            Some((fused, _)) => self.inner.slice_bytes(fused, rows, cols),
            None => self.inner.slice_bytes(name, rows, cols),
        }
    }
}
