//! Admission: a proposal is admitted only if every predicate holds, and every decision
//! is a signed audit record before the caller hears it.
//!
//! Order: certificate (chain, validity, extensions, contract) → caller identity →
//! request against the contract → broker state (epochs, revocation, replay), the last
//! inside the ledger transaction that records the decision and consumes the serial.

pub mod caller;
pub mod reason;
pub mod state;

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use caller::{Caller, CallerIdentity};
pub use reason::Reason;

use crate::{
    audit::{Ledger, now_ns},
    cert::{MutationRequest, Rejection, TrustAnchors, ValidityPolicy, Verified},
};

/// Record kind of admission decisions.
pub const DECISION_KIND: &str = "decision";

/// A proposal as it arrives on the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    /// PEM: the SAB certificate, then any intermediates.
    pub certificate: String,
    pub request: MutationRequest,
}

/// The broker's answer, also the core of the decision record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub decision_id: String,
    pub admitted: bool,
    pub reason: Reason,
    pub message: String,
    /// Sequence number of the decision's audit record (0 if it could not be recorded).
    pub record_seq: i64,
    pub serial: Option<String>,
    pub contract_id: Option<String>,
}

/// The decision record: what a security team reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub decision_id: String,
    pub admitted: bool,
    pub reason: Reason,
    pub message: String,
    pub caller: CallerIdentity,
    pub serial: Option<String>,
    pub contract_id: Option<String>,
    pub request: RequestSummary,
    pub active_epochs: state::Epochs,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RequestSummary {
    pub provider: crate::cert::Provider,
    pub operation: String,
    pub target: String,
    pub digest: String,
}

pub struct Admission {
    anchors: Option<TrustAnchors>,
    validity: ValidityPolicy,
}

impl Admission {
    pub fn new(anchors: Option<TrustAnchors>, validity: ValidityPolicy) -> Self {
        Self { anchors, validity }
    }

    /// The predicates that need no broker state. The verified certificate is returned
    /// whenever it verified, so a later denial still names its serial and contract.
    pub fn precheck(
        &self,
        caller: &Caller,
        proposal: &Proposal,
        now: SystemTime,
    ) -> (Option<Verified>, Result<(), Rejection>) {
        let Some(anchors) = self.anchors.as_ref() else {
            let message = "this broker has no SAB trust anchors configured (admission.trust_anchors)".into();
            return (None, Err(Rejection { reason: Reason::UntrustedIssuer, message }));
        };
        let verified = match anchors.verify(&proposal.certificate, self.validity, now) {
            Ok(verified) => verified,
            Err(rejection) => return (None, Err(rejection)),
        };
        let verdict = caller
            .matches(&verified.contract.agent)
            .map_err(|message| Rejection { reason: Reason::CallerMismatch, message })
            .and_then(|()| check_request(&verified, &proposal.request));
        (Some(verified), verdict)
    }

    /// Decide, record durably, and only then answer.
    pub async fn decide(&self, ledger: &Ledger, caller: &Caller, proposal: &Proposal) -> Decision {
        let decision_id = uuid::Uuid::new_v4().to_string();
        let (verified, precheck) = self.precheck(caller, proposal, SystemTime::now());
        // The caller must still be the process that connected, right before recording.
        let precheck = precheck.and_then(|()| {
            if caller.still_same() {
                Ok(())
            } else {
                Err(Rejection {
                    reason: Reason::CallerChanged,
                    message: "the calling process exited or was replaced during the call".into(),
                })
            }
        });
        let identity = caller.identity.clone();
        let request = RequestSummary {
            provider: proposal.request.provider,
            operation: proposal.request.operation.clone(),
            target: proposal.request.target.clone(),
            digest: proposal.request.digest(),
        };
        let id = decision_id.clone();
        let recorded = ledger
            .run(move |batch| {
                let verdict = match (&verified, precheck) {
                    (Some(verified), Ok(())) => state::check(batch.conn(), verified)?,
                    (_, Err(rejection)) => Err(rejection),
                    (None, Ok(())) => {
                        Err(Rejection { reason: Reason::Internal, message: "no verified certificate".into() })
                    }
                };
                let admitted = verdict.is_ok();
                let (reason, message) = match verdict {
                    Ok(()) => (Reason::Admitted, "every admission predicate holds".to_string()),
                    Err(rejection) => (rejection.reason, rejection.message),
                };
                let serial = verified.as_ref().map(|v| v.serial.clone());
                let contract_id = verified.as_ref().map(|v| v.contract.contract_id.clone());
                let record = DecisionRecord {
                    decision_id: id.clone(),
                    admitted,
                    reason,
                    message: message.clone(),
                    caller: identity,
                    serial: serial.clone(),
                    contract_id: contract_id.clone(),
                    request,
                    active_epochs: state::epochs(batch.conn())?,
                };
                let seq = batch.append(DECISION_KIND, now_ns(), &record)?;
                if let (true, Some(serial)) = (admitted, &serial) {
                    state::consume(batch.conn(), serial, seq)?;
                }
                Ok(Decision { decision_id: id, admitted, reason, message, record_seq: seq, serial, contract_id })
            })
            .await;
        recorded.unwrap_or_else(|e| Decision {
            decision_id,
            admitted: false,
            reason: Reason::Internal,
            message: format!("the decision could not be recorded, so it is a denial: {e:#}"),
            record_seq: 0,
            serial: None,
            contract_id: None,
        })
    }
}

/// The presented request must be exactly the certified one.
fn check_request(verified: &Verified, request: &MutationRequest) -> Result<(), Rejection> {
    let contract = &verified.contract;
    let mismatch = |reason, message: String| Err(Rejection { reason, message });
    if request.provider != contract.provider {
        return mismatch(
            Reason::ProviderMismatch,
            format!("request provider {:?}, certified {:?}", request.provider, contract.provider),
        );
    }
    if request.operation != contract.operation {
        return mismatch(
            Reason::OperationMismatch,
            format!("request operation {}, certified {}", request.operation, contract.operation),
        );
    }
    if request.target != contract.target {
        return mismatch(
            Reason::TargetMismatch,
            format!("request target {}, certified {}", request.target, contract.target),
        );
    }
    let digest = request.digest();
    if digest != contract.request_digest {
        return mismatch(
            Reason::RequestMismatch,
            format!("request digest {digest}, certified {}", contract.request_digest),
        );
    }
    Ok(())
}
