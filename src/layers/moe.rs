//! A mixture of experts in place of the MLP, split as SGLang's default MoE tensor
//! parallelism does: the router is replicated, every expert's gate/up rows and down
//! columns are split over the ranks like a dense MLP, and one all-reduce ends the layer.
//! Under expert parallelism (`--ep-size`) each rank holds whole experts instead, and
//! computes only the tokens routed to them; the all-reduce is the same.
//!
//! Each token goes through its `top_k` experts. Its routing weight scales the expert's
//! activations before the down projection, so every expert adds fixed-point partial sums
//! into one buffer: integer additions, in any order, on any split, give the same bits, and
//! a token's numbers never depend on which other tokens share the step.

use super::{ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear, Run};
use crate::kernels::{ops, Threads};
use crate::layers::linear::ColumnPart;
use crate::loader::config::MoeConfig;
use crate::loader::TensorSource;
use crate::model::ExpertShard;
use anyhow::Result;
use std::ops::Range;

/// One expert's MLP: this rank's rows of gate/up and columns of down.
struct Expert {
    gate_up: MergedColumnParallelLinear,
    down: RowParallelLinear,
}

impl Expert {
    #[allow(clippy::too_many_arguments)]
    fn load(
        src: &dyn TensorSource,
        names: [String; 3],
        hidden: usize,
        width: usize,
        rows: Range<usize>,
        segment: usize,
    ) -> Result<Self> {
        let [gate, up, down] = names;
        Ok(Expert {
            gate_up: MergedColumnParallelLinear::load(
                src,
                [&gate, &up],
                width,
                hidden,
                rows.clone(),
            )?,
            down: RowParallelLinear::load(src, &down, hidden, width, rows, segment)?,
        })
    }

    /// Adds `weights[i] · expert(x_i)` for the gathered tokens into `acc` rows `targets`.
    fn add_partial_sums(
        &self,
        work: &mut ExpertWork,
        hidden: usize,
        acc: &mut [i64],
        threads: &Threads,
    ) {
        let width = self.gate_up.width;
        let m = work.targets.len();
        if width == 0 || m == 0 {
            return;
        }
        grow(&mut work.gate_up, m * 2 * width);
        grow(&mut work.act, m * width);
        self.gate_up
            .linear
            .forward(&work.x, &work.runs, &mut work.gate_up, threads);
        for (i, &w) in work.weights.iter().enumerate() {
            let gu = &work.gate_up[i * 2 * width..(i + 1) * 2 * width];
            let act = &mut work.act[i * width..(i + 1) * width];
            ops::silu_mul(&gu[..width], &gu[width..], act);
            act.iter_mut().for_each(|a| *a *= w);
        }
        if work.sums.len() < m * hidden {
            work.sums.resize(m * hidden, 0);
        }
        self.down
            .partial_sums(&work.act, &work.runs, &mut work.sums, threads);
        for (i, &t) in work.targets.iter().enumerate() {
            let from = &work.sums[i * hidden..(i + 1) * hidden];
            for (a, s) in acc[t * hidden..(t + 1) * hidden].iter_mut().zip(from) {
                *a += s;
            }
        }
    }
}

/// The tokens of a step gathered for one expert, and its buffers (kept between steps).
#[derive(Default)]
pub struct ExpertWork {
    x: Vec<f32>,
    runs: Vec<Run>,
    targets: Vec<usize>,
    weights: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    sums: Vec<i64>,
}

impl ExpertWork {
    fn clear(&mut self) {
        self.x.clear();
        self.runs.clear();
        self.targets.clear();
        self.weights.clear();
    }

    /// Adds token `t` of the step (hidden row `h`, in `phase`) with routing weight `w`.
    fn push(&mut self, t: usize, h: &[f32], phase: crate::kernels::Phase, w: f32) {
        self.x.extend_from_slice(h);
        super::push_run(&mut self.runs, 1, phase);
        self.targets.push(t);
        self.weights.push(w);
    }
}

/// Buffers of a MoE layer's forward pass, reused from step to step.
#[derive(Default)]
pub struct MoeScratch {
    logits: Vec<f32>,
    /// Each token's `top_k` (expert, weight) choices.
    routes: Vec<(usize, f32)>,
    shared_gate: Vec<f32>,
    work: ExpertWork,
}

pub struct SparseMoe {
    cfg: MoeConfig,
    /// All experts' routing logits, on every rank.
    router: ColumnParallelLinear,
    /// The experts this rank holds, `first_expert` onwards.
    experts: Vec<Expert>,
    first_expert: usize,
    /// Qwen2-MoE's shared expert and its sigmoid gate (one logit, on every rank).
    shared: Option<(Expert, ColumnParallelLinear)>,
}

impl SparseMoe {
    /// Layer `prefix`'s experts, this rank's `shard` of them.
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        cfg: &MoeConfig,
        hidden: usize,
        shard: &ExpertShard,
        segment: usize,
    ) -> Result<Self> {
        let (block, [gate, up, down]) = if cfg.mixtral_names {
            ("block_sparse_moe", ["w1", "w3", "w2"])
        } else {
            ("mlp", ["gate_proj", "up_proj", "down_proj"])
        };
        let replicated = |name: String, out: usize| {
            let part = ColumnPart {
                prefix: &name,
                out_features: out,
                rows: 0..out,
            };
            ColumnParallelLinear::load(src, &[part], hidden, false)
        };
        let router = replicated(format!("{prefix}.{block}.gate"), cfg.num_experts)?;
        let experts = shard
            .owned
            .clone()
            .map(|e| {
                let name = |w: &str| format!("{prefix}.{block}.experts.{e}.{w}");
                let names = [name(gate), name(up), name(down)];
                Expert::load(
                    src,
                    names,
                    hidden,
                    cfg.expert_intermediate_size,
                    shard.expert.clone(),
                    segment,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match cfg.shared_expert_intermediate_size {
            None => None,
            Some(width) => {
                let name = |w: &str| format!("{prefix}.mlp.shared_expert.{w}");
                let names = [name("gate_proj"), name("up_proj"), name("down_proj")];
                let rows = shard.shared.clone();
                let expert = Expert::load(src, names, hidden, width, rows, segment)?;
                Some((
                    expert,
                    replicated(format!("{prefix}.mlp.shared_expert_gate"), 1)?,
                ))
            }
        };
        Ok(SparseMoe {
            cfg: cfg.clone(),
            router,
            experts,
            first_expert: shard.owned.start,
            shared,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        let expert = |e: &Expert| e.gate_up.linear.weight_bytes() + e.down.weight_bytes();
        self.router.weight_bytes()
            + self.experts.iter().map(expert).sum::<usize>()
            + self
                .shared
                .as_ref()
                .map_or(0, |(e, g)| expert(e) + g.weight_bytes())
    }

    /// This rank's fixed-point partial sums of the layer's output for the normalised
    /// hidden states `h` (`runs` give each token's phase) into `acc` (overwritten); the
    /// caller all-reduces them.
    pub fn partial_sums(
        &self,
        h: &[f32],
        runs: &[Run],
        acc: &mut [i64],
        scratch: &mut MoeScratch,
        threads: &Threads,
    ) {
        let n = runs.last().map_or(0, |r| r.tokens.end);
        let hidden = h.len() / n.max(1);
        let (e, k) = (self.cfg.num_experts, self.cfg.top_k);
        acc[..n * hidden].fill(0);
        grow(&mut scratch.logits, n * e);
        self.router.forward(h, runs, &mut scratch.logits, threads);
        if scratch.routes.len() < n * k {
            scratch.routes.resize(n * k, (0, 0.0));
        }
        for t in 0..n {
            let logits = &scratch.logits[t * e..(t + 1) * e];
            route(
                logits,
                self.cfg.norm_topk_prob,
                &mut scratch.routes[t * k..(t + 1) * k],
            );
        }
        let phase_of = |t: usize| runs.iter().find(|r| r.tokens.contains(&t)).map(|r| r.phase);
        for (i, expert) in self.experts.iter().enumerate() {
            let id = self.first_expert + i;
            scratch.work.clear();
            for t in 0..n {
                let chosen = scratch.routes[t * k..(t + 1) * k]
                    .iter()
                    .find(|r| r.0 == id);
                if let Some(&(_, w)) = chosen {
                    let phase = phase_of(t).expect("every token lies in a run");
                    scratch
                        .work
                        .push(t, &h[t * hidden..(t + 1) * hidden], phase, w);
                }
            }
            expert.add_partial_sums(&mut scratch.work, hidden, acc, threads);
        }
        if let Some((expert, gate)) = &self.shared {
            grow(&mut scratch.shared_gate, n);
            gate.forward(h, runs, &mut scratch.shared_gate, threads);
            scratch.work.clear();
            for t in 0..n {
                let w = 1.0 / (1.0 + (-scratch.shared_gate[t]).exp());
                let phase = phase_of(t).expect("every token lies in a run");
                scratch
                    .work
                    .push(t, &h[t * hidden..(t + 1) * hidden], phase, w);
            }
            expert.add_partial_sums(&mut scratch.work, hidden, acc, threads);
        }
    }
}

/// A token's experts: the `out.len()` best by router logit (ties to the lower index, as
/// torch.topk), best first, each with its softmax probability over all experts, rescaled
/// to sum to 1 over the chosen when `normalise` (as transformers computes it, in f32).
fn route(logits: &[f32], normalise: bool, out: &mut [(usize, f32)]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    for i in 0..out.len() {
        let taken = |e: usize| out[..i].iter().any(|r| r.0 == e);
        let best = (0..logits.len())
            .filter(|&e| !taken(e))
            .reduce(|a, b| if logits[b] > logits[a] { b } else { a })
            .expect("top_k is at most the number of experts");
        out[i] = (best, (logits[best] - max).exp() / total);
    }
    if normalise {
        let sum: f32 = out.iter().map(|r| r.1).sum();
        out.iter_mut().for_each(|r| r.1 /= sum);
    }
}

fn grow<T: Default + Clone>(buf: &mut Vec<T>, len: usize) {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
}
