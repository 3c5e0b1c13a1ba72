//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod server;

use serde::Deserialize;
use std::path::PathBuf;
use tpserve::engine::{self, Driver, GroupOptions};
use tpserve::loader;
use tpserve::model::KvDtype;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

#[derive(Deserialize)]
pub struct Reference {
    pub saved_dtype: String,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    pub input_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub topk_per_position: Vec<TopK>,
    pub greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
pub struct TopK {
    pub pos: usize,
    pub ids: Vec<u32>,
    pub values: Vec<f32>,
}

pub fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Loads `model` split `tp` ways and runs `f` on rank 0's driver.
pub fn with_group<T: Send>(
    model: &str,
    tp: usize,
    kv_capacity: usize,
    f: impl FnOnce(&mut Driver) -> anyhow::Result<T> + Send,
) -> T {
    with_group_threads(model, tp, 1, kv_capacity, f)
}

/// As [`with_group`], with `threads` kernel threads per rank.
pub fn with_group_threads<T: Send>(
    model: &str,
    tp: usize,
    threads: usize,
    kv_capacity: usize,
    f: impl FnOnce(&mut Driver) -> anyhow::Result<T> + Send,
) -> T {
    // The transformers references are computed in f32: so is the cache they are held to.
    with_group_kv(model, tp, threads, kv_capacity, KvDtype::F32, f)
}

/// As [`with_group_threads`], with the KV cache in `kv_dtype`.
pub fn with_group_kv<T: Send>(
    model: &str,
    tp: usize,
    threads: usize,
    kv_capacity: usize,
    kv_dtype: KvDtype,
    f: impl FnOnce(&mut Driver) -> anyhow::Result<T> + Send,
) -> T {
    with_model_path(&fixture(model), tp, threads, kv_capacity, kv_dtype, f)
}

/// As [`with_group`], with the experts of a MoE model spread `ep_size` ways.
pub fn with_group_ep<T: Send>(
    model: &str,
    tp: usize,
    ep_size: usize,
    kv_capacity: usize,
    f: impl FnOnce(&mut Driver) -> anyhow::Result<T> + Send,
) -> T {
    let mut opts = GroupOptions::single_sequence(tp, Some(1), kv_capacity);
    opts.forward.ep_size = ep_size;
    with_options(model, opts, f)
}

/// Runs `f` on the group `opts` describes, over fixture `model`, with the KV cache in f32
/// (as the references are computed).
pub fn with_options<T: Send>(
    model: &str,
    mut opts: GroupOptions,
    f: impl FnOnce(&mut Driver) -> anyhow::Result<T> + Send,
) -> T {
    let files = loader::open_model(&fixture(model)).unwrap();
    opts.forward.kv_dtype = KvDtype::F32;
    engine::run_local(files.tensors.as_ref(), &files.config, &opts, f).unwrap()
}

/// Every fixture model: dense, MoE, Gemma's norms and sliding windows, tied heads.
pub const MODELS: [&str; 14] = [
    "tiny-llama",
    "tiny-llama-sharded",
    "tiny-llama3-bf16",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mha-uneven",
    "tiny-mistral-f16",
    "tiny-smollm-tok",
    "tiny-phi3",
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-qwen3-moe",
    "tiny-gemma2",
    "tiny-gemma3",
];

/// As [`with_group_kv`], for a model at any path.
pub fn with_model_path<T: Send>(
    path: &std::path::Path,
    tp: usize,
    threads: usize,
    kv_capacity: usize,
    kv_dtype: KvDtype,
    f: impl FnOnce(&mut Driver) -> anyhow::Result<T> + Send,
) -> T {
    let files = loader::open_model(path).unwrap();
    let mut opts = GroupOptions::single_sequence(tp, Some(threads), kv_capacity);
    opts.forward.kv_dtype = kv_dtype;
    engine::run_local(files.tensors.as_ref(), &files.config, &opts, f).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The default model, fetched by scripts/fetch-model.
pub fn smollm2() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model first",
        p.display()
    );
    p
}

/// Runs the tpserve binary, asserts success, and parses its standard output as JSON.
pub fn tpserve_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tpserve"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tpserve {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A loopback port no one listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Logits of sequence `watched` prefilled and then fed `feed` token by token, alone and
/// in a batch with every other prompt of `prompts` (each sequence two blocks of 16), on a
/// `tp`-rank in-process group: `(alone, batched)`, prefill logits first.
pub fn alone_and_batched(
    files: &loader::ModelFiles,
    tp: usize,
    prompts: &[Vec<u32>],
    feed: &[u32],
    watched: usize,
) -> (Vec<f32>, Vec<f32>) {
    use tpserve::kernels::Phase;
    use tpserve::model::{Logits, SeqStep};
    let (batch, per_seq) = (prompts.len(), 2usize);
    let tables: Vec<u32> = (0..(batch * per_seq) as u32).collect();
    let table = |i: usize| &tables[i * per_seq..(i + 1) * per_seq];
    let step = |tokens, start_pos, blocks, phase| SeqStep {
        tokens,
        start_pos,
        blocks,
        logits: Logits::Last,
        phase,
    };
    let opts = GroupOptions::single_sequence(tp, Some(1), batch * per_seq * 16);
    engine::run_local(files.tensors.as_ref(), &files.config, &opts, |d| {
        let vocab = d.config().vocab_size;
        let p = &prompts[watched];
        let mut alone = d
            .forward(&[step(p, 0, table(watched), Phase::Prefill)])?
            .to_vec();
        for (s, t) in feed.iter().enumerate() {
            let one = [step(
                std::slice::from_ref(t),
                p.len() + s,
                table(watched),
                Phase::Decode,
            )];
            alone.extend_from_slice(d.forward(&one)?);
        }
        let all: Vec<SeqStep> = (0..batch)
            .map(|i| step(&prompts[i], 0, table(i), Phase::Prefill))
            .collect();
        let mut batched = d.forward(&all)?[watched * vocab..(watched + 1) * vocab].to_vec();
        for (s, t) in feed.iter().enumerate() {
            let all: Vec<SeqStep> = (0..batch)
                .map(|i| {
                    step(
                        std::slice::from_ref(t),
                        prompts[i].len() + s,
                        table(i),
                        Phase::Decode,
                    )
                })
                .collect();
            batched.extend_from_slice(&d.forward(&all)?[watched * vocab..(watched + 1) * vocab]);
        }
        Ok((alone, batched))
    })
    .unwrap()
}

/// Each value's bits, to compare logits exactly.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A fresh folder under the system temp dir, removed when dropped.
pub mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("tpserve-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
