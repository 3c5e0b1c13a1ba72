//! Fuzzing every HTTP endpoint's request parsing: the real router, tokenizer and chat
//! template of SmolLM2 over loopback, with a stand-in engine that answers every admitted
//! request with a few random token ids (so detokenization meets arbitrary ids too). Bodies
//! are random JSON built from the APIs' own field names, mutated valid requests, and raw
//! bytes. Every answer must be a success or a 4xx with an OpenAI-style error (never a 500,
//! a hang or a dead server).
//!
//! CI runs a short pass; `PROPTEST_CASES=1000000 cargo test --release --test fuzz_http`
//! runs a million inputs (each endpoint gets every input).

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};
use std::sync::{mpsc, Arc};
use tpserve::engine::grammar::Grammars;
use tpserve::engine::replicas::{LoadBalance, Replicas};
use tpserve::engine::scheduler::{Command, EngineHandle, Event, FlushOutcome, Stats};
use tpserve::engine::{ChatTemplate, Tokenizer};
use tpserve::loader;
use tpserve::server::{router, AppState};

const ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/generate"];

const KEYS: &[&str] = &[
    "messages",
    "prompt",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "include_usage",
    "logprobs",
    "top_logprobs",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "ignore_eos",
    "text",
    "input_ids",
    "sampling_params",
    "max_new_tokens",
    "return_logprob",
    "role",
    "content",
    "tool_calls",
    "tool_call_id",
    "name",
    "type",
    "response_format",
    "json_schema",
    "schema",
    "regex",
    "ebnf",
    "properties",
    "items",
    "required",
    "enum",
    "anyOf",
    "tools",
    "tool_choice",
    "function",
    "parameters",
];

/// A stand-in scheduler: every request is admitted and gets up to three random tokens.
fn fake_engine(vocab: u32) -> EngineHandle {
    let (tx, rx) = mpsc::channel::<Command>();
    std::thread::spawn(move || {
        let mut seed = 0x9e37_79b9u32;
        for command in rx {
            match command {
                Command::Submit(r) => {
                    let _ = r.events.send(Event::Admitted { cached_tokens: 0 });
                    for _ in 0..r.params.max_new_tokens.min(3) {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        let _ = r.events.send(Event::Token {
                            id: seed % vocab,
                            logprob: None,
                        });
                    }
                    let _ = r.events.send(Event::Finished { stop: false });
                }
                Command::FlushCache(reply) => {
                    let _ = reply.send(FlushOutcome::Flushed { blocks: 0 });
                }
                Command::Shutdown => return,
            }
        }
    });
    EngineHandle::new(tx, Arc::new(Stats::default()))
}

/// The real server over loopback, with the stand-in engine; returns its base URL.
fn start(runtime: &tokio::runtime::Runtime) -> String {
    let files = loader::open_model(&common::smollm2()).unwrap();
    let tokenizer = Tokenizer::new(files.tokenizer.as_ref().unwrap()).unwrap();
    let spec = files.chat_template.as_ref().unwrap();
    let template = ChatTemplate::new(&spec.source, &spec.bos_token, &spec.eos_token).unwrap();
    let stop_ids = tokenizer.end_of_turn_ids();
    let grammars = Grammars::new(&tokenizer, files.config.vocab_size, &stop_ids);
    let state = Arc::new(AppState {
        engine: Arc::new(Replicas::new(
            vec![fake_engine(files.config.vocab_size as u32)],
            LoadBalance::RoundRobin,
        )),
        grammars: grammars.map_err(|e| e.to_string()),
        stop_ids,
        tokenizer,
        chat_template: Some(template),
        model_name: "fuzz".into(),
        model_path: "fuzz".into(),
        context_length: 2048,
        vocab_size: files.config.vocab_size,
        api_key: None,
        enable_metrics: true,
        server_args: json!({}),
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move { axum::serve(listener, router(state)).await });
    base
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-3i64..300).prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        (-2.0f64..3.0).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "tool",
            "developer",
            "<|im_start|>",
            "<|im_end|>",
            "json_object",
            "\u{fffd}",
            "",
        ])
        .prop_map(Value::from),
    ]
}

/// JSON whose object keys are mostly the APIs' own.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec(
                (
                    prop_oneof![
                        4 => prop::sample::select(KEYS).prop_map(str::to_owned),
                        1 => "[a-z_]{1,8}",
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid request with one field replaced by anything.
fn mutated() -> impl Strategy<Value = Value> {
    let base = prop::sample::select(vec![
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        json!({"prompt": "hi", "max_tokens": 3, "stream": true}),
        json!({"text": "hi", "sampling_params": {"max_new_tokens": 3}}),
        json!({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}, "stream": true}),
        json!({"messages": [{"role": "assistant", "content": null,
            "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "1"}], "max_tokens": 2}),
    ]);
    (base, prop::sample::select(KEYS), value()).prop_map(|(mut b, k, v)| {
        b[k] = v;
        b
    })
}

/// Raw bytes, a JSON body, or a mutated valid request.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        2 => value().prop_map(|v| v.to_string().into_bytes()),
        3 => mutated().prop_map(|v| v.to_string().into_bytes()),
    ]
}

#[test]
fn no_request_body_makes_the_server_fail() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base = start(&runtime);
    let client = reqwest::Client::new();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&body(), |bytes| {
            for path in ENDPOINTS {
                let (status, text) = runtime.block_on(async {
                    let r = client
                        .post(format!("{base}{path}"))
                        .header("content-type", "application/json")
                        .body(bytes.clone())
                        .send()
                        .await
                        .unwrap();
                    (r.status().as_u16(), r.text().await.unwrap())
                });
                prop_assert!(
                    status == 200 || (400..500).contains(&status),
                    "{path} answered {status} to {:?}: {text}",
                    String::from_utf8_lossy(&bytes)
                );
                if status != 200 {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    prop_assert!(
                        v["error"]["message"].is_string(),
                        "{path} answered {status} without an error object: {text}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    // Still serving.
    let health = runtime.block_on(async {
        client
            .get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(health.as_u16(), 200);
}
