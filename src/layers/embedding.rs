//! Vocab-parallel embedding and LM head: each rank owns a contiguous range of vocab rows.

use super::Run;
use crate::comm::Comm;
use crate::kernels::{Matrix, Threads};
use crate::loader::TensorSource;
use anyhow::Result;
use std::ops::Range;
use std::sync::Arc;

/// Rows `vocab` of a `[vocab_size, hidden]` table; shared by the embedding and a tied LM head.
pub fn load_vocab_rows(
    src: &dyn TensorSource,
    name: &str,
    vocab_size: usize,
    hidden: usize,
    vocab: Range<usize>,
) -> Result<Arc<Matrix>> {
    Ok(Arc::new(src.load_matrix(
        name,
        [vocab_size, hidden],
        vocab,
        0..hidden,
    )?))
}

/// Looks up the tokens this rank owns and writes zeros for the others; an all-reduce then
/// assembles every row exactly (adding zeros changes no bit).
pub struct VocabParallelEmbedding {
    table: Arc<Matrix>,
    vocab: Range<usize>,
}

impl VocabParallelEmbedding {
    pub fn new(table: Arc<Matrix>, vocab: Range<usize>) -> Self {
        VocabParallelEmbedding { table, vocab }
    }

    pub fn weight_bytes(&self) -> usize {
        self.table.bytes()
    }

    pub fn forward(&self, tokens: &[u32], out: &mut [f32], comm: &mut dyn Comm) -> Result<()> {
        let hidden = self.table.cols;
        let out = &mut out[..tokens.len() * hidden];
        for (row, &t) in out.chunks_exact_mut(hidden).zip(tokens) {
            let t = t as usize;
            if self.vocab.contains(&t) {
                self.table.row_f32(t - self.vocab.start, row);
            } else {
                row.fill(0.0);
            }
        }
        if comm.size() > 1 {
            comm.all_reduce_sum(out)?;
        }
        Ok(())
    }
}

/// Computes the logits of this rank's vocab range; the engine combines ranks' results.
pub struct ParallelLmHead {
    weight: Arc<Matrix>,
    pub vocab: Range<usize>,
    /// Whether the weight is the embedding table (tied): its bytes are counted once.
    pub tied: bool,
}

impl ParallelLmHead {
    pub fn new(weight: Arc<Matrix>, vocab: Range<usize>, tied: bool) -> Self {
        ParallelLmHead {
            weight,
            vocab,
            tied,
        }
    }

    pub fn weight_bytes(&self) -> usize {
        if self.tied {
            0
        } else {
            self.weight.bytes()
        }
    }

    pub fn forward(&self, hidden: &[f32], runs: &[Run], logits: &mut [f32], threads: &Threads) {
        let (cols, rows) = (self.weight.cols, self.weight.rows);
        for run in runs {
            let (start, n) = (run.tokens.start, run.tokens.len());
            let (x, y) = (&hidden[start * cols..], &mut logits[start * rows..]);
            self.weight.matmul(x, n, y, threads, run.phase);
        }
    }
}
