//! The local backend against plain sequential arithmetic, over many sizes and group sizes.

use rand::{Rng, SeedableRng};
use std::time::Duration;
use tpserve::comm::{Comm, LocalGroup};

/// Runs `f` on every rank of a `size`-rank local group; returns the ranks' results.
fn on_group<T: Send>(size: usize, f: impl Fn(&mut dyn Comm) -> T + Sync) -> Vec<T> {
    let comms = LocalGroup::create(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                let f = &f;
                s.spawn(move || f(&mut c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn random_vec(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn random_ints(seed: u64, len: usize) -> Vec<i64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.random_range(-1i64 << 40..1 << 40))
        .collect()
}

#[test]
fn all_reduce_equals_sequential_sum_bit_for_bit() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut sizes = vec![0, 1, 7, 576, 16 * 1024 - 1, 16 * 1024, 100_003, 1 << 20];
    sizes.extend((0..4).map(|_| rng.random_range(0..300_000)));
    for ranks in 1..=8 {
        for &len in &sizes {
            // The reference: rank 0's data plus rank 1's plus ..., in that order.
            let mut expected = random_vec(0, len);
            for r in 1..ranks {
                for (e, v) in expected.iter_mut().zip(random_vec(r as u64, len)) {
                    *e += v;
                }
            }
            let results = on_group(ranks, |c| {
                let mut data = random_vec(c.rank() as u64, len);
                c.all_reduce_sum(&mut data).unwrap();
                data
            });
            for (r, got) in results.iter().enumerate() {
                assert!(
                    got.iter()
                        .zip(&expected)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ranks} ranks, {len} floats: rank {r} differs from the sequential sum"
                );
            }
        }
    }
}

#[test]
fn all_reduce_many_packs_tensors() {
    for ranks in [2, 3, 4] {
        let results = on_group(ranks, |c| {
            let mut a = vec![c.rank() as f32; 5];
            let mut b = vec![1.0; 20_000];
            let mut empty: Vec<f32> = vec![];
            c.all_reduce_many(&mut [&mut a, &mut empty, &mut b])
                .unwrap();
            (a, b)
        });
        let rank_sum: f32 = (0..ranks).map(|r| r as f32).sum();
        for (a, b) in results {
            assert!(a.iter().all(|&v| v == rank_sum));
            assert!(b.iter().all(|&v| v == ranks as f32));
        }
    }
}

#[test]
fn all_gather_with_uneven_lengths() {
    for ranks in 1..=8 {
        let results = on_group(ranks, |c| {
            // rank r contributes r + 1 copies of r (rank 3 of 8 also tries an empty part)
            let n = if c.rank() == 3 { 0 } else { c.rank() + 1 };
            let mut out = vec![];
            c.all_gather(&vec![c.rank() as f32; n], &mut out).unwrap();
            out
        });
        let expected: Vec<f32> = (0..ranks)
            .flat_map(|r| {
                let n = if r == 3 { 0 } else { r + 1 };
                std::iter::repeat_n(r as f32, n)
            })
            .collect();
        assert!(results.iter().all(|g| *g == expected), "{ranks} ranks");
    }
}

#[test]
fn broadcast_from_every_root() {
    for ranks in 1..=5 {
        for root in 0..ranks {
            let results = on_group(ranks, |c| {
                let mut data = if c.rank() == root {
                    format!("from {root}").into_bytes()
                } else {
                    vec![9; 100]
                };
                c.broadcast(&mut data, root).unwrap();
                data
            });
            assert!(results
                .iter()
                .all(|d| *d == format!("from {root}").into_bytes()));
        }
    }
    let errors = on_group(2, |c| c.broadcast(&mut vec![], 5).is_err());
    assert!(errors.iter().all(|&e| e));
}

#[test]
fn ten_thousand_back_to_back_collectives() {
    for ranks in [2, 3, 4] {
        let results = on_group(ranks, |c| {
            let mut acc = 0.0f64;
            let mut gathered = vec![];
            for i in 0..10_000 {
                match i % 4 {
                    0 => {
                        let mut v = [1.0f32; 3];
                        c.all_reduce_sum(&mut v).unwrap();
                        acc += v[0] as f64;
                    }
                    1 => {
                        c.all_gather(&[c.rank() as f32], &mut gathered).unwrap();
                        acc += gathered.len() as f64;
                    }
                    2 => {
                        let mut b = vec![c.rank() as u8];
                        c.broadcast(&mut b, i % c.size()).unwrap();
                        acc += b[0] as f64;
                    }
                    _ => c.barrier().unwrap(),
                }
            }
            acc
        });
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }
}

#[test]
fn async_all_reduce_overlaps_with_work() {
    let results = on_group(3, |c| {
        let rank = c.rank() as u64;
        let mut data = random_ints(rank, 50_000);
        let pending = c.start_all_reduce(&mut data).unwrap();
        // Work while the others publish: a rank that sleeps does not block this one.
        std::thread::sleep(Duration::from_millis(5 * rank));
        let busy: f32 = (0..100_000).map(|i| (i as f32).sqrt()).sum();
        pending.wait().unwrap();
        (data, busy)
    });
    let mut expected = random_ints(0, 50_000);
    for r in 1..3 {
        for (e, v) in expected.iter_mut().zip(random_ints(r, 50_000)) {
            *e += v;
        }
    }
    for (data, _) in results {
        assert_eq!(data, expected);
    }
}

#[test]
fn an_aborted_rank_fails_the_others_instead_of_hanging() {
    let results = on_group(4, |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(20));
            (c.abort_handle())("model file missing");
            return Ok(());
        }
        let mut v = vec![1.0f32; 4];
        c.all_reduce_sum(&mut v)
    });
    for (r, res) in results.iter().enumerate() {
        if r != 2 {
            let msg = format!("{:#}", res.as_ref().unwrap_err());
            assert!(
                msg.contains("rank 2") && msg.contains("model file missing"),
                "{msg}"
            );
        }
    }
}

#[test]
fn more_ranks_than_cores_still_run_fast() {
    // 8 ranks on this machine's (few) cores: spinning waiters would cost a scheduler slice
    // (milliseconds) per collective; 2000 all-reduces must finish in well under that.
    let start = std::time::Instant::now();
    on_group(8, |c| {
        let mut v = [1.0f32; 576];
        for _ in 0..2000 {
            c.all_reduce_sum(&mut v).unwrap();
        }
    });
    let per_op = start.elapsed() / 2000;
    assert!(
        per_op < Duration::from_millis(5),
        "{per_op:?} per all-reduce with 8 ranks"
    );
}
