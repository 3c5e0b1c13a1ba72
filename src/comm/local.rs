//! The `local` backend: ranks are threads of one process exchanging data through shared memory.
//!
//! Each rank owns two publication slots (double-buffered by operation parity). A collective
//! is: write own slot, pass a barrier, read the other ranks' slots. With two alternating slot
//! sets a single barrier per operation is enough: a rank can only overwrite a slot set again
//! after every rank has passed the next operation's barrier, i.e. finished reading this one.
//! Large all-reduces with three or more ranks add a reduce-scatter phase (each rank sums one
//! chunk) and a second barrier, so that no rank reads every slot in full.
//!
//! Waiting spins briefly and then sleeps on a condition variable: with more ranks than cores,
//! pure spinning would cost a scheduler slice per collective.

use super::Comm;
use anyhow::{bail, Result};
use std::cell::UnsafeCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// All-reduces at least this long (in floats) use reduce-scatter + all-gather when size ≥ 3.
const REDUCE_SCATTER_MIN_LEN: usize = 16 * 1024;

/// Creates the members of a local group of `size` ranks; hand one to each rank's thread.
pub struct LocalGroup;

impl LocalGroup {
    pub fn create(size: usize) -> Vec<LocalComm> {
        assert!(size > 0, "a group needs at least one rank");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size, spin_budget(size, cores)),
            slots: (0..size)
                .map(|_| {
                    [
                        UnsafeCell::new(Slot::default()),
                        UnsafeCell::new(Slot::default()),
                    ]
                })
                .collect(),
        });
        (0..size)
            .map(|rank| LocalComm {
                shared: shared.clone(),
                rank,
                parity: 0,
                pending: None,
                scratch: Vec::new(),
            })
            .collect()
    }
}

/// How long a waiter spins before sleeping: long enough to catch a peer that is a few
/// microseconds behind, and nearly nothing when ranks outnumber cores (the peer we wait
/// for may need our core to make progress).
fn spin_budget(size: usize, cores: usize) -> Duration {
    if size <= cores {
        Duration::from_micros(200)
    } else {
        Duration::from_micros(2)
    }
}

/// One rank's published data. Peers read it, and in a reduce-scatter the owner writes its
/// own chunk back while peers read theirs, so those accesses go through `data`, a raw
/// pointer into `words`: no `&mut` to the slot exists while a peer may read it.
struct Slot {
    words: Vec<u64>,
    /// `words`' buffer, refreshed whenever the owner (re)writes the slot.
    data: NonNull<u64>,
    len_bytes: usize,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            words: Vec::new(),
            data: NonNull::dangling(),
            len_bytes: 0,
        }
    }
}

// SAFETY: `data` points into `words`, which the slot owns.
unsafe impl Send for Slot {}

impl Slot {
    fn write<'t, T: Element>(&mut self, parts: impl Iterator<Item = &'t [T]> + Clone) {
        let total: usize = parts.clone().map(|p| p.len()).sum();
        let size = std::mem::size_of::<T>();
        self.reserve_bytes(total * size);
        let mut at = 0;
        let dst: &mut [T] = &mut bytemuck::cast_slice_mut(&mut self.words)[..];
        for part in parts {
            dst[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        self.len_bytes = total * size;
        self.data = NonNull::from(&mut self.words[..]).cast();
    }

    fn write_bytes(&mut self, data: &[u8]) {
        self.reserve_bytes(data.len());
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut self.words);
        dst[..data.len()].copy_from_slice(data);
        self.len_bytes = data.len();
        self.data = NonNull::from(&mut self.words[..]).cast();
    }

    fn reserve_bytes(&mut self, bytes: usize) {
        let words = bytes.div_ceil(8);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
    }

    /// Elements `range` of the published data, as `T`, through `data`.
    ///
    /// # Safety
    /// The slot holds at least `range.end` `T`s, and nobody writes them while the slice lives.
    unsafe fn chunk<T: Element>(&self, range: std::ops::Range<usize>) -> &[T] {
        std::slice::from_raw_parts(
            (self.data.as_ptr() as *const T).add(range.start),
            range.len(),
        )
    }

    fn elems<T: Element>(&self) -> &[T] {
        &bytemuck::cast_slice(&self.words)[..self.len_bytes / std::mem::size_of::<T>()]
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len_bytes]
    }
}

struct Shared {
    size: usize,
    barrier: Barrier,
    /// `slots[rank][parity]`: written only by `rank`, read by all after a barrier.
    slots: Vec<[UnsafeCell<Slot>; 2]>,
}

// SAFETY: a slot is written only by its owner: whole (through `&mut`) only while no other
// rank reads it (the double-buffering protocol above), and in a reduce-scatter one chunk
// that no peer reads then, through the slot's raw `data` pointer. The barrier's
// acquire/release orders the accesses.
unsafe impl Sync for Shared {}

/// One rank's member of a [`LocalGroup`].
pub struct LocalComm {
    shared: Arc<Shared>,
    rank: usize,
    parity: usize,
    /// The barrier generation a begun all-reduce waits on, and its length.
    pending: Option<(u64, usize)>,
    /// This rank's chunk of a reduce-scatter, summed before it is published.
    scratch: Vec<u64>,
}

impl LocalComm {
    fn own_slot(&mut self) -> &mut Slot {
        // SAFETY: only this rank writes its slot, and no rank reads this parity's slots
        // until it passes the barrier that follows this write.
        unsafe { &mut *self.shared.slots[self.rank][self.parity].get() }
    }

    fn slot(&self, rank: usize) -> &Slot {
        // SAFETY: called only after the barrier that follows every rank's write.
        unsafe { &*self.shared.slots[rank][self.parity].get() }
    }

    fn sync(&self) -> Result<()> {
        let generation = self.shared.barrier.arrive(self.rank);
        self.shared.barrier.wait(generation)
    }

    fn finish_op(&mut self) {
        self.parity ^= 1;
    }

    /// The chunk of a `len`-long reduction that `rank` sums in the reduce-scatter phase.
    fn chunk(&self, len: usize, rank: usize) -> std::ops::Range<usize> {
        let n = self.shared.size;
        (len * rank / n)..(len * (rank + 1) / n)
    }

    /// After every rank published `len` elements: makes their sums readable by
    /// [`Self::read_sum`]. Returns whether the reduce-scatter layout is in use.
    fn reduce<T: Element>(&mut self, len: usize) -> Result<bool> {
        let n = self.shared.size;
        if n < 3 || len < REDUCE_SCATTER_MIN_LEN {
            return Ok(false);
        }
        let mine = self.chunk(len, self.rank);
        let slots = &self.shared.slots;
        let words = (mine.len() * std::mem::size_of::<T>()).div_ceil(8);
        self.scratch.clear();
        self.scratch.resize(words, 0);
        let acc: &mut [T] = &mut bytemuck::cast_slice_mut(&mut self.scratch)[..mine.len()];
        // SAFETY: in this phase every rank reads every slot's chunk `mine` of its own only,
        // through `data`; our chunk is written back (through `data` too) after our reads.
        unsafe {
            for (r, slot) in slots.iter().enumerate() {
                let src = (*slot[self.parity].get()).chunk::<T>(mine.clone());
                if r == 0 {
                    acc.copy_from_slice(src);
                } else {
                    for (o, s) in acc.iter_mut().zip(src) {
                        *o += *s;
                    }
                }
            }
            let own = (*slots[self.rank][self.parity].get()).data.as_ptr() as *mut T;
            std::ptr::copy_nonoverlapping(acc.as_ptr(), own.add(mine.start), mine.len());
        }
        self.sync()?;
        Ok(true)
    }

    /// Writes the reduced values of `[offset, offset + out.len())` into `out`.
    fn read_sum<T: Element>(&self, scattered: bool, len: usize, offset: usize, out: &mut [T]) {
        if !scattered {
            let range = offset..offset + out.len();
            out.copy_from_slice(&self.slot(0).elems::<T>()[range.clone()]);
            for r in 1..self.shared.size {
                for (o, s) in out
                    .iter_mut()
                    .zip(&self.slot(r).elems::<T>()[range.clone()])
                {
                    *o += *s;
                }
            }
            return;
        }
        let end = offset + out.len();
        for r in 0..self.shared.size {
            let chunk = self.chunk(len, r);
            let (lo, hi) = (chunk.start.max(offset), chunk.end.min(end));
            if lo < hi {
                // SAFETY: after the reduce-scatter barrier, chunks are only read.
                let owner = unsafe { self.slot(r).chunk::<T>(lo..hi) };
                out[lo - offset..hi - offset].copy_from_slice(owner);
            }
        }
    }

    /// A whole all-reduce of one tensor.
    fn all_reduce<T: Element>(&mut self, data: &mut [T]) -> Result<()> {
        self.own_slot().write(std::iter::once(&*data));
        self.sync()?;
        let scattered = self.reduce::<T>(data.len())?;
        self.read_sum(scattered, data.len(), 0, data);
        self.finish_op();
        Ok(())
    }
}

/// Element types the backend sums: added in rank order, so every rank gets the same bits.
trait Element: bytemuck::Pod + std::ops::AddAssign {}
impl Element for f32 {}
impl Element for i64 {}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.all_reduce(data)
    }

    fn all_reduce_sum_i64(&mut self, data: &mut [i64]) -> Result<()> {
        self.all_reduce(data)
    }

    fn all_reduce_many(&mut self, tensors: &mut [&mut [f32]]) -> Result<()> {
        let len: usize = tensors.iter().map(|t| t.len()).sum();
        self.own_slot().write(tensors.iter().map(|t| &**t));
        self.sync()?;
        let scattered = self.reduce::<f32>(len)?;
        let mut offset = 0;
        for t in tensors.iter_mut() {
            self.read_sum(scattered, len, offset, t);
            offset += t.len();
        }
        self.finish_op();
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut Vec<f32>) -> Result<()> {
        self.own_slot().write(std::iter::once(local));
        self.sync()?;
        out.clear();
        for r in 0..self.shared.size {
            out.extend_from_slice(self.slot(r).elems::<f32>());
        }
        self.finish_op();
        Ok(())
    }

    fn broadcast(&mut self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.shared.size {
            bail!(
                "broadcast root {root} is not a rank of a group of {}",
                self.shared.size
            );
        }
        if self.rank == root {
            self.own_slot().write_bytes(data);
        }
        self.sync()?;
        if self.rank != root {
            data.clear();
            data.extend_from_slice(self.slot(root).bytes());
        }
        self.finish_op();
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.sync()
    }

    fn begin_all_reduce(&mut self, data: &[i64]) -> Result<()> {
        if self.pending.is_some() {
            bail!("an all-reduce is already in flight on rank {}", self.rank);
        }
        self.own_slot().write(std::iter::once(data));
        let generation = self.shared.barrier.arrive(self.rank);
        self.pending = Some((generation, data.len()));
        Ok(())
    }

    fn end_all_reduce(&mut self, data: &mut [i64]) -> Result<()> {
        let Some((generation, len)) = self.pending.take() else {
            bail!(
                "end_all_reduce without begin_all_reduce on rank {}",
                self.rank
            );
        };
        if len != data.len() {
            bail!(
                "all-reduce began with {len} values but ended with {}",
                data.len()
            );
        }
        self.shared.barrier.wait(generation)?;
        let scattered = self.reduce::<i64>(len)?;
        self.read_sum(scattered, len, 0, data);
        self.finish_op();
        Ok(())
    }

    fn abort_handle(&self) -> super::AbortHandle {
        let (shared, rank) = (self.shared.clone(), self.rank);
        Box::new(move |reason| {
            shared
                .barrier
                .abort(format!("rank {rank} failed: {reason}"))
        })
    }
}

/// A reusable, split-phase barrier that spins for a while and then sleeps, and that can be
/// aborted so that no rank waits forever for a rank that died.
///
/// Each rank counts its own arrivals on a cache line of its own; barrier `g` is passed when
/// every count has reached `g`. Arriving is then a plain store (no contended
/// read-modify-write), and waiting reads each peer's line once it changes: on two cores
/// that is about half the cache-line traffic of a shared counter.
struct Barrier {
    arrivals: Vec<Arrivals>,
    sleepers: AtomicUsize,
    aborted: AtomicBool,
    reason: Mutex<String>,
    lock: Mutex<()>,
    wake: Condvar,
    spin: Duration,
}

/// One rank's arrival count, alone on its cache lines.
#[repr(align(128))]
struct Arrivals(AtomicU64);

impl Barrier {
    fn new(size: usize, spin: Duration) -> Self {
        Barrier {
            arrivals: (0..size).map(|_| Arrivals(AtomicU64::new(0))).collect(),
            sleepers: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            spin,
        }
    }

    /// Announces `rank`'s arrival; returns the generation to pass to [`Barrier::wait`].
    fn arrive(&self, rank: usize) -> u64 {
        let own = &self.arrivals[rank].0;
        // Only this rank writes its count.
        let generation = own.load(Ordering::Relaxed) + 1;
        own.store(generation, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        generation
    }

    /// Whether every rank has arrived at barrier `generation`.
    fn passed(&self, generation: u64, order: Ordering) -> bool {
        self.arrivals.iter().all(|a| a.0.load(order) >= generation)
    }

    /// Waits until every rank has arrived at the barrier of `generation`.
    fn wait(&self, generation: u64) -> Result<()> {
        let start = Instant::now();
        let mut spins = 0u32;
        while !self.passed(generation, Ordering::Acquire) {
            if self.aborted.load(Ordering::Acquire) {
                return Err(self.abort_error());
            }
            spins += 1;
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            if start.elapsed() < self.spin {
                continue;
            }
            self.sleep(generation);
        }
        Ok(())
    }

    fn sleep(&self, generation: u64) {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        while !self.passed(generation, Ordering::SeqCst) && !self.aborted.load(Ordering::SeqCst) {
            // The timeout is a safety net only; wake-ups come from `arrive` and `abort`.
            guard = match self.wake.wait_timeout(guard, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    fn abort(&self, reason: String) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_empty() {
                *r = reason;
            }
        }
        self.aborted.store(true, Ordering::SeqCst);
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    fn abort_error(&self) -> anyhow::Error {
        let r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        anyhow::anyhow!("tensor-parallel group aborted: {r}")
    }
}
