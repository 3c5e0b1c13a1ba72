//! The step plan rank 0 broadcasts every step: what all ranks run next.

use crate::kernels::Phase;
use crate::model::{Logits, SeqStep};
use anyhow::{bail, ensure, Result};

const FORWARD: u8 = 0;
const REPORT_MEMORY: u8 = 1;
const STOP: u8 = 2;

/// What rank 0 needs back from a step's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gather {
    /// Every rank's vocabulary slice: the full logits (logprobs, penalties, plain sampling).
    AllLogits,
    /// Each rank's `k` best (logit, id) per position; rank 0 merges them into the global
    /// top k. Greedy needs 1, top-k sampling k: a few floats cross instead of the vocabulary.
    TopK(usize),
}

/// The tokens a logits row may choose (constrained decoding): the row's index among the
/// step's logits rows, and one bit per vocabulary id (`words[id / 32] >> (id % 32) & 1`).
/// Each rank applies it to its own vocabulary slice before choosing its candidates.
pub type RowMask<'a> = (usize, &'a [u32]);

/// Serialises a forward step into `out` (cleared first; its capacity is reused); `masks`
/// (sorted by row) travel only with a top-k gather, where the ranks choose.
pub fn encode_forward(seqs: &[SeqStep], gather: Gather, masks: &[RowMask], out: &mut Vec<u8>) {
    out.clear();
    out.push(FORWARD);
    let k = match gather {
        Gather::AllLogits => 0u32,
        Gather::TopK(k) => k as u32,
    };
    out.extend_from_slice(&k.to_le_bytes());
    out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for seq in seqs {
        let first_logit = match seq.logits {
            Logits::Last => u64::MAX,
            Logits::None => u64::MAX - 1,
            Logits::All => 0,
            Logits::From(k) => k as u64,
        };
        out.extend_from_slice(&first_logit.to_le_bytes());
        out.push(match seq.phase {
            Phase::Prefill => 0,
            Phase::Decode => 1,
        });
        out.extend_from_slice(&(seq.start_pos as u64).to_le_bytes());
        for part in [seq.tokens, seq.blocks] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            for v in part {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let masks = if gather == Gather::AllLogits {
        &[]
    } else {
        masks
    };
    out.extend_from_slice(&(masks.len() as u32).to_le_bytes());
    for (row, words) in masks {
        out.extend_from_slice(&(*row as u32).to_le_bytes());
        out.extend_from_slice(&(words.len() as u32).to_le_bytes());
        for w in *words {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

pub fn encode_report_memory(out: &mut Vec<u8>) {
    out.clear();
    out.push(REPORT_MEMORY);
}

pub fn encode_stop(out: &mut Vec<u8>) {
    out.clear();
    out.push(STOP);
}

/// What a received plan asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    Forward,
    /// Each rank reports its weight bytes and KV bytes per token.
    ReportMemory,
    Stop,
}

/// A received plan, decoded into buffers that are reused step after step.
#[derive(Default)]
pub struct ReceivedPlan {
    gather: Option<Gather>,
    tokens: Vec<u32>,
    blocks: Vec<u32>,
    seqs: Vec<SeqMeta>,
    /// The masks' words, and each mask's row and range of words.
    mask_words: Vec<u32>,
    masks: Vec<(usize, std::ops::Range<usize>)>,
}

/// One sequence of a received plan: its tokens and blocks as ranges into the buffers.
struct SeqMeta {
    tokens: std::ops::Range<usize>,
    blocks: std::ops::Range<usize>,
    start_pos: usize,
    logits: Logits,
    phase: Phase,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        ensure!(
            self.at + N <= self.bytes.len(),
            "malformed step plan: truncated"
        );
        let out = self.bytes[self.at..self.at + N].try_into()?;
        self.at += N;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn u32s(&mut self, out: &mut Vec<u32>) -> Result<std::ops::Range<usize>> {
        let n = self.u32()? as usize;
        ensure!(
            n * 4 <= self.bytes.len() - self.at,
            "malformed step plan: truncated"
        );
        let start = out.len();
        for _ in 0..n {
            out.push(self.u32()?);
        }
        Ok(start..out.len())
    }
}

impl ReceivedPlan {
    pub fn decode(&mut self, bytes: &[u8]) -> Result<PlanKind> {
        match bytes.first() {
            Some(&FORWARD) => {
                self.tokens.clear();
                self.blocks.clear();
                self.seqs.clear();
                self.mask_words.clear();
                self.masks.clear();
                let mut r = Reader { bytes, at: 1 };
                self.gather = Some(match r.u32()? {
                    0 => Gather::AllLogits,
                    k => Gather::TopK(k as usize),
                });
                let n = r.u32()?;
                for _ in 0..n {
                    let logits = match r.u64()? {
                        u64::MAX => Logits::Last,
                        x if x == u64::MAX - 1 => Logits::None,
                        0 => Logits::All,
                        k => Logits::From(k as usize),
                    };
                    let phase = match r.take::<1>()?[0] {
                        0 => Phase::Prefill,
                        1 => Phase::Decode,
                        p => bail!("malformed step plan: phase {p}"),
                    };
                    let start_pos = r.u64()? as usize;
                    let tokens = r.u32s(&mut self.tokens)?;
                    let blocks = r.u32s(&mut self.blocks)?;
                    self.seqs.push(SeqMeta {
                        tokens,
                        blocks,
                        start_pos,
                        logits,
                        phase,
                    });
                }
                for _ in 0..r.u32()? {
                    let row = r.u32()? as usize;
                    let words = r.u32s(&mut self.mask_words)?;
                    self.masks.push((row, words));
                }
                ensure!(r.at == bytes.len(), "malformed step plan: trailing bytes");
                Ok(PlanKind::Forward)
            }
            Some(&REPORT_MEMORY) => Ok(PlanKind::ReportMemory),
            Some(&STOP) => Ok(PlanKind::Stop),
            _ => bail!("malformed step plan of {} bytes", bytes.len()),
        }
    }

    /// What the last decoded forward plan gathers.
    pub fn gather(&self) -> Gather {
        self.gather.unwrap_or(Gather::AllLogits)
    }

    /// The token masks of the last decoded forward plan, into `out` (cleared first).
    pub fn masks<'a>(&'a self, out: &mut Vec<RowMask<'a>>) {
        out.clear();
        out.extend(
            self.masks
                .iter()
                .map(|(row, words)| (*row, &self.mask_words[words.clone()])),
        );
    }

    /// The sequences of the last decoded forward plan, into `out` (cleared first).
    pub fn seqs<'a>(&'a self, out: &mut Vec<SeqStep<'a>>) {
        out.clear();
        out.extend(self.seqs.iter().map(|m| SeqStep {
            tokens: &self.tokens[m.tokens.clone()],
            start_pos: m.start_pos,
            blocks: &self.blocks[m.blocks.clone()],
            logits: m.logits,
            phase: m.phase,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_plan_round_trips() {
        let seqs = [
            SeqStep {
                tokens: &[1, 70000, u32::MAX],
                start_pos: 12345,
                blocks: &[3, 4, 900],
                logits: Logits::From(2),
                phase: Phase::Prefill,
            },
            SeqStep {
                tokens: &[5],
                start_pos: 0,
                blocks: &[0],
                logits: Logits::None,
                phase: Phase::Decode,
            },
        ];
        let mut buf = vec![];
        let masks: [RowMask; 2] = [(0, &[7, 0, u32::MAX]), (1, &[1])];
        encode_forward(&seqs, Gather::TopK(40), &masks, &mut buf);
        let mut plan = ReceivedPlan::default();
        assert_eq!(plan.decode(&buf).unwrap(), PlanKind::Forward);
        let mut decoded = vec![];
        plan.seqs(&mut decoded);
        assert_eq!(decoded, seqs);
        let mut decoded_masks = vec![];
        plan.masks(&mut decoded_masks);
        assert_eq!(decoded_masks, masks);
        assert_eq!(plan.gather(), Gather::TopK(40));
        assert!(plan.decode(&buf[..buf.len() - 1]).is_err());
    }
}
