//! Configuration: every environment variable the seed server understood, each
//! also a command-line flag, parsed and validated once at start-up.
//!
//! This module owns names, defaults and validation. It must not start tasks,
//! touch the network or read registration files: the rest of the program gets
//! a finished [`Config`] and never looks at the environment again.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::registry::policy::Cidr;
use crate::secret::{FleetSecret, SECRET_ENV};
use crate::tailscale::SOCKET_ENV;
use crate::transport::TransportKind;

/// Environment variable naming the fleet secret file.
pub const SECRET_FILE_ENV: &str = "OPENCODE_MCP_SECRET_FILE";

/// The fleet secret's text as given on the command line or in the
/// environment. `Debug` never shows it.
#[derive(Clone)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

impl std::str::FromStr for SecretText {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(SecretText(s.to_string()))
    }
}

/// Longest help text shown above the options.
const ABOUT: &str = "One MCP server for every OpenCode instance you run.

Discovers OpenCode instances (relay registration files, mDNS on the LAN, peers
of a Tailscale tailnet), keeps their idle/busy status live, and lets an MCP
client list them, read their sessions, send prompts, answer their permission
requests and follow them to completion.

Run without a subcommand, it speaks MCP over stdio: point your MCP client
(Claude Desktop, Claude Code, OpenCode) at this binary. `opencode-mcp instances`
prints what it discovers, for debugging.";

/// Command line of `opencode-mcp`.
#[derive(Debug, Parser)]
#[command(name = "opencode-mcp", version, about = ABOUT, long_about = None)]
pub struct Cli {
    /// Settings shared by the server and every subcommand.
    #[command(flatten)]
    pub settings: Settings,

    /// What to do; the MCP stdio server when absent.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands for humans.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the MCP server on stdio (the default).
    Serve,
    /// Discover instances for a moment, print them once and exit.
    Instances {
        /// Print JSON (the `instances` tool's structured output) instead of text.
        #[arg(long)]
        json: bool,
        /// How long to let discovery and health checks settle, in milliseconds.
        #[arg(long, default_value_t = 1500, value_name = "MS")]
        settle_ms: u64,
    },
}

/// Every tunable, with the seed's environment variable names.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Discovery transports, comma-separated: local-relay (registration files),
    /// mdns (DNS-SD on the LAN), tailscale (peers of the tailnet). `auto` picks
    /// every transport that can work on this machine.
    #[arg(long, env = "TRANSPORT", default_value = "auto", value_name = "LIST")]
    pub transport: String,

    /// Directory of relay registration files (one JSON file per instance),
    /// written by `opencode-connected` or `opencode-agent --relay-dir`.
    #[arg(
        long,
        env = "RELAY_REGISTRY_DIR",
        default_value = "/tmp/opencode-relay",
        value_name = "DIR"
    )]
    pub relay_registry_dir: PathBuf,

    /// Full rescan and health re-check interval, in milliseconds. Changes to
    /// the relay directory are seen at once through inotify; this is the
    /// safety net and the health-check period.
    #[arg(
        long,
        env = "DISCOVERY_INTERVAL_MS",
        default_value_t = 30_000,
        value_name = "MS"
    )]
    pub discovery_interval_ms: u64,

    /// Deadline of one health check (`GET /global/health`), in milliseconds.
    #[arg(
        long,
        env = "HEALTH_CHECK_TIMEOUT_MS",
        default_value_t = 3_000,
        value_name = "MS"
    )]
    pub health_check_timeout_ms: u64,

    /// Deadline of every other OpenCode request (sessions, messages, status,
    /// prompt, abort, permissions), in milliseconds. Event streams have none:
    /// a silent stream is dropped after 35 s without a heartbeat.
    #[arg(
        long,
        env = "REQUEST_TIMEOUT_MS",
        default_value_t = 15_000,
        value_name = "MS"
    )]
    pub request_timeout_ms: u64,

    /// How long `send` follows a prompt before it returns what it has, in
    /// milliseconds.
    #[arg(
        long,
        env = "SEND_TIMEOUT_MS",
        default_value_t = 300_000,
        value_name = "MS"
    )]
    pub send_timeout_ms: u64,

    /// An instance that stays unreachable (or a registration file that stays
    /// unreadable) this long is dropped, and its relay file deleted, in
    /// milliseconds. Until then it is listed as offline.
    #[arg(
        long,
        env = "PRUNE_AFTER_MS",
        default_value_t = 300_000,
        value_name = "MS"
    )]
    pub prune_after_ms: u64,

    /// Username for OpenCode's HTTP Basic auth.
    #[arg(
        long,
        env = "OPENCODE_SERVER_USERNAME",
        default_value = "opencode",
        value_name = "USER"
    )]
    pub opencode_username: String,

    /// Password for OpenCode's HTTP Basic auth (the instance's
    /// OPENCODE_SERVER_PASSWORD). Prefer the environment variable: flags are
    /// visible in `ps`.
    #[arg(
        long,
        env = "OPENCODE_SERVER_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub opencode_password: Option<String>,

    /// Largest OpenCode response body accepted, in bytes.
    #[arg(long, env = "MAX_RESPONSE_BYTES", default_value_t = 16 * 1024 * 1024, value_name = "BYTES")]
    pub max_response_bytes: usize,

    /// Largest single event-stream line accepted, in bytes.
    #[arg(long, env = "MAX_EVENT_BYTES", default_value_t = 4 * 1024 * 1024, value_name = "BYTES")]
    pub max_event_bytes: usize,

    /// Largest registration file accepted, in bytes.
    #[arg(long, env = "MAX_REGISTRATION_BYTES", default_value_t = 64 * 1024, value_name = "BYTES")]
    pub max_registration_bytes: u64,

    /// The fleet secret shared by all your machines (`opencode-agent secret
    /// init` makes one). With it, only instances whose announcement is signed
    /// with it are contacted, each with its own derived password; anything
    /// else is listed as `untrusted`. Prefer the environment variable or the
    /// secret file: flags are visible in `ps`.
    #[arg(
        long,
        env = SECRET_ENV,
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub secret: Option<SecretText>,

    /// File holding the fleet secret (mode 0600), read when OPENCODE_MCP_SECRET
    /// is unset. Default: $XDG_CONFIG_HOME/opencode-mcp/secret, else
    /// ~/.config/opencode-mcp/secret. No file there means no secret.
    #[arg(long, env = SECRET_FILE_ENV, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,

    /// Extra networks the server may connect to, comma-separated CIDRs or
    /// addresses (e.g. `192.0.2.0/24,2001:db8::7`). Always allowed: loopback,
    /// the tailnet ranges (100.64.0.0/10, fd7a:115c:a1e0::/48) and subnets
    /// directly attached to this machine. Other announced addresses are
    /// ignored with a warning.
    #[arg(
        long,
        env = "ALLOW_ADDRESSES",
        default_value = "",
        value_name = "CIDRS"
    )]
    pub allow_addresses: String,

    /// Most instances one transport may report; the rest are ignored and
    /// listed as a discovery problem (a flood of forged announcements cannot
    /// exhaust memory or health-check capacity).
    #[arg(
        long,
        env = "MAX_INSTANCES_PER_TRANSPORT",
        default_value_t = 1024,
        value_name = "N"
    )]
    pub max_instances_per_transport: usize,

    /// Oldest signed announcement accepted, in seconds since it was signed;
    /// 0 (the default) means no age limit. Replays are stopped by the address
    /// binding, not by age: a signature covers the addresses it was made for,
    /// and credentials go only to one of them, so a recorded announcement
    /// replayed elsewhere is refused whatever its age. With a limit, an
    /// announcement not renewed in time makes its instance untrusted; agents
    /// re-sign every `--heartbeat-s` (60 s). Needs clocks in step.
    #[arg(
        long,
        env = "ANNOUNCE_MAX_AGE_S",
        default_value_t = 0,
        value_name = "SECONDS"
    )]
    pub announce_max_age_s: u64,

    /// tailscaled's LocalAPI socket, which the tailscale transport asks for
    /// the tailnet's peers. Default: the platform's (on Linux
    /// /var/run/tailscale/tailscaled.sock); the `tailscale` CLI is the
    /// fallback when the socket cannot be used.
    #[arg(long, env = SOCKET_ENV, value_name = "PATH")]
    pub tailscale_socket: Option<PathBuf>,

    /// UDP port on which the agents on tailnet peers answer DNS-SD queries
    /// (`opencode-agent --dnssd-port`; the same on every machine).
    #[arg(
        long,
        env = "TAILSCALE_DNSSD_PORT",
        default_value_t = crate::dnssd::DEFAULT_PORT,
        value_parser = clap::value_parser!(u16).range(1..),
        value_name = "PORT"
    )]
    pub tailscale_dnssd_port: u16,

    /// How long the tailscale transport waits for one peer's answer, in
    /// milliseconds (10-10000). Peers that run no agent stay silent, so this
    /// bounds a sweep of the tailnet, not the discovery of answering peers.
    #[arg(
        long,
        env = "TAILSCALE_QUERY_TIMEOUT_MS",
        default_value_t = 500,
        value_parser = clap::value_parser!(u64).range(10..=10_000),
        value_name = "MS"
    )]
    pub tailscale_query_timeout_ms: u64,
}

/// Credentials for OpenCode's HTTP Basic auth. `Debug` never shows the password.
#[derive(Clone)]
pub struct Credentials {
    /// Basic auth user name (OpenCode's default is `opencode`).
    pub username: String,
    /// Basic auth password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The validated configuration every component reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Transports to run, without duplicates, in the order given.
    pub transports: Vec<TransportKind>,
    /// Relay registration directory.
    pub relay_dir: PathBuf,
    /// Rescan / health re-check period.
    pub discovery_interval: Duration,
    /// Deadline of one health check.
    pub health_timeout: Duration,
    /// Deadline of other API calls.
    pub request_timeout: Duration,
    /// How long `send` waits for a reply.
    pub send_timeout: Duration,
    /// Grace period before an unreachable instance or unreadable file is dropped.
    pub prune_after: Duration,
    /// Credentials sent to every instance, when a password is configured
    /// and there is no fleet secret (with one, passwords are derived).
    pub credentials: Option<Credentials>,
    /// HTTP Basic user name (OPENCODE_SERVER_USERNAME).
    pub username: String,
    /// Response body cap.
    pub max_response_bytes: usize,
    /// Event-stream line cap.
    pub max_event_bytes: usize,
    /// Registration file cap.
    pub max_registration_bytes: u64,
    /// The fleet secret, when one is configured. With it only signed
    /// announcements are trusted and passwords are derived per instance.
    pub secret: Option<FleetSecret>,
    /// Networks allowed on top of loopback, the tailnet and attached subnets.
    pub allow_addresses: Vec<Cidr>,
    /// Most instances one transport may report.
    pub max_instances_per_transport: usize,
    /// Oldest signed announcement accepted; `None`: no limit.
    pub announce_max_age: Option<Duration>,
    /// tailscaled's socket when the user named one; `None`: the default.
    pub tailscale_socket: Option<PathBuf>,
    /// UDP port of the agents' unicast DNS-SD responders on the tailnet.
    pub tailscale_dnssd_port: u16,
    /// Deadline of one tailnet peer's DNS-SD answer.
    pub tailscale_query_timeout: Duration,
}

impl Config {
    /// Validates raw settings.
    pub fn from_settings(s: &Settings) -> Result<Self> {
        let transports = TransportKind::parse_list(&s.transport)?;
        // The seed read these with `Number(env) || default`, so 0 meant "the
        // default"; keep that so existing configurations behave the same.
        let ms = |name: &str, v: u64, default: u64, min: u64| -> Result<Duration> {
            let v = if v == 0 { default } else { v };
            if v < min {
                return Err(Error::Config(format!(
                    "{name} must be at least {min} ms, got {v}"
                )));
            }
            Ok(Duration::from_millis(v))
        };
        let credentials = s
            .opencode_password
            .as_ref()
            .filter(|p| !p.is_empty())
            .map(|p| Credentials {
                username: s.opencode_username.clone(),
                password: p.clone(),
            });
        let secret_file = match &s.secret_file {
            Some(p) => Some(p.clone()),
            // No HOME and no XDG_CONFIG_HOME: no default file, so no secret
            // unless the environment gives one.
            None => FleetSecret::default_path().ok(),
        };
        let env_secret = s.secret.as_ref().map(|t| t.0.as_str());
        let secret = match &secret_file {
            Some(file) => FleetSecret::load(env_secret, file)?,
            None => FleetSecret::load(env_secret, std::path::Path::new(""))?,
        };
        let allow_addresses = s
            .allow_addresses
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                Cidr::parse(c).ok_or_else(|| {
                    Error::Config(format!(
                        "ALLOW_ADDRESSES: {c:?} is not an address or CIDR (like 192.0.2.0/24 or 2001:db8::/32)"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if s.max_instances_per_transport == 0 {
            return Err(Error::Config(
                "MAX_INSTANCES_PER_TRANSPORT must be at least 1".into(),
            ));
        }
        Ok(Self {
            transports,
            relay_dir: s.relay_registry_dir.clone(),
            discovery_interval: ms(
                "DISCOVERY_INTERVAL_MS",
                s.discovery_interval_ms,
                30_000,
                100,
            )?,
            health_timeout: ms(
                "HEALTH_CHECK_TIMEOUT_MS",
                s.health_check_timeout_ms,
                3_000,
                10,
            )?,
            request_timeout: ms("REQUEST_TIMEOUT_MS", s.request_timeout_ms, 15_000, 10)?,
            send_timeout: ms("SEND_TIMEOUT_MS", s.send_timeout_ms, 300_000, 10)?,
            prune_after: Duration::from_millis(s.prune_after_ms),
            credentials,
            username: s.opencode_username.clone(),
            max_response_bytes: s.max_response_bytes.max(1024),
            max_event_bytes: s.max_event_bytes.max(1024),
            max_registration_bytes: s.max_registration_bytes.max(256),
            secret,
            allow_addresses,
            max_instances_per_transport: s.max_instances_per_transport,
            announce_max_age: (s.announce_max_age_s > 0)
                .then(|| Duration::from_secs(s.announce_max_age_s)),
            tailscale_socket: s
                .tailscale_socket
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            tailscale_dnssd_port: s.tailscale_dnssd_port,
            tailscale_query_timeout: Duration::from_millis(s.tailscale_query_timeout_ms),
        })
    }
}
