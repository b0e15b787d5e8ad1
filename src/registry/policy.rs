//! Who may be contacted: the address policy and the trust decision.
//!
//! The address policy allows loopback, the tailnet ranges (100.64.0.0/10,
//! fd7a:115c:a1e0::/48), every subnet directly attached to this machine's
//! interfaces (address + netmask, re-read every few seconds) and the
//! networks in ALLOW_ADDRESSES. The trust decision ([`admit`]) combines it
//! with the fleet secret: with a secret, only endpoints whose signature
//! verified ([`Trust::Signed`]) are admitted, and only at addresses that
//! signature names.
//!
//! This module owns those two decisions. It must not talk to the network,
//! and its reasons must never contain the secret, a derived password or a
//! signature (addresses and ids are public and are named).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::secret::FleetSecret;
use crate::transport::{Endpoint, SAME_SECRET_HINT, Trust};

/// How long the list of attached subnets is reused before it is re-read.
const INTERFACES_TTL: Duration = Duration::from_secs(5);

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network's address (host bits are ignored when matching).
    pub addr: IpAddr,
    /// Prefix length: 0-32 for IPv4, 0-128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a single host).
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (
                a.trim().parse::<IpAddr>().ok()?,
                Some(p.trim().parse::<u8>().ok()?),
            ),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr.to_canonical(), ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Networks that are always allowed: loopback and the tailnet ranges.
fn builtin() -> [Cidr; 4] {
    [
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
            prefix: 8,
        },
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            prefix: 128,
        },
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)),
            prefix: 10,
        },
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0)),
            prefix: 48,
        },
    ]
}

/// The subnets attached to this machine's interfaces, from their addresses
/// and netmasks. An error reading them leaves only the other rules.
pub fn attached_subnets() -> Vec<Cidr> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs
            .into_iter()
            .map(|i| match i.addr {
                if_addrs::IfAddr::V4(a) => Cidr {
                    addr: IpAddr::V4(a.ip),
                    prefix: a.prefixlen.min(32),
                },
                if_addrs::IfAddr::V6(a) => Cidr {
                    addr: IpAddr::V6(a.ip),
                    prefix: a.prefixlen.min(128),
                },
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list network interfaces; only loopback, the tailnet and ALLOW_ADDRESSES are allowed");
            Vec::new()
        }
    }
}

/// Which addresses the server may connect to.
#[derive(Debug, Clone)]
pub struct AddressPolicy {
    /// ALLOW_ADDRESSES.
    extra: Vec<Cidr>,
    /// Attached subnets, and when they were read (`None`: fixed, for tests).
    attached: Vec<Cidr>,
    /// When `attached` was read; `None` when it is fixed.
    read_at: Option<Instant>,
}

impl AddressPolicy {
    /// The policy for this machine: `extra` plus what is attached now.
    pub fn new(extra: Vec<Cidr>) -> Self {
        Self {
            extra,
            attached: attached_subnets(),
            read_at: Some(Instant::now()),
        }
    }

    /// A policy with a fixed list of attached subnets (never re-read).
    pub fn fixed(extra: Vec<Cidr>, attached: Vec<Cidr>) -> Self {
        Self {
            extra,
            attached,
            read_at: None,
        }
    }

    /// Re-reads the attached subnets when the last read is a few seconds old.
    pub fn refresh(&mut self) {
        if let Some(at) = self.read_at
            && at.elapsed() >= INTERFACES_TTL
        {
            self.attached = attached_subnets();
            self.read_at = Some(Instant::now());
        }
    }

    /// Whether `ip` may be contacted.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if ip.is_unspecified() || ip.is_multicast() {
            return false;
        }
        builtin()
            .iter()
            .chain(&self.attached)
            .chain(&self.extra)
            .any(|c| c.contains(ip))
    }
}

fn list(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The trust decision for one endpoint: `Ok` with the addresses that may be
/// contacted (a subset of the announced ones, in order), or `Err` with why it
/// must not be contacted at all, as a sentence with what to do.
///
/// With a secret: the signature must have verified, and only addresses it
/// names are kept (a signed announcement replayed for another address is
/// refused). Always: only addresses the [`AddressPolicy`] allows are kept.
pub fn admit(
    ep: &Endpoint,
    secret: Option<&FleetSecret>,
    policy: &AddressPolicy,
) -> Result<Vec<IpAddr>, String> {
    let mut addrs = ep.addrs.clone();
    if let Some(secret) = secret {
        match &ep.trust {
            Trust::Signed { .. } => {}
            Trust::Unsigned => {
                return Err(format!(
                    "its announcement is not signed, and this server only contacts instances signed with its fleet secret; {SAME_SECRET_HINT}"
                ));
            }
            Trust::Invalid(reason) => return Err(reason.clone()),
        }
        addrs.retain(|a| secret.verify_address(&ep.signed_addrs, *a));
        if addrs.is_empty() {
            return Err(format!(
                "it is announced at {}, which its signature does not cover (signed for {}): a replayed or forged announcement, or a machine whose addresses changed since its agent signed; restart that agent if it is yours",
                list(&ep.addrs),
                list(&ep.signed_addrs)
            ));
        }
    }
    let (allowed, refused): (Vec<IpAddr>, Vec<IpAddr>) =
        addrs.into_iter().partition(|a| policy.allows(*a));
    if !refused.is_empty() {
        tracing::warn!(
            instance = %ep.key,
            source = %ep.source,
            addresses = %list(&refused),
            "ignoring announced addresses outside loopback, the tailnet and the attached networks (add them to ALLOW_ADDRESSES to allow them)"
        );
    }
    if allowed.is_empty() {
        return Err(format!(
            "its address {} is outside loopback, the tailnet and this machine's attached networks, so it is never contacted; add it to ALLOW_ADDRESSES if it should be",
            list(&refused)
        ));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Reach, TransportKind};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        assert!(cidr("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("192.168.1.77/24").contains(ip("192.168.1.1")));
        assert!(!cidr("192.168.1.77/24").contains(ip("192.168.2.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("203.0.113.5").contains(ip("203.0.113.5")));
        assert!(!cidr("203.0.113.5").contains(ip("203.0.113.6")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:1::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("fe80::1")));
        // IPv4-mapped IPv6 is IPv4.
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
            "10.0.0.0/",
        ] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(cidr(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn policy_allows_loopback_tailnet_attached_and_extra_only() {
        let p = AddressPolicy::fixed(
            vec![cidr("203.0.113.0/24")],
            vec![cidr("192.168.1.10/24"), cidr("fe80::1234/64")],
        );
        for ok in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "100.64.0.1",
            "100.127.255.254",
            "fd7a:115c:a1e0::42",
            "192.168.1.200",
            "fe80::99",
            "203.0.113.9",
            "::ffff:127.0.0.1",
        ] {
            assert!(p.allows(ip(ok)), "{ok}");
        }
        for no in [
            "100.128.0.1",
            "192.168.2.1",
            "8.8.8.8",
            "169.254.169.254",
            "fd7a:115c:a1e1::1",
            "2001:db8::1",
            "0.0.0.0",
            "::",
            "224.0.0.251",
        ] {
            assert!(!p.allows(ip(no)), "{no}");
        }
    }

    #[test]
    fn this_machine_has_attached_subnets_including_loopback() {
        let subnets = attached_subnets();
        assert!(
            subnets.iter().any(|c| c.contains(ip("127.0.0.1"))),
            "{subnets:?}"
        );
    }

    fn endpoint(addrs: &[&str], trust: Trust, signed: &[&str]) -> Endpoint {
        Endpoint {
            key: "id-1".into(),
            name: "n".into(),
            hostname: None,
            cwd: None,
            addrs: addrs.iter().map(|a| ip(a)).collect(),
            port: 4096,
            via: TransportKind::Mdns,
            reach: Reach::Lan,
            source: "s".into(),
            connected_at: None,
            trust,
            signed_addrs: signed.iter().map(|a| ip(a)).collect(),
        }
    }

    #[test]
    fn trust_decision_without_a_secret_applies_only_the_address_policy() {
        let p = AddressPolicy::fixed(vec![], vec![cidr("10.0.0.1/24")]);
        let ep = endpoint(&["10.0.0.5", "8.8.8.8"], Trust::Unsigned, &[]);
        assert_eq!(admit(&ep, None, &p), Ok(vec![ip("10.0.0.5")]));
        let ep = endpoint(&["8.8.8.8"], Trust::Unsigned, &[]);
        let err = admit(&ep, None, &p).unwrap_err();
        assert!(
            err.contains("8.8.8.8") && err.contains("ALLOW_ADDRESSES"),
            "{err}"
        );
    }

    #[test]
    fn trust_decision_with_a_secret_needs_a_signature_and_a_signed_address() {
        let secret = FleetSecret::from_text(&"56".repeat(32)).unwrap();
        let p = AddressPolicy::fixed(vec![], vec![cidr("10.0.0.1/24")]);
        // Signed, at a signed address: admitted at that address only.
        let ep = endpoint(
            &["10.0.0.5", "10.0.0.6"],
            Trust::Signed { at: 1 },
            &["10.0.0.5"],
        );
        assert_eq!(admit(&ep, Some(&secret), &p), Ok(vec![ip("10.0.0.5")]));
        // Replayed elsewhere: refused, naming both address lists.
        let ep = endpoint(&["10.0.0.9"], Trust::Signed { at: 1 }, &["10.0.0.5"]);
        let err = admit(&ep, Some(&secret), &p).unwrap_err();
        assert!(
            err.contains("10.0.0.9") && err.contains("signed for 10.0.0.5"),
            "{err}"
        );
        // Unsigned: refused with what to do.
        let ep = endpoint(&["10.0.0.5"], Trust::Unsigned, &[]);
        let err = admit(&ep, Some(&secret), &p).unwrap_err();
        assert!(
            err.contains("not signed") && err.contains("OPENCODE_MCP_SECRET"),
            "{err}"
        );
        // Invalid: the transport's reason.
        let ep = endpoint(
            &["10.0.0.5"],
            Trust::Invalid("bad sig".into()),
            &["10.0.0.5"],
        );
        assert_eq!(admit(&ep, Some(&secret), &p), Err("bad sig".into()));
        // Signed for an address outside the policy: still refused.
        let ep = endpoint(&["8.8.8.8"], Trust::Signed { at: 1 }, &["8.8.8.8"]);
        assert!(
            admit(&ep, Some(&secret), &p)
                .unwrap_err()
                .contains("ALLOW_ADDRESSES")
        );
    }
}
