//! `opencode-agent` on a LAN, end to end across network namespaces: two
//! agents with the real OpenCode (`run --serve --bind lan`, password set, the
//! fake LLM beside them) in one directory of namespace A, `opencode-mcp` with
//! TRANSPORT=mdns in namespace B.
//!
//! One scenario, so that its two OpenCodes (≈3 s and ≈400 MB each) serve
//! every assertion: both instances appear (same directory, same default
//! name, distinct ids); `send` through the MCP server gets the fake LLM's
//! reply and `read` shows it; kill -9 of one agent and its OpenCode takes that
//! instance offline (or away) within 5 s; SIGTERM to the other removes it
//! from `instances` within 2 s. Needs root and the real OpenCode (skips
//! loudly otherwise; under `CI` it must run).

#[path = "../../tests/common"]
mod common {
    pub mod netns;
}

use std::time::{Duration, Instant};

use common::netns::{
    FAKE_REPLY, FakeLlm, Mcp, Netns, Proc, TempDir, alive, children_of, cmdline, opencode_env,
    poll, project_dir, require_opencode, require_root, result_text,
};
use serde_json::{Value, json};

const PASSWORD: &str = "lan-test-secret";

/// Starts `opencode-agent run --serve --bind lan` in host `i`, in `project`.
fn start_agent(
    net: &Netns,
    i: usize,
    label: &str,
    project: &std::path::Path,
    state: &std::path::Path,
    opencode: &std::path::Path,
    llm: &FakeLlm,
) -> Proc {
    let mut cmd = net.command(i, env!("CARGO_BIN_EXE_opencode-agent"));
    cmd.args(["run", "--serve", "--bind", "lan"])
        .current_dir(project)
        .env_clear();
    for (k, v) in opencode_env(state, &llm.base_url()) {
        cmd.env(k, v);
    }
    cmd.env("OPENCODE_BIN", opencode)
        .env("OPENCODE_SERVER_PASSWORD", PASSWORD)
        .env("OPENCODE_AGENT_LOG", "stderr")
        .env("RUST_LOG", "info");
    Proc::spawn(label, cmd)
}

fn instance(mcp: &Mcp, key: &str) -> Option<Value> {
    mcp.find_instance(|i| i["key"] == key)
}

#[test]
fn two_agents_in_one_directory_are_visible_drivable_and_leave_within_deadlines() {
    if !require_root() {
        return;
    }
    let Some(opencode) = require_opencode() else {
        return;
    };
    let net = Netns::create(2);
    let tmp = TempDir::new("lan-agents");
    let project = project_dir(&tmp, "shared-proj");
    let relay_dir = tmp.subdir("relay").display().to_string();
    let llm = FakeLlm::start(&net, 0, FAKE_REPLY);

    let mcp = Mcp::start(
        &net,
        1,
        &[
            ("TRANSPORT", "mdns"),
            ("RELAY_REGISTRY_DIR", &relay_dir),
            ("OPENCODE_SERVER_PASSWORD", PASSWORD),
        ],
    );
    let mut first = start_agent(
        &net,
        0,
        "agent-1",
        &project,
        &tmp.subdir("oc1"),
        &opencode,
        &llm,
    );
    let mut second = start_agent(
        &net,
        0,
        "agent-2",
        &project,
        &tmp.subdir("oc2"),
        &opencode,
        &llm,
    );

    // Both appear, online, through mDNS from the other namespace.
    let online = poll(Duration::from_secs(90), "two online instances", || {
        let v = mcp.instances();
        let list: Vec<Value> = v["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["status"] == "online" && i["transport"] == "mdns")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        (list.len() == 2).then_some(list)
    });
    let addr_a = net.addr(0).to_string();
    for i in &online {
        assert_eq!(i["cwd"], project.display().to_string(), "{i}");
        assert_eq!(i["reach"], "lan", "{i}");
        assert!(
            i["url"]
                .as_str()
                .is_some_and(|u| u.starts_with(&format!("http://{addr_a}:"))),
            "{i}"
        );
    }
    assert_ne!(
        online[0]["key"], online[1]["key"],
        "distinct ids: {online:?}"
    );
    assert_eq!(
        online[0]["name"], online[1]["name"],
        "same default name in one directory: {online:?}"
    );
    // Which instance belongs to which agent: the agent logs its port.
    let port_of = |i: &Value| -> String {
        i["url"]
            .as_str()
            .and_then(|u| u.rsplit(':').next())
            .unwrap_or_default()
            .to_string()
    };
    let first_line = first.wait_line("mDNS advertisement published", Duration::from_secs(5));
    let (key1, key2) = if first_line
        .text
        .contains(&format!("port={}", port_of(&online[0])))
    {
        (online[0]["key"].clone(), online[1]["key"].clone())
    } else {
        (online[1]["key"].clone(), online[0]["key"].clone())
    };
    let key1 = key1.as_str().expect("key").to_string();
    let key2 = key2.as_str().expect("key").to_string();

    // send / read across the namespaces, addressed by key (the names are equal).
    let sent = mcp.call(
        "send",
        json!({ "instance": key1, "message": "Say hello across namespaces" }),
        Duration::from_secs(180),
    );
    let sent_text = result_text(&sent);
    assert_ne!(sent["isError"], json!(true), "{sent}");
    assert!(sent_text.contains(FAKE_REPLY), "send: {sent}");
    let read = mcp.call("read", json!({ "instance": key1 }), Duration::from_secs(30));
    assert!(result_text(&read).contains(FAKE_REPLY), "read: {read}");

    // kill -9 of the second agent and its OpenCode: offline (or gone) within 5 s.
    let oc2: Vec<u32> = children_of(second.pid())
        .into_iter()
        .filter(|p| cmdline(*p).contains("serve"))
        .collect();
    assert!(!oc2.is_empty(), "no OpenCode child of agent 2");
    let t0 = Instant::now();
    second.kill();
    for pid in &oc2 {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    poll(
        Duration::from_secs(5),
        "agent 2 offline or gone within 5 s",
        || match instance(&mcp, &key2) {
            None => Some(()),
            Some(i) if i["status"] == "offline" => Some(()),
            Some(_) => None,
        },
    );
    eprintln!("kill -9 → offline/gone after {:?}", t0.elapsed());
    assert!(
        oc2.iter().all(|p| !alive(*p)),
        "OpenCode 2 survived kill -9"
    );
    // The first instance is unaffected.
    assert_eq!(
        instance(&mcp, &key1).map(|i| i["status"].clone()),
        Some(json!("online"))
    );

    // SIGTERM to the first agent: gone from `instances` within 2 s.
    let t0 = Instant::now();
    first.signal("TERM");
    poll(
        Duration::from_secs(2),
        "agent 1 gone within 2 s of SIGTERM",
        || instance(&mcp, &key1).is_none().then_some(()),
    );
    eprintln!("SIGTERM → gone after {:?}", t0.elapsed());
    let status = first.wait_exit(Duration::from_secs(15));
    assert!(status.is_some(), "agent 1 did not exit after SIGTERM");
}
