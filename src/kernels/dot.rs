//! Dot products of a weight row (in its stored format) with an f32 activation vector.
//!
//! Each format has a plain scalar twin (`scalar::*`) and, on x86-64, an AVX2+FMA version
//! chosen at run time. Tests compare every SIMD kernel against its twin.

use half::{bf16, f16};

/// A dot product of a stored row with f32 activations.
pub type DotFn<W> = fn(&[W], &[f32]) -> f32;

/// Tokens a [`DotTileFn`] takes at once.
pub const TILE: usize = 4;

/// [`DotFn`] for [`TILE`] tokens at once (`x` holds them one after another, each as long as
/// the row): the row is read and widened once for all of them, and each token's result has
/// the same bits as [`DotFn`] alone gives it, so a sequence decodes alike alone or batched.
pub type DotTileFn<W> = fn(&[W], &[f32], &mut [f32; TILE]);

/// The one-token and the tile dot product of one format, chosen together.
pub type DotFns<W> = (DotFn<W>, DotTileFn<W>);

pub mod scalar {
    use half::{bf16, f16};

    pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a * b).sum()
    }

    /// The tile twin: [`super::TILE`] one-token products.
    pub fn tile<W>(dot: super::DotFn<W>, w: &[W], x: &[f32], out: &mut [f32; super::TILE]) {
        for (t, o) in out.iter_mut().enumerate() {
            *o = dot(w, &x[t * w.len()..(t + 1) * w.len()]);
        }
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
    dot_f32_fns().0
}

/// The f32 dot products, one token and a tile.
pub fn dot_f32_fns() -> DotFns<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512vl() {
        return (
            |w, x| unsafe { x86::dot_f32(w, x) },
            |w, x, o| unsafe { x86::tile_f32_avx512(w, x, o) },
        );
    } else if has_avx2_fma() {
        return (
            |w, x| unsafe { x86::dot_f32(w, x) },
            |w, x, o| unsafe { x86::tile_f32(w, x, o) },
        );
    }
    (scalar::dot_f32, |w, x, o| {
        scalar::tile(scalar::dot_f32, w, x, o)
    })
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
    dot_bf16_fns().0
}

/// The bf16 dot products, one token and a tile.
pub fn dot_bf16_fns() -> DotFns<bf16> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512vl() {
        return (
            |w, x| unsafe { x86::dot_bf16(w, x) },
            |w, x, o| unsafe { x86::tile_bf16_avx512(w, x, o) },
        );
    } else if has_avx2_fma() {
        return (
            |w, x| unsafe { x86::dot_bf16(w, x) },
            |w, x, o| unsafe { x86::tile_bf16(w, x, o) },
        );
    }
    (scalar::dot_bf16, |w, x, o| {
        scalar::tile(scalar::dot_bf16, w, x, o)
    })
}

pub fn dot_f16_fn() -> DotFn<f16> {
    dot_f16_fns().0
}

/// The f16 dot products, one token and a tile.
pub fn dot_f16_fns() -> DotFns<f16> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c") {
        let dot: DotFn<f16> = |w, x| unsafe { x86::dot_f16(w, x) };
        if has_avx512vl() {
            return (dot, |w, x, o| unsafe { x86::tile_f16_avx512(w, x, o) });
        }
        return (dot, |w, x, o| unsafe { x86::tile_f16(w, x, o) });
    }
    (scalar::dot_f16, |w, x, o| {
        scalar::tile(scalar::dot_f16, w, x, o)
    })
}

#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// AVX-512 VL gives the tile kernels 32 vector registers (16 accumulators stay in them).
#[cfg(target_arch = "x86_64")]
fn has_avx512vl() -> bool {
    has_avx2_fma()
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::TILE;
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

    /// Eight 8-lane accumulators to one vector of their eight sums, in order; each sum is
    /// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))` of its lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
        let s01 = _mm256_hadd_ps(a[0], a[1]);
        let s23 = _mm256_hadd_ps(a[2], a[3]);
        let s45 = _mm256_hadd_ps(a[4], a[5]);
        let s67 = _mm256_hadd_ps(a[6], a[7]);
        let s0123 = _mm256_hadd_ps(s01, s23);
        let s4567 = _mm256_hadd_ps(s45, s67);
        // Each 128-bit half now holds partial sums of all four: add the halves.
        let lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
        let hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
        _mm256_add_ps(lo, hi)
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

    /// `dot_body` for [`TILE`] tokens: each weight vector loaded once for all of them, every
    /// token's four accumulators, their combination and the scalar tail exactly as
    /// `dot_body` does them.
    macro_rules! tile_body {
        ($w:expr, $x:expr, $out:expr, $load:expr, $tail:expr) => {{
            let n = $w.len();
            assert!($x.len() >= TILE * n);
            let (wp, xp) = ($w.as_ptr(), $x.as_ptr());
            let mut acc = [[_mm256_setzero_ps(); 4]; TILE];
            let mut i = 0;
            while i + 32 <= n {
                let wv = [0, 8, 16, 24].map(|k| $load(wp.add(i + k)));
                for (t, a) in acc.iter_mut().enumerate() {
                    for (k, (a, &w)) in a.iter_mut().zip(&wv).enumerate() {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(t * n + i + 8 * k)), *a);
                    }
                }
                i += 32;
            }
            while i + 8 <= n {
                let w = $load(wp.add(i));
                for (t, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(t * n + i)), a[0]);
                }
                i += 8;
            }
            for (t, (a, o)) in acc.iter().zip($out.iter_mut()).enumerate() {
                let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                let mut total = hsum(sum);
                for j in i..n {
                    total += $tail(*wp.add(j)) * *xp.add(t * n + j);
                }
                *o = total;
            }
        }};
    }

    /// The tile kernels, as AVX2 and as AVX-512 VL (the same instructions with 32 registers).
    macro_rules! tile_fns {
        ($name:ident, $wide:ident, $w:ty, $load:expr, $tail:expr) => {
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(w: &[$w], x: &[f32], out: &mut [f32; TILE]) {
                tile_body!(w, x, out, $load, $tail)
            }

            /// # Safety
            /// The CPU must support AVX2, FMA, F16C, AVX-512 F and VL.
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
            pub unsafe fn $wide(w: &[$w], x: &[f32], out: &mut [f32; TILE]) {
                tile_body!(w, x, out, $load, $tail)
            }
        };
    }

    tile_fns!(
        tile_f32,
        tile_f32_avx512,
        f32,
        |p: *const f32| _mm256_loadu_ps(p),
        |v: f32| v
    );
    tile_fns!(
        tile_bf16,
        tile_bf16_avx512,
        bf16,
        |p| load_bf16(p),
        |v: bf16| v.to_f32()
    );
    tile_fns!(tile_f16, tile_f16_avx512, f16, |p| load_f16(p), |v: f16| v
        .to_f32());
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

    /// Every tile kernel gives each token the bits its one-token kernel gives.
    #[test]
    fn tiles_equal_one_token_products_bit_for_bit() {
        fn check<W: Copy>(fns: DotFns<W>, w: &[W], x: &[f32], name: &str) {
            let mut out = [0.0; TILE];
            fns.1(w, x, &mut out);
            for (t, &v) in out.iter().enumerate() {
                let alone = fns.0(w, &x[t * w.len()..(t + 1) * w.len()]);
                assert_eq!(
                    v.to_bits(),
                    alone.to_bits(),
                    "{name}, n {}, token {t}",
                    w.len()
                );
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in lengths() {
            let w: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let x: Vec<f32> = (0..TILE * n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            check(dot_f32_fns(), &w, &x, "f32");
            check(dot_bf16_fns(), &wb, &x, "bf16");
            check(dot_f16_fns(), &wh, &x, "f16");
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c") {
                // The AVX2 build as well, where this CPU would choose the AVX-512 one.
                check(
                    (
                        |w, x| unsafe { x86::dot_f16(w, x) },
                        |w, x, o| unsafe { x86::tile_f16(w, x, o) },
                    ),
                    &wh,
                    &x,
                    "f16 avx2",
                );
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
