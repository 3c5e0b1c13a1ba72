//! The Llama family (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm, SmolLM)
//! as one rank's shard: a forward pass that reads top to bottom.

use super::kv_cache::{KvCache, KvDtype, KvLayer};
use crate::comm::Comm;
use crate::kernels::attention::{exp_sum_fn, online_softmax_step, prefetch, KvElem};
use crate::kernels::fixed::from_fixed;
use crate::kernels::threads::DisjointChunks;
use crate::kernels::{ops, Phase, Threads};
use crate::layers::embedding::load_vocab_rows;
use crate::layers::{
    push_run, MergedColumnParallelLinear, MoeScratch, ParallelLmHead, QkvParallelLinear, RmsNorm,
    Rotary, RowParallelLinear, Run, SparseMoe, VocabParallelEmbedding,
};
use crate::loader::config::Activation;
use crate::loader::{ModelConfig, TensorSource};
use crate::shard::{HeadShard, Partition, Stage};
use anyhow::{bail, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Layer {
    input_norm: RmsNorm,
    qkv: QkvParallelLinear,
    /// Qwen3's and Gemma 3's per-head norms of q and k.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Which of the model's rotary embeddings rotates this layer's q and k.
    rotary: usize,
    /// Sliding-window attention: the positions this layer's tokens see.
    window: Option<usize>,
    o_proj: RowParallelLinear,
    /// The norm before the MLP (Llama's post_attention_layernorm; Gemma's
    /// pre_feedforward_layernorm).
    mlp_norm: RmsNorm,
    mlp: Mlp,
    /// Gemma: norms of the attention's and the MLP's outputs before each residual add.
    output_norms: Option<(RmsNorm, RmsNorm)>,
}

/// A layer's feed-forward part.
enum Mlp {
    /// Fused gate/up (column-parallel), SwiGLU, down (row-parallel).
    Dense {
        gate_up: MergedColumnParallelLinear,
        down_proj: RowParallelLinear,
    },
    Experts(Box<SparseMoe>),
}

impl Mlp {
    fn weight_bytes(&self) -> usize {
        match self {
            Mlp::Dense { gate_up, down_proj } => {
                gate_up.linear.weight_bytes() + down_proj.weight_bytes()
            }
            Mlp::Experts(moe) => moe.weight_bytes(),
        }
    }
}

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token.
    All,
    /// Tokens from this index of the chunk on (perplexity scores only the second half).
    From(usize),
    /// None (a prefill chunk that does not end the prompt).
    None,
}

impl Logits {
    /// The chunk positions whose logits are computed, for a chunk of `n` tokens.
    pub fn rows(self, n: usize) -> Result<Range<usize>> {
        match self {
            Logits::Last => Ok(n - 1..n),
            Logits::All => Ok(0..n),
            Logits::From(k) if k < n => Ok(k..n),
            Logits::From(k) => bail!("logits from position {k} asked of a chunk of {n} tokens"),
            Logits::None => Ok(n..n),
        }
    }
}

/// One sequence's part of a step: its new tokens at positions `start_pos..`, its KV block
/// table, and which of its positions need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub blocks: &'a [u32],
    pub logits: Logits,
    /// Prompt tokens (prefill) or generated ones (decode): decides the kernels.
    pub phase: Phase,
}

impl SeqStep<'_> {
    /// `steps` emptied, with a new lifetime and its allocation kept, so that a loop can
    /// build each step's list without allocating (collecting a vector's own iterator into
    /// an element type of the same layout reuses its buffer).
    pub fn recycle<'b>(mut steps: Vec<SeqStep<'_>>) -> Vec<SeqStep<'b>> {
        steps.clear();
        steps.into_iter().map(|_| unreachable!("emptied")).collect()
    }
}

/// The forward pass's two communication optimisations, each switchable so that its gain
/// can be measured (`--disable-overlap`, `--disable-fused-allreduce`); the bits are the
/// same either way. Also the KV cache's type, and how experts are laid out (read at load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Row-parallel products in two halves, the first half's all-reduce in flight while the
    /// second computes.
    pub overlap: bool,
    /// The all-reduced sums join the residual stream in the same pass as the next RMSNorm.
    pub fused_allreduce: bool,
    /// How the KV cache stores keys and values (this one changes the bits: f16 rounds).
    pub kv_dtype: KvDtype,
    /// `--ep-size`: 1, or the tp size for expert parallelism — each rank holds whole
    /// experts (an even share of them) instead of a slice of every expert. Same bits.
    pub ep_size: usize,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            overlap: true,
            fused_allreduce: true,
            kv_dtype: KvDtype::default(),
            ep_size: 1,
        }
    }
}

/// How a model is split: this rank's place in a group of `tp`.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub heads: HeadShard,
    pub mlp: Range<usize>,
    pub vocab: Range<usize>,
    /// A MoE model's split of each expert's neurons.
    pub experts: Option<ExpertShard>,
    /// Columns per fixed-point segment of the row-parallel products; depends on the model
    /// only, never on tp, so every tp sums the same segments.
    pub segment: usize,
}

/// The experts this rank holds, its neurons of each, and of the shared expert: under
/// SGLang's MoE TP every expert split like a dense MLP; under expert parallelism
/// (`--ep-size`) an even share of whole experts (the shared expert split as under TP).
#[derive(Debug, Clone)]
pub struct ExpertShard {
    pub owned: Range<usize>,
    pub expert: Range<usize>,
    pub shared: Range<usize>,
}

/// The largest power of two up to 64 that divides the head size and every MLP width:
/// every rank's o_proj and down_proj columns are then whole segments.
pub fn row_parallel_segment(cfg: &ModelConfig) -> usize {
    let mut widths = vec![cfg.head_dim, cfg.intermediate_size];
    if let Some(m) = &cfg.moe {
        widths.push(m.expert_intermediate_size);
        widths.extend(m.shared_expert_intermediate_size);
    }
    let mut s = 64;
    while s > 1 && !widths.iter().all(|w| w.is_multiple_of(s)) {
        s /= 2;
    }
    s
}

impl ShardPlan {
    /// Rank `rank`'s part of a `tp`-way split, with experts whole on their ranks when
    /// `ep_size` is tp (see [`ForwardOptions::ep_size`]). Splits along a weight's input
    /// dimension (o_proj by heads, down_proj by neurons) fall on the weight's quantization
    /// blocks.
    pub fn new(
        cfg: &ModelConfig,
        src: &dyn TensorSource,
        tp: usize,
        rank: usize,
        ep_size: usize,
    ) -> Result<Self> {
        if ep_size != 1 && ep_size != tp {
            bail!("--ep-size {ep_size} must be 1 or the tp size ({tp}): experts are spread over the tensor-parallel ranks");
        }
        if ep_size > 1 && cfg.moe.is_none() {
            bail!("--ep-size {ep_size} spreads experts over ranks, and this model has none (it is not a mixture of experts)");
        }
        let heads = HeadShard::new(cfg.num_heads, cfg.num_kv_heads, tp, rank)?;
        let o_proj = "model.layers.0.self_attn.o_proj.weight";
        let o_block = src.block_size(o_proj);
        for r in 0..tp {
            let start = HeadShard::new(cfg.num_heads, cfg.num_kv_heads, tp, r)?
                .q_heads
                .start;
            if !(start * cfg.head_dim).is_multiple_of(o_block) {
                bail!(
                    "cannot split {o_proj} over {tp} ranks: rank {r}'s heads start at column {}, \
                     not on its {o_block}-element quantization blocks; choose another --tp",
                    start * cfg.head_dim
                );
            }
        }
        let down = "model.layers.0.mlp.down_proj.weight";
        let segment = row_parallel_segment(cfg);
        let align = lcm(segment, src.block_size(down));
        let mlp = Partition::aligned(cfg.intermediate_size, tp, align, down)?;
        let experts = cfg
            .moe
            .as_ref()
            .map(|m| {
                let block = |name: &str| lcm(segment, src.block_size(name));
                let split = |width: usize, name: &str| {
                    Partition::aligned(width, tp, block(name), name).map(|p| p.range(rank))
                };
                let l = (0..cfg.num_layers).find(|&l| m.is_sparse(l)).unwrap_or(0);
                let expert_down = if m.mixtral_names {
                    format!("model.layers.{l}.block_sparse_moe.experts.0.w2.weight")
                } else {
                    format!("model.layers.{l}.mlp.experts.0.down_proj.weight")
                };
                let shared_down = format!("model.layers.{l}.mlp.shared_expert.down_proj.weight");
                let width = m.expert_intermediate_size;
                Ok::<_, anyhow::Error>(ExpertShard {
                    owned: match ep_size {
                        1 => 0..m.num_experts,
                        _ => Partition::even(m.num_experts, tp).range(rank),
                    },
                    expert: match ep_size {
                        1 => split(width, &expert_down)?,
                        _ => 0..width,
                    },
                    shared: match m.shared_expert_intermediate_size {
                        Some(w) => split(w, &shared_down)?,
                        None => 0..0,
                    },
                })
            })
            .transpose()?;
        Ok(ShardPlan {
            heads,
            mlp: mlp.range(rank),
            vocab: Partition::even(cfg.vocab_size, tp).range(rank),
            experts,
            segment,
        })
    }
}

/// Where a rank sits: its place in its stage's tensor-parallel group of `tp`, how experts
/// are spread (`ep_size`, see [`ForwardOptions::ep_size`]), and its pipeline stage.
#[derive(Debug, Clone)]
pub struct RankPlace {
    pub tp: usize,
    pub rank: usize,
    pub ep_size: usize,
    pub stage: Stage,
}

impl RankPlace {
    /// Rank `rank` of a `tp`-way split of the whole model (no pipeline, no expert parallelism).
    pub fn tensor_parallel(cfg: &ModelConfig, tp: usize, rank: usize) -> Self {
        RankPlace {
            tp,
            rank,
            ep_size: 1,
            stage: Stage::whole(cfg.num_layers),
        }
    }
}

/// One rank's shard of a model: its stage's layers, split tensor-parallel.
pub struct Model {
    cfg: ModelConfig,
    plan: ShardPlan,
    stage: Stage,
    /// On the first stage only.
    embed: Option<VocabParallelEmbedding>,
    layers: Vec<Layer>,
    /// On the last stage only: the final norm and the LM head.
    norm: Option<RmsNorm>,
    lm_head: Option<ParallelLmHead>,
    /// The rotary embeddings: the model's, and Gemma 3's for sliding-window layers.
    rotaries: Vec<Rotary>,
    threads: Threads,
    options: ForwardOptions,
    scratch: Scratch,
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    a / gcd(a, b) * b
}

/// Activation buffers, grown on demand and reused: steady-state decode allocates nothing.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    /// Fixed-point partial sums of the row-parallel products.
    fixed: Vec<i64>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    /// Attention's state per token and query head: one KV block's scores, then the
    /// running max and sum of online softmax ([`ATTENTION_STATE`] + block size floats).
    scores: Vec<f32>,
    /// cos and sin of the rotary angles, per token of the step (`head_dim / 2` each).
    cos: Vec<f32>,
    sin: Vec<f32>,
    logits: Vec<f32>,
    /// Per token of the step: its id, position, cache slot and sequence.
    ids: Vec<u32>,
    positions: Vec<usize>,
    slots: Vec<usize>,
    seq_of: Vec<usize>,
    /// Rows of the step whose logits are wanted.
    logit_rows: Vec<usize>,
    /// The step's tokens, and its logit rows, as runs of one phase.
    runs: Vec<Run>,
    logit_runs: Vec<Run>,
    moe: MoeScratch,
}

fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

impl Model {
    /// Loads the shard of the rank at `place`: its stage's layers, and the embedding and
    /// LM head where its stage has them.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        place: &RankPlace,
        threads: Threads,
        progress: Option<&AtomicUsize>,
    ) -> Result<Self> {
        let plan = ShardPlan::new(cfg, src, place.tp, place.rank, place.ep_size)?;
        let stage = place.stage.clone();
        let hidden = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let vocab_rows =
            |name: &str| load_vocab_rows(src, name, cfg.vocab_size, hidden, plan.vocab.clone());
        let tied = cfg.tie_word_embeddings;
        let table = (stage.is_first() || (stage.is_last() && tied))
            .then(|| vocab_rows("model.embed_tokens.weight"))
            .transpose()?;
        let lm_head = match (stage.is_last(), &table) {
            (false, _) => None,
            // Shared with this rank's embedding (counted once) on a first and last stage.
            (true, Some(table)) if tied => Some(ParallelLmHead::new(
                table.clone(),
                plan.vocab.clone(),
                stage.is_first(),
            )),
            (true, _) => Some(ParallelLmHead::new(
                vocab_rows("lm_head.weight")?,
                plan.vocab.clone(),
                false,
            )),
        };
        let embed = table
            .filter(|_| stage.is_first())
            .map(|t| VocabParallelEmbedding::new(t, plan.vocab.clone()));
        let d = cfg.head_dim;
        let heads = &plan.heads;
        let mut layers = Vec::with_capacity(stage.layers.len());
        for l in stage.layers.clone() {
            let p = format!("model.layers.{l}");
            let attn = format!("{p}.self_attn");
            // Gemma's checkpoints store norms as offsets from 1.
            let qk_norm = |which: &str| -> Result<Option<RmsNorm>> {
                let load = || {
                    let n = RmsNorm::load(src, &format!("{attn}.{which}.weight"), d, eps)?;
                    Ok(if cfg.norm_weight_offset {
                        n.with_unit_offset()
                    } else {
                        n
                    })
                };
                cfg.qk_norm.then(load).transpose()
            };
            let norm = |name: &str| -> Result<RmsNorm> {
                let n = RmsNorm::load(src, &format!("{p}.{name}.weight"), hidden, eps)?;
                Ok(if cfg.norm_weight_offset {
                    n.with_unit_offset()
                } else {
                    n
                })
            };
            let (mlp_norm, output_norms) = if cfg.gemma_norms {
                let outputs = (
                    norm("post_attention_layernorm")?,
                    norm("post_feedforward_layernorm")?,
                );
                (norm("pre_feedforward_layernorm")?, Some(outputs))
            } else {
                (norm("post_attention_layernorm")?, None)
            };
            layers.push(Layer {
                input_norm: norm("input_layernorm")?,
                qkv: QkvParallelLinear::load(src, &attn, cfg, heads)?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
                rotary: usize::from(cfg.rope_of(l) != &cfg.rope),
                window: cfg.window_of(l),
                o_proj: RowParallelLinear::load(
                    src,
                    &format!("{attn}.o_proj"),
                    hidden,
                    cfg.num_heads * d,
                    heads.q_heads.start * d..heads.q_heads.end * d,
                    plan.segment,
                )?,
                mlp_norm,
                mlp: Self::load_mlp(src, cfg, &plan, l)?,
                output_norms,
            });
            if let Some(p) = progress {
                p.fetch_add(1, Ordering::Relaxed);
            }
        }
        let norm = || -> Result<RmsNorm> {
            let n = RmsNorm::load(src, "model.norm.weight", hidden, eps)?;
            Ok(if cfg.norm_weight_offset {
                n.with_unit_offset()
            } else {
                n
            })
        };
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            norm: stage.is_last().then(norm).transpose()?,
            lm_head,
            stage,
            rotaries: std::iter::once(&cfg.rope)
                .chain(&cfg.local_rope)
                .map(|rope| Rotary::new(d, rope))
                .collect(),
            layers,
            plan,
            threads,
            options: ForwardOptions::default(),
            scratch: Scratch::default(),
        })
    }

    /// Layer `l`'s MLP: dense, or this rank's share of every expert.
    fn load_mlp(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        plan: &ShardPlan,
        l: usize,
    ) -> Result<Mlp> {
        let p = format!("model.layers.{l}");
        let hidden = cfg.hidden_size;
        if let Some(moe) = cfg.moe.as_ref().filter(|m| m.is_sparse(l)) {
            let experts = plan
                .experts
                .as_ref()
                .expect("a MoE model's plan splits its experts");
            return Ok(Mlp::Experts(Box::new(SparseMoe::load(
                src,
                &p,
                moe,
                hidden,
                experts,
                plan.segment,
            )?)));
        }
        let inter = cfg.intermediate_size;
        Ok(Mlp::Dense {
            gate_up: MergedColumnParallelLinear::load(
                src,
                [&format!("{p}.mlp.gate_proj"), &format!("{p}.mlp.up_proj")],
                inter,
                hidden,
                plan.mlp.clone(),
            )?,
            down_proj: RowParallelLinear::load(
                src,
                &format!("{p}.mlp.down_proj"),
                hidden,
                inter,
                plan.mlp.clone(),
                plan.segment,
            )?,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    pub fn set_options(&mut self, options: ForwardOptions) {
        self.options = options;
    }

    /// Bytes of weights this rank holds (a tied table counted once).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.input_norm.weight_bytes()
                    + l.qkv.linear.weight_bytes()
                    + l.q_norm.as_ref().map_or(0, RmsNorm::weight_bytes)
                    + l.k_norm.as_ref().map_or(0, RmsNorm::weight_bytes)
                    + l.o_proj.weight_bytes()
                    + l.mlp_norm.weight_bytes()
                    + l.mlp.weight_bytes()
                    + l.output_norms
                        .as_ref()
                        .map_or(0, |(a, b)| a.weight_bytes() + b.weight_bytes())
            })
            .sum();
        layers
            + self.embed.as_ref().map_or(0, |e| e.weight_bytes())
            + self.norm.as_ref().map_or(0, RmsNorm::weight_bytes)
            + self.lm_head.as_ref().map_or(0, |h| h.weight_bytes())
    }

    /// Bytes of weights one decode step streams from memory: all of them but an embedding
    /// table that is not also this rank's LM head, of which a step reads one row per token.
    pub fn decode_read_bytes(&self) -> usize {
        let embedding_only = match (&self.embed, &self.lm_head) {
            (Some(_), Some(head)) if head.tied => 0,
            (Some(e), _) => e.weight_bytes(),
            (None, _) => 0,
        };
        self.weight_bytes() - embedding_only
    }

    /// Bytes this rank's KV cache takes per position.
    pub fn kv_bytes_per_token(&self) -> usize {
        let kv_heads = self.plan.heads.num_kv();
        let all_layers = self
            .cfg
            .kv_bytes_per_token(kv_heads, self.options.kv_dtype.bytes());
        all_layers / self.cfg.num_layers * self.layers.len()
    }

    /// This rank's pipeline stage.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// An empty KV cache of `num_blocks` blocks of `block_size` positions, for this rank's
    /// kv heads. Attention's state is sized for one token per block at once: a decode
    /// step (one token per sequence, each holding a block) never needs more, so decode
    /// never allocates it.
    pub fn new_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        let kv = KvCache::new(
            self.layers.len(),
            self.plan.heads.num_kv(),
            self.cfg.head_dim,
            num_blocks,
            block_size,
            self.options.kv_dtype,
        )?;
        grow(
            &mut self.scratch.scores,
            self.plan.heads.num_q() * num_blocks * (block_size + ATTENTION_STATE),
        );
        Ok(kv)
    }

    /// Runs one step of this rank's stage — the new tokens of every sequence in `seqs`, as
    /// one batch, so each weight is read once for all of them — appending their keys and
    /// values to `kv`. The first stage starts from the tokens; the others from `hidden`,
    /// the previous stage's output. The last stage returns this rank's logits (its vocab
    /// range) for the positions asked, sequence after sequence: `[positions ×
    /// vocab_local]`; the others their hidden states, `[tokens × hidden]`.
    pub fn forward(
        &mut self,
        seqs: &[SeqStep],
        kv: &mut KvCache,
        comm: &mut dyn Comm,
        hidden_in: Option<&[f32]>,
    ) -> Result<&[f32]> {
        let cfg = &self.cfg;
        let (hidden, d) = (cfg.hidden_size, cfg.head_dim);
        let heads = &self.plan.heads;
        let (nq, nkv) = (heads.num_q(), heads.num_kv());
        let s = &mut self.scratch;
        s.ids.clear();
        s.positions.clear();
        s.slots.clear();
        s.seq_of.clear();
        s.logit_rows.clear();
        s.runs.clear();
        s.logit_runs.clear();
        for (i, seq) in seqs.iter().enumerate() {
            let end = seq.start_pos + seq.tokens.len();
            if end > seq.blocks.len() * kv.block_size() {
                bail!(
                    "{end} positions exceed the sequence's {} KV blocks of {}",
                    seq.blocks.len(),
                    kv.block_size()
                );
            }
            if let Some(&b) = seq.blocks.iter().find(|&&b| b as usize >= kv.num_blocks()) {
                bail!(
                    "KV block {b} is outside the cache of {} blocks",
                    kv.num_blocks()
                );
            }
            let first_row = s.ids.len();
            let logit_rows = seq.logits.rows(seq.tokens.len())?;
            push_run(&mut s.logit_runs, logit_rows.len(), seq.phase);
            push_run(&mut s.runs, seq.tokens.len(), seq.phase);
            for r in logit_rows {
                s.logit_rows.push(first_row + r);
            }
            for (t, &id) in seq.tokens.iter().enumerate() {
                let pos = seq.start_pos + t;
                s.ids.push(id);
                s.positions.push(pos);
                s.slots.push(kv.slot(seq.blocks, pos));
                s.seq_of.push(i);
            }
        }
        let n = s.ids.len();
        if n == 0 {
            bail!("a forward pass needs at least one token");
        }
        let qkv_width = nq * d + 2 * nkv * d;
        let mlp_width = self.plan.mlp.len();
        grow(&mut s.x, n * hidden);
        grow(&mut s.h, n * hidden);
        grow(&mut s.o, n * hidden);
        if s.fixed.len() < n * hidden {
            s.fixed.resize(n * hidden, 0);
        }
        grow(&mut s.qkv, n * qkv_width);
        grow(&mut s.attn, n * nq * d);
        grow(&mut s.gate_up, n * 2 * mlp_width);
        grow(&mut s.act, n * mlp_width);
        grow(&mut s.scores, n * nq * (kv.block_size() + ATTENTION_STATE));
        // Rotary angles once per step: table r's token t at (r·n + t)·d/2.
        let half = d / 2;
        grow(&mut s.cos, self.rotaries.len() * n * half);
        grow(&mut s.sin, self.rotaries.len() * n * half);
        for (r, rotary) in self.rotaries.iter().enumerate() {
            for (t, &pos) in s.positions.iter().enumerate() {
                let at = (r * n + t) * half..(r * n + t + 1) * half;
                rotary.cos_sin(pos, &mut s.cos[at.clone()], &mut s.sin[at]);
            }
        }

        let nh = n * hidden;
        match (&self.embed, hidden_in) {
            (Some(embed), None) => {
                embed.forward(&s.ids, &mut s.x, comm)?;
                if self.cfg.gemma_norms {
                    let scale = (hidden as f64).sqrt() as f32;
                    s.x[..nh].iter_mut().for_each(|v| *v *= scale);
                }
            }
            (None, Some(h)) if h.len() == nh => s.x[..nh].copy_from_slice(h),
            (None, Some(h)) => bail!(
                "stage {} received {} hidden values for {n} tokens of {hidden}",
                self.stage.index,
                h.len()
            ),
            (Some(_), Some(_)) | (None, None) => {
                bail!(
                    "stage {} was started from the wrong input",
                    self.stage.index
                )
            }
        }

        let ForwardOptions {
            overlap,
            fused_allreduce: fused,
            ..
        } = self.options;
        // Gemma's output norms come between the all-reduce and the residual add.
        let fused = fused && !self.cfg.gemma_norms;
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention: norm, fused qkv, per-head norms and rotary, cache, attend, o_proj.
            // (Fused: the previous layer's last all-reduce computed this norm already.)
            if l == 0 || !fused {
                layer.input_norm.forward(&s.x[..nh], &mut s.h[..nh]);
            }
            layer
                .qkv
                .linear
                .forward(&s.h, &s.runs, &mut s.qkv, &self.threads);
            for t in 0..n {
                let at = (layer.rotary * n + t) * half..(layer.rotary * n + t + 1) * half;
                let (cos, sin) = (&s.cos[at.clone()], &s.sin[at]);
                let row = &mut s.qkv[t * qkv_width..(t + 1) * qkv_width];
                let (q, kvs) = row.split_at_mut(nq * d);
                let (k, v) = kvs.split_at_mut(nkv * d);
                if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                    qn.forward_in_place(q);
                    kn.forward_in_place(k);
                }
                for head in q.chunks_exact_mut(d).chain(k.chunks_exact_mut(d)) {
                    ops::rope_in_place(head, cos, sin);
                }
                kv.store(l, s.slots[t], k, v);
            }
            let batch = Batch {
                seqs,
                positions: &s.positions,
                seq_of: &s.seq_of,
                block_size: kv.block_size(),
                window: layer.window,
                scale: self.cfg.query_scale,
                softcap: self.cfg.attn_softcap,
            };
            let (qkv, scores, attn) = (&s.qkv, &mut s.scores, &mut s.attn);
            let threads = &self.threads;
            // One attention per stored type.
            macro_rules! attend_rows {
                ($($kind:ident),*) => {
                    match kv.layer(l) {
                        $(KvLayer::$kind(k, v) => {
                            attend(heads, d, qkv, qkv_width, &batch, (k, v), scores, attn, threads)
                        })*
                    }
                };
            }
            attend_rows!(F32, F16, BF16);
            layer
                .o_proj
                .forward(&s.attn, &s.runs, &mut s.fixed, &self.threads, comm, overlap)?;
            // The residual add, and the MLP's norm.
            let norm = &layer.mlp_norm;
            if let Some((after_attention, _)) = &layer.output_norms {
                add_normed_sums(
                    &mut s.x[..nh],
                    &s.fixed[..nh],
                    after_attention,
                    &mut s.o[..nh],
                );
                norm.forward(&s.x[..nh], &mut s.h[..nh]);
            } else if fused {
                norm.add_fixed_forward(&mut s.x[..nh], &s.fixed[..nh], &mut s.h[..nh]);
            } else {
                add_sums_apart(&mut s.x[..nh], &s.fixed[..nh], &mut s.o[..nh]);
                norm.forward(&s.x[..nh], &mut s.h[..nh]);
            }

            match &layer.mlp {
                Mlp::Dense { gate_up, down_proj } => {
                    gate_up
                        .linear
                        .forward(&s.h, &s.runs, &mut s.gate_up, &self.threads);
                    for t in 0..n {
                        let gu = &s.gate_up[t * 2 * mlp_width..(t + 1) * 2 * mlp_width];
                        let (gate, up) = gu.split_at(mlp_width);
                        let act = &mut s.act[t * mlp_width..(t + 1) * mlp_width];
                        match self.cfg.activation {
                            Activation::Silu => ops::silu_mul(gate, up, act),
                            Activation::GeluTanh => ops::gelu_tanh_mul(gate, up, act),
                        }
                    }
                    down_proj.forward(
                        &s.act,
                        &s.runs,
                        &mut s.fixed,
                        &self.threads,
                        comm,
                        overlap,
                    )?;
                }
                Mlp::Experts(moe) => {
                    let h = &s.h[..nh];
                    moe.partial_sums(h, &s.runs, &mut s.fixed, &mut s.moe, &self.threads);
                    comm.all_reduce_sum_i64(&mut s.fixed[..nh])?;
                }
            }
            match (self.layers.get(l + 1), &layer.output_norms) {
                (_, Some((_, after_mlp))) => {
                    add_normed_sums(&mut s.x[..nh], &s.fixed[..nh], after_mlp, &mut s.o[..nh])
                }
                (Some(next), None) if fused => {
                    let norm = &next.input_norm;
                    norm.add_fixed_forward(&mut s.x[..nh], &s.fixed[..nh], &mut s.h[..nh]);
                }
                _ => add_sums_apart(&mut s.x[..nh], &s.fixed[..nh], &mut s.o[..nh]),
            }
        }

        let (Some(norm), Some(lm_head)) = (&self.norm, &self.lm_head) else {
            return Ok(&s.x[..nh]);
        };
        let m = s.logit_rows.len();
        for (i, &r) in s.logit_rows.iter().enumerate() {
            norm.forward(
                &s.x[r * hidden..(r + 1) * hidden],
                &mut s.h[i * hidden..(i + 1) * hidden],
            );
        }
        let vocab_local = self.plan.vocab.len();
        grow(&mut s.logits, m * vocab_local);
        if m > 0 {
            lm_head.forward(&s.h, &s.logit_runs, &mut s.logits, &self.threads);
            if let Some(cap) = self.cfg.final_softcap {
                ops::softcap_in_place(&mut s.logits[..m * vocab_local], cap);
            }
        }
        Ok(&s.logits[..m * vocab_local])
    }
}

/// `x += norm(sums)`: Gemma's output norm between the all-reduce and the residual add.
fn add_normed_sums(x: &mut [f32], sums: &[i64], norm: &RmsNorm, scratch: &mut [f32]) {
    sums_to_f32(sums, scratch);
    norm.forward_in_place(scratch);
    ops::add_in_place(x, scratch);
}

/// `x += sums` unfused: the sums converted to f32 in `scratch`, then added (what fused
/// all-reduce saves a pass of).
fn add_sums_apart(x: &mut [f32], sums: &[i64], scratch: &mut [f32]) {
    sums_to_f32(sums, scratch);
    ops::add_in_place(x, scratch);
}

fn sums_to_f32(sums: &[i64], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(sums) {
        *o = from_fixed(v);
    }
}

/// Where each token of a step sits: its sequence (for the block table) and position.
struct Batch<'a> {
    seqs: &'a [SeqStep<'a>],
    positions: &'a [usize],
    seq_of: &'a [usize],
    block_size: usize,
    /// Sliding-window attention: a token sees only the last `window` positions.
    window: Option<usize>,
    /// Scores are q·k times `scale`, then soft-capped (Gemma 2) when `softcap` is set.
    scale: f32,
    softcap: Option<f32>,
}

/// Floats of attention state per (token, query head) besides one block's scores: the
/// running max and sum of online softmax.
const ATTENTION_STATE: usize = 2;

/// Causal attention of every token of the step over its own sequence's cached positions,
/// one (token, local kv head) per unit: each cached key and value row is read once for all
/// the query heads that share it (GQA), and every head is computed exactly as alone. Block
/// by block with online softmax, so its state does not grow with the context.
#[allow(clippy::too_many_arguments)]
fn attend<'a, T: KvElem>(
    heads: &HeadShard,
    d: usize,
    qkv: &[f32],
    qkv_width: usize,
    batch: &Batch,
    (keys, values): (&'a [T], &'a [T]),
    state: &mut [f32],
    out: &mut [f32],
    threads: &Threads,
) {
    let n = batch.positions.len();
    let (nq, nkv) = (heads.num_q(), heads.num_kv());
    let bs = batch.block_size;
    let (score, weighted_sum, exp_sum) = (T::scores_fn(), T::weighted_sum_fn(), exp_sum_fn());
    let state = DisjointChunks::new(
        &mut state[..n * nq * (bs + ATTENTION_STATE)],
        bs + ATTENTION_STATE,
    );
    let out = DisjointChunks::new(&mut out[..n * nq * d], d);
    threads.for_each_range(n * nkv, |units| {
        for u in units {
            let (t, k) = (balanced_token(u / nkv, n), u % nkv);
            let seen = batch.positions[t] + 1;
            let blocks = &batch.seqs[batch.seq_of[t]].blocks[..seen.div_ceil(bs)];
            // Block b's rows of this kv head: positions b·bs.., one after another.
            let rows = |cache: &'a [T], b: usize| {
                let n = (seen - b * bs).min(bs);
                let at = (blocks[b] as usize * nkv + k) * bs * d;
                (b * bs..b * bs + n, &cache[at..at + n * d])
            };
            let prefetch_block = |b: usize| {
                if b < blocks.len() {
                    prefetch(rows(keys, b).1);
                    prefetch(rows(values, b).1);
                }
            };
            let q = |i: usize| &qkv[t * qkv_width + i * d..t * qkv_width + (i + 1) * d];
            let sharing = heads.local_q_for(k);
            // SAFETY: unit u's heads, their state and outputs, belong to one thread only.
            let head = |i: usize| unsafe { (state.chunk(t * nq + i), out.chunk(t * nq + i)) };
            for i in sharing.clone() {
                let (st, o) = head(i);
                st[bs..].copy_from_slice(&[f32::NEG_INFINITY, 0.0]);
                o.fill(0.0);
            }
            // Positions before `lo` are outside the window: their blocks are not read,
            // and in the block holding `lo` they weigh exactly zero.
            let lo = batch.window.map_or(0, |w| seen.saturating_sub(w));
            prefetch_block(lo / bs);
            for b in lo / bs..blocks.len() {
                prefetch_block(b + 1);
                let ((at, keys), (_, values)) = (rows(keys, b), rows(values, b));
                for i in sharing.clone() {
                    let (st, o) = head(i);
                    let (scores, running) = st.split_at_mut(bs);
                    let scores = &mut scores[..at.len()];
                    score(q(i), keys, d, batch.scale, scores);
                    if let Some(cap) = batch.softcap {
                        ops::softcap_in_place(scores, cap);
                    }
                    scores[..lo.saturating_sub(at.start)].fill(f32::NEG_INFINITY);
                    let [max, sum] = running else { unreachable!() };
                    if online_softmax_step(exp_sum, scores, max, sum, o) {
                        weighted_sum(scores, values, d, o);
                    }
                }
            }
            for i in sharing {
                let (st, o) = head(i);
                let inv = 1.0 / st[bs + 1];
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    });
}

/// The `j`-th token to attend, in an order that alternates the step's first and last
/// tokens: in a causal prompt chunk later tokens see more positions, and the pool splits
/// units into contiguous ranges, so this gives every thread about the same work.
fn balanced_token(j: usize, n: usize) -> usize {
    if j.is_multiple_of(2) {
        j / 2
    } else {
        n - 1 - j / 2
    }
}
