//! Multi-token integer kernels over grouped rows ([`PackedRows`]): a block of weights is
//! loaded and unpacked once and then multiplied with the 8-bit activations of several
//! tokens (a prompt, or a decode batch), instead of once per token.
//!
//! Every token's result is computed exactly as the one-token kernels of [`super::packed`]
//! compute it — each block's integer sum, the same scale product, one fused multiply-add
//! per block in block order — so a sequence gives the same bits alone or batched, and the
//! scalar twin (the one-token twin, token by token) is the reference.
//!
//! AVX-512 VNNI takes two groups (16 rows) in one 512-bit register; AVX2 takes one group.
//! A lone token is better served by the one-token kernels, which stream weights at memory
//! speed: callers choose by token count (the bits are the same).

use super::packed::{packed_fns, PackedRows, GROUP};
use super::qdot::{BlockQ8, Isa};
use super::quant::QuantType;

/// Groups a kernel call covers at most (two on AVX-512).
pub const MAX_GROUPS: usize = 2;

/// `groups` (1 or 2 consecutive groups of a matrix: `n · blocks · stride` bytes) · the
/// activation blocks of `tokens` tokens (`x`, `per_token` blocks each): `out[t · 8n + r]` for
/// token `t` and row `r` of the groups.
pub type TileDotFn = fn(groups: &[u8], x: &[BlockQ8], per_token: usize, out: &mut [f32]);

/// The same, summed per segment of `seg_blocks` blocks in fixed point (see
/// [`super::fixed`]).
pub type TileDotFixedFn =
    fn(groups: &[u8], x: &[BlockQ8], per_token: usize, seg_blocks: usize, out: &mut [i64]);

/// Checks a call's shapes; returns (groups, tokens).
fn shape(
    ty: QuantType,
    groups: &[u8],
    x: &[BlockQ8],
    per_token: usize,
    out: usize,
) -> (usize, usize) {
    let group_bytes = per_token * PackedRows::stride(ty);
    assert!(per_token > 0 && x.len().is_multiple_of(per_token));
    let (n, tokens) = (groups.len() / group_bytes, x.len() / per_token);
    assert!((1..=MAX_GROUPS).contains(&n) && groups.len() == n * group_bytes);
    assert_eq!(out, tokens * n * GROUP, "output does not match the tile");
    (n, tokens)
}

/// The multi-token kernels of `ty` on `isa` (capped at what this CPU runs, so the safe
/// function pointers never reach an instruction the CPU lacks).
pub fn tile_fns(ty: QuantType, isa: Isa) -> (TileDotFn, TileDotFixedFn) {
    let isa = isa.min(Isa::best());
    macro_rules! pick {
        ($($fmt:ident),*) => {
            match ty {
                $(QuantType::$fmt => pick!(@isa $fmt),)*
                other => panic!("{} has no grouped layout", other.name()),
            }
        };
        (@isa $fmt:ident) => {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is at most what the CPU supports (capped above).
                Isa::Avx512Vnni => (
                    |g, x, p, out| unsafe { x86::dot_vnni::<{ x86::$fmt }>(g, x, p, out) },
                    |g, x, p, s, out| unsafe { x86::dot_fixed_vnni::<{ x86::$fmt }>(g, x, p, s, out) },
                ),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => (
                    |g, x, p, out| unsafe { x86::dot_avx2::<{ x86::$fmt }>(g, x, p, out) },
                    |g, x, p, s, out| unsafe { x86::dot_fixed_avx2::<{ x86::$fmt }>(g, x, p, s, out) },
                ),
                _ => (
                    |g, x, p, out| scalar::dot(QuantType::$fmt, g, x, p, out),
                    |g, x, p, s, out| scalar::dot_fixed(QuantType::$fmt, g, x, p, s, out),
                ),
            }
        };
    }
    pick!(Q4_0, Q4_1, Q5_1, Q8_0, Q4K, Q6K)
}

/// The scalar twins: the one-token twin of [`super::packed`], group by group, token by token.
pub mod scalar {
    use super::*;

    /// `one(group, token_blocks, rows)` for every token and group of the call.
    fn each<T>(
        ty: QuantType,
        groups: &[u8],
        x: &[BlockQ8],
        per_token: usize,
        out: &mut [T],
        one: impl Fn(&[u8], &[BlockQ8], &mut [T; GROUP]),
    ) {
        let (n, _) = shape(ty, groups, x, per_token, out.len());
        let group_bytes = groups.len() / n;
        for (xt, o) in x
            .chunks_exact(per_token)
            .zip(out.chunks_exact_mut(n * GROUP))
        {
            for (g, o) in groups
                .chunks_exact(group_bytes)
                .zip(o.chunks_exact_mut(GROUP))
            {
                one(g, xt, o.try_into().expect("a group's rows"));
            }
        }
    }

    pub fn dot(ty: QuantType, groups: &[u8], x: &[BlockQ8], per_token: usize, out: &mut [f32]) {
        let (one, _) = packed_fns(ty, Isa::Scalar);
        each(ty, groups, x, per_token, out, one);
    }

    pub fn dot_fixed(
        ty: QuantType,
        groups: &[u8],
        x: &[BlockQ8],
        per_token: usize,
        seg_blocks: usize,
        out: &mut [i64],
    ) {
        let (_, one) = packed_fns(ty, Isa::Scalar);
        each(ty, groups, x, per_token, out, |g, x, o| {
            one(g, x, seg_blocks, o)
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{shape, GROUP};
    use crate::kernels::fixed::x86::{to_biased_fixed16, to_fixed4, unbias};
    use crate::kernels::packed::{code_offset, header_bytes, PackedRows};
    use crate::kernels::qdot::BlockQ8;
    use std::arch::x86_64::*;

    pub(crate) use crate::kernels::packed::x86::{
        high_scales8, mins8, quant_type, scales8, with_byte_codes, with_min, Q4K, Q4_0, Q4_1, Q5_1,
        Q6K, Q8_0,
    };

    /// Tokens a tile holds: one accumulator register each.
    const TILE: usize = 4;

    /// The weights that follow a call's groups in memory (the matrix's next groups), asked
    /// for into L2 a block's share at a time while the first tile of tokens works: a decode
    /// step streams every weight from memory once, and the hardware prefetchers alone leave
    /// the tile kernels waiting on it (a matrix larger than the caches ran at ~70% of the
    /// in-cache speed with 16 tokens, ~45% with 4). Prefetches never fault, so the
    /// addresses may run past the matrix.
    #[derive(Clone, Copy)]
    struct Ahead {
        from: *const u8,
        per_block: usize,
    }

    impl Ahead {
        const NONE: Ahead = Ahead {
            from: std::ptr::null(),
            per_block: 0,
        };

        /// On a call's first tile (`t0 == 0`): the weights `skip` bytes past the end of
        /// `groups`, `per_block` bytes for each block; on later tiles, nothing.
        fn after(groups: &[u8], skip: usize, per_block: usize, t0: usize) -> Ahead {
            if t0 > 0 {
                return Ahead::NONE;
            }
            Ahead {
                from: groups.as_ptr().wrapping_add(groups.len() + skip),
                per_block,
            }
        }

        /// Asks for block `b`'s share.
        #[inline(always)]
        fn block(self, b: usize) {
            let start = self.from.wrapping_add(b * self.per_block);
            for at in (0..self.per_block).step_by(64) {
                // SAFETY: a prefetch is a hint; it never faults, whatever the address.
                unsafe { _mm_prefetch(start.wrapping_add(at) as *const i8, _MM_HINT_T1) };
            }
        }
    }

    /// Activations `4s..4s+4` of `a` in every 32-bit lane.
    #[inline(always)]
    unsafe fn step_x(a: *const BlockQ8, s: usize) -> i32 {
        ((*a).qs.as_ptr().add(4 * s) as *const i32).read_unaligned()
    }

    /// Rows of two groups (`g0`, `g1`; the same pointer for a lone group) over blocks
    /// `0..blocks` · `N` tokens (`x`: token 0's first block; tokens `per_token` apart).
    /// With `ahead`, each block also asks for the next `ahead.1` bytes from `ahead.0` on
    /// into L2 (see [`Ahead`]).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_vnni<const FMT: u8, const N: usize>(
        g0: *const u8,
        g1: *const u8,
        x: *const BlockQ8,
        per_token: usize,
        blocks: usize,
        ahead: Ahead,
    ) -> [__m512; N] {
        let ty = quant_type(FMT);
        let (stride, header) = (PackedRows::stride(ty), header_bytes(ty));
        let offset = code_offset(ty);
        let pair = |b0: *const u8, b1: *const u8| {
            let lo = _mm512_castsi256_si512(_mm256_loadu_si256(b0 as *const __m256i));
            _mm512_inserti64x4(lo, _mm256_loadu_si256(b1 as *const __m256i), 1)
        };
        // The two groups' eight values each, as one register.
        let join = |lo: __m256, hi: __m256| {
            _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castps_pd(_mm512_castps256_ps512(lo)),
                _mm256_castps_pd(hi),
                1,
            ))
        };
        let mask = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..blocks {
            ahead.block(b);
            let (b0, b1) = (g0.add(b * stride), g1.add(b * stride));
            let d = join(scales8::<FMT>(b0), scales8::<FMT>(b1));
            // The minimums (Q4_1, Q5_1, Q4_K), or Q6_K's scales of columns 16..32.
            let m = if with_min(FMT) {
                join(mins8::<FMT>(b0), mins8::<FMT>(b1))
            } else if FMT == Q6K {
                join(high_scales8(b0), high_scales8(b1))
            } else {
                d
            };
            let mut w = [_mm512_setzero_si512(); 8];
            if with_byte_codes(FMT) {
                for (s, w) in w.iter_mut().enumerate() {
                    *w = pair(b0.add(header + 32 * s), b1.add(header + 32 * s));
                }
            } else {
                for i in 0..4 {
                    let p = pair(b0.add(header + 32 * i), b1.add(header + 32 * i));
                    w[2 * i] = _mm512_and_si512(p, mask);
                    w[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(p, 4), mask);
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let a = x.add(t * per_token + b);
                let mut sums = [_mm512_setzero_si512(); 2];
                for (s, w) in w.iter().enumerate() {
                    let xs = _mm512_set1_epi32(step_x(a, s));
                    let i = if FMT == Q6K { s / 4 } else { s % 2 };
                    sums[i] = _mm512_dpbusd_epi32(sums[i], *w, xs);
                }
                if FMT == Q6K {
                    let (lo_x, hi_x) = ((*a).sum_lo, (*a).sum - (*a).sum_lo);
                    let lo = _mm512_sub_epi32(sums[0], _mm512_set1_epi32(offset * lo_x));
                    let hi = _mm512_sub_epi32(sums[1], _mm512_set1_epi32(offset * hi_x));
                    let ad = _mm512_set1_ps((*a).d);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(d, ad), *acc);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(m, ad), *acc);
                    continue;
                }
                let mut sum = _mm512_add_epi32(sums[0], sums[1]);
                if offset != 0 {
                    sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(offset * (*a).sum));
                }
                let scale = _mm512_mul_ps(d, _mm512_set1_ps((*a).d));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
                if with_min(FMT) {
                    *acc = _mm512_fmadd_ps(m, _mm512_set1_ps((*a).s), *acc);
                }
            }
        }
        acc
    }

    /// Rows of one group over blocks `0..blocks` · `N` tokens, AVX2 (u8×i8 pairs through
    /// 16-bit sums; Q8_0's codes are multiplied as signed weights, as the one-token kernel).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const FMT: u8, const N: usize>(
        g: *const u8,
        x: *const BlockQ8,
        per_token: usize,
        blocks: usize,
        ahead: Ahead,
    ) -> [__m256; N] {
        let ty = quant_type(FMT);
        let (stride, header) = (PackedRows::stride(ty), header_bytes(ty));
        let offset = code_offset(ty);
        let ones = _mm256_set1_epi16(1);
        let dot = |u: __m256i, s: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones);
        let mask = _mm256_set1_epi8(0x0f);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..blocks {
            ahead.block(b);
            let block = g.add(b * stride);
            let d = scales8::<FMT>(block);
            // The minimums (Q4_1, Q5_1, Q4_K), or Q6_K's scales of columns 16..32.
            let m = if with_min(FMT) {
                mins8::<FMT>(block)
            } else if FMT == Q6K {
                high_scales8(block)
            } else {
                d
            };
            let load = |i: usize| _mm256_loadu_si256(block.add(header + 32 * i) as *const __m256i);
            let mut w = [_mm256_setzero_si256(); 8];
            if FMT == Q8_0 {
                for (s, w) in w.iter_mut().enumerate() {
                    *w = _mm256_xor_si256(load(s), flip);
                }
            } else if with_byte_codes(FMT) {
                for (s, w) in w.iter_mut().enumerate() {
                    *w = load(s);
                }
            } else {
                for i in 0..4 {
                    let p = load(i);
                    w[2 * i] = _mm256_and_si256(p, mask);
                    w[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let a = x.add(t * per_token + b);
                let mut sums = [_mm256_setzero_si256(); 2];
                for (s, w) in w.iter().enumerate() {
                    let xs = _mm256_set1_epi32(step_x(a, s));
                    let p = if FMT == Q8_0 {
                        dot(_mm256_sign_epi8(*w, *w), _mm256_sign_epi8(xs, *w))
                    } else {
                        dot(*w, xs)
                    };
                    let i = if FMT == Q6K { s / 4 } else { s % 2 };
                    sums[i] = _mm256_add_epi32(sums[i], p);
                }
                if FMT == Q6K {
                    let (lo_x, hi_x) = ((*a).sum_lo, (*a).sum - (*a).sum_lo);
                    let lo = _mm256_sub_epi32(sums[0], _mm256_set1_epi32(offset * lo_x));
                    let hi = _mm256_sub_epi32(sums[1], _mm256_set1_epi32(offset * hi_x));
                    let ad = _mm256_set1_ps((*a).d);
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(d, ad), *acc);
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(m, ad), *acc);
                    continue;
                }
                let mut sum = _mm256_add_epi32(sums[0], sums[1]);
                if FMT == Q8_0 {
                    sum = _mm256_add_epi32(sum, _mm256_set1_epi32(128 * (*a).sum));
                }
                if offset != 0 {
                    sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(offset * (*a).sum));
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps((*a).d));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
                if with_min(FMT) {
                    *acc = _mm256_fmadd_ps(m, _mm256_set1_ps((*a).s), *acc);
                }
            }
        }
        acc
    }

    /// Runs `tile` over the tokens in tiles of up to [`TILE`]: `tile(first_token, n)`.
    #[inline(always)]
    fn by_tiles(tokens: usize, mut tile: impl FnMut(usize, usize)) {
        let mut t = 0;
        while t < tokens {
            let n = (tokens - t).min(TILE);
            tile(t, n);
            t += n;
        }
    }

    /// Dispatches a run-time tile size to a kernel's const one.
    macro_rules! sized {
        ($n:expr, $f:ident::<$fmt:ident>($($arg:expr),*), |$acc:ident| $body:expr) => {
            match $n {
                4 => { let $acc = $f::<$fmt, 4>($($arg),*); $body }
                3 => { let $acc = $f::<$fmt, 3>($($arg),*); $body }
                2 => { let $acc = $f::<$fmt, 2>($($arg),*); $body }
                _ => { let $acc = $f::<$fmt, 1>($($arg),*); $body }
            }
        };
    }

    /// The two groups' pointers (the second repeats the first for a lone group).
    fn group_ptrs(groups: &[u8], n: usize) -> (*const u8, *const u8) {
        let p = groups.as_ptr();
        (
            p,
            if n == 2 {
                p.wrapping_add(groups.len() / 2)
            } else {
                p
            },
        )
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_vnni<const FMT: u8>(
        groups: &[u8],
        x: &[BlockQ8],
        per_token: usize,
        out: &mut [f32],
    ) {
        let (n, tokens) = shape(quant_type(FMT), groups, x, per_token, out.len());
        let (g0, g1) = group_ptrs(groups, n);
        let width = n * GROUP;
        let stride = PackedRows::stride(quant_type(FMT));
        by_tiles(tokens, |t0, k| {
            let xt = x.as_ptr().add(t0 * per_token);
            let ahead = Ahead::after(groups, 0, n * stride, t0);
            sized!(
                k,
                tile_vnni::<FMT>(g0, g1, xt, per_token, per_token, ahead),
                |acc| {
                    for (t, v) in acc.iter().enumerate() {
                        let o = out.as_mut_ptr().add((t0 + t) * width);
                        if n == 2 {
                            _mm512_storeu_ps(o, *v);
                        } else {
                            _mm256_storeu_ps(o, _mm512_castps512_ps256(*v));
                        }
                    }
                }
            )
        });
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_fixed_vnni<const FMT: u8>(
        groups: &[u8],
        x: &[BlockQ8],
        per_token: usize,
        seg_blocks: usize,
        out: &mut [i64],
    ) {
        let (n, tokens) = shape(quant_type(FMT), groups, x, per_token, out.len());
        assert!(seg_blocks > 0 && per_token.is_multiple_of(seg_blocks));
        let (g0, g1) = group_ptrs(groups, n);
        let stride = PackedRows::stride(quant_type(FMT));
        let width = n * GROUP;
        by_tiles(tokens, |t0, k| {
            let mut fixed = [[_mm512_setzero_si512(); 2]; TILE];
            for s in 0..per_token / seg_blocks {
                let at = s * seg_blocks;
                let (s0, s1) = (g0.add(at * stride), g1.add(at * stride));
                let xt = x.as_ptr().add(t0 * per_token + at);
                let ahead = Ahead::after(groups, at * n * stride, n * stride, t0);
                sized!(
                    k,
                    tile_vnni::<FMT>(s0, s1, xt, per_token, seg_blocks, ahead),
                    |acc| {
                        for (f, v) in fixed.iter_mut().zip(acc) {
                            let [lo, hi] = to_biased_fixed16(v);
                            f[0] = _mm512_add_epi64(f[0], lo);
                            f[1] = _mm512_add_epi64(f[1], hi);
                        }
                    }
                )
            }
            let segments = per_token / seg_blocks;
            for (t, f) in fixed.iter().take(k).enumerate() {
                let o = out.as_mut_ptr().add((t0 + t) * width) as *mut __m512i;
                _mm512_storeu_si512(o, unbias(f[0], segments));
                if n == 2 {
                    _mm512_storeu_si512(o.add(1), unbias(f[1], segments));
                }
            }
        });
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2<const FMT: u8>(
        groups: &[u8],
        x: &[BlockQ8],
        per_token: usize,
        out: &mut [f32],
    ) {
        let (n, tokens) = shape(quant_type(FMT), groups, x, per_token, out.len());
        let group_bytes = groups.len() / n;
        let stride = PackedRows::stride(quant_type(FMT));
        for (gi, g) in groups.chunks_exact(group_bytes).enumerate() {
            by_tiles(tokens, |t0, k| {
                let xt = x.as_ptr().add(t0 * per_token);
                let ahead = Ahead::after(groups, gi * group_bytes, stride, t0);
                sized!(
                    k,
                    tile_avx2::<FMT>(g.as_ptr(), xt, per_token, per_token, ahead),
                    |acc| {
                        for (t, v) in acc.iter().enumerate() {
                            let o = out.as_mut_ptr().add((t0 + t) * n * GROUP + gi * GROUP);
                            _mm256_storeu_ps(o, *v);
                        }
                    }
                )
            });
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_fixed_avx2<const FMT: u8>(
        groups: &[u8],
        x: &[BlockQ8],
        per_token: usize,
        seg_blocks: usize,
        out: &mut [i64],
    ) {
        let (n, tokens) = shape(quant_type(FMT), groups, x, per_token, out.len());
        assert!(seg_blocks > 0 && per_token.is_multiple_of(seg_blocks));
        let stride = PackedRows::stride(quant_type(FMT));
        let group_bytes = groups.len() / n;
        for (gi, g) in groups.chunks_exact(group_bytes).enumerate() {
            by_tiles(tokens, |t0, k| {
                let mut fixed = [[_mm256_setzero_si256(); 2]; TILE];
                for s in 0..per_token / seg_blocks {
                    let at = s * seg_blocks;
                    let xt = x.as_ptr().add(t0 * per_token + at);
                    let gs = g.as_ptr().add(at * stride);
                    let skip = gi * group_bytes + at * stride;
                    let ahead = Ahead::after(groups, skip, stride, t0);
                    sized!(
                        k,
                        tile_avx2::<FMT>(gs, xt, per_token, seg_blocks, ahead),
                        |acc| {
                            for (f, v) in fixed.iter_mut().zip(acc) {
                                f[0] = _mm256_add_epi64(f[0], to_fixed4(_mm256_castps256_ps128(v)));
                                f[1] =
                                    _mm256_add_epi64(f[1], to_fixed4(_mm256_extractf128_ps(v, 1)));
                            }
                        }
                    )
                }
                for (t, f) in fixed.iter().take(k).enumerate() {
                    let o = out.as_mut_ptr().add((t0 + t) * n * GROUP + gi * GROUP) as *mut __m256i;
                    _mm256_storeu_si256(o, f[0]);
                    _mm256_storeu_si256(o.add(1), f[1]);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::packed::tests::{blocks_of, random_rows};
    use crate::kernels::qdot::quantize_q8;
    use rand::{Rng, SeedableRng};

    /// Every ISA's multi-token kernels equal the scalar twin bit for bit, and the twin is
    /// the one-token kernel token by token: for 1–17 tokens, one or two groups, block
    /// counts that are odd, even and long, plain and fixed point.
    #[test]
    fn every_isa_equals_the_one_token_twin_for_1_to_17_tokens() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for ty in [
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_1,
            QuantType::Q8_0,
            QuantType::Q4K,
            QuantType::Q6K,
        ] {
            for (blocks, seg) in [(1, 1), (3, 3), (6, 2), (18, 2), (64, 2)] {
                let blocks = blocks_of(ty, blocks);
                let seg = if blocks.is_multiple_of(seg) { seg } else { 2 };
                for n in 1..=MAX_GROUPS {
                    let packed = PackedRows::pack(
                        ty,
                        n * GROUP,
                        blocks * 32,
                        &random_rows(ty, n * GROUP, blocks, &mut rng),
                    );
                    let groups: Vec<u8> = (0..n).flat_map(|g| packed.group(g).to_vec()).collect();
                    for tokens in 1..=17 {
                        let x: Vec<f32> = (0..tokens * blocks * 32)
                            .map(|_| rng.random_range(-3.0..3.0))
                            .collect();
                        let mut q = vec![BlockQ8::default(); tokens * blocks];
                        quantize_q8(&x, &mut q);
                        let width = tokens * n * GROUP;
                        let (mut want, mut want_fixed) = (vec![0.0; width], vec![0; width]);
                        let (one, one_fixed) = packed_fns(ty, Isa::Scalar);
                        for t in 0..tokens {
                            for g in 0..n {
                                let o = (t * n + g) * GROUP;
                                let xt = &q[t * blocks..(t + 1) * blocks];
                                one(
                                    packed.group(g),
                                    xt,
                                    (&mut want[o..o + GROUP]).try_into().unwrap(),
                                );
                                let o = (&mut want_fixed[o..o + GROUP]).try_into().unwrap();
                                one_fixed(packed.group(g), xt, seg, o);
                            }
                        }
                        for isa in Isa::available() {
                            let (f, fixed) = tile_fns(ty, isa);
                            let (mut got, mut got_fixed) = (vec![0.0; width], vec![0; width]);
                            f(&groups, &q, blocks, &mut got);
                            fixed(&groups, &q, blocks, seg, &mut got_fixed);
                            let what = format!(
                                "{ty:?} {isa:?} {blocks} blocks {n} groups {tokens} tokens"
                            );
                            assert_eq!(
                                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{what}"
                            );
                            assert_eq!(got_fixed, want_fixed, "{what}, fixed");
                        }
                    }
                }
            }
        }
    }
}
