//! OpenCode's HTTP API, as a client: typed requests with timeouts, body-size
//! caps and Basic auth, and the `/event` SSE stream.
//!
//! This module knows OpenCode's routes and JSON; it must not know about
//! discovery, the registry or MCP. Callers decide when to call and what the
//! answers mean for the user.

pub mod client;
pub mod events;
pub mod types;

pub use client::{ClientLimits, OpenCodeClient};
pub use events::{Event, EventKind};
pub use types::*;
