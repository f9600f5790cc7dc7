"""A real policy service process on the session's nats-server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from interposer.cli._policy_client import PolicyClientError, get_policy
from interposer.cli._procs import Child, free_port, start_nats_server


def _ready(nats_url: str) -> bool:
    try:
        return asyncio.run(get_policy(nats_url, "_probe", timeout_s=1)).ok
    except PolicyClientError:
        return False


@pytest.fixture(scope="module")
def policy_service(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    child = start_policy_service(nats_url, Path(tmp_path_factory.mktemp("policy")) / "policy.log")
    try:
        yield child
    finally:
        child.stop()


def start_policy_service(nats_url: str, log_path: Path) -> Child:
    """Start ``python -m interposer.policy`` and wait until it answers."""
    child = Child("policy", [sys.executable, "-m", "interposer.policy", "--nats-url", nats_url,
                             "--log-level", "DEBUG"], log_path).start()
    child.wait_ready(lambda: _ready(nats_url))
    return child


class PrivateBus:
    """A nats-server and a policy service of the test's own, both restartable.

    The nats-server keeps its port and its JetStream store dir (``-sd``) across
    restarts, so the policy bucket survives, as it would for a real deployment.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.nats: Child | None = None
        self.policy: Child | None = None
        self._policy_starts = 0

    def start_nats(self) -> None:
        self.nats, url = start_nats_server(self.root / "nats", port=self.port)
        assert url == self.url

    def stop_nats(self) -> None:
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def start_policy(self) -> Child:
        self._policy_starts += 1
        self.policy = start_policy_service(self.url, self.root / f"policy{self._policy_starts}.log")
        return self.policy

    def stop_policy(self) -> None:
        if self.policy is not None:
            self.policy.stop()
            self.policy = None

    def stop(self) -> None:
        self.stop_policy()
        self.stop_nats()


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A fresh nats-server + policy service for tests that restart them."""
    bus = PrivateBus(tmp_path / "bus")
    bus.start_nats()
    bus.start_policy()
    try:
        yield bus
    finally:
        bus.stop()


_volume_ids = __import__("itertools").count(1)


@pytest.fixture
def fresh_volume() -> str:
    """A volume id no other test uses."""
    import os

    return f"vol-{os.getpid()}-c{next(_volume_ids)}"
