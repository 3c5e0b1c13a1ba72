//! How many KV cache blocks the ranks allocate: the number of tokens the user asked for
//! (`--max-total-tokens`), or what a fraction of the memory still available holds
//! (`--mem-fraction-static`), measured once every rank's weights are resident, so that
//! weights and cache together never exceed the machine.

use crate::comm::Comm;
use anyhow::{bail, Result};

/// The KV cache's size, as the user gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCapacity {
    /// Exactly this many positions (rounded up to whole blocks).
    Tokens(usize),
    /// `fraction` of the memory available after loading, at most `at_most_tokens`.
    MemoryFraction {
        fraction: f64,
        at_most_tokens: usize,
    },
}

impl KvCapacity {
    /// Blocks of `block_size` positions per rank. Collective: every rank of the group calls
    /// it after loading its weights, with its own KV bytes per position; all get rank 0's
    /// answer.
    pub(crate) fn blocks(
        self,
        comm: &mut dyn Comm,
        rank_bytes_per_token: usize,
        block_size: usize,
    ) -> Result<usize> {
        match self {
            KvCapacity::Tokens(n) => agree(comm, n.div_ceil(block_size).max(1)),
            KvCapacity::MemoryFraction {
                fraction,
                at_most_tokens,
            } => {
                // All ranks' weights are resident before memory is measured.
                comm.barrier()?;
                let mut per_token = [rank_bytes_per_token as i64];
                comm.all_reduce_sum_i64(&mut per_token)?;
                let per_token = per_token[0] as usize;
                let available = available_memory().unwrap_or(4 << 30);
                let blocks = fitting_blocks(available, fraction, per_token, block_size);
                let blocks = blocks.min(at_most_tokens.div_ceil(block_size).max(1));
                let blocks = agree(comm, blocks)?;
                if blocks == 0 {
                    bail!(
                        "{:.2} GiB of memory left after loading the weights leaves no room for \
                         a KV cache block ({per_token} bytes per token over all ranks, {block_size} \
                         tokens a block): raise --mem-fraction-static or give --max-total-tokens",
                        available as f64 / (1u64 << 30) as f64
                    );
                }
                Ok(blocks)
            }
        }
    }
}

/// Whole blocks that `fraction` of `available` bytes holds.
fn fitting_blocks(available: u64, fraction: f64, per_token: usize, block_size: usize) -> usize {
    let budget = (available as f64 * fraction) as u128;
    let block_bytes = (per_token as u128 * block_size as u128).max(1);
    (budget / block_bytes).min(usize::MAX as u128) as usize
}

/// Rank 0's `value`, on every rank (ranks on other machines may measure other memory).
fn agree(comm: &mut dyn Comm, value: usize) -> Result<usize> {
    let mut bytes = (value as u64).to_le_bytes().to_vec();
    comm.broadcast(&mut bytes, 0)?;
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("rank 0 sent a malformed setting"))?;
    Ok(u64::from_le_bytes(bytes) as usize)
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fit_the_budget_and_never_overflow() {
        // 1 GiB, half of it, 1 KiB per token, 16 tokens a block: 32768 blocks.
        assert_eq!(fitting_blocks(1 << 30, 0.5, 1024, 16), 32768);
        assert_eq!(fitting_blocks(1 << 20, 0.3, 1 << 20, 16), 0);
        assert_eq!(fitting_blocks(u64::MAX, 1.0, usize::MAX, usize::MAX), 0);
        // More blocks than an index can count: capped, not wrapped.
        assert_eq!(fitting_blocks(u64::MAX, 1.0, 1, 1), usize::MAX);
    }
}
