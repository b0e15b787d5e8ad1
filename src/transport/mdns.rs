//! The `mdns` transport: multicast DNS-SD on the directly attached networks.
//!
//! It owns one mdns-sd daemon that browses two service types:
//!
//! - `_opencode._tcp.local.`: `opencode-agent` advertisements. The TXT record
//!   is read only through [`Announcement::from_txt`]; the instance is keyed by
//!   its TXT `id`, named, placed (host, cwd) from the TXT, and reached at the
//!   addresses of the resolved record. A record whose TXT does not parse (or
//!   whose TXT is over [`MAX_TXT_BYTES`] in total) is listed as a
//!   [`Problem`], never dropped silently. Its signature is checked over
//!   (TXT `id`, SRV port, TXT `addrs`, TXT `at`); when two advertisements
//!   claim one id, a verified one (signed, at an address it signed) wins
//!   over any other (a spoofed or replayed copy cannot push the real one out).
//! - `_http._tcp.local.`: OpenCode's own `--mdns` advertisement (instance
//!   `opencode-<port>`, TXT `path=/`, an SRV target shared by every instance),
//!   keyed `mdns:<addr>:<port>` and named `opencode-<port>@<host or addr>`.
//!   Other `_http._tcp` services are ignored. Whether such a service really is
//!   OpenCode is settled by the registry's health check (`/global/health`),
//!   not here. An `opencode-<port>` service at the same address and port as an
//!   agent advertisement is the same OpenCode and is not reported twice.
//!
//! mdns-sd repeats itself (`ServiceResolved` is an upsert that arrives once per
//! record as A/AAAA/TXT trickle in; `ServiceRemoved` may arrive twice), so the
//! transport keeps what every advertisement currently says, derives the set of
//! endpoints from it, and reports only the differences to what it reported
//! before. The record lifetime (120 s) cannot be lowered: when the registry
//! finds an endpoint unreachable ([`Feedback::Unreachable`]) the transport asks
//! mdns-sd to `verify()` the advertisement, so a crashed advertiser leaves the
//! cache within about 10 s. Point-to-point interfaces (tailscale0, VPN tunnels)
//! are excluded: multicast does not cross them, and tailnets have their own
//! transport.
//!
//! It must not health-check, talk HTTP or decide status (the registry does),
//! must not parse `_opencode._tcp` TXT records itself, and never advertises
//! anything.

use crate::dnssd::is_tailnet;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use mdns_sd::{
    DaemonEvent, IfKind, IfPredicate, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent,
    VERIFY_TIMEOUT_DEFAULT,
};
use tokio::sync::mpsc;

use super::{
    Discovery, Endpoint, Feedback, Problem, Reach, Transport, TransportKind, TransportLink, Trust,
    TrustCheck,
};
use crate::announce::txt::{Announcement, SERVICE_TYPE};
use crate::config::Config;
use crate::error::{Error, Result};

/// Largest TXT record accepted, all entries together, in bytes (RFC 6763
/// §6.2 advises keeping it under 1300; this leaves room and stops abuse).
pub const MAX_TXT_BYTES: usize = 8192;

/// DNS-SD type of OpenCode's own `--mdns` advertisement.
pub const OPENCODE_HTTP_TYPE: &str = "_http._tcp.local.";
/// Instance-name prefix of OpenCode's own advertisement (`opencode-<port>`).
const OPENCODE_HTTP_PREFIX: &str = "opencode-";
/// The SRV target OpenCode uses unless `--mdns-domain` is given; shared by
/// every instance, so it names nothing.
const OPENCODE_DEFAULT_DOMAIN: &str = "opencode.local.";
/// How long the first browse collects answers before the transport calls
/// itself ready (a running advertiser answers a query in well under 100 ms).
const READY_AFTER: Duration = Duration::from_millis(300);
/// After a browse had to be restarted, advertisements not re-announced from
/// mdns-sd's cache within this long are considered gone.
const RESYNC_AFTER: Duration = Duration::from_secs(1);
/// How often a browse that could not start is tried again.
const BROWSE_RETRY: Duration = Duration::from_secs(5);
/// A daemon error is listed as a problem until this long passes without another.
const DAEMON_PROBLEM_TTL: Duration = Duration::from_secs(60);
/// Source named in problems about the daemon itself.
const DAEMON_SOURCE: &str = "mDNS daemon";

/// Browses mDNS for OpenCode instances.
pub struct Mdns {
    /// The mdns-sd daemon (its own thread); shut down when the transport stops.
    daemon: ServiceDaemon,
    /// Signature checks.
    trust: TrustCheck,
}

impl Mdns {
    /// Starts the mdns-sd daemon. Fails with [`Error::TransportUnavailable`]
    /// when the daemon cannot be created (no sockets, no threads).
    pub fn new(config: &Config) -> Result<Self> {
        let unavailable = |e: mdns_sd::Error| Error::TransportUnavailable {
            transport: "mdns",
            reason: format!(
                "cannot start the mDNS daemon ({e}); use TRANSPORT=local-relay or fix the host's networking"
            ),
        };
        let daemon = ServiceDaemon::new().map_err(unavailable)?;
        let predicate = IfPredicate::new(|intf| excluded_interface(&intf.name, intf.is_p2p()));
        if let Err(e) = daemon.disable_interface(IfKind::Predicate(predicate)) {
            let _ = daemon.shutdown();
            return Err(unavailable(e));
        }
        Ok(Self {
            daemon,
            trust: TrustCheck::from_config(config),
        })
    }
}

impl Transport for Mdns {
    fn kind(&self) -> TransportKind {
        TransportKind::Mdns
    }

    fn run(self: Box<Self>, link: TransportLink) -> BoxFuture<'static, Result<()>> {
        run(self.daemon, self.trust, link).boxed()
    }
}

/// Interfaces mDNS must not use: point-to-point links (VPN tunnels such as
/// tailscale0 carry no multicast) and Tailscale's interface by name.
fn excluded_interface(name: &str, point_to_point: bool) -> bool {
    point_to_point || name.starts_with("tailscale")
}

/// Which of the browsed service types an advertisement belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// `_opencode._tcp`: an `opencode-agent` advertisement.
    Agent,
    /// `_http._tcp`: OpenCode's own `--mdns` advertisement (or another HTTP service).
    Http,
}

impl Kind {
    fn of(ty_domain: &str) -> Option<Kind> {
        if ty_domain.eq_ignore_ascii_case(SERVICE_TYPE) {
            Some(Kind::Agent)
        } else if ty_domain.eq_ignore_ascii_case(OPENCODE_HTTP_TYPE) {
            Some(Kind::Http)
        } else {
            None
        }
    }

    fn service_type(self) -> &'static str {
        match self {
            Kind::Agent => SERVICE_TYPE,
            Kind::Http => OPENCODE_HTTP_TYPE,
        }
    }
}

/// One resolved advertisement in plain types (what mdns-sd's
/// `ResolvedService` carries that matters here).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Advert {
    /// Service type.
    kind: Kind,
    /// Full instance name, e.g. `box-proj-4242._opencode._tcp.local.`.
    fullname: String,
    /// SRV target host, e.g. `box.local.`.
    host: String,
    /// SRV port.
    port: u16,
    /// Resolved addresses; `true` when the address carries an interface scope.
    addrs: Vec<(IpAddr, bool)>,
    /// TXT entries in record order (valueless keys have an empty value).
    txt: Vec<(String, String)>,
}

impl Advert {
    fn from_resolved(kind: Kind, svc: &ResolvedService) -> Advert {
        let addrs = svc
            .get_addresses()
            .iter()
            .map(|a| match a {
                ScopedIp::V6(v6) => (IpAddr::V6(*v6.addr()), v6.scope_id().index != 0),
                other => (other.to_ip_addr(), false),
            })
            .collect();
        let txt = svc
            .get_properties()
            .iter()
            .map(|p| (p.key().to_string(), p.val_str().to_string()))
            .collect();
        Advert {
            kind,
            fullname: svc.get_fullname().to_string(),
            host: svc.get_hostname().to_string(),
            port: svc.get_port(),
            addrs,
            txt,
        }
    }
}

/// What an advertisement means to us.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Meaning {
    /// A usable endpoint.
    Endpoint(Endpoint),
    /// An advertisement of ours that cannot be used, and why.
    Problem(String),
    /// Somebody else's service (a printer's `_http._tcp`); not reported.
    Ignored,
}

/// Interprets one advertisement.
fn interpret(ad: &Advert, check: &TrustCheck) -> Meaning {
    match ad.kind {
        Kind::Agent => interpret_agent(ad, check),
        Kind::Http => interpret_http(ad),
    }
}

fn interpret_agent(ad: &Advert, check: &TrustCheck) -> Meaning {
    let txt_bytes: usize = ad.txt.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if txt_bytes > MAX_TXT_BYTES {
        return Meaning::Problem(format!(
            "TXT record of {txt_bytes} bytes is over the {MAX_TXT_BYTES}-byte limit; ignored"
        ));
    }
    let ann = match Announcement::from_txt(ad.txt.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok(a) => a,
        Err(reason) => return Meaning::Problem(format!("unusable TXT record: {reason}")),
    };
    let addrs = choose_addrs(&ad.addrs);
    if addrs.is_empty() {
        return Meaning::Problem("advertised without a usable address".into());
    }
    if ad.port == 0 {
        return Meaning::Problem("advertised with port 0".into());
    }
    let hostname = ann.hostname.or_else(|| short_host(&ad.host));
    let trust = check.assess(
        &ann.id,
        ad.port,
        &ann.signed_addrs,
        ann.signature.as_ref(),
        SystemTime::now(),
    );
    Meaning::Endpoint(Endpoint {
        trust,
        signed_addrs: ann.signed_addrs,
        key: ann.id,
        name: ann.name,
        hostname,
        cwd: ann.cwd,
        reach: reach_of(&addrs),
        addrs,
        port: ad.port,
        via: TransportKind::Mdns,
        source: ad.fullname.clone(),
        connected_at: None,
    })
}

fn interpret_http(ad: &Advert) -> Meaning {
    if !is_opencode_instance_name(instance_label(&ad.fullname, Kind::Http)) {
        return Meaning::Ignored;
    }
    // OpenCode always publishes `path=/`; another path is another program.
    if let Some((_, path)) = ad.txt.iter().find(|(k, _)| k.eq_ignore_ascii_case("path"))
        && path != "/"
    {
        return Meaning::Ignored;
    }
    let addrs = choose_addrs(&ad.addrs);
    let Some(first) = addrs.first().copied() else {
        return Meaning::Ignored;
    };
    if ad.port == 0 {
        return Meaning::Ignored;
    }
    let addr_text = match first {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    // The default SRV target is shared by every instance; only a chosen
    // `--mdns-domain` says which machine this is.
    let host = (!ad.host.eq_ignore_ascii_case(OPENCODE_DEFAULT_DOMAIN))
        .then(|| short_host(&ad.host))
        .flatten();
    let name = format!(
        "opencode-{}@{}",
        ad.port,
        host.as_deref().unwrap_or(&addr_text)
    );
    Meaning::Endpoint(Endpoint {
        key: format!("mdns:{addr_text}:{}", ad.port),
        name,
        hostname: host,
        cwd: None,
        reach: reach_of(&addrs),
        addrs,
        port: ad.port,
        via: TransportKind::Mdns,
        source: ad.fullname.clone(),
        connected_at: None,
        // OpenCode's own advertisement carries no signature.
        trust: Trust::Unsigned,
        signed_addrs: Vec::new(),
    })
}

/// The instance label of a full name (`opencode-4096._http._tcp.local.` →
/// `opencode-4096`).
fn instance_label(fullname: &str, kind: Kind) -> &str {
    let ty = kind.service_type();
    if fullname.len() > ty.len() + 1 {
        let (label, rest) = fullname.split_at(fullname.len() - ty.len());
        if rest.eq_ignore_ascii_case(ty) {
            return label.strip_suffix('.').unwrap_or(label);
        }
    }
    fullname
}

/// `opencode-<port>`, possibly renamed by conflict resolution (`opencode-4096 (2)`).
fn is_opencode_instance_name(label: &str) -> bool {
    let Some(rest) = label.strip_prefix(OPENCODE_HTTP_PREFIX) else {
        return false;
    };
    let digits = rest.split(' ').next().unwrap_or("");
    !digits.is_empty() && digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `box.local.` → `box`; empty names give `None`.
fn short_host(host: &str) -> Option<String> {
    let h = host.trim_end_matches('.');
    let h = h
        .strip_suffix(".local")
        .or_else(|| h.strip_suffix(".LOCAL"))
        .unwrap_or(h);
    (!h.is_empty()).then(|| h.to_string())
}

fn is_v6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// Orders resolved addresses best first: loopback, IPv4 (LAN, then IPv4
/// link-local, then tailnet), IPv6 (global, then tailnet). IPv6 link-local
/// addresses are kept only when nothing else is left: an [`Endpoint`] holds no
/// interface scope, so they are the least likely to connect. Unspecified and
/// multicast addresses are dropped. The order is total, so equal sets always
/// give equal lists.
fn choose_addrs(addrs: &[(IpAddr, bool)]) -> Vec<IpAddr> {
    fn rank(ip: &IpAddr, scoped: bool) -> u8 {
        match ip {
            IpAddr::V4(v4) if v4.is_loopback() => 0,
            IpAddr::V6(v6) if v6.is_loopback() => 1,
            IpAddr::V4(v4) if v4.is_link_local() => 3,
            v4 @ IpAddr::V4(_) if is_tailnet(v4) => 4,
            IpAddr::V4(_) => 2,
            v6 if is_tailnet(v6) => 6,
            v6 if is_v6_link_local(v6) => {
                if scoped {
                    7
                } else {
                    8
                }
            }
            IpAddr::V6(_) => 5,
        }
    }
    let mut ranked: Vec<(u8, IpAddr)> = addrs
        .iter()
        .filter(|(ip, _)| !ip.is_unspecified() && !ip.is_multicast())
        .map(|(ip, scoped)| (rank(ip, *scoped), *ip))
        .collect();
    ranked.sort();
    ranked.dedup_by(|a, b| a.1 == b.1);
    let usable = ranked.iter().any(|(r, _)| *r < 7);
    ranked
        .into_iter()
        .filter(|(r, _)| !usable || *r < 7)
        .map(|(_, ip)| ip)
        .collect()
}

/// How the best address is reached.
fn reach_of(addrs: &[IpAddr]) -> Reach {
    match addrs.first() {
        Some(ip) if ip.is_loopback() => Reach::Loopback,
        Some(ip) if is_tailnet(ip) => Reach::Tailnet,
        _ => Reach::Lan,
    }
}

/// What one advertisement currently says.
#[derive(Debug, Clone)]
struct Tracked {
    /// Its service type.
    kind: Kind,
    /// What it means.
    meaning: Meaning,
    /// Order of the last resolve (a later one wins when two advertise one id).
    seq: u64,
    /// When it was last resolved.
    resolved_at: Instant,
    /// When the current problem was first seen (for problem meanings).
    problem_since: SystemTime,
}

/// The de-duplicating state between mdns-sd's events and the registry: what
/// each advertisement says now, and what has been reported.
#[derive(Debug, Default)]
struct Tracker {
    /// Current advertisements by full name.
    adverts: BTreeMap<String, Tracked>,
    /// Endpoints as last reported, by key.
    reported: BTreeMap<String, Endpoint>,
    /// Problems as last reported.
    reported_problems: Vec<Problem>,
    /// The latest daemon error: reason, first seen, last seen.
    daemon_problem: Option<(String, SystemTime, Instant)>,
    /// Resolve counter.
    seq: u64,
    /// Signature checks.
    check: TrustCheck,
}

/// A change to send to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Seen(Endpoint),
    Gone(String),
    Problems(Vec<Problem>),
}

impl Tracker {
    /// Records a resolve (an upsert: the same advertisement resolves again as
    /// records arrive or change).
    fn resolved(&mut self, ad: &Advert, now: Instant) -> Vec<Change> {
        self.seq += 1;
        let meaning = interpret(ad, &self.check);
        let problem_since = match (self.adverts.get(&ad.fullname), &meaning) {
            (
                Some(Tracked {
                    meaning: Meaning::Problem(old),
                    problem_since,
                    ..
                }),
                Meaning::Problem(new),
            ) if old == new => *problem_since,
            _ => SystemTime::now(),
        };
        // An unchanged advertisement keeps its place (a refresh must not make
        // an older duplicate win over a newer one).
        let seq = match self.adverts.get(&ad.fullname) {
            Some(t) if t.meaning == meaning => t.seq,
            _ => self.seq,
        };
        self.adverts.insert(
            ad.fullname.clone(),
            Tracked {
                kind: ad.kind,
                meaning,
                seq,
                resolved_at: now,
                problem_since,
            },
        );
        self.changes()
    }

    /// Records a removal (idempotent: mdns-sd may report one twice).
    fn removed(&mut self, fullname: &str) -> Vec<Change> {
        if self.adverts.remove(fullname).is_none() {
            return Vec::new();
        }
        self.changes()
    }

    /// Drops advertisements of `kind` not resolved since `since` (after a
    /// restarted browse re-read mdns-sd's cache).
    fn forget_stale(&mut self, kind: Kind, since: Instant) -> Vec<Change> {
        self.adverts
            .retain(|_, t| t.kind != kind || t.resolved_at >= since);
        self.changes()
    }

    /// Records a daemon error.
    fn daemon_error(&mut self, reason: String, now: Instant) -> Vec<Change> {
        let first = match &self.daemon_problem {
            Some((old, first, _)) if *old == reason => *first,
            _ => SystemTime::now(),
        };
        self.daemon_problem = Some((reason, first, now));
        self.changes()
    }

    /// Clears a daemon error that has not repeated for [`DAEMON_PROBLEM_TTL`].
    fn expire_daemon_problem(&mut self, now: Instant) -> Vec<Change> {
        match &self.daemon_problem {
            Some((_, _, last)) if now.duration_since(*last) >= DAEMON_PROBLEM_TTL => {
                self.daemon_problem = None;
                self.changes()
            }
            _ => Vec::new(),
        }
    }

    /// Full names currently announcing `key`.
    fn fullnames_of(&self, key: &str) -> Vec<String> {
        self.adverts
            .iter()
            .filter(|(_, t)| matches!(&t.meaning, Meaning::Endpoint(e) if e.key == key))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The endpoints the advertisements add up to, by key.
    fn wanted(&self) -> BTreeMap<String, Endpoint> {
        // A verified advertisement beats an unverified one of the same id
        // (a spoofed copy must not displace the real one); then the latest.
        let mut by_key: BTreeMap<String, ((bool, u64), Kind, &Endpoint)> = BTreeMap::new();
        for t in self.adverts.values() {
            if let Meaning::Endpoint(e) = &t.meaning {
                // Verified means: signed, and resolved at an address it signed.
                let verified = e.trust.is_signed()
                    && e.addrs.iter().any(|a| {
                        e.signed_addrs
                            .iter()
                            .any(|s| s.to_canonical() == a.to_canonical())
                    });
                let rank = (verified, t.seq);
                match by_key.get(&e.key) {
                    Some((r, _, _)) if *r > rank => {}
                    _ => {
                        by_key.insert(e.key.clone(), (rank, t.kind, e));
                    }
                }
            }
        }
        // OpenCode's own advertisement of an instance an agent also
        // advertises is the same server: keep the agent's (it has an id).
        let agent_sockets: HashSet<(IpAddr, u16)> = by_key
            .values()
            .filter(|(_, kind, _)| *kind == Kind::Agent)
            .flat_map(|(_, _, e)| e.addrs.iter().map(|a| (*a, e.port)))
            .collect();
        by_key
            .into_iter()
            .filter(|(_, (_, kind, e))| {
                *kind == Kind::Agent
                    || !e
                        .addrs
                        .iter()
                        .any(|a| agent_sockets.contains(&(*a, e.port)))
            })
            .map(|(k, (_, _, e))| (k, e.clone()))
            .collect()
    }

    fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = self
            .adverts
            .iter()
            .filter_map(|(name, t)| match &t.meaning {
                Meaning::Problem(reason) => Some(Problem::new(name, reason, t.problem_since)),
                _ => None,
            })
            .collect();
        if let Some((reason, since, _)) = &self.daemon_problem {
            out.push(Problem::new(DAEMON_SOURCE, reason, *since));
        }
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }

    /// The differences between what is wanted and what was reported; marks
    /// them reported.
    fn changes(&mut self) -> Vec<Change> {
        let wanted = self.wanted();
        let mut out = Vec::new();
        for key in self.reported.keys() {
            if !wanted.contains_key(key) {
                out.push(Change::Gone(key.clone()));
            }
        }
        for (key, ep) in &wanted {
            if self.reported.get(key) != Some(ep) {
                out.push(Change::Seen(ep.clone()));
            }
        }
        self.reported = wanted;
        let problems = self.problems();
        if problems != self.reported_problems {
            self.reported_problems = problems.clone();
            out.push(Change::Problems(problems));
        }
        out
    }
}

/// One browse subscription.
struct Browse {
    /// The service type browsed.
    kind: Kind,
    /// Its event channel.
    rx: mdns_sd::Receiver<ServiceEvent>,
}

fn browse(daemon: &ServiceDaemon, kind: Kind) -> std::result::Result<Browse, mdns_sd::Error> {
    daemon
        .browse(kind.service_type())
        .map(|rx| Browse { kind, rx })
}

/// Waits for the next event of a browse; `None` when its channel closed.
async fn next_event(b: &Option<Browse>) -> (Kind, Option<ServiceEvent>) {
    match b {
        Some(b) => (b.kind, b.rx.recv_async().await.ok()),
        None => std::future::pending().await,
    }
}

async fn send_all(events: &mpsc::Sender<Discovery>, changes: Vec<Change>) {
    for c in changes {
        let d = match c {
            Change::Seen(ep) => {
                tracing::debug!(key = %ep.key, name = %ep.name, url = %ep.base_url(), source = %ep.source, "mdns: seen");
                Discovery::Seen(ep)
            }
            Change::Gone(key) => {
                tracing::debug!(%key, "mdns: gone");
                Discovery::Gone {
                    key,
                    via: TransportKind::Mdns,
                }
            }
            Change::Problems(problems) => Discovery::Problems {
                via: TransportKind::Mdns,
                problems,
            },
        };
        let _ = events.send(d).await;
    }
}

async fn run(daemon: ServiceDaemon, check: TrustCheck, mut link: TransportLink) -> Result<()> {
    let mut tracker = Tracker {
        check,
        ..Tracker::default()
    };
    // A browse that cannot start is a problem to show, not the end of the
    // transport: the registry would otherwise wait for its `Ready` forever.
    let start = |kind: Kind, tracker: &mut Tracker| match browse(&daemon, kind) {
        Ok(b) => (Some(b), Vec::new()),
        Err(e) => {
            tracing::warn!(ty = kind.service_type(), error = %e, "cannot browse mDNS");
            let changes = tracker.daemon_error(
                format!("cannot browse {}: {e}", kind.service_type()),
                Instant::now(),
            );
            (None, changes)
        }
    };
    let (mut agents, changes) = start(Kind::Agent, &mut tracker);
    send_all(&link.events, changes).await;
    let (mut http, changes) = start(Kind::Http, &mut tracker);
    send_all(&link.events, changes).await;
    let mut monitor = daemon.monitor().ok();
    let started = tokio::time::Instant::now();
    let ready = tokio::time::sleep_until(started + READY_AFTER);
    tokio::pin!(ready);
    let mut ready_sent = false;
    // Restarted browses waiting for mdns-sd's cache to be re-read.
    let mut resyncs: Vec<(Kind, Instant)> = Vec::new();
    let mut last_retry = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = link.shutdown.cancelled() => break,
            _ = &mut ready, if !ready_sent => {
                ready_sent = true;
                let _ = link.events.send(Discovery::Ready { via: TransportKind::Mdns }).await;
            }
            (kind, ev) = next_event(&agents) => {
                let changes = on_service_event(&daemon, &mut tracker, kind, ev, &mut agents, &mut resyncs);
                send_all(&link.events, changes).await;
            }
            (kind, ev) = next_event(&http) => {
                let changes = on_service_event(&daemon, &mut tracker, kind, ev, &mut http, &mut resyncs);
                send_all(&link.events, changes).await;
            }
            ev = async {
                match &monitor {
                    Some(m) => m.recv_async().await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                match ev {
                    Some(DaemonEvent::Error(e)) => {
                        tracing::warn!(error = %e, "mDNS daemon error");
                        let changes = tracker.daemon_error(e.to_string(), Instant::now());
                        send_all(&link.events, changes).await;
                    }
                    Some(other) => tracing::trace!(event = ?other, "mDNS daemon event"),
                    None => {
                        tracing::debug!("mDNS daemon monitor closed");
                        monitor = None;
                    }
                }
            }
            Some(fb) = link.feedback.recv() => {
                if let Feedback::Unreachable { key } = fb {
                    for fullname in tracker.fullnames_of(&key) {
                        tracing::debug!(%key, %fullname, "unreachable; asking mDNS to verify the advertisement");
                        if let Err(e) = daemon.verify(fullname, VERIFY_TIMEOUT_DEFAULT) {
                            tracing::debug!(error = %e, "mDNS verify failed");
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut changes = Vec::new();
                if (agents.is_none() || http.is_none())
                    && now.duration_since(last_retry) >= BROWSE_RETRY
                {
                    last_retry = now;
                    for (kind, slot) in [(Kind::Agent, &mut agents), (Kind::Http, &mut http)] {
                        if slot.is_none() {
                            let (b, c) = start(kind, &mut tracker);
                            if b.is_some() {
                                resyncs.push((kind, now));
                            }
                            *slot = b;
                            changes.extend(c);
                        }
                    }
                }
                changes.extend(tracker.expire_daemon_problem(now));
                let due: Vec<(Kind, Instant)> = resyncs
                    .iter()
                    .copied()
                    .filter(|(_, at)| now.duration_since(*at) >= RESYNC_AFTER)
                    .collect();
                resyncs.retain(|(_, at)| now.duration_since(*at) < RESYNC_AFTER);
                for (kind, at) in due {
                    changes.extend(tracker.forget_stale(kind, at));
                }
                send_all(&link.events, changes).await;
            }
        }
    }
    // Browsing sends nothing on shutdown; stop the daemon's thread.
    let _ = daemon.shutdown();
    Ok(())
}

/// Applies one browse event; restarts the browse when its channel closed.
fn on_service_event(
    daemon: &ServiceDaemon,
    tracker: &mut Tracker,
    kind: Kind,
    ev: Option<ServiceEvent>,
    slot: &mut Option<Browse>,
    resyncs: &mut Vec<(Kind, Instant)>,
) -> Vec<Change> {
    match ev {
        Some(ServiceEvent::ServiceResolved(svc)) => {
            let Some(k) = Kind::of(&svc.ty_domain) else {
                return Vec::new();
            };
            let ad = Advert::from_resolved(k, &svc);
            tracing::trace!(fullname = %ad.fullname, port = ad.port, addrs = ?ad.addrs, "mDNS resolved");
            tracker.resolved(&ad, Instant::now())
        }
        Some(ServiceEvent::ServiceRemoved(_, fullname)) => {
            tracing::trace!(%fullname, "mDNS removed");
            tracker.removed(&fullname)
        }
        Some(ServiceEvent::SearchStopped(_)) | None => {
            // The daemon disconnects a receiver that fell behind: browse again
            // and let mdns-sd replay its cache.
            tracing::debug!(ty = kind.service_type(), "mDNS browse ended; restarting it");
            let _ = daemon.stop_browse(kind.service_type());
            match browse(daemon, kind) {
                Ok(b) => {
                    *slot = Some(b);
                    resyncs.push((kind, Instant::now()));
                    Vec::new()
                }
                Err(e) => {
                    *slot = None;
                    tracker.daemon_error(
                        format!("cannot browse {}: {e}", kind.service_type()),
                        Instant::now(),
                    )
                }
            }
        }
        Some(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn agent_txt(id: &str, name: &str) -> Vec<(String, String)> {
        Announcement {
            id: id.into(),
            name: name.into(),
            hostname: Some("box".into()),
            cwd: Some("/home/u/proj".into()),
            version: Some("1.18.33".into()),
            pid: Some(42),
            auth: true,
            ..Announcement::default()
        }
        .to_txt()
    }

    fn agent_ad(fullname: &str, id: &str, port: u16, addrs: &[&str]) -> Advert {
        Advert {
            kind: Kind::Agent,
            fullname: fullname.into(),
            host: "box.local.".into(),
            port,
            addrs: addrs.iter().map(|a| (ip(a), false)).collect(),
            txt: agent_txt(id, "box-proj"),
        }
    }

    fn http_ad(fullname: &str, host: &str, port: u16, addrs: &[&str]) -> Advert {
        Advert {
            kind: Kind::Http,
            fullname: fullname.into(),
            host: host.into(),
            port,
            addrs: addrs.iter().map(|a| (ip(a), false)).collect(),
            txt: vec![("path".into(), "/".into())],
        }
    }

    fn seen(changes: &[Change]) -> Vec<&Endpoint> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Seen(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn agent_txt_becomes_an_endpoint_with_txt_fields_and_resolved_addresses() {
        let ad = agent_ad(
            "box-proj-1._opencode._tcp.local.",
            "id-1",
            4242,
            &["fe80::1", "10.0.0.5"],
        );
        let Meaning::Endpoint(e) = interpret(&ad, &TrustCheck::default()) else {
            panic!(
                "not an endpoint: {:?}",
                interpret(&ad, &TrustCheck::default())
            );
        };
        assert_eq!(e.key, "id-1");
        assert_eq!(e.name, "box-proj");
        assert_eq!(e.hostname.as_deref(), Some("box"));
        assert_eq!(e.cwd.as_deref(), Some("/home/u/proj"));
        assert_eq!(e.addrs, vec![ip("10.0.0.5")]);
        assert_eq!(e.port, 4242);
        assert_eq!(e.reach, Reach::Lan);
        assert_eq!(e.via, TransportKind::Mdns);
        assert_eq!(e.source, "box-proj-1._opencode._tcp.local.");
        assert_eq!(e.base_url(), "http://10.0.0.5:4242");
    }

    #[test]
    fn bad_txt_is_a_problem_not_an_endpoint() {
        let mut ad = agent_ad("x._opencode._tcp.local.", "id-1", 1, &["10.0.0.5"]);
        ad.txt = vec![("txtvers".into(), "1".into()), ("name".into(), "n".into())];
        assert!(
            matches!(interpret(&ad, &TrustCheck::default()), Meaning::Problem(r) if r.contains("id"))
        );
        ad.txt.clear();
        assert!(
            matches!(interpret(&ad, &TrustCheck::default()), Meaning::Problem(r) if r.contains("txtvers"))
        );
    }

    #[test]
    fn addresses_prefer_loopback_then_ipv4_and_drop_link_local_v6_unless_alone() {
        let pick = |addrs: &[(&str, bool)]| {
            choose_addrs(&addrs.iter().map(|(a, s)| (ip(a), *s)).collect::<Vec<_>>())
        };
        assert_eq!(
            pick(&[
                ("fe80::1", true),
                ("2001:db8::1", false),
                ("192.168.1.2", false),
                ("127.0.0.1", false)
            ]),
            vec![ip("127.0.0.1"), ip("192.168.1.2"), ip("2001:db8::1")]
        );
        assert_eq!(
            pick(&[
                ("100.101.102.103", false),
                ("10.1.1.1", false),
                ("169.254.3.4", false)
            ]),
            vec![ip("10.1.1.1"), ip("169.254.3.4"), ip("100.101.102.103")]
        );
        assert_eq!(
            pick(&[("fe80::2", false), ("fe80::1", true)]),
            vec![ip("fe80::1"), ip("fe80::2")]
        );
        assert_eq!(
            pick(&[("0.0.0.0", false), ("224.0.0.251", false)]),
            Vec::<IpAddr>::new()
        );
        // Same set in another order, same list.
        assert_eq!(
            pick(&[("10.0.0.2", false), ("10.0.0.1", false)]),
            pick(&[("10.0.0.1", false), ("10.0.0.2", false)])
        );
    }

    #[test]
    fn reach_follows_the_best_address() {
        assert_eq!(reach_of(&[ip("127.0.0.1")]), Reach::Loopback);
        assert_eq!(reach_of(&[ip("::1")]), Reach::Loopback);
        assert_eq!(reach_of(&[ip("100.64.0.1")]), Reach::Tailnet);
        assert_eq!(reach_of(&[ip("100.128.0.1")]), Reach::Lan);
        assert_eq!(reach_of(&[ip("fd7a:115c:a1e0::5")]), Reach::Tailnet);
        assert_eq!(reach_of(&[ip("192.168.0.1")]), Reach::Lan);
    }

    #[test]
    fn interface_exclusion_covers_point_to_point_and_tailscale() {
        assert!(excluded_interface("tailscale0", false));
        assert!(excluded_interface("wg0", true));
        assert!(!excluded_interface("eth0", false));
        assert!(!excluded_interface("lo", false));
    }

    #[test]
    fn opencode_http_advert_is_keyed_by_address_and_port() {
        let ad = http_ad(
            "opencode-4096._http._tcp.local.",
            "opencode.local.",
            4096,
            &["10.77.1.1", "fe80::1"],
        );
        let Meaning::Endpoint(e) = interpret(&ad, &TrustCheck::default()) else {
            panic!("not an endpoint");
        };
        assert_eq!(e.key, "mdns:10.77.1.1:4096");
        assert_eq!(e.name, "opencode-4096@10.77.1.1");
        assert_eq!(e.hostname, None);
        assert_eq!(e.cwd, None);
        // A chosen --mdns-domain names the machine.
        let ad = http_ad(
            "opencode-4097._http._tcp.local.",
            "work.local.",
            4097,
            &["fe80::1"],
        );
        let Meaning::Endpoint(e) = interpret(&ad, &TrustCheck::default()) else {
            panic!("not an endpoint");
        };
        assert_eq!(e.key, "mdns:[fe80::1]:4097");
        assert_eq!(e.name, "opencode-4097@work");
    }

    #[test]
    fn other_http_services_are_ignored() {
        for (name, path) in [
            ("printer._http._tcp.local.", "/"),
            ("opencode-x._http._tcp.local.", "/"),
            ("opencode-._http._tcp.local.", "/"),
            ("opencode-4096._http._tcp.local.", "/admin"),
        ] {
            let mut ad = http_ad(name, "h.local.", 4096, &["10.0.0.1"]);
            ad.txt = vec![("path".into(), path.into())];
            assert_eq!(
                interpret(&ad, &TrustCheck::default()),
                Meaning::Ignored,
                "{name} {path}"
            );
        }
        assert!(is_opencode_instance_name("opencode-4096 (2)"));
    }

    #[test]
    fn repeated_resolves_and_removes_are_reported_once() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let ad = agent_ad("a._opencode._tcp.local.", "id-1", 4000, &["10.0.0.1"]);
        let c = t.resolved(&ad, now);
        assert_eq!(seen(&c).len(), 1);
        assert!(t.resolved(&ad, now).is_empty(), "same resolve again");
        // An IPv6 link-local address next to an IPv4 one changes nothing.
        let mut more = ad.clone();
        more.addrs.push((ip("fe80::1"), true));
        assert!(
            t.resolved(&more, now).is_empty(),
            "link-local v6 is dropped"
        );
        // Port change: Seen with the new port.
        let mut moved = ad.clone();
        moved.port = 4001;
        let c = t.resolved(&moved, now);
        assert_eq!(seen(&c)[0].port, 4001);
        // Removed twice: Gone once.
        assert_eq!(
            t.removed("a._opencode._tcp.local."),
            vec![Change::Gone("id-1".into())]
        );
        assert!(t.removed("a._opencode._tcp.local.").is_empty());
    }

    #[test]
    fn bad_txt_problem_is_listed_and_cleared() {
        let mut t = Tracker::default();
        let mut ad = agent_ad("bad._opencode._tcp.local.", "id-1", 4000, &["10.0.0.1"]);
        ad.txt = vec![("txtvers".into(), "9".into())];
        let c = t.resolved(&ad, Instant::now());
        let Some(Change::Problems(p)) = c.last() else {
            panic!("no problems: {c:?}");
        };
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].source, "bad._opencode._tcp.local.");
        assert!(p[0].reason.contains("txtvers"), "{}", p[0].reason);
        assert!(
            t.resolved(&ad, Instant::now()).is_empty(),
            "same problem again"
        );
        assert_eq!(
            t.removed("bad._opencode._tcp.local."),
            vec![Change::Problems(vec![])]
        );
    }

    #[test]
    fn one_id_under_two_names_is_one_endpoint_until_both_are_gone() {
        let mut t = Tracker::default();
        let now = Instant::now();
        t.resolved(
            &agent_ad("a._opencode._tcp.local.", "id-1", 4000, &["10.0.0.1"]),
            now,
        );
        // Renamed after a conflict: same id, new name, new port.
        let c = t.resolved(
            &agent_ad("a (2)._opencode._tcp.local.", "id-1", 4001, &["10.0.0.1"]),
            now,
        );
        assert_eq!(seen(&c)[0].port, 4001);
        // The old name lingering and refreshing does not win back.
        assert!(
            t.resolved(
                &agent_ad("a._opencode._tcp.local.", "id-1", 4000, &["10.0.0.1"]),
                now
            )
            .is_empty()
        );
        let c = t.removed("a (2)._opencode._tcp.local.");
        assert_eq!(seen(&c)[0].port, 4000);
        assert_eq!(
            t.removed("a._opencode._tcp.local."),
            vec![Change::Gone("id-1".into())]
        );
        assert_eq!(t.fullnames_of("id-1"), Vec::<String>::new());
    }

    #[test]
    fn opencode_http_advert_of_an_agent_instance_is_not_reported_twice() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let c = t.resolved(
            &http_ad(
                "opencode-4000._http._tcp.local.",
                "opencode.local.",
                4000,
                &["10.0.0.1"],
            ),
            now,
        );
        assert_eq!(seen(&c)[0].key, "mdns:10.0.0.1:4000");
        let c = t.resolved(
            &agent_ad("a._opencode._tcp.local.", "id-1", 4000, &["10.0.0.1"]),
            now,
        );
        assert!(
            c.contains(&Change::Gone("mdns:10.0.0.1:4000".into())),
            "{c:?}"
        );
        assert_eq!(seen(&c)[0].key, "id-1");
        let c = t.removed("a._opencode._tcp.local.");
        assert!(c.contains(&Change::Gone("id-1".into())));
        assert_eq!(seen(&c)[0].key, "mdns:10.0.0.1:4000");
    }

    #[test]
    fn stale_adverts_are_forgotten_after_a_resync() {
        let mut t = Tracker::default();
        let before = Instant::now();
        t.resolved(
            &agent_ad("a._opencode._tcp.local.", "id-1", 4000, &["10.0.0.1"]),
            before,
        );
        t.resolved(
            &http_ad(
                "opencode-1._http._tcp.local.",
                "opencode.local.",
                1,
                &["10.0.0.2"],
            ),
            before,
        );
        let after = before + Duration::from_millis(10);
        t.resolved(
            &agent_ad("b._opencode._tcp.local.", "id-2", 4000, &["10.0.0.3"]),
            after,
        );
        assert_eq!(
            t.forget_stale(Kind::Agent, after),
            vec![Change::Gone("id-1".into())]
        );
        assert_eq!(t.reported.len(), 2);
    }

    #[test]
    fn daemon_errors_are_problems_that_expire() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let c = t.daemon_error("send failed".into(), now);
        assert!(matches!(&c[..], [Change::Problems(p)] if p[0].source == DAEMON_SOURCE));
        assert!(t.daemon_error("send failed".into(), now).is_empty());
        assert!(
            t.expire_daemon_problem(now + Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(
            t.expire_daemon_problem(now + DAEMON_PROBLEM_TTL),
            vec![Change::Problems(vec![])]
        );
    }

    #[test]
    fn instance_labels_are_cut_from_full_names() {
        assert_eq!(
            instance_label("opencode-4096._http._tcp.local.", Kind::Http),
            "opencode-4096"
        );
        assert_eq!(
            instance_label("a.b._opencode._tcp.local.", Kind::Agent),
            "a.b"
        );
        assert_eq!(instance_label("weird", Kind::Http), "weird");
        assert_eq!(short_host("box.local."), Some("box".into()));
        assert_eq!(short_host("."), None);
    }
}
