//! How many devices a model needs and how fast it will decode: a memory and communication
//! model computed from the model's own config, with the engine's own split (uneven heads,
//! kv replication, block alignment) — [`ShardPlan`], not a re-derivation.

pub mod layouts;

use crate::kernels::{QuantType, Storage};
use crate::loader::{ModelConfig, TensorSource};
use crate::model::ShardPlan;
use crate::shard::Stage;
use anyhow::{anyhow, bail, Result};
use std::ops::Range;

/// Named model configurations (public Hugging Face configs), kept in `presets/`.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "llama-3.2-1b",
        include_str!("../../presets/llama-3.2-1b.json"),
    ),
    (
        "llama-3.1-8b",
        include_str!("../../presets/llama-3.1-8b.json"),
    ),
    (
        "llama-2-13b",
        include_str!("../../presets/llama-2-13b.json"),
    ),
    (
        "codellama-34b",
        include_str!("../../presets/codellama-34b.json"),
    ),
    (
        "llama-3.1-70b",
        include_str!("../../presets/llama-3.1-70b.json"),
    ),
    (
        "llama-3.1-405b",
        include_str!("../../presets/llama-3.1-405b.json"),
    ),
    ("qwen2.5-7b", include_str!("../../presets/qwen2.5-7b.json")),
    (
        "qwen2.5-72b",
        include_str!("../../presets/qwen2.5-72b.json"),
    ),
    ("mistral-7b", include_str!("../../presets/mistral-7b.json")),
    ("gemma-2-2b", include_str!("../../presets/gemma-2-2b.json")),
    ("gemma-3-1b", include_str!("../../presets/gemma-3-1b.json")),
    ("phi-3-mini", include_str!("../../presets/phi-3-mini.json")),
    (
        "mixtral-8x7b",
        include_str!("../../presets/mixtral-8x7b.json"),
    ),
    (
        "qwen1.5-moe-a2.7b",
        include_str!("../../presets/qwen1.5-moe-a2.7b.json"),
    ),
    (
        "qwen3-30b-a3b",
        include_str!("../../presets/qwen3-30b-a3b.json"),
    ),
];

pub fn preset(name: &str) -> Result<ModelConfig> {
    let (_, json) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
        anyhow!("unknown preset `{name}`; presets are {}", names.join(", "))
    })?;
    ModelConfig::from_hf_json(&serde_json::from_str(json)?)
}

/// The format weights are planned in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// As the model file stores them (presets: bf16).
    AsIs,
    Bf16,
    Fp8,
    Q8_0,
    Q4_0,
}

impl WeightDtype {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "as-is" => WeightDtype::AsIs,
            "bf16" => WeightDtype::Bf16,
            "fp8" => WeightDtype::Fp8,
            "q8_0" => WeightDtype::Q8_0,
            "q4_0" => WeightDtype::Q4_0,
            other => bail!("--weight-dtype {other} is not one of bf16, fp8, q8_0, q4_0, as-is"),
        })
    }

    /// (elements, bytes) per block.
    fn block(self) -> (usize, usize) {
        match self {
            WeightDtype::AsIs | WeightDtype::Bf16 => (1, 2),
            WeightDtype::Fp8 => (1, 1),
            WeightDtype::Q8_0 => (QuantType::Q8_0.block_elems(), QuantType::Q8_0.block_bytes()),
            WeightDtype::Q4_0 => (QuantType::Q4_0.block_elems(), QuantType::Q4_0.block_bytes()),
        }
    }
}

/// A model's tensors by shape and format only: what a rank would hold, without weights.
pub struct ShapeSource {
    cfg: ModelConfig,
    dtype: WeightDtype,
}

impl ShapeSource {
    pub fn new(cfg: ModelConfig, dtype: WeightDtype) -> Self {
        ShapeSource { cfg, dtype }
    }
}

impl TensorSource for ShapeSource {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.cfg;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (q, kv, i) = (c.num_heads * d, c.num_kv_heads * d, c.intermediate_size);
        let tail = name.rsplit('.').nth(1)?;
        let is_bias = name.ends_with(".bias");
        Some(match (tail, is_bias) {
            ("embed_tokens", _) => vec![c.vocab_size, h],
            ("lm_head", _) if !c.tie_word_embeddings => vec![c.vocab_size, h],
            ("q_proj", false) => vec![q, h],
            ("q_proj", true) => vec![q],
            ("k_proj" | "v_proj", false) => vec![kv, h],
            ("k_proj" | "v_proj", true) => vec![kv],
            ("o_proj", _) => vec![h, q],
            ("gate_proj" | "up_proj", _) => vec![i, h],
            ("down_proj", _) => vec![h, i],
            ("q_norm" | "k_norm", _) => vec![d],
            ("input_layernorm" | "post_attention_layernorm" | "norm", _) => vec![h],
            _ => return None,
        })
    }

    fn block_size(&self, _name: &str) -> usize {
        self.dtype.block().0
    }

    fn slice_bytes(&self, _name: &str, rows: usize, cols: usize) -> Result<usize> {
        let (elems, bytes) = self.dtype.block();
        Ok(rows * cols.div_ceil(elems) * bytes)
    }

    fn read_block(&self, name: &str, _rows: Range<usize>, _cols: Range<usize>) -> Result<Storage> {
        bail!("`{name}`: a planned model has shapes but no weights")
    }
}

/// Bytes of weights rank `rank` of `tp` holds, exactly as the engine loads them: its slices
/// in their stored format, norms and biases as f32, a tied table once.
pub fn weight_bytes(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    tp: usize,
    rank: usize,
) -> Result<RankWeights> {
    stage_weights(cfg, src, tp, rank, &Stage::whole(cfg.num_layers))
}

/// A rank's weight bytes, and how many of them are routed experts'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RankWeights {
    pub total: usize,
    pub routed: usize,
}

impl RankWeights {
    /// Bytes a decode step of `batch` tokens reads: all but the routed experts, and of
    /// each expert its share times the chance that one of the tokens picks it,
    /// 1 − (1 − top_k / experts)^batch (routing taken as uniform).
    pub fn read_per_step(&self, cfg: &ModelConfig, batch: usize) -> usize {
        let Some(m) = &cfg.moe else {
            return self.total;
        };
        let missed = (1.0 - m.top_k as f64 / m.num_experts as f64).powi(batch as i32);
        self.total - (self.routed as f64 * missed) as usize
    }
}

/// The same for rank `rank` of a pipeline stage: its layers, the embedding on the first
/// stage, the final norm and LM head on the last (a tied table on both when they differ).
pub fn stage_weights(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    tp: usize,
    rank: usize,
    stage: &Stage,
) -> Result<RankWeights> {
    let plan = ShardPlan::new(cfg, src, tp, rank, 1)?;
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (q_rows, kv_rows) = (plan.heads.num_q() * d, plan.heads.num_kv() * d);
    let vocab = plan.vocab.len();
    let f32s = |n: usize| n * 4;
    let table = src.slice_bytes("model.embed_tokens.weight", vocab, h)?;
    let mut total = if stage.is_first() { table } else { 0 };
    let mut routed = 0;
    if stage.is_last() {
        total += f32s(h);
        total += match (cfg.tie_word_embeddings, stage.is_first()) {
            (true, true) => 0,
            (true, false) => table,
            (false, _) => src.slice_bytes("lm_head.weight", vocab, h)?,
        };
    }
    for l in stage.layers.clone() {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        // Norms: before attention and MLP, and Gemma's after each.
        total += f32s(if cfg.gemma_norms { 4 * h } else { 2 * h });
        total += src.slice_bytes(&format!("{a}.q_proj.weight"), q_rows, h)?;
        total += src.slice_bytes(&format!("{a}.k_proj.weight"), kv_rows, h)?;
        total += src.slice_bytes(&format!("{a}.v_proj.weight"), kv_rows, h)?;
        if cfg.qkv_bias {
            total += f32s(q_rows + 2 * kv_rows);
        }
        if cfg.qk_norm {
            total += f32s(2 * d);
        }
        total += src.slice_bytes(&format!("{a}.o_proj.weight"), h, q_rows)?;
        let mlp = mlp_bytes(cfg, src, &plan, l)?;
        total += mlp.total;
        routed += mlp.routed;
    }
    Ok(RankWeights { total, routed })
}

/// Bytes of layer `l`'s MLP on a rank with `plan`: its neurons of the dense MLP, or of
/// every expert (routed) and the shared one plus the replicated router.
fn mlp_bytes(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    plan: &ShardPlan,
    l: usize,
) -> Result<RankWeights> {
    let h = cfg.hidden_size;
    let p = format!("model.layers.{l}");
    let three = |prefix: &str, [gate, up, down]: [&str; 3], m: usize| -> Result<usize> {
        Ok(src.slice_bytes(&format!("{prefix}.{gate}.weight"), m, h)?
            + src.slice_bytes(&format!("{prefix}.{up}.weight"), m, h)?
            + src.slice_bytes(&format!("{prefix}.{down}.weight"), h, m)?)
    };
    let qwen = ["gate_proj", "up_proj", "down_proj"];
    let (Some(moe), Some(shard)) = (cfg.moe.as_ref().filter(|m| m.is_sparse(l)), &plan.experts)
    else {
        let total = three(&format!("{p}.mlp"), qwen, plan.mlp.len())?;
        return Ok(RankWeights { total, routed: 0 });
    };
    let (block, names) = if moe.mixtral_names {
        ("block_sparse_moe", ["w1", "w3", "w2"])
    } else {
        ("mlp", qwen)
    };
    let mut routed = 0;
    for e in shard.owned.clone() {
        routed += three(
            &format!("{p}.{block}.experts.{e}"),
            names,
            shard.expert.len(),
        )?;
    }
    let mut total =
        routed + src.slice_bytes(&format!("{p}.{block}.gate.weight"), moe.num_experts, h)?;
    if moe.shared_expert_intermediate_size.is_some() {
        total += three(&format!("{p}.mlp.shared_expert"), qwen, shard.shared.len())?;
        total += src.slice_bytes(&format!("{p}.mlp.shared_expert_gate.weight"), 1, h)?;
    }
    Ok(RankWeights { total, routed })
}

/// KV cache bytes per token on rank `rank` of `tp`, with `elem_bytes` per stored value.
pub fn kv_bytes_per_token(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    tp: usize,
    rank: usize,
    elem_bytes: usize,
) -> Result<usize> {
    let kv_heads = ShardPlan::new(cfg, src, tp, rank, 1)?.heads.num_kv();
    Ok(2 * cfg.num_layers * kv_heads * cfg.head_dim * elem_bytes)
}

/// What connects the devices, and how fast each device reads its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub name: String,
    /// Fixed cost of one all-reduce, µs.
    pub latency_us: f64,
    /// Link bandwidth, GB/s.
    pub gbps: f64,
    /// Each device's memory read bandwidth, GB/s.
    pub memory_gbps: f64,
}

impl Link {
    /// `nvlink`, `pcie`, `ethernet`, `shared-memory` or `custom:LAT_US,GBPS`.
    pub fn parse(s: &str) -> Result<Self> {
        let (latency_us, gbps, memory_gbps) = match s {
            "nvlink" => (5.0, 300.0, 2000.0),
            "pcie" => (50.0, 25.0, 1000.0),
            "ethernet" => (50.0, 3.125, 100.0),
            "shared-memory" => (1.0, 20.0, 20.0),
            custom => {
                let spec = custom.strip_prefix("custom:").ok_or_else(|| {
                    anyhow!("--link {custom} is not one of nvlink, pcie, ethernet, shared-memory, custom:LAT_US,GBPS")
                })?;
                let (lat, bw) = spec.split_once(',').ok_or_else(|| {
                    anyhow!("--link custom:LAT_US,GBPS needs both numbers, e.g. custom:20,12.5")
                })?;
                let num = |v: &str| {
                    v.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| anyhow!("`{v}` in --link {custom} is not a positive number"))
                };
                (num(lat)?, num(bw)?, 100.0)
            }
        };
        Ok(Link {
            name: s.to_owned(),
            latency_us,
            gbps,
            memory_gbps,
        })
    }

    /// Seconds for one all-reduce of `bytes` over `n` devices (ring: 2(n−1)/n of the data
    /// crosses each link, plus the fixed cost).
    pub fn all_reduce_s(&self, n: usize, bytes: usize) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        self.latency_us * 1e-6 + 2.0 * (n - 1) as f64 / n as f64 * bytes as f64 / (self.gbps * 1e9)
    }
}

/// A byte count such as `24GiB`, `80GB`, `512MiB`, `16G` (binary), or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| anyhow!("`{s}` is not a memory size like 24GiB, 80GB or 512MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        other => bail!("`{other}` in `{s}` is not a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
    };
    if value <= 0.0 {
        bail!("a memory size must be positive, got `{s}`");
    }
    Ok((value * scale) as u64)
}

/// What to plan for.
pub struct PlanRequest<'a> {
    pub cfg: &'a ModelConfig,
    pub src: &'a dyn TensorSource,
    pub device_memory: u64,
    pub devices: Vec<usize>,
    pub context_length: usize,
    pub batch_size: usize,
    pub link: Link,
    /// Bytes per KV value (tpserve: 4, f32).
    pub kv_bytes: usize,
    /// Bytes per all-reduced activation (tpserve: 8, fixed-point i64).
    pub comm_bytes: usize,
}

/// Memory not planned for weights or KV: activations, buffers, the runtime.
pub const HEADROOM: f64 = 0.10;

#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanRow {
    pub tp: usize,
    /// The most any rank holds (uneven splits and replicated kv heads included).
    pub weight_bytes_per_rank: usize,
    pub kv_bytes_per_token_per_rank: usize,
    /// Tokens of KV cache that fit next to the weights (heaviest rank).
    pub kv_tokens_fit: usize,
    pub fits: bool,
    pub comm_bytes_per_token_per_layer: usize,
    pub comm_bytes_per_token: usize,
    pub all_reduce_us_per_token: f64,
    pub decode_ms_per_step: f64,
    pub tokens_per_s: f64,
    pub tokens_per_s_per_device: f64,
    pub speedup: f64,
    pub efficiency: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// The smallest tp that fits with headroom.
    pub recommended_tp: Option<usize>,
    /// The fitting tp with the most tokens/s per device.
    pub best_tp: Option<usize>,
    pub rows: Vec<PlanRow>,
}

pub fn plan(req: &PlanRequest) -> Result<Plan> {
    let cfg = req.cfg;
    let usable = req.device_memory as f64 * (1.0 - HEADROOM);
    let step = |tp: usize, weights: RankWeights, kv: usize| {
        // Decode is memory-bound: a step reads the rank's weights (of a mixture of experts,
        // those its tokens are routed to) and its share of the KV cache, then does two
        // all-reduces per layer of hidden × batch activations.
        let bytes =
            weights.read_per_step(cfg, req.batch_size) + kv * req.context_length * req.batch_size;
        let memory_s = bytes as f64 / (req.link.memory_gbps * 1e9);
        let per_all_reduce = cfg.hidden_size * req.batch_size * req.comm_bytes;
        let comm_s = 2.0 * cfg.num_layers as f64 * req.link.all_reduce_s(tp, per_all_reduce);
        (memory_s + comm_s, comm_s)
    };
    let heaviest = |tp: usize| -> Result<(RankWeights, usize)> {
        let mut worst = (RankWeights::default(), 0);
        for rank in 0..tp {
            let w = weight_bytes(cfg, req.src, tp, rank)?;
            let kv = kv_bytes_per_token(cfg, req.src, tp, rank, req.kv_bytes)?;
            if w.total + kv > worst.0.total + worst.1 {
                worst = (w, kv);
            }
        }
        Ok(worst)
    };
    let (w1, kv1) = heaviest(1)?;
    let (base_s, _) = step(1, w1, kv1);
    let mut rows = Vec::new();
    for &tp in &req.devices {
        let (weights, kv) = heaviest(tp)?;
        let needed = weights.total as f64 + (kv * req.context_length * req.batch_size) as f64;
        let kv_tokens_fit = ((usable - weights.total as f64).max(0.0) / kv as f64) as usize;
        let (step_s, comm_s) = step(tp, weights, kv);
        let tokens_per_s = req.batch_size as f64 / step_s;
        let speedup = base_s / step_s;
        rows.push(PlanRow {
            tp,
            weight_bytes_per_rank: weights.total,
            kv_bytes_per_token_per_rank: kv,
            kv_tokens_fit,
            fits: needed <= usable,
            comm_bytes_per_token_per_layer: if tp > 1 {
                2 * cfg.hidden_size * req.comm_bytes
            } else {
                0
            },
            comm_bytes_per_token: if tp > 1 {
                2 * cfg.hidden_size * req.comm_bytes * cfg.num_layers
            } else {
                0
            },
            all_reduce_us_per_token: comm_s * 1e6 / req.batch_size as f64,
            decode_ms_per_step: step_s * 1e3,
            tokens_per_s,
            tokens_per_s_per_device: tokens_per_s / tp as f64,
            speedup,
            efficiency: speedup / tp as f64,
        });
    }
    let fitting = rows.iter().filter(|r| r.fits);
    let recommended_tp = fitting.clone().map(|r| r.tp).min();
    let best_tp = fitting
        .max_by(|a, b| {
            a.tokens_per_s_per_device
                .total_cmp(&b.tokens_per_s_per_device)
        })
        .map(|r| r.tp);
    Ok(Plan {
        recommended_tp,
        best_tp,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("16G").unwrap(), 16 << 30);
        for bad in ["", "GiB", "24 parsecs", "-3GB", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn presets_parse_and_shapes_are_consistent() {
        for (name, _) in PRESETS {
            let cfg = preset(name).unwrap();
            let src = ShapeSource::new(cfg.clone(), WeightDtype::Bf16);
            // tp 1 holds the whole model: 2 bytes per parameter plus f32 norms.
            let w = weight_bytes(&cfg, &src, 1, 0).unwrap().total;
            let params_b = w as f64 / 2.0 / 1e9;
            assert!(
                params_b > 1.0 && params_b < 420.0,
                "{name}: {params_b}B parameters"
            );
        }
        assert!(preset("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("llama-3.1-8b"));
    }

    /// A decode step of a mixture of experts reads the experts its tokens pick: two of
    /// Mixtral's eight for one token, nearly all for 64; a dense model reads everything.
    #[test]
    fn a_moe_step_reads_the_experts_its_tokens_pick() {
        let cfg = preset("mixtral-8x7b").unwrap();
        let src = ShapeSource::new(cfg.clone(), WeightDtype::Bf16);
        let w = weight_bytes(&cfg, &src, 1, 0).unwrap();
        assert!(w.routed > w.total * 9 / 10, "{w:?}");
        let one = w.read_per_step(&cfg, 1) as f64;
        let expected = (w.total - w.routed) as f64 + w.routed as f64 / 4.0;
        assert!((one / expected - 1.0).abs() < 1e-6, "{one} vs {expected}");
        assert!(w.read_per_step(&cfg, 64) as f64 > 0.9999 * w.total as f64);
        let dense = preset("llama-3.1-8b").unwrap();
        let src = ShapeSource::new(dense.clone(), WeightDtype::Bf16);
        let w = weight_bytes(&dense, &src, 2, 0).unwrap();
        assert_eq!((w.routed, w.read_per_step(&dense, 1)), (0, w.total));
    }

    #[test]
    fn links() {
        assert!(Link::parse("custom:20,12.5").is_ok());
        assert!(Link::parse("custom:20").is_err());
        assert!(Link::parse("carrier-pigeon").is_err());
        let l = Link::parse("nvlink").unwrap();
        assert_eq!(l.all_reduce_s(1, 1 << 20), 0.0);
        assert!(l.all_reduce_s(8, 1 << 20) > l.all_reduce_s(2, 1 << 20));
    }
}
