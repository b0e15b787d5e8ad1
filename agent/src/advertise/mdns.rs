//! The mDNS advertiser: one `mdns-sd` daemon publishing one
//! `_opencode._tcp.local.` service with the TXT record of
//! [`Announcement`](opencode_mcp::announce::txt::Announcement).
//!
//! The instance name `<name>-<6 hex of id>` and host name
//! `<host>-<6 hex of id>.local.` are unique by construction, so probing is
//! skipped (`set_requires_probe(false)`): the service appears in about a
//! millisecond instead of ~0.9 s. A rename by conflict resolution is still
//! reported (`DaemonEvent::NameChange`, logged). Scope: loopback only (the
//! daemon is restricted to 127.0.0.1), LAN (automatic addresses on every
//! interface except loopback, tailscale0, docker*, veth*, and other virtual
//! bridges), or one given address. Stopping sends goodbye packets and waits
//! until they are out. This module must not health-check or write files.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mdns_sd::{DaemonEvent, IfKind, IfPredicate, ServiceDaemon, ServiceInfo};
use opencode_mcp::announce::txt::SERVICE_TYPE;
use tokio::task::JoinHandle;

use super::{Advert, Scope};
use crate::error::{AgentError, Result};
use crate::identity;

/// How long to wait for the daemon to confirm an unregister or a shutdown.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);
/// mdns-sd repeats a goodbye once, 120 ms after the first; wait for it.
const GOODBYE_REPEAT: Duration = Duration::from_millis(150);

/// Interface name prefixes never used for LAN advertisements: loopback,
/// Tailscale (multicast does not cross a tailnet; tailnet addresses go in
/// TXT instead), and container/VM bridges and their veth ends.
const EXCLUDED_PREFIXES: &[&str] = &[
    "lo",
    "tailscale",
    "docker",
    "veth",
    "br-",
    "virbr",
    "vmnet",
    "cni",
    "flannel",
    "podman",
    "lxcbr",
    "lxdbr",
    "utun",
];

/// True when a LAN advertisement must not use this interface address.
pub fn lan_excluded(ifname: &str, ip: IpAddr, is_loopback: bool) -> bool {
    is_loopback
        || ip.is_loopback()
        || super::tailnet::is_tailnet(&ip)
        || EXCLUDED_PREFIXES.iter().any(|p| ifname.starts_with(p))
}

/// A running mDNS advertisement.
pub struct MdnsAdvertiser {
    /// The daemon (its own thread).
    daemon: ServiceDaemon,
    /// Full service name, e.g. `box-proj-a1b2c3._opencode._tcp.local.`.
    fullname: String,
    /// Task logging daemon events (name changes, errors).
    monitor: JoinHandle<()>,
    /// With a fleet secret: the task that re-signs the TXT every heartbeat,
    /// so it stays younger than a server's ANNOUNCE_MAX_AGE_S.
    resign: Option<JoinHandle<()>>,
}

fn mdns_err(what: &str, e: mdns_sd::Error) -> AgentError {
    AgentError::Mdns(format!("{what}: {e}"))
}

impl MdnsAdvertiser {
    /// Publishes `advert`. The daemon binds UDP 5353 (shared with other
    /// responders through SO_REUSEPORT).
    pub fn start(advert: &Advert) -> Result<Self> {
        let daemon = ServiceDaemon::new().map_err(|e| mdns_err("cannot start the responder", e))?;
        match Self::publish(&daemon, advert) {
            Ok((fullname, monitor)) => Ok(MdnsAdvertiser {
                resign: advert
                    .secret
                    .is_some()
                    .then(|| resign(daemon.clone(), advert.clone())),
                daemon,
                fullname,
                monitor,
            }),
            Err(e) => {
                let _ = daemon.shutdown();
                Err(e)
            }
        }
    }

    fn publish(daemon: &ServiceDaemon, advert: &Advert) -> Result<(String, JoinHandle<()>)> {
        match advert.scope {
            Scope::Loopback => {
                daemon
                    .disable_interface(IfKind::All)
                    .and_then(|()| daemon.enable_interface(IfKind::LoopbackV4))
                    // Loopback addresses do not change: no periodic re-scan.
                    .and_then(|()| daemon.set_ip_check_interval(0))
                    .map_err(|e| mdns_err("cannot restrict the responder to loopback", e))?;
            }
            Scope::Lan | Scope::Addr(_) => {
                let skip = IfPredicate::new(|i| lan_excluded(&i.name, i.ip(), i.is_loopback()));
                daemon
                    .disable_interface(IfKind::Predicate(skip))
                    .map_err(|e| mdns_err("cannot select interfaces", e))?;
            }
        }
        let events = daemon
            .monitor()
            .map_err(|e| mdns_err("cannot monitor the responder", e))?;
        let info = service_info(advert)?;
        let host = info.get_hostname().to_string();
        let fullname = info.get_fullname().to_string();
        daemon
            .register(info)
            .map_err(|e| mdns_err("cannot register the service", e))?;
        tracing::info!(service = %fullname, host = %host, port = advert.port, scope = ?advert.scope, "mDNS advertisement published");
        let monitor = tokio::spawn(async move {
            while let Ok(ev) = events.recv_async().await {
                match ev {
                    DaemonEvent::NameChange(c) => tracing::warn!(
                        original = %c.original,
                        new_name = %c.new_name,
                        "mDNS name conflict: the responder renamed a record (browsers key on the TXT id, so the instance stays the same)"
                    ),
                    DaemonEvent::Error(e) => tracing::warn!(error = %e, "mDNS responder error"),
                    DaemonEvent::IpAdd(ip) => tracing::debug!(%ip, "mDNS: address added"),
                    DaemonEvent::IpDel(ip) => tracing::debug!(%ip, "mDNS: address removed"),
                    other => tracing::trace!(event = ?other, "mDNS event"),
                }
            }
        });
        Ok((fullname, monitor))
    }

    /// Withdraws the service: goodbye packets (TTL 0, sent twice), then the
    /// daemon shuts down. Returns once the goodbyes are sent (or after short
    /// timeouts if the daemon is stuck).
    pub async fn stop(self) {
        if let Some(task) = &self.resign {
            task.abort();
        }
        match self.daemon.unregister(&self.fullname) {
            Ok(rx) => match tokio::time::timeout(CONFIRM_TIMEOUT, rx.recv_async()).await {
                Ok(Ok(status)) => tracing::debug!(?status, "mDNS goodbye sent"),
                Ok(Err(_)) | Err(_) => tracing::warn!("mDNS responder did not confirm the goodbye"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot send the mDNS goodbye"),
        }
        tokio::time::sleep(GOODBYE_REPEAT).await;
        match self.daemon.shutdown() {
            Ok(rx) => {
                if tokio::time::timeout(CONFIRM_TIMEOUT, rx.recv_async())
                    .await
                    .is_err()
                {
                    tracing::warn!("mDNS responder did not confirm its shutdown");
                }
            }
            Err(e) => tracing::debug!(error = %e, "mDNS responder already stopped"),
        }
        self.monitor.abort();
        tracing::info!(service = %self.fullname, "mDNS advertisement withdrawn");
    }
}

/// The service record for `advert`, with a freshly made (and, with a
/// secret, freshly signed) TXT. Names depend only on the advert, so
/// registering it again replaces the record.
fn service_info(advert: &Advert) -> Result<ServiceInfo> {
    let txt = advert.announcement().to_txt();
    let instance = identity::mdns_instance_name(&advert.name, &advert.id);
    let host = identity::mdns_host_name(&advert.hostname, &advert.id);
    let info = match advert.scope {
        Scope::Loopback => ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            advert.port,
            &txt[..],
        ),
        Scope::Lan => ServiceInfo::new(SERVICE_TYPE, &instance, &host, "", advert.port, &txt[..])
            .map(ServiceInfo::enable_addr_auto),
        Scope::Addr(ip) => {
            ServiceInfo::new(SERVICE_TYPE, &instance, &host, ip, advert.port, &txt[..])
        }
    };
    let mut info = info.map_err(|e| mdns_err("invalid service record", e))?;
    info.set_requires_probe(false);
    Ok(info)
}

/// Re-registers the record with a newly signed TXT every heartbeat; mdns-sd
/// announces the change, so browsers see the new signature time.
fn resign(daemon: ServiceDaemon, advert: Advert) -> JoinHandle<()> {
    tokio::spawn(async move {
        let every = advert.heartbeat;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            match service_info(&advert).and_then(|info| {
                daemon
                    .register(info)
                    .map_err(|e| mdns_err("cannot re-register the service", e))
            }) {
                Ok(()) => tracing::debug!("mDNS TXT re-signed"),
                Err(e) => tracing::warn!(error = %e, "cannot re-sign the mDNS advertisement"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_interface_selection() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(!lan_excluded("eth0", ip("192.168.1.5"), false));
        assert!(!lan_excluded("wlp3s0", ip("fe80::1"), false));
        assert!(!lan_excluded("enp0s31f6", ip("10.0.0.2"), false));
        assert!(lan_excluded("lo", ip("127.0.0.1"), true));
        assert!(lan_excluded("tailscale0", ip("100.101.102.103"), false));
        assert!(lan_excluded("eth1", ip("100.101.102.103"), false));
        assert!(lan_excluded("docker0", ip("172.17.0.1"), false));
        assert!(lan_excluded("veth1234", ip("fe80::2"), false));
        assert!(lan_excluded("br-5f3a", ip("172.18.0.1"), false));
        assert!(lan_excluded("virbr0", ip("192.168.122.1"), false));
    }
}
