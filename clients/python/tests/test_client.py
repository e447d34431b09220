"""The Python client against a real broker and SAB: every step, the whole loop, and the
reason codes an agent gets back."""

import errno
import socket
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import object_read
from seb_client import (
    ApprovalPending,
    Broker,
    BrokerError,
    DirectEgressRefused,
    NotExecuted,
    OutcomeUnknown,
    Request,
    Sab,
    SabError,
    SabRefused,
    SebDenied,
    broker_only,
    state_read,
)


def test_read_returns_the_live_state_and_its_digest(seb, put):
    change = put("replicas=1")
    seb.apply(change, "seed the object")
    state = seb.read(object_read(change))
    assert state.status == 200
    assert state.body == "replicas=1"
    assert state.state_digest.startswith("sha256:") and len(state.state_digest) == 71


def test_plan_binds_the_live_state_the_broker_will_check(seb, put):
    change = put("replicas=2")
    plan = seb.plan(change, "scale to 2")
    # What the broker's drift check digests: the same state the read shows.
    live = seb.read(state_read(change))
    assert (plan.live_state.status, plan.live_state.state_digest) == (live.status, live.state_digest)
    draft = plan.draft()
    assert draft["request"] == change.to_json()
    assert draft["precondition"] == plan.live_state.state_digest
    assert draft["intent"] == "scale to 2"


def test_each_step_in_order_executes_the_change(seb, put):
    change = put("replicas=3")
    certificate = seb.certify(seb.plan(change, "scale to 3"))
    assert certificate.pem.startswith("-----BEGIN CERTIFICATE-----")
    assert certificate.contract["target"] == change.target
    decision = seb.propose(certificate, change)
    assert decision.admitted and decision.executed
    assert decision.outcome["status"] == "succeeded"
    assert seb.read(object_read(change)).body == "replicas=3"


def test_apply_runs_every_step(seb, put):
    change = put("replicas=4")
    decision = seb.apply(change, "scale to 4")
    assert decision.executed and decision.reason == "admitted"
    assert seb.read(object_read(change)).body == "replicas=4"


def test_a_change_policy_forbids_is_refused_by_the_sab_with_the_policy(seb, put):
    change = put("replicas=1")
    seb.apply(change, "seed the object")
    delete = Request("aws", "s3:DeleteObject", change.target)
    with pytest.raises(SabRefused) as refused:
        seb.apply(delete, "clean up")
    assert refused.value.reason == "forbidden_by"
    assert refused.value.reasons == ["forbidden_by: no-deletes"]
    assert seb.read(object_read(change)).body == "replicas=1"


def test_a_change_no_policy_permits_is_refused_by_default(seb, bucket):
    change = Request("aws", "s3:PutObject", f"arn:aws:s3:::{bucket}/elsewhere/x.txt", {"body": "x"})
    with pytest.raises(SabRefused) as refused:
        seb.apply(change, "write somewhere no policy names")
    assert refused.value.reason == "no_permit"
    assert seb.read(object_read(change)).status == 404


def test_a_change_that_needs_approval_runs_once_a_person_approves(seb, put, approve):
    change = put("version=2", key=f"release/{uuid.uuid4().hex}.txt")
    with pytest.raises(ApprovalPending) as pending:
        seb.apply(change, "ship version 2")
    assert pending.value.approvers == ["seb://approver/alice"] and pending.value.approvals_required == 1
    assert seb.sab.request(pending.value.request_id).status == "pending"
    with pytest.raises(ApprovalPending):
        seb.wait_for_certificate(pending.value.request_id, timeout=0.2, interval=0.1)
    assert approve(pending.value.request_id)["status"] == "issued"
    certificate = seb.wait_for_certificate(pending.value.request_id, timeout=10)
    assert seb.propose(certificate, change).executed
    assert seb.read(object_read(change)).body == "version=2"


def test_a_replayed_certificate_is_denied_with_its_reason(seb, put):
    change = put("replicas=5")
    certificate = seb.certify(seb.plan(change, "scale to 5"))
    seb.propose(certificate, change)
    with pytest.raises(SebDenied) as denied:
        seb.propose(certificate, change)
    assert denied.value.reason == "replayed"
    assert denied.value.decision["admitted"] is False


def test_a_request_other_than_the_certified_one_is_denied(seb, put):
    change = put("replicas=6")
    certificate = seb.certify(seb.plan(change, "scale to 6"))
    tampered = Request(change.provider, change.operation, change.target, {"body": "replicas=600"})
    with pytest.raises(SebDenied) as denied:
        seb.propose(certificate, tampered)
    assert denied.value.reason == "request_mismatch"
    assert seb.read(object_read(change)).status == 404


def test_a_change_planned_on_stale_state_is_denied_as_drift(seb, put):
    first = put("replicas=7")
    stale = seb.certify(seb.plan(first, "scale to 7"))
    seb.apply(put("replicas=8", key=first.target.split("/", 1)[1]), "someone else scales to 8")
    with pytest.raises(SebDenied) as denied:
        seb.propose(stale, first)
    assert denied.value.reason == "drift"
    assert seb.read(object_read(first)).body == "replicas=8"


def test_a_read_the_broker_does_not_serve_is_refused_with_its_code(seb, bucket):
    with pytest.raises(BrokerError) as refused:
        seb.read(Request("aws", "s3:GetBucketPolicy", f"arn:aws:s3:::{bucket}"))
    assert refused.value.reason == "forbidden"
    assert "passthrough" in refused.value.message


def test_a_direct_connection_refused_by_the_kernel_says_to_use_the_broker(protected_api):
    host, port = protected_api.rsplit(":", 1)
    with pytest.raises(DirectEgressRefused) as refused:
        with broker_only():
            socket.create_connection((host, int(port)), timeout=5)
    assert refused.value.reason == "direct_egress_refused"
    assert "through the seb broker" in str(refused.value)
    assert isinstance(refused.value, PermissionError)
    assert refused.value.__cause__.errno == errno.EPERM


def test_a_direct_http_call_wrapped_by_the_library_is_recognised(protected_api):
    with pytest.raises(DirectEgressRefused):
        with broker_only():
            urllib.request.urlopen(f"http://{protected_api}/", timeout=5)


def test_other_connection_errors_are_not_called_kernel_refusals():
    # Nothing listens on this unprotected port: ECONNREFUSED, not EPERM.
    with pytest.raises(ConnectionRefusedError):
        with broker_only():
            socket.create_connection(("127.0.0.1", 9), timeout=5)
    with pytest.raises(urllib.error.URLError) as failed:
        with broker_only():
            urllib.request.urlopen("http://127.0.0.1:9/", timeout=5)
    assert not isinstance(failed.value, DirectEgressRefused)


def test_in_cluster_mode_the_projected_token_is_read_for_each_request(tmp_path, monkeypatch):
    # The kubelet rotates a projected token in place: each request reads the file again.
    from seb_client import sab as sab_module

    sent = []

    class Recording:
        def __init__(self, *args, **kwargs):
            pass

        def request(self, method, path, body=None, headers=None):
            sent.append(dict(headers or {}))
            raise OSError("recorded, not sent")

        def close(self):
            pass

    token = tmp_path / "token"
    token.write_text("first\n")
    client = Sab(token_file=str(token))
    monkeypatch.setattr(sab_module.http.client, "HTTPSConnection", Recording)
    for rotated in ("first", "second"):
        token.write_text(rotated + "\n")
        with pytest.raises(SabError):
            client.healthz()
    assert [h.get("Authorization") for h in sent] == ["Bearer first", "Bearer second"]


def _one_shot_broker(path, reply):
    """A socket at ``path`` that takes one request whole, then sends ``reply`` (a dict, or
    bytes as they are) or, when ``None``, closes without answering."""
    import json
    import struct
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            (length,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            conn.recv(length, socket.MSG_WAITALL)
            if reply is not None:
                body = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                conn.sendall(struct.pack(">I", len(body)) + body)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()


def test_a_proposal_whose_outcome_is_unknown_is_never_reported_as_not_made(tmp_path):
    request = Request("http", "POST", "https://127.0.0.1/x")
    # Sent whole, no reply (the broker stopped, or the client's timeout passed): the change
    # may have been made. A read in the same case is only unreachable.
    _one_shot_broker(tmp_path / "silent.sock", None)
    with pytest.raises(OutcomeUnknown) as unknown:
        Broker(str(tmp_path / "silent.sock")).propose("pem", request)
    assert unknown.value.reason == "unknown" and "may or may not" in unknown.value.message
    _one_shot_broker(tmp_path / "silent-read.sock", None)
    with pytest.raises(BrokerError) as failed:
        Broker(str(tmp_path / "silent-read.sock")).read(request)
    assert not isinstance(failed.value, OutcomeUnknown)
    # The broker recorded the outcome as unknown: OutcomeUnknown too; a failed one is not.
    decision = {"v": 1, "type": "decision", "decision_id": "d", "admitted": True, "reason": "admitted",
                "message": "", "outcome": {"status": "unknown", "error": "no answer within 120 s"}}
    _one_shot_broker(tmp_path / "unknown.sock", decision)
    with pytest.raises(OutcomeUnknown):
        Broker(str(tmp_path / "unknown.sock")).propose("pem", request)
    decision["outcome"] = {"status": "failed", "error": "403"}
    _one_shot_broker(tmp_path / "failed.sock", decision)
    with pytest.raises(NotExecuted) as failed:
        Broker(str(tmp_path / "failed.sock")).propose("pem", request)
    assert not isinstance(failed.value, OutcomeUnknown) and failed.value.reason == "failed"


def test_a_malformed_answer_is_a_protocol_error_and_after_a_proposal_an_unknown_outcome(tmp_path, monkeypatch):
    request = Request("http", "POST", "https://127.0.0.1/x")
    nested = b'{"v":1,"type":"read","status":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _one_shot_broker(tmp_path / "nested.sock", nested)
    with pytest.raises(BrokerError) as failed:
        Broker(str(tmp_path / "nested.sock")).read(request)
    assert failed.value.reason == "protocol"
    _one_shot_broker(tmp_path / "fieldless.sock", {"v": 1, "type": "read", "status": 200})
    with pytest.raises(BrokerError) as failed:
        Broker(str(tmp_path / "fieldless.sock")).read(request)
    assert failed.value.reason == "protocol"
    # Admitted and succeeded, but the rest cannot be read: the change may have been made.
    for name, reply in (("no-id", {"v": 1, "type": "decision", "admitted": True, "outcome": {"status": "succeeded"}}),
                        ("odd-outcome", {"v": 1, "type": "decision", "admitted": True, "outcome": "done"}),
                        ("no-admitted", {"v": 1, "type": "decision", "outcome": {"status": "succeeded"}}),
                        ("no-version", {"type": "decision", "admitted": True, "outcome": {"status": "succeeded"}}),
                        ("overflow", b'{"v":1,"type":"decision","decision_id":"d","admitted":true,"reason":"",'
                                     b'"record_seq":1e999,"outcome":{"status":"succeeded"}}'),
                        ("nested-decision", nested.replace(b'"read"', b'"decision"'))):
        _one_shot_broker(tmp_path / f"{name}.sock", reply)
        with pytest.raises(OutcomeUnknown):
            Broker(str(tmp_path / f"{name}.sock")).propose("pem", request)

    from seb_client import sab as sab_module

    answers = iter([
        (200, b'{"status":"issued"}'),
        (202, b'{"status":"pending","approvals_required":"two"}'),
        (200, b'{"status":"issued","request_id":"r","certificate":"c","contract":[1]}'),
        (200, b"[" * 100_000 + b"]" * 100_000),
        (200, b'{"status":"pending"}'),
    ])

    class Answering:
        def __init__(self, *args, **kwargs):
            self.status, self.body = next(answers)

        def request(self, method, path, body=None, headers=None):
            pass

        def getresponse(self):
            return self

        def read(self, limit):
            return self.body

        def close(self):
            pass

    monkeypatch.setattr(sab_module.http.client, "HTTPSConnection", Answering)
    client = Sab()
    for _ in range(4):
        with pytest.raises(SabError) as failed:
            client.certify({"request": {}})
        assert failed.value.reason == "protocol", failed.value
    with pytest.raises(SabError) as failed:
        client.request("r")
    assert failed.value.reason == "protocol"
