//! Tailnet facts for the TXT record: the machine's Tailscale addresses and
//! MagicDNS name.
//!
//! Today the addresses come from an interface scan (100.64.0.0/10 and
//! fd7a:115c:a1e0::/48) and the MagicDNS name is unknown. SEAM for the
//! tailscale issue: [`detect`] is the one place to ask tailscaled's LocalAPI
//! (`GET /localapi/v0/status`: `Self.TailscaleIPs`, `Self.DNSName`) first and
//! keep the scan as the fallback. This module must not publish anything.

use std::net::IpAddr;

/// What the agent knows about the tailnet this machine is on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tailnet {
    /// The machine's tailnet addresses (empty when not on a tailnet).
    pub addrs: Vec<IpAddr>,
    /// The machine's MagicDNS name, without the trailing dot.
    pub magic_dns: Option<String>,
}

/// True for addresses in Tailscale's ranges: 100.64.0.0/10 (CGNAT, which
/// Tailscale uses but does not own) and fd7a:115c:a1e0::/48.
pub fn is_tailnet(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            o[0] == 100 && (o[1] & 0xC0) == 64
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
        }
    }
}

/// The tailnet addresses among `(interface, address)` pairs, without
/// duplicates, IPv4 first.
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

/// Looks the tailnet facts up (interface scan; see the module docs for the
/// LocalAPI seam). Never fails: no tailnet is an empty answer.
pub fn detect() -> Tailnet {
    match local_ip_address::list_afinet_netifas() {
        Ok(ifas) => Tailnet {
            addrs: tailnet_addrs(&ifas),
            magic_dns: None,
        },
        Err(e) => {
            tracing::debug!(error = %e, "cannot list interface addresses; no tailnet addresses advertised");
            Tailnet::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tailnet_ranges() {
        let yes = [
            "100.64.0.1",
            "100.127.255.254",
            "100.101.102.103",
            "fd7a:115c:a1e0::1",
        ];
        let no = [
            "100.63.0.1",
            "100.128.0.1",
            "10.0.0.1",
            "127.0.0.1",
            "fd7a:115c:a1e1::1",
            "::1",
        ];
        for a in yes {
            assert!(is_tailnet(&a.parse().unwrap()), "{a}");
        }
        for a in no {
            assert!(!is_tailnet(&a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn scan_keeps_tailnet_addresses_once_v4_first() {
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
        let got = tailnet_addrs(&ifas);
        assert_eq!(
            got,
            vec![
                "100.101.102.103".parse::<IpAddr>().unwrap(),
                "fd7a:115c:a1e0::1".parse().unwrap()
            ]
        );
    }
}
