//! The MCP server: tools over stdio (rmcp).
//!
//! Tools are thin: they resolve names against the registry's live view, call
//! the OpenCode client, and shape readable text plus structured content that
//! matches each tool's declared output schema. They keep no state of their
//! own. Failures a user can act on are tool results with `isError: true`;
//! JSON-RPC errors are left to rmcp for protocol problems.

mod format;
mod instances;
mod messages;
mod resolve;

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt, tool_handler};

pub use instances::{InstancesOutput, instances_output, instances_text};

use crate::config::Config;
use crate::registry::Registry;

/// The MCP server state: a registry handle and the configuration.
#[derive(Clone)]
pub struct OpenCodeMcp {
    /// Live view and health re-checks.
    registry: Registry,
    /// Timeouts and limits.
    config: Arc<Config>,
    /// The tools.
    tool_router: ToolRouter<Self>,
}

impl OpenCodeMcp {
    /// A server over `registry`.
    pub fn new(registry: Registry, config: Arc<Config>) -> Self {
        Self {
            registry,
            config,
            tool_router: Self::instances_router() + Self::messages_router(),
        }
    }
}

const INSTRUCTIONS: &str = "Drives OpenCode (AI coding agent) instances running on this and other machines. \
Call `instances` first to see them and whether they are idle or busy. `read` shows what a session did, \
`send` sends a prompt and waits for the reply (abort=true stops a running task), `sessions` lists sessions. \
Instance names match exactly or by a unique case-insensitive substring.";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for OpenCodeMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                env!("CARGO_PKG_NAME"),
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(INSTRUCTIONS.to_string())
    }
}

/// Serves MCP on stdin/stdout until the client disconnects.
pub async fn serve_stdio(registry: Registry, config: Arc<Config>) -> crate::Result<()> {
    let server = OpenCodeMcp::new(registry, config);
    let service = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| crate::Error::Mcp(e.to_string()))?;
    service
        .waiting()
        .await
        .map_err(|e| crate::Error::Mcp(e.to_string()))?;
    Ok(())
}
