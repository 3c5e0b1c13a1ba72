//! RMSNorm, replicated on every rank.

use crate::kernels::ops;
use crate::loader::TensorSource;
use anyhow::Result;

pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(src: &dyn TensorSource, name: &str, len: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: src.load_vector(name, len, 0..len)?,
            eps,
        })
    }

    /// Gemma's norms store `weight − 1`: the multiplier is `1 + weight` (computed once, in
    /// f32, as transformers does each time).
    pub fn with_unit_offset(mut self) -> Self {
        self.weight.iter_mut().for_each(|w| *w += 1.0);
        self
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight.len() * 4
    }

    pub fn len(&self) -> usize {
        self.weight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weight.is_empty()
    }

    /// Normalises each `len`-wide row of `x` into `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let n = self.weight.len();
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            ops::rms_norm(xr, &self.weight, self.eps, or);
        }
    }

    /// Adds the all-reduced fixed-point `sums` of a row-parallel product to the residual
    /// rows `x`, and normalises the result into `out`, in one pass per row (SGLang's and
    /// vLLM's fused add + RMSNorm after the all-reduce).
    pub fn add_fixed_forward(&self, x: &mut [f32], sums: &[i64], out: &mut [f32]) {
        let n = self.weight.len();
        let rows = x.chunks_exact_mut(n).zip(sums.chunks_exact(n));
        for ((xr, sr), or) in rows.zip(out.chunks_exact_mut(n)) {
            ops::add_fixed_rms_norm(xr, sr, &self.weight, self.eps, or);
        }
    }

    /// Normalises each `len`-wide row of `x` in place.
    pub fn forward_in_place(&self, x: &mut [f32]) {
        for row in x.chunks_exact_mut(self.weight.len()) {
            ops::rms_norm_in_place(row, &self.weight, self.eps);
        }
    }
}
