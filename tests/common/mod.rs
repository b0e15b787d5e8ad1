//! Shared helpers for the integration tests. Each test crate includes this with `mod common;`
//! and uses only part of it, hence the crate-wide `dead_code` allowance.
#![allow(dead_code)]

pub mod fake_opencode;
pub mod mcp_client;
pub mod netns;
pub mod real_opencode;
pub mod tailnet;
