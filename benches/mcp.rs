//! Benchmark of the `opencode-mcp` server over real MCP stdio (`cargo bench --bench mcp`).
//!
//! Prints figures; asserts nothing. Everything runs on loopback: fake OpenCode
//! servers in this process, the server as a child process driven by the rmcp
//! client.
//!
//! Figures:
//! 1. spawn → `initialize` reply (empty registry, and with 1000 registrations);
//! 2. `instances` latency with 1000 registrations, 100 of which point at ports
//!    that accept and never answer;
//! 3. time from an atomic write of a new registration file until `read` on it
//!    succeeds, with no `instances` call;
//! 4. the server's RSS (VmRSS, VmHWM) after the workload.

#[path = "../tests/common/fake_opencode.rs"]
mod fake_opencode;

use std::path::Path;
use std::time::{Duration, Instant};

use fake_opencode::{Behaviour, FakeOpenCode, blackhole_port};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

/// The server under test; BENCH_SERVER=<path> runs another build of it (for
/// example one with frame pointers, for `perf`).
fn server_bin() -> std::ffi::OsString {
    std::env::var_os("BENCH_SERVER").unwrap_or_else(|| env!("CARGO_BIN_EXE_opencode-mcp").into())
}

struct Stats(Vec<f64>);

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    fn line(&self, what: &str) {
        println!(
            "{what:<58} median {:>8.2} ms  p90 {:>8.2} ms  min {:>8.2} ms  max {:>8.2} ms  (n={})",
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.0),
            self.pct(1.0),
            self.0.len()
        );
    }
}

/// With BENCH_SERVER_LOG=<dir>, each server logs at debug level to a file
/// in <dir> (for finding where time goes; it slows the server down).
fn server_stderr() -> (String, std::process::Stdio) {
    let Some(dir) = std::env::var_os("BENCH_SERVER_LOG") else {
        return ("error".into(), std::process::Stdio::null());
    };
    let path = Path::new(&dir).join(format!(
        "server-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0)
    ));
    match std::fs::File::create(&path) {
        Ok(f) => ("opencode_mcp=debug".into(), f.into()),
        Err(e) => panic!("BENCH_SERVER_LOG: cannot create {}: {e}", path.display()),
    }
}

async fn spawn(relay: &Path) -> (RunningService<RoleClient, ()>, u32, f64) {
    let (log, stderr) = server_stderr();
    let cmd = tokio::process::Command::new(server_bin()).configure(|c| {
        c.env("RELAY_REGISTRY_DIR", relay)
            .env("TRANSPORT", "local-relay")
            .env("RUST_LOG", log)
            .env("HEALTH_CHECK_TIMEOUT_MS", "3000");
    });
    let t0 = Instant::now();
    // The builder: `TokioChildProcess::new` would let stderr through.
    let (child, _) = TokioChildProcess::builder(cmd)
        .stderr(stderr)
        .spawn()
        .expect("spawn opencode-mcp");
    let pid = child.id().unwrap_or(0);
    let client = ().serve(child).await.expect("initialize");
    (client, pid, t0.elapsed().as_secs_f64() * 1000.0)
}

async fn call(
    client: &RunningService<RoleClient, ()>,
    name: &str,
    args: Value,
) -> (bool, Option<Value>) {
    let mut p = CallToolRequestParams::new(name.to_string());
    if let Value::Object(m) = args {
        p = p.with_arguments(m);
    }
    let r = client.call_tool(p).await.expect("tools/call");
    (r.is_error != Some(true), r.structured_content)
}

fn write_atomic(dir: &Path, stem: &str, body: &Value) {
    let tmp = dir.join(format!(".{stem}.tmp"));
    std::fs::write(&tmp, body.to_string()).expect("write");
    std::fs::rename(&tmp, dir.join(format!("{stem}.json"))).expect("rename");
}

/// A bare JSON-RPC client over the server's stdio: one line out, lines in
/// until the answer, each parsed into a `serde_json::Value` (as a JavaScript
/// client's `JSON.parse` would). It measures the server and the pipe, without
/// the rmcp client's typed decoding, which for a large answer costs more than
/// the server does.
struct RawClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    next_id: u64,
}

impl RawClient {
    async fn spawn(relay: &Path) -> RawClient {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(server_bin())
            .env("RELAY_REGISTRY_DIR", relay)
            .env("TRANSPORT", "local-relay")
            .env("RUST_LOG", "error")
            .env("HEALTH_CHECK_TIMEOUT_MS", "3000")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn opencode-mcp");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let mut c = RawClient {
            child,
            stdin,
            lines: tokio::io::BufReader::new(stdout).lines(),
            next_id: 0,
        };
        c.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}),
        )
        .await;
        c.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        c
    }

    async fn send(&mut self, msg: &Value) {
        use tokio::io::AsyncWriteExt;
        let mut line = msg.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.expect("write");
    }

    /// Sends a request; returns its result and the answer's size in bytes.
    async fn request(&mut self, method: &str, params: Value) -> (Value, usize) {
        self.next_id += 1;
        let id = self.next_id;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .expect("read")
                .expect("server closed stdout");
            let mut msg: Value = serde_json::from_str(&line).expect("JSON-RPC line");
            if msg["id"] == id {
                return (msg["result"].take(), line.len());
            }
        }
    }

    async fn close(mut self) {
        let _ = self.child.kill().await;
    }
}

/// CPU time the process has used (user + system), in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime and
    // stime are the 12th and 13th.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum()
}

fn rss_kb(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --all-targets` runs bench targets too, without `--bench`:
    // the benchmark proper only runs under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "benches/mcp.rs: run `cargo bench --bench mcp` for figures; nothing to do under cargo test"
        );
        return;
    }
    println!(
        "opencode-mcp benchmark ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // 1a. initialize with an empty registry.
    let empty = tempfile::tempdir().expect("tempdir");
    let mut init = Stats(vec![]);
    for _ in 0..20 {
        let (client, _, ms) = spawn(empty.path()).await;
        init.0.push(ms);
        let _ = client.cancel().await;
    }
    init.line("spawn → initialize reply, empty registry");

    // The fleet: 9 healthy fakes serving 900 registrations, 100 black holes.
    let mut fakes = Vec::new();
    for _ in 0..9 {
        fakes.push(FakeOpenCode::start(Behaviour::Healthy).await);
    }
    let mut holes = Vec::new();
    let relay = tempfile::tempdir().expect("tempdir");
    for i in 0..1000 {
        let port = if i % 10 == 9 {
            let (l, p) = blackhole_port();
            holes.push(l);
            p
        } else {
            fakes[i % 9].port()
        };
        write_atomic(
            relay.path(),
            &format!("inst-{i:04}"),
            &json!({"name": format!("inst-{i:04}"), "hostname": "bench", "port": port, "cwd": "/bench"}),
        );
    }

    // 1b. initialize with 1000 registrations (100 hanging).
    let mut init_full = Stats(vec![]);
    for _ in 0..10 {
        let (client, _, ms) = spawn(relay.path()).await;
        init_full.0.push(ms);
        let _ = client.cancel().await;
    }
    init_full.line("spawn → initialize reply, 1000 registrations (100 hang)");

    // 2. instances latency, first through a bare JSON-RPC client.
    let mut raw = RawClient::spawn(relay.path()).await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let (out, _) = raw
            .request("tools/call", json!({"name": "instances", "arguments": {}}))
            .await;
        if out["structuredContent"]["counts"]["online"] == 900 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (what, args) in [
        ("instances (bare JSON-RPC client)", json!({})),
        (
            "instances limit=1000 (bare JSON-RPC client)",
            json!({"limit": 1000}),
        ),
    ] {
        let mut inst = Stats(vec![]);
        let mut bytes = 0;
        for _ in 0..100 {
            let t = Instant::now();
            let (out, size) = raw
                .request(
                    "tools/call",
                    json!({"name": "instances", "arguments": args}),
                )
                .await;
            inst.0.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(out["structuredContent"]["counts"]["total"], 1000);
            bytes = size;
        }
        inst.line(what);
        println!("{:<58} {} KB", "  answer size", bytes / 1024);
    }
    raw.close().await;

    // Then through the rmcp client, as the tests use it.
    let (client, pid, _) = spawn(relay.path()).await;
    let t0 = Instant::now();
    loop {
        let (_, out) = call(&client, "instances", json!({})).await;
        let online = out
            .as_ref()
            .and_then(|v| v["counts"]["online"].as_u64())
            .unwrap_or(0);
        if online == 900 || t0.elapsed() > Duration::from_secs(30) {
            println!(
                "900 healthy of 1000 registrations online after {:.0} ms",
                t0.elapsed().as_secs_f64() * 1000.0
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The call a client makes (no arguments: the first page, 50 instances,
    // with counts over all 1000), then the whole fleet in one answer.
    for (what, args) in [
        ("instances, 1000 registrations (100 hang)", json!({})),
        (
            "instances limit=1000 (whole fleet in one answer)",
            json!({"limit": 1000}),
        ),
    ] {
        let mut inst = Stats(vec![]);
        for _ in 0..100 {
            let t = Instant::now();
            let (ok, out) = call(&client, "instances", args.clone()).await;
            assert!(ok);
            inst.0.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(out.map(|o| o["counts"]["total"].clone()), Some(json!(1000)));
        }
        inst.line(what);
    }

    // Idle cost: nothing asked, 900 event streams open (heartbeats every 10 s).
    let ticks = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!(
        "server CPU while idle with 1000 registrations: {} ticks (10 ms each) over 10 s",
        cpu_ticks(pid) - ticks
    );

    // 3. new registration file → read succeeds, no instances call.
    let mut usable = Stats(vec![]);
    for round in 0..20 {
        let fake = FakeOpenCode::start(Behaviour::Healthy).await;
        fake.create_session(Some("bench"));
        let name = format!("fresh-{round}");
        let t0_wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let t = Instant::now();
        write_atomic(
            relay.path(),
            &name,
            &json!({"name": name, "port": fake.port()}),
        );
        loop {
            let (ok, _) = call(&client, "read", json!({"instance": name})).await;
            if ok {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                println!("read on {name} never succeeded");
                break;
            }
        }
        usable.0.push(t.elapsed().as_secs_f64() * 1000.0);
        if std::env::var_os("BENCH_SERVER_LOG").is_some() {
            println!(
                "  {name}: written at {:?}, read ok after {:?}",
                t0_wall,
                t.elapsed()
            );
        }
        std::fs::remove_file(relay.path().join(format!("{name}.json"))).ok();
        fakes.push(fake);
    }
    usable.line("atomic write of a new file → read succeeds");

    // 4. RSS after a workload of sends and reads on top of the above.
    for i in 0..50 {
        let name = format!("inst-{:04}", (i * 10) % 1000);
        call(
            &client,
            "send",
            json!({"instance": name, "message": format!("hello {i}")}),
        )
        .await;
        call(&client, "read", json!({"instance": name})).await;
        call(&client, "sessions", json!({"instance": name})).await;
    }
    let (rss, hwm) = rss_kb(pid);
    println!(
        "server RSS after the workload (1000 instances, 900 live event streams): VmRSS {:.1} MB, VmHWM {:.1} MB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    let _ = client.cancel().await;

    // RSS of a small fleet, the common case.
    let small = tempfile::tempdir().expect("tempdir");
    for (i, f) in fakes.iter().take(5).enumerate() {
        write_atomic(
            small.path(),
            &format!("small-{i}"),
            &json!({"name": format!("small-{i}"), "port": f.port()}),
        );
    }
    let (client, pid, _) = spawn(small.path()).await;
    let mut usable_small = Stats(vec![]);
    for round in 0..20 {
        let fake = FakeOpenCode::start(Behaviour::Healthy).await;
        fake.create_session(Some("bench"));
        let name = format!("fresh-small-{round}");
        let t = Instant::now();
        write_atomic(
            small.path(),
            &name,
            &json!({"name": name, "port": fake.port()}),
        );
        while !call(&client, "read", json!({"instance": name})).await.0 {
            if t.elapsed() > Duration::from_secs(10) {
                println!("read on {name} never succeeded");
                break;
            }
        }
        usable_small.0.push(t.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_file(small.path().join(format!("{name}.json"))).ok();
    }
    usable_small.line("atomic write of a new file → read succeeds (5 instances)");
    for i in 0..20 {
        let name = format!("small-{}", i % 5);
        call(&client, "instances", json!({})).await;
        call(
            &client,
            "send",
            json!({"instance": name, "message": format!("hi {i}")}),
        )
        .await;
        call(&client, "read", json!({"instance": name})).await;
    }
    let (rss, hwm) = rss_kb(pid);
    println!(
        "server RSS after the workload (5 instances): VmRSS {:.1} MB, VmHWM {:.1} MB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    let _ = client.cancel().await;
    drop(holes);
}
