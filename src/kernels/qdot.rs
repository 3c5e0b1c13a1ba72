//! 8-bit activations for integer dot products, as llama.cpp computes them: activations are
//! cut into blocks of 32, each scaled to i8; a weight block and an activation block then
//! meet in one integer dot product and one float multiply (the kernels are in `packed` and
//! `kdot`). Also: which instruction set those kernels use.

/// 32 activations as i8 with their scale `d`, and `s = d · Σ qs` (for formats with an
/// offset, like Q4_1, whose blocks add `m · Σ x`).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    /// Σ qs, for formats whose codes are offset (Q4_0's `q − 8`).
    pub sum: i32,
    /// Σ of the first 16 qs (Q6_K's blocks have a scale per 16 weights).
    pub sum_lo: i32,
    pub qs: [i8; 32],
}

/// Quantizes `x` (a multiple of 32 long) into `out`.
/// Every token of a decode step goes through this once per matrix: SIMD where the CPU has
/// it, the same bits as [`quantize_q8_scalar`] (round half to even, as the SIMD
/// conversion rounds).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() >= Isa::Avx2 {
        // SAFETY: the CPU has AVX2 (checked at run time).
        return unsafe { x86::quantize_q8(x, out) };
    }
    quantize_q8_scalar(x, out)
}

/// The scalar twin of [`quantize_q8`].
pub fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in block.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
        }
        let sum_lo = block.qs[..16].iter().map(|&q| q as i32).sum::<i32>();
        let sum = sum_lo + block.qs[16..].iter().map(|&q| q as i32).sum::<i32>();
        block.d = d;
        block.s = d * sum as f32;
        block.sum = sum;
        block.sum_lo = sum_lo;
    }
}

/// Which instruction set the integer kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU supports, unless `TPSERVE_ISA` (scalar, avx2, avx512vnni) asks for
    /// a lesser one (to compare results, or to work around a CPU problem).
    pub fn detect() -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Self::best();
            let wanted = match std::env::var("TPSERVE_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") => Isa::Avx2,
                _ => best,
            };
            wanted.min(best)
        })
    }

    /// The best this CPU supports, whatever `TPSERVE_ISA` says.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            if avx2 && avx512 && has!("avx512vnni") {
                return Isa::Avx512Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every ISA this CPU can run (for tests that compare them all).
    pub fn available() -> Vec<Isa> {
        let all = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];
        all.into_iter().filter(|&i| i <= Self::best()).collect()
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::BlockQ8;
    use std::arch::x86_64::*;

    /// AVX2 twin of [`super::quantize_q8_scalar`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
        let sign_mask = _mm256_set1_ps(-0.0);
        for (block, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
            let abs = v.map(|v| _mm256_andnot_ps(sign_mask, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            // Round to nearest even (the default rounding mode), then narrow to i8.
            let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
            let q16 = _mm256_packs_epi32(
                _mm256_permute2x128_si256(q[0], q[1], 0x20),
                _mm256_permute2x128_si256(q[0], q[1], 0x31),
            );
            let q16b = _mm256_packs_epi32(
                _mm256_permute2x128_si256(q[2], q[3], 0x20),
                _mm256_permute2x128_si256(q[2], q[3], 0x31),
            );
            let q8 = _mm256_packs_epi16(
                _mm256_permute2x128_si256(q16, q16b, 0x20),
                _mm256_permute2x128_si256(q16, q16b, 0x31),
            );
            _mm256_storeu_si256(block.qs.as_mut_ptr() as *mut __m256i, q8);
            let hsum = |v: __m256i| {
                let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
            };
            let sum_lo = hsum(_mm256_add_epi32(q[0], q[1]));
            let sum = sum_lo + hsum(_mm256_add_epi32(q[2], q[3]));
            block.d = d;
            block.s = d * sum as f32;
            block.sum = sum;
            block.sum_lo = sum_lo;
        }
    }

    /// Σ (unsigned u8 × signed i8) over 32 lanes, as 8 i32 partial sums (AVX2).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot_u8_i8_avx2(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// The same with VNNI: one instruction, no 16-bit intermediate.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(crate) unsafe fn dot_u8_i8_vnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_quantize_equals_the_scalar_twin() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for scale in [0.0, 1e-3, 1.0, 300.0] {
            let mut x: Vec<f32> = (0..32 * 40)
                .map(|_| rng.random_range(-1.0..1.0) * scale)
                .collect();
            // Exact halves after scaling, to check rounding ties.
            x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| {
                i as f32 * 0.5 - 7.75
            }));
            x[31] = 63.5;
            let (mut want, mut got) = (vec![BlockQ8::default(); 40], vec![BlockQ8::default(); 40]);
            quantize_q8_scalar(&x, &mut want);
            quantize_q8(&x, &mut got);
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(
                    (w.d, w.s, w.sum, w.sum_lo, w.qs),
                    (g.d, g.s, g.sum, g.sum_lo, g.qs),
                    "scale {scale}"
                );
            }
        }
    }

    #[test]
    fn quantize_keeps_the_largest_value_exact() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let mut q = [BlockQ8::default()];
        quantize_q8(&x, &mut q);
        assert_eq!(q[0].qs[0], -127);
        assert!((q[0].d * 127.0 - 16.0).abs() < 1e-6);
        assert_eq!(q[0].sum, q[0].qs.iter().map(|&v| v as i32).sum::<i32>());
        assert_eq!(
            q[0].sum_lo,
            q[0].qs[..16].iter().map(|&v| v as i32).sum::<i32>()
        );
    }
}
