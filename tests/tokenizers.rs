//! GGUF tokenizers against llama.cpp's own tokenizer tests: each vocabulary-only GGUF in
//! tests/fixtures/tokenizers comes with 46 strings and the ids the model's original
//! Hugging Face tokenizer gives them (no BOS, special-looking text read as text).

use std::path::PathBuf;
use tpserve::engine::tokenizer::gpt2_byte_char;
use tpserve::engine::Tokenizer;
use tpserve::loader::gguf::GgufTokenizer;
use tpserve::loader::open_tokenizer;

mod common;

const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn vocab(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizers")
        .join(format!("ggml-vocab-{name}.gguf"))
}

/// The test strings and their expected ids, read as the fixtures' README says.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let path = vocab(name);
    let inp = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
    let mut texts: Vec<&str> = inp.split(SEPARATOR).collect();
    assert_eq!(
        texts.pop(),
        Some(""),
        "the last string ends with the separator"
    );
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|w| w.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: one id line per string");
    texts.into_iter().map(str::to_owned).zip(ids).collect()
}

fn literal_tokenizer(name: &str) -> Tokenizer {
    let mut t = Tokenizer::new(&open_tokenizer(&vocab(name)).unwrap()).unwrap();
    t.set_parse_special(false);
    t
}

fn check(name: &str) {
    let tokenizer = literal_tokenizer(name);
    let mut wrong = vec![];
    for (text, expected) in cases(name) {
        let ids = tokenizer.encode_plain(&text).unwrap();
        if ids != expected {
            wrong.push(format!("{text:?}: got {ids:?}, expected {expected:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{name}: {} wrong\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn sentencepiece_llama_spm() {
    check("llama-spm");
}

#[test]
fn byte_level_gpt_2() {
    check("gpt-2");
}

#[test]
fn byte_level_deepseek_llm() {
    check("deepseek-llm");
}

#[test]
fn byte_level_falcon() {
    check("falcon");
}

/// Decoding gives the text back exactly (SentencePiece drops the `▁` it put first).
#[test]
fn decoding_returns_the_text() {
    for name in ["gpt-2", "deepseek-llm", "falcon", "llama-spm"] {
        let tokenizer = literal_tokenizer(name);
        for (text, ids) in cases(name) {
            let back = tokenizer.decode(&ids, false).unwrap();
            assert_eq!(back, text, "{name}: {ids:?}");
        }
    }
}

/// Control tokens in text are tokens when special parsing is on, text when it is off.
/// SentencePiece writes a character it has no token for as byte tokens (`<0xF0>` …): the
/// whole run decodes to the character, and a run cut short (invalid UTF-8) to U+FFFD, as
/// transformers does, never an error or a panic.
#[test]
fn byte_fallback_runs_decode_whole_or_as_replacement_characters() {
    let t = literal_tokenizer("llama-spm");
    let ids = t.encode("a𝄞b").unwrap();
    assert_eq!(t.decode(&ids, true).unwrap().trim_start(), "a𝄞b");
    // The clef is four byte tokens; cut after two of them.
    let first_byte = ids
        .iter()
        .position(|&id| id > 200 && id < 260)
        .expect("byte tokens");
    let cut = &ids[..first_byte + 2];
    let text = t.decode(cut, true).unwrap();
    assert!(text.ends_with('\u{FFFD}'), "{text:?}");
    assert!(!text.contains('𝄞'), "{text:?}");
}

#[test]
fn control_tokens_parse_only_when_asked() {
    let spec = open_tokenizer(&vocab("llama-spm")).unwrap();
    let mut tokenizer = Tokenizer::new(&spec).unwrap();
    assert_eq!(
        tokenizer.bos_id(),
        Some(1),
        "SentencePiece adds <s> by default"
    );
    assert_eq!(tokenizer.encode("<s>Hi").unwrap()[..2], [1, 1]);
    tokenizer.set_parse_special(false);
    let literal = tokenizer.encode_plain("<s>Hi").unwrap();
    assert!(!literal.contains(&1), "{literal:?}");
    assert_eq!(tokenizer.decode(&literal, false).unwrap(), "<s>Hi");
}

fn tiny_byte_level(tokens: &[&str], pre: Option<&str>) -> GgufTokenizer {
    GgufTokenizer {
        model: "gpt2".into(),
        pre: pre.map(str::to_owned),
        tokens: tokens.iter().map(|s| s.to_string()).collect(),
        token_types: vec![1; tokens.len()],
        merges: vec![],
        scores: vec![],
        bos_id: None,
        unk_id: None,
        sep_id: None,
        add_bos: None,
        add_space_prefix: None,
        chat_template: None,
    }
}

/// A byte the vocabulary cannot write is an error naming it, not a silently dropped
/// character; an unknown pre-tokenizer or tokenizer model is refused by name.
#[test]
fn text_outside_the_vocabulary_and_unknown_kinds_are_errors() {
    let all: Vec<String> = (0..=255u8).map(|b| gpt2_byte_char(b).to_string()).collect();
    let without_z: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|c| *c != "z")
        .collect();
    let t = Tokenizer::from_gguf(&tiny_byte_level(&without_z, Some("gpt-2"))).unwrap();
    assert_eq!(t.encode_plain("ab").unwrap().len(), 2);
    let err = t.encode_plain("abz").unwrap_err().to_string();
    assert!(err.contains("0x7A"), "{err}");

    let err = Tokenizer::from_gguf(&tiny_byte_level(&without_z, Some("martian")))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("martian"), "{err}");
    let mut wordpiece = tiny_byte_level(&without_z, None);
    wordpiece.model = "t5".into();
    let err = Tokenizer::from_gguf(&wordpiece).err().unwrap().to_string();
    assert!(err.contains("t5"), "{err}");
}

/// `tpserve tokenize` / `detokenize` on a vocabulary-only GGUF: the file's exact bytes,
/// `--no-special`, JSON in and out.
#[test]
fn tokenize_and_detokenize_commands() {
    let dir = common::tempdir::Dir::new("tokenize");
    for name in ["llama-spm", "deepseek-llm"] {
        for (i, (text, expected)) in cases(name).into_iter().enumerate().step_by(5) {
            let file = dir.path().join(format!("{name}-{i}.txt"));
            std::fs::write(&file, &text).unwrap();
            let model = vocab(name);
            let ids = common::tpserve_json(&[
                "tokenize",
                "--model",
                model.to_str().unwrap(),
                "--file",
                file.to_str().unwrap(),
                "--no-special",
                "--json",
            ]);
            assert_eq!(ids["ids"], serde_json::json!(expected), "{name} {text:?}");
            let ids_file = dir.path().join(format!("{name}-{i}.json"));
            std::fs::write(&ids_file, ids.to_string()).unwrap();
            let back = common::tpserve_json(&[
                "detokenize",
                "--model",
                model.to_str().unwrap(),
                "--file",
                ids_file.to_str().unwrap(),
                "--json",
            ]);
            assert_eq!(back["text"], text.as_str());
        }
    }
    let err = std::process::Command::new(env!("CARGO_BIN_EXE_tpserve"))
        .args(["detokenize", "--model"])
        .arg(vocab("gpt-2"))
        .args(["--ids", "15496 99999999"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("99999999"));
}

/// WordPiece ("bert") from GGUF metadata as llama.cpp's converter writes it (word starts
/// with `▁`, continuations bare): text lowercased and stripped of accents, split at spaces
/// and punctuation, each word matched longest piece first, an unmatched word `[UNK]`, the
/// whole between `[CLS]` and `[SEP]`. Ids derived by hand from that definition.
#[test]
fn wordpiece_from_gguf_metadata() {
    let tokens = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "▁hello", "▁world", "▁,", "▁!", "▁un", "aff", "able",
        "▁cafe", "▁u", "n",
    ];
    let mut types = vec![1; tokens.len()];
    types[..4].copy_from_slice(&[3, 2, 3, 3]);
    let t = GgufTokenizer {
        model: "bert".into(),
        pre: None,
        tokens: tokens.iter().map(|s| s.to_string()).collect(),
        token_types: types,
        merges: vec![],
        scores: vec![],
        bos_id: Some(2),
        unk_id: Some(1),
        sep_id: Some(3),
        add_bos: Some(true),
        add_space_prefix: None,
        chat_template: None,
    };
    let tok = Tokenizer::from_gguf(&t).unwrap();
    let ids = tok.encode("Hello, WORLD! Unaffable café xyz").unwrap();
    assert_eq!(ids, [2, 4, 6, 5, 7, 8, 9, 10, 11, 1, 3]);
    assert_eq!(tok.encode_plain("unable").unwrap(), [8, 10]);
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "hello, world! unaffable cafe [UNK]"
    );
}
