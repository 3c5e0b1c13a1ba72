//! Which rows, columns, heads and vocab entries each rank owns. Pure functions.
//!
//! Splits need not be even: every rank gets a contiguous range, sizes differ by at most one
//! unit (one aligned block), so `--tp 2` works on a 9-head model without padding.

use anyhow::{bail, Result};
use std::ops::Range;

/// Contiguous ranges of `total` units over `parts` ranks, in multiples of `align`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    total: usize,
    align: usize,
    parts: usize,
}

impl Partition {
    /// Splits units one by one.
    pub fn even(total: usize, parts: usize) -> Self {
        Partition {
            total,
            align: 1,
            parts: parts.max(1),
        }
    }

    /// Splits in whole blocks of `align` units (the quant block, along a weight's input
    /// dimension). `what` names the split in the error when `total` is not whole blocks.
    pub fn aligned(total: usize, parts: usize, align: usize, what: &str) -> Result<Self> {
        if align == 0 || !total.is_multiple_of(align) {
            bail!(
                "cannot split {what}: {total} is not a multiple of the block size {align}; \
                 use a smaller --tp or a model whose dimension fits the block size"
            );
        }
        Ok(Partition {
            total,
            align,
            parts: parts.max(1),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn parts(&self) -> usize {
        self.parts
    }

    pub fn align(&self) -> usize {
        self.align
    }

    /// The units owned by `rank`.
    pub fn range(&self, rank: usize) -> Range<usize> {
        let blocks = self.total / self.align;
        let start = blocks * rank / self.parts;
        let end = blocks * (rank + 1) / self.parts;
        start * self.align..end * self.align
    }
}

/// A pipeline stage (`--pp-size`): a contiguous share of the layers, the first stage with
/// the embedding, the last with the final norm and the LM head. Uneven shares differ by
/// one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub index: usize,
    pub count: usize,
    pub layers: Range<usize>,
}

impl Stage {
    /// Stage `index` of `count` over `num_layers` layers.
    pub fn new(num_layers: usize, count: usize, index: usize) -> Result<Self> {
        if count == 0 {
            bail!("--pp-size must be at least 1");
        }
        if count > num_layers {
            bail!("--pp-size {count} is more than the model's {num_layers} layers: every stage needs at least one; use --pp-size {num_layers} or less");
        }
        Ok(Stage {
            index,
            count,
            layers: Partition::even(num_layers, count).range(index),
        })
    }

    /// The whole model as one stage.
    pub fn whole(num_layers: usize) -> Self {
        Stage {
            index: 0,
            count: 1,
            layers: 0..num_layers,
        }
    }

    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// The attention heads a rank owns: its query heads, and the key/value heads those use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadShard {
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    /// Query heads per key/value head (the GQA group size).
    pub group: usize,
}

impl HeadShard {
    /// Splits the query heads evenly; each rank keeps every kv head its query heads use,
    /// so a GQA group that straddles two ranks has its kv head replicated on both.
    pub fn new(num_heads: usize, num_kv_heads: usize, tp: usize, rank: usize) -> Result<Self> {
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "{num_heads} attention heads cannot be grouped over {num_kv_heads} key/value heads"
            );
        }
        if tp == 0 || tp > num_heads {
            bail!("tensor parallel size {tp} must be between 1 and the number of attention heads ({num_heads})");
        }
        let group = num_heads / num_kv_heads;
        let q_heads = Partition::even(num_heads, tp).range(rank);
        let kv_heads = q_heads.start / group..(q_heads.end - 1) / group + 1;
        Ok(HeadShard {
            q_heads,
            kv_heads,
            group,
        })
    }

    /// The index, within this rank's kv heads, of the kv head that local query head `i` uses.
    pub fn local_kv_for(&self, local_q: usize) -> usize {
        (self.q_heads.start + local_q) / self.group - self.kv_heads.start
    }

    /// The local q heads that read local kv head `local_kv` (contiguous).
    pub fn local_q_for(&self, local_kv: usize) -> std::ops::Range<usize> {
        let kv = self.kv_heads.start + local_kv;
        let lo = (kv * self.group).max(self.q_heads.start);
        let hi = ((kv + 1) * self.group).min(self.q_heads.end);
        lo - self.q_heads.start..hi.max(lo) - self.q_heads.start
    }

    pub fn num_q(&self) -> usize {
        self.q_heads.len()
    }

    pub fn num_kv(&self) -> usize {
        self.kv_heads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn partition_covers_every_unit_once(blocks in 0usize..500, align in 1usize..64, parts in 1usize..9) {
            let total = blocks * align;
            let p = Partition::aligned(total, parts, align, "test").unwrap();
            let mut next = 0;
            let mut sizes = vec![];
            for r in 0..parts {
                let range = p.range(r);
                prop_assert_eq!(range.start, next);
                prop_assert_eq!(range.start % align, 0);
                prop_assert_eq!(range.len() % align, 0);
                next = range.end;
                sizes.push(range.len());
            }
            prop_assert_eq!(next, total);
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            prop_assert!(max - min <= align);
        }

        #[test]
        fn heads_owned_once_and_kv_heads_held(kv in 1usize..17, group in 1usize..9, tp in 1usize..9) {
            let heads = kv * group;
            prop_assume!(tp <= heads);
            let mut owner = vec![0usize; heads];
            let mut sizes = vec![];
            for r in 0..tp {
                let s = HeadShard::new(heads, kv, tp, r).unwrap();
                sizes.push(s.num_q());
                for (i, h) in s.q_heads.clone().enumerate() {
                    owner[h] += 1;
                    // the kv head this q head needs is held, at the index local_kv_for says
                    prop_assert!(s.kv_heads.contains(&(h / group)));
                    prop_assert_eq!(s.kv_heads.start + s.local_kv_for(i), h / group);
                }
                // no kv head is held without a q head that uses it
                for k in s.kv_heads.clone() {
                    prop_assert!(s.q_heads.clone().any(|h| h / group == k));
                }
                // local_q_for(k) is exactly the local q heads of kv head k, in order
                let mut next = 0;
                for k in 0..s.num_kv() {
                    let sharing = s.local_q_for(k);
                    prop_assert_eq!(sharing.start, next);
                    prop_assert!(!sharing.is_empty());
                    prop_assert!(sharing.clone().all(|i| s.local_kv_for(i) == k));
                    next = sharing.end;
                }
                prop_assert_eq!(next, s.num_q());
            }
            prop_assert!(owner.iter().all(|&c| c == 1));
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn kv_replication_matches_sglang_when_kv_heads_fewer_than_tp() {
        // 8 q heads, 2 kv heads, tp 4: each kv head is held by two ranks.
        let kv: Vec<_> = (0..4)
            .map(|r| HeadShard::new(8, 2, 4, r).unwrap().kv_heads)
            .collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
    }

    #[test]
    fn uneven_heads_split_without_padding() {
        let s: Vec<_> = (0..2)
            .map(|r| HeadShard::new(9, 3, 2, r).unwrap())
            .collect();
        assert_eq!((s[0].q_heads.clone(), s[0].kv_heads.clone()), (0..4, 0..2));
        assert_eq!((s[1].q_heads.clone(), s[1].kv_heads.clone()), (4..9, 1..3));
    }

    #[test]
    fn impossible_splits_are_errors() {
        assert!(HeadShard::new(8, 4, 0, 0).is_err());
        assert!(HeadShard::new(8, 4, 9, 0).is_err());
        assert!(Partition::aligned(100, 2, 32, "x").is_err());
    }
}
