//! GGUF files as llama.cpp's converter writes them from Hugging Face models, against the
//! transformers references: the converter's way of storing what a config says (Llama 3's
//! rope scaling as a `rope_freqs` tensor, q/k rows permuted) must give the same logits.

mod common;

use common::*;
use half::bf16;
use safetensors::SafeTensors;
use std::path::Path;
use tpserve::kernels::Phase;
use tpserve::loader::gguf::{gguf_expert, gguf_name, Value};
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
/// llama.cpp's converter lays it out (llama's q/k rows permuted; Gemma's norms with the 1
/// added; each kind of expert matrix stacked into one `[experts, rows, cols]` tensor;
/// matrices in their stored type, vectors in f32); `rope_freqs` is written when given.
fn convert(dir: &Path, out: &Path, arch: &str, rope_freqs: Option<Vec<f32>>) {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let head_dim = config["head_dim"].as_u64().map_or_else(
        || {
            (config["hidden_size"].as_u64().unwrap()
                / config["num_attention_heads"].as_u64().unwrap()) as usize
        },
        |d| d as usize,
    );
    let meta = converter_metadata(&config, arch, head_dim);
    let gemma = arch.starts_with("gemma");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut decls = vec![];
    let mut data: Vec<Vec<u8>> = vec![];
    let mut names = st.names();
    names.sort();
    let mut stacked: std::collections::BTreeMap<String, Vec<StackedExpert>> = Default::default();
    for hf in names {
        let view = st.tensor(hf).unwrap();
        let shape = view.shape().to_vec();
        let raw = view.data();
        let (elem, ggml_type) = match view.dtype() {
            safetensors::Dtype::BF16 => (2, GGML_BF16),
            safetensors::Dtype::F32 => (4, GGML_F32),
            other => panic!("the converter here writes bf16 and f32, not {other:?}"),
        };
        if let Some((name, expert)) = gguf_expert(hf) {
            stacked.entry(name).or_default().push(StackedExpert {
                index: expert,
                shape,
                bytes: raw.to_vec(),
                ggml_type,
            });
            continue;
        }
        let name = gguf_name(hf, gemma).unwrap_or_else(|| panic!("no GGUF name for {hf}"));
        if shape.len() == 1 {
            let mut f32s: Vec<f32> = if elem == 4 {
                bytemuck::pod_collect_to_vec(raw)
            } else {
                raw.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            };
            if gemma && name.ends_with("norm.weight") {
                f32s.iter_mut().for_each(|w| *w += 1.0);
            }
            let f32s: Vec<u8> = bytemuck::cast_slice(&f32s).to_vec();
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
    for (name, mut experts) in stacked {
        experts.sort_by_key(|e| e.index);
        let (rows, cols) = (experts[0].shape[0], experts[0].shape[1]);
        let all: Vec<u8> = experts.iter().flat_map(|e| e.bytes.clone()).collect();
        decls.push(TensorDecl {
            name,
            dims: vec![cols as u64, rows as u64, experts.len() as u64],
            ggml_type: experts[0].ggml_type,
            bytes: all.len(),
        });
        data.push(all);
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

/// One expert's matrix, waiting to be stacked with the others of its kind.
struct StackedExpert {
    index: usize,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    ggml_type: u32,
}

/// The `{arch}.*` metadata llama.cpp's converter writes for `config`.
fn converter_metadata(
    config: &serde_json::Value,
    arch: &str,
    head_dim: usize,
) -> Vec<(String, Value)> {
    let n = |k: &str| Value::U32(config[k].as_u64().unwrap() as u32);
    let f = |k: &str| Value::F32(config[k].as_f64().unwrap() as f32);
    let mut keys = vec![
        ("embedding_length", n("hidden_size")),
        ("feed_forward_length", n("intermediate_size")),
        ("block_count", n("num_hidden_layers")),
        ("attention.head_count", n("num_attention_heads")),
        ("attention.head_count_kv", n("num_key_value_heads")),
        ("attention.key_length", Value::U32(head_dim as u32)),
        ("attention.value_length", Value::U32(head_dim as u32)),
        ("context_length", n("max_position_embeddings")),
        ("rope.dimension_count", Value::U32(head_dim as u32)),
        ("rope.freq_base", f("rope_theta")),
        ("attention.layer_norm_rms_epsilon", f("rms_norm_eps")),
    ];
    if config.get("num_experts_per_tok").is_some() {
        let experts = config
            .get("num_local_experts")
            .or(config.get("num_experts"));
        keys.push((
            "expert_count",
            Value::U32(experts.unwrap().as_u64().unwrap() as u32),
        ));
        keys.push(("expert_used_count", n("num_experts_per_tok")));
        if arch != "llama" {
            keys.push(("expert_feed_forward_length", n("moe_intermediate_size")));
        }
        if arch == "qwen2moe" {
            keys.push((
                "expert_shared_feed_forward_length",
                n("shared_expert_intermediate_size"),
            ));
        }
    }
    if arch.starts_with("gemma") {
        keys.push(("attention.sliding_window", n("sliding_window")));
    }
    if arch == "gemma2" {
        keys.push(("attn_logit_softcapping", f("attn_logit_softcapping")));
        keys.push(("final_logit_softcapping", f("final_logit_softcapping")));
    }
    if arch == "gemma3" {
        // Newer converters write the layer pattern; without it llama.cpp assumes 5 in 6.
        let pattern = config["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| Value::Bool(t == "sliding_attention"))
            .collect();
        keys.push(("attention.sliding_window_pattern", Value::Array(pattern)));
    }
    let mut meta: Vec<(String, Value)> =
        vec![("general.architecture".into(), Value::String(arch.into()))];
    meta.extend(keys.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)));
    meta
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

/// A copy of the fixture `name` (in `tmp/name-tag`) with its config changed by `edit`.
fn fixture_with(
    name: &str,
    tag: &str,
    tmp: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let dir = tmp.join(format!("{name}-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// A copy of the fixture `name` whose config sets Mistral's `sliding_window`.
fn with_sliding_window(name: &str, window: usize, tmp: &Path) -> std::path::PathBuf {
    fixture_with(name, &format!("window-{window}"), tmp, |c| {
        c["sliding_window"] = serde_json::json!(window)
    })
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

/// Mixtral (a llama GGUF with experts), Qwen2-MoE (with its gated shared expert) and
/// Qwen3-MoE GGUFs, experts stacked as llama.cpp's converter stacks them, give
/// transformers' logits, and the same bits at tp 2, 3 and 4 (3 divides neither the
/// experts nor the heads).
#[test]
fn moe_ggufs_with_stacked_experts() {
    let tmp = tempdir::Dir::new("gguf-moe");
    for (name, arch, tol) in [
        ("tiny-mixtral", "llama", 1e-3),
        ("tiny-qwen2-moe", "qwen2moe", 1e-4),
        ("tiny-qwen3-moe", "qwen3moe", 1e-4),
    ] {
        let path = tmp.path().join(format!("{name}.gguf"));
        convert(&fixture(name), &path, arch, None);
        for case in &reference(name).cases {
            let vocab = case.last_logits.len();
            let logits = all_logits(&path, 1, &case.input_ids);
            let diff = max_abs_diff(&logits[logits.len() - vocab..], &case.last_logits);
            assert!(diff <= tol, "{name} case {}: off by {diff}", case.name);
            for tp in [2, 3, 4] {
                assert_eq!(
                    bits(&all_logits(&path, tp, &case.input_ids)),
                    bits(&logits),
                    "{name} case {}: tp {tp} differs from tp 1",
                    case.name
                );
            }
        }
    }
}

/// A copy of the fixture `name` whose config scales queries by 1/√head_dim, the scale
/// llama.cpp infers for a Gemma GGUF that is not a 27B (the file does not carry it).
fn with_llama_cpp_query_scale(name: &str, tmp: &Path) -> std::path::PathBuf {
    fixture_with(name, "head-dim-scale", tmp, |c| {
        c["query_pre_attn_scalar"] = c["head_dim"].clone()
    })
}

/// Gemma 2 and Gemma 3 GGUFs (norms with the 1 added, Gemma's own norm names, soft-caps,
/// window and layer pattern from the metadata) give the bits of the Hugging Face folder
/// they were converted from — which matches transformers (tests/reference_models.rs) —
/// at tp 1 to 4.
#[test]
fn gemma_ggufs_match_their_folders() {
    let tmp = tempdir::Dir::new("gguf-gemma");
    for (name, arch) in [("tiny-gemma2", "gemma2"), ("tiny-gemma3", "gemma3")] {
        let folder = with_llama_cpp_query_scale(name, tmp.path());
        let path = tmp.path().join(format!("{name}.gguf"));
        convert(&folder, &path, arch, None);
        for case in &reference(name).cases {
            let expected = bits(&all_logits(&folder, 1, &case.input_ids));
            for tp in [1, 2, 3, 4] {
                assert_eq!(
                    bits(&all_logits(&path, tp, &case.input_ids)),
                    expected,
                    "{name} case {}: the GGUF at tp {tp} differs from the folder",
                    case.name
                );
            }
        }
    }
}
