//! Building blocks of a tensor-parallel transformer. Each layer knows its split and the
//! one collective that follows it, so a model reads as a plain forward pass.

pub mod embedding;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod rotary;

pub use embedding::{ParallelLmHead, VocabParallelEmbedding};
pub use linear::{
    ColumnParallelLinear, MergedColumnParallelLinear, QkvParallelLinear, RowParallelLinear,
};
pub use moe::{MoeScratch, SparseMoe};
pub use norm::RmsNorm;
pub use rotary::Rotary;

use crate::kernels::Phase;
use std::ops::Range;

/// Consecutive tokens of a step that share a phase (and so their kernels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub tokens: Range<usize>,
    pub phase: Phase,
}

/// Appends `count` items of `phase` to `runs`, extending the last run when it matches.
pub fn push_run(runs: &mut Vec<Run>, count: usize, phase: Phase) {
    let start = runs.last().map_or(0, |r| r.tokens.end);
    match runs.last_mut() {
        Some(last) if last.phase == phase => last.tokens.end += count,
        _ if count == 0 => {}
        _ => runs.push(Run {
            tokens: start..start + count,
            phase,
        }),
    }
}
