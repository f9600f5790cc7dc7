"""Calling the csi-node over its unix socket as kubelet does (used by the demo and tests)."""

from __future__ import annotations

import grpc

from interposer.proto.csi import csi_pb2, csi_pb2_grpc

#: podInfoOnMount keys kubelet adds to volume_context (Kubernetes CSI docs).
POD_NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
POD_NAME_KEY = "csi.storage.k8s.io/pod.name"
#: How long a publish may take (worker start + mount), seconds.
DEFAULT_PUBLISH_TIMEOUT_S = 60.0


class NodeClient:
    """A CSI Node client on ``endpoint`` (``unix:///path/csi.sock``)."""

    def __init__(self, endpoint: str) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self.node = csi_pb2_grpc.NodeStub(self._channel)
        self.identity = csi_pb2_grpc.IdentityStub(self._channel)

    def publish(self, volume_id: str, target_path: str, volume_context: dict[str, str],
                readonly: bool = False, timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S) -> None:
        """NodePublishVolume of a mount volume, single-node writer.

        Raises:
            grpc.RpcError: the driver refused (its status code and details say why).
        """
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
        )
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target_path, volume_capability=capability,
            readonly=readonly, volume_context=volume_context,
        ), timeout=timeout_s)

    def unpublish(self, volume_id: str, target_path: str, timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S) -> None:
        """NodeUnpublishVolume.

        Raises:
            grpc.RpcError: the driver refused.
        """
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path), timeout=timeout_s)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
