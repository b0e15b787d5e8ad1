//! Advertisers: what is published about one healthy OpenCode ([`Advert`]),
//! and the set of advertisers that publish it ([`Advertisers`]): mDNS
//! ([`mdns`]), unicast DNS-SD on the tailnet ([`dnssd`]), a local relay
//! registration ([`relay`]), a registration on a relay machine through an SSH
//! reverse tunnel ([`ssh`]).
//!
//! With a fleet secret, everything announced is signed: the TXT record over
//! the id, OpenCode's port and the addresses it is announced at
//! ([`txt_addrs`]); each registration over its `port` and `127.0.0.1` (where
//! its reader connects). A signature is made each time a record is built,
//! so every heartbeat rewrite re-signs.
//!
//! The wire formats come from the library (`opencode_mcp::announce`); this
//! module only fills them in. It must not health-check OpenCode or decide
//! when to stop; it starts when told and stops, withdrawing everything, when
//! told.

pub mod dnssd;
pub mod mdns;
pub mod relay;
pub mod ssh;
pub mod tailnet;

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use opencode_mcp::announce::txt::Announcement;
use opencode_mcp::announce::{Registration, registration_file_name};
use opencode_mcp::secret::FleetSecret;
use tokio::task::JoinHandle;

use crate::cli::Plan;
use crate::fleet;
use tailnet::Tailnet;

/// How often, by default, relay registrations are rewritten and records
/// re-signed (`--heartbeat-s`).
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// Where the advertised OpenCode is reachable, which decides the mDNS
/// interfaces and addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// 127.0.0.1 only: advertised on the loopback interface.
    Loopback,
    /// Every address: advertised on LAN interfaces with their addresses.
    Lan,
    /// One address: advertised on its interface with that address.
    Addr(IpAddr),
}

impl Scope {
    /// Whether mDNS can reach anyone: not when OpenCode listens on a tailnet
    /// address only (no multicast crosses a tailnet).
    pub fn mdns_reaches(&self) -> bool {
        !matches!(self, Scope::Addr(ip) if tailnet::is_tailnet(ip))
    }

    /// The part of `tailnet` where OpenCode listens in this scope: all of it
    /// for a wildcard listener, the one address for a tailnet address,
    /// nothing otherwise.
    pub fn tailnet_part(&self, tailnet: &Tailnet) -> Tailnet {
        match self {
            Scope::Lan => tailnet.clone(),
            Scope::Addr(ip) => tailnet.only(*ip),
            Scope::Loopback => Tailnet::default(),
        }
    }

    /// The scope of an `attach --host HOST`: loopback addresses and names
    /// that resolve to them are loopback, wildcards are LAN, anything else is
    /// that one address.
    pub fn of_host(host: &str) -> Self {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => (host, 0)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| a.ip()),
        };
        match ip {
            Some(ip) if ip.is_unspecified() => Scope::Lan,
            Some(ip) if !ip.is_loopback() => Scope::Addr(ip),
            _ => Scope::Loopback,
        }
    }
}

/// Everything published about one instance.
#[derive(Debug, Clone)]
pub struct Advert {
    /// Stable unique instance id.
    pub id: String,
    /// Instance name.
    pub name: String,
    /// Machine hostname.
    pub hostname: String,
    /// OpenCode's working directory.
    pub cwd: PathBuf,
    /// OpenCode's HTTP port.
    pub port: u16,
    /// OpenCode's pid, when the agent started it.
    pub pid: Option<u32>,
    /// Whether OpenCode requires a password.
    pub auth: bool,
    /// OpenCode's version, from its health answer.
    pub version: Option<String>,
    /// Where it is reachable.
    pub scope: Scope,
    /// Tailnet addresses and name (empty unless reachable there).
    pub tailnet: Tailnet,
    /// When the agent first advertised it (ISO 8601 UTC).
    pub connected_at: String,
    /// The fleet secret that signs what is announced (`None`: unsigned).
    pub secret: Option<FleetSecret>,
    /// How often it is refreshed: relay files rewritten, the tunnel probed,
    /// signed records re-signed (so they stay younger than a server's
    /// ANNOUNCE_MAX_AGE_S).
    pub heartbeat: Duration,
}

/// The addresses a TXT record is signed for: those its A/AAAA records give
/// (127.0.0.1 for loopback, the LAN interface addresses of `ifas` that mDNS
/// uses for a wildcard listener, the one address otherwise), then the
/// tailnet addresses; each once, IPv4 before the tailnet before IPv6 (the
/// record keeps only what fits in one 255-byte entry, from the front).
pub fn txt_addrs(scope: Scope, ifas: &[(String, IpAddr)], tailnet: &[IpAddr]) -> Vec<IpAddr> {
    let advertised: Vec<IpAddr> = match scope {
        Scope::Loopback => vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        Scope::Addr(ip) => vec![ip],
        Scope::Lan => ifas
            .iter()
            .filter(|(name, ip)| !mdns::lan_excluded(name, *ip, ip.is_loopback()))
            .map(|(_, ip)| *ip)
            .collect(),
    };
    let v4 = advertised.iter().filter(|a| a.is_ipv4());
    let v6 = advertised.iter().filter(|a| a.is_ipv6());
    let mut out: Vec<IpAddr> = Vec::new();
    for a in v4.chain(tailnet).chain(v6) {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

/// The interface addresses, for [`txt_addrs`] (empty when they cannot be listed).
fn interface_addrs() -> Vec<(String, IpAddr)> {
    local_ip_address::list_afinet_netifas().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "cannot list interface addresses; signing without LAN addresses");
        Vec::new()
    })
}

impl Advert {
    /// The TXT record contents, signed now when there is a secret.
    pub fn announcement(&self) -> Announcement {
        let ifas = match self.scope {
            Scope::Lan if self.secret.is_some() => interface_addrs(),
            _ => Vec::new(),
        };
        self.announcement_at(&ifas, fleet::unix_now())
    }

    /// [`announcement`](Self::announcement) with the interface addresses
    /// and the signing time given.
    pub fn announcement_at(&self, ifas: &[(String, IpAddr)], at: u64) -> Announcement {
        let mut a = Announcement {
            id: self.id.clone(),
            name: self.name.clone(),
            hostname: Some(self.hostname.clone()),
            cwd: Some(self.cwd.to_string_lossy().into_owned()),
            version: self.version.clone(),
            pid: self.pid,
            auth: self.auth,
            tailnet_addrs: self.tailnet.addrs.clone(),
            magic_dns: self.tailnet.magic_dns.clone(),
            signed_addrs: Vec::new(),
            signature: None,
        };
        if let Some(secret) = &self.secret {
            let addrs = txt_addrs(self.scope, ifas, &self.tailnet.addrs);
            a.sign_with(secret, self.port, &addrs, at);
        }
        a
    }

    /// The relay registration, with `port` being where OpenCode answers on
    /// the machine that reads the file (the tunnel's end for `--relay-ssh`),
    /// signed now when there is a secret.
    pub fn registration(&self, port: u16) -> Registration {
        self.registration_at(port, fleet::unix_now())
    }

    /// [`registration`](Self::registration) signed at `at`.
    pub fn registration_at(&self, port: u16, at: u64) -> Registration {
        let mut r = Registration {
            name: self.name.clone(),
            hostname: Some(self.hostname.clone()),
            port,
            local_port: Some(self.port),
            cwd: Some(self.cwd.to_string_lossy().into_owned()),
            connected_at: Some(self.connected_at.clone()),
            id: Some(self.id.clone()),
            pid: self.pid,
            at: None,
            sig: None,
            addrs: Vec::new(),
        };
        if let Some(secret) = &self.secret {
            r.sign_with(secret, at);
        }
        r
    }

    /// The registration file name, `<name>-<id>.json`.
    pub fn file_name(&self) -> String {
        registration_file_name(&self.name, &self.id)
    }
}

/// The advertisers that started.
#[derive(Default)]
pub struct Advertisers {
    /// mDNS, unless --no-mdns.
    mdns: Option<mdns::MdnsAdvertiser>,
    /// Unicast DNS-SD on the tailnet, while OpenCode listens there; its
    /// task re-signs the record every heartbeat and withdraws it when
    /// aborted.
    dnssd: Option<JoinHandle<()>>,
    /// Local registration, with --relay-dir.
    relay_dir: Option<relay::RelayDir>,
    /// Relay over SSH, with --relay-ssh.
    ssh: Option<ssh::SshRelay>,
}

impl Advertisers {
    /// Starts every advertiser the plan asks for. One that cannot start is
    /// skipped and its error returned in the list; the others still run.
    pub fn start(plan: &Plan, advert: &Advert) -> (Self, Vec<crate::error::AgentError>) {
        let mut errors = Vec::new();
        let mut out = Advertisers::default();
        if !advert.tailnet.addrs.is_empty() {
            match dnssd::TailnetDnssd::start(advert, plan.dnssd_port) {
                Ok(d) => out.dnssd = Some(dnssd_heartbeat(d, advert.clone())),
                Err(e) => errors.push(e),
            }
        }
        if plan.mdns && !advert.scope.mdns_reaches() {
            tracing::info!(
                "OpenCode listens on a tailnet address only, where no multicast goes: not advertised by mDNS"
            );
        } else if plan.mdns {
            match mdns::MdnsAdvertiser::start(advert) {
                Ok(m) => out.mdns = Some(m),
                Err(e) => errors.push(e),
            }
        }
        if let Some(dir) = &plan.relay_dir {
            match relay::RelayDir::start(dir, advert) {
                Ok(r) => out.relay_dir = Some(r),
                Err(e) => errors.push(e),
            }
        }
        if let Some(ssh) = &plan.relay_ssh {
            out.ssh = Some(ssh::SshRelay::start(ssh.clone(), advert));
        }
        (out, errors)
    }

    /// True when nothing is being advertised.
    pub fn is_empty(&self) -> bool {
        self.mdns.is_none()
            && self.dnssd.is_none()
            && self.relay_dir.is_none()
            && self.ssh.is_none()
    }

    /// Withdraws everything, concurrently: mDNS goodbyes, local file
    /// removal, relay file removal and tunnel shutdown.
    pub async fn stop(self) {
        let mdns = async {
            if let Some(m) = self.mdns {
                m.stop().await;
            }
        };
        let tailnet = async {
            if let Some(d) = self.dnssd {
                d.abort();
                let _ = d.await;
            }
        };
        let dir = async {
            if let Some(r) = self.relay_dir {
                r.stop().await;
            }
        };
        let ssh = async {
            if let Some(s) = self.ssh {
                s.stop().await;
            }
        };
        tokio::join!(mdns, tailnet, dir, ssh);
    }
}

/// Keeps the tailnet record, re-signed every heartbeat when there is a
/// secret; aborting the task withdraws it.
fn dnssd_heartbeat(d: dnssd::TailnetDnssd, advert: Advert) -> JoinHandle<()> {
    /// Withdraws the record when the task ends, also by abort.
    struct Withdraw(Option<dnssd::TailnetDnssd>);
    impl Drop for Withdraw {
        fn drop(&mut self) {
            if let Some(d) = self.0.take() {
                d.stop();
            }
        }
    }
    tokio::spawn(async move {
        let mut held = Withdraw(Some(d));
        let every = advert.heartbeat;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            if advert.secret.is_some()
                && let Some(d) = held.0.as_mut()
            {
                d.refresh(&advert);
                tracing::debug!("tailnet DNS-SD record re-signed");
            }
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_advert() -> Advert {
        Advert {
            id: "0123456789abcdef".into(),
            name: "box-proj".into(),
            hostname: "box".into(),
            cwd: PathBuf::from("/home/u/proj"),
            port: 4500,
            pid: Some(42),
            auth: false,
            version: Some("1.18.33".into()),
            scope: Scope::Loopback,
            tailnet: Tailnet::default(),
            connected_at: "2026-03-14T10:30:00Z".into(),
            secret: None,
            heartbeat: HEARTBEAT,
        }
    }

    #[test]
    fn scopes_of_hosts() {
        assert_eq!(Scope::of_host("127.0.0.1"), Scope::Loopback);
        assert_eq!(Scope::of_host("::1"), Scope::Loopback);
        assert_eq!(Scope::of_host("[::1]"), Scope::Loopback);
        assert_eq!(Scope::of_host("localhost"), Scope::Loopback);
        assert_eq!(Scope::of_host("0.0.0.0"), Scope::Lan);
        assert_eq!(Scope::of_host("::"), Scope::Lan);
        assert_eq!(
            Scope::of_host("10.1.2.3"),
            Scope::Addr("10.1.2.3".parse().unwrap())
        );
    }

    fn secret() -> FleetSecret {
        FleetSecret::from_text(&"ab".repeat(32)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ifas() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("eth0", "fe80::1"),
            ("eth0", "192.168.1.5"),
            ("tailscale0", "100.101.102.103"),
            ("docker0", "172.17.0.1"),
            ("wlan0", "10.0.0.7"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), ip(a)))
        .collect()
    }

    #[test]
    fn signed_addresses_are_the_advertised_ones_plus_the_tailnet() {
        let ts = [ip("100.101.102.103"), ip("fd7a:115c:a1e0::1")];
        assert_eq!(
            txt_addrs(Scope::Loopback, &ifas(), &[]),
            vec![ip("127.0.0.1")]
        );
        // LAN: the interfaces mDNS uses (no loopback, tailscale, docker),
        // IPv4 first, then the tailnet, then IPv6; each once.
        assert_eq!(
            txt_addrs(Scope::Lan, &ifas(), &ts),
            vec![
                ip("192.168.1.5"),
                ip("10.0.0.7"),
                ip("100.101.102.103"),
                ip("fd7a:115c:a1e0::1"),
                ip("fe80::1"),
            ]
        );
        // --bind tailnet: the one address, once.
        assert_eq!(
            txt_addrs(Scope::Addr(ts[0]), &ifas(), &ts[..1]),
            vec![ts[0]]
        );
    }

    #[test]
    fn with_a_secret_the_txt_record_is_signed_for_what_it_announces() {
        let mut a = sample_advert();
        a.scope = Scope::Lan;
        a.tailnet.addrs = vec![ip("100.101.102.103")];
        assert!(
            a.announcement_at(&ifas(), 1000).signature.is_none(),
            "no secret: unsigned"
        );
        a.secret = Some(secret());
        let ann = a.announcement_at(&ifas(), 1_700_000_000);
        assert_eq!(
            ann.signed_addrs,
            vec![
                ip("192.168.1.5"),
                ip("10.0.0.7"),
                ip("100.101.102.103"),
                ip("fe80::1")
            ]
        );
        let txt = ann.to_txt();
        let back =
            Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        let sig = back.signature.clone().expect("signed");
        assert_eq!(sig.at, 1_700_000_000);
        assert!(
            secret()
                .verify(&a.id, a.port, &back.signed_addrs, sig.at, &sig.sig)
                .is_ok()
        );
        // Another port (or another secret) does not verify.
        assert!(
            secret()
                .verify(&a.id, a.port + 1, &back.signed_addrs, sig.at, &sig.sig)
                .is_err()
        );
        let other = FleetSecret::from_text(&"cd".repeat(32)).unwrap();
        assert!(
            other
                .verify(&a.id, a.port, &back.signed_addrs, sig.at, &sig.sig)
                .is_err()
        );
    }

    #[test]
    fn with_a_secret_registrations_are_signed_over_their_port_and_loopback() {
        let mut a = sample_advert();
        let plain = a.registration_at(10042, 5);
        assert!(plain.sig.is_none() && plain.at.is_none() && plain.addrs.is_empty());
        a.secret = Some(secret());
        let reg = a.registration_at(10042, 1_700_000_000);
        assert_eq!(reg.addrs, vec![ip("127.0.0.1")]);
        assert_eq!(reg.at, Some(1_700_000_000));
        let sig = reg.sig.clone().expect("signed");
        assert!(
            secret()
                .verify(&a.id, 10042, &reg.addrs, 1_700_000_000, &sig)
                .is_ok(),
            "signed over the registration's port (the tunnel's end)"
        );
        assert!(
            secret()
                .verify(&a.id, a.port, &reg.addrs, 1_700_000_000, &sig)
                .is_err()
        );
    }

    #[test]
    fn tailnet_scopes() {
        let ts = Tailnet {
            addrs: vec![ip("100.101.102.103"), ip("fd7a:115c:a1e0::1")],
            magic_dns: Some("box.tail1234.ts.net".into()),
        };
        assert_eq!(Scope::Lan.tailnet_part(&ts), ts);
        assert_eq!(Scope::Loopback.tailnet_part(&ts), Tailnet::default());
        let only = Scope::Addr(ip("100.101.102.103")).tailnet_part(&ts);
        assert_eq!(only.addrs, vec![ip("100.101.102.103")]);
        assert!(Scope::Lan.mdns_reaches() && Scope::Loopback.mdns_reaches());
        assert!(!Scope::Addr(ip("100.101.102.103")).mdns_reaches());
        assert!(Scope::Addr(ip("192.168.1.5")).mdns_reaches());
    }

    #[test]
    fn announcement_and_registration_carry_the_same_identity() {
        let mut a = sample_advert();
        a.tailnet.addrs = vec!["100.101.102.103".parse().unwrap()];
        let txt = a.announcement().to_txt();
        assert_eq!(txt[0], ("txtvers".into(), "1".into()));
        let back =
            Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(back.id, "0123456789abcdef");
        assert_eq!(back.pid, Some(42));
        assert_eq!(back.version.as_deref(), Some("1.18.33"));
        assert_eq!(back.tailnet_addrs.len(), 1);
        let reg = a.registration(10042);
        assert_eq!((reg.port, reg.local_port), (10042, Some(4500)));
        assert_eq!(reg.id.as_deref(), Some("0123456789abcdef"));
        assert_eq!(a.file_name(), "box-proj-0123456789abcdef.json");
    }
}
