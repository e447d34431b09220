//! The SAB's records in its own signed, hash-chained log (the audit ledger): every
//! certify request, decision, request awaiting approvals, approval (accepted or refused),
//! issuance, expiry and policy load.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{evidence::Evidence, identity::Agent};
use crate::cert::{ExecutionContract, MutationRequest};

pub const CERTIFY_KIND: &str = "sab_certify";
pub const DECISION_KIND: &str = "sab_decision";
pub const PENDING_KIND: &str = "sab_pending";
pub const APPROVAL_KIND: &str = "sab_approval";
pub const ISSUANCE_KIND: &str = "sab_issuance";
pub const EXPIRY_KIND: &str = "sab_expiry";
pub const POLICY_KIND: &str = "sab_policy";
/// The per-second summary of refused certify requests not recorded one by one.
pub const REFUSALS_SUPPRESSED_KIND: &str = "sab_refusals_suppressed";

/// Every kind the SAB writes.
pub const KINDS: [&str; 8] = [
    CERTIFY_KIND,
    DECISION_KIND,
    PENDING_KIND,
    APPROVAL_KIND,
    ISSUANCE_KIND,
    EXPIRY_KIND,
    POLICY_KIND,
    REFUSALS_SUPPRESSED_KIND,
];

/// What makes two refused certify requests the same kind, for the record budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RefusalKind {
    pub requester: String,
    /// The policy's first reason.
    pub reason: String,
}

/// Of a refused request's text (target, intent, a reason), what its records keep.
/// Refusals are recorded for anyone holding a client certificate, within a budget of
/// records a second, not of bytes.
pub const REFUSED_TEXT_CLIP: usize = 256;

/// A certify request as received, its parameters and live state by digest: the pending
/// and issuance records hold a request the policy let through whole; a refused one
/// (anyone with a client certificate can send one) would otherwise carry its whole 1 MiB
/// body to disk, and its target and intent are clipped.
#[derive(Debug, Serialize)]
pub struct CertifyRecord<'a> {
    pub request_id: &'a str,
    pub requester: &'a str,
    pub provider: crate::cert::Provider,
    pub operation: String,
    pub target: String,
    /// `sha256:` of the request's canonical JSON, parameters included.
    pub request_digest: String,
    pub precondition: &'a str,
    pub intent: String,
    pub live_state_digest: Option<&'a str>,
}

impl<'a> CertifyRecord<'a> {
    /// `refused`: clip the texts to [`REFUSED_TEXT_CLIP`].
    pub fn of(request_id: &'a str, requester: &'a str, draft: &'a super::requests::Draft, refused: bool) -> Self {
        let clip = |text: &str| match refused {
            true => crate::audit::clipped(text, REFUSED_TEXT_CLIP),
            false => text.to_string(),
        };
        Self {
            request_id,
            requester,
            provider: draft.request.provider,
            operation: clip(&draft.request.operation),
            target: clip(&draft.request.target),
            request_digest: draft.request.digest(),
            precondition: &draft.precondition,
            intent: clip(&draft.intent),
            live_state_digest: draft.live_state_digest.as_deref(),
        }
    }
}

/// The policy decision on a request: issued at once, pending approvals, or refused.
#[derive(Debug, Serialize)]
pub struct DecisionRecord<'a> {
    pub request_id: &'a str,
    pub decision: &'a str,
    pub policy_epoch: u64,
    pub policy_set_digest: &'a str,
    pub policies: &'a [String],
    pub reasons: &'a [String],
    pub approvals_required: u32,
    pub approvers: &'a [String],
}

/// A request that awaits approvals: all it takes to resume it, after a restart too
/// (the requester as authenticated, the draft with its live state, the deadline).
#[derive(Debug, Serialize, Deserialize)]
pub struct PendingRecord {
    pub request_id: String,
    pub requester: Agent,
    pub request: MutationRequest,
    pub precondition: String,
    pub live_state: Option<Value>,
    pub intent: String,
    /// RFC 3339, to the nanosecond.
    pub expires_at: String,
    pub approvals_required: u32,
    pub approvers: Vec<String>,
}

/// An approve or deny call: accepted, or refused with its error code.
#[derive(Debug, Serialize)]
pub struct ApprovalRecord<'a> {
    pub request_id: &'a str,
    pub approver: &'a str,
    /// `approve` or `deny`.
    pub verdict: &'a str,
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// An accepted approval's time as the evidence holds it (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<&'a str>,
}

/// A certificate issued: its serial, the contract it binds and the evidence behind it.
#[derive(Debug, Serialize)]
pub struct IssuanceRecord<'a> {
    pub request_id: &'a str,
    pub serial: &'a str,
    pub not_after: &'a str,
    pub contract: &'a ExecutionContract,
    pub evidence_digest: &'a str,
    pub evidence: &'a Evidence,
}

#[derive(Debug, Serialize)]
pub struct ExpiryRecord<'a> {
    pub request_id: &'a str,
    pub approvals: usize,
    pub approvals_required: u32,
}

/// A policy load accepted: from now on certificates carry this epoch.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct PolicyRecord {
    pub epoch: u64,
    pub policy_set_digest: String,
    pub files: Vec<String>,
    pub policies: usize,
}
