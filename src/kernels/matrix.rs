//! A weight matrix in its stored format and the product `y = x · Wᵀ` over a batch of tokens.

use super::dot::{dot_bf16_fns, dot_f16_fns, dot_f32_fn, dot_f32_fns, DotFns, TILE};
use super::fixed::to_fixed;
use super::gemm::{dot_2x4_fixed_fn, dot_2x4_fn};
use super::kdot::{kdot_fn, KDotFn};
use super::packed::{packed_fns, PackedRows, GROUP};
use super::qdot::{quantize_q8, BlockQ8, Isa};
use super::quant::QuantType;
use super::threads::{DisjointChunks, Threads};
use super::tiles::{tile_fns, MAX_GROUPS};
use half::{bf16, f16};
use std::ops::Range;

/// Tokens a multi-token kernel call takes at most (its results fit a stack buffer).
const TOKEN_CHUNK: usize = 16;

/// Row ranges of [`Matrix::matmul_fixed_rows`] start at multiples of this (the grouped
/// layout's rows per group).
pub const ROW_ALIGN: usize = GROUP;

/// Which kernels a product's tokens take. The choice follows the tokens' role, never how
/// many share a step, so a sequence computes the same numbers alone or in any batch.
/// Q4_0/Q4_1/Q5_1/Q8_0 rows take their grouped integer kernels in both phases (as llama.cpp,
/// prompt activations are quantized to 8 bits too); the phase picks the kernels of the
/// other formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Prompt tokens: rows as f32 against groups of four tokens (the 2×4 micro-kernel;
    /// a short group is padded, so every token's lanes add in the same order).
    Prefill,
    /// Generated tokens: per-format dot products (8-bit integer ones for K-quants).
    Decode,
}

/// Weight elements as stored in the model file; kept in that format so that decode reads
/// as few bytes as the file has.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    /// GGUF blocks, row after row; every row is a whole number of blocks.
    Quant(QuantType, Vec<u8>),
    /// Q4_0 / Q4_1 / Q5_1 / Q8_0 / Q4_K / Q6_K rows regrouped ([`PackedRows`]); what
    /// [`Matrix::new`] makes of those formats.
    Packed(PackedRows),
}

impl Storage {
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::Quant(t, v) => v.len() / t.block_bytes() * t.block_elems(),
            Storage::Packed(p) => p.rows * p.cols,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            Storage::F32(v) => v.len() * 4,
            Storage::BF16(v) => v.len() * 2,
            Storage::F16(v) => v.len() * 2,
            Storage::Quant(_, v) => v.len(),
            Storage::Packed(p) => p.bytes(),
        }
    }

    /// Whether `other` is stored as `self` is (so the two can be fused).
    pub fn same_format(&self, other: &Storage) -> bool {
        match (self, other) {
            (Storage::Quant(t, _), Storage::Quant(u, _)) => t == u,
            (Storage::Packed(a), Storage::Packed(b)) => a.ty == b.ty,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }

    /// `self` followed by `other` (fusing weights row-wise); both must have one format.
    pub fn concat(self, other: Storage) -> anyhow::Result<Storage> {
        Ok(match (self, other) {
            (Storage::F32(mut a), Storage::F32(b)) => {
                a.extend(b);
                Storage::F32(a)
            }
            (Storage::BF16(mut a), Storage::BF16(b)) => {
                a.extend(b);
                Storage::BF16(a)
            }
            (Storage::F16(mut a), Storage::F16(b)) => {
                a.extend(b);
                Storage::F16(a)
            }
            (Storage::Quant(t, mut a), Storage::Quant(u, b)) if t == u => {
                a.extend(b);
                Storage::Quant(t, a)
            }
            (Storage::Packed(a), Storage::Packed(b)) => Storage::Packed(a.concat(b)?),
            _ => anyhow::bail!("cannot fuse weights stored in different formats"),
        })
    }

    /// Converts `out.len()` elements from `start` on to f32.
    pub fn to_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Storage::F32(v) => out.copy_from_slice(&v[start..end]),
            Storage::BF16(v) => {
                for (o, w) in out.iter_mut().zip(&v[start..end]) {
                    *o = w.to_f32();
                }
            }
            Storage::F16(v) => {
                for (o, w) in out.iter_mut().zip(&v[start..end]) {
                    *o = w.to_f32();
                }
            }
            Storage::Quant(t, v) => {
                let n = t.block_elems();
                assert!(
                    start.is_multiple_of(n) && end.is_multiple_of(n),
                    "quantized reads are whole blocks"
                );
                t.dequantize(&v[t.bytes_for(start)..t.bytes_for(end)], out);
            }
            Storage::Packed(p) => {
                let (row, col) = (start / p.cols, start % p.cols);
                assert!(
                    col + out.len() <= p.cols,
                    "packed reads stay within one row"
                );
                p.dequantize(row, col, out);
            }
        }
    }
}

/// A row-major `rows × cols` matrix (PyTorch's `[out_features, in_features]`).
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub storage: Storage,
}

impl Matrix {
    /// A matrix over `storage`; Q4_0, Q4_1, Q5_1, Q8_0, Q4_K and Q6_K blocks (and those that re-encode
    /// as Q8_0) are regrouped ([`PackedRows`]).
    pub fn new(rows: usize, cols: usize, storage: Storage) -> Self {
        assert_eq!(
            rows * cols,
            storage.len(),
            "matrix shape does not match its data"
        );
        let storage = match storage {
            Storage::Quant(ty, blocks) if PackedRows::packs(ty, rows) => {
                Storage::Packed(PackedRows::pack(ty, rows, cols, &blocks))
            }
            Storage::Quant(ty, blocks) => match ty.as_q8_0(&blocks) {
                Some(q8) => Storage::Packed(PackedRows::pack(QuantType::Q8_0, rows, cols, &q8)),
                None => Storage::Quant(ty, blocks),
            },
            other => other,
        };
        Matrix {
            rows,
            cols,
            storage,
        }
    }

    pub fn bytes(&self) -> usize {
        self.storage.bytes()
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.storage.to_f32(r * self.cols, &mut out[..self.cols]);
    }

    /// `y[t][j] = Σ_i x[t][i] · W[j][i]` for `tokens` rows of `x` (`tokens × cols`) into
    /// `y` (`tokens × rows`). Each weight row is read once for all tokens.
    pub fn matmul(&self, x: &[f32], tokens: usize, y: &mut [f32], threads: &Threads, phase: Phase) {
        assert!(x.len() >= tokens * self.cols && y.len() >= tokens * self.rows);
        // Prompts of K-quant and float rows take the f32 panels (faster there, measured).
        let grouped = matches!(self.storage, Storage::Packed(_));
        if phase == Phase::Prefill && !grouped {
            return self.matmul_panels(x, tokens, y, threads);
        }
        match &self.storage {
            Storage::F32(w) => self.matmul_with(w, dot_f32_fns(), x, tokens, y, threads),
            Storage::BF16(w) => self.matmul_with(w, dot_bf16_fns(), x, tokens, y, threads),
            Storage::F16(w) => self.matmul_with(w, dot_f16_fns(), x, tokens, y, threads),
            Storage::Quant(t, w) => match kdot_fn(*t, Isa::detect()) {
                Some(kdot) => self.matmul_quant(*t, w, kdot, x, tokens, y, threads),
                // (Every 32-weight format is regrouped; this is for safety's sake.)
                None => self.matmul_panels(x, tokens, y, threads),
            },
            Storage::Packed(p) => {
                let (one, _) = packed_fns(p.ty, Isa::detect());
                let (dot, _) = tile_fns(p.ty, Isa::detect());
                let out = DisjointChunks::new(&mut y[..tokens * self.rows], 1);
                let rows = self.rows;
                self.for_packed_groups(
                    p,
                    0..rows,
                    x,
                    tokens,
                    threads,
                    |j, t, terms: [f32; GROUP]| {
                        for (r, v) in terms.into_iter().enumerate().take(rows - j) {
                            // SAFETY: rows j.. belong to this thread's groups only.
                            unsafe { out.chunk(t * rows + j + r)[0] = v };
                        }
                    },
                    one,
                    dot,
                );
            }
        }
    }

    /// As [`Matrix::matmul`], into 64-bit fixed point (see [`super::fixed`]): every
    /// `segment` columns of a dot product are summed in f32 and converted, and the segments
    /// add exactly. A rank holding columns `a..b` (multiples of `segment`) then contributes
    /// the same integers that tp = 1 adds for those columns.
    pub fn matmul_fixed(
        &self,
        x: &[f32],
        tokens: usize,
        acc: &mut [i64],
        segment: usize,
        threads: &Threads,
        phase: Phase,
    ) {
        self.matmul_fixed_rows(x, tokens, acc, segment, threads, phase, 0..self.rows);
    }

    /// As [`Matrix::matmul_fixed`] for output rows `range` only (the others of `acc` are
    /// left as they are); `range.start` is a multiple of [`ROW_ALIGN`], so every row is
    /// computed exactly as by the whole product.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_fixed_rows(
        &self,
        x: &[f32],
        tokens: usize,
        acc: &mut [i64],
        segment: usize,
        threads: &Threads,
        phase: Phase,
        range: Range<usize>,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(
            segment > 0 && cols.is_multiple_of(segment),
            "{cols} columns do not split into segments of {segment}"
        );
        assert!(x.len() >= tokens * cols && acc.len() >= tokens * rows);
        assert!(
            range.start.is_multiple_of(ROW_ALIGN) && range.start <= range.end && range.end <= rows,
            "row range {range:?} of a {rows}-row product"
        );
        let out = DisjointI64::new(&mut acc[..tokens * rows]);
        if let Storage::Packed(p) = &self.storage {
            if segment.is_multiple_of(32) {
                let (_, one_fixed) = packed_fns(p.ty, Isa::detect());
                let (_, dot_fixed) = tile_fns(p.ty, Isa::detect());
                let seg_blocks = segment / 32;
                let one = move |g: &[u8], x: &[BlockQ8], out: &mut [i64; GROUP]| {
                    one_fixed(g, x, seg_blocks, out)
                };
                let dot = move |g: &[u8], x: &[BlockQ8], per_token, out: &mut [i64]| {
                    dot_fixed(g, x, per_token, seg_blocks, out)
                };
                let end = range.end;
                return self.for_packed_groups(
                    p,
                    range,
                    x,
                    tokens,
                    threads,
                    |j, t, terms: [i64; GROUP]| {
                        for (r, v) in terms.into_iter().enumerate().take(end - j) {
                            // SAFETY: rows j.. belong to this thread's groups only.
                            unsafe { out.set(t * rows + j + r, v) };
                        }
                    },
                    one,
                    dot,
                );
            }
        }
        if let Storage::Quant(ty, w) = &self.storage {
            if phase == Phase::Decode && segment.is_multiple_of(32) {
                if let Some(kdot) = kdot_fn(*ty, Isa::detect()) {
                    let seg_groups = segment / 32;
                    return self.for_kquant_rows(
                        *ty,
                        w,
                        kdot,
                        range,
                        x,
                        tokens,
                        threads,
                        |j, t, terms| {
                            let sum = terms
                                .chunks_exact(seg_groups)
                                .map(|s| to_fixed(s.iter().sum()))
                                .sum();
                            // SAFETY: row j belongs to this thread's range only.
                            unsafe { out.set(t * rows + j, sum) };
                        },
                    );
                }
            }
        }
        self.fixed_f32(x, tokens, &out, segment, threads, phase, range);
    }

    /// Rows as f32, segment by segment: pairs with the 2×4 kernel on groups of four tokens
    /// (prefill), or one dot product per segment (decode).
    #[allow(clippy::too_many_arguments)]
    fn fixed_f32(
        &self,
        x: &[f32],
        tokens: usize,
        out: &DisjointI64,
        segment: usize,
        threads: &Threads,
        phase: Phase,
        range: Range<usize>,
    ) {
        thread_local! {
            static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (rows, cols) = (self.rows, self.cols);
        let segments = cols / segment;
        let seg = |v: &[f32], s: usize| -> std::ops::Range<usize> {
            debug_assert!(v.len() >= (s + 1) * segment);
            s * segment..(s + 1) * segment
        };
        let xt = |t: usize, s: usize| &x[t * cols + s * segment..t * cols + (s + 1) * segment];
        let kernel = dot_2x4_fixed_fn(segment);
        let dot = dot_f32_fn();
        threads.for_each_range_in(range, |range| {
            ROWS.with_borrow_mut(|scratch| {
                scratch.resize(2 * cols, 0.0);
                let (s0, s1) = scratch.split_at_mut(cols);
                let Some(last) = range.end.checked_sub(1) else {
                    return;
                };
                for j0 in range.step_by(2) {
                    let j1 = (j0 + 1).min(last);
                    let (r0, r1) = (self.row_f32_ref(j0, s0), self.row_f32_ref(j1, s1));
                    // SAFETY: rows j0 and j1 belong to this thread's range only.
                    let put = |j: usize, t: usize, v: i64| unsafe { out.set(t * rows + j, v) };
                    if phase == Phase::Prefill {
                        for group in token_groups(tokens) {
                            let xs = group.map(|t| &x[t * cols..(t + 1) * cols]);
                            let [s0, s1] = kernel([r0, r1], xs, segment);
                            for (&t, (a, b)) in group.iter().zip(s0.into_iter().zip(s1)) {
                                put(j0, t, a);
                                put(j1, t, b);
                            }
                        }
                        continue;
                    }
                    for t in 0..tokens {
                        for (j, r) in [(j0, r0), (j1, r1)] {
                            let segments = (0..segments).map(|s| dot(&r[seg(r, s)], xt(t, s)));
                            put(j, t, segments.map(to_fixed).sum());
                        }
                    }
                }
            })
        });
    }

    /// Row `j` as f32: the stored row itself, or widened / dequantized into `scratch`.
    fn row_f32_ref<'a>(&'a self, j: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match &self.storage {
            Storage::F32(w) => &w[j * self.cols..(j + 1) * self.cols],
            other => {
                other.to_f32(j * self.cols, scratch);
                scratch
            }
        }
    }

    /// Prefill: pairs of rows (as f32) against groups of four tokens with the 2×4 kernel.
    fn matmul_panels(&self, x: &[f32], tokens: usize, y: &mut [f32], threads: &Threads) {
        thread_local! {
            static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (rows, cols) = (self.rows, self.cols);
        let kernel = dot_2x4_fn();
        let xt = |t: usize| &x[t * cols..(t + 1) * cols];
        let out = DisjointChunks::new(&mut y[..tokens * rows], 1);
        threads.for_each_range(rows.div_ceil(2), |pairs| {
            ROWS.with_borrow_mut(|scratch| {
                scratch.resize(2 * cols, 0.0);
                let (s0, s1) = scratch.split_at_mut(cols);
                for p in pairs {
                    let (j0, j1) = (2 * p, (2 * p + 1).min(rows - 1));
                    let (r0, r1) = (self.row_f32_ref(j0, s0), self.row_f32_ref(j1, s1));
                    // SAFETY: rows j0 and j1 belong to this thread's pairs only.
                    let put =
                        |j: usize, t: usize, v: f32| unsafe { out.chunk(t * rows + j)[0] = v };
                    for group in token_groups(tokens) {
                        let [v0, v1] = kernel([r0, r1], group.map(xt));
                        for (&t, (a, b)) in group.iter().zip(v0.into_iter().zip(v1)) {
                            put(j0, t, a);
                            put(j1, t, b);
                        }
                    }
                }
            })
        });
    }

    /// Decode of 256-weight block rows (Q4_0, Q4_1, Q8_0 and what is re-encoded as Q8_0
    /// are grouped, see [`Self::for_packed_groups`]).
    #[allow(clippy::too_many_arguments)]
    fn matmul_quant(
        &self,
        ty: QuantType,
        w: &[u8],
        kdot: KDotFn,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        threads: &Threads,
    ) {
        let rows = self.rows;
        let out = DisjointChunks::new(&mut y[..tokens * rows], 1);
        self.for_kquant_rows(ty, w, kdot, 0..rows, x, tokens, threads, |j, t, terms| {
            // SAFETY: row j belongs to this thread's range only.
            unsafe { out.chunk(t * rows + j)[0] = terms.iter().sum() };
        });
    }

    /// Products over grouped rows: quantizes the tokens to 8-bit blocks once, then
    /// `put(first_row, token, values)` receives the rows of every group of eight in a
    /// thread's range for every token (rows past the matrix are padding). A lone token
    /// takes the one-token kernel `one`; several take the multi-token kernel `dot`
    /// ([`super::tiles`]), which unpacks each weight block once for up to [`TOKEN_CHUNK`]
    /// tokens. Both give the same bits.
    #[allow(clippy::too_many_arguments)]
    fn for_packed_groups<T: Default + Copy>(
        &self,
        p: &PackedRows,
        rows: Range<usize>,
        x: &[f32],
        tokens: usize,
        threads: &Threads,
        put: impl Fn(usize, usize, [T; GROUP]) + Sync,
        one: impl Fn(&[u8], &[BlockQ8], &mut [T; GROUP]) + Sync,
        dot: impl Fn(&[u8], &[BlockQ8], usize, &mut [T]) + Sync,
    ) {
        with_quantized_tokens(x, tokens, self.cols, |xq, per_token| {
            let groups = rows.start / GROUP..rows.end.div_ceil(GROUP);
            if tokens == 1 {
                return threads.for_each_range_in(groups, |range| {
                    let mut terms = [T::default(); GROUP];
                    for g in range {
                        one(p.group(g), xq, &mut terms);
                        put(g * GROUP, 0, terms);
                    }
                });
            }
            threads.for_each_range_in(groups, |range| {
                let mut out = [T::default(); TOKEN_CHUNK * MAX_GROUPS * GROUP];
                let mut g = range.start;
                while g < range.end {
                    let n = (range.end - g).min(MAX_GROUPS);
                    let bytes = p.group_run(g, n);
                    for t0 in (0..tokens).step_by(TOKEN_CHUNK) {
                        let k = (tokens - t0).min(TOKEN_CHUNK);
                        let out = &mut out[..k * n * GROUP];
                        dot(
                            bytes,
                            &xq[t0 * per_token..(t0 + k) * per_token],
                            per_token,
                            out,
                        );
                        for (t, rows) in out.chunks_exact(n * GROUP).enumerate() {
                            for (i, terms) in rows.chunks_exact(GROUP).enumerate() {
                                let terms = terms.try_into().expect("a group's rows");
                                put((g + i) * GROUP, t0 + t, terms);
                            }
                        }
                    }
                    g += n;
                }
            });
        });
    }

    /// Decode of K-quant rows: the tokens are quantized to 8-bit blocks once; every K-block
    /// meets up to [`TOKEN_CHUNK`] tokens at once in integer dot products, and
    /// `f(row, token, terms)` receives the contribution of each 32-weight group of the row.
    #[allow(clippy::too_many_arguments)]
    fn for_kquant_rows(
        &self,
        ty: QuantType,
        w: &[u8],
        kdot: KDotFn,
        rows: Range<usize>,
        x: &[f32],
        tokens: usize,
        threads: &Threads,
        f: impl Fn(usize, usize, &[f32]) + Sync,
    ) {
        thread_local! {
            static TERMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (row_bytes, groups) = (ty.bytes_for(self.cols), self.cols / 32);
        with_quantized_tokens(x, tokens, self.cols, |xq, per_token| {
            threads.for_each_range_in(rows, |range| {
                TERMS.with_borrow_mut(|terms| {
                    terms.resize(TOKEN_CHUNK * groups, 0.0);
                    for t0 in (0..tokens).step_by(TOKEN_CHUNK) {
                        let n = (tokens - t0).min(TOKEN_CHUNK);
                        let xt = &xq[t0 * per_token..(t0 + n) * per_token];
                        for j in range.clone() {
                            let row = &w[j * row_bytes..(j + 1) * row_bytes];
                            for (k, block) in row.chunks_exact(ty.block_bytes()).enumerate() {
                                kdot(
                                    block,
                                    &xt[8 * k..],
                                    per_token,
                                    n,
                                    &mut terms[8 * k..],
                                    groups,
                                );
                            }
                            for (t, terms) in terms.chunks_exact(groups).take(n).enumerate() {
                                f(j, t0 + t, terms);
                            }
                        }
                    }
                })
            });
        });
    }

    fn matmul_with<W: Sync>(
        &self,
        w: &[W],
        (dot, tile): DotFns<W>,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        threads: &Threads,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        let out = DisjointChunks::new(&mut y[..tokens * rows], 1);
        let tiled = tokens - tokens % TILE;
        threads.for_each_range(rows, |range| {
            for j in range {
                let row = &w[j * cols..(j + 1) * cols];
                // SAFETY (both writes): each output row j belongs to one range, so each
                // element of y is written by exactly one thread.
                for t0 in (0..tiled).step_by(TILE) {
                    let mut vals = [0.0; TILE];
                    tile(row, &x[t0 * cols..(t0 + TILE) * cols], &mut vals);
                    for (t, v) in (t0..).zip(vals) {
                        unsafe { out.chunk(t * rows + j)[0] = v };
                    }
                }
                for t in tiled..tokens {
                    unsafe { out.chunk(t * rows + j)[0] = dot(row, &x[t * cols..(t + 1) * cols]) };
                }
            }
        });
    }
}

/// `acc` written element-wise by threads that own disjoint rows.
struct DisjointI64<'a> {
    ptr: *mut i64,
    len: usize,
    _buffer: std::marker::PhantomData<&'a mut [i64]>,
}

unsafe impl Send for DisjointI64<'_> {}
unsafe impl Sync for DisjointI64<'_> {}

impl<'a> DisjointI64<'a> {
    fn new(data: &'a mut [i64]) -> Self {
        DisjointI64 {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            _buffer: std::marker::PhantomData,
        }
    }

    /// # Safety
    /// No other thread may write element `i`.
    unsafe fn set(&self, i: usize, v: i64) {
        assert!(i < self.len);
        *self.ptr.add(i) = v;
    }
}

/// Quantizes `tokens` rows of `x` (`cols` wide) into 8-bit blocks in a per-thread buffer
/// and hands them, with the blocks per token, to `f`.
fn with_quantized_tokens(x: &[f32], tokens: usize, cols: usize, f: impl FnOnce(&[BlockQ8], usize)) {
    thread_local! {
        static XQ: std::cell::RefCell<Vec<BlockQ8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let per_token = cols / 32;
    XQ.with_borrow_mut(|xq| {
        xq.resize(tokens * per_token, BlockQ8::default());
        for t in 0..tokens {
            let blocks = &mut xq[t * per_token..(t + 1) * per_token];
            quantize_q8(&x[t * cols..(t + 1) * cols], blocks);
        }
        f(xq, per_token)
    })
}

/// Tokens `0..tokens` in groups of four; the last group repeats its last token to fill up
/// (every token's lanes then add in the same order, whatever group it falls in).
fn token_groups(tokens: usize) -> impl Iterator<Item = [usize; 4]> {
    row_groups(0..tokens)
}

/// `range` in groups of four rows; the last group repeats its last row to fill up (the
/// repeats compute the same value twice, so writing them is harmless).
fn row_groups(range: std::ops::Range<usize>) -> impl Iterator<Item = [usize; 4]> {
    let end = range.end;
    range.step_by(4).map(move |j| {
        [
            j,
            (j + 1).min(end - 1),
            (j + 2).min(end - 1),
            (j + 3).min(end - 1),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fixed::from_fixed;
    use rand::{Rng, SeedableRng};

    /// Quantized decode products (integer kernels: grouped rows, K-quants) against f32
    /// products of the dequantized rows, plain and in fixed point, on row counts that leave
    /// a partial group, with one and two threads.
    #[test]
    fn quantized_decode_matches_dequantized_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        use QuantType::*;
        let types = [
            Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, IQ4NL, IQ4XS,
        ];
        for (ty, threads) in types.into_iter().flat_map(|t| [(t, 1), (t, 2)]) {
            let (rows, cols) = (21, 512);
            let mut w: Vec<u8> = (0..ty.bytes_for(rows * cols))
                .map(|_| rng.random())
                .collect();
            for b in w.chunks_exact_mut(ty.block_bytes()) {
                let d = half::f16::from_f32(rng.random_range(0.001..0.02)).to_le_bytes();
                for &at in ty.f16_fields() {
                    b[at..at + 2].copy_from_slice(&d);
                }
            }
            let m = Matrix::new(rows, cols, Storage::Quant(ty, w));
            let x: Vec<f32> = (0..2 * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let threads = Threads::new(threads, &[]).unwrap();
            let mut y = vec![0.0; 2 * rows];
            m.matmul(&x, 2, &mut y, &threads, Phase::Decode);
            let mut acc = vec![0i64; 2 * rows];
            m.matmul_fixed(&x, 2, &mut acc, 64, &threads, Phase::Decode);
            let mut row = vec![0.0; cols];
            for j in 0..rows {
                m.row_f32(j, &mut row);
                for t in 0..2 {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let exact: f32 = row.iter().zip(xt).map(|(a, b)| a * b).sum();
                    let norm: f32 = row.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                    let got = y[t * rows + j];
                    assert!(
                        (got - exact).abs() <= 0.02 * norm,
                        "{ty:?} row {j}: {got} vs {exact}"
                    );
                    let fixed = from_fixed(acc[t * rows + j]);
                    assert!(
                        (fixed - got).abs() <= 1e-4 * (1.0 + norm),
                        "{ty:?} row {j}: fixed {fixed} vs {got}"
                    );
                }
            }
        }
    }
}
