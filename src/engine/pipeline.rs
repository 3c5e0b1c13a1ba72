//! Pipeline parallelism (`--pp-size`): the layers split into stages, each stage a
//! tensor-parallel group, hidden states handed from stage to stage.
//!
//! World rank `stage · tp + t` is rank `t` of stage `stage`'s TP group; rank `t` of one
//! stage sends to rank `t` of the next (every rank of a stage holds the same hidden state
//! after its all-reduces). Rank 0 (stage 0) plans every step for the whole world. A step is
//! cut into micro-batches of whole sequences: stage 0 runs the first and hands it on, then
//! runs the second while stage 1 runs the first, and so on, so the stages work at once. A
//! sequence's bits do not depend on its batch, so the cut changes no result.

use super::step_plan::Gather;
use crate::comm::{Comm, Peers};
use crate::model::SeqStep;
use crate::shard::Stage;
use anyhow::{bail, Result};

/// How ranks are laid out over stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Stages (`--pp-size`).
    pub stages: usize,
    /// Sequences per micro-batch (`--pp-max-micro-batch-size`; a step of fewer sequences is
    /// one micro-batch); `None`: a step's sequences cut into as many micro-batches as there
    /// are stages.
    pub max_micro_batch: Option<usize>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            stages: 1,
            max_micro_batch: None,
        }
    }
}

impl PipelineOptions {
    /// Checks the options against a model's layers.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        Stage::new(num_layers, self.stages, 0)?;
        if self.max_micro_batch == Some(0) {
            bail!("--pp-max-micro-batch-size must be at least 1");
        }
        Ok(())
    }

    /// Sequences per micro-batch for a step of `seqs` sequences.
    pub fn micro_batch(&self, seqs: usize) -> usize {
        let even = seqs.div_ceil(self.stages.max(1));
        self.max_micro_batch.unwrap_or(even).clamp(1, seqs.max(1))
    }
}

/// A rank's handle on the pipeline: the world all stages form (plans, memory reports),
/// the messages between stages, and where this rank sits.
pub struct Pipeline {
    pub world: Box<dyn Comm>,
    pub peers: Box<dyn Peers>,
    pub stage: Stage,
    /// The TP group size of every stage.
    pub tp: usize,
    pub options: PipelineOptions,
}

impl Pipeline {
    /// This rank's place in its stage's TP group.
    fn tp_rank(&self) -> usize {
        self.world.rank() % self.tp
    }

    /// Receives this rank's input from the previous stage (none on the first stage).
    pub fn receive_hidden<'a>(&mut self, buf: &'a mut Vec<f32>) -> Result<Option<&'a [f32]>> {
        if self.stage.is_first() {
            return Ok(None);
        }
        let from = (self.stage.index - 1) * self.tp + self.tp_rank();
        self.peers.recv(from, buf)?;
        Ok(Some(buf))
    }

    /// Hands `hidden` to the next stage.
    pub fn send_hidden(&mut self, hidden: &[f32]) -> Result<()> {
        let to = (self.stage.index + 1) * self.tp + self.tp_rank();
        self.peers.send(to, hidden)
    }

    /// At the end of a step, the last stage's results reach rank 0: its first rank sends
    /// them, rank 0 receives them into `gathered`.
    pub fn return_results(&mut self, gathered: &mut Vec<f32>) -> Result<()> {
        let last_stage_leader = (self.stage.count - 1) * self.tp;
        match self.world.rank() {
            0 => self.peers.recv(last_stage_leader, gathered),
            r if r == last_stage_leader => self.peers.send(0, gathered),
            _ => Ok(()),
        }
    }
}

/// The micro-batches of a step and the index of each one's first logits row.
pub fn micro_batches<'s, 'a>(
    seqs: &'s [SeqStep<'a>],
    size: usize,
) -> impl Iterator<Item = (&'s [SeqStep<'a>], usize)> {
    let mut first_row = 0;
    seqs.chunks(size.max(1)).map(move |mb| {
        let at = first_row;
        first_row += logit_rows(mb);
        (mb, at)
    })
}

/// Logits rows a list of sequences asks for.
pub fn logit_rows(seqs: &[SeqStep]) -> usize {
    seqs.iter()
        .map(|s| s.logits.rows(s.tokens.len()).map_or(0, |r| r.len()))
        .sum()
}

/// Floats a micro-batch of `rows` logits rows gathers from `tp` ranks.
pub fn gathered_len(gather: Gather, rows: usize, vocab: usize, tp: usize) -> usize {
    match gather {
        Gather::AllLogits => rows * vocab,
        Gather::TopK(k) => rows * tp * 2 * k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_split_a_step_over_the_stages_within_the_cap() {
        let opts = |stages, max| PipelineOptions {
            stages,
            max_micro_batch: max,
        };
        assert_eq!(opts(1, None).micro_batch(16), 16);
        assert_eq!(opts(2, None).micro_batch(16), 8);
        assert_eq!(opts(3, None).micro_batch(16), 6);
        assert_eq!(opts(4, Some(2)).micro_batch(16), 2);
        assert_eq!(opts(2, Some(100)).micro_batch(5), 5);
        assert_eq!(opts(4, None).micro_batch(1), 1);
        assert!(opts(3, None).validate(2).is_err());
        assert!(opts(2, Some(0)).validate(2).is_err());
        assert!(opts(2, Some(1)).validate(2).is_ok());
    }
}
