//! A real `tpserve serve` on a free loopback port, driven over HTTP like a client would.

mod common;

use common::server::{post, post_with_key, send, start, stream};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

fn streamed_text(events: &[String], field: &str) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|v| {
            let c = v["choices"].get(0)?;
            let t = if field == "delta" {
                &c["delta"]["content"]
            } else {
                &c["text"]
            };
            t.as_str().map(str::to_owned)
        })
        .collect()
}

const CHAT_Q: &str = "What is the capital of France?";

#[tokio::test(flavor = "multi_thread")]
async fn openai_and_native_apis_at_tp_2() {
    // With the SGLang launch flags that apply (the tokenizer given again, as a path).
    let tokenizer = common::smollm2();
    let s = start(&[
        "--tp",
        "2",
        "--enable-metrics",
        "--context-length",
        "256",
        "--max-total-tokens",
        "1024",
        "--trust-remote-code",
        "--device",
        "cpu",
        "--dtype",
        "auto",
        "--load-format",
        "gguf",
        "--tokenizer-path",
        tokenizer.to_str().unwrap(),
    ])
    .await;
    let b = &s.base;

    // Completion: " Paris" first; usage counts the 5 prompt tokens and the 8 new ones.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let (status, v) = post(b, "/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 0}})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let events = stream(b, "/v1/completions", streaming).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(streamed_text(&events, "text"), text, "streamed completion");

    // Chat: the same reply as `tpserve generate --chat` at tp 1.
    let cli = common::tpserve_json(&[
        "generate",
        "--model",
        common::smollm2().to_str().unwrap(),
        "--tp",
        "1",
        "--json",
        "--chat",
        CHAT_Q,
        "--max-new-tokens",
        "40",
    ]);
    let chat = json!({"messages": [{"role": "user", "content": CHAT_Q}], "max_tokens": 40, "temperature": 0});
    let (status, v) = post(b, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{v}");
    let reply = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(reply, cli["text"].as_str().unwrap());
    assert_eq!(v["usage"]["prompt_tokens"], 37);
    let completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        completion_tokens as usize,
        cli["output_ids"].as_array().unwrap().len()
    );
    let mut streaming = chat.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let events = stream(b, "/v1/chat/completions", streaming).await;
    assert_eq!(streamed_text(&events, "delta"), reply, "streamed chat");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], completion_tokens);

    // SGLang's /generate, streaming (cumulative text) and not.
    let body = json!({"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}});
    let (status, v) = post(b, "/generate", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["text"], text);
    assert_eq!(v["meta_info"]["completion_tokens"], 8);
    let mut streaming = body;
    streaming["stream"] = json!(true);
    let events = stream(b, "/generate", streaming).await;
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["text"], text);

    // Stop strings end the text before them; n gives several choices; logprobs come back.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
        "stop": ["United"], "n": 2, "logprobs": 3});
    let (status, v) = post(b, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["text"], " Paris.\n\nThe ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .unwrap()
            .len(),
        3
    );

    // Models, model info, server info.
    let models: Value = reqwest::get(format!("{b}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(name, "SmolLM2-135M-Instruct.Q4_1.gguf");
    let info: Value = reqwest::get(format!("{b}/get_model_info"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["is_generation"], true);
    assert_eq!(
        reqwest::get(format!("{b}/health_generate"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    check_bad_requests(b, &name).await;
    check_extreme_sampling(b).await;
    check_tool_turns_are_accepted(b).await;
    check_batching(b).await;
    check_over_capacity(b).await;
    check_disconnect_frees_blocks(b).await;

    let metrics = reqwest::get(format!("{b}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tpserve_requests_total",
        "tpserve_num_queue_reqs",
        "tpserve_token_usage",
        "tpserve_time_to_first_token_seconds_bucket",
        "tpserve_inter_token_latency_seconds_count",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
}

/// What OpenAI accepts is accepted: an assistant turn of tool calls without content, and
/// the tool's answer with its `tool_call_id`.
async fn check_tool_turns_are_accepted(b: &str) {
    let call = json!({"id": "call_1", "type": "function",
        "function": {"name": "capital", "arguments": "{\"country\": \"France\"}"}});
    let body = json!({"max_tokens": 2, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Paris"},
    ]});
    let (status, v) = post(b, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
}

/// Sampling settings at the edges of what is accepted are served, not fatal: a temperature
/// so small that logits / temperature overflow (with min_p, which once emptied the
/// candidates and killed the server) draws exactly the greedy reply, on every path.
async fn check_extreme_sampling(b: &str) {
    let chat = |sampling: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": CHAT_Q}], "max_tokens": 12});
        for (k, v) in sampling.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let (status, greedy) = post(b, "/v1/chat/completions", chat(json!({"temperature": 0}))).await;
    assert_eq!(status, 200, "{greedy}");
    let greedy = &greedy["choices"][0]["message"]["content"];
    for sampling in [
        json!({"temperature": 1e-40, "min_p": 0.5}),
        json!({"temperature": 1e-45, "min_p": 1.0, "top_p": 1e-30}),
        json!({"temperature": 1e-40, "top_k": 3}),
        json!({"temperature": 1e-40, "min_p": 0.5, "presence_penalty": 0.0, "logprobs": true}),
    ] {
        let (status, v) = post(b, "/v1/chat/completions", chat(sampling.clone())).await;
        assert_eq!(status, 200, "{sampling}: {v}");
        assert_eq!(&v["choices"][0]["message"]["content"], greedy, "{sampling}");
        let mut streaming = chat(sampling.clone());
        streaming["stream"] = json!(true);
        let events = stream(b, "/v1/chat/completions", streaming).await;
        assert_eq!(events.last().unwrap(), "[DONE]", "{sampling}");
        assert_eq!(
            json!(streamed_text(&events, "delta")),
            *greedy,
            "{sampling}"
        );
    }
}

/// Each bad request: an OpenAI-style error with the right status, and the server serves on.
async fn check_bad_requests(b: &str, model: &str) {
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            "/v1/chat/completions",
            json!({"max_tokens": 2}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "alien", "content": "hi"}]}),
            400,
            "role `alien` is not one of system, developer, user, assistant, tool",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": null}]}),
            400,
            "messages[0]: `content` must be a string",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}),
            400,
            "messages[1]: `content`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}),
            400,
            "needs `tool_call_id`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}),
            400,
            "invalid type",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": 0})),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": -3})),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"temperature": -0.5})),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"top_p": 0.0})),
            400,
            "top_p",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"top_p": 1.5})),
            400,
            "top_p",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"temperature": "hot"})),
            400,
            "invalid type",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"model": "no-such-model"})),
            404,
            "no-such-model",
        ),
        (
            "/v1/completions",
            json!({"prompt": "word ".repeat(400), "max_tokens": 2}),
            400,
            "context length",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 99999999]}),
            400,
            "vocabulary",
        ),
        ("/generate", json!({"sampling_params": {}}), 400, "text"),
    ];
    for (path, body, status, needle) in cases {
        let (got, v) = post(b, path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{path} {body}: {message:?} lacks {needle:?}"
        );
    }
    for (body, status, needle) in [
        (b"{not json".to_vec(), 400, "invalid request body"),
        (vec![b' '; 9 * 1024 * 1024], 413, "larger than the limit"),
    ] {
        let r = reqwest::Client::new()
            .post(format!("{b}/v1/completions"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    // Still serving, by the model's own name too.
    let (status, _) = post(b, "/v1/chat/completions", chat(json!({"model": model}))).await;
    assert_eq!(status, 200);
}

fn story(i: usize) -> Value {
    json!({"prompt": format!("Story {i}: once upon a time"), "max_tokens": 24, "temperature": 0})
}

/// Eight concurrent greedy requests give what they give one at a time, in less total time.
async fn check_batching(b: &str) {
    let start = Instant::now();
    let mut alone = vec![];
    for i in 0..8 {
        let (_, v) = post(b, "/v1/completions", story(i)).await;
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_owned());
    }
    let sequential = start.elapsed();
    let start = Instant::now();
    let together =
        futures_util::future::join_all((0..8).map(|i| post(b, "/v1/completions", story(i)))).await;
    let concurrent = start.elapsed();
    for (i, (_, v)) in together.iter().enumerate() {
        assert_eq!(
            v["choices"][0]["text"].as_str().unwrap(),
            alone[i],
            "request {i}"
        );
    }
    assert!(
        concurrent < sequential,
        "batched {concurrent:?} vs one at a time {sequential:?}"
    );
}

/// More work than the KV cache holds at once: requests wait for blocks, none is lost.
async fn check_over_capacity(b: &str) {
    // 1024 KV tokens; each of these needs 8 + 200 positions: at most four run at once.
    let body = |i: usize| {
        json!({"prompt": format!("Count {i}: one two three"), "max_tokens": 200,
        "temperature": 0.7, "seed": i, "ignore_eos": true})
    };
    let all =
        futures_util::future::join_all((0..10).map(|i| post(b, "/v1/completions", body(i)))).await;
    for (status, v) in all {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 200);
    }
}

/// A client that leaves a stream half-way: its request is cancelled and its blocks freed.
async fn check_disconnect_frees_blocks(b: &str) {
    let body = json!({"prompt": "Tell me a long story", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let r = send(b, "/v1/completions", &body, None).await;
    let mut chunks = r.bytes_stream();
    for _ in 0..3 {
        chunks.next().await.unwrap().unwrap();
    }
    assert_eq!(running_and_held(b).await.0, 1, "the stream's request runs");
    drop(chunks);
    wait_until_all_blocks_free(b, "after the client left").await;
}

/// Requests running, and KV blocks held by requests (blocks the prefix cache keeps are
/// free to evict, not held).
async fn running_and_held(b: &str) -> (u64, u64) {
    let v: Value = reqwest::get(format!("{b}/get_server_info"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kv = &v["kv_cache"];
    (
        v["running_requests"].as_u64().unwrap(),
        kv["used_blocks"].as_u64().unwrap() - kv["cached_blocks"].as_u64().unwrap(),
    )
}

async fn wait_until_all_blocks_free(b: &str, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while running_and_held(b).await != (0, 0) {
        assert!(Instant::now() < deadline, "blocks were not freed {when}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request that runs past --request-timeout ends with a 504 naming the flag (streamed:
/// as the stream's last event), its blocks are freed, and the server goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_the_timeout_is_ended_and_the_server_goes_on() {
    let s = start(&[
        "--tp",
        "1",
        "--request-timeout",
        "1",
        "--max-total-tokens",
        "4096",
    ])
    .await;
    let long = json!({"prompt": "Tell me a long story", "max_tokens": 3000, "ignore_eos": true});
    let started = Instant::now();
    let (status, v) = post(&s.base, "/v1/completions", long.clone()).await;
    assert_eq!(status, 504, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("--request-timeout (1 s)"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_until_all_blocks_free(&s.base, "after the timeout").await;

    let mut streamed = long;
    streamed["stream"] = json!(true);
    let events = stream(&s.base, "/v1/completions", streamed).await;
    let error = events
        .iter()
        .find(|e| e.contains("\"error\""))
        .unwrap_or_else(|| panic!("no error event in {events:?}"));
    assert!(error.contains("--request-timeout"), "{error}");
    wait_until_all_blocks_free(&s.base, "after the streamed timeout").await;

    let (status, v) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_is_required_when_set() {
    let s = start(&["--api-key", "sekret", "--max-total-tokens", "256"]).await;
    let body = json!({"prompt": "hi", "max_tokens": 1});
    let post_with_key = |body, key| post_with_key(&s.base, "/v1/completions", body, key);
    assert_eq!(post_with_key(&body, None).await.0, 401);
    let (status, v) = post_with_key(&body, Some("wrong")).await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(post_with_key(&body, Some("sekret")).await.0, 200);

    // One request that needs more KV positions than the whole cache (256): refused with the
    // flag to change, and the server goes on.
    let huge = json!({"prompt": "hi", "max_tokens": 1000});
    let (status, v) = post_with_key(&huge, Some("sekret")).await;
    assert_eq!(status, 400);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("--max-total-tokens"), "{message}");
    assert_eq!(post_with_key(&body, Some("sekret")).await.0, 200);
}

/// SIGINT: stop accepting, finish the request in flight, exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigint_finishes_in_flight_work_and_exits_cleanly() {
    let mut s = start(&["--tp", "2", "--max-total-tokens", "512"]).await;
    let body = json!({"prompt": "Hello", "max_tokens": 60, "ignore_eos": true});
    let base = s.base.clone();
    let in_flight = tokio::spawn(async move { post(&base, "/v1/completions", body).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let (status, v) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 60);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(exit) = s.child.try_wait().unwrap() {
            assert!(exit.success(), "exit status {exit}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit after SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A chat template that raises (as Hugging Face templates do on turns they refuse) fails
/// that request with a 400 carrying the template's message; the server goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_raising_chat_template_fails_only_its_request() {
    let dir = std::env::temp_dir().join(format!("tpserve-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join("raise.jinja");
    std::fs::write(
        &template,
        "{% if messages|length > 1 %}{{ raise_exception('one turn only, please') }}{% endif %}\
         {% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let s = start(&["--tp", "1", "--chat-template", template.to_str().unwrap()]).await;
    let turn = |c: &str| json!({"role": "user", "content": c});
    let (status, v) = post(
        &s.base,
        "/v1/chat/completions",
        json!({"messages": [turn("a"), turn("b")], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("one turn only, please"), "{message}");
    let (status, v) = post(
        &s.base,
        "/v1/chat/completions",
        json!({"messages": [turn("hello")], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without --max-total-tokens the cache is sized by the engine after loading, at most what
/// every running request at full context needs, and the server reports that size.
#[tokio::test(flavor = "multi_thread")]
async fn kv_capacity_from_memory_is_what_the_engine_allocated() {
    let s = start(&[
        "--tp",
        "2",
        "--mem-fraction-static",
        "1",
        "--max-running-requests",
        "2",
        "--context-length",
        "100",
    ])
    .await;
    let v: Value = reqwest::get(format!("{}/get_server_info", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // 2 requests × 100 tokens, in whole blocks of 16.
    assert_eq!(v["max_total_tokens"], 208, "{v}");
    assert_eq!(v["kv_cache"]["total_tokens"], 208, "{v}");
}

#[test]
fn bad_flags_are_clear_errors() {
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    for (args, needle) in [
        (vec!["--tp", "0"], "--tp"),
        (vec!["--tp", "10"], "attention heads"),
        (vec!["--cpus", "5-2"], "backwards"),
        (
            vec!["--mem-fraction-static", "1.5"],
            "--mem-fraction-static",
        ),
        (vec!["--context-length", "100000"], "--context-length"),
        (
            vec!["--mem-fraction-static", "0.0000000001"],
            "after loading the weights",
        ),
        (vec!["--log-level", "loud"], "--log-level"),
        (vec!["--max-connections", "0"], "--max-connections"),
        (vec!["--dp-size", "0"], "--dp-size"),
        (
            vec!["--load-balance-method", "random"],
            "--load-balance-method",
        ),
        (vec!["--max-connections", "100000000"], "ulimit -n"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tpserve"))
            .args([
                "serve",
                "--model-path",
                model,
                "--port",
                &common::free_port().to_string(),
            ])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// Data parallelism: two tp-1 replicas behind one front end answer every request as one
/// engine does (greedy), round robin sends requests in turn, and cache-aware routing keeps
/// prompts that share a prefix on one replica, whose prefix cache then serves it;
/// /get_server_info reports each replica.
#[tokio::test(flavor = "multi_thread")]
async fn data_parallel_replicas_answer_as_one_engine_and_route_as_asked() {
    async fn replies(base: &str, prompts: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for p in prompts {
            let body = json!({"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
            let (status, v) = post(base, "/v1/completions", body).await;
            assert_eq!(status, 200, "{v}");
            out.push(v["choices"][0]["text"].as_str().unwrap().to_owned());
        }
        out
    }
    async fn replicas(base: &str) -> Vec<Value> {
        let v: Value = reqwest::get(format!("{base}/get_server_info"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["replicas"].as_array().unwrap().clone()
    }
    let count = |r: &[Value], field: &str| -> Vec<u64> {
        r.iter().map(|x| x[field].as_u64().unwrap()).collect()
    };
    let prompts: Vec<String> = (0..4)
        .map(|i| format!("Story {i}: once upon a time"))
        .collect();
    let kv = ["--tp", "1", "--max-total-tokens", "1024"];
    let want = replies(&start(&kv).await.base, &prompts).await;

    let dp = start(&[&kv[..], &["--dp-size", "2"]].concat()).await;
    assert_eq!(replies(&dp.base, &prompts).await, want);
    assert_eq!(count(&replicas(&dp.base).await, "requests_total"), [2, 2]);
    drop(dp);

    let args = [
        &kv[..],
        &["--dp-size", "2", "--load-balance-method", "cache_aware"],
    ]
    .concat();
    let ca = start(&args).await;
    let system = "You are a careful assistant. Answer in one short sentence, plainly, \
                  without lists, and say so when you do not know the answer. ";
    let shared: Vec<String> = ["Why is the sky blue?", "What is rain?", "Who was Euler?"]
        .iter()
        .map(|q| format!("{system}{q}"))
        .collect();
    replies(&ca.base, &shared).await;
    let r = replicas(&ca.base).await;
    let requests = count(&r, "requests_total");
    assert!(requests == [3, 0] || requests == [0, 3], "{requests:?}");
    let busy = if requests[0] == 3 { 0 } else { 1 };
    assert!(count(&r, "cached_tokens_total")[busy] >= 32, "{r:?}");
}

/// Pipeline stages behind the server, tp × pp, and tp 3 in each of two replicas: the
/// replies of tp 1. The requests are sent together, so that steps hold several sequences
/// (cut into micro-batches between the stages).
#[tokio::test(flavor = "multi_thread")]
async fn pipeline_and_mixed_layouts_answer_as_tp_1() {
    async fn replies_together(base: &str, prompts: &[String]) -> Vec<String> {
        let requests = prompts.iter().map(|p| {
            let body = json!({"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
            post(base, "/v1/completions", body)
        });
        futures_util::future::join_all(requests)
            .await
            .into_iter()
            .map(|(status, v)| {
                assert_eq!(status, 200, "{v}");
                v["choices"][0]["text"].as_str().unwrap().to_owned()
            })
            .collect()
    }
    let prompts: Vec<String> = (0..6).map(|i| format!("Recipe {i}: first, take")).collect();
    let kv = ["--max-total-tokens", "2048"];
    let want = replies_together(
        &start(&[&kv[..], &["--tp", "1"]].concat()).await.base,
        &prompts,
    )
    .await;
    for layout in [
        &["--pp-size", "2"][..],
        &[
            "--tp",
            "2",
            "--pp-size",
            "2",
            "--pp-max-micro-batch-size",
            "2",
        ],
        &["--tp", "3", "--dp-size", "2"],
    ] {
        let server = start(&[&kv[..], layout].concat()).await;
        let got = replies_together(&server.base, &prompts).await;
        assert_eq!(got, want, "{layout:?}");
        let info: Value = reqwest::get(format!("{}/get_server_info", server.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let pp = layout
            .iter()
            .position(|&a| a == "--pp-size")
            .map_or(1, |i| layout[i + 1].parse().unwrap());
        assert_eq!(info["pp_size"], pp, "{info}");
    }
}
