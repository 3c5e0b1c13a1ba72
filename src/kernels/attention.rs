//! Attention's two products over a run of cached rows (one KV block: rows `stride` values
//! apart), for each type the KV cache stores (f32, f16, bf16): the scores of a query against
//! each key, and the softmax-weighted sum of the values; and the online softmax that joins
//! them block by block.
//!
//! A score sums its products in eight lanes (one fused multiply-add per element, eight
//! elements apart), then adds the lanes pairwise, then the tail past a multiple of eight:
//! eight keys are scored at once and their lanes added in one transposing sum, with no
//! per-key horizontal sum. Each output element of the weighted sum accumulates its rows in
//! order with one fused multiply-add each, exactly as a loop of [`super::dot::axpy_fn`]
//! over the widened rows would. The scalar twins spell out both orders; every SIMD kernel
//! gives their bits.

use super::exp::exp;
use half::{bf16, f16};

/// `out[r] = dot(q, keys[r·stride..][..q.len()]) · scale` for `r < out.len()`.
pub type ScoresFn<T> = fn(q: &[f32], keys: &[T], stride: usize, scale: f32, out: &mut [f32]);

/// `out += Σ_r weights[r] · values[r·stride..][..out.len()]`, row after row.
pub type WeightedSumFn<T> = fn(weights: &[f32], values: &[T], stride: usize, out: &mut [f32]);

/// A type the KV cache stores, with its kernels.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn scores_fn() -> ScoresFn<Self>;
    fn weighted_sum_fn() -> WeightedSumFn<Self>;
}

/// Asks the CPU to bring `rows` into the cache ahead of use: KV blocks are a few KB each
/// and scattered, too short for the hardware prefetchers to catch on to, so attention asks
/// for the next block while it works on this one. Into L2 (`T1`), not L1: a block is 64
/// lines, more misses than L1 tracks at once, and asking for L1 measured 1.8× slower per
/// block (`cargo bench --bench kernels`, docs/BENCHMARKS.md). Changes no result.
pub fn prefetch<T>(rows: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let (p, bytes) = (rows.as_ptr() as *const i8, std::mem::size_of_val(rows));
        for at in (0..bytes).step_by(64) {
            // SAFETY: prefetching is a hint that never faults; the address is inside `rows`.
            unsafe { _mm_prefetch(p.add(at), _MM_HINT_T1) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = rows;
}

/// `scores[i] = exp(scores[i] − max)` for every score; returns their sum, added in eight
/// lanes (score i in lane i mod 8) and then pairwise. exp is a polynomial of fused
/// multiply-adds, within 2 ulp of the true value; below −87 it is exactly 0.
pub type ExpSumFn = fn(scores: &mut [f32], max: f32) -> f32;

/// The fastest exact [`ExpSumFn`] this CPU runs.
pub fn exp_sum_fn() -> ExpSumFn {
    #[cfg(target_arch = "x86_64")]
    if x86::supported() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return |s, max| unsafe { x86::exp_sum(s, max) };
    }
    scalar::exp_sum
}

/// One KV block's step of online softmax (flash attention's running form) for one query
/// head: `scores` (this block's, masked ones −∞) become the block's unnormalised weights
/// `exp(score − max)`, after `max` has risen to the block's largest score and `sum` and
/// `out` (the weighted sum so far) have been rescaled to it; `sum` gains the weights.
/// Returns false, and leaves everything as it was, when every score is −∞: the block
/// adds nothing. Dividing `out` by `sum` after the last block gives the attention output,
/// with no buffer that grows with the context.
pub fn online_softmax_step(
    exp_sum: ExpSumFn,
    scores: &mut [f32],
    max: &mut f32,
    sum: &mut f32,
    out: &mut [f32],
) -> bool {
    let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if block_max == f32::NEG_INFINITY {
        return false;
    }
    if block_max > *max {
        let rescale = exp(*max - block_max);
        *sum *= rescale;
        out.iter_mut().for_each(|o| *o *= rescale);
        *max = block_max;
    }
    *sum += exp_sum(scores, *max);
    true
}

/// Checks that every row lies inside `rows`.
fn check<T>(rows: &[T], n: usize, stride: usize, width: usize) {
    assert!(
        n == 0 || (n - 1) * stride + width <= rows.len(),
        "rows out of range"
    );
}

macro_rules! kv_elem {
    ($t:ty, $to_f32:expr, $scores:ident, $sum:ident) => {
        impl KvElem for $t {
            fn to_f32(self) -> f32 {
                $to_f32(self)
            }

            fn scores_fn() -> ScoresFn<Self> {
                #[cfg(target_arch = "x86_64")]
                if x86::supported() {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                    return |q, k, s, scale, out| unsafe { x86::$scores(q, k, s, scale, out) };
                }
                scalar::scores
            }

            fn weighted_sum_fn() -> WeightedSumFn<Self> {
                #[cfg(target_arch = "x86_64")]
                if x86::supported() {
                    // SAFETY: as above.
                    return |w, v, s, out| unsafe { x86::$sum(w, v, s, out) };
                }
                scalar::weighted_sum
            }
        }
    };
}

kv_elem!(f32, |v: f32| v, scores_f32, weighted_sum_f32);
kv_elem!(f16, f16::to_f32, scores_f16, weighted_sum_f16);
kv_elem!(bf16, bf16::to_f32, scores_bf16, weighted_sum_bf16);

/// The plain loops these kernels restructure.
pub mod scalar {
    use super::*;

    pub fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        let mut lanes = [0.0f32; 8];
        for (i, s) in scores.iter_mut().enumerate() {
            *s = exp(*s - max);
            lanes[i % 8] += *s;
        }
        sum_lanes(lanes)
    }

    /// The lanes added pairwise.
    pub fn sum_lanes([a, b, c, d, e, f, g, h]: [f32; 8]) -> f32 {
        ((a + b) + (c + d)) + ((e + f) + (g + h))
    }

    pub fn scores<T: KvElem>(q: &[f32], keys: &[T], stride: usize, scale: f32, out: &mut [f32]) {
        check(keys, out.len(), stride, q.len());
        let body = q.len() - q.len() % 8;
        for (r, o) in out.iter_mut().enumerate() {
            let key = &keys[r * stride..r * stride + q.len()];
            let mut lanes = [0.0f32; 8];
            for c in (0..body).step_by(8) {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    *lane = q[c + l].mul_add(key[c + l].to_f32(), *lane);
                }
            }
            let mut total = sum_lanes(lanes);
            for c in body..q.len() {
                total += q[c] * key[c].to_f32();
            }
            *o = total * scale;
        }
    }

    pub fn weighted_sum<T: KvElem>(weights: &[f32], values: &[T], stride: usize, out: &mut [f32]) {
        check(values, weights.len(), stride, out.len());
        for (r, &w) in weights.iter().enumerate() {
            let row = &values[r * stride..r * stride + out.len()];
            for (o, v) in out.iter_mut().zip(row) {
                *o = w.mul_add(v.to_f32(), *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{check, KvElem};
    use crate::kernels::dot::x86::{hsum8, load_bf16, load_f16};
    use crate::kernels::exp::x86::exp8;
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    pub fn supported() -> bool {
        crate::kernels::dot::has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
    }

    macro_rules! scores {
        ($name:ident, $t:ty, $load:expr) => {
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(
                q: &[f32],
                keys: &[$t],
                stride: usize,
                scale: f32,
                out: &mut [f32],
            ) {
                check(keys, out.len(), stride, q.len());
                let (d, n) = (q.len(), out.len());
                let body = d - d % 8;
                let (qp, kp) = (q.as_ptr(), keys.as_ptr());
                for r in (0..n).step_by(8) {
                    // Eight keys at once; past the end the last key is scored again, unused.
                    let key: [*const $t; 8] =
                        std::array::from_fn(|k| kp.add((r + k).min(n - 1) * stride));
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (0..body).step_by(8) {
                        let qv = _mm256_loadu_ps(qp.add(c));
                        for (a, k) in acc.iter_mut().zip(key) {
                            *a = _mm256_fmadd_ps(qv, $load(k.add(c)), *a);
                        }
                    }
                    let mut sums = [0.0f32; 8];
                    _mm256_storeu_ps(sums.as_mut_ptr(), hsum8(acc));
                    for (k, total) in sums.into_iter().enumerate().take(n - r) {
                        let mut total = total;
                        for c in body..d {
                            total += *qp.add(c) * (*key[k].add(c)).to_f32();
                        }
                        *out.get_unchecked_mut(r + k) = total * scale;
                    }
                }
            }
        };
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        let (n, p) = (scores.len(), scores.as_mut_ptr());
        let m = _mm256_set1_ps(max);
        let mut lanes = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            lanes = _mm256_add_ps(lanes, e);
            i += 8;
        }
        if i < n {
            // The tail padded with −∞, whose exp is 0: a lane plus 0 is the lane.
            let mut tail = [f32::NEG_INFINITY; 8];
            tail[..n - i].copy_from_slice(&scores[i..]);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m));
            _mm256_storeu_ps(tail.as_mut_ptr(), e);
            scores[i..].copy_from_slice(&tail[..n - i]);
            lanes = _mm256_add_ps(lanes, e);
        }
        let mut sums = [0.0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), lanes);
        super::scalar::sum_lanes(sums)
    }

    scores!(scores_f32, f32, |p: *const f32| _mm256_loadu_ps(p));
    scores!(scores_f16, f16, |p: *const f16| load_f16(p));
    scores!(scores_bf16, bf16, |p: *const bf16| load_bf16(p));

    /// Floats of the output held in registers while a block's rows are added.
    const CHUNK: usize = 64;

    macro_rules! weighted_sum {
        ($name:ident, $t:ty, $load:expr) => {
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(weights: &[f32], values: &[$t], stride: usize, out: &mut [f32]) {
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
                            *a = _mm256_fmadd_ps(w, $load(row.add(8 * k)), *a);
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
                        a = _mm256_fmadd_ps(_mm256_set1_ps(w), $load(v.add(r * stride + c)), a);
                    }
                    _mm256_storeu_ps(o, a);
                    c += 8;
                }
                for (e, o) in out.iter_mut().enumerate().skip(c) {
                    for (r, &w) in weights.iter().enumerate() {
                        *o = w.mul_add((*v.add(r * stride + e)).to_f32(), *o);
                    }
                }
            }
        };
    }

    weighted_sum!(weighted_sum_f32, f32, |p: *const f32| _mm256_loadu_ps(p));
    weighted_sum!(weighted_sum_f16, f16, |p: *const f16| load_f16(p));
    weighted_sum!(weighted_sum_bf16, bf16, |p: *const bf16| load_bf16(p));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dot;
    use rand::{Rng, SeedableRng};

    /// Both kernels of every type give the bits of their scalar twins (scores: and agree
    /// with a plain dot product to rounding; weighted sums: axpy over the widened rows), for
    /// head sizes with and without tails, key counts around eight and strides wider than a row.
    fn check_type<T: KvElem>(from: fn(f32) -> T, dot: dot::DotFn<T>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let axpy = dot::axpy_fn();
        for d in [1, 8, 13, 64, 80, 128, 200] {
            for (n, stride) in [(1, d), (5, d), (8, d), (9, 2 * d), (16, 3 * d + 5)] {
                let rows: Vec<T> = (0..(n - 1) * stride + d)
                    .map(|_| from(rng.random_range(-2.0..2.0)))
                    .collect();
                let q: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
                let w: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
                let row = |r: usize| &rows[r * stride..r * stride + d];
                let want: Vec<f32> = (0..n).map(|r| dot(row(r), &q) * 0.125).collect();
                let (mut got, mut twin) = (vec![0.0; n], vec![0.0; n]);
                T::scores_fn()(&q, &rows, stride, 0.125, &mut got);
                scalar::scores(&q, &rows, stride, 0.125, &mut twin);
                assert_eq!(got, twin, "scores d {d} n {n}");
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "scores d {d}");
                }
                let start: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut want = start.clone();
                for (r, &p) in w.iter().enumerate() {
                    let wide: Vec<f32> = row(r).iter().map(|v| v.to_f32()).collect();
                    axpy(&mut want, p, &wide);
                }
                for f in [T::weighted_sum_fn(), scalar::weighted_sum] {
                    let mut got = start.clone();
                    f(&w, &rows, stride, &mut got);
                    assert_eq!(got, want, "weighted sum d {d} n {n}");
                }
            }
        }
    }

    /// Block after block, online softmax gives softmax(scores)·values of the whole row, for
    /// blocks of every size, masked (−∞) positions and a block wholly masked.
    #[test]
    fn online_softmax_over_blocks_is_softmax_over_the_row() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let d = 12;
        for n in [1, 7, 16, 33, 100] {
            let mut scores: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0..30.0)).collect();
            let masked = n / 3;
            scores[..masked].fill(f32::NEG_INFINITY);
            let values: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut weights = scores.clone();
            crate::kernels::ops::softmax_in_place(&mut weights);
            let mut want = vec![0.0; d];
            scalar::weighted_sum(&weights, &values, d, &mut want);
            for block in [1, 4, 16, 64] {
                let (mut max, mut sum, mut out) = (f32::NEG_INFINITY, 0.0, vec![0.0; d]);
                for (b, chunk) in scores.chunks(block).enumerate() {
                    let mut w = chunk.to_vec();
                    let step =
                        online_softmax_step(exp_sum_fn(), &mut w, &mut max, &mut sum, &mut out);
                    if step {
                        scalar::weighted_sum(&w, &values[b * block * d..], d, &mut out);
                    }
                }
                for (o, w) in out.iter().zip(&want) {
                    assert!(
                        (o / sum - w).abs() <= 1e-5,
                        "n {n} block {block}: {o} vs {w}"
                    );
                }
            }
        }
    }

    /// The SIMD exp gives its twin's bits, within 2 ulp of the true exp (std's), from far
    /// below −87 (exactly 0) through 0, at every tail length; NaN stays NaN.
    #[test]
    fn exp_sum_equals_its_twin_and_exp() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for n in 0..40 {
            let x: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => rng.random_range(-100.0..-80.0),
                    1 => f32::NEG_INFINITY,
                    _ => rng.random_range(-30.0..0.0),
                })
                .collect();
            let (mut got, mut twin) = (x.clone(), x.clone());
            let max = 0.5;
            let sum = exp_sum_fn()(&mut got, max);
            assert_eq!(
                sum.to_bits(),
                scalar::exp_sum(&mut twin, max).to_bits(),
                "n {n}"
            );
            assert_eq!(got, twin, "n {n}");
            for (g, v) in got.iter().zip(&x) {
                let want = (v - max).exp();
                let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
                assert!(
                    v - max < -87.0 && *g == 0.0 || ulp <= 2,
                    "exp({v}) = {g}, want {want}"
                );
            }
        }
        for f in [exp_sum_fn(), scalar::exp_sum] {
            let mut nan = [f32::NAN, -1.0, 0.0];
            assert!(f(&mut nan, 0.0).is_nan() && nan[0].is_nan(), "{nan:?}");
        }
    }

    #[test]
    fn kernels_equal_the_loops_they_replace() {
        check_type::<f32>(|v| v, |w, x| dot::dot_f32_fn()(x, w));
        check_type::<f16>(f16::from_f32, dot::dot_f16_fn());
        check_type::<bf16>(bf16::from_f32, dot::dot_bf16_fn());
    }
}
