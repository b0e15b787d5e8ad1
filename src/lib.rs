//! `opencode-mcp`: one MCP server for every OpenCode instance you run.
//!
//! # Layout
//!
//! Data flows one way: transports report what they see, one registry task
//! owns all state, and readers (MCP tools, `opencode-mcp instances`) get an
//! immutable snapshot of the live view without waiting on the network.
//!
//! - [`config`]: environment variables and flags, validated once.
//! - [`announce`]: wire formats shared with `opencode-agent` (relay files,
//!   DNS-SD TXT records).
//! - [`transport`]: discovery sources behind the [`transport::Transport`] trait:
//!   `local-relay` (registration files), `mdns` (DNS-SD on the LAN),
//!   `tailscale` (unicast DNS-SD to the tailnet's peers).
//! - [`dnssd`]: the unicast DNS-SD responder and queries used over a tailnet.
//! - [`tailscale`]: Tailscale's LocalAPI (peers, own addresses).
//! - [`registry`]: the state task, health checks, one event follower per
//!   instance, and the live [`registry::View`].
//! - [`opencode`]: the HTTP client for OpenCode's API and its event stream.
//! - [`mcp`]: the MCP tools over stdio, thin shells over the registry and client.
//! - [`secret`]: the fleet secret, per-instance passwords and announcement signatures.
//! - [`error`]: the crate's one error type.

pub mod announce;
pub mod config;
pub mod dnssd;
pub mod error;
pub mod mcp;
pub mod opencode;
pub mod registry;
pub mod secret;
pub mod tailscale;
pub mod transport;

pub use error::{Error, Result};
