"""The suite runs as an agent on a node with seb: ``cargo test -p seb-tests --test clients``
starts a sandboxed broker (moto as production on a protected address) and a SAB, and
runs pytest in the enforced workload cgroup with ``SEB_SOCKET`` and ``SEB_SAB_*`` set."""

import json
import os
import subprocess
import uuid

import pytest

from seb_client import Broker, Request, Sab, Seb


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run this suite through `cargo test -p seb-tests --test clients`")
    return value


@pytest.fixture
def seb() -> Seb:
    return Seb(Broker(_env("SEB_SOCKET")), Sab())


@pytest.fixture
def bucket() -> str:
    return _env("SEB_TEST_BUCKET")


@pytest.fixture
def protected_api() -> str:
    return _env("SEB_TEST_PROTECTED_API")


@pytest.fixture
def put(bucket: str):
    """An s3:PutObject of a fresh key (or of ``key``)."""

    def make(body: str, key: str = "") -> Request:
        key = key or f"config/{uuid.uuid4().hex}.txt"
        return Request("aws", "s3:PutObject", f"arn:aws:s3:::{bucket}/{key}", {"body": body})

    return make


def object_read(request: Request) -> Request:
    return Request("aws", "s3:GetObject", request.target)


@pytest.fixture
def approve():
    """Approve a SAB request as a person would: ``seb-agent sab approve`` with an approver's certificate."""

    def run(request_id: str) -> dict:
        env = dict(os.environ, SEB_SAB_CERT=_env("SEB_TEST_APPROVER_CERT"), SEB_SAB_KEY=_env("SEB_TEST_APPROVER_KEY"))
        done = subprocess.run([_env("SEB_AGENT"), "--json", "sab", "approve", request_id, "--reason", "reviewed"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    return run
