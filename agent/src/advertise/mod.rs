//! Advertisers: what is published about one healthy OpenCode ([`Advert`]),
//! and the set of advertisers that publish it ([`Advertisers`]): mDNS
//! ([`mdns`]), a local relay registration ([`relay`]), a registration on a
//! relay machine through an SSH reverse tunnel ([`ssh`]).
//!
//! The wire formats come from the library (`opencode_mcp::announce`); this
//! module only fills them in. It must not health-check OpenCode or decide
//! when to stop; it starts when told and stops, withdrawing everything, when
//! told.

pub mod mdns;
pub mod relay;
pub mod ssh;
pub mod tailnet;

use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use opencode_mcp::announce::txt::Announcement;
use opencode_mcp::announce::{Registration, registration_file_name};

use crate::cli::{Bind, Plan};
use tailnet::Tailnet;

/// How often relay registrations are rewritten.
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
    /// The scope of a `run` with `bind`.
    pub fn of_bind(bind: Bind) -> Self {
        match bind {
            Bind::Loopback => Scope::Loopback,
            Bind::Lan => Scope::Lan,
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
}

impl Advert {
    /// The TXT record contents.
    pub fn announcement(&self) -> Announcement {
        Announcement {
            id: self.id.clone(),
            name: self.name.clone(),
            hostname: Some(self.hostname.clone()),
            cwd: Some(self.cwd.to_string_lossy().into_owned()),
            version: self.version.clone(),
            pid: self.pid,
            auth: self.auth,
            tailnet_addrs: self.tailnet.addrs.clone(),
            magic_dns: self.tailnet.magic_dns.clone(),
        }
    }

    /// The relay registration, with `port` being where OpenCode answers on
    /// the machine that reads the file (the tunnel's end for `--relay-ssh`).
    pub fn registration(&self, port: u16) -> Registration {
        Registration {
            name: self.name.clone(),
            hostname: Some(self.hostname.clone()),
            port,
            local_port: Some(self.port),
            cwd: Some(self.cwd.to_string_lossy().into_owned()),
            connected_at: Some(self.connected_at.clone()),
            id: Some(self.id.clone()),
            pid: self.pid,
        }
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
        if plan.mdns {
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
        self.mdns.is_none() && self.relay_dir.is_none() && self.ssh.is_none()
    }

    /// Withdraws everything, concurrently: mDNS goodbyes, local file
    /// removal, relay file removal and tunnel shutdown.
    pub async fn stop(self) {
        let mdns = async {
            if let Some(m) = self.mdns {
                m.stop().await;
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
        tokio::join!(mdns, dir, ssh);
    }
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
