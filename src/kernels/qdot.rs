//! Integer dot products of quantized weight rows with 8-bit quantized activations, as
//! llama.cpp computes them: activations are cut into blocks of 32, each scaled to i8; a
//! weight block and an activation block then meet in one integer dot product and one float
//! multiply. Decode reads ~4.5 bits per weight and does no dequantization.
//!
//! Every kernel has a scalar twin (`scalar::*`); the AVX2 and AVX-512 VNNI versions are
//! chosen at run time and tested against it.

use super::quant::{f16_at, QuantType};

/// 32 activations as i8 with their scale `d`, and `s = d · Σ qs` (for formats with an
/// offset, like Q4_1, whose blocks add `m · Σ x`).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
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
    }
}

/// Four quantized rows (their blocks' bytes) · the same quantized activations, as f32.
pub type QDot4Fn = fn([&[u8]; 4], &[BlockQ8]) -> [f32; 4];

/// The same, summed per segment of `seg_blocks` blocks, each converted to fixed point (see
/// [`super::fixed`]).
pub type QDot4FixedFn = fn([&[u8]; 4], &[BlockQ8], usize) -> [i64; 4];

pub mod scalar {
    use super::{f16_at, BlockQ8};

    pub fn dot_q8_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        w.chunks_exact(34)
            .zip(x)
            .map(|(b, a)| {
                let sum: i32 = b[2..34]
                    .iter()
                    .zip(&a.qs)
                    .map(|(&q, &v)| q as i8 as i32 * v as i32)
                    .sum();
                f16_at(b, 0) * a.d * sum as f32
            })
            .sum()
    }

    pub fn dot_q4_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        w.chunks_exact(18)
            .zip(x)
            .map(|(b, a)| {
                let mut sum = 0i32;
                for (j, &q) in b[2..18].iter().enumerate() {
                    sum += ((q & 0x0f) as i32 - 8) * a.qs[j] as i32;
                    sum += ((q >> 4) as i32 - 8) * a.qs[j + 16] as i32;
                }
                f16_at(b, 0) * a.d * sum as f32
            })
            .sum()
    }

    pub fn dot_q4_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        w.chunks_exact(20)
            .zip(x)
            .map(|(b, a)| {
                let mut sum = 0i32;
                for (j, &q) in b[4..20].iter().enumerate() {
                    sum += (q & 0x0f) as i32 * a.qs[j] as i32;
                    sum += (q >> 4) as i32 * a.qs[j + 16] as i32;
                }
                f16_at(b, 0) * a.d * sum as f32 + f16_at(b, 2) * a.s
            })
            .sum()
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

/// Twin of the 4-row kernel from a single-row scalar dot.
fn scalar_rows4(dot: fn(&[u8], &[BlockQ8]) -> f32, rows: [&[u8]; 4], x: &[BlockQ8]) -> [f32; 4] {
    rows.map(|r| dot(r, x))
}

fn scalar_rows4_fixed(
    dot: fn(&[u8], &[BlockQ8]) -> f32,
    block_bytes: usize,
    rows: [&[u8]; 4],
    x: &[BlockQ8],
    seg_blocks: usize,
) -> [i64; 4] {
    rows.map(|r| {
        r.chunks_exact(seg_blocks * block_bytes)
            .zip(x.chunks_exact(seg_blocks))
            .map(|(w, x)| super::fixed::to_fixed(dot(w, x)))
            .sum()
    })
}

/// The 4-row integer kernels for `ty` on `isa`; `None` for formats without them
/// (K-quants, which decode by dequantizing).
pub fn qdot4_fns(ty: QuantType, isa: Isa) -> Option<(QDot4Fn, QDot4FixedFn)> {
    macro_rules! twin {
        ($dot:path, $bytes:expr) => {
            (
                |r, x| scalar_rows4($dot, r, x),
                |r, x, s| scalar_rows4_fixed($dot, $bytes, r, x, s),
            )
        };
    }
    #[cfg(target_arch = "x86_64")]
    macro_rules! simd {
        ($f32:ident, $fixed:ident) => {
            (
                |r, x| unsafe { x86::$f32(r, x) },
                |r, x, s| unsafe { x86::$fixed(r, x, s) },
            )
        };
    }
    Some(match (ty, isa) {
        (QuantType::Q8_0, Isa::Scalar) => twin!(scalar::dot_q8_0, 34),
        (QuantType::Q4_0, Isa::Scalar) => twin!(scalar::dot_q4_0, 18),
        (QuantType::Q4_1, Isa::Scalar) => twin!(scalar::dot_q4_1, 20),
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q8_0, Isa::Avx2) => simd!(q8_0_avx2, q8_0_avx2_fixed),
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q4_0, Isa::Avx2) => simd!(q4_0_avx2, q4_0_avx2_fixed),
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q4_1, Isa::Avx2) => simd!(q4_1_avx2, q4_1_avx2_fixed),
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q8_0, Isa::Avx512Vnni) => simd!(q8_0_vnni, q8_0_vnni_fixed),
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q4_0, Isa::Avx512Vnni) => simd!(q4_0_vnni, q4_0_vnni_fixed),
        #[cfg(target_arch = "x86_64")]
        (QuantType::Q4_1, Isa::Avx512Vnni) => simd!(q4_1_vnni, q4_1_vnni_fixed),
        _ => return None,
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::BlockQ8;
    use crate::kernels::fixed::x86::to_fixed4;
    use std::arch::x86_64::*;

    /// 16 bytes of nibbles as 32 bytes: low nibbles (weights 0..16), then high (16..32).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// The f16 at byte `at` of each of four rows, as four f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x4(rows: &[*const u8; 4], at: usize) -> __m128 {
        let h = |r: usize| (rows[r].add(at) as *const i16).read_unaligned();
        _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0)))
    }

    /// Four 8-lane sums to one vector of the four totals.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum4(a: [__m256; 4]) -> __m128 {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
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

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weights_q8_0(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.add(2) as *const __m256i)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weights_q4_0(p: *const u8) -> __m256i {
        _mm256_sub_epi8(unpack_nibbles(p.add(2)), _mm256_set1_epi8(8))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weights_q4_1(p: *const u8) -> __m256i {
        unpack_nibbles(p.add(4))
    }

    /// For one format and instruction set: the segment sums of four rows over `x`, and the
    /// two public kernels built on them (whole rows as f32, segments as fixed point).
    macro_rules! kernels {
        ($f32:ident, $fixed:ident, $segment:ident, $features:literal, $dot:ident,
         $weights:ident, $bytes:expr, signed: $signed:expr, offset: $offset:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $segment(rows: &[*const u8; 4], x: &[BlockQ8]) -> __m128 {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut offsets = _mm_setzero_ps();
                for (b, a) in x.iter().enumerate() {
                    let at = b * $bytes;
                    let xq = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let scales: [f32; 4] =
                        std::mem::transmute(_mm_mul_ps(f16x4(rows, at), _mm_set1_ps(a.d)));
                    for r in 0..4 {
                        let w = $weights(rows[r].add(at));
                        let sum = if $signed {
                            $dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w))
                        } else {
                            $dot(w, xq)
                        };
                        let scale = _mm256_set1_ps(scales[r]);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[r]);
                    }
                    if $offset {
                        offsets = _mm_fmadd_ps(f16x4(rows, at + 2), _mm_set1_ps(a.s), offsets);
                    }
                }
                _mm_add_ps(hsum4(acc), offsets)
            }

            /// # Safety
            /// The CPU must support the enabled features.
            #[target_feature(enable = $features)]
            pub unsafe fn $f32(rows: [&[u8]; 4], x: &[BlockQ8]) -> [f32; 4] {
                assert!(rows.iter().all(|r| r.len() == x.len() * $bytes));
                std::mem::transmute($segment(&rows.map(|r| r.as_ptr()), x))
            }

            /// # Safety
            /// The CPU must support the enabled features.
            #[target_feature(enable = $features)]
            pub unsafe fn $fixed(rows: [&[u8]; 4], x: &[BlockQ8], seg_blocks: usize) -> [i64; 4] {
                assert!(seg_blocks > 0 && x.len().is_multiple_of(seg_blocks));
                assert!(rows.iter().all(|r| r.len() == x.len() * $bytes));
                let mut ptrs = rows.map(|r| r.as_ptr());
                let mut total = _mm256_setzero_si256();
                for xs in x.chunks_exact(seg_blocks) {
                    total = _mm256_add_epi64(total, to_fixed4($segment(&ptrs, xs)));
                    ptrs = ptrs.map(|p| p.add(seg_blocks * $bytes));
                }
                std::mem::transmute(total)
            }
        };
    }

    kernels!(q8_0_avx2, q8_0_avx2_fixed, q8_0_avx2_seg, "avx2,fma,f16c", dot_u8_i8_avx2,
             weights_q8_0, 34, signed: true, offset: false);
    kernels!(q4_0_avx2, q4_0_avx2_fixed, q4_0_avx2_seg, "avx2,fma,f16c", dot_u8_i8_avx2,
             weights_q4_0, 18, signed: true, offset: false);
    kernels!(q4_1_avx2, q4_1_avx2_fixed, q4_1_avx2_seg, "avx2,fma,f16c", dot_u8_i8_avx2,
             weights_q4_1, 20, signed: false, offset: true);
    kernels!(q8_0_vnni, q8_0_vnni_fixed, q8_0_vnni_seg, "avx2,fma,f16c,avx512vnni,avx512vl",
             dot_u8_i8_vnni, weights_q8_0, 34, signed: true, offset: false);
    kernels!(q4_0_vnni, q4_0_vnni_fixed, q4_0_vnni_seg, "avx2,fma,f16c,avx512vnni,avx512vl",
             dot_u8_i8_vnni, weights_q4_0, 18, signed: true, offset: false);
    kernels!(q4_1_vnni, q4_1_vnni_fixed, q4_1_vnni_seg, "avx2,fma,f16c,avx512vnni,avx512vl",
             dot_u8_i8_vnni, weights_q4_1, 20, signed: false, offset: true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fixed::from_fixed;
    use half::f16;
    use rand::{Rng, SeedableRng};

    /// Random blocks of `ty` with sane f16 scales.
    fn random_row(ty: QuantType, blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut row: Vec<u8> = (0..blocks * ty.block_bytes())
            .map(|_| rng.random())
            .collect();
        for b in row.chunks_exact_mut(ty.block_bytes()) {
            b[0..2].copy_from_slice(&f16::from_f32(rng.random_range(-0.1..0.1)).to_le_bytes());
            if ty == QuantType::Q4_1 {
                b[2..4].copy_from_slice(&f16::from_f32(rng.random_range(-0.5..0.5)).to_le_bytes());
            }
        }
        row
    }

    #[test]
    fn every_isa_equals_the_scalar_twin() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            for blocks in [1, 2, 6, 18, 48] {
                let rows: Vec<Vec<u8>> = (0..4).map(|_| random_row(ty, blocks, &mut rng)).collect();
                let rows = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
                let x: Vec<f32> = (0..blocks * 32)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                let mut q = vec![BlockQ8::default(); blocks];
                quantize_q8(&x, &mut q);
                let (twin, twin_fixed) = qdot4_fns(ty, Isa::Scalar).unwrap();
                let seg = if blocks % 2 == 0 { 2 } else { 1 };
                let (want, want_fixed) = (twin(rows, &q), twin_fixed(rows, &q, seg));
                for isa in Isa::available() {
                    let (f, fixed) = qdot4_fns(ty, isa).unwrap();
                    let (got, got_fixed) = (f(rows, &q), fixed(rows, &q, seg));
                    for r in 0..4 {
                        let tol = 1e-4 * (1.0 + want[r].abs());
                        assert!(
                            (got[r] - want[r]).abs() <= tol,
                            "{ty:?} {isa:?} {blocks}: {got:?} vs {want:?}"
                        );
                        let (g, w) = (from_fixed(got_fixed[r]), from_fixed(want_fixed[r]));
                        assert!((g - w).abs() <= tol, "{ty:?} {isa:?} fixed: {g} vs {w}");
                        assert!(
                            (w - want[r]).abs() <= tol,
                            "fixed twin far from the float twin"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn integer_dot_approximates_the_float_dot() {
        // The 8-bit activations lose < 1% of a typical dot product.
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let row = random_row(ty, 18, &mut rng);
            let x: Vec<f32> = (0..18 * 32).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut w = vec![0.0; x.len()];
            ty.dequantize(&row, &mut w);
            let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
            let norm: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            let mut q = vec![BlockQ8::default(); 18];
            quantize_q8(&x, &mut q);
            let rows = [&row[..], &row[..], &row[..], &row[..]];
            let got = qdot4_fns(ty, Isa::detect()).unwrap().0(rows, &q)[0];
            assert!(
                (got - exact).abs() <= 0.01 * norm,
                "{ty:?}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn quantize_keeps_the_largest_value_exact() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let mut q = [BlockQ8::default()];
        quantize_q8(&x, &mut q);
        assert_eq!(q[0].qs[0], -127);
        assert!((q[0].d * 127.0 - 16.0).abs() < 1e-6);
    }
}
