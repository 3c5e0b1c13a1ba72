//! Integer dot products of K-quant blocks (Q4_K, Q6_K: 256 weights) with 8-bit activations.
//!
//! A K-block meets the 8 activation blocks of 32 that cover it; the kernel returns the
//! contribution of each 32-weight group, so callers can sum a whole row (f32) or segments of
//! it (fixed point, see [`super::fixed`]). Scalar twins; AVX2 and AVX-512 VNNI versions.

use super::qdot::{BlockQ8, Isa};
use super::quant::{f16_at, q4_k_scale_min, QuantType};

/// One K-block's bytes and its 8 activation blocks → the 8 groups' contributions.
pub type KDotFn = fn(&[u8], &[BlockQ8], &mut [f32; 8]);

pub mod scalar {
    use super::{f16_at, q4_k_scale_min, BlockQ8};

    /// Group g = 2c (low nibbles of qs[32c..32c+32]) or 2c + 1 (high nibbles):
    /// d·sc·d_x·Σ q·x_q − dmin·m·s_x.
    pub fn q4_k(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        for (g, o) in out.iter_mut().enumerate() {
            let (sc, m) = q4_k_scale_min(g, &b[4..16]);
            let qs = &b[16 + (g / 2) * 32..16 + (g / 2) * 32 + 32];
            let sum: i32 = qs
                .iter()
                .zip(&x[g].qs)
                .map(|(&q, &v)| (if g % 2 == 0 { q & 0x0f } else { q >> 4 }) as i32 * v as i32)
                .sum();
            *o = d * sc * x[g].d * sum as f32 - dmin * m * x[g].s;
        }
    }

    /// Group g = 4h + k (weights 128h + 32k ..): two 16-weight halves with their own scales.
    pub fn q6_k(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
        let d = f16_at(b, 208);
        for (g, o) in out.iter_mut().enumerate() {
            let (h, k) = (g / 4, g % 4);
            let ql = &b[h * 64..h * 64 + 64];
            let qh = &b[128 + h * 32..128 + h * 32 + 32];
            let sc = &b[192 + h * 8..192 + h * 8 + 8];
            let mut halves = [0i32; 2];
            for l in 0..32 {
                let low = if k % 2 == 0 { ql[l] } else { ql[l + 32] };
                let low = if k < 2 { low & 0x0f } else { low >> 4 };
                let q = (low | (((qh[l] >> (2 * k)) & 3) << 4)) as i32 - 32;
                halves[l / 16] += q * x[g].qs[l] as i32;
            }
            let (sa, sb) = (sc[2 * k] as i8 as f32, sc[2 * k + 1] as i8 as f32);
            *o = d * x[g].d * (sa * halves[0] as f32 + sb * halves[1] as f32);
        }
    }
}

/// The group kernel for `ty` on `isa`; `None` for formats that are not K-quants.
pub fn kdot_fn(ty: QuantType, isa: Isa) -> Option<KDotFn> {
    Some(match (ty, isa) {
        (QuantType::Q4K, Isa::Scalar) => scalar::q4_k,
        (QuantType::Q6K, Isa::Scalar) => scalar::q6_k,
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q4K, Isa::Avx2) => |b, x, o| unsafe { x86::q4_k_avx2(b, x, o) },
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q6K, Isa::Avx2) => |b, x, o| unsafe { x86::q6_k_avx2(b, x, o) },
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q4K, Isa::Avx512Vnni) => |b, x, o| unsafe { x86::q4_k_vnni(b, x, o) },
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q6K, Isa::Avx512Vnni) => |b, x, o| unsafe { x86::q6_k_vnni(b, x, o) },
        _ => return None,
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{f16_at, q4_k_scale_min, BlockQ8};
    use crate::kernels::qdot::x86::{dot_u8_i8_avx2, dot_u8_i8_vnni};
    use std::arch::x86_64::*;

    /// Sums of i32 lanes 0..4 and 4..8 (weights 0..16 and 16..32 of a group).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn halves(v: __m256i) -> (i32, i32) {
        let sum4 = |h: __m128i| {
            let s = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b01_00_11_10));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
        };
        (
            sum4(_mm256_castsi256_si128(v)),
            sum4(_mm256_extracti128_si256(v, 1)),
        )
    }

    macro_rules! kernels {
        ($q4k:ident, $q6k:ident, $features:literal, $dot:ident) => {
            /// # Safety
            /// The CPU must support the enabled features; `b` is one Q4_K block and `x` 8
            /// activation blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn $q4k(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
                assert!(b.len() >= 144 && x.len() >= 8);
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let mask = _mm256_set1_epi8(0x0f);
                for c in 0..4 {
                    let raw = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c) as *const __m256i);
                    let nibbles = [
                        _mm256_and_si256(raw, mask),
                        _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask),
                    ];
                    for (half, w) in nibbles.into_iter().enumerate() {
                        let g = 2 * c + half;
                        let xq = _mm256_loadu_si256(x[g].qs.as_ptr() as *const __m256i);
                        let (lo, hi) = halves($dot(w, xq));
                        let (sc, m) = q4_k_scale_min(g, &b[4..16]);
                        out[g] = d * sc * x[g].d * (lo + hi) as f32 - dmin * m * x[g].s;
                    }
                }
            }

            /// # Safety
            /// The CPU must support the enabled features; `b` is one Q6_K block and `x` 8
            /// activation blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn $q6k(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
                assert!(b.len() >= 210 && x.len() >= 8);
                let d = f16_at(b, 208);
                let (mask4, mask2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
                let ones = _mm256_set1_epi8(1);
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(b.as_ptr().add(h * 64) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(b.as_ptr().add(h * 64 + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(b.as_ptr().add(128 + h * 32) as *const __m256i);
                    let sc = &b[192 + h * 8..192 + h * 8 + 8];
                    let lows = [
                        _mm256_and_si256(ql0, mask4),
                        _mm256_and_si256(ql1, mask4),
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), mask4),
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), mask4),
                    ];
                    let highs = [
                        _mm256_and_si256(qh, mask2),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), mask2),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 4), mask2),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 6), mask2),
                    ];
                    for k in 0..4 {
                        let g = 4 * h + k;
                        // q in 0..64 (unsigned); Σ (q − 32)·x = Σ q·x − 32 Σ x.
                        let q = _mm256_or_si256(lows[k], _mm256_slli_epi16(highs[k], 4));
                        let xq = _mm256_loadu_si256(x[g].qs.as_ptr() as *const __m256i);
                        let (qa, qb) = halves($dot(q, xq));
                        let (xa, xb) = halves($dot(ones, xq));
                        let (sa, sb) = (sc[2 * k] as i8 as f32, sc[2 * k + 1] as i8 as f32);
                        let (a, b2) = ((qa - 32 * xa) as f32, (qb - 32 * xb) as f32);
                        out[g] = d * x[g].d * (sa * a + sb * b2);
                    }
                }
            }
        };
    }

    kernels!(q4_k_avx2, q6_k_avx2, "avx2,fma,f16c", dot_u8_i8_avx2);
    kernels!(
        q4_k_vnni,
        q6_k_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        dot_u8_i8_vnni
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qdot::quantize_q8;
    use rand::{Rng, SeedableRng};

    /// A random K-block with sane f16 scales.
    fn random_block(ty: QuantType, rng: &mut impl Rng) -> Vec<u8> {
        let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.random()).collect();
        let scale = |rng: &mut dyn rand::RngCore| {
            half::f16::from_f32(rng.random_range(-0.05..0.05)).to_le_bytes()
        };
        match ty {
            QuantType::Q4K => {
                b[0..2].copy_from_slice(&scale(rng));
                b[2..4].copy_from_slice(&scale(rng));
            }
            _ => b[208..210].copy_from_slice(&scale(rng)),
        }
        b
    }

    #[test]
    fn kernels_equal_twins_and_the_dequantized_dot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for ty in [QuantType::Q4K, QuantType::Q6K] {
            for _ in 0..20 {
                let block = random_block(ty, &mut rng);
                let x: Vec<f32> = (0..256).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut xq = [BlockQ8::default(); 8];
                quantize_q8(&x, &mut xq);
                let mut twin = [0.0; 8];
                kdot_fn(ty, Isa::Scalar).unwrap()(&block, &xq, &mut twin);
                for isa in Isa::available() {
                    let mut got = [0.0; 8];
                    kdot_fn(ty, isa).unwrap()(&block, &xq, &mut got);
                    for g in 0..8 {
                        let tol = 1e-4 * (1.0 + twin[g].abs());
                        assert!(
                            (got[g] - twin[g]).abs() <= tol,
                            "{ty:?} {isa:?} group {g}: {} vs {}",
                            got[g],
                            twin[g]
                        );
                    }
                }
                // Against the dequantized weights times the quantized activations.
                let mut w = vec![0.0; 256];
                ty.dequantize(&block, &mut w);
                for g in 0..8 {
                    let exact: f32 = (0..32)
                        .map(|l| w[32 * g + l] * xq[g].d * xq[g].qs[l] as f32)
                        .sum();
                    let norm: f32 = (0..32)
                        .map(|l| (w[32 * g + l] * xq[g].d * xq[g].qs[l] as f32).abs())
                        .sum();
                    assert!(
                        (twin[g] - exact).abs() <= 1e-4 * (1.0 + norm),
                        "{ty:?} group {g}: {} vs {exact}",
                        twin[g]
                    );
                }
            }
        }
    }
}
