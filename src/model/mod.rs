//! Architectures built from the parallel layers, and the per-rank KV cache.

pub mod kv_cache;
pub mod llama;

pub use kv_cache::{KvCache, KvDtype};
pub use llama::{ExpertShard, ForwardOptions, Logits, Model, RankPlace, SeqStep, ShardPlan};
