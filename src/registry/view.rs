//! The live view: an immutable snapshot of every known instance, published by
//! the registry task after each change. Readers hold an `Arc<View>` and never
//! wait on the network or on a lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::broadcast;

use crate::opencode::{Event, OpenCodeClient, PermissionRequest, SessionStatus};
use crate::transport::{Endpoint, Problem, Reach, TransportKind};

/// One snapshot of everything the server knows.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Instances, sorted by name then key.
    pub instances: Vec<Arc<Instance>>,
    /// Current problems per transport.
    pub problems: BTreeMap<TransportKind, Vec<Problem>>,
    /// True once every transport finished its first look.
    pub transports_ready: bool,
    /// True once every transport finished its first look and every instance
    /// found then has had its first health check.
    pub settled: bool,
    /// Increases with every published change.
    pub generation: u64,
}

impl View {
    /// The instance with this key.
    pub fn get(&self, key: &str) -> Option<&Arc<Instance>> {
        self.instances.iter().find(|i| i.key == key)
    }

    /// Number of problems over all transports.
    pub fn problem_count(&self) -> usize {
        self.problems.values().map(Vec::len).sum()
    }
}

/// Reachability of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Discovered; the first health check is running.
    Checking,
    /// The last health check passed.
    Online {
        /// OpenCode's version.
        version: Option<String>,
    },
    /// Health checks fail.
    Offline {
        /// The last failure, as a sentence.
        reason: String,
        /// When the failures started.
        since: SystemTime,
    },
    /// Never contacted: no path passed the trust decision (unsigned or
    /// forged announcement, replay to another address, address outside the
    /// policy). Not health-checked, not followed, refused by every tool.
    Untrusted {
        /// Why, as a sentence with what to do; never contains a secret,
        /// password or signature.
        reason: String,
    },
}

impl Health {
    /// The state's name as tools show it: online, offline, checking or untrusted.
    pub fn label(&self) -> &'static str {
        match self {
            Health::Online { .. } => "online",
            Health::Offline { .. } => "offline",
            Health::Checking => "checking",
            Health::Untrusted { .. } => "untrusted",
        }
    }
}

/// State of the instance's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    /// No follower (instance not online).
    Idle,
    /// Connecting or reconnecting.
    Connecting,
    /// Connected and re-synced: statuses are live.
    Live,
}

/// The event fan-out of one instance. The channel is created on the first
/// subscription, so the many instances nobody is talking to cost nothing
/// (a broadcast channel allocates all its slots up front).
#[derive(Debug, Clone, Default)]
pub struct Fanout(Arc<std::sync::OnceLock<broadcast::Sender<Arc<Event>>>>);

impl Fanout {
    /// Capacity of the channel; a subscriber that falls this far behind sees
    /// `Lagged` and must re-read state from the API.
    const CAPACITY: usize = 512;

    /// Subscribes; events sent from now on are received.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.0
            .get_or_init(|| broadcast::channel(Self::CAPACITY).0)
            .subscribe()
    }

    /// Sends to the subscribers, if any.
    pub fn send(&self, event: Arc<Event>) {
        if let Some(tx) = self.0.get() {
            let _ = tx.send(event);
        }
    }
}

/// A permission request waiting for an answer, and since when we know of it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingPermission {
    /// The request as OpenCode states it.
    pub request: PermissionRequest,
    /// When this server first saw it.
    pub since: SystemTime,
}

/// A brief of the most recently updated session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionBrief {
    /// `ses_…`
    pub id: String,
    /// Title.
    pub title: String,
    /// Last update, epoch ms.
    pub updated: i64,
}

/// One instance as the view shows it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Identity (instance id, or a key derived from the source).
    pub key: String,
    /// Name users match against.
    pub name: String,
    /// Machine, as announced.
    pub hostname: Option<String>,
    /// Working directory, as announced.
    pub cwd: Option<String>,
    /// Every known way to reach it, best first.
    pub paths: Vec<Endpoint>,
    /// Index into `paths` of the one in use.
    pub active: usize,
    /// Client for the active path.
    pub client: OpenCodeClient,
    /// Reachability.
    pub health: Health,
    /// Event stream state.
    pub stream: Stream,
    /// Non-idle sessions and their status; absent means idle.
    pub statuses: HashMap<String, SessionStatus>,
    /// Most recently updated session, when known.
    pub recent: Option<SessionBrief>,
    /// Pending permission requests, oldest first.
    pub permissions: Vec<PendingPermission>,
    /// Live events from the follower; see [`Instance::subscribe`].
    pub events: Fanout,
    /// When this instance was first discovered.
    pub discovered: Instant,
}

impl Instance {
    /// The endpoint in use.
    pub fn endpoint(&self) -> &Endpoint {
        &self.paths[self.active.min(self.paths.len() - 1)]
    }

    /// Whether the instance answers health checks.
    pub fn is_online(&self) -> bool {
        matches!(self.health, Health::Online { .. })
    }

    /// Whether the instance is untrusted (and so never contacted).
    pub fn is_untrusted(&self) -> bool {
        matches!(self.health, Health::Untrusted { .. })
    }

    /// Whether the path in use is signed with the fleet secret.
    pub fn is_signed(&self) -> bool {
        self.endpoint().trust.is_signed()
    }

    /// Whether any session is working.
    pub fn is_busy(&self) -> bool {
        self.statuses.values().any(SessionStatus::is_active)
    }

    /// How it is reached.
    pub fn reach(&self) -> Reach {
        self.endpoint().reach
    }

    /// OpenCode's version, when online.
    pub fn version(&self) -> Option<&str> {
        match &self.health {
            Health::Online { version } => version.as_deref(),
            _ => None,
        }
    }
}
