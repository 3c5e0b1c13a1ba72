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
    pub qs: [i8; 32],
}

/// Quantizes `x` (a multiple of 32 long) into `out`.
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in block.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        block.d = d;
        block.s = d * sum as f32;
        block.sum = sum;
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

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512vnni") && has!("avx512vl") {
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
    use std::arch::x86_64::*;

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
    fn quantize_keeps_the_largest_value_exact() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let mut q = [BlockQ8::default()];
        quantize_q8(&x, &mut q);
        assert_eq!(q[0].qs[0], -127);
        assert!((q[0].d * 127.0 - 16.0).abs() < 1e-6);
        assert_eq!(q[0].sum, q[0].qs.iter().map(|&v| v as i32).sum::<i32>());
    }
}
