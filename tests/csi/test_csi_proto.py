"""The CSI contract: committed generated modules are current and wire-compatible.

Field numbers checked here are the CSI spec's (container-storage-interface/spec
csi.proto); a change to any of them would break kubelet and the sidecars.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from interposer.proto.csi import csi_pb2, csi_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE_SCRIPT = REPO_ROOT / "proto" / "csi" / "generate.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("csi_generate", GENERATE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_modules_match_regenerated(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh_paths = generator.generate(tmp_path)
    for fresh in fresh_paths:
        relative = fresh.relative_to(tmp_path)
        committed = generator.DEFAULT_OUT_ROOT / relative
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{relative} is stale: run `make proto` and commit the result"
        )


def test_package_and_services_are_the_specs() -> None:
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    services = {
        name: [m.name for m in svc.methods] for name, svc in csi_pb2.DESCRIPTOR.services_by_name.items()
    }
    assert services["Identity"] == ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
    assert {
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    } == set(services["Node"])
    assert {"CreateVolume", "DeleteVolume", "ValidateVolumeCapabilities", "ControllerGetCapabilities"} <= set(
        services["Controller"]
    )
    assert hasattr(csi_pb2_grpc, "NodeServicer") and hasattr(csi_pb2_grpc, "add_IdentityServicer_to_server")


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (
            "NodePublishVolumeRequest",
            {
                "volume_id": 1,
                "publish_context": 2,
                "staging_target_path": 3,
                "target_path": 4,
                "volume_capability": 5,
                "readonly": 6,
                "secrets": 7,
                "volume_context": 8,
            },
        ),
        ("NodeUnpublishVolumeRequest", {"volume_id": 1, "target_path": 2}),
        ("NodeGetInfoResponse", {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3}),
        ("NodeGetVolumeStatsRequest", {"volume_id": 1, "volume_path": 2, "staging_target_path": 3}),
        ("NodeGetVolumeStatsResponse", {"usage": 1, "volume_condition": 2}),
        (
            "NodeExpandVolumeRequest",
            {
                "volume_id": 1,
                "volume_path": 2,
                "capacity_range": 3,
                "staging_target_path": 4,
                "volume_capability": 5,
                "secrets": 6,
            },
        ),
        ("VolumeCapability", {"block": 1, "mount": 2, "access_mode": 3}),
        ("GetPluginInfoResponse", {"name": 1, "vendor_version": 2, "manifest": 3}),
        ("GetPluginCapabilitiesResponse", {"capabilities": 1}),
        ("ProbeResponse", {"ready": 1}),
        (
            "CreateVolumeRequest",
            {
                "name": 1,
                "capacity_range": 2,
                "volume_capabilities": 3,
                "parameters": 4,
                "secrets": 5,
                "volume_content_source": 6,
                "accessibility_requirements": 7,
                "mutable_parameters": 8,
            },
        ),
        (
            "Volume",
            {
                "capacity_bytes": 1,
                "volume_id": 2,
                "volume_context": 3,
                "content_source": 4,
                "accessible_topology": 5,
            },
        ),
    ],
)
def test_field_numbers_are_the_specs(message: str, fields: dict[str, int]) -> None:
    descriptor = csi_pb2.DESCRIPTOR.message_types_by_name[message]
    assert {f.name: f.number for f in descriptor.fields} == fields


def test_enum_values_are_the_specs() -> None:
    mode = csi_pb2.VolumeCapability.AccessMode
    assert (mode.SINGLE_NODE_WRITER, mode.MULTI_NODE_MULTI_WRITER, mode.SINGLE_NODE_MULTI_WRITER) == (1, 5, 7)
    node_rpc = csi_pb2.NodeServiceCapability.RPC
    assert (node_rpc.STAGE_UNSTAGE_VOLUME, node_rpc.GET_VOLUME_STATS, node_rpc.VOLUME_MOUNT_GROUP) == (
        1,
        2,
        6,
    )
    service = csi_pb2.PluginCapability.Service
    assert (service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS) == (1, 2)
