//! The tensor-parallel group: the collectives that ranks use to combine their shards; and
//! the point-to-point messages of pipeline stages ([`peers`]).
//!
//! Every backend guarantees that after a collective all ranks hold bit-identical values
//! (sums are always taken in rank order), so ranks that start equal stay equal and
//! greedy decoding cannot diverge between them. Nothing here knows about models.

pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod peers;

pub use local::LocalGroup;
pub use peers::{LocalPeers, Peers};

use anyhow::Result;

/// One rank's handle on its tensor-parallel group.
///
/// All ranks must call the same collectives in the same order (SPMD); a rank that fails
/// calls [`Comm::abort`] so that the others return an error instead of waiting forever.
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;

    /// Element-wise sum over all ranks, in place.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()>;

    /// Element-wise sum of 64-bit integers (fixed-point values): exact, so the result does
    /// not depend on how the terms were split over ranks.
    fn all_reduce_sum_i64(&mut self, data: &mut [i64]) -> Result<()>;

    /// Sums several tensors in one exchange: one synchronisation instead of one per tensor.
    fn all_reduce_many(&mut self, tensors: &mut [&mut [f32]]) -> Result<()>;

    /// Concatenates every rank's `local` (lengths may differ) in rank order into `out`.
    fn all_gather(&mut self, local: &[f32], out: &mut Vec<f32>) -> Result<()>;

    /// Copies `data` of rank `root` into `data` of every rank (the length follows the root's).
    fn broadcast(&mut self, data: &mut Vec<u8>, root: usize) -> Result<()>;

    fn barrier(&mut self) -> Result<()>;

    /// First half of a split-phase all-reduce of 64-bit integers (the engine's fixed-point
    /// sums): publishes this rank's contribution and returns without waiting for the
    /// others, so the caller can compute meanwhile. `data` must be passed unchanged to
    /// `end_all_reduce`.
    fn begin_all_reduce(&mut self, data: &[i64]) -> Result<()>;

    /// Second half: waits for every rank's contribution and writes the sum into `data`.
    fn end_all_reduce(&mut self, data: &mut [i64]) -> Result<()>;

    /// A handle that makes every rank's pending and future collectives fail with a reason;
    /// kept by whoever runs the rank, so a failing rank can take the group down.
    fn abort_handle(&self) -> AbortHandle;
}

/// Aborts a group: `abort(reason)`.
pub type AbortHandle = Box<dyn Fn(&str) + Send + Sync>;

/// An all-reduce in flight. It borrows the group, so no other collective can start before
/// it completes; dropping it without `wait` completes it anyway (ignoring errors) so that
/// the other ranks are never left waiting.
pub struct Pending<'a> {
    comm: Option<&'a mut dyn Comm>,
    data: &'a mut [i64],
}

impl Pending<'_> {
    /// Completes the all-reduce: afterwards the buffer holds the sum over all ranks.
    pub fn wait(mut self) -> Result<()> {
        let comm = self
            .comm
            .take()
            .expect("pending all-reduce completed twice");
        comm.end_all_reduce(self.data)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(comm) = self.comm.take() {
            let _ = comm.end_all_reduce(self.data);
        }
    }
}

impl dyn Comm + '_ {
    /// Starts an all-reduce that completes on [`Pending::wait`]; the caller computes meanwhile.
    pub fn start_all_reduce<'a>(&'a mut self, data: &'a mut [i64]) -> Result<Pending<'a>> {
        self.begin_all_reduce(data)?;
        Ok(Pending {
            comm: Some(self),
            data,
        })
    }
}
