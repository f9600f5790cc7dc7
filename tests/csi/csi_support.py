"""Helpers shared by the csi-node tests (fixtures live in conftest.py).

A plain module, not conftest.py: tests import from it by name, and two modules
named ``conftest`` (tests/ and tests/csi/) cannot both be imported that way.
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
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgspec
import pytest
from interposer.proto.csi import csi_pb2, csi_pb2_grpc

#: How long the csi-node may take to answer its first Probe, seconds.
STARTUP_TIMEOUT_S = 20.0
#: Deadline of each test RPC, seconds (publish waits for a mount).
RPC_TIMEOUT_S = 30.0
#: Mount timeout given to the csi-node under test, seconds.
TEST_MOUNT_TIMEOUT_S = 15.0


@dataclass
class CsiNode:
    """A running csi-node under test and CSI clients connected to it."""

    root: Path
    socket_path: Path
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    channel: grpc.Channel
    identity: csi_pb2_grpc.IdentityStub
    node: csi_pb2_grpc.NodeStub

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def volume_states(self) -> list[dict]:
        volumes = self.state_dir / "volumes"
        return [
            msgspec.json.decode(p.read_bytes())
            for p in sorted(volumes.glob("*.json"))
            if not p.name.endswith(".policy.json")
        ]


#: The worker flags a volume's ``WorkerTuning`` sets (kernel cache times, busy polling).
TUNING_FLAGS = ("--entry-timeout", "--attr-timeout", "--negative-timeout", "--busy-poll-us", "--max-background",
                "--max-file-fds", "--max-dir-fds")
#: Worker tuning flags without a value.
TUNING_SWITCHES = ("--kernel-passthrough", "--no-kernel-passthrough", "--always-flush", "--skip-needless-flush",
                   "--handle-killpriv-v2", "--no-handle-killpriv-v2")


def tuning_flags(argv: list[str]) -> dict[str, str]:
    """The worker tuning flags in a worker's ``argv``: flag → value ("" for a switch)."""
    return ({flag: argv[argv.index(flag) + 1] for flag in TUNING_FLAGS if flag in argv}
            | {flag: "" for flag in TUNING_SWITCHES if flag in argv})


def fuse_mounts_under(root: Path) -> dict[str, str]:
    """Mount point → fstype for every mount at or below ``root`` (from /proc/self/mountinfo)."""
    found = {}
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            mountpoint = before.split()[4].replace("\\040", " ")
            if mountpoint.startswith(prefix) or mountpoint == str(root):
                found[mountpoint] = after.split()[0]
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def mounting_volume_request(
    volume_id: str,
    target_path: Path | str,
    backing_dir: Path | str | None,
    *,
    readonly: bool = False,
    mode: int = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
    extra_context: dict[str, str] | None = None,
) -> csi_pb2.NodePublishVolumeRequest:
    """A NodePublishVolumeRequest as kubelet sends it for a mount volume."""
    context = {} if backing_dir is None else {"backingPath": str(backing_dir)}
    context.update(extra_context or {})
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target_path),
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
        ),
        readonly=readonly,
        volume_context=context,
    )


@contextmanager
def fresh_csi_root() -> Iterator[Path]:
    """A fresh ``csi-*`` directory in ``$TMPDIR`` (``/tmp``); every mount under it is removed at the end.

    ``$TMPDIR`` lets checkouts tested side by side keep their mounts apart.
    """
    root = Path(tempfile.mkdtemp(prefix="csi-"))
    try:
        yield root
    finally:
        for mountpoint in sorted(fuse_mounts_under(root), key=len, reverse=True):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def running_csi_node(
    root: Path,
    worker_command: str | None = None,
    mount_timeout_s: float = TEST_MOUNT_TIMEOUT_S,
    extra_args: list[str] | None = None,
) -> Iterator[CsiNode]:
    """Run ``python -m interposer.csi_node`` on ``<root>/csi.sock`` until the block ends.

    ``extra_args`` are appended to its command line (``--mode controller``…).

    On exit the csi-node gets SIGTERM and every fuse-worker named in its state
    files is killed.
    """
    socket_path = root / "csi.sock"
    state_dir = root / "state"
    log_path = root / "csi-node.log"
    argv = [
        sys.executable,
        "-m",
        "interposer.csi_node",
        "--endpoint",
        f"unix://{socket_path}",
        "--nodeid",
        "test-node",
        "--state-dir",
        str(state_dir),
        "--mount-timeout-s",
        str(mount_timeout_s),
        "--unmount-timeout-s",
        "5",
        "--log-level",
        "DEBUG",
    ]
    if worker_command is not None:
        argv += ["--worker-command", worker_command]
    argv += extra_args or []
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
                    pytest.fail(
                        f"csi-node did not answer Probe within {STARTUP_TIMEOUT_S} s:\n{node.log_text()}"
                    )
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
