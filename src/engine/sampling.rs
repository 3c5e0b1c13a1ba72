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
            self.candidates.clear();
            self.candidates.extend_from_slice(top);
            self.pick(None)
        };
        *self.counts.entry(id).or_insert(0) += 1;
        id
    }

    /// From the full logits without sorting the vocabulary: top-k selects its k and sorts
    /// those; plain sampling draws in id order; a nucleus sorts only as many of the best as
    /// it needs.
    fn choose(&mut self, logits: &[f32]) -> u32 {
        let SamplingParams {
            temperature,
            top_k,
            top_p,
            ..
        } = self.params;
        if temperature == 0.0 {
            return argmax(logits);
        }
        if top_k > 0 {
            self.select_best(logits, top_k);
            return self.pick(None);
        }
        let max = logits
            .iter()
            .map(|&l| logit_key(l))
            .fold(f32::NEG_INFINITY, f32::max);
        let weight = |l: f32| weight(logit_key(l), max, temperature);
        if top_p >= 1.0 {
            return self.draw_in_id_order(logits, weight);
        }
        let total: f32 = logits.iter().map(|&l| weight(l)).sum();
        let mut k = MAX_CANDIDATES.min(logits.len());
        loop {
            self.select_best(logits, k);
            let mass: f32 = self.candidates.iter().map(|&(_, l)| weight(l)).sum();
            if mass >= top_p * total || k == logits.len() {
                return self.pick(Some(total));
            }
            k = (4 * k).min(logits.len());
        }
    }

    /// The `k` best of `logits` into `self.candidates`, sorted by [`by_logit`].
    fn select_best(&mut self, logits: &[f32], k: usize) {
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if k < c.len() {
            c.select_nth_unstable_by(k - 1, by_logit);
            c.truncate(k);
        }
        c.sort_unstable_by(by_logit);
    }

    /// One draw over the whole vocabulary (no top-k, no nucleus): min-p filters by weight,
    /// which needs no order. Each weight is computed once; the best weighs 1 >= min_p, so
    /// the kept list is never empty.
    fn draw_in_id_order(&mut self, logits: &[f32], weight: impl Fn(f32) -> f32) -> u32 {
        let min_p = self.params.min_p;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(id, &l)| (id as u32, weight(l)))
                .filter(|&(_, w)| w > 0.0 && w >= min_p),
        );
        let sum: f32 = c.iter().map(|&(_, w)| w).sum();
        let mut r = self.rng.random::<f32>() * sum;
        for &(id, w) in c.iter() {
            if r < w {
                return id;
            }
            r -= w;
        }
        c[c.len() - 1].0
    }

    /// Top-k, nucleus and min-p over `self.candidates` (sorted by [`by_logit`], not empty),
    /// then one draw. The nucleus is measured against `total`, the weight of the whole
    /// vocabulary when the candidates are only its best part (`None`: the candidates').
    fn pick(&mut self, total: Option<f32>) -> u32 {
        let p = &self.params;
        let c = &mut self.candidates;
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        let max = logit_key(c[0].1);
        let mut sum = 0.0;
        for (_, v) in c.iter_mut() {
            *v = weight(logit_key(*v), max, p.temperature);
            sum += *v;
        }
        let total = total.unwrap_or(sum);
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
        // Tokens of no weight (−∞: masked out, or placeholders) are never drawn; the best
        // weighs 1 >= min_p, so it is never dropped.
        c.retain(|&(_, v)| v > 0.0 && v >= p.min_p);
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

/// A token's unnormalised probability: `exp((logit - max) / temperature)`, with the best
/// logit (and any equal to it) weighing exactly 1, so that no temperature, however small
/// or large, and no infinite or NaN logit (`logit` and `max` are [`logit_key`]s) makes it NaN,
/// and the best token always stays in the draw.
fn weight(logit: f32, max: f32, temperature: f32) -> f32 {
    if logit == max {
        1.0
    } else if logit == f32::NEG_INFINITY {
        // exp(−∞) without the call: most of a constrained row is masked out.
        0.0
    } else {
        ((logit - max) / temperature).exp()
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

/// The index of the largest logit; the first one on ties (as torch.argmax). NaN counts as
/// minus infinity, as in [`by_logit`], so both choose alike.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if logit_key(v).total_cmp(&logit_key(logits[best])).is_gt() {
            best = i;
        }
    }
    best as u32
}

/// A logit as it ranks: NaN (a broken model, never a choice worth making) as minus infinity.
pub fn logit_key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// The order of candidates: (id, logit) by logit descending (NaN as minus infinity), ties
/// lower id first — one order for the full logits and the vocab-parallel candidates, so both
/// choose alike.
pub fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    logit_key(b.1)
        .total_cmp(&logit_key(a.1))
        .then(a.0.cmp(&b.0))
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
    use proptest::prelude::*;

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
    fn tiny_temperature_with_min_p_is_greedy() {
        // 1e-40 / a logit overflows to inf; the best token must still be drawn, never a panic.
        let logits = [0.5, 3.0, -1.0, 2.9, f32::NAN, f32::NEG_INFINITY];
        for temperature in [1e-40, f32::from_bits(1), 1e-30] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                min_p: 0.5,
                seed: Some(3),
                ..Default::default()
            });
            assert!((0..50).all(|_| s.sample(&logits) == 1), "t {temperature}");
        }
    }

    #[test]
    fn draws_follow_the_probabilities_with_and_without_a_nucleus() {
        // Weights 1 : 2 : 3 : 4 (and a vocabulary of negligible tokens around them).
        let mut logits = vec![-30.0f32; 200];
        for (i, w) in [(3, 1.0f32), (70, 2.0), (150, 3.0), (199, 4.0)] {
            logits[i] = w.ln();
        }
        for (top_p, want) in [
            (1.0, [0.1, 0.2, 0.3, 0.4]),
            (0.65, [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]),
        ] {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p,
                seed: Some(11),
                ..Default::default()
            });
            let mut counts = [0usize; 4];
            let draws = 20000;
            for _ in 0..draws {
                let id = s.sample(&logits);
                counts[[3, 70, 150, 199].iter().position(|&i| i == id).unwrap()] += 1;
            }
            for (c, w) in counts.iter().zip(want) {
                let f = *c as f64 / draws as f64;
                assert!((f - w).abs() < 0.015, "top_p {top_p}: {counts:?}");
            }
        }
    }

    #[test]
    fn nan_and_placeholder_logits_rank_last() {
        assert_eq!(argmax(&[f32::NAN, -5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        let mut v = [(0, f32::NAN), (1, f32::NEG_INFINITY), (2, -1.0)];
        v.sort_by(by_logit);
        assert_eq!(v.map(|c| c.0), [2, 0, 1]);
    }

    /// Temperatures from the smallest positive float to the largest, with their edges.
    fn temperature() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(0.0),
            Just(f32::from_bits(1)),
            Just(1e-40),
            Just(f32::MIN_POSITIVE),
            Just(f32::MAX),
            (1e-45f32..1e-30),
            (1e-6f32..10.0),
            (10.0f32..3e38),
        ]
    }

    fn probability(lowest: f32) -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(lowest),
            Just(1.0),
            Just(f32::MIN_POSITIVE),
            0.0f32..=1.0
        ]
        .prop_filter("in range", move |&p| {
            p >= lowest && p > 0.0 || lowest == 0.0
        })
    }

    fn logit() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => -20.0f32..20.0,
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::NAN),
            1 => Just(f32::MAX),
            1 => Just(-f32::MAX),
            1 => Just(0.0),
            1 => Just(-0.0),
            1 => Just(1.0),
        ]
    }

    fn params() -> impl Strategy<Value = SamplingParams> {
        (
            temperature(),
            0usize..80,
            probability(0.0).prop_filter("top_p > 0", |&p| p > 0.0),
            probability(0.0),
            -2.0f32..=2.0,
            prop_oneof![Just(-2.0f32), Just(0.0), Just(2.0), -2.0f32..=2.0],
            any::<u64>(),
        )
            .prop_map(
                |(temperature, top_k, top_p, min_p, fp, pp, seed)| SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    frequency_penalty: fp,
                    presence_penalty: pp,
                    seed: Some(seed),
                },
            )
    }

    /// Whether `id` may be drawn from `logits` (already penalised) under `p`, from the
    /// definitions in f64: inside the top k, inside the nucleus (with a little slack for
    /// f32 sums), at least `min_p` times as likely as the best, never NaN while a number
    /// is on offer.
    fn allowed(p: &SamplingParams, logits: &[f32], id: u32) -> Result<(), String> {
        let id = id as usize;
        if id >= logits.len() {
            return Err(format!("id {id} outside the vocabulary"));
        }
        let mut order: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        order.sort_by(by_logit);
        let rank = order.iter().position(|c| c.0 as usize == id).unwrap();
        let best = logit_key(order[0].1) as f64;
        let key = |l: f32| logit_key(l) as f64;
        if p.temperature == 0.0 {
            return (rank == 0)
                .then_some(())
                .ok_or("greedy took another".into());
        }
        if p.top_k > 0 && rank >= p.top_k {
            return Err(format!("rank {rank} outside top_k {}", p.top_k));
        }
        if logits[id].is_nan() && best > f64::NEG_INFINITY {
            return Err("drew a NaN logit".into());
        }
        let weight = |l: f32| {
            if key(l) == best {
                1.0
            } else {
                ((key(l) - best) / p.temperature as f64).exp()
            }
        };
        let pool = if p.top_k > 0 {
            &order[..p.top_k.min(order.len())]
        } else {
            &order[..]
        };
        let total: f64 = pool.iter().map(|c| weight(c.1)).sum();
        let mut mass = 0.0;
        let nucleus = pool
            .iter()
            .position(|c| {
                mass += weight(c.1) / total;
                mass >= (p.top_p as f64 + 1e-4).min(1.0 - 1e-9)
            })
            .map_or(pool.len(), |i| i + 1);
        if rank >= nucleus {
            return Err(format!("rank {rank} outside the nucleus of {nucleus}"));
        }
        if p.min_p > 0.0 && weight(logits[id]) < p.min_p as f64 * (1.0 - 1e-4) {
            return Err(format!("weight {} below min_p", weight(logits[id])));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn always_draws_an_allowed_token(
            params in params(),
            logits in prop::collection::vec(logit(), 1..300),
        ) {
            prop_assume!(params.validate().is_ok());
            let mut s = Sampler::new(params.clone());
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for _ in 0..4 {
                let mut penalised = logits.clone();
                for (&id, &n) in &counts {
                    penalised[id as usize] -=
                        params.frequency_penalty * n as f32 + params.presence_penalty;
                }
                let id = s.sample(&logits);
                if let Err(e) = allowed(&params, &penalised, id) {
                    prop_assert!(false, "{e}: {params:?} {penalised:?} -> {id}");
                }
                *counts.entry(id).or_insert(0) += 1;
            }
        }

        #[test]
        fn candidates_draw_what_the_full_logits_draw(
            params in params(),
            logits in prop::collection::vec(logit(), 1..48),
        ) {
            prop_assume!(params.validate().is_ok());
            let params = SamplingParams { frequency_penalty: 0.0, presence_penalty: 0.0, ..params };
            let mut full = Sampler::new(params.clone());
            let mut top = Sampler::new(params.clone());
            // Candidates serve only where the sampler says they suffice.
            let Some(k) = full.candidates_needed() else {
                return Ok(());
            };
            let candidates = top_logits(&logits, k);
            for _ in 0..4 {
                prop_assert_eq!(full.sample(&logits), top.sample_top(&candidates));
            }
        }
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
