//! Where the agent's log goes. With the TUI in front, the terminal belongs
//! to OpenCode, so the log goes to `$XDG_STATE_HOME/opencode-agent/agent.log`
//! (default `~/.local/state/opencode-agent/agent.log`, mode 0600, rotated to
//! `agent.log.1` past 1 MiB); otherwise to stderr. `OPENCODE_AGENT_LOG`
//! overrides (`stderr`, or a file path); `RUST_LOG` sets the filter (default
//! `info,mdns_sd=warn`).
//!
//! This module must not log secrets; nothing in the agent formats them.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Default log filter.
pub const DEFAULT_FILTER: &str = "info,mdns_sd=warn";
/// Size past which the log file is rotated at start.
const ROTATE_BYTES: u64 = 1 << 20;

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard error.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

/// Decides the destination from the mode and the environment (pure).
pub fn destination(
    tui: bool,
    override_: Option<&str>,
    xdg_state_home: Option<&Path>,
    home: Option<&Path>,
) -> Destination {
    match override_.map(str::trim) {
        Some("stderr") | Some("-") => return Destination::Stderr,
        Some(p) if !p.is_empty() => return Destination::File(PathBuf::from(p)),
        _ => {}
    }
    if !tui {
        return Destination::Stderr;
    }
    let state = match (xdg_state_home, home) {
        (Some(x), _) if x.is_absolute() => x.to_path_buf(),
        (_, Some(h)) => h.join(".local/state"),
        _ => std::env::temp_dir(),
    };
    Destination::File(state.join("opencode-agent").join("agent.log"))
}

fn open_log(path: &Path) -> io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, PathBuf::from(old));
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// The log filter from `RUST_LOG` (`level` and `target=level` directives,
/// comma-separated; `tracing_subscriber`'s `Targets` syntax, which needs no
/// regex engine), or [`DEFAULT_FILTER`] when unset or unreadable.
pub fn filter(rust_log: Option<&str>) -> Targets {
    rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| DEFAULT_FILTER.parse().unwrap_or_default())
}

/// Installs the global subscriber. Returns where the log goes; if the log
/// file cannot be opened, says so on stderr and logs only errors to stderr.
pub fn init(tui: bool) -> Destination {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let over = std::env::var("OPENCODE_AGENT_LOG").ok();
    let dest = destination(
        tui,
        over.as_deref(),
        var("XDG_STATE_HOME").as_deref(),
        var("HOME").as_deref(),
    );
    let install = |writer: BoxMakeWriter, filter: Targets| {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_target(false)
            .with_writer(writer);
        let _ = tracing_subscriber::registry()
            .with(layer)
            .with(filter)
            .try_init();
    };
    let rust_log = std::env::var("RUST_LOG").ok();
    match &dest {
        Destination::Stderr => install(BoxMakeWriter::new(io::stderr), filter(rust_log.as_deref())),
        Destination::File(path) => match open_log(path) {
            Ok(file) => install(
                BoxMakeWriter::new(Arc::new(file)),
                filter(rust_log.as_deref()),
            ),
            Err(e) => {
                eprintln!(
                    "opencode-agent: cannot open the log file {} ({e}); logging errors to stderr only (set OPENCODE_AGENT_LOG to another path)",
                    path.display()
                );
                install(
                    BoxMakeWriter::new(io::stderr),
                    Targets::new().with_default(tracing::Level::ERROR),
                );
                return Destination::Stderr;
            }
        },
    }
    dest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tui_logs_to_a_state_file_others_to_stderr() {
        let home = Path::new("/home/u");
        assert_eq!(
            destination(false, None, None, Some(home)),
            Destination::Stderr
        );
        assert_eq!(
            destination(true, None, None, Some(home)),
            Destination::File("/home/u/.local/state/opencode-agent/agent.log".into())
        );
        assert_eq!(
            destination(true, None, Some(Path::new("/xdg")), Some(home)),
            Destination::File("/xdg/opencode-agent/agent.log".into())
        );
        // A relative XDG_STATE_HOME is invalid per the spec and ignored.
        assert_eq!(
            destination(true, None, Some(Path::new("rel")), Some(home)),
            Destination::File("/home/u/.local/state/opencode-agent/agent.log".into())
        );
        assert_eq!(
            destination(true, Some("stderr"), None, Some(home)),
            Destination::Stderr
        );
        assert_eq!(
            destination(false, Some("/tmp/a.log"), None, None),
            Destination::File("/tmp/a.log".into())
        );
    }

    #[test]
    fn filters_read_rust_log_or_default() {
        use tracing::Level;
        use tracing_subscriber::filter::LevelFilter;
        let f = filter(None);
        assert!(f.would_enable("opencode_agent", &Level::INFO));
        assert!(!f.would_enable("mdns_sd", &Level::INFO));
        assert!(f.would_enable("mdns_sd", &Level::WARN));
        let f = filter(Some("debug"));
        assert!(f.would_enable("mdns_sd", &Level::DEBUG));
        // Unparsable directives fall back to the default instead of failing.
        let f = filter(Some("[weird]=x"));
        assert_eq!(f.default_level(), Some(LevelFilter::INFO));
    }

    #[test]
    fn log_files_are_private_and_rotated() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d/agent.log");
        drop(open_log(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, vec![b'x'; (ROTATE_BYTES + 1) as usize]).unwrap();
        drop(open_log(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert!(tmp.path().join("d/agent.log.1").exists());
    }
}
