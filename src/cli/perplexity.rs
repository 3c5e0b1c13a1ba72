//! `tpserve perplexity`: llama.cpp's perplexity measurement on a text file.

use crate::engine::{self, GroupOptions, Launch, Tokenizer};
use crate::kernels::affinity::parse_cpu_list;
use crate::loader;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// A GGUF file, or a Hugging Face model folder.
    #[arg(long, alias = "model-path")]
    pub model: PathBuf,
    /// The text to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per window; the second half of each is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    #[arg(long, visible_aliases = ["tensor-parallel-size", "tp-size"])]
    pub tp: Option<usize>,
    /// How ranks talk: local (threads of this process) or mpi (one process per rank,
    /// started by mpirun); default: mpi when started by an MPI launcher, else local.
    #[arg(long)]
    pub comm: Option<String>,
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// Cores the ranks may use, e.g. 0-3 or 0,2,4 (under mpirun: the node's cores, each
    /// process taking its share by its rank on the node).
    #[arg(long)]
    pub cpus: Option<String>,
    /// Print {"ppl", "tokens", "windows"} as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let files = loader::open_model(&args.model)?;
    let spec = files.tokenizer.as_ref().ok_or_else(|| {
        anyhow!(
            "{} has no tokenizer; perplexity needs one",
            args.model.display()
        )
    })?;
    let tokenizer = Tokenizer::new(spec)?;
    let tokens = tokenizer.encode_plain(&text)?;
    if args.ctx > files.config.max_position_embeddings {
        bail!(
            "--ctx {} is longer than the model's context of {}",
            args.ctx,
            files.config.max_position_embeddings
        );
    }
    if args.tp == Some(0) {
        bail!("--tp must be at least 1");
    }
    let pipeline = args.pipeline.options();
    let launch = Launch::resolve(args.comm.as_deref(), args.tp, pipeline.stages)?;
    let mut opts = GroupOptions::single_sequence(launch.tp(), args.threads_per_rank, args.ctx);
    opts.cpus = args.cpus.as_deref().map(parse_cpu_list).transpose()?;
    opts.pipeline = pipeline;
    let bos = tokenizer.bos_id();
    let quiet = args.json || !launch.is_leader();
    let result = engine::run_group(
        launch,
        files.tensors.as_ref(),
        &files.config,
        &opts,
        |driver| {
            engine::perplexity::perplexity(driver, &tokens, args.ctx, bos, |done, total, ppl| {
                if !quiet {
                    eprint!("\rwindow {done}/{total}: ppl {ppl:.4}");
                    let _ = std::io::stderr().flush();
                }
            })
        },
    )?;
    let Some(result) = result else {
        return Ok(());
    };
    if !quiet {
        eprintln!();
    }
    if args.json {
        println!(
            "{}",
            json!({"ppl": result.ppl, "tokens": result.tokens, "windows": result.windows})
        );
    } else {
        println!(
            "perplexity {:.4} over {} tokens in {} windows of {}",
            result.ppl, result.tokens, result.windows, args.ctx
        );
    }
    Ok(())
}
