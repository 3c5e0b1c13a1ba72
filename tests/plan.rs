//! `tpserve plan` against the engine itself, the seed's table, and bad input.

mod common;

use tpserve::engine::{self, GroupOptions};
use tpserve::loader;
use tpserve::plan;
use tpserve::shard::Stage;

/// The plan's bytes per rank are exactly what the loaded ranks hold, at every (tp, pp).
fn check_against_engine(path: &std::path::Path, layouts: &[(usize, usize)]) {
    let files = loader::open_model(path).unwrap();
    let layers = files.config.num_layers;
    for &(tp, pp) in layouts {
        let mut opts = GroupOptions::single_sequence(tp, Some(1), 16);
        opts.pipeline.stages = pp;
        let held = engine::run_local(files.tensors.as_ref(), &files.config, &opts, |d| {
            d.memory_per_rank()
        })
        .unwrap();
        for (id, m) in held.iter().enumerate() {
            let src = files.tensors.as_ref();
            let (rank, stage) = (id % tp, Stage::new(layers, pp, id / tp).unwrap());
            let planned = plan::stage_weights(&files.config, src, tp, rank, &stage)
                .unwrap()
                .total;
            assert_eq!(
                planned,
                m.weight_bytes,
                "{} tp {tp} pp {pp} rank {id}: weights",
                path.display()
            );
            let value_bytes = tpserve::model::KvDtype::default().bytes();
            let kv = plan::kv_bytes_per_token(&files.config, src, tp, rank, value_bytes).unwrap()
                / layers
                * stage.layers.len();
            assert_eq!(
                kv,
                m.kv_bytes_per_token,
                "{} tp {tp} pp {pp} rank {id}: KV per token",
                path.display()
            );
        }
    }
}

#[test]
fn planned_bytes_equal_the_engine_on_smollm2() {
    check_against_engine(
        &common::smollm2(),
        &[(1, 1), (2, 1), (3, 1), (1, 4), (2, 3)],
    );
}

#[test]
fn planned_bytes_equal_the_engine_on_every_fixture_shape() {
    for model in [
        "tiny-llama",
        "tiny-llama3-bf16",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-mha-uneven",
        "tiny-mistral-f16",
        "tiny-phi3",
        "tiny-mixtral",
        "tiny-qwen2-moe",
        "tiny-qwen3-moe",
        "tiny-gemma2",
    ] {
        let layouts = [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (1, 3)];
        check_against_engine(&common::fixture(model), &layouts);
    }
}

/// The seed's table (bf16 weights, one 8192-token sequence): the recommended tp falls in
/// its range for every model (the README explains where and why it picks an end).
#[test]
fn the_seed_table_from_the_presets() {
    let table = [
        ("llama-3.1-8b", "24GiB", 1..=1),
        ("llama-2-13b", "24GiB", 1..=2),
        ("codellama-34b", "24GiB", 2..=4),
        ("llama-3.1-70b", "40GiB", 4..=8),
        ("llama-3.1-405b", "80GiB", 8..=16),
    ];
    for (preset, memory, range) in table {
        let v = gpu_plan(preset, memory, "bf16");
        let tp = v["recommended_tp"].as_u64().unwrap() as usize;
        assert!(
            range.contains(&tp),
            "{preset} on {memory}: tp {tp}, seed says {range:?}"
        );
        assert_eq!(v["rows"].as_array().unwrap().len(), 5);
        assert!(v["best_tp"].is_u64());
    }
    // 405B fits 8 × 80 GB with fp8 weights.
    assert_eq!(
        gpu_plan("llama-3.1-405b", "80GiB", "fp8")["recommended_tp"],
        8
    );
}

/// A plan for bf16-era GPUs: 2-byte KV and activations over NVLink.
fn gpu_plan(preset: &str, memory: &str, dtype: &str) -> serde_json::Value {
    common::tpserve_json(&[
        "plan",
        "--preset",
        preset,
        "--device-memory",
        memory,
        "--weight-dtype",
        dtype,
        "--kv-bytes",
        "2",
        "--comm-bytes",
        "2",
        "--link",
        "nvlink",
        "--json",
    ])
}

#[test]
fn bad_input_is_a_clear_error() {
    for (args, needle) in [
        (
            vec!["--preset", "gpt-9", "--device-memory", "24GiB"],
            "presets are",
        ),
        (
            vec!["--preset", "mistral-7b", "--device-memory", "lots"],
            "memory size",
        ),
        (
            vec![
                "--preset",
                "mistral-7b",
                "--device-memory",
                "1GiB",
                "--devices",
                "1,2",
            ],
            "no tp in",
        ),
        (
            vec![
                "--preset",
                "mistral-7b",
                "--device-memory",
                "24GiB",
                "--link",
                "smoke",
            ],
            "--link",
        ),
        (
            vec![
                "--preset",
                "mistral-7b",
                "--device-memory",
                "24GiB",
                "--devices",
                "64",
            ],
            "attention heads",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tpserve"))
            .arg("plan")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
