//! The step plan rank 0 broadcasts every step: what all ranks run next.

use crate::model::Logits;
use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPlan<'a> {
    /// Run `tokens` at positions `start_pos..` (on workers the tokens arrive separately).
    Forward {
        tokens: &'a [u32],
        start_pos: usize,
        logits: Logits,
    },
    /// Report each rank's resident weight bytes.
    ReportWeights,
    /// Leave the worker loop.
    Stop,
}

const FORWARD: u8 = 0;
const REPORT_WEIGHTS: u8 = 1;
const STOP: u8 = 2;

impl StepPlan<'_> {
    /// Serialises into `out` (cleared first; its capacity is reused).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match *self {
            StepPlan::Forward {
                tokens,
                start_pos,
                logits,
            } => {
                out.push(FORWARD);
                let first_logit = match logits {
                    Logits::Last => u64::MAX,
                    Logits::All => 0,
                    Logits::From(k) => k as u64,
                };
                out.extend_from_slice(&first_logit.to_le_bytes());
                out.extend_from_slice(&(start_pos as u64).to_le_bytes());
                for t in tokens {
                    out.extend_from_slice(&t.to_le_bytes());
                }
            }
            StepPlan::ReportWeights => out.push(REPORT_WEIGHTS),
            StepPlan::Stop => out.push(STOP),
        }
    }

    /// Parses a plan; a forward plan's tokens are written to `tokens`.
    pub fn decode<'t>(bytes: &[u8], tokens: &'t mut Vec<u32>) -> Result<StepPlan<'t>> {
        match bytes.first() {
            Some(&FORWARD) if bytes.len() >= 17 && (bytes.len() - 17).is_multiple_of(4) => {
                let logits = match u64::from_le_bytes(bytes[1..9].try_into()?) {
                    u64::MAX => Logits::Last,
                    0 => Logits::All,
                    k => Logits::From(k as usize),
                };
                let start_pos = u64::from_le_bytes(bytes[9..17].try_into()?) as usize;
                tokens.clear();
                tokens.extend(
                    bytes[17..]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                Ok(StepPlan::Forward {
                    tokens,
                    start_pos,
                    logits,
                })
            }
            Some(&REPORT_WEIGHTS) => Ok(StepPlan::ReportWeights),
            Some(&STOP) => Ok(StepPlan::Stop),
            _ => bail!("malformed step plan of {} bytes", bytes.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_plan_round_trips() {
        let mut buf = vec![];
        let plan = StepPlan::Forward {
            tokens: &[1, 70000, u32::MAX],
            start_pos: 12345,
            logits: Logits::From(64),
        };
        plan.encode(&mut buf);
        let mut tokens = vec![];
        assert_eq!(StepPlan::decode(&buf, &mut tokens).unwrap(), plan);
        assert!(StepPlan::decode(&buf[..buf.len() - 1], &mut tokens).is_err());
    }
}
