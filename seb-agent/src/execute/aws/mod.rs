//! The AWS executor: STS AssumeRole into the contract's role with a session policy for
//! exactly the certified action and resource, the shortest duration STS allows, and the
//! decision id as RoleSessionName and SourceIdentity (so CloudTrail correlates); then the
//! drift read and the mutation with that session, over the broker's own sockets.

pub mod operation;
pub mod sign;
pub mod xml;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use operation::AwsOperation;
use operation::{ServiceCall, api_error, state_digest};
pub use sign::AwsCredentials;
use xml::Element;

use super::{MintedIdentity, broker_http::BrokerHttp};

/// STS's minimum session duration.
pub const SESSION_SECONDS: u32 = 900;
const STS_VERSION: &str = "2011-06-15";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// One endpoint for every service (an emulator, a VPC endpoint); omitted: AWS's own.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// JSON `{"access_key_id", "secret_access_key"}`: the broker's base identity, which
    /// should be allowed nothing but sts:AssumeRole.
    pub credentials_file: PathBuf,
}

impl AwsConfig {
    /// The broker's base identity, read from `credentials_file`.
    pub fn base_credentials(&self) -> Result<AwsCredentials> {
        let file = &self.credentials_file;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("config field `aws.credentials_file`: cannot read {}", file.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("config field `aws.credentials_file`: {} is not valid", file.display()))
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

pub struct AwsExecutor {
    http: BrokerHttp,
    config: AwsConfig,
    base: AwsCredentials,
}

/// A minted session, ready to act.
pub struct Session {
    pub credentials: AwsCredentials,
    pub identity: MintedIdentity,
}

impl AwsExecutor {
    pub fn new(config: AwsConfig, http: BrokerHttp) -> Result<Self> {
        let base = config.base_credentials()?;
        Ok(Self { http, config, base })
    }

    fn endpoint(&self, service: &str) -> String {
        match &self.config.endpoint {
            Some(endpoint) => endpoint.clone(),
            None if service == "iam" => "https://iam.amazonaws.com".into(),
            None => format!("https://{service}.{}.amazonaws.com", self.config.region),
        }
    }

    fn signing_region(&self, service: &str) -> &str {
        if service == "iam" && self.config.endpoint.is_none() { "us-east-1" } else { &self.config.region }
    }

    /// Send one signed call.
    pub async fn call(&self, call: ServiceCall, credentials: &AwsCredentials) -> Result<http::Response<Bytes>> {
        let service = call.service;
        let mut request = call.into_request(&self.endpoint(service))?;
        sign::sign_request(&mut request, credentials, service, self.signing_region(service))?;
        self.http.send(request).await
    }

    /// STS AssumeRole for one decision.
    pub async fn mint(&self, role_arn: &str, decision_id: &str, policy: &Value) -> Result<Session> {
        let session_name = format!("seb-{decision_id}");
        let params = [
            ("Action", "AssumeRole".to_string()),
            ("Version", STS_VERSION.into()),
            ("RoleArn", role_arn.into()),
            ("RoleSessionName", session_name.clone()),
            ("SourceIdentity", decision_id.into()),
            ("DurationSeconds", SESSION_SECONDS.to_string()),
            ("Policy", policy.to_string()),
        ];
        let response =
            self.call(ServiceCall::query("sts", &params), &self.base).await.context("calling STS AssumeRole")?;
        if !response.status().is_success() {
            bail!("STS AssumeRole into {role_arn} failed: {}", api_error(&response));
        }
        let root = Element::parse(response.body())?;
        let credentials =
            root.at(&["AssumeRoleResult", "Credentials"]).context("AssumeRole returned no credentials")?;
        let field = |name: &str| credentials.text_at(&[name]).with_context(|| format!("AssumeRole returned no {name}"));
        let credentials = AwsCredentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: field("SecretAccessKey")?,
            session_token: Some(field("SessionToken")?),
        };
        let identity = MintedIdentity::AwsSession {
            role_arn: role_arn.into(),
            role_session_name: session_name,
            source_identity: decision_id.into(),
            access_key_id: credentials.access_key_id.clone(),
            expiration: field("Expiration")?,
            duration_seconds: SESSION_SECONDS,
        };
        Ok(Session { credentials, identity })
    }

    /// The target's canonical live state and its digest, read with `session`.
    pub async fn live_state(&self, operation: &AwsOperation, session: &Session) -> Result<(Value, String)> {
        let response = self.call(operation.state_read(), &session.credentials).await?;
        let state = operation.canonical_state(&response)?;
        let digest = state_digest(&state);
        Ok((state, digest))
    }

    /// Perform the mutation; returns the API status and, on failure, the API's error.
    pub async fn mutate(&self, operation: &AwsOperation, session: &Session) -> Result<(u16, Option<String>)> {
        let started = Instant::now();
        let response = self.call(operation.mutation(), &session.credentials).await?;
        let status = response.status().as_u16();
        tracing::debug!(
            status,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            action = operation.action(),
            "AWS mutation"
        );
        Ok((status, (!response.status().is_success()).then(|| api_error(&response))))
    }
}
