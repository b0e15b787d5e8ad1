//! Runs `scripts/opencode-connected` in local mode against a stub `opencode` (a small python
//! HTTP server written by the test) and checks the registration lifecycle: escaped JSON, atomic
//! 0600 files, removal when OpenCode exits or the script is told to stop, the exit code, and that
//! `cleanup` only touches this user's own leftovers.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

const DEADLINE: Duration = Duration::from_secs(30);
/// A name that breaks naive JSON writers.
const WEIRD_NAME: &str = "we\"ird\\name 'x' é";

/// The stub `opencode`: serves `/global/health` on `--port`, records its pid, args and SIGINT
/// disposition in `$STUB_DIR/info-<pid>.json`, exits with the code written to
/// `$STUB_DIR/exit-code` once that file appears, exits 42 on SIGTERM (after writing
/// `terminated-<pid>`), and exits 99 if it is orphaned.
const STUB: &str = r#"#!/usr/bin/env python3
import json, os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

d = os.environ["STUB_DIR"]
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
parent = os.getppid()
pid = os.getpid()

def on_term(signum, frame):
    open(os.path.join(d, "terminated-%d" % pid), "w").close()
    os._exit(42)

signal.signal(signal.SIGTERM, on_term)

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/global/health":
            body = json.dumps({"healthy": True, "version": "stub"}).encode()
        else:
            body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("127.0.0.1", port), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
info = {"pid": pid, "args": args,
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}
tmp = os.path.join(d, ".info-%d.tmp" % pid)
with open(tmp, "w") as f:
    json.dump(info, f)
os.rename(tmp, os.path.join(d, "info-%d.json" % pid))

exit_file = os.path.join(d, "exit-code")
while True:
    if os.path.exists(exit_file):
        os._exit(int(open(exit_file).read().strip() or "0"))
    if os.getppid() != parent:
        os._exit(99)
    time.sleep(0.05)
"#;

/// A stand-in for `ssh relay`: the "relay" is this machine. `-N ... -R R:host:L` forwards
/// 127.0.0.1:R to host:L, but only after a delay (so registering before the tunnel works would
/// be caught) and records `$STUB_DIR/tunnel-<pid>`; anything else runs the remote command with
/// `bash -c`. It exits if orphaned.
const FAKE_SSH: &str = r#"#!/usr/bin/env python3
import os, socket, subprocess, sys, threading, time

d = os.environ["STUB_DIR"]
args = sys.argv[2:]  # argv[1] is the "host"
if "-N" not in args:
    sys.exit(subprocess.call(["bash", "-c", " ".join(args)]))

spec = args[args.index("-R") + 1]
rport, host, lport = spec.split(":")
parent = os.getppid()
open(os.path.join(d, "tunnel-%d" % os.getpid()), "w").close()
time.sleep(float(os.environ.get("FAKE_SSH_DELAY", "1.5")))

def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

def serve(srv):
    while True:
        c, _ = srv.accept()
        try:
            u = socket.create_connection((host, int(lport)))
        except OSError:
            c.close()
            continue
        threading.Thread(target=pump, args=(c, u), daemon=True).start()
        threading.Thread(target=pump, args=(u, c), daemon=True).start()

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    srv.bind(("127.0.0.1", int(rport)))
except OSError:
    sys.exit(255)  # like ExitOnForwardFailure
srv.listen(16)
threading.Thread(target=serve, args=(srv,), daemon=True).start()
while os.getppid() == parent:
    time.sleep(0.05)
"#;

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/opencode-connected")
}

/// Polls `f` every 50 ms until it returns `Some`, panicking with `what` after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // A zombie still "exists" for kill(0); treat it as dead.
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = state
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 && !zombie }
}

/// Parent pid from /proc/PID/stat.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: plain kill(2) on a pid this test started (directly or through the script).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Files in `dir` (names), sorted; empty if the dir does not exist.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The file name opencode-mcp's `registration_file_name` gives (ASCII alnum and `._-` kept).
fn expected_file_name(name: &str, id: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{clean}-{id}.json")
}

/// One test's world: a tempdir with the stub, registry, state, project dir and logs.
struct World {
    tmp: TempDir,
}

fn is_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")))
}

/// The script needs bash, python3 and curl: fail under CI, skip loudly elsewhere.
fn tools_present() -> bool {
    let missing: Vec<&str> = ["bash", "python3", "curl"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg =
        format!("opencode-connected tests need {missing:?} on PATH (scripts/test installs them)");
    assert!(!is_ci(), "CI is set, refusing to skip: {msg}");
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {msg} ***\n");
    false
}

impl World {
    /// `None` (after a loud SKIPPED message) when required tools are missing outside CI.
    fn try_new() -> Option<Self> {
        tools_present().then(Self::new)
    }

    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("oc-connected-")
            .tempdir()
            .expect("tempdir");
        let w = World { tmp };
        fs::create_dir_all(w.stub_dir()).expect("stub dir");
        fs::create_dir_all(w.project()).expect("project dir");
        fs::write(w.stub(), STUB).expect("write stub");
        fs::set_permissions(w.stub(), fs::Permissions::from_mode(0o755)).expect("chmod stub");
        fs::write(w.path("fake-ssh"), FAKE_SSH).expect("write fake ssh");
        w
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    fn stub(&self) -> PathBuf {
        self.path("opencode-stub")
    }
    fn stub_dir(&self) -> PathBuf {
        self.path("stub")
    }
    /// Not created up front: the script must create it (mode 0700).
    fn registry(&self) -> PathBuf {
        self.path("registry/nested")
    }
    fn state(&self) -> PathBuf {
        self.path("state")
    }
    fn project(&self) -> PathBuf {
        self.path("project dir")
    }

    fn command(&self, name: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(script_path())
            .args(args)
            .current_dir(self.project())
            .env("OPENCODE_BIN", self.stub())
            .env("STUB_DIR", self.stub_dir())
            .env("RELAY_REGISTRY_DIR", self.registry())
            .env("INSTANCE_NAME", name)
            .env("OPENCODE_CONNECTED_STATE_DIR", self.state())
            .env("OPENCODE_CONNECTED_LOG", self.path("connected.log"))
            .env_remove("RELAY_SSH_CMD")
            .env_remove("OPENCODE_SERVER_PASSWORD")
            .env_remove("OPENCODE_SERVER_USERNAME")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `opencode-connected [args]` as a guarded child.
    fn start(&self, name: &str, args: &[&str]) -> Script {
        self.start_with_env(name, args, &[])
    }

    fn start_with_env(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Script {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("script.out"))
            .expect("script.out");
        let err = out.try_clone().expect("clone");
        let mut cmd = self.command(name, args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn opencode-connected");
        Script {
            child,
            status: None,
            stub_dir: self.stub_dir(),
            stub: self.stub(),
            dir: self.tmp.path().to_path_buf(),
        }
    }

    /// Runs a subcommand to completion; returns (status, stdout+stderr).
    fn run(&self, args: &[&str]) -> (ExitStatus, String) {
        let out = self
            .command("unused", args)
            .output()
            .expect("run opencode-connected subcommand");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    fn registrations(&self) -> Vec<String> {
        entries(&self.registry())
            .into_iter()
            .filter(|f| f.ends_with(".json"))
            .collect()
    }

    /// Waits for `n` registration files; returns their parsed contents by file name.
    fn wait_registrations(&self, n: usize) -> Vec<(String, Value)> {
        wait_for(DEADLINE, &format!("{n} registration file(s)"), || {
            let files = self.registrations();
            (files.len() == n).then_some(files)
        })
        .into_iter()
        .map(|f| {
            let text = fs::read_to_string(self.registry().join(&f)).expect("read registration");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("registration {f} is not valid JSON ({e}): {text}"));
            (f, v)
        })
        .collect()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("connected.log")).unwrap_or_default()
    }

    fn finish(&self) {
        fs::write(self.stub_dir().join(".exit-code.tmp"), b"3").expect("write exit code");
        fs::rename(
            self.stub_dir().join(".exit-code.tmp"),
            self.stub_dir().join("exit-code"),
        )
        .expect("publish exit code");
    }
}

/// Stub info written once it listens: (pid, args, sigint_ignored).
fn stub_infos(stub_dir: &Path) -> Vec<Value> {
    entries(stub_dir)
        .into_iter()
        .filter(|f| f.starts_with("info-") && f.ends_with(".json"))
        .filter_map(|f| fs::read_to_string(stub_dir.join(f)).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect()
}

/// The running script; stopped (SIGTERM, then SIGKILL) and reaped on drop, along with any stub
/// it started that is still alive.
struct Script {
    child: Child,
    status: Option<ExitStatus>,
    stub_dir: PathBuf,
    stub: PathBuf,
    /// script.out and connected.log live here (printed when a test fails).
    dir: PathBuf,
}

impl Script {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for(timeout, "opencode-connected to exit", || self.try_status())
    }

    fn stop(&mut self) {
        if self.try_status().is_none() {
            send_signal(self.pid(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.try_status().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if self.try_status().is_none() {
                let _ = self.child.kill();
                self.status = Some(self.child.wait().expect("wait"));
            }
        }
        // Stubs this script started and left behind (only when something went wrong).
        for info in stub_infos(&self.stub_dir) {
            let Some(pid) = info["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) else {
                continue;
            };
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains(&*self.stub.to_string_lossy());
            if ours && pid_alive(pid) {
                send_signal(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            for f in ["script.out", "connected.log"] {
                let text = fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                eprintln!("--- {f} ---\n{text}--- end of {f} ---");
            }
        }
    }
}

#[test]
fn registers_escaped_json_atomically_and_cleans_up_when_opencode_exits() {
    let Some(w) = World::try_new() else { return };
    let mut script = w.start(WEIRD_NAME, &["--", "--model", "x/y", "arg with space"]);

    // The stub got `--port P` plus the pass-through args, the terminal's SIGINT handling intact.
    let info = wait_for(DEADLINE, "the stub opencode to start", || {
        stub_infos(&w.stub_dir()).into_iter().next()
    });
    let args: Vec<&str> = info["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(args.len(), 5, "{args:?}");
    assert_eq!(args[0], "--port");
    let port: u16 = args[1].parse().expect("port number");
    assert!((4096..=5095).contains(&port), "local port {port}");
    assert_eq!(&args[2..], ["--model", "x/y", "arg with space"]);
    assert_eq!(info["sigint_ignored"], false, "opencode must get Ctrl-C");
    let stub_pid = u32::try_from(info["pid"].as_u64().expect("pid")).expect("pid");

    // Exactly one registration: valid JSON, exact name, mode 0600, no temp files left.
    let regs = w.wait_registrations(1);
    let (file, reg) = &regs[0];
    assert_eq!(reg["name"], WEIRD_NAME, "{reg}");
    assert_eq!(reg["port"], port, "{reg}");
    assert_eq!(reg["localPort"], port, "{reg}");
    assert_eq!(reg["pid"], stub_pid, "{reg}");
    assert_eq!(
        reg["cwd"].as_str(),
        fs::canonicalize(w.project()).expect("project").to_str(),
        "{reg}"
    );
    assert!(
        reg["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        "{reg}"
    );
    let connected_at = reg["connectedAt"].as_str().expect("connectedAt");
    assert!(
        connected_at.len() == 20 && connected_at.ends_with('Z') && connected_at.contains('T'),
        "{connected_at}"
    );
    let id = reg["id"].as_str().expect("id");
    assert!(
        id.len() >= 8 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "id {id}"
    );
    assert_eq!(*file, expected_file_name(WEIRD_NAME, id));
    assert_eq!(entries(&w.registry()), vec![file.clone()], "no temp files");
    let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&w.registry().join(file)), 0o600);
    assert_eq!(mode(&w.registry()), 0o700, "registry dir created 0700");

    // Ctrl-C goes to the TUI; the script itself keeps running (proven by the exit code below).
    send_signal(script.pid(), libc::SIGINT);

    // OpenCode exits with 3: registration removed, script exits 3.
    w.finish();
    let status = script.wait_exit(DEADLINE);
    assert_eq!(
        status.code(),
        Some(3),
        "script exit status; log:\n{}",
        w.log()
    );
    assert!(w.registrations().is_empty(), "{:?}", entries(&w.registry()));
    assert!(
        entries(&w.registry()).is_empty(),
        "{:?}",
        entries(&w.registry())
    );
    assert!(!pid_alive(stub_pid));
    assert!(
        entries(&w.state()).iter().all(|f| !f.ends_with(".state")),
        "{:?}",
        entries(&w.state())
    );
}

#[test]
fn sigterm_stops_opencode_and_removes_the_registration() {
    let Some(w) = World::try_new() else { return };
    let mut script = w.start("term-test", &[]);
    let regs = w.wait_registrations(1);
    let stub_pid = u32::try_from(regs[0].1["pid"].as_u64().expect("pid")).expect("pid");
    assert!(pid_alive(stub_pid));

    // `status` knows this user's running instance and the registration.
    let (st, out) = w.run(&["status"]);
    assert!(st.success(), "{out}");
    assert!(out.contains("running"), "{out}");
    assert!(out.contains("term-test"), "{out}");

    send_signal(script.pid(), libc::SIGTERM);
    let status = script.wait_exit(DEADLINE);
    // The stub exits 42 on SIGTERM; the script passes its child's code through.
    assert_eq!(status.code(), Some(42), "log:\n{}", w.log());
    assert!(w.stub_dir().join(format!("terminated-{stub_pid}")).exists());
    assert!(!pid_alive(stub_pid));
    assert!(
        entries(&w.registry()).is_empty(),
        "{:?}",
        entries(&w.registry())
    );
}

#[test]
fn two_instances_in_one_directory_coexist() {
    let Some(w) = World::try_new() else { return };
    let mut a = w.start("same-name", &[]);
    let mut b = w.start("same-name", &[]);
    let regs = w.wait_registrations(2);
    assert_ne!(regs[0].1["id"], regs[1].1["id"]);
    assert_ne!(regs[0].1["port"], regs[1].1["port"]);
    assert!(regs.iter().all(|(_, r)| r["name"] == "same-name"));

    // Stopping one leaves exactly the other one's registration.
    send_signal(a.pid(), libc::SIGTERM);
    a.wait_exit(DEADLINE);
    let left = w.wait_registrations(1);
    let opencode_pid = u32::try_from(left[0].1["pid"].as_u64().expect("pid")).expect("pid");
    assert_eq!(parent_pid(opencode_pid), Some(b.pid()), "{:?}", left[0]);

    send_signal(b.pid(), libc::SIGTERM);
    b.wait_exit(DEADLINE);
    assert!(w.registrations().is_empty());
}

#[test]
fn a_killed_script_is_cleaned_up_and_cleanup_touches_only_its_own_files() {
    let Some(w) = World::try_new() else { return };
    fs::create_dir_all(w.registry()).expect("registry");
    // Someone else's registration in the shared directory.
    let foreign = w.registry().join("someone-else.json");
    fs::write(&foreign, br#"{"name":"someone-else","port":4999}"#).expect("foreign file");

    // A fast heartbeat, so the orphaned background agent notices quickly.
    let mut script = w.start_with_env("crash-test", &[], &[("OPENCODE_CONNECTED_HEARTBEAT", "1")]);
    wait_for(DEADLINE, "registration of crash-test", || {
        (w.registrations().len() == 2).then_some(())
    });

    // SIGKILL: no trap runs. The background agent notices and deregisters; the orphaned stub
    // exits by itself (and Script's drop kills it otherwise).
    let _ = script.child.kill();
    script.status = Some(script.child.wait().expect("wait"));
    wait_for(DEADLINE, "the orphaned registration to be removed", || {
        (w.registrations() == ["someone-else.json"]).then_some(())
    });

    // The dead run's state is a leftover that `cleanup` removes; the foreign file stays.
    assert!(entries(&w.state()).iter().any(|f| f.ends_with(".state")));
    let (st, out) = w.run(&["cleanup"]);
    assert!(st.success(), "{out}");
    assert!(out.contains("removed leftovers"), "{out}");
    assert!(
        entries(&w.state()).iter().all(|f| !f.ends_with(".state")),
        "{:?}",
        entries(&w.state())
    );
    assert!(
        foreign.exists(),
        "cleanup must not touch other people's registrations"
    );
}

/// `GET /global/health` on 127.0.0.1:port; true when it answers 200 with `"healthy": true`.
fn healthy(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let req = "GET /global/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = stream.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.0 200") && resp.contains("\"healthy\": true")
}

#[test]
fn relay_mode_registers_only_once_the_tunnel_forwards() {
    let Some(w) = World::try_new() else { return };
    let ssh = format!("python3 {} relay", w.path("fake-ssh").display());
    let mut script = w.start_with_env("relay-test", &[], &[("RELAY_SSH_CMD", ssh.as_str())]);

    // The registration (written "on the relay", here the same directory) appears only once
    // the tunnel forwards: the remote port answers the health check right away.
    let regs = w.wait_registrations(1);
    let (file, reg) = &regs[0];
    let remote = u16::try_from(reg["port"].as_u64().expect("port")).expect("port");
    let local = u16::try_from(reg["localPort"].as_u64().expect("localPort")).expect("port");
    assert!(
        healthy(remote),
        "registered before the tunnel forwards: {reg}"
    );
    assert!((10000..=10999).contains(&remote), "{reg}");
    assert!((4096..=5095).contains(&local), "{reg}");
    assert_eq!(reg["name"], "relay-test");
    let mode = fs::metadata(w.registry().join(file))
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(entries(&w.registry()), vec![file.clone()], "no temp files");
    let tunnels: Vec<u32> = entries(&w.stub_dir())
        .iter()
        .filter_map(|f| f.strip_prefix("tunnel-").and_then(|p| p.parse().ok()))
        .collect();
    assert_eq!(tunnels.len(), 1, "one tunnel");
    assert!(pid_alive(tunnels[0]));

    // OpenCode exits: deregistered on the relay, tunnel stopped, exit code passed through.
    w.finish();
    let status = script.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(3), "log:\n{}", w.log());
    assert!(
        entries(&w.registry()).is_empty(),
        "{:?}",
        entries(&w.registry())
    );
    assert!(!pid_alive(tunnels[0]), "tunnel still running");
}
