//! The prefix cache over HTTP: outputs are the same bits with the cache on and off, at block
//! edges and inside blocks, greedy and sampled, at tp 1 and 2; eviction under a small cache
//! loses nothing; a flush is refused while requests run and frees every block after.

mod common;

use common::server::{post, start, stream};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Token ids of ordinary text-like range, reproducible.
fn ids(seed: u64, n: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(1000..9000)).collect()
}

fn completion(prompt: &[u32], sampled: bool) -> Value {
    let mut body = json!({"prompt": prompt, "max_tokens": 6, "ignore_eos": true});
    if sampled {
        // With log-probabilities: the full logits path, compared to the printed bit.
        body["temperature"] = json!(0.9);
        body["seed"] = json!(11);
        body["logprobs"] = json!(3);
    } else {
        body["temperature"] = json!(0);
    }
    body
}

/// `(text and log-probabilities, cached tokens)` of a completion.
async fn ask(base: &str, body: Value) -> (String, u64) {
    let (status, v) = post(base, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    (
        format!("{} {}", choice["text"], choice["logprobs"]),
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

async fn server_info(base: &str) -> Value {
    reqwest::get(format!("{base}/get_server_info"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Requests sharing 0, 1, 15, 16, 17, 40 (inside a block) and 1000 tokens with an earlier
/// 1001-token prompt: the same text from a server with the cache as from one without, and
/// the cached counts the whole blocks say.
async fn check_on_equals_off(tp: &str) {
    let on = start(&["--tp", tp, "--max-total-tokens", "8192"]).await;
    let off = start(&[
        "--tp",
        tp,
        "--max-total-tokens",
        "8192",
        "--disable-radix-cache",
    ])
    .await;
    let doc = ids(1, 1001);
    for s in [&on, &off] {
        ask(&s.base, completion(&doc, false)).await;
    }
    for (i, shared) in [0usize, 1, 15, 16, 17, 40, 1000].into_iter().enumerate() {
        let mut prompt = doc[..shared].to_vec();
        prompt.extend(ids(100 + i as u64, 7));
        // 1001 tokens were cached as 62 whole blocks (992 tokens).
        let want_cached = (shared / 16 * 16).min(992) as u64;
        for sampled in [false, true] {
            let (text_on, cached_on) = ask(&on.base, completion(&prompt, sampled)).await;
            let (text_off, cached_off) = ask(&off.base, completion(&prompt, sampled)).await;
            let case = format!("tp {tp}, {shared} shared tokens, sampled {sampled}");
            assert_eq!(text_on, text_off, "{case}");
            // The first ask of this prompt hits the document; the second its own blocks too.
            let again = (prompt.len() - 1) / 16 * 16;
            let expected = if sampled { again as u64 } else { want_cached };
            assert_eq!((cached_on, cached_off), (expected, 0), "{case}");
        }
    }
    // Streamed, and through /generate: the same counts where they are reported.
    let mut body = completion(&doc, false);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&on.base, "/v1/completions", body).await;
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"],
        992
    );
    let generate =
        json!({"input_ids": doc, "sampling_params": {"max_new_tokens": 2, "temperature": 0}});
    let (_, v) = post(&on.base, "/generate", generate).await;
    assert_eq!(v["meta_info"]["cached_tokens"], 992, "{v}");
    let info = server_info(&on.base).await;
    assert!(
        info["prefix_cache"]["hit_rate"].as_f64().unwrap() > 0.3,
        "{info}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_are_the_same_with_the_cache_on_and_off_at_tp_1() {
    check_on_equals_off("1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_are_the_same_with_the_cache_on_and_off_at_tp_2() {
    check_on_equals_off("2").await;
}

/// A cache of 512 tokens (32 blocks) and twelve requests at once from three families that
/// share 100-token prefixes, each needing 10 blocks: the cache must evict while requests
/// run. Every request gives what it gives alone; afterwards a flush frees every block.
#[tokio::test(flavor = "multi_thread")]
async fn eviction_under_pressure_loses_nothing_and_leaks_no_block() {
    let s = start(&["--tp", "2", "--max-total-tokens", "512"]).await;
    let b = &s.base;
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            let mut p = ids(200 + i % 3, 100);
            p.extend(ids(300 + i, 20));
            p
        })
        .collect();
    let body =
        |p: &Vec<u32>| json!({"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(ask(b, body(p)).await.0);
    }
    let together = futures_util::future::join_all(prompts.iter().map(|p| ask(b, body(p)))).await;
    for (i, (text, _)) in together.iter().enumerate() {
        assert_eq!(text, &alone[i], "request {i}");
    }
    let hits: u64 = together.iter().map(|(_, c)| c).sum();
    assert!(hits > 0, "the shared prefixes were found");

    let info = server_info(b).await;
    assert_eq!(info["running_requests"], 0);
    let (status, text) = flush(b).await;
    assert_eq!(status, 200, "{text}");
    let kv = &server_info(b).await["kv_cache"];
    assert_eq!(
        (kv["used_blocks"].as_u64(), kv["cached_blocks"].as_u64()),
        (Some(0), Some(0)),
        "{kv}"
    );
}

async fn flush(base: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/flush_cache"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A flush while a request runs is refused with a message; once idle it empties the cache
/// and later requests are computed afresh (cached 0) with the same output.
#[tokio::test(flavor = "multi_thread")]
async fn flush_is_refused_while_requests_run_and_empties_the_cache_after() {
    let s = start(&["--tp", "1", "--max-total-tokens", "2048"]).await;
    let b = s.base.clone();
    let prompt = ids(5, 80);
    let (first, _) = ask(&b, completion(&prompt, false)).await;
    let long =
        json!({"prompt": ids(6, 20), "max_tokens": 400, "ignore_eos": true, "temperature": 0});
    let running = tokio::spawn({
        let b = b.clone();
        async move { post(&b, "/v1/completions", long).await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server_info(&b).await["running_requests"] == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the long request never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, text) = flush(&b).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("in flight"), "{text}");
    assert_eq!(running.await.unwrap().0, 200);
    // The reply can reach the client a moment before the scheduler retires the request.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server_info(&b).await["running_requests"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never retired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, text) = flush(&b).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(server_info(&b).await["kv_cache"]["used_blocks"], 0);
    let (again, cached) = ask(&b, completion(&prompt, false)).await;
    assert_eq!((again, cached), (first, 0));
}
