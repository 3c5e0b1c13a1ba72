//! Element-wise and row-wise operations of a transformer layer, on plain f32 slices.

use super::fixed::from_fixed;

/// `out = x / rms(x) * weight`, computed in f32 as Hugging Face's `LlamaRMSNorm` does.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * scale);
    }
}

/// `x += from_fixed(sums)` (a row-parallel product's all-reduced sums joining the
/// residual stream), fused with the RMSNorm of the result into `out`: one pass over `x`
/// instead of three, and the same bits as converting, adding and normalising apart.
pub fn add_fixed_rms_norm(x: &mut [f32], sums: &[i64], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mut square_sum = 0.0f32;
    for (v, &s) in x.iter_mut().zip(sums) {
        *v += from_fixed(s);
        square_sum += *v * *v;
    }
    let scale = 1.0 / (square_sum / x.len() as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x.iter()).zip(weight) {
        *o = w * (v * scale);
    }
}

/// RMSNorm in place (per-head q/k norms of Qwen3).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = w * (*v * scale);
    }
}

/// Rotary embedding in the "rotate half" layout: element `i` pairs with `i + d/2`.
pub fn rope_in_place(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Numerically stable softmax in place.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SwiGLU: `out[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// GeGLU: `out[i] = gelu(gate[i]) · up[i]`, GELU's tanh form (`gelu_pytorch_tanh`).
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for ((o, &g), u) in out.iter_mut().zip(gate).zip(up) {
        let inner = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g);
        *o = 0.5 * g * (1.0 + inner.tanh()) * u;
    }
}

/// `x = cap · tanh(x / cap)` (Gemma 2's soft-capping of scores and logits).
pub fn softcap_in_place(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// `acc += x`.
pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0, -2.0, 3.0, 0.5];
        let w = [1.0, 2.0, 0.5, -1.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &w, 1e-6, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f32 + 1e-6).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] / rms * w[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut h = [1.0, 2.0, 3.0, 4.0];
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        rope_in_place(&mut h, &c, &s);
        // pair (1, 3) rotated by 90°, pair (2, 4) unchanged
        assert_eq!(h, [-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_values() {
        let mut x = [1000.0, 1001.0, 999.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }
}
