//! Rotary position embedding: default, linear, Llama 3 and per-frequency scaling.

use crate::loader::config::{Llama3Scaling, RopeConfig, RopeScaling};

pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(head_dim: usize, rope: &RopeConfig) -> Self {
        // Computed in f32 as transformers does, so positions rotate by the same angles.
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / rope.theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match &rope.scaling {
            None => {}
            Some(RopeScaling::Llama3(s)) => apply_llama3_scaling(&mut inv_freq, s),
            Some(RopeScaling::Linear(factor)) => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::FreqFactors(factors)) => {
                for (f, factor) in inv_freq.iter_mut().zip(factors) {
                    *f /= factor;
                }
            }
        }
        Rotary { inv_freq }
    }

    /// cos and sin of each frequency at position `pos` (each `head_dim / 2` long).
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = f * pos as f32;
            *c = angle.cos();
            *s = angle.sin();
        }
    }
}

/// Llama 3.1's scaling: long wavelengths are slowed by `factor`, short ones kept, and the
/// band between interpolated smoothly.
fn apply_llama3_scaling(inv_freq: &mut [f32], s: &Llama3Scaling) {
    let old = s.original_max_position_embeddings;
    let low_freq_wavelen = old / s.low_freq_factor;
    let high_freq_wavelen = old / s.high_freq_factor;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        if wavelen > low_freq_wavelen {
            *f /= s.factor;
        } else if wavelen >= high_freq_wavelen {
            let smooth =
                (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
            *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
        }
    }
}

/// Llama 3's scaling as one factor per frequency, computed as llama.cpp's converter does
/// (in f64) when it writes a GGUF's `rope_freqs` tensor.
pub fn llama3_freq_factors(s: &Llama3Scaling, theta: f32, head_dim: usize) -> Vec<f32> {
    let old = s.original_max_position_embeddings as f64;
    let (low, high, factor) = (
        s.low_freq_factor as f64,
        s.high_freq_factor as f64,
        s.factor as f64,
    );
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f64).powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let r = if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            r as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GGUF form of Llama 3's scaling (a factor per frequency) rotates by the angles
    /// of the config form, to f32 rounding.
    #[test]
    fn llama3_factors_give_llama3_frequencies() {
        let s = Llama3Scaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let rope = |scaling| RopeConfig {
            theta: 500000.0,
            scaling: Some(scaling),
        };
        let direct = Rotary::new(64, &rope(RopeScaling::Llama3(s.clone())));
        let factors = llama3_freq_factors(&s, 500000.0, 64);
        let stored = Rotary::new(64, &rope(RopeScaling::FreqFactors(factors.clone())));
        assert!(factors.contains(&1.0) && factors.contains(&32.0));
        assert!(factors.iter().any(|&f| f > 1.0 && f < 32.0), "{factors:?}");
        for (a, b) in direct.inv_freq.iter().zip(&stored.inv_freq) {
            assert!((a - b).abs() <= 2e-7 * a.abs(), "{a} vs {b}");
        }
    }
}
