//! tpserve: tensor-parallel LLM inference for CPUs and clusters.
//!
//! Layers, lowest first (arrows point down only): `comm` (the TP group), `kernels`
//! (numbers on slices), `shard` (who owns what), `loader` (model files to shards),
//! `layers` (parallel linear layers, embeddings, norms, rotary), `model` (architectures and
//! KV cache), `engine` (rank runtime, scheduler, sampling, generation), `server` (HTTP),
//! `cli`.

pub mod bench;
pub mod cli;
pub mod comm;
pub mod engine;
pub mod kernels;
pub mod layers;
pub mod loader;
pub mod model;
pub mod plan;
pub mod server;
pub mod shard;
pub mod synth;
