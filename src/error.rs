//! The crate's one error type. Every variant's message says what went wrong
//! *and* what the user can do about it, because these strings reach people
//! through MCP tool results and the command line. Messages never contain
//! credentials (passwords, Authorization headers, secrets).

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can fail in `opencode-mcp` and `opencode-agent`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value (env var or flag) is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// `TRANSPORT` named a transport that does not exist.
    #[error("unknown transport \"{given}\"; valid values are: {valid}")]
    UnknownTransport {
        /// What the user wrote.
        given: String,
        /// Comma-separated list of accepted names.
        valid: String,
    },

    /// A transport was asked for but cannot work on this machine.
    #[error("transport {transport} cannot run here: {reason}")]
    TransportUnavailable {
        /// Which transport.
        transport: &'static str,
        /// Why, in words the user can act on.
        reason: String,
    },

    /// The OpenCode server could not be reached at all (refused, reset, DNS).
    #[error(
        "cannot reach OpenCode at {url}: {detail}. Is it still running? `opencode-mcp instances` shows what is discovered"
    )]
    Unreachable {
        /// Base URL that was tried.
        url: String,
        /// The transport-level reason.
        detail: String,
    },

    /// The OpenCode server did not answer within the deadline.
    #[error("OpenCode at {url} did not answer within {}ms; it may be hung or overloaded (if it is just slow, raise HEALTH_CHECK_TIMEOUT_MS for health checks or REQUEST_TIMEOUT_MS for other calls)", .after.as_millis())]
    Timeout {
        /// Base URL that was tried.
        url: String,
        /// How long we waited.
        after: Duration,
    },

    /// The server asked for credentials, or rejected the ones we sent.
    #[error(
        "OpenCode at {url} refused our credentials (HTTP 401); set OPENCODE_SERVER_PASSWORD (and OPENCODE_SERVER_USERNAME if not \"opencode\") to the instance's password"
    )]
    Unauthorized {
        /// Base URL that was tried.
        url: String,
    },

    /// The server answered, but not with what OpenCode answers (HTML, bad JSON, wrong status).
    #[error("unexpected answer from {url}{path}: {detail}")]
    Protocol {
        /// Base URL.
        url: String,
        /// Request path.
        path: String,
        /// What was wrong with the answer.
        detail: String,
    },

    /// OpenCode answered with an error status and (maybe) an error body.
    #[error("OpenCode at {url} answered {path} with HTTP {status}: {message}")]
    Api {
        /// Base URL.
        url: String,
        /// Request path.
        path: String,
        /// HTTP status code.
        status: u16,
        /// The message from OpenCode's error body, or a short excerpt of it.
        message: String,
    },

    /// A response was larger than the configured cap.
    #[error(
        "answer from {url}{path} exceeds the {limit}-byte limit (MAX_RESPONSE_BYTES); refusing to read more"
    )]
    TooLarge {
        /// Base URL.
        url: String,
        /// Request path.
        path: String,
        /// The cap that was exceeded.
        limit: usize,
    },

    /// A relay registration file could not be used.
    #[error("registration file {}: {reason}", .path.display())]
    Registration {
        /// The file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },

    /// The MCP connection failed (the client went away or spoke something else).
    #[error("MCP session failed: {0}")]
    Mcp(String),

    /// Unicast DNS-SD publishing failed (runtime directory, record file, responder).
    #[error("tailnet DNS-SD: {0}")]
    Dnssd(String),

    /// Tailscale's LocalAPI (or its CLI) could not tell us about the tailnet.
    #[error("Tailscale: {0}")]
    Tailscale(String),

    /// The fleet secret (OPENCODE_MCP_SECRET or its file) is malformed, unsafe
    /// or cannot be written. The message never contains the secret.
    #[error("fleet secret: {0}")]
    Secret(String),

    /// Filesystem trouble outside of registration parsing.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        /// What we were doing ("reading", "watching", ...).
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
