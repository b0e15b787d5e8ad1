//! Harness for integration tests against the real `opencode serve` binary.
//!
//! * [`FakeLlm`] runs `tests/fixtures/fake_llm.py` (a stdlib-only fake OpenAI chat-completions
//!   server) on an ephemeral loopback port.
//! * [`RealOpenCode`] runs `opencode serve` on 127.0.0.1 with isolated HOME/XDG dirs in a tempdir,
//!   wired to a fake LLM through `OPENCODE_CONFIG_CONTENT`, and waits until it is healthy.
//! * [`HttpTarget`] / [`http_request`] are a tiny blocking HTTP/1.1 client over `std::net`, usable
//!   from sync tests and (through [`HttpTarget::json_async`]) from tokio tests.
//!
//! Every child process is owned by a guard that kills it by PID and reaps it on drop, so nothing
//! is left behind when a test panics. The opencode binary comes from [`opencode_bin`]; tests call
//! [`require_opencode`] first, which fails loudly under `CI` and skips (loudly) elsewhere.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::env;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

/// The fake LLM's default reply (same as `fake_llm.py --reply`).
pub const DEFAULT_REPLY: &str = "Hello from fake LLM.";
/// The title the fake LLM gives untitled sessions.
pub const FAKE_TITLE: &str = "Fake title";
/// Provider/model ids configured for the fake LLM.
pub const FAKE_PROVIDER: &str = "fake";
pub const FAKE_MODEL: &str = "fake-model";
/// Default username of `opencode serve` basic auth.
pub const DEFAULT_USERNAME: &str = "opencode";
/// How long `RealOpenCode::start` waits for `/global/health`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request timeout of the helper HTTP client.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Environment, binary lookup, ports, waiting
// ---------------------------------------------------------------------------------------------

/// Root of the `opencode-mcp` package (where Cargo.toml and `tests/` live).
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("tests").join("fixtures").join(name)
}

/// True when running under CI (`CI` set to anything but empty, `0` or `false`).
pub fn is_ci() -> bool {
    match env::var("CI") {
        Ok(v) => {
            let v = v.trim();
            !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
        }
        Err(_) => false,
    }
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where the real opencode binary should be: `$OPENCODE_BIN`, else the copy `scripts/test`
/// installs under `.cache/opencode`. `None` when that file is not an executable.
pub fn opencode_bin() -> Option<PathBuf> {
    let path = match env::var_os("OPENCODE_BIN") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => manifest_dir().join(".cache/opencode/node_modules/opencode-linux-x64/bin/opencode"),
    };
    is_executable(&path).then_some(path)
}

/// The opencode binary, or: panic under CI, else print a loud `SKIPPED` message and return `None`.
///
/// ```ignore
/// let Some(_bin) = require_opencode() else { return };
/// ```
pub fn require_opencode() -> Option<PathBuf> {
    if let Some(p) = opencode_bin() {
        return Some(p);
    }
    let msg = format!(
        "the real opencode binary is missing (OPENCODE_BIN={:?}, default {}). \
         Run scripts/test, which installs it.",
        env::var_os("OPENCODE_BIN").unwrap_or_default(),
        manifest_dir()
            .join(".cache/opencode/node_modules/opencode-linux-x64/bin/opencode")
            .display()
    );
    if is_ci() {
        panic!("CI is set, refusing to skip: {msg}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(
        io::stderr(),
        "\n*************************************************************\n\
         SKIPPED: {msg}\n\
         *************************************************************\n"
    );
    None
}

/// A currently free TCP port on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn try_wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`try_wait_for`], but panics with `what` on timeout.
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    try_wait_for(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// The last `n` lines of a text file (lossy UTF-8); empty if unreadable.
pub fn tail_file(path: &Path, n: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: VecDeque<&str> = VecDeque::with_capacity(n + 1);
    for line in text.lines() {
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    lines.into_iter().collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------------------------------------
// Child process guard
// ---------------------------------------------------------------------------------------------

/// Owns a child process; kills it by PID and reaps it on drop.
struct ChildGuard {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    fn new(child: Child) -> Self {
        Self {
            child,
            status: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Non-blocking: the exit status if the child has exited (and is now reaped).
    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// SIGKILL by PID, then reap.
    fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        let _ = self.child.kill();
        // wait(2) on our own child only fails if it was already reaped elsewhere.
        let s = self
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
        self.status = Some(s);
        s
    }

    /// SIGTERM by PID, wait up to `grace`, then SIGKILL; always reaps.
    fn terminate(&mut self, grace: Duration) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        // The child is not reaped yet, so its PID cannot have been reused.
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on the PID of our own unreaped child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if let Some(s) = try_wait_for(grace, || self.try_wait()) {
            return s;
        }
        self.kill()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client (loopback only)
// ---------------------------------------------------------------------------------------------

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names are lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON: `Null` when empty, a JSON string holding the text when it is not JSON.
    pub fn json(&self) -> Value {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|_| Value::String(self.text()))
    }
}

/// Standard base64 (with padding), for basic-auth headers.
pub fn base64_encode(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `Basic base64(user:password)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{user}:{password}").as_bytes())
    )
}

fn invalid_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// One CRLF- (or LF-) terminated line, without the terminator.
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| invalid_data("non-UTF-8 header line"))
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = read_line(r)?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| invalid_data("chunk size"))?;
        if size == 0 {
            // Trailers up to the empty line.
            while !read_line(r)?.is_empty() {}
            return Ok(out);
        }
        let start = out.len();
        out.resize(start + size, 0);
        r.read_exact(&mut out[start..])?;
        read_line(r)?;
    }
}

/// One blocking HTTP/1.1 request to `127.0.0.1:port` with `Connection: close`.
/// Not for streaming endpoints (`/event`): it reads the whole response.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: */*\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    // Read exactly one response: servers may keep the socket open despite `Connection: close`.
    let mut r = BufReader::new(stream);
    let status_line = read_line(&mut r)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid_data("bad status line"))?;
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let line = read_line(&mut r)?;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let body = if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status)
    {
        Vec::new()
    } else if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        read_chunked(&mut r)?
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        body
    } else {
        let mut body = Vec::new();
        r.read_to_end(&mut body)?;
        body
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// An HTTP endpoint on loopback, with an optional `Authorization` header value.
/// Cheap to clone, so it can be moved into threads and blocking tasks.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub port: u16,
    pub authorization: Option<String>,
}

impl HttpTarget {
    pub fn new(port: u16) -> Self {
        Self {
            port,
            authorization: None,
        }
    }

    pub fn with_basic_auth(port: u16, user: &str, password: &str) -> Self {
        Self {
            port,
            authorization: Some(basic_auth(user, password)),
        }
    }

    /// The same endpoint without credentials.
    pub fn without_auth(&self) -> Self {
        Self::new(self.port)
    }

    /// Raw request; a JSON body is sent with `Content-Type: application/json`.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> io::Result<HttpResponse> {
        self.request_with_timeout(method, path, body, HTTP_TIMEOUT)
    }

    /// [`HttpTarget::request`] with an explicit connect/read/write timeout.
    pub fn request_with_timeout(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> io::Result<HttpResponse> {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &self.authorization {
            headers.push(("Authorization", a));
        }
        let encoded = body.map(|b| serde_json::to_vec(b).expect("serialize JSON body"));
        if encoded.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        http_request(
            self.port,
            method,
            path,
            &headers,
            encoded.as_deref(),
            timeout,
        )
    }

    /// `(status, body as JSON)`; see [`HttpResponse::json`]. Panics on I/O errors.
    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let resp = self
            .request(method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path} on 127.0.0.1:{}: {e}", self.port));
        (resp.status, resp.json())
    }

    /// [`HttpTarget::json`] on tokio's blocking pool, for async tests.
    pub async fn json_async(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let this = self.clone();
        let (method, path) = (method.to_string(), path.to_string());
        tokio::task::spawn_blocking(move || this.json(&method, &path, body))
            .await
            .expect("http request task")
    }
}

// ---------------------------------------------------------------------------------------------
// Fake LLM
// ---------------------------------------------------------------------------------------------

/// `tests/fixtures/fake_llm.py` on an ephemeral loopback port. Killed and reaped on drop.
pub struct FakeLlm {
    child: ChildGuard,
    port: u16,
    reader: Option<JoinHandle<()>>,
}

impl FakeLlm {
    /// Starts the fake with `--reply reply`.
    pub fn start(reply: &str) -> Self {
        Self::start_with_args(reply, &[])
    }

    /// Starts the fake with `--reply reply` plus extra arguments (e.g. `["--slow-delay", "0.1"]`).
    pub fn start_with_args(reply: &str, extra_args: &[&str]) -> Self {
        let script = fixture("fake_llm.py");
        let child = Command::new("python3")
            .arg(&script)
            .args(["--host", "127.0.0.1", "--port", "0", "--reply", reply])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3 {}: {e}", script.display()));
        let mut child = ChildGuard::new(child);
        let stdout = child.child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the fake can never block on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let status = child.kill();
                panic!("fake_llm.py did not report its port within 20 s (status {status})");
            }
        };
        let port = line
            .strip_prefix("fake-llm listening on http://127.0.0.1:")
            .and_then(|p| p.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first line from fake_llm.py: {line:?}"));
        Self {
            child,
            port,
            reader: Some(reader),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The OpenAI-compatible base URL for a provider config: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.url())
    }

    pub fn http(&self) -> HttpTarget {
        HttpTarget::new(self.port)
    }

    /// `GET /requests`: summaries of every request received so far (a JSON array).
    pub fn requests(&self) -> Value {
        let (status, v) = self.http().json("GET", "/requests", None);
        assert_eq!(status, 200, "fake LLM /requests: {v}");
        v
    }

    /// Only the chat-completion requests (no `client_disconnected` events).
    pub fn chat_requests(&self) -> Vec<Value> {
        self.requests()
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|r| r.get("path").is_some())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `POST /reset`: forget the recorded requests.
    pub fn reset(&self) {
        let (status, v) = self.http().json("POST", "/reset", None);
        assert_eq!(status, 200, "fake LLM /reset: {v}");
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.child.kill();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real opencode
// ---------------------------------------------------------------------------------------------

/// Options for [`RealOpenCode::start`]. Build with [`RealOpenCodeOptions::new`] and the
/// chainable setters.
#[derive(Debug, Clone, Default)]
pub struct RealOpenCodeOptions {
    /// OpenAI-compatible base URL of the LLM, e.g. [`FakeLlm::base_url`].
    pub llm_base_url: String,
    /// `OPENCODE_SERVER_PASSWORD` (basic auth) when set.
    pub password: Option<String>,
    /// `OPENCODE_SERVER_USERNAME` when set (opencode's default is `opencode`).
    pub username: Option<String>,
    /// Deep-merged into the generated config, e.g. `{"permission": {"bash": "ask"}}`.
    pub extra_config: Option<Value>,
    /// Working directory of `opencode serve` (its project). Default: a fresh `git init`ed tempdir.
    pub project_dir: Option<PathBuf>,
    /// Port to listen on. Default: a free ephemeral port (retried if it gets taken meanwhile).
    pub port: Option<u16>,
    /// Binary to run. Default: [`opencode_bin`].
    pub bin: Option<PathBuf>,
    /// Extra environment variables for the child.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `serve ...`.
    pub args: Vec<String>,
    /// Readiness deadline (default [`READY_TIMEOUT`]).
    pub ready_timeout: Option<Duration>,
}

impl RealOpenCodeOptions {
    pub fn new(llm: &FakeLlm) -> Self {
        Self::with_llm_base_url(llm.base_url())
    }

    pub fn with_llm_base_url(url: impl Into<String>) -> Self {
        Self {
            llm_base_url: url.into(),
            ..Self::default()
        }
    }

    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    pub fn extra_config(mut self, config: Value) -> Self {
        self.extra_config = Some(config);
        self
    }

    pub fn project_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.project_dir = Some(dir.into());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
}

/// Recursively merges `extra` into `base` (objects merge, everything else replaces).
pub fn merge_json(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                match b.get_mut(k) {
                    Some(slot) => merge_json(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// The `OPENCODE_CONFIG_CONTENT` for a fake provider at `llm_base_url`, merged with `extra`.
pub fn opencode_config(llm_base_url: &str, extra: Option<&Value>) -> Value {
    let mut cfg = json!({
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            FAKE_PROVIDER: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake LLM",
                "options": { "baseURL": llm_base_url, "apiKey": "fake-key" },
                "models": {
                    FAKE_MODEL: { "name": "Fake Model", "limit": { "context": 128000, "output": 4096 } }
                }
            }
        },
        "model": format!("{FAKE_PROVIDER}/{FAKE_MODEL}"),
        "small_model": format!("{FAKE_PROVIDER}/{FAKE_MODEL}"),
        "enabled_providers": [FAKE_PROVIDER],
        "autoupdate": false,
        "share": "disabled",
        "lsp": false,
        "formatter": false
    });
    if let Some(extra) = extra {
        merge_json(&mut cfg, extra);
    }
    cfg
}

/// `git init -q` in `dir` (a warning, not a failure, if git is unavailable).
pub fn git_init(dir: &Path) {
    let ok = Command::new("git")
        .args(["init", "-q"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "warning: `git init` failed in {}; opencode runs without vcs",
            dir.display()
        );
    }
}

enum StartError {
    /// The child exited before becoming healthy.
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    TimedOut {
        log_tail: String,
    },
}

/// Polls `/global/health` until it reports healthy, the child exits, or `timeout` passes
/// (then the child is killed).
fn wait_healthy(
    child: &mut ChildGuard,
    http: &HttpTarget,
    log_path: &Path,
    timeout: Duration,
) -> Result<(), StartError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait() {
            return Err(StartError::Exited {
                status,
                log_tail: tail_file(log_path, 40),
            });
        }
        // Short per-probe timeout: a connection accepted while opencode is still starting up
        // may never be answered.
        if let Ok(resp) =
            http.request_with_timeout("GET", "/global/health", None, Duration::from_secs(2))
            && resp.status == 200
            && resp.json().get("healthy") == Some(&Value::Bool(true))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            child.kill();
            return Err(StartError::TimedOut {
                log_tail: tail_file(log_path, 40),
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A running `opencode serve` on 127.0.0.1. SIGTERM'd (then SIGKILL'd) and reaped on drop.
pub struct RealOpenCode {
    child: ChildGuard,
    port: u16,
    http: HttpTarget,
    project_dir: PathBuf,
    log_path: PathBuf,
    username: String,
    password: Option<String>,
    config: Value,
    // Dropped after `child` is stopped (see Drop), so logs stay readable until then.
    tmp: TempDir,
}

impl RealOpenCode {
    /// Starts `opencode serve` and waits until `/global/health` reports healthy.
    /// Panics (with the log tail) if it exits or does not get ready in time.
    pub fn start(opts: RealOpenCodeOptions) -> Self {
        let bin = opts
            .bin
            .clone()
            .or_else(opencode_bin)
            .expect("opencode binary not found; call require_opencode() first");
        let tmp = tempfile::Builder::new()
            .prefix("oc-real-")
            .tempdir()
            .expect("create tempdir");
        let base = tmp.path().to_path_buf();
        for d in ["home", "config", "data", "cache", "state"] {
            fs::create_dir_all(base.join(d)).expect("create isolated dir");
        }
        let project_dir = match &opts.project_dir {
            Some(p) => p.clone(),
            None => {
                let p = base.join("proj");
                fs::create_dir_all(&p).expect("create project dir");
                git_init(&p);
                p
            }
        };
        let config = opencode_config(&opts.llm_base_url, opts.extra_config.as_ref());
        let config_text = serde_json::to_string(&config).expect("serialize config");
        let username = opts
            .username
            .clone()
            .unwrap_or_else(|| DEFAULT_USERNAME.to_string());
        let ready_timeout = opts.ready_timeout.unwrap_or(READY_TIMEOUT);
        // A picked port can be grabbed by someone else before opencode binds it: retry then.
        let attempts = if opts.port.is_some() { 1 } else { 3 };

        let mut last_error = String::new();
        for attempt in 1..=attempts {
            let port = opts.port.unwrap_or_else(free_port);
            let log_path = base.join(format!("opencode-{port}.log"));
            let log = File::create(&log_path).expect("create opencode log");
            let log_err = log.try_clone().expect("clone log handle");

            let mut cmd = Command::new(&bin);
            cmd.args(["serve", "--hostname", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args(["--print-logs", "--log-level", "INFO"])
                .args(&opts.args)
                .current_dir(&project_dir)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err);
            // Nothing from the developer's own opencode setup may leak in.
            for (key, _) in env::vars_os() {
                if key.to_string_lossy().starts_with("OPENCODE_") {
                    cmd.env_remove(&key);
                }
            }
            cmd.env("HOME", base.join("home"))
                .env("XDG_CONFIG_HOME", base.join("config"))
                .env("XDG_DATA_HOME", base.join("data"))
                .env("XDG_CACHE_HOME", base.join("cache"))
                .env("XDG_STATE_HOME", base.join("state"))
                .env("OPENCODE_CONFIG_CONTENT", &config_text)
                .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
                .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
                .env("OPENCODE_DISABLE_SHARE", "1")
                .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
                // opencode installs its plugin package at startup; keep that on loopback (it
                // fails fast and silently, which opencode tolerates).
                .env("npm_config_registry", "http://127.0.0.1:9/")
                .env("BUN_CONFIG_REGISTRY", "http://127.0.0.1:9/");
            if let Some(pw) = &opts.password {
                cmd.env("OPENCODE_SERVER_PASSWORD", pw);
            }
            if let Some(user) = &opts.username {
                cmd.env("OPENCODE_SERVER_USERNAME", user);
            }
            for (k, v) in &opts.env {
                cmd.env(k, v);
            }
            let mut child = ChildGuard::new(
                cmd.spawn()
                    .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display())),
            );
            let http = match &opts.password {
                Some(pw) => HttpTarget::with_basic_auth(port, &username, pw),
                None => HttpTarget::new(port),
            };
            match wait_healthy(&mut child, &http, &log_path, ready_timeout) {
                Ok(()) => {
                    return RealOpenCode {
                        child,
                        port,
                        http,
                        project_dir,
                        log_path,
                        username,
                        password: opts.password.clone(),
                        config,
                        tmp,
                    };
                }
                Err(StartError::Exited { status, log_tail }) => {
                    let lower = log_tail.to_ascii_lowercase();
                    let in_use = lower.contains("eaddrinuse") || lower.contains("in use");
                    last_error = format!(
                        "opencode (port {port}) exited with {status} before becoming healthy; log tail:\n{log_tail}"
                    );
                    if !in_use || attempt == attempts {
                        break;
                    }
                    eprintln!("opencode could not bind port {port}; retrying with another port");
                }
                Err(StartError::TimedOut { log_tail }) => {
                    last_error = format!(
                        "opencode (port {port}) not healthy after {ready_timeout:?}; log tail:\n{log_tail}"
                    );
                    break;
                }
            }
        }
        panic!("{last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn project_dir(&self) -> &Path {
        &self.project_dir
    }

    /// The tempdir holding HOME, XDG dirs and logs.
    pub fn base_dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The `Authorization` header value when a password is set.
    pub fn authorization(&self) -> Option<&str> {
        self.http.authorization.as_deref()
    }

    /// The config passed in `OPENCODE_CONFIG_CONTENT`.
    pub fn config(&self) -> &Value {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path, lines)
    }

    /// HTTP access with the instance's credentials (if any).
    pub fn http(&self) -> HttpTarget {
        self.http.clone()
    }

    /// `(status, JSON body)` with the instance's credentials; see [`HttpTarget::json`].
    pub fn http_json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.http.json(method, path, body)
    }

    pub async fn http_json_async(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.http.json_async(method, path, body).await
    }

    /// Whether the child is still running (not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none()
    }

    /// SIGKILL by PID and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill()
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL; reaps.
    pub fn stop(&mut self) -> ExitStatus {
        self.child.terminate(Duration::from_secs(10))
    }

    // ---- convenience for common API flows ---------------------------------------------------

    /// `POST /session` with a title (a titled session makes no title request to the LLM).
    pub fn create_session(&self, title: &str) -> String {
        let (status, v) = self.http_json("POST", "/session", Some(json!({ "title": title })));
        assert_eq!(status, 200, "POST /session: {v}");
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("session without id: {v}"))
            .to_string()
    }

    /// `POST /session/{id}/prompt_async` with one text part; expects 204.
    pub fn prompt_async(&self, session_id: &str, text: &str) {
        let body = json!({ "parts": [{ "type": "text", "text": text }] });
        let (status, v) = self.http_json(
            "POST",
            &format!("/session/{session_id}/prompt_async"),
            Some(body),
        );
        assert_eq!(status, 204, "prompt_async: {v}");
    }

    /// `GET /session/{id}/message` (a JSON array of `{info, parts}`).
    pub fn messages(&self, session_id: &str) -> Value {
        let (status, v) = self.http_json("GET", &format!("/session/{session_id}/message"), None);
        assert_eq!(status, 200, "GET messages: {v}");
        v
    }

    /// Waits until an assistant message whose joined text parts equal `text` is completed;
    /// returns that message.
    pub fn wait_for_assistant_text(
        &self,
        session_id: &str,
        text: &str,
        timeout: Duration,
    ) -> Value {
        let mut last = Value::Null;
        let found = try_wait_for(timeout, || {
            last = self.messages(session_id);
            completed_assistant_messages(&last)
                .into_iter()
                .find(|m| message_text(m) == text)
                .cloned()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no completed assistant message with text {text:?} within {timeout:?}; messages: {}\nlog tail:\n{}",
                last,
                self.log_tail(30)
            )
        })
    }
}

impl Drop for RealOpenCode {
    fn drop(&mut self) {
        let status = self.child.terminate(Duration::from_secs(10));
        if thread::panicking() {
            eprintln!(
                "--- opencode on port {} (pid {}, {status}) log tail ---\n{}\n--- end of opencode log ---",
                self.port,
                self.child.pid(),
                self.log_tail(40)
            );
        }
    }
}

/// Assistant messages of a `GET /session/{id}/message` answer that have `time.completed`.
pub fn completed_assistant_messages(messages: &Value) -> Vec<&Value> {
    messages
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| {
                    m["info"]["role"] == "assistant" && !m["info"]["time"]["completed"].is_null()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The concatenated `text` parts of one `{info, parts}` message.
pub fn message_text(message: &Value) -> String {
    message["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<String>()
        })
        .unwrap_or_default()
}
