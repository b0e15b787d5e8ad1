//! The tailnet advertiser: the instance published over unicast DNS-SD on the
//! machine's tailnet addresses through the library's per-user shared
//! responder ([`opencode_mcp::dnssd::host::publish`]), because a tailnet
//! carries no multicast and mDNS cannot reach across it.
//!
//! The record is the mDNS one (same instance name, SRV host, TXT), with the
//! tailnet addresses as A/AAAA. Several agents on one machine share one
//! responder socket on `<tailnet address>:PORT`; when the agent holding it
//! exits, another takes it over. Dropping the [`Publication`] withdraws the
//! record. This module must not find the tailnet addresses (see
//! [`super::tailnet`]) or health-check OpenCode.

use opencode_mcp::dnssd::InstanceRecord;
use opencode_mcp::dnssd::host::{HostOptions, Publication, Role, publish};

use super::Advert;
use crate::error::{AgentError, Result};
use crate::identity;

/// The record published for `advert`.
pub fn record(advert: &Advert) -> InstanceRecord {
    InstanceRecord::new(
        &identity::mdns_instance_name(&advert.name, &advert.id),
        &identity::mdns_host_name(&advert.hostname, &advert.id),
        advert.port,
        &advert.announcement(),
        advert.tailnet.addrs.clone(),
    )
}

/// A published tailnet record.
pub struct TailnetDnssd {
    /// The publication; dropping it withdraws the record.
    publication: Publication,
}

impl TailnetDnssd {
    /// Publishes `advert` for the responder on UDP `port`. Call inside the
    /// runtime; `advert.tailnet.addrs` must not be empty.
    pub fn start(advert: &Advert, port: u16) -> Result<Self> {
        let publication = publish(record(advert), HostOptions::new(port)).map_err(|e| {
            AgentError::Dnssd(format!(
                "{e}; pass --dnssd-port PORT (or set TAILSCALE_DNSSD_PORT) if another user's agents hold port {port}"
            ))
        })?;
        let role = match publication.role() {
            Role::Standby => "another agent on this machine answers for it".to_string(),
            Role::Serving { addrs } => format!(
                "answering on {}",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        tracing::info!(
            addrs = ?advert.tailnet.addrs,
            dns = advert.tailnet.magic_dns.as_deref().unwrap_or("unknown"),
            port,
            "tailnet DNS-SD record published ({role})"
        );
        Ok(TailnetDnssd { publication })
    }

    /// Replaces the record (a re-signed TXT).
    pub fn refresh(&mut self, advert: &Advert) {
        if let Err(e) = self.publication.update(record(advert)) {
            tracing::warn!(error = %e, "cannot refresh the tailnet DNS-SD record");
        }
    }

    /// Withdraws the record (and hands the responder over if held).
    pub fn stop(self) {
        let path = self.publication.path().to_path_buf();
        drop(self.publication);
        tracing::info!(file = %path.display(), "tailnet DNS-SD record withdrawn");
    }
}
