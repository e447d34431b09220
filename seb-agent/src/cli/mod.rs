//! Command implementations behind `seb-agent`'s subcommands.

pub mod audit;
pub mod cert;
pub mod cluster;
pub mod exit;
pub mod output;
pub mod render;

use std::path::Path;

use anyhow::{Result, bail};

use crate::protocol::{self, Request, Response};

/// One request to the running broker; a broker-side error becomes this command's error.
pub fn call_broker(socket: &Path, request: Request) -> Result<Response> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let response = runtime.block_on(protocol::call(socket, &request))?;
    if let Response::Error { code, message } = &response {
        bail!("the broker refused ({}): {message}", serde_json::to_value(code)?.as_str().unwrap_or("error"));
    }
    Ok(response)
}
