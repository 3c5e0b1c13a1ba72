//! Element-wise and row-wise operations of a transformer layer, on plain f32 slices.

use super::exp::exp;
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

/// SwiGLU: `out[i] = silu(gate[i]) · up[i]` = `gate / (1 + exp(−gate)) · up`, eight at a
/// time where the CPU allows, with [`super::exp`]'s polynomial (the same bits either way).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::exp::x86::supported() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        done = unsafe { x86::silu_mul(&gate[..n], &up[..n], &mut out[..n]) };
    }
    for ((o, &g), u) in out[done..n].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
        *o = silu_one(g) * u;
    }
}

/// silu(g): the scalar twin of one lane of [`x86::silu_mul`].
fn silu_one(g: f32) -> f32 {
    g / (1.0 + exp(-g))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::exp::x86::exp8;
    use std::arch::x86_64::*;

    /// The whole eights of [`super::silu_mul`]; returns how many elements it wrote.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the three slices have one length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
        let body = out.len() - out.len() % 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..body).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            let o = _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), o);
        }
        body
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

    /// SiLU·up equals its scalar twin bit for bit (every length around the SIMD width, and
    /// gates out to where exp saturates), and the definition with the C library's exp to
    /// a few ulp.
    #[test]
    fn silu_mul_equals_its_twin_and_the_definition() {
        let mut x = 0x9e37_79b9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 40.0
        };
        for n in [1, 7, 8, 9, 16, 23, 1000] {
            let mut gate: Vec<f32> = (0..n).map(|_| next()).collect();
            gate[0] = -200.0;
            let up: Vec<f32> = (0..n).map(|_| next()).collect();
            let mut got = vec![0.0; n];
            silu_mul(&gate, &up, &mut got);
            for i in 0..n {
                let (g, u) = (gate[i], up[i]);
                assert_eq!(got[i].to_bits(), (silu_one(g) * u).to_bits(), "n {n} g {g}");
                let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
                assert!(
                    (got[i] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                    "g {g}: {} vs {want}",
                    got[i]
                );
            }
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
