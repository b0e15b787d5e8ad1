//! The fleet secret as the agent uses it: found once at start
//! (`OPENCODE_MCP_SECRET`, else `OPENCODE_MCP_SECRET_FILE`, else the default
//! secret file), then used to derive OpenCode's password and to sign what is
//! announced (see [`crate::advertise::Advert`]).
//!
//! This module only finds the secret and tells the time of a signature. It
//! must never format the secret, a derived password or a signature.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use opencode_mcp::secret::{FleetSecret, SECRET_ENV};

/// Environment variable naming the secret file instead of the default.
pub const SECRET_FILE_ENV: &str = "OPENCODE_MCP_SECRET_FILE";

/// The fleet secret of this process's environment: `Ok(None)` when there is
/// none; an error (a sentence saying what to do) when there is one that
/// cannot be used.
pub fn load() -> Result<Option<FleetSecret>, String> {
    let value = std::env::var(SECRET_ENV).ok();
    let has_value = value.as_deref().is_some_and(|v| !v.trim().is_empty());
    let file = match std::env::var_os(SECRET_FILE_ENV).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match FleetSecret::default_path() {
            Ok(p) => p,
            // Neither HOME nor XDG_CONFIG_HOME: no file to read.
            Err(_) if !has_value => return Ok(None),
            Err(_) => PathBuf::new(),
        },
    };
    FleetSecret::load(value.as_deref(), &file).map_err(|e| e.to_string())
}

/// Now, in seconds since the Unix epoch (the `at` of a signature).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
