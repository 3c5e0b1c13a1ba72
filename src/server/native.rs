//! SGLang-native endpoints: /generate, /health, /health_generate, /get_model_info,
//! /get_server_info, /flush_cache, and Prometheus /metrics.

use super::structured::{self, ConstraintFields};
use super::text::TextStream;
use super::{complete, new_id, parse_body, ApiError, SamplingRequest, Shared};
use crate::engine::scheduler::{Event, FlushOutcome, Histogram, Stats};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

#[derive(Deserialize)]
struct GenerateRequest {
    text: Option<String>,
    input_ids: Option<Vec<u32>>,
    #[serde(default)]
    sampling_params: NativeSampling,
    stream: Option<bool>,
    return_logprob: Option<bool>,
}

#[derive(Deserialize, Default)]
struct NativeSampling {
    max_new_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<u64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    stop: Option<StopField>,
    ignore_eos: Option<bool>,
    /// A JSON schema (an object, or a string holding one), a regex or an EBNF grammar the
    /// output must follow (SGLang's structured outputs).
    json_schema: Option<Value>,
    regex: Option<String>,
    ebnf: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

pub async fn generate(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: GenerateRequest = parse_body(body)?;
    let ids = match (req.text, req.input_ids) {
        (Some(text), None) => state
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        (None, Some(ids)) => {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= state.vocab_size) {
                return Err(ApiError::param(
                    "input_ids",
                    format!(
                        "token id {bad} is outside the vocabulary of {}",
                        state.vocab_size
                    ),
                ));
            }
            ids
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `text` and `input_ids`",
            ))
        }
    };
    let s = req.sampling_params;
    let stop = match s.stop {
        None => vec![],
        Some(StopField::One(x)) => vec![x],
        Some(StopField::Many(v)) => v,
    };
    let sampling = SamplingRequest {
        max_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        seed: s.seed,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        stop: stop.clone(),
        ignore_eos: s.ignore_eos.unwrap_or(false),
        logprobs: req.return_logprob.unwrap_or(false).then_some(0),
    };
    let mut params = state.generation_params(ids.len(), &sampling)?;
    let fields = ConstraintFields {
        json_schema: s.json_schema.as_ref(),
        regex: s.regex.as_deref(),
        ebnf: s.ebnf.as_deref(),
        ..Default::default()
    };
    if let Some(spec) = fields.spec()? {
        params.constraint = Some(structured::compile(&state, spec).await?);
    }
    let id = new_id("gen");
    let prompt_tokens = ids.len();
    let meta = move |id: &str, completion: usize, cached: usize, finish: Option<&str>| {
        json!({
            "id": id,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "finish_reason": finish.map(|f| json!({"type": f})),
        })
    };
    if !req.stream.unwrap_or(false) {
        let c = complete(&state, ids, params, &stop).await?;
        let mut body = json!({
            "text": c.text,
            "output_ids": c.ids,
            "meta_info": meta(&id, c.ids.len(), c.cached_tokens, Some(c.finish_reason)),
        });
        if sampling.logprobs.is_some() {
            body["meta_info"]["output_token_logprobs"] = c
                .logprobs
                .iter()
                .map(|(t, lp)| json!([lp.logprob, t]))
                .collect();
        }
        return Ok(Json(body).into_response());
    }
    let mut events = state.engine.submit(ids, params).map_err(|e| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: e.to_string(),
        param: None,
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let mut text = TextStream::new(&state.tokenizer, &stop);
        let (mut all, mut out_ids, mut cached) = (String::new(), Vec::new(), 0);
        while let Some(event) = events.recv().await {
            let finish = match event {
                Event::Admitted { cached_tokens } => {
                    cached = cached_tokens;
                    continue;
                }
                Event::Token { id: tok, .. } => {
                    out_ids.push(tok);
                    all.push_str(&text.push(tok));
                    text.stopped().then_some("stop")
                }
                Event::Finished { stop } => {
                    all.push_str(&text.finish());
                    Some(if stop { "stop" } else { "length" })
                }
                Event::Failed(failure) => {
                    let _ = tx.send(ApiError::from(failure).body().to_string()).await;
                    break;
                }
            };
            let body = json!({"text": all, "output_ids": out_ids, "meta_info": meta(&id, out_ids.len(), cached, finish)});
            if tx.send(body.to_string()).await.is_err() || finish.is_some() {
                break;
            }
        }
        let _ = tx.send("[DONE]".to_owned()).await;
    });
    let stream = ReceiverStream::new(rx).map(|d| Ok::<_, Infallible>(SseEvent::default().data(d)));
    Ok(Sse::new(stream).into_response())
}

pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// Healthy only if the engine generates a token.
pub async fn health_generate(State(state): State<Shared>) -> Result<StatusCode, ApiError> {
    let sampling = SamplingRequest {
        max_tokens: Some(1),
        ignore_eos: true,
        ..Default::default()
    };
    let params = state.generation_params(1, &sampling)?;
    complete(&state, vec![0], params, &[]).await?;
    Ok(StatusCode::OK)
}

pub async fn model_info(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "model_path": state.model_path,
        "tokenizer_path": state.model_path,
        "served_model_name": state.model_name,
        "is_generation": true,
    }))
}

pub async fn server_info(State(state): State<Shared>) -> Json<Value> {
    let s = &Stats::sum(state.engine.stats());
    let (used, total, bs) = (
        s.used_blocks.load(Ordering::Relaxed),
        s.total_blocks.load(Ordering::Relaxed),
        s.block_size.load(Ordering::Relaxed),
    );
    let mut info = state.server_args.clone();
    let cached = s.cached_blocks.load(Ordering::Relaxed);
    info["kv_cache"] = json!({
        "block_size": bs,
        "total_blocks": total,
        "used_blocks": used,
        "cached_blocks": cached,
        "total_tokens": total * bs,
        "used_tokens": used * bs,
        "cached_tokens": cached * bs,
    });
    let (prompt, hits) = (
        s.prompt_tokens_total.load(Ordering::Relaxed),
        s.cached_tokens_total.load(Ordering::Relaxed),
    );
    info["prefix_cache"] = json!({
        "prompt_tokens_total": prompt,
        "cached_tokens_total": hits,
        "hit_rate": hit_rate(prompt, hits),
    });
    info["running_requests"] = json!(s.running.load(Ordering::Relaxed));
    info["waiting_requests"] = json!(s.waiting.load(Ordering::Relaxed));
    // Data parallelism: the figures above are the replicas' sums; each one's own here.
    let replica = |s: &Stats| {
        json!({
            "requests_total": s.requests_total.load(Ordering::Relaxed),
            "running_requests": s.running.load(Ordering::Relaxed),
            "waiting_requests": s.waiting.load(Ordering::Relaxed),
            "cached_tokens_total": s.cached_tokens_total.load(Ordering::Relaxed),
            "total_blocks": s.total_blocks.load(Ordering::Relaxed),
            "used_blocks": s.used_blocks.load(Ordering::Relaxed),
        })
    };
    info["replicas"] = state.engine.stats().map(replica).collect();
    Json(info)
}

/// Empties the prefix cache; refused (400) while requests run or wait, as SGLang does.
pub async fn flush_cache(State(state): State<Shared>) -> Result<String, ApiError> {
    let outcome = state
        .engine
        .flush_cache()
        .await
        .map_err(|e| ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    match outcome {
        FlushOutcome::Flushed { blocks } => {
            Ok(format!("Cache flushed ({blocks} KV blocks freed).\n"))
        }
        FlushOutcome::NoCache => {
            Ok("Cache flushed (the prefix cache is off: --disable-radix-cache).\n".into())
        }
        FlushOutcome::Busy { running, waiting } => Err(ApiError::bad_request(format!(
            "the cache is not flushed while requests are in flight ({running} running, \
             {waiting} waiting); flush when the server is idle"
        ))),
    }
}

pub async fn metrics(State(state): State<Shared>) -> Response {
    if !state.enable_metrics {
        return ApiError {
            status: StatusCode::NOT_FOUND,
            message: "metrics are off: start the server with --enable-metrics".into(),
            param: None,
        }
        .into_response();
    }
    let s = &Stats::sum(state.engine.stats());
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP tpserve_{name} {help}\n# TYPE tpserve_{name} {kind}\ntpserve_{name} {value}"
        );
    };
    let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
    let (used, total) = (load(&s.used_blocks), load(&s.total_blocks));
    metric(
        "requests_total",
        "counter",
        "Requests received.",
        s.requests_total.load(Ordering::Relaxed) as f64,
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens received (cached ones included).",
        s.prompt_tokens_total.load(Ordering::Relaxed) as f64,
    );
    let (prompt, hits) = (
        s.prompt_tokens_total.load(Ordering::Relaxed),
        s.cached_tokens_total.load(Ordering::Relaxed),
    );
    metric(
        "cached_tokens_total",
        "counter",
        "Prompt tokens found in the prefix cache (not prefilled again).",
        hits as f64,
    );
    metric(
        "cache_hit_rate",
        "gauge",
        "Fraction of prompt tokens found in the prefix cache, since the start.",
        hit_rate(prompt, hits),
    );
    metric(
        "generation_tokens_total",
        "counter",
        "Tokens generated.",
        s.generation_tokens_total.load(Ordering::Relaxed) as f64,
    );
    metric(
        "num_running_reqs",
        "gauge",
        "Requests in the running batch.",
        load(&s.running),
    );
    metric(
        "num_queue_reqs",
        "gauge",
        "Requests waiting for admission.",
        load(&s.waiting),
    );
    metric(
        "kv_used_blocks",
        "gauge",
        "KV cache blocks in use (by requests or the prefix cache).",
        used,
    );
    metric(
        "kv_cached_blocks",
        "gauge",
        "KV cache blocks the prefix cache holds.",
        load(&s.cached_blocks),
    );
    metric("kv_total_blocks", "gauge", "KV cache blocks in all.", total);
    metric(
        "token_usage",
        "gauge",
        "Fraction of the KV cache in use.",
        if total > 0.0 { used / total } else { 0.0 },
    );
    let hist = |out: &mut String, name: &str, help: &str, h: &Histogram| {
        let _ = writeln!(
            out,
            "# HELP tpserve_{name} {help}\n# TYPE tpserve_{name} histogram"
        );
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            let _ = writeln!(out, "tpserve_{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "tpserve_{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(
            out,
            "tpserve_{name}_sum {}\ntpserve_{name}_count {}",
            h.sum, h.count
        );
    };
    let lock =
        |m: &std::sync::Mutex<Histogram>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
    hist(
        &mut out,
        "time_to_first_token_seconds",
        "Time from admission to the first token.",
        &lock(&s.time_to_first_token),
    );
    hist(
        &mut out,
        "inter_token_latency_seconds",
        "Time between a request's tokens.",
        &lock(&s.inter_token_latency),
    );
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// Cached prompt tokens over all prompt tokens (0 before any request).
fn hit_rate(prompt: u64, cached: u64) -> f64 {
    if prompt == 0 {
        0.0
    } else {
        cached as f64 / prompt as f64
    }
}
