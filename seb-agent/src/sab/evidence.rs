//! `evidence_digest`: what the SAB saw when it certified, hashed so an auditor can
//! recompute it.
//!
//! The evidence is the JSON object [`Evidence`]: the request id, the authenticated
//! requester, the agent's stated intent, the exact request and precondition, the live
//! state the agent was shown (as given), the policy decision (epoch, policy-set digest,
//! determining policies, approvals required and approvers) and the approvals received.
//! `evidence_digest` is `sha256:` + hex SHA-256 of its RFC 8785 (JCS) canonical JSON. The
//! SAB's issuance record holds the evidence object itself beside the digest and the
//! contract, so `sha256(JCS(record.evidence)) == record.evidence_digest ==
//! contract.evidence_digest` can be checked from the log alone.

use serde::{Deserialize, Serialize};

use crate::cert::{MutationRequest, contract::digest_of};

/// The version of this definition, inside the evidence itself.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub v: u32,
    pub request_id: String,
    /// The requester's identity URI and what the SAB authenticated of it.
    pub requester: serde_json::Value,
    pub intent: String,
    pub request: MutationRequest,
    pub precondition: String,
    pub live_state: Option<serde_json::Value>,
    pub policy: PolicyDecision,
    pub approvals: Vec<Approval>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDecision {
    pub epoch: u64,
    pub policy_set_digest: String,
    pub decision: String,
    pub policies: Vec<String>,
    pub approvals_required: u32,
    pub approvers: Vec<String>,
}

/// One approval of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub approver: String,
    /// RFC 3339.
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Evidence {
    pub fn digest(&self) -> String {
        digest_of(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_sha256_of_the_canonical_json() {
        let evidence = Evidence {
            v: VERSION,
            request_id: "r".into(),
            requester: serde_json::json!({"uri": "seb://node/n/cgroup/a"}),
            intent: "scale up".into(),
            request: serde_json::from_value(
                serde_json::json!({"provider": "http", "operation": "PUT", "target": "https://h/x"}),
            )
            .unwrap(),
            precondition: "sha256:00".into(),
            live_state: Some(serde_json::json!({"b": 1, "a": 2})),
            policy: PolicyDecision {
                epoch: 3,
                policy_set_digest: "sha256:11".into(),
                decision: "permit".into(),
                policies: vec!["p".into()],
                approvals_required: 0,
                approvers: vec![],
            },
            approvals: vec![],
        };
        let canonical = serde_jcs::to_string(&evidence).unwrap();
        assert!(canonical.contains(r#""live_state":{"a":2,"b":1}"#), "{canonical}");
        let expected = format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(canonical.as_bytes())));
        assert_eq!(evidence.digest(), expected);
    }
}
