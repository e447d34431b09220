//! A proposal from start to end: admission, the drift check against live state, the
//! decision record, execution with a minted identity, and the outcome record.
//!
//! 1. stateless predicates (certificate, caller, request);
//! 2. broker-state predicates, read only, so a replayed or revoked certificate never
//!    costs an identity;
//! 3. wait until no other execution on the target runs here, mint the scoped identity
//!    and read the target's live state: a digest other than the contract's
//!    precondition is `drift`, and nothing is executed (nor is that certificate prepared
//!    again for a second: `execute::retry_pace`);
//! 4. record the decision (state checked again, serial consumed), durable before anything
//!    is sent to the production API;
//! 5. perform the mutation with the minted identity, then record the outcome chained to
//!    the decision, before the caller hears either.

use std::time::Instant;

use tracing::info;

use crate::{
    admission::{self, Admission, Caller, Decision, Proposal, Reason},
    audit::{Ledger, LedgerBusy, now_ns},
    enforcement::broker_sockets::ExecutionTag,
    execute::{Executors, OUTCOME_KIND, Outcome, OutcomeStatus, Timings},
    metrics::{ExecutionLabels, Metrics},
};

/// How long a proposal waits for another execution on its target to end.
const TARGET_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `started` is when the proposal arrived; `metrics` sees the decision when it is
/// recorded and the execution when it returns.
pub async fn propose(
    admission: &Admission,
    executors: &Executors,
    ledger: &Ledger,
    metrics: &Metrics,
    caller: &Caller,
    proposal: &Proposal,
    started: Instant,
) -> Result<Decision, LedgerBusy> {
    let mut pending = admission.begin(caller, proposal).await;
    // Every socket opened for this decision carries it, so a revocation can cut them.
    let tag = pending.verified.as_ref().map(|verified| ExecutionTag {
        decision_id: pending.decision_id.clone(),
        serial: verified.serial.clone(),
        contract_id: verified.contract.contract_id.clone(),
        policy_epoch: verified.contract.policy_epoch,
        revocation_epoch: verified.contract.revocation_epoch,
    });
    let mut timings = Timings::default();
    let mut prepared = None;
    // Held to the outcome, so the drift read sees any earlier execution's result.
    let mut _target_held = None;
    if executors.handles(proposal.request.provider) && pending.admissible() {
        pending.check_state(ledger).await?;
        if pending.admissible() {
            match tokio::time::timeout(TARGET_WAIT, executors.targets.hold(&proposal.request)).await {
                Ok(held) => {
                    // Again after a wait: it may have outlasted a revocation, or the
                    // serial's use by a twin of this proposal that was ahead of it.
                    if held.waited() {
                        pending.check_state(ledger).await?;
                    }
                    _target_held = Some(held);
                }
                Err(_) => pending.reject(
                    Reason::LiveStateUnavailable,
                    format!(
                        "another execution on this target has run for {} s; nothing was read or executed, try again",
                        TARGET_WAIT.as_secs()
                    ),
                ),
            }
        }
        let serial = pending.verified.as_ref().filter(|_| pending.admissible()).map(|v| v.serial.clone());
        if let Some(left) = serial.and_then(|serial| executors.retries.wait_for(&serial, Instant::now())) {
            let message = format!(
                "this certificate's preparation (mint and live-state check) failed under {} s ago; nothing was \
                 minted or read, try again in {} ms",
                crate::execute::retry_pace::RETRY_AFTER.as_secs(),
                left.as_millis().max(1)
            );
            pending.reject(Reason::LiveStateUnavailable, message);
        }
        if let Some(verified) = pending.verified.clone().filter(|_| pending.admissible()) {
            let contract = &verified.contract;
            let preparing = executors.prepare(contract, &proposal.request, &pending.decision_id, &mut timings);
            match ExecutionTag::within(tag.clone(), preparing).await {
                Ok((ready, live)) if live == contract.precondition => prepared = Some(ready),
                Ok((ready, live)) => {
                    executors.discard(ready).await;
                    executors.retries.failed(&verified.serial, Instant::now());
                    pending.reject_recording(
                        Reason::Drift,
                        format!(
                            "the target's live state differs from the certified precondition {} (its digest is in \
                             the decision record, not in this answer)",
                            contract.precondition
                        ),
                        format!("the live state's digest is {live}"),
                    )
                }
                Err((reason, message)) => {
                    // Every failure is paced: preparing mints first (a Kubernetes token and
                    // its Secret, an STS session), so a certificate refused after its mint
                    // (a patch of an object that is not there) would otherwise mint on the
                    // broker's credentials as fast as it is proposed.
                    executors.retries.failed(&verified.serial, Instant::now());
                    pending.reject(reason, message)
                }
            }
        }
    }
    pending.require_same_caller(caller);
    pending.require_fresh(admission);
    if let Some(unrecorded) = pending.past_budget(&admission.refusals) {
        // Refused after it was prepared (the caller changed, the cluster state went stale).
        if let Some(prepared) = prepared {
            executors.discard(prepared).await;
        }
        metrics.decided(&unrecorded, started.elapsed());
        return Ok(unrecorded);
    }
    let Some(prepared) = prepared else {
        // Nothing to execute: an admission's outcome (not executed, no executor) is
        // recorded with the decision, in the same commit.
        let provider = proposal.request.provider;
        let decision = admission::record_then(ledger, pending, move |batch, decision| {
            let mut outcome = not_executed(decision, timings);
            outcome.error = Some(format!("this broker has no executor for provider {provider}"));
            outcome.duration_ms = started.elapsed().as_secs_f64() * 1e3;
            outcome.record_seq = batch.append(OUTCOME_KIND, now_ns(), &outcome)?;
            decision.outcome = Some(outcome);
            Ok(())
        })
        .await?;
        metrics.decided(&decision, started.elapsed());
        return Ok(decision);
    };
    let mut decision = match admission::record(ledger, pending).await {
        Ok(decision) => decision,
        Err(busy) => {
            executors.discard(prepared).await;
            return Err(busy);
        }
    };
    metrics.decided(&decision, started.elapsed());
    if !decision.admitted {
        executors.discard(prepared).await;
        return Ok(decision);
    }
    let mut outcome = not_executed(&decision, timings);
    let executing = Instant::now();
    let executed = ExecutionTag::within(tag, executors.execute(prepared)).await;
    let labels = ExecutionLabels {
        provider: proposal.request.provider.as_str().into(),
        status: executed.status.as_str().into(),
    };
    metrics.execution_seconds.get_or_create(&labels).observe(executing.elapsed().as_secs_f64());
    info!(decision_id = %decision.decision_id, status = %executed.status, "executed");
    outcome.status = executed.status;
    outcome.api_status = executed.api_status;
    outcome.error = executed.error;
    outcome.identity = Some(executed.identity);
    outcome.resulting_state_digest = executed.resulting_state_digest;
    outcome.timings.execute_ms = executed.execute_ms;
    outcome.duration_ms = started.elapsed().as_secs_f64() * 1e3;
    decision.outcome = Some(record_outcome(ledger, outcome).await);
    Ok(decision)
}

/// The outcome of an admitted decision before anything is executed.
fn not_executed(decision: &Decision, timings: Timings) -> Outcome {
    Outcome {
        decision_id: decision.decision_id.clone(),
        decision_seq: decision.record_seq,
        status: OutcomeStatus::NotExecuted,
        identity: None,
        api_status: None,
        resulting_state_digest: None,
        duration_ms: 0.0,
        timings,
        error: None,
        record_seq: 0,
    }
}

/// Chain the outcome to its decision (waiting for room in the ledger's queue: the
/// mutation happened). If it cannot be written, say so in the answer: the restart
/// reconciliation will record it.
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
