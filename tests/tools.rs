//! The measuring tools: `tpserve bench` reports every case with each rank's share of the
//! model, `tpserve synth` writes models that load and split like real ones.

mod common;

use std::process::Command;
use tpserve::engine::{self, GenerateRequest, GroupOptions, SamplingParams, Tokenizer};
use tpserve::loader::{self, ModelConfig};
use tpserve::synth::{synth, SynthQuant, SynthRequest};

#[test]
fn bench_reports_every_case_with_each_ranks_share() {
    // 8 heads over 4 kv heads: no kv head is replicated at tp 1, 2 or 4.
    let model = common::fixture("tiny-llama");
    let v = common::tpserve_json(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--tp",
        "1,2,4",
        "--batch-size",
        "1,2",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--runs",
        "1",
        "--json",
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    let total = |r: &serde_json::Value| -> u64 {
        let parts = r["weight_bytes_per_rank"].as_array().unwrap();
        assert_eq!(parts.len() as u64, r["tp"].as_u64().unwrap());
        parts.iter().map(|p| p.as_u64().unwrap()).sum()
    };
    let whole = total(&results[0]);
    // Every rank keeps its own copy of the norms; the rest is split without overlap.
    let replicated = total(&results[2]) - whole;
    assert!(replicated > 0 && replicated < whole / 50, "{replicated}");
    for (r, (tp, batch)) in results
        .iter()
        .zip([(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)])
    {
        assert_eq!(
            (r["tp"].as_u64(), r["batch_size"].as_u64()),
            (Some(tp), Some(batch))
        );
        assert_eq!(r["threads_per_rank"], 1);
        for key in ["prefill_tok_s", "decode_tok_s", "tpot_ms", "roofline_tok_s"] {
            let x = r[key].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{key} = {x}");
        }
        // The ranks hold the whole model between them, each about its share.
        assert_eq!(total(r), whole + (tp - 1) * replicated, "tp {tp}");
        for part in r["weight_bytes_per_rank"].as_array().unwrap() {
            assert!(part.as_u64().unwrap() as f64 <= 1.5 * whole as f64 / tp as f64);
        }
    }
    let bandwidth = v["machine"]["read_bandwidth_gb_s"].as_object().unwrap();
    let threads: Vec<&str> = bandwidth.keys().map(String::as_str).collect();
    assert_eq!(threads, ["1", "2", "4"]);
}

#[test]
fn bench_and_synth_refuse_bad_input() {
    let model = common::fixture("tiny-llama");
    let model = model.to_str().unwrap();
    let dir = tempdir();
    let out = dir.join("x.gguf");
    let out = out.to_str().unwrap();
    std::fs::write(out, b"keep me").unwrap();
    for (args, needle) in [
        (vec!["bench", "--model", model, "--tp", "0"], "--tp"),
        (
            vec!["bench", "--model", model, "--batch-size", "0"],
            "--batch-size",
        ),
        (vec!["bench", "--model", model, "--runs", "0"], "--runs"),
        (
            vec!["bench", "--model", model, "--tp", "9"],
            "attention heads",
        ),
        (
            vec!["synth", "--like", "gpt-5", "--out", out],
            "unknown preset",
        ),
        (
            vec![
                "synth",
                "--like",
                "llama-3.2-1b",
                "--quant",
                "q3",
                "--out",
                out,
            ],
            "q4_0",
        ),
        (
            vec!["synth", "--like", "llama-3.2-1b", "--out", out],
            "--force",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_tpserve"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            !err.contains("panicked") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::read(out).unwrap(),
        b"keep me",
        "an existing file is kept"
    );
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tpserve-tools-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A synthetic model has the shapes asked for, loads through the GGUF path, splits like a
/// real one (tp 2 gives tp 1's tokens) and carries a working tokenizer, in every format.
#[test]
fn synthetic_models_load_and_split_like_real_ones() {
    let dir = tempdir();
    let families = [
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-phi3",
        "tiny-mixtral",
        "tiny-qwen2-moe",
        "tiny-qwen3-moe",
    ];
    for fixture in ["tiny-qwen2", "tiny-llama"].into_iter().chain(families) {
        let cfg = ModelConfig::from_hf_dir(&common::fixture(fixture)).unwrap();
        let quants: &[&str] = if families.contains(&fixture) {
            &["q8_0"]
        } else {
            &["q4_0", "q8_0", "q5_1", "bf16"]
        };
        for &name in quants {
            let quant = SynthQuant::parse(name).unwrap();
            let path = dir.join(format!("{fixture}-{name}.gguf"));
            let req = SynthRequest {
                name: fixture,
                cfg: cfg.clone(),
                quant,
                tokenizer_from: None,
                seed: 7,
                layers: None,
            };
            let mut calls = 0;
            let summary = synth(&req, &path, |_, _| calls += 1).unwrap();
            assert_eq!(calls, summary.tensors);
            // Tensor bytes, plus metadata and alignment.
            let file_len = std::fs::metadata(&path).unwrap().len();
            assert!(
                file_len > summary.bytes as u64 && file_len < summary.bytes as u64 + (64 << 10)
            );
            let files = loader::open_model(&path).unwrap();
            let got = &files.config;
            assert_eq!(
                (got.hidden_size, got.intermediate_size, got.num_layers),
                (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers)
            );
            assert_eq!(
                (
                    got.num_heads,
                    got.num_kv_heads,
                    got.head_dim,
                    got.vocab_size
                ),
                (
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                    cfg.vocab_size
                )
            );
            assert_eq!(
                (got.tie_word_embeddings, got.qkv_bias),
                (cfg.tie_word_embeddings, cfg.qkv_bias)
            );
            // What the GGUF carries of each family (Gemma's query scale it does not).
            assert_eq!(
                (got.architecture, &got.moe, got.sliding_window),
                (cfg.architecture, &cfg.moe, cfg.sliding_window),
                "{fixture}"
            );
            assert_eq!(
                (got.activation, got.qk_norm, got.gemma_norms),
                (cfg.activation, cfg.qk_norm, cfg.gemma_norms),
                "{fixture}"
            );
            assert_eq!(
                (got.attn_softcap, got.final_softcap, &got.sliding_layers),
                (cfg.attn_softcap, cfg.final_softcap, &cfg.sliding_layers),
                "{fixture}"
            );
            assert_eq!(
                (got.rope_of(0), got.rope_of(cfg.num_layers - 1)),
                (cfg.rope_of(0), cfg.rope_of(cfg.num_layers - 1)),
                "{fixture}"
            );
            // The byte-level tokenizer: one token per byte.
            let tokenizer = Tokenizer::new(files.tokenizer.as_ref().expect("a tokenizer")).unwrap();
            assert_eq!(tokenizer.encode_plain("hi!").unwrap(), vec![104, 105, 33]);
            let request = GenerateRequest {
                input_ids: vec![1, 2, 3, 4, 5],
                max_new_tokens: 6,
                sampling: SamplingParams::default(),
                stop_ids: vec![],
                prompt_top: 0,
            };
            let ids = |tp| {
                let opts = GroupOptions::single_sequence(tp, Some(1), 16);
                engine::run_local(files.tensors.as_ref(), got, &opts, |d| {
                    engine::generate(d, &request)
                })
                .unwrap()
                .output_ids
            };
            assert_eq!(ids(2), ids(1), "{fixture} {name}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Synthetic models in every block format tpserve reads (Q4_K_M: Q4_K matrices with
/// attn_v and ffn_down in Q6_K, so the fused q/k/v rows mix formats; Q5_0 and IQ4_NL
/// re-encoded as Q8_0; Q5_1 regrouped with byte codes): each loads, tp 2 and tp 4 give tp 1's logits
/// bit for bit, and a sequence decoded alone gives the logits it gets among 12 others
/// (the kernels take one token or a tile of several, with the same bits).
#[test]
fn quantized_models_load_and_are_exact_across_tp_and_batch() {
    let dir = tempdir();
    for quant in [
        "q4_k_m", "q5_k_m", "q3_k_m", "q2_k", "iq4_xs", "q5_0", "q5_1", "iq4_nl",
    ] {
        quantized_model_is_exact(&dir, quant);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn quantized_model_is_exact(dir: &std::path::Path, quant: &str) {
    let mut cfg = ModelConfig::from_hf_dir(&common::fixture("tiny-llama")).unwrap();
    // K-blocks hold 256 weights: every matrix width, and each rank's first column at tp 4,
    // a multiple of 256.
    (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) = (1024, 1024, 128);
    let path = dir.join(format!("tiny-{quant}.gguf"));
    let req = SynthRequest {
        name: "tiny-llama",
        cfg,
        quant: SynthQuant::parse(quant).unwrap(),
        tokenizer_from: None,
        seed: 3,
        layers: None,
    };
    synth(&req, &path, |_, _| {}).unwrap();
    let files = loader::open_model(&path).unwrap();
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            (0..3 + i)
                .map(|j| (7 + 13 * i + 5 * j) as u32 % 256)
                .collect()
        })
        .collect();
    let feed: Vec<u32> = (0..4).map(|s| 40 + 3 * s).collect();
    let run = |tp| common::alone_and_batched(&files, tp, &prompts, &feed, 5);
    let bits = common::bits;
    let (alone, batched) = run(1);
    assert!(
        alone.iter().all(|v| v.is_finite()) && alone.iter().any(|&v| v != alone[0]),
        "{quant}"
    );
    assert!(
        bits(&alone) == bits(&batched),
        "{quant} tp 1: batched logits differ from alone"
    );
    for tp in [2, 4] {
        let (a, b) = run(tp);
        assert!(
            bits(&a) == bits(&alone),
            "{quant} tp {tp}: logits differ from tp 1"
        );
        assert!(
            bits(&b) == bits(&batched),
            "{quant} tp {tp}: batched logits differ from tp 1"
        );
    }
}

/// A panic on rank 0 between steps (a fault injected into the driving code) ends the whole
/// group promptly with the panic's message, instead of leaving rank 1 waiting for a plan.
#[test]
fn a_rank_that_panics_mid_run_ends_the_group_with_its_message() {
    use tpserve::kernels::Phase;
    use tpserve::model::{Logits, SeqStep};
    let files = loader::open_model(&common::fixture("tiny-llama")).unwrap();
    let start = std::time::Instant::now();
    let opts = GroupOptions::single_sequence(2, Some(1), 16);
    let result = engine::run_local(files.tensors.as_ref(), &files.config, &opts, |d| {
        let blocks = [0u32];
        let step = SeqStep {
            tokens: &[1, 2, 3],
            start_pos: 0,
            blocks: &blocks,
            logits: Logits::Last,
            phase: Phase::Prefill,
        };
        d.forward(&[step])?;
        panic!("injected fault after one step");
        #[allow(unreachable_code)]
        Ok(())
    });
    let msg = format!("{:#}", result.unwrap_err());
    assert!(
        msg.contains("panic") && msg.contains("injected fault"),
        "{msg}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
}
