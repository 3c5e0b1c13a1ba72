//! Model files to a config plus this rank's shards of the weights.
//!
//! A [`TensorSource`] hands out rectangular slices of named 2-D tensors (and ranges of 1-D
//! ones), so a rank copies only the bytes it owns out of the memory-mapped file and never
//! materialises the whole model.

pub mod config;
pub mod gguf;
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

/// What a model path resolves to.
pub struct ModelFiles {
    pub config: ModelConfig,
    pub tensors: Box<dyn TensorSource>,
    pub tokenizer: Option<TokenizerSpec>,
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
        return Ok(ModelFiles {
            tensors: Box::new(gguf::GgufSource::new(file, &config)),
            config,
            tokenizer: tokenizer.map(TokenizerSpec::Gguf),
        });
    }
    let config = ModelConfig::from_hf_dir(path)?;
    let tensors = safetensors::SafetensorsSource::open(path)?;
    let tokenizer = path.join("tokenizer.json");
    Ok(ModelFiles {
        config,
        tensors: Box::new(tensors),
        tokenizer: tokenizer.exists().then_some(TokenizerSpec::Json(tokenizer)),
    })
}
