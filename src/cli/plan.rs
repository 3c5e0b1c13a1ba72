//! `tpserve plan`: memory, communication and speed per tensor-parallel size, and the
//! recommended size, from a model file or a preset; with `--pp-size` / `--dp-size`, the
//! comparison of tensor, pipeline and data parallelism layouts.

use crate::loader;
use crate::plan::layouts::{self, Layout, LayoutRow, Nodes};
use crate::plan::{self, Link, PlanRequest, ShapeSource, WeightDtype};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A GGUF file or Hugging Face folder to plan for.
    #[arg(long, alias = "model-path", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A named model: llama-3.2-1b, llama-3.1-8b, llama-2-13b, codellama-34b, llama-3.1-70b,
    /// llama-3.1-405b, qwen2.5-7b, qwen2.5-72b, mistral-7b, gemma-2-2b, gemma-3-1b,
    /// phi-3-mini, mixtral-8x7b, qwen1.5-moe-a2.7b, qwen3-30b-a3b.
    #[arg(long)]
    pub preset: Option<String>,
    /// Memory of one device, e.g. 24GiB, 80GB.
    #[arg(long)]
    pub device_memory: String,
    /// The tp sizes to consider.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub devices: Vec<usize>,
    /// bf16, fp8, q8_0, q4_0, or as-is (the file's formats; bf16 for presets).
    #[arg(long, default_value = "as-is")]
    pub weight_dtype: String,
    /// Tokens of context per sequence.
    #[arg(long, default_value_t = 8192)]
    pub context_length: usize,
    /// Sequences decoded together, each with a full context of KV cache.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// nvlink, pcie, ethernet, shared-memory, or custom:LAT_US,GBPS.
    #[arg(long, default_value = "shared-memory")]
    pub link: String,
    /// Each device's memory read bandwidth in GB/s (default: the link kind's typical one).
    #[arg(long)]
    pub memory_bandwidth: Option<f64>,
    /// Bytes per KV value: 2 (f16/bf16, tpserve's default --kv-cache-dtype), 4 (f32), 1 (fp8).
    #[arg(long, default_value_t = 2)]
    pub kv_bytes: usize,
    /// Bytes per all-reduced activation: 8 (tpserve's fixed-point), 4 (f32), 2 (bf16).
    #[arg(long, default_value_t = 8)]
    pub comm_bytes: usize,
    /// Pipeline stages to weigh (with --dp-size: compare layouts tp × pp × dp).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub pp_size: Vec<usize>,
    /// Data-parallel replicas to weigh (--batch-size is then per replica).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub dp_size: Vec<usize>,
    /// Only layouts of exactly this many devices (tp × pp × dp).
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Devices per node, when the devices span several nodes (ranks are numbered with tp
    /// innermost, so a TP group stays on one node when it fits).
    #[arg(long)]
    pub devices_per_node: Option<usize>,
    /// The link between nodes (the same kinds as --link).
    #[arg(long, default_value = "ethernet")]
    pub inter_node_link: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PlanArgs) -> Result<()> {
    let device_memory = plan::parse_bytes(&args.device_memory)?;
    if args.devices.is_empty() || args.devices.contains(&0) {
        bail!("--devices needs tp sizes of at least 1, e.g. 1,2,4,8");
    }
    if args.batch_size == 0 || args.context_length == 0 {
        bail!("--batch-size and --context-length must be at least 1");
    }
    if ![1, 2, 4].contains(&args.kv_bytes) || ![2, 4, 8].contains(&args.comm_bytes) {
        bail!("--kv-bytes takes 1, 2 or 4 and --comm-bytes 2, 4 or 8");
    }
    let dtype = WeightDtype::parse(&args.weight_dtype)?;
    let mut link = Link::parse(&args.link)?;
    if let Some(bw) = args.memory_bandwidth {
        if !(bw.is_finite() && bw > 0.0) {
            bail!("--memory-bandwidth must be a positive number of GB/s");
        }
        link.memory_gbps = bw;
    }
    let (cfg, src): (_, Box<dyn loader::TensorSource>) = match (&args.model, &args.preset) {
        (Some(path), _) => {
            let files = loader::open_model(path)?;
            let cfg = files.config.clone();
            if dtype == WeightDtype::AsIs {
                (cfg, files.tensors)
            } else {
                (cfg.clone(), Box::new(ShapeSource::new(cfg, dtype)))
            }
        }
        (None, Some(name)) => {
            let cfg = plan::preset(name)?;
            (cfg.clone(), Box::new(ShapeSource::new(cfg, dtype)))
        }
        (None, None) => bail!("give --model PATH or --preset NAME"),
    };
    let too_big: Vec<_> = args
        .devices
        .iter()
        .filter(|&&tp| tp > cfg.num_heads)
        .collect();
    if !too_big.is_empty() {
        bail!(
            "tp {too_big:?} exceeds the model's {} attention heads; drop them from --devices",
            cfg.num_heads
        );
    }
    let request = PlanRequest {
        cfg: &cfg,
        src: src.as_ref(),
        device_memory,
        devices: args.devices.clone(),
        context_length: args.context_length,
        batch_size: args.batch_size,
        link,
        kv_bytes: args.kv_bytes,
        comm_bytes: args.comm_bytes,
    };
    if args.pp_size != [1] || args.dp_size != [1] || args.world_size.is_some() {
        return compare_layouts(&args, &request);
    }
    let result = plan::plan(&request)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_table(&args, &result);
    }
    if result.recommended_tp.is_none() {
        bail!(
            "no tp in {:?} fits a {} device ({} tokens of context × batch {} with {:.0}% headroom); \
             use more devices, a smaller --weight-dtype, or a shorter context",
            args.devices,
            args.device_memory,
            args.context_length,
            args.batch_size,
            plan::HEADROOM * 100.0
        );
    }
    Ok(())
}

/// The layouts tp × pp × dp of the flags, weighed side by side.
fn compare_layouts(args: &PlanArgs, request: &PlanRequest) -> Result<()> {
    let cfg = request.cfg;
    if args.pp_size.contains(&0) || args.dp_size.contains(&0) || args.world_size == Some(0) {
        bail!("--pp-size, --dp-size and --world-size take sizes of at least 1");
    }
    if let Some(&pp) = args.pp_size.iter().find(|&&pp| pp > cfg.num_layers) {
        bail!(
            "--pp-size {pp} is more than the model's {} layers",
            cfg.num_layers
        );
    }
    let nodes = match args.devices_per_node {
        Some(0) => bail!("--devices-per-node must be at least 1"),
        Some(n) => Some(Nodes {
            devices_per_node: n,
            link: Link::parse(&args.inter_node_link)?,
        }),
        None => None,
    };
    let mut candidates = Vec::new();
    for &tp in &args.devices {
        for &pp in &args.pp_size {
            for &dp in &args.dp_size {
                candidates.push(Layout { tp, pp, dp });
            }
        }
    }
    candidates.retain(|l| args.world_size.is_none_or(|w| l.tp * l.pp * l.dp == w));
    if candidates.is_empty() {
        bail!("no layout of --devices × --pp-size × --dp-size makes --world-size devices");
    }
    let rows = layouts::compare(request, &candidates, nodes.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print_layouts(args, &rows);
    }
    Ok(())
}

fn print_layouts(args: &PlanArgs, rows: &[LayoutRow]) {
    println!(
        "| tp | pp | dp | devices | weights/rank | fits | layers/stage | all-reduce B/token | p2p B/token | crosses nodes | ms/token alone | tok/s at batch {} per replica | tok/s/device |",
        args.batch_size
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (lo, hi) = r.stage_layers;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} |",
            r.layout.tp,
            r.layout.pp,
            r.layout.dp,
            r.devices,
            gib(r.weight_bytes_per_rank),
            if r.fits { "yes" } else { "no" },
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}–{hi}")
            },
            r.all_reduce_bytes_per_token,
            r.p2p_bytes_per_token,
            if r.crosses_nodes { "yes" } else { "no" },
            r.ms_per_token_alone,
            r.tokens_per_s,
            r.tokens_per_s_per_device
        );
    }
    let fitting: Vec<&LayoutRow> = rows.iter().filter(|r| r.fits).collect();
    let name = |r: &LayoutRow| {
        format!(
            "tp {} × pp {} × dp {}",
            r.layout.tp, r.layout.pp, r.layout.dp
        )
    };
    let best = |key: fn(&LayoutRow) -> f64| {
        fitting
            .iter()
            .max_by(|a, b| key(a).total_cmp(&key(b)))
            .map_or("none fits".to_owned(), |r| name(r))
    };
    println!(
        "fastest single request: {}; most tokens/s: {}",
        best(|r| -r.ms_per_token_alone),
        best(|r| r.tokens_per_s)
    );
}

fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn print_table(args: &PlanArgs, p: &plan::Plan) {
    println!(
        "| tp | weights/rank | KV/token/rank | KV tokens that fit | fits | comm/token/layer | all-reduce µs/token | ms/step | tok/s | tok/s/device | speedup | efficiency |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &p.rows {
        println!(
            "| {} | {} | {} KiB | {} | {} | {} B | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {:.0}% |",
            r.tp,
            gib(r.weight_bytes_per_rank),
            r.kv_bytes_per_token_per_rank / 1024,
            r.kv_tokens_fit,
            if r.fits { "yes" } else { "no" },
            r.comm_bytes_per_token_per_layer,
            r.all_reduce_us_per_token,
            r.decode_ms_per_step,
            r.tokens_per_s,
            r.tokens_per_s_per_device,
            r.speedup,
            r.efficiency * 100.0
        );
    }
    let show = |tp: Option<usize>| tp.map_or("none".to_owned(), |t| t.to_string());
    println!(
        "recommended tp (smallest that fits {} × {} tokens): {}; best tokens/s per device: {}",
        args.batch_size,
        args.context_length,
        show(p.recommended_tp),
        show(p.best_tp)
    );
}
