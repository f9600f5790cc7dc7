"""Drive the csi-node over its socket exactly as kubelet does, on real FUSE mounts.

Two flows, each: capabilities → publish with pod info → the app writes and
reads → the worker is killed → the csi-node restores the mount at the same path
(no new publish) → stats → unpublish. The requests copy what kubelet's CSI volume
plugin (``pkg/volume/csi/csi_mounter.go``) sends:

* ephemeral inline volume: volume id ``csi-`` + hex SHA-256 of pod UID + volume
  name (kubelet's ``makeVolumeHandle``), ``volumeAttributes`` as the context plus
  ``csi.storage.k8s.io/ephemeral: "true"`` and the pod info keys, mode
  SINGLE_NODE_WRITER;
* persistent volume: the volume id and context a controller's CreateVolume
  returned (as csi-provisioner would store them in the PV), access mode
  SINGLE_NODE_SINGLE_WRITER (a ReadWriteOncePod claim, since the node advertises
  SINGLE_NODE_MULTI_WRITER), plus the pod info keys.

Target paths are ``<root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount`` with
the parent created by "kubelet" first, as kubelet does.

These mount FUSE file systems: they fail (never skip) where FUSE is missing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_support import RPC_TIMEOUT_S, CsiNode, fresh_csi_root, fuse_mounts_under, pid_alive, running_csi_node
from interposer.proto.csi import csi_pb2, csi_pb2_grpc
from interposer_testing import require_fuse

pytestmark = pytest.mark.fuse

Mode = csi_pb2.VolumeCapability.AccessMode
NodeCap = csi_pb2.NodeServiceCapability.RPC
#: Bound for the test to give up waiting for a restore, seconds (not a speed claim).
RESTORE_WAIT_S = 20.0
POD = {"namespace": "ml", "name": "trainer-0", "uid": "6f1c2d3e-0000-4000-8000-00000000abcd", "sa": "trainer"}


@pytest.fixture(autouse=True)
def _fuse_available() -> None:
    require_fuse()


@pytest.fixture
def controller() -> Iterator[csi_pb2_grpc.ControllerStub]:
    with fresh_csi_root() as root, running_csi_node(root, extra_args=["--mode", "controller"]) as process:
        yield csi_pb2_grpc.ControllerStub(process.channel)


def pod_info_context() -> dict[str, str]:
    return {
        "csi.storage.k8s.io/pod.namespace": POD["namespace"],
        "csi.storage.k8s.io/pod.name": POD["name"],
        "csi.storage.k8s.io/pod.uid": POD["uid"],
        "csi.storage.k8s.io/serviceAccount.name": POD["sa"],
    }


def kubelet_target(root: Path, volume_name: str) -> Path:
    target = root / "pods" / POD["uid"] / "volumes" / "kubernetes.io~csi" / volume_name / "mount"
    target.parent.mkdir(parents=True)  # kubelet makes the parent (and writes vol_data.json there)
    return target


def kubelet_publish(
    csi_node: CsiNode, volume_id: str, target: Path, context: dict[str, str], mode: int
) -> None:
    capabilities = csi_node.node.NodeGetCapabilities(
        csi_pb2.NodeGetCapabilitiesRequest(), timeout=RPC_TIMEOUT_S
    )
    kinds = {c.rpc.type for c in capabilities.capabilities}
    assert NodeCap.STAGE_UNSTAGE_VOLUME not in kinds  # so kubelet skips NodeStageVolume
    if mode in (Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER):
        assert NodeCap.SINGLE_NODE_MULTI_WRITER in kinds  # kubelet refuses RWOP otherwise
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
        ),
        readonly=False,
        volume_context=context,
    )
    csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)


def app_round_trip(target: Path, backing: Path, name: str) -> None:
    (target / name).write_bytes(b"app data\n")
    assert (target / name).read_bytes() == b"app data\n"
    assert (backing / name).read_bytes() == b"app data\n"


def kill_and_wait_restored(csi_node: CsiNode, volume_id: str, target: Path, probe: str) -> float:
    (state,) = [s for s in csi_node.volume_states() if s["volume_id"] == volume_id]
    os.kill(state["worker_pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        try:
            (target / probe).read_bytes()
            return time.monotonic() - killed_at
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT), exc
        assert time.monotonic() - killed_at < RESTORE_WAIT_S, csi_node.log_text()
        time.sleep(0.01)


def kubelet_stats_and_unpublish(csi_node: CsiNode, volume_id: str, target: Path, root: Path) -> None:
    stats = csi_node.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target)), timeout=RPC_TIMEOUT_S
    )
    assert stats.volume_condition.abnormal is False and len(stats.usage) == 2
    worker_pid = csi_node.volume_states()[0]["worker_pid"]
    csi_node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
        timeout=RPC_TIMEOUT_S,
    )
    assert fuse_mounts_under(root) == {}
    assert not target.exists() and target.parent.exists()  # the plugin removes only the target
    assert not pid_alive(worker_pid) and csi_node.volume_states() == []


def check_pod_info_reached_the_worker(csi_node: CsiNode, volume_id: str) -> dict:
    (state,) = [s for s in csi_node.volume_states() if s["volume_id"] == volume_id]
    argv = state["worker_argv"]
    assert argv[argv.index("--pod-namespace") + 1] == POD["namespace"]
    assert argv[argv.index("--pod-name") + 1] == POD["name"]
    assert argv[argv.index("--pod-uid") + 1] == POD["uid"]
    assert argv[argv.index("--service-account") + 1] == POD["sa"]
    assert (state["pod_uid"], state["service_account"]) == (POD["uid"], POD["sa"])
    return state


def test_kubelet_ephemeral_inline_volume(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    volume_name = "scratch"
    volume_id = "csi-" + hashlib.sha256((POD["uid"] + volume_name).encode()).hexdigest()
    target = kubelet_target(csi_root, volume_name)
    context = {"backingPath": str(backing_dir), "csi.storage.k8s.io/ephemeral": "true", **pod_info_context()}

    kubelet_publish(csi_node, volume_id, target, context, Mode.SINGLE_NODE_WRITER)
    state = check_pod_info_reached_the_worker(csi_node, volume_id)
    assert state["ephemeral"] is True
    app_round_trip(target, backing_dir, "inline.txt")

    kill_and_wait_restored(csi_node, volume_id, target, "inline.txt")
    app_round_trip(target, backing_dir, "inline-after.txt")
    kubelet_stats_and_unpublish(csi_node, volume_id, target, csi_root)


def test_kubelet_persistent_volume_from_create_volume(
    csi_node: CsiNode, csi_root: Path, controller: csi_pb2_grpc.ControllerStub
) -> None:
    backing_root = csi_root / "backing-root"
    created = controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-7d0e5c1a-1111-4222-8333-444455556666",
            volume_capabilities=[
                csi_pb2.VolumeCapability(
                    mount=csi_pb2.VolumeCapability.MountVolume(),
                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_SINGLE_WRITER),
                )
            ],
            parameters={"backend": "hostPath", "backingRoot": str(backing_root)},
        ),
        timeout=RPC_TIMEOUT_S,
    ).volume
    target = kubelet_target(csi_root, created.volume_id)
    context = {**created.volume_context, **pod_info_context()}

    kubelet_publish(csi_node, created.volume_id, target, context, Mode.SINGLE_NODE_SINGLE_WRITER)
    state = check_pod_info_reached_the_worker(csi_node, created.volume_id)
    assert state["ephemeral"] is False
    backing = backing_root / created.volume_id  # created by the node at publish
    app_round_trip(target, backing, "persistent.txt")

    # Republishing (kubelet retries after its own restart) is a no-op.
    kubelet_publish(csi_node, created.volume_id, target, context, Mode.SINGLE_NODE_SINGLE_WRITER)
    assert csi_node.volume_states()[0]["worker_pid"] == state["worker_pid"]

    kill_and_wait_restored(csi_node, created.volume_id, target, "persistent.txt")
    app_round_trip(target, backing, "persistent-after.txt")
    kubelet_stats_and_unpublish(csi_node, created.volume_id, target, csi_root)
    assert (backing / "persistent.txt").exists()  # backing data outlives the volume
    with pytest.raises(grpc.RpcError) as caught:
        csi_node.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=created.volume_id, volume_path=str(target)),
            timeout=RPC_TIMEOUT_S,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
