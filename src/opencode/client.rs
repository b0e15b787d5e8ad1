//! The HTTP client for one OpenCode instance.
//!
//! Every request carries Basic auth when configured, has a deadline (except
//! the event stream, which has a deadline only for its headers), and reads at
//! most [`ClientLimits::max_body_bytes`]. Answers that are not OpenCode's
//! (HTML from the SPA fallback, bad JSON, error statuses) become
//! [`Error`]s that say what happened. Errors never include credentials.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::events::{Event, LineCap};
use super::types::{Health, Message, PermissionReply, PermissionRequest, Session, StatusMap};
use crate::config::Credentials;
use crate::error::{Error, Result};

/// Per-request bounds.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Deadline of a whole request (and of the event stream's headers).
    pub timeout: Duration,
    /// Largest response body read.
    pub max_body_bytes: usize,
    /// Largest event-stream line read.
    pub max_event_bytes: usize,
}

/// A client for one OpenCode base URL. Cheap to clone: the connection pool is shared.
#[derive(Clone)]
pub struct OpenCodeClient {
    /// Shared reqwest client (pool, connect timeout).
    http: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    base: String,
    /// Basic auth, when a password is configured.
    auth: Option<Credentials>,
    /// Bounds.
    limits: ClientLimits,
}

impl std::fmt::Debug for OpenCodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A shared reqwest client suitable for OpenCode instances.
pub fn http_client(connect_timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
}

impl OpenCodeClient {
    /// A client for `base` (e.g. `http://127.0.0.1:4096`).
    pub fn new(
        http: reqwest::Client,
        base: impl Into<String>,
        auth: Option<Credentials>,
        limits: ClientLimits,
    ) -> Self {
        let base = base.into().trim_end_matches('/').to_string();
        Self {
            http,
            base,
            auth,
            limits,
        }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.auth {
            Some(c) => rb.basic_auth(&c.username, Some(&c.password)),
            None => rb,
        }
    }

    /// Sends a request and checks the status; `deadline` bounds the whole exchange.
    async fn send(&self, rb: RequestBuilder, path: &str, deadline: Duration) -> Result<Response> {
        let resp = match tokio::time::timeout(deadline, rb.timeout(deadline).send()).await {
            Err(_) => return Err(self.timeout(deadline)),
            Ok(Err(e)) => return Err(self.transport_error(e, deadline)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(Error::Unauthorized {
                url: self.base.clone(),
            });
        }
        if !status.is_success() {
            let body = self
                .read_body(resp, path, deadline)
                .await
                .unwrap_or_default();
            return Err(Error::Api {
                url: self.base.clone(),
                path: path.to_string(),
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
        Ok(resp)
    }

    async fn read_body(
        &self,
        mut resp: Response,
        path: &str,
        deadline: Duration,
    ) -> Result<Vec<u8>> {
        let max = self.limits.max_body_bytes;
        if resp.content_length().is_some_and(|n| n as usize > max) {
            return Err(self.too_large(path));
        }
        let read = async {
            let mut buf = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| self.transport_error(e, deadline))?
            {
                if buf.len() + chunk.len() > max {
                    return Err(self.too_large(path));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(buf)
        };
        match tokio::time::timeout(deadline, read).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout(deadline)),
        }
    }

    /// Sends and decodes a JSON answer, refusing non-JSON content types.
    async fn json<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        path: &str,
        deadline: Duration,
    ) -> Result<T> {
        let resp = self.send(rb, path, deadline).await?;
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !ctype.starts_with("application/json") {
            return Err(self.protocol(
                path,
                format!(
                    "expected JSON, got {} (not an OpenCode server, or an OpenCode without this route)",
                    if ctype.is_empty() { "no content type".to_string() } else { ctype }
                ),
            ));
        }
        let body = self.read_body(resp, path, deadline).await?;
        serde_json::from_slice(&body).map_err(|e| self.protocol(path, format!("invalid JSON: {e}")))
    }

    fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// `GET /global/health`; an instance is healthy only if this says so in JSON.
    pub async fn health(&self, deadline: Duration) -> Result<Health> {
        let path = "/global/health";
        let h: Health = self.json(self.get(path), path, deadline).await?;
        if !h.healthy {
            return Err(self.protocol(path, "OpenCode reports itself unhealthy".into()));
        }
        Ok(h)
    }

    /// `GET /session`: sessions of the instance's project, newest first.
    pub async fn sessions(
        &self,
        directory: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Vec<Session>> {
        let path = "/session";
        let mut rb = self.get(path);
        if let Some(d) = directory {
            rb = rb.query(&[("directory", d)]);
        }
        if let Some(l) = limit {
            rb = rb.query(&[("limit", l)]);
        }
        let mut v: Vec<Session> = self.json(rb, path, self.limits.timeout).await?;
        v.sort_by_key(|s| std::cmp::Reverse(s.time.updated));
        Ok(v)
    }

    /// `POST /session`.
    pub async fn create_session(
        &self,
        directory: Option<&str>,
        title: Option<&str>,
    ) -> Result<Session> {
        let path = "/session";
        let mut rb = self.request(Method::POST, path);
        if let Some(d) = directory {
            rb = rb.query(&[("directory", d)]);
        }
        let body = match title {
            Some(t) => json!({ "title": t }),
            None => json!({}),
        };
        self.json(rb.json(&body), path, self.limits.timeout).await
    }

    /// `GET /session/status`: only non-idle sessions appear.
    pub async fn session_status(&self, directory: Option<&str>) -> Result<StatusMap> {
        let path = "/session/status";
        let mut rb = self.get(path);
        if let Some(d) = directory {
            rb = rb.query(&[("directory", d)]);
        }
        self.json(rb, path, self.limits.timeout).await
    }

    /// `GET /session/{id}/message`: the newest `limit` messages, oldest first.
    pub async fn messages(&self, session_id: &str, limit: Option<u32>) -> Result<Vec<Message>> {
        let path = format!("/session/{}/message", seg(session_id));
        let mut rb = self.get(&path);
        if let Some(l) = limit.filter(|l| *l > 0) {
            rb = rb.query(&[("limit", l)]);
        }
        self.json(rb, &path, self.limits.timeout).await
    }

    /// `POST /session/{id}/prompt_async`: starts a turn and returns at once.
    pub async fn prompt_async(&self, session_id: &str, text: &str) -> Result<()> {
        let path = format!("/session/{}/prompt_async", seg(session_id));
        let body = json!({ "parts": [{ "type": "text", "text": text }] });
        let rb = self.request(Method::POST, &path).json(&body);
        self.send(rb, &path, self.limits.timeout).await?;
        Ok(())
    }

    /// `POST /session/{id}/abort`.
    pub async fn abort(&self, session_id: &str) -> Result<bool> {
        let path = format!("/session/{}/abort", seg(session_id));
        let v: Value = self
            .json(
                self.request(Method::POST, &path),
                &path,
                self.limits.timeout,
            )
            .await?;
        Ok(v.as_bool().unwrap_or(false))
    }

    /// `GET /permission`: pending permission requests.
    pub async fn permissions(&self, directory: Option<&str>) -> Result<Vec<PermissionRequest>> {
        let path = "/permission";
        let mut rb = self.get(path);
        if let Some(d) = directory {
            rb = rb.query(&[("directory", d)]);
        }
        self.json(rb, path, self.limits.timeout).await
    }

    /// `POST /permission/{id}/reply`.
    pub async fn reply_permission(
        &self,
        request_id: &str,
        reply: PermissionReply,
        message: Option<&str>,
    ) -> Result<bool> {
        let path = format!("/permission/{}/reply", seg(request_id));
        let mut body = json!({ "reply": reply });
        if let Some(m) = message {
            body["message"] = Value::String(m.to_string());
        }
        let v: Value = self
            .json(
                self.request(Method::POST, &path).json(&body),
                &path,
                self.limits.timeout,
            )
            .await?;
        Ok(v.as_bool().unwrap_or(false))
    }

    /// Opens `GET /event`. The stream yields decoded events (`None` for a frame
    /// that is not an OpenCode event) until the connection ends; it errors on
    /// transport failure or an over-long line. Only the headers have a deadline.
    pub async fn events(
        &self,
        directory: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Option<Event>>> + Send + 'static + use<>> {
        let path = "/event";
        let mut rb = self.get(path).header(header::ACCEPT, "text/event-stream");
        if let Some(d) = directory {
            rb = rb.query(&[("directory", d)]);
        }
        let deadline = self.limits.timeout;
        let resp = match tokio::time::timeout(deadline, rb.send()).await {
            Err(_) => return Err(self.timeout(deadline)),
            Ok(Err(e)) => return Err(self.transport_error(e, deadline)),
            Ok(Ok(r)) => r,
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(Error::Unauthorized {
                url: self.base.clone(),
            });
        }
        if !resp.status().is_success() {
            return Err(Error::Api {
                url: self.base.clone(),
                path: path.into(),
                status: resp.status().as_u16(),
                message: "event stream refused".into(),
            });
        }
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !ctype.starts_with("text/event-stream") {
            return Err(self.protocol(path, format!("expected an event stream, got {ctype:?}")));
        }
        let base = self.base.clone();
        let max = self.limits.max_event_bytes;
        let stream =
            LineCap::new(resp.bytes_stream(), max)
                .eventsource()
                .map(move |item| match item {
                    Ok(ev) => Ok(Event::parse(&ev.data)),
                    Err(e) => Err(Error::Protocol {
                        url: base.clone(),
                        path: "/event".into(),
                        detail: format!("event stream broke: {e}"),
                    }),
                });
        Ok(stream)
    }

    fn timeout(&self, after: Duration) -> Error {
        Error::Timeout {
            url: self.base.clone(),
            after,
        }
    }

    fn too_large(&self, path: &str) -> Error {
        Error::TooLarge {
            url: self.base.clone(),
            path: path.to_string(),
            limit: self.limits.max_body_bytes,
        }
    }

    fn protocol(&self, path: &str, detail: String) -> Error {
        Error::Protocol {
            url: self.base.clone(),
            path: path.to_string(),
            detail,
        }
    }

    fn transport_error(&self, e: reqwest::Error, deadline: Duration) -> Error {
        if e.is_timeout() {
            return self.timeout(deadline);
        }
        // reqwest's Display includes the URL, never the credentials; we still
        // describe the innermost cause only, which reads better.
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = s.to_string();
            src = s.source();
        }
        Error::Unreachable {
            url: self.base.clone(),
            detail,
        }
    }
}

/// Percent-encodes a path segment (ids come from users and the network).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The readable part of an OpenCode error body, or a short excerpt.
fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let msg = v
            .pointer("/data/message")
            .or_else(|| v.get("message"))
            .and_then(Value::as_str);
        if let Some(m) = msg {
            return excerpt(m);
        }
        if let Some(n) = v.get("name").and_then(Value::as_str) {
            return n.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        "(empty body)".into()
    } else {
        excerpt(&text)
    }
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    let cut: String = s.chars().filter(|c| !c.is_control()).take(200).collect();
    if s.chars().count() > 200 {
        format!("{cut}…")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("ses_abc-1"), "ses_abc-1");
        assert_eq!(seg("../x y"), "..%2Fx%20y");
    }

    #[test]
    fn error_bodies_are_summarised() {
        assert_eq!(
            error_message(br#"{"name":"NotFoundError","data":{"message":"Session not found: x"}}"#),
            "Session not found: x"
        );
        assert_eq!(error_message(b""), "(empty body)");
        assert!(error_message(&[b'a'; 500]).ends_with('…'));
    }
}
