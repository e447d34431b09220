//! Execution: after admission, the broker performs the mutation itself with an identity
//! minted for that one mutation, and records the outcome chained to the decision.

pub mod aws;
pub mod broker_http;
pub mod https;
pub mod kubernetes;
pub mod passthrough;
pub mod reconcile;
pub mod retry_pace;
pub mod target_locks;

use std::time::Instant;

use anyhow::{Result, bail};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{
    admission::{Reason, RequestSummary},
    audit::clipped,
    cert::{ExecutionContract, MutationRequest, Provider, contract::ScopedIdentity},
};

/// Record kind of execution outcomes.
pub const OUTCOME_KIND: &str = "outcome";

/// Reference to the identity minted for one mutation (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MintedIdentity {
    AwsSession {
        role_arn: String,
        role_session_name: String,
        source_identity: String,
        access_key_id: String,
        expiration: String,
        duration_seconds: u32,
    },
    KubernetesToken {
        namespace: String,
        service_account: String,
        /// The token's `jti`: its credential id in API server audit events.
        credential_id: String,
        expiration: String,
        /// The Secret the token is bound to (deleted after the mutation).
        bound_secret: String,
    },
    X509Client {
        subject: String,
        /// Hex serial of the minted client certificate.
        serial: String,
        /// `urn:seb:decision:<id>`, the certificate's URI SAN.
        decision_uri: String,
        /// Expiry, seconds since the Unix epoch.
        not_after: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    /// The API accepted the mutation.
    Succeeded,
    /// The API refused it, or it could not be sent.
    Failed,
    /// Admitted, but this broker has no executor for the provider: nothing was done.
    NotExecuted,
    /// The broker stopped between decision and outcome (recorded after checking live
    /// state), or the API gave no answer within [`STAGE_DEADLINE`].
    Unknown,
}

impl OutcomeStatus {
    /// The name used on the wire and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::NotExecuted => "not_executed",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for OutcomeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds spent in each stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub mint_ms: f64,
    pub drift_check_ms: f64,
    pub execute_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub decision_id: String,
    /// The decision record this outcome belongs to.
    pub decision_seq: i64,
    pub status: OutcomeStatus,
    pub identity: Option<MintedIdentity>,
    pub api_status: Option<u16>,
    /// Digest of the target's canonical state after the mutation.
    pub resulting_state_digest: Option<String>,
    pub duration_ms: f64,
    pub timings: Timings,
    pub error: Option<String>,
    /// Sequence number of the outcome's own record (in answers; not in the record itself).
    #[serde(default, skip_serializing_if = "is_unset")]
    pub record_seq: i64,
}

fn is_unset(seq: &i64) -> bool {
    *seq == 0
}

/// A refusal before anything was sent: its reason code and message.
pub type Refusal = (Reason, String);

/// What each provider's executor does for one decision.
pub trait Executor: Send + Sync {
    /// Mint the identity the contract names for the request, and read the target's live
    /// state; returns the mutation ready to perform, the live state's digest, and how long
    /// minting and reading took.
    fn prepare<'a: 'r, 'r>(
        &'a self,
        identity: &'r ScopedIdentity,
        request: &'r MutationRequest,
        decision_id: &'r str,
    ) -> BoxFuture<'r, Result<(Prepared<'a>, String, Timings), Refusal>>;

    /// Read the live state of a recorded request's target, with a read-only identity
    /// (reconciliation after a restart).
    fn read_again<'a>(
        &'a self,
        request: &'a RequestSummary,
        identity: &'a ScopedIdentity,
        decision_id: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<(MintedIdentity, String)>>;
}

/// A minted identity and the mutation it may perform, between the drift check and
/// execution.
pub trait Mutation<'a>: Send + 'a {
    fn identity(&self) -> &MintedIdentity;
    /// Send the mutation: the API status and its error if it refused, and the resulting
    /// state's digest where it is read.
    fn perform(self: Box<Self>) -> BoxFuture<'a, Performed>;
    /// Drop it unperformed: credentials that can be cut short are.
    fn discard(self: Box<Self>) -> BoxFuture<'a, ()>;
}

pub type Prepared<'a> = Box<dyn Mutation<'a> + 'a>;

/// The API status and its error if it refused (or why nothing was sent), and the
/// resulting state's digest where it is read.
pub type Performed = (anyhow::Result<(u16, Option<String>)>, Option<String>);

/// The refusal for a contract whose identity the provider cannot mint.
pub fn identity_mismatch(provider: Provider, identity: &ScopedIdentity) -> Refusal {
    (
        Reason::MalformedContract,
        format!("a {provider} contract cannot mint a {} identity on this broker", identity.kind()),
    )
}

/// `params` holds no key but `allowed` (or is absent): a key no executor reads would be
/// certified, and judged by the SAB's rules, without meaning anything.
pub fn only_params(operation: &str, params: &serde_json::Value, allowed: &[&str]) -> Result<()> {
    match params {
        serde_json::Value::Null => Ok(()),
        serde_json::Value::Object(map) => match map.keys().find(|key| !allowed.contains(&key.as_str())) {
            None => Ok(()),
            Some(key) if allowed.is_empty() => bail!("params.{key} means nothing to {operation} (it takes no params)"),
            Some(key) => bail!(
                "params.{key} means nothing to {operation} (it takes {})",
                allowed.iter().map(|k| format!("params.{k}")).collect::<Vec<_>>().join(", ")
            ),
        },
        _ => bail!("params must be an object"),
    }
}

/// The refusal for a request the provider cannot perform.
pub fn unsupported(e: anyhow::Error) -> Refusal {
    (Reason::UnsupportedOperation, format!("{e:#}"))
}

/// The refusal when the identity cannot be minted.
pub fn mint_failed(e: anyhow::Error) -> Refusal {
    (Reason::LiveStateUnavailable, format!("minting the scoped identity failed: {e:#}"))
}

/// The refusal when the live state cannot be read.
pub fn read_failed(e: anyhow::Error) -> Refusal {
    (Reason::LiveStateUnavailable, format!("the live state could not be read, so nothing is admitted: {e:#}"))
}

/// The executors this broker has, by provider.
#[derive(Default)]
pub struct Executors {
    pub aws: Option<aws::AwsExecutor>,
    pub https: Option<https::HttpsExecutor>,
    pub kubernetes: Option<kubernetes::KubernetesExecutor>,
    /// One execution at a time per target.
    pub targets: target_locks::TargetLocks,
    /// One preparation a second for a certificate whose live-state check failed.
    pub retries: retry_pace::RetryPace,
}

/// What executing a prepared mutation did.
pub struct Executed {
    pub status: OutcomeStatus,
    pub api_status: Option<u16>,
    pub error: Option<String>,
    pub identity: MintedIdentity,
    pub resulting_state_digest: Option<String>,
    pub execute_ms: f64,
}

/// How long preparing, and then executing, one mutation may take: a stalled API server
/// (a Kubernetes response that stops mid-body) must not hold the target, or the caller's
/// connection, for good.
pub const STAGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

pub(crate) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Executors {
    /// The executor for `provider`, if this broker has one: the one dispatch.
    pub fn get(&self, provider: Provider) -> Option<&dyn Executor> {
        match provider {
            Provider::Aws => self.aws.as_ref().map(|e| e as &dyn Executor),
            Provider::Http => self.https.as_ref().map(|e| e as &dyn Executor),
            Provider::Kubernetes => self.kubernetes.as_ref().map(|e| e as &dyn Executor),
        }
    }

    pub fn handles(&self, provider: Provider) -> bool {
        self.get(provider).is_some()
    }

    /// Mint the contract's identity and read the target's live state; returns the
    /// prepared mutation and the live state's digest. Errors carry their reason code.
    pub async fn prepare<'a>(
        &'a self,
        contract: &ExecutionContract,
        request: &MutationRequest,
        decision_id: &str,
        timings: &mut Timings,
    ) -> Result<(Prepared<'a>, String), Refusal> {
        let executor = self.get(request.provider).ok_or_else(|| {
            (Reason::UnsupportedOperation, format!("this broker has no executor for provider {}", request.provider))
        })?;
        let preparing = executor.prepare(&contract.identity, request, decision_id);
        let (prepared, digest, taken) = tokio::time::timeout(STAGE_DEADLINE, preparing).await.map_err(|_| {
            let message = format!("minting and reading the live state took over {} s", STAGE_DEADLINE.as_secs());
            (Reason::LiveStateUnavailable, message)
        })??;
        *timings = taken;
        Ok((prepared, digest))
    }

    /// Perform the prepared mutation (and read the resulting state where it is read).
    pub async fn execute(&self, prepared: Prepared<'_>) -> Executed {
        let clock = Instant::now();
        let identity = prepared.identity().clone();
        let Ok((result, resulting_state_digest)) = tokio::time::timeout(STAGE_DEADLINE, prepared.perform()).await
        else {
            // Sent, perhaps applied: what became of it is not known.
            let error =
                format!("no answer within {} s: the change may or may not have been made", STAGE_DEADLINE.as_secs());
            return Executed {
                status: OutcomeStatus::Unknown,
                api_status: None,
                error: Some(error),
                identity,
                resulting_state_digest: None,
                execute_ms: ms(clock),
            };
        };
        let (status, api_status, error) = judged(result);
        Executed { status, api_status, error, identity, resulting_state_digest, execute_ms: ms(clock) }
    }

    /// Drop a prepared mutation that will not run (a denial after the drift check).
    pub async fn discard(&self, prepared: Prepared<'_>) {
        prepared.discard().await
    }

    /// Read a target's live state with a read-only identity (reconciliation).
    pub async fn read_live_state(
        &self,
        request: &RequestSummary,
        identity: &ScopedIdentity,
        decision_id: &str,
    ) -> anyhow::Result<(MintedIdentity, String)> {
        let executor = self
            .get(request.provider)
            .ok_or_else(|| anyhow::anyhow!("no executor on this broker can read this target"))?;
        executor.read_again(request, identity, decision_id).await
    }
}

/// Of an API's error message, an outcome keeps this much: the API (or whatever answers at
/// its address) chooses its length, and the decision carrying it must fit one reply.
const OUTCOME_ERROR: usize = crate::audit::MESSAGE_CLIP;

/// What the API's answer (or the exchange's failure) makes of the outcome.
fn judged(result: anyhow::Result<(u16, Option<String>)>) -> (OutcomeStatus, Option<u16>, Option<String>) {
    let (status, api_status, error) = match result {
        Ok((code, None)) => (OutcomeStatus::Succeeded, Some(code), None),
        Ok((code, Some(error))) if may_have_applied(code) => {
            let error = format!("{}; the change may or may not have been made", clipped(&error, OUTCOME_ERROR));
            (OutcomeStatus::Unknown, Some(code), Some(error))
        }
        Ok((code, Some(error))) => (OutcomeStatus::Failed, Some(code), Some(error)),
        Err(e) if broker_http::was_not_sent(&e) => (OutcomeStatus::Failed, None, Some(format!("{e:#}"))),
        // Perhaps taken by the API before the exchange broke: an agent told `failed`
        // would try again, and the change might be made twice.
        Err(e) => {
            let error = format!(
                "{}; the request may have reached the API: the change may or may not have been made",
                clipped(&format!("{e:#}"), OUTCOME_ERROR)
            );
            (OutcomeStatus::Unknown, None, Some(error))
        }
    };
    (status, api_status, error.map(|error| clipped(&error, 2 * OUTCOME_ERROR)))
}

/// An answer other than a success after which the change may still have been made: any
/// redirection (nothing follows one; `303 See Other` is how many APIs answer a POST they
/// took), and any server or gateway error (an API server past its timeout, a proxy that
/// lost the upstream answer, a CDN's 52x, AWS `InternalError`) but the two that say the
/// request was not handled at all (501 Not Implemented, 505 HTTP Version Not Supported).
/// Any other error answer refused the request.
fn may_have_applied(status: u16) -> bool {
    (300..400).contains(&status) || ((500..600).contains(&status) && !matches!(status, 501 | 505))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API's error message of any length: the outcome keeps a few KiB, whatever the
    /// status, so the decision carrying it fits one reply.
    #[test]
    fn an_apis_error_message_is_clipped_in_the_outcome() {
        let huge = "e".repeat(2 << 20);
        for (result, status) in [
            (Ok((400, Some(huge.clone()))), OutcomeStatus::Failed),
            (Ok((503, Some(huge.clone()))), OutcomeStatus::Unknown),
            (Err(anyhow::anyhow!("{huge}")), OutcomeStatus::Unknown),
        ] {
            let (judged_status, _, error) = judged(result);
            let error = error.unwrap();
            assert_eq!(judged_status, status);
            assert!(error.len() < 3 * OUTCOME_ERROR, "{} bytes kept", error.len());
            assert!(error.contains(&format!("{} bytes, sha256:", huge.len())), "says how long it was");
        }
        assert_eq!(judged(Ok((200, None))), (OutcomeStatus::Succeeded, Some(200), None));
    }
}
