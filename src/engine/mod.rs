//! The rank runtime, pipeline stages, step plans, sampling, tokenizer and generation.

pub mod chat;
pub mod generate;
pub mod grammar;
pub mod kv_blocks;
pub mod kv_capacity;
pub mod perplexity;
pub mod pipeline;
pub mod prefix_cache;
pub mod replicas;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
pub mod step_plan;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use generate::{generate, FinishReason, GenerateRequest, Generation};
pub use pipeline::PipelineOptions;
pub use runtime::{run_group, run_local, Driver, GroupOptions, Launch};
pub use sampling::SamplingParams;
pub use tokenizer::Tokenizer;
