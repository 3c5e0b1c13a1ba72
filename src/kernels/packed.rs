//! Decode layout for Q4_0, Q4_1, Q5_1 and Q8_0 weights: rows interleaved in groups of eight
//! (llama.cpp's "repacking"), so that one 8-lane integer dot product serves eight rows.
//!
//! Row-major blocks make a kernel reduce the lanes of every row and block horizontally;
//! here lane `r` of every vector belongs to row `r` of the group, the eight scales of a
//! block are one 16-byte load, and a block costs a few instructions for all eight rows.
//! Decode then reads weights as fast as memory delivers them.
//!
//! Per group of eight rows and per block of 32 columns, `stride` bytes:
//! - the eight rows' f16 scales (16 bytes); for Q4_1 and Q5_1, then the eight f16 minimums;
//!   Q4_K's 32-weight groups as the eight f32 products `d·scale` and the eight f32
//!   `−dmin·min` (each exact in f32), so Q4_K runs as Q4_1 does, in 4/3 of its file size;
//!   Q6_K's as the eight f32 `d·scale` of columns 0..16, then the eight of 16..32 (Q6_K
//!   has a scale per 16 weights), with byte codes as Q8_0's (1.5× its file size);
//! - the weights as unsigned codes (Q4: `q`, 0..15; Q5_1: `q`, 0..31, one a byte, 1.5× its
//!   file size; Q8_0: `q + 128`; Q6_K: `q + 32`, 0..63), in steps of four
//!   columns: step `s` holds columns `4s..4s+4` of row `r` at bytes `4r..4r+4` of a 32-byte
//!   vector. Byte codes store the eight steps one after the other; Q4 packs step `2i` in the low
//!   and step `2i + 1` in the high nibbles of vector `i`.
//!
//! A row's dot product is Σ_blocks d_w·d_x·(Σ code·x − offset·Σx) (+ m_w·s_x with a minimum),
//! each block's integer sum exact, accumulated with one fused multiply-add per block in
//! block order (Q6_K: one per half block, the first half first); the scalar twin does
//! exactly that, so every ISA gives the same bits.

use super::buffer::LargeBuffer;
use super::fixed::to_fixed;
use super::qdot::{BlockQ8, Isa};
use super::quant::{f16_at, q4_k_scale_min, q5_codes, QuantType};

/// Rows per group.
pub const GROUP: usize = 8;

/// A quantized matrix in the grouped decode layout (rows padded to a multiple of eight
/// with zero rows).
#[derive(Debug, Clone)]
pub struct PackedRows {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    data: LargeBuffer,
}

/// Eight rows of one group · one token's activation blocks, as f32.
pub type PackedDotFn = fn(&[u8], &[BlockQ8], &mut [f32; GROUP]);

/// The same, summed per segment of `seg_blocks` blocks, each in fixed point (see
/// [`super::fixed`]).
pub type PackedDotFixedFn = fn(&[u8], &[BlockQ8], usize, &mut [i64; GROUP]);

/// Bytes of the scale header of one block of a group.
pub(crate) fn header_bytes(ty: QuantType) -> usize {
    match ty {
        QuantType::Q4_1 | QuantType::Q5_1 => 32,
        QuantType::Q4K | QuantType::Q6K => 64,
        _ => 16,
    }
}

/// Whether blocks carry a minimum per row (weight = d·code + m).
pub(crate) const fn has_min(ty: QuantType) -> bool {
    matches!(ty, QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4K)
}

/// Row `r`'s scales (of columns 0..16 and 16..32, the same but for Q6_K) and minimum in a
/// block's header: f16 for the 32-weight formats, the f32 products for the K formats.
fn row_scales(ty: QuantType, block: &[u8], r: usize) -> (f32, f32, f32) {
    let f32_at = |at: usize| f32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"));
    match ty {
        QuantType::Q4K => (f32_at(4 * r), f32_at(4 * r), f32_at(32 + 4 * r)),
        QuantType::Q6K => (f32_at(4 * r), f32_at(32 + 4 * r), 0.0),
        QuantType::Q4_1 | QuantType::Q5_1 => {
            let d = f16_at(block, 2 * r);
            (d, d, f16_at(block, 16 + 2 * r))
        }
        _ => (f16_at(block, 2 * r), f16_at(block, 2 * r), 0.0),
    }
}

/// What the codes are offset by: weight = d · (code − offset) (+ m with a minimum).
pub(crate) fn code_offset(ty: QuantType) -> i32 {
    match ty {
        QuantType::Q4_0 => 8,
        QuantType::Q8_0 => 128,
        QuantType::Q6K => 32,
        _ => 0,
    }
}

impl PackedRows {
    /// Whether `ty` has the grouped layout.
    pub fn supports(ty: QuantType) -> bool {
        use QuantType::*;
        matches!(ty, Q4_0 | Q4_1 | Q5_1 | Q8_0 | Q4K | Q6K)
    }

    /// Whether a `rows`-row matrix of `ty` is regrouped: the K formats only when their
    /// rows fill whole groups, since their layout cannot be turned back into GGUF blocks
    /// (which fusing a matrix that ends inside a group needs).
    pub fn packs(ty: QuantType, rows: usize) -> bool {
        Self::supports(ty) && (!is_k(ty) || rows.is_multiple_of(GROUP))
    }

    /// Bytes of one block (32 columns) of one group.
    pub(crate) fn stride(ty: QuantType) -> usize {
        match ty {
            QuantType::Q4K => GROUP * 24,
            QuantType::Q6K => GROUP * 40,
            QuantType::Q5_1 => GROUP * 36,
            _ => GROUP * ty.block_bytes(),
        }
    }

    /// Regroups `rows` GGUF rows of `cols` weights (`blocks`, row-major).
    pub fn pack(ty: QuantType, rows: usize, cols: usize, blocks: &[u8]) -> Self {
        assert!(Self::supports(ty), "{} has no grouped layout", ty.name());
        let nb = cols / 32;
        assert_eq!(
            blocks.len(),
            rows * ty.bytes_for(cols),
            "blocks do not match the shape"
        );
        let groups = rows.div_ceil(GROUP);
        let stride = Self::stride(ty);
        let mut data = LargeBuffer::zeroed(groups * nb * stride)
            .expect("cannot map memory for a weight matrix");
        let header = header_bytes(ty);
        let row_bytes = ty.bytes_for(cols);
        for j in 0..rows {
            let (g, r) = (j / GROUP, j % GROUP);
            let row = &blocks[j * row_bytes..(j + 1) * row_bytes];
            for b in 0..nb {
                let dst = &mut data[(g * nb + b) * stride..(g * nb + b + 1) * stride];
                let bb = ty.block_bytes();
                let codes = if is_k(ty) {
                    // Block b is part b % 8 of the 256-weight block b / 8.
                    let src = &row[(b / 8) * bb..(b / 8 + 1) * bb];
                    let (first, second, codes) = match ty {
                        QuantType::Q4K => q4_k_group(src, b % 8),
                        _ => q6_k_group(src, b % 8),
                    };
                    dst[4 * r..4 * r + 4].copy_from_slice(&first.to_le_bytes());
                    dst[32 + 4 * r..32 + 4 * r + 4].copy_from_slice(&second.to_le_bytes());
                    codes
                } else {
                    let src = &row[b * bb..(b + 1) * bb];
                    dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                    if has_min(ty) {
                        dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&src[2..4]);
                    }
                    block_codes(ty, src)
                };
                let q = &mut dst[header..];
                for (i, &c) in codes.iter().enumerate() {
                    let (step, k) = (i / 4, i % 4);
                    if byte_codes(ty) {
                        q[32 * step + 4 * r + k] = c;
                    } else {
                        let at = 32 * (step / 2) + 4 * r + k;
                        q[at] |= if step % 2 == 0 { c } else { c << 4 };
                    }
                }
            }
        }
        PackedRows {
            ty,
            rows,
            cols,
            data,
        }
    }

    /// Bytes the matrix holds in the model's format (padding rows not counted).
    pub fn bytes(&self) -> usize {
        self.rows * self.ty.bytes_for(self.cols)
    }

    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// The bytes of group `g`: its blocks, in column order.
    pub fn group(&self, g: usize) -> &[u8] {
        let len = self.cols / 32 * Self::stride(self.ty);
        &self.data[g * len..(g + 1) * len]
    }

    /// The bytes of groups `g..g + n`, one after the other.
    pub fn group_run(&self, g: usize, n: usize) -> &[u8] {
        let len = self.cols / 32 * Self::stride(self.ty);
        &self.data[g * len..(g + n) * len]
    }

    /// The rows back in GGUF's row-major blocks (not for the K formats, see [`Self::packs`]).
    pub fn to_blocks(&self) -> Vec<u8> {
        assert!(!is_k(self.ty), "K-format rows are not turned back");
        let (ty, nb) = (self.ty, self.cols / 32);
        let (bb, stride, header) = (ty.block_bytes(), Self::stride(ty), header_bytes(ty));
        let mut out = vec![0u8; self.rows * nb * bb];
        for (j, row) in out.chunks_exact_mut(nb * bb).enumerate() {
            let (g, r) = (j / GROUP, j % GROUP);
            let group = self.group(g);
            for (b, dst) in row.chunks_exact_mut(bb).enumerate() {
                let block = &group[b * stride..(b + 1) * stride];
                dst[0..2].copy_from_slice(&block[2 * r..2 * r + 2]);
                if has_min(ty) {
                    dst[2..4].copy_from_slice(&block[16 + 2 * r..16 + 2 * r + 2]);
                }
                let q = &block[header..];
                if ty == QuantType::Q8_0 {
                    for i in 0..32 {
                        dst[2 + i] = (code_at(ty, q, r, i) as i16 - 128) as i8 as u8;
                    }
                } else if ty == QuantType::Q5_1 {
                    let high =
                        (0..32).fold(0u32, |h, i| h | ((code_at(ty, q, r, i) >> 4) as u32) << i);
                    dst[4..8].copy_from_slice(&high.to_le_bytes());
                    for (i, byte) in dst[8..24].iter_mut().enumerate() {
                        *byte =
                            code_at(ty, q, r, i) & 0x0f | (code_at(ty, q, r, i + 16) & 0x0f) << 4;
                    }
                } else {
                    for (i, byte) in dst[bb - 16..].iter_mut().enumerate() {
                        *byte = code_at(ty, q, r, i) | code_at(ty, q, r, i + 16) << 4;
                    }
                }
            }
        }
        out
    }

    /// `self`'s rows followed by `other`'s (fusing weights row-wise).
    pub fn concat(self, other: PackedRows) -> anyhow::Result<PackedRows> {
        if self.ty != other.ty || self.cols != other.cols {
            anyhow::bail!("cannot fuse weights of different formats or widths");
        }
        // (K-format matrices are whole groups, see [`Self::packs`].)
        if self.rows.is_multiple_of(GROUP) {
            let data = LargeBuffer::from_slice(&[&self.data[..], &other.data[..]].concat())?;
            return Ok(PackedRows {
                rows: self.rows + other.rows,
                data,
                ..self
            });
        }
        let blocks = [self.to_blocks(), other.to_blocks()].concat();
        Ok(PackedRows::pack(
            self.ty,
            self.rows + other.rows,
            self.cols,
            &blocks,
        ))
    }

    /// Row `j`, weights `start..start + out.len()` (whole blocks), as f32.
    pub fn dequantize(&self, j: usize, start: usize, out: &mut [f32]) {
        assert!(
            start.is_multiple_of(32) && out.len().is_multiple_of(32),
            "whole blocks only"
        );
        let (g, r) = (j / GROUP, j % GROUP);
        let group = self.group(g);
        let stride = Self::stride(self.ty);
        let offset = code_offset(self.ty) as f32;
        for (k, y) in out.chunks_exact_mut(32).enumerate() {
            let block = &group[(start / 32 + k) * stride..(start / 32 + k + 1) * stride];
            let (d_lo, d_hi, m) = row_scales(self.ty, block, r);
            let q = &block[header_bytes(self.ty)..];
            for (i, v) in y.iter_mut().enumerate() {
                let d = if i < 16 { d_lo } else { d_hi };
                *v = d * (code_at(self.ty, q, r, i) as f32 - offset) + m;
            }
        }
    }
}

/// Group `g` (weights 32g..32g + 32) of a Q4_K block: its scale `d·sc` and minimum
/// `−dmin·m`, both exact in f32 (an f16 times a 6-bit integer), and its 32 codes.
fn q4_k_group(block: &[u8], g: usize) -> (f32, f32, [u8; 32]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let (sc, m) = q4_k_scale_min(g, &block[4..16]);
    let qs = &block[16 + (g / 2) * 32..16 + (g / 2) * 32 + 32];
    let codes = std::array::from_fn(|l| {
        if g.is_multiple_of(2) {
            qs[l] & 0x0f
        } else {
            qs[l] >> 4
        }
    });
    (d * sc, -(dmin * m), codes)
}

/// Block `b` (weights 32b..32b + 32) of a Q6_K block: the f32 scales `d·scale` of its two
/// halves (exact: an f16 times an 8-bit integer) and its 32 codes `q + 32`.
fn q6_k_group(block: &[u8], b: usize) -> (f32, f32, [u8; 32]) {
    let d = f16_at(block, 208);
    let (half, k) = (b / 4, b % 4);
    let ql = &block[half * 64..half * 64 + 64];
    let qh = &block[128 + half * 32..128 + half * 32 + 32];
    let sc = |i: usize| d * (block[192 + half * 8 + 2 * k + i] as i8) as f32;
    let codes = std::array::from_fn(|l| {
        let low = match k {
            0 => ql[l] & 0x0f,
            1 => ql[l + 32] & 0x0f,
            2 => ql[l] >> 4,
            _ => ql[l + 32] >> 4,
        };
        low | ((qh[l] >> (2 * k)) & 3) << 4
    });
    (sc(0), sc(1), codes)
}

/// Whether `ty` is a K format (its rows regrouped only in whole groups).
fn is_k(ty: QuantType) -> bool {
    matches!(ty, QuantType::Q4K | QuantType::Q6K)
}

/// The 32 unsigned codes of a GGUF block.
fn block_codes(ty: QuantType, block: &[u8]) -> [u8; 32] {
    let mut codes = [0u8; 32];
    match ty {
        QuantType::Q8_0 => {
            for (c, &q) in codes.iter_mut().zip(&block[2..34]) {
                *c = (q as i8 as i16 + 128) as u8;
            }
        }
        QuantType::Q5_1 => codes = q5_codes(&block[4..8], &block[8..24]),
        _ => {
            let qs = &block[block.len() - 16..];
            for i in 0..16 {
                codes[i] = qs[i] & 0x0f;
                codes[i + 16] = qs[i] >> 4;
            }
        }
    }
    codes
}

/// Whether codes are bytes (else nibbles).
pub(crate) fn byte_codes(ty: QuantType) -> bool {
    matches!(ty, QuantType::Q8_0 | QuantType::Q5_1 | QuantType::Q6K)
}

/// Code of column `i` of row `r` in a block's code bytes `q`.
fn code_at(ty: QuantType, q: &[u8], r: usize, i: usize) -> u8 {
    let (step, k) = (i / 4, i % 4);
    if byte_codes(ty) {
        q[32 * step + 4 * r + k]
    } else {
        let byte = q[32 * (step / 2) + 4 * r + k];
        if step % 2 == 0 {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }
}

/// The grouped kernels of `ty` on `isa`.
pub fn packed_fns(ty: QuantType, isa: Isa) -> (PackedDotFn, PackedDotFixedFn) {
    // Never more than the CPU runs: the safe pointers below call SIMD code.
    let isa = isa.min(Isa::best());
    macro_rules! twin {
        ($ty:expr) => {
            (
                |g, x, out| scalar::dot(g, x, $ty, out),
                |g, x, s, out| scalar::dot_fixed(g, x, $ty, s, out),
            )
        };
    }
    #[cfg(target_arch = "x86_64")]
    macro_rules! simd {
        // SAFETY: `isa` is at most what the CPU supports (capped above).
        ($f32:ident, $fixed:ident, $fmt:expr) => {
            (
                |g, x, out| unsafe { x86::$f32::<$fmt>(g, x, out) },
                |g, x, s, out| unsafe { x86::$fixed::<$fmt>(g, x, s, out) },
            )
        };
    }
    #[cfg(target_arch = "x86_64")]
    {
        use x86::{Q4K, Q4_0, Q4_1, Q5_1, Q6K, Q8_0};
        match (ty, isa) {
            (QuantType::Q6K, Isa::Avx2) => return simd!(dot_avx2, dot_fixed_avx2, Q6K),
            (QuantType::Q6K, Isa::Avx512Vnni) => return simd!(dot_vnni, dot_fixed_vnni, Q6K),
            (QuantType::Q4K, Isa::Avx2) => return simd!(dot_avx2, dot_fixed_avx2, Q4K),
            (QuantType::Q4K, Isa::Avx512Vnni) => return simd!(dot_vnni, dot_fixed_vnni, Q4K),
            (QuantType::Q4_0, Isa::Avx2) => return simd!(dot_avx2, dot_fixed_avx2, Q4_0),
            (QuantType::Q4_1, Isa::Avx2) => return simd!(dot_avx2, dot_fixed_avx2, Q4_1),
            (QuantType::Q5_1, Isa::Avx2) => return simd!(dot_avx2, dot_fixed_avx2, Q5_1),
            (QuantType::Q8_0, Isa::Avx2) => return simd!(dot_avx2, dot_fixed_avx2, Q8_0),
            (QuantType::Q4_0, Isa::Avx512Vnni) => return simd!(dot_vnni, dot_fixed_vnni, Q4_0),
            (QuantType::Q4_1, Isa::Avx512Vnni) => return simd!(dot_vnni, dot_fixed_vnni, Q4_1),
            (QuantType::Q5_1, Isa::Avx512Vnni) => return simd!(dot_vnni, dot_fixed_vnni, Q5_1),
            (QuantType::Q8_0, Isa::Avx512Vnni) => return simd!(dot_vnni, dot_fixed_vnni, Q8_0),
            _ => {}
        }
    }
    match ty {
        QuantType::Q4_0 => twin!(QuantType::Q4_0),
        QuantType::Q4_1 => twin!(QuantType::Q4_1),
        QuantType::Q5_1 => twin!(QuantType::Q5_1),
        QuantType::Q8_0 => twin!(QuantType::Q8_0),
        QuantType::Q4K => twin!(QuantType::Q4K),
        QuantType::Q6K => twin!(QuantType::Q6K),
        other => panic!("{} has no grouped layout", other.name()),
    }
}

/// The scalar twins: the arithmetic of the SIMD kernels, lane by lane.
pub mod scalar {
    use super::*;

    /// Row `r`'s contribution of one block (`block`: the group's bytes of that block) added
    /// to `acc` as the SIMD kernels add it.
    fn block_term(ty: QuantType, block: &[u8], a: &BlockQ8, r: usize, acc: f32) -> f32 {
        let q = &block[header_bytes(ty)..];
        let products = |cols: std::ops::Range<usize>| -> i32 {
            cols.map(|i| code_at(ty, q, r, i) as i32 * a.qs[i] as i32)
                .sum()
        };
        let (d_lo, d_hi, m) = row_scales(ty, block, r);
        if ty == QuantType::Q6K {
            let offset = code_offset(ty);
            let lo = products(0..16) - offset * a.sum_lo;
            let hi = products(16..32) - offset * (a.sum - a.sum_lo);
            let acc = (lo as f32).mul_add(d_lo * a.d, acc);
            return (hi as f32).mul_add(d_hi * a.d, acc);
        }
        let sum = products(0..32) - code_offset(ty) * a.sum;
        let acc = (sum as f32).mul_add(d_lo * a.d, acc);
        if has_min(ty) {
            m.mul_add(a.s, acc)
        } else {
            acc
        }
    }

    pub fn dot(group: &[u8], x: &[BlockQ8], ty: QuantType, out: &mut [f32; GROUP]) {
        let stride = PackedRows::stride(ty);
        for (r, o) in out.iter_mut().enumerate() {
            *o = group
                .chunks_exact(stride)
                .zip(x)
                .fold(0.0, |acc, (block, a)| block_term(ty, block, a, r, acc));
        }
    }

    pub fn dot_fixed(
        group: &[u8],
        x: &[BlockQ8],
        ty: QuantType,
        seg_blocks: usize,
        out: &mut [i64; GROUP],
    ) {
        let stride = PackedRows::stride(ty);
        for (r, o) in out.iter_mut().enumerate() {
            *o = group
                .chunks_exact(stride * seg_blocks)
                .zip(x.chunks_exact(seg_blocks))
                .map(|(seg, xs)| {
                    let sum = seg
                        .chunks_exact(stride)
                        .zip(xs)
                        .fold(0.0, |acc, (block, a)| block_term(ty, block, a, r, acc));
                    to_fixed(sum)
                })
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{header_bytes, PackedRows, GROUP};
    use crate::kernels::fixed::x86::to_fixed4;
    use crate::kernels::qdot::BlockQ8;
    use crate::kernels::quant::QuantType;
    use std::arch::x86_64::*;

    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;
    pub const Q4K: u8 = 3;
    pub const Q6K: u8 = 4;
    pub const Q5_1: u8 = 5;

    pub(crate) const fn quant_type(fmt: u8) -> QuantType {
        match fmt {
            Q4_0 => QuantType::Q4_0,
            Q4_1 => QuantType::Q4_1,
            Q5_1 => QuantType::Q5_1,
            Q4K => QuantType::Q4K,
            Q6K => QuantType::Q6K,
            _ => QuantType::Q8_0,
        }
    }

    /// [`super::has_min`] of a kernel's format.
    pub(crate) const fn with_min(fmt: u8) -> bool {
        super::has_min(quant_type(fmt))
    }

    /// Whether a kernel's format stores a byte per code (see [`super::byte_codes`]).
    pub(crate) const fn with_byte_codes(fmt: u8) -> bool {
        matches!(fmt, Q8_0 | Q5_1 | Q6K)
    }

    /// Q6_K's scales of columns 16..32 of a block (after those of 0..16).
    #[inline(always)]
    pub(crate) unsafe fn high_scales8(block: *const u8) -> __m256 {
        _mm256_loadu_ps(block.add(32) as *const f32)
    }

    /// The eight rows' scales of a block: f16 widened, or Q4_K's f32.
    #[inline(always)]
    pub(crate) unsafe fn scales8<const FMT: u8>(block: *const u8) -> __m256 {
        if FMT == Q4K || FMT == Q6K {
            _mm256_loadu_ps(block as *const f32)
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128(block as *const __m128i))
        }
    }

    /// The eight rows' minimums of a block (Q4_1, Q5_1, Q4_K).
    #[inline(always)]
    pub(crate) unsafe fn mins8<const FMT: u8>(block: *const u8) -> __m256 {
        if FMT == Q4K {
            _mm256_loadu_ps(block.add(32) as *const f32)
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128(block.add(16) as *const __m128i))
        }
    }

    /// The four activations of step `s` in every lane.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn step_x(a: &BlockQ8, s: usize) -> __m256i {
        _mm256_set1_epi32((a.qs.as_ptr().add(4 * s) as *const i32).read_unaligned())
    }

    /// Σ code·x per row (lane) of one block, with the AVX2 u8×i8 product. Codes of
    /// Q8_0 reach 255, where u8×i8 pairs overflow AVX2's 16-bit sums: those are multiplied
    /// as signed weights (code − 128) and the offset added back.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_sums_avx2<const FMT: u8>(q: *const u8, a: &BlockQ8) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let dot = |u: __m256i, s: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones);
        let mut acc = [_mm256_setzero_si256(); 2];
        if FMT == Q8_0 {
            let flip = _mm256_set1_epi8(-128);
            for s in 0..8 {
                let w = _mm256_xor_si256(_mm256_loadu_si256(q.add(32 * s) as *const __m256i), flip);
                let x = step_x(a, s);
                let p = dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                acc[s % 2] = _mm256_add_epi32(acc[s % 2], p);
            }
            let signed = _mm256_add_epi32(acc[0], acc[1]);
            return _mm256_add_epi32(signed, _mm256_set1_epi32(128 * a.sum));
        }
        if FMT == Q5_1 {
            // Codes below 32: no 16-bit overflow.
            for s in 0..8 {
                let w = _mm256_loadu_si256(q.add(32 * s) as *const __m256i);
                acc[s % 2] = _mm256_add_epi32(acc[s % 2], dot(w, step_x(a, s)));
            }
            return _mm256_add_epi32(acc[0], acc[1]);
        }
        let mask = _mm256_set1_epi8(0x0f);
        for i in 0..4 {
            let p = _mm256_loadu_si256(q.add(32 * i) as *const __m256i);
            let lo = _mm256_and_si256(p, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
            acc[0] = _mm256_add_epi32(acc[0], dot(lo, step_x(a, 2 * i)));
            acc[1] = _mm256_add_epi32(acc[1], dot(hi, step_x(a, 2 * i + 1)));
        }
        _mm256_add_epi32(acc[0], acc[1])
    }

    /// Q6_K's Σ code·x per row of each half block (steps 0..4, 4..8), with the AVX2 u8×i8
    /// product (codes below 64 cannot overflow its 16-bit sums).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_sums_avx2(q: *const u8, a: &BlockQ8) -> [__m256i; 2] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); 2];
        for s in 0..8 {
            let w = _mm256_loadu_si256(q.add(32 * s) as *const __m256i);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, step_x(a, s)), ones);
            acc[s / 4] = _mm256_add_epi32(acc[s / 4], p);
        }
        acc
    }

    /// The same with AVX-512 VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn half_sums_vnni(q: *const u8, a: &BlockQ8) -> [__m256i; 2] {
        let mut acc = [_mm256_setzero_si256(); 2];
        for s in 0..8 {
            let w = _mm256_loadu_si256(q.add(32 * s) as *const __m256i);
            acc[s / 4] = _mm256_dpbusd_epi32(acc[s / 4], w, step_x(a, s));
        }
        acc
    }

    /// The same with AVX-512 VNNI: one instruction per step, no 16-bit intermediate.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn block_sums_vnni<const FMT: u8>(q: *const u8, a: &BlockQ8) -> __m256i {
        let mut acc = [_mm256_setzero_si256(); 2];
        if FMT == Q8_0 || FMT == Q5_1 {
            for s in 0..8 {
                let w = _mm256_loadu_si256(q.add(32 * s) as *const __m256i);
                acc[s % 2] = _mm256_dpbusd_epi32(acc[s % 2], w, step_x(a, s));
            }
        } else {
            let mask = _mm256_set1_epi8(0x0f);
            for i in 0..4 {
                let p = _mm256_loadu_si256(q.add(32 * i) as *const __m256i);
                let lo = _mm256_and_si256(p, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
                acc[0] = _mm256_dpbusd_epi32(acc[0], lo, step_x(a, 2 * i));
                acc[1] = _mm256_dpbusd_epi32(acc[1], hi, step_x(a, 2 * i + 1));
            }
        }
        _mm256_add_epi32(acc[0], acc[1])
    }

    /// For one instruction set: the group's dot products over `x` from `acc` on, and the
    /// two public kernels (f32 rows, fixed-point segments).
    macro_rules! kernels {
        ($blocks:ident, $f32:ident, $fixed:ident, $sums:ident, $halves:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            unsafe fn $blocks<const FMT: u8>(group: *const u8, x: &[BlockQ8]) -> __m256 {
                let ty = quant_type(FMT);
                let stride = PackedRows::stride(ty);
                let offset = super::code_offset(ty);
                let mut acc = _mm256_setzero_ps();
                for (b, a) in x.iter().enumerate() {
                    let block = group.add(b * stride);
                    if FMT == Q6K {
                        let [lo, hi] = $halves(block.add(header_bytes(ty)), a);
                        let lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(offset * a.sum_lo));
                        let hi =
                            _mm256_sub_epi32(hi, _mm256_set1_epi32(offset * (a.sum - a.sum_lo)));
                        let d = _mm256_set1_ps(a.d);
                        let lo_scale = _mm256_mul_ps(scales8::<FMT>(block), d);
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), lo_scale, acc);
                        let hi_scale = _mm256_mul_ps(high_scales8(block), d);
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), hi_scale, acc);
                        continue;
                    }
                    let mut sums = $sums::<FMT>(block.add(header_bytes(ty)), a);
                    if offset != 0 {
                        sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(offset * a.sum));
                    }
                    let scale = _mm256_mul_ps(scales8::<FMT>(block), _mm256_set1_ps(a.d));
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
                    if with_min(FMT) {
                        acc = _mm256_fmadd_ps(mins8::<FMT>(block), _mm256_set1_ps(a.s), acc);
                    }
                }
                acc
            }

            /// # Safety
            /// The CPU must support the enabled features.
            #[target_feature(enable = $features)]
            pub unsafe fn $f32<const FMT: u8>(group: &[u8], x: &[BlockQ8], out: &mut [f32; GROUP]) {
                assert_eq!(group.len(), x.len() * PackedRows::stride(quant_type(FMT)));
                _mm256_storeu_ps(out.as_mut_ptr(), $blocks::<FMT>(group.as_ptr(), x));
            }

            /// # Safety
            /// The CPU must support the enabled features.
            #[target_feature(enable = $features)]
            pub unsafe fn $fixed<const FMT: u8>(
                group: &[u8],
                x: &[BlockQ8],
                seg_blocks: usize,
                out: &mut [i64; GROUP],
            ) {
                let stride = PackedRows::stride(quant_type(FMT));
                assert!(seg_blocks > 0 && x.len().is_multiple_of(seg_blocks));
                assert_eq!(group.len(), x.len() * stride);
                let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for (s, xs) in x.chunks_exact(seg_blocks).enumerate() {
                    let seg = $blocks::<FMT>(group.as_ptr().add(s * seg_blocks * stride), xs);
                    lo = _mm256_add_epi64(lo, to_fixed4(_mm256_castps256_ps128(seg)));
                    hi = _mm256_add_epi64(hi, to_fixed4(_mm256_extractf128_ps(seg, 1)));
                }
                _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, lo);
                _mm256_storeu_si256(out.as_mut_ptr().add(4) as *mut __m256i, hi);
            }
        };
    }

    kernels!(
        blocks_avx2,
        dot_avx2,
        dot_fixed_avx2,
        block_sums_avx2,
        half_sums_avx2,
        "avx2,fma,f16c"
    );
    kernels!(
        blocks_vnni,
        dot_vnni,
        dot_fixed_vnni,
        block_sums_vnni,
        half_sums_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl"
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::qdot::quantize_q8;
    use rand::{Rng, SeedableRng};

    /// Random GGUF rows of `ty`, `blocks` blocks of 32 columns each, with sane f16 scales
    /// (now and then a zero or a large one).
    pub(crate) fn random_rows(
        ty: QuantType,
        rows: usize,
        blocks: usize,
        rng: &mut impl Rng,
    ) -> Vec<u8> {
        let mut data: Vec<u8> = (0..rows * ty.bytes_for(blocks * 32))
            .map(|_| rng.random())
            .collect();
        for b in data.chunks_exact_mut(ty.block_bytes()) {
            let d = match rng.random_range(0..20) {
                0 => 0.0,
                1 => 8.0,
                _ => rng.random_range(-0.1..0.1),
            };
            // Q6_K keeps its f16 scale last.
            let at = if ty == QuantType::Q6K { 208 } else { 0 };
            b[at..at + 2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
            if has_min(ty) {
                let m = half::f16::from_f32(rng.random_range(-0.5..0.5));
                b[2..4].copy_from_slice(&m.to_le_bytes());
            }
        }
        data
    }

    const TYPES: [QuantType; 6] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4K,
        QuantType::Q6K,
    ];

    /// Blocks of 32 a row of `ty` may have: the K formats' come eight at a time.
    pub(crate) fn blocks_of(ty: QuantType, blocks: usize) -> usize {
        if is_k(ty) {
            8 * blocks.div_ceil(8)
        } else {
            blocks
        }
    }

    #[test]
    fn packing_keeps_every_weight() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for ty in TYPES {
            for rows in [1, 8, 13] {
                let blocks = blocks_of(ty, 3);
                let data = random_rows(ty, rows, blocks, &mut rng);
                let packed = PackedRows::pack(ty, rows, blocks * 32, &data);
                assert_eq!(packed.bytes(), data.len());
                if !is_k(ty) {
                    assert_eq!(packed.to_blocks(), data, "{ty:?}: blocks round-trip");
                }
                for j in 0..rows {
                    let mut want = vec![0.0; blocks * 32];
                    let row_bytes = ty.bytes_for(blocks * 32);
                    ty.dequantize(&data[j * row_bytes..(j + 1) * row_bytes], &mut want);
                    let mut got = vec![0.0; 64];
                    packed.dequantize(j, 32, &mut got);
                    assert_eq!(got, want[32..96], "{ty:?} row {j}");
                }
            }
        }
    }

    #[test]
    fn every_isa_equals_the_scalar_twin_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for ty in TYPES {
            for blocks in [1, 2, 6, 48].map(|b| blocks_of(ty, b)) {
                let data = random_rows(ty, GROUP, blocks, &mut rng);
                let packed = PackedRows::pack(ty, GROUP, blocks * 32, &data);
                let x: Vec<f32> = (0..blocks * 32)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                let mut q = vec![BlockQ8::default(); blocks];
                quantize_q8(&x, &mut q);
                let seg = if blocks % 2 == 0 { 2 } else { 1 };
                let (twin, twin_fixed) = packed_fns(ty, Isa::Scalar);
                let (mut want, mut want_fixed) = ([0.0; GROUP], [0; GROUP]);
                twin(packed.group(0), &q, &mut want);
                twin_fixed(packed.group(0), &q, seg, &mut want_fixed);
                for isa in Isa::available() {
                    let (f, fixed) = packed_fns(ty, isa);
                    let (mut got, mut got_fixed) = ([0.0; GROUP], [0; GROUP]);
                    f(packed.group(0), &q, &mut got);
                    fixed(packed.group(0), &q, seg, &mut got_fixed);
                    assert_eq!(got, want, "{ty:?} {isa:?} {blocks} blocks");
                    assert_eq!(
                        got_fixed, want_fixed,
                        "{ty:?} {isa:?} {blocks} blocks, fixed"
                    );
                }
                // And the twin is the dot product of the dequantized rows, to 8-bit
                // activation precision.
                for (r, &w) in want.iter().enumerate() {
                    let mut row = vec![0.0; blocks * 32];
                    packed.dequantize(r, 0, &mut row);
                    let exact: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
                    let norm: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (w - exact).abs() <= 0.01 * norm + 1e-5,
                        "{ty:?}: {w} vs {exact}"
                    );
                }
            }
        }
    }
}
