//! A proposal from start to end: admission, the drift check against live state, the
//! decision record, execution with a minted identity, and the outcome record.
//!
//! 1. stateless predicates (certificate, caller, request);
//! 2. broker-state predicates, read only, so a replayed or revoked certificate never
//!    costs an identity;
//! 3. mint the scoped identity and read the target's live state: a digest other than the
//!    contract's precondition is `drift`, and nothing is executed;
//! 4. record the decision (state checked again, serial consumed) — durable before anything
//!    is sent to the production API;
//! 5. perform the mutation with the minted identity, then record the outcome chained to
//!    the decision, before the caller hears either.

use std::time::Instant;

use tracing::info;

use crate::{
    admission::{self, Admission, Caller, Decision, Proposal, Reason},
    audit::{Ledger, now_ns},
    cert::{Provider, contract::ScopedIdentity},
    execute::{
        OUTCOME_KIND, Outcome, OutcomeStatus, Timings,
        aws::{AwsExecutor, AwsOperation, Session},
    },
};

/// The executors this broker has, by provider.
#[derive(Default)]
pub struct Executors {
    pub aws: Option<AwsExecutor>,
}

/// What step 3 prepared for step 5.
struct Prepared {
    operation: AwsOperation,
    session: Session,
    timings: Timings,
}

pub async fn propose(
    admission: &Admission,
    executors: &Executors,
    ledger: &Ledger,
    caller: &Caller,
    proposal: &Proposal,
) -> Decision {
    let started = Instant::now();
    let mut pending = admission.begin(caller, proposal);
    let executor = match proposal.request.provider {
        Provider::Aws => executors.aws.as_ref(),
        Provider::Kubernetes | Provider::Http => None,
    };
    let mut prepared = None;
    if let (Some(executor), true) = (executor, pending.admissible()) {
        pending.check_state(ledger).await;
        if pending.admissible() {
            match prepare(executor, &pending, proposal).await {
                Ok((ready, live_digest)) => {
                    let precondition = &pending.verified.as_ref().expect("admissible").contract.precondition;
                    if &live_digest != precondition {
                        let message = format!(
                            "the target's live state is {live_digest}, the certified precondition {precondition}"
                        );
                        pending.reject(Reason::Drift, message);
                    } else {
                        prepared = Some(ready);
                    }
                }
                Err((reason, message)) => pending.reject(reason, message),
            }
        }
    }
    pending.require_same_caller(caller);
    let mut decision = admission::record(ledger, pending).await;
    if !decision.admitted {
        return decision;
    }
    let outcome = match (executor, prepared) {
        (Some(executor), Some(prepared)) => execute(executor, prepared, &decision, started).await,
        _ => Outcome {
            decision_id: decision.decision_id.clone(),
            decision_seq: decision.record_seq,
            status: OutcomeStatus::NotExecuted,
            identity: None,
            api_status: None,
            resulting_state_digest: None,
            duration_ms: 0.0,
            timings: Timings::default(),
            error: Some(format!("this broker has no executor for provider {:?}", proposal.request.provider)),
            record_seq: 0,
        },
    };
    decision.outcome = Some(record_outcome(ledger, outcome).await);
    decision
}

/// Mint the identity and read the live state; errors carry their reason code.
async fn prepare(
    executor: &AwsExecutor,
    pending: &admission::Pending,
    proposal: &Proposal,
) -> Result<(Prepared, String), (Reason, String)> {
    let contract = &pending.verified.as_ref().expect("admissible").contract;
    let operation =
        AwsOperation::parse(&proposal.request).map_err(|e| (Reason::UnsupportedOperation, format!("{e:#}")))?;
    let ScopedIdentity::AwsRole { role_arn } = &contract.identity else {
        return Err((Reason::MalformedContract, "an aws contract must name an aws_role identity".into()));
    };
    let mut timings = Timings::default();
    let clock = Instant::now();
    let session = executor
        .mint(role_arn, &pending.decision_id, &operation.session_policy())
        .await
        .map_err(|e| (Reason::LiveStateUnavailable, format!("minting the scoped identity failed: {e:#}")))?;
    timings.mint_ms = ms(clock);
    let clock = Instant::now();
    let (_, digest) = executor.live_state(&operation, &session).await.map_err(|e| {
        (Reason::LiveStateUnavailable, format!("the live state could not be read, so nothing is admitted: {e:#}"))
    })?;
    timings.drift_check_ms = ms(clock);
    Ok((Prepared { operation, session, timings }, digest))
}

async fn execute(executor: &AwsExecutor, prepared: Prepared, decision: &Decision, started: Instant) -> Outcome {
    let Prepared { operation, session, mut timings } = prepared;
    let clock = Instant::now();
    let result = executor.mutate(&operation, &session).await;
    timings.execute_ms = ms(clock);
    let (status, api_status, error) = match result {
        Ok((code, None)) => (OutcomeStatus::Succeeded, Some(code), None),
        Ok((code, Some(error))) => (OutcomeStatus::Failed, Some(code), Some(error)),
        Err(e) => (OutcomeStatus::Failed, None, Some(format!("{e:#}"))),
    };
    let resulting_state_digest = executor.live_state(&operation, &session).await.ok().map(|(_, digest)| digest);
    info!(decision_id = %decision.decision_id, ?status, action = operation.action(), "executed");
    Outcome {
        decision_id: decision.decision_id.clone(),
        decision_seq: decision.record_seq,
        status,
        identity: Some(session.identity),
        api_status,
        resulting_state_digest,
        duration_ms: ms(started),
        timings,
        error,
        record_seq: 0,
    }
}

/// Chain the outcome to its decision. If it cannot be written, say so in the answer:
/// the mutation already happened, and the restart reconciliation will record it.
async fn record_outcome(ledger: &Ledger, mut outcome: Outcome) -> Outcome {
    let body = outcome.clone();
    match ledger.run(move |batch| batch.append(OUTCOME_KIND, now_ns(), &body)).await {
        Ok(seq) => outcome.record_seq = seq,
        Err(e) => {
            let note = format!("the outcome could not be recorded: {e:#}");
            outcome.error = Some(outcome.error.map_or(note.clone(), |error| format!("{error}; {note}")));
        }
    }
    outcome
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
