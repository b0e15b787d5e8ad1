//! Tools for remote control beyond the seed: `abort`, `permissions`,
//! `reply_permission`, `wait` and `diff`.
//!
//! `wait` reports a session as finished only when it is confirmed: idle in
//! the live view AND its last assistant message completed (or carries an
//! error), because OpenCode can announce idle before the turn is stored
//! (anomalyco/opencode#3815, and twice around an abort).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ProgressNotificationParam};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::format::{fail, ok};
use super::{OpenCodeMcp, resolve};
use crate::opencode::{FileDiff, OpenCodeClient, PermissionReply};
use crate::registry::{Health, Instance, View};

/// Arguments of `abort`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct AbortArgs {
    /// Instance name (exact or fuzzy substring match)
    pub instance: String,
    /// Session to abort (id, id prefix or title substring). Default: the busy session.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Arguments of `permissions`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct PermissionsArgs {
    /// Only this instance (exact or fuzzy substring match). Default: all instances.
    #[serde(default)]
    pub instance: Option<String>,
}

/// One pending permission request.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PermissionInfo {
    /// Instance name.
    pub instance: String,
    /// Request id, for reply_permission.
    pub request_id: String,
    /// Session that asks.
    pub session_id: String,
    /// What is asked: bash, edit, …
    pub permission: String,
    /// The command, file or pattern concerned.
    pub patterns: Vec<String>,
    /// Seconds since this server first saw the request.
    pub waiting_s: u64,
}

/// Output of `permissions`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PermissionsOutput {
    /// Pending requests, oldest first.
    pub pending: Vec<PermissionInfo>,
}

/// Arguments of `reply_permission`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReplyArgs {
    /// Instance name (exact or fuzzy substring match)
    pub instance: String,
    /// The request id from `permissions` (per_…).
    pub request_id: String,
    /// once: allow this time; always: allow this pattern from now on; reject: refuse.
    pub reply: PermissionReply,
    /// Optional message to the agent (with reject: what to do instead).
    #[serde(default)]
    pub message: Option<String>,
}

/// Output of `reply_permission`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReplyOutput {
    /// Instance name.
    pub instance: String,
    /// The request answered.
    pub request_id: String,
    /// The answer given.
    pub reply: PermissionReply,
}

/// One thing to wait on.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct WaitTarget {
    /// Instance name (exact or fuzzy substring match)
    pub instance: String,
    /// Session (id, id prefix or title substring). Default: the most recent session.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Arguments of `wait`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct WaitArgs {
    /// What to wait on: one or more instance/session pairs.
    pub targets: Vec<WaitTarget>,
    /// any: return when one target needs attention; all: when every target does. Default any.
    #[serde(default)]
    pub mode: Option<WaitMode>,
    /// Give up after this many milliseconds (default 300000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `wait` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    /// Return as soon as one target is done or needs attention.
    Any,
    /// Return once every target is done or needs attention.
    All,
}

/// The state of one waited-on session.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct WaitState {
    /// Instance name.
    pub instance: String,
    /// Session id.
    pub session_id: String,
    /// running, finished, needs_permission, aborted, failed, offline.
    pub state: String,
    /// Error text when failed, the question when a permission is pending.
    pub detail: Option<String>,
}

/// Output of `wait`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WaitOutput {
    /// True when the timeout passed first.
    pub timed_out: bool,
    /// Every target's state.
    pub targets: Vec<WaitState>,
}

/// Arguments of `diff`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct DiffArgs {
    /// Instance name (exact or fuzzy substring match)
    pub instance: String,
    /// Session (id, id prefix or title substring). Default: the most recent session.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Show the patch of this file (project-relative path as listed). Default: a summary of every file.
    #[serde(default)]
    pub file: Option<String>,
    /// Page of the patch, from 1 (default 1).
    #[serde(default)]
    pub page: Option<u32>,
    /// Lines per page (default 200).
    #[serde(default)]
    pub page_lines: Option<u32>,
}

/// One file in `diff` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileSummary {
    /// Project-relative path.
    pub file: String,
    /// Lines added over the session.
    pub additions: u64,
    /// Lines removed over the session.
    pub deletions: u64,
    /// Status in the latest turn that touched it.
    pub status: Option<String>,
    /// How many turns changed it.
    pub turns: usize,
}

/// Output of `diff`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DiffOutput {
    /// Instance name.
    pub instance: String,
    /// Session id.
    pub session_id: String,
    /// Every changed file.
    pub files: Vec<FileSummary>,
    /// The requested file's patch page, when `file` was given.
    pub patch: Option<String>,
    /// Page shown.
    pub page: Option<u32>,
    /// Pages in total.
    pub pages: Option<u32>,
}

#[tool_router(router = control_router, vis = "pub(crate)")]
impl OpenCodeMcp {
    /// `abort`
    #[tool(
        description = "Abort the running task of a session on an opencode instance (same as send with abort=true). Pending permission requests of that session are rejected, so nothing approved later can still run.",
        output_schema = schema_for_output::<super::messages::SendOutput>(),
        annotations(read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = true)
    )]
    pub async fn abort(
        &self,
        Parameters(args): Parameters<AbortArgs>,
    ) -> Result<CallToolResult, McpError> {
        let inst = match self.online_instance(&args.instance).await {
            Ok(i) => i,
            Err(refusal) => return Ok(refusal),
        };
        Ok(self.abort_session(&inst, args.session_id.as_deref()).await)
    }

    /// `permissions`
    #[tool(
        description = "List permission requests that opencode instances are waiting on (what is asked, by which session, for how long). Answer them with reply_permission.",
        output_schema = schema_for_output::<PermissionsOutput>(),
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    pub async fn permissions(
        &self,
        Parameters(args): Parameters<PermissionsArgs>,
    ) -> Result<CallToolResult, McpError> {
        let view = self
            .registry
            .wait_for(Duration::from_secs(2), |v| v.transports_ready)
            .await;
        let only = match &args.instance {
            Some(q) => match resolve::match_instance(&view, q) {
                Ok(i) => Some(i.key.clone()),
                Err(e) => return Ok(fail(e)),
            },
            None => None,
        };
        let out = permissions_output(&view, only.as_deref());
        let mut text = if out.pending.is_empty() {
            "No permission requests are waiting.".to_string()
        } else {
            format!("{} permission request(s) waiting:", out.pending.len())
        };
        for p in &out.pending {
            text.push_str(&format!(
                "\n- **{}** session {}: {} {} — waiting {}s (request_id {})",
                p.instance,
                p.session_id,
                p.permission,
                p.patterns.join(" "),
                p.waiting_s,
                p.request_id
            ));
        }
        Ok(ok(text, &out))
    }

    /// `reply_permission`
    #[tool(
        description = "Answer a pending permission request of an opencode instance: once (allow this time), always (allow this pattern from now on), or reject (with an optional message saying what to do instead).",
        output_schema = schema_for_output::<ReplyOutput>(),
        annotations(read_only_hint = false, destructive_hint = true, idempotent_hint = false, open_world_hint = true)
    )]
    pub async fn reply_permission(
        &self,
        Parameters(args): Parameters<ReplyArgs>,
    ) -> Result<CallToolResult, McpError> {
        let inst = match self.online_instance(&args.instance).await {
            Ok(i) => i,
            Err(refusal) => return Ok(refusal),
        };
        match inst
            .client
            .reply_permission(&args.request_id, args.reply, args.message.as_deref())
            .await
        {
            Ok(true) => {
                let out = ReplyOutput {
                    instance: inst.name.clone(),
                    request_id: args.request_id.clone(),
                    reply: args.reply,
                };
                let answer = match args.reply {
                    PermissionReply::Once => "once",
                    PermissionReply::Always => "always",
                    PermissionReply::Reject => "reject",
                };
                Ok(ok(
                    format!(
                        "Answered {} on {} with {answer}.",
                        args.request_id, inst.name
                    ),
                    &out,
                ))
            }
            Ok(false) => Ok(fail(format!(
                "{} did not accept the answer to {}.",
                inst.name, args.request_id
            ))),
            Err(crate::Error::Api { status: 404, .. }) => Ok(fail(format!(
                "No pending permission request {} on {}: it was already answered or never existed. Call permissions to see what is waiting.",
                args.request_id, inst.name
            ))),
            Err(e) => {
                self.registry.recheck(&inst.key);
                Ok(fail(format!(
                    "Could not answer {} on {}: {e}",
                    args.request_id, inst.name
                )))
            }
        }
    }

    /// `wait`
    #[tool(
        description = "Wait until sessions on one or several opencode instances finish or need you (a permission request), mode any or all, with a timeout. Finished is confirmed from the stored messages, not guessed from an idle signal. Sends progress notifications while waiting.",
        output_schema = schema_for_output::<WaitOutput>(),
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    pub async fn wait(
        &self,
        Parameters(args): Parameters<WaitArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if args.targets.is_empty() {
            return Ok(fail(
                "targets is empty: give at least one {instance, session_id?}.",
            ));
        }
        let mode = args.mode.unwrap_or(WaitMode::Any);
        let mut targets: Vec<(Arc<Instance>, String)> = Vec::new();
        for t in &args.targets {
            let inst =
                match resolve::instance(&self.registry, &t.instance, self.config.health_timeout)
                    .await
                {
                    Ok(i) => i,
                    Err(e) => return Ok(fail(e)),
                };
            let sid = match resolve::session(&inst.client, &inst.name, t.session_id.as_deref())
                .await
            {
                Ok(Some(s)) => s.id,
                Ok(None) => return Ok(fail(format!("{} has no session to wait on.", inst.name))),
                Err(e) => return Ok(fail(e)),
            };
            targets.push((inst, sid));
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(args.timeout_ms.unwrap_or(300_000));
        let token = ctx.meta.get_progress_token();
        let mut rx = self.registry.watch();
        let mut last: Vec<String> = Vec::new();
        let mut round = 0u32;
        loop {
            let view = rx.borrow_and_update().clone();
            let mut states = Vec::with_capacity(targets.len());
            for (inst, sid) in &targets {
                states.push(target_state(&view, inst, sid).await);
            }
            let done = states.iter().filter(|s| s.state != "running").count();
            let finished = match mode {
                WaitMode::Any => done > 0,
                WaitMode::All => done == states.len(),
            };
            let labels: Vec<String> = states.iter().map(|s| s.state.clone()).collect();
            if labels != last {
                round += 1;
                if let Some(t) = &token {
                    let msg = states
                        .iter()
                        .map(|s| format!("{}: {}", s.instance, s.state))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let _ = ctx
                        .peer
                        .notify_progress(
                            ProgressNotificationParam::new(t.clone(), round as f64)
                                .with_message(msg),
                        )
                        .await;
                }
                last = labels;
            }
            if finished {
                return Ok(wait_result(false, states));
            }
            tokio::select! {
                _ = ctx.ct.cancelled() => return Ok(fail("cancelled by the client.")),
                _ = tokio::time::sleep_until(deadline) => return Ok(wait_result(true, states)),
                r = rx.changed() => if r.is_err() { return Ok(fail("the server is shutting down.")) },
            }
        }
    }

    /// `diff`
    #[tool(
        description = "What a session changed: a summary per file (lines added and removed) or, with file, that file's patch, paged for large changes. Needs a git project on the instance.",
        output_schema = schema_for_output::<DiffOutput>(),
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    pub async fn diff(
        &self,
        Parameters(args): Parameters<DiffArgs>,
    ) -> Result<CallToolResult, McpError> {
        let inst = match self.online_instance(&args.instance).await {
            Ok(i) => i,
            Err(refusal) => return Ok(refusal),
        };
        let session =
            match resolve::session(&inst.client, &inst.name, args.session_id.as_deref()).await {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(fail(format!("{} has no session yet.", inst.name))),
                Err(e) => return Ok(fail(e)),
            };
        let messages = match inst.client.messages(&session.id, None).await {
            Ok(m) => m,
            Err(e) => {
                return Ok(fail(format!(
                    "Failed to fetch messages from {}: {e}",
                    inst.name
                )));
            }
        };
        // OpenCode 1.18 keeps the session-level diff empty; each user turn
        // carries its own net diff.
        let turns: Vec<Vec<FileDiff>> = messages
            .iter()
            .filter(|m| m.info.role == "user")
            .map(|m| m.info.diffs())
            .collect();
        let mut per_file: BTreeMap<String, (FileSummary, Vec<String>)> = BTreeMap::new();
        for d in turns.iter().flatten() {
            let e = per_file.entry(d.file.clone()).or_insert_with(|| {
                (
                    FileSummary {
                        file: d.file.clone(),
                        additions: 0,
                        deletions: 0,
                        status: None,
                        turns: 0,
                    },
                    Vec::new(),
                )
            });
            e.0.additions += d.additions;
            e.0.deletions += d.deletions;
            e.0.status = d.status.clone().or(e.0.status.take());
            e.0.turns += 1;
            e.1.push(d.patch.clone());
        }
        let mut out = DiffOutput {
            instance: inst.name.clone(),
            session_id: session.id.clone(),
            files: Vec::new(),
            patch: None,
            page: None,
            pages: None,
        };
        let mut text;
        if let Some(file) = &args.file {
            let Some((_, patches)) = per_file
                .iter()
                .find(|(k, _)| *k == file || k.ends_with(&format!("/{file}")))
                .map(|(_, v)| v)
            else {
                let known = per_file.keys().cloned().collect::<Vec<_>>().join(", ");
                return Ok(fail(format!(
                    "{file} was not changed in this session. Changed files: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known
                    }
                )));
            };
            let all: Vec<&str> = patches.iter().flat_map(|p| p.lines()).collect();
            let per = args.page_lines.unwrap_or(200).clamp(10, 5000) as usize;
            let pages = all.len().div_ceil(per).max(1) as u32;
            let page = args.page.unwrap_or(1).clamp(1, pages);
            let start = (page as usize - 1) * per;
            let chunk = all[start.min(all.len())..(start + per).min(all.len())].join("\n");
            text = format!("**{}** — {file}, page {page}/{pages}\n\n{chunk}", inst.name);
            out.patch = Some(chunk);
            out.page = Some(page);
            out.pages = Some(pages);
        } else {
            text = format!(
                "**{}** — \"{}\": {} file(s) changed",
                inst.name,
                session.title,
                per_file.len()
            );
            for (s, _) in per_file.values() {
                text.push_str(&format!(
                    "\n- {} (+{} -{}){}",
                    s.file,
                    s.additions,
                    s.deletions,
                    s.status
                        .as_deref()
                        .map(|st| format!(" {st}"))
                        .unwrap_or_default()
                ));
            }
            if per_file.is_empty() {
                text.push_str("\n\nNothing changed (or the project is not a git repository, so OpenCode keeps no snapshots).");
            }
        }
        out.files = per_file.into_values().map(|(s, _)| s).collect();
        Ok(ok(text, &out))
    }
}

fn permissions_output(view: &View, only: Option<&str>) -> PermissionsOutput {
    let mut pending: Vec<(std::time::SystemTime, PermissionInfo)> = view
        .instances
        .iter()
        .filter(|i| only.is_none_or(|k| k == i.key))
        .flat_map(|i| {
            i.permissions.iter().map(|p| {
                (
                    p.since,
                    PermissionInfo {
                        instance: i.name.clone(),
                        request_id: p.request.id.clone(),
                        session_id: p.request.session_id.clone(),
                        permission: p.request.permission.clone(),
                        patterns: p.request.patterns.clone(),
                        waiting_s: p.since.elapsed().unwrap_or_default().as_secs(),
                    },
                )
            })
        })
        .collect();
    pending.sort_by_key(|(since, _)| *since);
    PermissionsOutput {
        pending: pending.into_iter().map(|(_, p)| p).collect(),
    }
}

/// The state of one session, confirmed against the stored messages when idle.
async fn target_state(view: &View, inst: &Arc<Instance>, sid: &str) -> WaitState {
    let mut st = WaitState {
        instance: inst.name.clone(),
        session_id: sid.to_string(),
        state: "running".into(),
        detail: None,
    };
    let Some(now) = view.get(&inst.key) else {
        st.state = "offline".into();
        st.detail = Some("the instance disappeared from discovery".into());
        return st;
    };
    if let Health::Offline { reason, .. } = &now.health {
        st.state = "offline".into();
        st.detail = Some(reason.clone());
        return st;
    }
    if let Some(p) = now.permissions.iter().find(|p| p.request.session_id == sid) {
        st.state = "needs_permission".into();
        st.detail = Some(format!(
            "{} {} (request_id {})",
            p.request.permission,
            p.request.patterns.join(" "),
            p.request.id
        ));
        return st;
    }
    if now.statuses.contains_key(sid) {
        return st;
    }
    match last_turn(&now.client, sid).await {
        Some((true, None)) => st.state = "finished".into(),
        Some((true, Some(err))) => {
            st.state = if err.starts_with("MessageAbortedError") {
                "aborted"
            } else {
                "failed"
            }
            .into();
            st.detail = Some(err);
        }
        // Idle but not stored yet: still running as far as we can confirm.
        Some((false, _)) => {}
        // Nothing stored yet: a prompt posted a moment ago is not visible
        // before OpenCode stores it, so this cannot be called finished.
        None => st.detail = Some("no message yet".into()),
    }
    st
}

/// (completed, error) of the session's last turn; None when the session has
/// no messages. A last message from the user means the turn has not started
/// (OpenCode can report idle right after `prompt_async`, before it is busy).
async fn last_turn(client: &OpenCodeClient, sid: &str) -> Option<(bool, Option<String>)> {
    let msgs = client.messages(sid, Some(4)).await.ok()?;
    let last = msgs.last()?;
    if last.info.role != "assistant" {
        return Some((false, None));
    }
    Some((
        last.info.time.completed.is_some() || last.info.error.is_some(),
        last.info.error.as_ref().map(|e| e.describe()),
    ))
}

fn wait_result(timed_out: bool, targets: Vec<WaitState>) -> CallToolResult {
    let mut text = if timed_out {
        "Timed out; still waiting on some sessions:".to_string()
    } else {
        "Done waiting:".to_string()
    };
    for t in &targets {
        text.push_str(&format!(
            "\n- **{}** {}: {}{}",
            t.instance,
            t.session_id,
            t.state,
            t.detail
                .as_deref()
                .map(|d| format!(" — {d}"))
                .unwrap_or_default()
        ));
    }
    ok(text, &WaitOutput { timed_out, targets })
}
