//! Text to token ids and back, through the `tokenizers` crate: from a Hugging Face
//! tokenizer.json, or rebuilt from a GGUF file's tokenizer metadata.

use crate::loader::gguf::GgufTokenizer;
use crate::loader::TokenizerSpec;
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use std::path::Path;

mod gguf;
mod pretokenizers;

pub use gguf::gpt2_byte_char;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by us, not by the tokenizer (GGUF's add_bos_token).
    bos: Option<u32>,
    /// Bytes the vocabulary cannot write (a byte-level vocabulary short of some).
    missing_bytes: Vec<u8>,
    /// Tokens decoded as their text, not through the decoder (GGUF user-defined ones).
    literal_pieces: HashMap<u32, String>,
}

impl Tokenizer {
    pub fn new(spec: &TokenizerSpec) -> Result<Self> {
        match spec {
            TokenizerSpec::Json(path) => Self::from_file(path),
            TokenizerSpec::Gguf(t) => Self::from_gguf(t),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Ok(Tokenizer {
            inner,
            bos: None,
            missing_bytes: vec![],
            literal_pieces: HashMap::new(),
        })
    }

    /// The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(t: &GgufTokenizer) -> Result<Self> {
        let built = gguf::build(t)?;
        Ok(Tokenizer {
            inner: built.inner,
            bos: built.bos,
            missing_bytes: built.missing_bytes,
            literal_pieces: built.literal_pieces,
        })
    }

    /// Whether text that spells a control token (`<|im_start|>`, `<s>` …) is read as
    /// that token (the default) or as ordinary text (llama.cpp's `parse_special = false`).
    pub fn set_parse_special(&mut self, parse: bool) {
        self.inner.set_encode_special_tokens(!parse);
    }

    /// The tokenizer's ids of `text` (`what` names it in errors). Text in a byte this
    /// vocabulary lacks is refused: it would lose characters without a word.
    fn ids(&self, text: &str, add_special: bool, what: &str) -> Result<Vec<u32>> {
        if let Some(b) = text.bytes().find(|b| self.missing_bytes.contains(b)) {
            bail!("the text holds the byte 0x{b:02X}, which this model's vocabulary cannot write");
        }
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow!("cannot tokenize {what}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text`, with the special tokens the tokenizer adds (as transformers'
    /// `tokenizer(text)` does, or llama.cpp's add_bos_token).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.ids(text, true, "the prompt")?;
        Ok(self.bos.into_iter().chain(ids).collect())
    }

    /// Ids of `text` without any special tokens added (scoring a text).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(text, false, "the text")
    }

    /// Tokens in the vocabulary, special and added ones included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS token the model asks to be prepended, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids of a rendered chat prompt: the template writes the special tokens itself, so
    /// none are added, except a BOS the model asks for that the template left out.
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.ids(text, false, "the chat prompt")?;
        let bos = self.bos.filter(|b| ids.first() != Some(b));
        Ok(bos.into_iter().chain(ids).collect())
    }

    /// The id of a token given by its text, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokens that end a turn in common chat formats and are in this vocabulary.
    pub fn end_of_turn_ids(&self) -> Vec<u32> {
        [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
        ]
        .iter()
        .filter_map(|t| self.token_id(t))
        .collect()
    }

    /// Every token's bytes, by id (special tokens marked with llguidance's 0xFF prefix):
    /// the vocabulary constrained decoding matches grammars against.
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))?;
        let json: serde_json::Value = serde_json::from_str(&json)?;
        // llguidance asserts on vocabularies it does not expect: a refusal, not a crash.
        std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| anyhow!("this tokenizer's vocabulary cannot be read as bytes"))?
            .map_err(|e| anyhow!("this tokenizer's vocabulary cannot be read as bytes: {e}"))
    }

    /// Text of `ids`; special tokens (<|im_end|> …) are written out unless skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let literal = |id: &u32| self.literal_pieces.get(id);
        if !ids.iter().any(|id| literal(id).is_some()) {
            return self.decode_run(ids, skip_special);
        }
        let mut text = String::new();
        for run in ids.chunk_by(|a, b| literal(a).is_some() == literal(b).is_some()) {
            match literal(&run[0]) {
                Some(_) => run
                    .iter()
                    .filter_map(literal)
                    .for_each(|p| text.push_str(p)),
                None => text.push_str(&self.decode_run(run, skip_special)?),
            }
        }
        Ok(text)
    }

    fn decode_run(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }
}
