//! `opencode-mcp`: parse the configuration, then run the MCP server on stdio
//! or a human subcommand. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use opencode_mcp::config::{Cli, Command, Config};
use opencode_mcp::registry::{Registry, Stream};
use opencode_mcp::{Error, mcp, transport};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr: stdout is the MCP channel.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("opencode_mcp=info")),
        )
        .init();
    let config = match Config::from_settings(&cli.settings) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("opencode-mcp: {e}");
            // Exit 2 like any usage error: the configuration cannot work.
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("opencode-mcp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opencode-mcp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Option<Command>, config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let registry = Registry::start(&config, transport::build(&config)?)?;
    match command {
        None | Some(Command::Serve) => {
            tokio::select! {
                r = mcp::serve_stdio(registry.clone(), config) => r?,
                _ = shutdown_signal() => tracing::info!("signal received; exiting"),
            }
        }
        Some(Command::Instances { json, settle_ms }) => {
            let view = registry
                .wait_for(Duration::from_millis(settle_ms), |v| {
                    v.settled
                        && v.instances
                            .iter()
                            .all(|i| !i.is_online() || i.stream == Stream::Live)
                })
                .await;
            let out = mcp::instances_output(&view, &mcp::Selection::all());
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).map_err(|e| Error::Config(e.to_string()))?
                );
            } else {
                println!("{}", mcp::instances_text(&out));
            }
        }
    }
    registry.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
