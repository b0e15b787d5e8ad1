//! The `tailscale` transport: every online node of the tailnet, asked over
//! unicast DNS-SD.
//!
//! It reads the node list from tailscaled's LocalAPI (this machine's `Self`
//! and every `Peer` that is `Online`, not expired and has an address), and
//! browses each node's responder (`<first tailnet address>:<port>`, default
//! 5353, see [`crate::dnssd`]) concurrently: one datagram, one short
//! timeout, no retry, no cache. Every sweep interval it asks every node again;
//! a node that appears or changes address is asked at once; a node that goes
//! offline or leaves the status takes its instances with it at once.
//!
//! What an answer means:
//! - a reply (even an empty one) is the node's complete list: instances not in
//!   it are gone;
//! - silence or "port unreachable" is only a missed answer: a node's
//!   instances are dropped after [`TailscaleOptions::misses_before_gone`]
//!   such sweeps in a row, so one lost datagram, or the instant between one
//!   agent's responder exiting and another agent on that host taking the
//!   socket over, does not make instances flicker. (A node with no agent at
//!   all refuses at once, so it costs a sweep nothing.)
//!
//! Endpoints are keyed by the TXT `id` (so the registry merges a tailnet path
//! with LAN or relay paths of the same instance), reached with
//! [`Reach::Tailnet`] at the node's own tailnet addresses (never at an address
//! a reply names that does not belong to the node that sent it), and named
//! after the node's MagicDNS name when the TXT has no host.
//!
//! Signatures are checked over (TXT `id`, SRV port, TXT `addrs`, TXT `at`);
//! the registry then contacts only node addresses the signature names.
//!
//! It must not health-check or talk to OpenCode (the registry does), must not
//! parse TXT records itself ([`Announcement::from_txt`] does), and never
//! publishes anything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{
    Discovery, Endpoint, Feedback, Problem, Reach, Transport, TransportKind, TransportLink,
    TrustCheck,
};
use crate::announce::txt::Announcement;
use crate::config::Config;
use crate::dnssd::query::{FoundInstance, QueryError, browse};
use crate::error::{Error, Result};
use crate::tailscale::{LocalApi, PeerStatus, Status};

/// Longest interval between two sweeps (DISCOVERY_INTERVAL_MS may shorten it).
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Longest interval between two status reads.
pub const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// Status reads that may fail in a row before the node list is dropped.
const STATUS_FAILURES_BEFORE_DROP: u32 = 3;
/// Source named in problems about Tailscale itself.
const STATUS_SOURCE: &str = "tailscale";

/// Settings of the tailscale transport.
#[derive(Debug, Clone)]
pub struct TailscaleOptions {
    /// The LocalAPI client.
    pub api: LocalApi,
    /// UDP port the agents answer on.
    pub port: u16,
    /// Per-node query timeout.
    pub query_timeout: Duration,
    /// How often every node is asked again.
    pub sweep_every: Duration,
    /// How often the node list is re-read.
    pub status_every: Duration,
    /// Silent sweeps in a row after which a node's instances are gone.
    pub misses_before_gone: u32,
}

impl TailscaleOptions {
    /// Options from the configuration (TAILSCALE_SOCKET,
    /// TAILSCALE_DNSSD_PORT, TAILSCALE_QUERY_TIMEOUT_MS and the discovery
    /// interval).
    pub fn from_config(config: &Config) -> Self {
        let sweep_every = config.discovery_interval.min(MAX_SWEEP_INTERVAL);
        let api = match &config.tailscale_socket {
            Some(socket) => LocalApi::new(socket.clone(), true),
            None => LocalApi::new(crate::tailscale::default_socket(), false),
        };
        Self {
            api,
            port: config.tailscale_dnssd_port,
            query_timeout: config.tailscale_query_timeout,
            sweep_every,
            status_every: sweep_every.min(MAX_STATUS_INTERVAL),
            misses_before_gone: 2,
        }
    }
}

/// Discovers OpenCode instances on the tailnet.
pub struct Tailscale {
    /// Settings.
    opts: TailscaleOptions,
    /// Signature checks (none by default).
    trust: TrustCheck,
}

impl Tailscale {
    /// Checks that tailscaled answers and is connected. Fails with
    /// [`Error::TransportUnavailable`] saying why not.
    pub fn new(opts: TailscaleOptions) -> Result<Self> {
        let unavailable = |reason: String| Error::TransportUnavailable {
            transport: "tailscale",
            reason,
        };
        let status = opts.api.status_blocking().map_err(|e| {
            unavailable(format!(
                "{}. Is Tailscale installed and running? Set TAILSCALE_SOCKET if tailscaled uses another socket",
                match e {
                    Error::Tailscale(m) => m,
                    other => other.to_string(),
                }
            ))
        })?;
        if let Some(reason) = status.not_running_reason() {
            return Err(unavailable(reason));
        }
        Ok(Self {
            opts,
            trust: TrustCheck::default(),
        })
    }

    /// Checks announcement signatures with `trust` (the fleet secret).
    pub fn with_trust(mut self, trust: TrustCheck) -> Self {
        self.trust = trust;
        self
    }
}

impl Transport for Tailscale {
    fn kind(&self) -> TransportKind {
        TransportKind::Tailscale
    }

    fn run(self: Box<Self>, link: TransportLink) -> BoxFuture<'static, Result<()>> {
        run(self.opts, self.trust, link).boxed()
    }
}

/// One node being asked.
#[derive(Debug)]
struct Node {
    /// The node as the status last described it.
    peer: PeerStatus,
    /// Whether this is the machine itself.
    is_self: bool,
    /// Instances from its last answer, by key.
    endpoints: BTreeMap<String, Endpoint>,
    /// TXT records that did not parse, as (source, reason).
    bad: Vec<(String, String)>,
    /// Silent sweeps in a row.
    misses: u32,
    /// A query is running.
    in_flight: bool,
    /// Bumped when the node's address changes; older answers are ignored.
    generation: u64,
}

impl Node {
    fn target(&self, port: u16) -> Option<SocketAddr> {
        self.peer
            .addrs()
            .first()
            .map(|ip| SocketAddr::new(*ip, port))
    }
}

/// A finished query.
struct Answer {
    /// Node key.
    node: String,
    /// Generation the query was made for.
    generation: u64,
    /// What came back.
    result: std::result::Result<Vec<FoundInstance>, QueryError>,
}

/// The endpoint an answer describes, or why it cannot be one.
fn endpoint_of(
    peer: &PeerStatus,
    f: &FoundInstance,
    dnssd: SocketAddr,
    check: &TrustCheck,
) -> std::result::Result<Endpoint, String> {
    let txt = f.txt.as_ref().ok_or("no TXT record in the answer")?;
    let port = f.port.ok_or("no SRV record in the answer")?;
    if port == 0 {
        return Err("SRV port 0".into());
    }
    let a = Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let own = peer.addrs();
    // Only the node's own tailnet addresses: an answer cannot send us elsewhere.
    let mut addrs: Vec<IpAddr> = own
        .iter()
        .copied()
        .filter(|ip| f.addrs.contains(ip))
        .collect();
    if addrs.is_empty() {
        addrs = own;
    }
    let trust = check.assess(
        &a.id,
        port,
        &a.signed_addrs,
        a.signature.as_ref(),
        SystemTime::now(),
    );
    Ok(Endpoint {
        trust,
        key: a.id.clone(),
        name: a.name.clone(),
        hostname: a
            .hostname
            .clone()
            .or(a.magic_dns.clone())
            .or_else(|| peer.magic_dns()),
        cwd: a.cwd.clone(),
        addrs,
        port,
        via: TransportKind::Tailscale,
        reach: Reach::Tailnet,
        source: format!("tailnet {} ({dnssd}) {}", peer.display_name(), f.label),
        connected_at: None,
        signed_addrs: a.signed_addrs.clone(),
    })
}

/// The transport's state between events.
struct State {
    /// Settings.
    opts: TailscaleOptions,
    /// Nodes being asked, by key.
    nodes: BTreeMap<String, Node>,
    /// Endpoints as last reported, by key.
    sent: BTreeMap<String, Endpoint>,
    /// A problem reading the status, and since when.
    status_problem: Option<(String, SystemTime)>,
    /// When each TXT problem was first seen.
    bad_since: BTreeMap<(String, String), SystemTime>,
    /// Status reads failed in a row.
    status_failures: u32,
    /// Problems as last reported.
    sent_problems: Vec<Problem>,
    /// Finished queries come back here.
    answers_tx: mpsc::UnboundedSender<Answer>,
    /// Nodes whose first answer is awaited before `Ready`.
    first_round: Option<BTreeSet<String>>,
    /// Signature checks.
    check: TrustCheck,
}

impl State {
    /// Starts a query of `key` unless one is running.
    fn ask(&mut self, key: &str) {
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        if node.in_flight {
            return;
        }
        let Some(target) = node.target(self.opts.port) else {
            return;
        };
        node.in_flight = true;
        let (tx, generation, timeout) = (
            self.answers_tx.clone(),
            node.generation,
            self.opts.query_timeout,
        );
        let name = key.to_string();
        tokio::spawn(async move {
            let result = browse(target, timeout).await;
            let _ = tx.send(Answer {
                node: name,
                generation,
                result,
            });
        });
    }

    fn ask_all(&mut self) {
        let keys: Vec<String> = self.nodes.keys().cloned().collect();
        for k in keys {
            self.ask(&k);
        }
    }

    /// Re-reads the node list; asks new and changed nodes at once.
    async fn refresh(&mut self) {
        let status = self.opts.api.status().await;
        let now = SystemTime::now();
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                self.status_failures += 1;
                let reason = match e {
                    Error::Tailscale(m) => m,
                    other => other.to_string(),
                };
                tracing::debug!(error = %reason, failures = self.status_failures, "cannot read the Tailscale status");
                self.set_status_problem(Some(reason), now);
                if self.status_failures >= STATUS_FAILURES_BEFORE_DROP {
                    self.nodes.clear();
                }
                return;
            }
        };
        self.status_failures = 0;
        if let Some(reason) = status.not_running_reason() {
            self.set_status_problem(Some(reason), now);
            self.nodes.clear();
            return;
        }
        self.set_status_problem(None, now);
        self.apply_status(&status);
    }

    fn set_status_problem(&mut self, reason: Option<String>, now: SystemTime) {
        match reason {
            None => self.status_problem = None,
            Some(r) => {
                let since = match &self.status_problem {
                    Some((old, since)) if *old == r => *since,
                    _ => now,
                };
                self.status_problem = Some((r, since));
            }
        }
    }

    /// Takes the node list of `status`: drops nodes that left or went
    /// offline, adds new ones, re-asks nodes whose address changed.
    fn apply_status(&mut self, status: &Status) {
        let mut current: BTreeMap<String, (PeerStatus, bool)> = BTreeMap::new();
        if let Some(me) = &status.self_node {
            let mut me = me.clone();
            if me.addrs().is_empty() {
                me.tailscale_ips = status.tailscale_ips.clone();
            }
            if !me.addrs().is_empty() {
                current.insert(format!("self:{}", me.key()), (me, true));
            }
        }
        for p in status.online_peers() {
            current.insert(p.key(), (p.clone(), false));
        }
        let before = self.nodes.len();
        self.nodes.retain(|k, n| {
            let keep = current.contains_key(k);
            if !keep {
                tracing::debug!(node = %n.peer.display_name(), "tailnet node left or went offline");
            }
            keep
        });
        let mut to_ask = Vec::new();
        for (k, (peer, is_self)) in current {
            match self.nodes.get_mut(&k) {
                Some(n) => {
                    if n.peer.addrs() != peer.addrs() {
                        n.generation += 1;
                        n.in_flight = false;
                        n.endpoints.clear();
                        n.bad.clear();
                        n.misses = 0;
                        to_ask.push(k.clone());
                    }
                    n.peer = peer;
                }
                None => {
                    tracing::debug!(node = %peer.display_name(), "tailnet node online");
                    self.nodes.insert(
                        k.clone(),
                        Node {
                            peer,
                            is_self,
                            endpoints: BTreeMap::new(),
                            bad: Vec::new(),
                            misses: 0,
                            in_flight: false,
                            generation: 0,
                        },
                    );
                    to_ask.push(k);
                }
            }
        }
        if before != self.nodes.len() || !to_ask.is_empty() {
            tracing::debug!(nodes = self.nodes.len(), "tailnet node list changed");
        }
        for k in to_ask {
            self.ask(&k);
        }
    }

    /// Applies a finished query.
    fn on_answer(&mut self, a: Answer) {
        if let Some(first) = &mut self.first_round {
            first.remove(&a.node);
        }
        let port = self.opts.port;
        let misses_before_gone = self.opts.misses_before_gone;
        let Some(node) = self.nodes.get_mut(&a.node) else {
            return;
        };
        if node.generation != a.generation {
            return;
        }
        node.in_flight = false;
        let Some(target) = node.target(port) else {
            return;
        };
        match a.result {
            Ok(found) => {
                node.misses = 0;
                node.endpoints.clear();
                node.bad.clear();
                for f in &found {
                    match endpoint_of(&node.peer, f, target, &self.check) {
                        Ok(ep) => {
                            node.endpoints.entry(ep.key.clone()).or_insert(ep);
                        }
                        Err(reason) => node.bad.push((
                            format!("tailnet {} {}", node.peer.display_name(), f.label),
                            reason,
                        )),
                    }
                }
            }
            Err(QueryError::Bad(reason)) => {
                node.misses = 0;
                node.endpoints.clear();
                node.bad = vec![(
                    format!("tailnet {} ({target})", node.peer.display_name()),
                    reason,
                )];
            }
            Err(e) => {
                node.misses += 1;
                if node.misses >= misses_before_gone && !node.endpoints.is_empty() {
                    tracing::debug!(node = %node.peer.display_name(), error = %e, "tailnet node stopped answering; its instances are gone");
                    node.endpoints.clear();
                }
                if node.is_self && node.misses == 1 {
                    tracing::trace!(error = %e, "no responder on this machine's tailnet address");
                }
            }
        }
    }

    /// The key of the node that reported endpoint `key`.
    fn node_of(&self, key: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|(_, n)| n.endpoints.contains_key(key))
            .map(|(k, _)| k.clone())
    }

    /// Endpoints that should be reported now (the first node to report a key wins).
    fn wanted(&self) -> BTreeMap<String, Endpoint> {
        let mut out = BTreeMap::new();
        for n in self.nodes.values() {
            for (k, ep) in &n.endpoints {
                out.entry(k.clone()).or_insert_with(|| ep.clone());
            }
        }
        out
    }

    fn problems(&mut self, now: SystemTime) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some((reason, since)) = &self.status_problem {
            out.push(Problem::new(STATUS_SOURCE, reason.clone(), *since));
        }
        let current: BTreeSet<(String, String)> = self
            .nodes
            .values()
            .flat_map(|n| n.bad.iter().cloned())
            .collect();
        self.bad_since.retain(|k, _| current.contains(k));
        for k in current {
            let since = *self.bad_since.entry(k.clone()).or_insert(now);
            out.push(Problem::new(k.0, k.1, since));
        }
        out
    }

    /// Sends what changed since the last call.
    async fn report(&mut self, events: &mpsc::Sender<Discovery>) {
        let wanted = self.wanted();
        let gone: Vec<String> = self
            .sent
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.sent.remove(&key);
            let _ = events
                .send(Discovery::Gone {
                    key,
                    via: TransportKind::Tailscale,
                })
                .await;
        }
        for (k, ep) in wanted {
            if self.sent.get(&k) != Some(&ep) {
                self.sent.insert(k, ep.clone());
                let _ = events.send(Discovery::Seen(ep)).await;
            }
        }
        let problems = self.problems(SystemTime::now());
        if problems != self.sent_problems {
            self.sent_problems = problems.clone();
            let _ = events
                .send(Discovery::Problems {
                    via: TransportKind::Tailscale,
                    problems,
                })
                .await;
        }
    }
}

async fn run(opts: TailscaleOptions, check: TrustCheck, mut link: TransportLink) -> Result<()> {
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let mut st = State {
        opts: opts.clone(),
        nodes: BTreeMap::new(),
        sent: BTreeMap::new(),
        status_problem: None,
        bad_since: BTreeMap::new(),
        status_failures: 0,
        sent_problems: Vec::new(),
        answers_tx,
        first_round: None,
        check,
    };
    st.refresh().await;
    st.first_round = Some(st.nodes.keys().cloned().collect());
    let mut ready_sent = false;
    let mut status_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + opts.status_every,
        opts.status_every,
    );
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + opts.sweep_every,
        opts.sweep_every,
    );
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !ready_sent && st.first_round.as_ref().is_none_or(|f| f.is_empty()) {
            st.report(&link.events).await;
            ready_sent = true;
            st.first_round = None;
            let _ = link
                .events
                .send(Discovery::Ready {
                    via: TransportKind::Tailscale,
                })
                .await;
        }
        tokio::select! {
            _ = link.shutdown.cancelled() => return Ok(()),
            _ = status_tick.tick() => st.refresh().await,
            _ = sweep_tick.tick() => st.ask_all(),
            Some(a) = answers.recv() => {
                st.on_answer(a);
                while let Ok(a) = answers.try_recv() {
                    st.on_answer(a);
                }
            }
            Some(fb) = link.feedback.recv() => {
                if let Feedback::Unreachable { key } = fb
                    && let Some(node) = st.node_of(&key)
                {
                    st.ask(&node);
                }
            }
        }
        // Report as answers arrive: a slow or silent node delays only itself.
        st.report(&link.events).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, ips: &[&str]) -> PeerStatus {
        PeerStatus {
            id: format!("n{name}"),
            host_name: name.into(),
            dns_name: format!("{name}.tail1234.ts.net."),
            tailscale_ips: ips.iter().map(|s| s.to_string()).collect(),
            online: true,
            ..Default::default()
        }
    }

    fn found(label: &str, id: &str, host: Option<&str>, addrs: &[&str]) -> FoundInstance {
        let a = Announcement {
            id: id.into(),
            name: label.into(),
            hostname: host.map(str::to_string),
            cwd: Some("/p".into()),
            ..Default::default()
        };
        FoundInstance {
            label: label.into(),
            host: Some("h.local.".into()),
            port: Some(4096),
            txt: Some(a.to_txt()),
            addrs: addrs.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn dnssd() -> SocketAddr {
        "100.90.1.2:5353".parse().unwrap()
    }

    #[test]
    fn endpoints_are_keyed_by_id_and_reached_over_the_tailnet() {
        let p = peer("laptop", &["fd7a:115c:a1e0::2", "100.90.1.2"]);
        let ep = endpoint_of(
            &p,
            &found("proj", "id-1", Some("laptop"), &["100.90.1.2"]),
            dnssd(),
            &TrustCheck::default(),
        )
        .unwrap();
        assert_eq!(ep.key, "id-1");
        assert_eq!(ep.reach, Reach::Tailnet);
        assert_eq!(ep.via, TransportKind::Tailscale);
        assert_eq!(ep.addrs, vec!["100.90.1.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(ep.port, 4096);
        assert_eq!(ep.hostname.as_deref(), Some("laptop"));
        assert_eq!(ep.base_url(), "http://100.90.1.2:4096");
    }

    #[test]
    fn magicdns_name_is_the_hostname_when_the_txt_has_none() {
        let p = peer("laptop", &["100.90.1.2"]);
        let ep = endpoint_of(
            &p,
            &found("proj", "id-1", None, &[]),
            dnssd(),
            &TrustCheck::default(),
        )
        .unwrap();
        assert_eq!(ep.hostname.as_deref(), Some("laptop.tail1234.ts.net"));
        // No A records: the node's own addresses.
        assert_eq!(ep.addrs, vec!["100.90.1.2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn answers_cannot_point_outside_the_node() {
        let p = peer("laptop", &["100.90.1.2"]);
        let ep = endpoint_of(
            &p,
            &found("proj", "id-1", None, &["127.0.0.1", "10.0.0.5"]),
            dnssd(),
            &TrustCheck::default(),
        )
        .unwrap();
        assert_eq!(ep.addrs, vec!["100.90.1.2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn incomplete_or_foreign_records_are_refused_with_a_reason() {
        let p = peer("laptop", &["100.90.1.2"]);
        let mut f = found("proj", "id-1", None, &[]);
        f.txt = Some(vec![("foo".into(), "bar".into())]);
        assert!(
            endpoint_of(&p, &f, dnssd(), &TrustCheck::default())
                .unwrap_err()
                .contains("txtvers")
        );
        f.txt = None;
        assert!(
            endpoint_of(&p, &f, dnssd(), &TrustCheck::default())
                .unwrap_err()
                .contains("TXT")
        );
        let mut f = found("proj", "id-1", None, &[]);
        f.port = None;
        assert!(
            endpoint_of(&p, &f, dnssd(), &TrustCheck::default())
                .unwrap_err()
                .contains("SRV")
        );
    }

    fn state() -> (State, mpsc::UnboundedReceiver<Answer>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let opts = TailscaleOptions {
            api: LocalApi::new("/nonexistent".into(), true).with_cli(None),
            port: 5353,
            query_timeout: Duration::from_millis(50),
            sweep_every: Duration::from_secs(1),
            status_every: Duration::from_secs(1),
            misses_before_gone: 2,
        };
        let st = State {
            opts,
            nodes: BTreeMap::new(),
            sent: BTreeMap::new(),
            status_problem: None,
            bad_since: BTreeMap::new(),
            status_failures: 0,
            sent_problems: Vec::new(),
            answers_tx: tx,
            first_round: None,
            check: TrustCheck::default(),
        };
        (st, rx)
    }

    fn status_with(peers: &[(&str, &str, bool)]) -> Status {
        let mut st = Status {
            backend_state: "Running".into(),
            ..Default::default()
        };
        for (name, ip, online) in peers {
            let mut p = peer(name, &[ip]);
            p.online = *online;
            st.peer.insert(format!("nodekey:{name}"), p);
        }
        st
    }

    #[tokio::test]
    async fn silence_drops_instances_only_after_repeated_misses_but_offline_drops_at_once() {
        let (mut st, _rx) = state();
        st.apply_status(&status_with(&[("a", "100.90.1.2", true)]));
        let key = "na".to_string();
        let gen0 = st.nodes[&key].generation;
        st.on_answer(Answer {
            node: key.clone(),
            generation: gen0,
            result: Ok(vec![found("proj", "id-1", None, &[])]),
        });
        assert_eq!(st.wanted().len(), 1);
        st.on_answer(Answer {
            node: key.clone(),
            generation: gen0,
            result: Err(QueryError::Timeout(Duration::from_millis(1))),
        });
        assert_eq!(st.wanted().len(), 1, "one miss keeps the instance");
        st.on_answer(Answer {
            node: key.clone(),
            generation: gen0,
            result: Err(QueryError::Timeout(Duration::from_millis(1))),
        });
        assert!(st.wanted().is_empty(), "two misses drop it");
        st.on_answer(Answer {
            node: key.clone(),
            generation: gen0,
            result: Ok(vec![found("proj", "id-1", None, &[])]),
        });
        assert_eq!(st.wanted().len(), 1);
        st.apply_status(&status_with(&[("a", "100.90.1.2", false)]));
        assert!(st.wanted().is_empty(), "offline drops at once");
    }

    #[tokio::test]
    async fn empty_answers_are_complete_lists_and_refusals_are_misses() {
        let (mut st, _rx) = state();
        st.apply_status(&status_with(&[("a", "100.90.1.2", true)]));
        let key = "na".to_string();
        let ok = |v| Answer {
            node: key.clone(),
            generation: 0,
            result: Ok(v),
        };
        st.on_answer(ok(vec![
            found("p1", "id-1", None, &[]),
            found("p2", "id-2", None, &[]),
        ]));
        assert_eq!(st.wanted().len(), 2);
        st.on_answer(ok(vec![found("p2", "id-2", None, &[])]));
        assert_eq!(st.wanted().keys().collect::<Vec<_>>(), vec!["id-2"]);
        let refused = || Answer {
            node: "na".into(),
            generation: 0,
            result: Err(QueryError::Refused),
        };
        st.on_answer(refused());
        assert_eq!(
            st.wanted().len(),
            1,
            "one refusal may be a responder hand-over"
        );
        st.on_answer(refused());
        assert!(st.wanted().is_empty());
        st.on_answer(ok(vec![found("p2", "id-2", None, &[])]));
        st.on_answer(ok(vec![]));
        assert!(st.wanted().is_empty(), "an empty answer empties at once");
    }

    #[tokio::test]
    async fn answers_for_an_old_address_are_ignored() {
        let (mut st, _rx) = state();
        st.apply_status(&status_with(&[("a", "100.90.1.2", true)]));
        st.apply_status(&status_with(&[("a", "100.90.1.9", true)]));
        st.on_answer(Answer {
            node: "na".into(),
            generation: 0,
            result: Ok(vec![found("p1", "id-1", None, &[])]),
        });
        assert!(st.wanted().is_empty());
    }

    #[tokio::test]
    async fn a_bad_txt_is_a_problem_not_an_endpoint() {
        let (mut st, _rx) = state();
        st.apply_status(&status_with(&[("a", "100.90.1.2", true)]));
        let mut f = found("p1", "id-1", None, &[]);
        f.txt = Some(vec![("txtvers".into(), "9".into())]);
        st.on_answer(Answer {
            node: "na".into(),
            generation: 0,
            result: Ok(vec![f]),
        });
        assert!(st.wanted().is_empty());
        let p = st.problems(SystemTime::now());
        assert_eq!(p.len(), 1);
        assert!(p[0].reason.contains("txtvers"), "{:?}", p[0]);
        assert!(p[0].source.contains("a.tail1234.ts.net"), "{:?}", p[0]);
    }
}
