"""Helpers shared by the csi-node tests (fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgspec

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
