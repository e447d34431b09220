//! Reason codes of admission decisions: stable strings for machines and audits.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Admitted,
    // The certificate.
    MalformedCertificate,
    UntrustedIssuer,
    NotYetValid,
    Expired,
    TtlExceedsMaximum,
    UnsupportedCriticalExtension,
    MissingContract,
    MalformedContract,
    // The caller.
    CallerMismatch,
    CallerChanged,
    /// Cluster mode: the contract binds neither a node nor a pod, so it could be replayed elsewhere.
    NotNodeBound,
    // The request against the contract.
    ProviderMismatch,
    OperationMismatch,
    TargetMismatch,
    RequestMismatch,
    // Broker state.
    EpochsUnset,
    PolicyEpochMismatch,
    RevocationEpochStale,
    RevocationStateBehind,
    SerialRevoked,
    ContractRevoked,
    Replayed,
    /// Cluster mode: the node's copy of the cluster state is missing or too old.
    ClusterStateStale,
    // Execution.
    UnsupportedOperation,
    LiveStateUnavailable,
    Drift,
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::MalformedCertificate => "malformed_certificate",
            Self::UntrustedIssuer => "untrusted_issuer",
            Self::NotYetValid => "not_yet_valid",
            Self::Expired => "expired",
            Self::TtlExceedsMaximum => "ttl_exceeds_maximum",
            Self::UnsupportedCriticalExtension => "unsupported_critical_extension",
            Self::MissingContract => "missing_contract",
            Self::MalformedContract => "malformed_contract",
            Self::CallerMismatch => "caller_mismatch",
            Self::CallerChanged => "caller_changed",
            Self::NotNodeBound => "not_node_bound",
            Self::ProviderMismatch => "provider_mismatch",
            Self::OperationMismatch => "operation_mismatch",
            Self::TargetMismatch => "target_mismatch",
            Self::RequestMismatch => "request_mismatch",
            Self::EpochsUnset => "epochs_unset",
            Self::PolicyEpochMismatch => "policy_epoch_mismatch",
            Self::RevocationEpochStale => "revocation_epoch_stale",
            Self::RevocationStateBehind => "revocation_state_behind",
            Self::SerialRevoked => "serial_revoked",
            Self::ContractRevoked => "contract_revoked",
            Self::Replayed => "replayed",
            Self::ClusterStateStale => "cluster_state_stale",
            Self::UnsupportedOperation => "unsupported_operation",
            Self::LiveStateUnavailable => "live_state_unavailable",
            Self::Drift => "drift",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
