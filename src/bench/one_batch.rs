//! One batch through the whole engine (SGLang's bench_one_batch): `batch` sequences of
//! `input_len` random prompt tokens prefilled in one step, then `output_len` greedy decode
//! steps of one token per sequence, timed separately.

use crate::engine::Driver;
use crate::kernels::Phase;
use crate::model::{Logits, SeqStep};
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct BatchSpec {
    pub batch: usize,
    pub input_len: usize,
    pub output_len: usize,
}

impl BatchSpec {
    /// KV blocks of `block_size` positions one sequence needs.
    pub fn blocks_per_seq(&self, block_size: usize) -> usize {
        (self.input_len + self.output_len).div_ceil(block_size)
    }
}

/// Seconds the two phases took.
#[derive(Debug, Clone, Copy)]
pub struct BatchTimes {
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl BatchTimes {
    pub fn prefill_tok_s(&self, spec: &BatchSpec) -> f64 {
        (spec.batch * spec.input_len) as f64 / self.prefill_s
    }

    pub fn decode_tok_s(&self, spec: &BatchSpec) -> f64 {
        (spec.batch * spec.output_len) as f64 / self.decode_s
    }

    /// Time per output token of one sequence (one decode step).
    pub fn tpot_ms(&self, spec: &BatchSpec) -> f64 {
        1e3 * self.decode_s / spec.output_len as f64
    }
}

/// Runs `spec` once on the group behind `driver`; prompt tokens come from `seed`.
pub fn run_batch(driver: &mut Driver, spec: &BatchSpec, seed: u64) -> Result<BatchTimes> {
    let per_seq = spec.blocks_per_seq(driver.block_size());
    if spec.batch == 0 || spec.input_len == 0 || spec.output_len == 0 {
        bail!("batch size, input length and output length must be at least 1");
    }
    if spec.batch * per_seq > driver.kv_blocks() {
        bail!(
            "{} sequences of {} positions need {} KV blocks; the cache has {}",
            spec.batch,
            spec.input_len + spec.output_len,
            spec.batch * per_seq,
            driver.kv_blocks()
        );
    }
    let vocab = driver.config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(seed);
    let prompts: Vec<u32> = (0..spec.batch * spec.input_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let tables: Vec<u32> = (0..(spec.batch * per_seq) as u32).collect();
    let table = |i: usize| &tables[i * per_seq..(i + 1) * per_seq];

    let start = Instant::now();
    let steps: Vec<SeqStep> = (0..spec.batch)
        .map(|i| SeqStep {
            tokens: &prompts[i * spec.input_len..(i + 1) * spec.input_len],
            start_pos: 0,
            blocks: table(i),
            logits: Logits::Last,
            phase: Phase::Prefill,
        })
        .collect();
    let mut next: Vec<u32> = driver
        .forward_top_k(&steps, 1)?
        .iter()
        .map(|c| c.0)
        .collect();
    let prefill_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    decode_steps(
        driver,
        &mut next,
        spec.input_len,
        spec.output_len,
        &tables,
        per_seq,
    )?;
    Ok(BatchTimes {
        prefill_s,
        decode_s: start.elapsed().as_secs_f64(),
    })
}

/// `steps` greedy decode steps of every sequence: sequence `i` feeds `next[i]` at
/// positions `start_pos..`, with KV blocks `tables[i * per_seq..]`; `next` ends as the
/// last tokens chosen. Allocates nothing once warm.
pub fn decode_steps(
    driver: &mut Driver,
    next: &mut [u32],
    start_pos: usize,
    steps: usize,
    tables: &[u32],
    per_seq: usize,
) -> Result<()> {
    let mut storage: Vec<SeqStep<'static>> = Vec::with_capacity(next.len());
    let mut chosen = vec![0u32; next.len()];
    for step in 0..steps {
        let mut batch = SeqStep::recycle(std::mem::take(&mut storage));
        batch.extend((0..next.len()).map(|i| SeqStep {
            tokens: &next[i..i + 1],
            start_pos: start_pos + step,
            blocks: &tables[i * per_seq..(i + 1) * per_seq],
            logits: Logits::Last,
            phase: Phase::Decode,
        }));
        let top = driver.forward_top_k(&batch, 1)?;
        for (c, t) in chosen.iter_mut().zip(top) {
            *c = t.0;
        }
        storage = SeqStep::recycle(batch);
        next.copy_from_slice(&chosen);
    }
    Ok(())
}
