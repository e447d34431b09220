//! The AWS executor: any AWS API call, as a contract certifies it (see [`request`]).
//!
//! Per mutation, concurrently: STS AssumeRole into the contract's role with a session
//! policy allowing exactly the certified action on the certified resources (the shortest
//! duration STS allows, the decision id as RoleSessionName and SourceIdentity, so
//! CloudTrail correlates), and the precondition read with the broker's read identity.
//! Then the certified request, signed with the minted session, over the broker's own
//! sockets; the postcondition read follows only when the contract has one.

pub mod canonical;
pub mod preset;
pub mod request;
mod rest_action;
pub mod sign;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::future::BoxFuture;
pub use request::AwsOperation;
use request::{AwsCall, CertifiedRead, ReadOrigin, StateRead, api_error};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
pub use sign::AwsCredentials;

use super::{
    Executor, MintedIdentity, Mutation, Performed, Prepared, Refusal, Timings, broker_http::BrokerHttp,
    identity_mismatch, mint_failed, read_failed, unsupported,
};
use crate::{
    admission::RequestSummary,
    cert::{MutationRequest, Provider, contract::ScopedIdentity},
};

/// STS's minimum session duration.
pub const SESSION_SECONDS: u32 = 900;
const STS_VERSION: &str = "2011-06-15";
/// A cached read session is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Read-role sessions kept at once: the unnarrowed one and those narrowed to one read.
const MAX_READ_SESSIONS: usize = 256;

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
    /// A read-only role for precondition and postcondition reads. Its session is kept and
    /// renewed, so the precondition read runs alongside the mutation's AssumeRole.
    /// Omitted: each read gets its own session of the contract's role, with a session
    /// policy for that read alone (one more round trip per mutation).
    #[serde(default)]
    pub read_role_arn: Option<String>,
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
    /// The read role's sessions, by session policy (`None`: unnarrowed), and when to
    /// renew each.
    readers: tokio::sync::Mutex<std::collections::HashMap<Option<String>, KeptSession>>,
}

type KeptSession = (std::sync::Arc<AwsCredentials>, MintedIdentity, Instant);

/// A minted session, ready to act.
pub struct Session {
    pub credentials: AwsCredentials,
    pub identity: MintedIdentity,
}

/// A certified mutation with its session, between the precondition read and execution.
struct AwsMutation<'a> {
    executor: &'a AwsExecutor,
    operation: AwsOperation,
    session: Session,
    role_arn: String,
    decision_id: String,
}

impl<'a> Mutation<'a> for AwsMutation<'a> {
    fn identity(&self) -> &MintedIdentity {
        &self.session.identity
    }

    fn perform(self: Box<Self>) -> BoxFuture<'a, Performed> {
        Box::pin(async move {
            let result = self.executor.mutate(&self.operation, &self.session).await;
            let resulting = match &self.operation.postcondition {
                Some(read) => self.executor.read_state(read, &self.role_arn, &self.decision_id).await.ok(),
                None => None,
            };
            (result, resulting)
        })
    }

    fn discard(self: Box<Self>) -> BoxFuture<'a, ()> {
        // An STS session cannot be revoked by itself; it expires with its short duration.
        Box::pin(async {})
    }
}

impl Executor for AwsExecutor {
    fn prepare<'a: 'r, 'r>(
        &'a self,
        identity: &'r ScopedIdentity,
        request: &'r MutationRequest,
        decision_id: &'r str,
    ) -> BoxFuture<'r, Result<(Prepared<'a>, String, Timings), Refusal>> {
        Box::pin(async move {
            let ScopedIdentity::AwsRole { role_arn } = identity else {
                return Err(identity_mismatch(Provider::Aws, identity));
            };
            let operation = AwsOperation::parse(request).map_err(unsupported)?;
            let (session, digest, mint_ms, drift_check_ms) = self.prepare(&operation, role_arn, decision_id).await;
            let session = session.map_err(mint_failed)?;
            let digest = digest.map_err(read_failed)?;
            let (role_arn, decision_id) = (role_arn.clone(), decision_id.to_string());
            let mutation = AwsMutation { executor: self, operation, session, role_arn, decision_id };
            Ok((Box::new(mutation) as Prepared<'a>, digest, Timings { mint_ms, drift_check_ms, execute_ms: 0.0 }))
        })
    }

    fn read_again<'a>(
        &'a self,
        request: &'a RequestSummary,
        identity: &'a ScopedIdentity,
        decision_id: &'a str,
    ) -> BoxFuture<'a, Result<(MintedIdentity, String)>> {
        Box::pin(async move {
            let ScopedIdentity::AwsRole { role_arn } = identity else { bail!("an AWS target needs an aws_role") };
            // A short-form preset's decision records no read: the preset names it.
            let (read, origin): (CertifiedRead, _) = match request.state_read.clone() {
                Some(read) => (serde_json::from_value(read)?, ReadOrigin::Agent),
                None => (
                    preset::precondition_read(&request.operation, &request.target)
                        .context("the decision record names no precondition read")?,
                    ReadOrigin::Preset,
                ),
            };
            let read = StateRead::new(&read, &request.target, origin)?;
            let (credentials, identity) = self.read_session(&read, role_arn, decision_id).await?;
            let response = self.call(&read.call, &credentials).await?;
            Ok((identity, read.digest(&response)?))
        })
    }
}

impl AwsExecutor {
    pub fn new(config: AwsConfig, http: BrokerHttp) -> Result<Self> {
        let base = config.base_credentials()?;
        Ok(Self { http, config, base, readers: Default::default() })
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

    /// Sign and send one certified call.
    pub async fn call(&self, call: &AwsCall, credentials: &AwsCredentials) -> Result<http::Response<Bytes>> {
        let mut request = call.http_request(&self.endpoint(&call.service))?;
        sign::sign_request(&mut request, credentials, &call.service, self.signing_region(&call.service))?;
        self.http.send(request).await
    }

    /// STS AssumeRole for one decision.
    pub async fn mint(&self, role_arn: &str, decision_id: &str, policy: Option<&Value>) -> Result<Session> {
        let session_name = format!("seb-{decision_id}");
        let mut form = vec![
            ("Action", "AssumeRole".to_string()),
            ("Version", STS_VERSION.into()),
            ("RoleArn", role_arn.into()),
            ("RoleSessionName", session_name.clone()),
            ("SourceIdentity", decision_id.into()),
            ("DurationSeconds", SESSION_SECONDS.to_string()),
        ];
        if let Some(policy) = policy {
            form.push(("Policy", policy.to_string()));
        }
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("{}/", self.endpoint("sts").trim_end_matches('/')))
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded; charset=utf-8")
            .body(Bytes::from(preset::query_body(&form)))?;
        let host = request.uri().authority().context("endpoint without host")?.to_string();
        request.headers_mut().insert(http::header::HOST, host.parse()?);
        let length = request.body().len();
        request.headers_mut().insert(http::header::CONTENT_LENGTH, length.into());
        sign::sign_request(&mut request, &self.base, "sts", self.signing_region("sts"))?;
        let response = self.http.send(request).await.context("calling STS AssumeRole")?;
        if !response.status().is_success() {
            bail!("STS AssumeRole into {role_arn} failed: {}", api_error(&response));
        }
        let document = canonical::xml_to_json(response.body())?;
        let credentials = document
            .pointer("/AssumeRoleResponse/AssumeRoleResult/Credentials")
            .context("AssumeRole returned no credentials")?;
        let field = |name: &str| {
            credentials[name]
                .as_str()
                .map(|s| s.trim().to_string())
                .with_context(|| format!("AssumeRole returned no {name}"))
        };
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

    /// A session for `read`, and who it is: a kept session of the read role (unnarrowed
    /// for the broker's own reads of known protocols, else narrowed to this read) when
    /// the target is in its account, or a session of `role_arn` allowing this read alone.
    async fn read_session(
        &self,
        read: &StateRead,
        role_arn: &str,
        decision_id: &str,
    ) -> Result<(std::sync::Arc<AwsCredentials>, MintedIdentity)> {
        let reader = self
            .config
            .read_role_arn
            .as_ref()
            .filter(|reader| request::reader_reads(reader, &read.target_account, &read.call.service));
        let Some(reader) = reader else {
            let session = self.mint(role_arn, decision_id, Some(&read.policy())).await?;
            return Ok((std::sync::Arc::new(session.credentials), session.identity));
        };
        let policy = (!read.unnarrowed_ok).then(|| read.policy());
        let key = policy.as_ref().map(Value::to_string);
        let now = Instant::now();
        if let Some((credentials, identity, _)) =
            self.readers.lock().await.get(&key).filter(|(_, _, renew_at)| now < *renew_at)
        {
            return Ok((credentials.clone(), identity.clone()));
        }
        // Named for what it may read, not for the decision that first needed it.
        let name = match &key {
            None => "broker-reader".to_string(),
            Some(policy) => format!("reader-{}", &hex::encode(sha2::Sha256::digest(policy))[..16]),
        };
        let session = self.mint(reader, &name, policy.as_ref()).await.context("assuming aws.read_role_arn")?;
        let credentials = std::sync::Arc::new(session.credentials);
        let renew_at = Instant::now() + Duration::from_secs(SESSION_SECONDS.into()) - RENEW_BEFORE;
        let mut kept = self.readers.lock().await;
        if kept.len() >= MAX_READ_SESSIONS {
            kept.retain(|_, (_, _, renew_at)| now < *renew_at);
        }
        if kept.len() >= MAX_READ_SESSIONS
            && let Some(oldest) = kept.iter().min_by_key(|(_, (_, _, renew_at))| *renew_at).map(|(k, _)| k.clone())
        {
            kept.remove(&oldest);
        }
        kept.insert(key, (credentials.clone(), session.identity.clone(), renew_at));
        Ok((credentials, session.identity))
    }

    /// The digest of the canonical state `read` shows now.
    pub async fn read_state(&self, read: &StateRead, role_arn: &str, decision_id: &str) -> Result<String> {
        let (credentials, _) = self.read_session(read, role_arn, decision_id).await?;
        let response = self.call(&read.call, &credentials).await?;
        read.digest(&response)
    }

    /// Mint the mutation's session and read the precondition, concurrently. Returns the
    /// prepared call, the live digest, and how long each took.
    pub async fn prepare(
        &self,
        operation: &AwsOperation,
        role_arn: &str,
        decision_id: &str,
    ) -> (Result<Session>, Result<String>, f64, f64) {
        let policy = operation.session_policy();
        let timed = |clock: Instant| clock.elapsed().as_secs_f64() * 1e3;
        let clock = Instant::now();
        let mint = async {
            let session = self.mint(role_arn, decision_id, Some(&policy)).await;
            (session, timed(clock))
        };
        let read = async {
            let digest = self.read_state(&operation.precondition, role_arn, decision_id).await;
            (digest, timed(clock))
        };
        let ((session, mint_ms), (digest, read_ms)) = tokio::join!(mint, read);
        (session, digest, mint_ms, read_ms)
    }

    /// Perform the mutation; returns the API status and, on failure, the API's error.
    pub async fn mutate(&self, operation: &AwsOperation, session: &Session) -> Result<(u16, Option<String>)> {
        let response = self.call(&operation.mutation, &session.credentials).await?;
        let status = response.status().as_u16();
        Ok((status, (!response.status().is_success()).then(|| api_error(&response))))
    }
}
