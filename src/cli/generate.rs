//! `tpserve generate`: one prompt, one continuation, optionally as JSON.

use crate::engine::{
    self, ChatMessage, ChatTemplate, GenerateRequest, GroupOptions, Launch, SamplingParams,
    Tokenizer,
};
use crate::kernels::affinity::parse_cpu_list;
use crate::loader::{self, ChatTemplateSpec};
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
    #[arg(long, visible_aliases = ["tensor-parallel-size", "tp-size"])]
    pub tp: Option<usize>,
    /// How ranks talk: local (threads of this process) or mpi (one process per rank,
    /// started by mpirun); default: mpi when started by an MPI launcher, else local.
    #[arg(long)]
    pub comm: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 12,345,67.
    #[arg(long, conflicts_with = "prompt", value_delimiter = ',')]
    pub input_ids: Option<Vec<u32>>,
    /// Prompt as text (needs the model's tokenizer).
    #[arg(long, conflicts_with = "chat")]
    pub prompt: Option<String>,
    /// A user message, formatted with the model's chat template; generation stops at the
    /// end of the assistant's turn.
    #[arg(long, conflicts_with = "input_ids")]
    pub chat: Option<String>,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
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
    /// Cores the ranks may use, e.g. 0-3 or 0,2,4 (under mpirun: the node's cores, each
    /// process taking its share by its rank on the node).
    #[arg(long)]
    pub cpus: Option<String>,
    /// Print one JSON object: input_ids, output_ids, text, prompt_logits_top.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub forward: super::ForwardArgs,
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.tp == Some(0) {
        bail!("--tp must be at least 1");
    }
    if args.threads_per_rank == Some(0) {
        bail!("--threads-per-rank must be at least 1");
    }
    let pipeline = args.pipeline.options();
    let launch = Launch::resolve(args.comm.as_deref(), args.tp, pipeline.stages)?;
    let tp = launch.tp();
    let files = loader::open_model(&args.model)?;
    let cfg = &files.config;
    engine::runtime::validate_layout(cfg, tp, &pipeline)?;
    let tokenizer = files.tokenizer.as_ref().map(Tokenizer::new).transpose()?;
    let need_tokenizer = |flag: &str| {
        tokenizer.as_ref().ok_or_else(|| {
            anyhow!(
                "{flag} needs a tokenizer, and {} has none (no tokenizer.json); pass --input-ids instead",
                args.model.display()
            )
        })
    };
    let input_ids = match (&args.input_ids, &args.prompt, &args.chat) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(text), _) => need_tokenizer("--prompt")?.encode(text)?,
        (None, None, Some(message)) => {
            let template = chat_template(&args, files.chat_template.as_ref())?;
            let text = template.render(&[ChatMessage::user(message)], true)?;
            need_tokenizer("--chat")?.encode_chat(&text)?
        }
        (None, None, None) => {
            bail!("give the prompt with --input-ids 1,2,3, --prompt \"text\" or --chat \"message\"")
        }
    };
    let mut stop_ids = cfg.eos_token_ids.clone();
    if let Some(t) = &tokenizer {
        stop_ids.extend(t.end_of_turn_ids());
    }
    let request = GenerateRequest {
        input_ids,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..Default::default()
        },
        stop_ids: if args.ignore_eos { vec![] } else { stop_ids },
        prompt_top: 10,
    };
    let capacity = request.input_ids.len() + request.max_new_tokens;
    engine::generate::validate_request(&request, cfg.vocab_size, capacity.max(1))?;
    let mut opts = GroupOptions::single_sequence(tp, args.threads_per_rank, capacity);
    opts.cpus = args.cpus.as_deref().map(parse_cpu_list).transpose()?;
    opts.forward = args.forward.options();
    opts.pipeline = pipeline;
    let generation = engine::run_group(launch, files.tensors.as_ref(), cfg, &opts, |driver| {
        engine::generate(driver, &request)
    })
    .context("generation failed")?;
    // Only rank 0 reports; the other ranks of an MPI world are done.
    let Some(generation) = generation else {
        return Ok(());
    };
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

/// The template of `--chat-template`, else the model's own.
fn chat_template(args: &GenerateArgs, model: Option<&ChatTemplateSpec>) -> Result<ChatTemplate> {
    let (bos, eos) = model.map_or(("", ""), |m| (&m.bos_token[..], &m.eos_token[..]));
    match (&args.chat_template, model) {
        (Some(path), _) => {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the chat template {}", path.display()))?;
            ChatTemplate::new(&source, bos, eos)
        }
        (None, Some(m)) => ChatTemplate::new(&m.source, bos, eos),
        (None, None) => bail!(
            "{} has no chat template; pass one with --chat-template FILE, or use --prompt",
            args.model.display()
        ),
    }
}
