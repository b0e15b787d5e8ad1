//! End to end, without multicast: `opencode-agent run --serve --no-mdns
//! --relay-dir DIR` against the real OpenCode binary.
//!
//! - the registration appears only once `/global/health` answers, with
//!   OpenCode's port and the agent's id;
//! - SIGTERM to the agent removes it and stops OpenCode;
//! - when OpenCode dies, the agent removes it and exits with OpenCode's code;
//! - with a fleet secret (OPENCODE_MCP_SECRET), the registration is signed
//!   and OpenCode requires the password derived for the agent's id.
//!
//! OpenCode comes from $OPENCODE_BIN or `<repo>/.cache/opencode/...`; when it
//! is missing the tests are skipped loudly (and fail when CI is set). Every
//! process started here is killed by PID and reaped, also on panic.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use opencode_mcp::announce::{Registration, parse_registration};
use opencode_mcp::secret::FleetSecret;

const START_DEADLINE: Duration = Duration::from_secs(90);
const STOP_DEADLINE: Duration = Duration::from_secs(20);

fn opencode_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OPENCODE_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/opencode/node_modules/opencode-linux-x64/bin/opencode");
    p.exists().then_some(p)
}

fn require_opencode(test: &str) -> Option<PathBuf> {
    match opencode_bin() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "CI is set but no OpenCode binary: set OPENCODE_BIN or install it under .cache/opencode"
            )
        }
        None => {
            eprintln!(
                "\n!!!!!!!!!! SKIPPED {test}: no OpenCode binary (set OPENCODE_BIN or install opencode-linux-x64 under .cache/opencode) !!!!!!!!!!\n"
            );
            None
        }
    }
}

/// Sends `sig` to `pid`.
fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The parent pid of `pid`, if it exists.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 4, after the parenthesised command name.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Polls `cond` every 50 ms until it holds or `deadline` passes.
fn wait_for<T>(deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One agent run in its own temp dir; kills the agent (and, through it,
/// OpenCode) on drop.
struct Agent {
    /// The agent process.
    child: Child,
    /// Temp dir with HOME, XDG dirs, the project and the registry.
    tmp: tempfile::TempDir,
    /// OpenCode's pid, once known.
    opencode_pid: Option<u32>,
}

impl Agent {
    fn start(opencode: &Path, name: &str) -> Agent {
        Agent::start_with(opencode, name, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    fn start_with(opencode: &Path, name: &str, env: &[(&str, &str)]) -> Agent {
        let tmp = tempfile::tempdir().expect("temp dir");
        let base = tmp.path();
        for d in ["home", "config", "data", "cache", "state", "proj", "reg"] {
            std::fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        let log = File::create(base.join("agent.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_opencode-agent"))
            .args(["run", "--serve", "--no-mdns", "--name", name, "--relay-dir"])
            .arg(base.join("reg"))
            .current_dir(base.join("proj"))
            .env("OPENCODE_BIN", opencode)
            .env("HOME", base.join("home"))
            .env("XDG_CONFIG_HOME", base.join("config"))
            .env("XDG_DATA_HOME", base.join("data"))
            .env("XDG_CACHE_HOME", base.join("cache"))
            .env("XDG_STATE_HOME", base.join("state"))
            .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
            .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
            .env("OPENCODE_DISABLE_SHARE", "1")
            .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
            .env("RUST_LOG", "info")
            .env_remove("OPENCODE_SERVER_PASSWORD")
            .env_remove("INSTANCE_NAME")
            .env_remove("RELAY_SSH_CMD")
            .env_remove("OPENCODE_AGENT_LOG")
            .env_remove("OPENCODE_MCP_SECRET")
            .env_remove("OPENCODE_MCP_SECRET_FILE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start opencode-agent");
        Agent {
            child,
            tmp,
            opencode_pid: None,
        }
    }

    fn reg_dir(&self) -> PathBuf {
        self.tmp.path().join("reg")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    /// The registration file(s) currently in the registry.
    fn registrations(&self) -> Vec<(String, Registration)> {
        let Ok(rd) = std::fs::read_dir(self.reg_dir()) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                if !name.ends_with(".json") {
                    return None;
                }
                let reg = parse_registration(&std::fs::read(e.path()).ok()?, "x").ok()?;
                Some((name, reg))
            })
            .collect()
    }

    /// Waits for exactly one registration and remembers OpenCode's pid.
    fn wait_registered(&mut self) -> (String, Registration) {
        let found = wait_for(START_DEADLINE, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("agent exited early ({st}):\n{}", self.log());
            }
            self.registrations().into_iter().next()
        });
        let (file, reg) = found.unwrap_or_else(|| {
            panic!("no registration within {START_DEADLINE:?}:\n{}", self.log())
        });
        self.opencode_pid = reg.pid;
        (file, reg)
    }

    /// Waits for the agent to exit.
    fn wait_exit(&mut self) -> ExitStatus {
        wait_for(STOP_DEADLINE, || self.child.try_wait().ok().flatten()).unwrap_or_else(|| {
            panic!(
                "agent still running after {STOP_DEADLINE:?}:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // OpenCode also dies with the agent (PR_SET_PDEATHSIG); kill it
            // directly too while it is certainly still the agent's child.
            if let Some(pid) = self.opencode_pid
                && ppid(pid) == Some(self.child.id())
            {
                kill(pid, libc::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET /global/health` on 127.0.0.1:port; the body when 200.
fn health(port: u16) -> Option<String> {
    let (status, body) = health_status(port, None)?;
    (status == 200).then_some(body)
}

/// Standard base64 with padding (for a Basic auth header).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= c.len() {
                out.push(A[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /global/health` on 127.0.0.1:port, with Basic auth `opencode:PASSWORD`
/// when given: the status code and the body.
fn health_status(port: u16, password: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = password
        .map(|p| {
            format!(
                "Authorization: Basic {}\r\n",
                base64(format!("opencode:{p}").as_bytes())
            )
        })
        .unwrap_or_default();
    s.write_all(format!("GET /global/health HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    ))
}

fn pid_gone(pid: u32) -> bool {
    // Gone, or at least no longer the agent's child (reaped and reparented
    // processes do not exist any more in a fresh pid space).
    !Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

fn check_registration(file: &str, reg: &Registration, name: &str) -> u16 {
    check_registration_with(file, reg, name, None)
}

/// [`check_registration`], with the password OpenCode requires.
fn check_registration_with(
    file: &str,
    reg: &Registration,
    name: &str,
    password: Option<&str>,
) -> u16 {
    let id = reg.id.clone().expect("registration has an id");
    assert_eq!(id.len(), 16, "id {id:?}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "id {id:?}");
    assert_eq!(file, format!("{name}-{id}.json"));
    assert_eq!(reg.name, name);
    assert_eq!(
        reg.local_port,
        Some(reg.port),
        "local relay: port == localPort"
    );
    assert!((4096..=5095).contains(&reg.port), "port {}", reg.port);
    assert!(
        reg.connected_at
            .as_deref()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert!(reg.cwd.as_deref().is_some_and(|c| c.ends_with("/proj")));
    // The registration is written only after health passed, so OpenCode
    // answers right now.
    let (status, body) =
        health_status(reg.port, password).expect("OpenCode answers /global/health once registered");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"healthy\":true"), "{body}");
    reg.port
}

#[test]
fn with_a_fleet_secret_the_registration_is_signed_and_opencode_needs_the_derived_password() {
    let Some(bin) = require_opencode(
        "with_a_fleet_secret_the_registration_is_signed_and_opencode_needs_the_derived_password",
    ) else {
        return;
    };
    let text = "5e".repeat(32);
    let secret = FleetSecret::from_text(&text).expect("secret");
    let mut agent = Agent::start_with(&bin, "e2e-secret", &[("OPENCODE_MCP_SECRET", &text)]);
    let (file, reg) = agent.wait_registered();
    let id = reg.id.clone().expect("id");
    let password = secret.instance_password(&id);
    let port = check_registration_with(&file, &reg, "e2e-secret", Some(&password));

    // Signed over the file's port and 127.0.0.1, with this secret only.
    let at = reg.at.expect("signed: at");
    let sig = reg.sig.clone().expect("signed: sig");
    assert_eq!(reg.addrs, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
    assert!(
        secret.verify(&id, port, &reg.addrs, at, &sig).is_ok(),
        "the signature verifies"
    );
    let other = FleetSecret::from_text(&"77".repeat(32)).expect("secret");
    assert!(other.verify(&id, port, &reg.addrs, at, &sig).is_err());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        at <= now && now - at < 120,
        "signed just now: {at} vs {now}"
    );

    // OpenCode requires the derived password: without it 401, with another 401.
    assert_eq!(health_status(port, None).map(|s| s.0), Some(401));
    assert_eq!(
        health_status(port, Some(&other.instance_password(&id))).map(|s| s.0),
        Some(401)
    );
    assert_eq!(health_status(port, Some(&password)).map(|s| s.0), Some(200));

    kill(agent.child.id(), libc::SIGTERM);
    agent.wait_exit();
    let log = agent.log();
    assert!(agent.registrations().is_empty(), "withdrawn:\n{log}");
    assert!(log.contains("fleet secret in use"), "{log}");
    for hidden in [text.as_str(), password.as_str(), sig.as_str()] {
        assert!(
            !log.contains(hidden),
            "the log leaks a secret value:\n{log}"
        );
    }
}

#[test]
fn an_explicit_password_conflicts_with_the_fleet_secret_in_run_mode() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_opencode-agent"))
        .args(["run", "--serve", "--no-mdns", "--relay-dir"])
        .arg(tmp.path().join("reg"))
        .env("OPENCODE_BIN", "/nonexistent/opencode")
        .env("OPENCODE_MCP_SECRET", "5e".repeat(32))
        .env("OPENCODE_SERVER_PASSWORD", "mine")
        .env_remove("RELAY_SSH_CMD")
        .stdin(Stdio::null())
        .output()
        .expect("run opencode-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("OPENCODE_SERVER_PASSWORD") && err.contains("--no-secret"),
        "{err}"
    );
    assert!(
        !err.contains(&"5e".repeat(32)) && !err.contains("mine"),
        "{err}"
    );
}

#[test]
fn sigterm_to_the_agent_withdraws_the_registration_and_stops_opencode() {
    let Some(bin) =
        require_opencode("sigterm_to_the_agent_withdraws_the_registration_and_stops_opencode")
    else {
        return;
    };
    let mut agent = Agent::start(&bin, "e2e-term");
    let (file, reg) = agent.wait_registered();
    let port = check_registration(&file, &reg, "e2e-term");
    let oc = reg.pid.expect("registration has OpenCode's pid");
    assert_eq!(
        ppid(oc),
        Some(agent.child.id()),
        "OpenCode is the agent's child"
    );

    kill(agent.child.id(), libc::SIGTERM);
    let status = agent.wait_exit();
    let log = agent.log();
    assert!(
        agent.registrations().is_empty(),
        "registration removed:\n{log}"
    );
    assert!(pid_gone(oc), "OpenCode stopped:\n{log}");
    assert!(health(port).is_none(), "nothing answers on {port} any more");
    // OpenCode stops on SIGTERM either by exiting 0 or by dying of it (143):
    // the agent passes on whichever it was.
    let code = status.code().expect("the agent exits, it is not killed");
    assert!(code == 0 || code == 143, "exit code {code}:\n{log}");
    assert!(log.contains("forwarding to OpenCode"), "{log}");
}

#[test]
fn the_agent_exits_with_opencodes_code_when_opencode_dies() {
    let Some(bin) = require_opencode("the_agent_exits_with_opencodes_code_when_opencode_dies")
    else {
        return;
    };
    let mut agent = Agent::start(&bin, "e2e-kill");
    let (file, reg) = agent.wait_registered();
    check_registration(&file, &reg, "e2e-kill");
    let oc = reg.pid.expect("registration has OpenCode's pid");
    assert_eq!(
        ppid(oc),
        Some(agent.child.id()),
        "OpenCode is the agent's child"
    );

    kill(oc, libc::SIGKILL);
    let status = agent.wait_exit();
    let log = agent.log();
    assert_eq!(status.code(), Some(128 + 9), "128+SIGKILL:\n{log}");
    assert!(
        agent.registrations().is_empty(),
        "registration removed:\n{log}"
    );
    assert!(
        std::fs::read_dir(agent.reg_dir())
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "no temp files left"
    );
}

#[test]
fn an_opencode_that_fails_to_start_is_reported_with_its_exit_code() {
    // A fake "OpenCode" that exits 3 at once: no real binary needed.
    let tmp = tempfile::tempdir().expect("temp dir");
    let fake = tmp.path().join("opencode");
    std::fs::write(&fake, "#!/bin/sh\necho \"fake opencode $*\" >&2\nexit 3\n")
        .expect("write fake");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new(env!("CARGO_BIN_EXE_opencode-agent"))
        .args(["run", "--serve", "--no-mdns", "--relay-dir"])
        .arg(tmp.path().join("reg"))
        .env("OPENCODE_BIN", &fake)
        .env_remove("OPENCODE_SERVER_PASSWORD")
        .env_remove("RELAY_SSH_CMD")
        .env("OPENCODE_AGENT_LOG", "stderr")
        .stdin(Stdio::null())
        .output()
        .expect("run opencode-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("fake opencode serve --port"), "{err}");
    assert!(err.contains("before it answered /global/health"), "{err}");
    assert!(!tmp.path().join("reg").exists(), "nothing registered");
}
