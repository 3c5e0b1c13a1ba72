//! Integer dot products of 256-weight blocks (Q2_K … Q6_K, IQ4_XS) with 8-bit activations.
//!
//! A K-block meets the 8 activation blocks of 32 that cover it, for one token or several;
//! the kernel returns the contribution of each 32-weight group, so callers can sum a whole
//! row (f32) or segments of it (fixed point, see [`super::fixed`]). The SIMD kernels unpack
//! the block and its scales once for all the tokens, add each group's products in one
//! transposing sum, and apply the scales to eight groups at once, in the scalar twins'
//! order: every token's values have the twins' bits, alone or with others.
//! Scalar twins for every format, and AVX2 and AVX-512 VNNI versions of each.

use super::qdot::{BlockQ8, Isa};
use super::quant::{f16_at, iq4_xs_scale, q3_k_scales, q4_k_scale_min, QuantType, IQ4_LEVELS};

/// One K-block's bytes and, for each of `tokens` tokens, its 8 activation blocks (token
/// `t`'s at `x[t·per_token..]`) → the 8 groups' contributions (token `t`'s at
/// `out[t·stride..][..8]`).
pub type KDotFn = fn(
    block: &[u8],
    x: &[BlockQ8],
    per_token: usize,
    tokens: usize,
    out: &mut [f32],
    stride: usize,
);

pub mod scalar {
    use super::{f16_at, iq4_xs_scale, q3_k_scales, q4_k_scale_min, BlockQ8, IQ4_LEVELS};

    /// A one-token twin over several tokens, one after another.
    pub fn tokens(
        one: impl Fn(&[u8], &[BlockQ8], &mut [f32; 8]),
        (b, x, per_token, tokens): (&[u8], &[BlockQ8], usize, usize),
        out: &mut [f32],
        stride: usize,
    ) {
        for t in 0..tokens {
            let mut terms = [0.0; 8];
            one(b, &x[t * per_token..t * per_token + 8], &mut terms);
            out[t * stride..t * stride + 8].copy_from_slice(&terms);
        }
    }

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

    /// As Q4_K, with a fifth bit per weight (bit g of qh[l]).
    pub fn q5_k(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let qh = &b[16..48];
        for (g, o) in out.iter_mut().enumerate() {
            let (sc, m) = q4_k_scale_min(g, &b[4..16]);
            let qs = &b[48 + (g / 2) * 32..48 + (g / 2) * 32 + 32];
            let sum: i32 = (0..32)
                .map(|l| {
                    let low = if g % 2 == 0 { qs[l] & 0x0f } else { qs[l] >> 4 };
                    (low | (((qh[l] >> g) & 1) << 4)) as i32 * x[g].qs[l] as i32
                })
                .sum();
            *o = d * sc * x[g].d * sum as f32 - dmin * m * x[g].s;
        }
    }

    /// Σ code·x over each 16-weight half of group g, and Σ x over each.
    #[inline(always)]
    fn halves(code: impl Fn(usize) -> i32, x: &BlockQ8) -> ([i32; 2], [i32; 2]) {
        let codes: [i32; 32] = std::array::from_fn(code);
        let half = |h: usize| -> (i32, i32) {
            let xs = &x.qs[16 * h..16 * h + 16];
            let cs = &codes[16 * h..16 * h + 16];
            let qx = cs.iter().zip(xs).map(|(&c, &v)| c * v as i32).sum();
            (qx, xs.iter().map(|&v| v as i32).sum())
        };
        let ((qa, sa), (qb, sb)) = (half(0), half(1));
        ([qa, qb], [sa, sb])
    }

    /// Group g = 4h + k: halves with 4-bit scales and mins (byte 8h + 2k + half):
    /// d_x·(d·(sa·Σa + sb·Σb) − dmin·(ma·xa + mb·xb)), the sums in integers.
    pub fn q2_k(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        for (g, o) in out.iter_mut().enumerate() {
            let (h, k) = (g / 4, g % 4);
            let code = |l: usize| ((b[16 + 32 * h + l] >> (2 * k)) & 3) as i32;
            let (qx, sx) = halves(code, &x[g]);
            let sc = [b[8 * h + 2 * k], b[8 * h + 2 * k + 1]];
            let scaled = (sc[0] & 0x0f) as i32 * qx[0] + (sc[1] & 0x0f) as i32 * qx[1];
            let mins = (sc[0] >> 4) as i32 * sx[0] + (sc[1] >> 4) as i32 * sx[1];
            *o = x[g].d * (d * scaled as f32 - dmin * mins as f32);
        }
    }

    /// Group g = 4h + k: codes q − (high bit ? 0 : 4) in halves with signed 6-bit scales:
    /// d·d_x·(sa·Σa + sb·Σb).
    pub fn q3_k(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
        let d = f16_at(b, 108);
        let scales = q3_k_scales(&b[96..108]);
        for (g, o) in out.iter_mut().enumerate() {
            let (h, k) = (g / 4, g % 4);
            let code = |l: usize| {
                let low = ((b[32 + 32 * h + l] >> (2 * k)) & 3) as i32;
                low - if (b[l] >> (4 * h + k)) & 1 == 1 { 0 } else { 4 }
            };
            let (qx, _) = halves(code, &x[g]);
            let sum = scales[8 * h + 2 * k] * qx[0] + scales[8 * h + 2 * k + 1] * qx[1];
            *o = d * x[g].d * sum as f32;
        }
    }

    /// Group g: IQ4_NL levels with the group's signed 6-bit scale: d·d_x·(scale·Σ).
    pub fn iq4_xs(b: &[u8], x: &[BlockQ8], out: &mut [f32; 8]) {
        let d = f16_at(b, 0);
        for (g, o) in out.iter_mut().enumerate() {
            let qs = &b[8 + 16 * g..8 + 16 * g + 16];
            let sum: i32 = (0..32)
                .map(|l| {
                    let q = if l < 16 {
                        qs[l] & 0x0f
                    } else {
                        qs[l - 16] >> 4
                    };
                    IQ4_LEVELS[q as usize] as i32 * x[g].qs[l] as i32
                })
                .sum();
            *o = d * x[g].d * (iq4_xs_scale(b, g) * sum) as f32;
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
    // Never more than the CPU runs: the safe pointers below call SIMD code (SAFETY of each
    // `unsafe` call: `isa` is at most what the CPU supports).
    let isa = isa.min(Isa::best());
    #[cfg(target_arch = "x86_64")]
    {
        use QuantType::*;
        macro_rules! simd {
            ($f:ident) => {
                return Some(|b, x, p, t, o, s| unsafe { x86::$f(b, x, p, t, o, s) })
            };
        }
        match (ty, isa) {
            (Q4K, Isa::Avx2) => simd!(q4_k_avx2),
            (Q5K, Isa::Avx2) => simd!(q5_k_avx2),
            (Q6K, Isa::Avx2) => simd!(q6_k_avx2),
            (Q4K, Isa::Avx512Vnni) => simd!(q4_k_vnni),
            (Q5K, Isa::Avx512Vnni) => simd!(q5_k_vnni),
            (Q6K, Isa::Avx512Vnni) => simd!(q6_k_vnni),
            (Q2K, Isa::Avx2) => simd!(q2_k_avx2),
            (Q3K, Isa::Avx2) => simd!(q3_k_avx2),
            (IQ4XS, Isa::Avx2) => simd!(iq4_xs_avx2),
            (Q2K, Isa::Avx512Vnni) => simd!(q2_k_vnni),
            (Q3K, Isa::Avx512Vnni) => simd!(q3_k_vnni),
            (IQ4XS, Isa::Avx512Vnni) => simd!(iq4_xs_vnni),
            _ => {}
        }
    }
    Some(match ty {
        QuantType::Q2K => |b, x, p, t, o, s| scalar::tokens(scalar::q2_k, (b, x, p, t), o, s),
        QuantType::Q3K => |b, x, p, t, o, s| scalar::tokens(scalar::q3_k, (b, x, p, t), o, s),
        QuantType::Q4K => |b, x, p, t, o, s| scalar::tokens(scalar::q4_k, (b, x, p, t), o, s),
        QuantType::Q5K => |b, x, p, t, o, s| scalar::tokens(scalar::q5_k, (b, x, p, t), o, s),
        QuantType::Q6K => |b, x, p, t, o, s| scalar::tokens(scalar::q6_k, (b, x, p, t), o, s),
        QuantType::IQ4XS => |b, x, p, t, o, s| scalar::tokens(scalar::iq4_xs, (b, x, p, t), o, s),
        _ => return None,
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{iq4_xs_scale, q3_k_scales, q4_k_scale_min, BlockQ8, IQ4_LEVELS};
    use crate::kernels::qdot::x86::{dot_u8_i8_avx2, dot_u8_i8_vnni};
    use std::arch::x86_64::*;

    /// Four groups' 8-lane sums → `[first halves of groups 0..4 | second halves]` (lanes
    /// 0..4 of a group hold its weights 0..16, lanes 4..8 its weights 16..32).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn halves4(a: &[__m256i]) -> __m256i {
        let s01 = _mm256_hadd_epi32(a[0], a[1]);
        let s23 = _mm256_hadd_epi32(a[2], a[3]);
        _mm256_hadd_epi32(s01, s23)
    }

    /// Eight groups' 8-lane sums → one vector of the eight groups' sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sums8(a: &[__m256i; 8]) -> __m256i {
        let (lo4, hi4) = (halves4(&a[..4]), halves4(&a[4..]));
        let lo = _mm256_permute2x128_si256(lo4, hi4, 0x20);
        let hi = _mm256_permute2x128_si256(lo4, hi4, 0x31);
        _mm256_add_epi32(lo, hi)
    }

    /// A field of the eight activation blocks of a token, as one vector.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gather8(x: &[BlockQ8], field: fn(&BlockQ8) -> f32) -> __m256 {
        _mm256_setr_ps(
            field(&x[0]),
            field(&x[1]),
            field(&x[2]),
            field(&x[3]),
            field(&x[4]),
            field(&x[5]),
            field(&x[6]),
            field(&x[7]),
        )
    }

    /// The f16 at byte `at`, widened by the CPU (F16C): the value `f16_at` gives.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_of(b: &[u8], at: usize) -> f32 {
        let bits = _mm_cvtsi32_si128(u16::from_le_bytes([b[at], b[at + 1]]) as i32);
        _mm_cvtss_f32(_mm_cvtph_ps(bits))
    }

    /// The low nibbles, then the high ones, of the 128 bytes at `at`: the 4-bit codes of
    /// groups 0, 1 (bytes 0..32), 2, 3 (32..64) and so on, as Q4_K and Q5_K store them.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(b: &[u8], at: usize) -> [__m256i; 8] {
        let mask = _mm256_set1_epi8(0x0f);
        let mut w = [_mm256_setzero_si256(); 8];
        for c in 0..4 {
            let raw = _mm256_loadu_si256(b.as_ptr().add(at + 32 * c) as *const __m256i);
            w[2 * c] = _mm256_and_si256(raw, mask);
            w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
        }
        w
    }

    /// The 8-bit activations of a token's eight blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn activations(xt: &[BlockQ8]) -> [__m256i; 8] {
        std::array::from_fn(|g| _mm256_loadu_si256(xt[g].qs.as_ptr() as *const __m256i))
    }

    /// Checks the bounds every kernel relies on.
    fn check(
        b: &[u8],
        bytes: usize,
        x: &[BlockQ8],
        (per_token, tokens): (usize, usize),
        out: &[f32],
        stride: usize,
    ) {
        assert!(b.len() >= bytes && tokens >= 1);
        assert!(x.len() >= (tokens - 1) * per_token + 8 && out.len() >= (tokens - 1) * stride + 8);
    }

    macro_rules! kernels {
        ($q4k:ident, $q5k:ident, $q45:ident, $q6k:ident, $features:literal, $dot:ident) => {
            /// # Safety
            /// The CPU must support the enabled features (bounds are checked).
            #[target_feature(enable = $features)]
            pub unsafe fn $q4k(
                b: &[u8],
                x: &[BlockQ8],
                per_token: usize,
                tokens: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                check(b, 144, x, (per_token, tokens), out, stride);
                let w = nibbles(b, 16);
                $q45(b, w, x, (per_token, tokens), out, stride);
            }

            /// # Safety
            /// The CPU must support the enabled features (bounds are checked).
            #[target_feature(enable = $features)]
            pub unsafe fn $q5k(
                b: &[u8],
                x: &[BlockQ8],
                per_token: usize,
                tokens: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                check(b, 176, x, (per_token, tokens), out, stride);
                let mut w = nibbles(b, 48);
                let qh = _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i);
                let one = _mm256_set1_epi8(1);
                for (g, w) in w.iter_mut().enumerate() {
                    // Bit g of each byte, moved to bit 4 (16-bit shifts: the other byte's
                    // bits land outside the mask).
                    let bit =
                        _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(g as i32)), one);
                    *w = _mm256_or_si256(*w, _mm256_slli_epi16(bit, 4));
                }
                $q45(b, w, x, (per_token, tokens), out, stride);
            }

            /// Q4_K and Q5_K from their codes `w` (eight groups of 32, unsigned):
            /// ((d·sc)·d_x)·Σ − (dmin·m)·s_x, as the twins multiply.
            #[target_feature(enable = $features)]
            unsafe fn $q45(
                b: &[u8],
                w: [__m256i; 8],
                x: &[BlockQ8],
                (per_token, tokens): (usize, usize),
                out: &mut [f32],
                stride: usize,
            ) {
                let (d, dmin) = (f16_of(b, 0), f16_of(b, 2));
                let (mut sc, mut m) = ([0.0f32; 8], [0.0f32; 8]);
                for g in 0..8 {
                    (sc[g], m[g]) = q4_k_scale_min(g, &b[4..16]);
                }
                let dsc = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(sc.as_ptr()));
                let dm = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_loadu_ps(m.as_ptr()));
                for t in 0..tokens {
                    let xt = &x[t * per_token..t * per_token + 8];
                    let sums: [__m256i; 8] = std::array::from_fn(|g| {
                        $dot(
                            w[g],
                            _mm256_loadu_si256(xt[g].qs.as_ptr() as *const __m256i),
                        )
                    });
                    let sum = _mm256_cvtepi32_ps(sums8(&sums));
                    let scaled = _mm256_mul_ps(_mm256_mul_ps(dsc, gather8(xt, |b| b.d)), sum);
                    let mins = _mm256_mul_ps(dm, gather8(xt, |b| b.s));
                    _mm256_storeu_ps(
                        out.as_mut_ptr().add(t * stride),
                        _mm256_sub_ps(scaled, mins),
                    );
                }
            }

            /// # Safety
            /// The CPU must support the enabled features (bounds are checked).
            #[target_feature(enable = $features)]
            pub unsafe fn $q6k(
                b: &[u8],
                x: &[BlockQ8],
                per_token: usize,
                tokens: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                check(b, 210, x, (per_token, tokens), out, stride);
                let d = _mm256_set1_ps(f16_of(b, 208));
                let (mask4, mask2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
                let ones = _mm256_set1_epi8(1);
                // Codes q in 0..64 (unsigned) of the eight groups; Σ (q − 32)·x = Σ q·x − 32 Σ x.
                let mut w = [_mm256_setzero_si256(); 8];
                // Per four groups: their first halves' scales, then their second halves'.
                let mut scales = [_mm256_setzero_ps(); 2];
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(b.as_ptr().add(h * 64) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(b.as_ptr().add(h * 64 + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(b.as_ptr().add(128 + h * 32) as *const __m256i);
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
                    for (k, (low, high)) in lows.into_iter().zip(highs).enumerate() {
                        w[4 * h + k] = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                    }
                    let sc = |i: usize| b[192 + h * 8 + i] as i8 as f32;
                    scales[h] =
                        _mm256_setr_ps(sc(0), sc(2), sc(4), sc(6), sc(1), sc(3), sc(5), sc(7));
                }
                for t in 0..tokens {
                    let xt = &x[t * per_token..t * per_token + 8];
                    let xq = activations(xt);
                    let dx = _mm256_mul_ps(d, gather8(xt, |b| b.d));
                    for (h, scale) in scales.iter().enumerate() {
                        let qx: [__m256i; 4] =
                            std::array::from_fn(|k| $dot(w[4 * h + k], xq[4 * h + k]));
                        let sx: [__m256i; 4] = std::array::from_fn(|k| $dot(ones, xq[4 * h + k]));
                        let v = _mm256_sub_epi32(halves4(&qx), _mm256_slli_epi32(halves4(&sx), 5));
                        // sa·a + sb·b per group, then (d·d_x) times it, as the twin does.
                        let p = _mm256_mul_ps(*scale, _mm256_cvtepi32_ps(v));
                        let sum =
                            _mm_add_ps(_mm256_castps256_ps128(p), _mm256_extractf128_ps(p, 1));
                        let dxh = if h == 0 {
                            _mm256_castps256_ps128(dx)
                        } else {
                            _mm256_extractf128_ps(dx, 1)
                        };
                        _mm_storeu_ps(
                            out.as_mut_ptr().add(t * stride + 4 * h),
                            _mm_mul_ps(dxh, sum),
                        );
                    }
                }
            }
        };
    }

    /// Four groups' integer pair `[first halves | second halves]` (see [`halves4`]) times
    /// per-half integers, each group's two products added: the four groups' sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scaled_halves(halves: __m256i, scales: __m256i) -> __m128i {
        let p = _mm256_mullo_epi32(halves, scales);
        _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1))
    }

    /// Per four groups `4h..4h + 4`, the bytes `at + 8h + 2k` (first halves) and
    /// `at + 8h + 2k + 1` (second halves), read by `f`, in [`halves4`]'s lane order.
    fn per_half(f: impl Fn(usize) -> i32, h: usize) -> [i32; 8] {
        [0, 2, 4, 6, 1, 3, 5, 7].map(|i| f(8 * h + i))
    }

    macro_rules! low_bit_kernels {
        ($q2k:ident, $q3k:ident, $iq4xs:ident, $features:literal, $dot:ident) => {
            /// Q2_K: 2-bit codes in halves with 4-bit scales and mins,
            /// d_x·(d·Σ sc·Σqx − dmin·Σ m·Σx) as the twin computes it.
            ///
            /// # Safety
            /// The CPU must support the enabled features (bounds are checked).
            #[target_feature(enable = $features)]
            pub unsafe fn $q2k(
                b: &[u8],
                x: &[BlockQ8],
                per_token: usize,
                tokens: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                check(b, 84, x, (per_token, tokens), out, stride);
                let (d, dmin) = (_mm256_set1_ps(f16_of(b, 80)), _mm256_set1_ps(f16_of(b, 82)));
                let mask = _mm256_set1_epi8(3);
                let mut w = [_mm256_setzero_si256(); 8];
                for h in 0..2 {
                    let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * h) as *const __m256i);
                    for k in 0..4 {
                        let shifted = _mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * k as i32));
                        w[4 * h + k] = _mm256_and_si256(shifted, mask);
                    }
                }
                let load = |v: [i32; 8]| _mm256_loadu_si256(v.as_ptr() as *const __m256i);
                let scales = [0, 1].map(|h| load(per_half(|i| (b[i] & 0x0f) as i32, h)));
                let mins = [0, 1].map(|h| load(per_half(|i| (b[i] >> 4) as i32, h)));
                let ones = _mm256_set1_epi8(1);
                for t in 0..tokens {
                    let xt = &x[t * per_token..t * per_token + 8];
                    let xq = activations(xt);
                    let (mut scaled, mut min) =
                        ([_mm_setzero_si128(); 2], [_mm_setzero_si128(); 2]);
                    for h in 0..2 {
                        let qx: [__m256i; 4] =
                            std::array::from_fn(|k| $dot(w[4 * h + k], xq[4 * h + k]));
                        let sx: [__m256i; 4] = std::array::from_fn(|k| $dot(ones, xq[4 * h + k]));
                        scaled[h] = scaled_halves(halves4(&qx), scales[h]);
                        min[h] = scaled_halves(halves4(&sx), mins[h]);
                    }
                    let scaled = _mm256_cvtepi32_ps(_mm256_set_m128i(scaled[1], scaled[0]));
                    let min = _mm256_cvtepi32_ps(_mm256_set_m128i(min[1], min[0]));
                    let v = _mm256_sub_ps(_mm256_mul_ps(d, scaled), _mm256_mul_ps(dmin, min));
                    _mm256_storeu_ps(
                        out.as_mut_ptr().add(t * stride),
                        _mm256_mul_ps(gather8(xt, |b| b.d), v),
                    );
                }
            }

            /// Q3_K: codes q − (high bit ? 0 : 4), taken as q + 4·high (0..8) less 4·Σx,
            /// in halves with signed 6-bit scales: (d·d_x)·Σ sc·Σqx.
            ///
            /// # Safety
            /// The CPU must support the enabled features (bounds are checked).
            #[target_feature(enable = $features)]
            pub unsafe fn $q3k(
                b: &[u8],
                x: &[BlockQ8],
                per_token: usize,
                tokens: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                check(b, 110, x, (per_token, tokens), out, stride);
                let d = _mm256_set1_ps(f16_of(b, 108));
                let (mask, one) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
                let hmask = _mm256_loadu_si256(b.as_ptr() as *const __m256i);
                let mut w = [_mm256_setzero_si256(); 8];
                for h in 0..2 {
                    let q = _mm256_loadu_si256(b.as_ptr().add(32 + 32 * h) as *const __m256i);
                    for k in 0..4 {
                        let low = _mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * k as i32));
                        // Bit 4h + k of each byte (16-bit shifts: the other byte's bits land
                        // outside the mask), moved to bit 2.
                        let bit = _mm256_srl_epi16(hmask, _mm_cvtsi32_si128((4 * h + k) as i32));
                        let high = _mm256_slli_epi16(_mm256_and_si256(bit, one), 2);
                        w[4 * h + k] = _mm256_or_si256(_mm256_and_si256(low, mask), high);
                    }
                }
                let sc = q3_k_scales(&b[96..108]);
                let scales = [0, 1]
                    .map(|h| _mm256_loadu_si256(per_half(|i| sc[i], h).as_ptr() as *const __m256i));
                let ones = _mm256_set1_epi8(1);
                for t in 0..tokens {
                    let xt = &x[t * per_token..t * per_token + 8];
                    let xq = activations(xt);
                    let mut sums = [_mm_setzero_si128(); 2];
                    for h in 0..2 {
                        let qx: [__m256i; 4] =
                            std::array::from_fn(|k| $dot(w[4 * h + k], xq[4 * h + k]));
                        let sx: [__m256i; 4] = std::array::from_fn(|k| $dot(ones, xq[4 * h + k]));
                        let v = _mm256_sub_epi32(halves4(&qx), _mm256_slli_epi32(halves4(&sx), 2));
                        sums[h] = scaled_halves(v, scales[h]);
                    }
                    let sum = _mm256_cvtepi32_ps(_mm256_set_m128i(sums[1], sums[0]));
                    let dx = _mm256_mul_ps(d, gather8(xt, |b| b.d));
                    _mm256_storeu_ps(out.as_mut_ptr().add(t * stride), _mm256_mul_ps(dx, sum));
                }
            }

            /// IQ4_XS: nibbles looked up in IQ4_NL's levels (a byte shuffle), signed × signed
            /// through |level| and x with the level's sign; (d·d_x)·(scale·Σ).
            ///
            /// # Safety
            /// The CPU must support the enabled features (bounds are checked).
            #[target_feature(enable = $features)]
            pub unsafe fn $iq4xs(
                b: &[u8],
                x: &[BlockQ8],
                per_token: usize,
                tokens: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                check(b, 136, x, (per_token, tokens), out, stride);
                let d = _mm256_set1_ps(f16_of(b, 0));
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                    IQ4_LEVELS.as_ptr() as *const __m128i
                ));
                let mask = _mm_set1_epi8(0x0f);
                let levels: [__m256i; 8] = std::array::from_fn(|g| {
                    let q = _mm_loadu_si128(b.as_ptr().add(8 + 16 * g) as *const __m128i);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    _mm256_shuffle_epi8(table, _mm256_set_m128i(hi, lo))
                });
                let size = levels.map(|l| _mm256_sign_epi8(l, l));
                let scales: [i32; 8] = std::array::from_fn(|g| iq4_xs_scale(b, g));
                let scales = _mm256_loadu_si256(scales.as_ptr() as *const __m256i);
                for t in 0..tokens {
                    let xt = &x[t * per_token..t * per_token + 8];
                    let sums: [__m256i; 8] = std::array::from_fn(|g| {
                        let xq = _mm256_loadu_si256(xt[g].qs.as_ptr() as *const __m256i);
                        $dot(size[g], _mm256_sign_epi8(xq, levels[g]))
                    });
                    let sum = _mm256_cvtepi32_ps(_mm256_mullo_epi32(sums8(&sums), scales));
                    let dx = _mm256_mul_ps(d, gather8(xt, |b| b.d));
                    _mm256_storeu_ps(out.as_mut_ptr().add(t * stride), _mm256_mul_ps(dx, sum));
                }
            }
        };
    }
    low_bit_kernels!(
        q2_k_avx2,
        q3_k_avx2,
        iq4_xs_avx2,
        "avx2,fma,f16c",
        dot_u8_i8_avx2
    );
    low_bit_kernels!(
        q2_k_vnni,
        q3_k_vnni,
        iq4_xs_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        dot_u8_i8_vnni
    );

    kernels!(
        q4_k_avx2,
        q5_k_avx2,
        q45_avx2,
        q6_k_avx2,
        "avx2,fma,f16c",
        dot_u8_i8_avx2
    );
    kernels!(
        q4_k_vnni,
        q5_k_vnni,
        q45_vnni,
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
        for &at in ty.f16_fields() {
            b[at..at + 2].copy_from_slice(&scale(rng));
        }
        b
    }

    /// Every kernel gives the twin's bits for 1–17 tokens with gaps between them (a tile's
    /// tokens, `per_token` blocks apart) and an output stride; the twin agrees with the
    /// dequantized weights times the quantized activations.
    #[test]
    fn kernels_equal_twins_and_the_dequantized_dot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        use QuantType::*;
        for ty in [Q2K, Q3K, Q4K, Q5K, Q6K, IQ4XS] {
            for tokens in 1..=17 {
                let (per_token, stride) = (11, 13);
                let block = random_block(ty, &mut rng);
                let x: Vec<f32> = (0..tokens * per_token * 32)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect();
                let mut xq = vec![BlockQ8::default(); tokens * per_token];
                quantize_q8(&x, &mut xq);
                let mut twin = vec![0.0; tokens * stride];
                kdot_fn(ty, Isa::Scalar).unwrap()(
                    &block, &xq, per_token, tokens, &mut twin, stride,
                );
                for isa in Isa::available() {
                    let mut got = vec![0.0; tokens * stride];
                    kdot_fn(ty, isa).unwrap()(&block, &xq, per_token, tokens, &mut got, stride);
                    assert_eq!(got, twin, "{ty:?} {isa:?} {tokens} tokens");
                }
                // Against the dequantized weights times the quantized activations.
                let mut w = vec![0.0; 256];
                ty.dequantize(&block, &mut w);
                for t in 0..tokens {
                    for g in 0..8 {
                        let xb = &xq[t * per_token + g];
                        let terms = (0..32).map(|l| w[32 * g + l] * xb.d * xb.qs[l] as f32);
                        let exact: f32 = terms.clone().sum();
                        let norm: f32 = terms.map(f32::abs).sum();
                        let v = twin[t * stride + g];
                        assert!(
                            (v - exact).abs() <= 1e-4 * (1.0 + norm),
                            "{ty:?} token {t} group {g}: {v} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
