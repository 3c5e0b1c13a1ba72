//! `tpserve synth`: a GGUF model with a real model's shapes and random weights.

use crate::plan;
use crate::synth::{synth, SynthQuant, SynthRequest};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The shapes to copy: any `plan` preset (llama-3.2-1b, llama-3.1-8b, qwen2.5-7b,
    /// gemma-2-2b, gemma-3-1b, phi-3-mini, mixtral-8x7b, qwen1.5-moe-a2.7b, qwen3-30b-a3b …).
    #[arg(long)]
    pub like: String,
    /// Keep only the first N layers, each of the preset's real shape (a big MoE scaled
    /// down to what the disk and memory hold).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Weight format: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k … q6_k, iq4_nl, iq4_xs, the mixes
    /// q3_k_m, q4_k_m, q5_k_m (attn_v and ffn_down in Q5_K / Q6_K / Q6_K), or bf16 (norms
    /// and biases stay f32).
    #[arg(long, default_value = "q4_0")]
    pub quant: String,
    /// The GGUF file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Copy the tokenizer of this GGUF model (its vocabulary size replaces the preset's);
    /// default: a byte-level tokenizer of the preset's vocabulary size.
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: SynthArgs) -> Result<()> {
    let cfg = plan::preset(&args.like)?;
    let quant = SynthQuant::parse(&args.quant)?;
    if args.out.exists() && !args.force {
        bail!(
            "{} exists; choose another --out or add --force to overwrite it",
            args.out.display()
        );
    }
    let req = SynthRequest {
        name: &args.like,
        cfg,
        quant,
        tokenizer_from: args.tokenizer_from.as_deref(),
        seed: args.seed,
        layers: args.layers,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("writing {bar:40} {pos}/{len} tensors ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // A partial file must not look like a model.
    let partial = args.out.with_extension("gguf.partial");
    let written = synth(&req, &partial, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &args.out)?;
    println!(
        "wrote {}: {} ({:.2} B parameters, vocab {}, {} tensors, {:.2} GB, random weights)",
        args.out.display(),
        args.like,
        summary.parameters as f64 / 1e9,
        summary.vocab_size,
        summary.tensors,
        summary.bytes as f64 / 1e9
    );
    Ok(())
}
