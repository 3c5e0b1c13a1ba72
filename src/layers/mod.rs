//! Building blocks of a tensor-parallel transformer. Each layer knows its split and the
//! one collective that follows it, so a model reads as a plain forward pass.

pub mod embedding;
pub mod linear;
pub mod norm;
pub mod rotary;

pub use embedding::{ParallelLmHead, VocabParallelEmbedding};
pub use linear::{
    ColumnParallelLinear, MergedColumnParallelLinear, QkvParallelLinear, RowParallelLinear,
};
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
