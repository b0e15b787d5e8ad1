//! Unicast DNS-SD for the tailnet: the records an agent publishes about its
//! OpenCode instances, the responder that answers for them, the one-shot
//! client that asks a peer, and the per-host sharing that lets several agents
//! on one machine be answered through one socket.
//!
//! Why not mDNS: Tailscale carries no multicast, and mdns-sd ignores
//! point-to-point interfaces (every `tailscale0` is one), so it can neither
//! advertise on nor answer over a tailnet. Plain DNS messages sent unicast to
//! `<peer tailnet address>:5353` work everywhere a tailnet reaches. The names
//! and record shapes are those of DNS-SD (RFC 6763) under
//! [`SERVICE_TYPE`](crate::announce::txt::SERVICE_TYPE), and the TXT record is
//! [`Announcement`](crate::announce::txt::Announcement)'s, so the same
//! advertisement reads the same whichever transport carried it. See
//! `README-tailnet.md` next to this file for the design.
//!
//! - [`responder`]: the pure `answer()` function and the UDP server loop.
//! - [`query`]: browse one peer (one datagram, one answer, short timeout).
//! - [`host`]: publish a record through the per-user runtime directory and
//!   compete for the responder socket, with take-over when the holder exits.
//!
//! This module owns the DNS encoding of instance records. It must not talk to
//! OpenCode, to Tailscale or to the registry: callers hand it addresses and
//! records and get records back.

pub mod host;
pub mod query;
pub mod responder;

use std::net::IpAddr;
use std::str::FromStr;

use hickory_proto::rr::Name;
use serde::{Deserialize, Serialize};

use crate::announce::txt::{Announcement, SERVICE_TYPE};

/// Default UDP port of the unicast responder (the mDNS port, bound to the
/// tailnet address only, next to any mDNS stack on 0.0.0.0:5353).
pub const DEFAULT_PORT: u16 = 5353;
/// TTL put on every record. Clients do not cache (they re-query on an
/// interval), so this only matters to third-party tools; 10 s is what mDNS
/// legacy-unicast replies use.
pub const DEFAULT_TTL: u32 = 10;
/// The DNS-SD meta-query name (RFC 6763 §9).
pub const META_QUERY: &str = "_services._dns-sd._udp.local.";
/// Longest DNS label, in bytes.
pub const MAX_LABEL_BYTES: usize = 63;

/// One OpenCode instance as published over unicast DNS-SD: a PTR from the
/// service type to `<label>.<SERVICE_TYPE>`, an SRV to `host:port`, a TXT
/// record, and A/AAAA records for `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance label: the first label of the service instance name (at most
    /// 63 bytes, any UTF-8 but control characters).
    pub label: String,
    /// SRV target host name, fully qualified (e.g. `devbox-0a1b2c.local.`).
    pub host: String,
    /// OpenCode's TCP port.
    pub port: u16,
    /// TXT entries as `(key, value)` pairs, in order (from
    /// [`Announcement::to_txt`]).
    pub txt: Vec<(String, String)>,
    /// Addresses of `host` (the machine's tailnet addresses).
    pub addrs: Vec<IpAddr>,
}

impl InstanceRecord {
    /// A record for `announcement`, served under `label` with SRV target
    /// `host`, reachable at `addrs:port`. The label is cleaned with
    /// [`clean_label`] and `host` gets a trailing dot when it lacks one.
    pub fn new(
        label: &str,
        host: &str,
        port: u16,
        announcement: &Announcement,
        addrs: Vec<IpAddr>,
    ) -> Self {
        let mut host = host.trim().to_string();
        if !host.ends_with('.') {
            host.push('.');
        }
        Self {
            label: clean_label(label),
            host,
            port,
            txt: announcement.to_txt(),
            addrs,
        }
    }

    /// The service instance name, `<label>._opencode._tcp.local.`.
    pub fn fullname(&self) -> Option<Name> {
        instance_name(&self.label)
    }

    /// The SRV target as a DNS name.
    pub fn host_name(&self) -> Option<Name> {
        Name::from_str(&self.host).ok().map(|mut n| {
            n.set_fqdn(true);
            n
        })
    }

    /// The TXT entries as DNS character-strings (`key=value`).
    pub fn txt_strings(&self) -> Vec<String> {
        self.txt.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Whether the record can be encoded: a usable label and host name.
    pub fn is_valid(&self) -> bool {
        !self.label.is_empty()
            && self.label.len() <= MAX_LABEL_BYTES
            && self.fullname().is_some()
            && self.host_name().is_some()
    }
}

/// A label fit for a DNS-SD instance name: control characters become
/// spaces, surrounding spaces go, and the result is cut to 63 bytes at a
/// character boundary.
pub fn clean_label(label: &str) -> String {
    let clean: String = label
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let clean = clean.trim();
    let mut end = clean.len().min(MAX_LABEL_BYTES);
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    clean[..end].trim_end().to_string()
}

/// `_opencode._tcp.local.` as a DNS name.
pub fn service_name() -> Name {
    // A constant that parses; the fallback keeps this function total.
    Name::from_str(SERVICE_TYPE).unwrap_or_else(|_| Name::root())
}

/// `<label>._opencode._tcp.local.`, with the label taken as raw bytes (dots
/// and spaces inside it are part of the label, as DNS-SD allows).
pub fn instance_name(label: &str) -> Option<Name> {
    if label.is_empty() || label.len() > MAX_LABEL_BYTES {
        return None;
    }
    let service = service_name();
    let mut labels: Vec<Vec<u8>> = vec![label.as_bytes().to_vec()];
    labels.extend(service.iter().map(|l| l.to_vec()));
    let mut name = Name::from_labels(labels).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// The instance label of `<label>._opencode._tcp.local.` (case-insensitive
/// match of the service part), or `None` for any other name.
pub fn label_of(fullname: &Name) -> Option<String> {
    let service = service_name();
    if fullname.num_labels() != service.num_labels() + 1 {
        return None;
    }
    if fullname.base_name() != service {
        return None;
    }
    fullname
        .iter()
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
}

/// Splits DNS TXT character-strings into `(key, value)` pairs (RFC 6763
/// §6.3: the key ends at the first `=`; an entry without `=` is a boolean
/// attribute with an empty value; empty strings are skipped).
pub fn split_txt(strings: &[Vec<u8>]) -> Vec<(String, String)> {
    strings
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let s = String::from_utf8_lossy(s);
            match s.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (s.to_string(), String::new()),
            }
        })
        .collect()
}

/// True for Tailscale's address ranges: 100.64.0.0/10 (CGNAT, which Tailscale
/// uses but does not own) and fd7a:115c:a1e0::/48.
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

/// Sources the responder answers and addresses it binds: the tailnet ranges,
/// plus loopback (the machine itself, and tests).
pub fn is_servable(ip: &IpAddr) -> bool {
    is_tailnet(ip) || ip.is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_round_trip_with_odd_labels() {
        for label in ["box-proj-0a1b2c", "My Project.v2", "é ü"] {
            let n = instance_name(label).unwrap();
            assert_eq!(label_of(&n).as_deref(), Some(label), "{n}");
        }
        let n = Name::from_str("X._OPENCODE._TCP.LOCAL.").unwrap();
        assert_eq!(label_of(&n).map(|l| l.to_lowercase()).as_deref(), Some("x"));
        assert_eq!(label_of(&service_name()), None);
        assert_eq!(
            label_of(&Name::from_str("a._http._tcp.local.").unwrap()),
            None
        );
        assert!(instance_name("").is_none());
        assert!(instance_name(&"x".repeat(64)).is_none());
    }

    #[test]
    fn labels_are_cleaned_and_cut_at_a_char_boundary() {
        assert_eq!(clean_label(" a\tb\n "), "a b");
        let long = "é".repeat(40);
        let c = clean_label(&long);
        assert!(c.len() <= MAX_LABEL_BYTES && c.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn txt_strings_split_at_the_first_equals() {
        let got = split_txt(&[
            b"a=b=c".to_vec(),
            b"flag".to_vec(),
            Vec::new(),
            b"k=".to_vec(),
        ]);
        assert_eq!(
            got,
            vec![
                ("a".into(), "b=c".into()),
                ("flag".into(), String::new()),
                ("k".into(), String::new())
            ]
        );
    }

    #[test]
    fn tailnet_ranges() {
        for a in ["100.64.0.1", "100.127.255.254", "fd7a:115c:a1e0::1"] {
            assert!(is_tailnet(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "100.63.0.1",
            "100.128.0.1",
            "10.0.0.1",
            "fd7a:115c:a1e1::1",
            "::1",
        ] {
            assert!(!is_tailnet(&a.parse().unwrap()), "{a}");
        }
        assert!(is_servable(&"127.0.0.1".parse().unwrap()));
        assert!(!is_servable(&"10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn record_from_announcement_carries_the_txt_and_a_qualified_host() {
        let a = Announcement {
            id: "abc".into(),
            name: "n".into(),
            ..Default::default()
        };
        let r = InstanceRecord::new("n-abc", "box", 4096, &a, vec![]);
        assert_eq!(r.host, "box.");
        assert!(r.is_valid());
        assert_eq!(r.txt_strings()[0], "txtvers=1");
    }
}
