//! What Tailscale says about this machine and its peers.
//!
//! - [`LocalApi`]: tailscaled's LocalAPI over its unix socket
//!   (`GET /localapi/v0/status`), with `tailscale status --json` as the
//!   fallback when the socket cannot be used. `TAILSCALE_SOCKET` overrides the
//!   platform default socket (and is passed to the CLI as `--socket`).
//! - [`Status`] / [`PeerStatus`]: the parts of `ipnstate.Status` we use. Go's
//!   field names are not PascalCase-regular (`TailscaleIPs`, `DNSName`,
//!   `Self`, `ID`, `OS`), so they are renamed one by one; `null` lists read
//!   as empty.
//! - [`detect_self`]: this machine's tailnet addresses and MagicDNS name
//!   (LocalAPI first, an interface scan for 100.64.0.0/10 and
//!   fd7a:115c:a1e0::/48 as the fallback), for the agent's TXT record and
//!   responder.
//!
//! This module only reads. It must not change Tailscale's state, publish
//! anything or keep connections open between calls.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::dnssd::is_tailnet;
use crate::error::{Error, Result};

/// Environment variable naming tailscaled's socket.
pub const SOCKET_ENV: &str = "TAILSCALE_SOCKET";
/// Host name the LocalAPI insists on (it rejects any other Host header).
const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// Largest status document read (big tailnets list thousands of peers).
const MAX_STATUS_BYTES: usize = 32 * 1024 * 1024;
/// Default deadline of one status call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// tailscaled's default socket on this platform (`paths.DefaultTailscaledSocket`).
pub fn default_socket() -> PathBuf {
    if cfg!(target_os = "macos") {
        return PathBuf::from("/var/run/tailscaled.socket");
    }
    if Path::new("/var/run").is_dir() {
        PathBuf::from("/var/run/tailscale/tailscaled.sock")
    } else {
        PathBuf::from("/run/tailscale/tailscaled.sock")
    }
}

fn null_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Parses address strings, skipping any that do not parse; IPv4 first.
fn parse_addrs(raw: &[String]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for s in raw {
        if let Ok(ip) = s.trim().parse::<IpAddr>()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out.sort_by_key(|ip| ip.is_ipv6());
    out
}

/// A MagicDNS name without its trailing dot, if any.
fn clean_dns(name: &str) -> Option<String> {
    let n = name.trim().trim_end_matches('.');
    (!n.is_empty()).then(|| n.to_string())
}

/// `ipnstate.Status`, the parts we use.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Status {
    /// tailscaled's version.
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
    /// `Running` when connected; `NoState`, `NeedsLogin`, `NeedsMachineAuth`,
    /// `Stopped` or `Starting` otherwise.
    #[serde(default, deserialize_with = "null_default")]
    pub backend_state: String,
    /// This node's tailnet addresses.
    #[serde(default, rename = "TailscaleIPs", deserialize_with = "null_default")]
    pub tailscale_ips: Vec<String>,
    /// This node.
    #[serde(default, rename = "Self")]
    pub self_node: Option<PeerStatus>,
    /// The tailnet's MagicDNS suffix (`tail1234.ts.net`).
    #[serde(default, rename = "MagicDNSSuffix", deserialize_with = "null_default")]
    pub magic_dns_suffix: String,
    /// Peers by node key (absent or null without peers).
    #[serde(default, deserialize_with = "null_default")]
    pub peer: BTreeMap<String, PeerStatus>,
    /// Health warnings.
    #[serde(default, deserialize_with = "null_default")]
    pub health: Vec<String>,
}

/// `ipnstate.PeerStatus`, the parts we use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PeerStatus {
    /// Stable node id (`n…CNTRL`).
    #[serde(default, rename = "ID", deserialize_with = "null_default")]
    pub id: String,
    /// Node key (`nodekey:…`).
    #[serde(default, deserialize_with = "null_default")]
    pub public_key: String,
    /// The machine's own host name.
    #[serde(default, deserialize_with = "null_default")]
    pub host_name: String,
    /// MagicDNS name with a trailing dot (`laptop.tail1234.ts.net.`).
    #[serde(default, rename = "DNSName", deserialize_with = "null_default")]
    pub dns_name: String,
    /// Operating system.
    #[serde(default, rename = "OS", deserialize_with = "null_default")]
    pub os: String,
    /// The node's tailnet addresses, as strings.
    #[serde(default, rename = "TailscaleIPs", deserialize_with = "null_default")]
    pub tailscale_ips: Vec<String>,
    /// Whether the coordination server sees the node as connected.
    #[serde(default, deserialize_with = "null_default")]
    pub online: bool,
    /// Whether the node key expired.
    #[serde(default, deserialize_with = "null_default")]
    pub expired: bool,
    /// ACL tags.
    #[serde(default, deserialize_with = "null_default")]
    pub tags: Vec<String>,
}

impl PeerStatus {
    /// The node's tailnet addresses, IPv4 first.
    pub fn addrs(&self) -> Vec<IpAddr> {
        parse_addrs(&self.tailscale_ips)
    }

    /// MagicDNS name without the trailing dot.
    pub fn magic_dns(&self) -> Option<String> {
        clean_dns(&self.dns_name)
    }

    /// A stable key for the node: its id, else its node key.
    pub fn key(&self) -> String {
        if self.id.is_empty() {
            self.public_key.clone()
        } else {
            self.id.clone()
        }
    }

    /// A name for humans: the MagicDNS name, else the host name, else the
    /// first address.
    pub fn display_name(&self) -> String {
        self.magic_dns()
            .or_else(|| (!self.host_name.is_empty()).then(|| self.host_name.clone()))
            .or_else(|| self.addrs().first().map(|a| a.to_string()))
            .unwrap_or_else(|| self.key())
    }
}

impl Status {
    /// Parses a status document (LocalAPI answer or `tailscale status --json`).
    pub fn from_json(body: &[u8]) -> Result<Status> {
        serde_json::from_slice(body)
            .map_err(|e| Error::Tailscale(format!("cannot parse the status document: {e}")))
    }

    /// True when tailscaled is connected to the tailnet.
    pub fn is_running(&self) -> bool {
        self.backend_state == "Running"
    }

    /// This node's tailnet addresses (`Self.TailscaleIPs`, else the top-level
    /// `TailscaleIPs`), IPv4 first.
    pub fn self_addrs(&self) -> Vec<IpAddr> {
        let own = self
            .self_node
            .as_ref()
            .map(PeerStatus::addrs)
            .unwrap_or_default();
        if own.is_empty() {
            parse_addrs(&self.tailscale_ips)
        } else {
            own
        }
    }

    /// This node's MagicDNS name without the trailing dot.
    pub fn self_dns_name(&self) -> Option<String> {
        self.self_node.as_ref().and_then(PeerStatus::magic_dns)
    }

    /// Peers that are online, not expired and have an address.
    pub fn online_peers(&self) -> impl Iterator<Item = &PeerStatus> {
        self.peer
            .values()
            .filter(|p| p.online && !p.expired && !p.addrs().is_empty())
    }

    /// Why this status is not usable, in words for the user; `None` when running.
    pub fn not_running_reason(&self) -> Option<String> {
        if self.is_running() {
            return None;
        }
        let state = if self.backend_state.is_empty() {
            "unknown"
        } else {
            self.backend_state.as_str()
        };
        let hint = match state {
            "NeedsLogin" | "NeedsMachineAuth" => "log in with `tailscale up`",
            "Stopped" => "connect with `tailscale up`",
            "Starting" | "NoState" => "wait for it to connect",
            _ => "check `tailscale status`",
        };
        Some(format!(
            "tailscaled is not connected (state {state}); {hint}"
        ))
    }
}

/// A LocalAPI client: the socket first, the CLI as the fallback.
#[derive(Debug, Clone)]
pub struct LocalApi {
    /// tailscaled's socket.
    socket: PathBuf,
    /// Whether the socket was given (TAILSCALE_SOCKET) rather than defaulted.
    explicit: bool,
    /// Deadline of one call.
    timeout: Duration,
    /// The `tailscale` CLI used as the fallback (`None` disables it).
    cli: Option<PathBuf>,
}

impl LocalApi {
    /// A client for `socket`; `explicit` says the user named it (it is then
    /// passed to the CLI fallback too).
    pub fn new(socket: PathBuf, explicit: bool) -> Self {
        Self {
            socket,
            explicit,
            timeout: DEFAULT_TIMEOUT,
            cli: Some(PathBuf::from("tailscale")),
        }
    }

    /// The client the environment asks for: `TAILSCALE_SOCKET`, else the
    /// platform default.
    pub fn from_env() -> Self {
        match std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()) {
            Some(p) => Self::new(PathBuf::from(p), true),
            None => Self::new(default_socket(), false),
        }
    }

    /// Sets the deadline of one call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets (or, with `None`, disables) the CLI fallback.
    pub fn with_cli(mut self, cli: Option<PathBuf>) -> Self {
        self.cli = cli;
        self
    }

    /// The socket in use.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /localapi/v0/status` over the socket.
    pub async fn status_via_socket(&self) -> Result<Status> {
        let sock = self.socket.display().to_string();
        let client = reqwest::Client::builder()
            .unix_socket(self.socket.clone())
            .timeout(self.timeout)
            .build()
            .map_err(|e| Error::Tailscale(format!("cannot build the LocalAPI client: {e}")))?;
        let url = format!("http://{LOCALAPI_HOST}/localapi/v0/status");
        let resp = client.get(&url).send().await.map_err(|e| {
            let mut detail = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                detail = format!("{detail}: {s}");
                src = s.source();
            }
            Error::Tailscale(format!("cannot reach tailscaled at {sock}: {detail}"))
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            Error::Tailscale(format!("reading the LocalAPI answer from {sock}: {e}"))
        })?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string();
            return Err(Error::Tailscale(format!(
                "tailscaled at {sock} answered HTTP {}: {text}",
                status.as_u16()
            )));
        }
        if body.len() > MAX_STATUS_BYTES {
            return Err(Error::Tailscale(format!(
                "the status from {sock} exceeds {MAX_STATUS_BYTES} bytes"
            )));
        }
        Status::from_json(&body)
    }

    /// `tailscale [--socket=…] status --json`.
    pub async fn status_via_cli(&self) -> Result<Status> {
        let Some(cli) = &self.cli else {
            return Err(Error::Tailscale(
                "the tailscale CLI fallback is disabled".into(),
            ));
        };
        let mut cmd = tokio::process::Command::new(cli);
        if self.explicit {
            cmd.arg(format!("--socket={}", self.socket.display()));
        }
        cmd.args(["status", "--json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Tailscale("the `tailscale` CLI is not installed".into())
            } else {
                Error::Tailscale(format!("cannot run `tailscale status --json`: {e}"))
            }
        })?;
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                Error::Tailscale(format!(
                    "`tailscale status --json` did not finish within {} ms",
                    self.timeout.as_millis()
                ))
            })?
            .map_err(|e| Error::Tailscale(format!("`tailscale status --json` failed: {e}")))?;
        // `tailscale status --json` prints the status even when stopped, but
        // exits non-zero when it cannot reach tailscaled at all.
        if out.stdout.iter().any(|b| !b.is_ascii_whitespace())
            && let Ok(st) = Status::from_json(&out.stdout)
        {
            return Ok(st);
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        Err(Error::Tailscale(format!(
            "`tailscale status --json` failed ({}){}{}",
            out.status,
            if err.is_empty() { "" } else { ": " },
            err.chars().take(300).collect::<String>()
        )))
    }

    /// The status: the socket first, then the CLI. The error names both
    /// failures.
    pub async fn status(&self) -> Result<Status> {
        let socket_err = match self.status_via_socket().await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if self.cli.is_none() {
            return Err(socket_err);
        }
        match self.status_via_cli().await {
            Ok(s) => Ok(s),
            Err(cli_err) => Err(Error::Tailscale(format!(
                "{}; and {}",
                strip_prefix(&socket_err),
                strip_prefix(&cli_err)
            ))),
        }
    }

    /// [`Self::status`] from synchronous code (on a short-lived thread with
    /// its own runtime, so it works inside or outside a tokio runtime).
    pub fn status_blocking(&self) -> Result<Status> {
        let api = self.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Tailscale(format!("cannot start a runtime: {e}")))?;
                rt.block_on(api.status())
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Tailscale("the status probe panicked".into())))
        })
    }
}

/// An error's message without the `Tailscale: ` prefix (for joining two).
fn strip_prefix(e: &Error) -> String {
    match e {
        Error::Tailscale(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Where [`SelfInfo`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfSource {
    /// tailscaled's status.
    LocalApi,
    /// Interface addresses in Tailscale's ranges (no name known).
    InterfaceScan,
}

/// This machine on the tailnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfInfo {
    /// Tailnet addresses, IPv4 first (empty when not on a tailnet).
    pub addrs: Vec<IpAddr>,
    /// MagicDNS name without the trailing dot.
    pub magic_dns: Option<String>,
    /// Where this came from.
    pub source: SelfSource,
}

/// The tailnet addresses among `(interface, address)` pairs, once each, IPv4
/// first.
pub fn tailnet_addrs(ifas: &[(String, IpAddr)]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for (_, ip) in ifas {
        if is_tailnet(ip) && !out.contains(ip) {
            out.push(*ip);
        }
    }
    out.sort_by_key(|ip| ip.is_ipv6());
    out
}

/// Interface addresses in Tailscale's ranges (100.64.0.0/10 is CGNAT space
/// that others use too, hence only a fallback).
pub fn scan_interfaces() -> Vec<IpAddr> {
    match local_ip_address::list_afinet_netifas() {
        Ok(ifas) => tailnet_addrs(&ifas),
        Err(e) => {
            tracing::debug!(error = %e, "cannot list interface addresses");
            Vec::new()
        }
    }
}

/// This machine's tailnet addresses and MagicDNS name: from the LocalAPI when
/// tailscaled runs and reports addresses, else from an interface scan.
pub async fn detect_self(api: &LocalApi) -> SelfInfo {
    match api.status().await {
        Ok(st) if st.is_running() && !st.self_addrs().is_empty() => {
            return SelfInfo {
                addrs: st.self_addrs(),
                magic_dns: st.self_dns_name(),
                source: SelfSource::LocalApi,
            };
        }
        Ok(st) => {
            tracing::debug!(state = %st.backend_state, "tailscaled not running; scanning interfaces")
        }
        Err(e) => tracing::debug!(error = %e, "no LocalAPI; scanning interfaces"),
    }
    SelfInfo {
        addrs: scan_interfaces(),
        magic_dns: None,
        source: SelfSource::InterfaceScan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "Version": "1.103.0", "BackendState": "Running",
      "TailscaleIPs": ["100.101.102.103", "fd7a:115c:a1e0::1"],
      "Self": {"ID": "nSelf", "HostName": "devbox", "DNSName": "devbox.tail1234.ts.net.",
               "TailscaleIPs": ["fd7a:115c:a1e0::1", "100.101.102.103"], "Online": true, "Tags": null},
      "MagicDNSSuffix": "tail1234.ts.net",
      "Health": null,
      "Peer": {
        "nodekey:2": {"ID": "nPeer2", "PublicKey": "nodekey:2", "HostName": "laptop",
          "DNSName": "laptop.tail1234.ts.net.", "OS": "macOS", "TailscaleIPs": ["100.90.1.2", "fd7a:115c:a1e0::2"],
          "Online": true, "Addrs": null, "PeerAPIURL": null, "Unknown": {"x": 1}},
        "nodekey:3": {"ID": "nPeer3", "HostName": "old", "DNSName": "old.tail1234.ts.net.",
          "TailscaleIPs": ["100.90.1.3"], "Online": false},
        "nodekey:4": {"ID": "nPeer4", "HostName": "noaddr", "TailscaleIPs": null, "Online": true}
      }
    }"#;

    #[test]
    fn status_parses_go_field_names_and_nulls() {
        let st = Status::from_json(SAMPLE.as_bytes()).unwrap();
        assert!(st.is_running());
        assert_eq!(st.not_running_reason(), None);
        assert_eq!(
            st.self_addrs(),
            vec![
                "100.101.102.103".parse::<IpAddr>().unwrap(),
                "fd7a:115c:a1e0::1".parse().unwrap()
            ]
        );
        assert_eq!(
            st.self_dns_name().as_deref(),
            Some("devbox.tail1234.ts.net")
        );
        let online: Vec<&str> = st.online_peers().map(|p| p.host_name.as_str()).collect();
        assert_eq!(online, vec!["laptop"]);
        let laptop = st.online_peers().next().unwrap();
        assert_eq!(laptop.key(), "nPeer2");
        assert_eq!(laptop.display_name(), "laptop.tail1234.ts.net");
    }

    #[test]
    fn missing_or_null_peers_and_states() {
        let st =
            Status::from_json(br#"{"BackendState":"Stopped","Peer":null,"Self":null}"#).unwrap();
        assert!(!st.is_running());
        assert!(st.not_running_reason().unwrap().contains("tailscale up"));
        assert_eq!(st.online_peers().count(), 0);
        assert!(st.self_addrs().is_empty());
        let st = Status::from_json(br#"{"BackendState":"Running","TailscaleIPs":["100.64.0.5"]}"#)
            .unwrap();
        assert_eq!(
            st.self_addrs(),
            vec!["100.64.0.5".parse::<IpAddr>().unwrap()]
        );
        assert!(Status::from_json(b"<html>").is_err());
    }

    #[test]
    fn interface_scan_keeps_tailnet_addresses_once_v4_first() {
        let ifas: Vec<(String, IpAddr)> = [
            ("lo", "127.0.0.1"),
            ("tailscale0", "fd7a:115c:a1e0::1"),
            ("eth0", "10.0.0.2"),
            ("tailscale0", "100.101.102.103"),
            ("tailscale0", "100.101.102.103"),
        ]
        .iter()
        .map(|(i, a)| (i.to_string(), a.parse().unwrap()))
        .collect();
        assert_eq!(
            tailnet_addrs(&ifas),
            vec![
                "100.101.102.103".parse::<IpAddr>().unwrap(),
                "fd7a:115c:a1e0::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn missing_socket_and_cli_say_both_reasons() {
        let api = LocalApi::new(PathBuf::from("/nonexistent/tailscaled.sock"), true)
            .with_cli(Some(PathBuf::from("/nonexistent/tailscale")))
            .with_timeout(Duration::from_secs(2));
        let e = api.status_blocking().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/tailscaled.sock"), "{e}");
        assert!(e.contains("CLI is not installed"), "{e}");
    }
}
