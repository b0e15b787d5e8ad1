//! Health checks of the OpenCode the agent advertises, through the library's
//! [`OpenCodeClient::health`] (`GET /global/health`, JSON `healthy: true`,
//! Basic auth when a password is set).
//!
//! This module only asks and reports; it must not decide what a failure means
//! (`app` does: exit before advertising, or withdraw after a few failures).

use std::net::IpAddr;
use std::time::Duration;

use opencode_mcp::config::Credentials;
use opencode_mcp::opencode::{ClientLimits, Health, OpenCodeClient, client::http_client};

use crate::error::{AgentError, Result};

/// Deadline of one health request.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pause between checks while waiting for OpenCode to come up.
pub const GATE_INTERVAL: Duration = Duration::from_millis(100);
/// Pause between checks of an attached server.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Consecutive failures after which an attached server counts as gone.
pub const WATCH_FAILURES: u32 = 3;
/// How long `attach` waits for the server to become healthy.
pub const ATTACH_GATE: Duration = Duration::from_secs(30);

/// The host to connect to for a listen address: a wildcard listener
/// (0.0.0.0, ::) is reached through loopback.
pub fn connect_host(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v)) if v.is_unspecified() => "127.0.0.1".to_string(),
        Ok(IpAddr::V6(v)) if v.is_unspecified() => "::1".to_string(),
        _ => host.to_string(),
    }
}

/// `http://host:port`, with brackets around an IPv6 address.
pub fn base_url(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains(':') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

/// Checks one OpenCode server.
#[derive(Clone, Debug)]
pub struct HealthCheck {
    /// Client with the configured credentials.
    client: OpenCodeClient,
    /// Client without credentials, to learn whether the server requires them.
    anonymous: OpenCodeClient,
}

impl HealthCheck {
    /// A checker for the server listening at `host:port`.
    pub fn new(host: &str, port: u16, credentials: Option<Credentials>) -> Result<Self> {
        let limits = ClientLimits {
            timeout: PROBE_TIMEOUT,
            max_body_bytes: 64 * 1024,
            max_event_bytes: 64 * 1024,
        };
        let http = http_client(PROBE_TIMEOUT).map_err(|e| AgentError::Internal(e.to_string()))?;
        let base = base_url(&connect_host(host), port);
        Ok(HealthCheck {
            client: OpenCodeClient::new(http.clone(), base.clone(), credentials, limits),
            anonymous: OpenCodeClient::new(http, base, None, limits),
        })
    }

    /// The base URL checked.
    pub fn url(&self) -> &str {
        self.client.base_url()
    }

    /// One health check.
    pub async fn check(&self) -> opencode_mcp::Result<Health> {
        self.client.health(PROBE_TIMEOUT).await
    }

    /// Whether the server refuses requests without credentials (`None` when
    /// the answer says neither, e.g. the server is gone).
    pub async fn requires_auth(&self) -> Option<bool> {
        match self.anonymous.health(PROBE_TIMEOUT).await {
            Ok(_) => Some(false),
            Err(opencode_mcp::Error::Unauthorized { .. }) => Some(true),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_wildcards() {
        assert_eq!(connect_host("0.0.0.0"), "127.0.0.1");
        assert_eq!(connect_host("::"), "::1");
        assert_eq!(connect_host("10.0.0.5"), "10.0.0.5");
        assert_eq!(base_url("127.0.0.1", 4096), "http://127.0.0.1:4096");
        assert_eq!(base_url("::1", 4096), "http://[::1]:4096");
        assert_eq!(base_url("[fe80::1]", 1), "http://[fe80::1]:1");
        assert_eq!(base_url("box.local", 2), "http://box.local:2");
    }
}
