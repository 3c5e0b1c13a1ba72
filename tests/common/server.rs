//! A real `tpserve serve` on a free loopback port, driven over HTTP as a client would.

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed when dropped (also when a test fails).
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn start(extra: &[&str]) -> Server {
    let port = super::free_port();
    let model = super::smollm2();
    let child = Command::new(env!("CARGO_BIN_EXE_tpserve"))
        .args([
            "serve",
            "--model-path",
            model.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{}/health", server.base)).send().await {
            if r.status().is_success() {
                return server;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the server did not become healthy");
}

/// A POST of `body` as JSON, with a bearer `key` when given.
pub async fn send(base: &str, path: &str, body: &Value, key: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body);
    if let Some(k) = key {
        request = request.bearer_auth(k);
    }
    request.send().await.unwrap()
}

/// Status and JSON body (null when the body is not JSON).
pub async fn post_with_key(
    base: &str,
    path: &str,
    body: &Value,
    key: Option<&str>,
) -> (u16, Value) {
    let r = send(base, path, body, key).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    post_with_key(base, path, &body, None).await
}

/// The `data:` payloads of a server-sent event stream.
pub async fn stream(base: &str, path: &str, body: Value) -> Vec<String> {
    let r = send(base, path, &body, None).await;
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}
