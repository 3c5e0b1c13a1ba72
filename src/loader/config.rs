//! The model hyper-parameters tpserve needs, read from a Hugging Face `config.json`.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The decoder families tpserve runs; they differ only in small switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Llama's layers with q/k/v and gate/up fused in the checkpoint.
    Phi3,
    /// Mistral's attention, a mixture of experts for the MLP.
    Mixtral,
    /// Qwen2's attention; experts and a gated shared expert.
    Qwen2Moe,
    /// Qwen3's attention; experts.
    Qwen3Moe,
    /// Gemma 2: norms around attention and MLP, GeGLU, soft-capped scores and logits,
    /// sliding-window attention on alternate layers.
    Gemma2,
    /// Gemma 3 (text): Gemma 2's layers with q/k norms and no soft-capping; sliding-window
    /// layers (five in six) rotate with their own, lower, rope base.
    Gemma3,
}

impl Architecture {
    pub const SUPPORTED: &'static str =
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, \
         MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, Gemma2ForCausalLM, \
         Gemma3ForCausalLM";

    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
            "Phi3ForCausalLM" => Some(Architecture::Phi3),
            "MixtralForCausalLM" => Some(Architecture::Mixtral),
            "Qwen2MoeForCausalLM" => Some(Architecture::Qwen2Moe),
            "Qwen3MoeForCausalLM" => Some(Architecture::Qwen3Moe),
            "Gemma2ForCausalLM" => Some(Architecture::Gemma2),
            "Gemma3ForCausalLM" => Some(Architecture::Gemma3),
            _ => None,
        }
    }
}

/// Llama 3 style frequency-dependent RoPE scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// How the rotary frequencies are changed for contexts longer than the training one.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's frequency-dependent scaling, as a Hugging Face config gives it.
    Llama3(Llama3Scaling),
    /// Every frequency divided by one factor ("linear": positions interpolated).
    Linear(f32),
    /// Each frequency divided by its own factor: GGUF's `rope_freqs` tensor, the form in
    /// which llama.cpp's converter stores Llama 3's scaling.
    FreqFactors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: Option<RopeScaling>,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (silu).
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn from_hf(json: &Value) -> Result<Self> {
        let name = json
            .get("hidden_activation")
            .or_else(|| json.get("hidden_act"))
            .and_then(Value::as_str)
            .unwrap_or("silu");
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Ok(Activation::GeluTanh),
            other => {
                bail!("hidden activation `{other}` is not supported (silu, gelu_pytorch_tanh)")
            }
        }
    }
}

/// A mixture of experts in place of the MLP.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token goes through.
    pub top_k: usize,
    /// Neurons of each expert's MLP.
    pub expert_intermediate_size: usize,
    /// The chosen experts' softmax weights rescaled to sum to 1 (Mixtral, Qwen3-MoE), or
    /// kept as they are (Qwen2-MoE's default).
    pub norm_topk_prob: bool,
    /// Qwen2-MoE: a shared expert of this many neurons, gated by a sigmoid, for every token.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Layers that keep a dense MLP (Qwen's `mlp_only_layers`, `decoder_sparse_step`).
    pub dense_layers: Vec<usize>,
    /// Where the layer's tensors live: `block_sparse_moe` with w1/w3/w2 (Mixtral) or `mlp`
    /// with gate_proj/up_proj/down_proj (Qwen).
    pub mixtral_names: bool,
}

impl MoeConfig {
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.dense_layers.contains(&layer)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    /// Gemma 3: the rotary embedding of the sliding-window layers, when it differs from
    /// `rope` (which the full-attention layers use).
    pub local_rope: Option<RopeConfig>,
    pub tie_word_embeddings: bool,
    /// Qwen2: biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Qwen3: RMSNorm over each q and k head before the rotary embedding.
    pub qk_norm: bool,
    pub max_position_embeddings: usize,
    /// Sliding-window attention (Mistral): each token sees only this many positions.
    pub sliding_window: Option<usize>,
    /// The layers the window applies to (Gemma 2: every other one; Gemma 3: five in
    /// six); empty: all.
    pub sliding_layers: Vec<bool>,
    pub moe: Option<MoeConfig>,
    /// What the MLP's gate goes through.
    pub activation: Activation,
    /// Attention scores are q·k times this (1/√head_dim, or Gemma's query_pre_attn_scalar).
    pub query_scale: f32,
    /// Gemma 2: scores and final logits squashed as cap·tanh(x / cap).
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// Gemma: embeddings scaled by √hidden, and a norm on the attention's and the MLP's
    /// outputs before each residual add.
    pub gemma_norms: bool,
    /// RMSNorm weights stored as offsets from 1 (Gemma's checkpoints; llama.cpp's converter
    /// adds the 1, so Gemma GGUFs hold the multipliers themselves).
    pub norm_weight_offset: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// The rotary embedding of layer `l`.
    pub fn rope_of(&self, l: usize) -> &RopeConfig {
        match (&self.local_rope, self.window_of(l)) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        }
    }

    /// The attention window of layer `l`, if it has one.
    pub fn window_of(&self, l: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(l).copied().unwrap_or(true))
    }

    /// Reads `config.json` (and `generation_config.json` for extra end tokens) in `dir`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: a Hugging Face model folder needs a config.json",
                path.display()
            )
        })?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let mut config =
            Self::from_hf_json(&json).with_context(|| format!("in {}", path.display()))?;
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(gen) = serde_json::from_str::<Value>(&text) {
                for id in token_ids(gen.get("eos_token_id")) {
                    if !config.eos_token_ids.contains(&id) {
                        config.eos_token_ids.push(id);
                    }
                }
            }
        }
        Ok(config)
    }

    pub fn from_hf_json(json: &Value) -> Result<Self> {
        let names: Vec<&str> = json
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let architecture = names
            .iter()
            .find_map(|n| Architecture::from_hf_name(n))
            .ok_or_else(|| {
                anyhow!(
                    "unsupported architecture {:?}: tpserve runs {}",
                    names,
                    Architecture::SUPPORTED
                )
            })?;
        let usize_field = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("config field `{key}` is missing or not a whole number"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_layers = usize_field("num_hidden_layers")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = usize_field("num_key_value_heads").unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})");
        }
        let head_dim = match json.get("head_dim").and_then(Value::as_u64) {
            Some(d) => d as usize,
            None => hidden_size / num_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even and positive for the rotary embedding");
        }
        let (rope, local_rope) = rope_configs(json, architecture)?;
        let partial_rotary = json
            .get("partial_rotary_factor")
            .or_else(|| {
                json.get("rope_parameters")
                    .and_then(|p| p.get("partial_rotary_factor"))
            })
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        if partial_rotary != 1.0 {
            bail!("partial_rotary_factor {partial_rotary}: partial rotary embeddings are not supported");
        }
        let eps = json
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6) as f32;
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_field("vocab_size")?,
            rms_norm_eps: eps,
            rope,
            local_rope,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: matches!(architecture, Architecture::Qwen2 | Architecture::Qwen2Moe)
                || json.get("attention_bias").and_then(Value::as_bool) == Some(true),
            qk_norm: matches!(
                architecture,
                Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3
            ),
            max_position_embeddings: usize_field("max_position_embeddings").unwrap_or(4096),
            sliding_window: sliding_window(json, architecture)?,
            moe: moe_config(json, architecture, num_layers)?,
            sliding_layers: sliding_layers(json, architecture, num_layers),
            activation: Activation::from_hf(json)?,
            query_scale: match json.get("query_pre_attn_scalar").and_then(Value::as_f64) {
                Some(s) if s > 0.0 => (s as f32).powf(-0.5),
                _ => 1.0 / (head_dim as f32).sqrt(),
            },
            attn_softcap: softcap(json, "attn_logit_softcapping"),
            final_softcap: softcap(json, "final_logit_softcapping"),
            gemma_norms: matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3),
            norm_weight_offset: matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3),
            bos_token_id: token_ids(json.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(json.get("eos_token_id")),
        })
    }

    /// Bytes of one token's keys and values over all layers, for `kv_heads` heads of
    /// `value_bytes` per value.
    pub fn kv_bytes_per_token(&self, kv_heads: usize, value_bytes: usize) -> usize {
        2 * self.num_layers * kv_heads * self.head_dim * value_bytes
    }
}

/// The rotary embedding of a config, and Gemma 3's other one for its sliding-window
/// layers. Transformers 5 writes `rope_parameters` (one set, or one per layer type);
/// earlier configs `rope_theta`, `rope_scaling` and Gemma 3's `rope_local_base_freq`.
fn rope_configs(json: &Value, arch: Architecture) -> Result<(RopeConfig, Option<RopeConfig>)> {
    let params = json.get("rope_parameters").filter(|v| v.is_object());
    let per_layer_type = |kind: &str| params.and_then(|p| p.get(kind)).filter(|v| v.is_object());
    let global = per_layer_type("full_attention").or(params);
    let parse = |p: Option<&Value>, theta: Option<f64>, scaling: Option<&Value>| {
        let theta = theta
            .or_else(|| p.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10000.0);
        if !(theta.is_finite() && theta > 0.0) {
            bail!("rope_theta {theta} must be a positive number");
        }
        let scaling = match scaling.filter(|v| v.is_object()).or(p) {
            Some(s) => parse_rope_scaling(s)?,
            None => None,
        };
        Ok(RopeConfig {
            theta: theta as f32,
            scaling,
        })
    };
    let rope = parse(
        global,
        json.get("rope_theta").and_then(Value::as_f64),
        json.get("rope_scaling"),
    )?;
    if arch != Architecture::Gemma3 {
        return Ok((rope, None));
    }
    let local = match per_layer_type("sliding_attention") {
        Some(p) => parse(Some(p), None, None)?,
        None => parse(
            None,
            Some(
                json.get("rope_local_base_freq")
                    .and_then(Value::as_f64)
                    .unwrap_or(10000.0),
            ),
            None,
        )?,
    };
    Ok((rope, Some(local)))
}

fn parse_rope_scaling(s: &Value) -> Result<Option<RopeScaling>> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| {
        s.get(k)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| anyhow!("{kind} rope scaling needs a positive `{k}`"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear(f("factor")?))),
        "llama3" => Ok(Some(RopeScaling::Llama3(Llama3Scaling {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        }))),
        other => bail!(
            "unsupported rope scaling type `{other}`: tpserve supports default, linear and llama3"
        ),
    }
}

/// A positive soft-capping value of the config, if any.
fn softcap(json: &Value, key: &str) -> Option<f32> {
    json.get(key)
        .and_then(Value::as_f64)
        .filter(|&c| c > 0.0)
        .map(|c| c as f32)
}

/// Which layers a window applies to: Gemma's `layer_types` ("sliding_attention"), or
/// when the config has none every other layer from the first (Gemma 2) or all but every
/// `sliding_window_pattern`-th (Gemma 3, 6 by default); empty for all layers.
fn sliding_layers(json: &Value, arch: Architecture, layers: usize) -> Vec<bool> {
    if let Some(types) = json.get("layer_types").and_then(Value::as_array) {
        if matches!(arch, Architecture::Gemma2 | Architecture::Gemma3) {
            return types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect();
        }
    }
    match arch {
        Architecture::Gemma2 => (0..layers).map(|l| l % 2 == 0).collect(),
        Architecture::Gemma3 => {
            let pattern = json
                .get("sliding_window_pattern")
                .and_then(Value::as_u64)
                .filter(|&p| p > 0)
                .unwrap_or(6) as usize;
            (0..layers).map(|l| (l + 1) % pattern != 0).collect()
        }
        _ => vec![],
    }
}

/// The experts of a MoE config, checked; `None` for dense architectures.
fn moe_config(json: &Value, arch: Architecture, layers: usize) -> Result<Option<MoeConfig>> {
    if !matches!(
        arch,
        Architecture::Mixtral | Architecture::Qwen2Moe | Architecture::Qwen3Moe
    ) {
        return Ok(None);
    }
    let count = |keys: &[&str]| -> Result<usize> {
        keys.iter()
            .find_map(|k| json.get(*k).and_then(Value::as_u64))
            .map(|v| v as usize)
            .filter(|&v| v > 0)
            .ok_or_else(|| anyhow!("this MoE config needs a positive `{}`", keys[0]))
    };
    let mixtral = arch == Architecture::Mixtral;
    let num_experts = count(&["num_experts", "num_local_experts"])?;
    let top_k = count(&["num_experts_per_tok"])?;
    if top_k > num_experts {
        bail!("num_experts_per_tok ({top_k}) exceeds the {num_experts} experts");
    }
    let expert_intermediate_size = if mixtral {
        count(&["intermediate_size"])?
    } else {
        count(&["moe_intermediate_size"])?
    };
    let shared = match arch {
        Architecture::Qwen2Moe => Some(count(&["shared_expert_intermediate_size"])?),
        _ => None,
    };
    let step = json
        .get("decoder_sparse_step")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1) as usize;
    let mlp_only: Vec<usize> = json
        .get("mlp_only_layers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect()
        })
        .unwrap_or_default();
    let dense_layers = (0..layers)
        .filter(|&l| mlp_only.contains(&l) || (l + 1) % step != 0)
        .collect();
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        expert_intermediate_size,
        norm_topk_prob: mixtral
            || json.get("norm_topk_prob").and_then(Value::as_bool) == Some(true),
        shared_expert_intermediate_size: shared,
        dense_layers,
        mixtral_names: mixtral,
    }))
}

/// The attention window of a config: Mistral's and Phi-3's `sliding_window` applies to
/// every layer;
/// Qwen2's only to some (`max_window_layers`), which tpserve refuses rather than ignores.
fn sliding_window(json: &Value, architecture: Architecture) -> Result<Option<usize>> {
    let window = json
        .get("sliding_window")
        .and_then(Value::as_u64)
        .filter(|&w| w > 0);
    let used = json
        .get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(!matches!(
            architecture,
            Architecture::Qwen2 | Architecture::Qwen2Moe | Architecture::Qwen3Moe
        ));
    let every_layer = matches!(
        architecture,
        Architecture::Mistral
            | Architecture::Phi3
            | Architecture::Mixtral
            | Architecture::Gemma2
            | Architecture::Gemma3
    );
    match (window, used) {
        (Some(w), true) if every_layer => Ok(Some(w as usize)),
        (Some(w), true) => bail!(
            "this config uses a sliding window of {w} on some layers (use_sliding_window), \
             which tpserve does not run"
        ),
        _ => Ok(None),
    }
}

/// A token id field that may be a number, a list of numbers, or absent.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|id| id as u32)
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gemma3(extra: Value) -> ModelConfig {
        let mut cfg = json!({
            "architectures": ["Gemma3ForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 64, "vocab_size": 512, "sliding_window": 6,
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        ModelConfig::from_hf_json(&cfg).unwrap()
    }

    /// Gemma 3 as transformers 5 writes it (`rope_parameters` per layer type, `layer_types`)
    /// and as earlier versions did (`rope_local_base_freq`, `sliding_window_pattern`,
    /// `rope_scaling` for the global layers only) reads alike.
    #[test]
    fn gemma3_configs_of_both_transformers_generations_read_alike() {
        let new = gemma3(json!({
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
            },
        }));
        let old = gemma3(json!({
            "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }));
        for cfg in [&new, &old] {
            assert_eq!(cfg.sliding_layers, [true, true, false, true]);
            let global = RopeConfig {
                theta: 1e6,
                scaling: Some(RopeScaling::Linear(8.0)),
            };
            let local = RopeConfig {
                theta: 1e4,
                scaling: None,
            };
            assert_eq!(cfg.rope, global);
            assert_eq!(cfg.local_rope, Some(local.clone()));
            assert_eq!((cfg.rope_of(1), cfg.rope_of(2)), (&local, &global));
            assert!(cfg.qk_norm && cfg.gemma_norms && cfg.attn_softcap.is_none());
        }
        // Without a pattern: five sliding layers in six.
        let six = gemma3(json!({"num_hidden_layers": 12}));
        let globals: Vec<usize> = (0..12).filter(|&l| six.window_of(l).is_none()).collect();
        assert_eq!(globals, [5, 11]);
    }
}
