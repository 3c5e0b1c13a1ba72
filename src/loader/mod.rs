//! Model files to a config plus this rank's shards of the weights.
//!
//! A [`TensorSource`] hands out rectangular slices of named 2-D tensors (and ranges of 1-D
//! ones), so a rank copies only the bytes it owns out of the memory-mapped file and never
//! materialises the whole model.

pub mod config;
pub mod fused;
pub mod gguf;
pub mod gguf_write;
pub mod safetensors;

pub use config::{Architecture, ModelConfig};

use crate::kernels::{Matrix, Storage};
use anyhow::{bail, Context, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Named tensors of a model file, readable in slices.
pub trait TensorSource: Send + Sync {
    /// The tensor's shape in PyTorch order (`[out_features, in_features]` for a linear).
    fn shape(&self, name: &str) -> Option<Vec<usize>>;

    /// `rows × cols` of a 2-D tensor, in its stored format.
    fn read_block(&self, name: &str, rows: Range<usize>, cols: Range<usize>) -> Result<Storage>;

    /// Elements per quantization block along a row (1 for plain formats): splits along a
    /// weight's input dimension must fall on multiples of it.
    fn block_size(&self, _name: &str) -> usize {
        1
    }

    /// Bytes a `rows × cols` slice of the tensor takes in its stored format.
    fn slice_bytes(&self, name: &str, rows: usize, cols: usize) -> Result<usize>;

    /// Whether the tensor exists.
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    /// Checks that `name` exists with exactly `expected` shape.
    fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        match self.shape(name) {
            None => bail!("the model file has no tensor `{name}` (expected shape {expected:?})"),
            Some(shape) if shape != expected => bail!(
                "tensor `{name}` has shape {shape:?} but the config implies {expected:?}: \
                 config.json and the weights do not belong together"
            ),
            Some(_) => Ok(()),
        }
    }

    /// A slice of a 2-D tensor of `shape`, checked first.
    fn load_matrix(
        &self,
        name: &str,
        shape: [usize; 2],
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Matrix> {
        self.expect_shape(name, &shape)?;
        let (r, c) = (rows.len(), cols.len());
        let storage = self
            .read_block(name, rows, cols)
            .with_context(|| format!("reading tensor `{name}`"))?;
        Ok(Matrix::new(r, c, storage))
    }

    /// A range of a 1-D tensor of length `len`, as f32.
    fn load_vector(&self, name: &str, len: usize, range: Range<usize>) -> Result<Vec<f32>> {
        self.expect_shape(name, &[len])?;
        let n = range.len();
        let storage = self
            .read_block(name, 0..1, range)
            .with_context(|| format!("reading tensor `{name}`"))?;
        let mut out = vec![0.0; n];
        storage.to_f32(0, &mut out);
        Ok(out)
    }
}

/// Checks a slice request against a tensor of `shape` (1-D tensors read as one row);
/// returns the tensor's (rows, cols).
fn check_slice(
    name: &str,
    shape: &[usize],
    rows: &Range<usize>,
    cols: &Range<usize>,
) -> Result<(usize, usize)> {
    let (n_rows, n_cols) = match shape {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        other => bail!(
            "tensor `{name}` has {} dimensions; expected 1 or 2",
            other.len()
        ),
    };
    if rows.end > n_rows || cols.end > n_cols || rows.start > rows.end || cols.start > cols.end {
        bail!("slice {rows:?} × {cols:?} is outside tensor `{name}` of shape {shape:?}");
    }
    Ok((n_rows, n_cols))
}

/// Where a model's tokenizer comes from.
pub enum TokenizerSpec {
    /// A Hugging Face `tokenizer.json`.
    Json(PathBuf),
    /// The `tokenizer.ggml.*` metadata of a GGUF file.
    Gguf(gguf::GgufTokenizer),
}

/// The tokenizer alone of a model path: a GGUF file (a vocabulary-only one too), a
/// Hugging Face folder, or a `tokenizer.json`; no weights are read.
pub fn open_tokenizer(path: &Path) -> Result<TokenizerSpec> {
    if path.is_dir() {
        let json = path.join("tokenizer.json");
        if !json.exists() {
            bail!("{} has no tokenizer.json", path.display());
        }
        return Ok(TokenizerSpec::Json(json));
    }
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    if path.extension().is_some_and(|e| e == "json") {
        return Ok(TokenizerSpec::Json(path.to_owned()));
    }
    let file = gguf::GgufFile::open(path)?;
    gguf::GgufTokenizer::from_metadata(&file)
        .with_context(|| format!("reading the tokenizer of {}", path.display()))?
        .map(TokenizerSpec::Gguf)
        .ok_or_else(|| anyhow::anyhow!("{} holds no tokenizer", path.display()))
}

/// A chat template's Jinja source and the special-token strings templates refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplateSpec {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// What a model path resolves to.
pub struct ModelFiles {
    pub config: ModelConfig,
    pub tensors: Box<dyn TensorSource>,
    pub tokenizer: Option<TokenizerSpec>,
    pub chat_template: Option<ChatTemplateSpec>,
}

/// Opens a Hugging Face model folder or a GGUF file.
pub fn open_model(path: &Path) -> Result<ModelFiles> {
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    if path.is_file() {
        let file = gguf::GgufFile::open(path)?;
        let config = file
            .config()
            .with_context(|| format!("in {}", path.display()))?;
        let tokenizer = gguf::GgufTokenizer::from_metadata(&file)
            .with_context(|| format!("reading the tokenizer of {}", path.display()))?;
        let chat_template = tokenizer.as_ref().and_then(|t| {
            let token = |id: Option<u32>| {
                id.and_then(|i| t.tokens.get(i as usize))
                    .cloned()
                    .unwrap_or_default()
            };
            Some(ChatTemplateSpec {
                source: t.chat_template.clone()?,
                bos_token: token(t.bos_id),
                eos_token: token(config.eos_token_ids.first().copied()),
            })
        });
        return Ok(ModelFiles {
            tensors: with_fused_parts(Box::new(gguf::GgufSource::new(file, &config)), &config),
            config,
            tokenizer: tokenizer.map(TokenizerSpec::Gguf),
            chat_template,
        });
    }
    let config = ModelConfig::from_hf_dir(path)?;
    let tensors = safetensors::SafetensorsSource::open(path)?;
    let tokenizer = path.join("tokenizer.json");
    Ok(ModelFiles {
        tensors: with_fused_parts(Box::new(tensors), &config),
        config,
        tokenizer: tokenizer.exists().then_some(TokenizerSpec::Json(tokenizer)),
        chat_template: hf_chat_template(path)?,
    })
}

/// Architectures whose checkpoints fuse projections are read through [`fused::FusedParts`].
fn with_fused_parts(tensors: Box<dyn TensorSource>, cfg: &ModelConfig) -> Box<dyn TensorSource> {
    match cfg.architecture {
        Architecture::Phi3 => Box::new(fused::FusedParts::phi3(tensors, cfg)),
        _ => tensors,
    }
}

/// The chat template of a Hugging Face folder: `chat_template.jinja`, or the
/// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of
/// which "default" is used).
fn hf_chat_template(dir: &Path) -> Result<Option<ChatTemplateSpec>> {
    let config_path = dir.join("tokenizer_config.json");
    let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?,
        Err(_) => serde_json::Value::Null,
    };
    let jinja = dir.join("chat_template.jinja");
    let source = if jinja.exists() {
        Some(
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?,
        )
    } else {
        match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        }
    };
    // A special token is written as a string or as {"content": string}.
    let token = |key: &str| {
        let v = config.get(key);
        v.and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()))
            .unwrap_or_default()
            .to_owned()
    };
    Ok(source.map(|source| ChatTemplateSpec {
        source,
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
    }))
}
