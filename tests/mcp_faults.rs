//! Faults: dead ports, ports that accept and never answer, 500s, HTML instead
//! of JSON, garbage on the event stream, an instance dying during `send`.
//! Each yields a clear error within the configured timeout, and the server
//! keeps serving the other instances.

mod common;

use std::time::{Duration, Instant};

use common::fake_opencode::{Behaviour, FakeOpenCode, blackhole_port, dead_port};
use common::mcp_client::{McpServerProc, RelayDir, wait_until_msg};
use serde_json::{Value, json};

fn instance(out: &Value, name: &str) -> Option<Value> {
    out["instances"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
}

fn reg(name: &str, port: u16) -> Value {
    json!({"name": name, "hostname": "h", "port": port, "cwd": "/w"})
}

/// Waits until `name` has settled into `status`; returns its entry.
async fn wait_status(server: &McpServerProc, name: &str, status: &str) -> Value {
    wait_until_msg(
        Duration::from_secs(10),
        &format!("{name} to be {status}"),
        || async {
            let (_, _, out) = server.call_text("instances", json!({})).await;
            let i = instance(&out?, name)?;
            (i["status"] == status).then_some(i)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_instances_give_clear_errors_and_never_block_the_healthy_one() {
    let good = FakeOpenCode::start(Behaviour::Healthy).await;
    good.create_session(Some("work"));
    let html = FakeOpenCode::start(Behaviour::Html).await;
    let five = FakeOpenCode::start(Behaviour::Http500).await;
    let (_hole, hole_port) = blackhole_port();
    let relay = RelayDir::new();
    relay.write_registration("good", reg("good", good.port()));
    relay.write_registration("dead", reg("dead", dead_port()));
    relay.write_registration("hang", reg("hang", hole_port));
    relay.write_registration("html", reg("html", html.port()));
    relay.write_registration("five", reg("five", five.port()));
    let server = McpServerProc::spawn(&[relay.env(), ("HEALTH_CHECK_TIMEOUT_MS", "700")]).await;

    let good_entry = wait_status(&server, "good", "online").await;
    assert_eq!(good_entry["activity"], "idle");
    let cases = [
        ("dead", "cannot reach"),
        ("hang", "did not answer within 700ms"),
        ("html", "expected JSON, got text/html"),
        ("five", "HTTP 500"),
    ];
    for (name, why) in cases {
        let e = wait_status(&server, name, "offline").await;
        let reason = e["offline_reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{name}: {reason}");
    }

    // Calls about broken instances fail fast with a sentence saying what to do.
    for (name, why) in cases {
        let t = Instant::now();
        let (text, is_error, _) = server.call_text("read", json!({"instance": name})).await;
        assert!(is_error, "{name}: {text}");
        assert!(
            text.starts_with("Error: Instance") && text.contains("offline") && text.contains(why),
            "{text}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{name} took {:?}",
            t.elapsed()
        );
    }

    // `instances` answers from memory although one port hangs.
    let t = Instant::now();
    for _ in 0..20 {
        server.call_text("instances", json!({})).await;
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "20 instances calls took {:?}",
        t.elapsed()
    );

    // And the healthy instance still works end to end.
    let (text, is_error, _) = server
        .call_text("send", json!({"instance": "good", "message": "hi"}))
        .await;
    assert!(!is_error, "{text}");
    assert_eq!(text, common::fake_opencode::DEFAULT_REPLY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_event_stream_is_survived_and_reported_by_send_within_its_timeout() {
    let good = FakeOpenCode::start(Behaviour::Healthy).await;
    let junk = FakeOpenCode::start(Behaviour::GarbageSse).await;
    junk.create_session(Some("s"));
    let relay = RelayDir::new();
    relay.write_registration("good", reg("good", good.port()));
    relay.write_registration("junk", reg("junk", junk.port()));
    let server = McpServerProc::spawn(&[
        relay.env(),
        ("SEND_TIMEOUT_MS", "1500"),
        ("HEALTH_CHECK_TIMEOUT_MS", "700"),
    ])
    .await;
    wait_status(&server, "junk", "online").await;

    let t = Instant::now();
    let (text, is_error, out) = server
        .call_text("send", json!({"instance": "junk", "message": "hi"}))
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "send took {:?}",
        t.elapsed()
    );
    let outcome = out
        .as_ref()
        .map(|o| o["outcome"].clone())
        .unwrap_or(Value::Null);
    // Garbage never leaks into the answer: either the reply is recovered from
    // the stored messages once the stream is re-established, or the failure is
    // named; and it never waits past SEND_TIMEOUT_MS.
    if is_error {
        assert!(
            text.contains("event stream") || outcome == "failed",
            "{text} / {outcome}"
        );
    } else {
        assert!(
            outcome == "completed" || outcome == "timeout",
            "{text} / {outcome}"
        );
        if outcome == "completed" {
            assert_eq!(text, common::fake_opencode::DEFAULT_REPLY);
        }
    }
    // The over-long line is refused by the size cap, and said so.
    server
        .wait_stderr("event-stream line longer than", Duration::from_secs(5))
        .await;
    assert!(!server.has_exited(), "the server survives");
    let (text, is_error, _) = server
        .call_text("send", json!({"instance": "good", "message": "hi"}))
        .await;
    assert!(!is_error, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_dying_during_send_is_reported_at_once() {
    let other = FakeOpenCode::start(Behaviour::Healthy).await;
    let doomed = FakeOpenCode::start(Behaviour::DieDuringSend).await;
    doomed.create_session(Some("s"));
    let relay = RelayDir::new();
    relay.write_registration("other", reg("other", other.port()));
    relay.write_registration("doomed", reg("doomed", doomed.port()));
    let server = McpServerProc::spawn(&[
        relay.env(),
        ("SEND_TIMEOUT_MS", "30000"),
        ("HEALTH_CHECK_TIMEOUT_MS", "700"),
    ])
    .await;
    wait_until_msg(Duration::from_secs(10), "doomed live", || async {
        let (_, _, out) = server.call_text("instances", json!({})).await;
        (instance(&out?, "doomed")?["live"] == true).then_some(())
    })
    .await;

    let t = Instant::now();
    let (text, is_error, out) = server
        .call_text("send", json!({"instance": "doomed", "message": "hi"}))
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "noticed after {:?}, not after SEND_TIMEOUT_MS",
        t.elapsed()
    );
    assert!(is_error, "{text}");
    assert_eq!(out.expect("structured")["outcome"], "failed");
    assert!(
        text.contains("went offline") && text.contains("Received so far"),
        "{text}"
    );
    wait_status(&server, "doomed", "offline").await;
    let (text, is_error, _) = server
        .call_text("send", json!({"instance": "other", "message": "hi"}))
        .await;
    assert!(!is_error, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_stops_waiting() {
    let slow = FakeOpenCode::start(Behaviour::Healthy).await;
    slow.create_session(Some("s"));
    let relay = RelayDir::new();
    relay.write_registration("slow", reg("slow", slow.port()));
    let server = McpServerProc::spawn(&[relay.env()]).await;
    wait_status(&server, "slow", "online").await;
    let call = server
        .call_cancellable(
            "send",
            json!({"instance": "slow", "message": "FAKE_SLOW forever"}),
        )
        .await;
    server
        .recorder()
        .wait_progress_count(1, Duration::from_secs(10))
        .await;
    call.cancel("test").await;
    // The server stops following the reply as soon as the cancellation arrives.
    server
        .wait_stderr("send cancelled by the client", Duration::from_secs(5))
        .await;
    // And the server still answers.
    let (_, is_error, _) = server.call_text("instances", json!({})).await;
    assert!(!is_error);
}
