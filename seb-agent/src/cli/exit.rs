//! The exit statuses of `seb-agent`, one meaning each, so that scripts can branch on them.

use std::process::ExitCode;

use crate::{admission::Decision, execute::OutcomeStatus};

/// What a command's exit status says. The numbers are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done: for `propose`, admitted and carried out.
    Success = 0,
    /// The answer is no: a proposal denied, an audit chain broken, an egress probe refused.
    Denied = 1,
    /// The command could not be carried out: bad usage, an unreadable file, the broker
    /// unreachable or refusing the request.
    Error = 2,
    /// Admitted, but nothing was executed (this broker has no executor for the provider).
    NotExecuted = 3,
    /// Admitted and attempted, but the mutation failed or its result is unknown.
    ExecutionFailed = 4,
}

/// The table shown in `--help` and the README.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  done (propose: admitted and executed)
  1  denied: proposal denied, audit chain broken, egress probe refused
  2  error: bad usage, unreadable input, broker unreachable or refusing
  3  propose: admitted but not executed (no executor for the provider)
  4  propose: admitted, but execution failed or its result is unknown";

impl Exit {
    /// The status of a proposal's answer.
    pub fn of_decision(decision: &Decision) -> Self {
        if !decision.admitted {
            return Self::Denied;
        }
        match decision.outcome.as_ref().map(|outcome| outcome.status) {
            Some(OutcomeStatus::Succeeded) => Self::Success,
            Some(OutcomeStatus::NotExecuted) | None => Self::NotExecuted,
            Some(OutcomeStatus::Failed | OutcomeStatus::Unknown) => Self::ExecutionFailed,
        }
    }

    /// `Success` when `ok`, else `Denied`.
    pub fn ok_or_denied(ok: bool) -> Self {
        if ok { Self::Success } else { Self::Denied }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{admission::Reason, execute::Outcome};

    fn decision(admitted: bool, status: Option<OutcomeStatus>) -> Decision {
        let outcome = status.map(|status| Outcome {
            decision_id: "d".into(),
            decision_seq: 1,
            status,
            identity: None,
            api_status: None,
            resulting_state_digest: None,
            duration_ms: 0.0,
            timings: Default::default(),
            error: None,
            record_seq: 2,
        });
        let reason = if admitted { Reason::Admitted } else { Reason::Expired };
        Decision {
            decision_id: "d".into(),
            admitted,
            reason,
            message: String::new(),
            record_seq: 1,
            serial: None,
            contract_id: None,
            outcome,
        }
    }

    #[test]
    fn only_an_executed_admission_is_success() {
        assert_eq!(Exit::of_decision(&decision(true, Some(OutcomeStatus::Succeeded))), Exit::Success);
        assert_eq!(Exit::of_decision(&decision(false, None)), Exit::Denied);
        assert_eq!(Exit::of_decision(&decision(true, Some(OutcomeStatus::NotExecuted))), Exit::NotExecuted);
        assert_eq!(Exit::of_decision(&decision(true, None)), Exit::NotExecuted);
        assert_eq!(Exit::of_decision(&decision(true, Some(OutcomeStatus::Failed))), Exit::ExecutionFailed);
        assert_eq!(Exit::of_decision(&decision(true, Some(OutcomeStatus::Unknown))), Exit::ExecutionFailed);
        let codes =
            [Exit::Success, Exit::Denied, Exit::Error, Exit::NotExecuted, Exit::ExecutionFailed].map(|e| e as u8);
        assert_eq!(codes, [0, 1, 2, 3, 4], "the numbers are documented and stable");
    }
}
