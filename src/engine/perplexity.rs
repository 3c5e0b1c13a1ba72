//! Perplexity as llama.cpp's `llama-perplexity` measures it: non-overlapping windows of
//! `ctx` tokens, each scored only on its second half (so every scored token has at least
//! ctx/2 tokens of context).

use super::runtime::Driver;
use crate::kernels::Phase;
use crate::model::Logits;
use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub ppl: f64,
    /// Tokens scored.
    pub tokens: usize,
    pub windows: usize,
}

/// Scores `tokens` in windows of `ctx`. With `bos`, each window's first token is replaced
/// by it (as llama.cpp does for models that add a BOS). `progress(done, total, ppl)` is
/// called after each window.
pub fn perplexity(
    driver: &mut Driver,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    if ctx < 4 {
        bail!("--ctx must be at least 4");
    }
    if tokens.len() < 2 * ctx {
        bail!(
            "the text has {} tokens; perplexity at --ctx {ctx} needs at least {} (two windows)",
            tokens.len(),
            2 * ctx
        );
    }
    if ctx > driver.kv_capacity() {
        bail!(
            "--ctx {ctx} exceeds the KV capacity of {}",
            driver.kv_capacity()
        );
    }
    let vocab = driver.config().vocab_size;
    let windows = tokens.len() / ctx;
    let first = ctx / 2;
    let (mut nll, mut count) = (0.0f64, 0usize);
    let mut window = Vec::with_capacity(ctx);
    for w in 0..windows {
        window.clear();
        window.extend_from_slice(&tokens[w * ctx..(w + 1) * ctx]);
        if let Some(b) = bos {
            window[0] = b;
        }
        let logits = driver.forward_one(&window, 0, Logits::From(first), Phase::Prefill)?;
        for pos in first..ctx - 1 {
            let row = &logits[(pos - first) * vocab..(pos - first + 1) * vocab];
            let target = tokens[w * ctx + pos + 1] as usize;
            nll += log_sum_exp(row) - row[target] as f64;
            count += 1;
        }
        progress(w + 1, windows, (nll / count as f64).exp());
    }
    Ok(Perplexity {
        ppl: (nll / count as f64).exp(),
        tokens: count,
        windows,
    })
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_sum_exp_is_stable() {
        let v = super::log_sum_exp(&[1000.0, 1000.0]);
        assert!((v - (1000.0 + 2f64.ln())).abs() < 1e-9);
    }
}
