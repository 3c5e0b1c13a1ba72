//! Pipeline parallelism in-process: stages of tensor-parallel groups give the bits of one
//! rank, for single sequences and for batches cut into micro-batches; a stage holds only
//! its layers; a stage that fails stops the whole group, naming itself.

mod common;

use common::*;
use tpserve::engine::{self, Driver, GenerateRequest, GroupOptions, PipelineOptions};
use tpserve::kernels::Phase;
use tpserve::loader;
use tpserve::model::{Logits, SeqStep};

/// (tp, pp): the layouts that fit in one group; most fixtures have 4 layers, so
/// three stages are uneven (a 3-layer one skips four stages).
const LAYOUTS: [(usize, usize); 5] = [(2, 1), (1, 2), (1, 3), (2, 2), (1, 4)];

/// Runs `f` on a group of `tp` ranks per stage and `pp` stages.
fn with_layout<T: Send>(
    model: &str,
    (tp, pp): (usize, usize),
    max_micro_batch: Option<usize>,
    kv_capacity: usize,
    f: impl FnOnce(&mut Driver) -> anyhow::Result<T> + Send,
) -> T {
    let mut opts = GroupOptions::single_sequence(tp, Some(1), kv_capacity);
    opts.pipeline = PipelineOptions {
        stages: pp,
        max_micro_batch,
    };
    with_options(model, opts, f)
}

/// Every position's logits of a prompt, then 16 greedy ids.
fn logits_and_greedy(driver: &mut Driver, ids: &[u32]) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let logits = bits(driver.forward_one(ids, 0, Logits::All, Phase::Prefill)?);
    let request = GenerateRequest {
        input_ids: ids.to_vec(),
        max_new_tokens: 16,
        sampling: Default::default(),
        stop_ids: vec![],
        prompt_top: 0,
    };
    Ok((logits, engine::generate(driver, &request)?.output_ids))
}

#[test]
fn every_layout_gives_the_bits_of_one_rank() {
    for model in MODELS {
        let layers = loader::open_model(&fixture(model))
            .unwrap()
            .config
            .num_layers;
        let reference = reference(model);
        for case in &reference.cases {
            let n = case.input_ids.len() + 16;
            let one = with_layout(model, (1, 1), None, n, |d| {
                logits_and_greedy(d, &case.input_ids)
            });
            assert_eq!(one.1, case.greedy_ids, "{model} {}: tp 1", case.name);
            for layout in LAYOUTS.into_iter().filter(|l| l.1 <= layers) {
                let got = with_layout(model, layout, None, n, |d| {
                    logits_and_greedy(d, &case.input_ids)
                });
                assert!(got == one, "{model} {} at (tp, pp) {layout:?}", case.name);
            }
        }
    }
}

/// Five sequences prefilled together, then decoded together four steps, on `layout`:
/// every step's full logits, top-5 candidates, and top 5 under masks.
fn batched_steps(
    model: &str,
    layout: (usize, usize),
    max_micro_batch: Option<usize>,
) -> (Vec<u32>, Vec<(u32, u32)>) {
    let prompts: Vec<Vec<u32>> = (0..5u32)
        .map(|i| (0..3 + 2 * i).map(|t| (7 * t + 11 * i + 1) % 500).collect())
        .collect();
    let tables: Vec<Vec<u32>> = (0..5u32).map(|i| vec![2 * i, 2 * i + 1]).collect();
    // One bit per id: ids divisible by 3, and ids below 100.
    let mask_of = |allowed: fn(u32) -> bool| -> Vec<u32> {
        (0..16u32)
            .map(|w| {
                (0..32)
                    .filter(|b| allowed(32 * w + b))
                    .map(|b| 1 << b)
                    .sum()
            })
            .collect()
    };
    let (thirds, low) = (mask_of(|id| id % 3 == 0), mask_of(|id| id < 100));
    with_layout(model, layout, max_micro_batch, 10 * 16, |d| {
        let mut logits = Vec::new();
        let mut top = Vec::new();
        let zero = [0; 5];
        logits.extend(bits(d.forward(&steps(
            &prompts,
            &zero,
            &tables,
            Phase::Prefill,
        ))?));
        let mut pos: Vec<usize> = prompts.iter().map(Vec::len).collect();
        for s in 0..4u32 {
            let feed: Vec<Vec<u32>> = (0..5).map(|i| vec![(13 * s + i) % 500]).collect();
            let step = steps(&feed, &pos, &tables, Phase::Decode);
            logits.extend(bits(d.forward(&step)?));
            // The same positions again: a top-k step overwrites what it stores alike.
            let best = d.forward_top_k(&step, 5)?;
            top.extend(best.iter().map(|&(id, v)| (id, v.to_bits())));
            // Constrained rows (structured output) in the second and last micro-batch.
            let masks = [(1, &thirds[..]), (4, &low[..])];
            let best = d.forward_top_k_masked(&step, 5, &masks)?;
            top.extend(best.iter().map(|&(id, v)| (id, v.to_bits())));
            pos.iter_mut().for_each(|p| *p += 1);
        }
        Ok((logits, top))
    })
}

/// One step of every sequence: `tokens[i]` at `start[i]..`, blocks `tables[i]`.
fn steps<'a>(
    tokens: &'a [Vec<u32>],
    start: &[usize],
    tables: &'a [Vec<u32>],
    phase: Phase,
) -> Vec<SeqStep<'a>> {
    (0..tokens.len())
        .map(|i| SeqStep {
            tokens: &tokens[i],
            start_pos: start[i],
            blocks: &tables[i],
            logits: Logits::Last,
            phase,
        })
        .collect()
}

#[test]
fn micro_batches_give_the_bits_of_the_whole_batch_on_one_rank() {
    for model in ["tiny-llama", "tiny-qwen2-moe", "tiny-gemma2"] {
        let one = batched_steps(model, (1, 1), None);
        for (layout, max) in [
            ((1, 2), None),
            ((1, 2), Some(1)),
            ((1, 3), Some(2)),
            ((2, 2), None),
            ((1, 4), Some(3)),
        ] {
            let got = batched_steps(model, layout, max);
            assert!(
                got == one,
                "{model} at (tp, pp) {layout:?}, micro-batches of at most {max:?}"
            );
        }
    }
}

/// A stage holds its layers only: the stages' weights add up to the whole model's (an
/// untied model: the embedding on the first stage, the LM head on the last).
#[test]
fn stages_hold_only_their_layers() {
    let model = "tiny-llama";
    let whole: usize = with_layout(model, (1, 1), None, 16, |d| d.weight_bytes_per_rank())
        .iter()
        .sum();
    for layout in [(1, 2), (2, 2), (1, 4)] {
        let per_rank = with_layout(model, layout, None, 16, |d| d.weight_bytes_per_rank());
        assert_eq!(per_rank.len(), layout.0 * layout.1, "{layout:?}");
        let max = *per_rank.iter().max().unwrap();
        assert!(max < whole * 3 / 4, "{layout:?}: {per_rank:?} of {whole}");
        if layout.0 == 1 {
            assert_eq!(per_rank.iter().sum::<usize>(), whole, "{layout:?}");
        }
    }
}

/// A model whose last layer lacks a tensor, in pipeline stages: the last stage fails to
/// load, the others stop too (no hang), and the error names the stage and the tensor.
#[test]
fn a_stage_that_fails_stops_the_group_and_names_itself() {
    let dir = tempdir::Dir::new("broken-stage");
    let src = fixture("tiny-llama");
    for file in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let missing = "model.layers.3.mlp.down_proj.weight";
    let kept: Vec<_> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != missing)
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    let files = loader::open_model(dir.path()).unwrap();
    let mut opts = GroupOptions::single_sequence(2, Some(1), 16);
    opts.pipeline.stages = 2;
    let err =
        engine::run_local(files.tensors.as_ref(), &files.config, &opts, |_| Ok(())).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("pipeline stage 1 of 2") && text.contains(missing),
        "{text}"
    );
}

#[test]
fn impossible_layouts_are_refused_with_the_flag_named() {
    let files = loader::open_model(&fixture("tiny-llama")).unwrap();
    for (stages, max, needle) in [
        (5, None, "--pp-size 5 is more than the model's 4 layers"),
        (0, None, "--pp-size must be at least 1"),
        (2, Some(0), "--pp-max-micro-batch-size must be at least 1"),
    ] {
        let mut opts = GroupOptions::single_sequence(1, Some(1), 16);
        opts.pipeline = PipelineOptions {
            stages,
            max_micro_batch: max,
        };
        let err = engine::run_local(files.tensors.as_ref(), &files.config, &opts, |_| Ok(()))
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
}
