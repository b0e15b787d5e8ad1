//! Tools `instances` and `sessions`: what is out there, and what each
//! instance has been working on. `instances` answers from the live view
//! without touching the network.

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{ErrorData as McpError, tool, tool_router};
use schemars::JsonSchema;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::OpenCodeMcp;
use super::format::{ago, fail, ok};
use crate::registry::{Health, Instance, Stream, View};
use crate::transport::{Reach, TransportKind};

/// Arguments of `instances`. All optional: the seed's call with none lists
/// the first page of every instance; extra keys are ignored like the seed did.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct InstancesArgs {
    /// Only instances in this state: online, busy, idle, offline, checking or untrusted.
    #[serde(default)]
    pub status: Option<String>,
    /// Only instances whose name, hostname or cwd contains this text (case-insensitive).
    #[serde(default)]
    pub query: Option<String>,
    /// How many instances to list (default 50, at most 1000). Large fleets
    /// are paged so the answer fits an assistant's context.
    #[serde(default)]
    pub limit: Option<f64>,
    /// How many matching instances to skip (paging; see `next_offset`).
    #[serde(default)]
    pub offset: Option<f64>,
}

/// Default page size of `instances`: about 8k tokens of output, well under
/// what MCP clients accept from one tool call (Claude Code warns at 10k and
/// cuts at 25k), while a usual fleet (a handful of machines) fits whole.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page.
pub const MAX_LIMIT: usize = 1000;

/// Which instances a listing shows.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Keep only this state.
    status: Option<StatusFilter>,
    /// Lower-cased text that name, hostname or cwd must contain.
    query: Option<String>,
    /// Matching instances skipped.
    offset: usize,
    /// Page size; `None` lists every match (resources, the CLI).
    limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFilter {
    Online,
    Busy,
    Idle,
    Offline,
    Checking,
    Untrusted,
}

impl Selection {
    /// Every instance, unpaged.
    pub fn all() -> Self {
        Self::default()
    }

    /// The selection a tool call asks for; the error is a sentence.
    pub fn from_args(args: &InstancesArgs) -> Result<Self, String> {
        let status = match args
            .status
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(s) => Some(match s.to_ascii_lowercase().as_str() {
                "online" => StatusFilter::Online,
                "busy" => StatusFilter::Busy,
                "idle" => StatusFilter::Idle,
                "offline" => StatusFilter::Offline,
                "checking" => StatusFilter::Checking,
                "untrusted" => StatusFilter::Untrusted,
                _ => {
                    return Err(format!(
                        "Unknown status \"{s}\". Use one of: online, busy, idle, offline, checking, untrusted (or leave it out for all)."
                    ));
                }
            }),
        };
        let query = args
            .query
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(str::to_lowercase);
        let count = |v: Option<f64>| v.filter(|v| v.is_finite()).map(|v| v.max(0.0) as usize);
        Ok(Self {
            status,
            query,
            offset: count(args.offset).unwrap_or(0),
            limit: Some(
                count(args.limit)
                    .unwrap_or(DEFAULT_LIMIT)
                    .clamp(1, MAX_LIMIT),
            ),
        })
    }

    fn matches(&self, i: &Instance) -> bool {
        let status_ok = match self.status {
            None => true,
            Some(StatusFilter::Online) => i.is_online(),
            Some(StatusFilter::Busy) => i.is_online() && i.is_busy(),
            Some(StatusFilter::Idle) => i.is_online() && !i.is_busy(),
            Some(StatusFilter::Offline) => matches!(i.health, Health::Offline { .. }),
            Some(StatusFilter::Checking) => matches!(i.health, Health::Checking),
            Some(StatusFilter::Untrusted) => i.is_untrusted(),
        };
        status_ok
            && self.query.as_deref().is_none_or(|q| {
                [Some(&i.name), i.hostname.as_ref(), i.cwd.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|field| super::resolve::contains_ignore_case(field, q))
            })
    }
}

/// One instance in `instances` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct InstanceInfo {
    /// Name to pass as `instance` to the other tools.
    pub name: String,
    /// Stable identity (instance id, or a key derived from the source); also accepted as `instance`.
    pub key: String,
    /// Machine it runs on, when announced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Working directory, when announced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// online, offline, checking or untrusted (never contacted; see `untrusted_reason`).
    pub status: String,
    /// For online instances: `signed` (announcement signed with the fleet
    /// secret, per-instance password) or `unsigned` (no secret configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
    /// Why an untrusted instance is never contacted, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untrusted_reason: Option<String>,
    /// idle or busy (busy includes retrying); absent unless online.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    /// Sessions that are working, with their status (left out when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub busy_sessions: Vec<BusySession>,
    /// Most recently updated session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent_session: Option<SessionRef>,
    /// OpenCode version, when online.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// How it is reached: loopback, lan, tailnet or relay.
    pub reach: Reach,
    /// Transport that found the path in use.
    pub transport: TransportKind,
    /// Base URL of OpenCode's API on the path in use.
    pub url: String,
    /// Whether live status comes from the event stream right now.
    pub live: bool,
    /// Pending permission requests waiting for an answer.
    pub pending_permissions: usize,
    /// Why it is offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_reason: Option<String>,
    /// For how many seconds it has been offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_for_s: Option<u64>,
}

/// A working session.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BusySession {
    /// Session id.
    pub session_id: String,
    /// busy or retry.
    pub status: String,
}

/// A session reference.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SessionRef {
    /// Session id.
    pub id: String,
    /// Title.
    pub title: String,
}

/// A discovery problem.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ProblemInfo {
    /// Transport reporting it.
    pub transport: TransportKind,
    /// What it is about (e.g. a file).
    pub source: String,
    /// Why.
    pub reason: String,
}

/// How many instances are in each state, over the whole fleet.
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct Counts {
    /// Every known instance.
    pub total: usize,
    /// Answering health checks.
    pub online: usize,
    /// Online with at least one working session.
    pub busy: usize,
    /// Failing health checks.
    pub offline: usize,
    /// First health check still running.
    pub checking: usize,
    /// Never contacted (see each instance's `untrusted_reason`).
    pub untrusted: usize,
}

/// Output of `instances`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct InstancesOutput {
    /// The instances on this page, online first, then by name.
    pub instances: Vec<InstanceInfo>,
    /// The whole fleet by state (not only this page).
    pub counts: Counts,
    /// How many instances match the status/query filters.
    pub matched: usize,
    /// Matching instances skipped before this page.
    pub offset: usize,
    /// Pass as `offset` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
    /// Number of discovery problems (unreadable registration files, …).
    pub problem_count: usize,
    /// The problems, with reasons.
    pub problems: Vec<ProblemInfo>,
}

/// Arguments of `sessions`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SessionsArgs {
    /// Instance name (exact or fuzzy substring match).
    pub instance: String,
    /// Max number of sessions to list (default 10).
    #[serde(default)]
    pub limit: Option<f64>,
}

/// One session in `sessions` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SessionInfo {
    /// Session id (pass as `session_id`).
    pub id: String,
    /// Title.
    pub title: String,
    /// idle, busy or retry.
    pub status: String,
    /// Last update, epoch milliseconds.
    pub updated_ms: i64,
    /// Parent session for subagent sessions.
    pub parent_id: Option<String>,
}

/// Output of `sessions`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SessionsOutput {
    /// The instance's name.
    pub instance: String,
    /// Sessions, newest first.
    pub sessions: Vec<SessionInfo>,
}

/// Builds the `instances` output from a view: the selected page, online
/// instances first (those are the ones an assistant can use), then checking,
/// offline and untrusted ones, each group by name.
pub fn instances_output(view: &View, selection: &Selection) -> InstancesOutput {
    let mut counts = Counts {
        total: view.instances.len(),
        ..Counts::default()
    };
    for i in &view.instances {
        match &i.health {
            Health::Online { .. } => {
                counts.online += 1;
                counts.busy += usize::from(i.is_busy());
            }
            Health::Offline { .. } => counts.offline += 1,
            Health::Checking => counts.checking += 1,
            Health::Untrusted { .. } => counts.untrusted += 1,
        }
    }
    let mut matching: Vec<&Arc<Instance>> = view
        .instances
        .iter()
        .filter(|i| selection.matches(i))
        .collect();
    // Stable: the view is already sorted by name.
    matching.sort_by_key(|i| rank(i));
    let matched = matching.len();
    let offset = selection.offset.min(matched);
    let end = selection
        .limit
        .map_or(matched, |l| offset.saturating_add(l).min(matched));
    let instances = matching[offset..end]
        .iter()
        .map(|i| instance_info(i))
        .collect();
    let problems: Vec<ProblemInfo> = view
        .problems
        .iter()
        .flat_map(|(t, ps)| {
            ps.iter().map(|p| ProblemInfo {
                transport: *t,
                source: p.source.clone(),
                reason: p.reason.clone(),
            })
        })
        .collect();
    InstancesOutput {
        instances,
        counts,
        matched,
        offset,
        next_offset: (end < matched).then_some(end),
        problem_count: problems.len(),
        problems,
    }
}

/// Listing order of the states.
fn rank(i: &Instance) -> u8 {
    match i.health {
        Health::Online { .. } => 0,
        Health::Checking => 1,
        Health::Offline { .. } => 2,
        Health::Untrusted { .. } => 3,
    }
}

fn instance_info(i: &Instance) -> InstanceInfo {
    let ep = i.endpoint();
    let untrusted_reason = match &i.health {
        Health::Untrusted { reason } => Some(reason.clone()),
        _ => None,
    };
    let (offline_reason, offline_for_s) = match &i.health {
        Health::Offline { reason, since } => (
            Some(reason.clone()),
            Some(since.elapsed().unwrap_or_default().as_secs()),
        ),
        _ => (None, None),
    };
    let mut busy_sessions: Vec<BusySession> = i
        .statuses
        .iter()
        .map(|(id, s)| BusySession {
            session_id: id.clone(),
            status: s.label().to_string(),
        })
        .collect();
    busy_sessions.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    InstanceInfo {
        name: i.name.clone(),
        key: i.key.clone(),
        hostname: i.hostname.clone(),
        cwd: i.cwd.clone(),
        status: i.health.label().to_string(),
        trust: i
            .is_online()
            .then(|| if i.is_signed() { "signed" } else { "unsigned" }.to_string()),
        untrusted_reason,
        activity: i
            .is_online()
            .then(|| if i.is_busy() { "busy" } else { "idle" }.to_string()),
        busy_sessions,
        recent_session: i.recent.as_ref().map(|r| SessionRef {
            id: r.id.clone(),
            title: r.title.clone(),
        }),
        version: i.version().map(str::to_string),
        reach: ep.reach,
        transport: ep.via,
        url: ep.base_url(),
        live: i.stream == Stream::Live,
        pending_permissions: i.permissions.len(),
        offline_reason,
        offline_for_s,
    }
}

/// The seed's text layout, extended with how the instance is reached, and
/// with a summary line and paging hints once the fleet outgrows one page.
pub fn instances_text(out: &InstancesOutput) -> String {
    let mut lines = Vec::new();
    let c = &out.counts;
    if c.total == 0 {
        lines.push("No opencode instances are currently connected.\n\nRun `opencode-connected` (or `opencode-agent`) on a machine to register one.".to_string());
    } else if out.matched == 0 {
        lines.push(format!(
            "No instance matches these filters ({} known). Call instances without status/query to see them all.",
            c.total
        ));
    }
    let paged = out.offset > 0 || out.next_offset.is_some();
    if paged || out.matched < c.total {
        let mut summary = format!(
            "{} instance(s): {} online ({} busy)",
            c.total, c.online, c.busy
        );
        for (n, what) in [
            (c.offline, "offline"),
            (c.checking, "checking"),
            (c.untrusted, "untrusted"),
        ] {
            if n > 0 {
                summary.push_str(&format!(", {n} {what}"));
            }
        }
        if out.matched > 0 {
            summary.push_str(&format!(
                ". Showing {}–{} of {} matching.",
                out.offset + 1,
                out.offset + out.instances.len(),
                out.matched
            ));
        }
        lines.push(summary);
    }
    for i in &out.instances {
        lines.push(format!(
            "**{}** ({}:{})",
            i.name,
            i.hostname.as_deref().unwrap_or("?"),
            i.cwd.as_deref().unwrap_or("?")
        ));
        let line = match i.status.as_str() {
            "online" => {
                let mut s = format!("  online | {}", i.activity.as_deref().unwrap_or("idle"));
                if let Some(r) = &i.recent_session {
                    s.push_str(&format!(" — \"{}\"", r.title));
                }
                s.push_str(&format!(
                    " | v{}",
                    i.version.as_deref().unwrap_or("unknown")
                ));
                if let Some(t) = &i.trust {
                    s.push_str(&format!(" | {t}"));
                }
                if i.pending_permissions > 0 {
                    s.push_str(&format!(
                        " | {} permission request(s) waiting",
                        i.pending_permissions
                    ));
                }
                s
            }
            "offline" => format!(
                "  offline for {}s | {}",
                i.offline_for_s.unwrap_or(0),
                i.offline_reason.as_deref().unwrap_or("unreachable")
            ),
            "untrusted" => format!(
                "  untrusted, never contacted | {}",
                i.untrusted_reason.as_deref().unwrap_or("not signed")
            ),
            _ => "  checking…".to_string(),
        };
        lines.push(format!(
            "{line} | via {} ({})",
            i.transport,
            reach_name(i.reach)
        ));
    }
    if let Some(next) = out.next_offset {
        lines.push(format!(
            "… {} more: call instances with offset={next} for the next page, or narrow with status (online, busy, idle, offline) or query (name, host or directory).",
            out.matched - next
        ));
    }
    if out.problem_count > 0 {
        lines.push(String::new());
        lines.push(format!("{} discovery problem(s):", out.problem_count));
        for p in &out.problems {
            lines.push(format!("  {}: {}", p.source, p.reason));
        }
    }
    lines.join("\n")
}

fn reach_name(r: Reach) -> &'static str {
    match r {
        Reach::Loopback => "loopback",
        Reach::Lan => "lan",
        Reach::Tailnet => "tailnet",
        Reach::Relay => "relay",
    }
}

#[tool_router(router = instances_router, vis = "pub(crate)")]
impl OpenCodeMcp {
    /// `instances`
    #[tool(
        description = "List all connected opencode instances with their current status (busy/idle). Call this to see what machines are available. Online instances come first; a large fleet is paged (limit, offset) and can be narrowed by status or query.",
        output_schema = schema_for_output::<InstancesOutput>(),
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    pub async fn instances(
        &self,
        Parameters(args): Parameters<InstancesArgs>,
    ) -> Result<CallToolResult, McpError> {
        let selection = match Selection::from_args(&args) {
            Ok(s) => s,
            Err(e) => return Ok(fail(e)),
        };
        // Only the transports' first pass is awaited (milliseconds); health
        // checks never delay this call.
        let view = self
            .registry
            .wait_for(std::time::Duration::from_secs(2), |v| v.transports_ready)
            .await;
        let out = instances_output(&view, &selection);
        Ok(ok(instances_text(&out), &out))
    }

    /// `sessions`
    #[tool(
        description = "List the sessions of an opencode instance, newest first, with their status. Use the ids as session_id in send and read.",
        output_schema = schema_for_output::<SessionsOutput>(),
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    pub async fn sessions(
        &self,
        Parameters(args): Parameters<SessionsArgs>,
    ) -> Result<CallToolResult, McpError> {
        let inst = match self.online_instance(&args.instance).await {
            Ok(i) => i,
            Err(refusal) => return Ok(refusal),
        };
        let limit = args
            .limit
            .map(|l| l.clamp(1.0, 1000.0) as usize)
            .unwrap_or(10);
        let sessions = match inst.client.sessions(None, None).await {
            Ok(s) => s,
            Err(e) => {
                self.registry.recheck(&inst.key);
                return Ok(fail(format!(
                    "Failed to list sessions on {}: {e}",
                    inst.name
                )));
            }
        };
        let statuses = if inst.stream == Stream::Live {
            inst.statuses.clone()
        } else {
            inst.client.session_status(None).await.unwrap_or_default()
        };
        let out = SessionsOutput {
            instance: inst.name.clone(),
            sessions: sessions
                .into_iter()
                .take(limit)
                .map(|s| SessionInfo {
                    status: statuses
                        .get(&s.id)
                        .map(|st| st.label())
                        .unwrap_or("idle")
                        .to_string(),
                    id: s.id,
                    title: s.title,
                    updated_ms: s.time.updated,
                    parent_id: s.parent_id,
                })
                .collect(),
        };
        let mut text = format!("**{}** — {} session(s)", out.instance, out.sessions.len());
        if out.sessions.is_empty() {
            text.push_str("\n\nNo sessions yet. send creates one.");
        }
        for s in &out.sessions {
            text.push_str(&format!(
                "\n- \"{}\" ({}) — {} — updated {}{}",
                if s.title.is_empty() {
                    "(untitled)"
                } else {
                    &s.title
                },
                s.id,
                s.status,
                ago(s.updated_ms),
                if s.parent_id.is_some() {
                    " — subagent"
                } else {
                    ""
                }
            ));
        }
        Ok(ok(text, &out))
    }
}
