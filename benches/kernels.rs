//! Decode kernel throughput against the machine's read bandwidth, one thread:
//! `cargo bench --bench kernels` (`ROWS=n` sets the matrix height; the default, 65536 × 2048,
//! is larger than the caches). Prints GB/s of weights streamed per format, and the fraction
//! of the measured read bandwidth that is; then multi-token products, and attention over
//! scattered KV blocks.

use half::f16;
use rand::{RngCore, SeedableRng};
use std::time::Instant;
use tpserve::bench::bandwidth::{read_bandwidth, DEFAULT_BYTES};
use tpserve::kernels::attention::{prefetch, KvElem};
use tpserve::kernels::buffer::LargeArray;
use tpserve::kernels::{Matrix, Phase, QuantType, Storage, Threads};

/// Random blocks with small, finite f16 scales.
fn random_blocks(ty: QuantType, rows: usize, cols: usize) -> Vec<u8> {
    let mut w = vec![0u8; ty.bytes_for(rows * cols)];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut w);
    for b in w.chunks_exact_mut(ty.block_bytes()) {
        b[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        if ty == QuantType::Q4_1 {
            b[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
    }
    w
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): then a quick smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let threads = Threads::single();
    let roof = read_bandwidth(1, &[], if full { DEFAULT_BYTES } else { 1 << 20 }, 5);
    println!("read bandwidth, 1 thread: {roof:.1} GB/s");
    let rows: usize = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 65536 } else { 64 });
    let cols = 2048;
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    for ty in [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0] {
        let m = Matrix::new(
            rows,
            cols,
            Storage::Quant(ty, random_blocks(ty, rows, cols)),
        );
        let mut y = vec![0.0f32; rows];
        let mut acc = vec![0i64; rows];
        let time = |f: &mut dyn FnMut()| {
            let times: Vec<f64> = (0..(15 * 65536 / rows).max(15))
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .collect();
            m.bytes() as f64 / median(times) / 1e9
        };
        let plain = time(&mut || m.matmul(&x, 1, &mut y, &threads, Phase::Decode));
        let fixed = time(&mut || m.matmul_fixed(&x, 1, &mut acc, 64, &threads, Phase::Decode));
        println!(
            "{:5} {rows}x{cols}: {plain:5.1} GB/s ({:3.0}% of read), fixed point {fixed:5.1} GB/s ({:3.0}%)",
            ty.name(),
            100.0 * plain / roof,
            100.0 * fixed / roof
        );
    }
    multi_token(full, &threads);
    scattered_kv_blocks(full);
}

/// Attention's reads of the KV cache: blocks of 16 f16 rows of 64 (2 KiB per head, keys
/// and values) in a random order over 2 × 64 MiB, scored and summed for three query heads
/// (a GQA group), as decode reads them; on plain pages or huge pages ([`LargeArray`]),
/// asking for the next block into L2 ([`prefetch`], what attention does), into L1, or not
/// at all. Nanoseconds per block.
fn scattered_kv_blocks(full: bool) {
    let (d, rows) = (64, 16);
    let block = rows * d;
    let blocks = if full { 32768 } else { 64 };
    let fill = |k: usize| (0..blocks * block).map(move |i| f16::from_f32((i % k) as f32 * 0.1));
    let plain: [Vec<f16>; 2] = [fill(7).collect(), fill(5).collect()];
    let huge = plain.clone().map(|p| {
        let mut h = LargeArray::<f16>::zeroed(p.len()).expect("a mapping");
        h.copy_from_slice(&p);
        h
    });
    let q: Vec<f32> = (0..3 * d).map(|i| i as f32 * 0.01).collect();
    let (mut scores, mut out) = (vec![0.0f32; 3 * rows], vec![0.0f32; 3 * d]);
    let (score, weighted_sum) = (f16::scores_fn(), f16::weighted_sum_fn());
    let visits = if full { 300_000 } else { 1000 };
    let order: Vec<usize> = (0..visits).map(|i| i * 7919 % blocks).collect();
    let mut line = "KV blocks in random order, ns per block of 3 heads:".to_string();
    let caches: [(&str, [&[f16]; 2]); 2] = [
        ("plain pages", [&plain[0], &plain[1]]),
        ("huge pages", [&huge[0], &huge[1]]),
    ];
    for (name, [keys, values]) in caches {
        for ahead in ["none", "L1", "L2"] {
            fn at<'a>(cache: &'a [f16], order: &[usize], i: usize, block: usize) -> &'a [f16] {
                let b = order[i.min(order.len() - 1)];
                &cache[b * block..(b + 1) * block]
            }
            let start = Instant::now();
            for i in 0..visits {
                for cache in [keys, values] {
                    match ahead {
                        "L1" => prefetch_l1(at(cache, &order, i + 1, block)),
                        "L2" => prefetch(at(cache, &order, i + 1, block)),
                        _ => {}
                    }
                }
                for h in 0..3 {
                    let s = &mut scores[h * rows..(h + 1) * rows];
                    score(
                        &q[h * d..(h + 1) * d],
                        at(keys, &order, i, block),
                        d,
                        0.125,
                        s,
                    );
                    let v = at(values, &order, i, block);
                    weighted_sum(s, v, d, &mut out[h * d..(h + 1) * d]);
                }
            }
            let ns = start.elapsed().as_secs_f64() / visits as f64 * 1e9;
            line += &format!(" {name}, prefetch {ahead}: {ns:.0};");
        }
    }
    println!("{line}");
}

/// [`prefetch`] into L1 instead of L2: the choice attention did not keep.
fn prefetch_l1(rows: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    for at in (0..std::mem::size_of_val(rows)).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint that never faults.
        unsafe { _mm_prefetch((rows.as_ptr() as *const i8).wrapping_add(at), _MM_HINT_T0) };
    }
}

/// Multi-token products (prompts, decode batches): integer multiply-adds per second for
/// several token counts, on a matrix that stays in the cache (compute bound), and on one
/// larger than the caches (streamed from memory once per product, as a decode step does).
fn multi_token(full: bool, threads: &Threads) {
    let big = if full { 131072 } else { 64 };
    for (ty, rows, cols) in [
        (QuantType::Q4_0, 1024, 2048),
        (QuantType::Q4_1, 1024, 2048),
        (QuantType::Q8_0, 1024, 2048),
        (QuantType::Q4_1, big, 576),
    ] {
        let m = Matrix::new(
            rows,
            cols,
            Storage::Quant(ty, random_blocks(ty, rows, cols)),
        );
        let mut line = format!(
            "{:5} {rows}x{cols}, G multiply-adds/s by tokens:",
            ty.name()
        );
        for tokens in [1, 4, 16, 64] {
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let mut acc = vec![0i64; tokens * rows];
            let times: Vec<f64> = (0..if full { 30 } else { 2 })
                .map(|_| {
                    let start = Instant::now();
                    m.matmul_fixed(&x, tokens, &mut acc, 64, threads, Phase::Prefill);
                    start.elapsed().as_secs_f64()
                })
                .collect();
            let macs = (rows * cols * tokens) as f64;
            line += &format!(" {tokens}: {:.1}", macs / median(times) / 1e9);
        }
        println!("{line}");
    }
}
