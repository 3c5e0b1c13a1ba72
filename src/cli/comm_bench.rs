//! `tpserve comm-bench`: collective latency and bandwidth of a TP group (nccl-tests'
//! all_reduce_perf), for the local backend (threads) or MPI (processes).

use crate::comm::{Comm, LocalGroup};
use crate::engine::Launch;
use crate::kernels::affinity;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct CommBenchArgs {
    /// Ranks (with --comm mpi: the processes mpirun started).
    #[arg(long, visible_aliases = ["tensor-parallel-size", "tp-size"])]
    pub tp: Option<usize>,
    /// local (threads of this process) or mpi (processes under mpirun).
    #[arg(long)]
    pub comm: Option<String>,
    /// Message sizes in floats.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,576,4096,65536,1048576"
    )]
    pub sizes: Vec<usize>,
    /// Timed repetitions per size (fewer for messages over 64 Ki floats).
    #[arg(long, default_value_t = 1000)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CommBenchArgs) -> Result<()> {
    if args.iters == 0 || args.sizes.is_empty() {
        bail!("--iters and --sizes must not be empty");
    }
    if args.tp == Some(0) {
        bail!("--tp must be at least 1");
    }
    // Local groups default to 2 ranks; an MPI world is as large as mpirun made it.
    let mut launch = Launch::resolve(args.comm.as_deref(), args.tp, 1)?;
    // Without the mpi feature, Local is the only kind of launch.
    #[allow(irrefutable_let_patterns)]
    if let Launch::Local { tp } = &mut launch {
        *tp = args.tp.unwrap_or(2);
    }
    let tp = launch.tp();
    let (backend, rows) = match launch {
        Launch::Local { tp } => ("local", bench_local(tp, &args)?),
        #[cfg(feature = "mpi")]
        Launch::Mpi {
            world: mut comm, ..
        } => {
            let rows = bench_rank(&mut comm, &args)?;
            if comm.rank() != 0 {
                return Ok(());
            }
            ("mpi", rows)
        }
    };
    report(&args, backend, tp, &rows);
    Ok(())
}

/// `tp` threads, pinned to distinct cores where there are enough.
fn bench_local(tp: usize, args: &CommBenchArgs) -> Result<Vec<Value>> {
    let cores = affinity::assign_cores(tp, 1, None);
    let comms = LocalGroup::create(tp);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(cores)
            .map(|(mut comm, cores)| {
                s.spawn(move || {
                    if let Some(&c) = cores.first() {
                        affinity::pin_to_core(c);
                    }
                    bench_rank(&mut comm, args)
                })
            })
            .collect();
        let mut results: Vec<Result<Vec<Value>>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a rank panicked"))))
            .collect();
        results.remove(0)
    })
}

/// Each rank's loop; every rank returns the same rows (rank 0's timings).
fn bench_rank(comm: &mut dyn Comm, args: &CommBenchArgs) -> Result<Vec<Value>> {
    let n = comm.size();
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let iters = if size > 65536 {
            (args.iters / 20).max(10)
        } else {
            args.iters
        };
        let mut f = vec![1.0f32; size];
        let mut i = vec![1i64; size];
        let part = vec![1.0f32; size.div_ceil(n)];
        let mut gathered = Vec::new();
        let time = |op: &mut dyn FnMut(&mut dyn Comm) -> Result<()>,
                    comm: &mut dyn Comm|
         -> Result<(f64, f64)> {
            for _ in 0..iters.min(20) {
                op(comm)?;
            }
            let mut us = Vec::with_capacity(iters);
            for _ in 0..iters {
                comm.barrier()?;
                let t = Instant::now();
                op(comm)?;
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            us.sort_by(f64::total_cmp);
            Ok((
                us[us.len() / 2],
                us[((us.len() - 1) as f64 * 0.99) as usize],
            ))
        };
        let ar = time(&mut |c| c.all_reduce_sum(&mut f), comm)?;
        let ar64 = time(&mut |c| c.all_reduce_sum_i64(&mut i), comm)?;
        let ag = time(&mut |c| c.all_gather(&part, &mut gathered), comm)?;
        let bytes = (size * 4) as f64;
        let algbw = bytes / (ar.0 * 1e-6) / 1e9;
        rows.push(json!({
            "floats": size,
            "bytes": size * 4,
            "all_reduce_us": {"median": ar.0, "p99": ar.1},
            "all_reduce_algbw_gbps": algbw,
            "all_reduce_busbw_gbps": algbw * 2.0 * (n as f64 - 1.0) / n as f64,
            "all_reduce_i64_us": {"median": ar64.0, "p99": ar64.1},
            "all_gather_us": {"median": ag.0, "p99": ag.1},
            "all_gather_busbw_gbps": bytes / (ag.0 * 1e-6) / 1e9 * (n as f64 - 1.0) / n as f64,
        }));
    }
    Ok(rows)
}

fn report(args: &CommBenchArgs, backend: &str, tp: usize, rows: &[Value]) {
    if args.json {
        println!("{}", json!({"backend": backend, "tp": tp, "results": rows}));
        return;
    }
    println!("comm-bench: {backend} backend, {tp} ranks");
    println!("| floats | all-reduce µs median / p99 | algbw GB/s | busbw GB/s | i64 all-reduce µs median | all-gather µs median / p99 |");
    println!("|---|---|---|---|---|---|");
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    for r in rows {
        println!(
            "| {} | {:.2} / {:.2} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} |",
            r["floats"],
            f(&r["all_reduce_us"]["median"]),
            f(&r["all_reduce_us"]["p99"]),
            f(&r["all_reduce_algbw_gbps"]),
            f(&r["all_reduce_busbw_gbps"]),
            f(&r["all_reduce_i64_us"]["median"]),
            f(&r["all_gather_us"]["median"]),
            f(&r["all_gather_us"]["p99"]),
        );
    }
}
