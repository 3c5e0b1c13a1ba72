//! Structured outputs: constrained decoding is exact (the chosen token is the best allowed
//! one, at every tp, alone or batched, on the top-k and the full-logits paths), replies
//! follow their schema / regex / grammar (validated by the `jsonschema` crate and Rust's
//! `regex`, not by our code), and bad constraints are refused with a 400 naming the problem.

mod common;

use common::server::{post, start};
use common::{fixture, with_group};
use serde_json::{json, Value};
use std::sync::mpsc;
use tpserve::engine::grammar::{is_allowed, Constraint, GrammarSpec, Grammars};
use tpserve::engine::scheduler::{
    self, Command, Event, GenerationParams, Request, SchedulePolicy, SchedulerConfig, Stats,
};
use tpserve::engine::{SamplingParams, Tokenizer};
use tpserve::kernels::Phase;
use tpserve::loader;
use tpserve::model::Logits;

/// The fixture with 512 logits, 9 heads and 3 kv heads: tp 2–4 split its vocabulary and
/// heads unevenly.
const MODEL: &str = "tiny-mha-uneven";
const VOCAB: usize = 512;
/// `<|endoftext|>` of the SmolLM vocabulary whose first 512 tokens the test uses.
const EOS: u32 = 0;
const MAX_NEW: usize = 20;

/// SmolLM's first 512 tokens (specials, bytes, first merges) as the fixture's vocabulary.
fn grammars() -> Grammars {
    let files = loader::open_model(&fixture("tiny-smollm-tok")).unwrap();
    let tokenizer = Tokenizer::new(files.tokenizer.as_ref().unwrap()).unwrap();
    let mut words = tokenizer.token_bytes().unwrap();
    words.truncate(VOCAB);
    Grammars::from_vocabulary(words, VOCAB, &[EOS]).unwrap()
}

fn specs() -> Vec<GrammarSpec> {
    vec![
        GrammarSpec::Regex(r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)".into()),
        GrammarSpec::JsonSchema(json!({
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 0, "maximum": 99},
                "ok": {"type": "boolean"}
            },
            "required": ["n", "ok"]
        })),
        GrammarSpec::Ebnf(
            "root ::= expr\nexpr ::= term ((\"+\" | \"*\") term){0,3}\nterm ::= [0-9]{1,2} | \"(\" expr \")\"".into(),
        ),
    ]
}

/// The reference: full logits at every step (tp 1, one sequence), the grammar's mask
/// applied here, and the highest allowed logit taken (lowest id among equals).
fn reference(prompt: &[u32], mut c: Constraint) -> Vec<u32> {
    with_group(MODEL, 1, 256, |driver| {
        let mut logits = driver
            .forward_one(prompt, 0, Logits::Last, Phase::Prefill)?
            .to_vec();
        let mut out = Vec::new();
        loop {
            let mask = c.allowed()?.to_vec();
            let best = (0..VOCAB as u32)
                .filter(|&id| is_allowed(&mask, id))
                .max_by(|&a, &b| {
                    logits[a as usize]
                        .total_cmp(&logits[b as usize])
                        .then(b.cmp(&a))
                })
                .expect("the grammar allows a token");
            out.push(best);
            c.advance(best)?;
            if best == EOS || c.is_done() || out.len() == MAX_NEW {
                return Ok(out);
            }
            let pos = prompt.len() + out.len() - 1;
            logits = driver
                .forward_one(&[best], pos, Logits::Last, Phase::Decode)?
                .to_vec();
        }
    })
}

/// Every request through the scheduler at once on a `tp`-rank group: the output ids of each.
fn served(tp: usize, requests: Vec<(Vec<u32>, GenerationParams)>) -> Vec<Vec<u32>> {
    let (tx, rx) = mpsc::channel();
    let mut receivers = Vec::new();
    for (input_ids, params) in requests {
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Command::Submit(Request::new(input_ids, params, events)))
            .unwrap();
        receivers.push(receiver);
    }
    drop(tx);
    let cfg = SchedulerConfig {
        max_running_requests: 16,
        chunked_prefill_size: 4096,
        prefix_cache: true,
        policy: SchedulePolicy::Lpm,
        request_timeout: None,
    };
    with_group(MODEL, tp, 2048, |driver| {
        scheduler::run(driver, &cfg, rx, &Stats::default())
    });
    receivers
        .into_iter()
        .map(|mut r| {
            let mut ids = Vec::new();
            while let Ok(event) = r.try_recv() {
                match event {
                    Event::Token { id, .. } => ids.push(id),
                    Event::Failed(f) => panic!("request failed: {}", f.message),
                    _ => {}
                }
            }
            ids
        })
        .collect()
}

fn params(constraint: Option<Constraint>, logprobs: Option<usize>) -> GenerationParams {
    GenerationParams {
        max_new_tokens: MAX_NEW,
        sampling: SamplingParams::default(),
        stop_ids: vec![EOS],
        logprobs,
        constraint,
    }
}

/// At temperature 0 every constrained token is the best allowed one, at tp 1–4, in a batch
/// with other constrained and free requests, on the vocab-parallel top-k path (each rank
/// masks its own slice) and on the full-logits path (logprobs asked).
#[test]
fn constrained_greedy_takes_the_best_allowed_token_at_every_tp() {
    let g = grammars();
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            (0..5 + 3 * i)
                .map(|j| 20 + ((j * 37 + i * 101) % 480) as u32)
                .collect()
        })
        .collect();
    let want: Vec<Vec<u32>> = specs()
        .iter()
        .zip(&prompts)
        .map(|(spec, p)| reference(p, g.compile(spec).unwrap()))
        .collect();
    for (spec, w) in specs().iter().zip(&want) {
        assert!(
            w.len() > 2,
            "{spec:?} gave too short a reply to test: {w:?}"
        );
    }
    for tp in 1..=4 {
        // A batch takes the full logits when any of its requests asks for logprobs.
        for logprobs in [None, Some(2)] {
            let mut requests: Vec<_> = specs()
                .iter()
                .zip(&prompts)
                .map(|(spec, p)| (p.clone(), params(Some(g.compile(spec).unwrap()), logprobs)))
                .collect();
            requests.push((prompts[0].clone(), params(None, logprobs)));
            let got = served(tp, requests);
            for (i, ids) in got.iter().take(3).enumerate() {
                assert_eq!(ids, &want[i], "tp {tp}, logprobs {logprobs:?}, request {i}");
            }
        }
    }
}

/// A reply's text of a request to the server.
async fn reply(base: &str, path: &str, body: Value) -> (String, String) {
    let (status, v) = post(base, path, body).await;
    assert_eq!(status, 200, "{v}");
    match path {
        "/generate" => (
            v["text"].as_str().unwrap().to_owned(),
            v["meta_info"]["finish_reason"]["type"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        "/v1/chat/completions" => (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
            v["choices"][0]["finish_reason"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        _ => (
            v["choices"][0]["text"].as_str().unwrap().to_owned(),
            v["choices"][0]["finish_reason"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
    }
}

fn varied_schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}),
        json!({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
            "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}}, "required": ["tags"]}),
        json!({"type": "object", "properties": {"point": {"type": "object", "properties": {
            "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number"}},
            "required": ["x", "y"]}, "label": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}},
            "required": ["point", "label"]}),
        json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4}),
        json!({"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high", 3]}},
            "required": ["ok", "level"]}),
    ]
}

/// Sampled at temperature 1, every reply parses and validates against its schema (checked
/// by the `jsonschema` crate), through all three generation endpoints; regexes and an EBNF
/// grammar likewise (checked by the `regex` crate and a parse of the expression).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_replies_follow_their_schema_regex_and_grammar() {
    let server = start(&["--tp", "2"]).await;
    let base = &server.base;
    let mut checked = 0;
    for (i, schema) in varied_schemas().into_iter().enumerate() {
        let validator = jsonschema::validator_for(&schema).unwrap();
        let format = json!({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}});
        for seed in 0..3u64 {
            let sampling = json!({"temperature": 1.0, "seed": seed + 10 * i as u64});
            let bodies = [
                (
                    "/v1/chat/completions",
                    json!({"messages": [{"role": "user", "content": "Reply in JSON."}],
                    "response_format": format, "max_tokens": 200}),
                ),
                (
                    "/v1/completions",
                    json!({"prompt": "JSON:", "response_format": format, "max_tokens": 200}),
                ),
                (
                    "/generate",
                    json!({"text": "JSON:", "sampling_params": {"json_schema": schema.to_string(),
                    "max_new_tokens": 200}}),
                ),
            ];
            for (path, mut body) in bodies {
                merge(&mut body, &sampling, path);
                let (text, finish) = reply(base, path, body).await;
                assert_eq!(finish, "stop", "{path} {schema}: {text}");
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{path}: {text:?} is not JSON: {e}"));
                assert!(validator.is_valid(&v), "{path} {schema}: {text}");
                checked += 1;
            }
        }
    }
    for rx in [
        r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
        r"[a-z]{1,10}(\.[a-z]{1,10})?@[a-z]{2,10}\.(com|org|net)",
        r"\(\d{3}\) \d{3}-\d{4}",
    ] {
        let whole = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
        for seed in 0..4 {
            let body = json!({"prompt": "Answer:", "regex": rx, "temperature": 1.0, "seed": seed, "max_tokens": 60});
            let (text, finish) = reply(base, "/v1/completions", body).await;
            assert_eq!(finish, "stop");
            assert!(whole.is_match(&text), "{rx}: {text:?}");
            checked += 1;
        }
    }
    let ebnf = "root ::= expr\nexpr ::= term ((\"+\" | \"-\" | \"*\") term){0,4}\nterm ::= [0-9]{1,3} | \"(\" expr \")\"";
    for seed in 0..4 {
        let body = json!({"text": "2+2 is", "sampling_params": {"ebnf": ebnf, "temperature": 1.0,
            "seed": seed, "max_new_tokens": 80}});
        let (text, finish) = reply(base, "/generate", body).await;
        if finish == "stop" {
            assert!(is_expression(&text), "{text:?}");
        } else {
            // Cut by length: what came is still a prefix the grammar allows.
            assert!(
                text.chars().all(|c| "0123456789+-*()".contains(c)),
                "{text:?}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 5 * 3 * 3 + 12 + 4);
}

/// Places `sampling` where each API takes it.
fn merge(body: &mut Value, sampling: &Value, path: &str) {
    let target = if path == "/generate" {
        &mut body["sampling_params"]
    } else {
        body
    };
    for (k, v) in sampling.as_object().unwrap() {
        target[k] = v.clone();
    }
}

/// `expr := term (op term)*`, `term := digits | ( expr )`.
fn is_expression(s: &str) -> bool {
    fn expr(b: &[u8], i: &mut usize) -> bool {
        if !term(b, i) {
            return false;
        }
        while *i < b.len() && b"+-*".contains(&b[*i]) {
            *i += 1;
            if !term(b, i) {
                return false;
            }
        }
        true
    }
    fn term(b: &[u8], i: &mut usize) -> bool {
        if b.get(*i) == Some(&b'(') {
            *i += 1;
            return expr(b, i) && b.get(*i) == Some(&b')') && {
                *i += 1;
                true
            };
        }
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    }
    let mut i = 0;
    expr(s.as_bytes(), &mut i) && i == s.len()
}

/// Each bad constraint is a 400 whose message names the problem, before any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_constraints_are_refused_naming_the_problem() {
    let server = start(&["--tp", "1"]).await;
    let base = &server.base;
    let schema =
        |s: Value| json!({"type": "json_schema", "json_schema": {"name": "s", "schema": s}});
    let cases = [
        (
            json!({"response_format": schema(json!({"type": "strin"}))}),
            "strin",
        ),
        (
            json!({"response_format": schema(json!({"type": "string", "format": "bogus"}))}),
            "bogus",
        ),
        (
            json!({"response_format": schema(json!({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": true}}}))}),
            "uniqueItems",
        ),
        (json!({"response_format": {"type": "yaml"}}), "yaml"),
        (
            json!({"response_format": {"type": "json_schema"}}),
            "json_schema",
        ),
        (json!({"regex": "[a-"}), "regex"),
        (json!({"regex": "(unclosed"}), "regex"),
        (
            json!({"ebnf": "root ::= \"a\" undefined-rule"}),
            "undefined-rule",
        ),
        (json!({"ebnf": "root ::= \"unterminated"}), "unterminated"),
        (json!({"ebnf": "expr ::= \"a\""}), "root"),
        (
            json!({"regex": "a", "ebnf": "root ::= \"a\""}),
            "at most one",
        ),
    ];
    for (extra, needle) in cases {
        let mut body = json!({"prompt": "hi", "max_tokens": 5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post(base, "/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let (status, v) = post(
        base,
        "/generate",
        json!({"text": "hi",
        "sampling_params": {"json_schema": "{not json"}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("json_schema"));
    // A hostile schema (a megabyte of nested anyOf) is refused in well under a second.
    let mut nested = json!({"type": "string"});
    for _ in 0..9 {
        nested = json!({"anyOf": [{"type": "array", "items": nested},
            {"type": "object", "properties": {"a": nested, "b": nested}}]});
    }
    let started = std::time::Instant::now();
    let (status, v) = post(
        base,
        "/v1/completions",
        json!({"prompt": "hi",
        "response_format": schema(nested)}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too large"),
        "{v}"
    );
    assert!(started.elapsed().as_secs_f64() < 5.0);
    // The server goes on.
    let (status, _) = post(
        base,
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"]}}}
    ])
}

/// The calls of a chat reply (plain or streamed), each checked: a known tool, arguments
/// that are JSON valid against its parameters (by the `jsonschema` crate).
fn checked_calls(calls: &Value, tools: &Value) -> Vec<(String, Value)> {
    calls
        .as_array()
        .expect("tool_calls is a list")
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function");
            assert!(c["id"].as_str().unwrap().starts_with("call_"));
            let name = c["function"]["name"].as_str().unwrap().to_owned();
            let spec = tools
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["function"]["name"] == name.as_str())
                .unwrap_or_else(|| panic!("call of an unknown tool {name}"));
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            let validator = jsonschema::validator_for(&spec["function"]["parameters"]).unwrap();
            assert!(validator.is_valid(&args), "{name}: {args}");
            (name, args)
        })
        .collect()
}

/// A streamed chat reply put back together: content, and the tool calls of its deltas.
fn assembled(events: &[String]) -> (String, Value, String) {
    let (mut content, mut calls, mut finish) = (String::new(), Vec::new(), String::new());
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        let choice = &v["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(c) = choice["delta"]["tool_calls"].as_array() {
            calls.extend(c.iter().cloned());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (content, Value::Array(calls), finish)
}

/// `tool_choice: required` (sampled, several seeds) always yields a valid call, a named
/// choice calls that function, and a tool's result is taken in the next turn — plain and
/// streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_valid_and_results_are_taken_next_turn() {
    let server = start(&["--tp", "2"]).await;
    let base = &server.base;
    let tools = weather_tools();
    let question = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    for seed in 0..4 {
        for choice in [
            json!("required"),
            json!({"type": "function", "function": {"name": "get_time"}}),
        ] {
            let body = json!({"messages": question, "tools": tools, "tool_choice": choice,
                "temperature": 1.0, "seed": seed, "max_tokens": 120});
            let (status, v) = post(base, "/v1/chat/completions", body.clone()).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
            let calls = checked_calls(&v["choices"][0]["message"]["tool_calls"], &tools);
            assert_eq!(calls.len(), 1);
            if choice.is_object() {
                assert_eq!(calls[0].0, "get_time");
            }
            let mut streamed = body;
            streamed["stream"] = json!(true);
            let (content, calls, finish) =
                assembled(&common::server::stream(base, "/v1/chat/completions", streamed).await);
            assert_eq!(finish, "tool_calls");
            assert_eq!(content, "");
            assert_eq!(checked_calls(&calls, &tools).len(), 1);
        }
    }
    // Turn two: the call and its result go back; the reply is text.
    let (status, first) = post(
        base,
        "/v1/chat/completions",
        json!({"messages": question,
        "tools": tools, "tool_choice": "required", "temperature": 0, "max_tokens": 120}),
    )
    .await;
    assert_eq!(status, 200);
    let call = first["choices"][0]["message"]["tool_calls"][0].clone();
    let mut messages = question.as_array().unwrap().clone();
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
    messages.push(
        json!({"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 18}"}),
    );
    let (status, v) = post(
        base,
        "/v1/chat/completions",
        json!({"messages": messages,
        "tools": tools, "tool_choice": "none", "temperature": 0, "max_tokens": 30}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    // Tools that are not usable function specs are refused, naming the problem.
    for (tools, needle) in [
        (
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]),
            "strin",
        ),
        (
            json!([{"type": "function", "function": {"name": "bad name"}}]),
            "bad name",
        ),
        (json!([{"type": "code_interpreter"}]), "tools[0]"),
    ] {
        let (status, v) = post(
            base,
            "/v1/chat/completions",
            json!({"messages": question,
            "tools": tools, "max_tokens": 5}),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
        assert_eq!(v["error"]["param"], "tools");
    }
}
