"""The broker's Unix socket: each message is a 4-byte big-endian length, then that many
bytes of JSON carrying the protocol version ``v``. One request per connection."""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, Dict, Mapping, Optional

from .errors import MALFORMED, BrokerError, NotExecuted, OutcomeUnknown, SebDenied
from .models import Decision, LiveState, Request

VERSION = 1
#: Largest message either side accepts.
MAX_MESSAGE = 1 << 20
DEFAULT_SOCKET = "/run/seb/broker.sock"
#: How long a reply may take: a proposal waits up to 60 s for another change to its
#: target, then up to 120 s to mint and read and 120 s to execute, then is recorded.
DEFAULT_TIMEOUT = 330.0


class Broker:
    """A client of the broker socket (``$SEB_SOCKET``, else ``/run/seb/broker.sock``)."""

    def __init__(self, socket_path: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path or os.environ.get("SEB_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout

    def call(self, message: Mapping[str, Any]) -> Dict[str, Any]:
        """Send one request; return the reply, or raise ``BrokerError`` for an error reply.
        A proposal sent whole and left without a readable reply raises ``OutcomeUnknown``:
        the broker may have executed it."""
        body = json.dumps({"v": VERSION, **message}, separators=(",", ":")).encode()
        if len(body) > MAX_MESSAGE:
            raise BrokerError("too_large", f"the request is {len(body)} bytes, the limit {MAX_MESSAGE}")
        sent = False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout)
                conn.connect(self.socket_path)
                conn.sendall(struct.pack(">I", len(body)) + body)
                sent = True
                (length,) = struct.unpack(">I", _read_exactly(conn, 4))
                if length > MAX_MESSAGE:
                    raise BrokerError("protocol", f"the broker announced a {length}-byte reply")
                reply = json.loads(_read_exactly(conn, length))
                if not isinstance(reply, dict) or reply.get("v") != VERSION:
                    raise BrokerError("protocol", f"the broker does not speak protocol version {VERSION}")
        except (OSError, BrokerError, *MALFORMED) as e:
            if sent and message.get("type") == "propose":
                raise OutcomeUnknown(
                    message=f"the proposal was sent to the broker at {self.socket_path} and no reply was read "
                    f"({e}): the change may or may not have been made; read the target before proposing it again"
                ) from e
            if isinstance(e, BrokerError):
                raise
            if isinstance(e, OSError):
                raise BrokerError("unreachable", f"the broker at {self.socket_path}: {e}") from e
            raise BrokerError("protocol", f"the broker's reply is not JSON: {e}") from e
        if reply.get("type") == "error":
            raise BrokerError(str(reply.get("code", "error")), str(reply.get("message", "")))
        return reply

    def ping(self) -> str:
        """The broker's version."""
        reply = self._expect(self.call({"type": "ping"}), "pong")
        try:
            return str(reply["version"])
        except MALFORMED as e:
            raise _malformed("pong", e) from e

    def read(self, request: Request) -> LiveState:
        """A passthrough read (no certificate): the target's live state and its digest.
        The broker serves only the reads its configuration names (else ``forbidden``)."""
        reply = self._expect(self.call({"type": "read", "request": _read_request(request)}), "read")
        try:
            return LiveState.from_json(reply)
        except MALFORMED as e:
            raise _malformed("read", e) from e

    def propose(self, certificate: str, request: Request) -> Decision:
        """Present a certificate and the request it certifies. Returns the decision when the
        change was admitted and executed; raises ``SebDenied`` (with the broker's reason code)
        or ``NotExecuted`` (admitted, but the change was not made), or ``OutcomeUnknown``
        (it may have been made: read the target before proposing it again)."""
        reply = self.call({"type": "propose", "certificate": certificate, "request": request.to_json()})
        try:
            decision = self._expect(reply, "decision")
            admitted = decision.get("admitted")
            if not isinstance(admitted, bool):
                raise TypeError(f"`admitted` is {admitted!r}, not true or false")
            if not admitted:
                raise SebDenied(decision)
            status = (decision.get("outcome") or {}).get("status")
            if status in (None, "unknown"):
                raise OutcomeUnknown(decision)
            if status != "succeeded":
                raise NotExecuted(decision)
            return Decision.from_json(decision)
        except (BrokerError, *MALFORMED) as e:
            # The proposal was sent whole and its answer cannot be read: it may have run.
            raise OutcomeUnknown(message=f"the broker's answer to the proposal cannot be read ({e}): the change "
                                 "may or may not have been made; read the target before proposing it again") from e

    @staticmethod
    def _expect(reply: Dict[str, Any], kind: str) -> Dict[str, Any]:
        if reply.get("type") != kind:
            raise BrokerError("protocol", f"expected a {kind!r} reply, got {reply.get('type')!r}")
        return reply


def _malformed(kind: str, error: BaseException) -> BrokerError:
    return BrokerError("protocol", f"the broker's {kind!r} reply is malformed: {error!r}")


def _read_request(request: Request) -> Dict[str, Any]:
    # A read carries no parameters.
    return {"provider": request.provider, "operation": request.operation, "target": request.target}


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(min(size - len(chunks), 65536))
        if not chunk:
            raise BrokerError("protocol", "the broker closed the connection mid-reply")
        chunks += chunk
    return bytes(chunks)
