//! Text to token ids and back, through the `tokenizers` crate: from a Hugging Face
//! tokenizer.json, or rebuilt from a GGUF file's tokenizer metadata.

use crate::loader::gguf::GgufTokenizer;
use crate::loader::TokenizerSpec;
use anyhow::{anyhow, bail, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by us, not by the tokenizer (GGUF's add_bos_token).
    bos: Option<u32>,
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
        Ok(Tokenizer { inner, bos: None })
    }

    /// Byte-level BPE ("gpt2" in llama.cpp's terms) from the vocabulary and merges.
    pub fn from_gguf(t: &GgufTokenizer) -> Result<Self> {
        if t.model != "gpt2" {
            bail!(
                "GGUF tokenizer model `{}` is not supported yet (tpserve reads byte-level BPE, \"gpt2\")",
                t.model
            );
        }
        let vocab: tokenizers::models::bpe::Vocab = t
            .tokens
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let merges = t
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| {
                        anyhow!("BPE merge {m:?} is not two tokens separated by a space")
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match t.pre.as_deref() {
            // SmolLM splits digits one by one before GPT-2's byte-level split.
            Some("smollm") => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens (<|im_start|> …) match as whole tokens in text.
        let special: Vec<AddedToken> = t
            .tokens
            .iter()
            .zip(&t.token_types)
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| anyhow!("cannot register the special tokens: {e}"))?;
        Ok(Tokenizer {
            inner,
            bos: t.bos_id.filter(|_| t.add_bos),
        })
    }

    /// Ids of `text`, with the special tokens the tokenizer adds (as transformers'
    /// `tokenizer(text)` does, or llama.cpp's add_bos_token).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?;
        Ok(self
            .bos
            .into_iter()
            .chain(enc.get_ids().iter().copied())
            .collect())
    }

    /// Ids of `text` without any special tokens added (scoring a text).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize the text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The BOS token the model asks to be prepended, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids of a rendered chat prompt: the template writes the special tokens itself, so
    /// none are added, except a BOS the model asks for that the template left out.
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize the chat prompt: {e}"))?;
        let ids = enc.get_ids();
        let bos = self.bos.filter(|b| ids.first() != Some(b));
        Ok(bos.into_iter().chain(ids.iter().copied()).collect())
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
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }
}
