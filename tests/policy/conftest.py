"""A real policy service process on the session's nats-server; buses of the tests' own."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from kube_api_fake import FakeApiServer
from kubernetes import client, config
from nats.js.errors import KeyNotFoundError

from interposer.cli._auth import ensure_credentials, write_server_config
from interposer.cli._policy_client import PolicyClientError, get_policy
from interposer.cli._procs import Child, free_port, start_nats_server
from interposer.proto import decode_record, encode_record, resource, subjects
from interposer_testing import wait_until

#: User agent of the tests' own Kubernetes API calls (the service's are the client's default).
TEST_AGENT = "interposer-tests"
#: Where the fake API server listens: never through a proxy.
LOOPBACK = "127.0.0.1"


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


def start_policy_service(nats_url: str, log_path: Path, creds: dict[str, str] | None = None,
                         extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Child:
    """Start ``python -m interposer.policy`` and wait until it answers.

    With ``creds`` (role → credentials file) the service runs as the ``policy``
    role and readiness is asked as the ``user`` role. ``extra``: more flags;
    ``env``: more environment variables.
    """
    argv = [sys.executable, "-m", "interposer.policy", "--nats-url", nats_url, "--log-level", "DEBUG", *extra]
    if creds:
        argv += ["--nats-creds", creds["policy"]]
    child = Child("policy", argv, log_path, env=env).start()
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


class KubeBus:
    """A nats-server, a fake API server and a policy service reconciling between them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nats, self.url = start_nats_server(root / "nats")
        self.kube = FakeApiServer().start()
        self.kubeconfig = self.kube.kubeconfig(root / "kubeconfig.json")
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
        configuration.no_proxy = LOOPBACK  # the client takes HTTP(S)_PROXY from the environment
        api_client = client.ApiClient(configuration)
        api_client.user_agent = TEST_AGENT
        self.api = client.CustomObjectsApi(api_client)
        self.services: list[Child] = []
        try:
            self.start_service()
        except BaseException:
            self.stop()
            raise

    def start_service(self) -> Child:
        """Start one more policy service replica with ``--kubernetes`` (waits until it answers)."""
        no_proxy = ",".join(filter(None, (os.environ.get("NO_PROXY", ""), LOOPBACK)))
        child = start_policy_service(self.url, self.root / f"policy{len(self.services)}.log",
                                     extra=["--kubernetes", "--kubeconfig", str(self.kubeconfig)],
                                     env={"NO_PROXY": no_proxy, "no_proxy": no_proxy})
        self.services.append(child)
        return child

    def stop(self) -> None:
        for child in self.services:
            child.stop()
        self.kube.stop()
        self.nats.stop()

    # ---- the resources, through the API (as kubectl would) -------------------------

    def create(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": resource.API_VERSION, "kind": resource.KIND,
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        return self.api.create_namespaced_custom_object(resource.GROUP, resource.VERSION, namespace,
                                                        resource.PLURAL, body)

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.api.patch_namespaced_custom_object(resource.GROUP, resource.VERSION, namespace,
                                                       resource.PLURAL, name, {"spec": spec})

    def delete(self, namespace: str, name: str) -> None:
        self.api.delete_namespaced_custom_object(resource.GROUP, resource.VERSION, namespace, resource.PLURAL,
                                                 name)

    def status_of(self, namespace: str, name: str, generation: int) -> dict[str, Any]:
        """Wait until the status is about ``generation``; return it."""
        def observed() -> bool:
            obj = self.kube.get(namespace, name)
            return obj is not None and (obj.get("status") or {}).get("observedGeneration") == generation

        wait_until(observed, f"the status of {namespace}/{name} generation {generation}", timeout_s=30)
        return self.kube.get(namespace, name)["status"]

    # ---- the bucket -----------------------------------------------------------------

    def current(self, key: str) -> tuple[int, Any]:
        """``(revision, PolicyRecord)`` of ``key`` as stored (``(0, None)`` if none)."""
        async def read() -> tuple[int, Any]:
            nc = await nats.connect(self.url)
            try:
                kv = await nc.jetstream().key_value(subjects.POLICY_KV_BUCKET)
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    return 0, None
                return entry.revision, decode_record(entry.value)
            finally:
                await nc.close()

        return asyncio.run(read())

    def put_record(self, key: str, record: Any) -> int:
        """Store ``record`` (a ``PolicyRecord``) under ``key`` as a policy service would.

        Returns:
            Its revision.
        """
        async def put() -> int:
            nc = await nats.connect(self.url)
            try:
                kv = await nc.jetstream().key_value(subjects.POLICY_KV_BUCKET)
                return await kv.put(key, encode_record(record))
            finally:
                await nc.close()

        return asyncio.run(put())

    def service_calls(self) -> set[tuple[str, str]]:
        """``(verb, resource)`` of every API call the policy services made so far."""
        return {(r.verb, r.resource) for r in list(self.kube.requests) if r.agent != TEST_AGENT}


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeBus]:
    """A nats-server, a fake Kubernetes API server and a policy service with ``--kubernetes``."""
    bus = KubeBus(Path(tmp_path_factory.mktemp("kube")))
    try:
        yield bus
    finally:
        bus.stop()
