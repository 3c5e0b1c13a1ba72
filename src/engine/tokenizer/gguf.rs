//! A `tokenizers` tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, to
//! give the ids llama.cpp (and the model's original Hugging Face tokenizer) give:
//! byte-level BPE ("gpt2") with its pre-tokenizer's regexes, SentencePiece ("llama")
//! with scores, `▁` for spaces and `<0xNN>` byte fallback, and WordPiece ("bert").

use super::pretokenizers;
use crate::loader::gguf::GgufTokenizer;
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// llama.cpp's token types that are not ordinary text.
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// SentencePiece's visible space.
const SPACE_MARK: &str = "\u{2581}";

/// What the rebuilt tokenizer needs beside the `tokenizers` object.
pub struct Built {
    pub inner: tokenizers::Tokenizer,
    /// The BOS id to put before a prompt, if the model wants one.
    pub bos: Option<u32>,
    /// Bytes that a byte-level vocabulary cannot write (text holding them is refused).
    pub missing_bytes: Vec<u8>,
    /// User-defined tokens, whose text is written as it is, not through the decoder
    /// (llama.cpp's `token_to_piece`): DeepSeek's "ü" is a token of its own.
    pub literal_pieces: HashMap<u32, String>,
}

pub fn build(t: &GgufTokenizer) -> Result<Built> {
    check_lengths(t)?;
    let pre = t.pre.as_deref();
    let (mut inner, bos_by_default, missing_bytes) = match t.model.as_str() {
        "gpt2" => {
            let (inner, missing) = byte_level_bpe(t)?;
            (inner, pretokenizers::adds_bos(pre), missing)
        }
        "llama" => (sentencepiece(t)?, true, vec![]),
        // [CLS] and [SEP] come from the post-processor, so no BOS of ours.
        "bert" => (wordpiece(t)?, false, vec![]),
        other => bail!(
            "GGUF tokenizer model `{other}` is not supported (tpserve reads byte-level BPE, \
             \"gpt2\", SentencePiece, \"llama\", and WordPiece, \"bert\")"
        ),
    };
    add_special_tokens(&mut inner, t)?;
    let wants_bos = t.model != "bert" && t.add_bos.unwrap_or(bos_by_default);
    let literal_pieces = (0..t.tokens.len())
        .filter(|&i| t.token_types[i] == USER_DEFINED)
        .map(|i| (i as u32, t.tokens[i].clone()))
        .collect();
    Ok(Built {
        inner,
        bos: t.bos_id.filter(|_| wants_bos),
        missing_bytes,
        literal_pieces,
    })
}

/// Every per-token array has one entry per token, and the special ids name tokens.
fn check_lengths(t: &GgufTokenizer) -> Result<()> {
    let n = t.tokens.len();
    if n == 0 {
        bail!("the GGUF tokenizer has no tokens");
    }
    if t.token_types.len() != n {
        bail!(
            "tokenizer.ggml.token_type has {} entries for {n} tokens",
            t.token_types.len()
        );
    }
    if t.model == "llama" && t.scores.len() != n {
        bail!(
            "tokenizer.ggml.scores has {} entries for {n} tokens",
            t.scores.len()
        );
    }
    for (what, id) in [("bos", t.bos_id), ("unknown", t.unk_id)] {
        if let Some(id) = id.filter(|&id| id as usize >= n) {
            bail!("the {what} token id {id} is outside the vocabulary of {n} tokens");
        }
    }
    Ok(())
}

/// Control tokens (<|im_start|>, <s> …) are matched whole in text unless special-token
/// parsing is off; user-defined ones always (llama.cpp's partition of the text).
fn add_special_tokens(inner: &mut tokenizers::Tokenizer, t: &GgufTokenizer) -> Result<()> {
    let added = |ty: i32| -> Vec<AddedToken> {
        t.tokens
            .iter()
            .zip(&t.token_types)
            .filter(|(_, &x)| x == ty)
            .map(|(s, _)| AddedToken::from(s.clone(), ty == CONTROL).normalized(false))
            .collect()
    };
    inner
        .add_special_tokens(added(CONTROL))
        .map_err(|e| anyhow!("cannot register the control tokens: {e}"))?;
    inner
        .add_tokens(added(USER_DEFINED))
        .map_err(|e| anyhow!("cannot register the user-defined tokens: {e}"))?;
    Ok(())
}

fn vocabulary(t: &GgufTokenizer) -> Vocab {
    t.tokens
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .collect()
}

/// Byte-level BPE from the merges, after the pre-tokenizer's regexes.
fn byte_level_bpe(t: &GgufTokenizer) -> Result<(tokenizers::Tokenizer, Vec<u8>)> {
    let vocab = vocabulary(t);
    let missing_bytes = (0..=255u8)
        .filter(|&b| !vocab.contains_key(&gpt2_byte_char(b).to_string()))
        .collect();
    let merges = t
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| anyhow!("BPE merge {m:?} is not two tokens separated by a space"))
        })
        .collect::<Result<Vec<_>>>()?;
    // Checked here: `tokenizers` panics on a merge longer than every token.
    for (a, b) in &merges {
        let joined = format!("{a}{b}");
        for part in [a, b, &joined] {
            if !vocab.contains_key(part) {
                bail!("BPE merge {a:?} + {b:?}: {part:?} is not in the vocabulary");
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pretokenizers::ignores_merges(t.pre.as_deref()))
        .build()
        .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let mut steps: Vec<PreTokenizerWrapper> = vec![];
    for regex in pretokenizers::regexes(t.pre.as_deref())? {
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("pre-tokenizer regex {regex:?} does not compile: {e}"))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    inner.with_pre_tokenizer(Some(Sequence::new(steps)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok((inner, missing_bytes))
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the others for
/// the code points from 256 up, in byte order.
pub fn gpt2_byte_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("below 0x200 every value is a char")
}

/// SentencePiece BPE: pieces merge best score first, which a BPE model reproduces with
/// every (left, right) split of every piece as a merge, ranked by the piece's score.
fn sentencepiece(t: &GgufTokenizer) -> Result<tokenizers::Tokenizer> {
    if t.scores.len() != t.tokens.len() {
        bail!("a SentencePiece (\"llama\") vocabulary needs tokenizer.ggml.scores");
    }
    let vocab = vocabulary(t);
    let has_all_bytes = (0..=255u8).all(|b| vocab.contains_key(&format!("<0x{b:02X}>")));
    let unk = t.unk_id.map(|id| t.tokens[id as usize].clone());
    if !has_all_bytes && unk.is_none() {
        bail!(
            "this SentencePiece vocabulary has neither all 256 <0xNN> byte tokens nor an \
             unknown token: some text could not be written in it"
        );
    }
    let merges = scored_merges(t, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(has_all_bytes)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow!("cannot build the SentencePiece model: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let space_prefix = t.add_space_prefix.unwrap_or(true);
    let replace = Replace::new(" ", SPACE_MARK).map_err(|e| anyhow!("{e}"))?;
    let normalizer = if space_prefix {
        NormalizerSequence::new(vec![Prepend::new(SPACE_MARK.into()).into(), replace.into()])
    } else {
        NormalizerSequence::new(vec![replace.into()])
    };
    inner
        .with_normalizer(Some(normalizer))
        .map_err(|e| anyhow!("cannot set the SentencePiece normalizer: {e}"))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE_MARK, " ")
            .map_err(|e| anyhow!("{e}"))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// WordPiece as BERT's tokenizer runs it: text cleaned, lowercased and stripped of accents,
/// CJK characters apart, split at spaces and punctuation, each word matched longest
/// piece first (an unmatched word is `[UNK]`), then `[CLS] … [SEP]`. llama.cpp's converter
/// writes word-initial pieces with a leading `▁` and continuations bare (`##ing` → `ing`);
/// they are turned back into BERT's spelling here. llama.cpp's tokenizer always lowercases.
fn wordpiece(t: &GgufTokenizer) -> Result<tokenizers::Tokenizer> {
    let bert_spelling = |token: &str| match token.strip_prefix(SPACE_MARK) {
        Some(word) => word.to_owned(),
        None if token.starts_with('[') && token.ends_with(']') => token.to_owned(),
        None => format!("##{token}"),
    };
    let vocab: Vocab = t
        .tokens
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let special = matches!(t.token_types[i], CONTROL | UNKNOWN);
            let s = if special { s.clone() } else { bert_spelling(s) };
            (s, i as u32)
        })
        .collect();
    let named = |id: Option<u32>, name: &str, default: u32| -> Result<(String, u32)> {
        let id = id.unwrap_or(default);
        let token = t
            .tokens
            .get(id as usize)
            .ok_or_else(|| anyhow!("this WordPiece vocabulary has no {name} token (id {id})"))?;
        Ok((token.clone(), id))
    };
    // llama.cpp's defaults for BERT vocabularies: [UNK] 100, [CLS] 101, [SEP] 102.
    let (unk, _) = named(t.unk_id, "unknown", 100)?;
    let cls = named(t.bos_id, "[CLS]", 101)?;
    let sep = named(t.sep_id, "[SEP]", 102)?;
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token(unk)
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| anyhow!("cannot build the WordPiece model: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    inner
        .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(|e| anyhow!("cannot set the WordPiece normalizer: {e}"))?;
    inner.with_pre_tokenizer(Some(BertPreTokenizer));
    inner.with_post_processor(Some(BertProcessing::new(sep, cls)));
    inner.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    Ok(inner)
}

/// Every way to write an ordinary piece as two pieces, best-scoring piece first.
fn scored_merges(t: &GgufTokenizer, vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, u32)> = vec![];
    for (id, piece) in t.tokens.iter().enumerate() {
        if !matches!(t.token_types[id], 1 | USER_DEFINED) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((t.scores[id], id as u32, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    ranked
        .into_iter()
        .map(|(_, _, l, r)| (t.tokens[l as usize].clone(), t.tokens[r as usize].clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_map_is_a_bijection_onto_its_known_range() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(gpt2_byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(gpt2_byte_char(b' '), 'Ġ');
        assert_eq!(gpt2_byte_char(b'\n'), 'Ċ');
        assert_eq!(gpt2_byte_char(b'A'), 'A');
    }
}
