//! The machine's memory read bandwidth: the roof that decode, which reads every weight once
//! per token, cannot go through.

use crate::kernels::buffer::LargeBuffer;
use std::time::Instant;

/// Bytes each measurement streams through, split over the threads: far beyond any cache.
pub const DEFAULT_BYTES: usize = 512 << 20;

/// Read bandwidth in GB/s with `threads` threads pinned to `cores` (one each, when given),
/// each summing its own `bytes / threads` buffer: the median of `reps` passes.
pub fn read_bandwidth(threads: usize, cores: &[usize], bytes: usize, reps: usize) -> f64 {
    let threads = threads.max(1);
    let per_thread = (bytes / threads / 64).max(1) * 8;
    let barrier = std::sync::Barrier::new(threads);
    let seconds: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let core = cores.get(t).copied();
                scope.spawn(move || {
                    if let Some(core) = core {
                        crate::kernels::affinity::pin_to_core(core);
                    }
                    // Written by this thread, so its pages sit near its core; huge pages
                    // where the system allows, as the weights have.
                    let mut buffer = LargeBuffer::zeroed(per_thread * 8)
                        .expect("cannot map memory for the bandwidth probe");
                    let words: &mut [u64] = bytemuck::cast_slice_mut(&mut buffer);
                    for (i, w) in words.iter_mut().enumerate() {
                        *w = i as u64;
                    }
                    let buffer: &[u64] = bytemuck::cast_slice(&buffer);
                    let mut times = Vec::with_capacity(reps);
                    for _ in 0..reps.max(1) {
                        barrier.wait();
                        let start = Instant::now();
                        std::hint::black_box(sum_words(buffer));
                        barrier.wait();
                        times.push(start.elapsed().as_secs_f64());
                    }
                    times
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // A pass ends when its slowest thread does.
    let mut passes: Vec<f64> = (0..seconds[0].len())
        .map(|i| seconds.iter().map(|t| t[i]).fold(0.0, f64::max))
        .collect();
    passes.sort_by(f64::total_cmp);
    let median = passes[passes.len() / 2];
    (per_thread * 8 * threads) as f64 / median / 1e9
}

/// Sums `words` with eight independent lanes, so loads, not additions, set the pace.
fn sum_words(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    for chunk in words.chunks_exact(8) {
        for (l, &w) in lanes.iter_mut().zip(chunk) {
            *l = l.wrapping_add(w);
        }
    }
    lanes.iter().fold(0, |a, &b| a.wrapping_add(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_matches_a_plain_sum() {
        let words: Vec<u64> = (0..1000).collect();
        assert_eq!(sum_words(&words), 999 * 1000 / 2);
    }
}
