//! Serde types for the parts of OpenCode's HTTP API that we use (v1.18.x).
//!
//! Every type is lenient: fields we do not need are ignored, optional fields
//! default, and unknown enum variants map to an `Unknown`/`Other` case, so a
//! newer OpenCode does not break us. Nothing here does I/O.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `GET /global/health`.
#[derive(Debug, Clone, Deserialize)]
pub struct Health {
    /// Must be true for the instance to count as healthy.
    #[serde(default)]
    pub healthy: bool,
    /// OpenCode's version string.
    #[serde(default)]
    pub version: Option<String>,
}

/// Creation and update times of a session, epoch milliseconds.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SessionTime {
    /// When it was created.
    #[serde(default)]
    pub created: i64,
    /// When it last changed; sessions are listed newest first by this.
    #[serde(default)]
    pub updated: i64,
}

/// A session (`GET /session`, `POST /session`).
#[derive(Debug, Clone, Deserialize)]
pub struct Session {
    /// `ses_…`
    pub id: String,
    /// Human title ("New session - …" until titled).
    #[serde(default)]
    pub title: String,
    /// Directory the session belongs to (scopes status and events).
    #[serde(default)]
    pub directory: Option<String>,
    /// Set for subagent child sessions.
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    /// Times.
    #[serde(default)]
    pub time: SessionTime,
}

/// One entry of `GET /session/status`; absent means idle.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SessionStatus {
    /// Not working.
    Idle,
    /// Working on a prompt.
    Busy,
    /// Waiting to retry a failed model call.
    Retry {
        /// Attempt number.
        #[serde(default)]
        attempt: u32,
        /// Why it is retrying.
        #[serde(default)]
        message: String,
        /// When the next attempt happens, epoch ms.
        #[serde(default)]
        next: i64,
    },
    /// A status this client does not know; treated as busy.
    #[serde(other)]
    Unknown,
}

impl SessionStatus {
    /// Whether the session is doing something (busy, retrying or unknown).
    pub fn is_active(&self) -> bool {
        !matches!(self, SessionStatus::Idle)
    }

    /// Short name: idle, busy, retry.
    pub fn label(&self) -> &'static str {
        match self {
            SessionStatus::Idle => "idle",
            SessionStatus::Busy => "busy",
            SessionStatus::Retry { .. } => "retry",
            SessionStatus::Unknown => "busy",
        }
    }
}

/// The map returned by `GET /session/status`.
pub type StatusMap = HashMap<String, SessionStatus>;

/// Message times, epoch milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MessageTime {
    /// When the message was created.
    #[serde(default)]
    pub created: i64,
    /// When an assistant turn finished (also set after an abort).
    #[serde(default)]
    pub completed: Option<i64>,
}

/// An error recorded on an assistant message.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct MessageError {
    /// Error class, e.g. `MessageAbortedError`, `APIError`.
    #[serde(default)]
    pub name: String,
    /// Details; `data.message` is the readable part.
    #[serde(default)]
    pub data: Value,
}

impl MessageError {
    /// A one-line description.
    pub fn describe(&self) -> String {
        match self.data.get("message").and_then(Value::as_str) {
            Some(m) if !m.is_empty() => format!("{}: {m}", self.name),
            _ => self.name.clone(),
        }
    }
}

/// Message metadata (`info`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageInfo {
    /// `msg_…`
    pub id: String,
    /// Owning session.
    #[serde(default, rename = "sessionID")]
    pub session_id: String,
    /// `user` or `assistant`.
    #[serde(default)]
    pub role: String,
    /// Times.
    #[serde(default)]
    pub time: MessageTime,
    /// Error of a failed or aborted assistant turn.
    #[serde(default)]
    pub error: Option<MessageError>,
    /// Finish reason of an assistant turn (`stop`, `tool-calls`, …).
    #[serde(default)]
    pub finish: Option<String>,
    /// For assistant messages: the user message it answers.
    #[serde(default, rename = "parentID")]
    pub parent_id: Option<String>,
    /// On user messages: `{title?, body?, diffs: [FileDiff]}`, the net change
    /// of that turn (OpenCode 1.18 keeps session-level diffs empty).
    #[serde(default)]
    pub summary: Option<Value>,
}

impl MessageInfo {
    /// File changes recorded for this (user) turn.
    pub fn diffs(&self) -> Vec<FileDiff> {
        self.summary
            .as_ref()
            .and_then(|s| s.get("diffs"))
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .unwrap_or_default()
    }
}

/// One file's change in a turn (`SnapshotFileDiff`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct FileDiff {
    /// Project-relative path.
    pub file: String,
    /// Unified diff.
    #[serde(default)]
    pub patch: String,
    /// Lines added.
    #[serde(default)]
    pub additions: u64,
    /// Lines removed.
    #[serde(default)]
    pub deletions: u64,
    /// added, modified or deleted.
    #[serde(default)]
    pub status: Option<String>,
}

/// State of a tool part.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ToolState {
    /// pending, running, completed, error.
    #[serde(default)]
    pub status: String,
    /// Short title of what the tool did.
    #[serde(default)]
    pub title: Option<String>,
    /// Error text of a failed tool.
    #[serde(default)]
    pub error: Option<String>,
}

/// One part of a message. Only the fields we show are typed.
#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    /// `prt_…`
    #[serde(default)]
    pub id: String,
    /// text, reasoning, tool, step-start, step-finish, file, patch, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Text of text and reasoning parts.
    #[serde(default)]
    pub text: Option<String>,
    /// Tool name of tool parts.
    #[serde(default)]
    pub tool: Option<String>,
    /// Tool state of tool parts.
    #[serde(default)]
    pub state: Option<ToolState>,
    /// OpenCode-generated parts the user did not write.
    #[serde(default)]
    pub synthetic: Option<bool>,
}

/// `GET /session/{id}/message` items.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// Metadata.
    pub info: MessageInfo,
    /// Content.
    #[serde(default)]
    pub parts: Vec<Part>,
}

impl Message {
    /// The visible text: non-empty text parts joined by newlines.
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .filter(|p| p.kind == "text" && p.synthetic != Some(true))
            .filter_map(|p| p.text.as_deref())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A pending permission request (`GET /permission`, `permission.asked`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct PermissionRequest {
    /// `per_…`
    pub id: String,
    /// Session that asks.
    #[serde(default, rename = "sessionID")]
    pub session_id: String,
    /// What is asked (`bash`, `edit`, …).
    #[serde(default)]
    pub permission: String,
    /// Patterns (e.g. the command line).
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Tool-specific details.
    #[serde(default)]
    pub metadata: Value,
}

/// Answers to a permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PermissionReply {
    /// Allow this once.
    Once,
    /// Allow this and the same pattern from now on.
    Always,
    /// Refuse.
    Reject,
}
