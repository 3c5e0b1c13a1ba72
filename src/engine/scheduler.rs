//! Continuous batching on rank 0: requests join and leave the running batch at every step.
//!
//! Each step holds one new token of every running sequence (decode) plus chunks of waiting
//! prompts (prefill) within a token budget; the model reads each weight once for all of
//! them. A request reserves the KV blocks for its prompt and all its new tokens when it is
//! admitted, so memory never runs out mid-generation: when blocks are short, requests wait
//! (see [`super::kv_blocks`]). A prompt that starts with tokens an earlier prompt had
//! starts its prefill after them, on the prefix cache's blocks ([`super::prefix_cache`]).
//! The scheduler deals in token ids; text (detokenizing, stop strings) is the caller's.

use super::grammar::Constraint;
use super::kv_blocks::{Admission, BlockTable, KvBlocks};
use super::runtime::Driver;
use super::sampling::{logprobs, Sampler, SamplingParams};
use super::step_plan::RowMask;
use crate::kernels::Phase;
use crate::model::{Logits, SeqStep};
use anyhow::Result;
use std::collections::VecDeque;
use std::ops::Range;
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
    /// The grammar the output follows (JSON schema, regex, EBNF); the request ends when
    /// it is complete.
    pub constraint: Option<Constraint>,
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
    /// The first event: the request joined the running batch, with this many prompt tokens
    /// found in the prefix cache.
    Admitted { cached_tokens: usize },
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
    /// The request ran past `--request-timeout` and was ended.
    TimedOut,
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
    /// When it was submitted: `--request-timeout` counts from here.
    submitted: Instant,
}

impl Request {
    pub fn new(
        input_ids: Vec<u32>,
        params: GenerationParams,
        events: UnboundedSender<Event>,
    ) -> Self {
        Request {
            input_ids,
            params,
            events,
            submitted: Instant::now(),
        }
    }

    /// Whether it has run past `timeout` since it was submitted.
    fn timed_out(&self, timeout: Option<Duration>) -> bool {
        timeout.is_some_and(|t| self.submitted.elapsed() > t)
    }
}

pub enum Command {
    Submit(Request),
    /// Empty the prefix cache (refused while requests run or wait).
    FlushCache(tokio::sync::oneshot::Sender<FlushOutcome>),
    /// Stop: cancel whatever still runs and leave the loop.
    Shutdown,
}

/// What a cache flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    Flushed {
        blocks: usize,
    },
    /// Requests are in flight: nothing was flushed.
    Busy {
        running: usize,
        waiting: usize,
    },
    /// The server runs without a prefix cache.
    NoCache,
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
    /// Prompt tokens found in the prefix cache (not prefilled again).
    pub cached_tokens_total: AtomicU64,
    /// KV blocks the prefix cache holds.
    pub cached_blocks: AtomicUsize,
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

impl Stats {
    /// The counters of several engines (data-parallel replicas) as one engine's.
    pub fn sum<'a>(all: impl Iterator<Item = &'a Stats>) -> Stats {
        let total = Stats::default();
        for s in all {
            let add = |to: &AtomicUsize, from: &AtomicUsize| {
                to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
            };
            let add64 = |to: &AtomicU64, from: &AtomicU64| {
                to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
            };
            add(&total.running, &s.running);
            add(&total.waiting, &s.waiting);
            add(&total.used_blocks, &s.used_blocks);
            add(&total.total_blocks, &s.total_blocks);
            add(&total.cached_blocks, &s.cached_blocks);
            add64(&total.requests_total, &s.requests_total);
            add64(&total.prompt_tokens_total, &s.prompt_tokens_total);
            add64(&total.cached_tokens_total, &s.cached_tokens_total);
            add64(&total.generation_tokens_total, &s.generation_tokens_total);
            let block_size = s.block_size.load(Ordering::Relaxed);
            total.block_size.fetch_max(block_size, Ordering::Relaxed);
            let lock = |m: &Mutex<Histogram>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let merge = |to: &Mutex<Histogram>, from: &Mutex<Histogram>| {
                let from = lock(from);
                let mut to = to.lock().unwrap_or_else(|e| e.into_inner());
                to.counts
                    .iter_mut()
                    .zip(&from.counts)
                    .for_each(|(t, f)| *t += f);
                to.sum += from.sum;
                to.count += from.count;
            };
            merge(&total.time_to_first_token, &s.time_to_first_token);
            merge(&total.inter_token_latency, &s.inter_token_latency);
        }
        total
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
    /// Keep prompts' KV blocks for later requests that share their prefix.
    pub prefix_cache: bool,
    pub policy: SchedulePolicy,
    /// Requests still waiting or running this long after they were submitted are ended
    /// with a [`FailureKind::TimedOut`] (`None`: never).
    pub request_timeout: Option<Duration>,
}

/// The order waiting requests are admitted in (SGLang's `--schedule-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulePolicy {
    /// Longest cached prefix first (first come, first served when the queue is long).
    Lpm,
    /// First come, first served.
    Fcfs,
}

impl SchedulePolicy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lpm" => Ok(SchedulePolicy::Lpm),
            "fcfs" => Ok(SchedulePolicy::Fcfs),
            _ => anyhow::bail!("unknown --schedule-policy {s:?}: tpserve has lpm and fcfs"),
        }
    }
}

/// Above this many waiting requests lpm admits in arrival order (SGLang's limit), so that
/// matching every waiting prompt never costs more than a step.
const LPM_QUEUE_LIMIT: usize = 128;

/// Tokens a waiting prompt must gain by waiting for another prompt's prefill (SGLang's
/// in-batch prefix caching threshold).
const IN_BATCH_PREFIX_GAIN: usize = 32;

/// One request being served.
struct Sequence {
    request: Request,
    table: BlockTable,
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

/// Serves requests from `commands` until a shutdown command (or every sender is gone).
pub fn run(
    driver: &mut Driver,
    cfg: &SchedulerConfig,
    commands: mpsc::Receiver<Command>,
    stats: &Stats,
) -> Result<()> {
    let kv = KvBlocks::new(driver.kv_blocks(), driver.block_size(), cfg.prefix_cache);
    publish_capacity(driver, stats);
    let mut s = Scheduler {
        cfg,
        stats,
        kv,
        waiting: VecDeque::new(),
        running: Vec::new(),
        vocab: driver.config().vocab_size,
    };
    while s.intake(&commands) {
        s.drop_ended();
        s.admit();
        s.publish();
        if s.running.is_empty() {
            if !s.waiting.is_empty() {
                // Cannot happen (with nothing running every block is free or evictable, and
                // a request larger than the whole cache is refused): never spin on it.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            continue;
        }
        s.step(driver)?;
        s.publish();
    }
    Ok(())
}

/// The KV cache's size in `stats`: before a server says it is ready, so that its first
/// answers report the cache it will run with.
pub fn publish_capacity(driver: &Driver, stats: &Stats) {
    stats
        .total_blocks
        .store(driver.kv_blocks(), Ordering::Relaxed);
    stats
        .block_size
        .store(driver.block_size(), Ordering::Relaxed);
}

/// The scheduler's state between steps.
struct Scheduler<'a> {
    cfg: &'a SchedulerConfig,
    stats: &'a Stats,
    kv: KvBlocks,
    waiting: VecDeque<Request>,
    running: Vec<Sequence>,
    vocab: usize,
}

impl Scheduler<'_> {
    /// Takes new commands (blocking only when there is nothing to do); false once the
    /// scheduler has shut down.
    fn intake(&mut self, commands: &mpsc::Receiver<Command>) -> bool {
        let idle = self.waiting.is_empty() && self.running.is_empty();
        let next = if idle {
            commands.recv().ok()
        } else {
            commands.try_recv().ok()
        };
        let mut shutdown = next.is_none() && idle;
        for command in next
            .into_iter()
            .chain(std::iter::from_fn(|| commands.try_recv().ok()))
        {
            match command {
                Command::Submit(r) => {
                    self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
                    self.waiting.push_back(r);
                }
                Command::FlushCache(reply) => {
                    let _ = reply.send(self.flush_cache());
                }
                Command::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            let failed = || Event::failed(FailureKind::ShuttingDown, "the server is shutting down");
            for seq in std::mem::take(&mut self.running) {
                let _ = seq.request.events.send(failed());
                self.kv.release(seq.table);
            }
            for r in self.waiting.drain(..) {
                let _ = r.events.send(failed());
            }
        }
        !shutdown
    }

    /// Empties the prefix cache (SGLang refuses while requests are in flight, so do we).
    fn flush_cache(&mut self) -> FlushOutcome {
        if !self.running.is_empty() || !self.waiting.is_empty() {
            return FlushOutcome::Busy {
                running: self.running.len(),
                waiting: self.waiting.len(),
            };
        }
        let outcome = match self.kv.flush() {
            Some(blocks) => FlushOutcome::Flushed { blocks },
            None => FlushOutcome::NoCache,
        };
        self.publish();
        outcome
    }

    /// Cancelled requests leave before they cost a step; those past the request timeout
    /// are told so and leave too.
    fn drop_ended(&mut self) {
        let timeout = self.cfg.request_timeout;
        let ended = |r: &Request| {
            if r.timed_out(timeout) {
                let seconds = timeout.map_or(0, |t| t.as_secs());
                let message = format!(
                    "the request ran longer than the server's --request-timeout ({seconds} s) \
                     and was ended; ask for fewer tokens or retry when the server is less busy"
                );
                let _ = r.events.send(Event::failed(FailureKind::TimedOut, message));
                return true;
            }
            r.events.is_closed()
        };
        self.waiting.retain(|r| !ended(r));
        let kv = &mut self.kv;
        self.running.retain_mut(|seq| {
            let keep = !ended(&seq.request);
            if !keep {
                kv.release(std::mem::take(&mut seq.table));
            }
            keep
        });
    }

    /// Moves waiting requests into the running batch while slots and blocks last.
    fn admit(&mut self) {
        if self.cfg.policy == SchedulePolicy::Lpm && self.cfg.prefix_cache {
            longest_prefix_first(&mut self.waiting, &self.kv);
        }
        let mut i = 0;
        while self.running.len() < self.cfg.max_running_requests && i < self.waiting.len() {
            let r = &self.waiting[i];
            if self.better_after_running_prefill(&r.input_ids) {
                i += 1;
                continue;
            }
            match self.kv.admit(&r.input_ids, r.params.max_new_tokens) {
                Admission::Admitted(table) => {
                    let r = self.waiting.remove(i).expect("index in range");
                    self.start(r, table);
                }
                Admission::Wait => break,
                Admission::TooLarge { needed } => {
                    let r = self.waiting.remove(i).expect("index in range");
                    let _ = r.events.send(Event::failed(
                        FailureKind::Refused,
                        format!(
                            "the prompt ({} tokens) plus max tokens ({}) needs {} KV positions, \
                             more than the server's {}; ask for fewer tokens or start the \
                             server with a larger --max-total-tokens",
                            r.input_ids.len(),
                            r.params.max_new_tokens,
                            needed * self.kv.block_size(),
                            self.kv.total() * self.kv.block_size()
                        ),
                    ));
                }
            }
        }
    }

    /// Whether a waiting prompt shares at least [`IN_BATCH_PREFIX_GAIN`] more tokens with a
    /// prompt still being prefilled than the cache holds for it now: it then waits for that
    /// prefill to enter the cache instead of computing the same prefix alongside (SGLang's
    /// in-batch prefix caching).
    fn better_after_running_prefill(&self, prompt: &[u32]) -> bool {
        if !self.cfg.prefix_cache {
            return false;
        }
        let cached = self.kv.cached_prefix(prompt);
        self.running.iter().filter(|s| !s.prompt_done()).any(|s| {
            let shared = s
                .request
                .input_ids
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len().saturating_sub(1));
            shared >= cached + IN_BATCH_PREFIX_GAIN
        })
    }

    fn start(&mut self, r: Request, table: BlockTable) {
        let count = |a: &AtomicU64, n: usize| a.fetch_add(n as u64, Ordering::Relaxed);
        count(&self.stats.prompt_tokens_total, r.input_ids.len());
        count(&self.stats.cached_tokens_total, table.cached_tokens);
        let _ = r.events.send(Event::Admitted {
            cached_tokens: table.cached_tokens,
        });
        self.running.push(Sequence {
            sampler: Sampler::new(r.params.sampling.clone()),
            request: r,
            prefilled: table.cached_tokens,
            table,
            generated: Vec::new(),
            started: Instant::now(),
            last_token: None,
        });
    }

    /// Every decoding sequence's last token, then prompt chunks within the token budget:
    /// (index in `running`, range of its prompt, or `0..1` for a decode).
    fn plan(&self) -> Vec<(usize, Range<usize>)> {
        let mut budget = self.cfg.chunked_prefill_size.max(1);
        let mut plan: Vec<(usize, Range<usize>)> = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            if seq.prompt_done() {
                plan.push((i, 0..1));
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            if !seq.prompt_done() && budget > 0 {
                let n = (seq.request.input_ids.len() - seq.prefilled).min(budget);
                budget -= n;
                plan.push((i, seq.prefilled..seq.prefilled + n));
            }
        }
        plan
    }

    /// One forward step over the planned tokens, then a token for every sequence whose
    /// prompt is done.
    fn step(&mut self, driver: &mut Driver) -> Result<()> {
        let plan = self.plan();
        let samples = |seq: &Sequence, range: &Range<usize>| {
            seq.prompt_done() || range.end == seq.request.input_ids.len()
        };
        for (i, range) in &plan {
            let seq = &mut self.running[*i];
            if samples(seq, range) {
                seq.compute_mask();
            }
        }
        let steps: Vec<SeqStep> = plan
            .iter()
            .map(|(i, range)| self.running[*i].step(range.clone()))
            .collect();
        let sampling: Vec<&Sequence> = plan
            .iter()
            .map(|(i, range)| (&self.running[*i], range))
            .filter(|(seq, range)| samples(seq, range))
            .map(|(seq, _)| seq)
            .collect();
        let masks: Vec<RowMask> = sampling
            .iter()
            .enumerate()
            .filter_map(|(row, seq)| Some((row, seq.mask()?)))
            .collect();
        // Vocab-parallel selection unless a sequence needs the full logits.
        let needed = sampling.iter().try_fold(1, |k, seq| {
            let need = match seq.request.params.logprobs {
                Some(_) => None,
                None => seq.sampler.candidates_needed(),
            };
            need.map(|n| n.max(k))
        });
        let out = match needed {
            Some(k) => StepOutput::Top(driver.forward_top_k_masked(&steps, k, &masks)?, k),
            None => StepOutput::Logits(driver.forward_masked(&steps, &masks)?),
        };
        drop((steps, sampling, masks));
        self.report(plan, out);
        Ok(())
    }

    /// Chooses and sends each sequence's next token; ends the sequences that are done.
    fn report(&mut self, plan: Vec<(usize, Range<usize>)>, out: StepOutput) {
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, range) in plan {
            let seq = &mut self.running[i];
            if !seq.prompt_done() {
                seq.prefilled = range.end;
                if !seq.prompt_done() {
                    continue;
                }
                self.kv
                    .prompt_filled(&mut seq.table, &seq.request.input_ids);
            }
            let chosen = catch_unwind(AssertUnwindSafe(|| choose_token(seq, out, row, self.vocab)));
            row += 1;
            let chosen = match chosen {
                Ok((id, lp)) => seq.follow_grammar(id).map(|()| (id, lp)),
                // A fault of this request alone: it fails, the batch goes on.
                Err(_) => Err(Failure {
                    kind: FailureKind::Internal,
                    message: "internal error while choosing the next token; the request was ended"
                        .into(),
                }),
            };
            let (id, lp) = match chosen {
                Ok(c) => c,
                Err(failure) => {
                    tracing::error!("request failed while choosing a token: {}", failure.message);
                    let _ = seq.request.events.send(Event::Failed(failure));
                    finished.push(i);
                    continue;
                }
            };
            if seq.emit(id, lp, self.stats) {
                finished.push(i);
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let seq = self.running.swap_remove(i);
            self.kv.release(seq.table);
        }
    }

    /// Makes the batch's current shape visible to the server.
    fn publish(&self) {
        let st = self.stats;
        st.running.store(self.running.len(), Ordering::Relaxed);
        st.waiting.store(self.waiting.len(), Ordering::Relaxed);
        st.used_blocks.store(self.kv.used(), Ordering::Relaxed);
        st.cached_blocks.store(self.kv.cached(), Ordering::Relaxed);
    }
}

impl Sequence {
    /// What this sequence feeds in a step: its last token, or `range` of its prompt.
    fn step(&self, range: Range<usize>) -> SeqStep<'_> {
        if self.prompt_done() {
            return SeqStep {
                tokens: std::slice::from_ref(self.generated.last().expect("decoding")),
                start_pos: self.position(),
                blocks: &self.table.blocks,
                logits: Logits::Last,
                phase: Phase::Decode,
            };
        }
        let ends_prompt = range.end == self.request.input_ids.len();
        SeqStep {
            start_pos: range.start,
            tokens: &self.request.input_ids[range],
            blocks: &self.table.blocks,
            logits: if ends_prompt {
                Logits::Last
            } else {
                Logits::None
            },
            phase: Phase::Prefill,
        }
    }

    /// Computes the tokens its grammar allows next, if it has one and they are not known
    /// yet; a grammar that fails is reported when the token is chosen.
    fn compute_mask(&mut self) {
        if let Some(c) = &mut self.request.params.constraint {
            // An error leaves no mask: `follow_grammar` finds it again and fails the request.
            let _ = c.allowed();
        }
    }

    /// The grammar's allowed tokens computed for this step.
    fn mask(&self) -> Option<&[u32]> {
        self.request.params.constraint.as_ref()?.current_mask()
    }

    /// Moves the grammar past the chosen token (an error if the grammar failed or the
    /// token is not allowed).
    fn follow_grammar(&mut self, id: u32) -> Result<(), Failure> {
        let Some(c) = &mut self.request.params.constraint else {
            return Ok(());
        };
        let fail = |e: anyhow::Error| Failure {
            kind: FailureKind::Internal,
            message: format!("the output grammar could not go on: {e}"),
        };
        let allowed = c.allowed().map_err(fail)?;
        if !super::grammar::is_allowed(allowed, id) {
            return Err(fail(anyhow::anyhow!(
                "token {id} was chosen but the grammar does not allow it"
            )));
        }
        c.advance(id).map_err(fail)
    }

    /// Records and sends a new token; true when the sequence is done (stop token, length,
    /// a complete grammar, or a client that went away).
    fn emit(&mut self, id: u32, logprob: Option<TokenLogprob>, stats: &Stats) -> bool {
        self.generated.push(id);
        stats
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        match self.last_token {
            None => lock(&stats.time_to_first_token).observe((now - self.started).as_secs_f64()),
            Some(t) => lock(&stats.inter_token_latency).observe((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
        let sent = self.request.events.send(Event::Token { id, logprob });
        let grammar_done = self
            .request
            .params
            .constraint
            .as_ref()
            .is_some_and(|c| c.is_done());
        let stop = self.request.params.stop_ids.contains(&id) || grammar_done;
        let length = self.generated.len() >= self.request.params.max_new_tokens;
        if sent.is_err() || stop || length {
            let _ = self.request.events.send(Event::Finished { stop });
            return true;
        }
        false
    }
}

/// SGLang's lpm order: the longest cached prefix first, arrival order among equals; arrival
/// order alone when more than [`LPM_QUEUE_LIMIT`] wait.
fn longest_prefix_first(waiting: &mut VecDeque<Request>, kv: &KvBlocks) {
    if (2..=LPM_QUEUE_LIMIT).contains(&waiting.len()) {
        waiting
            .make_contiguous()
            .sort_by_cached_key(|r| std::cmp::Reverse(kv.cached_prefix(&r.input_ids)));
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
            .send(Command::Submit(Request::new(input_ids, params, tx)))
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))?;
        Ok(rx)
    }

    /// Asks the scheduler to empty the prefix cache.
    pub async fn flush_cache(&self) -> Result<FlushOutcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::FlushCache(tx))
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the engine stopped before flushing"))
    }

    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(input_ids: Vec<u32>) -> Request {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let params = GenerationParams {
            max_new_tokens: 4,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            logprobs: None,
            constraint: None,
        };
        Request::new(input_ids, params, events)
    }

    /// With 48 tokens of one prompt cached: the waiting request that shares 40 of them goes
    /// first, then those sharing 20 (in arrival order), then the one sharing nothing; with
    /// a queue longer than the limit, arrival order stays.
    #[test]
    fn lpm_admits_the_longest_cached_prefix_first() {
        let mut kv = KvBlocks::new(64, 16, true);
        let cached: Vec<u32> = (0..48).collect();
        let Admission::Admitted(mut table) = kv.admit(&cached, 1) else {
            panic!("room for one request");
        };
        kv.prompt_filled(&mut table, &cached);
        kv.release(table);
        let sharing = |n: usize, tag: u32| {
            let mut p = cached[..n].to_vec();
            p.extend([1000 + tag, 2000 + tag]);
            p
        };
        let prompts = [
            sharing(0, 0),
            sharing(20, 1),
            sharing(40, 2),
            sharing(20, 3),
        ];
        let mut waiting: VecDeque<Request> = prompts.iter().cloned().map(request).collect();
        longest_prefix_first(&mut waiting, &kv);
        let order: Vec<u32> = waiting
            .iter()
            .map(|r| *r.input_ids.last().unwrap() - 2000)
            .collect();
        assert_eq!(order, [2, 1, 3, 0]);

        let mut long: VecDeque<Request> = (0..=LPM_QUEUE_LIMIT)
            .map(|i| request(sharing(if i == LPM_QUEUE_LIMIT { 40 } else { 0 }, i as u32)))
            .collect();
        longest_prefix_first(&mut long, &kv);
        assert_eq!(*long[0].input_ids.last().unwrap(), 2000);
    }
}
