//! Synthetic models: a GGUF file with a real model's shapes and random weights, loadable
//! by tpserve and by llama.cpp, to measure speed at sizes the bundled 135M model cannot
//! reach. Its text is noise; its timing is a real model's.

use crate::engine::tokenizer::gpt2_byte_char;
use crate::kernels::QuantType;
use crate::layers::rotary::llama3_freq_factors;
use crate::loader::config::{Architecture, RopeScaling};
use crate::loader::gguf::{GgufFile, TensorType, Value};
use crate::loader::gguf_write::{write_gguf, TensorDecl};
use crate::loader::ModelConfig;
use anyhow::{bail, Result};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::path::Path;

/// Weight formats a synthetic model can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthQuant {
    /// Every matrix in one block format.
    Uniform(QuantType),
    /// llama.cpp's *_K_M mixes: `main`, with attn_v and ffn_down in `sensitive`.
    KMix {
        main: QuantType,
        sensitive: QuantType,
    },
    Bf16,
}

/// The names `--quant` takes, with their formats.
const NAMES: [(&str, SynthQuant); 16] = {
    use QuantType::*;
    use SynthQuant::{KMix, Uniform};
    [
        ("q4_0", Uniform(Q4_0)),
        ("q4_1", Uniform(Q4_1)),
        ("q5_0", Uniform(Q5_0)),
        ("q5_1", Uniform(Q5_1)),
        ("q8_0", Uniform(Q8_0)),
        ("q2_k", Uniform(Q2K)),
        ("q3_k", Uniform(Q3K)),
        ("q4_k", Uniform(Q4K)),
        ("q5_k", Uniform(Q5K)),
        ("q6_k", Uniform(Q6K)),
        ("iq4_nl", Uniform(IQ4NL)),
        ("iq4_xs", Uniform(IQ4XS)),
        (
            "q3_k_m",
            KMix {
                main: Q3K,
                sensitive: Q5K,
            },
        ),
        (
            "q4_k_m",
            KMix {
                main: Q4K,
                sensitive: Q6K,
            },
        ),
        (
            "q5_k_m",
            KMix {
                main: Q5K,
                sensitive: Q6K,
            },
        ),
        ("bf16", SynthQuant::Bf16),
    ]
};

impl SynthQuant {
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.to_ascii_lowercase();
        match NAMES.iter().find(|(name, _)| *name == s) {
            Some((_, q)) => Ok(*q),
            None => {
                let names: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
                bail!("--quant {s} is not one of {}", names.join(", "))
            }
        }
    }

    /// The GGUF tensor format of the weight matrix `name`.
    fn tensor_type(self, name: &str) -> TensorType {
        match self {
            SynthQuant::Uniform(q) => TensorType::Quant(q),
            SynthQuant::KMix { main, sensitive } => {
                let is_sensitive =
                    name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight");
                TensorType::Quant(if is_sensitive { sensitive } else { main })
            }
            SynthQuant::Bf16 => TensorType::BF16,
        }
    }

    /// llama.cpp's `general.file_type` (its `llama_ftype`) for a file in this format.
    fn file_type(self) -> u32 {
        use QuantType::*;
        match self {
            SynthQuant::Uniform(q) => match q {
                Q4_0 => 2,
                Q4_1 => 3,
                Q8_0 => 7,
                Q5_0 => 8,
                Q5_1 => 9,
                Q2K => 10,
                Q3K => 11,
                Q4K => 14,
                Q5K => 16,
                Q6K => 18,
                IQ4NL => 25,
                IQ4XS => 30,
            },
            SynthQuant::KMix { main: Q3K, .. } => 12,
            SynthQuant::KMix { main: Q5K, .. } => 17,
            SynthQuant::KMix { .. } => 15,
            SynthQuant::Bf16 => 32,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub parameters: usize,
    pub bytes: usize,
    pub vocab_size: usize,
    pub tensors: usize,
}

/// What to make: the shapes of `cfg` (a preset), in `quant`, with the tokenizer of
/// `tokenizer_from` (its vocabulary size then replaces the preset's) or a byte-level one.
pub struct SynthRequest<'a> {
    pub name: &'a str,
    pub cfg: ModelConfig,
    pub quant: SynthQuant,
    pub tokenizer_from: Option<&'a Path>,
    pub seed: u64,
    /// Keep only the first this many layers (each of the preset's shape).
    pub layers: Option<usize>,
}

/// Writes the synthetic model to `out`; `progress(done, total)` after each tensor.
pub fn synth(
    req: &SynthRequest,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<SynthSummary> {
    let mut cfg = req.cfg.clone();
    if let Some(layers) = req.layers {
        if layers == 0 || layers > cfg.num_layers {
            bail!(
                "--layers {layers}: {} has 1 to {} layers",
                req.name,
                cfg.num_layers
            );
        }
        cfg.num_layers = layers;
        cfg.sliding_layers.truncate(layers);
    }
    let arch = match cfg.architecture {
        Architecture::Llama | Architecture::Mistral | Architecture::Mixtral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::Qwen2Moe => "qwen2moe",
        Architecture::Qwen3Moe => "qwen3moe",
        Architecture::Phi3 => "phi3",
        Architecture::Gemma2 => "gemma2",
        Architecture::Gemma3 => "gemma3",
    };
    let tokenizer = match req.tokenizer_from {
        Some(path) => copied_tokenizer(path)?,
        None => byte_level_tokenizer(cfg.vocab_size),
    };
    cfg.vocab_size = tokenizer
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map_or(cfg.vocab_size, <[Value]>::len);
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String("tpserve synth (random weights)".into()),
        ),
        // Not in the name: llama.cpp changes token attributes by model name ("phi-3" needs
        // a `</s>` token a byte-level vocabulary lacks).
        (
            "general.description".into(),
            Value::String(format!("random weights in the shapes of {}", req.name)),
        ),
        (
            "general.file_type".into(),
            Value::U32(req.quant.file_type()),
        ),
    ];
    let u32_of = |v: usize| Value::U32(v as u32);
    let linear = match cfg.rope.scaling {
        Some(RopeScaling::Linear(f)) => Some(f),
        _ => None,
    };
    for (key, value) in [
        ("context_length", u32_of(cfg.max_position_embeddings)),
        ("embedding_length", u32_of(cfg.hidden_size)),
        ("block_count", u32_of(cfg.num_layers)),
        ("feed_forward_length", u32_of(cfg.intermediate_size)),
        ("rope.dimension_count", u32_of(cfg.head_dim)),
        ("attention.head_count", u32_of(cfg.num_heads)),
        ("attention.head_count_kv", u32_of(cfg.num_kv_heads)),
        ("attention.key_length", u32_of(cfg.head_dim)),
        ("attention.value_length", u32_of(cfg.head_dim)),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps),
        ),
        ("rope.freq_base", Value::F32(cfg.rope.theta)),
        (
            "rope.scaling.type",
            Value::String(linear.map_or("none", |_| "linear").into()),
        ),
        ("rope.scaling.factor", Value::F32(linear.unwrap_or(1.0))),
        ("vocab_size", u32_of(cfg.vocab_size)),
    ]
    .into_iter()
    .chain(architecture_metadata(&cfg))
    {
        metadata.push((format!("{arch}.{key}"), value));
    }
    metadata.extend(tokenizer);

    let tensors = tensor_list(&cfg, req.quant);
    let total = tensors.len();
    let mut parameters = 0;
    let mut bytes = 0;
    for (t, _) in &tensors {
        parameters += t.dims.iter().product::<u64>() as usize;
        bytes += t.bytes;
    }
    let (decls, kinds): (Vec<TensorDecl>, Vec<Fill>) = tensors.into_iter().unzip();
    write_gguf(
        out,
        &metadata,
        &decls,
        |i, buf| {
            fill(&kinds[i], buf, req.seed.wrapping_add(i as u64));
            Ok(())
        },
        |i| progress(i + 1, total),
    )?;
    Ok(SynthSummary {
        parameters,
        bytes,
        vocab_size: cfg.vocab_size,
        tensors: total,
    })
}

/// The `{arch}.*` keys of experts, windows and soft-caps, as llama.cpp's converter writes
/// them (Gemma's query scale and Gemma 3's layer pattern are left for the reader to infer,
/// as llama.cpp does).
fn architecture_metadata(cfg: &ModelConfig) -> Vec<(&'static str, Value)> {
    let u32_of = |v: usize| Value::U32(v as u32);
    let mut keys = vec![];
    if let Some(moe) = &cfg.moe {
        keys.push(("expert_count", u32_of(moe.num_experts)));
        keys.push(("expert_used_count", u32_of(moe.top_k)));
        if !moe.mixtral_names {
            keys.push((
                "expert_feed_forward_length",
                u32_of(moe.expert_intermediate_size),
            ));
        }
        if let Some(w) = moe.shared_expert_intermediate_size {
            keys.push(("expert_shared_feed_forward_length", u32_of(w)));
        }
    }
    if let Some(w) = cfg.sliding_window {
        keys.push(("attention.sliding_window", u32_of(w)));
    }
    // Gemma 3's window on five layers in six is what readers assume; another pattern is
    // written out (newer llama.cpp reads it; that of early 2025 does not).
    let five_in_six = (0..cfg.num_layers).map(|l| (l + 1) % 6 != 0);
    if cfg.architecture == Architecture::Gemma3
        && !cfg.sliding_layers.iter().copied().eq(five_in_six)
    {
        let flags = cfg.sliding_layers.iter().map(|&s| Value::Bool(s)).collect();
        keys.push(("attention.sliding_window_pattern", Value::Array(flags)));
    }
    if let Some(local) = &cfg.local_rope {
        keys.push(("rope.freq_base_swa", Value::F32(local.theta)));
    }
    for (key, cap) in [
        ("attn_logit_softcapping", cfg.attn_softcap),
        ("final_logit_softcapping", cfg.final_softcap),
    ] {
        if let Some(c) = cap {
            keys.push((key, Value::F32(c)));
        }
    }
    keys
}

/// How a tensor's bytes are made.
#[derive(Debug, Clone)]
enum Fill {
    /// Norm weights: 1.0 in f32.
    Ones,
    /// Biases: small f32 noise.
    SmallF32,
    /// A weight matrix in this format, elements of standard deviation ~0.02.
    Weights(TensorType),
    /// These f32 values (the rope frequency factors).
    Values(Vec<f32>),
}

/// Every tensor of a llama.cpp model of `cfg`'s shapes, with how to fill it.
fn tensor_list(cfg: &ModelConfig, quant: SynthQuant) -> Vec<(TensorDecl, Fill)> {
    let h = cfg.hidden_size;
    let mut t = vec![matrix(
        quant,
        "token_embd.weight".into(),
        &[h, cfg.vocab_size],
    )];
    for l in 0..cfg.num_layers {
        layer_tensors(cfg, quant, l, &mut t);
    }
    t.push(vector("output_norm.weight".into(), h, Fill::Ones));
    if let Some(factors) = rope_freq_factors(cfg) {
        t.push(vector(
            "rope_freqs.weight".into(),
            cfg.head_dim / 2,
            Fill::Values(factors),
        ));
    }
    if !cfg.tie_word_embeddings {
        t.push(matrix(quant, "output.weight".into(), &[h, cfg.vocab_size]));
    }
    t
}

/// A weight tensor of GGUF dims `dims` (innermost first) in `quant`'s format for it.
fn matrix(quant: SynthQuant, name: String, dims: &[usize]) -> (TensorDecl, Fill) {
    let ty = quant.tensor_type(&name);
    tensor(name, dims, ty, Fill::Weights(ty))
}

fn vector(name: String, len: usize, fill: Fill) -> (TensorDecl, Fill) {
    tensor(name, &[len], TensorType::F32, fill)
}

fn tensor(name: String, dims: &[usize], ty: TensorType, fill: Fill) -> (TensorDecl, Fill) {
    let decl = TensorDecl {
        name,
        dims: dims.iter().map(|&d| d as u64).collect(),
        ggml_type: ty.ggml_id(),
        bytes: ty.bytes_for(dims.iter().product()),
    };
    (decl, fill)
}

/// Layer `l`'s tensors under llama.cpp's names: Phi-3's fused qkv and gate+up, Gemma's
/// extra norms, experts stacked per kind (the router in f32, as llama.cpp's quantizer
/// leaves it).
fn layer_tensors(cfg: &ModelConfig, quant: SynthQuant, l: usize, t: &mut Vec<(TensorDecl, Fill)>) {
    let name = |s: &str| format!("blk.{l}.{s}");
    let (h, d, ff) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let phi3 = cfg.architecture == Architecture::Phi3;
    t.push(vector(name("attn_norm.weight"), h, Fill::Ones));
    if phi3 {
        t.push(matrix(quant, name("attn_qkv.weight"), &[h, q + 2 * kv]));
    } else {
        t.push(matrix(quant, name("attn_q.weight"), &[h, q]));
        t.push(matrix(quant, name("attn_k.weight"), &[h, kv]));
        t.push(matrix(quant, name("attn_v.weight"), &[h, kv]));
    }
    if cfg.qkv_bias {
        t.push(vector(name("attn_q.bias"), q, Fill::SmallF32));
        t.push(vector(name("attn_k.bias"), kv, Fill::SmallF32));
        t.push(vector(name("attn_v.bias"), kv, Fill::SmallF32));
    }
    if cfg.qk_norm {
        t.push(vector(name("attn_q_norm.weight"), d, Fill::Ones));
        t.push(vector(name("attn_k_norm.weight"), d, Fill::Ones));
    }
    t.push(matrix(quant, name("attn_output.weight"), &[q, h]));
    if cfg.gemma_norms {
        t.push(vector(name("post_attention_norm.weight"), h, Fill::Ones));
        t.push(vector(name("post_ffw_norm.weight"), h, Fill::Ones));
    }
    t.push(vector(name("ffn_norm.weight"), h, Fill::Ones));
    let Some(moe) = cfg.moe.as_ref().filter(|m| m.is_sparse(l)) else {
        if phi3 {
            t.push(matrix(quant, name("ffn_up.weight"), &[h, 2 * ff]));
        } else {
            t.push(matrix(quant, name("ffn_gate.weight"), &[h, ff]));
            t.push(matrix(quant, name("ffn_up.weight"), &[h, ff]));
        }
        t.push(matrix(quant, name("ffn_down.weight"), &[ff, h]));
        return;
    };
    let (n, w) = (moe.num_experts, moe.expert_intermediate_size);
    let router = name("ffn_gate_inp.weight");
    t.push(tensor(router, &[h, n], TensorType::F32, Fill::SmallF32));
    t.push(matrix(quant, name("ffn_gate_exps.weight"), &[h, w, n]));
    t.push(matrix(quant, name("ffn_up_exps.weight"), &[h, w, n]));
    t.push(matrix(quant, name("ffn_down_exps.weight"), &[w, h, n]));
    if let Some(ws) = moe.shared_expert_intermediate_size {
        t.push(vector(name("ffn_gate_inp_shexp.weight"), h, Fill::SmallF32));
        t.push(matrix(quant, name("ffn_gate_shexp.weight"), &[h, ws]));
        t.push(matrix(quant, name("ffn_up_shexp.weight"), &[h, ws]));
        t.push(matrix(quant, name("ffn_down_shexp.weight"), &[ws, h]));
    }
}

/// A block's f16 fields (scale, then min where the format has one) for random codes to
/// give weights of standard deviation ~0.02 around 0: 0.02 / (code sd × scale-code mean
/// or sd); a min of (mean code) × scale cancels the codes' mean.
fn weight_scales(ty: QuantType) -> (f32, f32) {
    use QuantType::*;
    let d = match ty {
        Q4_0 | Q4_1 => 0.02 / 4.6,
        Q5_0 | Q5_1 => 0.02 / 9.2,
        Q8_0 => 0.02 / 73.0,
        IQ4NL => 0.02 / 70.0,
        Q2K => 0.02 / (7.5 * 1.1),
        Q3K => 0.02 / (18.5 * 2.3),
        Q4K => 0.02 / (31.5 * 4.6),
        Q5K => 0.02 / (31.5 * 9.2),
        Q6K => 0.02 / (18.5 * 74.0),
        IQ4XS => 0.02 / (18.5 * 70.0),
    };
    let mean_code = match ty {
        Q4_1 => -7.5,
        Q5_1 => -15.5,
        Q2K => 1.5,
        Q4K => 7.5,
        Q5K => 15.5,
        _ => 0.0,
    };
    (d, mean_code * d)
}

/// The per-frequency factors llama.cpp's converter writes as `rope_freqs` for a scaling
/// given per frequency (Llama 3's), so that llama.cpp and tpserve rotate alike.
fn rope_freq_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    match &cfg.rope.scaling {
        Some(RopeScaling::Llama3(s)) => Some(llama3_freq_factors(s, cfg.rope.theta, cfg.head_dim)),
        Some(RopeScaling::FreqFactors(f)) => Some(f.clone()),
        Some(RopeScaling::Linear(_)) | None => None,
    }
}

fn fill(kind: &Fill, buf: &mut [u8], seed: u64) {
    let mut noise = StdRng::seed_from_u64(seed);
    match kind {
        Fill::Values(values) => {
            for (c, v) in buf.chunks_exact_mut(4).zip(values) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Fill::Ones => {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&1.0f32.to_le_bytes());
            }
        }
        Fill::SmallF32 => {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&noise.random_range(-0.01f32..0.01).to_le_bytes());
            }
        }
        Fill::Weights(TensorType::Quant(ty)) => {
            noise.fill_bytes(buf);
            let (d, dmin) = weight_scales(*ty);
            for b in buf.chunks_exact_mut(ty.block_bytes()) {
                let jitter = noise.random_range(0.75f32..1.25);
                for (&at, v) in ty.f16_fields().iter().zip([d, dmin]) {
                    b[at..at + 2].copy_from_slice(&f16::from_f32(v * jitter).to_le_bytes());
                }
            }
        }
        Fill::Weights(_) => {
            // Uniform in ±0.035: standard deviation 0.02.
            for c in buf.chunks_exact_mut(2) {
                c.copy_from_slice(
                    &bf16::from_f32(noise.random_range(-0.035f32..0.035)).to_le_bytes(),
                );
            }
        }
    }
}

/// The `tokenizer.*` metadata of another GGUF file.
fn copied_tokenizer(path: &Path) -> Result<Vec<(String, Value)>> {
    let file = GgufFile::open(path)?;
    let mut keys: Vec<(String, Value)> = file
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !keys.iter().any(|(k, _)| k == "tokenizer.ggml.tokens") {
        bail!(
            "{} has no tokenizer (no tokenizer.ggml.tokens); give --tokenizer-from a GGUF model \
             that has one, or leave it out for a byte-level tokenizer",
            path.display()
        );
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// A byte-level BPE vocabulary of `vocab_size` tokens and no merges: the 256 bytes (in
/// GPT-2's printable form), an end-of-text token, then unused fillers.
fn byte_level_tokenizer(vocab_size: usize) -> Vec<(String, Value)> {
    let mut tokens: Vec<Value> = (0..=255u8)
        .map(|b| Value::String(gpt2_byte_char(b).to_string()))
        .collect();
    let mut types = vec![Value::I32(1); 256];
    tokens.push(Value::String("<|endoftext|>".into()));
    types.push(Value::I32(3));
    while tokens.len() < vocab_size.max(257) {
        tokens.push(Value::String(format!("<|unused_{}|>", tokens.len())));
        types.push(Value::I32(5));
    }
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(256)),
    ]
}
