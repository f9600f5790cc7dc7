"""The embedded default: nats-server, policy service, collector and csi-node on one machine.

``EmbeddedStack`` starts them as child processes (each in its own process group),
waits for each to answer, writes their endpoints to ``<state_dir>/stack.json`` for
the other ``interposer`` commands, and stops them in reverse order. The collector
records the event batches into ``<state_dir>/recordings`` (``interposer analyze``).

NATS runs with authentication: every role gets its own user and permissions
(``_auth``), its password in ``<state_dir>/credentials/<role>.json`` (mode 0600),
and each service the file of its role (``--nats-creds``); anonymous connections
are refused. The csi-node hands the worker file to the workers it starts, and
``interposer policy`` reads the ``user`` file named in ``stack.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import urllib.request
from pathlib import Path

import msgspec
from interposer.csi_node._config import MAX_GRPC_UNIX_SOCKET_PATH_BYTES

from ._auth import ensure_credentials, write_server_config
from ._policy_client import PolicyClientError, get_policy
from ._procs import Child, free_port, port_in_use, start_nats_server

log = logging.getLogger(__name__)

#: File in the state dir that records a running stack's endpoints.
STACK_FILE = "stack.json"
#: Volume id the readiness probe asks the policy service about.
PROBE_VOLUME = "_probe"
#: Directory in the state dir where the collector records event batches (``interposer analyze`` reads it).
RECORDINGS_DIR = "recordings"
#: Most bytes the embedded collector's recordings may take (256 MiB: about 5M events).
DEFAULT_RECORD_MAX_BYTES = 256 * 1024 * 1024


class StackEndpoints(msgspec.Struct, frozen=True):
    """Where a running embedded stack can be reached.

    Attributes:
        nats_url: NATS client URL.
        metrics_url: the collector's Prometheus endpoint (``http://host:port/metrics``).
        csi_endpoint: the csi-node's gRPC endpoint (``unix:///…/csi.sock``).
        state_dir: the stack's state directory.
        user_creds: the ``--nats-creds`` file of the ``user`` role (what
            ``interposer policy`` uses); ``""`` = NATS without authentication.
        recordings_dir: where the collector records event batches; ``""`` = it does not.
    """

    nats_url: str
    metrics_url: str
    csi_endpoint: str
    state_dir: str
    user_creds: str = ""
    recordings_dir: str = ""


def read_endpoints(state_dir: Path) -> StackEndpoints | None:
    """Endpoints of the stack running with ``state_dir``, or None if none is recorded."""
    try:
        return msgspec.json.decode((state_dir / STACK_FILE).read_bytes(), type=StackEndpoints)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _policy_ready(nats_url: str, creds_file: str) -> bool:
    try:
        return asyncio.run(get_policy(nats_url, PROBE_VOLUME, creds_file=creds_file)).ok
    except PolicyClientError:
        return False


def _unix_socket_ready(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


class EmbeddedStack:
    """Start and stop the embedded services; use as a context manager.

    Args:
        state_dir: directory for JetStream data, logs, the CSI socket and worker state.
        nats_port: NATS client port; None picks a free one.
        metrics_port: collector port; 0 picks a free one.
        node_id: CSI node id reported by NodeGetInfo.
        tls_cert: nats-server certificate (PEM); ``""`` = plain TCP. Every
            credentials file then names ``tls_ca`` so the services verify it.
        tls_key: its private key (PEM).
        tls_ca: CA bundle (PEM) that signed ``tls_cert``.
        record_max_bytes: the collector records event batches into
            ``<state_dir>/recordings`` within this many bytes; 0 = no recording.

    Raises:
        RuntimeError: a service did not start (its log tail is in the message).
    """

    def __init__(self, state_dir: Path, nats_port: int | None = None, metrics_port: int = 0,
                 node_id: str | None = None, tls_cert: str = "", tls_key: str = "",
                 tls_ca: str = "", record_max_bytes: int = DEFAULT_RECORD_MAX_BYTES) -> None:
        self.state_dir = state_dir.resolve()
        self.tls = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca}
        self.nats_port = nats_port
        self.metrics_port = metrics_port
        self.record_max_bytes = record_max_bytes
        self.node_id = node_id or socket.gethostname()
        self.children: list[Child] = []
        self.endpoints: StackEndpoints | None = None
        self._short_socket_dir: Path | None = None

    def _python(self, name: str, module: str, *args: str) -> Child:
        child = Child(name, [sys.executable, "-m", module, *args], self.state_dir / "logs" / f"{name}.log")
        self.children.append(child)
        return child.start()

    def start(self) -> StackEndpoints:
        """Start every service and wait until each answers.

        Raises:
            RuntimeError: a port asked for is taken (before anything starts), or a
                service did not start.
        """
        # Before starting anything: a nats-server that cannot bind exits, while the
        # readiness check would find whatever holds the port and take it for ours.
        for port, flag in ((self.nats_port, "--nats-port"), (self.metrics_port, "--metrics-port")):
            if port and port_in_use("127.0.0.1", port):
                raise RuntimeError(f"port {port} on 127.0.0.1 is in use (another `interposer up`?): "
                                   f"stop what holds it, or pass {flag} 0 for a free port")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            creds = ensure_credentials(self.state_dir, ca=self.tls["tls_ca"])
            nats_config = write_server_config(self.state_dir / "nats" / "nats.conf", creds, **self.tls)
            nats_child, nats_url = start_nats_server(self.state_dir / "nats", self.nats_port,
                                                     config_file=nats_config)
            self.children.append(nats_child)

            policy = self._python("policy", "interposer.policy", "--nats-url", nats_url,
                                  "--nats-creds", creds["policy"])
            policy.wait_ready(lambda: _policy_ready(nats_url, creds["user"]))

            port_file = self.state_dir / "collector.port"
            port_file.unlink(missing_ok=True)
            listen = f"127.0.0.1:{self.metrics_port or free_port()}"
            recordings = self.state_dir / RECORDINGS_DIR if self.record_max_bytes else None
            record_flags = ["--record-dir", str(recordings), "--record-max-bytes", str(self.record_max_bytes)] \
                if recordings is not None else []
            collector = self._python("collector", "interposer.collector", "--nats-url", nats_url,
                                     "--nats-creds", creds["collector"],
                                     "--listen", listen, "--port-file", str(port_file), *record_flags)
            collector.wait_ready(lambda: port_file.exists() and _http_ok(
                f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"))
            metrics_url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"

            socket_path = self._csi_socket_path()
            csi_endpoint = f"unix://{socket_path}"
            csi = self._python("csi-node", "interposer.csi_node", "--endpoint", csi_endpoint,
                               "--nodeid", self.node_id, "--state-dir", str(self.state_dir / "csi"),
                               "--nats-url", nats_url, "--nats-creds", creds["worker"])
            csi.wait_ready(lambda: _unix_socket_ready(socket_path))
        except BaseException:
            self.stop()
            raise
        self.endpoints = StackEndpoints(nats_url, metrics_url, csi_endpoint, str(self.state_dir),
                                        user_creds=creds["user"],
                                        recordings_dir=str(recordings) if recordings is not None else "")
        tmp = self.state_dir / f".{STACK_FILE}.tmp"
        tmp.write_bytes(msgspec.json.encode(self.endpoints))
        os.replace(tmp, self.state_dir / STACK_FILE)
        return self.endpoints

    def _csi_socket_path(self) -> Path:
        """``<state>/csi/csi.sock``, or a short temp dir when that path is too long.

        gRPC binds a unix socket path of at most 105 bytes (``sun_path`` is 108 with
        its NUL, unix(7), and grpcio keeps a margin); a deep
        state dir (e.g. a test's tmp dir) would make the csi-node fail to bind.
        """
        socket_path = self.state_dir / "csi" / "csi.sock"
        if len(os.fsencode(socket_path)) > MAX_GRPC_UNIX_SOCKET_PATH_BYTES:
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="interposer-csi-"))
            socket_path = self._short_socket_dir / "csi.sock"
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        return socket_path

    def stop(self) -> None:
        """Stop every service, newest first. Safe to repeat."""
        (self.state_dir / STACK_FILE).unlink(missing_ok=True)
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        (self.state_dir / "collector.port").unlink(missing_ok=True)
        if self._short_socket_dir is not None:
            shutil.rmtree(self._short_socket_dir, ignore_errors=True)
            self._short_socket_dir = None

    def __enter__(self) -> StackEndpoints:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def describe(endpoints: StackEndpoints) -> str:
    """Human-readable summary of a running stack."""
    return json.dumps(msgspec.to_builtins(endpoints), indent=2)
