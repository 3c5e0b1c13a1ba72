//! GGUF (llama.cpp) block formats: layouts and dequantizers.
//!
//! A quantized row is a sequence of blocks; each block holds `block_elems` weights in
//! `block_bytes` bytes (scales as f16, then packed integers). These scalar dequantizers are
//! the reference the SIMD kernels are tested against, and they are themselves tested against
//! blocks dequantized by the gguf Python package.

use half::f16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// 4-bit indices into a fixed non-linear table of 16 values, one f16 scale per 32.
    IQ4NL,
    /// IQ4_NL's table in 256-weight super-blocks with 6-bit scales per 32.
    IQ4XS,
}

impl QuantType {
    pub fn block_elems(self) -> usize {
        use QuantType::*;
        match self {
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4NL => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | IQ4XS => 256,
        }
    }

    pub fn block_bytes(self) -> usize {
        use QuantType::*;
        match self {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            IQ4NL => 18,
            IQ4XS => 136,
        }
    }

    pub fn name(self) -> &'static str {
        use QuantType::*;
        match self {
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            IQ4NL => "IQ4_NL",
            IQ4XS => "IQ4_XS",
        }
    }

    /// Formats whose every weight is a signed 8-bit integer times its block's f16 scale
    /// (Q5_0: code − 16; IQ4_NL: a table level), re-encoded as Q8_0 blocks of the same
    /// integers and scale: the same dot products, bit for bit, on Q8_0's kernels (at 34
    /// bytes per 32 weights instead of 22 or 18).
    pub fn as_q8_0(self, blocks: &[u8]) -> Option<Vec<u8>> {
        let integers = |block: &[u8]| -> [i8; 32] {
            match self {
                QuantType::Q5_0 => q5_codes(&block[2..6], &block[6..22]).map(|q| q as i8 - 16),
                _ => std::array::from_fn(|j| {
                    let q = block[2 + j % 16];
                    IQ4_LEVELS[(if j < 16 { q & 0x0f } else { q >> 4 }) as usize]
                }),
            }
        };
        if !matches!(self, QuantType::Q5_0 | QuantType::IQ4NL) {
            return None;
        }
        let mut out = Vec::with_capacity(blocks.len() / self.block_bytes() * 34);
        for block in blocks.chunks_exact(self.block_bytes()) {
            out.extend_from_slice(&block[0..2]);
            out.extend(integers(block).map(|q| q as u8));
        }
        Some(out)
    }

    /// Byte offsets of a block's f16 fields: the scale, then the min where there is one.
    pub fn f16_fields(self) -> &'static [usize] {
        use QuantType::*;
        match self {
            Q4_1 | Q5_1 | Q4K | Q5K => &[0, 2],
            Q4_0 | Q5_0 | Q8_0 | IQ4NL | IQ4XS => &[0],
            Q2K => &[80, 82],
            Q3K => &[108],
            Q6K => &[208],
        }
    }

    /// Bytes of `elems` weights (a whole number of blocks).
    pub fn bytes_for(self, elems: usize) -> usize {
        elems / self.block_elems() * self.block_bytes()
    }

    /// Dequantizes whole blocks: `out.len()` must be a multiple of the block size and
    /// `blocks` hold exactly that many weights.
    pub fn dequantize(self, blocks: &[u8], out: &mut [f32]) {
        let (n, b) = (self.block_elems(), self.block_bytes());
        debug_assert_eq!(blocks.len() / b * n, out.len());
        for (block, y) in blocks.chunks_exact(b).zip(out.chunks_exact_mut(n)) {
            match self {
                QuantType::Q4_0 => dequantize_q4_0(block, y),
                QuantType::Q4_1 => dequantize_q4_1(block, y),
                QuantType::Q5_0 => dequantize_q5_0(block, y),
                QuantType::Q5_1 => dequantize_q5_1(block, y),
                QuantType::Q8_0 => dequantize_q8_0(block, y),
                QuantType::Q2K => dequantize_q2_k(block, y),
                QuantType::Q3K => dequantize_q3_k(block, y),
                QuantType::Q4K => dequantize_q4_k(block, y),
                QuantType::Q5K => dequantize_q5_k(block, y),
                QuantType::Q6K => dequantize_q6_k(block, y),
                QuantType::IQ4NL => dequantize_iq4_nl(block, y),
                QuantType::IQ4XS => dequantize_iq4_xs(block, y),
            }
        }
    }
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// d: f16, then 16 bytes of 4-bit values (low nibbles are weights 0..16, high 16..32), −8.
fn dequantize_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// d, m: f16, then 16 bytes of 4-bit values: w = q·d + m.
fn dequantize_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit codes of a Q5_0 / Q5_1 block: 16 bytes of low nibbles (weights 0..16 low,
/// 16..32 high) and 32 fifth bits in a little-endian u32.
pub(crate) fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for (j, &b) in qs.iter().enumerate() {
        q[j] = (b & 0x0f) | ((((high >> j) & 1) as u8) << 4);
        q[j + 16] = (b >> 4) | ((((high >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// d: f16, 4 bytes of fifth bits, 16 bytes of nibbles: w = (q − 16)·d.
fn dequantize_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, q) in y.iter_mut().zip(q5_codes(&b[2..6], &b[6..22])) {
        *o = (q as i32 - 16) as f32 * d;
    }
}

/// d, m: f16, 4 bytes of fifth bits, 16 bytes of nibbles: w = q·d + m.
fn dequantize_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (o, q) in y.iter_mut().zip(q5_codes(&b[4..8], &b[8..24])) {
        *o = q as f32 * d + m;
    }
}

/// d: f16, then 32 signed bytes: w = q·d.
fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block's 12 packed scale bytes.
pub(crate) fn q4_k_scale_min(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// d, dmin: f16; 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32; 128 bytes of
/// 4-bit values: w = d·scale·q − dmin·min.
fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = q4_k_scale_min(2 * chunk, scales);
        let (sc2, m2) = q4_k_scale_min(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// d, dmin: f16; scales as Q4_K's; 32 bytes of fifth bits (bit g of byte l: weight
/// 32g + l); 128 bytes of nibbles as Q4_K's: w = d·scale·q − dmin·min.
fn dequantize_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for g in 0..8 {
        let (sc, m) = q4_k_scale_min(g, &b[4..16]);
        let (dl, ml) = (d * sc, dmin * m);
        let q = &qs[(g / 2) * 32..(g / 2) * 32 + 32];
        for l in 0..32 {
            let low = if g % 2 == 0 { q[l] & 0x0f } else { q[l] >> 4 };
            let code = low | (((qh[l] >> g) & 1) << 4);
            y[32 * g + l] = dl * code as f32 - ml;
        }
    }
}

/// 16 bytes of 4-bit scale and min per 16 weights, 64 bytes of 2-bit codes, d, dmin: f16.
/// Weight 128h + 32k + l (l < 32) is bits 2k.. of qs[32h + l]; its sub-block is
/// 8h + 2k + l/16: w = d·scale·q − dmin·min.
fn dequantize_q2_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (i, o) in y.iter_mut().enumerate() {
        let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
        let sc = b[8 * h + 2 * k + l / 16];
        let q = (b[16 + 32 * h + l] >> (2 * k)) & 3;
        *o = d * (sc & 0x0f) as f32 * q as f32 - dmin * (sc >> 4) as f32;
    }
}

/// The 16 signed 6-bit scales of a Q3_K block (12 packed bytes), each already − 32.
pub(crate) fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0x0f } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    })
}

/// 32 bytes of high bits (hmask), 64 bytes of 2-bit codes, 12 bytes of 6-bit scales per
/// 16 weights, d: f16. Weight 128h + 32k + l has code bits 2k.. of qs[32h + l] and high
/// bit 4h + k of hmask[l]; w = d·scale·(q − (high ? 0 : 4)).
fn dequantize_q3_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 108);
    let scales = q3_k_scales(&b[96..108]);
    for (i, o) in y.iter_mut().enumerate() {
        let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = ((b[32 + 32 * h + l] >> (2 * k)) & 3) as i32;
        let high = (b[l] >> (4 * h + k)) & 1;
        let q = low - if high == 1 { 0 } else { 4 };
        *o = d * scales[8 * h + 2 * k + l / 16] as f32 * q as f32;
    }
}

/// IQ4_NL's and IQ4_XS's 16 levels.
pub const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// d: f16, 16 bytes of 4-bit level indices (low nibbles weights 0..16): w = d·level.
fn dequantize_iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * IQ4_LEVELS[(q & 0x0f) as usize] as f32;
        y[j + 16] = d * IQ4_LEVELS[(q >> 4) as usize] as f32;
    }
}

/// The 6-bit scale (− 32) of group `g` of an IQ4_XS block.
pub(crate) fn iq4_xs_scale(b: &[u8], g: usize) -> i32 {
    let high = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + g / 2] >> (4 * (g % 2))) & 0x0f;
    (low as i32 | ((((high >> (2 * g)) & 3) as i32) << 4)) - 32
}

/// d: f16, 2 bytes of high scale bits, 4 bytes of low ones, then 8 groups of 32 as IQ4_NL's
/// 16 bytes: w = d·scale·level.
fn dequantize_iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for g in 0..8 {
        let dl = d * iq4_xs_scale(b, g) as f32;
        let qs = &b[8 + 16 * g..8 + 16 * g + 16];
        for (j, &q) in qs.iter().enumerate() {
            y[32 * g + j] = dl * IQ4_LEVELS[(q & 0x0f) as usize] as f32;
            y[32 * g + j + 16] = dl * IQ4_LEVELS[(q >> 4) as usize] as f32;
        }
    }
}

/// 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 signed 8-bit scales, d: f16:
/// w = d·scale·(q − 32).
fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Q5_0 and IQ4_NL re-encoded as Q8_0 hold the same values, bit for bit.
    #[test]
    fn q8_0_re_encoding_keeps_every_value() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for ty in [QuantType::Q5_0, QuantType::IQ4NL] {
            let mut blocks: Vec<u8> = (0..ty.bytes_for(32 * 40)).map(|_| rng.random()).collect();
            for b in blocks.chunks_exact_mut(ty.block_bytes()) {
                let d = f16::from_f32(rng.random_range(-0.05..0.05)).to_le_bytes();
                b[0..2].copy_from_slice(&d);
            }
            let (mut direct, mut via) = (vec![0.0; 32 * 40], vec![0.0; 32 * 40]);
            ty.dequantize(&blocks, &mut direct);
            QuantType::Q8_0.dequantize(&ty.as_q8_0(&blocks).unwrap(), &mut via);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&direct), bits(&via), "{ty:?}");
        }
        assert!(QuantType::Q5_1.as_q8_0(&[0; 24]).is_none());
    }
}
