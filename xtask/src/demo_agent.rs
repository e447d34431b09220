//! The demo's AI agent: a scripted MCP client of `seb-agent mcp`, which it starts the way
//! an MCP host does (a child process speaking MCP on stdio), inside the agent's cgroup.

use std::process::Command;

use anyhow::{Context, Result};
use rmcp::{
    RoleClient, ServiceExt, model::CallToolRequestParams, service::RunningService, transport::TokioChildProcess,
};
use serde_json::Value;

pub struct McpAgent {
    runtime: tokio::runtime::Runtime,
    client: RunningService<RoleClient, ()>,
}

/// A tool's answer: whether it reports an error, and its structured content.
pub struct Answer {
    pub is_error: bool,
    pub content: Value,
}

impl McpAgent {
    /// Start `server` (already placed in the agent's cgroup) and initialise the session.
    pub fn start(server: Command) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = runtime.block_on(async {
            let transport = TokioChildProcess::new(tokio::process::Command::from(server))?;
            ().serve(transport).await.context("initialising the MCP session with seb-agent mcp")
        })?;
        Ok(Self { runtime, client })
    }

    /// The server's tools: name and the first sentence of the description.
    pub fn tools(&self) -> Result<Vec<(String, String)>> {
        let tools = self.runtime.block_on(self.client.list_all_tools())?;
        Ok(tools
            .into_iter()
            .map(|tool| {
                let description = tool.description.as_deref().unwrap_or_default();
                let first = description.split(". ").next().unwrap_or(description).to_string();
                (tool.name.to_string(), first)
            })
            .collect())
    }

    pub fn call(&self, tool: &str, arguments: Value) -> Result<Answer> {
        let params = CallToolRequestParams::new(tool.to_string())
            .with_arguments(arguments.as_object().cloned().context("tool arguments are a JSON object")?);
        let result = self.runtime.block_on(self.client.call_tool(params)).with_context(|| format!("calling {tool}"))?;
        Ok(Answer {
            is_error: result.is_error == Some(true),
            content: result.structured_content.unwrap_or(Value::Null),
        })
    }
}
