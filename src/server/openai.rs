//! OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

use super::structured::{self, ConstraintFields};
use super::text::TextStream;
use super::tools::{self, CallStream, ToolFormat, Tools};
use super::{
    complete, new_id, parse_body, unix_time, ApiError, Completion, SamplingRequest, Shared,
};
use crate::engine::grammar::Constraint;
use crate::engine::scheduler::{Event, GenerationParams, TokenLogprob};
use crate::engine::ChatMessage;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Fields both endpoints share.
#[derive(Deserialize, Default)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<StopField>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
    response_format: Option<Value>,
    /// SGLang's extra fields: the output matches this regex, or this EBNF grammar.
    regex: Option<String>,
    ebnf: Option<String>,
}

impl Common {
    /// The grammar the output must follow, compiled (None: free text).
    async fn constraint(&self, state: &Shared) -> Result<Option<Constraint>, ApiError> {
        let fields = ConstraintFields {
            response_format: self.response_format.as_ref(),
            regex: self.regex.as_deref(),
            ebnf: self.ebnf.as_deref(),
            ..Default::default()
        };
        match fields.spec()? {
            Some(spec) => Ok(Some(structured::compile(state, spec).await?)),
            None => Ok(None),
        }
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Option<Vec<RawMessage>>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    max_completion_tokens: Option<i64>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
}

/// The roles of OpenAI's chat messages.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

impl RawMessage {
    /// The message as a template sees it, after OpenAI's rules: a known role; content a
    /// string or a list of text parts, null only for an assistant message with tool calls;
    /// a `tool_call_id` on tool messages.
    fn into_chat(self, i: usize) -> Result<ChatMessage, ApiError> {
        let bad = |what: String| ApiError::param("messages", format!("messages[{i}]: {what}"));
        if !ROLES.contains(&self.role.as_str()) {
            return Err(bad(format!(
                "role `{}` is not one of {}",
                self.role,
                ROLES.join(", ")
            )));
        }
        if self.role == "tool" && self.tool_call_id.is_none() {
            return Err(bad("a tool message needs `tool_call_id`".into()));
        }
        let content = match self.content {
            None if self.role == "assistant" && self.tool_calls.is_some() => String::new(),
            None => {
                return Err(bad(
                    "`content` must be a string or a list of content parts".into()
                ))
            }
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    (kind, _) => Err(bad(format!(
                        "content parts of type `{kind}` are not supported; send text"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
        };
        let tool_calls = self.tool_calls.map(|calls| {
            // Templates read arguments as an object; OpenAI sends them as JSON text.
            let calls = calls.into_iter().map(|mut c| {
                let args = &mut c["function"]["arguments"];
                if let Some(parsed) = args.as_str().and_then(|a| serde_json::from_str(a).ok()) {
                    *args = parsed;
                }
                c
            });
            Value::Array(calls.collect())
        });
        Ok(ChatMessage {
            role: self.role,
            content,
            tool_calls,
            tool_call_id: self.tool_call_id,
        })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Option<Prompt>,
    logprobs: Option<usize>,
    echo: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

/// Which API a request came through: decides the response shapes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

/// A request ready for the engine.
struct Prepared {
    /// Function calling: the reply is parsed into `tool_calls`.
    tools: Option<Tools>,
    input_ids: Vec<u32>,
    params: GenerationParams,
    stop: Vec<String>,
    n: usize,
    stream: bool,
    include_usage: bool,
}

fn prepare(
    state: &Shared,
    common: &Common,
    input_ids: Vec<u32>,
    max_tokens: Option<i64>,
    logprobs: Option<usize>,
) -> Result<Prepared, ApiError> {
    if let Some(model) = &common.model {
        if model != &state.model_name && model != &state.model_path {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "model `{model}` does not exist; this server serves `{}`",
                    state.model_name
                ),
                param: Some("model"),
            });
        }
    }
    let n = match common.n {
        None => 1,
        Some(n) if (1..=16).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::param(
                "n",
                format!("n must be between 1 and 16, got {n}"),
            ))
        }
    };
    let stop = match &common.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > 16 {
        return Err(ApiError::param("stop", "at most 16 stop strings"));
    }
    let sampling = SamplingRequest {
        max_tokens,
        temperature: common.temperature,
        top_p: common.top_p,
        top_k: common.top_k,
        min_p: common.min_p,
        seed: common.seed,
        frequency_penalty: common.frequency_penalty,
        presence_penalty: common.presence_penalty,
        stop: stop.clone(),
        ignore_eos: common.ignore_eos.unwrap_or(false),
        logprobs,
    };
    let params = state.generation_params(input_ids.len(), &sampling)?;
    Ok(Prepared {
        tools: None,
        input_ids,
        params,
        stop,
        n,
        stream: common.stream.unwrap_or(false),
        include_usage: common
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

pub async fn chat_completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(body)?;
    let Some(raw) = req.messages else {
        return Err(ApiError::param("messages", "`messages` is required"));
    };
    if raw.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    let messages = raw
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.into_chat(i))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let template = state.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; start the server with --chat-template FILE, or use /v1/completions")
    })?;
    let tools = tools::parse(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        ToolFormat::of(template),
    )?;
    let (messages, pass_tools) = match &tools {
        Some(t) => t.messages_for(template, messages),
        None => (tools::history_as_text(template, messages), false),
    };
    let prompt = template
        .render_with_tools(
            &messages,
            tools.as_ref().filter(|_| pass_tools).map(|t| &t.specs[..]),
            true,
        )
        .map_err(|e| ApiError::param("messages", format!("{e:#}")))?;
    let ids = state
        .tokenizer
        .encode_chat(&prompt)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let logprobs = req
        .logprobs
        .unwrap_or(false)
        .then(|| req.top_logprobs.unwrap_or(0));
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let mut prepared = prepare(&state, &req.common, ids, max_tokens, logprobs)?;
    prepared.params.constraint = req.common.constraint(&state).await?;
    if let Some(t) = &tools {
        // Compiled in any case: a parameters schema that cannot be used is refused.
        let calls = structured::compile(&state, t.grammar())
            .await
            .map_err(|e| ApiError::param("tools", e.message))?;
        if t.enforced() {
            if prepared.params.constraint.is_some() {
                return Err(ApiError::param(
                    "tool_choice",
                    "a required or named tool_choice cannot be combined with response_format, regex or ebnf",
                ));
            }
            prepared.params.constraint = Some(calls);
        }
    }
    prepared.tools = tools;
    respond(state, prepared, Api::Chat, false).await
}

/// The assistant message of a finished chat choice, and its finish reason: with tools, the
/// calls the reply makes go into `tool_calls`.
fn chat_message(tools: Option<&Tools>, c: &Completion) -> (Value, &'static str) {
    if let Some(t) = tools {
        let (content, calls) = t.parse_reply(&c.text);
        if !calls.is_empty() {
            let message = json!({"role": "assistant", "content": content,
                "tool_calls": tools::tool_calls_json(&calls)});
            return (message, "tool_calls");
        }
    }
    (
        json!({"role": "assistant", "content": c.text}),
        c.finish_reason,
    )
}

pub async fn completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    let ids = match req.prompt {
        None => return Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Prompt::Text(t)) => state.tokenizer.encode(&t),
        Some(Prompt::Texts(v)) if v.len() == 1 => state.tokenizer.encode(&v[0]),
        Some(Prompt::Texts(_)) => {
            return Err(ApiError::param(
                "prompt",
                "send one prompt per request (or use n for several completions)",
            ))
        }
        Some(Prompt::Ids(ids)) => {
            let vocab = state.vocab_size;
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(ApiError::param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            Ok(ids)
        }
    }
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut prepared = prepare(
        &state,
        &req.common,
        ids,
        req.common.max_tokens,
        req.logprobs,
    )?;
    prepared.params.constraint = req.common.constraint(&state).await?;
    respond(state, prepared, Api::Completion, req.echo.unwrap_or(false)).await
}

pub async fn models(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": unix_time(),
            "owned_by": "tpserve",
            "root": state.model_path,
            "max_model_len": state.context_length,
        }],
    }))
}

async fn respond(state: Shared, p: Prepared, api: Api, echo: bool) -> Result<Response, ApiError> {
    let id = new_id(if api == Api::Chat { "chatcmpl" } else { "cmpl" });
    if p.stream {
        return Ok(stream(state, p, api, id).into_response());
    }
    let choices = (0..p.n).map(|i| {
        let mut params = p.params.clone();
        params.sampling.seed = params.sampling.seed.map(|s| s + i as u64);
        complete(&state, p.input_ids.clone(), params, &p.stop)
    });
    let results: Vec<Completion> = futures_util::future::try_join_all(choices).await?;
    let completion_tokens: usize = results.iter().map(|c| c.ids.len()).sum();
    let cached_tokens = results.iter().map(|c| c.cached_tokens).max().unwrap_or(0);
    let prompt_text = if echo {
        state
            .tokenizer
            .decode(&p.input_ids, true)
            .unwrap_or_default()
    } else {
        String::new()
    };
    let choices: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(i, c)| match api {
            Api::Chat => {
                let (message, finish_reason) = chat_message(p.tools.as_ref(), c);
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": p.params.logprobs.map(|_| chat_logprobs(&state, &c.logprobs)),
                    "finish_reason": finish_reason,
                })
            }
            Api::Completion => json!({
                "index": i,
                "text": format!("{prompt_text}{}", c.text),
                "logprobs": p.params.logprobs.map(|_| completion_logprobs(&state, &c.logprobs)),
                "finish_reason": c.finish_reason,
            }),
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": if api == Api::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_time(),
        "model": state.model_name,
        "choices": choices,
        "usage": usage(p.input_ids.len(), completion_tokens, cached_tokens),
    }))
    .into_response())
}

/// OpenAI's usage object; `cached` prompt tokens came from the prefix cache.
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

fn chat_logprobs(state: &Shared, lps: &[(u32, TokenLogprob)]) -> Value {
    let entry = |id: u32, lp: f32| {
        let token = state.token_text(id);
        json!({"token": token, "logprob": lp, "bytes": token.as_bytes()})
    };
    json!({"content": lps.iter().map(|(id, lp)| {
        let mut e = entry(*id, lp.logprob);
        e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
        e
    }).collect::<Vec<_>>()})
}

fn completion_logprobs(state: &Shared, lps: &[(u32, TokenLogprob)]) -> Value {
    let mut offset = 0;
    let mut offsets = vec![];
    let tokens: Vec<String> = lps
        .iter()
        .map(|(id, _)| {
            let t = state.token_text(*id);
            offsets.push(offset);
            offset += t.len();
            t
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": lps.iter().map(|(_, lp)| lp.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|(_, lp)| {
            lp.top.iter().map(|&(t, l)| (state.token_text(t), json!(l))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Server-sent events: one chunk per piece of text per choice, a final chunk per choice with
/// its finish reason, optionally a usage chunk, then `[DONE]`.
fn stream(
    state: Shared,
    p: Prepared,
    api: Api,
    id: String,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let created = unix_time();
    let chunk = {
        let (id, model) = (id.clone(), state.model_name.clone());
        move |index: usize,
              text: Option<&str>,
              first: bool,
              logprobs: Option<Value>,
              finish: Option<&str>,
              tool_calls: Option<Value>| {
            let choice = match api {
                Api::Chat => {
                    let mut delta = json!({});
                    if first {
                        delta["role"] = json!("assistant");
                    }
                    if let Some(t) = text {
                        delta["content"] = json!(t);
                    }
                    if let Some(calls) = tool_calls {
                        delta["tool_calls"] = calls;
                    }
                    json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
                }
                Api::Completion => json!({
                    "index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
                }),
            };
            let object = if api == Api::Chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]}).to_string()
        }
    };
    let chunk = std::sync::Arc::new(chunk);
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for index in 0..p.n {
            let (state, tx, chunk) = (state.clone(), tx.clone(), chunk.clone());
            let mut params = p.params.clone();
            params.sampling.seed = params.sampling.seed.map(|s| s + index as u64);
            let (ids, stop, tools) = (p.input_ids.clone(), p.stop.clone(), p.tools.clone());
            tasks.push(tokio::spawn(async move {
                let mut calls = tools.as_ref().map(CallStream::new);
                let mut events = match state.engine.submit(ids, params) {
                    Ok(e) => e,
                    Err(e) => {
                        let e =
                            ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                        let _ = tx.send(e.body().to_string()).await;
                        return (0, 0);
                    }
                };
                let mut text = TextStream::new(&state.tokenizer, &stop);
                let (mut count, mut cached, mut first) = (0, 0, true);
                while let Some(event) = events.recv().await {
                    let (piece, lp, finish) = match event {
                        Event::Admitted { cached_tokens } => {
                            cached = cached_tokens;
                            continue;
                        }
                        Event::Token { id, logprob } => {
                            count += 1;
                            let piece = text.push(id);
                            let lp = logprob.map(|lp| match api {
                                Api::Chat => chat_logprobs(&state, &[(id, lp)]),
                                Api::Completion => completion_logprobs(&state, &[(id, lp)]),
                            });
                            (piece, lp, text.stopped().then_some("stop"))
                        }
                        Event::Finished { stop } => (
                            text.finish(),
                            None,
                            Some(if stop { "stop" } else { "length" }),
                        ),
                        Event::Failed(failure) => {
                            let _ = tx.send(ApiError::from(failure).body().to_string()).await;
                            return (count, cached);
                        }
                    };
                    let (mut piece, mut finish) = match calls.as_mut() {
                        Some(c) => (c.push(&piece), finish),
                        None => (piece, finish),
                    };
                    let mut found = None;
                    if let (Some(_), Some(c)) = (finish, calls.take_if(|_| finish.is_some())) {
                        let (rest, made) = c.finish();
                        piece.push_str(&rest);
                        if !made.is_empty() {
                            found = Some(tools::tool_calls_json(&made));
                            finish = Some("tool_calls");
                        }
                    }
                    if !piece.is_empty() || lp.is_some() || first || found.is_some() {
                        let body = chunk(
                            index,
                            (!piece.is_empty()).then_some(piece.as_str()),
                            first,
                            lp,
                            None,
                            found,
                        );
                        first = false;
                        if tx.send(body).await.is_err() {
                            return (count, cached); // the client left: dropping `events` cancels
                        }
                    }
                    if finish.is_some() {
                        let _ = tx.send(chunk(index, None, false, None, finish, None)).await;
                        return (count, cached);
                    }
                }
                (count, cached)
            }));
        }
        let (mut completion_tokens, mut cached_tokens) = (0, 0);
        for t in tasks {
            match t.await {
                Ok((n, cached)) => {
                    completion_tokens += n;
                    cached_tokens = cached_tokens.max(cached);
                }
                Err(_) => {
                    let e = ApiError::with_status(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal error while streaming this reply",
                    );
                    let _ = tx.send(e.body().to_string()).await;
                }
            }
        }
        if p.include_usage {
            let obj = if api == Api::Chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let body = json!({"id": id, "object": obj, "created": created, "model": state.model_name,
                "choices": [], "usage": usage(p.input_ids.len(), completion_tokens, cached_tokens)});
            let _ = tx.send(body.to_string()).await;
        }
        let _ = tx.send("[DONE]".to_owned()).await;
    });
    Sse::new(ReceiverStream::new(rx).map(|data| Ok(SseEvent::default().data(data))))
}
