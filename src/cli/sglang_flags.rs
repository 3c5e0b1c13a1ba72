//! SGLang launch flags that people paste with a model (`python -m sglang.launch_server
//! --model-path M --trust-remote-code --dtype auto ...`): those that apply are honoured,
//! the rest are refused with the flag's name and the reason, so that changing the program
//! name is all an SGLang command line needs — or a clear line says why not.

use anyhow::{bail, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Default, Clone)]
pub struct SglangFlags {
    /// cpu (the only device tpserve runs on; cuda and the others are refused).
    #[arg(long)]
    pub device: Option<String>,
    /// Accepted: tpserve runs no model code (its architectures are built in).
    #[arg(long)]
    pub trust_remote_code: bool,
    /// auto: weights stay in the file's format (f32, bf16, f16 or GGUF blocks) and
    /// products accumulate in f32; other values are refused.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// The tokenizer to use instead of the model's: a tokenizer.json, a folder holding
    /// one, or a GGUF file.
    #[arg(long)]
    pub tokenizer_path: Option<PathBuf>,
    /// Refused: tpserve reads local files; download the revision first.
    #[arg(long)]
    pub revision: Option<String>,
    /// auto, or the format the model path has (safetensors, gguf).
    #[arg(long, default_value = "auto")]
    pub load_format: String,
    /// Refused unless it names the file's own format (gguf): tpserve does not quantize at load.
    #[arg(long)]
    pub quantization: Option<String>,
    /// Refused: sampling is seeded per request (the `seed` field).
    #[arg(long)]
    pub random_seed: Option<u64>,
    /// Refused: the chat and text APIs need the tokenizer (`/generate` with `input_ids`
    /// works with it loaded too).
    #[arg(long)]
    pub skip_tokenizer_init: bool,
}

impl SglangFlags {
    /// Checks the flags against the model path; logs what is accepted without effect.
    pub fn check(&self, model: &Path) -> Result<()> {
        if let Some(device) = self.device.as_deref().filter(|d| *d != "cpu") {
            bail!("--device {device}: tpserve runs on CPUs only (no GPU backend yet); use --device cpu or leave it out");
        }
        if self.dtype != "auto" {
            bail!(
                "--dtype {}: tpserve keeps weights in the file's format and accumulates in f32; \
                 only --dtype auto is supported",
                self.dtype
            );
        }
        if let Some(rev) = &self.revision {
            bail!("--revision {rev}: tpserve reads local files only and cannot fetch a revision; download it and pass its folder to --model-path");
        }
        let gguf = model.is_file();
        let format = if gguf { "gguf" } else { "safetensors" };
        if !["auto", format].contains(&self.load_format.as_str()) {
            bail!(
                "--load-format {}: {} is a {format} model; tpserve reads safetensors folders and \
                 GGUF files as they are (use --load-format auto)",
                self.load_format,
                model.display()
            );
        }
        match self.quantization.as_deref() {
            None => {}
            Some("gguf") if gguf => {}
            Some(q) => bail!(
                "--quantization {q}: tpserve runs the model in its file's format and does not \
                 quantize at load; quantize the file first (llama.cpp's llama-quantize makes GGUF blocks)"
            ),
        }
        if let Some(seed) = self.random_seed {
            bail!("--random-seed {seed}: tpserve seeds sampling per request (the request's `seed` field), not for the whole server");
        }
        if self.skip_tokenizer_init {
            bail!("--skip-tokenizer-init: the chat and text APIs need the tokenizer; leave the flag out (`/generate` takes input_ids either way)");
        }
        if self.trust_remote_code {
            tracing::info!("--trust-remote-code accepted: tpserve runs no model code (its architectures are built in)");
        }
        Ok(())
    }
}
