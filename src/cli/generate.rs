//! `tpserve generate`: one prompt, one continuation, optionally as JSON.

use crate::engine::{self, GenerateRequest, GroupOptions, SamplingParams, Tokenizer};
use crate::loader;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A GGUF file, or a Hugging Face model folder (config.json + safetensors).
    #[arg(long, alias = "model-path")]
    pub model: PathBuf,
    /// Tensor-parallel size: the number of ranks the model is split over.
    #[arg(long, visible_aliases = ["tensor-parallel-size", "tp-size"], default_value_t = 1)]
    pub tp: usize,
    /// Prompt as comma-separated token ids, e.g. 12,345,67.
    #[arg(long, conflicts_with = "prompt", value_delimiter = ',')]
    pub input_ids: Option<Vec<u32>>,
    /// Prompt as text (needs a tokenizer.json in the model folder).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Kernel threads per rank (default: cores / tp, at least 1).
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// Print one JSON object: input_ids, output_ids, text, prompt_logits_top.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.tp == 0 {
        bail!("--tp must be at least 1");
    }
    if args.threads_per_rank == Some(0) {
        bail!("--threads-per-rank must be at least 1");
    }
    let files = loader::open_model(&args.model)?;
    let cfg = &files.config;
    engine::runtime::validate_tp(cfg, args.tp)?;
    let tokenizer = files.tokenizer.as_ref().map(Tokenizer::new).transpose()?;
    let input_ids = match (&args.input_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => tokenizer
            .as_ref()
            .ok_or_else(|| {
                anyhow!(
                    "--prompt needs a tokenizer, and {} has none (no tokenizer.json); pass --input-ids instead",
                    args.model.display()
                )
            })?
            .encode(text)?,
        (None, None) => bail!("give the prompt with --input-ids 1,2,3 or --prompt \"text\""),
    };
    let request = GenerateRequest {
        input_ids,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_ids: if args.ignore_eos {
            vec![]
        } else {
            cfg.eos_token_ids.clone()
        },
        prompt_top: 10,
    };
    let capacity = request.input_ids.len() + request.max_new_tokens;
    engine::generate::validate_request(&request, cfg.vocab_size, capacity.max(1))?;
    let opts = GroupOptions {
        tp: args.tp,
        threads_per_rank: args.threads_per_rank,
        kv_capacity: capacity,
    };
    let generation = engine::run_local(files.tensors.as_ref(), cfg, &opts, |driver| {
        engine::generate(driver, &request)
    })
    .context("generation failed")?;
    // The text leaves out the token that ended generation (an end-of-turn marker).
    let shown = match generation.finish_reason {
        engine::FinishReason::Stop => &generation.output_ids[..generation.output_ids.len() - 1],
        engine::FinishReason::Length => &generation.output_ids[..],
    };
    let text = tokenizer
        .as_ref()
        .map(|t| t.decode(shown, false))
        .transpose()?;
    if args.json {
        let mut obj = json!({
            "input_ids": request.input_ids,
            "output_ids": generation.output_ids,
            "prompt_logits_top": generation
                .prompt_logits_top
                .iter()
                .map(|(id, logit)| json!({"id": id, "logit": logit}))
                .collect::<Vec<_>>(),
            "finish_reason": match generation.finish_reason {
                engine::FinishReason::Stop => "stop",
                engine::FinishReason::Length => "length",
            },
        });
        if let Some(text) = text {
            obj["text"] = json!(text);
        }
        println!("{obj}");
    } else {
        match text {
            Some(text) => println!("{text}"),
            None => println!(
                "{}",
                generation
                    .output_ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
    Ok(())
}
