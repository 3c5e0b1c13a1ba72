//! Bad input gets a clear error and a non-zero exit, never a panic.

mod common;

use std::path::Path;
use std::process::Command;

fn tpserve(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tpserve"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn generate(model: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    if !extra.contains(&"--input-ids") && !extra.contains(&"--prompt") {
        args.extend_from_slice(&["--input-ids", "1,2,3"]);
    }
    tpserve(&args)
}

fn assert_clean_failure((code, _, err): (i32, String, String), needles: &[&str]) {
    assert_ne!(code, 0, "expected failure; stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
}

/// A copy of tiny-llama whose config.json is edited by `edit`, or whose weights lose `drop`.
fn broken_model(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    drop: Option<&str>,
) -> common::tempdir::Dir {
    let dir = common::tempdir::Dir::new(name);
    let src = common::fixture("tiny-llama");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    match drop {
        None => std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap(),
        Some(name) => {
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let kept: Vec<_> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| n != name)
                .collect();
            safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors"))
                .unwrap();
        }
    }
    dir
}

#[test]
fn missing_config_json() {
    let dir = common::tempdir::Dir::new("empty");
    assert_clean_failure(generate(dir.path(), &[]), &["config.json"]);
}

#[test]
fn missing_model_path() {
    assert_clean_failure(
        generate(Path::new("/nonexistent/model"), &[]),
        &["does not exist"],
    );
}

#[test]
fn unsupported_architecture() {
    let dir = broken_model(
        "arch",
        |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]),
        None,
    );
    assert_clean_failure(
        generate(dir.path(), &[]),
        &[
            "unsupported architecture",
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = broken_model("missing", |_| {}, Some("model.layers.2.mlp.up_proj.weight"));
    assert_clean_failure(
        generate(dir.path(), &[]),
        &["model.layers.2.mlp.up_proj.weight"],
    );
}

#[test]
fn shape_mismatch_names_tensor_and_both_shapes() {
    let dir = broken_model(
        "shape",
        |c| c["intermediate_size"] = serde_json::json!(320),
        None,
    );
    assert_clean_failure(
        generate(dir.path(), &["--tp", "2"]),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[352, 128]",
            "[320, 128]",
        ],
    );
}

#[test]
fn tp_zero() {
    assert_clean_failure(
        generate(&common::fixture("tiny-llama"), &["--tp", "0"]),
        &["--tp"],
    );
}

#[test]
fn tp_larger_than_heads() {
    assert_clean_failure(
        generate(&common::fixture("tiny-llama"), &["--tp", "9"]),
        &["--tp 9", "8 attention heads"],
    );
}

#[test]
fn input_id_out_of_vocabulary() {
    assert_clean_failure(
        generate(&common::fixture("tiny-llama"), &["--input-ids", "1,512"]),
        &["input id 512", "512 tokens"],
    );
}

#[test]
fn prompt_without_tokenizer() {
    assert_clean_failure(
        tpserve(&[
            "generate",
            "--model",
            "x",
            "--prompt",
            "hi",
            "--input-ids",
            "1",
        ]),
        &["--prompt"],
    );
    let (code, _, err) = tpserve(&[
        "generate",
        "--model",
        common::fixture("tiny-llama").to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("tokenizer.json") && err.contains("--input-ids"),
        "{err}"
    );
}

#[test]
fn generate_json_output_shape() {
    let (code, out, err) = generate(
        &common::fixture("tiny-smollm-tok"),
        &[
            "--tp",
            "2",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let reference = common::reference("tiny-smollm-tok");
    let case = reference.cases.iter().find(|c| c.name == "prompt").unwrap();
    // The tokenizer gives the reference's ids for this prompt, and greedy ids follow.
    let ids: Vec<u32> = serde_json::from_value(v["input_ids"].clone()).unwrap();
    assert_eq!(ids, case.input_ids);
    let out_ids: Vec<u32> = serde_json::from_value(v["output_ids"].clone()).unwrap();
    assert_eq!(out_ids, case.greedy_ids[..4]);
    assert!(v["text"].is_string());
    let top = v["prompt_logits_top"].as_array().unwrap();
    assert_eq!(top.len(), 10);
    let logits: Vec<f64> = top.iter().map(|t| t["logit"].as_f64().unwrap()).collect();
    assert!(logits.windows(2).all(|w| w[0] >= w[1]), "descending");
    assert_eq!(top[0]["id"].as_u64().unwrap() as u32, case.greedy_ids[0]);
}

#[test]
fn unknown_kv_cache_dtype_is_named() {
    assert_clean_failure(
        generate(&common::fixture("tiny-llama"), &["--kv-cache-dtype", "fp8"]),
        &["--kv-cache-dtype fp8", "auto, f16, bf16, f32"],
    );
}

#[test]
fn impossible_pipeline_layouts_are_named() {
    let model = common::fixture("tiny-llama");
    assert_clean_failure(
        generate(&model, &["--pp-size", "5"]),
        &["--pp-size 5", "4 layers"],
    );
    assert_clean_failure(generate(&model, &["--pp-size", "0"]), &["--pp-size"]);
    assert_clean_failure(
        generate(
            &model,
            &["--pp-size", "2", "--pp-max-micro-batch-size", "0"],
        ),
        &["--pp-max-micro-batch-size"],
    );
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--preset",
            "llama-3.1-8b",
            "--device-memory",
            "80GB",
        ];
        args.extend_from_slice(extra);
        tpserve(&args)
    };
    assert_clean_failure(plan(&["--pp-size", "33"]), &["--pp-size 33", "32 layers"]);
    assert_clean_failure(
        plan(&["--devices", "2", "--pp-size", "2", "--world-size", "3"]),
        &["--world-size"],
    );
    assert_clean_failure(
        plan(&["--pp-size", "2", "--devices-per-node", "0"]),
        &["--devices-per-node"],
    );
    let (code, out, err) = plan(&[
        "--devices",
        "2,4",
        "--pp-size",
        "1,2",
        "--world-size",
        "4",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layouts: Vec<(u64, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["tp"].as_u64().unwrap(), r["pp"].as_u64().unwrap()))
        .collect();
    assert_eq!(layouts, [(2, 2), (4, 1)]);
}

/// SGLang launch flags that do not apply are refused, each naming itself and why, before
/// any weight is read.
#[test]
fn sglang_flags_that_do_not_apply_are_named() {
    let model = common::fixture("tiny-llama");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--model-path", model.to_str().unwrap()];
        args.extend_from_slice(extra);
        tpserve(&args)
    };
    for (flags, needles) in [
        (
            &["--device", "cuda"][..],
            &["--device cuda", "CPUs only"][..],
        ),
        (
            &["--dtype", "float16"],
            &["--dtype float16", "--dtype auto"],
        ),
        (&["--revision", "main"], &["--revision main", "local files"]),
        (
            &["--load-format", "gguf"],
            &["--load-format gguf", "safetensors"],
        ),
        (&["--quantization", "awq"], &["--quantization awq"]),
        (&["--random-seed", "7"], &["--random-seed 7", "seed"]),
        (&["--skip-tokenizer-init"], &["--skip-tokenizer-init"]),
    ] {
        assert_clean_failure(serve(flags), needles);
    }
}
