//! The MCP server: tools over stdio (rmcp).
//!
//! Tools are thin: they resolve names against the registry's live view, call
//! the OpenCode client, and shape readable text plus structured content that
//! matches each tool's declared output schema. They keep no state of their
//! own. Failures a user can act on are tool results with `isError: true`;
//! JSON-RPC errors are left to rmcp for protocol problems.

mod control;
mod format;
mod instances;
mod messages;
mod requests;
mod resolve;
mod resources;

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{
    CallToolResult, Implementation, ListResourcesResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig,
    SubscribeRequestParams, UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt, tool_handler};

pub use instances::{InstancesOutput, Selection, instances_output, instances_text};

use crate::config::Config;
use crate::registry::{Instance, Registry};

/// The MCP server state: a registry handle and the configuration.
#[derive(Clone)]
pub struct OpenCodeMcp {
    /// Live view and health re-checks.
    registry: Registry,
    /// Timeouts and limits.
    config: Arc<Config>,
    /// The tools.
    tool_router: ToolRouter<Self>,
    /// Resource URIs the client subscribed to.
    subscriptions: resources::Subscriptions,
    /// `send` request ids already used.
    requests: Arc<requests::RequestLog>,
}

impl OpenCodeMcp {
    /// A server over `registry`.
    pub fn new(registry: Registry, config: Arc<Config>) -> Self {
        Self {
            registry,
            config,
            tool_router: Self::instances_router()
                + Self::messages_router()
                + Self::control_router(),
            subscriptions: Default::default(),
            requests: Default::default(),
        }
    }
}

impl OpenCodeMcp {
    /// Resolves a tool's `instance` argument to an online, trusted instance,
    /// or the tool result that explains why not.
    async fn online_instance(&self, query: &str) -> Result<Arc<Instance>, CallToolResult> {
        resolve::instance(&self.registry, query, self.config.health_timeout)
            .await
            .map_err(format::fail)
    }
}

const INSTRUCTIONS: &str = "Drives OpenCode (AI coding agent) instances running on this and other machines. \
Call `instances` first to see them and whether they are idle or busy. `read` shows what a session did, \
`send` sends a prompt and waits for the reply (abort=true stops a running task), `sessions` lists sessions. \
`permissions` and `reply_permission` answer what instances ask, `wait` waits for sessions to finish or need you, \
`diff` shows what a session changed, `abort` stops a task. \
Instance names match exactly or by a unique case-insensitive substring.";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for OpenCodeMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_resources_list_changed()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(Implementation::new(
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(INSTRUCTIONS.to_string())
    }

    async fn on_initialized(&self, ctx: NotificationContext<RoleServer>) {
        tokio::spawn(resources::notify_changes(
            self.registry.clone(),
            ctx.peer.clone(),
            self.subscriptions.clone(),
        ));
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let view = self
            .registry
            .wait_for(std::time::Duration::from_secs(2), |v| v.transports_ready)
            .await;
        Ok(ListResourcesResult::with_all_items(resources::list(&view)))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        resources::read(&self.registry, &request.uri)
            .await
            .map(Into::into)
            .map_err(|e| McpError::resource_not_found(e, None))
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if let Ok(mut s) = self.subscriptions.lock() {
            s.insert(request.uri);
        }
        Ok(())
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        if let Ok(mut s) = self.subscriptions.lock() {
            s.remove(&request.uri);
        }
        Ok(())
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
