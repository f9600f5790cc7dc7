"""A real policy service process on the session's nats-server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from interposer.cli._auth import ensure_credentials, write_server_config
from interposer.cli._policy_client import PolicyClientError, get_policy
from interposer.cli._procs import Child, free_port, start_nats_server


def _ready(nats_url: str, creds_file: str = "") -> bool:
    try:
        return asyncio.run(get_policy(nats_url, "_probe", timeout_s=1, creds_file=creds_file)).ok
    except PolicyClientError:
        return False


@pytest.fixture(scope="module")
def policy_service(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    child = start_policy_service(nats_url, Path(tmp_path_factory.mktemp("policy")) / "policy.log")
    try:
        yield child
    finally:
        child.stop()


def start_policy_service(nats_url: str, log_path: Path, creds: dict[str, str] | None = None) -> Child:
    """Start ``python -m interposer.policy`` and wait until it answers.

    With ``creds`` (role → credentials file) the service runs as the ``policy``
    role and readiness is asked as the ``user`` role.
    """
    argv = [sys.executable, "-m", "interposer.policy", "--nats-url", nats_url, "--log-level", "DEBUG"]
    if creds:
        argv += ["--nats-creds", creds["policy"]]
    child = Child("policy", argv, log_path).start()
    child.wait_ready(lambda: _ready(nats_url, creds["user"] if creds else ""))
    return child


class AuthBus:
    """A nats-server with the embedded stack's users and permissions, and a policy service.

    Attributes:
        url: NATS URL.
        creds: role (``worker``, ``policy``, ``collector``, ``user``) → credentials file.
        state_dir: where the credentials and the server config are.
    """

    def __init__(self, root: Path) -> None:
        self.state_dir = root
        self.creds = ensure_credentials(root)
        config = write_server_config(root / "nats" / "nats.conf", self.creds)
        self.nats, self.url = start_nats_server(root / "nats", config_file=config)
        try:
            self.policy = start_policy_service(self.url, root / "policy.log", self.creds)
        except BaseException:
            self.nats.stop()
            raise

    def stop(self) -> None:
        self.policy.stop()
        self.nats.stop()


@pytest.fixture(scope="module")
def auth_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthBus]:
    """NATS with authentication and per-role permissions (as ``interposer up`` runs it) + a policy service."""
    bus = AuthBus(Path(tmp_path_factory.mktemp("auth")))
    try:
        yield bus
    finally:
        bus.stop()


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
