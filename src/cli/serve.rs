//! `tpserve serve` (also `launch_server`): SGLang's launch_server, with its flag names.

use crate::engine::grammar::Grammars;
use crate::engine::kv_capacity::KvCapacity;
use crate::engine::replicas::{run_replicas, LoadBalance, Replicas};
use crate::engine::runtime::{validate_layout, DEFAULT_BLOCK_SIZE};
use crate::engine::scheduler::{EngineHandle, SchedulePolicy, SchedulerConfig, Stats};
use crate::engine::{self, ChatTemplate, GroupOptions, Launch, Tokenizer};
use crate::kernels::affinity::parse_cpu_list;
use crate::loader::{self, ModelConfig, ModelFiles};
use crate::server::{self, AppState};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub forward: super::ForwardArgs,
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    #[command(flatten)]
    pub sglang: super::sglang_flags::SglangFlags,
    /// A GGUF file, or a Hugging Face model folder.
    #[arg(long = "model-path", visible_alias = "model")]
    pub model_path: PathBuf,
    /// Tensor-parallel size: the number of ranks the model is split over.
    #[arg(long = "tp-size", visible_aliases = ["tensor-parallel-size", "tp"])]
    pub tp: Option<usize>,
    /// How ranks talk: local (threads of this process) or mpi (one process per rank,
    /// started by mpirun; rank 0 serves HTTP); default: mpi under an MPI launcher.
    #[arg(long)]
    pub comm: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 30000)]
    pub port: u16,
    /// The model name clients send (default: the file or folder name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Longest prompt plus reply, in tokens (default: the model's).
    #[arg(long)]
    pub context_length: Option<usize>,
    /// Requests in the running batch at most.
    #[arg(long, default_value_t = 16)]
    pub max_running_requests: usize,
    /// KV cache capacity in tokens (default: from --mem-fraction-static).
    #[arg(long)]
    pub max_total_tokens: Option<usize>,
    /// Fraction of the available memory the KV cache may take, when --max-total-tokens is
    /// not given.
    #[arg(long, default_value_t = 0.3)]
    pub mem_fraction_static: f64,
    /// Prompt tokens prefilled per step, across requests.
    #[arg(long, default_value_t = 512)]
    pub chunked_prefill_size: usize,
    /// Do not keep prompts' KV blocks for later requests that share their prefix.
    #[arg(long)]
    pub disable_radix_cache: bool,
    /// Admission order of waiting requests: lpm (longest cached prefix first) or fcfs.
    #[arg(long, default_value = "lpm")]
    pub schedule_policy: String,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Require `Authorization: Bearer <key>` on every request.
    #[arg(long)]
    pub api_key: Option<String>,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Serve Prometheus metrics at /metrics.
    #[arg(long)]
    pub enable_metrics: bool,
    /// Kernel threads per rank (default: cores / tp, at least 1).
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// Cores the ranks may use, e.g. 0-7 or 0,2,4,6 (tpserve's CUDA_VISIBLE_DEVICES).
    #[arg(long)]
    pub cpus: Option<String>,
    /// Data parallelism: replicas of the model, each --tp-size ranks on its own share of
    /// the cores (--cpus), behind one HTTP front end (in-process; not under mpirun).
    #[arg(long, default_value_t = 1, alias = "data-parallel-size")]
    pub dp_size: usize,
    /// How requests are spread over the replicas: round_robin, shortest_queue, or
    /// cache_aware (where the longest prefix of the prompt went, unless loads differ too much).
    #[arg(long, default_value = "round_robin")]
    pub load_balance_method: String,
    /// HTTP connections open at once; one more is answered 503 (default: 1024, or fewer
    /// when the open-file limit allows fewer).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a request may take from arrival to its last token, queueing included,
    /// before it is ended with a 504 (0: no limit; 600 is the openai client's own timeout).
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    init_logging(&args.log_level)?;
    check_numbers(&args)?;
    let policy = SchedulePolicy::parse(&args.schedule_policy)?;
    let max_connections = server::connection_limit(args.max_connections)?;
    let load_balance = LoadBalance::parse(&args.load_balance_method)?;
    let dp = args.dp_size;
    let cpus = args.cpus.as_deref().map(parse_cpu_list).transpose()?;
    let pipeline = args.pipeline.options();
    let launch = Launch::resolve(args.comm.as_deref(), args.tp, pipeline.stages)?;
    let tp = launch.tp();
    args.sglang.check(&args.model_path)?;
    let mut files = loader::open_model(&args.model_path)?;
    if let Some(path) = &args.sglang.tokenizer_path {
        files.tokenizer = Some(loader::open_tokenizer(path)?);
    }
    let cfg = files.config.clone();
    validate_layout(&cfg, tp, &pipeline)?;
    let tokenizer = Tokenizer::new(files.tokenizer.as_ref().ok_or_else(|| {
        anyhow!(
            "{} has no tokenizer; the server needs one",
            args.model_path.display()
        )
    })?)?;
    let chat_template = load_chat_template(&args, &files)?;
    let context_length = context_length(&args, &cfg)?;
    let kv = kv_capacity(&args, context_length)?;
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model_path
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });

    let (handles, channels): (Vec<_>, Vec<_>) = (0..dp)
        .map(|_| {
            let (commands, channel) = mpsc::channel();
            (
                EngineHandle::new(commands, Arc::new(Stats::default())),
                channel,
            )
        })
        .unzip();
    let engines = Arc::new(Replicas::new(handles, load_balance));
    let progress = Arc::new(AtomicUsize::new(0));
    let opts = GroupOptions {
        tp,
        pipeline,
        threads_per_rank: args.threads_per_rank,
        kv,
        block_size: DEFAULT_BLOCK_SIZE,
        cpus,
        progress: Some(progress.clone()),
        forward: args.forward.options(),
    };
    if !launch.is_leader() {
        // Ranks 1.. of an MPI world: their shard and the worker loop; rank 0 serves.
        let ModelFiles {
            tensors, config, ..
        } = files;
        engine::run_group(launch, tensors.as_ref(), &config, &opts, |_| Ok(()))?;
        return Ok(());
    }
    let sched = SchedulerConfig {
        max_running_requests: args.max_running_requests,
        chunked_prefill_size: args.chunked_prefill_size,
        prefix_cache: !args.disable_radix_cache,
        policy,
        request_timeout: (args.request_timeout > 0)
            .then(|| Duration::from_secs(args.request_timeout)),
    };
    let mut stop_ids = cfg.eos_token_ids.clone();
    stop_ids.extend(tokenizer.end_of_turn_ids());
    let mut server_args = reported_args(&args, &model_name, &opts, context_length);
    server_args["max_connections"] = json!(max_connections);
    let grammars = grammars(&tokenizer, cfg.vocab_size, &stop_ids);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let address = format!("{}:{}", args.host, args.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&address))
        .with_context(|| {
            format!("cannot listen on {address}: is another server using the port? (--port)")
        })?;

    // The engine: per replica, tp ranks as threads; rank 0 runs the scheduler until shutdown.
    let (ready_tx, ready_rx) = mpsc::channel::<usize>();
    let replicas = engines.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let engine_thread = std::thread::Builder::new()
        .name("tpserve-engine".into())
        .spawn(move || {
            let ModelFiles {
                tensors, config, ..
            } = files;
            let src = tensors.as_ref();
            let result = run_replicas(
                launch, src, &config, &opts, &sched, &replicas, channels, ready_tx,
            );
            let _ = done_tx.send(result);
        })?;
    let loading = show_loading(&progress, cfg.num_layers * tp * dp, dp, &ready_rx);
    let Some(max_total_tokens) = loading else {
        let _ = engine_thread.join();
        let result = runtime
            .block_on(done_rx)
            .unwrap_or_else(|_| Err(anyhow!("the engine stopped")));
        return result.context("the model could not be loaded");
    };
    server_args["max_total_tokens"] = json!(max_total_tokens);
    let state = Arc::new(AppState {
        engine: engines.clone(),
        grammars,
        tokenizer,
        chat_template,
        model_name: model_name.clone(),
        model_path: args.model_path.display().to_string(),
        context_length,
        vocab_size: cfg.vocab_size,
        api_key: args.api_key.clone(),
        enable_metrics: args.enable_metrics,
        server_args,
        stop_ids,
    });
    tracing::info!(
        "tpserve ready on http://{address} (model {model_name}, tp {tp}, pp {}, dp {dp}, {} KV tokens)",
        pipeline.stages,
        max_total_tokens
    );
    let app = server::router(state);
    let limits = server::Limits {
        max_connections,
        header_timeout: server::HEADER_TIMEOUT,
    };
    let result = runtime.block_on(async move {
        let mut done_rx = done_rx;
        // Until a signal, or until the engine ends on its own (a failure).
        let engine_failed = tokio::select! {
            _ = server::serve(listener, app, limits, shutdown_signal()) => None,
            result = &mut done_rx => Some(result),
        };
        match engine_failed {
            Some(Ok(Err(e))) => Err(e.context("the engine failed")),
            Some(_) => Err(anyhow!("the engine stopped unexpectedly")),
            None => Ok(()),
        }
    });
    tracing::info!("shutting down");
    engines.shutdown();
    let _ = engine_thread.join();
    result
}

/// The settings /get_server_info reports (SGLang's names).
fn reported_args(
    args: &ServeArgs,
    model_name: &str,
    opts: &GroupOptions,
    context_length: usize,
) -> Value {
    json!({
        "model_path": args.model_path,
        "served_model_name": model_name,
        "tp_size": opts.tp,
        "pp_size": opts.pipeline.stages,
        "pp_max_micro_batch_size": opts.pipeline.max_micro_batch,
        // Replicas split the cores (see `replicas::cores_per_replica`).
        "threads_per_rank": args.threads_per_rank.unwrap_or((opts.threads_per_rank() / args.dp_size).max(1)),
        "context_length": context_length,
        "max_running_requests": args.max_running_requests,
        "chunked_prefill_size": args.chunked_prefill_size,
        "disable_radix_cache": args.disable_radix_cache,
        "schedule_policy": args.schedule_policy,
        "host": args.host,
        "port": args.port,
        "enable_metrics": args.enable_metrics,
        "ep_size": args.forward.ep_size,
        "dp_size": args.dp_size,
        "load_balance_method": args.load_balance_method,
        "request_timeout": args.request_timeout,
    })
}

/// Flags that must be positive, or within a range.
fn check_numbers(args: &ServeArgs) -> Result<()> {
    for (value, flag) in [
        (args.max_running_requests, "--max-running-requests"),
        (args.chunked_prefill_size, "--chunked-prefill-size"),
        (args.dp_size, "--dp-size"),
        (args.threads_per_rank.unwrap_or(1), "--threads-per-rank"),
        (args.tp.unwrap_or(1), "--tp-size"),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if !(args.mem_fraction_static > 0.0 && args.mem_fraction_static <= 1.0) {
        bail!(
            "--mem-fraction-static must be in (0, 1], got {}",
            args.mem_fraction_static
        );
    }
    Ok(())
}

/// `--context-length`, at most the model's (its own by default).
fn context_length(args: &ServeArgs, cfg: &ModelConfig) -> Result<usize> {
    Ok(match args.context_length {
        None => cfg.max_position_embeddings,
        Some(n) if n > cfg.max_position_embeddings => bail!(
            "--context-length {n} is longer than the model's {}",
            cfg.max_position_embeddings
        ),
        Some(0) => bail!("--context-length must be at least 1"),
        Some(n) => n,
    })
}

/// Each replica's KV cache: `--max-total-tokens`, or its share of
/// `--mem-fraction-static`, decided by the engine once the weights are loaded.
fn kv_capacity(args: &ServeArgs, context_length: usize) -> Result<KvCapacity> {
    Ok(match args.max_total_tokens {
        Some(0) => bail!("--max-total-tokens must be at least 1"),
        Some(n) => KvCapacity::Tokens(n),
        None => KvCapacity::MemoryFraction {
            fraction: args.mem_fraction_static / args.dp_size as f64,
            at_most_tokens: args.max_running_requests.saturating_mul(context_length),
        },
    })
}

/// The grammar compiler of constrained decoding, or why this model has none.
fn grammars(
    tokenizer: &Tokenizer,
    vocab_size: usize,
    stop_ids: &[u32],
) -> Result<Grammars, String> {
    let started = std::time::Instant::now();
    let grammars = Grammars::new(tokenizer, vocab_size, stop_ids).map_err(|e| format!("{e:#}"));
    match &grammars {
        Ok(_) => tracing::info!(
            "constrained decoding ready ({:.2} s)",
            started.elapsed().as_secs_f64()
        ),
        Err(why) => tracing::warn!("constrained decoding is off for this model: {why}"),
    }
    grammars
}

fn init_logging(level: &str) -> Result<()> {
    let filter = match level {
        "error" | "warn" | "warning" | "info" | "debug" | "trace" => {
            level.replace("warning", "warn")
        }
        other => bail!("--log-level {other} is not one of error, warn, info, debug, trace"),
    };
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    Ok(())
}

fn load_chat_template(args: &ServeArgs, files: &ModelFiles) -> Result<Option<ChatTemplate>> {
    let (bos, eos) = files
        .chat_template
        .as_ref()
        .map_or((String::new(), String::new()), |t| {
            (t.bos_token.clone(), t.eos_token.clone())
        });
    match (&args.chat_template, &files.chat_template) {
        (Some(path), _) => {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the chat template {}", path.display()))?;
            Ok(Some(ChatTemplate::new(&source, &bos, &eos)?))
        }
        (None, Some(t)) => Ok(Some(ChatTemplate::new(&t.source, &bos, &eos)?)),
        (None, None) => {
            tracing::warn!("the model has no chat template: /v1/chat/completions will refuse requests (see --chat-template)");
            Ok(None)
        }
    }
}

/// A progress bar over the layers loaded by all ranks, until the engine is ready (its KV
/// capacity in tokens) or stops (`None`).
/// Shows loading progress until `replicas` engines are ready; returns the smallest KV
/// capacity among them, or `None` when one stopped first.
fn show_loading(
    progress: &AtomicUsize,
    total: usize,
    replicas: usize,
    ready: &mpsc::Receiver<usize>,
) -> Option<usize> {
    let mut capacities = Vec::with_capacity(replicas);
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {bar:40} {pos}/{len} layers ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        bar.set_position(progress.load(Ordering::Relaxed) as u64);
        match ready.recv_timeout(Duration::from_millis(100)) {
            Ok(tokens) => {
                capacities.push(tokens);
                if capacities.len() == replicas {
                    bar.finish_and_clear();
                    return capacities.into_iter().min();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bar.abandon();
                return None;
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("signal received: finishing in-flight requests");
}
