//! A scriptable fake OpenCode HTTP server for fault tests and benchmarks.
//!
//! [`FakeOpenCode`] runs in-process (axum) on an ephemeral `127.0.0.1` port and
//! emulates the parts of OpenCode's legacy HTTP API an MCP server needs:
//! health, sessions, status, messages, `prompt_async` with a streamed reply on
//! `/event`, abort and permissions (as documented in OpenCode 1.18.33's API).
//! Its [`Behaviour`] can be switched at runtime to inject faults, and
//! [`FakeOpenCode::die`] drops the listener and every open connection at once,
//! the way a killed process would.
//!
//! Prompt text switches for scripted turns:
//! * `FAKE_SLOW`: deltas keep coming every 100 ms until the session is aborted;
//! * `FAKE_PERMISSION`: the turn asks a `bash` permission and waits for its reply
//!   (`reject` makes the reply text `Permission rejected.`);
//! * `FAKE_TOOL`: the assistant message gets a completed `bash` tool part first.
#![allow(dead_code)] // every test binary uses a different part of this module

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Query, Request, State as AxState};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Version reported by `/global/health` and stored in sessions.
pub const FAKE_VERSION: &str = "fake-1.0";
/// Default assistant reply, streamed as several `message.part.delta` frames.
pub const DEFAULT_REPLY: &str = "Hello from fake OpenCode.";
/// Default pause before each reply delta.
pub const DEFAULT_DELTA_DELAY: Duration = Duration::from_millis(10);
/// Pause between deltas of a `FAKE_SLOW` prompt.
pub const SLOW_TICK: Duration = Duration::from_millis(100);
/// Default length of the overlong line in [`Behaviour::GarbageSse`]: more than
/// the MCP server's default `MAX_EVENT_BYTES` (4 MiB).
pub const DEFAULT_GARBAGE_LINE_LEN: usize = 5 * 1024 * 1024;
/// The delta text [`Behaviour::DieDuringSend`] emits before it dies.
pub const DIE_DURING_SEND_DELTA: &str = "Hello";
/// Error name OpenCode stores on an aborted assistant message.
pub const ABORTED_ERROR_NAME: &str = "MessageAbortedError";

/// Page served for unknown routes (and for every route in [`Behaviour::Html`]),
/// like OpenCode's web-UI catch-all.
pub const SPA_HTML: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\" />\
<title>OpenCode</title><script type=\"module\" crossorigin src=\"/assets/index-fake.js\"></script>\
</head><body><div id=\"root\"></div></body></html>\n";

/// How the fake answers. Switch at runtime with [`FakeOpenCode::set_behaviour`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// A working OpenCode emulation.
    Healthy,
    /// Every route answers 500 with an OpenCode-style `UnknownError` JSON body.
    Http500,
    /// Every route answers 200 `text/html`, like OpenCode's SPA fallback.
    Html,
    /// JSON routes work, but `/event` streams garbage: non-JSON data lines,
    /// binary junk, an overlong line, stray SSE fields.
    GarbageSse,
    /// Healthy until a prompt arrives; then the turn starts (busy, one text
    /// delta), and once those frames and the prompt's response are flushed the
    /// server dies: listener closed, every connection dropped.
    DieDuringSend,
    /// Like `Healthy`, but `/global/health` answers after this delay.
    SlowHealth(Duration),
}

/// One HTTP request the fake received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
}

/// One prompt (`prompt_async` or the blocking `POST /session/{id}/message`).
#[derive(Clone, Debug)]
pub struct RecordedPrompt {
    pub session_id: String,
    /// The text parts, joined with `\n`.
    pub text: String,
    /// The whole request body.
    pub body: Value,
    /// True for the blocking `POST /session/{id}/message`.
    pub blocking: bool,
}

/// One `POST /permission/{id}/reply` that matched a pending request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermissionReply {
    pub request_id: String,
    pub reply: String,
    pub message: Option<String>,
}

/// Settings of a fake; see [`FakeBuilder`].
#[derive(Clone, Debug)]
struct FakeConfig {
    reply: String,
    delta_delay: Duration,
    slow_tick: Duration,
    directory: Option<String>,
    heartbeat: Option<Duration>,
    garbage_line_len: usize,
    auth: Option<(String, String)>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            reply: DEFAULT_REPLY.to_string(),
            delta_delay: DEFAULT_DELTA_DELAY,
            slow_tick: SLOW_TICK,
            directory: None,
            heartbeat: Some(Duration::from_secs(10)),
            garbage_line_len: DEFAULT_GARBAGE_LINE_LEN,
            auth: None,
        }
    }
}

/// Builder for a [`FakeOpenCode`] with non-default settings.
#[derive(Debug)]
pub struct FakeBuilder {
    behaviour: Behaviour,
    port: u16,
    cfg: FakeConfig,
}

impl FakeBuilder {
    pub fn behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }
    /// Require HTTP Basic auth with these credentials on every route.
    pub fn password(mut self, user: &str, password: &str) -> Self {
        self.cfg.auth = Some((user.to_string(), password.to_string()));
        self
    }
    /// Assistant reply text (split into deltas at word boundaries).
    pub fn reply(mut self, text: &str) -> Self {
        self.cfg.reply = text.to_string();
        self
    }
    /// Pause before each reply delta.
    pub fn delta_delay(mut self, delay: Duration) -> Self {
        self.cfg.delta_delay = delay;
        self
    }
    /// Pause between `FAKE_SLOW` deltas (default 100 ms).
    pub fn slow_tick(mut self, tick: Duration) -> Self {
        self.cfg.slow_tick = tick;
        self
    }
    /// The instance directory (default `/tmp/fake-opencode-<port>`).
    pub fn directory(mut self, dir: &str) -> Self {
        self.cfg.directory = Some(dir.to_string());
        self
    }
    /// `server.heartbeat` period on `/event`; `None` sends none. Default 10 s.
    pub fn heartbeat(mut self, every: Option<Duration>) -> Self {
        self.cfg.heartbeat = every;
        self
    }
    /// Length of the overlong line in [`Behaviour::GarbageSse`].
    pub fn garbage_line_len(mut self, len: usize) -> Self {
        self.cfg.garbage_line_len = len;
        self
    }
    /// Bind this port instead of an ephemeral one (to "restart" on a port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Bind `127.0.0.1:<port>`, start serving, and return once listening.
    pub async fn start(self) -> FakeOpenCode {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap_or_else(|e| panic!("fake opencode: bind 127.0.0.1:{}: {e}", self.port));
        let addr = listener.local_addr().expect("fake opencode: local_addr");
        let mut cfg = self.cfg;
        let directory = cfg
            .directory
            .take()
            .unwrap_or_else(|| format!("/tmp/fake-opencode-{}", addr.port()));
        let (tx, _) = broadcast::channel(8192);
        let shared = Arc::new(Shared {
            addr,
            directory,
            behaviour: Mutex::new(self.behaviour),
            cfg: Mutex::new(cfg),
            state: Mutex::new(State::default()),
            rec: Mutex::new(Rec::default()),
            tx,
            kill: CancellationToken::new(),
            net: Arc::new(NetRegistry::default()),
            subs: Mutex::new(Vec::new()),
            serve_task: Mutex::new(None),
            rng: Mutex::new(seed()),
            id_counter: AtomicU64::new(0),
        });
        lock(&shared.net.inner).listener_fd = Some(listener.as_raw_fd());
        let kill_listener = KillListener {
            inner: listener,
            net: shared.net.clone(),
            kill: shared.kill.clone(),
        };
        let app = Router::new()
            .fallback(handle)
            .with_state(shared.clone())
            .into_make_service_with_connect_info::<ConnInfo>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(kill_listener, app).await;
        });
        *lock(&shared.serve_task) = Some(task);
        FakeOpenCode { shared }
    }
}

/// A running fake OpenCode server. Dropping it kills it like [`Self::die`].
pub struct FakeOpenCode {
    shared: Arc<Shared>,
}

impl FakeOpenCode {
    /// Start a fake with default settings on an ephemeral port.
    pub async fn start(behaviour: Behaviour) -> FakeOpenCode {
        Self::builder().behaviour(behaviour).start().await
    }

    /// A builder for non-default settings.
    pub fn builder() -> FakeBuilder {
        FakeBuilder {
            behaviour: Behaviour::Healthy,
            port: 0,
            cfg: FakeConfig::default(),
        }
    }

    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }
    /// `http://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }
    /// The instance directory sessions are created in by default.
    pub fn directory(&self) -> String {
        self.shared.directory.clone()
    }

    pub fn behaviour(&self) -> Behaviour {
        lock(&self.shared.behaviour).clone()
    }
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// Require Basic auth (builder style on a running fake).
    pub fn with_password(self, user: &str, password: &str) -> Self {
        self.set_password(Some((user, password)));
        self
    }
    /// Require Basic auth with these credentials, or none with `None`.
    pub fn set_password(&self, creds: Option<(&str, &str)>) {
        lock(&self.shared.cfg).auth = creds.map(|(u, p)| (u.to_string(), p.to_string()));
    }
    pub fn set_reply(&self, text: &str) {
        lock(&self.shared.cfg).reply = text.to_string();
    }
    pub fn set_delta_delay(&self, delay: Duration) {
        lock(&self.shared.cfg).delta_delay = delay;
    }

    /// Die now: close the listener and every open connection (SSE streams
    /// included), stop every running reply. Connecting afterwards is refused.
    pub fn die(&self) {
        self.shared.die_now();
    }
    /// [`Self::die`], then wait until the server task has finished.
    pub async fn shutdown(self) {
        self.shared.die_now();
        let task = lock(&self.shared.serve_task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
    pub fn is_dead(&self) -> bool {
        self.shared.kill.is_cancelled()
    }

    // ----- recorders -----

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.rec).requests.clone()
    }
    /// Number of requests (any method) to this path (without query).
    pub fn request_count(&self, path: &str) -> usize {
        lock(&self.shared.rec)
            .requests
            .iter()
            .filter(|r| r.path == path)
            .count()
    }
    /// Number of requests with this method to this path.
    pub fn request_count_method(&self, method: &str, path: &str) -> usize {
        lock(&self.shared.rec)
            .requests
            .iter()
            .filter(|r| r.path == path && r.method.eq_ignore_ascii_case(method))
            .count()
    }
    /// Request counts per path.
    pub fn request_counts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for r in &lock(&self.shared.rec).requests {
            *out.entry(r.path.clone()).or_insert(0) += 1;
        }
        out
    }
    pub fn prompts(&self) -> Vec<RecordedPrompt> {
        lock(&self.shared.rec).prompts.clone()
    }
    /// Session ids of every abort call, in order.
    pub fn abort_calls(&self) -> Vec<String> {
        lock(&self.shared.rec).aborts.clone()
    }
    pub fn permission_replies(&self) -> Vec<PermissionReply> {
        lock(&self.shared.rec).permission_replies.clone()
    }
    /// Every `Authorization` header value seen, in order.
    pub fn authorization_headers(&self) -> Vec<String> {
        lock(&self.shared.rec)
            .requests
            .iter()
            .filter_map(|r| r.authorization.clone())
            .collect()
    }
    pub fn saw_authorization(&self) -> bool {
        lock(&self.shared.rec)
            .requests
            .iter()
            .any(|r| r.authorization.is_some())
    }
    /// Forget recorded requests, prompts, aborts, permission replies and the
    /// event log (sessions and messages stay).
    pub fn clear_records(&self) {
        *lock(&self.shared.rec) = Rec::default();
        lock(&self.shared.state).events.clear();
    }
    /// Every event emitted on `/event` so far (without `server.connected` and
    /// heartbeats), oldest first.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared.state).events.clone()
    }
    /// The `type` of every event in [`Self::events`].
    pub fn event_types(&self) -> Vec<String> {
        lock(&self.shared.state)
            .events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or_default().to_string())
            .collect()
    }
    /// Number of `/event` and `/global/event` streams currently open.
    pub fn open_event_streams(&self) -> usize {
        lock(&self.shared.subs).len()
    }
    /// Number of TCP connections currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.net.inner).conns.len()
    }

    // ----- scripting -----

    /// Create a session as `POST /session` would (emits `session.created`).
    pub fn create_session(&self, title: Option<&str>) -> Value {
        let mut st = lock(&self.shared.state);
        self.shared.new_session(
            &mut st,
            title.map(str::to_string),
            self.shared.directory.clone(),
        )
    }
    /// Every session, most recently updated first.
    pub fn sessions(&self) -> Vec<Value> {
        let st = lock(&self.shared.state);
        sorted_sessions(&st)
            .into_iter()
            .map(|s| s.info.clone())
            .collect()
    }
    /// The stored `[{info, parts}]` of a session, oldest first.
    pub fn messages(&self, session_id: &str) -> Vec<Value> {
        let st = lock(&self.shared.state);
        sess_idx(&st, session_id)
            .map(|i| st.sessions[i].messages.clone())
            .unwrap_or_default()
    }
    /// The current status of a session (`{"type":"idle"}` when not listed).
    pub fn session_status(&self, session_id: &str) -> Value {
        let st = lock(&self.shared.state);
        sess_idx(&st, session_id)
            .and_then(|i| st.sessions[i].status.clone())
            .unwrap_or_else(|| json!({"type": "idle"}))
    }
    /// Set a session's status (emits `session.status`; idle also `session.idle`).
    pub fn set_session_status(&self, session_id: &str, status: Value) {
        let mut st = lock(&self.shared.state);
        let Some(i) = sess_idx(&st, session_id) else {
            panic!("fake opencode: no session {session_id}");
        };
        let dir = st.sessions[i].directory();
        let idle = status["type"] == "idle";
        st.sessions[i].status = if idle { None } else { Some(status.clone()) };
        self.shared.emit(
            &mut st,
            Some(&dir),
            "session.status",
            json!({"sessionID": session_id, "status": status}),
        );
        if idle {
            self.shared.emit(
                &mut st,
                Some(&dir),
                "session.idle",
                json!({"sessionID": session_id}),
            );
        }
    }
    /// Add a pending permission request (emits `permission.asked`); returns its id.
    pub fn add_permission(&self, session_id: &str, permission: &str, patterns: &[&str]) -> String {
        let mut st = lock(&self.shared.state);
        let (id, _rx) = self
            .shared
            .ask_permission(&mut st, session_id, permission, patterns);
        id
    }
    /// Permission requests still pending.
    pub fn pending_permissions(&self) -> Vec<Value> {
        lock(&self.shared.state)
            .permissions
            .iter()
            .map(|p| p.request.clone())
            .collect()
    }
    /// Emit an arbitrary event on `/event`.
    pub fn emit_event(&self, ty: &str, properties: Value) {
        let mut st = lock(&self.shared.state);
        self.shared.emit(&mut st, None, ty, properties);
    }
}

impl Drop for FakeOpenCode {
    fn drop(&mut self) {
        self.shared.die_now();
    }
}

/// A bound, listening TCP socket that is never accepted: connecting succeeds
/// (the kernel completes the handshake) but no byte is ever answered. Keep the
/// listener alive as long as the port should hang.
pub fn blackhole_port() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind blackhole port");
    let port = listener.local_addr().expect("blackhole local_addr").port();
    (listener, port)
}

/// A loopback port nothing listens on (bound, read, closed): connecting is refused.
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind dead port");
    listener.local_addr().expect("dead port local_addr").port()
}

/// `Basic <base64(user:password)>`, the `Authorization` header value.
pub fn basic_auth_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        b64_encode(format!("{user}:{password}").as_bytes())
    )
}

// ===========================================================================
// Shared state
// ===========================================================================

struct Shared {
    addr: SocketAddr,
    directory: String,
    behaviour: Mutex<Behaviour>,
    cfg: Mutex<FakeConfig>,
    state: Mutex<State>,
    rec: Mutex<Rec>,
    tx: broadcast::Sender<Arc<Frame>>,
    kill: CancellationToken,
    net: Arc<NetRegistry>,
    subs: Mutex<Vec<Arc<SubState>>>,
    serve_task: Mutex<Option<JoinHandle<()>>>,
    rng: Mutex<u64>,
    id_counter: AtomicU64,
}

#[derive(Default)]
struct Rec {
    requests: Vec<RecordedRequest>,
    prompts: Vec<RecordedPrompt>,
    aborts: Vec<String>,
    permission_replies: Vec<PermissionReply>,
}

#[derive(Default)]
struct State {
    sessions: Vec<SessionEntry>,
    permissions: Vec<PendingPermission>,
    /// Sequence number of the last emitted event.
    seq: u64,
    events: Vec<Value>,
    next_run: u64,
    next_session: u64,
}

struct SessionEntry {
    info: Value,
    messages: Vec<Value>,
    /// `None` means idle (not listed by `/session/status`).
    status: Option<Value>,
    run: Option<Run>,
    created_idx: u64,
}

impl SessionEntry {
    fn id(&self) -> &str {
        self.info["id"].as_str().unwrap_or_default()
    }
    fn directory(&self) -> String {
        self.info["directory"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    fn message_mut(&mut self, id: &str) -> Option<&mut Value> {
        self.messages.iter_mut().find(|m| m["info"]["id"] == id)
    }
}

/// The running agent loop of a session.
struct Run {
    id: u64,
    cancel: CancellationToken,
    assistant_id: Option<String>,
    queue: VecDeque<Prompt>,
    /// Blocking `POST /session/{id}/message` calls waiting for the run to end.
    waiters: Vec<oneshot::Sender<Value>>,
}

#[derive(Clone)]
struct Prompt {
    text: String,
    parts: Vec<Value>,
}

struct PendingPermission {
    request: Value,
    waiter: Option<oneshot::Sender<String>>,
}

/// One emitted event, ready for the SSE streams.
struct Frame {
    seq: u64,
    directory: Option<String>,
    event: Value,
    line: Bytes,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9);
    (nanos ^ ((std::process::id() as u64) << 32)) | 1
}

fn sess_idx(st: &State, id: &str) -> Option<usize> {
    st.sessions.iter().position(|s| s.id() == id)
}

fn run_active(st: &State, sid: &str, run_id: u64) -> Option<usize> {
    let i = sess_idx(st, sid)?;
    (st.sessions[i].run.as_ref()?.id == run_id).then_some(i)
}

fn sorted_sessions(st: &State) -> Vec<&SessionEntry> {
    let mut v: Vec<&SessionEntry> = st.sessions.iter().collect();
    v.sort_by(|a, b| {
        let ua = a.info["time"]["updated"].as_u64().unwrap_or(0);
        let ub = b.info["time"]["updated"].as_u64().unwrap_or(0);
        ub.cmp(&ua).then(b.created_idx.cmp(&a.created_idx))
    });
    v
}

const ADJECTIVES: &[&str] = &[
    "lucky", "brave", "quiet", "swift", "gentle", "bright", "calm", "eager",
];
const NOUNS: &[&str] = &[
    "nebula", "river", "falcon", "meadow", "comet", "harbor", "cedar", "pixel",
];

impl Shared {
    fn next_random(&self) -> u64 {
        let mut s = lock(&self.rng);
        // xorshift64*
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An OpenCode-style id: `<prefix>_` + 12 hex (time, ascending) + 14 base62.
    fn gen_id(&self, prefix: &str) -> String {
        const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let c = self.id_counter.fetch_add(1, Ordering::SeqCst);
        let head = ((now_ms() << 12) | (c & 0xfff)) & 0xffff_ffff_ffff;
        let mut r = self.next_random();
        let mut tail = String::with_capacity(14);
        for i in 0..14 {
            if i == 10 {
                r = self.next_random();
            }
            tail.push(B62[(r % 62) as usize] as char);
            r /= 62;
        }
        format!("{prefix}_{head:012x}{tail}")
    }

    fn slug(&self) -> String {
        let r = self.next_random();
        format!(
            "{}-{}",
            ADJECTIVES[(r % ADJECTIVES.len() as u64) as usize],
            NOUNS[((r >> 8) % NOUNS.len() as u64) as usize]
        )
    }

    fn cfg(&self) -> FakeConfig {
        lock(&self.cfg).clone()
    }

    fn behaviour(&self) -> Behaviour {
        lock(&self.behaviour).clone()
    }

    /// Record and broadcast one event. Call with the state lock held, so that
    /// events keep the order of the state changes.
    fn emit(&self, st: &mut State, directory: Option<&str>, ty: &str, properties: Value) -> u64 {
        st.seq += 1;
        let event = json!({"id": self.gen_id("evt"), "type": ty, "properties": properties});
        let line = Bytes::from(format!("data: {event}\n\n"));
        st.events.push(event.clone());
        let _ = self.tx.send(Arc::new(Frame {
            seq: st.seq,
            directory: directory.map(str::to_string),
            event,
            line,
        }));
        st.seq
    }

    fn new_session(&self, st: &mut State, title: Option<String>, directory: String) -> Value {
        let now = now_ms();
        let id = self.gen_id("ses");
        let info = json!({
            "id": id,
            "slug": self.slug(),
            "projectID": "global",
            "directory": directory,
            "path": "",
            "title": title.unwrap_or_else(|| format!("New session - {now}")),
            "version": FAKE_VERSION,
            "cost": 0,
            "tokens": {"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}},
            "time": {"created": now, "updated": now},
        });
        st.next_session += 1;
        let created_idx = st.next_session;
        st.sessions.push(SessionEntry {
            info: info.clone(),
            messages: Vec::new(),
            status: None,
            run: None,
            created_idx,
        });
        self.emit(
            st,
            Some(&directory),
            "session.created",
            json!({"sessionID": id, "info": info}),
        );
        self.emit(
            st,
            Some(&directory),
            "session.updated",
            json!({"sessionID": id, "info": info}),
        );
        info
    }

    /// Start one turn: user message, busy, assistant message with an empty
    /// text part. Returns (directory, assistant message id, text part id).
    fn begin_turn(&self, st: &mut State, i: usize, p: &Prompt) -> (String, String, String) {
        let now = now_ms();
        let sid = st.sessions[i].id().to_string();
        let dir = st.sessions[i].directory();
        let umid = self.gen_id("msg");
        let user_info = json!({
            "id": umid, "sessionID": sid, "role": "user", "time": {"created": now},
            "agent": "build", "model": {"providerID": "fake", "modelID": "fake-model"},
        });
        let user_parts: Vec<Value> = p
            .parts
            .iter()
            .map(|part| {
                let mut part = part.clone();
                part["id"] = json!(self.gen_id("prt"));
                part["sessionID"] = json!(sid);
                part["messageID"] = json!(umid);
                part
            })
            .collect();
        st.sessions[i]
            .messages
            .push(json!({"info": user_info, "parts": user_parts}));
        self.emit(
            st,
            Some(&dir),
            "message.updated",
            json!({"sessionID": sid, "info": user_info}),
        );
        for part in &user_parts {
            self.emit(
                st,
                Some(&dir),
                "message.part.updated",
                json!({"sessionID": sid, "part": part, "time": now}),
            );
        }
        st.sessions[i].info["time"]["updated"] = json!(now);
        let info = st.sessions[i].info.clone();
        self.emit(
            st,
            Some(&dir),
            "session.updated",
            json!({"sessionID": sid, "info": info}),
        );
        if st.sessions[i].status.as_ref().map(|s| s["type"] == "busy") != Some(true) {
            st.sessions[i].status = Some(json!({"type": "busy"}));
            self.emit(
                st,
                Some(&dir),
                "session.status",
                json!({"sessionID": sid, "status": {"type": "busy"}}),
            );
        }
        let amid = self.gen_id("msg");
        let assistant = json!({
            "id": amid, "sessionID": sid, "role": "assistant", "parentID": umid,
            "modelID": "fake-model", "providerID": "fake", "mode": "build", "agent": "build",
            "path": {"cwd": dir, "root": dir}, "cost": 0,
            "tokens": {"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}},
            "time": {"created": now},
        });
        st.sessions[i]
            .messages
            .push(json!({"info": assistant, "parts": []}));
        self.emit(
            st,
            Some(&dir),
            "message.updated",
            json!({"sessionID": sid, "info": assistant}),
        );
        let pid = self.gen_id("prt");
        let part = json!({
            "id": pid, "sessionID": sid, "messageID": amid, "type": "text", "text": "",
            "time": {"start": now},
        });
        if let Some(m) = st.sessions[i].message_mut(&amid) {
            m["parts"].as_array_mut().expect("parts").push(part.clone());
        }
        self.emit(
            st,
            Some(&dir),
            "message.part.updated",
            json!({"sessionID": sid, "part": part, "time": now}),
        );
        if let Some(run) = st.sessions[i].run.as_mut() {
            run.assistant_id = Some(amid.clone());
        }
        (dir, amid, pid)
    }

    /// Append a text delta to the assistant's text part and emit it.
    fn push_delta(&self, st: &mut State, i: usize, amid: &str, pid: &str, delta: &str) -> u64 {
        let sid = st.sessions[i].id().to_string();
        let dir = st.sessions[i].directory();
        if let Some(m) = st.sessions[i].message_mut(amid)
            && let Some(part) = m["parts"]
                .as_array_mut()
                .and_then(|ps| ps.iter_mut().find(|p| p["id"] == pid))
        {
            let text = format!("{}{delta}", part["text"].as_str().unwrap_or_default());
            part["text"] = json!(text);
        }
        self.emit(
            st,
            Some(&dir),
            "message.part.delta",
            json!({"sessionID": sid, "messageID": amid, "partID": pid, "field": "text", "delta": delta}),
        )
    }

    /// Insert a completed tool part (pending, running and completed events).
    fn tool_part(&self, st: &mut State, i: usize, amid: &str) {
        let now = now_ms();
        let sid = st.sessions[i].id().to_string();
        let dir = st.sessions[i].directory();
        let input = json!({"command": "echo fake", "description": "Fake tool call"});
        let mut part = json!({
            "id": self.gen_id("prt"), "sessionID": sid, "messageID": amid, "type": "tool",
            "callID": self.gen_id("call"), "tool": "bash",
            "state": {"status": "running", "input": input, "time": {"start": now}},
        });
        self.emit(
            st,
            Some(&dir),
            "message.part.updated",
            json!({"sessionID": sid, "part": part, "time": now}),
        );
        part["state"] = json!({
            "status": "completed", "input": input, "output": "fake\n", "title": "echo fake",
            "metadata": {}, "time": {"start": now, "end": now_ms()},
        });
        if let Some(m) = st.sessions[i].message_mut(amid)
            && let Some(parts) = m["parts"].as_array_mut()
        {
            // Keep the text part last, as OpenCode does for text after a tool.
            let at = parts.len().saturating_sub(1);
            parts.insert(at, part.clone());
        }
        self.emit(
            st,
            Some(&dir),
            "message.part.updated",
            json!({"sessionID": sid, "part": part, "time": now_ms()}),
        );
    }

    /// Finish a turn: final text part, completed assistant message.
    fn end_turn(&self, st: &mut State, i: usize, amid: &str, pid: &str) {
        let now = now_ms();
        let sid = st.sessions[i].id().to_string();
        let dir = st.sessions[i].directory();
        let mut part_snapshot = Value::Null;
        let mut info_snapshot = Value::Null;
        if let Some(m) = st.sessions[i].message_mut(amid) {
            if let Some(part) = m["parts"]
                .as_array_mut()
                .and_then(|ps| ps.iter_mut().find(|p| p["id"] == pid))
            {
                part["time"]["end"] = json!(now);
                part_snapshot = part.clone();
            }
            m["info"]["time"]["completed"] = json!(now);
            m["info"]["finish"] = json!("stop");
            info_snapshot = m["info"].clone();
        }
        if !part_snapshot.is_null() {
            self.emit(
                st,
                Some(&dir),
                "message.part.updated",
                json!({"sessionID": sid, "part": part_snapshot, "time": now}),
            );
        }
        self.emit(
            st,
            Some(&dir),
            "message.updated",
            json!({"sessionID": sid, "info": info_snapshot}),
        );
    }

    /// Make a session idle (status map entry removed, events emitted).
    fn go_idle(&self, st: &mut State, i: usize) {
        let sid = st.sessions[i].id().to_string();
        let dir = st.sessions[i].directory();
        st.sessions[i].status = None;
        self.emit(
            st,
            Some(&dir),
            "session.status",
            json!({"sessionID": sid, "status": {"type": "idle"}}),
        );
        self.emit(st, Some(&dir), "session.idle", json!({"sessionID": sid}));
    }

    fn last_assistant(&self, st: &State, i: usize) -> Value {
        st.sessions[i]
            .messages
            .iter()
            .rev()
            .find(|m| m["info"]["role"] == "assistant")
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn ask_permission(
        &self,
        st: &mut State,
        session_id: &str,
        permission: &str,
        patterns: &[&str],
    ) -> (String, oneshot::Receiver<String>) {
        let id = self.gen_id("per");
        let request = json!({
            "id": id, "sessionID": session_id, "permission": permission,
            "patterns": patterns, "metadata": {}, "always": [],
        });
        let (tx, rx) = oneshot::channel();
        st.permissions.push(PendingPermission {
            request: request.clone(),
            waiter: Some(tx),
        });
        let dir = sess_idx(st, session_id).map(|i| st.sessions[i].directory());
        self.emit(st, dir.as_deref(), "permission.asked", request);
        (id, rx)
    }

    /// Abort the run of session `i`, if any. Returns true if one was running.
    fn abort_run(&self, st: &mut State, i: usize) -> bool {
        let Some(mut run) = st.sessions[i].run.take() else {
            return false;
        };
        run.cancel.cancel();
        let sid = st.sessions[i].id().to_string();
        let dir = st.sessions[i].directory();
        let error =
            json!({"name": ABORTED_ERROR_NAME, "data": {"message": "The operation was aborted."}});
        if let Some(amid) = run.assistant_id.clone() {
            let now = now_ms();
            let mut info = Value::Null;
            if let Some(m) = st.sessions[i].message_mut(&amid) {
                if m["info"]["time"]["completed"].is_null() {
                    m["info"]["time"]["completed"] = json!(now);
                }
                m["info"]["error"] = error.clone();
                info = m["info"].clone();
            }
            self.emit(
                st,
                Some(&dir),
                "message.updated",
                json!({"sessionID": sid, "info": info}),
            );
        }
        // Pending permissions of this session die with the run.
        st.permissions
            .retain(|p| p.request["sessionID"] != sid.as_str());
        self.emit(
            st,
            Some(&dir),
            "session.error",
            json!({"sessionID": sid, "error": error}),
        );
        self.go_idle(st, i);
        let last = self.last_assistant(st, i);
        for w in run.waiters.drain(..) {
            let _ = w.send(last.clone());
        }
        true
    }

    /// Close the listener and every connection, stop everything.
    fn die_now(&self) {
        self.kill.cancel();
        {
            let mut net = lock(&self.net.inner);
            net.dead = true;
            // SAFETY: every fd in the registry is still open: entries are
            // removed (under this lock) before their socket is closed.
            if let Some(fd) = net.listener_fd {
                unsafe {
                    libc::shutdown(fd, libc::SHUT_RDWR);
                }
            }
            for (fd, stats) in net.conns.values() {
                stats.killed.store(true, Ordering::SeqCst);
                unsafe {
                    libc::shutdown(*fd, libc::SHUT_RDWR);
                }
            }
        }
        if let Some(task) = lock(&self.serve_task).as_ref() {
            task.abort();
        }
    }

    /// Wait until every SSE stream has written (to its socket) every frame up
    /// to `target_seq`, bounded by `timeout`.
    async fn wait_sse_flushed(&self, target_seq: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let flushed = lock(&self.subs)
                .iter()
                .all(|s| s.flushed_through(target_seq));
            if flushed || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

// ===========================================================================
// Network layer: a listener whose connections can all be killed at once
// ===========================================================================

#[derive(Default)]
struct NetRegistry {
    inner: Mutex<NetInner>,
}

#[derive(Default)]
struct NetInner {
    listener_fd: Option<RawFd>,
    conns: HashMap<u64, (RawFd, Arc<ConnStats>)>,
    next_id: u64,
    dead: bool,
}

#[derive(Default)]
struct ConnStats {
    killed: AtomicBool,
    closed: AtomicBool,
    bytes_written: AtomicU64,
    /// Number of `\n\n` sequences written: one per complete SSE frame.
    frames_written: AtomicU64,
    last_was_newline: AtomicBool,
}

impl ConnStats {
    fn count_written(&self, bufs: &[&[u8]], mut n: usize) {
        self.bytes_written.fetch_add(n as u64, Ordering::SeqCst);
        let mut prev = self.last_was_newline.load(Ordering::SeqCst);
        let mut frames = 0;
        for buf in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(buf.len());
            for &b in &buf[..take] {
                if b == b'\n' && prev {
                    frames += 1;
                    prev = false;
                } else {
                    prev = b == b'\n';
                }
            }
            n -= take;
        }
        self.last_was_newline.store(prev, Ordering::SeqCst);
        self.frames_written.fetch_add(frames, Ordering::SeqCst);
    }
    fn gone(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.killed.load(Ordering::SeqCst)
    }
}

struct KillListener {
    inner: TcpListener,
    net: Arc<NetRegistry>,
    kill: CancellationToken,
}

impl Drop for KillListener {
    fn drop(&mut self) {
        lock(&self.net.inner).listener_fd = None;
    }
}

impl Listener for KillListener {
    type Io = KillIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillIo, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let mut net = lock(&self.net.inner);
                    if net.dead {
                        continue; // dropped: closed at once
                    }
                    net.next_id += 1;
                    let id = net.next_id;
                    let stats = Arc::new(ConnStats::default());
                    net.conns.insert(id, (stream.as_raw_fd(), stats.clone()));
                    drop(net);
                    let io = KillIo {
                        inner: stream,
                        stats,
                        net: self.net.clone(),
                        id,
                    };
                    return (io, addr);
                }
                Err(_) if self.kill.is_cancelled() => std::future::pending::<()>().await,
                // e.g. EMFILE: back off briefly and retry, as axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct KillIo {
    inner: TcpStream,
    stats: Arc<ConnStats>,
    net: Arc<NetRegistry>,
    id: u64,
}

impl Drop for KillIo {
    fn drop(&mut self) {
        // Runs before `inner` is closed, so `die_now` never sees a stale fd.
        self.stats.closed.store(true, Ordering::SeqCst);
        lock(&self.net.inner).conns.remove(&self.id);
    }
}

fn killed_err() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "fake opencode died")
}

impl AsyncRead for KillIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stats.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed_err()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stats.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed_err()));
        }
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.stats.count_written(&[buf], n);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.stats.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed_err()));
        }
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            let slices: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
            self.stats.count_written(&slices, n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Per-connection info handed to the handler.
#[derive(Clone)]
struct ConnInfo {
    stats: Arc<ConnStats>,
}

impl Connected<IncomingStream<'_, KillListener>> for ConnInfo {
    fn connect_info(stream: IncomingStream<'_, KillListener>) -> Self {
        ConnInfo {
            stats: stream.io().stats.clone(),
        }
    }
}

// ===========================================================================
// SSE
// ===========================================================================

/// Progress of one `/event` stream, for flush tracking.
struct SubState {
    conn: Arc<ConnStats>,
    /// `\n\n` already written on this connection before the stream began.
    base_frames: u64,
    /// Sequence number of the last broadcast frame this stream has handled.
    last_seq: AtomicU64,
    /// Frames handed to hyper (each ends with one `\n\n`).
    yielded: AtomicU64,
}

impl SubState {
    fn flushed_through(&self, target: u64) -> bool {
        if self.conn.gone() {
            return true;
        }
        // `yielded` is bumped before `last_seq`, so reading in this order is safe.
        let last = self.last_seq.load(Ordering::SeqCst);
        let yielded = self.yielded.load(Ordering::SeqCst);
        let written = self.conn.frames_written.load(Ordering::SeqCst) - self.base_frames;
        last >= target && written >= yielded
    }
}

/// Removes the stream from the open-stream list when hyper drops it.
struct SubGuard {
    shared: Arc<Shared>,
    sub: Arc<SubState>,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        lock(&self.shared.subs).retain(|s| !Arc::ptr_eq(s, &self.sub));
    }
}

struct SseState {
    guard: SubGuard,
    rx: broadcast::Receiver<Arc<Frame>>,
    first: Option<Bytes>,
    directory: String,
    global: bool,
    heartbeat: Option<tokio::time::Interval>,
    done: bool,
}

impl SseState {
    fn yielded(&self, seq: Option<u64>) {
        self.guard.sub.yielded.fetch_add(1, Ordering::SeqCst);
        if let Some(seq) = seq {
            self.guard.sub.last_seq.store(seq, Ordering::SeqCst);
        }
    }
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache, no-transform")
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("sse response")
}

fn global_wrap(frame_dir: Option<&str>, event: &Value) -> Value {
    match frame_dir {
        Some(dir) => json!({"directory": dir, "project": "global", "payload": event}),
        None => json!({"payload": event}),
    }
}

fn event_stream(
    sh: &Arc<Shared>,
    conn: Arc<ConnStats>,
    directory: String,
    global: bool,
) -> Response {
    // Subscribe and read the sequence number atomically with respect to
    // emission (which happens under the state lock).
    let (rx, seq) = {
        let st = lock(&sh.state);
        (sh.tx.subscribe(), st.seq)
    };
    let sub = Arc::new(SubState {
        base_frames: conn.frames_written.load(Ordering::SeqCst),
        conn,
        last_seq: AtomicU64::new(seq),
        yielded: AtomicU64::new(0),
    });
    lock(&sh.subs).push(sub.clone());
    let connected = json!({"id": sh.gen_id("evt"), "type": "server.connected", "properties": {}});
    let connected = if global {
        json!({"payload": connected})
    } else {
        connected
    };
    let heartbeat = sh.cfg().heartbeat.map(|every| {
        let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        iv
    });
    let state = SseState {
        guard: SubGuard {
            shared: sh.clone(),
            sub,
        },
        rx,
        first: Some(Bytes::from(format!("data: {connected}\n\n"))),
        directory,
        global,
        heartbeat,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(first) = s.first.take() {
            s.yielded(None);
            return Some((Ok::<Bytes, io::Error>(first), s));
        }
        let kill = s.guard.shared.kill.clone();
        loop {
            tokio::select! {
                biased;
                _ = kill.cancelled() => {
                    s.done = true;
                    return Some((Err(killed_err()), s));
                }
                r = s.rx.recv() => match r {
                    Ok(frame) => {
                        let wanted = frame.directory.as_deref().is_none_or(|d| d == s.directory);
                        if !s.global && !wanted {
                            s.guard.sub.last_seq.store(frame.seq, Ordering::SeqCst);
                            continue;
                        }
                        let line = if s.global {
                            let wrapped = global_wrap(frame.directory.as_deref(), &frame.event);
                            Bytes::from(format!("data: {wrapped}\n\n"))
                        } else {
                            frame.line.clone()
                        };
                        s.yielded(Some(frame.seq));
                        return Some((Ok(line), s));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = async { s.heartbeat.as_mut().expect("heartbeat").tick().await },
                    if s.heartbeat.is_some() =>
                {
                    let hb = json!({"id": s.guard.shared.gen_id("evt"), "type": "server.heartbeat", "properties": {}});
                    let hb = if s.global { json!({"payload": hb}) } else { hb };
                    s.yielded(None);
                    return Some((Ok(Bytes::from(format!("data: {hb}\n\n"))), s));
                }
            }
        }
    });
    sse_response(Body::from_stream(stream))
}

/// The garbage `/event` of [`Behaviour::GarbageSse`]: a burst of junk, then
/// more junk every 200 ms until the fake dies.
fn garbage_stream(sh: &Arc<Shared>) -> Response {
    let long_len = sh.cfg().garbage_line_len;
    let mut long = Vec::with_capacity(long_len + 8);
    long.extend_from_slice(b"data: ");
    long.resize(long_len + 6, b'x');
    long.extend_from_slice(b"\n\n");
    let burst: Vec<Bytes> = vec![
        Bytes::from_static(b"data: this is not json\n\n"),
        Bytes::from_static(b"data: {\"type\":\"session.status\",\"properties\":\n\n"),
        Bytes::from_static(b"data: \x00\xff\xfe\x80\x81\xc3\x28 binary junk\n\n"),
        Bytes::from_static(b"\xde\xad\xbe\xef\x00\x01\x02\n\n"),
        Bytes::from_static(b"event: bogus\nid: 7\nretry: abc\n\n"),
        Bytes::from_static(b"data: [1,2,3]\n\ndata: null\n\ndata: {\"no_type\":true}\n\n"),
        Bytes::from_static(b":comment\r\n\r\ndata:\n\n"),
        Bytes::from(long),
    ];
    let kill = sh.kill.clone();
    let stream = futures::stream::unfold(
        (VecDeque::from(burst), 0u64, kill),
        |(mut burst, n, kill)| async move {
            if let Some(b) = burst.pop_front() {
                return Some((Ok::<Bytes, io::Error>(b), (burst, n, kill)));
            }
            tokio::select! {
                _ = kill.cancelled() => None,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    let junk = format!("data: garbage {n} \u{1}\u{7f}{{{{\n\n");
                    Some((Ok(Bytes::from(junk)), (burst, n + 1, kill)))
                }
            }
        },
    );
    sse_response(Body::from_stream(stream))
}

// ===========================================================================
// HTTP handler
// ===========================================================================

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

fn ok(v: Value) -> Response {
    json_response(StatusCode::OK, v)
}

fn error_response(status: StatusCode, name: &str, message: &str) -> Response {
    json_response(status, json!({"name": name, "data": {"message": message}}))
}

fn not_found(what: &str) -> Response {
    error_response(StatusCode::NOT_FOUND, "NotFoundError", what)
}

fn bad_request(message: &str) -> Response {
    error_response(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn html() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        SPA_HTML,
    )
        .into_response()
}

fn unauthorized() -> Response {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(header::WWW_AUTHENTICATE, "Basic realm=\"Secure Area\"")
        .body(Body::empty())
        .expect("401 response")
}

fn http500() -> Response {
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"name": "UnknownError", "data": {"message": "fake internal server error", "ref": "err_fake"}}),
    )
}

fn authorized(
    expected: &(String, String),
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> bool {
    let want = format!("{}:{}", expected.0, expected.1);
    if let Some(token) = q.get("auth_token") {
        return b64_decode(token).is_some_and(|d| d == want.as_bytes());
    }
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut it = value.splitn(2, ' ');
    let scheme = it.next().unwrap_or_default();
    let creds = it.next().unwrap_or_default().trim();
    scheme.eq_ignore_ascii_case("basic") && b64_decode(creds).is_some_and(|d| d == want.as_bytes())
}

async fn handle(
    AxState(sh): AxState<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let q: HashMap<String, String> = Query::try_from_uri(&parts.uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    lock(&sh.rec).requests.push(RecordedRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_string),
        authorization,
    });
    if sh.kill.is_cancelled() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if let Some(creds) = sh.cfg().auth
        && !authorized(&creds, &parts.headers, &q)
    {
        return unauthorized();
    }
    let behaviour = sh.behaviour();
    match behaviour {
        Behaviour::Http500 => return http500(),
        Behaviour::Html => return html(),
        _ => {}
    }
    let body = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return bad_request("could not read the request body"),
    };
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let directory = q
        .get("directory")
        .cloned()
        .unwrap_or_else(|| sh.directory.clone());
    let m = parts.method.clone();
    match (m, segs.as_slice()) {
        (Method::GET, ["global", "health"]) => {
            if let Behaviour::SlowHealth(delay) = behaviour {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = sh.kill.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            }
            ok(json!({"healthy": true, "version": FAKE_VERSION}))
        }
        (Method::GET, ["event"]) | (Method::GET, ["global", "event"]) => {
            if behaviour == Behaviour::GarbageSse {
                garbage_stream(&sh)
            } else {
                event_stream(&sh, conn.stats.clone(), directory, segs[0] == "global")
            }
        }
        (Method::GET, ["session"]) => list_sessions(&sh, &q, q.get("directory").cloned()),
        (Method::POST, ["session"]) => {
            let v = match parse_body(&body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let title = v["title"].as_str().map(str::to_string);
            let mut st = lock(&sh.state);
            ok(sh.new_session(&mut st, title, directory))
        }
        (Method::GET, ["session", "status"]) => {
            let st = lock(&sh.state);
            let mut map = serde_json::Map::new();
            for s in st.sessions.iter().filter(|s| s.directory() == directory) {
                if let Some(status) = &s.status {
                    map.insert(s.id().to_string(), status.clone());
                }
            }
            ok(Value::Object(map))
        }
        (Method::GET, ["session", id]) => {
            let st = lock(&sh.state);
            match sess_idx(&st, id) {
                Some(i) => ok(st.sessions[i].info.clone()),
                None => not_found(&format!("Session not found: {id}")),
            }
        }
        (Method::DELETE, ["session", id]) => {
            let mut st = lock(&sh.state);
            let Some(i) = sess_idx(&st, id) else {
                return not_found(&format!("Session not found: {id}"));
            };
            sh.abort_run(&mut st, i);
            let entry = st.sessions.remove(i);
            let dir = entry.directory();
            sh.emit(
                &mut st,
                Some(&dir),
                "session.deleted",
                json!({"sessionID": id, "info": entry.info}),
            );
            ok(json!(true))
        }
        (Method::GET, ["session", id, "message"]) => get_messages(&sh, id, &q),
        (Method::POST, ["session", id, "prompt_async"]) => {
            prompt(&sh, id, &body, false, &conn.stats).await
        }
        (Method::POST, ["session", id, "message"]) => {
            prompt(&sh, id, &body, true, &conn.stats).await
        }
        (Method::POST, ["session", id, "abort"]) => {
            let mut st = lock(&sh.state);
            let Some(i) = sess_idx(&st, id) else {
                return not_found(&format!("Session not found: {id}"));
            };
            lock(&sh.rec).aborts.push(id.to_string());
            sh.abort_run(&mut st, i);
            ok(json!(true))
        }
        (Method::GET, ["permission"]) => {
            let st = lock(&sh.state);
            let list: Vec<Value> = st
                .permissions
                .iter()
                .filter(|p| {
                    let sid = p.request["sessionID"].as_str().unwrap_or_default();
                    sess_idx(&st, sid).is_none_or(|i| st.sessions[i].directory() == directory)
                })
                .map(|p| p.request.clone())
                .collect();
            ok(Value::Array(list))
        }
        (Method::POST, ["permission", id, "reply"]) => {
            let v = match parse_body(&body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let reply = v["reply"].as_str().unwrap_or_default().to_string();
            if !matches!(reply.as_str(), "once" | "always" | "reject") {
                return bad_request("reply must be one of once, always, reject");
            }
            let mut st = lock(&sh.state);
            let Some(pos) = st.permissions.iter().position(|p| p.request["id"] == *id) else {
                return error_response(
                    StatusCode::NOT_FOUND,
                    "PermissionNotFoundError",
                    &format!("Permission request not found: {id}"),
                );
            };
            let mut pending = st.permissions.remove(pos);
            let sid = pending.request["sessionID"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            lock(&sh.rec).permission_replies.push(PermissionReply {
                request_id: id.to_string(),
                reply: reply.clone(),
                message: v["message"].as_str().map(str::to_string),
            });
            let dir = sess_idx(&st, &sid).map(|i| st.sessions[i].directory());
            sh.emit(
                &mut st,
                dir.as_deref(),
                "permission.replied",
                json!({"sessionID": sid, "requestID": id, "reply": reply}),
            );
            if let Some(w) = pending.waiter.take() {
                let _ = w.send(reply);
            }
            ok(json!(true))
        }
        (Method::GET, ["path"]) => ok(json!({
            "home": "/root", "state": "/tmp/fake-opencode-state", "config": "/tmp/fake-opencode-config",
            "worktree": directory, "directory": directory,
        })),
        (Method::GET, ["project", "current"]) => ok(json!({
            "id": "global", "worktree": "/", "time": {"created": 0, "updated": 0}, "sandboxes": [],
        })),
        (Method::GET, ["config"]) => ok(json!({})),
        (Method::GET, ["agent"]) => ok(json!([
            {"name": "build", "mode": "primary", "description": "fake build agent"},
            {"name": "plan", "mode": "primary", "description": "fake plan agent"},
        ])),
        _ => html(),
    }
}

#[allow(clippy::result_large_err)]
fn parse_body(body: &Bytes) -> Result<Value, Response> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| bad_request(&format!("invalid JSON body: {e}")))
}

fn list_sessions(sh: &Shared, q: &HashMap<String, String>, directory: Option<String>) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(l)) => l,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let roots = q.get("roots").is_some_and(|r| r == "true");
    let search = q.get("search").map(|s| s.to_lowercase());
    let start = q.get("start").and_then(|s| s.parse::<u64>().ok());
    let st = lock(&sh.state);
    let list: Vec<Value> = sorted_sessions(&st)
        .into_iter()
        .filter(|s| directory.as_ref().is_none_or(|d| s.directory() == *d))
        .filter(|s| !roots || s.info["parentID"].is_null())
        .filter(|s| {
            search.as_ref().is_none_or(|needle| {
                s.info["title"]
                    .as_str()
                    .unwrap_or_default()
                    .to_lowercase()
                    .contains(needle)
            })
        })
        .filter(|s| start.is_none_or(|t| s.info["time"]["updated"].as_u64().unwrap_or(0) >= t))
        .take(limit)
        .map(|s| s.info.clone())
        .collect();
    ok(Value::Array(list))
}

fn get_messages(sh: &Shared, id: &str, q: &HashMap<String, String>) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 0,
        Some(Ok(l)) => l,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let before = q.get("before");
    if before.is_some() && limit == 0 {
        return bad_request("before requires limit");
    }
    let st = lock(&sh.state);
    let Some(i) = sess_idx(&st, id) else {
        return not_found(&format!("Session not found: {id}"));
    };
    let all = &st.sessions[i].messages;
    let end = match before {
        Some(cursor) => all
            .iter()
            .position(|m| m["info"]["id"] == cursor.as_str())
            .unwrap_or(all.len()),
        None => all.len(),
    };
    let start = if limit == 0 {
        0
    } else {
        end.saturating_sub(limit)
    };
    let page: Vec<Value> = all[start..end].to_vec();
    let mut resp = ok(Value::Array(page.clone()));
    if start > 0
        && let Some(cursor) = page.first().and_then(|m| m["info"]["id"].as_str())
        && let Ok(v) = cursor.parse()
    {
        resp.headers_mut().insert("x-next-cursor", v);
        if let Ok(link) =
            format!("</session/{id}/message?limit={limit}&before={cursor}>; rel=\"next\"").parse()
        {
            resp.headers_mut().insert(header::LINK, link);
        }
    }
    resp
}

async fn prompt(
    sh: &Arc<Shared>,
    id: &str,
    body: &Bytes,
    blocking: bool,
    conn: &Arc<ConnStats>,
) -> Response {
    let v = match parse_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(parts) = v["parts"].as_array() else {
        return bad_request("parts is required");
    };
    let texts: Vec<&str> = parts
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect();
    let text = texts.join("\n");
    let p = Prompt {
        text: text.clone(),
        parts: parts.clone(),
    };
    let rx = {
        let mut st = lock(&sh.state);
        let Some(i) = sess_idx(&st, id) else {
            return not_found(&format!("Session not found: {id}"));
        };
        lock(&sh.rec).prompts.push(RecordedPrompt {
            session_id: id.to_string(),
            text,
            body: v.clone(),
            blocking,
        });
        if v["noReply"] == true {
            let now = now_ms();
            let umid = sh.gen_id("msg");
            let dir = st.sessions[i].directory();
            let info = json!({"id": umid, "sessionID": id, "role": "user", "time": {"created": now}, "agent": "build",
                "model": {"providerID": "fake", "modelID": "fake-model"}});
            let msg = json!({"info": info, "parts": p.parts});
            st.sessions[i].messages.push(msg.clone());
            sh.emit(
                &mut st,
                Some(&dir),
                "message.updated",
                json!({"sessionID": id, "info": info}),
            );
            return if blocking {
                ok(msg)
            } else {
                StatusCode::NO_CONTENT.into_response()
            };
        }
        if sh.behaviour() == Behaviour::DieDuringSend {
            let written = conn.bytes_written.load(Ordering::SeqCst);
            tokio::spawn(die_during_send(
                sh.clone(),
                id.to_string(),
                p,
                conn.clone(),
                written,
                blocking,
            ));
            None
        } else {
            let (tx, rx) = if blocking {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            match st.sessions[i].run.as_mut() {
                Some(run) => {
                    run.queue.push_back(p);
                    run.waiters.extend(tx);
                }
                None => {
                    st.next_run += 1;
                    let run_id = st.next_run;
                    let cancel = sh.kill.child_token();
                    st.sessions[i].run = Some(Run {
                        id: run_id,
                        cancel: cancel.clone(),
                        assistant_id: None,
                        queue: VecDeque::new(),
                        waiters: tx.into_iter().collect(),
                    });
                    tokio::spawn(run_task(sh.clone(), id.to_string(), run_id, cancel, p));
                }
            }
            rx
        }
    };
    if !blocking {
        return StatusCode::NO_CONTENT.into_response();
    }
    let Some(rx) = rx else {
        // DieDuringSend: this request dies with the server.
        sh.kill.cancelled().await;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    tokio::select! {
        r = rx => match r {
            Ok(msg) => ok(msg),
            Err(_) => http500(),
        },
        _ = sh.kill.cancelled() => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// Split a reply into word deltas: "Hello", " from", " fake", …
fn split_reply(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if ch.is_whitespace() && !cur.trim().is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

async fn run_task(
    sh: Arc<Shared>,
    sid: String,
    run_id: u64,
    cancel: CancellationToken,
    first: Prompt,
) {
    let mut next = Some(first);
    while let Some(p) = next.take() {
        if !run_turn(&sh, &sid, run_id, &cancel, p).await {
            return;
        }
        let mut st = lock(&sh.state);
        let Some(i) = run_active(&st, &sid, run_id) else {
            return;
        };
        let queued = st.sessions[i]
            .run
            .as_mut()
            .and_then(|r| r.queue.pop_front());
        match queued {
            Some(q) => next = Some(q),
            None => {
                let run = st.sessions[i].run.take();
                sh.go_idle(&mut st, i);
                let last = sh.last_assistant(&st, i);
                for w in run.into_iter().flat_map(|r| r.waiters) {
                    let _ = w.send(last.clone());
                }
            }
        }
    }
}

/// One turn of the agent loop. Returns false if it was aborted (or the fake died).
async fn run_turn(
    sh: &Arc<Shared>,
    sid: &str,
    run_id: u64,
    cancel: &CancellationToken,
    p: Prompt,
) -> bool {
    let cfg = sh.cfg();
    let slow = p.text.contains("FAKE_SLOW");
    let (amid, pid) = {
        let mut st = lock(&sh.state);
        let Some(i) = run_active(&st, sid, run_id) else {
            return false;
        };
        let (_dir, amid, pid) = sh.begin_turn(&mut st, i, &p);
        if p.text.contains("FAKE_TOOL") {
            sh.tool_part(&mut st, i, &amid);
        }
        (amid, pid)
    };
    let mut reply = cfg.reply.clone();
    if p.text.contains("FAKE_PERMISSION") {
        let rx = {
            let mut st = lock(&sh.state);
            if run_active(&st, sid, run_id).is_none() {
                return false;
            }
            sh.ask_permission(&mut st, sid, "bash", &["echo fake"]).1
        };
        let answer = tokio::select! {
            _ = cancel.cancelled() => return false,
            r = rx => r.unwrap_or_else(|_| "reject".to_string()),
        };
        if answer == "reject" {
            reply = "Permission rejected.".to_string();
        }
    }
    let chunks = split_reply(&reply);
    let mut n = 0usize;
    loop {
        let (delta, delay) = if slow {
            (format!("FAKE_SLOW tick {n}. "), cfg.slow_tick)
        } else {
            match chunks.get(n) {
                Some(c) => (c.clone(), cfg.delta_delay),
                None => break,
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        let mut st = lock(&sh.state);
        let Some(i) = run_active(&st, sid, run_id) else {
            return false;
        };
        sh.push_delta(&mut st, i, &amid, &pid, &delta);
        n += 1;
    }
    let mut st = lock(&sh.state);
    let Some(i) = run_active(&st, sid, run_id) else {
        return false;
    };
    sh.end_turn(&mut st, i, &amid, &pid);
    true
}

/// [`Behaviour::DieDuringSend`]: start the turn, emit one delta, make sure the
/// frames and the prompt's response reached the sockets, then die.
async fn die_during_send(
    sh: Arc<Shared>,
    sid: String,
    p: Prompt,
    conn: Arc<ConnStats>,
    written_before: u64,
    blocking: bool,
) {
    let target = {
        let mut st = lock(&sh.state);
        let Some(i) = sess_idx(&st, &sid) else {
            return;
        };
        let (_dir, amid, pid) = sh.begin_turn(&mut st, i, &p);
        sh.push_delta(&mut st, i, &amid, &pid, DIE_DURING_SEND_DELTA)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    if !blocking {
        // Let the 204 reach the client first, as a crash after the reply would.
        while conn.bytes_written.load(Ordering::SeqCst) <= written_before
            && !conn.gone()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    sh.wait_sse_flushed(
        target,
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await;
    sh.die_now();
}

// ===========================================================================
// base64 (standard alphabet, padded)
// ===========================================================================

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn b64_encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(B64[(n >> 18) as usize & 63] as char);
        out.push(B64[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            B64[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            B64[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

pub fn b64_decode(input: &str) -> Option<Vec<u8>> {
    let input = input.trim_end_matches('=');
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
