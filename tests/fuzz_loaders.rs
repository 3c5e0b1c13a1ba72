//! Fuzzing of the parsers that read a model folder's untrusted bytes — the safetensors
//! header and index, `config.json`, GGUF tokenizer metadata and chat templates: whatever
//! the input, the answer is a value or a clear error, never a panic or a hang.
//!
//! CI runs a short pass (`FUZZ_CASES`, default 300 per target); a long one:
//! `FUZZ_CASES=1000000 cargo test --release --test fuzz_loaders`.

mod common;

use common::tempdir;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tpserve::engine::{ChatMessage, ChatTemplate, Tokenizer};
use tpserve::loader::gguf::GgufTokenizer;
use tpserve::loader::{open_model, ModelConfig};

fn runner() -> TestRunner {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs `f`; a panic fails the case with its input.
fn no_panic<T>(input: &dyn std::fmt::Debug, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|_| TestCaseError::fail(format!("panicked on {input:?}")))
}

/// JSON values at the edges of what a field might hold.
fn edge_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(3)),
        Just(json!(64)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1u64 << 40)),
        Just(json!(1e308)),
        Just(json!(-0.5)),
        Just(json!(0.5)),
        Just(json!(null)),
        Just(json!(true)),
        Just(json!("")),
        Just(json!("llama")),
        Just(json!([])),
        Just(json!([1, 2])),
        Just(json!({})),
        any::<i32>().prop_map(|v| json!(v)),
        "[a-z_]{0,12}".prop_map(|v| json!(v)),
    ]
}

// ---------------------------------------------------------------- config.json

const CONFIG_FIELDS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "mlp_only_layers",
    "decoder_sparse_step",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "hidden_activation",
    "hidden_act",
    "partial_rotary_factor",
    "eos_token_id",
    "bos_token_id",
];

fn tiny_llama_config() -> Value {
    let text = std::fs::read_to_string(common::fixture("tiny-llama").join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A real config with fields replaced or removed, or an object of random fields.
fn config_json() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(CONFIG_FIELDS);
    let edits = prop::collection::vec((field, prop::option::of(edge_value())), 1..6);
    let base = tiny_llama_config();
    let random = prop::collection::vec((prop::sample::select(CONFIG_FIELDS), edge_value()), 0..12)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    prop_oneof![
        edits.prop_map(move |edits| {
            let mut v = base.clone();
            for (k, value) in edits {
                match value {
                    Some(value) => v[k] = value,
                    None => {
                        v.as_object_mut().unwrap().remove(k);
                    }
                }
            }
            v
        }),
        random,
        edge_value(),
    ]
}

#[test]
fn no_config_json_makes_the_loader_panic() {
    runner()
        .run(&config_json(), |json| {
            let cfg = no_panic(&json, || ModelConfig::from_hf_json(&json))?;
            if let Ok(cfg) = cfg {
                for tp in 1..=4 {
                    let _ = no_panic(&json, || tpserve::engine::runtime::validate_tp(&cfg, tp))?;
                }
            }
            Ok(())
        })
        .unwrap();
}

// ------------------------------------------------------------------ safetensors

/// A small valid safetensors file: a few tensors of each float type.
fn safetensors_bytes() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let data: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8 + 1; 4 * 6 * 4]).collect();
    let views = [
        ("a.weight", Dtype::F32, vec![4, 6], &data[0][..]),
        ("b.weight", Dtype::F16, vec![8, 6], &data[1][..]),
        ("c.weight", Dtype::BF16, vec![6, 8], &data[2][..]),
    ];
    let tensors: Vec<(&str, TensorView)> = views
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            (
                *name,
                TensorView::new(*dtype, shape.clone(), &bytes[..len]).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(tensors, None).unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(Vec<(usize, u8)>),
    Header(Value),
}

fn header_json() -> impl Strategy<Value = Value> {
    let entry = (
        prop::sample::select(&["F32", "F16", "BF16", "I8", "F64", "Q4", ""][..]),
        prop::collection::vec(prop_oneof![0u64..10, Just(u64::MAX), Just(1 << 33)], 0..4),
        (
            prop_oneof![0u64..200, Just(u64::MAX)],
            prop_oneof![0u64..400, Just(u64::MAX)],
        ),
    )
        .prop_map(|(dtype, shape, (a, b))| {
            json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]})
        });
    prop::collection::vec(
        (
            prop::sample::select(&["a.weight", "b.weight", "__metadata__", "x"][..]),
            prop_oneof![entry, edge_value()],
        ),
        0..4,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

fn mutation(len: usize) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..len).prop_map(Mutation::Truncate),
        prop::collection::vec((0..len.min(400), any::<u8>()), 1..8).prop_map(Mutation::Flip),
        header_json().prop_map(Mutation::Header),
    ]
}

fn apply(file: &[u8], m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Truncate(n) => file[..*n].to_vec(),
        Mutation::Flip(flips) => {
            let mut f = file.to_vec();
            for &(at, v) in flips {
                f[at] ^= v.max(1);
            }
            f
        }
        Mutation::Header(h) => {
            let header = h.to_string();
            let mut f = (header.len() as u64).to_le_bytes().to_vec();
            f.extend(header.as_bytes());
            f.extend(vec![7u8; 400]);
            f
        }
    }
}

/// Opens the folder and reads every tensor the loader lists, whole.
fn open_and_read(dir: &std::path::Path) {
    let Ok(files) = open_model(dir) else { return };
    for name in ["a.weight", "b.weight", "c.weight", "x"] {
        if let Some(shape) = files.tensors.shape(name) {
            if let [rows, cols] = shape[..] {
                let _ = files.tensors.slice_bytes(name, rows, cols);
                if rows.saturating_mul(cols) <= 1 << 20 {
                    let _ = files.tensors.read_block(name, 0..rows, 0..cols);
                }
            }
        }
    }
}

#[test]
fn no_safetensors_file_or_index_makes_the_loader_panic() {
    let file = safetensors_bytes();
    let config = tiny_llama_config().to_string();
    let tmp = tempdir::Dir::new("fuzz-safetensors");
    let dir = tmp.path();
    std::fs::write(dir.join("config.json"), &config).unwrap();
    let index = (
        prop::collection::vec(
            (
                prop::sample::select(&["a.weight", "b.weight", "c.weight"][..]),
                prop::sample::select(
                    &[
                        "model-1.safetensors",
                        "missing.safetensors",
                        "../config.json",
                        "",
                        "/",
                    ][..],
                ),
            ),
            0..4,
        ),
        any::<bool>(),
    );
    let case = (mutation(file.len()), prop::option::of(index));
    runner()
        .run(&case, |(m, index)| {
            for f in [
                "model.safetensors",
                "model-1.safetensors",
                "model.safetensors.index.json",
            ] {
                let _ = std::fs::remove_file(dir.join(f));
            }
            let bytes = apply(&file, &m);
            match &index {
                None => std::fs::write(dir.join("model.safetensors"), &bytes).unwrap(),
                Some((map, valid_json)) => {
                    std::fs::write(dir.join("model-1.safetensors"), &bytes).unwrap();
                    let map: serde_json::Map<String, Value> =
                        map.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
                    let text = json!({"weight_map": map}).to_string();
                    let text = if *valid_json {
                        text
                    } else {
                        text[..text.len() / 2].to_owned()
                    };
                    std::fs::write(dir.join("model.safetensors.index.json"), text).unwrap();
                }
            }
            no_panic(&(&m, &index), || open_and_read(dir))
        })
        .unwrap();
}

// ------------------------------------------------------------ tokenizer metadata

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zĠ▁]{1,4}",
        Just("<0x41>".to_owned()),
        Just("<0xZZ>".to_owned()),
        Just("<s>".to_owned()),
        Just(String::new()),
        any::<char>().prop_map(String::from),
    ]
}

/// Per-token arrays mostly as long as the vocabulary (so that building goes on), sometimes not.
fn per_token<T: std::fmt::Debug + 'static>(
    n: usize,
    item: impl Strategy<Value = T> + Clone + 'static,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        9 => prop::collection::vec(item.clone(), n..=n).boxed(),
        1 => prop::collection::vec(item, 0..n + 2).boxed(),
    ]
    .boxed()
}

fn gguf_tokenizer() -> impl Strategy<Value = GgufTokenizer> {
    prop::collection::vec(token(), 1..40).prop_flat_map(|tokens| {
        let n = tokens.len();
        (
            Just(tokens),
            // Mostly models tpserve reads, so that most inputs get past the first check.
            prop::sample::select(&["gpt2", "gpt2", "gpt2", "llama", "llama", "llama", "bert", ""][..]),
            prop::option::of(prop::sample::select(
                &["smollm", "llama3", "qwen2", "default", "nope"][..],
            )),
            per_token(n, prop_oneof![Just(1i32), -1i32..8]),
            prop_oneof![
                9 => prop::collection::vec((0..n, 0..n), 0..20)
                    .prop_map(|pairs| pairs.into_iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>())
                    .boxed(),
                1 => prop::collection::vec("[a-zĠ▁]{1,3} [a-zĠ▁]{1,3}|[a-z]{0,3}", 0..20).boxed(),
            ],
            per_token(
                n,
                prop_oneof![-10.0f32..10.0, Just(f32::NAN), Just(f32::INFINITY)],
            ),
            (
                prop::option::of(0u32..n as u32 + 2),
                prop::option::of(0u32..n as u32 + 2),
                prop::option::of(any::<bool>()),
                prop::option::of(any::<bool>()),
            ),
        )
            .prop_map(|(tokens, model, pre, token_types, merges, scores, ids)| {
                let (bos_id, unk_id, add_bos, add_space_prefix) = ids;
                // Index pairs ("3 7") become merges of those two tokens.
                let merge = |m: String| match m.split_once(' ') {
                    Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                        (Ok(a), Ok(b)) => format!("{} {}", tokens[a], tokens[b]),
                        _ => m,
                    },
                    None => m,
                };
                let merges = merges.into_iter().map(merge).collect();
                GgufTokenizer {
                    model: model.to_owned(),
                    pre: pre.map(str::to_owned),
                    tokens,
                    token_types,
                    merges,
                    scores,
                    bos_id,
                    unk_id,
                    sep_id: None,
                    add_bos,
                    add_space_prefix,
                    chat_template: None,
                }
            })
    })
}

#[test]
fn no_tokenizer_metadata_makes_the_tokenizer_panic() {
    let case = (
        gguf_tokenizer(),
        "\\PC{0,20}",
        prop::collection::vec(0u32..60, 0..10),
    );
    let built = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = runner();
    let cases = runner.config().cases as usize;
    runner
        .run(&case, |(t, text, ids)| {
            no_panic(&t, || {
                if let Ok(tok) = Tokenizer::from_gguf(&t) {
                    built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = tok.encode(&text);
                    let _ = tok.encode_chat(&text);
                    let _ = tok.decode(&ids, false);
                }
            })
        })
        .unwrap();
    // The inputs reach encoding and decoding, not only the checks that refuse them. About
    // one in seven builds; the bound sits far below that so that no seed fails it by chance.
    assert!(
        built.into_inner() >= cases / 25,
        "too few vocabularies built"
    );
}

// ---------------------------------------------------------------- chat templates

/// Template text made of Jinja pieces, including loops that would run for ever without
/// a limit and output that would grow without one.
fn template() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{% for m in messages %}".to_owned()),
        Just("{% endfor %}".to_owned()),
        Just("{% if add_generation_prompt %}".to_owned()),
        Just("{% endif %}".to_owned()),
        Just("{{ m.content }}".to_owned()),
        Just("{{ m['role'] | upper }}".to_owned()),
        Just("{{ messages[0].content.strip() }}".to_owned()),
        Just("{{ raise_exception('no') }}".to_owned()),
        Just(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                .to_owned()
        ),
        Just("{{ 'x' * 100000000 }}".to_owned()),
        Just("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".to_owned()),
        Just("{{ messages | tojson }}".to_owned()),
        Just("{{ bos_token }}{{ eos_token }}".to_owned()),
        Just("{% set ns = namespace(a=1) %}{{ ns.a }}".to_owned()),
        "[a-z{}%# ]{0,8}",
    ];
    prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
}

#[test]
fn no_chat_template_makes_the_server_panic_or_hang() {
    let messages = [
        ChatMessage::new("system", "be brief"),
        ChatMessage::new("user", "hi"),
    ];
    runner()
        .run(&template(), |source| {
            let started = std::time::Instant::now();
            no_panic(&source, || {
                if let Ok(t) = ChatTemplate::new(&source, "<s>", "</s>") {
                    let _ = t.render(&messages, true);
                }
            })?;
            prop_assert!(
                started.elapsed().as_secs() < 10,
                "{source:?} took {:?}",
                started.elapsed()
            );
            Ok(())
        })
        .unwrap();
}

// ------------------------------------------- regression tests: what fuzzing found

fn small_bpe() -> GgufTokenizer {
    GgufTokenizer {
        model: "gpt2".into(),
        pre: Some("default".into()),
        tokens: ["a", "b", "ab"].map(String::from).to_vec(),
        token_types: vec![1, 1, 1],
        merges: vec!["a b".into()],
        scores: vec![],
        bos_id: None,
        unk_id: None,
        sep_id: None,
        add_bos: None,
        add_space_prefix: None,
        chat_template: None,
    }
}

#[test]
fn found_by_fuzzing_token_types_shorter_than_the_vocabulary() {
    assert!(Tokenizer::from_gguf(&small_bpe()).is_ok());
    let mut t = small_bpe();
    t.token_types.pop();
    let err = Tokenizer::from_gguf(&t).err().expect("refused").to_string();
    assert!(
        err.contains("token_type has 2 entries for 3 tokens"),
        "{err}"
    );
}

#[test]
fn found_by_fuzzing_a_merge_longer_than_every_token() {
    let mut t = small_bpe();
    t.merges.push("ab ab".into());
    let err = format!("{:#}", Tokenizer::from_gguf(&t).err().expect("refused"));
    assert!(err.contains("\"abab\" is not in the vocabulary"), "{err}");
}

#[test]
fn found_by_fuzzing_a_template_that_loops_for_ever() {
    let source =
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
    let t = ChatTemplate::new(source, "", "").unwrap();
    let started = std::time::Instant::now();
    let err = t
        .render(&[ChatMessage::new("user", "hi")], true)
        .unwrap_err();
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    assert!(err.to_string().contains("fuel"), "{err}");
}
