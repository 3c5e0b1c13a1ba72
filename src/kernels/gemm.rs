//! The prefill micro-kernels: two f32 weight rows against four tokens at once.
//!
//! A plain dot product loads two vectors per multiply-add; these kernels load six per eight
//! (two row vectors, four token vectors), so they run on the FMA units rather than the load
//! ports. Rows in other formats are widened or dequantized into f32 first, once per row for
//! all tokens. The fixed-point variant sums `segment`-column pieces exactly (see
//! [`super::fixed`]) for row-parallel products.

use super::fixed::to_fixed;

/// `out[r][t] = rows[r] · xs[t]` for two rows and four tokens.
pub type Dot2x4 = fn([&[f32]; 2], [&[f32]; 4]) -> [[f32; 4]; 2];

/// The same as a sum over `segment`-column pieces, each converted to fixed point.
pub type Dot2x4Fixed = fn([&[f32]; 2], [&[f32]; 4], usize) -> [[i64; 4]; 2];

pub mod scalar {
    use super::to_fixed;
    use crate::kernels::dot::scalar::dot_f32;

    pub fn dot_2x4(rows: [&[f32]; 2], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
        rows.map(|row| xs.map(|x| dot_f32(row, x)))
    }

    pub fn dot_2x4_fixed(rows: [&[f32]; 2], xs: [&[f32]; 4], segment: usize) -> [[i64; 4]; 2] {
        rows.map(|row| {
            xs.map(|x| {
                row.chunks_exact(segment)
                    .zip(x.chunks_exact(segment))
                    .map(|(r, v)| to_fixed(dot_f32(r, v)))
                    .sum()
            })
        })
    }
}

/// The fastest 2×4 kernel this CPU supports.
pub fn dot_2x4_fn() -> Dot2x4 {
    #[cfg(target_arch = "x86_64")]
    if super::dot::has_avx2_fma() {
        return |rows, xs| unsafe { x86::dot_2x4(rows, xs) };
    }
    scalar::dot_2x4
}

/// The fastest fixed-point 2×4 kernel this CPU supports (segments a multiple of 8 on x86).
pub fn dot_2x4_fixed_fn(segment: usize) -> Dot2x4Fixed {
    #[cfg(target_arch = "x86_64")]
    if super::dot::has_avx2_fma() && segment.is_multiple_of(8) {
        return |rows, xs, segment| unsafe { x86::dot_2x4_fixed(rows, xs, segment) };
    }
    let _ = segment;
    scalar::dot_2x4_fixed
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::dot::x86::hsum8;
    use crate::kernels::fixed::x86::to_fixed4;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; all six slices must have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_2x4(rows: [&[f32]; 2], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let n = rows[0].len();
        assert!(rows[1].len() == n && xs.iter().all(|x| x.len() == n));
        let (r0, r1) = (rows[0].as_ptr(), rows[1].as_ptr());
        let xp = xs.map(|x| x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i + 8 <= n {
            let (w0, w1) = (_mm256_loadu_ps(r0.add(i)), _mm256_loadu_ps(r1.add(i)));
            for t in 0..4 {
                let x = _mm256_loadu_ps(xp[t].add(i));
                acc[0][t] = _mm256_fmadd_ps(w0, x, acc[0][t]);
                acc[1][t] = _mm256_fmadd_ps(w1, x, acc[1][t]);
            }
            i += 8;
        }
        let mut out = [[0.0; 4]; 2];
        for r in 0..2 {
            for t in 0..4 {
                out[r][t] = hsum(acc[r][t]);
            }
        }
        for j in i..n {
            for t in 0..4 {
                let x = *xp[t].add(j);
                out[0][t] += *r0.add(j) * x;
                out[1][t] += *r1.add(j) * x;
            }
        }
        out
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; all six slices must have the same length, a
    /// multiple of `segment`, which is a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_2x4_fixed(
        rows: [&[f32]; 2],
        xs: [&[f32]; 4],
        segment: usize,
    ) -> [[i64; 4]; 2] {
        let n = rows[0].len();
        assert!(rows[1].len() == n && xs.iter().all(|x| x.len() == n));
        assert!(segment.is_multiple_of(8) && n.is_multiple_of(segment));
        let (r0, r1) = (rows[0].as_ptr(), rows[1].as_ptr());
        let xp = xs.map(|x| x.as_ptr());
        // Fixed-point totals: lanes (row 0, tokens 0..4) and (row 1, tokens 0..4).
        let (mut total0, mut total1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut start = 0;
        while start < n {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut i = start;
            while i < start + segment {
                let (w0, w1) = (_mm256_loadu_ps(r0.add(i)), _mm256_loadu_ps(r1.add(i)));
                for t in 0..4 {
                    let x = _mm256_loadu_ps(xp[t].add(i));
                    acc[t] = _mm256_fmadd_ps(w0, x, acc[t]);
                    acc[4 + t] = _mm256_fmadd_ps(w1, x, acc[4 + t]);
                }
                i += 8;
            }
            let sums = hsum8(acc);
            total0 = _mm256_add_epi64(total0, to_fixed4(_mm256_castps256_ps128(sums)));
            total1 = _mm256_add_epi64(total1, to_fixed4(_mm256_extractf128_ps(sums, 1)));
            start += segment;
        }
        let mut out = [[0i64; 4]; 2];
        _mm256_storeu_si256(out[0].as_mut_ptr() as *mut __m256i, total0);
        _mm256_storeu_si256(out[1].as_mut_ptr() as *mut __m256i, total1);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fixed::from_fixed;
    use rand::{Rng, SeedableRng};

    fn data(rng: &mut impl Rng, n: usize) -> ([Vec<f32>; 2], [Vec<f32>; 4]) {
        let mut v = || {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect::<Vec<_>>()
        };
        ([v(), v()], [v(), v(), v(), v()])
    }

    #[test]
    fn simd_kernel_equals_scalar_twin() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for n in (0..40).chain([576, 1000, 1536]) {
            let (rows, xs) = data(&mut rng, n);
            let (rows, xs) = (
                rows.each_ref().map(|r| &r[..]),
                xs.each_ref().map(|x| &x[..]),
            );
            let (fast, twin) = (dot_2x4_fn()(rows, xs), scalar::dot_2x4(rows, xs));
            for r in 0..2 {
                for t in 0..4 {
                    let tol = 1e-5 * (n as f32).sqrt().max(1.0);
                    assert!((fast[r][t] - twin[r][t]).abs() <= tol, "n {n} r {r} t {t}");
                }
            }
        }
    }

    #[test]
    fn fixed_simd_kernel_equals_scalar_twin() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        for (n, segment) in [(64, 64), (576, 64), (352, 16), (1536, 32), (48, 8)] {
            let (rows, xs) = data(&mut rng, n);
            let (rows, xs) = (
                rows.each_ref().map(|r| &r[..]),
                xs.each_ref().map(|x| &x[..]),
            );
            let fast = dot_2x4_fixed_fn(segment)(rows, xs, segment);
            let twin = scalar::dot_2x4_fixed(rows, xs, segment);
            let float = scalar::dot_2x4(rows, xs);
            for r in 0..2 {
                for t in 0..4 {
                    let (f, w) = (from_fixed(fast[r][t]), from_fixed(twin[r][t]));
                    assert!((f - w).abs() <= 1e-5, "n {n} seg {segment}: {f} vs {w}");
                    assert!(
                        (w - float[r][t]).abs() <= 1e-4,
                        "fixed sum far from the float sum"
                    );
                }
            }
        }
    }
}
