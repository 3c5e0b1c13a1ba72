//! The decode loop allocates nothing: a counting global allocator watches every thread of
//! the process (rank 0, the other ranks, their collectives) over hundreds of decode steps.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use tpserve::bench::one_batch::decode_steps;
use tpserve::engine::{self, GroupOptions};
use tpserve::kernels::Phase;
use tpserve::loader;
use tpserve::model::{Logits, SeqStep};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `f`'s result, and the allocations made while it ran, in the whole process.
fn allocations_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    let out = f();
    (out, ALLOCATIONS.load(Ordering::SeqCst) - before)
}

/// A short and a long decode run of the same batch make the same allocations (the loop's
/// two setup vectors): no decode step allocates, at any tp, in pipeline stages (their
/// micro-batches and messages), alone or batched, with one or several kernel threads per
/// rank.
#[test]
fn decode_steps_allocate_nothing() {
    let files = loader::open_model(&common::smollm2()).unwrap();
    let (prompt, short, long): (usize, usize, usize) = (16, 8, 300);
    // (tp, pipeline stages, batch, kernel threads per rank)
    for (tp, pp, batch, threads) in [
        (1, 1, 1, 1),
        (2, 1, 1, 1),
        (3, 1, 2, 1),
        (4, 1, 3, 1),
        (1, 1, 2, 2),
        (2, 1, 1, 2),
        (1, 2, 1, 1),
        (1, 3, 4, 1),
        (2, 2, 3, 1),
    ] {
        let per_seq = (prompt + short + long + 1).div_ceil(16);
        let mut opts = GroupOptions::single_sequence(tp, Some(threads), batch * per_seq * 16);
        opts.pipeline.stages = pp;
        engine::run_local(files.tensors.as_ref(), &files.config, &opts, |d| {
            let tables: Vec<u32> = (0..(batch * per_seq) as u32).collect();
            let prompts: Vec<u32> = (0..(batch * prompt) as u32).map(|i| 100 + i).collect();
            let steps: Vec<SeqStep> = (0..batch)
                .map(|i| SeqStep {
                    tokens: &prompts[i * prompt..(i + 1) * prompt],
                    start_pos: 0,
                    blocks: &tables[i * per_seq..(i + 1) * per_seq],
                    logits: Logits::Last,
                    phase: Phase::Prefill,
                })
                .collect();
            let mut next: Vec<u32> = d.forward_top_k(&steps, 1)?.iter().map(|c| c.0).collect();
            // Warm up: first touches of every buffer.
            decode_steps(d, &mut next, prompt, 4, &tables, per_seq)?;
            let (result, short_run) = allocations_during(|| {
                decode_steps(d, &mut next, prompt + 4, short, &tables, per_seq)
            });
            result?;
            let (result, long_run) = allocations_during(|| {
                decode_steps(d, &mut next, prompt + 4 + short, long, &tables, per_seq)
            });
            result?;
            assert_eq!(
                long_run,
                short_run,
                "tp {tp}, pp {pp}, batch {batch}, {threads} threads per rank: {long} decode steps \
                 allocated {} more times than {short}",
                long_run.saturating_sub(short_run)
            );
            Ok(())
        })
        .unwrap();
    }
}
