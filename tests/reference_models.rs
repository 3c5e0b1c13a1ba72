//! Every fixture model at every tp in 1..=4 against the transformers reference, and tp = N
//! against tp = 1.

mod common;

use common::*;
use tpserve::engine::{self, GenerateRequest, SamplingParams};
use tpserve::kernels::Phase;
use tpserve::model::{Logits, ShardPlan};

struct Run {
    last_logits: Vec<f32>,
    all_logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn run_case(model: &str, tp: usize, case: &Case) -> Run {
    run_case_ep(model, tp, 1, case)
}

fn run_case_ep(model: &str, tp: usize, ep_size: usize, case: &Case) -> Run {
    let n = case.input_ids.len();
    with_group_ep(model, tp, ep_size, n + 16, |driver| {
        let all_logits = driver
            .forward_one(&case.input_ids, 0, Logits::All, Phase::Prefill)?
            .to_vec();
        let request = GenerateRequest {
            input_ids: case.input_ids.clone(),
            max_new_tokens: 16,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            prompt_top: 0,
        };
        let last_logits = driver
            .forward_one(&case.input_ids, 0, Logits::Last, Phase::Prefill)?
            .to_vec();
        let greedy = engine::generate(driver, &request)?.output_ids;
        Ok(Run {
            last_logits,
            all_logits,
            greedy,
        })
    })
}

fn check_model(model: &str) {
    let reference = reference(model);
    let tol = if reference.saved_dtype == "float32" {
        1e-4
    } else {
        1e-3
    };
    for case in &reference.cases {
        let base = run_case(model, 1, case);
        for tp in 1..=4 {
            let run = if tp == 1 {
                None
            } else {
                Some(run_case(model, tp, case))
            };
            let run = run.as_ref().unwrap_or(&base);
            let what = format!("{model} case {} tp {tp}", case.name);
            let diff = max_abs_diff(&run.last_logits, &case.last_logits);
            assert!(diff <= tol, "{what}: last logits differ by {diff} > {tol}");
            assert_eq!(run.greedy, case.greedy_ids, "{what}: greedy ids");
            // Every position of the prefill: the reference's top-5 values at their ids.
            let vocab = case.last_logits.len();
            for top in &case.topk_per_position {
                for (id, v) in top.ids.iter().zip(&top.values) {
                    let got = run.all_logits[top.pos * vocab + *id as usize];
                    assert!(
                        (got - v).abs() <= tol,
                        "{what}: position {} id {id}: {got} vs {v}",
                        top.pos
                    );
                }
            }
            // Fixed-point row-parallel sums: the split over ranks changes no bit.
            assert_eq!(
                run.all_logits, base.all_logits,
                "{what}: prefill logits differ from tp 1"
            );
            assert_eq!(
                run.last_logits, base.last_logits,
                "{what}: logits differ from tp 1"
            );
        }
    }
}

#[test]
fn tiny_llama() {
    check_model("tiny-llama");
}

#[test]
fn tiny_llama_sharded_equals_single_file() {
    check_model("tiny-llama-sharded");
    let case = &reference("tiny-llama").cases[0];
    for tp in [1, 3] {
        let single = run_case("tiny-llama", tp, case);
        let sharded = run_case("tiny-llama-sharded", tp, case);
        assert_eq!(single.all_logits, sharded.all_logits, "tp {tp}");
    }
}

#[test]
fn tiny_llama3_bf16_rope_scaling_tied() {
    check_model("tiny-llama3-bf16");
}

#[test]
fn tiny_qwen2_bias_and_replicated_kv() {
    check_model("tiny-qwen2");
}

#[test]
fn tiny_qwen3_qk_norm() {
    check_model("tiny-qwen3");
}

#[test]
fn tiny_mha_uneven_heads() {
    check_model("tiny-mha-uneven");
}

#[test]
fn tiny_mistral_f16() {
    check_model("tiny-mistral-f16");
}

#[test]
fn tiny_smollm_large_vocab() {
    check_model("tiny-smollm-tok");
}

/// Phi-3: q/k/v and gate/up fused in the checkpoint; each rank reads its rows of each part.
#[test]
fn tiny_phi3_fused_projections() {
    check_model("tiny-phi3");
}

/// Mixtral: top-2 of 4 experts, each split over the ranks like a dense MLP.
#[test]
fn tiny_mixtral_experts() {
    check_model("tiny-mixtral");
}

/// Qwen2-MoE: top-4 of 8 experts (softmax weights kept), a gated shared expert, q/k/v bias.
#[test]
fn tiny_qwen2_moe_shared_expert() {
    check_model("tiny-qwen2-moe");
}

/// Qwen3-MoE: top-2 of 8 experts, renormalised, q/k norms.
#[test]
fn tiny_qwen3_moe() {
    check_model("tiny-qwen3-moe");
}

/// Gemma 2: GeGLU, norms (offsets from 1) around attention and MLP, embeddings scaled by
/// √hidden, soft-capped scores and logits, a window of 8 on every other layer (the cases
/// are longer than the window).
#[test]
fn tiny_gemma2() {
    check_model("tiny-gemma2");
}

/// Gemma 3: Gemma 2's layers with q/k norms (offsets from 1) and no soft-capping; a window
/// of 6 on three layers of four (`layer_types`), which rotate with base 10⁴ while the
/// full-attention layer uses 10⁶ (the cases are longer than the window).
#[test]
fn tiny_gemma3() {
    check_model("tiny-gemma3");
}

/// Expert parallelism (`--ep-size` = tp): each rank holds an even share of whole experts
/// (the shared expert still split), and the logits and greedy ids are tp 1's bit for bit.
#[test]
fn expert_parallel_holds_whole_experts_and_gives_the_bits_of_tp_1() {
    let files = tpserve::loader::open_model(&fixture("tiny-qwen2-moe")).unwrap();
    let cfg = &files.config;
    let moe = cfg.moe.as_ref().unwrap();
    let width = moe.expert_intermediate_size;
    for rank in 0..3 {
        let plan = |ep| ShardPlan::new(cfg, files.tensors.as_ref(), 3, rank, ep).unwrap();
        let (tp, ep) = (plan(1).experts.unwrap(), plan(3).experts.unwrap());
        assert_eq!(tp.owned, 0..moe.num_experts);
        assert!(tp.expert.len() < width);
        assert_eq!(ep.owned, [0..2, 2..5, 5..8][rank]);
        assert_eq!(ep.expert, 0..width);
        assert_eq!(ep.shared, tp.shared);
    }
    for model in ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"] {
        let case = &reference(model).cases[0];
        let base = run_case(model, 1, case);
        for tp in 2..=4 {
            let run = run_case_ep(model, tp, tp, case);
            let what = format!("{model} tp {tp} ep {tp}");
            assert_eq!(run.all_logits, base.all_logits, "{what}: prefill logits");
            assert_eq!(run.last_logits, base.last_logits, "{what}: logits");
            assert_eq!(run.greedy, case.greedy_ids, "{what}: greedy ids");
        }
    }
    let dense = tpserve::loader::open_model(&fixture("tiny-llama")).unwrap();
    for (tp, ep, needle) in [(2, 3, "must be 1 or the tp size"), (2, 2, "not a mixture")] {
        let err = ShardPlan::new(&dense.config, dense.tensors.as_ref(), tp, 0, ep).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn every_fixture_is_covered() {
    let mut dirs: Vec<String> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let mut listed: Vec<String> = MODELS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(dirs, listed);
}

/// Each rank holds its share of the weights: the shards add up to the model (replicated
/// norms and kv heads aside) and none holds much more than total / tp.
#[test]
fn ranks_hold_their_share_of_the_weights() {
    for model in [
        "tiny-llama",
        "tiny-mha-uneven",
        "tiny-qwen2",
        "tiny-llama3-bf16",
        "tiny-phi3",
        "tiny-mixtral",
    ] {
        let total = with_group(model, 1, 1, |d| d.weight_bytes_per_rank())[0];
        for tp in 2..=4 {
            let per_rank = with_group(model, tp, 1, |d| d.weight_bytes_per_rank());
            assert_eq!(per_rank.len(), tp);
            let sum: usize = per_rank.iter().sum();
            // Replicated parts: norms on every rank, kv heads shared by a straddling group.
            assert!(
                sum >= total,
                "{model} tp {tp}: shards sum to {sum} < {total}"
            );
            assert!(
                (sum as f64) < total as f64 * 1.3,
                "{model} tp {tp}: shards sum to {sum}, far above the model's {total}"
            );
            for (r, &b) in per_rank.iter().enumerate() {
                let share = total as f64 / tp as f64;
                assert!(
                    (b as f64) < share * 1.35,
                    "{model} tp {tp}: rank {r} holds {b} bytes, share is {share:.0}"
                );
            }
        }
    }
}

/// Several kernel threads per rank split rows and heads differently; results must not move.
#[test]
fn threads_per_rank_do_not_change_results() {
    let case = &reference("tiny-mha-uneven").cases[1];
    let base = run_case("tiny-mha-uneven", 1, case);
    for (tp, threads) in [(1, 3), (2, 2), (3, 2)] {
        let logits =
            with_group_threads("tiny-mha-uneven", tp, threads, case.input_ids.len(), |d| {
                Ok(
                    d.forward_one(&case.input_ids, 0, Logits::All, Phase::Prefill)?
                        .to_vec(),
                )
            });
        assert_eq!(logits, base.all_logits, "tp {tp} × {threads} threads");
    }
}

/// Sampling happens on rank 0 from gathered logits: a seeded run is the same at every tp.
#[test]
fn seeded_sampling_is_the_same_at_every_tp() {
    let case = &reference("tiny-mistral-f16").cases[0];
    let sample = |tp| {
        with_group("tiny-mistral-f16", tp, case.input_ids.len() + 24, |d| {
            let request = GenerateRequest {
                input_ids: case.input_ids.clone(),
                max_new_tokens: 24,
                sampling: SamplingParams {
                    temperature: 1.5,
                    top_k: 40,
                    top_p: 0.95,
                    seed: Some(11),
                    ..Default::default()
                },
                stop_ids: vec![],
                prompt_top: 0,
            };
            Ok(engine::generate(d, &request)?.output_ids)
        })
    };
    let one = sample(1);
    assert_ne!(
        one,
        case.greedy_ids[..],
        "high temperature should leave the greedy path"
    );
    for tp in 2..=4 {
        assert_eq!(sample(tp), one, "tp {tp}");
    }
}

/// Several sequences in one step (prefill and decode mixed, each with its own KV blocks)
/// give exactly the logits each gives alone: batching changes no bit.
#[test]
fn batched_steps_equal_sequences_alone() {
    use tpserve::model::SeqStep;
    let reference = reference("tiny-mha-uneven");
    let (a, b) = (&reference.cases[0].input_ids, &reference.cases[1].input_ids);
    let step = |tokens: &'static [u32], start: usize, blocks: &'static [u32], phase| SeqStep {
        tokens,
        start_pos: start,
        blocks,
        logits: Logits::Last,
        phase,
    };
    let a: &'static [u32] = a.clone().leak();
    let b: &'static [u32] = b.clone().leak();
    const BLOCKS_A: &[u32] = &[0, 1, 2, 3];
    const BLOCKS_B: &[u32] = &[4, 5, 6, 7];
    for tp in [1, 3] {
        let (alone_a, alone_b, batched) = with_group("tiny-mha-uneven", tp, 256, |d| {
            let alone_a = d.forward(&[step(a, 0, BLOCKS_A, Phase::Prefill)])?.to_vec();
            let alone_a2 = d
                .forward(&[step(&[7], a.len(), BLOCKS_A, Phase::Decode)])?
                .to_vec();
            let alone_b = d.forward(&[step(b, 0, BLOCKS_B, Phase::Prefill)])?.to_vec();
            // Again, both at once: a's prefill with b's prefill, then a's decode with b's.
            let both = d
                .forward(&[
                    step(a, 0, BLOCKS_A, Phase::Prefill),
                    step(b, 0, BLOCKS_B, Phase::Prefill),
                ])?
                .to_vec();
            let mixed = d
                .forward(&[
                    step(&[7], a.len(), BLOCKS_A, Phase::Decode),
                    step(&[9], b.len(), BLOCKS_B, Phase::Decode),
                ])?
                .to_vec();
            Ok((
                [alone_a, alone_a2].concat(),
                alone_b,
                [both, mixed].concat(),
            ))
        });
        let vocab = 512;
        assert_eq!(batched[..vocab], alone_a[..vocab], "tp {tp}: a's prefill");
        assert_eq!(
            batched[vocab..2 * vocab],
            alone_b[..],
            "tp {tp}: b's prefill"
        );
        assert_eq!(
            batched[2 * vocab..3 * vocab],
            alone_a[vocab..],
            "tp {tp}: a's decode"
        );
    }
}

/// Vocab-parallel selection: each rank's top k, merged on rank 0, is exactly the top k of
/// the full logits (values and ids, ties by lower id), and sampling from it draws exactly
/// what sampling from the full logits draws — at every tp, vocabularies split unevenly.
#[test]
fn top_k_candidates_equal_the_full_logits() {
    use tpserve::engine::sampling::{top_logits, Sampler};
    let model = "tiny-smollm-tok";
    let case = &reference(model).cases[0];
    let params = SamplingParams {
        temperature: 1.3,
        top_k: 40,
        top_p: 0.9,
        seed: Some(5),
        ..Default::default()
    };
    for tp in 1..=4 {
        with_group(model, tp, case.input_ids.len() + 16, |d| {
            d.forward_one(&case.input_ids, 0, Logits::Last, Phase::Prefill)?;
            let (mut full_sampler, mut top_sampler) =
                (Sampler::new(params.clone()), Sampler::new(params.clone()));
            let mut token = case.input_ids[0];
            for step in 0..16 {
                let pos = case.input_ids.len() + step;
                // The same step twice: the second overwrites the same KV slot identically.
                let full = d
                    .forward_one(&[token], pos, Logits::Last, Phase::Decode)?
                    .to_vec();
                for k in [1, 7, 64] {
                    let top = d.forward_one_top_k(token, pos, k)?;
                    assert_eq!(top, &top_logits(&full, k)[..], "tp {tp} step {step} k {k}");
                }
                let top = d.forward_one_top_k(token, pos, 40)?.to_vec();
                let from_full = full_sampler.sample(&full);
                assert_eq!(
                    top_sampler.sample_top(&top),
                    from_full,
                    "tp {tp} step {step}"
                );
                token = from_full;
            }
            Ok(())
        });
    }
}

/// The communication optimisations change timing only: with overlap and fused all-reduce
/// on or off, prompt and decode logits are the same bits at every tp (prefill splits the
/// tokens, decode the rows of each row-parallel product).
#[test]
fn overlap_and_fused_allreduce_keep_every_bit() {
    use tpserve::model::ForwardOptions;
    for model in ["tiny-mha-uneven", "tiny-qwen2"] {
        let case = &reference(model).cases[0];
        let files = tpserve::loader::open_model(&fixture(model)).unwrap();
        let run = |tp: usize, overlap: bool, fused_allreduce: bool| {
            let mut opts =
                engine::GroupOptions::single_sequence(tp, Some(1), case.input_ids.len() + 8);
            opts.forward = ForwardOptions {
                overlap,
                fused_allreduce,
                ..Default::default()
            };
            engine::run_local(files.tensors.as_ref(), &files.config, &opts, |d| {
                let n = case.input_ids.len();
                let mut logits = d
                    .forward_one(&case.input_ids, 0, Logits::All, Phase::Prefill)?
                    .to_vec();
                for step in 0..8 {
                    let token = case.greedy_ids[step];
                    logits.extend(d.forward_one(
                        &[token],
                        n + step,
                        Logits::Last,
                        Phase::Decode,
                    )?);
                }
                Ok(logits)
            })
            .unwrap()
        };
        let reference = run(1, false, false);
        for tp in 1..=4 {
            for (overlap, fused) in [(false, false), (true, false), (false, true), (true, true)] {
                assert!(
                    run(tp, overlap, fused) == reference,
                    "{model} tp {tp} overlap {overlap} fused {fused}"
                );
            }
        }
    }
}

/// A KV cache in f16 or bf16 (f16 is the default) keeps every fixture model close to the
/// f32 reference, and tp N still gives the bits of tp 1.
#[test]
fn half_precision_kv_caches_stay_close_and_exact_across_tp() {
    use tpserve::model::KvDtype;
    for model in MODELS {
        let case = &reference(model).cases[0];
        let n = case.input_ids.len();
        for (dtype, tol) in [(KvDtype::F16, 5e-3), (KvDtype::BF16, 5e-2)] {
            let logits = |tp| {
                with_group_kv(model, tp, 1, n + 8, dtype, |d| {
                    Ok(
                        d.forward_one(&case.input_ids, 0, Logits::All, Phase::Prefill)?
                            .to_vec(),
                    )
                })
            };
            let base = logits(1);
            let vocab = case.last_logits.len();
            let diff = max_abs_diff(&base[(n - 1) * vocab..], &case.last_logits);
            assert!(
                diff <= tol,
                "{model} {dtype:?}: last logits differ by {diff} > {tol}"
            );
            for tp in [2, 3] {
                assert!(
                    logits(tp) == base,
                    "{model} {dtype:?}: tp {tp} differs from tp 1"
                );
            }
        }
    }
}

/// A MoE model gives a sequence the same bits alone and among 8 others (whose tokens pick
/// other experts in the same step), at tp 1 and 2.
#[test]
fn moe_sequences_alone_equal_batched() {
    for model in ["tiny-mixtral", "tiny-qwen2-moe"] {
        let files = tpserve::loader::open_model(&fixture(model)).unwrap();
        let prompts: Vec<Vec<u32>> = (0..8)
            .map(|i| {
                (0..2 + 3 * i)
                    .map(|j| (11 + 29 * i + 7 * j) as u32 % 512)
                    .collect()
            })
            .collect();
        let feed: Vec<u32> = (0..4).map(|s| 100 + 17 * s).collect();
        let (alone, batched) = alone_and_batched(&files, 1, &prompts, &feed, 5);
        assert_eq!(
            bits(&alone),
            bits(&batched),
            "{model}: batched differs from alone"
        );
        let (alone2, batched2) = alone_and_batched(&files, 2, &prompts, &feed, 5);
        assert_eq!(
            bits(&alone2),
            bits(&alone),
            "{model}: tp 2 differs from tp 1"
        );
        assert_eq!(
            bits(&batched2),
            bits(&batched),
            "{model}: tp 2 batched differs"
        );
    }
}
