//! `opencode-agent`: runs beside OpenCode and makes it discoverable by
//! `opencode-mcp`. This file only parses, sets up logging and the runtime,
//! runs [`app::main`] and turns its outcome into an exit code.
//!
//! # Layout
//!
//! - [`cli`]: clap definition and validation into a [`cli::Plan`].
//! - [`app`]: the straight line: launch/attach → health gate → advertise → shutdown.
//! - [`launch`]: port pick, OpenCode's command line, the child, signal rules.
//! - [`health`]: `/global/health` checks through the library's client.
//! - [`advertise`]: the published facts and the advertisers
//!   ([`advertise::mdns`], [`advertise::dnssd`], [`advertise::relay`],
//!   [`advertise::ssh`], [`advertise::tailnet`]).
//! - [`fleet`]: finding the fleet secret (derived password, signatures).
//! - [`identity`]: instance id, hostname, names, timestamps.
//! - [`logging`]: stderr or a log file when the TUI owns the terminal.
//! - [`secret_cmd`]: `opencode-agent secret init|import|path` (the fleet secret file).
//! - [`error`]: the agent's one error type.

mod advertise;
mod app;
mod cli;
mod error;
mod fleet;
mod health;
mod identity;
mod launch;
mod logging;
mod secret_cmd;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::error::AgentError;

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Some(cli::Command::Secret(cmd)) = &cli.command {
        return exit(secret_cmd::main(cmd));
    }
    let plan = match cli::resolve(cli, &cli::Env::from_process()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("opencode-agent: {e}");
            return exit(e.exit_code());
        }
    };
    let dest = logging::init(plan.is_tui());
    match run(plan) {
        Ok(code) => exit(code),
        Err(e) => {
            // Agent errors already say their cause; others get the chain.
            let (text, code) = match e.downcast_ref::<AgentError>() {
                Some(a) => (a.to_string(), a.exit_code()),
                None => (format!("{e:#}"), 1),
            };
            // With a log file, also leave the error there.
            if dest != logging::Destination::Stderr {
                tracing::error!("{text}");
            }
            eprintln!("opencode-agent: {text}");
            exit(code)
        }
    }
}

fn run(plan: cli::Plan) -> anyhow::Result<i32> {
    // One thread is plenty: the agent waits on a child, a few timers and
    // sockets; mdns-sd runs its own thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(app::main(plan));
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(result?)
}
