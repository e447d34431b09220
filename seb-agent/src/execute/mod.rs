//! Execution: after admission, the broker performs the mutation itself with an identity
//! minted for that one mutation, and records the outcome chained to the decision.

pub mod aws;
pub mod broker_http;
pub mod reconcile;

use serde::{Deserialize, Serialize};

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
