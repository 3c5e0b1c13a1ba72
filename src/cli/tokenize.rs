//! `tpserve tokenize` and `tpserve detokenize`: a model's tokenizer alone (llama.cpp's
//! llama-tokenize), from a GGUF file (vocabulary-only files too) or a Hugging Face folder.

use crate::engine::Tokenizer;
use crate::loader::open_tokenizer;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// A GGUF file, a Hugging Face model folder or a tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to tokenize.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub text: Option<String>,
    /// Tokenize this file's exact bytes (UTF-8) instead of --text.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Add no BOS/EOS, and read text that spells a control token as ordinary text
    /// (llama.cpp's add_special = false, parse_special = false).
    #[arg(long)]
    pub no_special: bool,
    /// Print {"ids": [...]} instead of the ids separated by spaces.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DetokenizeArgs {
    /// A GGUF file, a Hugging Face model folder or a tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids, separated by spaces or commas.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub ids: Option<String>,
    /// A file of ids: {"ids": [...]} (what `tokenize --json` prints) or ids separated by
    /// spaces, commas or newlines.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Leave special tokens (<|im_end|> …) out of the text.
    #[arg(long)]
    pub skip_special: bool,
    /// Print {"text": "..."} instead of the bare text.
    #[arg(long)]
    pub json: bool,
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let mut tokenizer = Tokenizer::new(&open_tokenizer(&args.model)?)?;
    let text = match (&args.text, &args.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
            String::from_utf8(bytes)
                .map_err(|e| anyhow::anyhow!("{} is not UTF-8 text: {e}", f.display()))?
        }
        (None, None) => bail!("give --text or --file"),
    };
    tokenizer.set_parse_special(!args.no_special);
    let ids = if args.no_special {
        tokenizer.encode_plain(&text)?
    } else {
        tokenizer.encode(&text)?
    };
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        let words: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", words.join(" "));
    }
    Ok(())
}

pub fn detokenize(args: DetokenizeArgs) -> Result<()> {
    let tokenizer = Tokenizer::new(&open_tokenizer(&args.model)?)?;
    let source = match (&args.ids, &args.file) {
        (Some(ids), _) => ids.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => bail!("give --ids or --file"),
    };
    let ids = parse_ids(&source)?;
    if let Some(&bad) = ids
        .iter()
        .find(|&&id| id as usize >= tokenizer.vocab_size())
    {
        bail!(
            "token id {bad} is outside the vocabulary ({} tokens)",
            tokenizer.vocab_size()
        );
    }
    let text = tokenizer.decode(&ids, args.skip_special)?;
    if args.json {
        println!("{}", serde_json::json!({ "text": text }));
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Ids from `{"ids": [...]}`, a JSON list, or numbers separated by spaces or commas.
fn parse_ids(source: &str) -> Result<Vec<u32>> {
    let trimmed = source.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let value: serde_json::Value =
            serde_json::from_str(trimmed).context("the ids are not valid JSON")?;
        let list = value.get("ids").unwrap_or(&value);
        return serde_json::from_value(list.clone())
            .context("expected {\"ids\": [...]} or a list of token ids");
    }
    trimmed
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse()
                .with_context(|| format!("`{w}` is not a token id (a whole number)"))
        })
        .collect()
}
