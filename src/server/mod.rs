//! The HTTP server: OpenAI-compatible and SGLang-native endpoints over the engine.
//!
//! Handlers tokenize, submit requests to the scheduler and turn its token events into text
//! (incremental detokenization, stop strings), as whole responses or server-sent events.
//! Every bad request gets an OpenAI-style JSON error with a 4xx status.

mod listen;
mod native;
mod openai;
mod structured;
mod text;
mod tools;

use crate::engine::grammar::Grammars;
use crate::engine::replicas::Replicas;
use crate::engine::scheduler::{Event, Failure, FailureKind, GenerationParams};
use crate::engine::{ChatTemplate, SamplingParams, Tokenizer};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
pub use listen::{connection_limit, serve, Limits, HEADER_TIMEOUT};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use text::TextStream;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What every handler needs.
pub struct AppState {
    /// The engine groups (one, or `--dp-size` replicas) and their router.
    pub engine: Arc<Replicas>,
    /// The grammar compiler of constrained decoding, or why this model has none.
    pub grammars: Result<Grammars, String>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// The name clients use in `model`.
    pub model_name: String,
    pub model_path: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub api_key: Option<String>,
    pub enable_metrics: bool,
    /// The server's settings, reported by /get_server_info.
    pub server_args: Value,
    /// Token ids that end a turn (eos, end-of-turn markers).
    pub stop_ids: Vec<u32>,
}

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/generate", post(native::generate))
        .route("/health", get(native::health))
        .route("/health_generate", get(native::health_generate))
        .route("/get_model_info", get(native::model_info))
        .route("/get_server_info", get(native::server_info))
        .route(
            "/flush_cache",
            post(native::flush_cache).get(native::flush_cache),
        )
        .route("/metrics", get(native::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), check_api_key))
        .layer(middleware::from_fn(contain_panics))
        .with_state(state)
}

/// A handler that panics fails its own request with a 500, and the server goes on.
async fn contain_panics(req: Request, next: Next) -> Response {
    use futures_util::FutureExt;
    let path = req.uri().path().to_owned();
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(_) => {
            tracing::error!("internal error (panic) while serving {path}");
            ApiError::with_status(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error while serving {path}; the server goes on"),
            )
            .into_response()
        }
    }
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
        }
    }

    pub fn param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }
}

impl ApiError {
    /// The OpenAI error object, `{"error": {...}}`: a response body, or a stream's last event.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        let status = match f.kind {
            FailureKind::Refused => StatusCode::BAD_REQUEST,
            FailureKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            FailureKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        };
        ApiError::with_status(status, f.message)
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::with_status(
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {}", req.method(), req.uri().path()),
    )
}

async fn check_api_key(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) && req.uri().path() != "/health" {
            return ApiError::with_status(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// A JSON body parsed by us, so that malformed or oversized bodies get our JSON errors.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than the limit of {MAX_BODY_BYTES} bytes")
        } else {
            e.body_text()
        };
        ApiError::with_status(status, message)
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh id for a response, `prefix-<random hex>`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Sampling settings common to both APIs, checked.
#[derive(Debug, Clone, Default)]
pub struct SamplingRequest {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<u64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub logprobs: Option<usize>,
}

/// The most new tokens a request may ask for when it does not say.
const DEFAULT_MAX_TOKENS: usize = 256;

impl AppState {
    /// Checks a request's settings against the model and turns them into engine params.
    pub fn generation_params(
        &self,
        prompt_len: usize,
        s: &SamplingRequest,
    ) -> Result<GenerationParams, ApiError> {
        if prompt_len == 0 {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        if prompt_len >= self.context_length {
            return Err(ApiError::bad_request(format!(
                "the prompt has {prompt_len} tokens; the context length is {}",
                self.context_length
            )));
        }
        let room = self.context_length - prompt_len;
        let max_new_tokens = match s.max_tokens {
            Some(n) if n <= 0 => {
                return Err(ApiError::param("max_tokens", format!("max_tokens must be at least 1, got {n}")))
            }
            Some(n) if n as usize > room => {
                return Err(ApiError::param(
                    "max_tokens",
                    format!(
                        "max_tokens {n} plus the prompt's {prompt_len} tokens exceed the context length of {}",
                        self.context_length
                    ),
                ))
            }
            Some(n) => n as usize,
            None => DEFAULT_MAX_TOKENS.min(room),
        };
        let top_k = match s.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::param(
                    "top_k",
                    format!("top_k must be positive or -1, got {k}"),
                ))
            }
        };
        let sampling = SamplingParams {
            temperature: s.temperature.unwrap_or(1.0) as f32,
            top_k,
            top_p: s.top_p.unwrap_or(1.0) as f32,
            min_p: s.min_p.unwrap_or(0.0) as f32,
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0) as f32,
            presence_penalty: s.presence_penalty.unwrap_or(0.0) as f32,
            seed: s.seed,
        };
        sampling
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if s.logprobs.is_some_and(|n| n > 20) {
            return Err(ApiError::param(
                "top_logprobs",
                "at most 20 top log-probabilities",
            ));
        }
        Ok(GenerationParams {
            max_new_tokens,
            sampling,
            stop_ids: if s.ignore_eos {
                vec![]
            } else {
                self.stop_ids.clone()
            },
            logprobs: s.logprobs,
            constraint: None,
        })
    }

    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

/// One choice's finished result.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub text: String,
    pub ids: Vec<u32>,
    /// `stop` (stop token or string) or `length`.
    pub finish_reason: &'static str,
    pub logprobs: Vec<(u32, crate::engine::scheduler::TokenLogprob)>,
    /// Prompt tokens the prefix cache held.
    pub cached_tokens: usize,
}

/// Runs a request to the end and collects its text.
pub async fn complete(
    state: &AppState,
    input_ids: Vec<u32>,
    params: GenerationParams,
    stop: &[String],
) -> Result<Completion, ApiError> {
    let mut events = state
        .engine
        .submit(input_ids, params)
        .map_err(|e| ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mut text = TextStream::new(&state.tokenizer, stop);
    let mut out = Completion::default();
    while let Some(event) = events.recv().await {
        match event {
            Event::Admitted { cached_tokens } => out.cached_tokens = cached_tokens,
            Event::Token { id, logprob } => {
                out.text.push_str(&text.push(id));
                out.ids.push(id);
                if let Some(lp) = logprob {
                    out.logprobs.push((id, lp));
                }
                if text.stopped() {
                    out.finish_reason = "stop";
                    return Ok(out);
                }
            }
            Event::Finished { stop } => {
                out.text.push_str(&text.finish());
                out.finish_reason = if stop { "stop" } else { "length" };
                return Ok(out);
            }
            Event::Failed(failure) => return Err(failure.into()),
        }
    }
    Err(ApiError::with_status(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine stopped before the request finished",
    ))
}
