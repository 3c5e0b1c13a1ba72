//! The GGUF reader on synthetic files: valid ones read back, broken ones give clear errors,
//! and no mutation of a file makes it panic or read out of bounds.

use proptest::prelude::*;
use tpserve::kernels::QuantType;
use tpserve::loader::gguf::{GgufFile, Value};

/// Writes a GGUF v3 file: string and u32 metadata, and tensors given as
/// (name, dims innermost first, ggml type id, data).
fn write_gguf(meta: &[(&str, Meta)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, v) in meta {
        string(&mut b, k);
        match v {
            Meta::Str(s) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, s);
            }
            Meta::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::Strings(items) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    string(&mut b, s);
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend(data);
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
    }
    b
}

enum Meta {
    Str(&'static str),
    U32(u32),
    Strings(Vec<&'static str>),
}

fn sample_file() -> Vec<u8> {
    let f32_data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let mut q8 = vec![0u8; 34 * 2];
    q8[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    for (i, q) in q8[2..34].iter_mut().enumerate() {
        *q = (i as i8 - 16) as u8;
    }
    write_gguf(
        &[
            ("general.architecture", Meta::Str("llama")),
            ("llama.block_count", Meta::U32(1)),
            (
                "tokenizer.ggml.tokens",
                Meta::Strings(vec!["a", "b", "<s>"]),
            ),
        ],
        &[
            ("norm.weight", vec![8], 0, f32_data),
            ("blk.0.attn_q.weight", vec![32, 2], 8, q8),
        ],
    )
}

#[test]
fn reads_metadata_and_tensors_back() {
    let f = GgufFile::from_bytes(&sample_file()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(
        f.meta("general.architecture").and_then(Value::as_str),
        Some("llama")
    );
    assert_eq!(f.meta("llama.block_count").and_then(Value::as_u64), Some(1));
    assert_eq!(
        f.meta("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len()),
        Some(3)
    );
    assert_eq!(
        f.dequantize_row("norm.weight", 0).unwrap(),
        (0..8).map(|i| i as f32).collect::<Vec<_>>()
    );
    // GGUF dims [32, 2] are PyTorch's [2, 32]; row 0 is (i - 16) · 0.5
    assert_eq!(f.tensors["blk.0.attn_q.weight"].shape, vec![2, 32]);
    let row = f.dequantize_row("blk.0.attn_q.weight", 0).unwrap();
    assert_eq!(
        row,
        (0..32).map(|i| (i - 16) as f32 * 0.5).collect::<Vec<_>>()
    );
}

fn error_of(bytes: &[u8]) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("a broken file was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn wrong_magic() {
    let mut b = sample_file();
    b[0..4].copy_from_slice(b"GGML");
    assert!(error_of(&b).contains("magic"));
}

#[test]
fn truncated_file() {
    let b = sample_file();
    let e = error_of(&b[..b.len() - 40]);
    assert!(
        e.contains("beyond the end of the file") || e.contains("truncated"),
        "{e}"
    );
    let e = error_of(&b[..30]);
    assert!(
        e.contains("truncated") || e.contains("more than the"),
        "{e}"
    );
}

#[test]
fn unknown_quant_type() {
    // 16 is IQ2_XXS, a format tpserve does not read.
    let b = write_gguf(&[], &[("w", vec![256], 16, vec![0; 66])]);
    let e = error_of(&b);
    assert!(e.contains("`w`") && e.contains("quant type 16"), "{e}");
}

#[test]
fn metadata_that_lies_about_sizes() {
    // A tensor count no file of this size could hold.
    let mut b = sample_file();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(error_of(&b).contains("tensor count"));
    // A string longer than the file.
    let mut b = sample_file();
    b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(error_of(&b).contains("claims"));
    // A tensor whose offset points past the end.
    let f32_data = vec![0u8; 32];
    let mut b = write_gguf(&[], &[("w", vec![8], 0, f32_data)]);
    // header (24) + name (8 + 1) + n_dims (4) + one dim (8) + type (4): then the offset
    let at = 24 + 9 + 4 + 8 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
    assert!(error_of(&b).contains("beyond the end"));
}

#[test]
fn unsupported_version() {
    let mut b = sample_file();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(error_of(&b).contains("version 1"));
}

/// Inputs per property: `FUZZ_CASES` (as the other fuzz targets), 2000 by default.
fn fuzz_cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    /// Any truncation and any byte flips: an error or a file, never a panic.
    #[test]
    fn mutated_files_never_panic(
        cut in 0usize..400,
        flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..6),
    ) {
        let mut b = sample_file();
        for (at, v) in flips {
            if at < b.len() {
                b[at] = v;
            }
        }
        b.truncate(cut.min(b.len()));
        if let Ok(f) = GgufFile::from_bytes(&b) {
            for name in f.tensors.keys() {
                let _ = f.dequantize_row(name, 0);
            }
            let _ = f.config();
        }
    }
}

#[derive(serde::Deserialize)]
struct QuantFixture {
    types: std::collections::HashMap<String, QuantCase>,
}

#[derive(serde::Deserialize)]
struct QuantCase {
    block_elems: usize,
    block_bytes: usize,
    blocks: Vec<QuantBlock>,
}

#[derive(serde::Deserialize)]
struct QuantBlock {
    hex: String,
    values: Vec<f32>,
}

/// Every dequantizer against blocks dequantized by the gguf Python package
/// (quant-blocks-iq4.json was made by tests/fixtures/make-iq4-blocks.py).
#[test]
fn dequantizers_match_the_reference_reader() {
    let read = |name: &str| -> QuantFixture {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let (blocks, iq4) = (read("quant-blocks.json"), read("quant-blocks-iq4.json"));
    let types = [
        ("Q4_0", QuantType::Q4_0),
        ("Q4_1", QuantType::Q4_1),
        ("Q5_0", QuantType::Q5_0),
        ("Q5_1", QuantType::Q5_1),
        ("Q8_0", QuantType::Q8_0),
        ("Q2_K", QuantType::Q2K),
        ("Q3_K", QuantType::Q3K),
        ("Q4_K", QuantType::Q4K),
        ("Q5_K", QuantType::Q5K),
        ("Q6_K", QuantType::Q6K),
        ("IQ4_NL", QuantType::IQ4NL),
        ("IQ4_XS", QuantType::IQ4XS),
    ];
    for (name, ty) in types {
        assert_eq!(ty.name(), name);
        let case = blocks.types.get(name).or(iq4.types.get(name)).unwrap();
        assert_eq!(
            (case.block_elems, case.block_bytes),
            (ty.block_elems(), ty.block_bytes()),
            "{name}"
        );
        for (i, block) in case.blocks.iter().enumerate() {
            let bytes: Vec<u8> = (0..block.hex.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(&block.hex[j..j + 2], 16).unwrap())
                .collect();
            let mut out = vec![0.0; ty.block_elems()];
            ty.dequantize(&bytes, &mut out);
            for (j, (got, want)) in out.iter().zip(&block.values).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{name} block {i} value {j}: {got} vs {want}"
                );
            }
        }
    }
}
