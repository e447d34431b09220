"""The whole loop an agent runs: read the live state, plan, certify, propose."""

from __future__ import annotations

import time
from typing import Optional, Union

from .broker import Broker
from .errors import ApprovalPending, SabError, SabRefused
from .models import Certificate, Decision, LiveState, Plan, Request
from .reads import state_read
from .sab import Sab


class Seb:
    """An agent's client: ``Seb(Broker(), Sab()).apply(request, intent)``."""

    def __init__(self, broker: Optional[Broker] = None, sab: Optional[Sab] = None) -> None:
        self.broker = broker or Broker()
        self._sab = sab

    @property
    def sab(self) -> Sab:
        if self._sab is None:
            self._sab = Sab()
        return self._sab

    def read(self, request: Request) -> LiveState:
        """A passthrough read through the broker: live state and its digest."""
        return self.broker.read(request)

    def plan(self, request: Request, intent: str) -> Plan:
        """Read the live state of ``request``'s target and build the contract draft."""
        return Plan(request, self.broker.read(state_read(request)), intent)

    def certify(self, plan: Plan) -> Certificate:
        """Ask the SAB for a certificate. Raises ``ApprovalPending`` when a human must
        approve first, ``SabRefused`` when policy forbids the change."""
        answer = self.sab.certify(plan)
        if isinstance(answer, ApprovalPending):
            raise answer
        return answer

    def propose(self, certificate: Union[Certificate, str], request: Request) -> Decision:
        """Present the certificate to the broker, which checks it and executes the change."""
        pem = certificate.pem if isinstance(certificate, Certificate) else certificate
        return self.broker.propose(pem, request)

    def apply(self, request: Request, intent: str, approval_timeout: float = 0.0) -> Decision:
        """plan, certify and propose in order. With ``approval_timeout`` > 0, a change that
        needs approval is waited for that many seconds; otherwise ``ApprovalPending`` is
        raised at once, carrying the request id to wait on later."""
        certificate: Union[Certificate, ApprovalPending] = self.sab.certify(self.plan(request, intent))
        if isinstance(certificate, ApprovalPending):
            if approval_timeout <= 0:
                raise certificate
            certificate = self.wait_for_certificate(certificate.request_id, approval_timeout)
        return self.propose(certificate, request)

    def wait_for_certificate(self, request_id: str, timeout: float, interval: float = 0.5) -> Certificate:
        """Poll the SAB until the request is issued (returns it), decided otherwise
        (``SabRefused``) or ``timeout`` seconds pass (``ApprovalPending``)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.sab.request(request_id)
            if state.status == "issued":
                if not state.certificate:
                    raise SabError("protocol", f"request {request_id} is issued but carries no certificate")
                return Certificate(request_id, state.certificate, dict(state.contract or {}))
            if state.status != "pending":
                raise SabRefused(request_id, state.reasons, state.status)
            if time.monotonic() >= deadline:
                raise ApprovalPending(request_id, 1, [])
            time.sleep(interval)
