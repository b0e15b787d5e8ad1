//! Drive the built `opencode-mcp` binary over MCP stdio with an rmcp client.
//!
//! * [`McpServerProc`] spawns the binary (own process group, hermetic
//!   environment, stderr captured and echoed), performs the MCP handshake and
//!   offers `call` / `call_text` / `call_cancellable` / `list_tools`. The child
//!   (and its process group) is killed and reaped on drop, panics included.
//! * [`Recorder`] is the client handler: it records progress, logging,
//!   `resources/list_changed` and `resources/updated` notifications and lets
//!   tests wait for them with deadlines.
//! * [`RelayDir`] is a temporary `RELAY_REGISTRY_DIR` with atomic writes.
//! * [`wait_until`] polls an async condition until a deadline.
#![allow(dead_code)] // every test binary uses a different part of this module
#![allow(deprecated)] // logging notifications are deprecated (SEP-2577) but still used

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, CancelledNotificationParam,
    ClientRequest, LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam,
    ProgressToken, RequestId, ResourceUpdatedNotificationParam, ServerResult, Tool,
};
use rmcp::service::{
    NotificationContext, PeerRequestOptions, RequestHandle, RoleClient, RunningService,
    ServiceError,
};
use rmcp::{ClientHandler, ServiceExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Default bound on one tool call made through [`McpServerProc::call`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on spawning the server and completing the MCP handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval of [`wait_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Variables passed through from the test's environment; everything else is
/// cleared so a developer's `OPENCODE_*`/`RELAY_*` settings cannot leak in.
const PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "USER",
    "LANG",
    "LC_ALL",
    "RUST_BACKTRACE",
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ===========================================================================
// Deadlines and polling
// ===========================================================================

/// Anything that names a deadline: a timeout from now or an instant.
pub trait IntoDeadline {
    fn into_deadline(self) -> Instant;
}
impl IntoDeadline for Duration {
    fn into_deadline(self) -> Instant {
        Instant::now() + self
    }
}
impl IntoDeadline for Instant {
    fn into_deadline(self) -> Instant {
        self
    }
}
impl IntoDeadline for std::time::Instant {
    fn into_deadline(self) -> Instant {
        Instant::from_std(self)
    }
}

/// Poll `f` every [`POLL_INTERVAL`] until it returns `Some`, and return that.
/// Panics when `deadline` passes first (an attempt still running at the
/// deadline is abandoned).
pub async fn wait_until<T, F, Fut>(deadline: impl IntoDeadline, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until_msg(deadline, "condition", f).await
}

/// [`wait_until`] with a description of what is awaited, for the panic message.
pub async fn wait_until_msg<T, F, Fut>(deadline: impl IntoDeadline, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    let deadline = deadline.into_deadline();
    loop {
        if let Ok(Some(v)) = tokio::time::timeout_at(deadline, f()).await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "wait_until: timed out after {:?} waiting for {what}",
                started.elapsed()
            );
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

// ===========================================================================
// Client handler recording notifications
// ===========================================================================

/// One `notifications/progress`.
#[derive(Clone, Debug)]
pub struct ProgressEvent {
    pub token: ProgressToken,
    pub progress: f64,
    pub total: Option<f64>,
    pub message: Option<String>,
}

/// One `notifications/message` (logging).
#[derive(Clone, Debug)]
pub struct LogEvent {
    pub level: LoggingLevel,
    pub logger: Option<String>,
    pub data: Value,
}

/// Everything the server sent us besides responses, in arrival order.
#[derive(Clone, Debug, Default)]
pub struct Notifications {
    pub progress: Vec<ProgressEvent>,
    pub resource_list_changed: usize,
    pub tool_list_changed: usize,
    /// URIs of `notifications/resources/updated`.
    pub resource_updated: Vec<String>,
    pub logs: Vec<LogEvent>,
    pub cancelled: Vec<CancelledNotificationParam>,
}

/// The [`ClientHandler`]: records notifications and wakes waiters.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

#[derive(Default)]
struct RecorderInner {
    data: Mutex<Notifications>,
    changed: Notify,
}

impl Recorder {
    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Notifications {
        lock(&self.inner.data).clone()
    }

    /// Forget everything recorded so far.
    pub fn clear(&self) {
        *lock(&self.inner.data) = Notifications::default();
    }

    fn record(&self, f: impl FnOnce(&mut Notifications)) {
        f(&mut lock(&self.inner.data));
        self.inner.changed.notify_waiters();
    }

    /// Wait until `f` returns `Some` for the recorded notifications (checked on
    /// every new notification); panics at the deadline.
    pub async fn wait_for<T>(
        &self,
        deadline: impl IntoDeadline,
        what: &str,
        mut f: impl FnMut(&Notifications) -> Option<T>,
    ) -> T {
        let started = Instant::now();
        let deadline = deadline.into_deadline();
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = f(&lock(&self.inner.data)) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Some(v) = f(&lock(&self.inner.data)) {
                    return v;
                }
                panic!(
                    "timed out after {:?} waiting for {what}; recorded: {:?}",
                    started.elapsed(),
                    self.summary()
                );
            }
        }
    }

    fn summary(&self) -> String {
        let d = lock(&self.inner.data);
        format!(
            "{} progress, {} resources/list_changed, {} tools/list_changed, {} resources/updated, {} logs",
            d.progress.len(),
            d.resource_list_changed,
            d.tool_list_changed,
            d.resource_updated.len(),
            d.logs.len()
        )
    }

    /// Wait for at least `n` progress notifications (any token); returns them all.
    pub async fn wait_progress_count(
        &self,
        n: usize,
        deadline: impl IntoDeadline,
    ) -> Vec<ProgressEvent> {
        self.wait_for(deadline, &format!("{n} progress notifications"), |d| {
            (d.progress.len() >= n).then(|| d.progress.clone())
        })
        .await
    }

    /// Wait for at least `n` progress notifications carrying `token`.
    pub async fn wait_progress_for(
        &self,
        token: &ProgressToken,
        n: usize,
        deadline: impl IntoDeadline,
    ) -> Vec<ProgressEvent> {
        self.wait_for(
            deadline,
            &format!("{n} progress notifications for {token:?}"),
            |d| {
                let mine: Vec<ProgressEvent> = d
                    .progress
                    .iter()
                    .filter(|p| &p.token == token)
                    .cloned()
                    .collect();
                (mine.len() >= n).then_some(mine)
            },
        )
        .await
    }

    /// Wait until at least `n` `resources/list_changed` arrived; returns the count.
    pub async fn wait_resource_list_changed(&self, n: usize, deadline: impl IntoDeadline) -> usize {
        self.wait_for(deadline, &format!("{n} resources/list_changed"), |d| {
            (d.resource_list_changed >= n).then_some(d.resource_list_changed)
        })
        .await
    }

    /// Wait for a `resources/updated` of `uri`.
    pub async fn wait_resource_updated(&self, uri: &str, deadline: impl IntoDeadline) {
        self.wait_for(deadline, &format!("resources/updated for {uri}"), |d| {
            d.resource_updated.iter().any(|u| u == uri).then_some(())
        })
        .await
    }

    /// Wait for a logging notification matching `pred`; returns the first match.
    pub async fn wait_log(
        &self,
        deadline: impl IntoDeadline,
        pred: impl Fn(&LogEvent) -> bool,
    ) -> LogEvent {
        self.wait_for(deadline, "a matching logging notification", |d| {
            d.logs.iter().find(|l| pred(l)).cloned()
        })
        .await
    }
}

impl ClientHandler for Recorder {
    async fn on_progress(
        &self,
        p: ProgressNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        self.record(|d| {
            d.progress.push(ProgressEvent {
                token: p.progress_token,
                progress: p.progress,
                total: p.total,
                message: p.message,
            })
        });
    }

    async fn on_logging_message(
        &self,
        p: LoggingMessageNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        self.record(|d| {
            d.logs.push(LogEvent {
                level: p.level,
                logger: p.logger,
                data: p.data,
            })
        });
    }

    async fn on_resource_updated(
        &self,
        p: ResourceUpdatedNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        self.record(|d| d.resource_updated.push(p.uri));
    }

    async fn on_resource_list_changed(&self, _ctx: NotificationContext<RoleClient>) {
        self.record(|d| d.resource_list_changed += 1);
    }

    async fn on_tool_list_changed(&self, _ctx: NotificationContext<RoleClient>) {
        self.record(|d| d.tool_list_changed += 1);
    }

    async fn on_cancelled(
        &self,
        p: CancelledNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        self.record(|d| d.cancelled.push(p));
    }
}

// ===========================================================================
// The server process
// ===========================================================================

/// Owns the child; kills its process group and reaps it on drop.
struct ChildGuard {
    child: Option<Child>,
    pid: i32,
}

impl ChildGuard {
    /// True while the child has not been reaped yet (running or zombie).
    fn unreaped(&self) -> bool {
        self.child.is_some()
    }

    /// Has the child exited? Checked without reaping it (`WNOWAIT`), so its pid
    /// (and process-group id) stays reserved.
    fn exited_unreaped(&self) -> bool {
        if !self.unreaped() {
            return true;
        }
        // SAFETY: plain syscall on our own unreaped child; `info` is zeroed.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            rc == 0 && info.si_pid() == self.pid
        }
    }

    /// SIGKILL the whole process group. Only while the leader is unreaped, so
    /// the group id cannot belong to anybody else.
    fn kill_group(&self) {
        if self.unreaped() {
            // SAFETY: plain syscall; see above for why the pgid is ours.
            unsafe {
                libc::killpg(self.pid, libc::SIGKILL);
            }
        }
    }

    /// Kill the group and reap the leader through tokio (which then knows the
    /// exit status and will never signal or wait on the pid again).
    fn kill_and_reap_blocking(&mut self) -> Option<ExitStatus> {
        self.kill_group();
        let mut child = self.child.take()?;
        let _ = child.start_kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    eprintln!(
                        "mcp_client: opencode-mcp pid {} survived SIGKILL for 10 s",
                        self.pid
                    );
                    return None;
                }
                Err(e) => {
                    eprintln!("mcp_client: reaping opencode-mcp pid {}: {e}", self.pid);
                    return None;
                }
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap_blocking();
    }
}

/// Captured stderr lines of the server.
#[derive(Default)]
struct StderrLog {
    lines: Mutex<Vec<String>>,
    changed: Notify,
}

/// A running `opencode-mcp` binary with an MCP client session on its stdio.
pub struct McpServerProc {
    // Field order matters for drop: the client goes first, then the child.
    client: Option<RunningService<RoleClient, Recorder>>,
    recorder: Recorder,
    stderr: Arc<StderrLog>,
    child: ChildGuard,
}

static SPAWNED: AtomicU64 = AtomicU64::new(0);

impl McpServerProc {
    /// Spawn `opencode-mcp` (no arguments: the stdio server) with `env` on top
    /// of a cleared environment (PATH, HOME, TMPDIR, … pass through), and
    /// `RUST_LOG=opencode_mcp=debug` unless `env` sets `RUST_LOG`.
    pub async fn spawn(env: &[(&str, &str)]) -> McpServerProc {
        Self::spawn_with_args(&[], env).await
    }

    /// [`Self::spawn`] with command-line arguments.
    pub async fn spawn_with_args(args: &[&str], env: &[(&str, &str)]) -> McpServerProc {
        Self::spawn_program(env!("CARGO_BIN_EXE_opencode-mcp"), args, env).await
    }

    /// [`Self::spawn_with_args`] for another stdio MCP server program.
    pub async fn spawn_program(bin: &str, args: &[&str], env: &[(&str, &str)]) -> McpServerProc {
        let mut cmd = Command::new(bin);
        cmd.args(args).env_clear();
        for key in PASSTHROUGH_ENV {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "opencode_mcp=debug");
        }
        // Tests run in the host's network namespace unless they made their
        // own: never let a default transport multicast (mDNS) here.
        if !env.iter().any(|(k, _)| *k == "TRANSPORT") {
            cmd.env("TRANSPORT", "local-relay");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("mcp_client: spawn {bin}: {e}"));
        let pid = child.id().expect("mcp_client: child pid") as i32;
        let stdin = child.stdin.take().expect("child stdin");
        let stdout = child.stdout.take().expect("child stdout");
        let stderr_pipe = child.stderr.take().expect("child stderr");
        // From here on a panic kills and reaps the child.
        let guard = ChildGuard {
            child: Some(child),
            pid,
        };
        let n = SPAWNED.fetch_add(1, Ordering::SeqCst);
        let stderr = Arc::new(StderrLog::default());
        let log = stderr.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr_pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        eprintln!("[opencode-mcp#{n} pid {pid}] {line}");
                        lock(&log.lines).push(line);
                        log.changed.notify_waiters();
                    }
                }
            }
        });
        let recorder = Recorder::default();
        let client = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            recorder.clone().serve((stdout, stdin)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!(
                "mcp_client: MCP handshake with opencode-mcp failed: {e}\nstderr:\n{}",
                lock(&stderr.lines).join("\n")
            ),
            Err(_) => panic!(
                "mcp_client: MCP handshake with opencode-mcp timed out after {HANDSHAKE_TIMEOUT:?}\nstderr:\n{}",
                lock(&stderr.lines).join("\n")
            ),
        };
        McpServerProc {
            client: Some(client),
            recorder,
            stderr,
            child: guard,
        }
    }

    /// The rmcp client session (derefs to `Peer<RoleClient>` for every other request).
    pub fn client(&self) -> &RunningService<RoleClient, Recorder> {
        self.client.as_ref().expect("client already shut down")
    }

    /// The notification recorder.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    pub fn pid(&self) -> u32 {
        self.child.pid as u32
    }

    /// Tools advertised by the server.
    pub async fn list_tools(&self) -> Vec<Tool> {
        tokio::time::timeout(DEFAULT_CALL_TIMEOUT, self.client().list_all_tools())
            .await
            .expect("tools/list timed out")
            .expect("tools/list failed")
    }

    /// Call a tool; `args` must be a JSON object (or null for none). Returns the
    /// protocol-level result, or the protocol error (e.g. invalid params).
    /// Panics if no answer arrives within `timeout`.
    pub async fn try_call_with_timeout(
        &self,
        name: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<CallToolResult, ServiceError> {
        let params = tool_params(name, args);
        match tokio::time::timeout(timeout, self.client().call_tool(params)).await {
            Ok(r) => r,
            Err(_) => panic!("tools/call {name} got no answer within {timeout:?}"),
        }
    }

    /// [`Self::try_call_with_timeout`] with [`DEFAULT_CALL_TIMEOUT`].
    pub async fn try_call(&self, name: &str, args: Value) -> Result<CallToolResult, ServiceError> {
        self.try_call_with_timeout(name, args, DEFAULT_CALL_TIMEOUT)
            .await
    }

    /// Call a tool and return its result; panics on a protocol error or timeout.
    pub async fn call(&self, name: &str, args: Value) -> CallToolResult {
        self.try_call(name, args)
            .await
            .unwrap_or_else(|e| panic!("tools/call {name} failed: {e}"))
    }

    /// Call a tool; returns (joined text content, is_error, structured content).
    pub async fn call_text(&self, name: &str, args: Value) -> (String, bool, Option<Value>) {
        split_result(self.call(name, args).await)
    }

    /// Start a tool call that can be cancelled (`notifications/cancelled`).
    pub async fn call_cancellable(&self, name: &str, args: Value) -> CancellableCall {
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(tool_params(name, args)));
        let handle = self
            .client()
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await
            .unwrap_or_else(|e| panic!("tools/call {name}: sending failed: {e}"));
        CancellableCall {
            name: name.to_string(),
            handle,
        }
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        lock(&self.stderr.lines).clone()
    }

    /// Wait for a stderr line containing `needle`; returns it.
    pub async fn wait_stderr(&self, needle: &str, deadline: impl IntoDeadline) -> String {
        let started = Instant::now();
        let deadline = deadline.into_deadline();
        loop {
            let notified = self.stderr.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = lock(&self.stderr.lines).iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Some(l) = lock(&self.stderr.lines).iter().find(|l| l.contains(needle)) {
                    return l.clone();
                }
                panic!(
                    "timed out after {:?} waiting for a stderr line containing {needle:?}",
                    started.elapsed()
                );
            }
        }
    }

    /// Has the server process exited (without reaping it)?
    pub fn has_exited(&self) -> bool {
        self.child.exited_unreaped()
    }

    /// Close the MCP session (stdin EOF), wait up to `grace` for the server to
    /// exit by itself, then SIGKILL its process group. Returns the exit status
    /// if it exited by itself within `grace`.
    pub async fn shutdown_within(mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(client) = self.client.take() {
            let _ = tokio::time::timeout(grace, client.cancel()).await;
        }
        let deadline = Instant::now() + grace;
        while !self.child.exited_unreaped() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let exited = self.child.exited_unreaped();
        // Leader exited (zombie) or not: its pgid is still ours, so killing the
        // group is safe and takes any leftover grandchildren along.
        let status = self.child.kill_and_reap_blocking();
        if exited { status } else { None }
    }

    /// [`Self::shutdown_within`] with a 5 s grace period.
    pub async fn shutdown(self) -> Option<ExitStatus> {
        self.shutdown_within(Duration::from_secs(5)).await
    }
}

fn tool_params(name: &str, args: Value) -> CallToolRequestParams {
    let params = CallToolRequestParams::new(name.to_string());
    match args {
        Value::Null => params,
        Value::Object(map) => params.with_arguments(map),
        other => panic!("tool arguments must be a JSON object, got {other}"),
    }
}

/// (joined text content, is_error, structured content) of a tool result.
pub fn split_result(r: CallToolResult) -> (String, bool, Option<Value>) {
    let text = r
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    (text, r.is_error.unwrap_or(false), r.structured_content)
}

/// A tool call in flight that can be cancelled.
pub struct CancellableCall {
    name: String,
    handle: RequestHandle<RoleClient>,
}

impl CancellableCall {
    /// The progress token rmcp attached to this request.
    pub fn progress_token(&self) -> &ProgressToken {
        &self.handle.progress_token
    }

    pub fn request_id(&self) -> &RequestId {
        &self.handle.id
    }

    /// Send `notifications/cancelled` for this request.
    pub async fn cancel(self, reason: &str) {
        self.handle
            .cancel(Some(reason.to_string()))
            .await
            .unwrap_or_else(|e| panic!("cancelling tools/call {}: {e}", self.name));
    }

    /// Wait for the response; panics at the deadline.
    pub async fn response(
        self,
        deadline: impl IntoDeadline,
    ) -> Result<CallToolResult, ServiceError> {
        let deadline = deadline.into_deadline();
        match tokio::time::timeout_at(deadline, self.handle.await_response()).await {
            Err(_) => panic!("tools/call {} got no answer before the deadline", self.name),
            Ok(Err(e)) => Err(e),
            Ok(Ok(ServerResult::CallToolResult(r))) => Ok(r),
            Ok(Ok(ServerResult::EmptyResult(_))) => Ok(CallToolResult::success(vec![])),
            Ok(Ok(_)) => Err(ServiceError::UnexpectedResponse),
        }
    }
}

// ===========================================================================
// Relay registry directory
// ===========================================================================

/// A temporary `RELAY_REGISTRY_DIR`, removed on drop.
pub struct RelayDir {
    dir: tempfile::TempDir,
    counter: AtomicU64,
}

impl Default for RelayDir {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayDir {
    pub fn new() -> RelayDir {
        RelayDir {
            dir: tempfile::Builder::new()
                .prefix("opencode-relay-test-")
                .tempdir()
                .expect("create relay tempdir"),
            counter: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path as a `&str`, handy for env values.
    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 tempdir path")
    }

    /// `("RELAY_REGISTRY_DIR", <path>)`, ready for [`McpServerProc::spawn`].
    pub fn env(&self) -> (&'static str, &str) {
        ("RELAY_REGISTRY_DIR", self.path_str())
    }

    /// `<dir>/<file_stem>.json`.
    pub fn file_path(&self, file_stem: &str) -> PathBuf {
        self.dir.path().join(format!("{file_stem}.json"))
    }

    /// Write `<file_stem>.json` atomically (temp file in the same directory,
    /// then rename). The temp name does not end in `.json`.
    pub fn write_registration(&self, file_stem: &str, json: Value) -> PathBuf {
        let bytes = serde_json::to_vec_pretty(&json).expect("serialize registration");
        self.write_atomic(&format!("{file_stem}.json"), &bytes)
    }

    /// Write arbitrary bytes (atomically) under an arbitrary file name.
    pub fn write_raw(&self, file_name: &str, bytes: &[u8]) -> PathBuf {
        self.write_atomic(file_name, bytes)
    }

    fn write_atomic(&self, file_name: &str, bytes: &[u8]) -> PathBuf {
        use std::io::Write;
        let target = self.dir.path().join(file_name);
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let tmp = self
            .dir
            .path()
            .join(format!(".{file_name}.{}.{n}.tmp", std::process::id()));
        let mut f =
            std::fs::File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        f.write_all(bytes).expect("write registration");
        f.sync_all().expect("sync registration");
        drop(f);
        std::fs::rename(&tmp, &target)
            .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), target.display()));
        target
    }

    /// Remove `<file_stem>.json` (no error if it is already gone).
    pub fn remove(&self, file_stem: &str) {
        match std::fs::remove_file(self.file_path(file_stem)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove registration {file_stem}: {e}"),
        }
    }

    pub fn exists(&self, file_stem: &str) -> bool {
        self.file_path(file_stem).exists()
    }

    /// File names in the directory (sorted), temp files included.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("read relay dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// The names listed in an `instances` structured output, in its order.
pub fn instance_names(out: &Value) -> Vec<String> {
    out["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A seed-format registration: `{name, hostname, port, localPort, cwd, connectedAt}`,
/// with `localPort == port`, this machine's host name and `connectedAt` now.
pub fn registration(name: &str, port: u16, cwd: &str) -> Value {
    serde_json::json!({
        "name": name,
        "hostname": hostname(),
        "port": port,
        "localPort": port,
        "cwd": cwd,
        "connectedAt": iso_utc_now(),
    })
}

/// This machine's host name (as `hostname` prints it).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// Now as UTC ISO 8601 with seconds, e.g. `2026-11-25T18:30:00Z` (like `date -u +%FT%TZ`).
pub fn iso_utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    iso_utc(secs)
}

/// Epoch seconds as UTC ISO 8601.
pub fn iso_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}
