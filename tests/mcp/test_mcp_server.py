"""`seb-agent mcp` driven by a real MCP client (the `mcp` package) over stdio, against a
real broker and SAB: ``cargo test -p seb-tests --test clients`` runs it as the agent, in
the enforced workload cgroup, with ``SEB_SOCKET``, ``SEB_SAB_*`` and ``SEB_AGENT`` set."""

import asyncio
import os
import subprocess
import uuid
from typing import Any, Awaitable, Callable, Dict

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run this suite through `cargo test -p seb-tests --test clients`")
    return value


def session(job: Callable[[ClientSession], Awaitable[Any]]) -> Any:
    """Start `seb-agent mcp` as an MCP host would (its configuration in the environment),
    run `job` in an initialised session, and stop it."""
    server = StdioServerParameters(command=env("SEB_AGENT"), args=["mcp"], env=dict(os.environ))

    async def run() -> Any:
        async with stdio_client(server) as (read, write):
            async with ClientSession(read, write) as client:
                await client.initialize()
                return await job(client)

    return asyncio.run(run())


def call(name: str, arguments: Dict[str, Any]) -> Any:
    return session(lambda client: client.call_tool(name, arguments))


def approve(request_id: str) -> None:
    """`seb-agent sab approve`, as the approver policy names."""
    environment = dict(os.environ, SEB_SAB_CERT=env("SEB_TEST_APPROVER_CERT"), SEB_SAB_KEY=env("SEB_TEST_APPROVER_KEY"))
    done = subprocess.run([env("SEB_AGENT"), "sab", "approve", request_id], env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def s3_target(key: str) -> str:
    return f"arn:aws:s3:::{env('SEB_TEST_BUCKET')}/{key}"


def read_object(key: str) -> Any:
    return call("read_resource", {"provider": "aws", "operation": "s3:GetObject", "target": s3_target(key)})


def test_the_server_offers_three_tools_described_for_a_model():
    async def job(client: ClientSession):
        return client.initialize_result, (await client.list_tools()).tools

    info, tools = session(job)
    assert "kernel" in (info.instructions or "") and "propose_change" in info.instructions
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == {"read_resource", "propose_change", "request_status"}
    propose = by_name["propose_change"]
    assert {"provider", "operation", "target", "intent"} <= set(propose.input_schema["required"])
    for word in ("pending_approval", "refused", "denied", "executed", "approved_request_id"):
        assert word in propose.description
    assert "request_id" in by_name["request_status"].input_schema["properties"]


def test_read_resource_returns_the_live_state_and_its_digest():
    result = read_object(f"missing/{uuid.uuid4().hex}")
    assert not result.is_error, result
    assert result.structured_content["status"] == 404
    assert result.structured_content["state_digest"].startswith("sha256:")


def test_a_read_the_broker_does_not_serve_is_an_error_with_the_reason():
    result = call("read_resource", {"provider": "aws", "operation": "s3:GetBucketPolicy",
                                    "target": f"arn:aws:s3:::{env('SEB_TEST_BUCKET')}"})
    assert result.is_error
    assert result.structured_content["status"] == "read_refused"
    assert "passthrough" in result.structured_content["message"]


def test_propose_change_plans_certifies_and_executes_in_one_call():
    key = f"config/{uuid.uuid4().hex}.txt"
    result = call("propose_change", {
        "provider": "aws", "operation": "s3:PutObject", "target": s3_target(key),
        # With a postcondition the broker reads the resulting state (and only then).
        "params": {"body": "replicas=3", "postcondition": True}, "intent": "scale the app to 3 replicas",
    })
    assert not result.is_error, result
    outcome = result.structured_content
    assert outcome["status"] == "executed" and outcome["reason"] == "admitted"
    assert outcome["outcome"]["status"] == "succeeded" and outcome["outcome"]["api_status"] == 200
    assert outcome["decision_record"] > 0 and outcome["outcome"]["outcome_record"] > outcome["decision_record"]
    after = read_object(key).structured_content
    assert after["body"] == "replicas=3"
    assert after["state_digest"] == outcome["outcome"]["resulting_state_digest"]

    status = call("request_status", {"request_id": outcome["request_id"]})
    assert not status.is_error, status
    assert status.structured_content["status"] == "issued"
    assert status.structured_content["certificate_ready"] is True
    assert "certificate" not in status.structured_content


def test_a_change_policy_forbids_is_refused_and_nothing_is_executed():
    key = f"config/{uuid.uuid4().hex}.txt"
    put = {"provider": "aws", "operation": "s3:PutObject", "target": s3_target(key), "params": {"body": "keep"},
           "intent": "seed"}
    assert not call("propose_change", put).is_error
    result = call("propose_change", {"provider": "aws", "operation": "s3:DeleteObject", "target": s3_target(key),
                                     "intent": "remove an object nobody uses"})
    assert result.is_error
    assert result.structured_content["status"] == "refused"
    assert result.structured_content["reasons"] == ["forbidden_by: no-deletes"]
    assert read_object(key).structured_content["body"] == "keep"


def test_a_change_that_needs_approval_is_pending_then_runs_once_approved():
    key = f"release/{uuid.uuid4().hex}.txt"
    change = {"provider": "aws", "operation": "s3:PutObject", "target": s3_target(key),
              "params": {"body": "version=2"}, "intent": "ship version 2"}
    pending = call("propose_change", change)
    assert not pending.is_error, pending
    assert pending.structured_content["status"] == "pending_approval"
    assert pending.structured_content["approvers"] == ["seb://approver/alice"]
    request_id = pending.structured_content["request_id"]
    assert call("request_status", {"request_id": request_id}).structured_content["status"] == "pending"
    assert read_object(key).structured_content["status"] == 404

    approve(request_id)
    status = call("request_status", {"request_id": request_id}).structured_content
    assert status["status"] == "issued" and status["certificate_ready"] is True
    done = call("propose_change", dict(change, approved_request_id=request_id))
    assert not done.is_error, done
    assert done.structured_content["status"] == "executed"
    assert read_object(key).structured_content["body"] == "version=2"


def test_an_operation_with_no_known_live_state_is_an_error_before_any_certificate():
    result = call("propose_change", {
        "provider": "aws", "operation": "s3:CreateBucket", "target": "arn:aws:s3:::another",
        "intent": "make a bucket",
    })
    assert result.is_error
    assert result.structured_content["status"] == "unsupported_operation"


def test_an_approved_request_id_that_is_not_issued_is_refused():
    result = call("propose_change", {
        "provider": "aws", "operation": "s3:PutObject", "target": s3_target("config/x.txt"),
        "params": {"body": "x"}, "intent": "x", "approved_request_id": "no-such-request",
    })
    assert result.is_error
    assert result.structured_content["status"] == "sab_error"
    assert "404" in result.structured_content["message"]
