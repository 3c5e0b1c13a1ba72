//! GGUF files as llama.cpp's converter writes them from Hugging Face models, against the
//! transformers references: the converter's way of storing what a config says (Llama 3's
//! rope scaling as a `rope_freqs` tensor, q/k rows permuted) must give the same logits.

mod common;

use common::*;
use half::bf16;
use safetensors::SafeTensors;
use std::path::Path;
use tpserve::kernels::Phase;
use tpserve::loader::gguf::{gguf_name, Value};
use tpserve::loader::gguf_write::{write_gguf, TensorDecl};
use tpserve::model::{KvDtype, Logits};

const GGML_F32: u32 = 0;
const GGML_BF16: u32 = 30;

/// The factors llama.cpp's convert_hf_to_gguf.py writes as `rope_freqs` for a Llama 3
/// rope scaling (its formula, in f64 as Python computes it).
fn converter_rope_factors(config: &serde_json::Value, head_dim: usize) -> Vec<f32> {
    let s = &config["rope_scaling"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let base = config["rope_theta"].as_f64().unwrap();
    let (factor, low, high) = (f("factor"), f("low_freq_factor"), f("high_freq_factor"));
    let old = f("original_max_position_embeddings");
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = (1.0 / base.powf((2 * i) as f64 / head_dim as f64)) as f32 as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let r = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            r as f32
        })
        .collect()
}

/// Writes the Hugging Face folder `dir` as a GGUF of architecture `arch` at `out`, as
/// llama.cpp's converter lays it out (llama's q/k rows permuted; matrices in their
/// stored type, vectors in f32); `rope_freqs` is written when given.
fn convert(dir: &Path, out: &Path, arch: &str, rope_freqs: Option<Vec<f32>>) {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| Value::U32(config[k].as_u64().unwrap() as u32);
    let head_dim = config["head_dim"].as_u64().map_or_else(
        || {
            (config["hidden_size"].as_u64().unwrap()
                / config["num_attention_heads"].as_u64().unwrap()) as usize
        },
        |d| d as usize,
    );
    let mut meta: Vec<(String, Value)> =
        vec![("general.architecture".into(), Value::String(arch.into()))];
    for (key, value) in [
        ("embedding_length", n("hidden_size")),
        ("feed_forward_length", n("intermediate_size")),
        ("block_count", n("num_hidden_layers")),
        ("attention.head_count", n("num_attention_heads")),
        ("attention.head_count_kv", n("num_key_value_heads")),
        ("context_length", n("max_position_embeddings")),
        ("rope.dimension_count", Value::U32(head_dim as u32)),
        (
            "rope.freq_base",
            Value::F32(config["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(config["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
    ] {
        meta.push((format!("{arch}.{key}"), value));
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut decls = vec![];
    let mut data: Vec<Vec<u8>> = vec![];
    let mut names = st.names();
    names.sort();
    for hf in names {
        let view = st.tensor(hf).unwrap();
        let name = gguf_name(hf).unwrap();
        let shape = view.shape().to_vec();
        let raw = view.data();
        let (elem, ggml_type) = match view.dtype() {
            safetensors::Dtype::BF16 => (2, GGML_BF16),
            safetensors::Dtype::F32 => (4, GGML_F32),
            other => panic!("the converter here writes bf16 and f32, not {other:?}"),
        };
        if shape.len() == 1 {
            let f32s: Vec<u8> = if elem == 4 {
                raw.to_vec()
            } else {
                raw.chunks_exact(2)
                    .flat_map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
                    .collect()
            };
            decls.push(TensorDecl {
                name,
                dims: vec![shape[0] as u64],
                ggml_type: GGML_F32,
                bytes: f32s.len(),
            });
            data.push(f32s);
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let row_bytes = cols * elem;
        let permute =
            arch == "llama" && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight"));
        let mut out_rows = vec![0u8; raw.len()];
        for r in 0..rows {
            // llama.cpp's permute: row (head, k * d/2 + j) goes to (head, 2j + k).
            let to = if permute {
                let (head, within, half) = (r / head_dim, r % head_dim, head_dim / 2);
                head * head_dim + 2 * (within % half) + within / half
            } else {
                r
            };
            out_rows[to * row_bytes..(to + 1) * row_bytes]
                .copy_from_slice(&raw[r * row_bytes..(r + 1) * row_bytes]);
        }
        decls.push(TensorDecl {
            name,
            dims: vec![cols as u64, rows as u64],
            ggml_type,
            bytes: out_rows.len(),
        });
        data.push(out_rows);
    }
    if let Some(factors) = rope_freqs {
        let bytes: Vec<u8> = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
        decls.push(TensorDecl {
            name: "rope_freqs.weight".into(),
            dims: vec![factors.len() as u64],
            ggml_type: GGML_F32,
            bytes: bytes.len(),
        });
        data.push(bytes);
    }
    write_gguf(
        out,
        &meta,
        &decls,
        |i, buf| {
            buf.copy_from_slice(&data[i]);
            Ok(())
        },
        |_| {},
    )
    .unwrap();
}

fn all_logits(path: &Path, tp: usize, ids: &[u32]) -> Vec<f32> {
    with_model_path(path, tp, 1, ids.len() + 1, KvDtype::F32, |driver| {
        Ok(driver
            .forward_one(ids, 0, Logits::All, Phase::Prefill)?
            .to_vec())
    })
}

/// Llama 3.1/3.2 GGUFs carry their rope scaling as `rope_freqs`: read, the logits match
/// transformers' (which applies the config's llama3 scaling); ignored, they do not.
#[test]
fn llama3_rope_scaling_from_gguf_rope_freqs() {
    let dir = fixture("tiny-llama3-bf16");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tmp = tempdir::Dir::new("gguf-rope");
    let with = tmp.path().join("with-rope-freqs.gguf");
    let without = tmp.path().join("without.gguf");
    convert(
        &dir,
        &with,
        "llama",
        Some(converter_rope_factors(&config, 16)),
    );
    convert(&dir, &without, "llama", None);
    let reference = reference("tiny-llama3-bf16");
    let tol = 1e-3;
    for case in &reference.cases {
        let vocab = case.last_logits.len();
        let check = |logits: &[f32]| -> f32 {
            let mut worst = 0.0f32;
            for top in &case.topk_per_position {
                for (id, v) in top.ids.iter().zip(&top.values) {
                    worst = worst.max((logits[top.pos * vocab + *id as usize] - v).abs());
                }
            }
            worst.max(max_abs_diff(
                &logits[logits.len() - vocab..],
                &case.last_logits,
            ))
        };
        let logits = all_logits(&with, 1, &case.input_ids);
        let diff = check(&logits);
        assert!(
            diff <= tol,
            "case {}: off by {diff} with rope_freqs",
            case.name
        );
        assert_eq!(
            all_logits(&with, 2, &case.input_ids),
            logits,
            "case {}: tp 2 differs from tp 1",
            case.name
        );
        if case.input_ids.len() > 4 {
            let ignored = check(&all_logits(&without, 1, &case.input_ids));
            assert!(
                ignored > 10.0 * tol,
                "case {}: without rope_freqs the logits should be wrong (off by {ignored})",
                case.name
            );
        }
    }
}

/// A Phi-3 GGUF (`phi3`: fused `attn_qkv` and gate+up in `ffn_up`, no q/k permutation)
/// gives transformers' logits at tp 1 and 2.
#[test]
fn phi3_gguf_with_fused_tensors() {
    let tmp = tempdir::Dir::new("gguf-phi3");
    let path = tmp.path().join("phi3.gguf");
    convert(&fixture("tiny-phi3"), &path, "phi3", None);
    for case in &reference("tiny-phi3").cases {
        let vocab = case.last_logits.len();
        let logits = all_logits(&path, 1, &case.input_ids);
        let diff = max_abs_diff(&logits[logits.len() - vocab..], &case.last_logits);
        assert!(diff <= 1e-4, "case {}: off by {diff}", case.name);
        assert_eq!(
            all_logits(&path, 2, &case.input_ids),
            logits,
            "tp 2 == tp 1"
        );
    }
}

/// A copy of the fixture `name` whose config sets Mistral's `sliding_window`.
fn with_sliding_window(name: &str, window: usize, tmp: &Path) -> std::path::PathBuf {
    let dir = tmp.join(format!("{name}-window-{window}"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["sliding_window"] = serde_json::json!(window);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// Mistral's sliding window: with a window of 1 every token attends to itself alone, so
/// its logits are those of the token alone at position 0, bit for bit; with a window of
/// w and L layers a token sees L·(w−1) tokens back, so the last logits equal (to rope's
/// rounding) those of that tail alone, and differ without the window.
#[test]
fn mistral_sliding_window() {
    let tmp = tempdir::Dir::new("sliding-window");
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
    let one = with_sliding_window("tiny-mistral-f16", 1, tmp.path());
    let vocab = 512;
    for tp in [1, 2] {
        let all = all_logits(&one, tp, &ids);
        for (p, &id) in ids.iter().enumerate().step_by(7) {
            let alone = all_logits(&one, tp, &[id]);
            assert_eq!(
                &all[p * vocab..(p + 1) * vocab],
                &alone[..],
                "tp {tp} position {p}"
            );
        }
    }
    // 3 layers, window 4: the last token sees 3·3 = 9 tokens back.
    let four = with_sliding_window("tiny-mistral-f16", 4, tmp.path());
    let tail = &ids[ids.len() - 10..];
    let last = |path: &Path, ids: &[u32]| {
        let all = all_logits(path, 1, ids);
        all[all.len() - vocab..].to_vec()
    };
    let windowed = last(&four, &ids);
    let diff = max_abs_diff(&windowed, &last(&four, tail));
    assert!(diff < 1e-3, "window 4: the tail alone differs by {diff}");
    let full = max_abs_diff(
        &last(&fixture("tiny-mistral-f16"), &ids),
        &last(&fixture("tiny-mistral-f16"), tail),
    );
    assert!(
        full > 1e-2,
        "without a window the context should matter ({full})"
    );
    assert_eq!(
        all_logits(&four, 3, &ids),
        all_logits(&four, 1, &ids),
        "tp 3 == tp 1"
    );
}
