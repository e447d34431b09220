//! Read-only passthrough: reads named in config go through the broker with a read-only
//! identity and no certificate, so agents need no direct API access at all. Every read
//! is an audit record. The answer carries the target's canonical state digest, which is
//! what a SAB certifies as a contract's precondition.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{
    Executors,
    aws::{
        preset,
        request::{CertifiedRead, StateRead},
    },
    https::target_url,
};
use crate::cert::{MutationRequest, Provider};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughConfig {
    /// Role assumed (with a read-only session policy) for AWS reads.
    #[serde(default)]
    pub aws_role_arn: Option<String>,
    /// AWS reads allowed, by IAM action (e.g. `s3:GetObject`, `dynamodb:GetItem`).
    #[serde(default)]
    pub aws_operations: Vec<String>,
    /// Subject of the client certificates minted for HTTPS reads.
    #[serde(default)]
    pub http_subject: Option<String>,
    /// URL prefixes HTTPS reads (GET) may address.
    #[serde(default)]
    pub http_prefixes: Vec<String>,
}

/// What a read returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadResult {
    pub status: u16,
    /// The response body, when it is UTF-8.
    pub body: Option<String>,
    /// Otherwise its bytes, hex-encoded.
    pub body_hex: Option<String>,
    /// Digest of the target's canonical state (for preconditions).
    pub state_digest: String,
}

pub async fn read(
    config: &PassthroughConfig,
    executors: &Executors,
    request: &MutationRequest,
    read_id: &str,
) -> Result<ReadResult> {
    match request.provider {
        Provider::Aws => {
            if !config.aws_operations.contains(&request.operation) {
                bail!("`{}` is not a passthrough read on this broker (passthrough.aws_operations)", request.operation);
            }
            // A full read, as a precondition certifies it, or a preset read by name.
            let read: CertifiedRead = if request.params.is_null() {
                preset::read(&request.operation, &request.target)?
            } else {
                serde_json::from_value(request.params.clone()).context("params is a certified read")?
            };
            if read.action != request.operation {
                bail!("the read performs {}, the request names {}", read.action, request.operation);
            }
            let read = StateRead::new(&read, &request.target)?;
            let role = config.aws_role_arn.as_deref().context("passthrough.aws_role_arn is not set")?;
            let executor = executors.aws.as_ref().context("this broker has no AWS executor")?;
            let session = executor.mint(role, read_id, Some(&read.policy())).await?;
            let response = executor.call(&read.call, &session.credentials).await?;
            let digest = read.digest(&response)?;
            Ok(result(response.status().as_u16(), response.body(), digest))
        }
        Provider::Http => {
            if request.operation != "GET"
                || !config.http_prefixes.iter().any(|prefix| request.target.starts_with(prefix))
            {
                bail!("only GET under passthrough.http_prefixes is a passthrough read on this broker");
            }
            let subject = config.http_subject.as_deref().context("passthrough.http_subject is not set")?;
            let executor = executors.https.as_ref().context("this broker has no HTTPS executor")?;
            let session = executor.mint(subject, read_id)?;
            let (status, body, digest) = executor.get(&target_url(&request.target)?, &session).await?;
            Ok(result(status, &body, digest))
        }
        Provider::Kubernetes => bail!("Kubernetes reads are not supported yet"),
    }
}

fn result(status: u16, body: &Bytes, state_digest: String) -> ReadResult {
    match std::str::from_utf8(body) {
        Ok(text) => ReadResult { status, body: Some(text.to_string()), body_hex: None, state_digest },
        Err(_) => ReadResult { status, body: None, body_hex: Some(hex::encode(body)), state_digest },
    }
}
