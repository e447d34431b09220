//! Reason codes of admission decisions: stable strings for machines and audits.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Admitted,
    // The certificate.
    MalformedCertificate,
    /// The PEM bundle is larger, or holds more certificates, than verification accepts.
    BundleTooLarge,
    /// An extension of the leaf is not strict DER.
    ExtensionNotDer,
    /// An extension appears twice in the leaf (RFC 5280 4.2).
    DuplicateExtension,
    /// The leaf is a CA certificate.
    LeafIsCa,
    LeafLacksDigitalSignature,
    LeafLacksSabEku,
    UntrustedIssuer,
    /// Building the path took more signature checks or issuer candidates than allowed.
    ChainBudgetExceeded,
    IssuerNotCa,
    IssuerLacksKeyCertSign,
    PathLenExceeded,
    NotYetValid,
    Expired,
    TtlExceedsMaximum,
    UnsupportedCriticalExtension,
    MissingContract,
    MalformedContract,
    // Numbers in the contract or the request (I-JSON, RFC 7493).
    /// A number beyond ±(2^53−1): its canonical JSON, hence its digest, is not exact.
    NumberOutOfRange,
    /// A fraction where the contract expects an integer.
    NumberNotInteger,
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
            Self::BundleTooLarge => "bundle_too_large",
            Self::ExtensionNotDer => "extension_not_der",
            Self::DuplicateExtension => "duplicate_extension",
            Self::LeafIsCa => "leaf_is_ca",
            Self::LeafLacksDigitalSignature => "leaf_lacks_digital_signature",
            Self::LeafLacksSabEku => "leaf_lacks_sab_eku",
            Self::UntrustedIssuer => "untrusted_issuer",
            Self::ChainBudgetExceeded => "chain_budget_exceeded",
            Self::IssuerNotCa => "issuer_not_ca",
            Self::IssuerLacksKeyCertSign => "issuer_lacks_key_cert_sign",
            Self::PathLenExceeded => "path_len_exceeded",
            Self::NotYetValid => "not_yet_valid",
            Self::Expired => "expired",
            Self::TtlExceedsMaximum => "ttl_exceeds_maximum",
            Self::UnsupportedCriticalExtension => "unsupported_critical_extension",
            Self::MissingContract => "missing_contract",
            Self::MalformedContract => "malformed_contract",
            Self::NumberOutOfRange => "number_out_of_range",
            Self::NumberNotInteger => "number_not_integer",
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
