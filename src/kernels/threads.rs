//! A rank's kernel threads: work is split into contiguous ranges, one per thread.

use rayon::{ThreadPool, ThreadPoolBuilder};
use std::ops::Range;

/// The threads one rank uses for its kernels. With one thread, work runs inline on the
/// rank's own thread (no pool, no hand-off).
pub struct Threads {
    pool: Option<ThreadPool>,
    count: usize,
}

impl Threads {
    /// `cores`: cores to pin the pool's threads to, one each (may be empty: no pinning).
    pub fn new(count: usize, cores: &[usize]) -> anyhow::Result<Self> {
        let count = count.max(1);
        if count == 1 {
            return Ok(Threads { pool: None, count });
        }
        let cores = cores.to_vec();
        let pool = ThreadPoolBuilder::new()
            .num_threads(count)
            .thread_name(|i| format!("tpserve-kernel-{i}"))
            .start_handler(move |i| {
                if let Some(&core) = cores.get(i) {
                    crate::engine::affinity::pin_to_core(core);
                }
            })
            .build()?;
        Ok(Threads {
            pool: Some(pool),
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
            Some(pool) if n >= 2 * self.count => {
                let parts = self.count;
                pool.scope(|s| {
                    for p in 0..parts {
                        let f = &f;
                        s.spawn(move |_| f((n * p / parts)..(n * (p + 1) / parts)));
                    }
                });
            }
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
