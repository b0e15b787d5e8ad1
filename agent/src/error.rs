//! The agent's one error type. Every message says what went wrong and what to
//! do about it, because it is printed to the person who started the agent.
//! Messages never contain credentials (OPENCODE_SERVER_PASSWORD is only ever
//! passed to OpenCode and to the health check, never formatted).
//!
//! This module owns the mapping from errors to exit codes; it must not print
//! anything itself.

use std::path::PathBuf;

/// Everything that can make `opencode-agent` stop with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The command line or environment cannot work as given (exit code 2).
    #[error("{0}")]
    Usage(String),

    /// The OpenCode binary could not be started.
    #[error(
        "cannot start OpenCode ({bin}): {source}. Install OpenCode (https://opencode.ai) or set OPENCODE_BIN to the path of its binary"
    )]
    Spawn {
        /// The binary we tried.
        bin: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// No free port was found for OpenCode's HTTP server.
    #[error("no free TCP port found in {low}-{high} after {tries} tries; pass --port PORT")]
    NoFreePort {
        /// Lowest port tried.
        low: u16,
        /// Highest port tried.
        high: u16,
        /// How many random picks were tried.
        tries: u32,
    },

    /// OpenCode exited before `/global/health` answered.
    #[error(
        "OpenCode exited ({status}) before it answered /global/health on port {port}; nothing was advertised. Check the OpenCode arguments and its output above"
    )]
    ExitedBeforeHealthy {
        /// "exit code N" or "killed by signal N".
        status: String,
        /// The exit code the agent passes on (OpenCode's, or 128+signal).
        code: i32,
        /// The HTTP port it was given.
        port: u16,
    },

    /// `attach`: the OpenCode server never became healthy.
    #[error(
        "no healthy OpenCode at {url} within {secs} s ({detail}); start it first (opencode serve --port PORT) or check --host/--port and OPENCODE_SERVER_PASSWORD"
    )]
    NotHealthy {
        /// Base URL that was checked.
        url: String,
        /// How long we waited.
        secs: u64,
        /// The last health-check error.
        detail: String,
    },

    /// `attach`: the advertised server stopped answering its health check.
    #[error(
        "OpenCode at {url} failed {failures} health checks in a row ({detail}); the advertisement was withdrawn. Restart OpenCode and the agent"
    )]
    HealthLost {
        /// Base URL that was checked.
        url: String,
        /// Consecutive failures seen.
        failures: u32,
        /// The last health-check error.
        detail: String,
    },

    /// Nothing could be advertised at all.
    #[error(
        "nothing could be advertised: {0}. Fix the errors above, or choose other advertisers (--relay-dir, --relay-ssh, --no-mdns)"
    )]
    NothingAdvertised(String),

    /// The mDNS responder could not be set up.
    #[error(
        "mDNS advertisement failed: {0}. Use --no-mdns to run without it (relay registrations still work)"
    )]
    Mdns(String),

    /// A local relay registration could not be written.
    #[error(
        "cannot write the relay registration {}: {source}. Check that the directory is writable, or choose another with --relay-dir DIR",
        .path.display()
    )]
    RelayWrite {
        /// The file we tried to write.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The tailnet DNS-SD record could not be published.
    #[error("tailnet advertisement failed: {0}")]
    Dnssd(String),

    /// `--bind tailnet` on a machine without a tailnet IPv4 address.
    #[error(
        "--bind tailnet: this machine has no tailnet IPv4 address (tailscaled not running or logged out?). Start Tailscale (`tailscale up`, then `tailscale ip -4`), or use --bind lan or --bind loopback"
    )]
    NoTailnet,

    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),

    /// Something that should not fail did.
    #[error("internal error: {0}; please report it")]
    Internal(String),

    /// Waiting for a child process failed.
    #[error("lost track of OpenCode (pid {pid}): {source}")]
    Wait {
        /// The child's pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// The process exit code for this error: 2 for usage errors, OpenCode's
    /// own code when it exited before becoming healthy, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Usage(_) => 2,
            AgentError::ExitedBeforeHealthy { code, .. } => *code,
            _ => 1,
        }
    }
}

/// Shorthand used across the agent.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;
