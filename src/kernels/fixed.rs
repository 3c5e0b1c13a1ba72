//! Fixed-point partial sums for row-parallel products.
//!
//! A row-parallel product sums, over its input columns, terms that different ranks own.
//! Float addition is not associative, so a sum split over ranks rounds differently from the
//! same sum on one rank — and 8-bit activation quantization downstream turns those last-bit
//! differences into whole quantization steps. Summing instead fixed-size column segments,
//! each converted to 64-bit fixed point, is exact and order-free: any split over ranks (at
//! segment boundaries) gives the same bits as tp = 1.

/// Fractional bits: a resolution of 2.3e-10.
pub const FRAC_BITS: i32 = 32;

/// Largest magnitude a segment sum may have (2¹⁸): far above real activations, and small
/// enough that a SIMD conversion through f64 (exact below 2⁵¹) needs no special cases.
pub const LIMIT: f64 = (1u64 << 18) as f64;

/// 1.5·2⁵²: a value below 2⁵¹ in magnitude added to it rounds to an integer (to nearest,
/// ties to even), which then sits in the low mantissa bits.
const MAGIC: f64 = 6755399441055744.0;

/// `v` in fixed point: scaled, clamped to ±LIMIT, rounded to nearest (ties to even), as the
/// SIMD conversions do it (one add, no library call for the rounding).
#[inline]
pub fn to_fixed(v: f32) -> i64 {
    let clamped = (v as f64).clamp(-LIMIT, LIMIT);
    let scaled = clamped * (1u64 << FRAC_BITS) as f64;
    (scaled + MAGIC).to_bits() as i64 - MAGIC.to_bits() as i64
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{FRAC_BITS, LIMIT, MAGIC};
    use std::arch::x86_64::*;

    /// Four f32 to fixed point (scaled, clamped, rounded ties-to-even) as four i64: the
    /// SIMD twin of [`super::to_fixed`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn to_fixed4(v: __m128) -> __m256i {
        let d = _mm256_cvtps_pd(v);
        let d = _mm256_min_pd(
            _mm256_max_pd(d, _mm256_set1_pd(-LIMIT)),
            _mm256_set1_pd(LIMIT),
        );
        let scaled = _mm256_mul_pd(d, _mm256_set1_pd((1u64 << FRAC_BITS) as f64));
        let magic = _mm256_set1_pd(MAGIC);
        let bits = _mm256_castpd_si256(_mm256_add_pd(scaled, magic));
        _mm256_sub_epi64(bits, _mm256_castpd_si256(magic))
    }

    /// Sixteen f32 to fixed point, less cheaply exact bookkeeping: the two halves' i64
    /// values plus [`MAGIC`]'s bits each. Sums of such values are corrected once with
    /// [`unbias`] (wrapping i64 adds are associative), so a kernel that sums many segments
    /// pays one clamp, two conversions and two fused multiply-adds per segment. The
    /// scaling by 2³² is exact, so the fused form rounds exactly as [`to_fixed4`].
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn to_biased_fixed16(v: __m512) -> [__m512i; 2] {
        let v = _mm512_min_ps(
            _mm512_max_ps(v, _mm512_set1_ps(-LIMIT as f32)),
            _mm512_set1_ps(LIMIT as f32),
        );
        let scale = _mm512_set1_pd((1u64 << FRAC_BITS) as f64);
        let magic = _mm512_set1_pd(MAGIC);
        let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
            _mm512_castps_pd(v),
            1,
        )));
        [
            _mm512_castpd_si512(_mm512_fmadd_pd(lo, scale, magic)),
            _mm512_castpd_si512(_mm512_fmadd_pd(hi, scale, magic)),
        ]
    }

    /// A sum of `count` values of [`to_biased_fixed16`], corrected to fixed point.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn unbias(sum: __m512i, count: usize) -> __m512i {
        let bias = (MAGIC.to_bits() as i64).wrapping_mul(count as i64);
        _mm512_sub_epi64(sum, _mm512_set1_epi64(bias))
    }
}

#[inline]
pub fn from_fixed(v: i64) -> f32 {
    (v as f64 / (1u64 << FRAC_BITS) as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The add-and-subtract rounding is round-half-to-even, also on exact ties and at the
    /// clamps.
    #[test]
    fn to_fixed_rounds_ties_to_even() {
        let reference = |v: f32| {
            let clamped = (v as f64).clamp(-LIMIT, LIMIT);
            (clamped * (1u64 << FRAC_BITS) as f64).round_ties_even() as i64
        };
        let ulp = 1.0 / (1u64 << FRAC_BITS) as f64;
        let mut values: Vec<f32> = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
            .iter()
            .map(|k| (k * ulp) as f32)
            .collect();
        values.extend([
            0.0,
            -0.0,
            1e-12,
            -3.7,
            1e9,
            -1e9,
            f32::MAX,
            f32::MIN,
            262143.99,
        ]);
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if v.is_finite() {
                values.push(v);
            }
        }
        for v in values {
            assert_eq!(to_fixed(v), reference(v), "{v:e}");
        }
    }

    #[test]
    fn sums_do_not_depend_on_grouping() {
        let terms: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.5)
            .collect();
        let all: i64 = terms.iter().map(|&t| to_fixed(t)).sum();
        let (a, b) = terms.split_at(377);
        let split = a.iter().map(|&t| to_fixed(t)).sum::<i64>()
            + b.iter().map(|&t| to_fixed(t)).sum::<i64>();
        assert_eq!(all, split);
        let float: f64 = terms.iter().map(|&t| t as f64).sum();
        assert!((from_fixed(all) as f64 - float).abs() < 1e-5);
    }
}
