//! Dot products of a weight row (in its stored format) with an f32 activation vector.
//!
//! Each format has a plain scalar twin (`scalar::*`) and, on x86-64, an AVX2+FMA version
//! chosen at run time. Tests compare every SIMD kernel against its twin.

use half::{bf16, f16};

/// A dot product of a stored row with f32 activations.
pub type DotFn<W> = fn(&[W], &[f32]) -> f32;

pub mod scalar {
    use half::{bf16, f16};

    pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a * b).sum()
    }

    /// `acc += alpha · x`, each element with one rounding (as the SIMD version's FMA).
    pub fn axpy(acc: &mut [f32], alpha: f32, x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = alpha.mul_add(v, *a);
        }
    }

    pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }

    pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }
}

/// The fastest f32 dot product this CPU supports.
pub fn dot_f32_fn() -> DotFn<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return |w, x| unsafe { x86::dot_f32(w, x) };
    }
    scalar::dot_f32
}

/// `acc += alpha · x` (attention's weighted sum of values).
pub type AxpyFn = fn(&mut [f32], f32, &[f32]);

pub fn axpy_fn() -> AxpyFn {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return |acc, alpha, x| unsafe { x86::axpy(acc, alpha, x) };
    }
    scalar::axpy
}

pub fn dot_bf16_fn() -> DotFn<bf16> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return |w, x| unsafe { x86::dot_bf16(w, x) };
    }
    scalar::dot_bf16
}

pub fn dot_f16_fn() -> DotFn<f16> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c") {
        return |w, x| unsafe { x86::dot_f16(w, x) };
    }
    scalar::dot_f16
}

#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Four independent accumulators of 8 lanes hide the FMA latency.
    macro_rules! dot_body {
        ($w:expr, $x:expr, $load:expr, $tail:expr) => {{
            let n = $w.len().min($x.len());
            let (wp, xp) = ($w.as_ptr(), $x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let off = i + 8 * k;
                    *a = _mm256_fmadd_ps($load(wp.add(off)), _mm256_loadu_ps(xp.add(off)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum(sum);
            while i < n {
                total += $tail(*wp.add(i)) * *xp.add(i);
                i += 1;
            }
            total
        }};
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        dot_body!(w, x, |p: *const f32| _mm256_loadu_ps(p), |v: f32| v)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(acc: &mut [f32], alpha: f32, x: &[f32]) {
        let n = acc.len().min(x.len());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let p = acc.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)),
            );
            i += 8;
        }
        for j in i..n {
            acc[j] = alpha.mul_add(x[j], acc[j]);
        }
    }

    /// bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
        dot_body!(w, x, |p| load_bf16(p), |v: bf16| v.to_f32())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
        dot_body!(w, x, |p| load_f16(p), |v: f16| v.to_f32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn lengths() -> impl Iterator<Item = usize> {
        (0..70).chain([127, 128, 129, 576, 1000, 4099])
    }

    fn close(a: f32, b: f32, n: usize) -> bool {
        // Different summation order: error grows with length, relative to the magnitude.
        (a - b).abs() <= 1e-5 * (n as f32).sqrt().max(1.0) * (1.0 + b.abs())
    }

    #[test]
    fn simd_dots_equal_scalar_twins() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for n in lengths() {
            let w: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let pairs = [
                (dot_f32_fn()(&w, &x), scalar::dot_f32(&w, &x)),
                (dot_bf16_fn()(&wb, &x), scalar::dot_bf16(&wb, &x)),
                (dot_f16_fn()(&wh, &x), scalar::dot_f16(&wh, &x)),
            ];
            for (i, (simd, twin)) in pairs.into_iter().enumerate() {
                assert!(close(simd, twin, n), "format {i}, n {n}: {simd} vs {twin}");
            }
        }
    }

    #[test]
    fn simd_axpy_equals_its_twin_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for n in lengths() {
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let start: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let (mut simd, mut twin) = (start.clone(), start);
            axpy_fn()(&mut simd, 0.37, &x);
            scalar::axpy(&mut twin, 0.37, &x);
            assert_eq!(simd, twin, "n {n}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn this_machine_runs_the_simd_path() {
        // Guards against a dispatch that silently falls back to scalar everywhere.
        if has_avx2_fma() {
            assert_ne!(
                dot_f32_fn() as usize,
                scalar::dot_f32 as DotFn<f32> as usize
            );
        }
    }
}
