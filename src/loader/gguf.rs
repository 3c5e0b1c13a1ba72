//! GGUF files (llama.cpp's format, versions 2 and 3) over mmap.
//!
//! Every length and offset in the file is checked against the file before use: a truncated
//! or lying file is an error naming what is wrong, never a panic or an out-of-bounds read.
//! Tensors are exposed under the Hugging Face names the model code asks for, in PyTorch
//! dimension order (GGUF lists dimensions innermost first).

use super::config::{Architecture, ModelConfig, MoeConfig, RopeConfig, RopeScaling};
use super::TensorSource;
use crate::kernels::{QuantType, Storage};
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Element formats of GGUF tensors that tpserve reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    Quant(QuantType),
}

/// ggml's type ids of the formats tpserve reads (and writes).
const GGML_TYPES: [(u32, TensorType); 15] = [
    (0, TensorType::F32),
    (1, TensorType::F16),
    (2, TensorType::Quant(QuantType::Q4_0)),
    (3, TensorType::Quant(QuantType::Q4_1)),
    (6, TensorType::Quant(QuantType::Q5_0)),
    (7, TensorType::Quant(QuantType::Q5_1)),
    (8, TensorType::Quant(QuantType::Q8_0)),
    (10, TensorType::Quant(QuantType::Q2K)),
    (11, TensorType::Quant(QuantType::Q3K)),
    (12, TensorType::Quant(QuantType::Q4K)),
    (13, TensorType::Quant(QuantType::Q5K)),
    (14, TensorType::Quant(QuantType::Q6K)),
    (20, TensorType::Quant(QuantType::IQ4NL)),
    (23, TensorType::Quant(QuantType::IQ4XS)),
    (30, TensorType::BF16),
];

impl TensorType {
    fn from_ggml(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|(i, _)| *i == id).map(|(_, t)| *t)
    }

    /// ggml's id of this format (what a GGUF tensor entry records).
    pub fn ggml_id(self) -> u32 {
        GGML_TYPES
            .iter()
            .find(|(_, t)| *t == self)
            .map(|(i, _)| *i)
            .expect("every format has a ggml id")
    }

    /// Bytes of `elems` elements (a whole number of blocks).
    pub fn bytes_for(self, elems: usize) -> usize {
        let (n, b) = self.block();
        elems / n * b
    }

    /// (elements, bytes) of one block.
    fn block(self) -> (usize, usize) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 | TensorType::BF16 => (1, 2),
            TensorType::Quant(q) => (q.block_elems(), q.block_bytes()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub ty: TensorType,
    /// PyTorch order: `[rows, cols]` for a matrix.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    start: usize,
}

pub struct GgufFile {
    map: Mmap,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
}

/// A bounds-checked cursor over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                anyhow!(
                    "the file ends inside {what} (at byte {}, needs {n} more of {}): truncated or corrupted",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must be plausible: each counted item needs at least `min_bytes`.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            bail!(
                "{what} claims {n} entries, more than the {left} bytes left in the file could hold"
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| anyhow!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("metadata `{key}` has the invalid boolean byte {b}"),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    bail!("metadata `{key}` nests arrays too deeply");
                }
                let elem = self.u32(key)?;
                let n = self.count(1, key)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => bail!("metadata `{key}` has unknown value type {t}"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is only read; tpserve does not modify model files while serving.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        Self::parse(map).with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    /// Parses a file already in memory (as the fuzz tests do); `open` maps one from disk.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
        map[..bytes.len()].copy_from_slice(bytes);
        let map = map.make_read_only()?;
        Self::parse_bytes(map, bytes.len())
    }

    fn parse(map: Mmap) -> Result<Self> {
        let len = map.len();
        Self::parse_bytes(map, len)
    }

    /// Parses the first `len` bytes of `map`.
    fn parse_bytes(map: Mmap, len: usize) -> Result<Self> {
        let mut c = Cursor {
            bytes: &map[..len],
            pos: 0,
        };
        let magic = c.take(4, "the magic number")?;
        if magic != b"GGUF" {
            bail!("wrong magic number {magic:?} (expected \"GGUF\")");
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (tpserve reads versions 2 and 3)");
        }
        let n_tensors = c.count(24, "the tensor count")?;
        let n_kv = c.count(12, "the metadata count")?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)");
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)? as usize);
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)? as usize;
            infos.push((name, dims, type_id, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => bail!("general.alignment {v:?} is not a power of two"),
            },
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::new();
        for (name, dims, type_id, offset) in infos {
            let ty = TensorType::from_ggml(type_id).ok_or_else(|| {
                anyhow!(
                    "tensor `{name}` has quant type {type_id}, which tpserve does not read \
                     (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS); re-quantize the model to one of these"
                )
            })?;
            let (block_elems, block_bytes) = ty.block();
            if dims[0] % block_elems != 0 {
                bail!("tensor `{name}`: row length {} is not a multiple of its block size {block_elems}", dims[0]);
            }
            let size = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .and_then(|elems| (elems / block_elems).checked_mul(block_bytes))
                .ok_or_else(|| anyhow!("tensor `{name}` has dimensions {dims:?} that overflow"))?;
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(size).is_some_and(|end| end <= len))
                .ok_or_else(|| {
                    anyhow!(
                        "tensor `{name}` ({size} bytes at offset {offset}) lies beyond the end of the file \
                         ({len} bytes): truncated or corrupted"
                    )
                })?;
            let shape = dims.into_iter().rev().collect();
            tensors.insert(name, TensorInfo { ty, shape, start });
        }
        Ok(GgufFile {
            map,
            version,
            metadata,
            tensors,
        })
    }

    /// Row `row` of tensor `name` (GGUF name and row order), dequantized.
    pub fn dequantize_row(&self, name: &str, row: usize) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("no tensor `{name}`"))?;
        let cols = *t.shape.last().expect("tensors have at least one dimension");
        let rows = t.shape.iter().rev().skip(1).product::<usize>();
        if row >= rows {
            bail!("tensor `{name}` has {rows} rows, not {}", row + 1);
        }
        let (block_elems, block_bytes) = t.ty.block();
        let row_bytes = cols / block_elems * block_bytes;
        let at = t.start + row * row_bytes;
        let bytes = &self.map[at..at + row_bytes];
        let mut out = vec![0.0; cols];
        match t.ty {
            TensorType::F32 => out.copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(bytes)),
            TensorType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            TensorType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            TensorType::Quant(q) => q.dequantize(bytes, &mut out),
        }
        Ok(out)
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The model configuration from `{arch}.*` metadata, with what llama.cpp infers for
    /// the values a GGUF does not carry (Gemma's attention scale and sliding layers).
    pub fn config(&self) -> Result<ModelConfig> {
        let arch_name = self
            .meta("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("metadata general.architecture is missing"))?;
        let m = ArchMeta {
            file: self,
            arch: arch_name,
        };
        let experts = m.num("expert_count").is_ok_and(|n| n > 0);
        let architecture = architecture(arch_name, experts)?;
        let hidden_size = m.num("embedding_length")?;
        let num_heads = m.num("attention.head_count")?;
        let num_kv_heads = m.num("attention.head_count_kv").unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("head_count ({num_heads}) must be a positive multiple of head_count_kv ({num_kv_heads})");
        }
        let head_dim = m
            .num("attention.key_length")
            .unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("{arch_name}.attention.key_length {head_dim} must be even and positive");
        }
        let embed = self
            .tensors
            .get("token_embd.weight")
            .ok_or_else(|| anyhow!("the file has no tensor token_embd.weight"))?;
        let num_layers = m.num("block_count")?;
        let gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
        let mut cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: m.num("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: embed.shape[0],
            rms_norm_eps: m.float("attention.layer_norm_rms_epsilon", 1e-5),
            rope: RopeConfig {
                theta: m.float("rope.freq_base", 10000.0),
                scaling: self.rope_scaling(arch_name, head_dim)?,
            },
            local_rope: None,
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            qkv_bias: self.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: self.tensors.contains_key("blk.0.attn_q_norm.weight"),
            max_position_embeddings: m.num("context_length").unwrap_or(4096),
            sliding_window: m.num("attention.sliding_window").ok().filter(|&w| w > 0),
            moe: experts.then(|| m.moe(architecture)).transpose()?,
            sliding_layers: vec![],
            activation: super::config::Activation::Silu,
            query_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            gemma_norms: gemma,
            norm_weight_offset: false,
            bos_token_id: self.token_id("bos_token_id"),
            eos_token_ids: self.end_ids(),
        };
        if gemma {
            m.gemma(&mut cfg)?;
        }
        Ok(cfg)
    }

    /// The end-of-sequence and end-of-turn ids, each once.
    fn end_ids(&self) -> Vec<u32> {
        let mut ids = vec![];
        for id in ["eos_token_id", "eot_token_id"].map(|k| self.token_id(k)) {
            if let Some(id) = id.filter(|id| !ids.contains(id)) {
                ids.push(id);
            }
        }
        ids
    }

    /// A `tokenizer.ggml.*` token id.
    fn token_id(&self, key: &str) -> Option<u32> {
        self.meta(&format!("tokenizer.ggml.{key}"))
            .and_then(Value::as_u64)
            .map(|v| v as u32)
    }
}

/// The architecture of a GGUF's `general.architecture`, with experts or without.
fn architecture(arch: &str, experts: bool) -> Result<Architecture> {
    Ok(match (arch, experts) {
        ("llama", false) => Architecture::Llama,
        ("llama", true) => Architecture::Mixtral,
        ("qwen2", false) => Architecture::Qwen2,
        ("qwen3", false) => Architecture::Qwen3,
        ("qwen2moe", true) => Architecture::Qwen2Moe,
        ("qwen3moe", true) => Architecture::Qwen3Moe,
        ("phi3", false) => Architecture::Phi3,
        ("gemma2", false) => Architecture::Gemma2,
        ("gemma3", false) => Architecture::Gemma3,
        ("qwen2moe" | "qwen3moe", false) => {
            bail!("{arch}.expert_count is missing or 0: a {arch} model needs experts")
        }
        (other, _) => bail!(
            "unsupported GGUF architecture `{other}`{}: tpserve runs llama (and Mixtral's \
             experts), qwen2, qwen3, qwen2moe, qwen3moe, phi3, gemma2 and gemma3",
            if experts { " with experts" } else { "" }
        ),
    })
}

/// The `{arch}.*` metadata of a file.
struct ArchMeta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl ArchMeta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.file.meta(&format!("{}.{key}", self.arch))
    }

    fn num(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("metadata {}.{key} is missing or not a number", self.arch))
    }

    fn float(&self, key: &str, default: f64) -> f32 {
        self.get(key).and_then(Value::as_f64).unwrap_or(default) as f32
    }

    /// The experts, as llama.cpp reads them: Mixtral's width is `feed_forward_length`,
    /// Qwen's `expert_feed_forward_length`; the chosen experts' weights are renormalised
    /// for Mixtral and Qwen3-MoE, not for Qwen2-MoE, unless `expert_weights_norm` says.
    fn moe(&self, arch: Architecture) -> Result<MoeConfig> {
        let num_experts = self.num("expert_count")?;
        let top_k = self.num("expert_used_count")?;
        if top_k == 0 || top_k > num_experts {
            bail!(
                "{}.expert_used_count ({top_k}) must be 1 to the {num_experts} experts",
                self.arch
            );
        }
        if let Some(f) = self.get("expert_gating_func").and_then(Value::as_u64) {
            if f != 1 {
                bail!(
                    "{}.expert_gating_func {f}: tpserve routes experts by softmax (1) only",
                    self.arch
                );
            }
        }
        let qwen = arch != Architecture::Mixtral;
        let width = if qwen {
            match self.num("expert_feed_forward_length") {
                Ok(w) => w,
                Err(_) => self.num("feed_forward_length")? / top_k,
            }
        } else {
            self.num("feed_forward_length")?
        };
        let shared = (arch == Architecture::Qwen2Moe)
            .then(|| {
                self.num("expert_shared_feed_forward_length")
                    .or_else(|_| self.num("feed_forward_length"))
            })
            .transpose()?;
        Ok(MoeConfig {
            num_experts,
            top_k,
            expert_intermediate_size: width,
            norm_topk_prob: self
                .get("expert_weights_norm")
                .and_then(Value::as_bool)
                .unwrap_or(arch != Architecture::Qwen2Moe),
            shared_expert_intermediate_size: shared,
            dense_layers: vec![],
            mixtral_names: !qwen,
        })
    }

    /// Gemma's switches. llama.cpp's converter does not store the query scale or Gemma 3's
    /// sliding pattern; llama.cpp infers them, and so does tpserve: 1/√head_dim, or
    /// 1/√(hidden/heads) for the 27B models (46 layers for Gemma 2, 62 for Gemma 3);
    /// Gemma 2's window on even layers, Gemma 3's on five layers in six (or
    /// `attention.sliding_window_pattern`), rotating with base 10000 (or
    /// `rope.freq_base_swa`).
    fn gemma(&self, cfg: &mut ModelConfig) -> Result<()> {
        let layers = cfg.num_layers;
        let gemma2 = cfg.architecture == Architecture::Gemma2;
        let big = if gemma2 { 46 } else { 62 };
        let scale_dim = if layers == big {
            cfg.hidden_size / cfg.num_heads
        } else {
            cfg.head_dim
        };
        cfg.query_scale = 1.0 / (scale_dim as f32).sqrt();
        cfg.activation = super::config::Activation::GeluTanh;
        if gemma2 {
            cfg.sliding_window = Some(self.num("attention.sliding_window").unwrap_or(4096));
            cfg.sliding_layers = (0..layers).map(|l| l % 2 == 0).collect();
            cfg.attn_softcap = Some(self.float("attn_logit_softcapping", 50.0));
            cfg.final_softcap = Some(self.float("final_logit_softcapping", 30.0));
            return Ok(());
        }
        cfg.sliding_layers = match self.get("attention.sliding_window_pattern") {
            None => (0..layers).map(|l| (l + 1) % 6 != 0).collect(),
            Some(Value::Array(flags)) if flags.len() == layers => flags
                .iter()
                .map(|f| f.as_bool().or(f.as_u64().map(|v| v != 0)).unwrap_or(false))
                .collect(),
            Some(v) => match v.as_u64() {
                Some(p) if p > 0 => (0..layers).map(|l| (l + 1) % p as usize != 0).collect(),
                _ => bail!(
                    "{}.attention.sliding_window_pattern {v:?} is neither a period nor one flag per layer",
                    self.arch
                ),
            },
        };
        cfg.local_rope = Some(RopeConfig {
            theta: self.float("rope.freq_base_swa", 10000.0),
            scaling: None,
        });
        Ok(())
    }
}

impl GgufFile {
    /// llama.cpp's rope scaling keys and `rope_freqs` tensor; what tpserve cannot honour
    /// (YaRN, partial rotary dimensions) is refused rather than run with wrong angles.
    fn rope_scaling(&self, arch: &str, head_dim: usize) -> Result<Option<RopeScaling>> {
        let key = |k: &str| self.meta(&format!("{arch}.{k}"));
        if let Some(dims) = key("rope.dimension_count").and_then(Value::as_u64) {
            if dims as usize != head_dim {
                bail!(
                    "{arch}.rope.dimension_count is {dims} but heads are {head_dim} wide: \
                     partial rotary embeddings are not supported"
                );
            }
        }
        let kind = key("rope.scaling.type").and_then(Value::as_str);
        let factor = key("rope.scaling.factor").and_then(Value::as_f64);
        let scaling = match (kind, factor) {
            (None | Some("none"), _) => None,
            (Some("linear"), Some(f)) if f > 0.0 && f.is_finite() => {
                (f != 1.0).then_some(RopeScaling::Linear(f as f32))
            }
            (Some(other), _) => bail!(
                "{arch}.rope.scaling.type `{other}` (factor {factor:?}) is not supported: \
                 tpserve runs no, linear and Llama 3 (rope_freqs) scaling"
            ),
        };
        if self.tensors.contains_key("rope_factors_long.weight") {
            bail!("this file uses LongRoPE (rope_factors_long), which tpserve does not run");
        }
        let Some(t) = self.tensors.get("rope_freqs.weight") else {
            return Ok(scaling);
        };
        if scaling.is_some() {
            bail!("the file has both {arch}.rope.scaling.type and a rope_freqs tensor");
        }
        if t.shape != [head_dim / 2] {
            bail!(
                "rope_freqs.weight has shape {:?}, expected [{}] (half the head width)",
                t.shape,
                head_dim / 2
            );
        }
        let factors = self.dequantize_row("rope_freqs.weight", 0)?;
        if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            bail!("rope_freqs.weight holds a factor that is not a positive number");
        }
        Ok(Some(RopeScaling::FreqFactors(factors)))
    }
}

/// The GGUF name of a Hugging Face tensor name. Gemma's norms have names of their own
/// (its `post_attention_layernorm` follows the attention, and `pre_feedforward_layernorm`
/// is the MLP's input norm, which other families call `post_attention_layernorm`).
pub fn gguf_name(hf: &str, gemma: bool) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // Phi-3 keeps gate and up fused, under ffn_up.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// An expert's Hugging Face tensor name → the GGUF tensor that stacks all experts of its
/// kind (`[experts, rows, cols]`), and the expert's index in it.
pub fn gguf_expert(hf: &str) -> Option<(String, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest
        .strip_prefix("mlp.experts.")
        .or_else(|| rest.strip_prefix("block_sparse_moe.experts."))?;
    let (expert, rest) = rest.split_once('.')?;
    let (which, suffix) = rest.split_once('.')?;
    let kind = match which {
        "gate_proj" | "w1" => "ffn_gate_exps",
        "up_proj" | "w3" => "ffn_up_exps",
        "down_proj" | "w2" => "ffn_down_exps",
        _ => return None,
    };
    Some((format!("blk.{layer}.{kind}.{suffix}"), expert.parse().ok()?))
}

/// A GGUF file as a [`TensorSource`] under Hugging Face names.
pub struct GgufSource {
    file: GgufFile,
    /// llama.cpp stores llama's q and k rows permuted for its interleaved rotary; tpserve's
    /// rotary pairs element i with i + d/2 (as transformers does), so those rows are read
    /// back in Hugging Face order. `Some(head_dim)` when this applies.
    unpermute_qk: Option<usize>,
    gemma: bool,
}

impl GgufSource {
    pub fn new(file: GgufFile, cfg: &ModelConfig) -> Self {
        let llama = matches!(
            cfg.architecture,
            Architecture::Llama | Architecture::Mixtral
        );
        GgufSource {
            file,
            unpermute_qk: llama.then_some(cfg.head_dim),
            gemma: cfg.gemma_norms,
        }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The tensor behind a Hugging Face name, and its GGUF name: one expert of a stacked
    /// experts tensor is a tensor of its own, and Qwen2-MoE's one-row shared-expert gate
    /// (a vector in the file) reads as the `[1, hidden]` matrix it is.
    fn info(&self, hf: &str) -> Option<(TensorInfo, String)> {
        if let Some((name, expert)) = gguf_expert(hf) {
            let t = self.file.tensors.get(&name)?;
            let [n, rows, cols] = t.shape[..] else {
                return None;
            };
            if expert >= n {
                return None;
            }
            let bytes = t.ty.bytes_for(rows * cols);
            let view = TensorInfo {
                ty: t.ty,
                shape: vec![rows, cols],
                start: t.start + expert * bytes,
            };
            return Some((view, format!("{name}[{expert}]")));
        }
        let name = gguf_name(hf, self.gemma)?;
        let mut t = self.file.tensors.get(&name)?.clone();
        if name.ends_with("ffn_gate_inp_shexp.weight") && t.shape.len() == 1 {
            t.shape.insert(0, 1);
        }
        Some((t, name))
    }

    /// The file row holding Hugging Face row `r` of tensor `gguf`.
    fn source_row(&self, gguf: &str, r: usize) -> usize {
        let permuted = gguf.ends_with("attn_q.weight") || gguf.ends_with("attn_k.weight");
        match self.unpermute_qk {
            Some(d) if permuted => {
                let (head, within) = (r / d, r % d);
                let half = d / 2;
                head * d + 2 * (within % half) + within / half
            }
            _ => r,
        }
    }
}

impl TensorSource for GgufSource {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|(t, _)| t.shape.clone())
    }

    fn block_size(&self, name: &str) -> usize {
        self.info(name).map_or(1, |(t, _)| t.ty.block().0)
    }

    fn slice_bytes(&self, name: &str, rows: usize, cols: usize) -> Result<usize> {
        let (t, _) = self
            .info(name)
            .ok_or_else(|| anyhow!("the model file has no tensor for `{name}`"))?;
        let (block_elems, block_bytes) = t.ty.block();
        Ok(rows * cols.div_ceil(block_elems) * block_bytes)
    }

    fn read_block(&self, name: &str, rows: Range<usize>, cols: Range<usize>) -> Result<Storage> {
        let (t, gguf) = self
            .info(name)
            .ok_or_else(|| anyhow!("the model file has no tensor for `{name}`"))?;
        let (_, n_cols) = super::check_slice(&gguf, &t.shape, &rows, &cols)?;
        let (block_elems, block_bytes) = t.ty.block();
        if !cols.start.is_multiple_of(block_elems) || !cols.len().is_multiple_of(block_elems) {
            bail!(
                "tensor `{gguf}` ({:?}) cannot be split at columns {cols:?}: splits must fall on its \
                 {block_elems}-element blocks; use a tp size that divides it on block boundaries",
                t.ty
            );
        }
        let row_bytes = n_cols / block_elems * block_bytes;
        let (col_start, col_len) = (
            cols.start / block_elems * block_bytes,
            cols.len() / block_elems * block_bytes,
        );
        let mut bytes = Vec::with_capacity(rows.len() * col_len);
        for r in rows {
            let at = t.start + self.source_row(&gguf, r) * row_bytes + col_start;
            bytes.extend_from_slice(&self.file.map[at..at + col_len]);
        }
        Ok(match t.ty {
            TensorType::F32 => Storage::F32(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes)),
            TensorType::F16 => Storage::F16(bytemuck::pod_collect_to_vec::<u8, f16>(&bytes)),
            TensorType::BF16 => Storage::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(&bytes)),
            TensorType::Quant(q) => Storage::Quant(q, bytes),
        })
    }
}

/// The `tokenizer.ggml.*` metadata: enough to rebuild the model's tokenizer.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`: "gpt2" is byte-level BPE, "llama" SentencePiece.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer variant (e.g. "smollm").
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// SentencePiece: each token's score (higher merges first).
    pub scores: Vec<f32>,
    pub bos_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// WordPiece: the token that ends a text (`[SEP]`; llama.cpp's key is spelled
    /// `seperator_token_id`).
    pub sep_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; absent, the tokenizer kind decides (as llama.cpp).
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece's leading `▁`).
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// `None` when the file carries no tokenizer.
    pub fn from_metadata(file: &GgufFile) -> Result<Option<Self>> {
        let Some(model) = file.meta("tokenizer.ggml.model").and_then(Value::as_str) else {
            return Ok(None);
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            match file.meta(key) {
                None => Ok(vec![]),
                Some(v) => v
                    .as_array()
                    .ok_or_else(|| anyhow!("metadata {key} is not an array"))?
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| anyhow!("metadata {key} holds a non-string"))
                    })
                    .collect(),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            bail!("metadata tokenizer.ggml.tokens is missing or empty");
        }
        let token_types = match file.meta("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .ok_or_else(|| anyhow!("tokenizer.ggml.token_type is not an array"))?
                .iter()
                .map(|t| match *t {
                    Value::I32(x) => x,
                    ref other => other.as_u64().map_or(1, |x| x as i32),
                })
                .collect(),
        };
        if token_types.len() != tokens.len() {
            bail!(
                "tokenizer.ggml.token_type has {} entries but there are {} tokens",
                token_types.len(),
                tokens.len()
            );
        }
        let scores = match file.meta("tokenizer.ggml.scores") {
            None => vec![],
            Some(v) => v
                .as_array()
                .ok_or_else(|| anyhow!("tokenizer.ggml.scores is not an array"))?
                .iter()
                .map(|x| {
                    x.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| anyhow!("tokenizer.ggml.scores holds a non-number"))
                })
                .collect::<Result<_>>()?,
        };
        if !scores.is_empty() && scores.len() != tokens.len() {
            bail!(
                "tokenizer.ggml.scores has {} entries but there are {} tokens",
                scores.len(),
                tokens.len()
            );
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match file.meta(key).map(|v| v.as_u64()) {
                None => Ok(None),
                Some(Some(id)) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(_) => bail!("{key} is not a token id below {}", tokens.len()),
            }
        };
        let flag = |key: &str| file.meta(key).and_then(Value::as_bool);
        Ok(Some(GgufTokenizer {
            model: model.to_owned(),
            pre: file
                .meta("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .map(str::to_owned),
            merges: strings("tokenizer.ggml.merges")?,
            scores,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            sep_id: id("tokenizer.ggml.seperator_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            chat_template: file
                .meta("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned),
            tokens,
            token_types,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::gguf_write::{write_gguf, TensorDecl};

    /// The config of a weightless file of architecture `arch` with `layers` layers and
    /// heads 32 wide (hidden 64 / 4 heads would be 16), plus `extra` `{arch}.*` keys.
    fn config_of(arch: &str, layers: u32, extra: &[(&str, Value)]) -> Result<ModelConfig> {
        let mut meta = vec![(
            "general.architecture".to_string(),
            Value::String(arch.into()),
        )];
        let base = [
            ("embedding_length", Value::U32(64)),
            ("feed_forward_length", Value::U32(128)),
            ("block_count", Value::U32(layers)),
            ("attention.head_count", Value::U32(4)),
            ("attention.key_length", Value::U32(32)),
        ];
        for (k, v) in base.iter().chain(extra) {
            meta.push((format!("{arch}.{k}"), v.clone()));
        }
        let embed = TensorDecl {
            name: "token_embd.weight".into(),
            dims: vec![64, 8],
            ggml_type: 0,
            bytes: 64 * 8 * 4,
        };
        let dir = std::env::temp_dir().join(format!("tpserve-gguf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{arch}-{layers}-{}.gguf", extra.len()));
        write_gguf(&path, &meta, &[embed], |_, _| Ok(()), |_| {})?;
        let cfg = GgufFile::open(&path)?.config();
        let _ = std::fs::remove_file(&path);
        cfg
    }

    /// What llama.cpp infers for Gemma GGUFs, which carry no query scale and (Gemma 3)
    /// no layer pattern: 1/√head_dim except for the 27B models (1/√(hidden/heads)),
    /// Gemma 2's window of 4096 on even layers with caps 50 and 30, Gemma 3's window on
    /// five layers in six rotating with base 10000.
    #[test]
    fn gemma_settings_llama_cpp_infers() {
        let scale = |d: f32| 1.0 / d.sqrt();
        let g2 = config_of("gemma2", 4, &[]).unwrap();
        assert_eq!(g2.query_scale, scale(32.0));
        assert_eq!(g2.sliding_window, Some(4096));
        assert_eq!(g2.sliding_layers, [true, false, true, false]);
        assert_eq!(
            (g2.attn_softcap, g2.final_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(
            config_of("gemma2", 46, &[]).unwrap().query_scale,
            scale(16.0)
        );
        let window = [("attention.sliding_window", Value::U32(512))];
        let g3 = config_of("gemma3", 12, &window).unwrap();
        let globals: Vec<usize> = (0..12).filter(|&l| g3.window_of(l).is_none()).collect();
        assert_eq!(globals, [5, 11]);
        assert_eq!(g3.rope_of(0).theta, 10000.0);
        assert_eq!(g3.query_scale, scale(32.0));
        assert!(g3.attn_softcap.is_none() && g3.gemma_norms && !g3.norm_weight_offset);
        assert_eq!(
            config_of("gemma3", 62, &window).unwrap().query_scale,
            scale(16.0)
        );
        let period = [("attention.sliding_window_pattern", Value::U32(3))];
        let g3 = config_of("gemma3", 6, &period).unwrap();
        assert_eq!(g3.sliding_layers, [true, true, false, true, true, false]);
    }

    /// Experts are read as llama.cpp reads them, and what tpserve cannot route is refused.
    #[test]
    fn experts_from_metadata() {
        let experts = [
            ("expert_count", Value::U32(8)),
            ("expert_used_count", Value::U32(2)),
        ];
        let mixtral = config_of("llama", 2, &experts).unwrap();
        let moe = mixtral.moe.unwrap();
        assert_eq!(mixtral.architecture, Architecture::Mixtral);
        assert_eq!(
            (moe.expert_intermediate_size, moe.norm_topk_prob),
            (128, true)
        );
        let qwen2 = config_of("qwen2moe", 2, &experts).unwrap().moe.unwrap();
        assert_eq!(
            (qwen2.expert_intermediate_size, qwen2.norm_topk_prob),
            (64, false)
        );
        assert_eq!(qwen2.shared_expert_intermediate_size, Some(128));
        let err = |arch: &str, extra: &[(&str, Value)]| {
            config_of(arch, 2, extra).unwrap_err().to_string()
        };
        assert!(err("qwen3moe", &[]).contains("expert_count"));
        let sigmoid = [
            experts[0].clone(),
            experts[1].clone(),
            ("expert_gating_func", Value::U32(2)),
        ];
        assert!(err("qwen3moe", &sigmoid).contains("expert_gating_func"));
        assert!(err("gptneox", &[]).contains("gptneox"));
    }
}
