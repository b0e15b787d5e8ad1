//! Remote control beyond the seed, against the real OpenCode driven by the
//! fake LLM's scripted tool calls: permissions answered through
//! `reply_permission`, `abort` rejecting what it leaves pending, `wait` any/all
//! over two instances, `diff` after an edit, `send` request ids, and resource
//! notifications seen by the client.
#![allow(deprecated)] // resources/subscribe is legacy in rmcp 3.11, and what clients speak today

mod common;

use std::time::Duration;

use common::mcp_client::{McpServerProc, RelayDir, wait_until_msg};
use common::real_opencode::{FakeLlm, RealOpenCode, RealOpenCodeOptions, require_opencode};
use rmcp::model::SubscribeRequestParams;
use serde_json::{Value, json};

async fn start(llm: &FakeLlm, extra: Option<Value>) -> RealOpenCode {
    let mut opts = RealOpenCodeOptions::new(llm);
    if let Some(e) = extra {
        opts = opts.extra_config(e);
    }
    tokio::task::spawn_blocking(move || RealOpenCode::start(opts))
        .await
        .expect("start opencode")
}

fn register(relay: &RelayDir, name: &str, oc: &RealOpenCode) {
    relay.write_registration(
        name,
        json!({"name": name, "hostname": "h", "port": oc.port(), "cwd": oc.project_dir().display().to_string()}),
    );
}

async fn pending(server: &McpServerProc) -> Vec<Value> {
    let (_, _, out) = server.call_text("permissions", json!({})).await;
    out.and_then(|o| o["pending"].as_array().cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_answered_remotely_and_abort_rejects_what_it_leaves() {
    if require_opencode().is_none() {
        return;
    }
    let llm = FakeLlm::start("unused");
    let oc = start(&llm, Some(json!({"permission": {"bash": "ask"}}))).await;
    let relay = RelayDir::new();
    register(&relay, "perm", &oc);
    let server = McpServerProc::spawn(&[relay.env()]).await;
    wait_until_msg(Duration::from_secs(20), "perm live", || async {
        let (_, _, out) = server.call_text("instances", json!({})).await;
        (out?["instances"][0]["live"] == true).then_some(())
    })
    .await;
    let key = {
        let (_, _, out) = server.call_text("instances", json!({})).await;
        out.expect("instances")["instances"][0]["key"]
            .as_str()
            .expect("key")
            .to_string()
    };
    let session_uri = format!("opencode://instance/{key}/session");
    server
        .client()
        .subscribe(SubscribeRequestParams::new(session_uri.clone()))
        .await
        .expect("subscribe");
    server
        .client()
        .subscribe(SubscribeRequestParams::new("opencode://instances"))
        .await
        .expect("subscribe");

    // 1. A bash call that must be approved: send waits, permissions shows it,
    //    the client is notified, and reply_permission lets the turn finish.
    let send = server.call_text(
        "send",
        json!({"instance": "perm", "new_session": true, "message": "FAKE_BASH echo perm-ok > perm.txt\nFAKE_FINAL all done"}),
    );
    let approve = async {
        let req = wait_until_msg(Duration::from_secs(30), "a pending permission", || async {
            pending(&server).await.into_iter().next()
        })
        .await;
        assert_eq!(req["permission"], "bash");
        assert_eq!(req["patterns"][0], "echo perm-ok > perm.txt");
        server
            .recorder()
            .wait_resource_updated(&session_uri, Duration::from_secs(5))
            .await;
        let (_, _, out) = server.call_text("instances", json!({})).await;
        assert_eq!(
            out.expect("instances")["instances"][0]["pending_permissions"],
            1
        );
        let (text, is_error, _) = server
            .call_text(
                "reply_permission",
                json!({"instance": "perm", "request_id": req["request_id"], "reply": "once"}),
            )
            .await;
        assert!(!is_error, "{text}");
    };
    let ((text, is_error, out), ()) = tokio::join!(send, approve);
    assert!(!is_error, "{text}");
    assert_eq!(out.expect("send output")["outcome"], "completed");
    assert_eq!(text, "all done");
    assert!(
        oc.project_dir().join("perm.txt").exists(),
        "the approved command ran"
    );
    assert!(pending(&server).await.is_empty());
    let (text, is_error, _) = server
        .call_text(
            "reply_permission",
            json!({"instance": "perm", "request_id": "per_gone", "reply": "once"}),
        )
        .await;
    assert!(
        is_error && text.contains("already answered or never existed"),
        "{text}"
    );

    // 2. Abort while a permission is pending: the request is rejected, so a
    //    later approval can never run the command.
    let send = server.call_text(
        "send",
        json!({"instance": "perm", "new_session": true, "message": "FAKE_BASH echo must-not-run > orphan.txt"}),
    );
    let abort = async {
        wait_until_msg(Duration::from_secs(30), "a pending permission", || async {
            pending(&server).await.into_iter().next()
        })
        .await;
        server.call_text("abort", json!({"instance": "perm"})).await
    };
    let ((_, _, sent), (text, is_error, out)) = tokio::join!(send, abort);
    assert!(!is_error, "{text}");
    assert_eq!(
        out.expect("abort output")["rejected_permissions"],
        1,
        "{text}"
    );
    assert_eq!(sent.expect("send output")["outcome"], "aborted");
    wait_until_msg(Duration::from_secs(10), "no pending permission", || async {
        pending(&server).await.is_empty().then_some(())
    })
    .await;
    assert!(
        !oc.project_dir().join("orphan.txt").exists(),
        "the rejected command never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_any_and_all_over_two_instances_and_diff_after_an_edit() {
    if require_opencode().is_none() {
        return;
    }
    let llm = FakeLlm::start_with_args(
        "quick reply",
        &["--slow-chunks", "600", "--slow-delay", "0.1"],
    );
    let a = start(&llm, None).await;
    let b = start(&llm, None).await;
    let relay = RelayDir::new();
    register(&relay, "alpha", &a);
    let server = McpServerProc::spawn(&[relay.env()]).await;
    wait_until_msg(Duration::from_secs(20), "alpha live", || async {
        let (_, _, out) = server.call_text("instances", json!({})).await;
        (out?["instances"][0]["live"] == true).then_some(())
    })
    .await;
    // A second instance appearing is announced as a resource list change.
    server.recorder().clear();
    register(&relay, "beta", &b);
    server
        .recorder()
        .wait_resource_list_changed(1, Duration::from_secs(10))
        .await;
    wait_until_msg(Duration::from_secs(20), "beta live", || async {
        let (_, _, out) = server.call_text("instances", json!({})).await;
        out?["instances"]
            .as_array()?
            .iter()
            .any(|i| i["name"] == "beta" && i["live"] == true)
            .then_some(())
    })
    .await;

    let sa = a.create_session("slow one");
    let sb = b.create_session("quick one");
    a.prompt_async(&sa, "FAKE_SLOW please");
    b.prompt_async(&sb, "FAKE_WRITE notes.txt line one");
    let targets =
        json!([{"instance": "alpha", "session_id": sa}, {"instance": "beta", "session_id": sb}]);

    let (text, is_error, out) = server
        .call_text(
            "wait",
            json!({"targets": targets, "mode": "any", "timeout_ms": 120000}),
        )
        .await;
    assert!(!is_error, "{text}");
    let out = out.expect("wait output");
    assert_eq!(out["timed_out"], false, "{text}");
    assert_eq!(out["targets"][0]["state"], "running", "{text}");
    assert_eq!(out["targets"][1]["state"], "finished", "{text}");

    // `all` times out while alpha runs, then returns once it is stopped.
    let (text, _, out) = server
        .call_text(
            "wait",
            json!({"targets": targets, "mode": "all", "timeout_ms": 300}),
        )
        .await;
    assert_eq!(out.expect("wait output")["timed_out"], true, "{text}");
    let (text, is_error, _) = server
        .call_text("abort", json!({"instance": "alpha", "session_id": sa}))
        .await;
    assert!(!is_error, "{text}");
    let (text, is_error, out) = server
        .call_text(
            "wait",
            json!({"targets": targets, "mode": "all", "timeout_ms": 120000}),
        )
        .await;
    assert!(!is_error, "{text}");
    let out = out.expect("wait output");
    assert_eq!(out["timed_out"], false, "{text}");
    assert_eq!(out["targets"][0]["state"], "aborted", "{text}");
    assert_eq!(out["targets"][1]["state"], "finished", "{text}");
    assert!(
        !server.recorder().snapshot().progress.is_empty(),
        "wait sends progress"
    );

    // diff: the write shows up per file, and the patch pages.
    let (text, is_error, out) = server
        .call_text("diff", json!({"instance": "beta", "session_id": sb}))
        .await;
    assert!(!is_error, "{text}");
    let out = out.expect("diff output");
    let file = &out["files"][0];
    assert_eq!(file["file"], "notes.txt", "{out}");
    assert_eq!(file["additions"], 1);
    assert_eq!(file["status"], "added");
    let (text, is_error, out) = server
        .call_text(
            "diff",
            json!({"instance": "beta", "session_id": sb, "file": "notes.txt"}),
        )
        .await;
    assert!(!is_error, "{text}");
    assert!(
        out.expect("diff output")["patch"]
            .as_str()
            .unwrap_or("")
            .contains("+line one"),
        "{text}"
    );

    // request_id: a retried send does not send the prompt twice.
    let args = json!({"instance": "beta", "session_id": sb, "message": "say it once", "request_id": "req-42"});
    let (first, e1, _) = server.call_text("send", args.clone()).await;
    let (second, e2, _) = server.call_text("send", args).await;
    assert!(!e1 && !e2, "{first} / {second}");
    assert_eq!(first, second);
    let msgs = b.messages(&sb);
    let sent = msgs
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["info"]["role"] == "user" && m["parts"].to_string().contains("say it once"))
        .count();
    assert_eq!(sent, 1, "the prompt went out exactly once");
}
