"""Identity service of the real csi-node, over gRPC on its unix socket."""

from __future__ import annotations

import grpc
import pytest
from csi_support import RPC_TIMEOUT_S, CsiNode
from interposer.csi_node import DRIVER_NAME
from interposer.proto.csi import csi_pb2, csi_pb2_grpc


@pytest.fixture
def csi_node(shared_csi_node: CsiNode) -> CsiNode:
    """The module's csi-node: these RPCs change nothing, so tests can share it."""
    return shared_csi_node


def test_get_plugin_info_names_the_driver(csi_node: CsiNode) -> None:
    info = csi_node.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=RPC_TIMEOUT_S)
    assert info.name == DRIVER_NAME == "fs.interposer.io"
    assert info.vendor_version


def test_plugin_capabilities_do_not_claim_a_controller(csi_node: CsiNode) -> None:
    reply = csi_node.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=RPC_TIMEOUT_S
    )
    services = [c.service.type for c in reply.capabilities if c.HasField("service")]
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE not in services


def test_probe_is_ready(csi_node: CsiNode) -> None:
    reply = csi_node.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_TIMEOUT_S)
    assert reply.HasField("ready") and reply.ready.value is True


def test_node_get_info_reports_the_node_id(csi_node: CsiNode) -> None:
    reply = csi_node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=RPC_TIMEOUT_S)
    assert reply.node_id == "test-node"


def test_node_capabilities(csi_node: CsiNode) -> None:
    reply = csi_node.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=RPC_TIMEOUT_S)
    rpc = csi_pb2.NodeServiceCapability.RPC
    assert sorted(c.rpc.type for c in reply.capabilities) == sorted(
        [rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION, rpc.SINGLE_NODE_MULTI_WRITER]
    )


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x")),
        ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(volume_id="v", staging_target_path="/x")),
        ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_id="v", volume_path="/x")),
    ],
)
def test_unsupported_node_rpcs_are_unimplemented(csi_node: CsiNode, method: str, request_message) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(csi_node.node, method)(request_message, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_controller_service_is_not_registered(csi_node: CsiNode) -> None:
    controller = csi_pb2_grpc.ControllerStub(csi_node.channel)
    with pytest.raises(grpc.RpcError) as caught:
        controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=RPC_TIMEOUT_S
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
