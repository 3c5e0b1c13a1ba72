//! Multi-process tensor parallelism under mpirun (Open MPI, loopback only).
#![cfg(feature = "mpi")]

mod common;

use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// MPI jobs oversubscribe the cores: one at a time.
static ONE_JOB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_job_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `mpirun` on this machine only: loopback interfaces, root allowed, more ranks than cores.
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_tcp_if_include", "lo")
        .env("OMPI_MCA_oob_tcp_if_include", "lo")
        // More ranks than cores: yield instead of busy-polling in collectives.
        .env("OMPI_MCA_mpi_yield_when_idle", "1");
    c
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("rank 0 prints one JSON object");
    assert_eq!(
        text.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "only rank 0 prints"
    );
    serde_json::from_str(line).unwrap()
}

fn generate_mpi(np: usize, model: &str, input: &[&str]) -> Value {
    let out = mpirun()
        .args([
            "-np",
            &np.to_string(),
            env!("CARGO_BIN_EXE_tpserve"),
            "generate",
            "--comm",
            "mpi",
        ])
        .args(["--model", model, "--temperature", "0", "--json"])
        .args(input)
        .output()
        .unwrap();
    json_of(&out)
}

/// The SmolLM2 prompt of the comparisons with in-process runs.
const CAPITAL_OF_FRANCE: [&str; 4] = [
    "--prompt",
    "The capital of France is",
    "--max-new-tokens",
    "16",
];

#[test]
fn smollm2_under_mpirun_equals_in_process_tp() {
    let _job = one_job_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let input = CAPITAL_OF_FRANCE;
    for np in [2, 3] {
        let mpi = generate_mpi(np, model, &input);
        let tp = np.to_string();
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--tp",
            &tp,
            "--temperature",
            "0",
            "--json",
        ];
        args.extend(input);
        let local = common::tpserve_json(&args);
        assert_eq!(mpi["output_ids"], local["output_ids"], "np {np}");
        assert_eq!(
            mpi["prompt_logits_top"], local["prompt_logits_top"],
            "np {np}: logits bit for bit"
        );
    }
}

/// Pipeline stages as processes: `mpirun -np 2` and `-np 4` with --pp-size (and --tp 2 in
/// each stage) give in-process tp 1's ids and prompt logits, bit for bit.
#[test]
fn pipeline_stages_under_mpirun_equal_in_process_tp_1() {
    let _job = one_job_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let input = CAPITAL_OF_FRANCE;
    let mut args = vec!["generate", "--model", model, "--temperature", "0", "--json"];
    args.extend(input);
    let local = common::tpserve_json(&args);
    for (np, layout) in [
        (2, &["--pp-size", "2"][..]),
        (4, &["--pp-size", "4"]),
        (4, &["--tp", "2", "--pp-size", "2"]),
    ] {
        let mpi = generate_mpi(np, model, &[&input[..], layout].concat());
        assert_eq!(mpi["output_ids"], local["output_ids"], "np {np} {layout:?}");
        assert_eq!(
            mpi["prompt_logits_top"], local["prompt_logits_top"],
            "np {np} {layout:?}: logits bit for bit"
        );
    }
}

#[test]
fn fixture_models_under_mpirun_match_their_references() {
    let _job = one_job_at_a_time();
    for (model, np) in [
        ("tiny-llama", 2),
        ("tiny-llama-sharded", 3),
        ("tiny-llama3-bf16", 3),
        ("tiny-qwen2", 3),
        ("tiny-qwen3", 2),
        ("tiny-mha-uneven", 2),
        ("tiny-mistral-f16", 3),
        ("tiny-smollm-tok", 2),
        ("tiny-phi3", 2),
        ("tiny-qwen2-moe", 3),
    ] {
        check_against_reference(model, np, &[]);
    }
    // Pipeline stages as processes: two and three stages, and two stages of tp 2.
    for (model, np, layout) in [
        ("tiny-llama", 2, &["--pp-size", "2"][..]),
        ("tiny-gemma2", 3, &["--pp-size", "3"]),
        ("tiny-qwen2-moe", 4, &["--tp", "2", "--pp-size", "2"]),
    ] {
        check_against_reference(model, np, layout);
    }
}

/// `mpirun -np np` (with `layout`) against the transformers reference of `model`: greedy
/// ids, and the top prompt logits within the reference's precision.
fn check_against_reference(model: &str, np: usize, layout: &[&str]) {
    let reference = common::reference(model);
    let tol = if reference.saved_dtype == "float32" {
        1e-4
    } else {
        1e-3
    };
    let path = common::fixture(model);
    for case in &reference.cases {
        let ids: Vec<String> = case.input_ids.iter().map(u32::to_string).collect();
        let ids = ids.join(",");
        // The references are computed in f32: so is the cache held to them.
        let input = [
            "--input-ids",
            &ids,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--kv-cache-dtype",
            "f32",
        ];
        let v = generate_mpi(np, path.to_str().unwrap(), &[&input[..], layout].concat());
        let out: Vec<u32> = serde_json::from_value(v["output_ids"].clone()).unwrap();
        assert_eq!(out, case.greedy_ids, "{model} {}: greedy ids", case.name);
        for top in v["prompt_logits_top"].as_array().unwrap() {
            let (id, logit) = (
                top["id"].as_u64().unwrap() as usize,
                top["logit"].as_f64().unwrap(),
            );
            let want = case.last_logits[id] as f64;
            assert!(
                (logit - want).abs() <= tol,
                "{model} {}: logit {id}: {logit} vs {want}",
                case.name
            );
        }
    }
}

/// A chat request to the server on `port`, with curl.
fn post_chat(port: u16, body: &str) -> std::process::Output {
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    Command::new("curl")
        .args(["-s", "--max-time", "30", &url, "-d", body])
        .output()
        .unwrap()
}

/// `mpirun -np 2 tpserve serve`: rank 0 answers HTTP; killing rank 1 stops the job within
/// 10 s with a message naming the rank.
#[test]
fn serve_under_mpirun_and_a_rank_that_dies() {
    let _job = one_job_at_a_time();
    let port = common::free_port();
    let model = common::smollm2();
    let mut job = mpirun()
        .args([
            "-np",
            "2",
            env!("CARGO_BIN_EXE_tpserve"),
            "serve",
            "--model-path",
            model.to_str().unwrap(),
        ])
        .args(["--port", &port.to_string(), "--max-total-tokens", "512"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let chat = r#"{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16,"temperature":0}"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    let reply = loop {
        let out = post_chat(port, chat);
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
            break v;
        }
        assert!(Instant::now() < deadline, "the MPI server did not answer");
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    // The same reply as the in-process group of the same size.
    let local = common::tpserve_json(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tp",
        "2",
        "--comm",
        "local",
        "--json",
        "--chat",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
    ]);
    assert_eq!(text, local["text"].as_str().unwrap(), "{reply}");
    assert_eq!(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // Again: the prompt's two whole blocks (32 of its 37 tokens) come from the prefix cache
    // on rank 0, every rank reads its own heads of them, and the reply is the same.
    let again: Value = serde_json::from_slice(&post_chat(port, chat).stdout).unwrap();
    assert_eq!(again["choices"][0]["message"]["content"], text, "{again}");
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 32);

    // Constrained decoding: the token masks travel to rank 1 in the step plan over MPI, so
    // every rank's candidates are allowed ones (a disallowed winner fails the request).
    let constrained = r#"{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16,"temperature":0,"regex":"[A-Z][a-z]{2,8}( [a-z]{2,8}){0,2}"}"#;
    let v: Value = serde_json::from_slice(&post_chat(port, constrained).stdout).unwrap();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let whole = regex::Regex::new("^[A-Z][a-z]{2,8}( [a-z]{2,8}){0,2}$").unwrap();
    assert!(whole.is_match(text), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    // Rank 1 is the newest tpserve process of the job.
    let pattern = format!("^{} serve .*--port {port}", env!("CARGO_BIN_EXE_tpserve"));
    let pids = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    let mut pids: Vec<u32> = String::from_utf8_lossy(&pids.stdout)
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    pids.sort_unstable();
    assert_eq!(pids.len(), 2, "two ranks run");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &pids[1].to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the job outlived its rank by 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let out = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1"),
        "the message should name rank 1: {err}"
    );
}

/// One rank with a bad model path: the whole job stops within 10 s, saying why.
#[test]
fn a_rank_with_a_bad_model_path_stops_the_job() {
    let _job = one_job_at_a_time();
    let model = common::fixture("tiny-llama");
    let start = Instant::now();
    let out = mpirun()
        .args([
            "-np",
            "1",
            env!("CARGO_BIN_EXE_tpserve"),
            "generate",
            "--comm",
            "mpi",
        ])
        .args(["--model", model.to_str().unwrap(), "--input-ids", "1,2,3"])
        .args([
            ":",
            "-np",
            "1",
            env!("CARGO_BIN_EXE_tpserve"),
            "generate",
            "--comm",
            "mpi",
        ])
        .args([
            "--model",
            "/nonexistent/node2/model",
            "--input-ids",
            "1,2,3",
        ])
        .output()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/node2/model"), "{err}");
}

/// Two network namespaces joined by a veth pair, each with its own hostname: two "nodes"
/// on one machine, for mpirun over TCP. Removed when dropped.
struct TwoNodes {
    namespaces: [String; 2],
    dir: common::tempdir::Dir,
}

impl TwoNodes {
    const ADDRESSES: [&'static str; 2] = ["10.77.0.1", "10.77.0.2"];

    /// Why not, where namespaces cannot be made: not root, or no `ip netns`.
    fn new() -> Result<Self, String> {
        let id = std::process::id();
        let nodes = TwoNodes {
            namespaces: [format!("tpserve-a-{id}"), format!("tpserve-b-{id}")],
            dir: common::tempdir::Dir::new("two-nodes"),
        };
        let [a, b] = &nodes.namespaces;
        let (va, vb) = (format!("tpa{id}"), format!("tpb{id}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", a],
            vec!["netns", "add", b],
            vec!["link", "add", va, "type", "veth", "peer", "name", vb],
            vec!["link", "set", va, "netns", a],
            vec!["link", "set", vb, "netns", b],
            vec!["-n", a, "addr", "add", "10.77.0.1/24", "dev", va],
            vec!["-n", b, "addr", "add", "10.77.0.2/24", "dev", vb],
            vec!["-n", a, "link", "set", va, "up"],
            vec!["-n", b, "link", "set", vb, "up"],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", b, "link", "set", "lo", "up"],
        ];
        for args in steps {
            let out = Command::new("ip").args(&args).output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return Err(format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr)
                    ))
                }
                Err(e) => return Err(format!("ip: {e}")),
            }
        }
        // mpirun's rsh agent: "agent [options] HOST COMMAND" runs COMMAND in HOST's namespace
        // under its own hostname, as ssh would on another machine.
        let agent = format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in -*) shift;; *) break;; esac; done\n\
             host=$1; shift\n\
             case \"$host\" in {}) ns={a} name=node-a;; {}) ns={b} name=node-b;; \
             *) echo \"agent: unknown host $host\" >&2; exit 1;; esac\n\
             exec ip netns exec $ns unshare --uts /bin/sh -c \"hostname $name; $*\"\n",
            Self::ADDRESSES[0],
            Self::ADDRESSES[1]
        );
        let path = nodes.agent();
        std::fs::write(&path, agent).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Ok(nodes)
    }

    fn agent(&self) -> std::path::PathBuf {
        self.dir.path().join("agent")
    }

    /// `mpirun` started on node a (in its namespace, as node-a), TCP only over the veth
    /// subnet, launching on node b through the agent; `apps`: per node, its process count
    /// and arguments (MPMD, so that each node gets its own --cpus).
    fn mpirun(&self, apps: [(usize, &[&str]); 2]) -> Output {
        let mut line = format!(
            "hostname node-a; exec mpirun --allow-run-as-root --oversubscribe --bind-to none \
             --mca plm_rsh_agent {} --mca btl self,tcp \
             --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24",
            self.agent().display()
        );
        for (i, (np, args)) in apps.iter().enumerate() {
            if i > 0 {
                line.push_str(" :");
            }
            line.push_str(&format!(
                " -np {np} --host {}:{np} {}",
                Self::ADDRESSES[i],
                env!("CARGO_BIN_EXE_tpserve")
            ));
            for a in *args {
                line.push_str(&format!(" '{a}'"));
            }
        }
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.namespaces[0],
                "unshare",
                "--uts",
                "/bin/sh",
                "-c",
                &line,
            ])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env_remove("OMPI_MCA_btl_tcp_if_include")
            .env_remove("OMPI_MCA_oob_tcp_if_include")
            .output()
            .unwrap()
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Multi-node for real on one machine: tp 2, pp 2 and tp 2 × pp 2 across two network
/// namespaces (TCP between them, tpserve pinning each node's ranks with its own --cpus)
/// give in-process tp 1's ids and prompt logits, bit for bit.
#[test]
fn two_nodes_over_tcp_equal_in_process_tp_1() {
    let _job = one_job_at_a_time();
    let nodes = match TwoNodes::new() {
        Ok(n) => n,
        Err(why) if std::env::var_os("TPSERVE_REQUIRE_TWO_NODES").is_none() => {
            eprintln!("skipped: two network namespaces need root and `ip netns` ({why})");
            return;
        }
        Err(why) => panic!("TPSERVE_REQUIRE_TWO_NODES is set, but: {why}"),
    };
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let mut args = vec!["generate", "--model", model, "--temperature", "0", "--json"];
    args.extend(CAPITAL_OF_FRANCE);
    let local = common::tpserve_json(&args);
    args.extend(["--comm", "mpi"]);
    for (per_node, layout) in [
        (1, &["--tp", "2"][..]),
        (1, &["--pp-size", "2"]),
        (2, &["--tp", "2", "--pp-size", "2"]),
    ] {
        let on = |cpus: &'static str| [&args[..], layout, &["--cpus", cpus]].concat();
        let (a, b) = (on("0"), on("1"));
        let out = nodes.mpirun([(per_node, &a[..]), (per_node, &b[..])]);
        let got = json_of(&out);
        assert_eq!(got["output_ids"], local["output_ids"], "{layout:?}");
        assert_eq!(
            got["prompt_logits_top"], local["prompt_logits_top"],
            "{layout:?}: logits bit for bit"
        );
    }
}
