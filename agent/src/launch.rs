//! Starting OpenCode and living beside it: the port pick, the command line,
//! the child process, and the signal rules of a process that shares its
//! terminal with a TUI child.
//!
//! Signal rules (DESIGN.md, "The agent: a straight line"): while the child
//! runs, SIGINT and SIGQUIT are *caught* and not acted on in TUI mode (the
//! terminal sends them to the whole foreground group; the TUI decides), and
//! forwarded in `--serve` mode (where nothing else may tell the server);
//! SIGTERM and SIGHUP are forwarded. They are caught with handlers, never set
//! to SIG_IGN, because an ignored signal stays ignored across `exec` and the
//! child would inherit that. This module must not advertise anything or
//! decide when to stop; `app` does.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener};
use std::process::{ExitStatus, Stdio};

use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::cli::{Bind, RunPlan};
use crate::error::{AgentError, Result};
use crate::identity;

/// Ports OpenCode may get when none is given (the seed's range).
pub const PORT_RANGE: (u16, u16) = (4096, 5095);
/// Random picks tried before giving up.
pub const PORT_TRIES: u32 = 50;

/// The address OpenCode listens on for `bind`; `tailnet_v4` is the
/// machine's tailnet IPv4 address, which `--bind tailnet` needs.
pub fn listen_host(bind: Bind, tailnet_v4: Option<IpAddr>) -> Result<String> {
    match bind {
        Bind::Loopback => Ok("127.0.0.1".to_string()),
        Bind::Lan => Ok("0.0.0.0".to_string()),
        Bind::Tailnet => tailnet_v4
            .map(|ip| ip.to_string())
            .ok_or(AgentError::NoTailnet),
    }
}

/// True when nothing listens on `port` (checked by binding 0.0.0.0:port,
/// which also conflicts with a listener on any single IPv4 address).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// Picks a free port in `range` at random, trying `tries` times; `is_free`
/// decides (injected for tests). There is a window between the check and
/// OpenCode's bind; a lost race shows up as OpenCode exiting early.
pub fn pick_port(range: (u16, u16), tries: u32, is_free: impl Fn(u16) -> bool) -> Result<u16> {
    for _ in 0..tries {
        let p = identity::random_in(range.0, range.1);
        if is_free(p) {
            return Ok(p);
        }
    }
    Err(AgentError::NoFreePort {
        low: range.0,
        high: range.1,
        tries,
    })
}

/// OpenCode's arguments: `serve --port P --hostname H ARGS…` headless, or
/// `--port P --hostname H ARGS…` for the TUI (whose HTTP side-car answers
/// the same routes).
pub fn opencode_args(plan: &RunPlan, port: u16, host: &str) -> Vec<String> {
    let mut args = Vec::with_capacity(plan.args.len() + 5);
    if plan.serve {
        args.push("serve".to_string());
    }
    args.extend([
        "--port".to_string(),
        port.to_string(),
        "--hostname".to_string(),
        host.to_string(),
    ]);
    args.extend(plan.args.iter().cloned());
    args
}

/// Makes `cmd`'s process receive `sig` when the agent dies, even by SIGKILL
/// (Linux `PR_SET_PDEATHSIG`; elsewhere a no-op). The agent runs a
/// current-thread runtime, so the spawning thread lives as long as the agent.
pub fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    #[cfg(target_os = "linux")]
    {
        let parent = libc::pid_t::try_from(std::process::id()).unwrap_or_default();
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls async-signal-safe functions (prctl, getppid, raise).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::raise(sig);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (cmd, sig);
}

/// Sends `sig` to process `pid`; errors (already gone) are ignored.
pub fn send_signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The shell convention for a finished process: its exit code, or 128+N when
/// killed by signal N.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    }
}

/// `exit code N` / `killed by signal N`, for messages.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "unknown status".to_string(),
    }
}

/// The running OpenCode child.
pub struct OpenCode {
    /// The child process (reaped by [`OpenCode::wait`]).
    child: Child,
    /// Its pid, kept because `Child::id` is `None` once reaped.
    pid: u32,
}

impl OpenCode {
    /// Starts OpenCode with the terminal (stdin, stdout, stderr) inherited
    /// and in the agent's process group, so the TUI is in the foreground.
    /// A headless server also gets SIGTERM if the agent dies. `password`,
    /// when given, replaces OPENCODE_SERVER_PASSWORD in OpenCode's
    /// environment (the one derived from the fleet secret).
    pub fn spawn(plan: &RunPlan, port: u16, host: &str, password: Option<&str>) -> Result<Self> {
        let mut cmd = Command::new(&plan.bin);
        if let Some(pw) = password {
            cmd.env("OPENCODE_SERVER_PASSWORD", pw);
        }
        cmd.args(opencode_args(plan, port, host))
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(false);
        if plan.serve {
            die_with_parent(&mut cmd, libc::SIGTERM);
        }
        let child = cmd.spawn().map_err(|source| AgentError::Spawn {
            bin: plan.bin.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        Ok(OpenCode { child, pid })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit (cancel-safe).
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        self.child.wait().await.map_err(|source| AgentError::Wait {
            pid: self.pid,
            source,
        })
    }

    /// Sends `sig` to the child if it has not been reaped yet.
    pub fn signal(&self, sig: libc::c_int) {
        if self.child.id().is_some() {
            send_signal(self.pid, sig);
        }
    }
}

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGINT.
    Int,
    /// SIGQUIT.
    Quit,
    /// SIGTERM.
    Term,
    /// SIGHUP.
    Hup,
}

impl Sig {
    /// The signal number.
    pub fn number(self) -> libc::c_int {
        match self {
            Sig::Int => libc::SIGINT,
            Sig::Quit => libc::SIGQUIT,
            Sig::Term => libc::SIGTERM,
            Sig::Hup => libc::SIGHUP,
        }
    }
}

/// Handlers for the four signals the agent cares about. Installing them
/// replaces the default action (death) for the whole life of the agent.
pub struct Signals {
    /// SIGINT stream.
    int: Signal,
    /// SIGQUIT stream.
    quit: Signal,
    /// SIGTERM stream.
    term: Signal,
    /// SIGHUP stream.
    hup: Signal,
}

impl Signals {
    /// Installs the handlers. Call before starting any child, so that no
    /// signal can kill the agent between the spawn and the first wait.
    pub fn install() -> Result<Self> {
        let s = |k| signal(k).map_err(AgentError::Signals);
        Ok(Signals {
            int: s(SignalKind::interrupt())?,
            quit: s(SignalKind::quit())?,
            term: s(SignalKind::terminate())?,
            hup: s(SignalKind::hangup())?,
        })
    }

    /// The next signal (cancel-safe).
    pub async fn recv(&mut self) -> Sig {
        loop {
            let sig = tokio::select! {
                s = self.int.recv() => s.map(|()| Sig::Int),
                s = self.quit.recv() => s.map(|()| Sig::Quit),
                s = self.term.recv() => s.map(|()| Sig::Term),
                s = self.hup.recv() => s.map(|()| Sig::Hup),
            };
            if let Some(sig) = sig {
                return sig;
            }
            // A stream ended (runtime shutting down): never resolve again.
            std::future::pending::<()>().await;
        }
    }
}

/// What run mode does with a signal while OpenCode runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Nothing (the TUI got it from the terminal too and decides).
    Ignore,
    /// Send the same signal to OpenCode; the agent stops once it exits.
    Forward,
}

/// The rule table: TERM/HUP are always forwarded; INT/QUIT are left to the
/// TUI, and forwarded to a headless server.
pub fn signal_action(sig: Sig, serve: bool) -> SignalAction {
    match sig {
        Sig::Term | Sig::Hup => SignalAction::Forward,
        Sig::Int | Sig::Quit if serve => SignalAction::Forward,
        Sig::Int | Sig::Quit => SignalAction::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn run_plan(serve: bool, bind: Bind, args: &[&str]) -> RunPlan {
        RunPlan {
            bin: "opencode".into(),
            port: None,
            serve,
            bind,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn tui_and_serve_command_lines() {
        assert_eq!(
            opencode_args(
                &run_plan(false, Bind::Loopback, &["proj"]),
                4500,
                "127.0.0.1"
            ),
            vec!["--port", "4500", "--hostname", "127.0.0.1", "proj"]
        );
        assert_eq!(
            opencode_args(
                &run_plan(true, Bind::Lan, &["--print-logs"]),
                4501,
                "0.0.0.0"
            ),
            vec![
                "serve",
                "--port",
                "4501",
                "--hostname",
                "0.0.0.0",
                "--print-logs"
            ]
        );
    }

    #[test]
    fn listen_hosts() {
        let ts: IpAddr = "100.101.102.103".parse().unwrap();
        assert_eq!(listen_host(Bind::Loopback, Some(ts)).unwrap(), "127.0.0.1");
        assert_eq!(listen_host(Bind::Lan, None).unwrap(), "0.0.0.0");
        assert_eq!(
            listen_host(Bind::Tailnet, Some(ts)).unwrap(),
            "100.101.102.103"
        );
        let err = listen_host(Bind::Tailnet, None).unwrap_err();
        assert!(err.to_string().contains("tailscale up"), "{err}");
    }

    #[test]
    fn port_pick_stays_in_range_and_skips_busy_ports() {
        let p = pick_port(PORT_RANGE, PORT_TRIES, |p| p % 2 == 0).unwrap();
        assert!((4096..=5095).contains(&p) && p % 2 == 0);
        let err = pick_port((10, 20), 5, |_| false).unwrap_err();
        assert!(err.to_string().contains("--port"));
    }

    #[test]
    fn a_real_busy_port_is_seen_as_busy() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(!port_is_free(port));
        drop(l);
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9"
        );
    }

    #[test]
    fn signal_rules() {
        assert_eq!(signal_action(Sig::Int, false), SignalAction::Ignore);
        assert_eq!(signal_action(Sig::Quit, false), SignalAction::Ignore);
        assert_eq!(signal_action(Sig::Int, true), SignalAction::Forward);
        assert_eq!(signal_action(Sig::Term, false), SignalAction::Forward);
        assert_eq!(signal_action(Sig::Hup, true), SignalAction::Forward);
    }
}
