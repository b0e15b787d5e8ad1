//! Network namespaces for tests that multicast (mDNS) or need several hosts.
//!
//! Nothing here touches the host's network namespace: [`Netns::create`] makes
//! N namespaces `<prefix>-n1..nN` whose `eth0` veths plug into a bridge that
//! lives in its own namespace `<prefix>-br` (multicast snooping off, a route
//! for 224.0.0.0/4, IPv6 DAD off), addresses `10.77.<k>.<i>/24`. The prefix is
//! unique per test (`oct<pid>x<counter>`), so tests run in parallel. Dropping
//! the [`Netns`] kills the processes inside *these* namespaces only (by PID,
//! from `ip netns pids`) and deletes them; namespaces left by a test process
//! that died without cleaning up are removed by the next [`Netns::create`].
//!
//! Also here, all std-only so that both packages can include this file (the
//! agent's tests with `#[path = "../../tests/common"] mod common { pub mod
//! netns; }`):
//!
//! * [`Proc`]: a child started by the test, with its output lines recorded
//!   and timestamped; killed by PID and reaped on drop, panics included.
//! * [`Mcp`]: a minimal MCP stdio client (JSON-RPC lines) for `opencode-mcp`
//!   running inside a namespace.
//! * [`FakeLlm`] and [`opencode_env`]: the fake OpenAI-compatible LLM
//!   (`tests/fixtures/fake_llm.py`) and an isolated OpenCode environment, to
//!   run the real OpenCode inside a namespace.
//! * [`require_root`], [`require_opencode`], [`require_bin`]: loud skips
//!   outside CI, panics under `CI`.
//! * [`poll`] / [`try_poll`]: wait for a condition with a deadline.
#![allow(dead_code)]

use std::collections::HashMap;
use std::env;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Poll interval of [`poll`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Prefix of every namespace these helpers create.
const PREFIX: &str = "oct";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Environment and skips
// ---------------------------------------------------------------------------------------------

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

/// Under CI: panic. Elsewhere: print a loud SKIPPED banner.
pub fn skip(msg: &str) {
    if is_ci() {
        panic!("CI is set, refusing to skip: {msg}");
    }
    eprintln!(
        "\n*************************************************************\n\
         SKIPPED: {msg}\n\
         *************************************************************\n"
    );
}

/// The venv's python (`.cache/venv`, made by scripts/install-test-deps) with
/// `zeroconf` importable, installing it when missing; else a loud skip.
pub fn require_python_zeroconf() -> Option<PathBuf> {
    static SETUP: Mutex<()> = Mutex::new(());
    let _one_at_a_time = lock(&SETUP);
    let venv = workspace_root().join(".cache/venv");
    let python = venv.join("bin/python");
    let has_zeroconf = || {
        Command::new(&python)
            .args(["-c", "import zeroconf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_zeroconf() {
        return Some(python);
    }
    eprintln!("installing python-zeroconf into {}", venv.display());
    if !python.exists() {
        let _ = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status();
    }
    let _ = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "zeroconf"])
        .status();
    if has_zeroconf() {
        return Some(python);
    }
    skip(&format!(
        "python-zeroconf is not available in {} (scripts/test installs it: pip install zeroconf)",
        venv.display()
    ));
    None
}

/// The workspace root (the directory whose Cargo.toml has `[workspace]`).
pub fn workspace_root() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in start.ancestors() {
        if fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]")) {
            return dir.to_path_buf();
        }
    }
    start
}

/// `tests/fixtures/<name>` of the root package.
pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests").join("fixtures").join(name)
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// True when the test may create namespaces (root and `ip` present); else
/// skips loudly (panics under CI).
pub fn require_root() -> bool {
    if effective_uid() != Some(0) {
        skip("network-namespace tests need root (they create namespaces with `ip netns`)");
        return false;
    }
    if !Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        skip("`ip` (iproute2) is not installed");
        return false;
    }
    true
}

/// The real opencode binary: `$OPENCODE_BIN`, else the copy `scripts/test`
/// installs under `.cache/opencode`. Skips loudly (panics under CI) when missing.
pub fn require_opencode() -> Option<PathBuf> {
    let default =
        workspace_root().join(".cache/opencode/node_modules/opencode-linux-x64/bin/opencode");
    let path = match env::var_os("OPENCODE_BIN") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => default.clone(),
    };
    if is_executable(&path) {
        return Some(path);
    }
    skip(&format!(
        "the real opencode binary is missing ({}); scripts/test installs it, or set OPENCODE_BIN",
        path.display()
    ));
    None
}

/// A program on PATH, or a loud skip (panic under CI) naming the package to install.
pub fn require_bin(name: &str, package: &str) -> Option<PathBuf> {
    let found = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    });
    if found.is_none() {
        skip(&format!(
            "`{name}` is not installed (Debian package {package})"
        ));
    }
    found
}

/// Newest modification time of the files under `dir` (recursively).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else if let Ok(m) = meta.modified() {
                newest = newest.max(Some(m));
            }
        }
    }
    newest
}

/// The `opencode-mcp` binary. In the root package's tests it is Cargo's
/// `CARGO_BIN_EXE_opencode-mcp`; in the agent's tests, see [`workspace_bin`].
pub fn opencode_mcp_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_opencode-mcp") {
        return PathBuf::from(p);
    }
    workspace_bin("opencode-mcp", &["src", "Cargo.toml", "Cargo.lock"])
}

/// The `opencode-agent` binary. In the agent's tests it is Cargo's
/// `CARGO_BIN_EXE_opencode-agent`; in the root package's, see [`workspace_bin`].
pub fn opencode_agent_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_opencode-agent") {
        return PathBuf::from(p);
    }
    workspace_bin(
        "opencode-agent",
        &[
            "agent/src",
            "agent/Cargo.toml",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ],
    )
}

/// A binary of the other workspace package (`package` names both the package
/// and its binary): the one next to this package's binary (same profile and
/// target dir), built with `cargo build` when missing or older than its
/// `sources` (paths relative to the workspace root), e.g. when only one
/// package's tests were asked for.
fn workspace_bin(package: &str, sources: &[&str]) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let Some(ours) =
        option_env!("CARGO_BIN_EXE_opencode-mcp").or(option_env!("CARGO_BIN_EXE_opencode-agent"))
    else {
        panic!("neither opencode-mcp nor opencode-agent is a binary of this package");
    };
    let ours = PathBuf::from(ours);
    let profile_dir = ours.parent().expect("binary has a directory");
    let bin = profile_dir.join(package);
    let _one_build_at_a_time = lock(&BUILD);
    let root = workspace_root();
    let newest_source = sources
        .iter()
        .map(|s| root.join(s))
        .filter_map(|p| {
            if p.is_dir() {
                newest_mtime(&p)
            } else {
                fs::metadata(&p).and_then(|m| m.modified()).ok()
            }
        })
        .max();
    let built_at = fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if is_executable(&bin) && built_at.is_some() && built_at >= newest_source {
        return bin;
    }
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", package])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let built = cmd.status().is_ok_and(|s| s.success());
    if !built && !is_executable(&bin) {
        panic!(
            "cannot build {package} next to {}; run `cargo build --workspace` first",
            ours.display()
        );
    }
    bin
}

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some` or `timeout` passes.
pub fn try_poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Like [`try_poll`], but panics naming `what` on timeout.
pub fn poll<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    try_poll(timeout, f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Temporary directories (std only)
// ---------------------------------------------------------------------------------------------

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = env::temp_dir().join(format!(
            "oc-{label}-{}-{n}-{}",
            std::process::id(),
            epoch_ms()
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/<rel>`, created as a directory.
    pub fn subdir(&self, rel: &str) -> PathBuf {
        let p = self.path.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------

static NETNS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// PIDs of the processes inside namespace `name`.
pub fn netns_pids(name: &str) -> Vec<u32> {
    ip_output(&["netns", "pids", name])
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill_pid(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs everything inside `name` (only that namespace), then deletes it.
fn destroy_netns(name: &str) {
    for _ in 0..50 {
        let pids = netns_pids(name);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            kill_pid(pid, "KILL");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes namespaces of earlier test processes that died without cleaning up
/// (`oct<pid>x<n>-…` whose pid is gone).
fn remove_stale_namespaces() {
    for line in ip_output(&["netns", "list"]).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            destroy_netns(name);
        }
    }
}

/// N namespaces on one private bridge. Deleted (with everything inside) on drop.
pub struct Netns {
    /// Unique prefix of this set's names.
    prefix: String,
    /// Third octet of the addresses.
    subnet: u8,
    /// `<prefix>-n1..nN`.
    hosts: Vec<String>,
}

impl Netns {
    /// Creates `n` namespaces joined by a bridge. Call [`require_root`] first.
    pub fn create(n: usize) -> Netns {
        assert!((1..=200).contains(&n), "1..=200 namespaces");
        remove_stale_namespaces();
        let counter = NETNS_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{PREFIX}{}x{counter}", std::process::id());
        let subnet = ((std::process::id().wrapping_mul(7) + counter) % 250 + 1) as u8;
        let mut set = Netns {
            hosts: Vec::new(),
            subnet,
            prefix: prefix.clone(),
        };
        // From here on, a panic deletes whatever was created.
        let br = set.bridge();
        ip(&["netns", "add", &br]);
        ip(&["-n", &br, "link", "set", "lo", "up"]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        // 224.0.0.251 is always flooded, but ff02::fb may be filtered by MLD
        // snooping without a querier: switch snooping off.
        ip(&[
            "-n",
            &br,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for i in 1..=n {
            let ns = format!("{prefix}-n{i}");
            ip(&["netns", "add", &ns]);
            set.hosts.push(ns.clone());
            // No DAD: link-local IPv6 is usable at once (mdns-sd uses ff02::fb).
            let _ = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw"])
                .args([
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let peer = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer,
                "netns", &br,
            ]);
            ip(&["-n", &br, "link", "set", &peer, "master", "br0"]);
            ip(&["-n", &br, "link", "set", &peer, "up"]);
            let addr = format!("10.77.{subnet}.{i}/24");
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            // Some mDNS stacks (OpenCode's bonjour-service) publish nothing
            // without a route for multicast.
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        for ns in &set.hosts {
            try_poll(Duration::from_secs(5), || {
                ip_output(&["-n", ns, "-6", "addr", "show", "dev", "eth0", "tentative"])
                    .trim()
                    .is_empty()
                    .then_some(())
            });
        }
        set
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// Name of host `i` (0-based).
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// IPv4 address of host `i` (0-based) on the bridge.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, (i + 1) as u8)
    }

    /// `ip netns exec <ns i> <program>`: `ip` execs the program, so the
    /// child's PID is the program's.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(i)]).arg(program);
        cmd
    }

    /// Runs a command inside host `i` to completion; returns (success, stdout+stderr).
    pub fn run(&self, i: usize, program: &str, args: &[&str]) -> (bool, String) {
        let out = self
            .command(i, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program} in {}: {e}", self.ns(i)));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// PIDs of the processes inside host `i`.
    pub fn pids(&self, i: usize) -> Vec<u32> {
        netns_pids(self.ns(i))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.hosts {
            destroy_netns(ns);
        }
        destroy_netns(&self.bridge());
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// One recorded output line.
#[derive(Debug, Clone)]
pub struct Line {
    /// When the test read it.
    pub at: Instant,
    /// `out` or `err`.
    pub stream: &'static str,
    pub text: String,
}

#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<Line>>,
}

fn pump(reader: impl Read + Send + 'static, stream: &'static str, label: String, sink: Arc<Lines>) {
    thread::spawn(move || {
        let mut r = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    eprintln!("[{label}] {text}");
                    lock(&sink.lines).push(Line {
                        at: Instant::now(),
                        stream,
                        text,
                    });
                }
            }
        }
    });
}

/// A child started by the test. Its stdout (unless taken) and stderr lines are
/// echoed with a label and recorded. SIGKILLed by PID and reaped on drop.
pub struct Proc {
    child: Child,
    label: String,
    status: Option<ExitStatus>,
    lines: Arc<Lines>,
}

impl Proc {
    /// Spawns `cmd` with stdin null and both outputs recorded.
    pub fn spawn(label: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} ({cmd:?}): {e}"));
        let lines = Arc::new(Lines::default());
        let label = format!("{label} pid {}", child.id());
        if let Some(out) = child.stdout.take() {
            pump(out, "out", label.clone(), lines.clone());
        }
        if let Some(err) = child.stderr.take() {
            pump(err, "err", label.clone(), lines.clone());
        }
        Proc {
            child,
            label,
            status: None,
            lines,
        }
    }

    /// Spawns `cmd` with piped stdin/stdout left to the caller; stderr recorded.
    fn spawn_piped(label: &str, mut cmd: Command) -> (Proc, ChildStdin, std::process::ChildStdout) {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} ({cmd:?}): {e}"));
        let lines = Arc::new(Lines::default());
        let label = format!("{label} pid {}", child.id());
        if let Some(err) = child.stderr.take() {
            pump(err, "err", label.clone(), lines.clone());
        }
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        (
            Proc {
                child,
                label,
                status: None,
                lines,
            },
            stdin,
            stdout,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Line> {
        lock(&self.lines.lines).clone()
    }

    /// All output so far as one text.
    pub fn output(&self) -> String {
        self.lines()
            .into_iter()
            .map(|l| l.text)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first line containing `needle`, if any yet.
    pub fn find_line(&self, needle: &str) -> Option<Line> {
        lock(&self.lines.lines)
            .iter()
            .find(|l| l.text.contains(needle))
            .cloned()
    }

    /// Waits for a line containing `needle`; panics (with the output) at the
    /// deadline or when the process exits first.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.find_line(needle) {
                return l;
            }
            if let Some(status) = self.try_wait() {
                // Give the pumps a moment to deliver the last lines.
                thread::sleep(Duration::from_millis(50));
                if let Some(l) = self.find_line(needle) {
                    return l;
                }
                panic!(
                    "{} exited ({status}) before printing {needle:?}; output:\n{}",
                    self.label,
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not print {needle:?} within {timeout:?}; output:\n{}",
                    self.label,
                    self.output()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The exit status if the child has exited (it is then reaped).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        try_poll(timeout, || self.try_wait())
    }

    /// Sends `signal` (e.g. `TERM`) by PID, while the child is unreaped.
    pub fn signal(&mut self, signal: &str) {
        if self.try_wait().is_none() {
            kill_pid(self.pid(), signal);
        }
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        if let Some(s) = self.wait_exit(grace) {
            return Some(s);
        }
        self.kill()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// MCP stdio client
// ---------------------------------------------------------------------------------------------

/// Environment passed through to `opencode-mcp`; everything else is cleared.
const PASSTHROUGH_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "USER", "LANG", "LC_ALL"];

/// `opencode-mcp` (the MCP stdio server) inside a namespace, with a minimal
/// JSON-RPC client on its stdio. Calls are sequential.
pub struct Mcp {
    stdin: Mutex<ChildStdin>,
    responses: Mutex<Receiver<Value>>,
    next_id: AtomicU64,
    proc: Proc,
}

impl Mcp {
    /// Starts `opencode-mcp` in host `i` of `net` with `env` on top of a
    /// cleared environment (`RUST_LOG=opencode_mcp=debug` unless given) and
    /// completes the MCP handshake.
    pub fn start(net: &Netns, i: usize, env: &[(&str, &str)]) -> Mcp {
        let mut cmd = net.command(i, opencode_mcp_bin());
        apply_env(&mut cmd, env);
        Self::start_command(&format!("opencode-mcp@{}", net.ns(i)), cmd)
    }

    fn start_command(label: &str, cmd: Command) -> Mcp {
        let (proc, stdin, stdout) = Proc::spawn_piped(label, cmd);
        let (tx, rx) = mpsc::channel::<Value>();
        let echo = proc.label().to_string();
        thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => match serde_json::from_str::<Value>(line.trim()) {
                        Ok(v) => {
                            if v.get("id").is_some()
                                && (v.get("result").is_some() || v.get("error").is_some())
                            {
                                let _ = tx.send(v);
                            }
                        }
                        Err(_) => eprintln!("[{echo}] non-JSON on stdout: {}", line.trim()),
                    },
                }
            }
        });
        let mcp = Mcp {
            stdin: Mutex::new(stdin),
            responses: Mutex::new(rx),
            next_id: AtomicU64::new(1),
            proc,
        };
        mcp.request(
            "initialize",
            json!({
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": { "name": "netns-test", "version": "0" }
            }),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("MCP initialize failed: {e}"));
        mcp.notify("notifications/initialized", json!({}));
        mcp
    }

    fn write(&self, msg: &Value) {
        let mut stdin = lock(&self.stdin);
        let mut bytes = serde_json::to_vec(msg).expect("serialize JSON-RPC");
        bytes.push(b'\n');
        stdin
            .write_all(&bytes)
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| {
                panic!(
                    "write to {}: {e}\n{}",
                    self.proc.label(),
                    self.proc.output()
                )
            });
    }

    fn notify(&self, method: &str, params: Value) {
        self.write(&json!({ "jsonrpc": "2.0", "method": method, "params": params }));
    }

    /// One JSON-RPC request; `Err` carries a JSON-RPC error. Panics on timeout.
    pub fn request(&self, method: &str, params: Value, timeout: Duration) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.write(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }));
        let rx = lock(&self.responses);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) if v["id"] == json!(id) => {
                    if let Some(e) = v.get("error") {
                        return Err(e.to_string());
                    }
                    return Ok(v["result"].clone());
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{method} got no answer within {timeout:?} from {}",
                        self.proc.label()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{} closed stdout during {method}; stderr:\n{}",
                    self.proc.label(),
                    self.proc.output()
                ),
            }
        }
    }

    /// `tools/call`; returns the result (`content`, `structuredContent`, `isError`).
    pub fn call(&self, tool: &str, args: Value, timeout: Duration) -> Value {
        self.request(
            "tools/call",
            json!({ "name": tool, "arguments": args }),
            timeout,
        )
        .unwrap_or_else(|e| panic!("tools/call {tool}: {e}"))
    }

    /// The `instances` tool's structured output (`instances`, `problems`, …).
    pub fn instances(&self) -> Value {
        let r = self.call("instances", json!({}), Duration::from_secs(10));
        r.get("structuredContent")
            .cloned()
            .unwrap_or_else(|| panic!("instances without structuredContent: {r}"))
    }

    /// The instance whose `name`, `key` or `hostname` satisfies `pred`, if listed now.
    pub fn find_instance(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.instances()["instances"]
            .as_array()
            .and_then(|a| a.iter().find(|i| pred(i)).cloned())
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The first stderr line of the server containing every one of
    /// `needles`, if any yet (with `RUST_LOG=opencode_mcp=debug`, the
    /// default, discovery is logged).
    pub fn stderr_line(&self, needles: &[&str]) -> Option<String> {
        self.proc
            .lines()
            .into_iter()
            .find(|l| needles.iter().all(|n| l.text.contains(n)))
            .map(|l| l.text)
    }
}

/// Joined text content of a tool result.
pub fn result_text(result: &Value) -> String {
    result["content"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn apply_env(cmd: &mut Command, env: &[(&str, &str)]) {
    cmd.env_clear();
    for key in PASSTHROUGH_ENV {
        if let Ok(v) = env::var(key) {
            cmd.env(key, v);
        }
    }
    if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
        cmd.env("RUST_LOG", "opencode_mcp=debug");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
}

// ---------------------------------------------------------------------------------------------
// Fake LLM and OpenCode environment inside a namespace
// ---------------------------------------------------------------------------------------------

/// The fake LLM's default reply (`fake_llm.py --reply`).
pub const FAKE_REPLY: &str = "Hello from fake LLM.";

/// `tests/fixtures/fake_llm.py` on 127.0.0.1 of host `i` (killed on drop).
pub struct FakeLlm {
    proc: Proc,
    port: u16,
}

impl FakeLlm {
    pub fn start(net: &Netns, i: usize, reply: &str) -> FakeLlm {
        let mut cmd = net.command(i, "python3");
        cmd.arg(fixture("fake_llm.py")).args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--reply",
            reply,
        ]);
        let mut proc = Proc::spawn(&format!("fake-llm@{}", net.ns(i)), cmd);
        let line = proc.wait_line("listening on http://127.0.0.1:", Duration::from_secs(20));
        let port = line
            .text
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("no port in {:?}", line.text));
        FakeLlm { proc, port }
    }

    /// The OpenAI-compatible base URL as seen from inside the namespace.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

/// Environment for an isolated OpenCode (HOME and XDG dirs under `base`,
/// the fake LLM as its only provider, no network fetches, no plugin install).
pub fn opencode_env(base: &Path, llm_base_url: &str) -> Vec<(String, String)> {
    let config = json!({
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "fake": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake LLM",
                "options": { "baseURL": llm_base_url, "apiKey": "fake-key" },
                "models": {
                    "fake-model": { "name": "Fake Model", "limit": { "context": 128000, "output": 4096 } }
                }
            }
        },
        "model": "fake/fake-model",
        "small_model": "fake/fake-model",
        "enabled_providers": ["fake"],
        "autoupdate": false,
        "share": "disabled",
        "lsp": false,
        "formatter": false
    });
    let mut out = Vec::new();
    for (var, dir) in [
        ("HOME", "home"),
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_DATA_HOME", "data"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_STATE_HOME", "state"),
    ] {
        let p = base.join(dir);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        out.push((var.to_string(), p.display().to_string()));
    }
    out.push(("OPENCODE_CONFIG_CONTENT".into(), config.to_string()));
    for flag in [
        "OPENCODE_DISABLE_MODELS_FETCH",
        "OPENCODE_DISABLE_AUTOUPDATE",
        "OPENCODE_DISABLE_SHARE",
        "OPENCODE_DISABLE_LSP_DOWNLOAD",
    ] {
        out.push((flag.into(), "1".into()));
    }
    // OpenCode installs its plugin package at start; keep that on loopback
    // (it fails fast and silently).
    out.push(("npm_config_registry".into(), "http://127.0.0.1:9/".into()));
    out.push(("BUN_CONFIG_REGISTRY".into(), "http://127.0.0.1:9/".into()));
    out.push(("PATH".into(), env::var("PATH").unwrap_or_default()));
    out
}

/// A project directory (`git init`ed when git is available).
pub fn project_dir(base: &TempDir, name: &str) -> PathBuf {
    let p = base.subdir(name);
    let _ = Command::new("git")
        .args(["init", "-q"])
        .current_dir(&p)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    p
}

/// The processes whose parent is `pid` (from `/proc/*/stat`).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Whether `pid` is still a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// Counts how many times each value of `key` occurs in an `instances` list.
pub fn count_by(instances: &Value, key: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for i in instances["instances"].as_array().into_iter().flatten() {
        if let Some(v) = i[key].as_str() {
            *out.entry(v.to_string()).or_insert(0) += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Helper processes and a fake OpenCode HTTP server
// ---------------------------------------------------------------------------------------------

/// Environment variable that turns a test binary's helper test into a helper.
pub const HELPER_ENV: &str = "OCT_NETNS_HELPER";

/// The role this process plays when it was started by [`helper_command`].
pub fn helper_role() -> Option<String> {
    env::var(HELPER_ENV).ok().filter(|r| !r.is_empty())
}

/// This test binary, run inside host `i`, executing only its `#[ignore]`d
/// test `test_name` with [`HELPER_ENV`]=`role` (the helper test returns at
/// once without it). Helpers print `READY …` on stdout when set up, then
/// block until killed.
pub fn helper_command(net: &Netns, i: usize, test_name: &str, role: &str) -> Command {
    let exe = env::current_exe().expect("current test executable");
    let mut cmd = net.command(i, exe);
    cmd.args([
        test_name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, role);
    cmd
}

/// Blocks the calling helper forever (until it is killed).
pub fn park_forever() -> ! {
    loop {
        thread::park();
    }
}

/// The request line and headers of one HTTP/1.1 request (up to 16 KiB),
/// read a byte at a time so nothing of the body is consumed; `None` when the
/// peer closes first.
pub fn read_request_head(conn: &mut impl Read) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The path of a request head, without the query.
pub fn request_path(head: &str) -> &str {
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    target.split('?').next().unwrap_or("/")
}

/// Serves a minimal OpenCode look-alike on `listener` in background threads:
/// `GET /global/health` → `{"healthy":true,"version":…}`, `GET /event` → an
/// SSE stream (`server.connected`, then a heartbeat each second) held open,
/// empty session/status/permission lists, 404 otherwise. Enough for the
/// registry to call it online and follow it. With `require_auth`, requests
/// without an `Authorization: Basic …` header get 401 like a password-protected
/// OpenCode (the credentials themselves are not checked).
pub fn serve_fake_opencode(listener: std::net::TcpListener, version: &str, require_auth: bool) {
    let version = version.to_string();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let version = version.clone();
            thread::spawn(move || {
                let Some(head) = read_request_head(&mut conn) else {
                    return;
                };
                let path = request_path(&head);
                let authorized = head
                    .lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("authorization: basic "));
                if require_auth && !authorized {
                    let _ = conn.write_all(
                        b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"Secure Area\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    return;
                }
                if path == "/event" {
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n",
                    );
                    let mut frame = json!({ "type": "server.connected", "properties": {} });
                    loop {
                        let line = format!("data: {frame}\n\n");
                        if conn
                            .write_all(line.as_bytes())
                            .and_then(|()| conn.flush())
                            .is_err()
                        {
                            return;
                        }
                        thread::sleep(Duration::from_secs(1));
                        frame = json!({ "type": "server.heartbeat", "properties": {} });
                    }
                }
                let (status, body) = match path {
                    "/global/health" => ("200 OK", json!({ "healthy": true, "version": version })),
                    "/session/status" => ("200 OK", json!({})),
                    "/session" | "/permission" | "/question" => ("200 OK", json!([])),
                    _ => ("404 Not Found", json!({ "name": "NotFoundError" })),
                };
                let body = body.to_string();
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes());
            });
        }
    });
}

/// Runs `f` on a scoped thread that first moves into network namespace `ns`
/// (setns on that thread only). Sockets created there belong to `ns`, and
/// threads `f` starts (mdns-sd's daemon thread) stay in it.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    thread::scope(|s| {
        s.spawn(|| {
            let file = fs::File::open(format!("/run/netns/{ns}"))
                .unwrap_or_else(|e| panic!("open /run/netns/{ns}: {e}"));
            // SAFETY: setns(2) on a valid namespace fd; it affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    })
}
