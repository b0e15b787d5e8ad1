//! One event follower per online instance: it holds the instance's `/event`
//! stream, re-syncs statuses and permissions after every (re)connect, fans
//! events out to subscribers, and reports what changes the view.
//!
//! It must not decide health: when its stream drops it says so and the
//! registry re-checks health at once, which is how a killed instance goes
//! offline in milliseconds rather than at the next scan.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::view::{Fanout, SessionBrief};
use crate::opencode::{EventKind, OpenCodeClient, PermissionRequest, StatusMap};

/// How long a stream may stay silent: three missed heartbeats.
const SILENCE_LIMIT: Duration = Duration::from_secs(35);

/// What a follower tells the registry. `generation` identifies the follower so
/// that messages from a replaced one are ignored.
#[derive(Debug)]
pub(crate) struct FollowerMsg {
    /// Instance key.
    pub key: String,
    /// Follower generation.
    pub generation: u64,
    /// What happened.
    pub what: FollowerEvent,
}

#[derive(Debug)]
pub(crate) enum FollowerEvent {
    /// Stream (re)connected and re-synced.
    Synced {
        statuses: StatusMap,
        recent: Option<SessionBrief>,
        permissions: Vec<PermissionRequest>,
    },
    /// A session's status changed.
    Status {
        session_id: String,
        status: crate::opencode::SessionStatus,
    },
    /// A session was created or updated.
    Recent(SessionBrief),
    /// A permission was asked.
    PermissionAsked(PermissionRequest),
    /// A permission was answered.
    PermissionReplied { request_id: String },
    /// The stream is gone (reconnecting).
    Lost { reason: String },
}

/// Runs until `stop` is cancelled.
pub(crate) async fn follow(
    key: String,
    generation: u64,
    client: OpenCodeClient,
    fanout: Fanout,
    report: mpsc::UnboundedSender<FollowerMsg>,
    stop: CancellationToken,
) {
    let send = |what| {
        let _ = report.send(FollowerMsg {
            key: key.clone(),
            generation,
            what,
        });
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let synced = std::sync::atomic::AtomicBool::new(false);
        let attempt = async {
            let mut stream = Box::pin(client.events(None).await?);
            // Re-sync only after the stream is open, so no change can fall
            // between the snapshot and the first streamed event.
            let (statuses, sessions, permissions) = tokio::join!(
                client.session_status(None),
                client.sessions(None, Some(5)),
                client.permissions(None)
            );
            let recent = sessions
                .ok()
                .and_then(|v| v.into_iter().find(|s| s.parent_id.is_none()).map(brief));
            send(FollowerEvent::Synced {
                statuses: statuses?,
                recent,
                permissions: permissions.unwrap_or_default(),
            });
            synced.store(true, std::sync::atomic::Ordering::Relaxed);
            // OpenCode sends a heartbeat every 10 s: a silent stream is a
            // hung instance or a dead connection the kernel has not noticed.
            while let Some(item) = tokio::time::timeout(SILENCE_LIMIT, stream.next())
                .await
                .map_err(|_| crate::Error::Protocol {
                    url: client.base_url().to_string(),
                    path: "/event".into(),
                    detail: format!("no event or heartbeat for {}s", SILENCE_LIMIT.as_secs()),
                })?
            {
                let Some(event) = item? else { continue };
                match &event.kind {
                    EventKind::Status { session_id, status } => send(FollowerEvent::Status {
                        session_id: session_id.clone(),
                        status: status.clone(),
                    }),
                    EventKind::Idle { session_id } => send(FollowerEvent::Status {
                        session_id: session_id.clone(),
                        status: crate::opencode::SessionStatus::Idle,
                    }),
                    EventKind::SessionChanged { .. } if event.kind_name != "session.deleted" => {
                        if let Some(s) = event
                            .properties
                            .get("info")
                            .and_then(|i| {
                                serde_json::from_value::<crate::opencode::Session>(i.clone()).ok()
                            })
                            .filter(|s| s.parent_id.is_none())
                        {
                            send(FollowerEvent::Recent(brief(s)));
                        }
                    }
                    EventKind::PermissionAsked(p) => {
                        send(FollowerEvent::PermissionAsked(p.clone()))
                    }
                    EventKind::PermissionReplied { request_id, .. } => {
                        send(FollowerEvent::PermissionReplied {
                            request_id: request_id.clone(),
                        })
                    }
                    _ => {}
                }
                let disposed = event.kind == EventKind::Disposed;
                fanout.send(Arc::new(event));
                if disposed {
                    break;
                }
            }
            Ok::<_, crate::Error>(())
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r,
        };
        let reason = match outcome {
            Ok(()) => "event stream ended".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::debug!(%key, %reason, "event stream lost");
        send(FollowerEvent::Lost { reason });
        if synced.load(std::sync::atomic::Ordering::Relaxed) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn brief(s: crate::opencode::Session) -> SessionBrief {
    SessionBrief {
        id: s.id,
        title: s.title,
        updated: s.time.updated,
    }
}
