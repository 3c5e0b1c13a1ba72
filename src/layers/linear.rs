//! Linear layers that know their split and the one collective that follows it
//! (Megatron-LM / vLLM semantics), each with its weight loader.

use super::Run;
use crate::comm::Comm;
use crate::kernels::matrix::ROW_ALIGN;
use crate::kernels::{Matrix, Storage, Threads};
use crate::loader::{ModelConfig, TensorSource};
use crate::shard::HeadShard;
use anyhow::{bail, Result};
use std::ops::Range;

/// Rows `rows` of the source linear `prefix` (`prefix.weight` has `out_features` rows).
pub struct ColumnPart<'a> {
    pub prefix: &'a str,
    pub out_features: usize,
    pub rows: Range<usize>,
}

/// `y = x · Wᵀ (+ b)` with W split by output rows: each rank computes its own slice of the
/// outputs and no communication follows. Several source linears may be fused row-wise
/// (q, k, v or gate, up) so that one pass over the input feeds them all; parts stored in
/// different formats (a Q4_K_M file keeps attn_v in Q6_K beside Q4_K q and k) stay apart,
/// each fused run of one format a matrix of its own.
pub struct ColumnParallelLinear {
    /// Consecutive output rows, in order.
    weights: Vec<Matrix>,
    rows: usize,
    bias: Option<Vec<f32>>,
}

impl ColumnParallelLinear {
    pub fn load(
        src: &dyn TensorSource,
        parts: &[ColumnPart],
        in_features: usize,
        bias: bool,
    ) -> Result<Self> {
        // Runs of parts in one format: (rows, storage).
        let mut runs: Vec<(usize, Storage)> = Vec::new();
        let mut biases = bias.then(Vec::new);
        for part in parts {
            let name = format!("{}.weight", part.prefix);
            let m = src.load_matrix(
                &name,
                [part.out_features, in_features],
                part.rows.clone(),
                0..in_features,
            )?;
            match runs.last_mut() {
                Some((rows, s)) if s.same_format(&m.storage) => {
                    *rows += m.rows;
                    let previous = std::mem::replace(s, Storage::F32(Vec::new()));
                    *s = previous.concat(m.storage)?;
                }
                _ => runs.push((m.rows, m.storage)),
            }
            if let Some(b) = biases.as_mut() {
                let name = format!("{}.bias", part.prefix);
                b.extend(src.load_vector(&name, part.out_features, part.rows.clone())?);
            }
        }
        if runs.is_empty() {
            bail!("a column-parallel linear needs at least one part");
        }
        let weights: Vec<Matrix> = runs
            .into_iter()
            .map(|(rows, storage)| Matrix::new(rows, in_features, storage))
            .collect();
        Ok(ColumnParallelLinear {
            rows: weights.iter().map(|m| m.rows).sum(),
            weights,
            bias: biases,
        })
    }

    /// This rank's number of outputs.
    pub fn out_features(&self) -> usize {
        self.rows
    }

    pub fn weight_bytes(&self) -> usize {
        let weights: usize = self.weights.iter().map(Matrix::bytes).sum();
        weights + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    pub fn forward(&self, x: &[f32], runs: &[Run], y: &mut [f32], threads: &Threads) {
        let (cols, rows) = (self.weights[0].cols, self.rows);
        for run in runs {
            let (start, n) = (run.tokens.start, run.tokens.len());
            let (x, y) = (&x[start * cols..], &mut y[start * rows..]);
            match &self.weights[..] {
                [one] => one.matmul(x, n, y, threads, run.phase),
                several => matmul_apart(several, x, n, y, threads, run.phase),
            }
        }
        let tokens = runs.last().map_or(0, |r| r.tokens.end);
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(bias.len()).take(tokens) {
                crate::kernels::ops::add_in_place(row, bias);
            }
        }
    }
}

/// Products of matrices that stand for consecutive output rows, each into a scratch buffer
/// (grown once per thread, then reused), then into its columns of every token's output.
fn matmul_apart(
    weights: &[Matrix],
    x: &[f32],
    n: usize,
    y: &mut [f32],
    threads: &Threads,
    phase: crate::kernels::Phase,
) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let rows: usize = weights.iter().map(|m| m.rows).sum();
    SCRATCH.with_borrow_mut(|scratch| {
        let mut first = 0;
        for m in weights {
            if scratch.len() < n * m.rows {
                scratch.resize(n * m.rows, 0.0);
            }
            m.matmul(x, n, scratch, threads, phase);
            for (t, part) in scratch.chunks_exact(m.rows).take(n).enumerate() {
                y[t * rows + first..t * rows + first + m.rows].copy_from_slice(part);
            }
            first += m.rows;
        }
    });
}

/// `y = x · Wᵀ` with W split by input columns: each rank holds the inputs it produced
/// (its heads, its MLP neurons) and a partial sum of every output, which an all-reduce
/// completes. Partial sums are fixed-point over `segment`-column pieces (see
/// `kernels::fixed`), so the result is the same bits at every tp.
pub struct RowParallelLinear {
    weight: Matrix,
    segment: usize,
}

impl RowParallelLinear {
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        cols: Range<usize>,
        segment: usize,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        if !cols.start.is_multiple_of(segment) || !cols.len().is_multiple_of(segment) {
            bail!("{name}: columns {cols:?} do not fall on {segment}-column segments");
        }
        let weight = src.load_matrix(&name, [out_features, in_features], 0..out_features, cols)?;
        Ok(RowParallelLinear { weight, segment })
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// Computes this rank's partial sums into `acc` (fixed point) and all-reduces them:
    /// `acc` ends holding the full sums, `[tokens × out_features]`. With `overlap`, the
    /// product is cut in two — by tokens when there are several, else by output rows — and
    /// the first half's all-reduce is in flight while the second half computes. The bits are
    /// the same either way.
    pub fn forward(
        &self,
        x: &[f32],
        runs: &[Run],
        acc: &mut [i64],
        threads: &Threads,
        comm: &mut dyn Comm,
        overlap: bool,
    ) -> Result<()> {
        let rows = self.weight.rows;
        let n = runs.last().map_or(0, |r| r.tokens.end);
        let row_split = rows / 2 / ROW_ALIGN * ROW_ALIGN;
        if !overlap || comm.size() == 1 || (n == 1 && row_split == 0) {
            self.partial(x, runs, 0..n, 0..rows, acc, threads);
            return comm.all_reduce_sum_i64(&mut acc[..n * rows]);
        }
        // The two halves, as ranges of `acc`.
        let split = if n >= 2 {
            let h = n / 2;
            self.partial(x, runs, 0..h, 0..rows, acc, threads);
            h * rows
        } else {
            self.partial(x, runs, 0..1, 0..row_split, acc, threads);
            row_split
        };
        comm.begin_all_reduce(&acc[..split])?;
        if n >= 2 {
            self.partial(x, runs, n / 2..n, 0..rows, acc, threads);
        } else {
            self.partial(x, runs, 0..1, row_split..rows, acc, threads);
        }
        comm.end_all_reduce(&mut acc[..split])?;
        comm.all_reduce_sum_i64(&mut acc[split..n * rows])
    }

    /// This rank's partial sums of every token and output, into `acc`, with no
    /// all-reduce (the caller adds several products' sums first).
    pub fn partial_sums(&self, x: &[f32], runs: &[Run], acc: &mut [i64], threads: &Threads) {
        let n = runs.last().map_or(0, |r| r.tokens.end);
        self.partial(x, runs, 0..n, 0..self.weight.rows, acc, threads);
    }

    /// This rank's partial sums of `tokens` (within `runs`) and output `rows`, into `acc`.
    fn partial(
        &self,
        x: &[f32],
        runs: &[Run],
        tokens: Range<usize>,
        rows: Range<usize>,
        acc: &mut [i64],
        threads: &Threads,
    ) {
        let (cols, width) = (self.weight.cols, self.weight.rows);
        for run in runs {
            let start = run.tokens.start.max(tokens.start);
            let end = run.tokens.end.min(tokens.end);
            if start >= end {
                continue;
            }
            self.weight.matmul_fixed_rows(
                &x[start * cols..],
                end - start,
                &mut acc[start * width..],
                self.segment,
                threads,
                run.phase,
                rows.clone(),
            );
        }
    }
}

/// q, k and v fused: this rank's query heads and the kv heads they use.
pub struct QkvParallelLinear {
    pub linear: ColumnParallelLinear,
    /// Width of this rank's q outputs (its q heads × head_dim).
    pub q_width: usize,
    /// Width of this rank's k outputs, and of its v outputs.
    pub kv_width: usize,
}

impl QkvParallelLinear {
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        cfg: &ModelConfig,
        heads: &HeadShard,
    ) -> Result<Self> {
        let d = cfg.head_dim;
        let q_rows = heads.q_heads.start * d..heads.q_heads.end * d;
        let kv_rows = heads.kv_heads.start * d..heads.kv_heads.end * d;
        let (q_prefix, k_prefix, v_prefix) = (
            format!("{prefix}.q_proj"),
            format!("{prefix}.k_proj"),
            format!("{prefix}.v_proj"),
        );
        let parts = [
            ColumnPart {
                prefix: &q_prefix,
                out_features: cfg.num_heads * d,
                rows: q_rows.clone(),
            },
            ColumnPart {
                prefix: &k_prefix,
                out_features: cfg.num_kv_heads * d,
                rows: kv_rows.clone(),
            },
            ColumnPart {
                prefix: &v_prefix,
                out_features: cfg.num_kv_heads * d,
                rows: kv_rows.clone(),
            },
        ];
        Ok(QkvParallelLinear {
            linear: ColumnParallelLinear::load(src, &parts, cfg.hidden_size, cfg.qkv_bias)?,
            q_width: q_rows.len(),
            kv_width: kv_rows.len(),
        })
    }
}

/// gate and up fused: this rank's range of MLP neurons from both.
pub struct MergedColumnParallelLinear {
    pub linear: ColumnParallelLinear,
    /// This rank's number of neurons (half the fused width).
    pub width: usize,
}

impl MergedColumnParallelLinear {
    pub fn load(
        src: &dyn TensorSource,
        prefixes: [&str; 2],
        out_features: usize,
        in_features: usize,
        rows: Range<usize>,
    ) -> Result<Self> {
        let parts = prefixes.map(|prefix| ColumnPart {
            prefix,
            out_features,
            rows: rows.clone(),
        });
        Ok(MergedColumnParallelLinear {
            linear: ColumnParallelLinear::load(src, &parts, in_features, false)?,
            width: rows.len(),
        })
    }
}
