"""CSI conformance, from the spec's error tables (spec v1.x, "Error Scheme" of each RPC).

One table per Node RPC: every REQUIRED field missing → INVALID_ARGUMENT naming
it; NOT_FOUND where the spec has "Volume does not exist"; idempotency (the same
call twice is OK, a conflicting one is ALREADY_EXISTS); no leaked mounts or
target directories. The Controller's table is in test_csi_controller.py.

The FUSE cases mount real file systems: they fail (never skip) where FUSE is missing.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from csi_support import RPC_TIMEOUT_S, CsiNode, fuse_mounts_under, mounting_volume_request
from interposer.proto.csi import csi_pb2
from interposer_testing import require_fuse

Mode = csi_pb2.VolumeCapability.AccessMode


def _publish_without(field: str) -> csi_pb2.NodePublishVolumeRequest:
    request = mounting_volume_request("vol-c", "/tmp/csi-conformance-never/target", "/tmp")
    if field == "access_mode":
        request.volume_capability.ClearField("access_mode")
    else:
        request.ClearField(field)
    return request


@pytest.mark.parametrize("field", ["volume_id", "target_path", "volume_capability", "access_mode"])
def test_node_publish_missing_field(shared_csi_node: CsiNode, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        shared_csi_node.node.NodePublishVolume(_publish_without(field), timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert not Path("/tmp/csi-conformance-never").exists()


@pytest.mark.parametrize("field", ["volume_id", "target_path"])
def test_node_unpublish_missing_field(shared_csi_node: CsiNode, field: str) -> None:
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-c", target_path="/tmp/csi-conformance-never")
    request.ClearField(field)
    with pytest.raises(grpc.RpcError) as caught:
        shared_csi_node.node.NodeUnpublishVolume(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


@pytest.mark.parametrize("field", ["volume_id", "volume_path"])
def test_node_get_volume_stats_missing_field(shared_csi_node: CsiNode, field: str) -> None:
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-c", volume_path="/tmp/csi-conformance-never")
    request.ClearField(field)
    with pytest.raises(grpc.RpcError) as caught:
        shared_csi_node.node.NodeGetVolumeStats(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


def test_node_get_volume_stats_of_an_unknown_volume_is_not_found(shared_csi_node: CsiNode) -> None:
    request = csi_pb2.NodeGetVolumeStatsRequest(
        volume_id="vol-none", volume_path="/tmp/csi-conformance-never"
    )
    with pytest.raises(grpc.RpcError) as caught:
        shared_csi_node.node.NodeGetVolumeStats(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_node_unpublish_of_an_unknown_volume_is_ok(shared_csi_node: CsiNode) -> None:
    # The spec: "Volume does not exist" is NOT_FOUND, but kubelet relies on
    # unpublish being idempotent after a successful one, so a volume not
    # published here is OK (as in csi-sanity's "should remove target path").
    request = csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="vol-none", target_path="/tmp/csi-conformance-never"
    )
    shared_csi_node.node.NodeUnpublishVolume(request, timeout=RPC_TIMEOUT_S)


@pytest.mark.fuse
def test_publish_twice_ok_conflicting_access_mode_already_exists_unpublish_twice_ok(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path
) -> None:
    require_fuse()
    target = csi_root / "pods" / "u" / "mount"
    request = mounting_volume_request("vol-idem", target, backing_dir, mode=Mode.SINGLE_NODE_WRITER)
    csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)
    csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)
    assert len(csi_node.volume_states()) == 1

    conflicting = mounting_volume_request("vol-idem", target, backing_dir, mode=Mode.MULTI_NODE_MULTI_WRITER)
    with pytest.raises(grpc.RpcError) as caught:
        csi_node.node.NodePublishVolume(conflicting, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "access_mode" in caught.value.details()

    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-idem", target_path=str(target))
    csi_node.node.NodeUnpublishVolume(unpublish, timeout=RPC_TIMEOUT_S)
    csi_node.node.NodeUnpublishVolume(unpublish, timeout=RPC_TIMEOUT_S)
    assert fuse_mounts_under(csi_root) == {} and not target.exists() and csi_node.volume_states() == []
