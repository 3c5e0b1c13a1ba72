//! Attention's two products over a run of cached rows (one KV block: rows `stride` floats
//! apart): the scores of a query against each key, and the softmax-weighted sum of the
//! values.
//!
//! Each score is computed exactly as [`super::dot::dot_f32_fn`] computes it, and each output
//! element accumulates its rows in order with one fused multiply-add each, exactly as a loop
//! of [`super::dot::axpy_fn`] would: only the loop structure changes (calls inlined, the
//! output kept in registers across a block), never a bit of the result.

use super::dot;

/// `out[r] = dot(q, keys[r·stride..][..q.len()]) · scale` for `r < out.len()`.
pub type ScoresFn = fn(q: &[f32], keys: &[f32], stride: usize, scale: f32, out: &mut [f32]);

/// `out += Σ_r weights[r] · values[r·stride..][..out.len()]`, row after row.
pub type WeightedSumFn = fn(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]);

/// Checks that every row lies inside `rows`.
fn check(rows: &[f32], n: usize, stride: usize, width: usize) {
    assert!(
        n == 0 || (n - 1) * stride + width <= rows.len(),
        "rows out of range"
    );
}

pub fn scores_fn() -> ScoresFn {
    #[cfg(target_arch = "x86_64")]
    if dot::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return |q, k, s, scale, out| unsafe { x86::scores(q, k, s, scale, out) };
    }
    scalar::scores
}

pub fn weighted_sum_fn() -> WeightedSumFn {
    #[cfg(target_arch = "x86_64")]
    if dot::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return |w, v, s, out| unsafe { x86::weighted_sum(w, v, s, out) };
    }
    scalar::weighted_sum
}

/// The plain loops these kernels restructure.
pub mod scalar {
    use super::*;

    pub fn scores(q: &[f32], keys: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        check(keys, out.len(), stride, q.len());
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot::scalar::dot_f32(q, &keys[r * stride..r * stride + q.len()]) * scale;
        }
    }

    pub fn weighted_sum(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
        check(values, weights.len(), stride, out.len());
        let d = out.len();
        for (r, &w) in weights.iter().enumerate() {
            dot::scalar::axpy(out, w, &values[r * stride..r * stride + d]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::check;
    use crate::kernels::dot::x86::dot_f32;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], keys: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        check(keys, out.len(), stride, q.len());
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_f32(q, keys.get_unchecked(r * stride..r * stride + q.len())) * scale;
        }
    }

    /// Floats of the output held in registers while a block's rows are added.
    const CHUNK: usize = 64;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
        check(values, weights.len(), stride, out.len());
        let (d, v) = (out.len(), values.as_ptr());
        let mut c = 0;
        while c + CHUNK <= d {
            let o = out.as_mut_ptr().add(c);
            let mut acc: [__m256; CHUNK / 8] =
                std::array::from_fn(|k| _mm256_loadu_ps(o.add(8 * k)));
            for (r, &w) in weights.iter().enumerate() {
                let (w, row) = (_mm256_set1_ps(w), v.add(r * stride + c));
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * k)), *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * k), *a);
            }
            c += CHUNK;
        }
        while c + 8 <= d {
            let o = out.as_mut_ptr().add(c);
            let mut a = _mm256_loadu_ps(o);
            for (r, &w) in weights.iter().enumerate() {
                a = _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(v.add(r * stride + c)), a);
            }
            _mm256_storeu_ps(o, a);
            c += 8;
        }
        for (e, o) in out.iter_mut().enumerate().skip(c) {
            for (r, &w) in weights.iter().enumerate() {
                *o = w.mul_add(*v.add(r * stride + e), *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Both kernels give the bits of the loops they replace (the dot product and axpy of
    /// this CPU), for head sizes with and without tails and strides wider than a row.
    #[test]
    fn kernels_equal_the_loops_they_replace() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (dot, axpy) = (dot::dot_f32_fn(), dot::axpy_fn());
        for d in [1, 8, 13, 64, 80, 128, 200] {
            for (n, stride) in [(1, d), (5, d), (16, 3 * d + 5)] {
                let rows: Vec<f32> = (0..(n - 1) * stride + d)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect();
                let q: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
                let w: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
                let mut want = vec![0.0; n];
                for (r, o) in want.iter_mut().enumerate() {
                    *o = dot(&q, &rows[r * stride..r * stride + d]) * 0.125;
                }
                let mut got = vec![0.0; n];
                scores_fn()(&q, &rows, stride, 0.125, &mut got);
                assert_eq!(got, want, "scores d {d} n {n}");
                let start: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut want = start.clone();
                for (r, &p) in w.iter().enumerate() {
                    axpy(&mut want, p, &rows[r * stride..r * stride + d]);
                }
                for f in [weighted_sum_fn(), scalar::weighted_sum] {
                    let mut got = start.clone();
                    f(&w, &rows, stride, &mut got);
                    assert_eq!(got, want, "weighted sum d {d} n {n}");
                }
            }
        }
    }
}
