//! Discovery transports and the events they emit.
//!
//! A transport watches one source of truth (relay registration files, mDNS,
//! a tailnet) and reports what it sees as [`Discovery`] events: an endpoint
//! was seen or changed, an endpoint is gone, or the source has problems worth
//! showing to the user. A transport never health-checks, never talks to
//! OpenCode and never decides status: that is the registry's job. The only
//! thing flowing back is [`Feedback`], so that a transport can clean up what it
//! owns (a stale relay file) once the registry has given up on an endpoint.
//!
//! A transport also checks the signature of what it parsed ([`TrustCheck`]),
//! because only it knows which port and addresses the announcement named;
//! what to do with the verdict ([`Endpoint::trust`]) is the registry's
//! policy.

pub mod local_relay;
pub mod mdns;
pub mod tailscale;

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::secret::{FleetSecret, Signed, VerifyError};

/// What the signature of an announcement says, as its transport checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Signed with this server's fleet secret over exactly what was
    /// announced (and, with ANNOUNCE_MAX_AGE_S, recently enough). Which
    /// addresses may be contacted is in [`Endpoint::signed_addrs`].
    Signed {
        /// When it was signed (Unix seconds): the registry re-checks the age
        /// (ANNOUNCE_MAX_AGE_S) while the announcement stays the same, since
        /// a transport re-reads an announcement only when it changes.
        at: u64,
    },
    /// No signature (or no fleet secret here to check one with).
    Unsigned,
    /// A signature that does not verify; why, as a sentence with what to do.
    Invalid(String),
}

impl Trust {
    /// Whether the signature verified.
    pub fn is_signed(&self) -> bool {
        matches!(self, Trust::Signed { .. })
    }
}

/// Checks announcement signatures for a transport: the fleet secret (if
/// any) and the age limit from the configuration.
#[derive(Debug, Clone, Default)]
pub struct TrustCheck {
    /// The fleet secret; without it everything is [`Trust::Unsigned`].
    pub secret: Option<FleetSecret>,
    /// Oldest signature accepted (ANNOUNCE_MAX_AGE_S); `None`: no limit.
    pub max_age: Option<Duration>,
}

/// What to tell the owner of an instance that is not signed with our secret.
pub const SAME_SECRET_HINT: &str = "if it is yours, give that machine the same fleet secret (set OPENCODE_MCP_SECRET, or run `opencode-agent secret import` there) and restart its agent";

impl TrustCheck {
    /// The check the configuration asks for.
    pub fn from_config(config: &Config) -> Self {
        Self {
            secret: config.secret.clone(),
            max_age: config.announce_max_age,
        }
    }

    /// The verdict on an announcement of `id` at `port`, signing `addrs`.
    /// Never puts the signature into a reason.
    pub fn assess(
        &self,
        id: &str,
        port: u16,
        addrs: &[IpAddr],
        signature: Option<&Signed>,
        now: SystemTime,
    ) -> Trust {
        let (Some(secret), Some(sig)) = (&self.secret, signature) else {
            return Trust::Unsigned;
        };
        match sig.verify(secret, id, port, addrs) {
            Ok(()) => {}
            Err(VerifyError::BadSignature) => {
                return Trust::Invalid(format!(
                    "its announcement is signed with another fleet secret (or was altered); {SAME_SECRET_HINT}"
                ));
            }
            Err(e @ VerifyError::Malformed { .. }) => {
                return Trust::Invalid(format!("its announcement carries a {e}"));
            }
        }
        if let Some(max) = self.max_age {
            let now_s = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let age = now_s.abs_diff(sig.at);
            if age > max.as_secs() {
                return Trust::Invalid(too_old(age, sig.at > now_s, max));
            }
        }
        if addrs.is_empty() {
            return Trust::Invalid(
                "its signed announcement names no address, so there is nowhere it may be contacted; upgrade its agent".into(),
            );
        }
        Trust::Signed { at: sig.at }
    }
}

/// Why a signature outside ANNOUNCE_MAX_AGE_S is refused: `age` seconds
/// old, or ahead of this clock when `ahead`.
pub fn too_old(age: u64, ahead: bool, max: Duration) -> String {
    format!(
        "its signature is {age}s {}, beyond ANNOUNCE_MAX_AGE_S={}; check both clocks, or that its agent re-signs its announcement (opencode-agent does every --heartbeat-s)",
        if ahead { "ahead" } else { "old" },
        max.as_secs()
    )
}

/// The transports this build knows, by their `TRANSPORT` names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// Registration JSON files in RELAY_REGISTRY_DIR (usually written through SSH tunnels).
    LocalRelay,
    /// Multicast DNS-SD on the attached networks: `opencode-agent`'s
    /// `_opencode._tcp` and OpenCode's own `--mdns` (`_http._tcp`) advertisements.
    Mdns,
    /// Unicast DNS-SD to every online node of the tailnet (Tailscale's LocalAPI
    /// lists the nodes; `opencode-agent` answers on each node's tailnet address).
    Tailscale,
}

impl TransportKind {
    /// Every transport compiled into this build, in preference order.
    pub const ALL: &'static [TransportKind] = &[
        TransportKind::LocalRelay,
        TransportKind::Mdns,
        TransportKind::Tailscale,
    ];

    /// The `TRANSPORT` name.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::LocalRelay => "local-relay",
            TransportKind::Mdns => "mdns",
            TransportKind::Tailscale => "tailscale",
        }
    }

    /// Parses a comma-separated `TRANSPORT` value. `auto` means every
    /// transport that can work here. Duplicates are ignored.
    pub fn parse_list(list: &str) -> Result<Vec<TransportKind>> {
        let mut out = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let kinds: Vec<TransportKind> = if raw.eq_ignore_ascii_case("auto") {
                Self::ALL.to_vec()
            } else {
                let kind = Self::ALL
                    .iter()
                    .copied()
                    .find(|k| k.name().eq_ignore_ascii_case(raw))
                    .ok_or_else(|| Error::UnknownTransport {
                        given: raw.to_string(),
                        valid: Self::valid_names(),
                    })?;
                vec![kind]
            };
            for k in kinds {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        if out.is_empty() {
            return Err(Error::UnknownTransport {
                given: list.to_string(),
                valid: Self::valid_names(),
            });
        }
        Ok(out)
    }

    fn valid_names() -> String {
        let mut names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
        names.push("auto");
        names.join(", ")
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an endpoint is reached from this server, best first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// Same machine, over 127.0.0.1 / ::1.
    Loopback,
    /// A directly attached network.
    Lan,
    /// Over the tailnet.
    Tailnet,
    /// Through an SSH reverse tunnel ending on this machine.
    Relay,
}

/// One way to reach one OpenCode instance, as a transport saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Identity of the instance: the instance id when the announcement has one,
    /// otherwise a key derived from the source (e.g. `relay:<file stem>`).
    pub key: String,
    /// Human name used for matching (`instance` arguments).
    pub name: String,
    /// Machine the instance runs on, as announced.
    pub hostname: Option<String>,
    /// Working directory of the instance, as announced.
    pub cwd: Option<String>,
    /// Addresses to connect to, best first.
    pub addrs: Vec<IpAddr>,
    /// TCP port of OpenCode's HTTP server as seen from here.
    pub port: u16,
    /// Which transport saw it.
    pub via: TransportKind,
    /// How it is reached.
    pub reach: Reach,
    /// Where the announcement came from (a file path, an mDNS name), for humans.
    pub source: String,
    /// When the instance says it connected (the registration's `connectedAt`).
    pub connected_at: Option<String>,
    /// What the announcement's signature says (checked by the transport).
    pub trust: Trust,
    /// The addresses the signature covers; only these may be contacted with
    /// credentials. Empty when unsigned.
    pub signed_addrs: Vec<IpAddr>,
}

impl Endpoint {
    /// Base URL of OpenCode's HTTP API on this path.
    pub fn base_url(&self) -> String {
        match self.addrs.first() {
            Some(IpAddr::V6(v6)) => format!("http://[{v6}]:{}", self.port),
            Some(IpAddr::V4(v4)) => format!("http://{v4}:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }
}

/// Something a transport wants the user to know about its source (a file it
/// cannot parse, a directory it cannot read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Problem {
    /// What the problem is about (a file path, a service name).
    pub source: String,
    /// Why it is a problem, in words a user can act on.
    pub reason: String,
    /// Seconds since the Unix epoch when the problem was first seen.
    pub since_epoch_s: u64,
}

impl Problem {
    /// A problem first seen at `since`.
    pub fn new(source: impl Into<String>, reason: impl Into<String>, since: SystemTime) -> Self {
        Self {
            source: source.into(),
            reason: reason.into(),
            since_epoch_s: since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// What transports tell the registry.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// An endpoint appeared or changed.
    Seen(Endpoint),
    /// An endpoint is gone from this transport.
    Gone {
        /// The endpoint's key.
        key: String,
        /// The transport that lost it.
        via: TransportKind,
    },
    /// The transport finished its first full look (the view can call itself settled).
    Ready {
        /// The transport.
        via: TransportKind,
    },
    /// The complete, current list of this transport's problems (replaces the previous one).
    Problems {
        /// The reporting transport.
        via: TransportKind,
        /// Every problem it currently has.
        problems: Vec<Problem>,
    },
}

/// What the registry tells a transport.
#[derive(Debug, Clone)]
pub enum Feedback {
    /// The endpoint failed its health check (it just went offline); a
    /// transport may re-verify its announcement (e.g. mDNS `verify()`).
    Unreachable {
        /// The endpoint's key.
        key: String,
    },
    /// The endpoint has been unreachable for the whole grace period and was
    /// dropped; the transport may remove what announces it.
    Expired {
        /// The endpoint's key.
        key: String,
    },
}

/// The channels a running transport holds.
#[derive(Debug)]
pub struct TransportLink {
    /// Where discovery events go.
    pub events: mpsc::Sender<Discovery>,
    /// Feedback from the registry.
    pub feedback: mpsc::Receiver<Feedback>,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
}

/// A discovery source. `run` reports until `shutdown` is cancelled.
pub trait Transport: Send + 'static {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// Runs the transport until shutdown; an error ends only this transport.
    fn run(self: Box<Self>, link: TransportLink) -> BoxFuture<'static, Result<()>>;
}

/// Builds the transports named in the configuration.
///
/// A transport that cannot work on this machine (mDNS without a usable
/// daemon) is an [`Error::TransportUnavailable`] when it was asked for by
/// name; under `auto` (every transport requested) it is skipped with an info
/// log, because `auto` means "every transport that can work here".
pub fn build(config: &Config) -> Result<Vec<Box<dyn Transport>>> {
    let auto = config.transports.len() > 1
        && TransportKind::ALL
            .iter()
            .all(|k| config.transports.contains(k));
    let mut out: Vec<Box<dyn Transport>> = Vec::new();
    for kind in &config.transports {
        match kind {
            TransportKind::LocalRelay => out.push(Box::new(local_relay::LocalRelay::new(config))),
            TransportKind::Mdns => match mdns::Mdns::new(config) {
                Ok(t) => out.push(Box::new(t)),
                Err(e) if auto => tracing::info!("mdns transport skipped: {e}"),
                Err(e) => return Err(e),
            },
            TransportKind::Tailscale => {
                match tailscale::Tailscale::new(tailscale::TailscaleOptions::from_config(config)) {
                    Ok(t) => out.push(Box::new(t.with_trust(TrustCheck::from_config(config)))),
                    Err(e) if auto => tracing::info!("tailscale transport skipped: {e}"),
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_list_accepts_known_names_and_auto() {
        assert_eq!(
            TransportKind::parse_list("local-relay").unwrap(),
            vec![TransportKind::LocalRelay]
        );
        assert_eq!(
            TransportKind::parse_list(" auto , local-relay").unwrap(),
            vec![
                TransportKind::LocalRelay,
                TransportKind::Mdns,
                TransportKind::Tailscale
            ]
        );
        assert_eq!(
            TransportKind::parse_list("MDNS").unwrap(),
            vec![TransportKind::Mdns]
        );
    }

    #[test]
    fn unknown_transport_names_the_valid_ones() {
        let err = TransportKind::parse_list("local-relay,carrier-pigeon").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("carrier-pigeon"), "{msg}");
        assert!(
            msg.contains("local-relay")
                && msg.contains("mdns")
                && msg.contains("tailscale")
                && msg.contains("auto"),
            "{msg}"
        );
        assert!(TransportKind::parse_list(" , ").is_err());
    }

    #[test]
    fn trust_check_verifies_signature_age_and_addresses() {
        let secret = FleetSecret::from_text(&"12".repeat(32)).unwrap();
        let other = FleetSecret::from_text(&"34".repeat(32)).unwrap();
        let addrs: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let check = TrustCheck {
            secret: Some(secret.clone()),
            max_age: None,
        };
        let good = secret.signed("id", 80, &addrs, 10);
        assert_eq!(
            check.assess("id", 80, &addrs, Some(&good), now),
            Trust::Signed { at: 10 }
        );
        assert_eq!(check.assess("id", 80, &addrs, None, now), Trust::Unsigned);
        // Another id, port or address list, or another secret: invalid.
        for (id, port, a) in [
            ("id2", 80, addrs.clone()),
            ("id", 81, addrs.clone()),
            ("id", 80, vec![]),
        ] {
            assert!(matches!(
                check.assess(id, port, &a, Some(&good), now),
                Trust::Invalid(_)
            ));
        }
        let theirs = other.signed("id", 80, &addrs, 10);
        let Trust::Invalid(reason) = check.assess("id", 80, &addrs, Some(&theirs), now) else {
            panic!("another secret verified");
        };
        assert!(
            reason.contains("another fleet secret") && reason.contains("OPENCODE_MCP_SECRET"),
            "{reason}"
        );
        assert!(!reason.contains(&theirs.sig));
        // Signed with nothing to sign: invalid too.
        let none = secret.signed("id", 80, &[], 10);
        assert!(matches!(
            check.assess("id", 80, &[], Some(&none), now),
            Trust::Invalid(_)
        ));
        // Age limit, both ways.
        let aged = TrustCheck {
            max_age: Some(Duration::from_secs(60)),
            ..check.clone()
        };
        let recent = secret.signed("id", 80, &addrs, 1_000_000 - 30);
        assert_eq!(
            aged.assess("id", 80, &addrs, Some(&recent), now),
            Trust::Signed { at: 1_000_000 - 30 }
        );
        assert!(
            matches!(aged.assess("id", 80, &addrs, Some(&good), now), Trust::Invalid(r) if r.contains("ANNOUNCE_MAX_AGE_S"))
        );
        let future = secret.signed("id", 80, &addrs, 1_000_000 + 3600);
        assert!(matches!(
            aged.assess("id", 80, &addrs, Some(&future), now),
            Trust::Invalid(_)
        ));
        // Without a secret nothing can be verified.
        assert_eq!(
            TrustCheck::default().assess("id", 80, &addrs, Some(&good), now),
            Trust::Unsigned
        );
    }

    #[test]
    fn base_url_brackets_ipv6() {
        let mut e = Endpoint {
            key: "k".into(),
            name: "n".into(),
            hostname: None,
            cwd: None,
            addrs: vec!["::1".parse().unwrap()],
            port: 4096,
            via: TransportKind::LocalRelay,
            reach: Reach::Loopback,
            source: String::new(),
            connected_at: None,
            trust: Trust::Unsigned,
            signed_addrs: Vec::new(),
        };
        assert_eq!(e.base_url(), "http://[::1]:4096");
        e.addrs = vec!["127.0.0.1".parse().unwrap()];
        assert_eq!(e.base_url(), "http://127.0.0.1:4096");
    }
}
