"""The Controller service (``--mode controller``) over its real gRPC socket.

Checked against the CSI spec's CreateVolume / DeleteVolume /
ValidateVolumeCapabilities sections: idempotency, INVALID_ARGUMENT for each
missing required field, NOT_FOUND for ids this driver cannot have made, and the
StorageClass parameters carried into the volume context (no controller state).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_support import RPC_TIMEOUT_S, fresh_csi_root, running_csi_node
from interposer.proto.csi import csi_pb2, csi_pb2_grpc

Mode = csi_pb2.VolumeCapability.AccessMode


def capability(mode: int = Mode.SINGLE_NODE_WRITER, block: bool = False) -> csi_pb2.VolumeCapability:
    access = csi_pb2.VolumeCapability.AccessMode(mode=mode)
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=access)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=access)


HOSTPATH_PARAMETERS = {"backend": "hostPath", "backingRoot": "/var/lib/interposer/backing"}


class Controller:
    def __init__(self, channel: grpc.Channel, root: Path) -> None:
        self.stub = csi_pb2_grpc.ControllerStub(channel)
        self.identity = csi_pb2_grpc.IdentityStub(channel)
        self.node = csi_pb2_grpc.NodeStub(channel)
        self.root = root

    def create(self, name: str = "pvc-1234", parameters: dict | None = None, caps=None, **fields):
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[capability()] if caps is None else caps,
            parameters=HOSTPATH_PARAMETERS if parameters is None else parameters,
            **fields,
        )
        return self.stub.CreateVolume(request, timeout=RPC_TIMEOUT_S)


@pytest.fixture(scope="module")
def controller() -> Iterator[Controller]:
    with fresh_csi_root() as root, running_csi_node(root, extra_args=["--mode", "controller"]) as process:
        yield Controller(process.channel, root)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_identity_advertises_the_controller_service(controller: Controller) -> None:
    reply = controller.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=RPC_TIMEOUT_S
    )
    services = [c.service.type for c in reply.capabilities]
    assert services == [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]


def test_controller_capabilities(controller: Controller) -> None:
    reply = controller.stub.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=RPC_TIMEOUT_S
    )
    assert [c.rpc.type for c in reply.capabilities] == [
        csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME
    ]


def test_node_service_is_not_registered_in_controller_mode(controller: Controller) -> None:
    assert (
        code_of(lambda: controller.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=RPC_TIMEOUT_S))
        == grpc.StatusCode.UNIMPLEMENTED
    )


def test_create_volume_carries_parameters_in_the_context_and_is_idempotent(controller: Controller) -> None:
    policy = json.dumps({"layers": [{"type": "delay", "delay_s": 0.01, "ops": ["read"]}]})
    parameters = {**HOSTPATH_PARAMETERS, "profile": "slow-disk", "policy": policy}
    first = controller.create("pvc-abc", parameters).volume
    assert first.volume_id == "pvc-abc"
    assert dict(first.volume_context) == {
        "backend": "passthrough",
        "backingPath": "/var/lib/interposer/backing/pvc-abc",
        "createBackingPath": "true",
        "profile": "slow-disk",
        "policy": first.volume_context["policy"],
    }
    assert json.loads(first.volume_context["policy"])["layers"][0]["type"] == "delay"
    assert controller.create("pvc-abc", parameters).volume == first


@pytest.mark.parametrize(
    ("parameters", "context"),
    [
        ({"backend": "memory"}, {"backend": "memory"}),
        ({"backend": "null"}, {"backend": "null"}),
        (
            {"backend": "hostPath", "backingPath": "/srv/shared"},
            {"backend": "passthrough", "backingPath": "/srv/shared"},
        ),
        (
            {"backend": "pvc", "backingClaim": "ml/data"},
            {"backend": "passthrough", "backingClaim": "ml/data"},
        ),
    ],
    ids=["memory", "null", "hostPath-shared", "pvc"],
)
def test_create_volume_backends(controller: Controller, parameters: dict, context: dict) -> None:
    assert dict(controller.create("pvc-b", parameters).volume.volume_context) == context


@pytest.mark.parametrize(
    "tuning",
    [
        {"cacheCoherence": "strict", "busyPollMicroseconds": "0"},
        {"entryTimeoutSeconds": "0.5", "attrTimeoutSeconds": "30", "negativeTimeoutSeconds": "0"},
        {"flushOnClose": "always", "handleKillprivV2": "false", "maxFileFds": "5000", "maxDirFds": "800"},
    ],
    ids=["strict-no-busy-poll", "timeouts", "flush-on-close-killpriv"],
)
def test_create_volume_carries_worker_tuning(controller: Controller, tuning: dict) -> None:
    parameters = {"backend": "hostPath", "backingPath": "/srv/shared", **tuning}
    context = controller.create("pvc-shared", parameters).volume.volume_context
    assert dict(context) == {"backend": "passthrough", "backingPath": "/srv/shared", **tuning}


def test_a_name_that_is_not_a_valid_id_gets_a_stable_hashed_id(controller: Controller) -> None:
    first = controller.create("My Volume/1").volume.volume_id
    assert first.startswith("iv-") and first == controller.create("My Volume/1").volume.volume_id


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"name": ""}, "name"),
        ({"caps": []}, "volume_capabilities"),
        (
            {"caps": [csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))]},
            "access_type",
        ),
        ({"caps": [csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())]}, "access_mode"),
        ({"caps": [capability(block=True)]}, "block"),
        ({"caps": [capability(Mode.MULTI_NODE_SINGLE_WRITER)]}, "MULTI_NODE_SINGLE_WRITER"),
        ({"parameters": {"backend": "tape"}}, "backend"),
        ({"parameters": {"backend": "hostPath"}}, "backingRoot"),
        ({"parameters": {"backend": "hostPath", "backingRoot": "relative"}}, "backingRoot"),
        ({"parameters": {"backend": "pvc"}}, "backingClaim"),
        ({"parameters": {"backend": "memory", "backingRoot": "/x"}}, "hostPath only"),
        ({"parameters": {"backend": "memory", "colour": "blue"}}, "colour"),
        ({"parameters": {"backend": "memory", "policy": "{"}}, "policy"),
        (
            {"parameters": {"backend": "memory", "entryTimeoutSeconds": "-1"}},
            "parameters['entryTimeoutSeconds'] = '-1' is negative",
        ),
        ({"parameters": {"backend": "memory", "busyPollMicroseconds": "fast"}}, "'busyPollMicroseconds'"),
        ({"parameters": {"backend": "memory", "workerMemoryLimit": "lots"}}, "'workerMemoryLimit'"),
        ({"parameters": {"backend": "memory", "cacheCoherence": "eventual"}}, "'cacheCoherence'"),
        ({"parameters": {"backend": "memory", "flushOnClose": "never"}}, "parameters['flushOnClose'] = 'never'"),
        ({"parameters": {"backend": "memory", "handleKillprivV2": "1"}}, "parameters['handleKillprivV2'] = '1'"),
        (
            {"parameters": {"backend": "memory", "cacheCoherence": "strict", "attrTimeoutSeconds": "5"}},
            "parameters['attrTimeoutSeconds']",
        ),
    ],
)
def test_create_volume_invalid_argument(controller: Controller, fields: dict, word: str) -> None:
    kwargs = {
        "name": fields.get("name", "pvc-bad"),
        "parameters": fields.get("parameters"),
        "caps": fields.get("caps"),
    }
    with pytest.raises(grpc.RpcError) as caught:
        controller.create(**kwargs)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert word in caught.value.details()


def test_create_volume_capacity_out_of_range(controller: Controller) -> None:
    capacity = csi_pb2.CapacityRange(required_bytes=2048, limit_bytes=1024)
    assert code_of(lambda: controller.create(capacity_range=capacity)) == grpc.StatusCode.OUT_OF_RANGE


def test_delete_volume_is_idempotent_and_needs_an_id(controller: Controller) -> None:
    for _ in range(2):
        controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-abc"), timeout=RPC_TIMEOUT_S)
    assert (
        code_of(lambda: controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(), timeout=RPC_TIMEOUT_S))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_validate_volume_capabilities(controller: Controller) -> None:
    def validate(volume_id: str, caps):
        return controller.stub.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=caps),
            timeout=RPC_TIMEOUT_S,
        )

    confirmed = validate("pvc-abc", [capability(Mode.MULTI_NODE_MULTI_WRITER)])
    assert list(confirmed.confirmed.volume_capabilities) == [capability(Mode.MULTI_NODE_MULTI_WRITER)]
    refused = validate("pvc-abc", [capability(block=True)])
    assert not refused.HasField("confirmed") and "block" in refused.message
    assert code_of(lambda: validate("", [capability()])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: validate("pvc-abc", [])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: validate("no such/volume", [capability()])) == grpc.StatusCode.NOT_FOUND
