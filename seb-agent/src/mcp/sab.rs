//! What the MCP server asks the SAB, typed: certify a draft, read a request's state. The
//! transport (mutual TLS with the agent's own certificate) is the SAB's client.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{cert::MutationRequest, execute::passthrough::ReadResult, sab::client::SabClient};

/// Where the SAB is and who this agent is to it.
#[derive(Debug, Clone, clap::Args)]
pub struct SabOptions {
    /// The SAB's URL, https://host:port.
    #[arg(long = "sab-url", env = "SEB_SAB_URL")]
    pub url: String,
    /// This agent's client certificate for the SAB (PEM), naming it by a seb://node/... URI SAN.
    #[arg(long = "sab-cert", env = "SEB_SAB_CERT")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long = "sab-key", env = "SEB_SAB_KEY")]
    pub key: PathBuf,
    /// The CA certificates the SAB's server certificate chains to (PEM).
    #[arg(long = "sab-ca", env = "SEB_SAB_CA")]
    pub ca: PathBuf,
    /// Cluster mode: this pod's ServiceAccount token for the SAB (a projected token with
    /// the SAB's audience), sent with each request and read again each time.
    #[arg(long = "sab-token-file", env = "SEB_SAB_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// The body of `POST /v1/certify`: what the agent wants, on what state, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Draft {
    pub request: MutationRequest,
    pub precondition: String,
    pub live_state: ReadResult,
    pub intent: String,
}

/// What the SAB answered a certify with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Certified {
    Issued {
        request_id: String,
        certificate: String,
    },
    Refused {
        request_id: String,
        #[serde(default)]
        reasons: Vec<String>,
    },
    Pending {
        request_id: String,
        #[serde(default)]
        approvals_required: u32,
        #[serde(default)]
        approvers: Vec<String>,
    },
}

pub struct AgentSab {
    client: SabClient,
}

impl AgentSab {
    pub fn new(options: &SabOptions) -> Result<Self> {
        let client = SabClient::new(&options.url, &options.cert, &options.key, &options.ca)?;
        let client = match &options.token_file {
            Some(file) => client.with_bearer_file(file),
            None => client,
        };
        Ok(Self { client })
    }

    pub async fn certify(&self, draft: &Draft) -> Result<Certified> {
        let (status, body) = self.client.call("POST", "/v1/certify", Some(&serde_json::to_value(draft)?)).await?;
        match status {
            200 | 202 | 403 if body.get("status").is_some() => {
                serde_json::from_value(body).context("the SAB's certify answer is not valid")
            }
            _ => bail!(api_error(status, &body)),
        }
    }

    /// `GET /v1/requests/{id}`: the request's state as the SAB reports it.
    pub async fn request(&self, request_id: &str) -> Result<Value> {
        let request_id = crate::sab::client::request_id(request_id)?;
        let (status, body) = self.client.call("GET", &format!("/v1/requests/{request_id}"), None).await?;
        if status != 200 {
            bail!(api_error(status, &body));
        }
        Ok(body)
    }
}

/// `{"error":{"code","message"}}` as one line for people (and language models).
fn api_error(status: u16, body: &Value) -> String {
    let code = body["error"]["code"].as_str().unwrap_or("error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    format!("the SAB answered {status}: {code}: {message}")
}
