//! Command-line front end: parse, call the library, print. Thin on purpose.

mod bench;
mod bench_serving;
mod comm_bench;
mod generate;
mod perplexity;
mod plan;
mod serve;
mod sglang_flags;
mod synth;
mod tokenize;

use crate::engine::PipelineOptions;
use crate::model::{ForwardOptions, KvDtype};
use clap::{Args, Parser, Subcommand};

/// The switches of the forward pass's communication optimisations (SGLang's names).
#[derive(Args, Debug, Clone, Copy)]
pub struct ForwardArgs {
    /// Do not overlap row-parallel all-reduces with the rest of the product.
    #[arg(long)]
    pub disable_overlap: bool,
    /// Do not fuse the all-reduced sums' residual add with the next RMSNorm.
    #[arg(long)]
    pub disable_fused_allreduce: bool,
    /// How the KV cache stores keys and values: auto (f16), f16, bf16 or f32.
    #[arg(long, default_value = "auto", value_parser = KvDtype::parse)]
    pub kv_cache_dtype: KvDtype,
    /// Expert parallelism for mixture-of-experts models: 1, or the tp size to give each
    /// rank whole experts instead of a slice of every expert (same results).
    #[arg(long, default_value_t = 1)]
    pub ep_size: usize,
}

impl ForwardArgs {
    pub fn options(&self) -> ForwardOptions {
        ForwardOptions {
            overlap: !self.disable_overlap,
            fused_allreduce: !self.disable_fused_allreduce,
            kv_dtype: self.kv_cache_dtype,
            ep_size: self.ep_size,
        }
    }
}

/// Pipeline parallelism: the layers split into stages of `--tp` ranks each.
#[derive(Args, Debug, Clone, Copy)]
pub struct PipelineArgs {
    /// Pipeline stages: the layers split into this many contiguous stages, each a TP group
    /// of --tp ranks (tp × pp ranks in all; under mpirun, tp × pp processes).
    #[arg(long, visible_aliases = ["pipeline-parallel-size"], default_value_t = 1)]
    pub pp_size: usize,
    /// Sequences per micro-batch at most (default: a step's sequences cut into one
    /// micro-batch per stage, so that the stages work at once).
    #[arg(long)]
    pub pp_max_micro_batch_size: Option<usize>,
}

impl PipelineArgs {
    pub fn options(&self) -> PipelineOptions {
        PipelineOptions {
            stages: self.pp_size,
            max_micro_batch: self.pp_max_micro_batch_size,
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "tpserve",
    version,
    about = "Tensor-parallel LLM inference for CPUs and clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a continuation of one prompt (token ids or text).
    Generate(generate::GenerateArgs),
    /// Perplexity of a text file (llama.cpp's method: windows of --ctx, second half scored).
    Perplexity(perplexity::PerplexityArgs),
    /// Serve the model over HTTP: OpenAI and SGLang APIs (SGLang's launch_server).
    #[command(alias = "launch_server")]
    Serve(Box<serve::ServeArgs>),
    /// Prefill and decode speed of one batch per tp size, against memory bandwidth
    /// (SGLang's bench_one_batch), with the TP scaling table.
    Bench(bench::BenchArgs),
    /// Load-test a running server (SGLang's bench_serving): throughput, TTFT, ITL.
    BenchServing(bench_serving::BenchServingArgs),
    /// Memory and communication per tp size, and the recommended tp (from a model or preset).
    Plan(plan::PlanArgs),
    /// Collective latency and bandwidth of a TP group (nccl-tests' all_reduce_perf).
    CommBench(comm_bench::CommBenchArgs),
    /// Write a GGUF model with a real model's shapes and random weights (for benchmarks).
    Synth(synth::SynthArgs),
    /// Token ids of a text, with the model's tokenizer (GGUF or Hugging Face; no weights read).
    Tokenize(tokenize::TokenizeArgs),
    /// Text of token ids, with the model's tokenizer.
    Detokenize(tokenize::DetokenizeArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::BenchServing(args) => bench_serving::run(args),
        Command::Plan(args) => plan::run(args),
        Command::CommBench(args) => comm_bench::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Tokenize(args) => tokenize::tokenize(args),
        Command::Detokenize(args) => tokenize::detokenize(args),
    }
}
