//! The server against the real OpenCode (npm opencode-linux-x64@1.18.33),
//! answered by our fake LLM, registered through a relay file and driven over
//! MCP stdio: once without and once with OPENCODE_SERVER_PASSWORD.

mod common;

use std::time::Duration;

use common::mcp_client::{McpServerProc, RelayDir, wait_until_msg};
use common::real_opencode::{FakeLlm, RealOpenCode, RealOpenCodeOptions, require_opencode};
use serde_json::{Value, json};

const REPLY: &str = "Hello from the fake LLM in the real-OpenCode test.";

fn instance<'a>(out: &'a Value, name: &str) -> Option<&'a Value> {
    out["instances"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

async fn start_opencode(llm: &FakeLlm, password: Option<&str>) -> RealOpenCode {
    let mut opts = RealOpenCodeOptions::new(llm);
    if let Some(pw) = password {
        opts = opts.password(pw);
    }
    tokio::task::spawn_blocking(move || RealOpenCode::start(opts))
        .await
        .expect("start opencode")
}

async fn drive_real_opencode(password: Option<&str>) {
    if require_opencode().is_none() {
        return;
    }
    let llm = FakeLlm::start_with_args(REPLY, &["--slow-delay", "0.1"]);
    let oc = start_opencode(&llm, password).await;
    let relay = RelayDir::new();
    relay.write_registration(
        "real",
        json!({"name": "real-oc", "hostname": "test-host", "port": oc.port(), "localPort": oc.port(),
               "cwd": oc.project_dir().display().to_string(), "connectedAt": "2026-11-25T18:00:00Z"}),
    );
    let mut env = vec![relay.env()];
    if let Some(pw) = password {
        env.push(("OPENCODE_SERVER_PASSWORD", pw));
    }
    let server = McpServerProc::spawn(&env).await;

    // instances: online and idle, with live status from the event stream.
    let listed = wait_until_msg(
        Duration::from_secs(20),
        "real-oc online, idle and live",
        || async {
            let (_, _, out) = server.call_text("instances", json!({})).await;
            let out = out?;
            let i = instance(&out, "real-oc")?;
            (i["status"] == "online" && i["activity"] == "idle" && i["live"] == true)
                .then(|| i.clone())
        },
    )
    .await;
    assert_eq!(listed["version"], "1.18.33");
    assert_eq!(listed["reach"], "loopback");
    let (text, is_error, _) = server.call_text("instances", json!({})).await;
    assert!(!is_error);
    assert!(
        text.contains("**real-oc** (test-host:") && text.contains("online | idle"),
        "{text}"
    );

    // send: the fake reply comes back, streamed as one progress notification per delta.
    server.recorder().clear();
    let (text, is_error, out) = server
        .call_text(
            "send",
            json!({"instance": "real", "message": "hello there"}),
        )
        .await;
    assert!(!is_error, "{text}");
    assert_eq!(text, REPLY);
    let out = out.expect("structured send output");
    assert_eq!(out["outcome"], "completed");
    let sid = out["session_id"].as_str().expect("session id").to_string();
    let mut progress = server.recorder().snapshot().progress;
    assert!(
        progress.len() >= 2,
        "expected one progress notification per delta, got {}",
        progress.len()
    );
    // Notifications may be handled out of order by the client; `progress`
    // (the length received so far) orders them.
    progress.sort_by(|a, b| a.progress.total_cmp(&b.progress));
    let streamed: String = progress.iter().filter_map(|p| p.message.clone()).collect();
    assert_eq!(streamed, REPLY, "the deltas spell the reply");
    assert_eq!(
        progress.last().map(|p| p.progress as usize),
        Some(REPLY.len())
    );

    // read: both messages of that session.
    let (text, is_error, out) = server
        .call_text("read", json!({"instance": "real-oc"}))
        .await;
    assert!(!is_error, "{text}");
    let out = out.expect("structured read output");
    assert_eq!(out["session_id"], sid.as_str());
    let msgs = out["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 2, "{out}");
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["text"], "hello there");
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["text"], REPLY);
    assert!(
        text.contains("**User**") && text.contains("**Assistant**") && text.contains(REPLY),
        "{text}"
    );

    // sessions: lists that session.
    let (_, is_error, out) = server
        .call_text("sessions", json!({"instance": "real-oc"}))
        .await;
    assert!(!is_error);
    let out = out.expect("structured sessions output");
    assert!(
        out["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .any(|s| s["id"] == sid.as_str()),
        "{out}"
    );

    // send with abort stops a slow reply, and the waiting send reports the abort.
    server.recorder().clear();
    let slow = server.call_text(
        "send",
        json!({"instance": "real-oc", "message": "FAKE_SLOW count for me"}),
    );
    let abort = async {
        wait_until_msg(
            Duration::from_secs(30),
            "the slow prompt to make the instance busy",
            || async {
                let (_, _, out) = server.call_text("instances", json!({})).await;
                (instance(&out?, "real-oc")?["activity"] == "busy").then_some(())
            },
        )
        .await;
        wait_until_msg(
            Duration::from_secs(30),
            "the first streamed tick",
            || async {
                let got = server.recorder().snapshot().progress;
                got.iter()
                    .any(|p| p.message.as_deref().is_some_and(|m| m.contains("tick")))
                    .then_some(())
            },
        )
        .await;
        server
            .call_text("send", json!({"instance": "real-oc", "abort": true}))
            .await
    };
    let ((slow_text, slow_err, slow_out), (abort_text, abort_err, _)) = tokio::join!(slow, abort);
    assert!(!abort_err, "{abort_text}");
    assert!(
        abort_text.starts_with("Aborted active task on real-oc."),
        "{abort_text}"
    );
    assert!(!slow_err, "{slow_text}");
    assert_eq!(
        slow_out.expect("structured")["outcome"],
        "aborted",
        "{slow_text}"
    );
    assert!(
        slow_text.contains("tick 0"),
        "partial text is returned: {slow_text}"
    );
    wait_until_msg(
        Duration::from_secs(10),
        "idle again after the abort",
        || async {
            let (_, _, out) = server.call_text("instances", json!({})).await;
            (instance(&out?, "real-oc")?["activity"] == "idle").then_some(())
        },
    )
    .await;

    if password.is_some() {
        // A server without the password lists the instance as offline and says why.
        let blind = McpServerProc::spawn(&[relay.env()]).await;
        let reason = wait_until_msg(
            Duration::from_secs(10),
            "offline with a 401 reason",
            || async {
                let (_, _, out) = blind.call_text("instances", json!({})).await;
                let i = instance(&out?, "real-oc")?.clone();
                (i["status"] == "offline")
                    .then(|| i["offline_reason"].as_str().unwrap_or("").to_string())
            },
        )
        .await;
        assert!(
            reason.contains("401") && reason.contains("OPENCODE_SERVER_PASSWORD"),
            "{reason}"
        );
        let (text, is_error, _) = blind
            .call_text("read", json!({"instance": "real-oc"}))
            .await;
        assert!(is_error && text.contains("offline"), "{text}");
        assert!(
            !text.contains(password.unwrap_or("-")),
            "no secret in errors"
        );
    }
}

// One test, two runs in a row: each real OpenCode takes ~400 MB and most of a
// core while it loads; two at once on a 2-core machine starve each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_real_opencode_over_mcp_without_and_with_password() {
    drive_real_opencode(None).await;
    drive_real_opencode(Some("s3cret-pw")).await;
}
