"""The values that travel between the agent, the broker and the SAB."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

PROVIDERS = ("aws", "kubernetes", "http")


@dataclass(frozen=True)
class Request:
    """A request to the broker: a mutation (``s3:PutObject``) or a passthrough read
    (``s3:GetObject``) of ``target``, with its ``params``."""

    provider: str
    operation: str
    target: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, not {self.provider!r}")
        if not self.operation or not self.target:
            raise ValueError("a request needs an operation and a target")

    def to_json(self) -> Dict[str, Any]:
        return {"provider": self.provider, "operation": self.operation, "target": self.target,
                "params": dict(self.params)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "Request":
        return cls(str(value["provider"]), str(value["operation"]), str(value["target"]),
                   dict(value.get("params") or {}))


@dataclass(frozen=True)
class LiveState:
    """A target's live state as the broker read it. ``state_digest`` is what a contract
    certifies as its precondition."""

    status: int
    body: Optional[str]
    body_hex: Optional[str]
    state_digest: str

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "LiveState":
        return cls(int(value["status"]), value.get("body"), value.get("body_hex"), str(value["state_digest"]))

    def to_json(self) -> Dict[str, Any]:
        return {"status": self.status, "body": self.body, "body_hex": self.body_hex,
                "state_digest": self.state_digest}


@dataclass(frozen=True)
class Plan:
    """A change ready to certify: the request, the live state it was planned on, and why."""

    request: Request
    live_state: LiveState
    intent: str

    @property
    def precondition(self) -> str:
        return self.live_state.state_digest

    def draft(self) -> Dict[str, Any]:
        """The body of ``POST /v1/certify``."""
        return {"request": self.request.to_json(), "precondition": self.precondition,
                "live_state": self.live_state.to_json(), "intent": self.intent}


@dataclass(frozen=True)
class Certificate:
    """What the SAB issued: a certificate bound to exactly one request."""

    request_id: str
    pem: str
    contract: Mapping[str, Any]
    evidence_digest: Optional[str] = None
    not_after: Optional[str] = None


@dataclass(frozen=True)
class Decision:
    """The broker's answer to a proposal, and the outcome of executing it."""

    decision_id: str
    admitted: bool
    reason: str
    message: str
    record_seq: int
    serial: Optional[str]
    contract_id: Optional[str]
    outcome: Optional[Mapping[str, Any]]

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "Decision":
        return cls(str(value["decision_id"]), bool(value["admitted"]), str(value["reason"]),
                   str(value.get("message", "")), int(value.get("record_seq", 0)), value.get("serial"),
                   value.get("contract_id"), value.get("outcome"))

    @property
    def executed(self) -> bool:
        return self.admitted and (self.outcome or {}).get("status") == "succeeded"


@dataclass(frozen=True)
class RequestState:
    """A SAB request as ``GET /v1/requests/{id}`` reports it."""

    request_id: str
    status: str
    approvals: List[Mapping[str, Any]]
    reasons: List[str]
    certificate: Optional[str]
    contract: Optional[Mapping[str, Any]]

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "RequestState":
        return cls(str(value["request_id"]), str(value["status"]), list(value.get("approvals") or []),
                   [str(r) for r in value.get("reasons") or []], value.get("certificate"), value.get("contract"))
