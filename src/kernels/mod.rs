//! Numbers on plain slices: matrix products per weight format, norms, rotary embedding,
//! softmax, activations. SIMD with run-time CPU-feature dispatch; each SIMD kernel has a
//! scalar twin. Nothing here knows about tensor parallelism.

pub mod affinity;
pub mod attention;
pub mod buffer;
pub mod dot;
pub mod exp;
pub mod fixed;
pub mod gemm;
pub mod kdot;
pub mod matrix;
pub mod ops;
pub mod packed;
pub mod qdot;
pub mod quant;
pub mod threads;
pub mod tiles;

pub use matrix::{Matrix, Phase, Storage};
pub use quant::QuantType;
pub use threads::Threads;
