"""The CSI Identity service: who this plugin is and whether it is ready."""

from __future__ import annotations

import importlib.metadata

import grpc
from google.protobuf import wrappers_pb2
from interposer.proto.csi import csi_pb2, csi_pb2_grpc

from ._config import DRIVER_NAME


def plugin_version() -> str:
    """Version of the installed ``interposer-csi-node`` distribution (``0.0.0`` if unknown)."""
    try:
        return importlib.metadata.version("interposer-csi-node")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class IdentityService(csi_pb2_grpc.IdentityServicer):
    """Identity RPCs. It advertises CONTROLLER_SERVICE only where the Controller
    service is registered (``--mode controller``), and is ready as soon as it listens.

    Args:
        driver_name: ``GetPluginInfo.name``.
        vendor_version: ``GetPluginInfo.vendor_version``.
        controller: whether this process serves the Controller service.
    """

    def __init__(
        self, driver_name: str = DRIVER_NAME, vendor_version: str | None = None, *, controller: bool = False
    ) -> None:
        self._driver_name = driver_name
        self._vendor_version = vendor_version or plugin_version()
        self._controller = controller

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._driver_name, vendor_version=self._vendor_version)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        if not self._controller:
            return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[])
        service = csi_pb2.PluginCapability.Service(type=csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE)
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[csi_pb2.PluginCapability(service=service)])

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
