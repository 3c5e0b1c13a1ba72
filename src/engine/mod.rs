//! The rank runtime, step plans, sampling, tokenizer and generation.

pub mod affinity;
pub mod generate;
pub mod plan;
pub mod runtime;
pub mod sampling;
pub mod tokenizer;

pub use generate::{generate, FinishReason, GenerateRequest, Generation};
pub use runtime::{run_local, Driver, GroupOptions};
pub use sampling::SamplingParams;
pub use tokenizer::Tokenizer;
