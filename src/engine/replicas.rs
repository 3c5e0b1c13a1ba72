//! Data parallelism (`--dp-size`): whole replicas of the model, each an engine group of its
//! own (tp ranks, a scheduler, a KV cache), behind one front end, and the router that
//! sends each request to one of them (SGLang's `--load-balance-method`).
//!
//! Replicas share nothing, so a request's tokens are those it gets from a lone engine; the
//! router only decides where it waits and which prefix cache it can use. Cache-aware
//! routing remembers, per replica, the prompt prefixes it sent there (hashes of whole KV
//! blocks, a bounded memory: the scheduler's cache may have evicted some), and sends a
//! prompt where the longest of them matches, unless the replicas' loads are too far apart,
//! when the shortest queue wins (as SGLang's router does).

use super::runtime::{run_group, run_local, Driver, GroupOptions, Launch};
use super::scheduler::{
    self, Command, EngineHandle, Event, FlushOutcome, GenerationParams, SchedulerConfig, Stats,
};
use crate::loader::{ModelConfig, TensorSource};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::mpsc::UnboundedReceiver;

/// How the router picks a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalance {
    /// Each replica in turn.
    RoundRobin,
    /// The replica with the fewest requests in flight (routed there and not yet over).
    ShortestQueue,
    /// The replica that already holds the longest prefix of the prompt, while loads are
    /// balanced; else the shortest queue.
    CacheAware,
}

impl LoadBalance {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "round_robin" => LoadBalance::RoundRobin,
            "shortest_queue" => LoadBalance::ShortestQueue,
            "cache_aware" => LoadBalance::CacheAware,
            other => bail!(
                "--load-balance-method {other} is not one of round_robin, shortest_queue, \
                 cache_aware"
            ),
        })
    }
}

/// Cache-aware routing gives way to the shortest queue when the busiest replica has more
/// than this many requests more than the idlest (SGLang's router's absolute threshold) …
const BALANCE_ABS_THRESHOLD: usize = 32;
/// … and more than this many times as many (its relative threshold).
const BALANCE_REL_THRESHOLD: f64 = 1.0001;

/// Prompt tokens per remembered prefix: the engine's KV block size, the unit it caches.
const PREFIX_BLOCK: usize = 16;

/// Prefixes remembered per replica; the least recently routed go first past this.
const PREFIXES_PER_REPLICA: usize = 1 << 16;

/// The engine groups of a server and the router between them.
pub struct Replicas {
    engines: Vec<EngineHandle>,
    /// Requests routed to each replica and not yet over: the router's own count, exact
    /// from the moment of routing (the engines' counters lag behind a burst).
    in_flight: Vec<Arc<AtomicUsize>>,
    method: LoadBalance,
    next: AtomicUsize,
    prefixes: Mutex<Vec<PrefixMemory>>,
}

impl Replicas {
    pub fn new(engines: Vec<EngineHandle>, method: LoadBalance) -> Self {
        let prefixes = engines.iter().map(|_| PrefixMemory::default()).collect();
        Replicas {
            in_flight: engines.iter().map(|_| Arc::default()).collect(),
            engines,
            method,
            next: AtomicUsize::new(0),
            prefixes: Mutex::new(prefixes),
        }
    }

    /// Queues a request on the replica the router picks; its events arrive on the
    /// returned receiver (dropping it cancels the request).
    pub fn submit(&self, input_ids: Vec<u32>, params: GenerationParams) -> Result<RequestEvents> {
        let replica = self.route(&input_ids);
        let receiver = self.engines[replica].submit(input_ids, params)?;
        let counter = self.in_flight[replica].clone();
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(RequestEvents {
            receiver,
            _in_flight: InFlight(counter),
        })
    }

    /// Each replica's counters, in replica order.
    pub fn stats(&self) -> impl Iterator<Item = &Stats> {
        self.engines.iter().map(|e| &*e.stats)
    }

    /// Empties every replica's prefix cache, or none while any has requests in flight.
    pub async fn flush_cache(&self) -> Result<FlushOutcome> {
        let (running, waiting) = self.stats().fold((0, 0), |(r, w), s| {
            (
                r + s.running.load(Ordering::Relaxed),
                w + s.waiting.load(Ordering::Relaxed),
            )
        });
        if running + waiting > 0 {
            return Ok(FlushOutcome::Busy { running, waiting });
        }
        let mut flushed = None;
        for engine in &self.engines {
            match engine.flush_cache().await? {
                FlushOutcome::Flushed { blocks } => {
                    flushed = Some(flushed.unwrap_or(0) + blocks);
                }
                busy @ FlushOutcome::Busy { .. } => return Ok(busy),
                FlushOutcome::NoCache => {}
            }
        }
        self.prefixes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .for_each(PrefixMemory::clear);
        Ok(
            flushed.map_or(FlushOutcome::NoCache, |blocks| FlushOutcome::Flushed {
                blocks,
            }),
        )
    }

    pub fn shutdown(&self) {
        self.engines.iter().for_each(EngineHandle::shutdown);
    }

    /// The replica a prompt goes to.
    fn route(&self, prompt: &[u32]) -> usize {
        let n = self.engines.len();
        if n == 1 {
            return 0;
        }
        let loads: Vec<usize> = self
            .in_flight
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let shortest = (0..n).min_by_key(|&r| loads[r]).unwrap_or(0);
        match self.method {
            LoadBalance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            LoadBalance::ShortestQueue => shortest,
            LoadBalance::CacheAware => {
                let hashes = prefix_hashes(prompt);
                let mut memory = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
                let (max, min) = (loads.iter().max(), loads.iter().min());
                let (max, min) = (*max.unwrap_or(&0), *min.unwrap_or(&0));
                let imbalanced = max - min > BALANCE_ABS_THRESHOLD
                    && max as f64 > min as f64 * BALANCE_REL_THRESHOLD;
                let chosen = if imbalanced {
                    shortest
                } else {
                    // The longest match; among equals the lighter load, then the lower index.
                    (0..n)
                        .max_by_key(|&r| {
                            (memory[r].matched(&hashes), std::cmp::Reverse((loads[r], r)))
                        })
                        .unwrap_or(shortest)
                };
                memory[chosen].remember(&hashes);
                chosen
            }
        }
    }
}

/// A request's events, counted in its replica's load until dropped.
pub struct RequestEvents {
    receiver: UnboundedReceiver<Event>,
    _in_flight: InFlight,
}

impl RequestEvents {
    pub async fn recv(&mut self) -> Option<Event> {
        self.receiver.recv().await
    }
}

/// One request in a replica's count, until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One hash per whole block of the prompt, each covering every token up to its block's end.
fn prefix_hashes(prompt: &[u32]) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    prompt
        .chunks_exact(PREFIX_BLOCK)
        .map(|block| {
            block.hash(&mut hasher);
            hasher.finish()
        })
        .collect()
}

/// The prompt prefixes routed to one replica, as block-prefix hashes with the time each
/// was last routed (a counter), bounded.
#[derive(Default)]
struct PrefixMemory {
    last_routed: HashMap<u64, u64>,
    clock: u64,
}

impl PrefixMemory {
    /// Blocks of the prompt whose whole prefix was routed here before.
    fn matched(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.last_routed.contains_key(h))
            .count()
    }

    fn remember(&mut self, hashes: &[u64]) {
        self.clock += 1;
        for &h in hashes {
            self.last_routed.insert(h, self.clock);
        }
        if self.last_routed.len() > PREFIXES_PER_REPLICA {
            // Forget the older half: routing gets no worse than a cold cache's.
            let mut stamps: Vec<u64> = self.last_routed.values().copied().collect();
            let (_, median, _) = stamps.select_nth_unstable(PREFIXES_PER_REPLICA / 2);
            let cut = *median;
            self.last_routed.retain(|_, &mut t| t > cut);
        }
    }

    fn clear(&mut self) {
        self.last_routed.clear();
    }
}

/// Serves with every replica of `engines`: each an engine group of `opts.tp` ranks on its
/// own run of the cores, loading its own copy of the weights from `src`, then running the
/// scheduler on its commands (`channels`, in replica order) until shutdown. Each sends its
/// KV capacity on `ready` once loaded. When one fails, all are shut down and its error is
/// returned, naming it. One replica may be an MPI world (`launch`); several run in-process.
#[allow(clippy::too_many_arguments)]
pub fn run_replicas(
    launch: Launch,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    opts: &GroupOptions,
    sched: &SchedulerConfig,
    engines: &Replicas,
    channels: Vec<mpsc::Receiver<Command>>,
    ready: mpsc::Sender<usize>,
) -> Result<()> {
    let stats: Vec<&Stats> = engines.stats().collect();
    let serve = |driver: &mut Driver, commands, stats: &Stats, ready: mpsc::Sender<usize>| {
        scheduler::publish_capacity(driver, stats);
        let _ = ready.send(driver.kv_capacity());
        scheduler::run(driver, sched, commands, stats)
    };
    let dp = channels.len();
    if dp == 1 {
        let commands = channels.into_iter().next().expect("one replica");
        return run_group(launch, src, cfg, opts, |d| {
            serve(d, commands, stats[0], ready)
        })
        .map(|_| ());
    }
    if !matches!(launch, Launch::Local { .. }) {
        bail!("--dp-size under mpirun is not supported yet: start one server per replica");
    }
    let cores = cores_per_replica(opts.cpus.clone(), dp);
    std::thread::scope(|scope| {
        let runs: Vec<_> = channels
            .into_iter()
            .enumerate()
            .map(|(r, commands)| {
                let opts = GroupOptions {
                    cpus: cores[r].clone(),
                    ..opts.clone()
                };
                let (ready, stats) = (ready.clone(), stats[r]);
                scope.spawn(move || {
                    let result = run_local(src, cfg, &opts, |d| serve(d, commands, stats, ready));
                    if result.is_err() {
                        engines.shutdown();
                    }
                    result.with_context(|| format!("data-parallel replica {r}"))
                })
            })
            .collect();
        let mut first_error = None;
        for run in runs {
            let result = run
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a data-parallel replica panicked")));
            if let (Err(e), None) = (result, &first_error) {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// Splits `cores` (all of the process's when `None`) into `dp` equal runs, one per
/// replica; `None` for every replica when there are fewer cores than replicas (then the
/// ranks are not pinned).
pub fn cores_per_replica(cores: Option<Vec<usize>>, dp: usize) -> Vec<Option<Vec<usize>>> {
    let cores = cores.unwrap_or_else(crate::kernels::affinity::available_cores);
    let each = cores.len() / dp.max(1);
    if each == 0 {
        return vec![None; dp];
    }
    cores
        .chunks_exact(each)
        .take(dp)
        .map(|c| Some(c.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(
        n: usize,
        method: LoadBalance,
    ) -> (Replicas, Vec<std::sync::mpsc::Receiver<Command>>) {
        let (handles, receivers) = (0..n)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                (EngineHandle::new(tx, Arc::new(Stats::default())), rx)
            })
            .unzip();
        (Replicas::new(handles, method), receivers)
    }

    fn prompt(prefix: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| prefix * 1000 + i).collect()
    }

    #[test]
    fn round_robin_takes_turns_and_shortest_queue_the_idlest() {
        let (r, _rx) = replicas(3, LoadBalance::RoundRobin);
        let order: Vec<usize> = (0..6).map(|_| r.route(&prompt(0, 40))).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        let (r, _rx) = replicas(3, LoadBalance::ShortestQueue);
        r.in_flight[0].store(2, Ordering::Relaxed);
        r.in_flight[1].store(1, Ordering::Relaxed);
        r.in_flight[2].store(3, Ordering::Relaxed);
        assert_eq!(r.route(&prompt(0, 40)), 1);
        // A request counts in its replica's load until its events are dropped.
        let params = GenerationParams {
            max_new_tokens: 1,
            sampling: Default::default(),
            stop_ids: vec![],
            logprobs: None,
            constraint: None,
        };
        let events = r.submit(prompt(0, 40), params).unwrap();
        assert_eq!(r.in_flight[1].load(Ordering::Relaxed), 2);
        drop(events);
        assert_eq!(r.in_flight[1].load(Ordering::Relaxed), 1);
    }

    /// A prompt goes where its longest prefix went (whole blocks only), new prompts to the
    /// lighter replica; past the balance thresholds the shortest queue wins.
    #[test]
    fn cache_aware_follows_prefixes_until_loads_are_too_far_apart() {
        let (r, _rx) = replicas(2, LoadBalance::CacheAware);
        r.in_flight[0].store(1, Ordering::Relaxed);
        let first = r.route(&prompt(7, 64));
        assert_eq!(first, 1, "no match: the lighter replica");
        r.in_flight[0].store(0, Ordering::Relaxed);
        r.in_flight[1].store(3, Ordering::Relaxed);
        let mut longer = prompt(7, 64);
        longer.extend([1, 2, 3]);
        assert_eq!(
            r.route(&longer),
            1,
            "the shared prefix wins over a lighter load"
        );
        assert_eq!(
            r.route(&prompt(8, 64)),
            0,
            "another prompt: the lighter replica"
        );
        let mut short = prompt(7, 15);
        short.push(99);
        assert_eq!(r.route(&short), 0, "under one block nothing matches");
        r.in_flight[1].store(43, Ordering::Relaxed);
        assert_eq!(r.route(&prompt(7, 64)), 0, "too busy: the shortest queue");
    }

    #[test]
    fn cores_split_into_equal_runs() {
        let split = cores_per_replica(Some((0..8).collect()), 3);
        assert_eq!(
            split,
            [Some(vec![0, 1]), Some(vec![2, 3]), Some(vec![4, 5])]
        );
        assert_eq!(cores_per_replica(Some(vec![0]), 2), [None, None]);
    }
}
