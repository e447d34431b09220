"""The SAB's HTTPS API (v1), over mutual TLS: the agent's client certificate is its
identity, so the SAB never takes who the agent is from the request body."""

from __future__ import annotations

import http.client
import json
import os
import ssl
from typing import Any, Dict, Mapping, Optional, Union
from urllib.parse import quote, urlsplit

from .errors import MALFORMED, ApprovalPending, SabError, SabRefused
from .models import Certificate, Plan, RequestState

#: Largest SAB answer read (a certificate chain and its contract fit many times over).
MAX_RESPONSE = 1 << 20


class Sab:
    """A SAB client. Every argument falls back to the environment: ``SEB_SAB_URL``,
    ``SEB_SAB_CERT`` and ``SEB_SAB_KEY`` (this agent's client certificate and key, PEM),
    ``SEB_SAB_CA`` (the CA the SAB's server certificate chains to), and in cluster mode
    ``SEB_SAB_TOKEN_FILE`` (this pod's projected ServiceAccount token for the SAB's
    audience, sent as a bearer token and read again for each request, since the kubelet
    rotates it)."""

    def __init__(self, url: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None,
                 ca: Optional[str] = None, timeout: float = 30.0, token_file: Optional[str] = None) -> None:
        self.token_file = token_file or os.environ.get("SEB_SAB_TOKEN_FILE") or None
        url = url or os.environ.get("SEB_SAB_URL")
        cert = cert or os.environ.get("SEB_SAB_CERT")
        key = key or os.environ.get("SEB_SAB_KEY")
        ca = ca or os.environ.get("SEB_SAB_CA")
        missing = [name for name, value in (("url", url), ("cert", cert), ("key", key), ("ca", ca)) if not value]
        if missing:
            raise ValueError(f"the SAB client needs {', '.join(missing)} (or SEB_SAB_URL/CERT/KEY/CA)")
        parts = urlsplit(str(url))
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"the SAB URL must be https://host[:port], not {url!r}")
        self.host, self.port = parts.hostname, parts.port or 443
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self.tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_3
        self.tls.load_cert_chain(str(cert), str(key))

    def certify(self, plan: Union[Plan, Mapping[str, Any]]) -> Union[Certificate, ApprovalPending]:
        """Ask the SAB to certify a draft. Returns the certificate, or ``ApprovalPending``
        (not raised) when policy wants a human first; raises ``SabRefused`` when policy forbids it."""
        draft = plan.draft() if isinstance(plan, Plan) else dict(plan)
        status, body = self._call("POST", "/v1/certify", draft)
        try:
            return self._certified(status, body)
        except MALFORMED as e:
            raise _malformed(status, e) from e

    @staticmethod
    def _certified(status: int, body: Dict[str, Any]) -> Union[Certificate, ApprovalPending]:
        if status == 200 and body.get("status") == "issued":
            return Certificate(str(body["request_id"]), str(body["certificate"]), dict(body.get("contract") or {}),
                               body.get("evidence_digest"), body.get("not_after"))
        if status == 202 and body.get("status") == "pending":
            return ApprovalPending(str(body["request_id"]), int(body.get("approvals_required", 1)),
                                   [str(a) for a in body.get("approvers") or []])
        if status == 403 and body.get("status") == "refused":
            raise SabRefused(str(body.get("request_id", "")), [str(r) for r in body.get("reasons") or []])
        raise _error(status, body)

    def request(self, request_id: str) -> RequestState:
        """A request's state: ``pending``, ``issued`` (with its certificate), ``refused``,
        ``denied`` or ``expired``."""
        status, body = self._call("GET", f"/v1/requests/{quote(request_id, safe='')}", None)
        if status != 200:
            raise _error(status, body)
        try:
            return RequestState.from_json(body)
        except MALFORMED as e:
            raise _malformed(status, e) from e

    def healthz(self) -> Dict[str, Any]:
        status, body = self._call("GET", "/v1/healthz", None)
        if status != 200:
            raise _error(status, body)
        return body

    def _call(self, method: str, path: str, body: Optional[Mapping[str, Any]]) -> "tuple[int, Dict[str, Any]]":
        connection = http.client.HTTPSConnection(self.host, self.port, context=self.tls, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
            headers = {"Accept": "application/json"}
            if self.token_file:
                with open(self.token_file, encoding="utf-8") as token:
                    headers["Authorization"] = "Bearer " + token.read().strip()
            if payload is not None:
                headers["Content-Type"] = "application/json"
            connection.request(method, self.base + path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_RESPONSE + 1)
            status = response.status
        except (OSError, http.client.HTTPException) as e:
            raise SabError("unreachable", f"the SAB at https://{self.host}:{self.port}: {e}") from e
        finally:
            connection.close()
        if len(raw) > MAX_RESPONSE:
            raise SabError("protocol", f"the SAB's answer exceeds {MAX_RESPONSE} bytes", status)
        try:
            parsed = json.loads(raw) if raw else {}
        except (ValueError, RecursionError) as e:
            raise SabError("protocol", f"the SAB's answer ({status}) is not JSON: {e}", status) from e
        if not isinstance(parsed, dict):
            raise SabError("protocol", f"the SAB's answer ({status}) is not a JSON object", status)
        return status, parsed


def _malformed(status: int, error: BaseException) -> SabError:
    return SabError("protocol", f"the SAB's answer ({status}) is malformed: {error!r}", status)


def _error(status: int, body: Mapping[str, Any]) -> SabError:
    error = body.get("error")
    if not isinstance(error, dict):
        error = {}
    return SabError(str(error.get("code", f"http_{status}")), str(error.get("message", body)), status)
