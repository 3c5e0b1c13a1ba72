//! `tpserve bench`: prefill and decode speed of one batch at each tp size (SGLang's
//! bench_one_batch), against this machine's memory bandwidth, with the TP scaling table.

use crate::bench::bandwidth::{read_bandwidth, DEFAULT_BYTES};
use crate::bench::one_batch::{run_batch, BatchSpec, BatchTimes};
use crate::engine::kv_capacity::KvCapacity;
use crate::engine::runtime::{RankMemory, DEFAULT_BLOCK_SIZE};
use crate::engine::{self, GroupOptions, Launch};
use crate::kernels::affinity;
use crate::loader;
use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A GGUF file, or a Hugging Face model folder.
    #[arg(long, alias = "model-path")]
    pub model: PathBuf,
    /// Tensor-parallel sizes to measure (under mpirun: the world size only).
    #[arg(long, visible_aliases = ["tensor-parallel-size", "tp-size"], value_delimiter = ',', default_value = "1,2")]
    pub tp: Vec<usize>,
    /// Sequences per batch.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch_size: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Decode steps per sequence.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Kernel threads per rank.
    #[arg(long, default_value_t = 1)]
    pub threads_per_rank: usize,
    /// Timed runs of each case; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// local (threads of this process) or mpi (processes under mpirun).
    #[arg(long)]
    pub comm: Option<String>,
    /// Cores the ranks may use, e.g. 0-3 or 0,2,4.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Print one JSON object: `results` (one entry per tp and batch size) and `machine`
    /// (read bandwidth per thread count).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub forward: super::ForwardArgs,
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
}

/// One measured case.
struct Row {
    tp: usize,
    spec: BatchSpec,
    times: BatchTimes,
    memory: Vec<RankMemory>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.tp.is_empty() || args.tp.contains(&0) {
        bail!("--tp needs sizes of at least 1, e.g. --tp 1,2,4");
    }
    if args.batch_size.is_empty() || args.batch_size.contains(&0) {
        bail!("--batch-size needs sizes of at least 1, e.g. --batch-size 1,8");
    }
    if args.input_len == 0 || args.output_len == 0 || args.runs == 0 {
        bail!("--input-len, --output-len and --runs must be at least 1");
    }
    if args.threads_per_rank == 0 {
        bail!("--threads-per-rank must be at least 1");
    }
    let cpus = args
        .cpus
        .as_deref()
        .map(affinity::parse_cpu_list)
        .transpose()?;
    let files = loader::open_model(&args.model)?;
    let cfg = &files.config;
    let pipeline = args.pipeline.options();
    let first = Launch::resolve(args.comm.as_deref(), None, pipeline.stages)?;
    let leader = first.is_leader();
    let local = matches!(first, Launch::Local { .. });
    // One group per tp size; an MPI world is one: the processes mpirun started.
    let launches: Vec<Launch> = match first {
        Launch::Local { .. } => args.tp.iter().map(|&tp| Launch::Local { tp }).collect(),
        #[cfg(feature = "mpi")]
        mpi => vec![mpi],
    };
    let tps: Vec<usize> = launches.iter().map(Launch::tp).collect();
    for &tp in &tps {
        engine::runtime::validate_layout(cfg, tp, &pipeline)?;
    }

    // The machine first, while nothing else runs. (Under mpirun the other ranks are already
    // polling for rank 0, so a measurement there would be off: no roofline then.)
    let mut bandwidth = BTreeMap::new();
    if leader && local {
        let cores = cpus.clone().unwrap_or_else(affinity::available_cores);
        for &tp in &tps {
            let threads = tp * pipeline.stages * args.threads_per_rank;
            bandwidth.entry(threads).or_insert_with(|| {
                // Pinned one per core when there are enough cores, as the ranks are.
                let pinned = cores.get(..threads).unwrap_or_default();
                read_bandwidth(threads, pinned, DEFAULT_BYTES, 5)
            });
        }
    }

    let max_batch = *args.batch_size.iter().max().expect("not empty");
    let longest = BatchSpec {
        batch: max_batch,
        input_len: args.input_len,
        output_len: args.output_len,
    };
    let mut rows = Vec::new();
    for launch in launches {
        let tp = launch.tp();
        let opts = GroupOptions {
            tp,
            pipeline,
            threads_per_rank: Some(args.threads_per_rank),
            kv: KvCapacity::Tokens(
                max_batch * longest.blocks_per_seq(DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE,
            ),
            block_size: DEFAULT_BLOCK_SIZE,
            cpus: cpus.clone(),
            progress: None,
            forward: args.forward.options(),
        };
        let measured = engine::run_group(launch, files.tensors.as_ref(), cfg, &opts, |driver| {
            let memory = driver.memory_per_rank()?;
            // Warm up: first touches, thread wake-ups.
            let warm = BatchSpec {
                batch: 1,
                input_len: args.input_len.min(8),
                output_len: 4,
            };
            run_batch(driver, &warm, 0)?;
            let mut out = Vec::new();
            for &batch in &args.batch_size {
                let spec = BatchSpec { batch, ..longest };
                let mut runs = Vec::new();
                for run in 0..args.runs {
                    runs.push(run_batch(driver, &spec, run as u64 + 1)?);
                }
                let median = |f: fn(&BatchTimes) -> f64| {
                    let mut v: Vec<f64> = runs.iter().map(f).collect();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                let times = BatchTimes {
                    prefill_s: median(|t| t.prefill_s),
                    decode_s: median(|t| t.decode_s),
                };
                out.push(Row {
                    tp,
                    spec,
                    times,
                    memory: memory.clone(),
                });
            }
            Ok(out)
        })?;
        match measured {
            Some(r) => rows.extend(r),
            None => return Ok(()), // a non-leader MPI rank
        }
    }
    report(&args, &args.model.display().to_string(), &bandwidth, &rows);
    Ok(())
}

/// Decode tokens/s the memory roof allows: weight bytes read per step ÷ read bandwidth
/// (each step reads the weights once for the whole batch).
fn roofline_tok_s(
    row: &Row,
    bandwidth: &BTreeMap<usize, f64>,
    threads_per_rank: usize,
) -> Option<f64> {
    let bytes: usize = row.memory.iter().map(|m| m.decode_read_bytes).sum();
    let bw = bandwidth.get(&(row.memory.len() * threads_per_rank))?;
    Some(bw * 1e9 / bytes as f64 * row.spec.batch as f64)
}

fn report(args: &BenchArgs, model: &str, bandwidth: &BTreeMap<usize, f64>, rows: &[Row]) {
    let tpr = args.threads_per_rank;
    let base = |batch: usize| {
        rows.iter()
            .find(|r| r.tp == 1 && r.spec.batch == batch)
            .map(|r| r.times.decode_tok_s(&r.spec))
    };
    let base_bw = bandwidth.get(&tpr).copied();
    if args.json {
        let results: Vec<_> = rows
            .iter()
            .map(|r| {
                let roof = roofline_tok_s(r, bandwidth, tpr);
                json!({
                    "tp": r.tp,
                    "pp": args.pipeline.pp_size,
                    "batch_size": r.spec.batch,
                    "threads_per_rank": tpr,
                    "input_len": r.spec.input_len,
                    "output_len": r.spec.output_len,
                    "prefill_tok_s": r.times.prefill_tok_s(&r.spec),
                    "decode_tok_s": r.times.decode_tok_s(&r.spec),
                    "tpot_ms": r.times.tpot_ms(&r.spec),
                    "roofline_tok_s": roof,
                    "roofline_fraction": roof.map(|x| r.times.decode_tok_s(&r.spec) / x),
                    "decode_speedup": base(r.spec.batch).map(|b| r.times.decode_tok_s(&r.spec) / b),
                    "decode_read_bytes": r.memory.iter().map(|m| m.decode_read_bytes).sum::<usize>(),
                    "weight_bytes_per_rank": r.memory.iter().map(|m| m.weight_bytes).collect::<Vec<_>>(),
                    "process_anon_bytes_per_rank": r.memory.iter().map(|m| m.process_anon_bytes).collect::<Vec<_>>(),
                })
            })
            .collect();
        let machine: BTreeMap<String, f64> = bandwidth
            .iter()
            .map(|(t, bw)| (t.to_string(), *bw))
            .collect();
        let out = json!({
            "model": model,
            "results": results,
            "machine": { "read_bandwidth_gb_s": machine },
        });
        println!("{out}");
        return;
    }
    println!("model: {model}");
    let bw: Vec<String> = bandwidth
        .iter()
        .map(|(t, bw)| format!("{t} thread{}: {bw:.1} GB/s", if *t == 1 { "" } else { "s" }))
        .collect();
    if bw.is_empty() {
        println!("machine read bandwidth: not measured (under mpirun the other ranks are running)");
    } else {
        println!("machine read bandwidth: {}", bw.join(", "));
    }
    let stages = match args.pipeline.pp_size {
        1 => String::new(),
        pp => format!(", {pp} pipeline stages of tp ranks each"),
    };
    println!(
        "input {} tokens, output {} tokens, {tpr} thread(s) per rank{stages}, median of {} run(s)\n",
        args.input_len, args.output_len, args.runs
    );
    println!("| tp | batch | prefill tok/s | decode tok/s | TPOT ms | decode roofline tok/s | of roofline |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let roof = roofline_tok_s(r, bandwidth, tpr);
        let decode = r.times.decode_tok_s(&r.spec);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {} | {} |",
            r.tp,
            r.spec.batch,
            r.times.prefill_tok_s(&r.spec),
            decode,
            r.times.tpot_ms(&r.spec),
            roof.map_or("-".into(), |x| format!("{x:.1}")),
            roof.map_or("-".into(), |x| format!("{:.0}%", 100.0 * decode / x)),
        );
    }
    for &batch in &args.batch_size {
        let Some(b) = base(batch) else { continue };
        println!("\nTP scaling, decode, batch {batch} (TP 1 is the base):\n");
        println!("| TP size | ideal speedup | actual speedup | efficiency | bandwidth ratio | of bandwidth ratio |");
        println!("|---|---|---|---|---|---|");
        for r in rows.iter().filter(|r| r.spec.batch == batch) {
            let actual = r.times.decode_tok_s(&r.spec) / b;
            let threads = r.memory.len() * tpr;
            let ratio = base_bw.and_then(|b| bandwidth.get(&threads).map(|x| x / b));
            println!(
                "| {} | {:.2} | {:.2} | {:.0}% | {} | {} |",
                r.tp,
                r.tp as f64,
                actual,
                100.0 * actual / r.tp as f64,
                ratio.map_or("-".into(), |x| format!("{x:.2}")),
                ratio.map_or("-".into(), |x| format!("{:.0}%", 100.0 * actual / x)),
            );
        }
    }
    println!("\nmemory per rank:");
    let mut seen = Vec::new();
    for r in rows.iter().filter(|r| {
        let new = !seen.contains(&r.tp);
        seen.push(r.tp);
        new
    }) {
        let total: usize = r.memory.iter().map(|m| m.weight_bytes).sum();
        let parts: Vec<String> = r
            .memory
            .iter()
            .map(|m| {
                format!(
                    "{:.1} MB ({:.0}%)",
                    m.weight_bytes as f64 / 1e6,
                    100.0 * m.weight_bytes as f64 / total as f64
                )
            })
            .collect();
        let anon: Vec<String> = r
            .memory
            .iter()
            .map(|m| format!("{:.1} MB", m.process_anon_bytes as f64 / 1e6))
            .collect();
        println!(
            "  tp {}: weights per rank {}; process anonymous RSS {}",
            r.tp,
            parts.join(", "),
            anon.join(", ")
        );
    }
}
