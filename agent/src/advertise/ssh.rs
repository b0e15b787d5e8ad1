//! The relay over SSH (`--relay-ssh CMD`): an SSH reverse tunnel from a
//! random port in 10000–10999 on the relay machine to OpenCode's port here,
//! and a registration file on the relay that points at the tunnel's end.
//!
//! The order fixes the seed's race: the registration is written only once a
//! probe *through the tunnel* succeeds. A tunnel whose port is taken (ssh
//! exits with "remote port forwarding failed", thanks to
//! `ExitOnForwardFailure=yes`) is retried at once on another port; any other
//! loss is retried with exponential backoff plus jitter, reset after a
//! minute of stable tunnel. Every heartbeat ([`Advert::heartbeat`]) the tunnel is probed and the
//! registration rewritten. On stop the registration is removed and ssh is
//! terminated and reaped.
//!
//! Every ssh runs with `BatchMode=yes` (it must never prompt on the TUI's
//! terminal), in its own process group, with its output captured into the
//! log, and dies with the agent (`PR_SET_PDEATHSIG`). This module must not
//! touch local registration files or health-check OpenCode itself.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Advert;
use crate::cli::SshPlan;
use crate::identity;
use crate::launch::{describe, die_with_parent, send_signal};

/// Remote ports the tunnel may use.
pub const REMOTE_RANGE: (u16, u16) = (10000, 10999);
/// First reconnection delay.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest reconnection delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A tunnel that lived this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a new tunnel may take to accept connections.
pub const ACCEPT_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between probes while a new tunnel comes up.
pub const PROBE_PAUSE: Duration = Duration::from_millis(300);
/// Deadline of one remote command (probe, write, remove).
pub const REMOTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of the removal on stop.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Immediate retries on another port after a forward failure.
pub const FORWARD_RETRIES: u32 = 5;
/// Heartbeat probes that may fail before the tunnel is rebuilt.
pub const HEARTBEAT_MISSES: u32 = 2;
/// Lines of ssh's stderr kept for diagnosis.
const STDERR_TAIL: usize = 20;

/// Options added after CMD on every ssh invocation (ssh reads options after
/// the destination too; the first value given for an option wins, so the
/// user's own CMD can override them).
const COMMON_OPTS: &[&str] = &["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"];

/// `'s'` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A path for a POSIX shell, keeping a leading `~/` meaning the remote home.
pub fn sh_path(p: &str) -> String {
    match p.strip_prefix("~/") {
        Some("") => "\"$HOME\"".to_string(),
        Some(rest) => format!("\"$HOME\"/{}", sh_quote(rest)),
        None if p == "~" => "\"$HOME\"".to_string(),
        None => sh_quote(p),
    }
}

/// `CMD -N … -R REMOTE:127.0.0.1:LOCAL`.
pub fn tunnel_args(cmd: &[String], remote: u16, local: u16) -> Vec<String> {
    let mut v = cmd.to_vec();
    v.extend(COMMON_OPTS.iter().map(|s| s.to_string()));
    v.extend(
        [
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-R",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    v.push(format!("{remote}:127.0.0.1:{local}"));
    v
}

/// `CMD … "SCRIPT"`: run one shell command on the relay.
pub fn remote_args(cmd: &[String], script: &str) -> Vec<String> {
    let mut v = cmd.to_vec();
    v.extend(COMMON_OPTS.iter().map(|s| s.to_string()));
    v.push(script.to_string());
    v
}

/// Succeeds when OpenCode answers at the tunnel's end: `/global/health`
/// answers 200, or 401 when OpenCode wants a password (none is sent, so no
/// secret reaches the relay's process list). Without curl, a TCP connect
/// through bash's /dev/tcp.
///
/// The status check matters: sshd binds a forwarded port on both 127.0.0.1
/// and ::1 and succeeds if either is free, so with 127.0.0.1:PORT taken by
/// something else the tunnel "works" and a bare connect would lie.
pub fn probe_script(remote: u16) -> String {
    format!(
        "if command -v curl >/dev/null 2>&1; then \
         curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 http://127.0.0.1:{remote}/global/health | grep -Eq '^(200|401)$'; \
         else bash -c 'exec 3<>/dev/tcp/127.0.0.1/{remote}'; fi"
    )
}

/// Writes stdin to `DIR/FILE` atomically and privately.
pub fn write_script(dir: &str, file_name: &str) -> String {
    let d = sh_path(dir);
    let tmp = sh_quote(&format!(".{file_name}.tmp"));
    let file = sh_quote(file_name);
    format!("umask 077; mkdir -p {d} && cat > {d}/{tmp} && mv -f {d}/{tmp} {d}/{file}")
}

/// Removes `DIR/FILE` (and a leftover temp file).
pub fn remove_script(dir: &str, file_name: &str) -> String {
    let d = sh_path(dir);
    format!(
        "rm -f {d}/{} {d}/{}",
        sh_quote(file_name),
        sh_quote(&format!(".{file_name}.tmp"))
    )
}

/// Delay before reconnection attempt `attempt` (0-based): BASE·2^attempt,
/// capped at MAX, times a jitter factor in [0.5, 1.5) (`unit` in [0, 1)).
pub fn backoff_delay(attempt: u32, unit: f64) -> Duration {
    let base = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + unit.clamp(0.0, 1.0))
}

/// True when ssh said the remote port could not be forwarded.
pub fn is_forward_failure(stderr: &[String]) -> bool {
    stderr.iter().any(|l| {
        l.contains("remote port forwarding failed")
            || l.contains("forwarding failed for listen port")
    })
}

fn jitter_unit() -> f64 {
    (identity::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The relay over SSH, running in its own task.
pub struct SshRelay {
    /// Set to true to stop.
    stop: watch::Sender<bool>,
    /// The loop; it cleans up before it ends.
    task: JoinHandle<()>,
}

impl SshRelay {
    /// Starts the tunnel loop for `advert`. Failures are logged and retried,
    /// never returned: a relay that is down now may be up in a minute.
    pub fn start(plan: SshPlan, advert: &Advert) -> Self {
        let (stop, rx) = watch::channel(false);
        let worker = Worker {
            plan,
            advert: advert.clone(),
            file_name: advert.file_name(),
            registered: false,
            stop: rx,
        };
        SshRelay {
            stop,
            task: tokio::spawn(worker.run()),
        }
    }

    /// Removes the registration, stops the tunnel and waits for both.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(REMOVE_TIMEOUT + Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            tracing::warn!("the SSH relay did not stop in time");
        }
    }
}

/// Why a tunnel ended.
enum Ended {
    /// Stop was asked for.
    Stop,
    /// The remote port was taken.
    ForwardFailed,
    /// Anything else; the text says what.
    Lost(String),
}

/// One running `ssh -N -R` and the task that logs its stderr.
struct Tunnel {
    /// The ssh process.
    child: Child,
    /// Its pid.
    pid: u32,
    /// The remote port.
    remote: u16,
    /// Logs stderr lines; returns the last few at EOF.
    stderr: Option<JoinHandle<Vec<String>>>,
}

impl Tunnel {
    fn spawn(cmd: &[String], remote: u16, local: u16) -> std::io::Result<Self> {
        let args = tunnel_args(cmd, remote, local);
        let mut c = ssh_command(&args);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn()?;
        let pid = child.id().unwrap_or_default();
        let stderr = child.stderr.take().map(|err| {
            tokio::spawn(async move {
                let mut tail = VecDeque::new();
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(remote_port = remote, "ssh: {line}");
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                tail.into()
            })
        });
        tracing::info!(
            pid,
            remote_port = remote,
            local_port = local,
            "SSH tunnel started"
        );
        Ok(Tunnel {
            child,
            pid,
            remote,
            stderr,
        })
    }

    /// The last stderr lines (waits briefly for the pipe to drain).
    async fn stderr_tail(&mut self) -> Vec<String> {
        match self.stderr.take() {
            Some(h) => tokio::time::timeout(Duration::from_secs(1), h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// How the tunnel ended, once `wait` returned.
    async fn ended(&mut self, status: std::io::Result<std::process::ExitStatus>) -> Ended {
        let tail = self.stderr_tail().await;
        if is_forward_failure(&tail) {
            return Ended::ForwardFailed;
        }
        match status {
            Ok(s) => Ended::Lost(format!("ssh exited ({})", describe(s))),
            Err(e) => Ended::Lost(format!("lost track of ssh: {e}")),
        }
    }

    /// SIGTERM, then SIGKILL after 2 s; always reaps.
    async fn kill(mut self) {
        if self.child.id().is_some() {
            send_signal(self.pid, libc::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
        }
        let _ = self.stderr_tail().await;
        tracing::info!(
            pid = self.pid,
            remote_port = self.remote,
            "SSH tunnel stopped"
        );
    }
}

/// An ssh process: own process group (no terminal signals), dies with the
/// agent, killed if dropped.
fn ssh_command(args: &[String]) -> Command {
    let mut c = Command::new(&args[0]);
    c.args(&args[1..])
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    die_with_parent(&mut c, libc::SIGTERM);
    c
}

/// Runs one remote command with `input` on stdin; Err says why it failed.
async fn run_remote(
    cmd: &[String],
    script: &str,
    input: Option<&[u8]>,
    deadline: Duration,
) -> Result<(), String> {
    let args = remote_args(cmd, script);
    let mut c = ssh_command(&args);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    if input.is_some() {
        c.stdin(Stdio::piped());
    }
    let run = async {
        let mut child = c
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
        if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(bytes)
                .await
                .map_err(|e| format!("cannot send the registration to ssh: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("lost track of ssh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim();
            Err(format!(
                "{}{}",
                describe(out.status),
                if err.is_empty() {
                    String::new()
                } else {
                    format!(": {}", err.lines().last().unwrap_or_default())
                }
            ))
        }
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", deadline.as_secs())),
    }
}

/// True when the tunnel's end on the relay answers.
async fn probe(cmd: &[String], remote: u16) -> bool {
    match run_remote(cmd, &probe_script(remote), None, REMOTE_TIMEOUT).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(remote_port = remote, "probe through the tunnel failed: {e}");
            false
        }
    }
}

/// The state of the tunnel loop.
struct Worker {
    /// ssh command and remote directory.
    plan: SshPlan,
    /// What to register.
    advert: Advert,
    /// `<name>-<id>.json`.
    file_name: String,
    /// Whether a registration may exist on the relay.
    registered: bool,
    /// Stop signal.
    stop: watch::Receiver<bool>,
}

impl Worker {
    async fn run(mut self) {
        let mut attempt = 0u32;
        let mut forward_failures = 0u32;
        loop {
            let remote = identity::random_in(REMOTE_RANGE.0, REMOTE_RANGE.1);
            let (ended, lived) = match Tunnel::spawn(&self.plan.command, remote, self.advert.port) {
                Ok(mut tunnel) => {
                    let started = Instant::now();
                    let ended = self.serve(&mut tunnel).await;
                    if matches!(ended, Ended::Stop) {
                        self.cleanup(Some(tunnel)).await;
                        return;
                    }
                    tunnel.kill().await;
                    (ended, started.elapsed())
                }
                Err(e) => (
                    Ended::Lost(format!("cannot run {}: {e}", self.plan.command[0])),
                    Duration::ZERO,
                ),
            };
            match ended {
                Ended::ForwardFailed if forward_failures < FORWARD_RETRIES => {
                    forward_failures += 1;
                    tracing::info!(remote_port = remote, "remote port is taken; trying another");
                    continue;
                }
                Ended::ForwardFailed => tracing::warn!(
                    "the relay refused {} remote ports in a row; is GatewayPorts/AllowTcpForwarding enabled there?",
                    FORWARD_RETRIES + 1
                ),
                Ended::Lost(why) => tracing::warn!("SSH relay tunnel lost: {why}"),
                Ended::Stop => {}
            }
            forward_failures = 0;
            if lived >= STABLE_AFTER {
                attempt = 0;
            }
            let delay = backoff_delay(attempt, jitter_unit());
            attempt = attempt.saturating_add(1);
            tracing::info!("reconnecting to the relay in {:.1} s", delay.as_secs_f64());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = self.stop.changed() => {
                    self.cleanup(None).await;
                    return;
                }
            }
        }
    }

    /// Brings one tunnel into service and keeps it there until it ends.
    async fn serve(&mut self, tunnel: &mut Tunnel) -> Ended {
        // 1. Wait until the tunnel's end answers.
        let deadline = Instant::now() + ACCEPT_DEADLINE;
        loop {
            tokio::select! {
                _ = self.stop.changed() => return Ended::Stop,
                st = tunnel.child.wait() => return tunnel.ended(st).await,
                ok = probe(&self.plan.command, tunnel.remote) => if ok { break },
            }
            if Instant::now() >= deadline {
                return Ended::Lost(format!(
                    "the tunnel did not accept connections within {} s",
                    ACCEPT_DEADLINE.as_secs()
                ));
            }
            tokio::select! {
                _ = self.stop.changed() => return Ended::Stop,
                st = tunnel.child.wait() => return tunnel.ended(st).await,
                () = tokio::time::sleep(PROBE_PAUSE) => {}
            }
        }
        // 2. Register.
        self.register(tunnel.remote).await;
        // 3. Heartbeat.
        let every = self.advert.heartbeat;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        let mut misses = 0;
        loop {
            tokio::select! {
                _ = self.stop.changed() => return Ended::Stop,
                st = tunnel.child.wait() => return tunnel.ended(st).await,
                _ = tick.tick() => {}
            }
            let ok = tokio::select! {
                _ = self.stop.changed() => return Ended::Stop,
                ok = probe(&self.plan.command, tunnel.remote) => ok,
            };
            if ok {
                misses = 0;
                self.register(tunnel.remote).await;
            } else {
                misses += 1;
                tracing::warn!(
                    remote_port = tunnel.remote,
                    misses,
                    "heartbeat probe through the tunnel failed"
                );
                if misses >= HEARTBEAT_MISSES {
                    return Ended::Lost("the tunnel stopped answering".into());
                }
            }
        }
    }

    async fn register(&mut self, remote: u16) {
        let json = self.advert.registration(remote).to_json() + "\n";
        let script = write_script(&self.plan.remote_dir, &self.file_name);
        self.registered = true;
        match run_remote(
            &self.plan.command,
            &script,
            Some(json.as_bytes()),
            REMOTE_TIMEOUT,
        )
        .await
        {
            Ok(()) => tracing::info!(
                dir = %self.plan.remote_dir,
                file = %self.file_name,
                remote_port = remote,
                "registered on the relay"
            ),
            Err(e) => tracing::warn!(
                dir = %self.plan.remote_dir,
                "cannot write the registration on the relay ({e}); retrying at the next heartbeat"
            ),
        }
    }

    /// Removes the registration and stops the tunnel, concurrently.
    async fn cleanup(&mut self, tunnel: Option<Tunnel>) {
        let remove = async {
            if self.registered {
                let script = remove_script(&self.plan.remote_dir, &self.file_name);
                match run_remote(&self.plan.command, &script, None, REMOVE_TIMEOUT).await {
                    Ok(()) => tracing::info!(file = %self.file_name, "relay registration removed"),
                    Err(e) => tracing::warn!(
                        "cannot remove the registration {}/{} on the relay ({e}); the server prunes it once the tunnel is gone",
                        self.plan.remote_dir,
                        self.file_name
                    ),
                }
            }
        };
        let kill = async {
            if let Some(t) = tunnel {
                t.kill().await;
            }
        };
        tokio::join!(remove, kill);
        self.registered = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Vec<String> {
        vec!["ssh".into(), "-p".into(), "2222".into(), "me@relay".into()]
    }

    #[test]
    fn tunnel_command_line() {
        assert_eq!(
            tunnel_args(&cmd(), 10042, 4500).join(" "),
            "ssh -p 2222 me@relay -o BatchMode=yes -o ConnectTimeout=10 -N -o ExitOnForwardFailure=yes \
             -o ServerAliveInterval=15 -o ServerAliveCountMax=3 -R 10042:127.0.0.1:4500"
        );
        let r = remote_args(&cmd(), "rm -f x");
        assert_eq!(r.last().map(String::as_str), Some("rm -f x"));
        assert_eq!(r[..4], cmd()[..]);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_path("/tmp/opencode-relay"), "'/tmp/opencode-relay'");
        assert_eq!(sh_path("~/reg"), "\"$HOME\"/'reg'");
        assert_eq!(sh_path("~"), "\"$HOME\"");
    }

    #[test]
    fn remote_scripts() {
        assert_eq!(
            write_script("/tmp/r", "n-1.json"),
            "umask 077; mkdir -p '/tmp/r' && cat > '/tmp/r'/'.n-1.json.tmp' && mv -f '/tmp/r'/'.n-1.json.tmp' '/tmp/r'/'n-1.json'"
        );
        assert_eq!(
            remove_script("/tmp/r", "n-1.json"),
            "rm -f '/tmp/r'/'n-1.json' '/tmp/r'/'.n-1.json.tmp'"
        );
        assert!(probe_script(10001).contains("http://127.0.0.1:10001/global/health"));
        assert!(probe_script(10001).contains("/dev/tcp/127.0.0.1/10001"));
        assert!(probe_script(10001).contains("'%{http_code}'"));
    }

    #[test]
    fn remote_scripts_run_in_a_real_shell() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("it's here").to_string_lossy().into_owned();
        let sh = |script: &str, input: &str| {
            use std::io::Write;
            let mut c = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
            assert!(c.wait().unwrap().success(), "{script}");
        };
        sh(&write_script(&dir, "n-1.json"), "{\"port\":1}");
        let file = std::path::Path::new(&dir).join("n-1.json");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "{\"port\":1}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        sh(&remove_script(&dir, "n-1.json"), "");
        assert!(!file.exists());
    }

    /// Serves one HTTP answer with `status` on a fresh loopback port.
    fn one_answer(status: &'static str) -> u16 {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        port
    }

    #[test]
    fn the_probe_accepts_opencode_answers_only() {
        let has_curl = std::process::Command::new("sh")
            .args(["-c", "command -v curl"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_curl {
            eprintln!("SKIPPED the_probe_accepts_opencode_answers_only: no curl");
            return;
        }
        let probe = |port: u16| {
            std::process::Command::new("sh")
                .args(["-c", &probe_script(port)])
                .status()
                .unwrap()
                .success()
        };
        assert!(probe(one_answer("200 OK")));
        assert!(probe(one_answer("401 Unauthorized")));
        assert!(!probe(one_answer("404 Not Found")));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(!probe(port));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        assert_eq!(backoff_delay(0, 0.5), Duration::from_secs(1));
        assert_eq!(backoff_delay(3, 0.5), Duration::from_secs(8));
        assert_eq!(backoff_delay(10, 0.5), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX, 0.5), BACKOFF_MAX);
        assert_eq!(backoff_delay(2, 0.0), Duration::from_secs(2));
        assert!(backoff_delay(2, 0.999) < Duration::from_secs(6));
        for _ in 0..100 {
            let u = jitter_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn forward_failures_are_recognised() {
        let l = |s: &str| vec![s.to_string()];
        assert!(is_forward_failure(&l(
            "Error: remote port forwarding failed for listen port 10042"
        )));
        assert!(!is_forward_failure(&l(
            "ssh: connect to host relay port 22: Connection refused"
        )));
    }
}
