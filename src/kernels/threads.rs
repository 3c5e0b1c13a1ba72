//! A rank's kernel threads: work is split into contiguous ranges, one per thread.
//!
//! A fork-join pool of its own rather than a general task pool: a decode step hands out
//! hundreds of small products, so a hand-off must cost a few atomic operations, not a
//! heap-allocated task and a futex wake-up. Workers spin briefly for the next product,
//! then sleep; the rank's own thread runs the first part of every product.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Polls (with a pause instruction each) before a waiting thread sleeps or yields: tens
/// of microseconds, longer than the gap between two products of a decode step, so a busy
/// pool never pays a futex wake-up per product, and an idle one soon stops burning a core.
const SPINS: u32 = 1000;

/// The threads one rank uses for its kernels. With one thread, work runs inline on the
/// rank's own thread (no pool, no hand-off).
pub struct Threads {
    pool: Option<Pool>,
    count: usize,
}

/// The product being handed out: `f` over `n` items in `parts` contiguous ranges.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(Range<usize>) + Sync),
    n: usize,
    parts: usize,
}

struct Shared {
    /// Set while a job is handed out: a second caller at the same time (another thread,
    /// or a product started from inside a product) finds it set and runs its work inline,
    /// so `job` never has two writers.
    busy: AtomicBool,
    /// Bumped once per job (and once to stop); workers run their part of each.
    generation: AtomicU64,
    /// Written by the owner before bumping `generation`, read by workers after seeing it.
    job: UnsafeCell<Option<Job>>,
    /// Parts not finished yet; the owner waits for zero before `job` may dangle.
    remaining: AtomicUsize,
    stop: AtomicBool,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller that set `busy`, while no part runs
// (remaining == 0), and read by workers only between a generation bump and their decrement
// of `remaining`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

fn part(n: usize, parts: usize, p: usize) -> Range<usize> {
    (n * p / parts)..(n * (p + 1) / parts)
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0;
        while shared.generation.load(Ordering::Acquire) == seen {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            while shared.generation.load(Ordering::SeqCst) == seen {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            drop(guard);
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        seen = shared.generation.load(Ordering::Acquire);
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the owner wrote the job before bumping the generation and keeps `f`
        // alive until `remaining` reaches zero, which this worker's decrement is part of.
        let job = unsafe { (*shared.job.get()).expect("a job comes with its generation") };
        if index < job.parts {
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| f(part(job.n, job.parts, index)))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.remaining.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// `f` over `0..n` in `parts` ranges: part 0 here, the others on the workers (or all
    /// here, when the pool is already running a product).
    fn run(&self, n: usize, parts: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let s = &*self.shared;
        if s.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return f(0..n);
        }
        // Cleared however this call ends, a panic included.
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _release = Release(&s.busy);
        // SAFETY: erasing the lifetime is sound because this function does not return
        // before every worker is done with `f` (remaining == 0 below).
        let f: *const (dyn Fn(Range<usize>) + Sync) = unsafe { std::mem::transmute(f) };
        unsafe { *s.job.get() = Some(Job { f, n, parts }) };
        s.remaining.store(self.workers.len(), Ordering::Release);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: as above; `f` is alive for the whole call.
            (unsafe { &*f })(part(n, parts, 0))
        }));
        let mut spins = 0u32;
        while s.remaining.load(Ordering::Acquire) != 0 {
            spins = spins.saturating_add(1);
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a kernel thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::Release);
        s.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Threads {
    /// `count` threads: the caller's own and `count - 1` workers, pinned to `cores[1..]`
    /// one each (`cores` may be empty: no pinning).
    pub fn new(count: usize, cores: &[usize]) -> anyhow::Result<Self> {
        let count = count.max(1);
        if count == 1 {
            return Ok(Threads { pool: None, count });
        }
        let shared = Arc::new(Shared {
            busy: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(count - 1);
        for i in 1..count {
            let shared = shared.clone();
            let core = cores.get(i).copied();
            let handle = std::thread::Builder::new()
                .name(format!("tpserve-kernel-{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        crate::kernels::affinity::pin_to_core(core);
                    }
                    worker(&shared, i);
                })?;
            workers.push(handle);
        }
        Ok(Threads {
            pool: Some(Pool { shared, workers }),
            count,
        })
    }

    pub fn single() -> Self {
        Threads {
            pool: None,
            count: 1,
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Calls `f` on contiguous sub-ranges that together cover `range`, in parallel.
    pub fn for_each_range_in(&self, range: Range<usize>, f: impl Fn(Range<usize>) + Sync) {
        let start = range.start;
        self.for_each_range(range.len(), |r| f(r.start + start..r.end + start));
    }

    /// Calls `f` on contiguous sub-ranges that together cover `0..n`, in parallel.
    pub fn for_each_range(&self, n: usize, f: impl Fn(Range<usize>) + Sync) {
        match &self.pool {
            Some(pool) if n >= 2 * self.count => pool.run(n, self.count, &f),
            _ => f(0..n),
        }
    }
}

/// A buffer viewed as equal chunks that different threads write, each chunk by one thread.
pub struct DisjointChunks<'a> {
    ptr: *mut f32,
    chunk: usize,
    chunks: usize,
    _buffer: std::marker::PhantomData<&'a mut [f32]>,
}

unsafe impl Send for DisjointChunks<'_> {}
unsafe impl Sync for DisjointChunks<'_> {}

impl<'a> DisjointChunks<'a> {
    pub fn new(data: &'a mut [f32], chunk: usize) -> Self {
        DisjointChunks {
            ptr: data.as_mut_ptr(),
            chunk,
            chunks: data.len() / chunk.max(1),
            _buffer: std::marker::PhantomData,
        }
    }

    /// Chunk `i`.
    ///
    /// # Safety
    /// No two threads may hold the same chunk at once (give each thread its own indices,
    /// as the disjoint ranges of [`Threads::for_each_range`] do).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn chunk(&self, i: usize) -> &mut [f32] {
        assert!(i < self.chunks, "chunk {i} out of {}", self.chunks);
        std::slice::from_raw_parts_mut(self.ptr.add(i * self.chunk), self.chunk)
    }

    /// Chunks `r` as one slice.
    ///
    /// # Safety
    /// As [`Self::chunk`], for every chunk of the range.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, r: std::ops::Range<usize>) -> &mut [f32] {
        assert!(
            r.start <= r.end && r.end <= self.chunks,
            "chunks {r:?} out of {}",
            self.chunks
        );
        std::slice::from_raw_parts_mut(self.ptr.add(r.start * self.chunk), r.len() * self.chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_over_many_jobs() {
        let threads = Threads::new(3, &[]).unwrap();
        for n in [0, 1, 5, 6, 7, 100, 1001] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                threads.for_each_range(n, |r| {
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n {n}");
            }
        }
    }

    #[test]
    fn a_panicking_part_panics_the_caller_and_the_pool_lives_on() {
        let threads = Threads::new(2, &[]).unwrap();
        let result = catch_unwind(AssertUnwindSafe(|| {
            threads.for_each_range(10, |r| assert!(!r.contains(&9), "part with item 9"));
        }));
        assert!(result.is_err());
        let sum = AtomicUsize::new(0);
        threads.for_each_range(10, |r| {
            sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    /// Counts how often each of `0..n` is visited by `for_each_range`.
    fn visits(threads: &Threads, n: usize, inner: impl Fn(usize) + Sync) -> Vec<usize> {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        threads.for_each_range(n, |r| {
            for i in r {
                hits[i].fetch_add(1, Ordering::Relaxed);
                inner(i);
            }
        });
        hits.into_iter().map(|h| h.into_inner()).collect()
    }

    #[test]
    fn callers_on_several_threads_each_get_every_item_once() {
        let threads = Threads::new(3, &[]).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for n in [7, 64, 300] {
                        for _ in 0..300 {
                            assert!(visits(&threads, n, |_| {}).iter().all(|&h| h == 1));
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_product_started_inside_a_product_runs_every_item_once() {
        let threads = Threads::new(3, &[]).unwrap();
        for _ in 0..100 {
            let inner_ok = AtomicUsize::new(0);
            let outer = visits(&threads, 12, |_| {
                if visits(&threads, 9, |_| {}).iter().all(|&h| h == 1) {
                    inner_ok.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(outer.iter().all(|&h| h == 1));
            assert_eq!(inner_ok.into_inner(), 12);
        }
    }
}
