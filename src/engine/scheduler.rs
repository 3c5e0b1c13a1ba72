//! Continuous batching on rank 0: requests join and leave the running batch at every step.
//!
//! Each step holds one new token of every running sequence (decode) plus chunks of waiting
//! prompts (prefill) within a token budget; the model reads each weight once for all of
//! them. A request reserves the KV blocks for its prompt and all its new tokens when it is
//! admitted, so memory never runs out mid-generation: when blocks are short, requests wait.
//! The scheduler deals in token ids; text (detokenizing, stop strings) is the caller's.

use super::runtime::Driver;
use super::sampling::{logprobs, Sampler, SamplingParams};
use crate::kernels::Phase;
use crate::model::{Logits, SeqStep};
use anyhow::Result;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What one request asks of the engine.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after any of these tokens (which is reported, then finishes).
    pub stop_ids: Vec<u32>,
    /// Top log-probabilities to report with each token (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

/// A token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the engine reports back for a request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    /// The last event: `stop` after a stop token, else `length`.
    Finished { stop: bool },
    /// The request cannot be served (it is never retried).
    Failed(Failure),
}

/// Why a request ended without finishing.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request asks for what the server cannot give (the client's to change).
    Refused,
    /// The server is going away.
    ShuttingDown,
    /// A fault while serving this request; the server goes on.
    Internal,
}

impl Event {
    pub fn failed(kind: FailureKind, message: impl Into<String>) -> Event {
        Event::Failed(Failure {
            kind,
            message: message.into(),
        })
    }
}

pub struct Request {
    pub input_ids: Vec<u32>,
    pub params: GenerationParams,
    /// Dropping the receiver cancels the request and frees its blocks.
    pub events: UnboundedSender<Event>,
}

pub enum Command {
    Submit(Request),
    /// Stop: cancel whatever still runs and leave the loop.
    Shutdown,
}

/// Counters the server exposes (/metrics, /get_server_info).
#[derive(Default)]
pub struct Stats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub used_blocks: AtomicUsize,
    pub total_blocks: AtomicUsize,
    pub block_size: AtomicUsize,
    pub requests_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub time_to_first_token: Mutex<Histogram>,
    pub inter_token_latency: Mutex<Histogram>,
}

/// A Prometheus histogram: cumulative counts per upper bound (seconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Histogram {
            counts: vec![0; bounds.len()],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if seconds <= *b {
                *c += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_running_requests: usize,
    /// Tokens of prompt prefilled per step, across requests.
    pub chunked_prefill_size: usize,
}

/// One request being served.
struct Sequence {
    request: Request,
    blocks: Vec<u32>,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    started: Instant,
    last_token: Option<Instant>,
}

impl Sequence {
    fn prompt_done(&self) -> bool {
        self.prefilled == self.request.input_ids.len()
    }

    /// The position the next fed token takes.
    fn position(&self) -> usize {
        self.prefilled + self.generated.len().saturating_sub(1)
    }
}

/// Free KV blocks, handed out whole to sequences.
struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

impl BlockPool {
    fn new(total: usize) -> Self {
        BlockPool {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        (n <= self.free.len()).then(|| self.free.split_off(self.free.len() - n))
    }

    fn give_back(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
    }
}

/// Serves requests from `commands` until a shutdown command (or every sender is gone).
pub fn run(
    driver: &mut Driver,
    cfg: &SchedulerConfig,
    commands: mpsc::Receiver<Command>,
    stats: &Stats,
) -> Result<()> {
    let block_size = driver.block_size();
    let mut pool = BlockPool::new(driver.kv_blocks());
    stats.total_blocks.store(pool.total, Ordering::Relaxed);
    stats.block_size.store(block_size, Ordering::Relaxed);
    let vocab = driver.config().vocab_size;
    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    loop {
        // Intake: block only when there is nothing to do.
        let next = if waiting.is_empty() && running.is_empty() {
            commands.recv().ok()
        } else {
            commands.try_recv().ok()
        };
        let mut shutdown = next.is_none() && waiting.is_empty() && running.is_empty();
        for command in next
            .into_iter()
            .chain(std::iter::from_fn(|| commands.try_recv().ok()))
        {
            match command {
                Command::Submit(r) => {
                    stats.requests_total.fetch_add(1, Ordering::Relaxed);
                    waiting.push_back(r);
                }
                Command::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            for seq in running.drain(..) {
                let _ = seq.request.events.send(Event::failed(
                    FailureKind::ShuttingDown,
                    "the server is shutting down",
                ));
            }
            for r in waiting.drain(..) {
                let _ = r.events.send(Event::failed(
                    FailureKind::ShuttingDown,
                    "the server is shutting down",
                ));
            }
            return Ok(());
        }

        // Cancelled requests leave before they cost a step.
        waiting.retain(|r| !r.events.is_closed());
        running.retain_mut(|seq| {
            let keep = !seq.request.events.is_closed();
            if !keep {
                pool.give_back(std::mem::take(&mut seq.blocks));
            }
            keep
        });

        // Admission, in arrival order, while blocks and slots last.
        while running.len() < cfg.max_running_requests {
            let Some(r) = waiting.front() else { break };
            let needed = (r.input_ids.len() + r.params.max_new_tokens).div_ceil(block_size);
            if needed > pool.total {
                let r = waiting.pop_front().expect("front exists");
                let _ = r.events.send(Event::failed(
                    FailureKind::Refused,
                    format!(
                    "the prompt ({} tokens) plus max tokens ({}) needs {} KV positions, more than \
                     the server's {}; ask for fewer tokens or start the server with a larger \
                     --max-total-tokens",
                    r.input_ids.len(),
                    r.params.max_new_tokens,
                    needed * block_size,
                    pool.total * block_size
                ),
                ));
                continue;
            }
            let Some(blocks) = pool.take(needed) else {
                break;
            };
            let r = waiting.pop_front().expect("front exists");
            stats
                .prompt_tokens_total
                .fetch_add(r.input_ids.len() as u64, Ordering::Relaxed);
            running.push(Sequence {
                sampler: Sampler::new(r.params.sampling.clone()),
                request: r,
                blocks,
                prefilled: 0,
                generated: Vec::new(),
                started: Instant::now(),
                last_token: None,
            });
        }
        publish(stats, &running, &waiting, &pool);
        if running.is_empty() {
            if !waiting.is_empty() {
                // Blocks are short and nothing runs to free them: cannot happen, since a
                // request needing more than the whole pool is refused above.
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }

        // The step: every decoding sequence's last token, then prompt chunks in budget.
        let mut budget = cfg.chunked_prefill_size.max(1);
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, seq) in running.iter().enumerate() {
            if seq.prompt_done() {
                plan.push((i, 0..1));
            }
        }
        for (i, seq) in running.iter().enumerate() {
            if !seq.prompt_done() && budget > 0 {
                let n = (seq.request.input_ids.len() - seq.prefilled).min(budget);
                budget -= n;
                plan.push((i, seq.prefilled..seq.prefilled + n));
            }
        }
        let steps: Vec<SeqStep> = plan
            .iter()
            .map(|(i, range)| {
                let seq = &running[*i];
                if seq.prompt_done() {
                    SeqStep {
                        tokens: std::slice::from_ref(seq.generated.last().expect("decoding")),
                        start_pos: seq.position(),
                        blocks: &seq.blocks,
                        logits: Logits::Last,
                        phase: Phase::Decode,
                    }
                } else {
                    let ends_prompt = range.end == seq.request.input_ids.len();
                    SeqStep {
                        tokens: &seq.request.input_ids[range.clone()],
                        start_pos: range.start,
                        blocks: &seq.blocks,
                        logits: if ends_prompt {
                            Logits::Last
                        } else {
                            Logits::None
                        },
                        phase: Phase::Prefill,
                    }
                }
            })
            .collect();
        // Vocab-parallel selection unless a sequence needs the full logits.
        let needed = plan
            .iter()
            .filter(|(i, range)| {
                let seq = &running[*i];
                seq.prompt_done() || range.end == seq.request.input_ids.len()
            })
            .try_fold(1, |k, (i, _)| {
                let seq = &running[*i];
                let need = match seq.request.params.logprobs {
                    Some(_) => None,
                    None => seq.sampler.candidates_needed(),
                };
                need.map(|n| n.max(k))
            });
        let out = match needed {
            Some(k) => StepOutput::Top(driver.forward_top_k(&steps, k)?, k),
            None => StepOutput::Logits(driver.forward(&steps)?),
        };
        drop(steps);

        // Sample for every sequence that got logits, and report.
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, range) in plan {
            let seq = &mut running[i];
            if !seq.prompt_done() {
                seq.prefilled = range.end;
                if !seq.prompt_done() {
                    continue;
                }
            }
            let chosen = catch_unwind(AssertUnwindSafe(|| choose_token(seq, out, row, vocab)));
            row += 1;
            let Ok((id, lp)) = chosen else {
                // A fault of this request alone: it fails, the batch goes on.
                tracing::error!("sampling failed for a request; it is ended with an error");
                let _ = seq.request.events.send(Event::failed(
                    FailureKind::Internal,
                    "internal error while choosing the next token; the request was ended",
                ));
                finished.push(i);
                continue;
            };
            seq.generated.push(id);
            stats
                .generation_tokens_total
                .fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            match seq.last_token {
                None => lock(&stats.time_to_first_token).observe((now - seq.started).as_secs_f64()),
                Some(t) => lock(&stats.inter_token_latency).observe((now - t).as_secs_f64()),
            }
            seq.last_token = Some(now);
            let sent = seq.request.events.send(Event::Token { id, logprob: lp });
            let stop = seq.request.params.stop_ids.contains(&id);
            let length = seq.generated.len() >= seq.request.params.max_new_tokens;
            if sent.is_err() || stop || length {
                let _ = seq.request.events.send(Event::Finished { stop });
                finished.push(i);
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let seq = running.swap_remove(i);
            pool.give_back(seq.blocks);
        }
        publish(stats, &running, &waiting, &pool);
    }
}

/// The next token of `seq` from row `row` of a step's output, with its log-probabilities
/// when asked.
fn choose_token(
    seq: &mut Sequence,
    out: StepOutput,
    row: usize,
    vocab: usize,
) -> (u32, Option<TokenLogprob>) {
    match out {
        StepOutput::Top(top, k) => (seq.sampler.sample_top(&top[row * k..(row + 1) * k]), None),
        StepOutput::Logits(logits) => {
            let l = &logits[row * vocab..(row + 1) * vocab];
            let id = seq.sampler.sample(l);
            let lp = seq.request.params.logprobs.map(|top| {
                let (logprob, top) = logprobs(l, id, top);
                TokenLogprob { logprob, top }
            });
            (id, lp)
        }
    }
}

/// What a step brought back: the full logits, or each position's top k candidates.
#[derive(Clone, Copy)]
enum StepOutput<'a> {
    Logits(&'a [f32]),
    Top(&'a [(u32, f32)], usize),
}

/// Makes the batch's current shape visible to the server.
fn publish(stats: &Stats, running: &[Sequence], waiting: &VecDeque<Request>, pool: &BlockPool) {
    stats.running.store(running.len(), Ordering::Relaxed);
    stats.waiting.store(waiting.len(), Ordering::Relaxed);
    stats
        .used_blocks
        .store(pool.total - pool.free.len(), Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a caller talks to the engine: submit requests, shut down, read the counters.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    pub stats: Arc<Stats>,
}

impl EngineHandle {
    pub fn new(commands: mpsc::Sender<Command>, stats: Arc<Stats>) -> Self {
        EngineHandle { commands, stats }
    }

    /// Queues a request; its events arrive on the returned receiver.
    pub fn submit(
        &self,
        input_ids: Vec<u32>,
        params: GenerationParams,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.commands
            .send(Command::Submit(Request {
                input_ids,
                params,
                events: tx,
            }))
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))?;
        Ok(rx)
    }

    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}
