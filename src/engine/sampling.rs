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
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Subtracted from a token's logit once per earlier occurrence in the output.
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit once if it occurred in the output.
    pub presence_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
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
        if !(0.0..=1.0).contains(&self.min_p) {
            anyhow::bail!("min_p must be in [0, 1], got {}", self.min_p);
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                anyhow::bail!("{name} must be in [-2, 2], got {v}");
            }
        }
        Ok(())
    }
}

/// The largest top-k that is sampled from vocab-parallel candidates rather than the full
/// logits.
pub const MAX_CANDIDATES: usize = 64;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    candidates: Vec<(u32, f32)>,
    /// Occurrences of each token in the output so far (for the penalties).
    counts: std::collections::HashMap<u32, u32>,
    penalized: Vec<f32>,
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
            counts: Default::default(),
            penalized: Vec::new(),
        }
    }

    /// Chooses the next token and records it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let id = if self.counts.is_empty()
            || (p.frequency_penalty == 0.0 && p.presence_penalty == 0.0)
        {
            self.choose(logits)
        } else {
            let mut penalized = std::mem::take(&mut self.penalized);
            penalized.clear();
            penalized.extend_from_slice(logits);
            for (&id, &n) in &self.counts {
                penalized[id as usize] -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
            let id = self.choose(&penalized);
            self.penalized = penalized;
            id
        };
        *self.counts.entry(id).or_insert(0) += 1;
        id
    }

    /// How many of the largest logits suffice to sample exactly as from the full logits:
    /// 1 for greedy, `top_k` for top-k sampling (up to [`MAX_CANDIDATES`]); `None` when the
    /// full logits are needed (penalties, or sampling over the whole vocabulary).
    pub fn candidates_needed(&self) -> Option<usize> {
        let p = &self.params;
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            return None;
        }
        if p.temperature == 0.0 {
            return Some(1);
        }
        (p.top_k > 0 && p.top_k <= MAX_CANDIDATES).then_some(p.top_k)
    }

    /// Chooses the next token from the largest logits only — (id, logit) sorted by logit
    /// descending, ties lower id first, at least [`Self::candidates_needed`] of them — with
    /// the same result as [`Self::sample`] on the full logits.
    pub fn sample_top(&mut self, top: &[(u32, f32)]) -> u32 {
        let id = if self.params.temperature == 0.0 {
            top[0].0
        } else {
            let t = self.params.temperature;
            self.candidates.clear();
            self.candidates
                .extend(top.iter().map(|&(id, l)| (id, l / t)));
            self.pick()
        };
        *self.counts.entry(id).or_insert(0) += 1;
        id
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        // Ordered by the logits themselves (dividing by t can merge neighbours), as the
        // vocab-parallel candidates are.
        c.sort_unstable_by(by_logit);
        for (_, v) in c.iter_mut() {
            *v /= t;
        }
        self.pick()
    }

    /// Top-k, nucleus and min-p over `self.candidates` (sorted, divided by the
    /// temperature), then one draw.
    fn pick(&mut self) -> u32 {
        let p = &self.params;
        let c = &mut self.candidates;
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
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            c.retain(|&(_, v)| v >= floor);
        }
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

/// `ln softmax(logits)[id]` for the chosen token, and the `top` most likely tokens with
/// theirs (OpenAI's logprobs are of the model's distribution, before sampling settings).
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
    let best = top_logits(logits, top)
        .into_iter()
        .map(|(i, v)| (i, v - log_sum))
        .collect();
    (logits[id as usize] - log_sum, best)
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

/// The order of candidates: (id, logit) by logit descending, ties lower id first — one
/// order for the full logits and the vocab-parallel candidates, so both choose alike.
pub fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `k` largest logits, descending (ties: lower id first).
pub fn top_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    all.sort_by(by_logit);
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
            seed: Some(7),
            ..Default::default()
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
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..200).all(|_| s.sample(&logits) == 17));
    }

    #[test]
    fn penalties_steer_greedy_away_from_repeats() {
        let logits = [1.0, 0.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..Default::default()
        });
        // 0 wins first; then its penalty (0.5) lets 1 win; then both are penalised.
        assert_eq!(
            [s.sample(&logits), s.sample(&logits), s.sample(&logits)],
            [0, 1, 0]
        );
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut logits = vec![0.0; 10];
        logits[3] = 5.0;
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: Some(2),
            ..Default::default()
        });
        assert!((0..100).all(|_| s.sample(&logits) == 3));
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let (lp, top) = logprobs(&[0.0, 1.0, 1.0], 2, 2);
        let expected = 1.0 - (1.0f32 + 2.0 * 1.0f32.exp()).ln();
        assert!((lp - expected).abs() < 1e-6);
        assert_eq!(top.len(), 2);
        assert!(top[0].1 >= top[1].1);
    }
}
