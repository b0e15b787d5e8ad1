//! Benchmark figures (not a pass/fail test): how fast an agent's instance
//! becomes visible to `opencode-mcp` in another network namespace, and how
//! fast it leaves after a clean stop. Also the agent's RSS and idle CPU.
//!
//! Run (root, real OpenCode installed):
//!
//! ```sh
//! cargo test -p opencode-agent --test lan_bench -- --ignored --nocapture
//! LAN_BENCH_RUNS=5 cargo test -p opencode-agent --test lan_bench -- --ignored --nocapture
//! ```
//!
//! Per run: `opencode-agent run --serve --bind lan` starts in namespace A
//! while `opencode-mcp` (TRANSPORT=mdns) already runs in namespace B; the
//! test polls the `instances` tool every ~2 ms. "healthy" is when the agent
//! logs `OpenCode is healthy` (read from its stderr as it is written).

#[path = "../../tests/common"]
mod common {
    pub mod netns;
}

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::netns::{
    FAKE_REPLY, FakeLlm, Mcp, Netns, Proc, TempDir, opencode_env, project_dir, require_opencode,
    require_root,
};
use serde_json::Value;

const PASSWORD: &str = "bench-secret";
const FAST_POLL: Duration = Duration::from_millis(2);

/// Polls `f` every [`FAST_POLL`]; returns when it first held, or `None`.
fn first_time(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Some(Instant::now());
        }
        thread::sleep(FAST_POLL);
    }
    None
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (VmRSS in KiB, utime+stime in clock ticks) of `pid`.
fn rss_and_cpu(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After `pid (comm)`: state is field 0, utime 11, stime 12.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (rss, ticks(11) + ticks(12))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn lan_discovery_latency_figures() {
    if !require_root() {
        return;
    }
    let Some(opencode) = require_opencode() else {
        return;
    };
    let runs: usize = std::env::var("LAN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let net = Netns::create(2);
    let tmp = TempDir::new("lan-bench");
    let project = project_dir(&tmp, "bench-proj");
    let relay_dir = tmp.subdir("relay").display().to_string();
    let llm = FakeLlm::start(&net, 0, FAKE_REPLY);
    let mcp = Mcp::start(
        &net,
        1,
        &[
            ("TRANSPORT", "mdns"),
            ("RELAY_REGISTRY_DIR", &relay_dir),
            ("OPENCODE_SERVER_PASSWORD", PASSWORD),
            ("RUST_LOG", "opencode_mcp=info"),
        ],
    );
    let (mut visible, mut online, mut gone, mut published) = (vec![], vec![], vec![], vec![]);
    let mut agent_rss = vec![];
    let mut agent_cpu = vec![];
    for run in 1..=runs {
        let state = tmp.subdir(&format!("oc{run}"));
        let mut agent = Proc::spawn(&format!("agent-run{run}"), {
            let mut cmd = net.command(0, env!("CARGO_BIN_EXE_opencode-agent"));
            cmd.args([
                "run",
                "--serve",
                "--bind",
                "lan",
                "--name",
                &format!("bench-{run}"),
            ])
            .current_dir(&project)
            .env_clear();
            for (k, v) in opencode_env(&state, &llm.base_url()) {
                cmd.env(k, v);
            }
            cmd.env("OPENCODE_BIN", &opencode)
                .env("OPENCODE_SERVER_PASSWORD", PASSWORD)
                .env("OPENCODE_AGENT_LOG", "stderr")
                .env("RUST_LOG", "info");
            cmd
        });
        let name = format!("bench-{run}");
        let listed = |want_online: bool| {
            mcp.find_instance(|i: &Value| {
                i["name"] == name.as_str() && (!want_online || i["status"] == "online")
            })
            .is_some()
        };
        let t_visible = first_time(Duration::from_secs(90), || listed(false))
            .expect("instance never became visible");
        let t_online = first_time(Duration::from_secs(30), || listed(true))
            .expect("instance never became online");
        let healthy = agent
            .wait_line("OpenCode is healthy", Duration::from_secs(1))
            .at;
        let pub_line = agent
            .wait_line("mDNS advertisement published", Duration::from_secs(1))
            .at;
        visible.push(ms(t_visible.saturating_duration_since(healthy)));
        online.push(ms(t_online.saturating_duration_since(healthy)));
        published.push(ms(pub_line.saturating_duration_since(healthy)));

        // Idle: RSS, and CPU over 5 s.
        let (_, cpu0) = rss_and_cpu(agent.pid());
        thread::sleep(Duration::from_secs(5));
        let (rss, cpu1) = rss_and_cpu(agent.pid());
        agent_rss.push(rss as f64 / 1024.0);
        // Clock ticks are 1/100 s on Linux: percent of one core = ticks / 5 s.
        agent_cpu.push((cpu1 - cpu0) as f64 / 5.0);

        let t_term = Instant::now();
        agent.signal("TERM");
        let t_gone = first_time(Duration::from_secs(10), || !listed(false))
            .expect("instance did not leave after SIGTERM");
        gone.push(ms(t_gone - t_term));
        agent.wait_exit(Duration::from_secs(15));
        eprintln!(
            "run {run}: healthy→published {:.1} ms, →visible {:.1} ms, →online {:.1} ms; SIGTERM→gone {:.1} ms; agent RSS {:.1} MiB, idle CPU {:.2} %",
            published[run - 1],
            visible[run - 1],
            online[run - 1],
            gone[run - 1],
            agent_rss[run - 1],
            agent_cpu[run - 1]
        );
    }
    println!("\nLAN discovery figures ({runs} runs, medians; poll period {FAST_POLL:?}):");
    println!(
        "  agent healthy → advertisement published: {:.1} ms",
        median(&mut published)
    );
    println!(
        "  agent healthy → visible in `instances` (other netns): {:.1} ms (target ≤ 500 ms)",
        median(&mut visible)
    );
    println!(
        "  agent healthy → online in `instances`: {:.1} ms",
        median(&mut online)
    );
    println!(
        "  SIGTERM → gone from `instances`: {:.1} ms (target ≤ 2000 ms)",
        median(&mut gone)
    );
    println!(
        "  agent RSS: {:.1} MiB (target ≤ 6 MiB); idle CPU: {:.2} % of one core",
        median(&mut agent_rss),
        median(&mut agent_cpu)
    );
}
