//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k limit.
    pub top_k: usize,
    pub top_p: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!(
                "temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let p = &self.params;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / p.temperature)),
        );
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        let max = c[0].1;
        let mut total = 0.0;
        for (_, v) in c.iter_mut() {
            *v = (*v - max).exp();
            total += *v;
        }
        // Nucleus: keep the smallest prefix whose probability reaches top_p.
        let mut kept = 0.0;
        let mut keep = c.len();
        for (i, (_, v)) in c.iter().enumerate() {
            kept += *v / total;
            if kept >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);
        let sum: f32 = c.iter().map(|(_, v)| v).sum();
        let mut r = self.rng.random::<f32>() * sum;
        for &(id, v) in c.iter() {
            if r < v {
                return id;
            }
            r -= v;
        }
        c[c.len() - 1].0
    }
}

/// The index of the largest logit; the first one on ties (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest logits, descending (ties: lower id first).
pub fn top_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 1,
            top_p: 1.0,
            seed: Some(7),
        };
        let mut s = Sampler::new(params.clone());
        assert_eq!(s.sample(&logits), argmax(&logits));
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                top_k: 0,
                seed: Some(seed),
                ..params.clone()
            });
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds almost all the mass: top_p 0.5 must always pick it.
        let mut logits = vec![0.0; 50];
        logits[17] = 20.0;
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: Some(1),
        });
        assert!((0..200).all(|_| s.sample(&logits) == 17));
    }
}
