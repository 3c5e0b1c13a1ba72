//! `tpserve bench-serving`: SGLang's bench_serving against any OpenAI-compatible server.
//! Random-token prompts (alone, in groups that share a long system prompt, or as multi-turn
//! chats), streamed completions, fixed concurrency; reports throughput, time to first
//! token, inter-token latency and the prompt tokens the server found in its prefix cache.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchServingArgs {
    #[arg(long, default_value = "http://127.0.0.1:30000")]
    pub base_url: String,
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Prompt length in tokens (random ids).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens generated per request (end-of-sequence ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Token ids of the random prompts are drawn from 1000..1000+range.
    #[arg(long, default_value_t = 8000)]
    pub id_range: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// random (independent prompts), generated-shared-prefix (groups sharing a system
    /// prompt; SGLang's) or multi-turn (chats whose every turn extends the last).
    #[arg(long, default_value = "random")]
    pub dataset: String,
    /// generated-shared-prefix: groups, each with its own system prompt.
    #[arg(long, default_value_t = 8)]
    pub gsp_num_groups: usize,
    #[arg(long, default_value_t = 8)]
    pub gsp_prompts_per_group: usize,
    /// generated-shared-prefix: tokens of each group's system prompt.
    #[arg(long, default_value_t = 1024)]
    pub gsp_system_prompt_len: usize,
    /// generated-shared-prefix: tokens of each question after the system prompt.
    #[arg(long, default_value_t = 32)]
    pub gsp_question_len: usize,
    /// multi-turn: turns per chat (--num-prompts chats; each turn adds the last reply's
    /// length of stand-in reply tokens and --input-len new tokens to the last prompt).
    #[arg(long, default_value_t = 4)]
    pub multi_turn_rounds: usize,
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// One request's timings.
struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    prompt_tokens: usize,
    output_tokens: usize,
    /// Prompt tokens the server reports it found in its prefix cache.
    cached_tokens: usize,
}

/// What the requests are: each inner list is one client's requests, sent in order.
fn workload(args: &BenchServingArgs) -> Result<Vec<Vec<Vec<u32>>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut random = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| 1000 + rng.random_range(0..args.id_range))
            .collect()
    };
    match args.dataset.as_str() {
        "random" => Ok((0..args.num_prompts)
            .map(|_| vec![random(args.input_len)])
            .collect()),
        "generated-shared-prefix" => {
            if args.gsp_num_groups == 0 || args.gsp_prompts_per_group == 0 {
                bail!("--gsp-num-groups and --gsp-prompts-per-group must be at least 1");
            }
            let mut all = Vec::new();
            for _ in 0..args.gsp_num_groups {
                let system = random(args.gsp_system_prompt_len);
                for _ in 0..args.gsp_prompts_per_group {
                    let mut p = system.clone();
                    p.extend(random(args.gsp_question_len.max(1)));
                    all.push(vec![p]);
                }
            }
            // Groups interleave, as users of several applications would.
            use rand::seq::SliceRandom;
            all.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed + 1));
            Ok(all)
        }
        "multi-turn" => {
            if args.multi_turn_rounds == 0 {
                bail!("--multi-turn-rounds must be at least 1");
            }
            Ok((0..args.num_prompts)
                .map(|_| {
                    let mut turns = vec![random(args.input_len)];
                    for _ in 1..args.multi_turn_rounds {
                        let mut next = turns.last().expect("one turn").clone();
                        next.extend(random(args.output_len));
                        next.extend(random(args.input_len));
                        turns.push(next);
                    }
                    turns
                })
                .collect())
        }
        other => {
            bail!("unknown --dataset {other:?}: random, generated-shared-prefix or multi-turn")
        }
    }
}

pub fn run(args: BenchServingArgs) -> Result<()> {
    if args.num_prompts == 0 || args.concurrency == 0 || args.input_len == 0 || args.output_len == 0
    {
        bail!("--num-prompts, --concurrency, --input-len and --output-len must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: BenchServingArgs) -> Result<()> {
    // A fresh connection per request: some servers (llama-server) close a connection after
    // a streamed reply, and a pooled one would then fail the next request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .context("cannot make an HTTP client")?;
    let base = args.base_url.trim_end_matches('/').to_owned();
    let clients = workload(&args)?;
    let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|prompts| {
            let (client, base, limit) = (client.clone(), base.clone(), limit.clone());
            let (output_len, key) = (args.output_len, args.api_key.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                for prompt in prompts {
                    let _slot = limit.acquire().await?;
                    samples.push(
                        one_request(&client, &base, prompt, output_len, key.as_deref()).await?,
                    );
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(
            t.await
                .map_err(|e| anyhow!("a request task failed: {e}"))??,
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    report(&args, &samples, elapsed)
}

async fn one_request(
    client: &reqwest::Client,
    base: &str,
    prompt: Vec<u32>,
    output_len: usize,
    key: Option<&str>,
) -> Result<Sample> {
    let prompt_tokens = prompt.len();
    let body = json!({"prompt": prompt, "max_tokens": output_len, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let mut request = client.post(format!("{base}/v1/completions")).json(&body);
    if let Some(k) = key {
        request = request.bearer_auth(k);
    }
    let sent = Instant::now();
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    if !response.status().is_success() {
        let status = response.status();
        bail!(
            "{base} answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let mut stream = response.bytes_stream();
    let (mut buffer, mut last, mut ttft, mut gaps, mut usage, mut cached_tokens) =
        (Vec::new(), None, None, Vec::new(), None, 0);
    while let Some(chunk) = stream.next().await {
        buffer.extend_from_slice(&chunk?);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(data) else {
                continue;
            };
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
            if let Some(n) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                cached_tokens = n as usize;
            }
            let has_text = v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => ttft = Some(now - sent),
                    Some(t) => gaps.push(now - t),
                }
                last = Some(now);
            }
        }
    }
    // A server that reports no usage (llama-server) streams one token per chunk.
    let output_tokens = usage.unwrap_or(gaps.len() + 1);
    Ok(Sample {
        ttft: ttft.ok_or_else(|| anyhow!("a request produced no text"))?,
        gaps,
        prompt_tokens,
        output_tokens,
        cached_tokens,
    })
}

fn report(args: &BenchServingArgs, samples: &[Sample], elapsed: f64) -> Result<()> {
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
    let mut itl: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.gaps.iter().map(|g| g.as_secs_f64() * 1e3))
        .collect();
    let output: usize = samples.iter().map(|s| s.output_tokens).sum();
    let prompt: usize = samples.iter().map(|s| s.prompt_tokens).sum();
    let cached: usize = samples.iter().map(|s| s.cached_tokens).sum();
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        };
        json!({"mean": mean, "p50": pick(0.5), "p99": pick(0.99)})
    };
    let result = json!({
        "dataset": args.dataset,
        "requests": samples.len(),
        "num_prompts": args.num_prompts,
        "concurrency": args.concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "duration_s": elapsed,
        "request_throughput": samples.len() as f64 / elapsed,
        "output_tokens_per_s": output as f64 / elapsed,
        "total_tokens_per_s": (output + prompt) as f64 / elapsed,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_fraction": if prompt > 0 { cached as f64 / prompt as f64 } else { 0.0 },
        "ttft_ms": stats(&mut ttft),
        "itl_ms": stats(&mut itl),
    });
    if args.json {
        println!("{result}");
        return Ok(());
    }
    let ms = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    println!(
        "{} requests ({}) at concurrency {}, {} prompt tokens ({} cached), {} out each, {:.2} s",
        samples.len(),
        args.dataset,
        args.concurrency,
        prompt,
        cached,
        args.output_len,
        elapsed
    );
    println!(
        "request throughput   {:>10.2} req/s",
        ms(&result, "request_throughput")
    );
    println!(
        "output tokens        {:>10.1} tok/s",
        ms(&result, "output_tokens_per_s")
    );
    println!(
        "total tokens         {:>10.1} tok/s",
        ms(&result, "total_tokens_per_s")
    );
    for (name, key) in [
        ("time to first token", "ttft_ms"),
        ("inter-token latency", "itl_ms"),
    ] {
        let v = &result[key];
        println!(
            "{name:<20} mean {:>8.2} ms   p50 {:>8.2} ms   p99 {:>8.2} ms",
            ms(v, "mean"),
            ms(v, "p50"),
            ms(v, "p99")
        );
    }
    Ok(())
}
