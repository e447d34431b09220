//! Execution: after admission, the broker performs the mutation itself with an identity
//! minted for that one mutation, and records the outcome chained to the decision.

pub mod aws;
pub mod broker_http;
pub mod https;
pub mod kubernetes;
pub mod passthrough;
pub mod reconcile;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{
    admission::Reason,
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
    /// The broker stopped between decision and outcome; recorded after checking live state.
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

/// The executors this broker has, by provider.
#[derive(Default)]
pub struct Executors {
    pub aws: Option<aws::AwsExecutor>,
    pub https: Option<https::HttpsExecutor>,
    pub kubernetes: Option<kubernetes::KubernetesExecutor>,
}

/// A minted identity and the operation it may perform, between the drift check and
/// execution.
pub enum Prepared {
    Aws { operation: aws::AwsOperation, session: aws::Session },
    Https { operation: https::HttpOperation, session: https::ClientSession },
    Kubernetes { operation: kubernetes::KubeOperation, session: Box<kubernetes::KubeSession> },
}

impl Prepared {
    pub fn identity(&self) -> &MintedIdentity {
        match self {
            Self::Aws { session, .. } => &session.identity,
            Self::Https { session, .. } => &session.identity,
            Self::Kubernetes { session, .. } => &session.identity,
        }
    }
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

type Refusal = (Reason, String);

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Executors {
    pub fn handles(&self, provider: Provider) -> bool {
        match provider {
            Provider::Aws => self.aws.is_some(),
            Provider::Http => self.https.is_some(),
            Provider::Kubernetes => self.kubernetes.is_some(),
        }
    }

    /// Mint the contract's identity and read the target's live state; returns the
    /// prepared mutation and the live state's digest. Errors carry their reason code.
    pub async fn prepare(
        &self,
        contract: &ExecutionContract,
        request: &MutationRequest,
        decision_id: &str,
        timings: &mut Timings,
    ) -> Result<(Prepared, String), Refusal> {
        let clock = Instant::now();
        let mut prepared = self.mint(contract, request, decision_id).await?;
        timings.mint_ms = ms(clock);
        let clock = Instant::now();
        let digest = self.live_digest(&mut prepared).await.map_err(|e| {
            (Reason::LiveStateUnavailable, format!("the live state could not be read, so nothing is admitted: {e:#}"))
        })?;
        timings.drift_check_ms = ms(clock);
        Ok((prepared, digest))
    }

    /// The identity the contract names, for the operation the request names.
    async fn mint(
        &self,
        contract: &ExecutionContract,
        request: &MutationRequest,
        decision_id: &str,
    ) -> Result<Prepared, Refusal> {
        let unsupported = |e: anyhow::Error| (Reason::UnsupportedOperation, format!("{e:#}"));
        let unavailable =
            |e: anyhow::Error| (Reason::LiveStateUnavailable, format!("minting the scoped identity failed: {e:#}"));
        match (request.provider, &contract.identity) {
            (Provider::Aws, ScopedIdentity::AwsRole { role_arn }) if self.aws.is_some() => {
                let executor = self.aws.as_ref().expect("checked");
                let operation = aws::AwsOperation::parse(request).map_err(unsupported)?;
                let session =
                    executor.mint(role_arn, decision_id, &operation.session_policy()).await.map_err(unavailable)?;
                Ok(Prepared::Aws { operation, session })
            }
            (Provider::Http, ScopedIdentity::X509Client { subject }) if self.https.is_some() => {
                let executor = self.https.as_ref().expect("checked");
                let operation = https::HttpOperation::parse(request).map_err(unsupported)?;
                let session = executor.mint(subject, decision_id).map_err(unavailable)?;
                Ok(Prepared::Https { operation, session })
            }
            (Provider::Kubernetes, ScopedIdentity::KubernetesServiceAccount { namespace, name })
                if self.kubernetes.is_some() =>
            {
                let executor = self.kubernetes.as_ref().expect("checked");
                let operation = kubernetes::KubeOperation::parse(request).map_err(unsupported)?;
                let session = executor.mint(namespace, name, decision_id).await.map_err(unavailable)?;
                Ok(Prepared::Kubernetes { operation, session: Box::new(session) })
            }
            (provider, identity) => Err((
                Reason::MalformedContract,
                format!("a {provider} contract cannot mint a {} identity on this broker", identity.kind()),
            )),
        }
    }

    /// The digest of the prepared target's live state, read with its minted identity.
    async fn live_digest(&self, prepared: &mut Prepared) -> anyhow::Result<String> {
        let missing = || anyhow::anyhow!("no executor for this provider");
        let (_, digest) = match prepared {
            Prepared::Aws { operation, session } => {
                self.aws.as_ref().ok_or_else(missing)?.live_state(operation, session).await?
            }
            Prepared::Https { operation, session } => {
                self.https.as_ref().ok_or_else(missing)?.live_state(operation, session).await?
            }
            Prepared::Kubernetes { operation, session } => {
                self.kubernetes.as_ref().ok_or_else(missing)?.live_state(operation, session).await?
            }
        };
        Ok(digest)
    }

    /// Perform the prepared mutation and read the resulting state.
    pub async fn execute(&self, mut prepared: Prepared) -> Executed {
        let clock = Instant::now();
        let result = self.mutate(&prepared).await;
        let resulting_state_digest = self.live_digest(&mut prepared).await.ok();
        let identity = prepared.identity().clone();
        // Revokes what can be revoked (a Kubernetes token) now that the state is read.
        self.discard(prepared).await;
        let (status, api_status, error) = match result {
            Ok((code, None)) => (OutcomeStatus::Succeeded, Some(code), None),
            Ok((code, Some(error))) => (OutcomeStatus::Failed, Some(code), Some(error)),
            Err(e) => (OutcomeStatus::Failed, None, Some(format!("{e:#}"))),
        };
        Executed { status, api_status, error, identity, resulting_state_digest, execute_ms: ms(clock) }
    }

    /// Send the prepared mutation: the API status, and its error if it refused.
    async fn mutate(&self, prepared: &Prepared) -> anyhow::Result<(u16, Option<String>)> {
        let missing = || anyhow::anyhow!("no executor for this provider");
        match prepared {
            Prepared::Aws { operation, session } => {
                self.aws.as_ref().ok_or_else(missing)?.mutate(operation, session).await
            }
            Prepared::Https { operation, session } => {
                self.https.as_ref().ok_or_else(missing)?.mutate(operation, session).await
            }
            Prepared::Kubernetes { operation, session } => {
                self.kubernetes.as_ref().ok_or_else(missing)?.mutate(operation, session).await
            }
        }
    }

    /// Drop a prepared mutation that will not run (a denial after the drift check):
    /// credentials that can be cut short are.
    pub async fn discard(&self, prepared: Prepared) {
        if let (Prepared::Kubernetes { session, .. }, Some(executor)) = (prepared, &self.kubernetes) {
            executor.revoke(&session).await;
        }
    }

    /// Read a target's live state with a read-only identity (reconciliation).
    pub async fn read_live_state(
        &self,
        request: &crate::admission::RequestSummary,
        identity: &ScopedIdentity,
        decision_id: &str,
    ) -> anyhow::Result<(MintedIdentity, String)> {
        match (request.provider, identity, &self.aws, &self.https) {
            (Provider::Aws, ScopedIdentity::AwsRole { role_arn }, Some(executor), _) => {
                let operation = aws::AwsOperation::for_reading(&request.operation, &request.target)?;
                let session = executor.mint(role_arn, decision_id, &operation.read_policy()).await?;
                let (_, digest) = executor.live_state(&operation, &session).await?;
                Ok((session.identity, digest))
            }
            (Provider::Http, ScopedIdentity::X509Client { subject }, _, Some(executor)) => {
                let operation = https::HttpOperation::for_reading(&request.target)?;
                let session = executor.mint(subject, decision_id)?;
                let (_, digest) = executor.live_state(&operation, &session).await?;
                Ok((session.identity, digest))
            }
            (Provider::Kubernetes, ScopedIdentity::KubernetesServiceAccount { namespace, name }, ..) => {
                let executor = self.kubernetes.as_ref().ok_or_else(|| anyhow::anyhow!("no Kubernetes executor"))?;
                let operation = kubernetes::KubeOperation::for_reading(&request.target)?;
                executor.read(&operation, namespace, name, decision_id).await
            }
            _ => anyhow::bail!("no executor on this broker can read this target"),
        }
    }
}
