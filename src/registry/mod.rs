//! The registry: one task that owns every instance's state.
//!
//! It applies, in order, what transports discover, what health checks find and
//! what event followers report, and publishes the result as an immutable
//! [`View`] through a `watch` channel. Readers never block on it. It starts
//! one health check per instance at a time (bounded by
//! HEALTH_CHECK_TIMEOUT_MS), one follower per online instance, and tells a
//! transport when an instance has been unreachable for the whole grace period.
//!
//! Before anything is contacted, every path passes [`policy::admit`]: with a
//! fleet secret only signed announcements, at addresses they signed; always
//! only addresses the address policy allows. An instance with no admitted
//! path is published as [`Health::Untrusted`] and never contacted (no health
//! check, no follower). With a secret, each instance's credentials are its
//! derived password ([`crate::secret::FleetSecret::instance_password`]);
//! without one, OPENCODE_SERVER_PASSWORD for all. It also caps how many
//! instances one transport may report (MAX_INSTANCES_PER_TRANSPORT).
//!
//! It must not format output for users or know about MCP.

mod follower;
pub mod policy;
mod view;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use view::{Fanout, Health, Instance, PendingPermission, SessionBrief, Stream, View};

use crate::config::{Config, Credentials};
use crate::error::Result;
use crate::opencode::client::http_client;
use crate::opencode::{ClientLimits, OpenCodeClient};
use crate::transport::{
    Discovery, Endpoint, Feedback, Transport, TransportKind, TransportLink, Trust,
};
use follower::{FollowerEvent, FollowerMsg};
use policy::AddressPolicy;

/// Handle to the running registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    /// The live view.
    view: watch::Receiver<Arc<View>>,
    /// Requests to the registry task.
    commands: mpsc::UnboundedSender<Command>,
    /// Stops the task, the transports and the followers.
    shutdown: CancellationToken,
}

enum Command {
    /// Re-check an instance's health now (a tool saw it fail).
    Recheck(String),
}

impl Registry {
    /// Starts the registry task and the transports. Returns at once: discovery
    /// runs in the background.
    pub fn start(config: &Config, transports: Vec<Box<dyn Transport>>) -> Result<Registry> {
        let shutdown = CancellationToken::new();
        let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (disc_tx, disc_rx) = mpsc::channel(1024);
        let mut feedback = HashMap::new();
        let mut pending_ready = Vec::new();
        for t in transports {
            let kind = t.kind();
            let (fb_tx, fb_rx) = mpsc::channel(64);
            feedback.insert(kind, fb_tx);
            pending_ready.push(kind);
            let link = TransportLink {
                events: disc_tx.clone(),
                feedback: fb_rx,
                shutdown: shutdown.child_token(),
            };
            tokio::spawn(async move {
                if let Err(e) = t.run(link).await {
                    tracing::error!(transport = %kind, error = %e, "transport stopped");
                }
            });
        }
        let http = http_client(config.health_timeout)?;
        let limits = ClientLimits {
            timeout: config.request_timeout,
            max_body_bytes: config.max_response_bytes,
            max_event_bytes: config.max_event_bytes,
        };
        let (fol_tx, fol_rx) = mpsc::unbounded_channel();
        let (health_tx, health_rx) = mpsc::unbounded_channel();
        let state = State {
            policy: AddressPolicy::new(config.allow_addresses.clone()),
            overflow: BTreeMap::new(),
            config: config.clone(),
            http,
            limits,
            entries: BTreeMap::new(),
            problems: BTreeMap::new(),
            pending_ready,
            feedback,
            view_tx,
            generation: 0,
            next_follower: 0,
            fol_tx,
            health_tx,
            shutdown: shutdown.clone(),
        };
        tokio::spawn(state.run(disc_rx, cmd_rx, fol_rx, health_rx));
        Ok(Registry {
            view: view_rx,
            commands: cmd_tx,
            shutdown,
        })
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every new view.
    pub fn watch(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    /// Waits until `pred` holds for the view, or `deadline` passes; returns the
    /// last view either way.
    pub async fn wait_for(
        &self,
        deadline: Duration,
        mut pred: impl FnMut(&View) -> bool,
    ) -> Arc<View> {
        let mut rx = self.view.clone();
        let wait = async {
            loop {
                let v = rx.borrow_and_update().clone();
                if pred(&v) {
                    return v;
                }
                if rx.changed().await.is_err() {
                    return v;
                }
            }
        };
        match tokio::time::timeout(deadline, wait).await {
            Ok(v) => v,
            Err(_) => self.view(),
        }
    }

    /// Asks for an immediate health re-check of `key`.
    pub fn recheck(&self, key: &str) {
        let _ = self.commands.send(Command::Recheck(key.to_string()));
    }

    /// Stops everything the registry started.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// What one transport reported beyond MAX_INSTANCES_PER_TRANSPORT.
struct Overflow {
    /// Held-back announcements, admitted in key order when a slot frees up;
    /// at most MAX_INSTANCES_PER_TRANSPORT of them.
    waiting: BTreeMap<String, Endpoint>,
    /// Keys beyond `waiting`'s capacity: a flood is counted, not stored;
    /// these come back when their transport reports them again.
    counted: std::collections::BTreeSet<String>,
    /// Since when the transport is over its cap (shown in the problem).
    since: SystemTime,
}

/// Registry-private state of one instance.
struct Entry {
    /// Every path as its transport announced it, by transport.
    seen: BTreeMap<TransportKind, Endpoint>,
    /// The admitted paths (trusted, addresses filtered), by transport; empty
    /// when the instance is untrusted.
    paths: BTreeMap<TransportKind, Endpoint>,
    /// The published instance (rebuilt on change).
    published: Arc<Instance>,
    /// A health check is running.
    checking: bool,
    /// When to check next.
    next_check: Instant,
    /// Consecutive failed checks (for backoff).
    failures: u32,
    /// The running follower.
    follower: Option<(u64, CancellationToken)>,
    /// Whether the first check has completed.
    checked_once: bool,
}

struct HealthResult {
    key: String,
    /// Index of the path that answered, or the error of the last path.
    outcome: std::result::Result<(usize, Option<String>), String>,
    /// The paths that were tried (ignore the result if they changed).
    tried: Vec<Endpoint>,
}

struct State {
    /// Which addresses may be contacted.
    policy: AddressPolicy,
    /// Instances each transport reported beyond MAX_INSTANCES_PER_TRANSPORT:
    /// never contacted while held back, admitted in turn as slots free up.
    overflow: BTreeMap<TransportKind, Overflow>,
    config: Config,
    http: reqwest::Client,
    limits: ClientLimits,
    entries: BTreeMap<String, Entry>,
    problems: BTreeMap<TransportKind, Vec<crate::transport::Problem>>,
    pending_ready: Vec<TransportKind>,
    feedback: HashMap<TransportKind, mpsc::Sender<Feedback>>,
    view_tx: watch::Sender<Arc<View>>,
    generation: u64,
    next_follower: u64,
    fol_tx: mpsc::UnboundedSender<FollowerMsg>,
    health_tx: mpsc::UnboundedSender<HealthResult>,
    shutdown: CancellationToken,
}

impl State {
    async fn run(
        mut self,
        mut disc_rx: mpsc::Receiver<Discovery>,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        mut fol_rx: mpsc::UnboundedReceiver<FollowerMsg>,
        mut health_rx: mpsc::UnboundedReceiver<HealthResult>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(d) = disc_rx.recv() => {
                    let mut c = self.on_discovery(d);
                    while let Ok(d) = disc_rx.try_recv() {
                        c |= self.on_discovery(d);
                    }
                    c
                }
                Some(h) = health_rx.recv() => {
                    let mut c = self.on_health(h).await;
                    while let Ok(h) = health_rx.try_recv() {
                        c |= self.on_health(h).await;
                    }
                    c
                }
                Some(m) = fol_rx.recv() => {
                    let mut c = self.on_follower(m);
                    while let Ok(m) = fol_rx.try_recv() {
                        c |= self.on_follower(m);
                    }
                    c
                }
                Some(Command::Recheck(key)) = cmd_rx.recv() => {
                    if let Some(e) = self.entries.get_mut(&key) {
                        e.next_check = Instant::now();
                    }
                    false
                }
                _ = tick.tick() => self.expire_signatures(),
            };
            self.start_due_checks();
            if changed {
                self.publish();
            }
        }
        for e in self.entries.values() {
            if let Some((_, stop)) = &e.follower {
                stop.cancel();
            }
        }
    }

    /// The credentials sent to instance `key`: its derived password with a
    /// fleet secret, else OPENCODE_SERVER_PASSWORD (if set).
    fn credentials_for(&self, key: &str) -> Option<Credentials> {
        match &self.config.secret {
            Some(secret) => Some(Credentials {
                username: self.config.username.clone(),
                password: secret.instance_password(key),
            }),
            None => self.config.credentials.clone(),
        }
    }

    fn client_for(&self, ep: &Endpoint) -> OpenCodeClient {
        OpenCodeClient::new(
            self.http.clone(),
            ep.base_url(),
            self.credentials_for(&ep.key),
            self.limits,
        )
    }

    /// A client that sends no credentials (for instances never contacted).
    fn anonymous_client(&self, ep: &Endpoint) -> OpenCodeClient {
        OpenCodeClient::new(self.http.clone(), ep.base_url(), None, self.limits)
    }

    /// How many instances `via` reports.
    fn reported_by(&self, via: TransportKind) -> usize {
        self.entries
            .values()
            .filter(|e| e.seen.contains_key(&via))
            .count()
    }

    /// Whether `ep`'s transport already reports as many instances as allowed
    /// and `ep` is not one of them; holds it back (logged once per episode).
    fn over_cap(&mut self, ep: &Endpoint) -> bool {
        let (via, max) = (ep.via, self.config.max_instances_per_transport);
        if self
            .entries
            .get(&ep.key)
            .is_some_and(|e| e.seen.contains_key(&via))
        {
            return false;
        }
        if self.reported_by(via) < max {
            return false;
        }
        let over = self.overflow.entry(via).or_insert_with(|| {
            tracing::warn!(transport = %via, "more than {max} instances reported; holding back the rest (MAX_INSTANCES_PER_TRANSPORT)");
            Overflow {
                waiting: BTreeMap::new(),
                counted: Default::default(),
                since: SystemTime::now(),
            }
        });
        if over.waiting.contains_key(&ep.key) || over.waiting.len() < max {
            over.counted.remove(&ep.key);
            over.waiting.insert(ep.key.clone(), ep.clone());
        } else {
            over.counted.insert(ep.key.clone());
        }
        true
    }

    /// Admits held-back instances of `via` while it is under its cap (a
    /// reported instance went away). Returns whether anything changed.
    fn admit_held(&mut self, via: TransportKind) -> bool {
        let mut changed = false;
        while self.overflow.contains_key(&via)
            && self.reported_by(via) < self.config.max_instances_per_transport
        {
            let Some(over) = self.overflow.get_mut(&via) else {
                break;
            };
            let Some((_, ep)) = over.waiting.pop_first() else {
                break;
            };
            if over.waiting.is_empty() && over.counted.is_empty() {
                self.overflow.remove(&via);
            }
            tracing::info!(transport = %via, instance = %ep.name, "admitting an instance held back by MAX_INSTANCES_PER_TRANSPORT");
            changed |= self.on_discovery(Discovery::Seen(ep));
        }
        changed
    }

    /// Re-applies the trust decision to every path of `key` and re-derives
    /// the published instance: admitted paths are health-checked; with none,
    /// the instance is untrusted and nothing is contacted.
    fn reevaluate(&mut self, key: &str) {
        self.policy.refresh();
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let mut admitted = BTreeMap::new();
        let mut reasons = Vec::new();
        for (via, ep) in &entry.seen {
            match policy::admit(ep, self.config.secret.as_ref(), &self.policy) {
                Ok(addrs) => {
                    let mut ep = ep.clone();
                    ep.addrs = addrs;
                    admitted.insert(*via, ep);
                }
                Err(reason) => reasons.push((*via, reason)),
            }
        }
        if admitted.is_empty() {
            let reason = match &reasons[..] {
                [(_, r)] => r.clone(),
                many => many
                    .iter()
                    .map(|(via, r)| format!("via {via}: {r}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            };
            let mut shown: Vec<Endpoint> = entry.seen.values().cloned().collect();
            shown.sort_by_key(|p| p.reach);
            let client = self.anonymous_client(&shown[0]);
            let Some(entry) = self.entries.get_mut(key) else {
                return;
            };
            if let Some((_, stop)) = entry.follower.take() {
                stop.cancel();
            }
            let was =
                matches!(&entry.published.health, Health::Untrusted { reason: r } if *r == reason);
            if !was {
                tracing::warn!(instance = %key, %reason, "untrusted instance; it is not contacted");
            }
            entry.paths.clear();
            entry.checked_once = true;
            let mut inst = (*entry.published).clone();
            inst.name = shown[0].name.clone();
            inst.hostname = shown[0].hostname.clone();
            inst.cwd = shown[0].cwd.clone();
            inst.paths = shown;
            inst.active = 0;
            inst.client = client;
            inst.health = Health::Untrusted { reason };
            inst.stream = Stream::Idle;
            inst.statuses.clear();
            inst.permissions.clear();
            entry.published = Arc::new(inst);
            return;
        }
        for (via, r) in &reasons {
            tracing::debug!(instance = %key, transport = %via, reason = %r, "path not admitted");
        }
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.paths == admitted && !entry.published.is_untrusted() {
            return;
        }
        entry.paths = admitted;
        // A changed address needs a fresh check.
        entry.next_check = Instant::now();
        if entry.published.is_untrusted() {
            let mut inst = (*entry.published).clone();
            inst.health = Health::Checking;
            entry.checked_once = false;
            entry.published = Arc::new(inst);
        }
        self.rebuild(key);
    }

    fn on_discovery(&mut self, d: Discovery) -> bool {
        match d {
            Discovery::Seen(ep) => {
                let key = ep.key.clone();
                if self.over_cap(&ep) {
                    return true;
                }
                match self.entries.get_mut(&key) {
                    Some(entry) => {
                        if entry.seen.get(&ep.via) == Some(&ep) {
                            return false;
                        }
                        entry.seen.insert(ep.via, ep);
                        self.reevaluate(&key);
                    }
                    None => {
                        let mut seen = BTreeMap::new();
                        seen.insert(ep.via, ep.clone());
                        let published = Arc::new(Instance {
                            key: key.clone(),
                            name: ep.name.clone(),
                            hostname: ep.hostname.clone(),
                            cwd: ep.cwd.clone(),
                            paths: vec![ep.clone()],
                            active: 0,
                            client: self.anonymous_client(&ep),
                            health: Health::Checking,
                            stream: Stream::Idle,
                            statuses: HashMap::new(),
                            recent: None,
                            permissions: Vec::new(),
                            events: Fanout::default(),
                            discovered: Instant::now(),
                        });
                        self.entries.insert(
                            key.clone(),
                            Entry {
                                seen,
                                paths: BTreeMap::new(),
                                published,
                                checking: false,
                                next_check: Instant::now(),
                                failures: 0,
                                follower: None,
                                checked_once: false,
                            },
                        );
                        self.reevaluate(&key);
                    }
                }
                true
            }
            Discovery::Gone { key, via } => {
                if let Some(over) = self.overflow.get_mut(&via)
                    && (over.waiting.remove(&key).is_some() || over.counted.remove(&key))
                {
                    if over.waiting.is_empty() && over.counted.is_empty() {
                        self.overflow.remove(&via);
                    }
                    return true;
                }
                let Some(entry) = self.entries.get_mut(&key) else {
                    return false;
                };
                entry.seen.remove(&via);
                if entry.seen.is_empty() {
                    if let Some(e) = self.entries.remove(&key)
                        && let Some((_, stop)) = e.follower
                    {
                        stop.cancel();
                    }
                } else {
                    self.reevaluate(&key);
                }
                self.admit_held(via);
                true
            }
            Discovery::Ready { via } => {
                self.pending_ready.retain(|k| *k != via);
                true
            }
            Discovery::Problems { via, problems } => {
                if problems.is_empty() {
                    self.problems.remove(&via);
                } else {
                    self.problems.insert(via, problems);
                }
                true
            }
        }
    }

    /// Takes the trust away from signed announcements that have outlived
    /// ANNOUNCE_MAX_AGE_S while unchanged (a transport re-reads an
    /// announcement only when it changes); a freshly signed one from the
    /// transport restores it. Returns whether anything changed.
    fn expire_signatures(&mut self) -> bool {
        let Some(max) = self.config.announce_max_age else {
            return false;
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut stale = Vec::new();
        for (key, entry) in &mut self.entries {
            let mut expired = false;
            for ep in entry.seen.values_mut() {
                if let Trust::Signed { at } = ep.trust
                    && now.saturating_sub(at) > max.as_secs()
                {
                    ep.trust = Trust::Invalid(crate::transport::too_old(now - at, false, max));
                    expired = true;
                }
            }
            if expired {
                stale.push(key.clone());
            }
        }
        for key in &stale {
            tracing::info!(instance = %key, "signed announcement older than ANNOUNCE_MAX_AGE_S and not renewed; no longer trusted");
            self.reevaluate(key);
        }
        !stale.is_empty()
    }

    /// Re-derives the published instance from its paths (after a path change).
    fn rebuild(&mut self, key: &str) {
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let mut paths: Vec<Endpoint> = entry.paths.values().cloned().collect();
        paths.sort_by_key(|p| p.reach);
        let old = &entry.published;
        let active_ep = old.endpoint().clone();
        let active = paths.iter().position(|p| *p == active_ep).unwrap_or(0);
        let best = paths[active].clone();
        let mut inst = (**old).clone();
        inst.name = best.name.clone();
        inst.hostname = best.hostname.clone();
        inst.cwd = best.cwd.clone();
        // Always: the old client may be an anonymous placeholder.
        inst.client = self.client_for(&best);
        inst.paths = paths;
        inst.active = active;
        if let Some(e) = self.entries.get_mut(key) {
            e.published = Arc::new(inst);
        }
    }

    fn start_due_checks(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                !e.checking
                    && e.next_check <= now
                    && !e.paths.is_empty()
                    && !e.published.is_untrusted()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            entry.checking = true;
            let paths = entry.published.paths.clone();
            let clients: Vec<OpenCodeClient> = paths.iter().map(|p| self.client_for(p)).collect();
            let timeout = self.config.health_timeout;
            let tx = self.health_tx.clone();
            tokio::spawn(async move {
                // Best path first (loopback > LAN > tailnet > relay), so a more
                // direct path is taken as soon as it works, and the others are
                // the fallback when it fails.
                let order: Vec<usize> = (0..paths.len()).collect();
                let mut last_err = String::from("no path to try");
                let mut outcome = None;
                for i in order {
                    match clients[i].health(timeout).await {
                        Ok(h) => {
                            outcome = Some(Ok((i, h.version)));
                            break;
                        }
                        Err(e) => last_err = e.to_string(),
                    }
                }
                let outcome = outcome.unwrap_or(Err(last_err));
                let _ = tx.send(HealthResult {
                    key,
                    outcome,
                    tried: paths,
                });
            });
        }
    }

    async fn on_health(&mut self, h: HealthResult) -> bool {
        let interval = self.config.discovery_interval;
        let prune_after = self.config.prune_after;
        let credentials = self.credentials_for(&h.key);
        let Some(entry) = self.entries.get_mut(&h.key) else {
            return false;
        };
        entry.checking = false;
        if entry.published.paths != h.tried || entry.published.is_untrusted() {
            // Paths changed while checking: check again with the new ones.
            entry.next_check = Instant::now();
            return false;
        }
        let mut inst = (*entry.published).clone();
        match h.outcome {
            Ok((idx, version)) => {
                entry.failures = 0;
                entry.next_check = Instant::now() + interval;
                let path_changed = idx != inst.active;
                if path_changed {
                    inst.active = idx;
                    inst.client = OpenCodeClient::new(
                        self.http.clone(),
                        inst.paths[idx].base_url(),
                        credentials,
                        self.limits,
                    );
                }
                let was_online = inst.is_online();
                if !was_online {
                    tracing::debug!(instance = %inst.name, since_discovery = ?inst.discovered.elapsed(), "instance online");
                }
                inst.health = Health::Online { version };
                if !was_online || path_changed || entry.follower.is_none() {
                    if let Some((_, stop)) = entry.follower.take() {
                        stop.cancel();
                    }
                    self.next_follower += 1;
                    let generation = self.next_follower;
                    let stop = self.shutdown.child_token();
                    entry.follower = Some((generation, stop.clone()));
                    inst.stream = Stream::Connecting;
                    tokio::spawn(follower::follow(
                        h.key.clone(),
                        generation,
                        inst.client.clone(),
                        inst.events.clone(),
                        self.fol_tx.clone(),
                        stop,
                    ));
                }
            }
            Err(reason)
                if inst.stream == Stream::Live && entry.follower.is_some() && inst.is_online() =>
            {
                // The event stream is connected (and beats every 10 s): the
                // instance is alive but slow, e.g. busy loading plugins for
                // its first prompt. Do not abandon work in progress over one
                // slow answer; a dead instance drops its stream, and a hung one
                // stops its heartbeats, and either ends the stream.
                tracing::debug!(instance = %inst.name, %reason, "health check failed while the event stream is live; retrying");
                entry.next_check = Instant::now() + Duration::from_secs(1);
                return false;
            }
            Err(reason) => {
                entry.failures = entry.failures.saturating_add(1);
                // Retry quickly at first, then settle at the scan interval.
                let backoff =
                    Duration::from_millis(500u64.saturating_mul(1 << entry.failures.min(6)));
                entry.next_check = Instant::now() + backoff.min(interval);
                let since = match &inst.health {
                    Health::Offline { since, .. } => *since,
                    _ => {
                        tracing::info!(instance = %inst.name, %reason, "instance offline");
                        for via in entry.seen.keys() {
                            if let Some(fb) = self.feedback.get(via) {
                                let _ = fb.try_send(Feedback::Unreachable { key: h.key.clone() });
                            }
                        }
                        SystemTime::now()
                    }
                };
                if let Some((_, stop)) = entry.follower.take() {
                    stop.cancel();
                }
                inst.stream = Stream::Idle;
                inst.statuses.clear();
                inst.permissions.clear();
                inst.health = Health::Offline { reason, since };
                if since.elapsed().unwrap_or_default() >= prune_after {
                    tracing::info!(instance = %inst.name, "dropping instance unreachable for {}s", prune_after.as_secs());
                    let vias: Vec<TransportKind> = entry.seen.keys().copied().collect();
                    self.entries.remove(&h.key);
                    for via in vias {
                        if let Some(fb) = self.feedback.get(&via) {
                            let _ = fb.send(Feedback::Expired { key: h.key.clone() }).await;
                        }
                        self.admit_held(via);
                    }
                    return true;
                }
            }
        }
        // A routine check that changes nothing must not publish a new view:
        // with many instances that is most checks.
        let old = &entry.published;
        let unchanged = old.health == inst.health
            && old.active == inst.active
            && old.stream == inst.stream
            && old.statuses == inst.statuses
            && old.permissions == inst.permissions;
        let first = !entry.checked_once;
        entry.checked_once = true;
        if unchanged && !first {
            return false;
        }
        entry.published = Arc::new(inst);
        true
    }

    fn on_follower(&mut self, m: FollowerMsg) -> bool {
        let Some(entry) = self.entries.get_mut(&m.key) else {
            return false;
        };
        if entry.follower.as_ref().map(|f| f.0) != Some(m.generation) {
            return false;
        }
        let mut inst = (*entry.published).clone();
        match m.what {
            FollowerEvent::Synced {
                statuses,
                recent,
                permissions,
            } => {
                inst.statuses = statuses
                    .into_iter()
                    .filter(|(_, s)| s.is_active())
                    .collect();
                if recent.is_some() {
                    inst.recent = recent;
                }
                // Keep the first-seen time of requests we already knew.
                let now = SystemTime::now();
                inst.permissions = permissions
                    .into_iter()
                    .map(|request| {
                        let since = inst
                            .permissions
                            .iter()
                            .find(|p| p.request.id == request.id)
                            .map_or(now, |p| p.since);
                        PendingPermission { request, since }
                    })
                    .collect();
                inst.stream = Stream::Live;
            }
            FollowerEvent::Status { session_id, status } => {
                if status.is_active() {
                    if inst.statuses.get(&session_id) == Some(&status) {
                        return false;
                    }
                    inst.statuses.insert(session_id, status);
                } else if inst.statuses.remove(&session_id).is_none() {
                    return false;
                }
            }
            FollowerEvent::Recent(brief) => {
                let newer = inst
                    .recent
                    .as_ref()
                    .is_none_or(|r| r.id == brief.id || brief.updated >= r.updated);
                if !newer || inst.recent.as_ref() == Some(&brief) {
                    return false;
                }
                inst.recent = Some(brief);
            }
            FollowerEvent::PermissionAsked(p) => {
                if inst.permissions.iter().any(|q| q.request.id == p.id) {
                    return false;
                }
                inst.permissions.push(PendingPermission {
                    request: p,
                    since: SystemTime::now(),
                });
            }
            FollowerEvent::PermissionReplied { request_id } => {
                inst.permissions.retain(|q| q.request.id != request_id);
            }
            FollowerEvent::Lost { reason } => {
                tracing::debug!(instance = %inst.name, %reason, "event stream lost; re-checking health");
                inst.stream = Stream::Connecting;
                entry.next_check = Instant::now();
            }
        }
        entry.published = Arc::new(inst);
        true
    }

    fn publish(&mut self) {
        self.generation += 1;
        let mut instances: Vec<Arc<Instance>> =
            self.entries.values().map(|e| e.published.clone()).collect();
        instances.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.key.cmp(&b.key)));
        let settled =
            self.pending_ready.is_empty() && self.entries.values().all(|e| e.checked_once);
        let mut problems = self.problems.clone();
        let max = self.config.max_instances_per_transport;
        for (via, over) in &self.overflow {
            problems.entry(*via).or_default().push(crate::transport::Problem::new(
                format!("{via} transport"),
                format!(
                    "{} more instance(s) than MAX_INSTANCES_PER_TRANSPORT={max} were reported; they are held back, never contacted, and admitted as others go away. Raise the limit if they are real, or look for a flood of forged announcements",
                    over.waiting.len() + over.counted.len()
                ),
                over.since,
            ));
        }
        let view = View {
            instances,
            problems,
            settled,
            transports_ready: self.pending_ready.is_empty(),
            generation: self.generation,
        };
        self.view_tx.send_replace(Arc::new(view));
    }
}
