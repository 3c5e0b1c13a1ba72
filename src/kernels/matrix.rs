//! A weight matrix in its stored format and the product `y = x · Wᵀ` over a batch of tokens.

use super::dot::{dot_bf16_fn, dot_f16_fn, dot_f32_fn, DotFn};
use super::quant::QuantType;
use super::threads::{DisjointChunks, Threads};
use half::{bf16, f16};

/// Weight elements as stored in the model file; kept in that format so that decode reads
/// as few bytes as the file has.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    /// GGUF blocks, row after row; every row is a whole number of blocks.
    Quant(QuantType, Vec<u8>),
}

impl Storage {
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::Quant(t, v) => v.len() / t.block_bytes() * t.block_elems(),
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
    pub fn new(rows: usize, cols: usize, storage: Storage) -> Self {
        assert_eq!(
            rows * cols,
            storage.len(),
            "matrix shape does not match its data"
        );
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
    pub fn matmul(&self, x: &[f32], tokens: usize, y: &mut [f32], threads: &Threads) {
        assert!(x.len() >= tokens * self.cols && y.len() >= tokens * self.rows);
        match &self.storage {
            Storage::F32(w) => self.matmul_with(w, dot_f32_fn(), x, tokens, y, threads),
            Storage::BF16(w) => self.matmul_with(w, dot_bf16_fn(), x, tokens, y, threads),
            Storage::F16(w) => self.matmul_with(w, dot_f16_fn(), x, tokens, y, threads),
            Storage::Quant(t, w) => self.matmul_quant(*t, w, x, tokens, y, threads),
        }
    }

    /// Each row is dequantized once into a per-thread buffer, then multiplied with every
    /// token by the f32 kernel.
    fn matmul_quant(
        &self,
        ty: QuantType,
        w: &[u8],
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        threads: &Threads,
    ) {
        thread_local! {
            static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (rows, cols) = (self.rows, self.cols);
        let row_bytes = ty.bytes_for(cols);
        let dot = dot_f32_fn();
        let out = DisjointChunks::new(&mut y[..tokens * rows], 1);
        threads.for_each_range(rows, |range| {
            ROW.with_borrow_mut(|row| {
                row.resize(cols, 0.0);
                for j in range {
                    ty.dequantize(&w[j * row_bytes..(j + 1) * row_bytes], row);
                    for t in 0..tokens {
                        // SAFETY: as in `matmul_with`: row j belongs to one range.
                        unsafe {
                            out.chunk(t * rows + j)[0] = dot(row, &x[t * cols..(t + 1) * cols])
                        };
                    }
                }
            })
        });
    }

    fn matmul_with<W: Sync>(
        &self,
        w: &[W],
        dot: DotFn<W>,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        threads: &Threads,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        let out = DisjointChunks::new(&mut y[..tokens * rows], 1);
        threads.for_each_range(rows, |range| {
            for j in range {
                let row = &w[j * cols..(j + 1) * cols];
                for t in 0..tokens {
                    // SAFETY: each output row j belongs to one range, so each element of y
                    // is written by exactly one thread.
                    unsafe { out.chunk(t * rows + j)[0] = dot(row, &x[t * cols..(t + 1) * cols]) };
                }
            }
        });
    }
}
