//! Single-precision exp as a polynomial (Cephes), with a SIMD twin that gives the same bits
//! lane by lane: attention's softmax and SwiGLU's SiLU use it instead of the C library's
//! `expf`, which has no vector form and would make the SIMD and scalar paths differ.

use consts::*;

/// Cephes' single-precision exp: `x = n·ln 2 + r`, a degree-6 polynomial in `r`, times
/// 2ⁿ built from its bits. Every step is one the SIMD kernel takes lane by lane.
pub fn exp(x: f32) -> f32 {
    // `min(HI, x)` and `max(LO, ·)` as the SIMD instructions do them: the second
    // operand when unordered, so NaN stays NaN.
    let clamped = {
        let hi = if HI < x { HI } else { x };
        if LO > hi {
            LO
        } else {
            hi
        }
    };
    let n = (clamped * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, clamped);
    let r = n.mul_add(-LN2_LO, r);
    let mut y = P[0];
    for p in &P[1..] {
        y = y.mul_add(r, *p);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        y * scale
    }
}

/// Cephes' constants (see [`exp`]).
mod consts {
    /// Inputs are clamped to [LO, HI]: 2ⁿ stays a normal float; below LO exp is 0.
    pub const HI: f32 = 88.0;
    pub const LO: f32 = -87.0;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 in two parts, so that `x − n·ln 2` loses no bits.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::consts::*;
    use std::arch::x86_64::*;

    /// Whether the CPU runs [`exp8`].
    pub fn supported() -> bool {
        crate::kernels::dot::has_avx2_fma()
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let clamped = _mm256_max_ps(_mm256_set1_ps(LO), _mm256_min_ps(_mm256_set1_ps(HI), x));
        let n = _mm256_round_ps(
            _mm256_mul_ps(clamped, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), clamped);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut y = _mm256_set1_ps(P[0]);
        for p in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*p));
        }
        let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
        let y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        let e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
        let below = _mm256_cmp_ps(x, _mm256_set1_ps(LO), _CMP_LT_OQ);
        _mm256_andnot_ps(below, e)
    }
}
