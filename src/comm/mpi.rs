//! The `mpi` backend: one rank per process, started by `mpirun` (Open MPI or MPICH), in one
//! node over shared memory or across nodes over the network. The MPI world is the TP group,
//! or with pipeline stages it splits into one TP group per stage ([`MpiComm::split`]) and
//! carries the stages' point-to-point messages ([`MpiPeers`]).
//!
//! MPI sums in a fixed order for a given communicator, so every rank gets the same bits; the
//! engine's row-parallel sums are integers anyway (exact whatever the order).

use super::{AbortHandle, Comm, Peers};
use anyhow::{anyhow, bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::request::{Request, StaticScope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

/// When this process is part of an MPI job: reports `message` and aborts every rank, so no
/// rank waits forever (in a collective, or in MPI_Finalize) for one that failed.
pub fn abort_job_on_error(message: &str) {
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        let rank = mpi::topology::SimpleCommunicator::world().rank();
        eprintln!("error: rank {rank} failed: {message}; aborting every rank (MPI_Abort)");
        // SAFETY: aborting the world is always allowed and does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 1);
        }
    }
}

/// The MPI environment of this process. Held here, not by a comm, so that dropping a comm
/// on an error path never finalizes MPI (which would wait for ranks that wait for us):
/// success finalizes through [`finalize`], failure aborts through [`abort_job_on_error`].
static UNIVERSE: std::sync::Mutex<Option<SendUniverse>> = std::sync::Mutex::new(None);

struct SendUniverse(#[allow(dead_code)] Universe);
// SAFETY: the universe is only dropped (MPI_Finalize), from the main thread, after the ranks
// have finished.
unsafe impl Send for SendUniverse {}

/// Ends MPI after a successful run (every rank must call it).
pub fn finalize() {
    let universe = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(universe);
}

pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Buffers of the split-phase all-reduce: MPI owns them while a request is in flight,
    /// so they live as long as the process (`StaticScope`).
    async_send: &'static mut [i64],
    async_recv_ptr: *mut i64,
    async_cap: usize,
    pending: Option<(Request<'static, [i64], StaticScope>, usize)>,
    counts: Vec<i32>,
    displs: Vec<i32>,
    /// Send copies of in-place all-reduces (rsmpi's safe API has no MPI_IN_PLACE), kept so
    /// that a steady state allocates nothing.
    send_f32: Vec<f32>,
    send_i64: Vec<i64>,
}

// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE where available (and at least
// serialised calls otherwise); a rank's comm is used by one thread at a time.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initialises MPI and joins the world. Fails when MPI was already initialised.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| anyhow!("MPI could not be initialised (already initialised?)"))?;
        if threading < Threading::Serialized {
            bail!("the MPI library offers thread level {threading:?}; tpserve needs at least Serialized");
        }
        let world = universe.world();
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendUniverse(universe));
        Ok(Self::over(world))
    }

    /// The ranks of this group that pass the same `color`, as a group of their own (in
    /// this group's order). Collective: every rank calls it.
    pub fn split(&self, color: usize) -> Result<MpiComm> {
        let group = self
            .world
            .split_by_color(Color::with_value(color as i32))
            .ok_or_else(|| anyhow!("MPI could not split the world into groups"))?;
        Ok(Self::over(group))
    }

    /// Point-to-point messages between this group's ranks (on a communicator of their own,
    /// so they never match a collective's). Collective: every rank calls it.
    pub fn peers(&self) -> Result<MpiPeers> {
        Ok(MpiPeers {
            world: self.world.duplicate(),
        })
    }

    /// This process's rank among the processes of its node, and their number.
    /// Collective: every rank calls it.
    pub fn node_local(&self) -> (usize, usize) {
        let node = self.world.split_shared(self.rank as i32);
        (node.rank() as usize, node.size() as usize)
    }

    fn over(world: SimpleCommunicator) -> Self {
        MpiComm {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            async_send: Box::leak(Vec::new().into_boxed_slice()),
            async_recv_ptr: std::ptr::NonNull::dangling().as_ptr(),
            async_cap: 0,
            pending: None,
            counts: Vec::new(),
            displs: Vec::new(),
            send_f32: Vec::new(),
            send_i64: Vec::new(),
        }
    }

    /// Makes the split-phase buffers hold `len` values (growing leaks the old pair: it is
    /// done a handful of times per process, up to the largest tensor reduced).
    fn reserve_async(&mut self, len: usize) {
        if len > self.async_cap {
            let cap = len.next_power_of_two();
            self.async_send = Box::leak(vec![0; cap].into_boxed_slice());
            self.async_recv_ptr = Box::leak(vec![0i64; cap].into_boxed_slice()).as_mut_ptr();
            self.async_cap = cap;
        }
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.send_f32.clear();
        self.send_f32.extend_from_slice(data);
        self.world
            .all_reduce_into(&self.send_f32[..], data, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_i64(&mut self, data: &mut [i64]) -> Result<()> {
        self.send_i64.clear();
        self.send_i64.extend_from_slice(data);
        self.world
            .all_reduce_into(&self.send_i64[..], data, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_many(&mut self, tensors: &mut [&mut [f32]]) -> Result<()> {
        let mut packed: Vec<f32> = tensors.iter().flat_map(|t| t.iter().copied()).collect();
        self.all_reduce_sum(&mut packed)?;
        let mut at = 0;
        for t in tensors.iter_mut() {
            t.copy_from_slice(&packed[at..at + t.len()]);
            at += t.len();
        }
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut Vec<f32>) -> Result<()> {
        self.counts.resize(self.size, 0);
        self.world
            .all_gather_into(&(local.len() as i32), &mut self.counts[..]);
        self.displs.clear();
        let mut at = 0;
        for &n in &self.counts {
            self.displs.push(at);
            at += n;
        }
        out.clear();
        out.resize(at as usize, 0.0);
        let mut partition = PartitionMut::new(&mut out[..], &self.counts[..], &self.displs[..]);
        self.world.all_gather_varcount_into(local, &mut partition);
        Ok(())
    }

    fn broadcast(&mut self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.size {
            bail!(
                "broadcast root {root} is not a rank of a world of {}",
                self.size
            );
        }
        let root = self.world.process_at_rank(root as i32);
        let mut len = data.len() as u64;
        root.broadcast_into(&mut len);
        data.resize(len as usize, 0);
        root.broadcast_into(&mut data[..]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn begin_all_reduce(&mut self, data: &[i64]) -> Result<()> {
        if self.pending.is_some() {
            bail!("an all-reduce is already in flight on rank {}", self.rank);
        }
        self.reserve_async(data.len());
        self.async_send[..data.len()].copy_from_slice(data);
        // SAFETY: the receive buffer lives for the whole process and nothing else touches
        // it until the request completes in `end_all_reduce`.
        let recv: &'static mut [i64] =
            unsafe { std::slice::from_raw_parts_mut(self.async_recv_ptr, data.len()) };
        let send: &'static [i64] =
            unsafe { std::slice::from_raw_parts(self.async_send.as_ptr(), data.len()) };
        let request =
            self.world
                .immediate_all_reduce_into(StaticScope, send, recv, SystemOperation::sum());
        self.pending = Some((request, data.len()));
        Ok(())
    }

    fn end_all_reduce(&mut self, data: &mut [i64]) -> Result<()> {
        let Some((request, len)) = self.pending.take() else {
            bail!(
                "end_all_reduce without begin_all_reduce on rank {}",
                self.rank
            );
        };
        request.wait();
        if len != data.len() {
            bail!(
                "all-reduce began with {len} values but ended with {}",
                data.len()
            );
        }
        // SAFETY: the request is complete; the buffer holds `len` reduced values.
        data.copy_from_slice(unsafe { std::slice::from_raw_parts(self.async_recv_ptr, len) });
        Ok(())
    }

    fn abort_handle(&self) -> AbortHandle {
        let rank = self.rank;
        Box::new(move |reason| {
            eprintln!("error: rank {rank} failed: {reason}; aborting every rank (MPI_Abort)");
            // SAFETY: aborting the world is always allowed and never returns.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 1);
            }
            std::process::exit(1);
        })
    }
}

/// Point-to-point messages between the processes of an MPI world (pipeline stages).
pub struct MpiPeers {
    world: SimpleCommunicator,
}

// SAFETY: as for `MpiComm`: one thread at a time uses a rank's handle.
unsafe impl Send for MpiPeers {}

impl Peers for MpiPeers {
    fn send(&mut self, to: usize, data: &[f32]) -> Result<()> {
        if to >= self.world.size() as usize {
            bail!("no rank {to} in a world of {}", self.world.size());
        }
        self.world.process_at_rank(to as i32).send(data);
        Ok(())
    }

    fn recv(&mut self, from: usize, out: &mut Vec<f32>) -> Result<()> {
        if from >= self.world.size() as usize {
            bail!("no rank {from} in a world of {}", self.world.size());
        }
        let (message, status) = self.world.process_at_rank(from as i32).matched_probe();
        let len = status.count(f32::equivalent_datatype()).max(0) as usize;
        out.resize(len, 0.0);
        message.matched_receive_into(&mut out[..]);
        Ok(())
    }
}
