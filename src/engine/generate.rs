//! Generation of one sequence: prefill the prompt, then decode token by token.

use super::runtime::Driver;
use super::sampling::{top_logits, Sampler, SamplingParams};
use crate::kernels::Phase;
use crate::model::Logits;
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after any of these tokens (which is kept in the output).
    pub stop_ids: Vec<u32>,
    /// How many of the largest last-prompt-position logits to report.
    pub prompt_top: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub output_ids: Vec<u32>,
    /// The largest logits at the last prompt position, descending.
    pub prompt_logits_top: Vec<(u32, f32)>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

/// Checks ids against the vocabulary and the request against the KV capacity.
pub fn validate_request(req: &GenerateRequest, vocab_size: usize, capacity: usize) -> Result<()> {
    if req.input_ids.is_empty() {
        bail!("the prompt is empty: give at least one input id");
    }
    if let Some(bad) = req.input_ids.iter().find(|&&id| id as usize >= vocab_size) {
        bail!("input id {bad} is out of range: the model's vocabulary has {vocab_size} tokens (ids 0..{})", vocab_size - 1);
    }
    req.sampling.validate()?;
    let needed = req.input_ids.len() + req.max_new_tokens;
    if needed > capacity {
        bail!(
            "prompt ({}) plus max new tokens ({}) is {needed} positions, more than the context of {capacity}",
            req.input_ids.len(),
            req.max_new_tokens
        );
    }
    Ok(())
}

pub fn generate(driver: &mut Driver, req: &GenerateRequest) -> Result<Generation> {
    validate_request(req, driver.config().vocab_size, driver.kv_capacity())?;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut out = Vec::with_capacity(req.max_new_tokens);
    let logits = driver.forward_one(&req.input_ids, 0, Logits::Last, Phase::Prefill)?;
    let prompt_logits_top = top_logits(logits, req.prompt_top);
    let mut pos = req.input_ids.len();
    let mut finish_reason = FinishReason::Length;
    if req.max_new_tokens > 0 {
        let mut next = sampler.sample(logits);
        loop {
            out.push(next);
            if req.stop_ids.contains(&next) {
                finish_reason = FinishReason::Stop;
                break;
            }
            if out.len() == req.max_new_tokens {
                break;
            }
            next = match sampler.candidates_needed() {
                Some(k) => {
                    let top = driver.forward_one_top_k(next, pos, k)?;
                    sampler.sample_top(top)
                }
                None => {
                    let logits = driver.forward_one(&[next], pos, Logits::Last, Phase::Decode)?;
                    sampler.sample(logits)
                }
            };
            pos += 1;
        }
    }
    Ok(Generation {
        output_ids: out,
        prompt_logits_top,
        finish_reason,
    })
}
