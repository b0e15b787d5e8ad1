//! Tailnet facts for the TXT record: the machine's Tailscale addresses and
//! MagicDNS name, from tailscaled's LocalAPI (`Self.TailscaleIPs`,
//! `Self.DNSName`; `TAILSCALE_SOCKET` overrides the socket, the `tailscale`
//! CLI is the fallback) or, when tailscaled cannot be asked, an interface
//! scan for 100.64.0.0/10 and fd7a:115c:a1e0::/48 (no name then).
//!
//! The lookups live in the library ([`opencode_mcp::tailscale::detect_self`]);
//! this module only shapes the answer for the agent. It must not publish
//! anything (see [`super::dnssd`]).

use std::net::IpAddr;
use std::time::Duration;

use opencode_mcp::tailscale::{LocalApi, SelfSource, detect_self};

pub use opencode_mcp::dnssd::is_tailnet;

/// Deadline of one LocalAPI call (and of the CLI fallback): the agent asks
/// once at start, and a missing tailscaled must not delay OpenCode long.
const LOCALAPI_TIMEOUT: Duration = Duration::from_secs(2);

/// What the agent knows about the tailnet this machine is on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tailnet {
    /// The machine's tailnet addresses, IPv4 first (empty when not on a tailnet).
    pub addrs: Vec<IpAddr>,
    /// The machine's MagicDNS name, without the trailing dot.
    pub magic_dns: Option<String>,
}

impl Tailnet {
    /// The first tailnet IPv4 address, which `--bind tailnet` listens on.
    pub fn ipv4(&self) -> Option<IpAddr> {
        self.addrs.iter().find(|a| a.is_ipv4()).copied()
    }

    /// Only the part reachable at `ip` (OpenCode listens there alone): that
    /// address and the name, or nothing when `ip` is not one of ours.
    pub fn only(&self, ip: IpAddr) -> Tailnet {
        if self.addrs.contains(&ip) {
            Tailnet {
                addrs: vec![ip],
                magic_dns: self.magic_dns.clone(),
            }
        } else {
            Tailnet::default()
        }
    }
}

/// Looks the tailnet facts up: LocalAPI first, interface scan as the
/// fallback. Never fails: no tailnet is an empty answer.
pub async fn detect() -> Tailnet {
    let api = LocalApi::from_env().with_timeout(LOCALAPI_TIMEOUT);
    let me = detect_self(&api).await;
    match me.source {
        SelfSource::LocalApi => {
            tracing::debug!(addrs = ?me.addrs, name = ?me.magic_dns, "tailnet facts from tailscaled")
        }
        SelfSource::InterfaceScan => {
            tracing::debug!(addrs = ?me.addrs, "tailnet addresses from an interface scan")
        }
    }
    Tailnet {
        addrs: me.addrs,
        magic_dns: me.magic_dns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_only() {
        let t = Tailnet {
            addrs: vec![
                "100.101.102.103".parse().unwrap(),
                "fd7a:115c:a1e0::1".parse().unwrap(),
            ],
            magic_dns: Some("box.tail1234.ts.net".into()),
        };
        let v4: IpAddr = "100.101.102.103".parse().unwrap();
        assert_eq!(t.ipv4(), Some(v4));
        assert_eq!(t.only(v4).addrs, vec![v4]);
        assert_eq!(t.only(v4).magic_dns, t.magic_dns);
        assert_eq!(t.only("10.0.0.1".parse().unwrap()), Tailnet::default());
        assert_eq!(Tailnet::default().ipv4(), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn detection_without_tailscaled_falls_back_quietly() {
        // No socket at this path and no CLI: whatever the scan finds, it is
        // all tailnet addresses and no name.
        let api = LocalApi::new("/nonexistent/tailscaled.sock".into(), true).with_cli(None);
        let me = detect_self(&api).await;
        assert_eq!(me.source, SelfSource::InterfaceScan);
        assert!(me.magic_dns.is_none());
        assert!(me.addrs.iter().all(is_tailnet));
    }
}
