"""A real policy service process on the session's nats-server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from interposer.cli._policy_client import PolicyClientError, get_policy
from interposer.cli._procs import Child


def _ready(nats_url: str) -> bool:
    try:
        return asyncio.run(get_policy(nats_url, "_probe", timeout_s=1)).ok
    except PolicyClientError:
        return False


@pytest.fixture(scope="module")
def policy_service(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    log_path = Path(tmp_path_factory.mktemp("policy")) / "policy.log"
    child = Child("policy", [sys.executable, "-m", "interposer.policy", "--nats-url", nats_url], log_path).start()
    try:
        child.wait_ready(lambda: _ready(nats_url))
        yield child
    finally:
        child.stop()
