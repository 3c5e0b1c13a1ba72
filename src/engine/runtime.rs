//! The rank runtime: tp × pp ranks as threads (or MPI processes), each loading its shard;
//! rank 0 drives, the others run the worker loop (receive a step plan, run the forward
//! pass, contribute).

use super::grammar;
use super::kv_capacity::KvCapacity;
use super::pipeline::{self, Pipeline, PipelineOptions};
use super::sampling::{by_logit, logit_key};
use super::step_plan::{self, Gather, PlanKind, ReceivedPlan, RowMask};
use crate::comm::{peers, AbortHandle, Comm, LocalGroup, LocalPeers};
use crate::kernels::affinity;
use crate::kernels::{Phase, Threads};
use crate::loader::{ModelConfig, TensorSource};
use crate::model::{ForwardOptions, KvCache, Logits, Model, RankPlace, SeqStep};
use crate::shard::{Partition, Stage};
use anyhow::{anyhow, bail, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// How to lay out a group of ranks on this machine: pipeline stages of tensor-parallel
/// groups.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub tp: usize,
    /// Pipeline stages, and their micro-batches.
    pub pipeline: PipelineOptions,
    /// Kernel threads per rank; `None`: the machine's cores divided by the ranks, at least 1.
    pub threads_per_rank: Option<usize>,
    /// The KV cache's size, decided once the weights are loaded.
    pub kv: KvCapacity,
    /// Positions per KV block.
    pub block_size: usize,
    /// Cores the ranks may use (`--cpus`); `None`: all of the process's.
    pub cpus: Option<Vec<usize>>,
    /// Counts layers loaded, over all ranks (for a progress bar).
    pub progress: Option<Arc<AtomicUsize>>,
    /// The forward pass's communication optimisations.
    pub forward: ForwardOptions,
}

/// Positions per KV block unless a caller chooses otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

impl GroupOptions {
    /// A group whose KV cache holds one sequence of `positions`.
    pub fn single_sequence(tp: usize, threads_per_rank: Option<usize>, positions: usize) -> Self {
        GroupOptions {
            tp,
            pipeline: PipelineOptions::default(),
            threads_per_rank,
            kv: KvCapacity::Tokens(positions),
            block_size: DEFAULT_BLOCK_SIZE,
            cpus: None,
            progress: None,
            forward: ForwardOptions::default(),
        }
    }

    pub fn threads_per_rank(&self) -> usize {
        self.threads_per_rank_among(self.world_size())
    }

    /// Kernel threads for each of `ranks` ranks sharing the cores (`--cpus`, or all):
    /// `--threads-per-rank` if given, else an even share, at least 1.
    pub fn threads_per_rank_among(&self, ranks: usize) -> usize {
        self.threads_per_rank.unwrap_or_else(|| {
            let cores = match &self.cpus {
                Some(c) => c.len(),
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            };
            (cores / ranks.max(1)).max(1)
        })
    }

    /// Ranks in all: tp per stage, times the stages.
    pub fn world_size(&self) -> usize {
        self.tp * self.pipeline.stages
    }
}

/// Checks a tp size against a model before any thread starts.
pub fn validate_tp(cfg: &ModelConfig, tp: usize) -> Result<()> {
    if tp == 0 {
        bail!("--tp must be at least 1");
    }
    if tp > cfg.num_heads {
        bail!(
            "--tp {tp} is larger than the model's {} attention heads; use --tp {} or less",
            cfg.num_heads,
            cfg.num_heads
        );
    }
    Ok(())
}

/// Checks a layout (tp per stage, pipeline stages) against a model.
pub fn validate_layout(cfg: &ModelConfig, tp: usize, pipeline: &PipelineOptions) -> Result<()> {
    validate_tp(cfg, tp)?;
    pipeline.validate(cfg.num_layers)
}

/// One rank's state: its shard, its KV cache, its handle on its stage's TP group and, with
/// several stages, on the pipeline.
pub struct Rank {
    pub model: Model,
    pub kv: KvCache,
    pub comm: Box<dyn Comm>,
    pub pipeline: Option<Pipeline>,
}

impl Rank {
    /// The group that plans and reports go through: the whole world.
    fn control(&mut self) -> &mut dyn Comm {
        match &mut self.pipeline {
            Some(p) => &mut *p.world,
            None => &mut *self.comm,
        }
    }

    /// Sequences per micro-batch for a step of `seqs` sequences.
    fn micro_batch(&self, seqs: usize) -> usize {
        self.pipeline
            .as_ref()
            .map_or(seqs, |p| p.options.micro_batch(seqs))
    }
}

/// Rank 0's side of the group: it plans each step, and every rank executes it.
pub struct Driver<'a> {
    rank: &'a mut Rank,
    plan: Vec<u8>,
    buffers: GatherBuffers,
    logits: Vec<f32>,
    /// The merged top-k candidates of `forward_top_k`.
    top: Vec<(u32, f32)>,
    /// The block table of `forward_one`: the whole cache, in order (shared, so that a step
    /// can borrow it while the driver is borrowed mutably).
    all_blocks: Arc<[u32]>,
}

impl Driver<'_> {
    pub fn config(&self) -> &ModelConfig {
        self.rank.model.config()
    }

    /// Positions the KV cache holds in all.
    pub fn kv_capacity(&self) -> usize {
        self.rank.kv.num_blocks() * self.rank.kv.block_size()
    }

    pub fn kv_blocks(&self) -> usize {
        self.rank.kv.num_blocks()
    }

    pub fn block_size(&self) -> usize {
        self.rank.kv.block_size()
    }

    pub fn tp(&self) -> usize {
        self.rank.comm.size()
    }

    /// Runs one step of `seqs` on every rank; returns the full-vocabulary logits of the
    /// positions asked, sequence after sequence: `[positions × vocab]`.
    pub fn forward(&mut self, seqs: &[SeqStep]) -> Result<&[f32]> {
        self.forward_masked(seqs, &[])
    }

    /// [`Self::forward`], with the tokens `masks` leave out of their rows at −∞.
    pub fn forward_masked(&mut self, seqs: &[SeqStep], masks: &[RowMask]) -> Result<&[f32]> {
        step_plan::encode_forward(seqs, Gather::AllLogits, &[], &mut self.plan);
        self.rank.control().broadcast(&mut self.plan, 0)?;
        let vocab = self.rank.model.config().vocab_size;
        execute_forward(self.rank, seqs, Gather::AllLogits, &[], &mut self.buffers)?;
        let (gathered, tp) = (&self.buffers.gathered, self.tp());
        self.logits.resize(gathered.len(), 0.0);
        let mut at = 0;
        for (mb, first_row) in pipeline::micro_batches(seqs, self.rank.micro_batch(seqs.len())) {
            let len = pipeline::logit_rows(mb) * vocab;
            let out = &mut self.logits[first_row * vocab..first_row * vocab + len];
            interleave_vocab_shards(&gathered[at..at + len], vocab, tp, out);
            at += len;
        }
        for &(row, words) in masks {
            let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
            grammar::mask_logits(words, logits);
        }
        Ok(&self.logits)
    }

    /// Runs one step of `seqs` on every rank; returns the `k` largest logits of each
    /// position asked, as (id, logit) sorted by logit descending (ties: lower id first),
    /// `[positions × k]`. Only each rank's own top `k` crosses ranks (vocab-parallel
    /// selection), never the full logits. `k` is capped at the vocabulary size.
    pub fn forward_top_k(&mut self, seqs: &[SeqStep], k: usize) -> Result<&[(u32, f32)]> {
        self.forward_top_k_masked(seqs, k, &[])
    }

    /// [`Self::forward_top_k`] among the tokens `masks` allow in their rows: every rank
    /// leaves the others out of its own candidates, so the merged top k holds allowed
    /// tokens first (then −∞ places, where fewer than k are allowed).
    pub fn forward_top_k_masked(
        &mut self,
        seqs: &[SeqStep],
        k: usize,
        masks: &[RowMask],
    ) -> Result<&[(u32, f32)]> {
        let k = k.clamp(1, self.config().vocab_size);
        step_plan::encode_forward(seqs, Gather::TopK(k), masks, &mut self.plan);
        self.rank.control().broadcast(&mut self.plan, 0)?;
        execute_forward(self.rank, seqs, Gather::TopK(k), masks, &mut self.buffers)?;
        let (tp, vocab) = (self.tp(), self.config().vocab_size);
        let gathered = &self.buffers.gathered;
        self.top.clear();
        let mut at = 0;
        for (mb, _) in pipeline::micro_batches(seqs, self.rank.micro_batch(seqs.len())) {
            let len = pipeline::gathered_len(Gather::TopK(k), pipeline::logit_rows(mb), vocab, tp);
            merge_top_k(&gathered[at..at + len], tp, k, &mut self.top);
            at += len;
        }
        Ok(&self.top)
    }

    /// One sequence that owns the whole KV cache (generation from the command line,
    /// perplexity): `tokens` at positions `start_pos..`.
    pub fn forward_one(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        logits: Logits,
        phase: Phase,
    ) -> Result<&[f32]> {
        let blocks = Arc::clone(&self.all_blocks);
        self.forward(&[SeqStep {
            tokens,
            start_pos,
            blocks: &blocks,
            logits,
            phase,
        }])
    }

    /// One decode step of the sequence of [`Self::forward_one`], returning its top `k`
    /// candidates (see [`Self::forward_top_k`]).
    pub fn forward_one_top_k(&mut self, token: u32, pos: usize, k: usize) -> Result<&[(u32, f32)]> {
        let blocks = Arc::clone(&self.all_blocks);
        let step = SeqStep {
            tokens: &[token],
            start_pos: pos,
            blocks: &blocks,
            logits: Logits::Last,
            phase: Phase::Decode,
        };
        self.forward_top_k(&[step], k)
    }

    /// Pipeline stages.
    pub fn pp(&self) -> usize {
        self.rank.pipeline.as_ref().map_or(1, |p| p.stage.count)
    }

    fn stop(&mut self) -> Result<()> {
        step_plan::encode_stop(&mut self.plan);
        self.rank.control().broadcast(&mut self.plan, 0)
    }

    /// What each rank holds (every rank of every stage, in world order): weight bytes,
    /// and KV cache bytes per token.
    pub fn memory_per_rank(&mut self) -> Result<Vec<RankMemory>> {
        step_plan::encode_report_memory(&mut self.plan);
        self.rank.control().broadcast(&mut self.plan, 0)?;
        gather_memory(self.rank)
    }

    /// Weight bytes held by each rank.
    pub fn weight_bytes_per_rank(&mut self) -> Result<Vec<usize>> {
        Ok(self
            .memory_per_rank()?
            .iter()
            .map(|m| m.weight_bytes)
            .collect())
    }
}

/// One rank's resident model memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankMemory {
    pub weight_bytes: usize,
    pub kv_bytes_per_token: usize,
    /// Weight bytes a decode step reads (see [`Model::decode_read_bytes`]).
    pub decode_read_bytes: usize,
    /// Anonymous resident memory of the rank's process (threads of one process share it).
    pub process_anon_bytes: usize,
}

/// Every rank's [`RankMemory`], exactly: each fills its own slots and an integer
/// all-reduce assembles them.
fn gather_memory(rank: &mut Rank) -> Result<Vec<RankMemory>> {
    let (r, n) = (rank.control().rank(), rank.control().size());
    const FIELDS: usize = 4;
    let mut all = vec![0i64; FIELDS * n];
    let kv = &rank.kv;
    let mine = &mut all[FIELDS * r..FIELDS * (r + 1)];
    mine[0] = rank.model.weight_bytes() as i64;
    mine[1] = (kv.bytes() / (kv.num_blocks() * kv.block_size())) as i64;
    mine[2] = rank.model.decode_read_bytes() as i64;
    mine[3] = process_anon_bytes().unwrap_or(0) as i64;
    rank.control().all_reduce_sum_i64(&mut all)?;
    Ok(all
        .chunks_exact(FIELDS)
        .map(|m| RankMemory {
            weight_bytes: m[0] as usize,
            kv_bytes_per_token: m[1] as usize,
            decode_read_bytes: m[2] as usize,
            process_anon_bytes: m[3] as usize,
        })
        .collect())
}

/// Buffers of a rank's step and gather, kept across steps.
#[derive(Default)]
struct GatherBuffers {
    /// This rank's top-k candidates, `[position][k][logit, id bits]`.
    local_top: Vec<f32>,
    /// One micro-batch's gather: every rank's contribution, rank-major.
    part: Vec<f32>,
    /// The step's micro-batches' gathers, one after the other.
    gathered: Vec<f32>,
    /// The hidden states a pipeline stage receives from the previous one.
    hidden: Vec<f32>,
}

/// Anonymous resident memory of this process (Linux `RssAnon`: what it allocated and
/// touched, not the mapped model file); `None` where the OS does not say.
fn process_anon_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The forward pass every rank runs for a step, micro-batch by micro-batch through the
/// stages; then rank 0 holds in `buffers.gathered`, per micro-batch, the gather `gather`
/// asks for: the logits, `[rank][position][vocab_local]`, or each rank's top k,
/// `[rank][position][k][logit, id bits]`.
fn execute_forward(
    rank: &mut Rank,
    seqs: &[SeqStep],
    gather: Gather,
    masks: &[RowMask],
    buffers: &mut GatherBuffers,
) -> Result<()> {
    let size = rank.micro_batch(seqs.len());
    let Rank {
        model,
        kv,
        comm,
        pipeline,
    } = rank;
    let vocab = model.plan().vocab.clone();
    buffers.gathered.clear();
    for (mb, first_row) in pipeline::micro_batches(seqs, size) {
        let hidden = match pipeline.as_mut() {
            Some(p) => p.receive_hidden(&mut buffers.hidden)?,
            None => None,
        };
        let out = model.forward(mb, kv, &mut **comm, hidden)?;
        match pipeline.as_mut() {
            Some(p) if !p.stage.is_last() => p.send_hidden(out)?,
            _ => gather_part(out, &vocab, gather, masks, first_row, &mut **comm, buffers)?,
        }
    }
    match pipeline {
        Some(p) => p.return_results(&mut buffers.gathered),
        None => Ok(()),
    }
}

/// Gathers one micro-batch's results over the stage's TP group (`local`: this rank's
/// logits of its `vocab` slice; the micro-batch's rows start at step row `first_row`),
/// appending them to `buffers.gathered`.
fn gather_part(
    local: &[f32],
    vocab: &std::ops::Range<usize>,
    gather: Gather,
    masks: &[RowMask],
    first_row: usize,
    comm: &mut dyn Comm,
    buffers: &mut GatherBuffers,
) -> Result<()> {
    let mine = match gather {
        Gather::AllLogits => local,
        Gather::TopK(k) => {
            buffers.local_top.clear();
            if !vocab.is_empty() {
                let mut masks = masks.iter().skip_while(|m| m.0 < first_row).peekable();
                for (r, row) in local.chunks_exact(vocab.len()).enumerate() {
                    let mask = masks.next_if(|m| m.0 == first_row + r).map(|m| m.1);
                    push_top_k(row, vocab.start as u32, k, mask, &mut buffers.local_top);
                }
            }
            &buffers.local_top
        }
    };
    // The first part lands in place (a step of one micro-batch copies nothing).
    if buffers.gathered.is_empty() {
        return comm.all_gather(mine, &mut buffers.gathered);
    }
    comm.all_gather(mine, &mut buffers.part)?;
    buffers.gathered.extend_from_slice(&buffers.part);
    Ok(())
}

/// Appends the `k` largest of `row` (ids from `first_id`) as `[logit, id bits]` pairs,
/// largest first, in [`by_logit`]'s order; missing places are (-inf, u32::MAX), which every
/// real token outranks. With a `mask` (bits by global id), tokens it leaves out are skipped.
fn push_top_k(row: &[f32], first_id: u32, k: usize, mask: Option<&[u32]>, out: &mut Vec<f32>) {
    let start = out.len();
    for _ in 0..k {
        out.extend([f32::NEG_INFINITY, f32::from_bits(u32::MAX)]);
    }
    let best = &mut out[start..];
    let entry = |best: &[f32], at: usize| (best[2 * at + 1].to_bits(), best[2 * at]);
    for (i, &v) in row.iter().enumerate() {
        // The common case first: plainly below the k-th.
        if logit_key(v) < logit_key(best[2 * k - 2]) {
            continue;
        }
        let id = first_id + i as u32;
        if mask.is_some_and(|m| !grammar::is_allowed(m, id)) {
            continue;
        }
        // Better than the k-th, or it stays out (ids only grow, so an equal value loses).
        if by_logit(&(id, v), &entry(best, k - 1)).is_ge() {
            continue;
        }
        let mut at = k - 1;
        while at > 0 && by_logit(&(id, v), &entry(best, at - 1)).is_lt() {
            best[2 * at] = best[2 * at - 2];
            best[2 * at + 1] = best[2 * at - 1];
            at -= 1;
        }
        best[2 * at] = v;
        best[2 * at + 1] = f32::from_bits(id);
    }
}

/// Rank 0's merge of every rank's top k (`gathered`, rank-major) into the global top k
/// per position, appended to `out`.
fn merge_top_k(gathered: &[f32], tp: usize, k: usize, out: &mut Vec<(u32, f32)>) {
    let per_rank = gathered.len() / tp;
    let positions = per_rank / (2 * k);
    for p in 0..positions {
        let start = out.len();
        for r in 0..tp {
            let at = r * per_rank + p * 2 * k;
            let pairs = gathered[at..at + 2 * k].chunks_exact(2);
            out.extend(pairs.map(|c| (c[1].to_bits(), c[0])));
        }
        out[start..].sort_unstable_by(by_logit);
        out.truncate(start + k);
    }
}

/// Turns rank-major `[rank][position][vocab_local]` into `[position][vocab]`.
fn interleave_vocab_shards(gathered: &[f32], vocab: usize, tp: usize, out: &mut [f32]) {
    let split = Partition::even(vocab, tp);
    let positions = gathered.len() / vocab;
    let mut at = 0;
    for r in 0..tp {
        let range = split.range(r);
        let w = range.len();
        for p in 0..positions {
            out[p * vocab + range.start..p * vocab + range.end]
                .copy_from_slice(&gathered[at + p * w..at + (p + 1) * w]);
        }
        at += positions * w;
    }
}

/// The loop of every rank but rank 0: execute plans until rank 0 says stop.
fn worker_loop(rank: &mut Rank) -> Result<()> {
    let mut bytes = Vec::new();
    let mut plan = ReceivedPlan::default();
    let mut buffers = GatherBuffers::default();
    let mut steps_storage: Vec<SeqStep<'static>> = Vec::new();
    loop {
        rank.control().broadcast(&mut bytes, 0)?;
        match plan.decode(&bytes)? {
            PlanKind::Forward => {
                let mut steps = SeqStep::recycle(std::mem::take(&mut steps_storage));
                plan.seqs(&mut steps);
                // Allocates only when a step carries token masks.
                let mut masks = Vec::new();
                plan.masks(&mut masks);
                execute_forward(rank, &steps, plan.gather(), &masks, &mut buffers)?;
                steps_storage = SeqStep::recycle(steps);
            }
            PlanKind::ReportMemory => {
                gather_memory(rank)?;
            }
            PlanKind::Stop => return Ok(()),
        }
    }
}

/// Starts `opts.tp × opts.pipeline.stages` ranks as threads of this process, each loading
/// its own shard of the model from `src`, and runs `drive` on rank 0. When any rank fails,
/// every group is aborted and the first root-cause error is returned (naming the rank).
pub fn run_local<T: Send>(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    opts: &GroupOptions,
    drive: impl FnOnce(&mut Driver) -> Result<T> + Send,
) -> Result<T> {
    validate_layout(cfg, opts.tp, &opts.pipeline)?;
    let (tp, stages, world) = (opts.tp, opts.pipeline.stages, opts.world_size());
    let threads_per_rank = opts.threads_per_rank();
    let cores = affinity::assign_cores(world, threads_per_rank, opts.cpus.as_deref());
    let comms: Vec<_> = (0..stages).flat_map(|_| LocalGroup::create(tp)).collect();
    let mut pipelines: Vec<Option<Pipeline>> = if stages > 1 {
        let peers = LocalPeers::create(world);
        LocalGroup::create(world)
            .into_iter()
            .zip(peers)
            .enumerate()
            .map(|(r, (world_comm, peers))| {
                Some(Pipeline {
                    world: Box::new(world_comm),
                    peers: Box::new(peers),
                    stage: Stage::new(cfg.num_layers, stages, r / tp).expect("validated"),
                    tp,
                    options: opts.pipeline,
                })
            })
            .collect()
    } else {
        (0..world).map(|_| None).collect()
    };
    // A rank that fails takes every group down, so no rank of another stage waits forever.
    let aborts: Vec<AbortHandle> = comms
        .iter()
        .map(|c| c.abort_handle())
        .chain(pipelines.iter().flatten().map(|p| p.world.abort_handle()))
        .collect();
    let aborts = Arc::new(aborts);
    let mut drive = Some(drive);
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (id, comm) in comms.into_iter().enumerate() {
            let setup = RankSetup {
                place: place_of(cfg, opts, id),
                cores: cores[id].clone(),
                comm: Box::new(comm),
                pipeline: pipelines[id].take(),
                abort: {
                    let aborts = Arc::clone(&aborts);
                    Box::new(move |reason: &str| aborts.iter().for_each(|a| a(reason)))
                },
            };
            let drive = if id == 0 { drive.take() } else { None };
            let handle = std::thread::Builder::new()
                .name(format!("tpserve-rank-{id}"))
                .spawn_scoped(scope, move || {
                    run_rank(src, cfg, opts, threads_per_rank, setup, drive)
                })
                .map_err(|e| anyhow!("cannot start rank {id}'s thread: {e}"))?;
            handles.push(handle);
        }
        let results: Vec<Result<Option<T>>> = handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("rank {r} panicked")))
            })
            .collect();
        first_root_cause(results)
    })
}

/// Where world rank `id` sits: rank `id % tp` of stage `id / tp`.
fn place_of(cfg: &ModelConfig, opts: &GroupOptions, id: usize) -> RankPlace {
    let stages = opts.pipeline.stages;
    RankPlace {
        tp: opts.tp,
        rank: id % opts.tp,
        ep_size: opts.forward.ep_size,
        stage: Stage::new(cfg.num_layers, stages, id / opts.tp).expect("validated"),
    }
}

/// How the ranks of a group are started.
pub enum Launch {
    /// `tp` threads per stage, in this process.
    Local { tp: usize },
    /// This process is one rank of the MPI world (started by mpirun), of `tp` per stage.
    #[cfg(feature = "mpi")]
    Mpi {
        world: crate::comm::mpi::MpiComm,
        tp: usize,
    },
}

impl Launch {
    /// From `--comm` (`local`, `mpi`, or unset: MPI when launched by mpirun), `--tp` and
    /// `--pp-size`: under MPI the world must hold tp × pp processes (tp, when not given,
    /// is the world's processes over the stages).
    pub fn resolve(comm: Option<&str>, tp: Option<usize>, pp: usize) -> Result<Launch> {
        let mpi = match comm {
            Some("local") => false,
            Some("mpi") => true,
            Some(other) => bail!("--comm {other} is not one of local, mpi"),
            None => launched_by_mpi(),
        };
        if !mpi {
            return Ok(Launch::Local {
                tp: tp.unwrap_or(1),
            });
        }
        #[cfg(feature = "mpi")]
        {
            let comm_world = crate::comm::mpi::MpiComm::init()?;
            let size = comm_world.size();
            if comm.is_none() && comm_world.rank() == 0 {
                eprintln!("running under an MPI launcher: using --comm mpi with {size} ranks");
            }
            let pp = pp.max(1);
            if !size.is_multiple_of(pp) {
                bail!("--pp-size {pp} does not divide the {size} processes mpirun started: the world is --tp × --pp-size ranks");
            }
            if let Some(tp) = tp.filter(|&t| t * pp != size) {
                bail!("--tp {tp} × --pp-size {pp} does not match the {size} processes mpirun started: the MPI world is the TP groups of every stage (drop --tp or use mpirun -np {})", tp * pp);
            }
            Ok(Launch::Mpi {
                world: comm_world,
                tp: size / pp,
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = pp;
            bail!("this tpserve was built without MPI support: rebuild with `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)")
        }
    }

    /// Ranks in each stage's TP group.
    pub fn tp(&self) -> usize {
        match self {
            Launch::Local { tp } => *tp,
            #[cfg(feature = "mpi")]
            Launch::Mpi { tp, .. } => *tp,
        }
    }

    /// Whether this process runs rank 0 (prints results, serves HTTP).
    pub fn is_leader(&self) -> bool {
        match self {
            Launch::Local { .. } => true,
            #[cfg(feature = "mpi")]
            Launch::Mpi { world, .. } => world.rank() == 0,
        }
    }
}

/// Whether an MPI launcher started this process.
fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Runs the group as `launch` says; `drive` runs on rank 0, which returns `Some`; the other
/// ranks of an MPI world serve plans and return `None` once rank 0 stops.
pub fn run_group<T: Send>(
    launch: Launch,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    opts: &GroupOptions,
    drive: impl FnOnce(&mut Driver) -> Result<T> + Send,
) -> Result<Option<T>> {
    match launch {
        Launch::Local { .. } => run_local(src, cfg, opts, drive).map(Some),
        #[cfg(feature = "mpi")]
        Launch::Mpi { world, .. } => {
            validate_layout(cfg, opts.tp, &opts.pipeline)?;
            if world.size() != opts.world_size() {
                bail!(
                    "{} MPI processes for --tp {} × --pp-size {}",
                    world.size(),
                    opts.tp,
                    opts.pipeline.stages
                );
            }
            let id = world.rank();
            let (setup, threads) = mpi_rank_setup(world, cfg, opts)?;
            let drive = (id == 0).then_some(drive);
            run_rank(src, cfg, opts, threads, setup, drive)
        }
    }
}

/// An MPI process's handles: its stage's TP group split from the world, and with several
/// stages the world itself for plans and point-to-point messages; and its kernel threads.
/// `--cpus` lists a node's cores: each process takes its share by its rank among the
/// processes of its node (without it, the launcher's binding applies).
#[cfg(feature = "mpi")]
fn mpi_rank_setup(
    world: crate::comm::mpi::MpiComm,
    cfg: &ModelConfig,
    opts: &GroupOptions,
) -> Result<(RankSetup, usize)> {
    let id = world.rank();
    let (local_rank, local_size) = world.node_local();
    let threads = opts.threads_per_rank_among(local_size);
    let cores = match &opts.cpus {
        Some(c) => affinity::assign_cores(local_size, threads, Some(c)).swap_remove(local_rank),
        None => Vec::new(),
    };
    let place = place_of(cfg, opts, id);
    let abort = world.abort_handle();
    let (comm, pipeline): (Box<dyn Comm>, _) = if opts.pipeline.stages > 1 {
        let stage_comm = world.split(place.stage.index)?;
        let peers = world.peers()?;
        let pipeline = Pipeline {
            world: Box::new(world),
            peers: Box::new(peers),
            stage: place.stage.clone(),
            tp: opts.tp,
            options: opts.pipeline,
        };
        (Box::new(stage_comm), Some(pipeline))
    } else {
        (Box::new(world), None)
    };
    let setup = RankSetup {
        place,
        cores,
        comm,
        pipeline,
        abort,
    };
    Ok((setup, threads))
}

/// What a rank starts with besides the model: its place, cores, groups, and how to take
/// every group down when it fails.
struct RankSetup {
    place: RankPlace,
    cores: Vec<usize>,
    comm: Box<dyn Comm>,
    pipeline: Option<Pipeline>,
    abort: AbortHandle,
}

impl RankSetup {
    /// The rank's name in errors: its world rank, and its stage when there are several.
    fn name(&self) -> String {
        let id = self.place.stage.index * self.place.tp + self.place.rank;
        match self.place.stage.count {
            1 => format!("rank {id}"),
            n => format!(
                "rank {id} (pipeline stage {} of {n}, layers {}..{})",
                self.place.stage.index, self.place.stage.layers.start, self.place.stage.layers.end
            ),
        }
    }
}

fn run_rank<T>(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    opts: &GroupOptions,
    threads_per_rank: usize,
    setup: RankSetup,
    drive: Option<impl FnOnce(&mut Driver) -> Result<T>>,
) -> Result<Option<T>> {
    let name = setup.name();
    let RankSetup {
        place,
        cores,
        comm,
        pipeline,
        abort,
    } = setup;
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Option<T>> {
        if let Some(&core) = cores.first() {
            affinity::pin_to_core(core);
        }
        let threads = Threads::new(threads_per_rank, &cores)?;
        let progress = opts.progress.as_deref();
        let mut model = Model::load(src, cfg, &place, threads, progress)?;
        model.set_options(opts.forward);
        let per_token = model.kv_bytes_per_token();
        let (mut comm, mut pipeline) = (comm, pipeline);
        let control: &mut dyn Comm = match pipeline.as_mut() {
            Some(p) => &mut *p.world,
            None => &mut *comm,
        };
        let kv_blocks = opts.kv.blocks(control, per_token, opts.block_size)?;
        let kv = model.new_kv_cache(kv_blocks, opts.block_size)?;
        // Every rank has its shard before any plan flows.
        control.barrier()?;
        let mut rank = Rank {
            model,
            kv,
            comm,
            pipeline,
        };
        let Some(drive) = drive else {
            worker_loop(&mut rank)?;
            return Ok(None);
        };
        let mut driver = Driver {
            rank: &mut rank,
            plan: Vec::new(),
            buffers: GatherBuffers::default(),
            logits: Vec::new(),
            top: Vec::new(),
            all_blocks: (0..kv_blocks as u32).collect::<Vec<_>>().into(),
        };
        let out = drive(&mut driver);
        // Release the workers whether or not driving succeeded.
        let stopped = driver.stop();
        let out = out?;
        stopped?;
        Ok(Some(out))
    }));
    let result = result.unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(anyhow!("internal error (panic): {msg}"))
    });
    if let Err(e) = &result {
        abort(&format!("{name}: {e:#}"));
    }
    result.map_err(|e| e.context(name))
}

/// The first error that is not merely another rank reporting the abort.
fn first_root_cause<T>(results: Vec<Result<Option<T>>>) -> Result<T> {
    let mut first_err = None;
    let mut value = None;
    for r in results {
        match r {
            Ok(Some(v)) => value = Some(v),
            Ok(None) => {}
            Err(e) => {
                let text = format!("{e:#}");
                let is_echo = text.contains("tensor-parallel group aborted")
                    || text.contains(peers::PEER_STOPPED);
                match &first_err {
                    None => first_err = Some((e, is_echo)),
                    Some((_, true)) if !is_echo => first_err = Some((e, false)),
                    _ => {}
                }
            }
        }
    }
    match (first_err, value) {
        (Some((e, _)), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => Err(anyhow!("rank 0 returned no result")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::top_logits;

    #[test]
    fn top_k_of_a_shard_ranks_nan_and_infinities_as_the_full_logits_do() {
        let row = [
            f32::NAN,
            f32::NEG_INFINITY,
            2.0,
            f32::INFINITY,
            2.0,
            f32::NEG_INFINITY,
        ];
        for k in 1..=6 {
            let mut out = Vec::new();
            push_top_k(&row, 10, k, None, &mut out);
            let got: Vec<(u32, f32)> = out.chunks(2).map(|c| (c[1].to_bits(), c[0])).collect();
            let want: Vec<(u32, f32)> = top_logits(&row, k)
                .into_iter()
                .map(|(i, v)| (i + 10, v))
                .collect();
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "k {k}");
        }
        // A shard of nothing but -inf still offers real tokens, never the placeholder id.
        let mut out = Vec::new();
        push_top_k(&[f32::NEG_INFINITY; 3], 0, 2, None, &mut out);
        assert_eq!([out[1].to_bits(), out[3].to_bits()], [0, 1]);
    }

    /// A masked shard's candidates are the best allowed tokens, as if the others were not
    /// there; places beyond the allowed tokens are placeholders, never a masked token.
    #[test]
    fn masked_top_k_offers_only_allowed_tokens() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let n = rng.random_range(1..100);
            let row: Vec<f32> = (0..n).map(|_| rng.random_range(-4..4) as f32).collect();
            let first = rng.random_range(0..70u32);
            let mut mask = vec![0u32; (first as usize + n).div_ceil(32)];
            for id in first..first + n as u32 {
                if rng.random_bool(0.3) {
                    mask[id as usize / 32] |= 1 << (id % 32);
                }
            }
            let allowed: Vec<(u32, f32)> = (0..n)
                .filter(|&i| grammar::is_allowed(&mask, first + i as u32))
                .map(|i| (first + i as u32, row[i]))
                .collect();
            let k = rng.random_range(1..8);
            let mut out = Vec::new();
            push_top_k(&row, first, k, Some(&mask), &mut out);
            let got: Vec<(u32, f32)> = out.chunks(2).map(|c| (c[1].to_bits(), c[0])).collect();
            let mut want = allowed.clone();
            want.sort_by(by_logit);
            want.resize(k, (u32::MAX, f32::NEG_INFINITY));
            want.truncate(k);
            assert_eq!(got, want);
        }
    }
}
