//! The command line (clap) and its resolution, with the environment, into a
//! validated [`Plan`]: which mode, which name and id, which advertisers.
//!
//! All validation happens here, once, and is pure (the environment comes in
//! as an [`Env`] value), so it is unit-tested. This module must not start
//! processes, open sockets or touch files.

use std::path::PathBuf;
use std::time::Duration;

use crate::advertise::tailnet::is_tailnet;
use clap::{Args, Parser, Subcommand, ValueEnum};
use opencode_mcp::announce::MAX_NAME_BYTES;
use opencode_mcp::config::Credentials;
use opencode_mcp::dnssd::DEFAULT_PORT as DEFAULT_DNSSD_PORT;
use opencode_mcp::secret::FleetSecret;

use crate::advertise::HEARTBEAT;
use crate::error::{AgentError, Result};
use crate::identity;

/// Default registration directory (local for `--relay-dir`, remote for `--relay-ssh`).
pub const DEFAULT_RELAY_DIR: &str = "/tmp/opencode-relay";
/// Default OpenCode binary, looked up on PATH.
pub const DEFAULT_OPENCODE_BIN: &str = "opencode";
/// Default host for `attach`.
pub const DEFAULT_ATTACH_HOST: &str = "127.0.0.1";

const AFTER_HELP: &str = "\
ENVIRONMENT:
  OPENCODE_BIN               OpenCode binary (default: `opencode` on PATH)
  INSTANCE_NAME              instance name, as --name (default: $(hostname)-$(basename $PWD))
  RELAY_SSH_CMD              as --relay-ssh
  RELAY_REGISTRY_DIR         registration directory: on the relay for --relay-ssh, local for a
                             bare --relay-dir (default: /tmp/opencode-relay)
  OPENCODE_SERVER_PASSWORD   passed to OpenCode (which then requires HTTP Basic auth) and used
                             for the health check; required by --bind lan/tailnet without a
                             fleet secret, refused by `run` with one (the password is derived)
  OPENCODE_MCP_SECRET        the fleet secret (else OPENCODE_MCP_SECRET_FILE, else the file
                             of `opencode-agent secret path`): derives OpenCode's password
                             and signs what is announced
  TAILSCALE_DNSSD_PORT       as --dnssd-port
  OPENCODE_AGENT_HEARTBEAT_S as --heartbeat-s
  OPENCODE_SERVER_USERNAME   Basic auth user name (default: opencode)
  OPENCODE_AGENT_LOG         log destination: a file path, or `stderr` (default: stderr, except
                             with the TUI: $XDG_STATE_HOME/opencode-agent/agent.log)
  RUST_LOG                   log filter (default: info)

EXAMPLES:
  opencode-agent                              TUI in this directory, advertised on this machine
  opencode-agent run -- --model openai/gpt-5  extra arguments go to OpenCode after --
  opencode-agent run --serve --bind lan       headless server, advertised on the LAN
  opencode-agent run --serve --bind tailnet   headless server, reachable from your tailnet only
  opencode-agent --relay-ssh 'ssh relay.example.org' --no-mdns
  opencode-agent attach --port 4096           advertise an `opencode serve` that already runs";

/// `opencode-agent`: runs beside OpenCode and makes it discoverable by
/// `opencode-mcp` (mDNS `_opencode._tcp`, relay registration files).
#[derive(Debug, Parser)]
#[command(
    name = "opencode-agent",
    version,
    about = "Start OpenCode (or attach to a running one) and make it discoverable by opencode-mcp",
    long_about = "Start OpenCode (or attach to a running one) and make it discoverable by opencode-mcp.\n\n\
        `run` (the default) starts OpenCode as a child that keeps the terminal, on a free port in \
        4096-5095, waits until /global/health answers, then advertises it: by mDNS as \
        `_opencode._tcp.local.` and, when asked, by relay registration files. It exits with \
        OpenCode's exit code, after withdrawing every advertisement.\n\n\
        `attach` advertises an OpenCode server that already runs, until interrupted or until \
        the server stops answering.",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without one, `run`.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of the implicit `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start OpenCode (TUI, or headless with --serve) and advertise it (the default)
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
    /// Advertise an OpenCode server that is already running
    #[command(after_help = AFTER_HELP)]
    Attach(AttachArgs),
    /// Create, import or locate the fleet secret shared by all your machines
    #[command(subcommand, long_about = SECRET_ABOUT, after_help = SECRET_AFTER_HELP)]
    Secret(SecretCommand),
}

const SECRET_ABOUT: &str = "\
The fleet secret is one random key that every machine running opencode-agent or opencode-mcp \
shares. Each OpenCode instance's password is derived from it, and announcements are signed with \
it, so opencode-mcp only sends credentials to your own instances.

It is read from OPENCODE_MCP_SECRET when that is set, else from the secret file \
($XDG_CONFIG_HOME/opencode-mcp/secret, else ~/.config/opencode-mcp/secret), which must have \
mode 0600.";

const SECRET_AFTER_HELP: &str = "\
EXAMPLES:
  opencode-agent secret init                          on the first machine
  ssh other opencode-agent secret import < \"$(opencode-agent secret path)\"
                                                      copy it to another machine
  opencode-agent secret import                        paste it when asked
  opencode-agent secret path                          where the file is";

/// `opencode-agent secret ...`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Create a new fleet secret file (mode 0600) and print how to copy it to your other machines
    #[command(
        long_about = "Create a new fleet secret file (mode 0600, parent directories 0700) from \
            32 random bytes, then print the secret once with the commands that copy it to your \
            other machines. An existing file is kept unless --force is given.",
        after_help = SECRET_AFTER_HELP
    )]
    Init(SecretFileArgs),
    /// Store a fleet secret read from standard input (as printed by `secret init`)
    #[command(
        long_about = "Read a fleet secret from standard input (the 64 hex digits printed by \
            `secret init` on another machine, or the file it wrote) and store it in the secret \
            file with mode 0600. On a terminal, paste it and press Enter. An existing file with \
            another secret is kept unless --force is given.",
        after_help = SECRET_AFTER_HELP
    )]
    Import(SecretFileArgs),
    /// Print the path of the fleet secret file
    #[command(after_help = SECRET_AFTER_HELP)]
    Path(SecretPathArgs),
}

/// Options of `secret init` and `secret import`.
#[derive(Debug, Clone, Args)]
pub struct SecretFileArgs {
    /// Replace an existing secret file (every machine must then get the new secret)
    #[arg(long)]
    pub force: bool,
    /// The secret file [default: $XDG_CONFIG_HOME/opencode-mcp/secret, else ~/.config/opencode-mcp/secret]
    #[arg(long, value_name = "FILE")]
    pub path: Option<PathBuf>,
}

/// Options of `secret path`.
#[derive(Debug, Clone, Args)]
pub struct SecretPathArgs {
    /// The secret file to report on instead of the default
    #[arg(long, value_name = "FILE")]
    pub path: Option<PathBuf>,
}

/// Where OpenCode listens and where it is advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bind {
    /// 127.0.0.1 only; advertised on the loopback interface (this machine only)
    Loopback,
    /// all interfaces; advertised on LAN interfaces and the tailnet (needs OPENCODE_SERVER_PASSWORD or a fleet secret)
    Lan,
    /// the tailnet IPv4 address only; advertised on the tailnet (needs OPENCODE_SERVER_PASSWORD or a fleet secret)
    Tailnet,
}

/// Options shared by `run` and `attach`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Instance name users match against [default: $(hostname)-$(basename $PWD)]
    #[arg(long, env = "INSTANCE_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Also write a relay registration file into DIR [default DIR: $RELAY_REGISTRY_DIR or /tmp/opencode-relay]
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub relay_dir: Option<Option<PathBuf>>,
    /// Also register on a relay machine through an SSH reverse tunnel; CMD is the ssh command line, e.g. 'ssh -p 2222 me@relay'
    #[arg(long, env = "RELAY_SSH_CMD", value_name = "CMD")]
    pub relay_ssh: Option<String>,
    /// Do not advertise by mDNS
    #[arg(long)]
    pub no_mdns: bool,
    /// UDP port of the tailnet DNS-SD responder (the same on every machine)
    #[arg(long, env = "TAILSCALE_DNSSD_PORT", value_name = "PORT", default_value_t = DEFAULT_DNSSD_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub dnssd_port: u16,
    /// Ignore the fleet secret: no derived password, nothing signed
    #[arg(long)]
    pub no_secret: bool,
    /// How often, in seconds, what is announced is refreshed: relay files rewritten, the SSH tunnel probed, and with a fleet secret the mDNS and tailnet records re-signed. Keep it well below the servers' ANNOUNCE_MAX_AGE_S
    #[arg(long, env = "OPENCODE_AGENT_HEARTBEAT_S", value_name = "SECONDS", default_value_t = HEARTBEAT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_s: u64,
}

/// Options of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// OpenCode's HTTP port [default: a free random port in 4096-5095]
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Run headless `opencode serve` instead of the TUI
    #[arg(long)]
    pub serve: bool,
    /// Where OpenCode listens and is advertised
    #[arg(long, value_enum, value_name = "WHERE", default_value_t = Bind::Loopback)]
    pub bind: Bind,
    /// Shared options.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Arguments passed to OpenCode as they are (after `--`)
    #[arg(last = true, value_name = "OPENCODE_ARGS")]
    pub opencode_args: Vec<String>,
}

/// Options of `attach`.
#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// Port of the running OpenCode server
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Address of the running OpenCode server (127.0.0.1: advertised on this machine only;
    /// 0.0.0.0 or a LAN address: advertised on the LAN)
    #[arg(long, value_name = "HOST", default_value = DEFAULT_ATTACH_HOST)]
    pub host: String,
    /// Shared options.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The parts of the process environment the agent reads (besides what clap
/// reads itself), gathered once so resolution stays pure.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// OPENCODE_BIN.
    pub opencode_bin: Option<String>,
    /// RELAY_REGISTRY_DIR.
    pub relay_registry_dir: Option<String>,
    /// OPENCODE_SERVER_PASSWORD.
    pub password: Option<String>,
    /// OPENCODE_SERVER_USERNAME.
    pub username: Option<String>,
    /// The current directory.
    pub cwd: PathBuf,
    /// The machine's hostname.
    pub hostname: String,
    /// The fleet secret, when one is configured and usable.
    pub secret: Option<FleetSecret>,
    /// Why the configured fleet secret cannot be used (it is then `None`).
    pub secret_error: Option<String>,
}

impl Env {
    /// Reads the real environment.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let secret = crate::fleet::load();
        Env {
            opencode_bin: var("OPENCODE_BIN"),
            relay_registry_dir: var("RELAY_REGISTRY_DIR"),
            password: var("OPENCODE_SERVER_PASSWORD"),
            username: var("OPENCODE_SERVER_USERNAME"),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            hostname: identity::hostname(),
            secret: secret.clone().ok().flatten(),
            secret_error: secret.err(),
        }
    }
}

/// A validated plan for one agent process.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Start OpenCode, or attach to one.
    pub mode: Mode,
    /// Instance name.
    pub name: String,
    /// Random instance id (16 hex digits), fixed for the life of the process.
    pub id: String,
    /// Machine hostname.
    pub hostname: String,
    /// Working directory (OpenCode's, in run mode).
    pub cwd: PathBuf,
    /// Basic auth for the health check, when a password is set (in `run`
    /// with a fleet secret: the derived one, which OpenCode is given).
    pub credentials: Option<Credentials>,
    /// The fleet secret, unless none is configured or --no-secret.
    pub secret: Option<FleetSecret>,
    /// UDP port of the tailnet DNS-SD responder.
    pub dnssd_port: u16,
    /// Advertise by mDNS.
    pub mdns: bool,
    /// Local registration directory, when asked.
    pub relay_dir: Option<PathBuf>,
    /// SSH relay, when asked.
    pub relay_ssh: Option<SshPlan>,
    /// How often announcements are refreshed (and re-signed).
    pub heartbeat: Duration,
}

/// How to reach the relay machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshPlan {
    /// The ssh command line, split into words (program first).
    pub command: Vec<String>,
    /// Registration directory on the relay.
    pub remote_dir: String,
}

/// Start or attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Start OpenCode as a child.
    Run(RunPlan),
    /// Advertise a running OpenCode.
    Attach(AttachPlan),
}

/// `run` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPlan {
    /// OpenCode binary.
    pub bin: String,
    /// Fixed port, or `None` to pick one.
    pub port: Option<u16>,
    /// Headless `opencode serve` instead of the TUI.
    pub serve: bool,
    /// Where OpenCode listens.
    pub bind: Bind,
    /// Extra OpenCode arguments.
    pub args: Vec<String>,
}

/// `attach` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachPlan {
    /// Host of the running server.
    pub host: String,
    /// Its port.
    pub port: u16,
}

impl Plan {
    /// True when the OpenCode TUI owns the terminal (run mode without --serve).
    pub fn is_tui(&self) -> bool {
        matches!(&self.mode, Mode::Run(r) if !r.serve)
    }
}

/// Validates the command line against the environment.
pub fn resolve(cli: Cli, env: &Env) -> Result<Plan> {
    let (mode, common) = match cli.command {
        Some(Command::Attach(a)) => {
            let host = a.host.trim().to_string();
            if host.is_empty() {
                return Err(AgentError::Usage("--host must not be empty".into()));
            }
            (Mode::Attach(AttachPlan { host, port: a.port }), a.common)
        }
        Some(Command::Run(r)) => run_mode(r, env)?,
        None => run_mode(cli.run, env)?,
        Some(Command::Secret(_)) => {
            return Err(AgentError::Internal(
                "`secret` is handled before a plan is made".into(),
            ));
        }
    };
    let name = match common.name.as_deref().map(str::trim) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => identity::default_name(&env.hostname, &env.cwd),
    };
    if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(AgentError::Usage(format!(
            "the instance name (--name or INSTANCE_NAME) must be at most {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    let default_dir = env
        .relay_registry_dir
        .clone()
        .unwrap_or_else(|| DEFAULT_RELAY_DIR.to_string());
    let relay_dir = common.relay_dir.map(|d| match d {
        Some(d) => d,
        None => PathBuf::from(&default_dir),
    });
    if relay_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
        return Err(AgentError::Usage("--relay-dir must not be empty".into()));
    }
    let relay_ssh = match common.relay_ssh.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(cmd) => {
            let command = split_command(cmd).map_err(|e| {
                AgentError::Usage(format!(
                    "cannot read --relay-ssh/RELAY_SSH_CMD: {e}; give an ssh command line such as 'ssh -p 2222 me@relay'"
                ))
            })?;
            if default_dir.chars().any(char::is_control) {
                return Err(AgentError::Usage(
                    "RELAY_REGISTRY_DIR must not contain control characters".into(),
                ));
            }
            Some(SshPlan {
                command,
                remote_dir: default_dir.clone(),
            })
        }
    };
    let bind = match &mode {
        Mode::Run(r) => Some(r.bind),
        Mode::Attach(_) => None,
    };
    // OpenCode on the tailnet only (`--bind tailnet`, or attached at a
    // tailnet address) is published by the tailnet DNS-SD record, and no
    // multicast crosses a tailnet: mDNS would reach nobody.
    let tailnet_only = match &mode {
        Mode::Run(r) => r.bind == Bind::Tailnet,
        Mode::Attach(a) => a
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| is_tailnet(&ip)),
    };
    let mdns = !common.no_mdns && !tailnet_only;
    if !mdns && !tailnet_only && relay_dir.is_none() && relay_ssh.is_none() {
        return Err(AgentError::Usage(
            "nothing to advertise: --no-mdns is given and neither --relay-dir nor --relay-ssh; drop --no-mdns or add a relay".into(),
        ));
    }
    let secret = if common.no_secret {
        None
    } else if let Some(e) = &env.secret_error {
        return Err(AgentError::Usage(format!(
            "{e}; or pass --no-secret to run without the fleet secret"
        )));
    } else {
        env.secret.clone()
    };
    let id = identity::new_instance_id();
    let username = env
        .username
        .clone()
        .unwrap_or_else(|| "opencode".to_string());
    let credentials = match (&mode, &secret) {
        (Mode::Run(_), Some(secret)) => {
            if env.password.is_some() {
                return Err(AgentError::Usage(
                    "OPENCODE_SERVER_PASSWORD is set, but a fleet secret is in use: the agent then gives OpenCode a password derived from the secret, which opencode-mcp computes by itself. Unset OPENCODE_SERVER_PASSWORD, or pass --no-secret to keep your own password (announcements are then unsigned)".into(),
                ));
            }
            Some(Credentials {
                username,
                password: secret.instance_password(&id),
            })
        }
        _ => env
            .password
            .clone()
            .map(|password| Credentials { username, password }),
    };
    if let Some(b @ (Bind::Lan | Bind::Tailnet)) = bind
        && credentials.is_none()
    {
        let (flag, reach) = match b {
            Bind::Tailnet => ("--bind tailnet", "every machine of your tailnet"),
            _ => ("--bind lan", "the whole network"),
        };
        return Err(AgentError::Usage(format!(
            "{flag} makes OpenCode reachable from {reach}, so it needs a password: set up the fleet secret (`opencode-agent secret init`, or OPENCODE_MCP_SECRET), or set OPENCODE_SERVER_PASSWORD (and optionally OPENCODE_SERVER_USERNAME), or use --bind loopback"
        )));
    }
    Ok(Plan {
        mode,
        name,
        id,
        hostname: env.hostname.clone(),
        cwd: env.cwd.clone(),
        credentials,
        secret,
        dnssd_port: common.dnssd_port,
        mdns,
        relay_dir,
        relay_ssh,
        heartbeat: Duration::from_secs(common.heartbeat_s),
    })
}

fn run_mode(r: RunArgs, env: &Env) -> Result<(Mode, CommonArgs)> {
    if let Some(bad) = r.opencode_args.iter().find(|a| {
        ["--port", "--hostname"]
            .iter()
            .any(|f| a.as_str() == *f || a.starts_with(&format!("{f}=")))
    }) {
        return Err(AgentError::Usage(format!(
            "`{bad}` after `--` would fight the agent's own choice; use opencode-agent --port / --bind instead"
        )));
    }
    let plan = RunPlan {
        bin: env
            .opencode_bin
            .clone()
            .unwrap_or_else(|| DEFAULT_OPENCODE_BIN.to_string()),
        port: r.port,
        serve: r.serve,
        bind: r.bind,
        args: r.opencode_args,
    };
    Ok((Mode::Run(plan), r.common))
}

/// Splits a command line into words like a POSIX shell would, without any
/// expansion: whitespace separates words, '…' is literal, "…" honours
/// backslash before `\ " $ ``, and a backslash outside quotes escapes the
/// next character.
pub fn split_command(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('\\' | '"' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err("trailing backslash".into()),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    if words.is_empty() {
        return Err("empty command".into());
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env {
            cwd: PathBuf::from("/home/u/proj"),
            hostname: "box".into(),
            ..Env::default()
        }
    }

    fn plan(args: &[&str], env: &Env) -> Result<Plan> {
        let mut argv = vec!["opencode-agent"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| AgentError::Usage(e.to_string()))?;
        resolve(cli, env)
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn bare_invocation_runs_the_tui_with_defaults() {
        let p = plan(&[], &env()).unwrap();
        assert_eq!(p.name, "box-proj");
        assert_eq!(p.id.len(), 16);
        assert!(p.mdns && p.relay_dir.is_none() && p.relay_ssh.is_none());
        assert!(p.is_tui());
        assert_eq!(
            p.mode,
            Mode::Run(RunPlan {
                bin: "opencode".into(),
                port: None,
                serve: false,
                bind: Bind::Loopback,
                args: vec![],
            })
        );
    }

    #[test]
    fn run_flags_and_trailing_args_are_kept() {
        let mut e = env();
        e.opencode_bin = Some("/opt/oc".into());
        e.password = Some("pw".into());
        let p = plan(
            &[
                "run", "--serve", "--port", "4500", "--bind", "lan", "--name", "x", "--",
                "--model", "a/b", "proj",
            ],
            &e,
        )
        .unwrap();
        assert_eq!(p.name, "x");
        assert!(!p.is_tui());
        let Mode::Run(r) = p.mode else { panic!() };
        assert_eq!(r.bin, "/opt/oc");
        assert_eq!(r.port, Some(4500));
        assert_eq!(r.bind, Bind::Lan);
        assert_eq!(r.args, vec!["--model", "a/b", "proj"]);
        let c = p.credentials.unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("opencode", "pw")
        );
    }

    #[test]
    fn lan_without_password_is_a_usage_error() {
        let err = plan(&["--bind", "lan"], &env()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("OPENCODE_SERVER_PASSWORD"));
    }

    fn secret() -> FleetSecret {
        FleetSecret::from_text(&"ab".repeat(32)).unwrap()
    }

    #[test]
    fn tailnet_bind_needs_a_password_or_a_secret_and_skips_mdns() {
        let err = plan(&["--bind", "tailnet"], &env()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("--bind tailnet") && msg.contains("tailnet"),
            "{msg}"
        );
        assert!(
            msg.contains("secret init") && msg.contains("OPENCODE_SERVER_PASSWORD"),
            "{msg}"
        );

        let mut e = env();
        e.password = Some("pw".into());
        let p = plan(&["run", "--serve", "--bind", "tailnet"], &e).unwrap();
        assert!(!p.mdns, "no multicast on a tailnet");
        assert_eq!(p.dnssd_port, 5353);
        let Mode::Run(r) = &p.mode else { panic!() };
        assert_eq!(r.bind, Bind::Tailnet);
        // The tailnet record is an advertiser of its own: no relay needed.
        assert!(
            plan(
                &["--bind", "tailnet", "--no-mdns", "--dnssd-port", "5354"],
                &e
            )
            .is_ok()
        );
        assert_eq!(
            plan(&["--bind", "tailnet", "--dnssd-port", "5354"], &e)
                .unwrap()
                .dnssd_port,
            5354
        );
        assert!(plan(&["--bind", "tailnet", "--dnssd-port", "0"], &e).is_err());

        let mut e = env();
        e.secret = Some(secret());
        assert!(plan(&["--bind", "tailnet"], &e).is_ok());

        // attach at a tailnet address is the same: the tailnet record
        // publishes it, and mDNS is left out.
        for host in [
            "100.101.102.103",
            "fd7a:115c:a1e0::1",
            "[fd7a:115c:a1e0::1]",
        ] {
            let p = plan(
                &["attach", "--port", "4096", "--host", host, "--no-mdns"],
                &e,
            )
            .unwrap_or_else(|err| panic!("attach --host {host}: {err}"));
            assert!(!p.mdns, "{host}");
            let p = plan(&["attach", "--port", "4096", "--host", host], &e).unwrap();
            assert!(!p.mdns, "{host}");
        }
        // The heartbeat: 60 s unless asked, 1 s to an hour.
        assert_eq!(
            plan(&["--bind", "tailnet"], &e).unwrap().heartbeat,
            HEARTBEAT
        );
        assert_eq!(
            plan(&["--bind", "tailnet", "--heartbeat-s", "5"], &e)
                .unwrap()
                .heartbeat,
            Duration::from_secs(5)
        );
        assert!(plan(&["--bind", "tailnet", "--heartbeat-s", "0"], &e).is_err());
        // Elsewhere --no-mdns without a relay still leaves nothing to advertise.
        let err = plan(
            &[
                "attach",
                "--port",
                "4096",
                "--host",
                "192.0.2.7",
                "--no-mdns",
            ],
            &e,
        )
        .unwrap_err();
        assert!(err.to_string().contains("nothing to advertise"), "{err}");
    }

    #[test]
    fn a_secret_derives_the_run_password_and_replaces_the_lan_password() {
        let mut e = env();
        e.secret = Some(secret());
        let p = plan(&["run", "--serve", "--bind", "lan"], &e).unwrap();
        let c = p.credentials.clone().expect("derived credentials");
        assert_eq!(c.username, "opencode");
        assert_eq!(c.password, secret().instance_password(&p.id));
        assert!(p.secret.is_some());
        // Two agents, two ids, two passwords.
        let q = plan(&["run", "--serve"], &e).unwrap();
        assert_ne!(q.credentials.unwrap().password, c.password);

        // An explicit password conflicts in run mode...
        e.password = Some("pw".into());
        let err = plan(&["run", "--serve"], &e).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("OPENCODE_SERVER_PASSWORD") && msg.contains("--no-secret"),
            "{msg}"
        );
        assert!(!msg.contains(&secret().to_export_string()));
        // ...but not with --no-secret (then unsigned, own password)...
        let p = plan(&["run", "--serve", "--no-secret"], &e).unwrap();
        assert!(p.secret.is_none());
        assert_eq!(p.credentials.unwrap().password, "pw");
        // ...and attach keeps the server's own password, still signing.
        let p = plan(&["attach", "--port", "4096"], &e).unwrap();
        assert!(p.secret.is_some());
        assert_eq!(p.credentials.unwrap().password, "pw");
    }

    #[test]
    fn an_unusable_secret_stops_the_agent_unless_no_secret() {
        let mut e = env();
        e.secret_error = Some("fleet secret: /x/secret is accessible by other users".into());
        let err = plan(&["run", "--serve"], &e).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--no-secret"), "{err}");
        let p = plan(&["run", "--serve", "--no-secret"], &e).unwrap();
        assert!(p.secret.is_none() && p.credentials.is_none());
    }

    #[test]
    fn port_and_hostname_after_dashes_are_refused() {
        for a in ["--port", "--port=1", "--hostname=0.0.0.0"] {
            let err = plan(&["--", a], &env()).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{a}");
        }
        assert!(plan(&["--port", "0"], &env()).is_err());
    }

    #[test]
    fn relay_dir_value_is_optional() {
        let p = plan(&["--relay-dir"], &env()).unwrap();
        assert_eq!(p.relay_dir, Some(PathBuf::from(DEFAULT_RELAY_DIR)));
        let mut e = env();
        e.relay_registry_dir = Some("/srv/reg".into());
        let p = plan(&["--relay-dir", "--serve"], &e).unwrap();
        assert_eq!(p.relay_dir, Some(PathBuf::from("/srv/reg")));
        let p = plan(&["run", "--relay-dir", "/x/y"], &e).unwrap();
        assert_eq!(p.relay_dir, Some(PathBuf::from("/x/y")));
    }

    #[test]
    fn relay_ssh_is_split_and_uses_the_registry_dir() {
        let mut e = env();
        e.relay_registry_dir = Some("~/reg".into());
        let p = plan(
            &[
                "--relay-ssh",
                "ssh -p 2222 -o 'ProxyCommand=nc %h %p' me@relay",
            ],
            &e,
        )
        .unwrap();
        let s = p.relay_ssh.unwrap();
        assert_eq!(
            s.command,
            vec![
                "ssh",
                "-p",
                "2222",
                "-o",
                "ProxyCommand=nc %h %p",
                "me@relay"
            ]
        );
        assert_eq!(s.remote_dir, "~/reg");
        assert!(plan(&["--relay-ssh", "ssh 'oops"], &e).is_err());
        assert!(
            plan(&["--relay-ssh", "  "], &e)
                .unwrap()
                .relay_ssh
                .is_none()
        );
    }

    #[test]
    fn attach_needs_a_port_and_defaults_to_loopback() {
        let p = plan(&["attach", "--port", "4096", "--name", "n"], &env()).unwrap();
        assert_eq!(
            p.mode,
            Mode::Attach(AttachPlan {
                host: "127.0.0.1".into(),
                port: 4096
            })
        );
        assert!(plan(&["attach"], &env()).is_err());
    }

    #[test]
    fn nothing_to_advertise_is_refused() {
        let err = plan(&["--no-mdns"], &env()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(plan(&["--no-mdns", "--relay-dir", "/tmp/x"], &env()).is_ok());
    }

    #[test]
    fn bad_names_are_refused_and_blank_names_default() {
        assert!(plan(&["--name", "a\nb"], &env()).is_err());
        assert!(plan(&["--name", &"n".repeat(300)], &env()).is_err());
        assert_eq!(plan(&["--name", "  "], &env()).unwrap().name, "box-proj");
    }

    #[test]
    fn split_command_follows_shell_quoting() {
        assert_eq!(split_command("ssh  host").unwrap(), vec!["ssh", "host"]);
        assert_eq!(
            split_command(r#"a "b c" 'd e' f\ g "h\"i" "\n""#).unwrap(),
            vec!["a", "b c", "d e", "f g", "h\"i", "\\n"]
        );
        assert_eq!(split_command("a ''").unwrap(), vec!["a", ""]);
        assert!(split_command("").is_err());
        assert!(split_command("a \"b").is_err());
        assert!(split_command("a \\").is_err());
    }
}
