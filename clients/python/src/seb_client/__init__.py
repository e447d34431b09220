"""seb's Python client: an agent reads live state and proposes changes through the seb
broker, with certificates from the SAB. Standard library only."""

from .broker import Broker
from .client import Seb
from .direct import broker_only, broker_only_call, kernel_refusal
from .errors import (
    ApprovalPending,
    BrokerError,
    DirectEgressRefused,
    NotExecuted,
    OutcomeUnknown,
    SabError,
    SabRefused,
    SebDenied,
    SebError,
)
from .models import Certificate, Decision, LiveState, Plan, Request, RequestState
from .reads import state_read
from .sab import Sab

__all__ = [
    "ApprovalPending", "Broker", "BrokerError", "Certificate", "Decision", "DirectEgressRefused", "LiveState",
    "NotExecuted", "OutcomeUnknown", "Plan", "Request", "RequestState", "Sab", "SabError", "SabRefused", "Seb", "SebDenied",
    "SebError", "broker_only", "broker_only_call", "kernel_refusal", "state_read",
]
