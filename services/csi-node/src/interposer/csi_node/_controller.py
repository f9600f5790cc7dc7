"""The CSI Controller service: dynamic provisioning without any controller state.

``CreateVolume`` turns a StorageClass's parameters into the new volume's
``volume_context`` (which csi-provisioner stores in the PersistentVolume as
``spec.csi.volumeAttributes`` and kubelet hands back in every NodePublishVolume),
so nothing is stored here: the PV *is* the state. The volume id is the name the
CO chose (csi-provisioner's ``pvc-<uid>``), or a hash of it when the name is not
a valid volume id, so a retried CreateVolume returns the same volume.

Because nothing is stored, a CreateVolume repeating a name with other
parameters cannot be told apart from a retry: it answers with the new
parameters (the spec's ALREADY_EXISTS for that case needs state this service
deliberately does not keep). ``DeleteVolume`` never removes backing data.

StorageClass ``parameters``:

| key | meaning |
| --- | --- |
| ``backend`` | ``hostPath`` (default), ``memory``, ``null`` or ``pvc`` |
| ``backingRoot`` | hostPath: absolute directory on the node; the volume gets ``<backingRoot>/<volume id>``, created at publish |
| ``backingPath`` | hostPath: one absolute directory shared by every volume of the class (instead of ``backingRoot``) |
| ``backingClaim`` | pvc: ``namespace/name`` of the existing PVC the volume stacks over |
| ``profile`` | name of a policy profile, passed through to the worker's context |
| ``policy`` | JSON ``Policy`` applied from the first op (validated here) |
| ``cacheCoherence``, ``*TimeoutSeconds``, ``busyPollMicroseconds``, ``maxBackgroundRequests``, ``kernelPassthrough``, ``flushOnClose``, ``handleKillprivV2``, ``maxFileFds``, ``maxDirFds``, ``workerMemoryLimit`` | worker tuning, checked as at publish |
"""

from __future__ import annotations

import hashlib
import logging
import os

import grpc
from interposer.proto import PolicyError, decode_policy, encode_policy
from interposer.proto.csi import csi_pb2, csi_pb2_grpc
from interposer.proto.subjects import is_valid_volume_id

from ._node import (
    CONTEXT_BACKEND,
    CONTEXT_BACKING_PATH,
    CONTEXT_CREATE_BACKING_PATH,
    CONTEXT_POLICY,
    SUPPORTED_ACCESS_MODES,
    WORKER_TUNING_KEYS,
    CsiError,
    worker_tuning_of,
)

log = logging.getLogger(__name__)

#: StorageClass parameter keys.
PARAM_BACKEND = "backend"
PARAM_BACKING_ROOT = "backingRoot"
PARAM_BACKING_PATH = "backingPath"
PARAM_BACKING_CLAIM = "backingClaim"
PARAM_PROFILE = "profile"
PARAM_POLICY = "policy"
#: Worker tuning parameters have the names of their volume context keys.
KNOWN_PARAMETERS = frozenset(
    {PARAM_BACKEND, PARAM_BACKING_ROOT, PARAM_BACKING_PATH, PARAM_BACKING_CLAIM, PARAM_PROFILE, PARAM_POLICY}
) | WORKER_TUNING_KEYS
#: Prefix of the keys csi-provisioner adds itself (``--extra-create-metadata``);
#: they are passed through into the volume context.
PROVISIONER_PARAMETER_PREFIX = "csi.storage.k8s.io/"

#: StorageClass ``backend`` → the node's ``volume_context["backend"]``.
BACKEND_TO_NODE = {"hostPath": "passthrough", "pvc": "passthrough", "memory": "memory", "null": "null"}
DEFAULT_STORAGECLASS_BACKEND = "hostPath"

#: ``volume_context`` keys only the controller writes (read by the node).
CONTEXT_BACKING_CLAIM = "backingClaim"
CONTEXT_PROFILE = "profile"

#: Capabilities this Controller service advertises.
CONTROLLER_CAPABILITIES = (csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME,)

#: Length of the hex digest used as a volume id for names that are not valid ids.
HASHED_ID_HEX_CHARS = 40


def _invalid(details: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, details)


def volume_id_for(name: str) -> str:
    """The volume id of the volume named ``name``: the name itself if it is a valid id.

    Other names get ``iv-`` + the first 40 hex digits of SHA-256 of the name, so the
    mapping stays deterministic (idempotent CreateVolume) without storing it.
    """
    if is_valid_volume_id(name):
        return name
    return "iv-" + hashlib.sha256(name.encode()).hexdigest()[:HASHED_ID_HEX_CHARS]


def check_capabilities(capabilities, field: str) -> str | None:
    """Return why ``capabilities`` cannot be served, or None if all can.

    Raises:
        CsiError: INVALID_ARGUMENT if the list is empty or an entry lacks its
            access type or access mode.
    """
    if not capabilities:
        raise _invalid(f"{field} is required (at least one)")
    mode_name = csi_pb2.VolumeCapability.AccessMode.Mode.Name
    for index, capability in enumerate(capabilities):
        access_type = capability.WhichOneof("access_type")
        if access_type is None:
            raise _invalid(f"{field}[{index}]: access_type (mount or block) is required")
        if not capability.HasField("access_mode") or not capability.access_mode.mode:
            raise _invalid(f"{field}[{index}].access_mode.mode is required")
        if access_type == "block":
            return f"{field}[{index}]: block volumes are not supported (interposer volumes are file systems)"
        if capability.access_mode.mode not in SUPPORTED_ACCESS_MODES:
            return f"{field}[{index}]: access mode {mode_name(capability.access_mode.mode)} is not supported"
    return None


def volume_context_for(volume_id: str, parameters: dict[str, str]) -> dict[str, str]:
    """Turn StorageClass ``parameters`` into the volume context the node reads.

    Raises:
        CsiError: INVALID_ARGUMENT naming the parameter that is unknown or invalid.
    """
    unknown = sorted(
        key
        for key in parameters
        if key not in KNOWN_PARAMETERS and not key.startswith(PROVISIONER_PARAMETER_PREFIX)
    )
    if unknown:
        raise _invalid(f"parameters {unknown} are unknown (known: {', '.join(sorted(KNOWN_PARAMETERS))})")
    backend = parameters.get(PARAM_BACKEND, DEFAULT_STORAGECLASS_BACKEND)
    if backend not in BACKEND_TO_NODE:
        raise _invalid(f"parameters[{PARAM_BACKEND!r}] = {backend!r} is not one of {sorted(BACKEND_TO_NODE)}")
    context = {CONTEXT_BACKEND: BACKEND_TO_NODE[backend]}
    root = parameters.get(PARAM_BACKING_ROOT, "")
    shared = parameters.get(PARAM_BACKING_PATH, "")
    claim = parameters.get(PARAM_BACKING_CLAIM, "")
    if backend == "hostPath":
        if bool(root) == bool(shared):
            raise _invalid(
                f"backend hostPath needs exactly one of parameters {PARAM_BACKING_ROOT!r}, {PARAM_BACKING_PATH!r}"
            )
        key, path = (PARAM_BACKING_ROOT, root) if root else (PARAM_BACKING_PATH, shared)
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise _invalid(f"parameters[{key!r}] = {path!r} must be an absolute, normalized path")
        if root:
            context[CONTEXT_BACKING_PATH] = os.path.join(root, volume_id)
            context[CONTEXT_CREATE_BACKING_PATH] = "true"
        else:
            context[CONTEXT_BACKING_PATH] = shared
    elif root or shared:
        raise _invalid(
            f"parameters {PARAM_BACKING_ROOT!r}/{PARAM_BACKING_PATH!r} apply to backend hostPath only"
        )
    if backend == "pvc":
        namespace, _, name = claim.partition("/")
        if not namespace or not name:
            raise _invalid(
                f"backend pvc needs parameters[{PARAM_BACKING_CLAIM!r}] = 'namespace/name', got {claim!r}"
            )
        context[CONTEXT_BACKING_CLAIM] = claim
    elif claim:
        raise _invalid(f"parameters[{PARAM_BACKING_CLAIM!r}] applies to backend pvc only")
    if PARAM_PROFILE in parameters:
        context[CONTEXT_PROFILE] = parameters[PARAM_PROFILE]
    if PARAM_POLICY in parameters:
        try:
            context[CONTEXT_POLICY] = encode_policy(decode_policy(parameters[PARAM_POLICY])).decode()
        except PolicyError as exc:
            raise _invalid(f"parameters[{PARAM_POLICY!r}]: {exc}") from None
    worker_tuning_of(parameters, "parameters")  # a bad StorageClass fails here, not at every publish
    for key, value in parameters.items():
        if key.startswith(PROVISIONER_PARAMETER_PREFIX) or key in WORKER_TUNING_KEYS:
            context[key] = value
    return context


class ControllerService(csi_pb2_grpc.ControllerServicer):
    """Controller RPCs: CreateVolume, DeleteVolume, ValidateVolumeCapabilities,
    ControllerGetCapabilities. The others answer UNIMPLEMENTED (gRPC's default).
    """

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        try:
            return self.create_volume(request)
        except CsiError as exc:
            log.warning("CreateVolume %s failed: %s %s", request.name, exc.code.name, exc.details)
            context.abort(exc.code, exc.details)

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        # Nothing is stored and backing data is never removed: deleting is forgetting.
        log.info("DeleteVolume %s: nothing to remove (backing data is kept)", request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        try:
            return self.validate_volume_capabilities(request)
        except CsiError as exc:
            context.abort(exc.code, exc.details)

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=kind))
                for kind in CONTROLLER_CAPABILITIES
            ]
        )

    def create_volume(self, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.CreateVolumeResponse:
        """Answer CreateVolume; see the module docstring.

        Raises:
            CsiError: INVALID_ARGUMENT (missing name or capabilities, unsupported
                capability, content source, unknown or invalid parameter),
                OUT_OF_RANGE (``limit_bytes`` below ``required_bytes``).
        """
        if not request.name:
            raise _invalid("name is required")
        problem = check_capabilities(request.volume_capabilities, "volume_capabilities")
        if problem is not None:
            raise _invalid(problem)
        if request.HasField("volume_content_source"):
            raise _invalid("volume_content_source is not supported (no snapshots or clones)")
        capacity = request.capacity_range
        if capacity.limit_bytes and capacity.required_bytes > capacity.limit_bytes:
            raise CsiError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"capacity_range.required_bytes {capacity.required_bytes} > limit_bytes {capacity.limit_bytes}",
            )
        volume_id = volume_id_for(request.name)
        volume_context = volume_context_for(volume_id, dict(request.parameters))
        log.info("CreateVolume %s → %s backend=%s", request.name, volume_id, volume_context[CONTEXT_BACKEND])
        # capacity_bytes 0: "unknown" in the spec; the volume is as large as its backing.
        return csi_pb2.CreateVolumeResponse(
            volume=csi_pb2.Volume(volume_id=volume_id, capacity_bytes=0, volume_context=volume_context)
        )

    def validate_volume_capabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        """Answer ValidateVolumeCapabilities: confirmed iff every capability is supported.

        Raises:
            CsiError: INVALID_ARGUMENT (missing field), NOT_FOUND (the id is not one
                this driver could have made).
        """
        if not request.volume_id:
            raise _invalid("volume_id is required")
        if not is_valid_volume_id(request.volume_id):
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id!r} does not exist")
        problem = check_capabilities(request.volume_capabilities, "volume_capabilities")
        if problem is not None:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )
