//! OpenCode's `/event` server-sent-event stream, decoded.
//!
//! OpenCode sends `data: <one-line JSON>\n\n` frames (no `event:`/`id:`
//! lines). We parse with `eventsource-stream` behind a line-length guard, so a
//! hostile or broken server cannot make us buffer without bound, and decode
//! the JSON into the few [`EventKind`]s the registry and tools act on.
//! Frames from `/global/event` (wrapped in `{directory, payload}`) decode too.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;

use super::types::{MessageError, MessageInfo, PermissionRequest, SessionStatus};

/// One decoded event.
#[derive(Debug, Clone)]
pub struct Event {
    /// OpenCode's `type` string, e.g. `session.status`.
    pub kind_name: String,
    /// What it means to us.
    pub kind: EventKind,
    /// The raw `properties`, for consumers that need more than [`EventKind`].
    pub properties: Value,
}

/// The events we act on; everything else is [`EventKind::Other`].
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// First frame of every stream.
    Connected,
    /// Sent every 10 s.
    Heartbeat,
    /// A session became busy, idle or is retrying.
    Status {
        /// The session.
        session_id: String,
        /// Its new status.
        status: SessionStatus,
    },
    /// A session finished its turn (sent with `session.status{idle}`).
    Idle {
        /// The session.
        session_id: String,
    },
    /// A turn failed or was aborted.
    SessionError {
        /// The session, when known.
        session_id: Option<String>,
        /// The error.
        error: Option<MessageError>,
    },
    /// Streaming text appended to a part.
    PartDelta {
        /// The session.
        session_id: String,
        /// The message.
        message_id: String,
        /// The part.
        part_id: String,
        /// Which field grows (`text`).
        field: String,
        /// The appended text.
        delta: String,
    },
    /// A message was created or changed.
    MessageUpdated {
        /// The message's metadata.
        info: MessageInfo,
    },
    /// A session was created, updated or deleted.
    SessionChanged {
        /// The session.
        session_id: String,
    },
    /// OpenCode asks for permission.
    PermissionAsked(PermissionRequest),
    /// A permission request was answered (by anyone).
    PermissionReplied {
        /// The session.
        session_id: String,
        /// The request.
        request_id: String,
    },
    /// The instance was disposed; the stream ends.
    Disposed,
    /// Anything else.
    Other,
}

impl Event {
    /// Decodes one `data:` payload. `None` when it is not an OpenCode event.
    pub fn parse(data: &str) -> Option<Event> {
        let mut v: Value = serde_json::from_str(data).ok()?;
        // `/global/event` wraps the event in `{directory, payload}`.
        if let Some(payload) = v.get_mut("payload").map(Value::take)
            && payload.is_object()
        {
            v = payload;
        }
        let kind_name = v.get("type")?.as_str()?.to_string();
        let properties = v
            .get_mut("properties")
            .map(Value::take)
            .unwrap_or(Value::Null);
        let kind = decode(&kind_name, &properties);
        Some(Event {
            kind_name,
            kind,
            properties,
        })
    }

    /// The session this event is about, if any.
    pub fn session_id(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Status { session_id, .. }
            | EventKind::Idle { session_id }
            | EventKind::PartDelta { session_id, .. }
            | EventKind::SessionChanged { session_id }
            | EventKind::PermissionReplied { session_id, .. } => Some(session_id),
            EventKind::SessionError { session_id, .. } => session_id.as_deref(),
            EventKind::MessageUpdated { info } => Some(&info.session_id),
            EventKind::PermissionAsked(p) => Some(&p.session_id),
            _ => self.properties.get("sessionID").and_then(Value::as_str),
        }
    }
}

fn decode(kind: &str, p: &Value) -> EventKind {
    let s = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
    let parsed = || -> Option<EventKind> {
        Some(match kind {
            "server.connected" => EventKind::Connected,
            "server.heartbeat" => EventKind::Heartbeat,
            "session.status" => EventKind::Status {
                session_id: s("sessionID")?,
                status: serde_json::from_value(p.get("status")?.clone()).ok()?,
            },
            "session.idle" => EventKind::Idle {
                session_id: s("sessionID")?,
            },
            "session.error" => EventKind::SessionError {
                session_id: s("sessionID"),
                error: p
                    .get("error")
                    .and_then(|e| serde_json::from_value(e.clone()).ok()),
            },
            "message.part.delta" => EventKind::PartDelta {
                session_id: s("sessionID")?,
                message_id: s("messageID").unwrap_or_default(),
                part_id: s("partID").unwrap_or_default(),
                field: s("field")?,
                delta: s("delta")?,
            },
            "message.updated" => EventKind::MessageUpdated {
                info: serde_json::from_value(p.get("info")?.clone()).ok()?,
            },
            "session.created" | "session.updated" | "session.deleted" => {
                EventKind::SessionChanged {
                    session_id: s("sessionID")
                        .or_else(|| p.get("info")?.get("id")?.as_str().map(str::to_string))?,
                }
            }
            "permission.asked" => {
                EventKind::PermissionAsked(serde_json::from_value(p.clone()).ok()?)
            }
            "permission.replied" => EventKind::PermissionReplied {
                session_id: s("sessionID").unwrap_or_default(),
                request_id: s("requestID").or_else(|| s("permissionID"))?,
            },
            "server.instance.disposed" | "global.disposed" => EventKind::Disposed,
            _ => EventKind::Other,
        })
    };
    parsed().unwrap_or(EventKind::Other)
}

/// Fails a byte stream whose lines, or events (runs of non-empty lines up to
/// a blank line), grow past `max` bytes, so the SSE parser never buffers
/// without bound: `eventsource-stream` joins an event's `data:` lines, so a
/// line cap alone would not bound memory. Line terminators are `\r\n`, `\n`
/// and `\r`, as in the SSE specification; they are not counted.
pub struct LineCap<S> {
    /// The wrapped stream.
    inner: S,
    /// Bytes of the current line.
    line: usize,
    /// Bytes of the current event.
    event: usize,
    /// The previous byte was `\r` (so a following `\n` ends nothing new).
    after_cr: bool,
    /// The cap.
    max: usize,
}

impl<S> LineCap<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, max: usize) -> Self {
        Self {
            inner,
            line: 0,
            event: 0,
            after_cr: false,
            max,
        }
    }

    /// Accounts for one chunk; the error says which limit was crossed.
    fn scan<E>(&mut self, chunk: &[u8]) -> Result<(), LineCapError<E>> {
        for &b in chunk {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    if self.line == 0 {
                        self.event = 0;
                    }
                    self.line = 0;
                    self.after_cr = b == b'\r';
                }
                _ => {
                    self.after_cr = false;
                    self.line += 1;
                    self.event += 1;
                    if self.line > self.max {
                        return Err(LineCapError::TooLong(self.max));
                    }
                    if self.event > self.max {
                        return Err(LineCapError::EventTooLong(self.max));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The guard's error.
#[derive(Debug, thiserror::Error)]
pub enum LineCapError<E> {
    /// The underlying stream failed.
    #[error("{0}")]
    Inner(E),
    /// A line exceeded the cap.
    #[error("event-stream line longer than {0} bytes (MAX_EVENT_BYTES)")]
    TooLong(usize),
    /// An event (several lines) exceeded the cap.
    #[error("event-stream event longer than {0} bytes (MAX_EVENT_BYTES)")]
    EventTooLong(usize),
}

impl<S, E> Stream for LineCap<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, LineCapError<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => match self.scan(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(e) => Poll::Ready(Some(Err(e))),
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(LineCapError::Inner(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn status_idle_and_delta_events_decode() {
        let e = Event::parse(r#"{"id":"evt_1","type":"session.status","properties":{"sessionID":"ses_a","status":{"type":"busy"}}}"#).unwrap();
        assert_eq!(
            e.kind,
            EventKind::Status {
                session_id: "ses_a".into(),
                status: SessionStatus::Busy
            }
        );
        let e = Event::parse(r#"{"type":"session.status","properties":{"sessionID":"ses_a","status":{"type":"retry","attempt":2,"message":"m","next":5}}}"#).unwrap();
        assert!(matches!(
            e.kind,
            EventKind::Status {
                status: SessionStatus::Retry { attempt: 2, .. },
                ..
            }
        ));
        let e = Event::parse(r#"{"type":"message.part.delta","properties":{"sessionID":"s","messageID":"m","partID":"p","field":"text","delta":"Hi"}}"#).unwrap();
        assert_eq!(e.session_id(), Some("s"));
        assert!(matches!(e.kind, EventKind::PartDelta { ref delta, .. } if delta == "Hi"));
        let e = Event::parse(r#"{"directory":"/x","payload":{"type":"session.idle","properties":{"sessionID":"s"}}}"#).unwrap();
        assert_eq!(
            e.kind,
            EventKind::Idle {
                session_id: "s".into()
            }
        );
    }

    #[test]
    fn garbage_is_not_an_event_and_odd_shapes_are_other() {
        assert!(Event::parse("not json").is_none());
        assert!(Event::parse("[1]").is_none());
        let e = Event::parse(r#"{"type":"session.status","properties":{"status":7}}"#).unwrap();
        assert_eq!(e.kind, EventKind::Other);
        let e = Event::parse(r#"{"type":"session.status","properties":{"sessionID":"s","status":{"type":"sleeping"}}}"#).unwrap();
        assert!(matches!(
            e.kind,
            EventKind::Status {
                status: SessionStatus::Unknown,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn line_cap_rejects_an_endless_line_but_passes_normal_frames() {
        let ok: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"data: {}\n\n")),
            Ok(Bytes::from_static(b"data: 1")),
        ];
        let out: Vec<_> = LineCap::new(futures::stream::iter(ok), 16).collect().await;
        assert!(out.iter().all(Result::is_ok));
        let long: Vec<Result<Bytes, std::io::Error>> = (0..10)
            .map(|_| Ok(Bytes::from_static(b"aaaaaaaa")))
            .collect();
        let out: Vec<_> = LineCap::new(futures::stream::iter(long), 16)
            .collect()
            .await;
        assert!(
            out.iter()
                .any(|r| matches!(r, Err(LineCapError::TooLong(16))))
        );
    }
}
