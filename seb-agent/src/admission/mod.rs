//! Admission: a proposal is admitted only if every predicate holds, and every decision
//! is a signed audit record before the caller hears it.
//!
//! Order: certificate (chain, validity, extensions, contract) → caller identity →
//! request against the contract → broker state (epochs, revocation, replay), the last
//! inside the ledger transaction that records the decision and consumes the serial.

pub mod caller;
pub mod reason;
pub mod refusals;
pub mod state;

use std::{sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

pub use caller::{Caller, CallerIdentity, Peer};
pub use reason::Reason;

use crate::{
    audit::{Batch, Ledger, LedgerBusy, is_busy},
    cert::{MutationRequest, Rejection, TrustAnchors, ValidityPolicy, Verified},
    cluster::{directory::SharedDirectory, freshness::Freshness},
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub decision_id: String,
    pub admitted: bool,
    pub reason: Reason,
    pub message: String,
    /// Sequence number of the decision's audit record (0 if it could not be recorded).
    pub record_seq: i64,
    pub serial: Option<String>,
    pub contract_id: Option<String>,
    /// What execution did, for an admitted proposal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<crate::execute::Outcome>,
}

/// The decision record: what a security team reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub decision_id: String,
    pub admitted: bool,
    pub reason: Reason,
    pub message: String,
    pub caller: CallerIdentity,
    pub serial: Option<String>,
    pub contract_id: Option<String>,
    pub request: RequestSummary,
    /// The identity the contract lets the broker mint, for reading live state again
    /// if the broker stops before the outcome is recorded.
    #[serde(default)]
    pub identity: Option<crate::cert::contract::ScopedIdentity>,
    pub active_epochs: state::Epochs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestSummary {
    pub provider: crate::cert::Provider,
    pub operation: String,
    pub target: String,
    pub digest: String,
    /// How the target's state is read, where the request says (to read it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_read: Option<serde_json::Value>,
}

/// Of a field a refused request brings, a record keeps at most this many bytes.
const RECORDED_FIELD: usize = 1024;

impl RequestSummary {
    /// What the record of a denial keeps: the request's fields clipped, its state read
    /// left out (only an admitted decision is read again); the digest still covers the
    /// whole request. An admitted request is the certified one, kept whole.
    fn clipped(self) -> Self {
        Self {
            operation: crate::audit::clipped(&self.operation, RECORDED_FIELD),
            target: crate::audit::clipped(&self.target, RECORDED_FIELD),
            state_read: None,
            ..self
        }
    }

    pub fn of(request: &MutationRequest) -> Self {
        Self {
            provider: request.provider,
            operation: request.operation.clone(),
            target: request.target.clone(),
            digest: request.digest(),
            state_read: request.state_read().cloned(),
        }
    }
}

pub struct Admission {
    anchors: Option<Arc<TrustAnchors>>,
    validity: ValidityPolicy,
    /// This node's name: a contract bound to another node (`agent.node`) is refused, in
    /// every mode. None: every node-bound contract is refused.
    node_name: Option<String>,
    cluster: Option<ClusterGate>,
    /// Certificate verifications running at once, at most.
    verifications: Arc<tokio::sync::Semaphore>,
    /// How many refusals a second each caller uid has recorded in full.
    pub refusals: refusals::RefusalBudget,
}

/// What cluster mode adds to admission.
pub struct ClusterGate {
    /// This node's name: a contract bound to another node is refused.
    pub node_name: String,
    /// Refuse contracts bound to neither a node nor a pod (each can then be used on one
    /// node only, where the node-local used-serial record stops a replay).
    pub require_node_binding: bool,
    pub freshness: Freshness,
    /// This node's pods, as its pod watch sees them: a contract bound to a pod is
    /// refused unless that pod runs here (a pod-shaped cgroup made on another node
    /// names no pod of this one).
    pub pods: SharedDirectory,
}

impl Admission {
    /// Up to one certificate verification per CPU at once.
    pub fn new(anchors: Option<TrustAnchors>, validity: ValidityPolicy) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            anchors: anchors.map(Arc::new),
            validity,
            node_name: None,
            cluster: None,
            verifications: Arc::new(tokio::sync::Semaphore::new(cpus)),
            refusals: Default::default(),
        }
    }

    /// At most `limit` certificate verifications at once.
    pub fn with_parallel_verifications(mut self, limit: usize) -> Self {
        self.verifications = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
        self
    }

    pub fn with_node_name(mut self, name: String) -> Self {
        self.node_name = Some(name);
        self
    }

    /// The contract's node, if it binds one, is this one.
    fn check_node(&self, agent: &crate::cert::contract::AgentIdentity) -> Result<(), Rejection> {
        let Some(node) = &agent.node else { return Ok(()) };
        let message = match &self.node_name {
            Some(own) if own == node => return Ok(()),
            Some(own) => format!("the contract is for node {node}, this broker serves node {own}"),
            None => format!("the contract is for node {node}, and this broker has no node name"),
        };
        Err(Rejection { reason: Reason::CallerMismatch, message })
    }

    pub fn with_cluster(mut self, gate: ClusterGate) -> Self {
        self.cluster = Some(gate);
        self
    }

    pub fn cluster_status(&self) -> Option<crate::protocol::ClusterStatus> {
        self.cluster.as_ref().map(|gate| crate::protocol::ClusterStatus {
            node: gate.node_name.clone(),
            synced: gate.freshness.is_synced(),
            settled: gate.freshness.is_settled(),
            stale: gate.freshness.stale(),
            api_age_seconds: gate.freshness.age().map(|age| age.as_secs_f64()),
        })
    }

    /// Whether the epochs come from the cluster (and not from this node's CLI).
    pub fn follows_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The cluster-mode predicates: the contract is this node's, and the cluster state
    /// is current.
    fn check_cluster(&self, agent: &crate::cert::contract::AgentIdentity) -> Result<(), Rejection> {
        let Some(gate) = &self.cluster else { return Ok(()) };
        let reject = |reason, message: String| Err(Rejection { reason, message });
        // The node itself is `check_node`'s.
        if agent.node.is_none() && gate.require_node_binding && agent.pod_uid.is_none() {
            return reject(
                Reason::NotNodeBound,
                "in cluster mode a contract must bind agent.node or agent.pod_uid, so that it can be used on one node only".into(),
            );
        }
        self.require_fresh()?;
        if let Some(pod) = &agent.pod_uid {
            if !gate.freshness.is_settled() {
                return reject(Reason::ClusterStateStale, "this broker has not listed this node's pods yet".into());
            }
            let on_this_node = gate.pods.read().is_ok_and(|pods| pods.pod(pod).is_some());
            if !on_this_node {
                return reject(
                    Reason::CallerMismatch,
                    format!(
                        "the contract is bound to pod {pod}, which this broker's pod watch does not place on node {}",
                        gate.node_name
                    ),
                );
            }
        }
        Ok(())
    }

    /// Fail closed while the node's cluster state is missing or stale.
    pub fn require_fresh(&self) -> Result<(), Rejection> {
        match self.cluster.as_ref().and_then(|gate| gate.freshness.stale()) {
            Some(message) => Err(Rejection { reason: Reason::ClusterStateStale, message }),
            None => Ok(()),
        }
    }

    /// Verify the certificate chain and contract. On the worker: a verification is
    /// bounded (a 64 KiB bundle, a path budget of 16 signature checks) and usually a
    /// single Ed25519 check, shorter than the hand-offs to the blocking pool and back.
    async fn verify(&self, certificate: &str, now: SystemTime) -> Result<Verified, Rejection> {
        let Some(anchors) = &self.anchors else {
            let message = "this broker has no SAB trust anchors configured (admission.trust_anchors)".into();
            return Err(Rejection { reason: Reason::UntrustedIssuer, message });
        };
        let internal = |message: String| Rejection { reason: Reason::Internal, message };
        let _permit = self.verifications.acquire().await.map_err(|e| internal(e.to_string()))?;
        anchors.verify(certificate, self.validity, now)
    }

    /// The predicates that need no broker state; `request` is the proposal's request
    /// summarised (its digest computed once). The verified certificate is returned
    /// whenever it verified, so a later denial still names its serial and contract.
    async fn precheck(
        &self,
        caller: &Caller,
        proposal: &Proposal,
        request: &RequestSummary,
        now: SystemTime,
    ) -> (Option<Verified>, Result<(), Rejection>) {
        let verified = match self.verify(&proposal.certificate, now).await {
            Ok(verified) => verified,
            Err(rejection) => return (None, Err(rejection)),
        };
        let verdict = caller
            .matches(&verified.contract.agent)
            .map_err(|message| Rejection { reason: Reason::CallerMismatch, message })
            .and_then(|()| self.check_node(&verified.contract.agent))
            .and_then(|()| self.check_cluster(&verified.contract.agent))
            .and_then(|()| check_request(&verified, &proposal.request, &request.digest));
        (Some(verified), verdict)
    }

    /// Start a decision: the stateless predicates.
    pub async fn begin(&self, caller: &Caller, proposal: &Proposal) -> Pending {
        let request = RequestSummary::of(&proposal.request);
        let (verified, verdict) = self.precheck(caller, proposal, &request, SystemTime::now()).await;
        Pending {
            decision_id: uuid::Uuid::new_v4().to_string(),
            valid_until: verified.as_ref().map(|v| v.not_after + self.validity.clock_skew),
            verified,
            verdict,
            recorded_detail: None,
            caller: caller.identity.clone(),
            request,
        }
    }

    /// Decide with no live-state check (no executor for the provider), record, answer.
    pub async fn decide(&self, ledger: &Ledger, caller: &Caller, proposal: &Proposal) -> Result<Decision, LedgerBusy> {
        let mut pending = self.begin(caller, proposal).await;
        pending.require_same_caller(caller);
        pending.require_fresh(self);
        if let Some(unrecorded) = pending.past_budget(&self.refusals) {
            return Ok(unrecorded);
        }
        record(ledger, pending).await
    }
}

/// A decision under way.
pub struct Pending {
    pub decision_id: String,
    /// The certificate's end, with the clock skew allowed: checked again as the decision
    /// is recorded, after waits for the target and the live state.
    valid_until: Option<SystemTime>,
    pub verified: Option<Verified>,
    pub verdict: Result<(), Rejection>,
    /// What the record says of the verdict beyond its message, and the caller is not
    /// told (see [`Pending::reject_recording`]).
    recorded_detail: Option<String>,
    caller: CallerIdentity,
    request: RequestSummary,
}

impl Pending {
    /// A proposal from a caller that could not be identified: a denial, still recorded.
    pub fn unidentified(caller: CallerIdentity, proposal: &Proposal, message: String) -> Self {
        Self {
            decision_id: uuid::Uuid::new_v4().to_string(),
            valid_until: None,
            verified: None,
            verdict: Err(Rejection { reason: Reason::CallerChanged, message }),
            recorded_detail: None,
            caller,
            request: RequestSummary::of(&proposal.request),
        }
    }

    pub fn admissible(&self) -> bool {
        self.verdict.is_ok() && self.verified.is_some()
    }

    pub fn reject(&mut self, reason: Reason, message: impl Into<String>) {
        if self.verdict.is_ok() {
            self.verdict = Err(Rejection { reason, message: message.into() });
        }
    }

    /// As [`Self::reject`], with `detail` in the record alone: what the broker read with
    /// the contract's identity (a live state's digest) is the auditor's, not the
    /// caller's, who may not be allowed to read that state.
    pub fn reject_recording(&mut self, reason: Reason, message: impl Into<String>, detail: String) {
        if self.verdict.is_ok() {
            self.reject(reason, message);
            self.recorded_detail = Some(detail);
        }
    }

    /// The broker-state predicates, read only: so that a replayed or revoked certificate
    /// costs no identity minting. `record` checks them again, atomically.
    pub async fn check_state(&mut self, ledger: &Ledger) -> Result<(), LedgerBusy> {
        let Some(verified) = self.verified.clone().filter(|_| self.verdict.is_ok()) else { return Ok(()) };
        match ledger.try_run(move |batch| state::check(batch.conn(), &verified)).await {
            Ok(Ok(())) => {}
            Ok(Err(rejection)) => self.verdict = Err(rejection),
            Err(e) if is_busy(&e) => return Err(LedgerBusy),
            Err(e) => self.reject(Reason::Internal, format!("the broker state could not be read: {e:#}")),
        }
        Ok(())
    }

    /// The cluster state must still be current, right before recording.
    pub fn require_fresh(&mut self, admission: &Admission) {
        if let Err(rejection) = admission.require_fresh() {
            self.reject(rejection.reason, rejection.message);
        }
    }

    /// A refusal past its caller uid's record budget: answered as any other, counted in
    /// the second's `refusals_suppressed` record, not recorded one by one.
    pub fn past_budget(&self, budget: &refusals::RefusalBudget) -> Option<Decision> {
        let Err(rejection) = &self.verdict else { return None };
        let now = crate::audit::now_ns() as u64;
        if budget.admit(self.caller.uid, "propose", rejection.reason.as_str(), now) {
            return None;
        }
        let verified = self.verified.as_ref();
        Some(Decision {
            decision_id: self.decision_id.clone(),
            admitted: false,
            reason: rejection.reason,
            message: refusals::unrecorded(&rejection.message),
            record_seq: 0,
            serial: verified.map(|v| v.serial.clone()),
            contract_id: verified.map(|v| v.contract.contract_id.clone()),
            outcome: None,
        })
    }

    /// The caller must still be the process that connected, right before recording.
    pub fn require_same_caller(&mut self, caller: &Caller) {
        if !caller.still_same() {
            self.reject(Reason::CallerChanged, "the calling process exited or was replaced during the call");
        }
    }
}

/// Record the decision durably (checking broker state once more, atomically with
/// consuming the serial), and only then return it. A full ledger queue is no decision:
/// the caller is told the broker is busy.
pub async fn record(ledger: &Ledger, pending: Pending) -> Result<Decision, LedgerBusy> {
    record_then(ledger, pending, |_, _| Ok(())).await
}

/// The same, and for an admission `then` appends more in the same savepoint (so in the
/// same commit): both are recorded, or the decision is an `internal` denial.
pub async fn record_then(
    ledger: &Ledger,
    pending: Pending,
    then: impl FnOnce(&mut Batch<'_>, &mut Decision) -> anyhow::Result<()> + Send + 'static,
) -> Result<Decision, LedgerBusy> {
    let Pending { decision_id, valid_until, verified, verdict: precheck, recorded_detail, caller: identity, request } =
        pending;
    let id = decision_id.clone();
    let recorded = ledger
        .try_run(move |batch| {
            let active_epochs = state::epochs(batch.conn())?;
            let precheck = precheck.and_then(|()| still_valid(valid_until, SystemTime::now()));
            // The detail goes with the rejection it was given with.
            let detail = recorded_detail.filter(|_| precheck.is_err());
            let verdict = match (&verified, precheck) {
                (Some(verified), Ok(())) => state::check_under(batch.conn(), active_epochs, verified)?,
                (_, Err(rejection)) => Err(rejection),
                (None, Ok(())) => {
                    Err(Rejection { reason: Reason::Internal, message: "no verified certificate".into() })
                }
            };
            let admitted = verdict.is_ok();
            let (reason, message) = match verdict {
                Ok(()) => (Reason::Admitted, "every admission predicate holds".to_string()),
                // Kept in part, in the answer as in the record: it may quote the request.
                Err(rejection) => (rejection.reason, crate::audit::clipped(&rejection.message, 4 * RECORDED_FIELD)),
            };
            let serial = verified.as_ref().map(|v| v.serial.clone());
            let contract_id = verified.as_ref().map(|v| v.contract.contract_id.clone());
            let record = DecisionRecord {
                decision_id: id.clone(),
                admitted,
                reason,
                message: match &detail {
                    Some(detail) => format!("{message}; {detail}"),
                    None => message.clone(),
                },
                caller: identity,
                serial: serial.clone(),
                contract_id: contract_id.clone(),
                request: if admitted { request } else { request.clipped() },
                identity: verified.as_ref().map(|v| v.contract.identity.clone()),
                active_epochs,
            };
            let seq = state::record_decision(batch, &record)?;
            let mut decision = Decision {
                decision_id: id,
                admitted,
                reason,
                message,
                record_seq: seq,
                serial,
                contract_id,
                outcome: None,
            };
            if admitted {
                then(batch, &mut decision)?;
            }
            Ok(decision)
        })
        .await;
    match recorded {
        Err(e) if is_busy(&e) => Err(LedgerBusy),
        recorded => Ok(recorded.unwrap_or_else(|e| Decision {
            decision_id,
            admitted: false,
            reason: Reason::Internal,
            message: format!("the decision could not be recorded, so it is a denial: {e:#}"),
            record_seq: 0,
            serial: None,
            contract_id: None,
            outcome: None,
        })),
    }
}

/// A certificate valid when its proposal arrived may have expired while the proposal
/// waited (for its target, the live state, the ledger): an admission is recorded only
/// within its validity.
fn still_valid(valid_until: Option<SystemTime>, now: SystemTime) -> Result<(), Rejection> {
    match valid_until {
        Some(until) if now > until => {
            let ago = now.duration_since(until).unwrap_or_default();
            let message = format!("the certificate expired {} ms before the decision was recorded", ago.as_millis());
            Err(Rejection { reason: Reason::Expired, message })
        }
        _ => Ok(()),
    }
}

/// The presented request must be exactly the certified one, and have a digest that names
/// it alone. `digest` is the request's.
fn check_request(verified: &Verified, request: &MutationRequest, digest: &str) -> Result<(), Rejection> {
    let contract = &verified.contract;
    let mismatch = |reason, message: String| Err(Rejection { reason, message });
    request.check_numbers().map_err(Rejection::from)?;
    if request.provider != contract.provider {
        return mismatch(
            Reason::ProviderMismatch,
            format!("request provider {}, certified {}", request.provider, contract.provider),
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
    if digest != contract.request_digest {
        return mismatch(
            Reason::RequestMismatch,
            format!("request digest {digest}, certified {}", contract.request_digest),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cert::contract::AgentIdentity;

    const POD: &str = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn a_contract_bound_to_another_node_is_refused_in_every_mode() {
        let validity = ValidityPolicy { max_ttl: Duration::from_secs(3600), clock_skew: Duration::from_secs(60) };
        let on = |node: &str| AgentIdentity { node: Some(node.into()), ..Default::default() };
        let node_local = Admission::new(None, validity).with_node_name("node-b".into());
        node_local.check_node(&on("node-b")).unwrap();
        node_local.check_node(&AgentIdentity::default()).unwrap();
        let refused = node_local.check_node(&on("node-a")).unwrap_err();
        assert_eq!(refused.reason, Reason::CallerMismatch);
        assert!(refused.message.contains("for node node-a, this broker serves node node-b"), "{refused:?}");
        let nameless = Admission::new(None, validity);
        assert_eq!(nameless.check_node(&on("node-b")).unwrap_err().reason, Reason::CallerMismatch);
    }

    #[test]
    fn a_contract_bound_to_a_pod_is_refused_unless_the_pod_runs_on_this_node() {
        let pods = SharedDirectory::default();
        let validity = ValidityPolicy { max_ttl: Duration::from_secs(3600), clock_skew: Duration::from_secs(60) };
        let freshness = Freshness::new(Duration::from_secs(30));
        let admission = Admission::new(None, validity).with_cluster(ClusterGate {
            node_name: "node-a".into(),
            require_node_binding: true,
            freshness: freshness.clone(),
            pods: pods.clone(),
        });
        let agent = AgentIdentity { pod_uid: Some(POD.into()), ..Default::default() };
        // Stale, or the pods not listed yet: a retryable refusal, not a verdict on the pod.
        assert_eq!(admission.check_cluster(&agent).unwrap_err().reason, Reason::ClusterStateStale);
        freshness.synced(crate::cluster::freshness::Resource::Policy);
        freshness.synced(crate::cluster::freshness::Resource::Revocation);
        assert_eq!(admission.check_cluster(&agent).unwrap_err().reason, Reason::ClusterStateStale);
        freshness.settle();
        for node in [None, Some("node-a".to_string())] {
            let agent = AgentIdentity { pod_uid: Some(POD.into()), node, ..Default::default() };
            let refused = admission.check_cluster(&agent).unwrap_err();
            assert_eq!(refused.reason, Reason::CallerMismatch, "{refused:?}");
            assert!(refused.message.contains(POD) && refused.message.contains("node-a"), "{refused:?}");
        }
        let pod = serde_json::from_value(serde_json::json!({
            "metadata": {"uid": POD, "namespace": "agents", "name": "agent-0"},
            "spec": {"nodeName": "node-a", "containers": []}
        }))
        .unwrap();
        pods.write().unwrap().upsert_pod(&pod);
        admission.check_cluster(&agent).unwrap();
    }
}
