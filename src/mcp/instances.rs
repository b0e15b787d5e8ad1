//! Tools `instances` and `sessions`: what is out there, and what each
//! instance has been working on. `instances` answers from the live view
//! without touching the network.

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{ErrorData as McpError, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpenCodeMcp;
use super::format::{ago, fail, ok};
use crate::registry::{Health, Instance, Stream, View};
use crate::transport::{Reach, TransportKind};

/// Arguments of `instances` (none; extra keys are ignored like the seed did).
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct InstancesArgs {}

/// One instance in `instances` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct InstanceInfo {
    /// Name to pass as `instance` to the other tools.
    pub name: String,
    /// Stable identity (instance id, or a key derived from the source); also accepted as `instance`.
    pub key: String,
    /// Machine it runs on, when announced.
    pub hostname: Option<String>,
    /// Working directory, when announced.
    pub cwd: Option<String>,
    /// online, offline, checking or untrusted (never contacted; see `untrusted_reason`).
    pub status: String,
    /// For online instances: `signed` (announcement signed with the fleet
    /// secret, per-instance password) or `unsigned` (no secret configured).
    pub trust: Option<String>,
    /// Why an untrusted instance is never contacted, and what to do.
    pub untrusted_reason: Option<String>,
    /// idle or busy (busy includes retrying); null unless online.
    pub activity: Option<String>,
    /// Sessions that are working, with their status.
    pub busy_sessions: Vec<BusySession>,
    /// Most recently updated session.
    pub recent_session: Option<SessionRef>,
    /// OpenCode version, when online.
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
    pub offline_reason: Option<String>,
    /// For how many seconds it has been offline.
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

/// Output of `instances`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct InstancesOutput {
    /// Every known instance, online or not.
    pub instances: Vec<InstanceInfo>,
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

/// Builds the `instances` output from a view.
pub fn instances_output(view: &View) -> InstancesOutput {
    let instances = view.instances.iter().map(|i| instance_info(i)).collect();
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
        problem_count: problems.len(),
        problems,
    }
}

fn instance_info(i: &Instance) -> InstanceInfo {
    let ep = i.endpoint();
    let untrusted_reason = match &i.health {
        Health::Untrusted { reason } => Some(reason.clone()),
        _ => None,
    };
    let (status, offline_reason, offline_for_s) = match &i.health {
        Health::Online { .. } => ("online", None, None),
        Health::Checking => ("checking", None, None),
        Health::Untrusted { .. } => ("untrusted", None, None),
        Health::Offline { reason, since } => (
            "offline",
            Some(reason.clone()),
            Some(since.elapsed().unwrap_or_default().as_secs()),
        ),
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
        status: status.to_string(),
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

/// The seed's text layout, extended with how the instance is reached.
pub fn instances_text(out: &InstancesOutput) -> String {
    let mut lines = Vec::new();
    if out.instances.is_empty() {
        lines.push("No opencode instances are currently connected.\n\nRun `opencode-connected` (or `opencode-agent`) on a machine to register one.".to_string());
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
        description = "List all connected opencode instances with their current status (busy/idle). Call this to see what machines are available.",
        output_schema = schema_for_output::<InstancesOutput>(),
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    pub async fn instances(
        &self,
        _args: Parameters<InstancesArgs>,
    ) -> Result<CallToolResult, McpError> {
        // Only the transports' first pass is awaited (milliseconds); health
        // checks never delay this call.
        let view = self
            .registry
            .wait_for(std::time::Duration::from_secs(2), |v| v.transports_ready)
            .await;
        let out = instances_output(&view);
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
