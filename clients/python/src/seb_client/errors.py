"""Exceptions. Each carries the stable code it was refused with, for the agent to act on."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence


#: What reading a malformed answer into this client's types raises: a missing field, a
#: field of the wrong type, JSON nested past the parser's recursion limit, a number
#: past a float's range (`1e999` read as an int).
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, RecursionError, OverflowError)


class SebError(Exception):
    """Base of every error this client raises."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        #: Stable, machine-readable code (a broker reason code, an error code, a SAB status).
        self.reason = reason
        self.message = message


class BrokerError(SebError):
    """The broker answered with an error instead of a result (``malformed``, ``forbidden``,
    ``busy``, ``timeout``, ...), or could not be reached or understood (``unreachable``,
    ``protocol``)."""


class SebDenied(SebError):
    """The broker denied the proposal. ``reason`` is its admission reason code
    (``drift``, ``replayed``, ``caller_mismatch``, ...); ``decision`` the whole answer."""

    def __init__(self, decision: Mapping[str, Any]) -> None:
        super().__init__(str(decision.get("reason", "denied")), str(decision.get("message", "")))
        self.decision = dict(decision)


class NotExecuted(SebError):
    """The proposal was admitted but the change did not succeed: ``reason`` is the
    outcome's status (``failed``, ``not_executed``, ``unknown``)."""

    def __init__(self, decision: Mapping[str, Any]) -> None:
        outcome = decision.get("outcome") or {}
        super().__init__(str(outcome.get("status", "not_executed")), str(outcome.get("error") or "no outcome"))
        self.decision = dict(decision)


class OutcomeUnknown(NotExecuted):
    """The proposal may or may not have changed the target: the broker recorded the
    outcome ``unknown`` (no answer from the API in time, a server error or redirect after
    the write), or it was sent and no reply came back (a timeout, a broker that stopped).
    Read the target before anything else; proposing the change again could make it twice."""

    def __init__(self, decision: Optional[Mapping[str, Any]] = None, message: Optional[str] = None) -> None:
        if decision is not None:
            super().__init__(decision)
        else:
            SebError.__init__(self, "unknown", message or "no reply to the proposal")
            self.decision = {}
        self.reason = "unknown"


class SabError(SebError):
    """The SAB answered with an HTTP error (``reason`` is its error code, e.g.
    ``not_an_approver``), or could not be reached (``unreachable``)."""

    def __init__(self, reason: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(reason, message)
        self.status = status


class SabRefused(SebError):
    """The SAB's policy refused to certify (or an approver denied, or the request
    expired). ``reason`` is the code of the first reason (``forbidden_by``, ``no_permit``,
    ...; the request's status when none is given), ``reasons`` the SAB's reasons in full
    (``forbidden_by: <policy id>``)."""

    def __init__(self, request_id: str, reasons: Sequence[str], status: str = "refused") -> None:
        reasons = list(reasons) or [status]
        super().__init__(reasons[0].split(":", 1)[0].strip(), f"the SAB {status} request {request_id}: {'; '.join(reasons)}")
        self.request_id = request_id
        self.reasons = reasons
        self.status = status


class ApprovalPending(SebError):
    """Policy requires human approval before the SAB certifies. Ask again later with
    ``Seb.wait_for_certificate(request_id)`` or ``Sab.request(request_id)``."""

    def __init__(self, request_id: str, approvals_required: int, approvers: Sequence[str]) -> None:
        super().__init__(
            "approval_pending",
            f"request {request_id} needs {approvals_required} approval(s) from {', '.join(approvers) or 'an approver'}",
        )
        self.request_id = request_id
        self.approvals_required = approvals_required
        self.approvers = list(approvers)


class DirectEgressRefused(SebError, PermissionError):
    """The kernel refused a direct connection (``connect()`` failed with ``EPERM``): this
    node's production APIs are reachable only through the seb broker."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            "direct_egress_refused",
            "the kernel refused a direct connection to a protected API "
            f"({cause}). Do not retry it or look for credentials: production APIs on this node are "
            "reachable only through the seb broker. Read state with Seb.read() and change it with "
            "Seb.apply() (or the seb MCP tools `read_resource` and `propose_change`).",
        )
