//! Tools `send` and `read`: talk to a session and see what it did.
//!
//! `send` subscribes to the instance's live event fan-out *before* it posts
//! the prompt, so no event can be lost, streams text deltas back as progress
//! notifications, stops waiting when the MCP request is cancelled, and tells
//! "still running" from "finished" from "failed".

use std::sync::Arc;

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ProgressNotificationParam};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::broadcast::error::RecvError;

use super::format::{clock, fail, ok};
use super::requests::Claim;
use super::{OpenCodeMcp, resolve};
use crate::opencode::{EventKind, Message, OpenCodeClient, PermissionReply, SessionStatus};
use crate::registry::{Health, Instance, Stream};

/// Arguments of `send`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SendArgs {
    /// The message to send (not required when aborting)
    #[serde(default)]
    pub message: Option<String>,
    /// Instance name (exact or fuzzy substring match)
    pub instance: String,
    /// Set to true to abort the currently running task
    #[serde(default)]
    pub abort: bool,
    /// Session to use: an id (or id prefix), or a title substring. Default: the most recently updated session.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Start a new session for this message instead of using an existing one.
    #[serde(default)]
    pub new_session: bool,
    /// Idempotency key: a retried call with the same request_id does not send the prompt twice.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// Output of `send`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SendOutput {
    /// Instance name.
    pub instance: String,
    /// Session the message went to (or that was aborted).
    pub session_id: Option<String>,
    /// completed, timeout, aborted, failed, busy, no_reply, nothing_to_abort, duplicate (request_id seen before).
    pub outcome: String,
    /// The reply text streamed by the assistant.
    pub text: String,
    /// Error reported by OpenCode for this turn, if any.
    pub error: Option<String>,
    /// Permission requests rejected because of an abort.
    pub rejected_permissions: usize,
}

/// Arguments of `read`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadArgs {
    /// Instance name (exact or fuzzy substring match)
    pub instance: String,
    /// Max number of messages to retrieve (default 10)
    #[serde(default)]
    pub message_limit: Option<f64>,
    /// Session to read: an id (or id prefix), or a title substring. Default: the most recently updated session.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// One tool call in a message.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ToolCall {
    /// Tool name.
    pub tool: String,
    /// pending, running, completed or error.
    pub status: String,
    /// What it did, when known.
    pub title: Option<String>,
}

/// One message in `read` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageOut {
    /// Message id.
    pub id: String,
    /// user or assistant.
    pub role: String,
    /// Creation time, epoch milliseconds.
    pub created_ms: i64,
    /// When an assistant turn finished, epoch milliseconds.
    pub completed_ms: Option<i64>,
    /// Visible text.
    pub text: String,
    /// Tool calls.
    pub tools: Vec<ToolCall>,
    /// Error of a failed or aborted turn.
    pub error: Option<String>,
}

/// Output of `read`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReadOutput {
    /// Instance name.
    pub instance: String,
    /// Session id (null when the instance has no session).
    pub session_id: Option<String>,
    /// Session title.
    pub title: Option<String>,
    /// idle, busy or retry.
    pub status: String,
    /// Messages, oldest first.
    pub messages: Vec<MessageOut>,
}

/// How a followed turn ended.
enum Ending {
    Idle,
    Timeout,
    Cancelled,
    Lost(String),
}

#[tool_router(router = messages_router, vis = "pub(crate)")]
impl OpenCodeMcp {
    /// `send`
    #[tool(
        description = "Send a message to the most recent opencode session on an instance (or to session_id, or a new session). Streams the response back in real-time. Set abort=true to stop a running task instead of sending a message.",
        output_schema = schema_for_output::<SendOutput>(),
        annotations(read_only_hint = false, destructive_hint = true, idempotent_hint = false, open_world_hint = true)
    )]
    pub async fn send(
        &self,
        Parameters(args): Parameters<SendArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let Some(id) = args.request_id.clone().filter(|_| !args.abort) else {
            return self.send_once(args, ctx, &AtomicBool::new(false)).await;
        };
        match self.requests.claim(&id) {
            Claim::New => {}
            Claim::Done(result) => return Ok(result),
            Claim::InFlight => {
                let out = SendOutput {
                    instance: args.instance.clone(),
                    session_id: None,
                    outcome: "duplicate".into(),
                    text: String::new(),
                    error: None,
                    rejected_permissions: 0,
                };
                return Ok(ok(
                    format!(
                        "A send with request_id \"{id}\" is already under way; the prompt was not sent again. Use wait or read to follow it."
                    ),
                    &out,
                ));
            }
        }
        let posted = AtomicBool::new(false);
        let result = self.send_once(args, ctx, &posted).await;
        // Remember the outcome only when the prompt really went out, so a
        // retry after a failure before posting can still send.
        let keep = result
            .as_ref()
            .ok()
            .filter(|_| posted.load(Ordering::SeqCst))
            .cloned();
        self.requests.finish(&id, keep);
        result
    }

    /// `read`
    #[tool(
        description = "Read the last few messages from the most recent opencode session on an instance (or session_id). Use this to see what has been happening without sending a new message.",
        output_schema = schema_for_output::<ReadOutput>(),
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    pub async fn read(
        &self,
        Parameters(args): Parameters<ReadArgs>,
    ) -> Result<CallToolResult, McpError> {
        let inst = match self.online_instance(&args.instance).await {
            Ok(i) => i,
            Err(refusal) => return Ok(refusal),
        };
        let name = inst.name.clone();
        let limit = args
            .message_limit
            .map(|l| l.clamp(1.0, 10_000.0) as u32)
            .unwrap_or(10);
        let session = match resolve::session(&inst.client, &name, args.session_id.as_deref()).await
        {
            Ok(Some(s)) => s,
            Ok(None) => {
                let out = ReadOutput {
                    instance: name.clone(),
                    session_id: None,
                    title: None,
                    status: "idle".into(),
                    messages: vec![],
                };
                return Ok(ok(format!("No sessions found on {name}."), &out));
            }
            Err(e) => {
                self.registry.recheck(&inst.key);
                return Ok(fail(e));
            }
        };
        let messages = match inst.client.messages(&session.id, Some(limit)).await {
            Ok(m) => m,
            Err(e) => {
                self.registry.recheck(&inst.key);
                return Ok(fail(format!("Failed to fetch messages from {name}: {e}")));
            }
        };
        let status = if inst.stream == Stream::Live {
            inst.statuses.get(&session.id).cloned()
        } else {
            inst.client
                .session_status(None)
                .await
                .ok()
                .and_then(|m| m.get(&session.id).cloned())
        }
        .unwrap_or(SessionStatus::Idle);
        let title = if session.title.is_empty() {
            "(untitled)".to_string()
        } else {
            session.title.clone()
        };
        let out = ReadOutput {
            instance: name.clone(),
            session_id: Some(session.id.clone()),
            title: Some(session.title.clone()),
            status: status.label().to_string(),
            messages: messages.iter().map(message_out).collect(),
        };
        if out.messages.is_empty() {
            return Ok(ok(
                format!("Session \"{title}\" on {name} has no messages."),
                &out,
            ));
        }
        let mut text = format!(
            "**{name}** — \"{title}\" ({})\n",
            if status.is_active() { "busy" } else { "idle" }
        );
        for m in &out.messages {
            text.push_str(&format!(
                "\n**{}** ({}):\n",
                if m.role == "user" {
                    "User"
                } else {
                    "Assistant"
                },
                clock(m.created_ms)
            ));
            if !m.text.is_empty() {
                text.push_str(&m.text);
                text.push('\n');
            }
            for t in &m.tools {
                text.push_str(&format!("  [tool: {} → {}]\n", t.tool, t.status));
            }
            if let Some(e) = &m.error {
                text.push_str(&format!("  [error: {e}]\n"));
            }
        }
        Ok(ok(text.trim_end().to_string(), &out))
    }
}

impl OpenCodeMcp {
    /// One `send` without retry bookkeeping; sets `posted` once the prompt went out.
    async fn send_once(
        &self,
        args: SendArgs,
        ctx: RequestContext<RoleServer>,
        posted: &AtomicBool,
    ) -> Result<CallToolResult, McpError> {
        let inst = match self.online_instance(&args.instance).await {
            Ok(i) => i,
            Err(refusal) => return Ok(refusal),
        };
        if args.abort {
            return Ok(self.abort_session(&inst, args.session_id.as_deref()).await);
        }
        let Some(message) = args.message.filter(|m| !m.trim().is_empty()) else {
            return Ok(fail("message is required when not aborting."));
        };
        let client = inst.client.clone();
        let name = inst.name.clone();

        let session = if args.new_session {
            match client.create_session(None, None).await {
                Ok(s) => s,
                Err(e) => return Ok(self.api_failure(&inst, "create a session", e)),
            }
        } else {
            match resolve::session(&client, &name, args.session_id.as_deref()).await {
                Ok(Some(s)) => s,
                // The seed refused here; a new session is what the user wants.
                Ok(None) => match client.create_session(None, None).await {
                    Ok(s) => s,
                    Err(e) => return Ok(self.api_failure(&inst, "create a session", e)),
                },
                Err(e) => {
                    self.registry.recheck(&inst.key);
                    return Ok(fail(e));
                }
            }
        };
        let sid = session.id.clone();

        let busy = match client.session_status(None).await {
            Ok(m) => m.get(&sid).is_some_and(SessionStatus::is_active),
            Err(e) => return Ok(self.api_failure(&inst, "read session status", e)),
        };
        if busy {
            let text = format!(
                "{name} is currently busy processing a task. You can wait for it to finish, or call send with abort=true to stop it."
            );
            let out = SendOutput {
                instance: name,
                session_id: Some(sid),
                outcome: "busy".into(),
                text: String::new(),
                error: None,
                rejected_permissions: 0,
            };
            return Ok(ok(text, &out));
        }

        // Subscribe first, then make sure the stream is live, then post.
        let mut events = inst.events.subscribe();
        if inst.stream != Stream::Live {
            let key = inst.key.clone();
            let v = self
                .registry
                .wait_for(self.config.health_timeout, |v| {
                    v.get(&key).is_some_and(|i| i.stream == Stream::Live)
                })
                .await;
            if !v.get(&key).is_some_and(|i| i.stream == Stream::Live) {
                self.registry.recheck(&key);
                return Ok(fail(format!(
                    "The event stream of {name} is not connected, so the reply could not be followed; nothing was sent. Try again in a moment, or call instances to check it."
                )));
            }
        }
        if let Err(e) = client.prompt_async(&sid, &message).await {
            return Ok(self.api_failure(&inst, "send the prompt", e));
        }
        posted.store(true, Ordering::SeqCst);

        let progress_token = ctx.meta.get_progress_token();
        let deadline = tokio::time::Instant::now() + self.config.send_timeout;
        let mut view_rx = self.registry.watch();
        let mut text = String::new();
        let mut turn_error: Option<String> = None;
        let mut lagged = false;
        let mut non_text_parts = std::collections::HashSet::new();
        // An idle that arrives before this turn visibly started may belong to
        // the previous turn (an abort emits two idle pairs, the second one
        // late); only accept it once the stored messages confirm our turn.
        let mut started = false;
        let ending = loop {
            tokio::select! {
                _ = ctx.ct.cancelled() => break Ending::Cancelled,
                _ = tokio::time::sleep_until(deadline) => break Ending::Timeout,
                changed = view_rx.changed() => {
                    if changed.is_err() {
                        break Ending::Lost("the server is shutting down".into());
                    }
                    let v = view_rx.borrow_and_update().clone();
                    match v.get(&inst.key) {
                        None => break Ending::Lost(format!("{name} disappeared from discovery")),
                        Some(i) => match &i.health {
                            Health::Offline { reason, .. } => break Ending::Lost(format!("{name} went offline: {reason}")),
                            _ if i.stream == Stream::Live && !i.statuses.contains_key(&sid) && lagged => {
                                // Reconnected after missing events and the session is idle now.
                                break Ending::Idle;
                            }
                            _ => {
                                if i.stream != Stream::Live {
                                    // Events may be missed while reconnecting.
                                    lagged = true;
                                }
                            }
                        },
                    }
                }
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if ev.session_id() != Some(sid.as_str()) {
                            continue;
                        }
                        match &ev.kind {
                            EventKind::PartDelta { part_id, field, delta, .. } if field == "text" && !non_text_parts.contains(part_id) => {
                                started = true;
                                text.push_str(delta);
                                if let Some(token) = &progress_token {
                                    let p = ProgressNotificationParam::new(token.clone(), text.len() as f64).with_message(delta.clone());
                                    let _ = ctx.peer.notify_progress(p).await;
                                }
                            }
                            EventKind::Other if ev.kind_name == "message.part.updated" => {
                                if let Some(part) = ev.properties.get("part") {
                                    let kind = part.get("type").and_then(|t| t.as_str()).unwrap_or("");
                                    if kind != "text"
                                        && let Some(id) = part.get("id").and_then(|t| t.as_str()) {
                                            non_text_parts.insert(id.to_string());
                                        }
                                }
                            }
                            EventKind::SessionError { error, .. } => {
                                turn_error = Some(error.as_ref().map(|e| e.describe()).unwrap_or_else(|| "unknown error".into()));
                            }
                            EventKind::Status { status, .. } if status.is_active() => started = true,
                            EventKind::MessageUpdated { info } if info.role == "assistant" => started = true,
                            EventKind::Idle { .. } | EventKind::Status { status: SessionStatus::Idle, .. } => {
                                let confirmed = started || turn_is_complete(&client, &sid, &message).await;
                                if confirmed {
                                    break Ending::Idle;
                                }
                            }
                            _ => {}
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "send fell behind the event stream");
                        lagged = true;
                    }
                    Err(RecvError::Closed) => break Ending::Lost(format!("{name} disappeared from discovery")),
                }
            }
        };

        if matches!(ending, Ending::Cancelled) {
            tracing::debug!(instance = %name, session = %sid, "send cancelled by the client; stopped following");
            // The client gave up; rmcp drops the late answer anyway.
            return Ok(fail(
                "cancelled by the client; the prompt keeps running on the instance.",
            ));
        }
        if matches!(ending, Ending::Idle) {
            // The stored messages are the truth: they carry errors that
            // arrive without a session id, and the text of missed deltas.
            if let Some(turn) = finished_turn(&client, &sid, &message).await {
                if turn_error.is_none() {
                    turn_error = turn.error;
                }
                if lagged || text.is_empty() {
                    text = turn.text;
                }
            }
        }
        let aborted = turn_error
            .as_deref()
            .is_some_and(|e| e.starts_with("MessageAbortedError"));
        let (outcome, body, is_error) = match ending {
            Ending::Timeout => {
                let body = if text.is_empty() {
                    format!("Message sent to {name}, but no response yet.")
                } else {
                    text.clone()
                };
                (
                    "timeout",
                    format!("{body}\n\n(still processing — timed out waiting for response)"),
                    false,
                )
            }
            Ending::Lost(why) => (
                "failed",
                format!(
                    "Lost track of the reply: {why}. The prompt may or may not have run; call read with instance=\"{name}\" once it is back.{}",
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!("\n\nReceived so far:\n{text}")
                    }
                ),
                true,
            ),
            Ending::Idle if aborted => (
                "aborted",
                format!("{text}\n\n(aborted)").trim_start().to_string(),
                false,
            ),
            Ending::Idle if turn_error.is_some() => (
                "failed",
                format!(
                    "OpenCode reported an error for this prompt: {}{}",
                    turn_error.clone().unwrap_or_default(),
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!("\n\n{text}")
                    }
                ),
                true,
            ),
            Ending::Idle if text.is_empty() => (
                "no_reply",
                format!(
                    "Message sent to {name}, but no response received. Check the instance directly."
                ),
                false,
            ),
            Ending::Idle => ("completed", text.clone(), false),
            Ending::Cancelled => unreachable!("handled above"),
        };
        let out = SendOutput {
            instance: name,
            session_id: Some(sid),
            outcome: outcome.into(),
            text,
            error: turn_error,
            rejected_permissions: 0,
        };
        let mut result = ok(body, &out);
        result.is_error = Some(is_error);
        Ok(result)
    }

    /// `send` with abort=true: stop the running turn and refuse what it left asking.
    pub(crate) async fn abort_session(
        &self,
        inst: &Arc<Instance>,
        session_query: Option<&str>,
    ) -> CallToolResult {
        let name = inst.name.clone();
        let client = &inst.client;
        let target = match session_query {
            Some(q) => match resolve::session(client, &name, Some(q)).await {
                Ok(Some(s)) => Some(s.id),
                Ok(None) => None,
                Err(e) => return fail(e),
            },
            None => match client.session_status(None).await {
                Ok(m) => {
                    let mut busy: Vec<String> = m
                        .into_iter()
                        .filter(|(_, s)| s.is_active())
                        .map(|(id, _)| id)
                        .collect();
                    busy.sort();
                    busy.pop()
                }
                Err(e) => return self.api_failure(inst, "read session status", e),
            },
        };
        let Some(sid) = target else {
            let out = SendOutput {
                instance: name.clone(),
                session_id: None,
                outcome: "nothing_to_abort".into(),
                text: String::new(),
                error: None,
                rejected_permissions: 0,
            };
            return ok(
                format!("No active task on {name} — nothing to abort."),
                &out,
            );
        };
        if let Err(e) = client.abort(&sid).await {
            return self.api_failure(inst, "abort", e);
        }
        // An approval given after an abort can still run the command, so
        // refuse everything the aborted session left pending.
        let rejected = reject_pending(client, &sid).await;
        let out = SendOutput {
            instance: name.clone(),
            session_id: Some(sid),
            outcome: "aborted".into(),
            text: String::new(),
            error: None,
            rejected_permissions: rejected,
        };
        let mut text = format!("Aborted active task on {name}.");
        if rejected > 0 {
            text.push_str(&format!(
                " Rejected {rejected} pending permission request(s) of that session."
            ));
        }
        ok(text, &out)
    }

    fn api_failure(&self, inst: &Instance, what: &str, e: crate::Error) -> CallToolResult {
        self.registry.recheck(&inst.key);
        fail(format!("Could not {what} on {}: {e}", inst.name))
    }
}

/// Rejects every pending permission request of `sid`; returns how many.
async fn reject_pending(client: &OpenCodeClient, sid: &str) -> usize {
    let Ok(pending) = client.permissions(None).await else {
        return 0;
    };
    let mut n = 0;
    for p in pending.iter().filter(|p| p.session_id == sid) {
        if client
            .reply_permission(&p.id, PermissionReply::Reject, Some("aborted"))
            .await
            .unwrap_or(false)
        {
            n += 1;
        }
    }
    n
}

/// What the stored messages say about the turn that answered `prompt`.
struct Turn {
    /// Assistant text of the turn.
    text: String,
    /// Error recorded on the turn's last assistant message.
    error: Option<String>,
}

/// Whether the stored messages show our prompt answered by a completed turn.
async fn turn_is_complete(client: &OpenCodeClient, sid: &str, prompt: &str) -> bool {
    let Ok(msgs) = client.messages(sid, Some(20)).await else {
        return false;
    };
    let Some(start) = msgs
        .iter()
        .rposition(|m| m.info.role == "user" && m.text() == prompt)
    else {
        return false;
    };
    msgs[start + 1..]
        .iter()
        .rev()
        .find(|m| m.info.role == "assistant")
        .is_some_and(|m| m.info.time.completed.is_some())
}

async fn finished_turn(client: &OpenCodeClient, sid: &str, prompt: &str) -> Option<Turn> {
    let msgs = client.messages(sid, Some(50)).await.ok()?;
    let start = msgs
        .iter()
        .rposition(|m| m.info.role == "user" && m.text() == prompt)?;
    let replies: Vec<&Message> = msgs[start + 1..]
        .iter()
        .filter(|m| m.info.role == "assistant")
        .collect();
    let text: Vec<String> = replies
        .iter()
        .map(|m| m.text())
        .filter(|t| !t.is_empty())
        .collect();
    Some(Turn {
        text: text.join("\n"),
        error: replies
            .last()
            .and_then(|m| m.info.error.as_ref())
            .map(|e| e.describe()),
    })
}

pub(crate) fn message_out(m: &Message) -> MessageOut {
    MessageOut {
        id: m.info.id.clone(),
        role: m.info.role.clone(),
        created_ms: m.info.time.created,
        completed_ms: m.info.time.completed,
        text: m.text(),
        tools: m
            .parts
            .iter()
            .filter(|p| p.kind == "tool")
            .map(|p| ToolCall {
                tool: p.tool.clone().unwrap_or_else(|| "?".into()),
                status: p
                    .state
                    .as_ref()
                    .map(|s| s.status.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "?".into()),
                title: p.state.as_ref().and_then(|s| s.title.clone()),
            })
            .collect(),
        error: m.info.error.as_ref().map(|e| e.describe()),
    }
}
