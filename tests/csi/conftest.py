"""Fixtures for the csi-node tests: a real csi-node process on a unix socket.

Each test gets its own csi-node (``python -m interposer.csi_node``) in a fresh
``/tmp/csi-*`` directory and talks to it with the generated CSI stubs, as kubelet
does. Teardown stops the csi-node, kills any fuse-worker it left (pids from its
state files) and lazily unmounts anything still mounted under the directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from csi_support import STARTUP_TIMEOUT_S, TEST_MOUNT_TIMEOUT_S, CsiNode, fuse_mounts_under, pid_alive

from interposer.proto.csi import csi_pb2, csi_pb2_grpc


@contextmanager
def fresh_csi_root() -> Iterator[Path]:
    """A fresh ``/tmp/csi-*`` directory; every mount under it is removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
    try:
        yield root
    finally:
        for mountpoint in sorted(fuse_mounts_under(root), key=len, reverse=True):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def running_csi_node(root: Path) -> Iterator[CsiNode]:
    """Run ``python -m interposer.csi_node`` on ``<root>/csi.sock`` until the block ends.

    On exit the csi-node gets SIGTERM and every fuse-worker named in its state
    files is killed.
    """
    socket_path = root / "csi.sock"
    state_dir = root / "state"
    log_path = root / "csi-node.log"
    argv = [
        sys.executable, "-m", "interposer.csi_node",
        "--endpoint", f"unix://{socket_path}",
        "--nodeid", "test-node",
        "--state-dir", str(state_dir),
        "--mount-timeout-s", str(TEST_MOUNT_TIMEOUT_S),
        "--unmount-timeout-s", "5",
        "--log-level", "DEBUG",
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    channel = grpc.insecure_channel(f"unix://{socket_path}")
    node = CsiNode(
        root=root,
        socket_path=socket_path,
        state_dir=state_dir,
        process=process,
        log_path=log_path,
        channel=channel,
        identity=csi_pb2_grpc.IdentityStub(channel),
        node=csi_pb2_grpc.NodeStub(channel),
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"csi-node exited with {process.returncode}:\n{node.log_text()}")
            try:
                node.identity.Probe(csi_pb2.ProbeRequest(), timeout=1.0)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    pytest.fail(f"csi-node did not answer Probe within {STARTUP_TIMEOUT_S} s:\n{node.log_text()}")
                time.sleep(0.1)
        yield node
    finally:
        channel.close()
        worker_pids = [state["worker_pid"] for state in node.volume_states()] if state_dir.exists() else []
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in worker_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def csi_root() -> Iterator[Path]:
    """A fresh ``/tmp/csi-*`` directory for one test, mounts under it removed at the end."""
    with fresh_csi_root() as root:
        yield root


@pytest.fixture
def csi_node(csi_root: Path) -> Iterator[CsiNode]:
    """A csi-node of this test alone, serving on ``<csi_root>/csi.sock``."""
    with running_csi_node(csi_root) as node:
        yield node


@pytest.fixture(scope="module")
def shared_csi_node() -> Iterator[CsiNode]:
    """One csi-node for a whole module of tests that publish nothing successfully."""
    with fresh_csi_root() as root, running_csi_node(root) as node:
        yield node


@pytest.fixture
def backing_dir(csi_root: Path) -> Path:
    """An existing, empty backing directory."""
    path = csi_root / "backing"
    path.mkdir()
    return path
