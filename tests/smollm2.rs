//! The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched by scripts/fetch-model) against
//! references from llama.cpp, transformers and the gguf Python package.

mod common;

use serde::Deserialize;
use std::path::PathBuf;
use tpserve::engine::{self, GenerateRequest, GroupOptions, SamplingParams, Tokenizer};
use tpserve::loader::{self, gguf::GgufFile};

fn model_path() -> PathBuf {
    common::smollm2()
}

fn fixture_json<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[derive(Deserialize)]
struct Reference {
    tokenizer_cases: Vec<TokenizerCase>,
    greedy: Vec<GreedyCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    name: String,
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct GreedyCase {
    input_ids: Vec<u32>,
    transformers_f32_dequant: Ids,
    llama_cpp_q4_1: Ids,
}

#[derive(Deserialize)]
struct Ids {
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct DequantRows {
    tensors: Vec<DequantTensor>,
}

#[derive(Deserialize)]
struct DequantTensor {
    name: String,
    shape: Vec<usize>,
    rows: std::collections::HashMap<String, Vec<f32>>,
}

#[test]
fn dequantized_rows_match_the_gguf_python_reader() {
    let file = GgufFile::open(&model_path()).unwrap();
    let fixture: DequantRows = fixture_json("dequant-rows.json");
    for t in &fixture.tensors {
        assert_eq!(file.tensors[&t.name].shape, t.shape, "{}", t.name);
        for (row, want) in &t.rows {
            let rows: Vec<usize> = match row.as_str() {
                "all" => vec![0],
                r => vec![r.parse().unwrap()],
            };
            let got = file.dequantize_row(&t.name, rows[0]).unwrap();
            assert_eq!(got.len(), want.len());
            for (j, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6,
                    "{} row {row} col {j}: {g} vs {w}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn tokenizer_from_gguf_metadata_matches_llama_cpp() {
    let files = loader::open_model(&model_path()).unwrap();
    let tokenizer =
        Tokenizer::new(files.tokenizer.as_ref().expect("the GGUF has a tokenizer")).unwrap();
    let reference: Reference = fixture_json("reference.json");
    for case in &reference.tokenizer_cases {
        assert_eq!(
            tokenizer.encode(&case.text).unwrap(),
            case.ids,
            "case {}",
            case.name
        );
        assert_eq!(
            tokenizer.decode(&case.ids, false).unwrap(),
            case.decoded,
            "case {}",
            case.name
        );
    }
}

fn greedy(tp: usize, input_ids: &[u32], n: usize) -> Vec<u32> {
    let files = loader::open_model(&model_path()).unwrap();
    let opts = GroupOptions::single_sequence(tp, Some(1), input_ids.len() + n);
    let request = GenerateRequest {
        input_ids: input_ids.to_vec(),
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
        prompt_top: 0,
    };
    engine::run_local(files.tensors.as_ref(), &files.config, &opts, |d| {
        engine::generate(d, &request)
    })
    .unwrap()
    .output_ids
}

/// tpserve agrees with llama.cpp and transformers for as long as those two agree with each
/// other (their arithmetic differs), at tp 1, 2 (9 heads split 4 + 5) and 3.
#[test]
fn greedy_continuations_agree_with_the_references_at_every_tp() {
    let reference: Reference = fixture_json("reference.json");
    for case in &reference.greedy {
        let (a, b) = (&case.transformers_f32_dequant.ids, &case.llama_cpp_q4_1.ids);
        let agree = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        assert!(agree >= 5, "the references should agree on a prefix");
        let base = greedy(1, &case.input_ids, 16);
        assert_eq!(
            base[..agree],
            a[..agree],
            "tp 1 against the common prefix of the references"
        );
        for tp in [2, 3] {
            assert_eq!(
                greedy(tp, &case.input_ids, 16),
                base,
                "tp {tp} against tp 1"
            );
        }
    }
}

#[test]
fn the_capital_of_france_from_the_command_line() {
    let model = model_path();
    for tp in ["1", "2", "3"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tpserve"))
            .args(["generate", "--model", model.to_str().unwrap(), "--tp", tp])
            .args([
                "--prompt",
                "The capital of France is",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.starts_with(" Paris."), "tp {tp}: {text:?}");
    }
}

/// Pipeline stages over SmolLM2's 30 layers, uneven at 4 (8, 7, 8, 7 layers) and 7 (4
/// and 5), alone and with tp 2 and 3 in each stage: the greedy ids and prompt logits of
/// tp 1, bit for bit.
#[test]
fn pipeline_stages_give_the_bits_of_tp_1() {
    let model = model_path();
    let generate = |layout: &[&str]| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap()];
        args.extend([
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "16",
        ]);
        args.extend(["--temperature", "0", "--json"]);
        args.extend(layout);
        common::tpserve_json(&args)
    };
    let one = generate(&["--tp", "1"]);
    for layout in [
        &["--pp-size", "4"][..],
        &["--pp-size", "7"],
        &["--tp", "2", "--pp-size", "2"],
        &["--tp", "3", "--pp-size", "2"],
    ] {
        let got = generate(layout);
        assert_eq!(got["output_ids"], one["output_ids"], "{layout:?}");
        assert_eq!(
            got["prompt_logits_top"], one["prompt_logits_top"],
            "{layout:?}: logits bit for bit"
        );
    }
}

/// llama.cpp's perplexity method on a text every machine has, within 1% of its figure;
/// in pipeline stages (every position's logits through the stages), the same figure as
/// tp 1 to the last bit.
#[test]
fn perplexity_matches_llama_cpp_at_tp_1_and_3() {
    #[derive(Deserialize)]
    struct Ppl {
        file: String,
        ctx: usize,
        llama_cpp_ppl: f64,
    }
    #[derive(Deserialize)]
    struct Reference {
        perplexity: Vec<Ppl>,
    }
    let reference: Reference = fixture_json("reference.json");
    let case = &reference.perplexity[0];
    assert!(
        std::path::Path::new(&case.file).exists(),
        "{} is missing",
        case.file
    );
    let model = model_path();
    let ctx = case.ctx.to_string();
    let perplexity = |layout: &[&str]| {
        let mut args = vec!["perplexity", "--model", model.to_str().unwrap(), "--json"];
        args.extend(["--file", &case.file, "--ctx", &ctx]);
        args.extend(layout);
        common::tpserve_json(&args)["ppl"].as_f64().unwrap()
    };
    let tp1 = perplexity(&["--tp", "1"]);
    for (tp, ppl) in [("1", tp1), ("3", perplexity(&["--tp", "3"]))] {
        let rel = (ppl - case.llama_cpp_ppl).abs() / case.llama_cpp_ppl;
        assert!(
            rel < 0.01,
            "tp {tp}: perplexity {ppl} vs llama.cpp {}",
            case.llama_cpp_ppl
        );
    }
    assert_eq!(perplexity(&["--pp-size", "3"]).to_bits(), tp1.to_bits());
}

/// Overlap and fused all-reduce on the quantized model: the same logits bit for bit,
/// prefill (split by tokens) and decode (split by rows on 8-row group boundaries).
#[test]
fn communication_optimisations_keep_every_bit() {
    use tpserve::kernels::Phase;
    use tpserve::model::{ForwardOptions, Logits};
    let files = loader::open_model(&model_path()).unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| 100 + 37 * i).collect();
    let run = |tp: usize, on: bool| {
        let mut opts = GroupOptions::single_sequence(tp, Some(1), prompt.len() + 8);
        opts.forward = ForwardOptions {
            overlap: on,
            fused_allreduce: on,
            ..Default::default()
        };
        engine::run_local(files.tensors.as_ref(), &files.config, &opts, |d| {
            let mut logits = d
                .forward_one(&prompt, 0, Logits::Last, Phase::Prefill)?
                .to_vec();
            for step in 0..8 {
                let token = 200 + step as u32;
                let pos = prompt.len() + step;
                logits.extend(d.forward_one(&[token], pos, Logits::Last, Phase::Decode)?);
            }
            Ok(logits)
        })
        .unwrap()
    };
    for tp in [2, 3] {
        assert!(run(tp, true) == run(tp, false), "tp {tp}");
    }
}

/// Batch invariance on the quantized model (grouped Q4_1/Q8_0 rows, whose multi-token
/// kernels serve batches and whose one-token kernels serve a lone decode): one sequence
/// prefilled and decoded alone gives, bit for bit, the logits it gets in a batch of 16
/// sequences of other lengths, at tp 1 and tp 2.
#[test]
fn a_sequence_alone_equals_it_in_a_batch_of_16() {
    let files = loader::open_model(&model_path()).unwrap();
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| (0..5 + i).map(|j| (100 + 31 * i + 7 * j) as u32).collect())
        .collect();
    let feed: Vec<u32> = (0..5).map(|s| 300 + 11 * s).collect();
    for tp in [1, 2] {
        let (alone, batched) = common::alone_and_batched(&files, tp, &prompts, &feed, 9);
        assert!(
            common::bits(&alone) == common::bits(&batched),
            "tp {tp}: batched logits differ from alone"
        );
    }
}
