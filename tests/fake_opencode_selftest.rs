//! Proves that the fake OpenCode server (`tests/common/fake_opencode.rs`)
//! behaves like the real one where the MCP server's tests rely on it.

mod common;

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use common::fake_opencode::{
    ABORTED_ERROR_NAME, Behaviour, DEFAULT_REPLY, DIE_DURING_SEND_DELTA, FakeOpenCode, SPA_HTML,
    basic_auth_header, blackhole_port, dead_port,
};
use common::mcp_client::{RelayDir, iso_utc, registration, wait_until};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(5);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// A strict reader of OpenCode's SSE framing: every frame must be exactly
/// `data: <one-line JSON>\n\n`.
struct Sse {
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: Vec<u8>,
}

enum Next {
    Event(Value),
    /// The stream ended or failed (connection dropped).
    Closed,
}

impl Sse {
    async fn open(url: &str) -> Sse {
        let resp = reqwest::Client::new()
            .get(format!("{url}/event"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("GET /event");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut sse = Sse {
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
        };
        let first = sse.event().await;
        assert_eq!(first["type"], "server.connected", "first frame: {first}");
        sse
    }

    async fn next(&mut self, deadline: Instant) -> Next {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let frame = std::str::from_utf8(&frame[..pos]).expect("utf-8 frame");
                let data = frame
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("frame without `data: `: {frame:?}"));
                assert!(!data.contains('\n'), "multi-line frame: {frame:?}");
                let v: Value =
                    serde_json::from_str(data).unwrap_or_else(|e| panic!("bad JSON {data:?}: {e}"));
                assert!(
                    v["id"].as_str().is_some_and(|id| id.starts_with("evt_")),
                    "{v}"
                );
                assert!(v["properties"].is_object(), "{v}");
                return Next::Event(v);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => panic!(
                    "no SSE frame before the deadline; buffered {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Some(Err(_))) | Ok(None) => return Next::Closed,
            }
        }
    }

    /// The next event; panics if the stream closes or nothing comes within 5 s.
    async fn event(&mut self) -> Value {
        match self.next(Instant::now() + DEADLINE).await {
            Next::Event(v) => v,
            Next::Closed => panic!("event stream closed"),
        }
    }

    /// Events up to and including the first one matching `pred`.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self.event().await;
            let done = pred(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }
}

fn is_idle_of(sid: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["type"] == "session.idle" && v["properties"]["sessionID"] == sid
}

async fn create_session(url: &str, title: &str) -> Value {
    let resp = http()
        .post(format!("{url}/session"))
        .json(&json!({"title": title}))
        .send()
        .await
        .expect("POST /session");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("session JSON")
}

async fn prompt_async(url: &str, sid: &str, text: &str) {
    let resp = http()
        .post(format!("{url}/session/{sid}/prompt_async"))
        .json(&json!({"parts": [{"type": "text", "text": text}]}))
        .send()
        .await
        .expect("POST prompt_async");
    assert_eq!(resp.status(), 204);
}

async fn get_json(url: &str) -> Value {
    let resp = http().get(url).send().await.expect("GET");
    assert_eq!(resp.status(), 200, "GET {url}");
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "GET {url}"
    );
    resp.json().await.expect("JSON body")
}

/// Index of the first event at or after `from` matching `pred`.
fn find_from(events: &[Value], from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> usize {
    events[from..]
        .iter()
        .position(pred)
        .map(|i| i + from)
        .unwrap_or_else(|| panic!("no {what} after index {from} in {:#?}", types(events)))
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    let resp = http()
        .get(format!("{}/global/health", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"healthy": true, "version": "fake-1.0"})
    );

    let resp = http()
        .get(format!("{}/no/such/route", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(resp.text().await.unwrap(), SPA_HTML);

    let resp = http()
        .get(format!("{}/session/ses_missing", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["name"], "NotFoundError");

    assert_eq!(fake.request_count("/global/health"), 1);
    assert_eq!(fake.request_count("/no/such/route"), 1);
    assert!(!fake.saw_authorization());
}

#[tokio::test]
async fn prompt_streams_a_turn_and_stores_it() {
    let fake = FakeOpenCode::builder()
        .delta_delay(Duration::from_millis(2))
        .start()
        .await;
    let url = fake.url();
    let mut sse = Sse::open(&url).await;
    let session = create_session(&url, "selftest").await;
    let sid = session["id"].as_str().unwrap().to_string();
    assert!(sid.starts_with("ses_"), "{session}");
    assert_eq!(session["title"], "selftest");
    assert_eq!(session["projectID"], "global");
    assert_eq!(session["directory"], fake.directory());
    assert_eq!(session["version"], "fake-1.0");
    assert!(session["slug"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(session["time"]["created"].as_u64().unwrap() > 1_700_000_000_000);

    prompt_async(&url, &sid, "hi there").await;
    let events = sse.until(is_idle_of(&sid)).await;

    // The brief's order: user message, busy, assistant (not completed), empty
    // text part, deltas, assistant completed, idle status, session.idle.
    let user = find_from(&events, 0, "user message.updated", |e| {
        e["type"] == "message.updated" && e["properties"]["info"]["role"] == "user"
    });
    let busy = find_from(&events, user, "busy", |e| {
        e["type"] == "session.status" && e["properties"]["status"]["type"] == "busy"
    });
    let assistant = find_from(&events, busy, "assistant message.updated", |e| {
        e["type"] == "message.updated"
            && e["properties"]["info"]["role"] == "assistant"
            && e["properties"]["info"]["time"]["completed"].is_null()
    });
    let part = find_from(&events, assistant, "empty text part", |e| {
        e["type"] == "message.part.updated"
            && e["properties"]["part"]["type"] == "text"
            && e["properties"]["part"]["text"] == ""
    });
    let amid = events[assistant]["properties"]["info"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = events[part]["properties"]["part"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let first_delta = find_from(&events, part, "delta", |e| {
        e["type"] == "message.part.delta"
    });
    let completed = find_from(&events, first_delta, "completed assistant", |e| {
        e["type"] == "message.updated" && e["properties"]["info"]["time"]["completed"].is_u64()
    });
    let idle = find_from(&events, completed, "idle status", |e| {
        e["type"] == "session.status" && e["properties"]["status"]["type"] == "idle"
    });
    assert_eq!(
        idle + 1,
        events.len() - 1,
        "session.idle right after the idle status: {:?}",
        types(&events)
    );
    let deltas: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "message.part.delta")
        .collect();
    assert!(deltas.len() >= 3, "several deltas: {:?}", types(&events));
    let mut text = String::new();
    for d in &deltas {
        let p = &d["properties"];
        assert_eq!(p["sessionID"], sid.as_str());
        assert_eq!(p["messageID"], amid.as_str());
        assert_eq!(p["partID"], pid.as_str());
        assert_eq!(p["field"], "text");
        text.push_str(p["delta"].as_str().unwrap());
    }
    assert_eq!(text, DEFAULT_REPLY);
    assert_eq!(events[completed]["properties"]["info"]["id"], amid.as_str());
    // Every event of the turn carries the session id.
    for e in &events {
        assert_eq!(e["properties"]["sessionID"], sid.as_str(), "{e}");
    }

    let messages = get_json(&format!("{url}/session/{sid}/message")).await;
    let messages = messages.as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["info"]["role"], "user");
    assert_eq!(messages[0]["parts"][0]["text"], "hi there");
    assert_eq!(messages[1]["info"]["role"], "assistant");
    assert_eq!(messages[1]["info"]["id"], amid.as_str());
    assert!(messages[1]["info"]["time"]["completed"].is_u64());
    assert_eq!(messages[1]["parts"][0]["text"], DEFAULT_REPLY);
    let last = get_json(&format!("{url}/session/{sid}/message?limit=1")).await;
    assert_eq!(last.as_array().unwrap().len(), 1);
    assert_eq!(last[0]["info"]["id"], amid.as_str());

    assert_eq!(get_json(&format!("{url}/session/status")).await, json!({}));
    let prompts = fake.prompts();
    assert_eq!(prompts.len(), 1);
    assert_eq!(prompts[0].session_id, sid);
    assert_eq!(prompts[0].text, "hi there");
    assert_eq!(
        fake.request_count_method("POST", &format!("/session/{sid}/prompt_async")),
        1
    );
}

#[tokio::test]
async fn sessions_are_listed_newest_first_with_limit() {
    let fake = FakeOpenCode::builder()
        .delta_delay(Duration::ZERO)
        .start()
        .await;
    let url = fake.url();
    let a = create_session(&url, "a").await;
    let b = create_session(&url, "b").await;
    let list = get_json(&format!("{url}/session")).await;
    assert_eq!(list[0]["id"], b["id"]);
    assert_eq!(list[1]["id"], a["id"]);
    // A prompt makes `a` the most recently updated session.
    let mut sse = Sse::open(&url).await;
    let aid = a["id"].as_str().unwrap();
    prompt_async(&url, aid, "bump").await;
    sse.until(is_idle_of(aid)).await;
    let list = get_json(&format!("{url}/session?limit=1")).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], a["id"]);
    assert_eq!(
        get_json(&format!("{url}/session/{aid}")).await["id"],
        a["id"]
    );
}

#[tokio::test]
async fn abort_stops_a_slow_prompt() {
    let fake = FakeOpenCode::builder()
        .slow_tick(Duration::from_millis(20))
        .start()
        .await;
    let url = fake.url();
    let mut sse = Sse::open(&url).await;
    let sid = create_session(&url, "slow").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    prompt_async(&url, &sid, "please FAKE_SLOW").await;
    // Three deltas prove it keeps going.
    let mut seen = String::new();
    let mut deltas = 0;
    while deltas < 3 {
        let e = sse.event().await;
        if e["type"] == "message.part.delta" {
            deltas += 1;
            seen.push_str(e["properties"]["delta"].as_str().unwrap());
        }
    }
    assert_eq!(
        get_json(&format!("{url}/session/status")).await[&sid]["type"],
        "busy"
    );

    let resp = http()
        .post(format!("{url}/session/{sid}/abort"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!(true));
    let events = sse.until(is_idle_of(&sid)).await;
    for e in &events {
        if e["type"] == "message.part.delta" {
            seen.push_str(e["properties"]["delta"].as_str().unwrap());
        }
    }
    let aborted = find_from(&events, 0, "aborted assistant", |e| {
        e["type"] == "message.updated"
            && e["properties"]["info"]["error"]["name"] == ABORTED_ERROR_NAME
    });
    assert!(events[aborted]["properties"]["info"]["time"]["completed"].is_u64());
    let err = find_from(&events, aborted, "session.error", |e| {
        e["type"] == "session.error"
    });
    assert_eq!(
        events[err]["properties"]["error"]["name"],
        ABORTED_ERROR_NAME
    );
    find_from(&events, err, "idle status", |e| {
        e["type"] == "session.status" && e["properties"]["status"]["type"] == "idle"
    });

    // The stored message holds exactly what was streamed and is marked aborted.
    let messages = get_json(&format!("{url}/session/{sid}/message")).await;
    let assistant = &messages[1];
    assert_eq!(assistant["info"]["error"]["name"], ABORTED_ERROR_NAME);
    assert_eq!(assistant["parts"][0]["text"], seen.as_str());
    assert_eq!(get_json(&format!("{url}/session/status")).await, json!({}));
    assert_eq!(fake.abort_calls(), vec![sid.clone()]);

    // Nothing more for this session: several slow ticks pass in silence.
    let window = Instant::now() + Duration::from_millis(150);
    match tokio::time::timeout_at(window, sse.next(window + DEADLINE)).await {
        Err(_) => {}
        Ok(Next::Event(e)) => panic!("event after abort: {e}"),
        Ok(Next::Closed) => panic!("stream closed"),
    }
}

#[tokio::test]
async fn permission_prompt_waits_for_the_reply() {
    let fake = FakeOpenCode::builder()
        .delta_delay(Duration::ZERO)
        .start()
        .await;
    let url = fake.url();
    let mut sse = Sse::open(&url).await;
    let sid = create_session(&url, "perm").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    prompt_async(&url, &sid, "run FAKE_PERMISSION").await;
    let asked = sse.until(|e| e["type"] == "permission.asked").await;
    let request = &asked.last().unwrap()["properties"];
    let rid = request["id"].as_str().unwrap().to_string();
    assert!(rid.starts_with("per_"));
    assert_eq!(request["sessionID"], sid.as_str());
    let pending = get_json(&format!("{url}/permission")).await;
    assert_eq!(pending.as_array().unwrap().len(), 1);
    assert_eq!(pending[0]["id"], rid.as_str());

    let resp = http()
        .post(format!("{url}/permission/{rid}/reply"))
        .json(&json!({"reply": "once"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), json!(true));
    let events = sse.until(is_idle_of(&sid)).await;
    let replied = find_from(&events, 0, "permission.replied", |e| {
        e["type"] == "permission.replied"
    });
    assert_eq!(events[replied]["properties"]["requestID"], rid.as_str());
    assert_eq!(events[replied]["properties"]["reply"], "once");
    assert_eq!(get_json(&format!("{url}/permission")).await, json!([]));
    assert_eq!(fake.permission_replies().len(), 1);
    assert_eq!(fake.permission_replies()[0].reply, "once");
    let messages = get_json(&format!("{url}/session/{sid}/message")).await;
    assert_eq!(messages[1]["parts"][0]["text"], DEFAULT_REPLY);
    // A second reply to the same request is a 404.
    let resp = http()
        .post(format!("{url}/permission/{rid}/reply"))
        .json(&json!({"reply": "once"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn basic_auth_is_enforced() {
    let fake = FakeOpenCode::start(Behaviour::Healthy)
        .await
        .with_password("opencode", "s3cret");
    let health = format!("{}/global/health", fake.url());

    let resp = http().get(&health).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Basic realm=\"Secure Area\""
    );
    assert!(resp.bytes().await.unwrap().is_empty());
    assert!(!fake.saw_authorization());

    let resp = http()
        .get(&health)
        .basic_auth("opencode", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http()
        .get(format!("{}/event", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let resp = http()
        .get(&health)
        .basic_auth("opencode", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["healthy"], true);
    let token = basic_auth_header("opencode", "s3cret");
    let token = token.strip_prefix("Basic ").unwrap();
    let resp = http()
        .get(format!("{health}?auth_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    assert!(fake.saw_authorization());
    assert!(
        fake.authorization_headers()
            .contains(&basic_auth_header("opencode", "s3cret"))
    );
    assert_eq!(
        basic_auth_header("opencode", "s3cret"),
        "Basic b3BlbmNvZGU6czNjcmV0"
    );
}

#[tokio::test]
async fn fault_modes_answer_as_scripted() {
    let fake = FakeOpenCode::start(Behaviour::Html).await;
    let url = fake.url();
    for path in ["/global/health", "/session", "/event"] {
        let resp = http().get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{path}"
        );
        assert!(resp.text().await.unwrap().starts_with("<!doctype html>"));
    }

    fake.set_behaviour(Behaviour::Http500);
    for path in ["/global/health", "/session/status"] {
        let resp = http().get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 500, "{path}");
        assert_eq!(resp.json::<Value>().await.unwrap()["name"], "UnknownError");
    }

    fake.set_behaviour(Behaviour::SlowHealth(Duration::from_millis(400)));
    let started = Instant::now();
    get_json(&format!("{url}/session")).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "only health is slow"
    );
    let started = Instant::now();
    get_json(&format!("{url}/global/health")).await;
    assert!(started.elapsed() >= Duration::from_millis(400));

    fake.set_behaviour(Behaviour::GarbageSse);
    get_json(&format!("{url}/global/health")).await;
    get_json(&format!("{url}/session")).await;
    let resp = http().get(format!("{url}/event")).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    // Read past the overlong line (5 MiB without a newline).
    while got.len() < 5 * 1024 * 1024 + 200 {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(chunk))) => got.extend_from_slice(&chunk),
            other => panic!(
                "garbage stream ended early: {:?}",
                other.map(|o| o.map(|r| r.map(|b| b.len())))
            ),
        }
    }
    assert!(got.starts_with(b"data: this is not json\n\n"));
    assert!(std::str::from_utf8(&got).is_err(), "contains binary junk");
    let longest = got.split(|&b| b == b'\n').map(<[u8]>::len).max().unwrap();
    assert!(longest > 4 * 1024 * 1024, "an overlong line: {longest}");
}

#[tokio::test]
async fn die_drops_open_streams_and_refuses_connections() {
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    let url = fake.url();
    let mut sse = Sse::open(&url).await;
    assert_eq!(fake.open_event_streams(), 1);
    let started = Instant::now();
    fake.die();
    match sse.next(Instant::now() + Duration::from_secs(2)).await {
        Next::Closed => {}
        Next::Event(e) => panic!("event after die: {e}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "dropped promptly: {:?}",
        started.elapsed()
    );
    let err = http()
        .get(format!("{url}/global/health"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "connection refused after die: {err:?}");
    assert!(fake.is_dead());
    let port = fake.port();
    fake.shutdown().await;

    // The port can be reused at once ("restart" on the same port).
    let again = FakeOpenCode::builder().port(port).start().await;
    get_json(&format!("{}/global/health", again.url())).await;
}

#[tokio::test]
async fn die_during_send_streams_a_delta_then_dies() {
    let fake = FakeOpenCode::start(Behaviour::DieDuringSend).await;
    let url = fake.url();
    get_json(&format!("{url}/global/health")).await;
    let mut sse = Sse::open(&url).await;
    let sid = create_session(&url, "doomed").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    prompt_async(&url, &sid, "hello").await;
    let mut events = Vec::new();
    while let Next::Event(e) = sse.next(Instant::now() + DEADLINE).await {
        events.push(e);
    }
    let busy = find_from(&events, 0, "busy", |e| {
        e["type"] == "session.status" && e["properties"]["status"]["type"] == "busy"
    });
    let delta = find_from(&events, busy, "delta", |e| {
        e["type"] == "message.part.delta"
    });
    assert_eq!(events[delta]["properties"]["delta"], DIE_DURING_SEND_DELTA);
    assert!(!types(&events).contains(&"session.idle".to_string()));
    assert!(fake.is_dead());
    let err = http()
        .get(format!("{url}/global/health"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
}

#[tokio::test]
async fn blackhole_hangs_and_dead_port_refuses() {
    let (_listener, port) = blackhole_port();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the blackhole succeeds");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /global/health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    assert!(read.is_err(), "read must hang, got {read:?}");

    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = client
        .get(format!("http://127.0.0.1:{port}/global/health"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    let port = dead_port();
    let err = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn relay_dir_writes_atomically() {
    let dir = RelayDir::new();
    let reg = registration("alpha", 4096, "/tmp/alpha");
    assert_eq!(reg["localPort"], 4096);
    assert!(reg["connectedAt"].as_str().unwrap().ends_with('Z'));
    let path = dir.write_registration("alpha", reg.clone());
    assert_eq!(
        dir.list(),
        vec!["alpha.json".to_string()],
        "no temp file left behind"
    );
    let back: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(back, reg);
    dir.write_raw("broken.json", b"{not json");
    assert_eq!(
        std::fs::read(dir.path().join("broken.json")).unwrap(),
        b"{not json"
    );
    dir.remove("alpha");
    dir.remove("alpha");
    assert_eq!(dir.list(), vec!["broken.json".to_string()]);
    assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(iso_utc(1_795_627_355), "2026-11-25T17:22:35Z");

    // wait_until returns the first Some.
    let mut n = 0;
    let got = wait_until(Duration::from_secs(1), || {
        n += 1;
        let v = n;
        async move { (v >= 3).then_some(v) }
    })
    .await;
    assert_eq!(got, 3);
}
