//! Rotary position embedding: default and Llama 3 frequency scaling.

use crate::loader::config::{Llama3Scaling, RopeConfig};

pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(head_dim: usize, rope: &RopeConfig) -> Self {
        // Computed in f32 as transformers does, so positions rotate by the same angles.
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / rope.theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        if let Some(s) = &rope.llama3 {
            apply_llama3_scaling(&mut inv_freq, s);
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
