//! Proves the real-opencode test harness (tests/common/real_opencode.rs) and the fake LLM
//! fixture (tests/fixtures/fake_llm.py) work: a real `opencode serve` answers a prompt with the
//! fake LLM's reply, with and without basic auth.

mod common;

use std::time::Duration;

use common::real_opencode::{
    FakeLlm, RealOpenCode, RealOpenCodeOptions, basic_auth, http_request, message_text,
    require_opencode,
};
use serde_json::{Value, json};

const TURN_TIMEOUT: Duration = Duration::from_secs(90);

fn chat_body(user: &str, stream: bool, with_tools: bool) -> Value {
    let mut body = json!({
        "model": "fake-model",
        "stream": stream,
        "messages": [
            { "role": "system", "content": "You are a test." },
            { "role": "user", "content": user }
        ]
    });
    if with_tools {
        body["tools"] =
            json!([{ "type": "function", "function": { "name": "bash", "parameters": {} } }]);
    }
    body
}

/// `data: ...` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The fake LLM on its own (needs only python3, never skipped).
#[test]
fn fake_llm_speaks_openai_chat_completions() {
    let llm = FakeLlm::start("Alpha beta gamma.");
    assert!(llm.port() > 0);
    assert_eq!(
        llm.base_url(),
        format!("http://127.0.0.1:{}/v1", llm.port())
    );
    let http = llm.http();

    // Non-streaming.
    let (status, v) = http.json(
        "POST",
        "/v1/chat/completions",
        Some(chat_body("hi", false, false)),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Alpha beta gamma.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Streaming: word chunks, then finish "stop", a usage frame and [DONE].
    let resp = http
        .request(
            "POST",
            "/v1/chat/completions",
            Some(&chat_body("hi", true, false)),
        )
        .expect("stream request");
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let frames = sse_data(&resp.text());
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).expect("chunk JSON"))
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Alpha beta gamma.");
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert_eq!(content_chunks, 3, "one chunk per word");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop")
    );
    assert!(
        chunks
            .iter()
            .any(|c| c["usage"]["total_tokens"].is_number())
    );

    // Title request: the system prompt mentions "title", no tools.
    let mut title_req = chat_body("hello", false, false);
    title_req["messages"][0]["content"] = json!("Generate a short title for this conversation.");
    let (_, v) = http.json("POST", "/v1/chat/completions", Some(title_req));
    assert_eq!(v["choices"][0]["message"]["content"], "Fake title");

    // FAKE_ERROR: non-retryable 400.
    let (status, v) = http.json(
        "POST",
        "/v1/chat/completions",
        Some(chat_body("x FAKE_ERROR", true, false)),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    // FAKE_TOOL:bash:<command>: a streamed tool call on the first turn ...
    let user = "please run\nFAKE_TOOL:bash:echo \"quoted\" && ls";
    let resp = http
        .request(
            "POST",
            "/v1/chat/completions",
            Some(&chat_body(user, true, true)),
        )
        .expect("tool stream");
    let frames = sse_data(&resp.text());
    let chunks: Vec<Value> = frames
        .iter()
        .filter(|f| *f != "[DONE]")
        .map(|f| serde_json::from_str(f).expect("chunk JSON"))
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls[0]["function"]["name"], "bash");
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().is_some_and(|s| !s.is_empty()));
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    let args: Value = serde_json::from_str(&args).expect("tool arguments JSON");
    assert_eq!(args, json!({ "command": "echo \"quoted\" && ls" }));
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
    // ... and a plain reply once the tool result is in the conversation.
    let mut second = chat_body(user, false, true);
    let msgs = second["messages"].as_array_mut().expect("messages");
    msgs.push(json!({ "role": "assistant", "content": "", "tool_calls": [
        { "id": "call_1", "type": "function", "function": { "name": "bash", "arguments": "{}" } }] }));
    msgs.push(json!({ "role": "tool", "tool_call_id": "call_1", "content": "quoted" }));
    let (_, v) = http.json("POST", "/v1/chat/completions", Some(second));
    assert_eq!(v["choices"][0]["message"]["content"], "Done: quoted");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Everything was recorded, and /reset forgets it.
    let recorded = llm.chat_requests();
    assert_eq!(recorded.len(), 6, "{recorded:?}");
    assert_eq!(recorded[2]["title_request"], true);
    assert_eq!(recorded[5]["tool_results"], json!(["quoted"]));
    llm.reset();
    assert_eq!(llm.requests(), json!([]));
}

#[test]
fn real_opencode_answers_a_prompt_without_password() {
    let Some(_bin) = require_opencode() else {
        return;
    };
    let reply = "Harness reply without password.";
    let llm = FakeLlm::start(reply);
    let mut oc = RealOpenCode::start(
        RealOpenCodeOptions::new(&llm).extra_config(json!({ "permission": { "bash": "ask" } })),
    );
    assert!(oc.pid() > 0);
    assert_eq!(oc.url(), format!("http://127.0.0.1:{}", oc.port()));

    let (status, health) = oc.http_json("GET", "/global/health", None);
    assert_eq!(status, 200);
    assert_eq!(health["healthy"], true, "{health}");
    assert!(health["version"].is_string(), "{health}");

    // The project is the git-initialised tempdir and the extra config was merged in.
    let (_, path) = oc.http_json("GET", "/path", None);
    let dir = std::fs::canonicalize(oc.project_dir()).expect("project dir");
    assert_eq!(path["directory"].as_str(), dir.to_str(), "{path}");
    assert!(oc.project_dir().join(".git").is_dir());
    let (_, config) = oc.http_json("GET", "/config", None);
    assert_eq!(config["permission"]["bash"], "ask", "{config}");
    assert_eq!(config["model"], "fake/fake-model", "{config}");

    // Session with a title, prompt_async, then the reply shows up in the messages.
    let (status, session) = oc.http_json("POST", "/session", Some(json!({ "title": "harness" })));
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["title"], "harness");
    let id = session["id"].as_str().expect("session id").to_string();
    assert!(id.starts_with("ses_"), "{id}");

    let body = json!({ "parts": [{ "type": "text", "text": "hello" }] });
    let (status, _) = oc.http_json("POST", &format!("/session/{id}/prompt_async"), Some(body));
    assert_eq!(status, 204);
    let msg = oc.wait_for_assistant_text(&id, reply, TURN_TIMEOUT);
    assert_eq!(msg["info"]["finish"], "stop", "{msg}");
    assert_eq!(message_text(&msg), reply);

    // Titled session: no title request, just the turn itself.
    let requests = llm.chat_requests();
    assert!(
        requests.iter().all(|r| r["title_request"] == false),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|r| r["last_user"] == "hello"),
        "{requests:?}"
    );

    // stop() ends and reaps the process; the port stops answering.
    let port = oc.port();
    oc.stop();
    assert!(!oc.is_running());
    assert!(
        http_request(
            port,
            "GET",
            "/global/health",
            &[],
            None,
            Duration::from_secs(2)
        )
        .is_err(),
        "port {port} still answers after stop()"
    );
}

#[test]
fn real_opencode_with_password_requires_basic_auth() {
    let Some(_bin) = require_opencode() else {
        return;
    };
    let reply = "Harness reply with password.";
    let llm = FakeLlm::start(reply);
    let password = "harness-s3cret";
    let oc = RealOpenCode::start(
        RealOpenCodeOptions::new(&llm)
            .password(password)
            .username("alice"),
    );
    assert_eq!(oc.username(), "alice");
    let port = oc.port();
    let get = |auth: Option<String>| {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        http_request(
            port,
            "GET",
            "/global/health",
            &headers,
            None,
            Duration::from_secs(10),
        )
        .expect("health request")
    };

    // No credentials, the default username, a wrong password: all 401.
    let resp = get(None);
    assert_eq!(resp.status, 401);
    assert!(
        resp.header("www-authenticate")
            .unwrap_or_default()
            .starts_with("Basic"),
        "{:?}",
        resp.headers
    );
    assert_eq!(get(Some(basic_auth("opencode", password))).status, 401);
    assert_eq!(get(Some(basic_auth("alice", "wrong"))).status, 401);
    let (status, _) = oc.http().without_auth().json("GET", "/session", None);
    assert_eq!(status, 401);

    // With the right credentials everything works.
    let resp = get(Some(basic_auth("alice", password)));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["healthy"], true);

    let id = oc.create_session("harness with auth");
    oc.prompt_async(&id, "hello");
    oc.wait_for_assistant_text(&id, reply, TURN_TIMEOUT);

    // A scripted bash tool call runs in the project dir, then the model answers with its output.
    let id = oc.create_session("harness tool call");
    oc.prompt_async(
        &id,
        "run this\nFAKE_TOOL:bash:printf tool-ok | tee marker.txt",
    );
    oc.wait_for_assistant_text(&id, "Done: tool-ok", TURN_TIMEOUT);
    let marker = std::fs::read_to_string(oc.project_dir().join("marker.txt")).expect("marker.txt");
    assert_eq!(marker, "tool-ok");
    let tool_rounds = llm
        .chat_requests()
        .iter()
        .filter(|r| r["tool_results"] == json!(["tool-ok"]))
        .count();
    assert_eq!(tool_rounds, 1);
}
