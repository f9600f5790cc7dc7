"""The CSI Node service: publish a volume by starting its fuse-worker on the target.

Every RPC validates its request before touching anything, answers with the
spec's gRPC codes, and is safe to repeat (kubelet retries on any error and after
its own restarts). Calls for different volumes run in parallel; calls for the
same volume are serialized by a per-volume lock.

Secrets (``secrets``) and ``mount_flags`` are never logged or stored.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import msgspec
import msgspec.structs
from interposer.proto import PolicyError, decode_policy, encode_policy
from interposer.proto.csi import csi_pb2, csi_pb2_grpc
from interposer.proto.subjects import VOLUME_ID_PATTERN, is_valid_volume_id
from interposer.proto.worker_tuning import (
    MAX_BACKGROUND_REQUESTS,
    MAX_BUSY_POLL_US,
    MAX_CACHE_TIMEOUT_S,
    MAX_FILE_FDS,
)

from ._config import CsiNodeConfig, memory_bytes
from ._launcher import Launcher, WorkerSpec
from ._mounts import (
    is_fuse_mount,
    mount_type,
    real_path_of_target,
    set_read_ahead,
    stat_answers,
    statvfs_within,
    unmount_lazily,
)
from ._state import StateStore, VolumeState, write_atomically
from ._stats import DEFAULT_STATS_TIMEOUT_S, volume_stats_response
from ._worker_tuning import WorkerTuning

log = logging.getLogger(__name__)

#: ``volume_context`` key: directory the volume passes through to (passthrough backend only).
CONTEXT_BACKING_PATH = "backingPath"
#: ``volume_context`` key: ``[namespace/]name`` of a PersistentVolumeClaim the worker
#: pod mounts as its backing directory (passthrough, Kubernetes launcher only).
CONTEXT_BACKING_CLAIM = "backingClaim"
#: ``volume_context`` key: backend of the worker (``passthrough``, ``memory``, ``null``);
#: default ``passthrough`` when ``backingPath`` is given, else ``memory`` (so generic CSI
#: tooling that knows no volume attributes gets a working volume).
CONTEXT_BACKEND = "backend"
#: ``volume_context`` key: ``"true"`` = create ``backingPath`` first (set by the
#: Controller service for StorageClasses with ``backingRoot``). OPTIONAL.
CONTEXT_CREATE_BACKING_PATH = "createBackingPath"
#: ``volume_context`` key: JSON ``Policy`` applied from the first op on. OPTIONAL.
CONTEXT_POLICY = "policy"
#: ``volume_context`` keys: how long the kernel may cache a name it looked up, a
#: file's attributes, and a lookup that found no such name: decimal seconds, 0 to
#: ``MAX_CACHE_TIMEOUT_S`` (the worker's ``--entry-timeout``, ``--attr-timeout``,
#: ``--negative-timeout``). OPTIONAL: unset = the worker's default, 1 s each.
CONTEXT_ENTRY_TIMEOUT = "entryTimeoutSeconds"
CONTEXT_ATTR_TIMEOUT = "attrTimeoutSeconds"
CONTEXT_NEGATIVE_TIMEOUT = "negativeTimeoutSeconds"
#: ``volume_context`` key: how long the worker keeps polling the FUSE device after a
#: request before it sleeps, whole µs, 0 to ``MAX_BUSY_POLL_US`` (``--busy-poll-us``;
#: 0 spares a busy node's CPU). OPTIONAL: unset = the worker's default, 50.
CONTEXT_BUSY_POLL = "busyPollMicroseconds"
#: ``volume_context`` key: most asynchronous requests (async direct I/O, readahead) the
#: kernel keeps in flight for the volume, whole requests, 0 to ``MAX_BACKGROUND_REQUESTS``
#: (``--max-background``; 0 = the kernel's 12). OPTIONAL: unset = the worker's default, 64.
CONTEXT_MAX_BACKGROUND = "maxBackgroundRequests"
#: ``volume_context`` key: ``"true"`` = the kernel serves reads and writes of files no
#: layer acts on straight from the backing files (``--kernel-passthrough``; the
#: ``passthrough`` backend only; those reads and writes make no op events). OPTIONAL:
#: unset = ``"false"``.
CONTEXT_KERNEL_PASSTHROUGH = "kernelPassthrough"
#: ``volume_context`` key: ``auto`` (``close(2)`` sends FLUSH only where a layer acts
#: on flush or the backing fs has a flush method) or ``always`` (every close does, so
#: traces show a flush per close; ``--always-flush``). OPTIONAL: unset = ``auto``.
CONTEXT_FLUSH_ON_CLOSE = "flushOnClose"
FLUSH_ON_CLOSE_MODES = ("auto", "always")
#: ``volume_context`` key: ``"true"`` = the worker asks for FUSE_HANDLE_KILLPRIV_V2 and
#: clears set-ID bits on writes and truncations itself, so the kernel sends no GETXATTR
#: before every write; ``"false"`` = the kernel clears them before cached writes
#: (``--no-handle-killpriv-v2``, one round trip more per write). OPTIONAL: unset = ``"true"``.
CONTEXT_HANDLE_KILLPRIV_V2 = "handleKillprivV2"
#: ``volume_context`` key: most files (not directories) of the ``passthrough`` backend
#: the worker keeps an open ``O_PATH`` fd of, whole fds, 0 to ``MAX_FILE_FDS``
#: (``--max-file-fds``); past it the longest held are closed and reopened by name when
#: used. OPTIONAL: unset or ``"0"`` = half of the worker's open-file limit.
CONTEXT_MAX_FILE_FDS = "maxFileFds"
#: ``volume_context`` key: the same for directories, 0 to ``MAX_FILE_FDS``
#: (``--max-dir-fds``). OPTIONAL: unset or ``"0"`` = a quarter of the open-file limit.
CONTEXT_MAX_DIR_FDS = "maxDirFds"
#: ``volume_context`` key: ``default`` (the timeouts as given) or ``strict`` (all three
#: 0: a name or file another node changes in a shared backing dir shows at once, and
#: every stat and lookup is a round trip to the worker). OPTIONAL.
CONTEXT_CACHE_COHERENCE = "cacheCoherence"
#: ``volume_context`` key: memory limit of the volume's worker pod, a Kubernetes quantity
#: (at least 64Mi; Kubernetes launcher only): a passthrough worker holds ~44 MiB plus
#: ~260 B per file or directory the kernel knows. OPTIONAL: unset = the csi-node's
#: ``--worker-memory-limit`` (1Gi).
CONTEXT_WORKER_MEMORY_LIMIT = "workerMemoryLimit"
#: Smallest ``workerMemoryLimit``: a worker uses ~44 MiB before its first request.
MIN_WORKER_MEMORY_LIMIT_BYTES = 64 << 20
CACHE_COHERENCE_MODES = ("default", "strict")
#: The three kernel cache timeout keys (checked in this order).
CACHE_TIMEOUT_KEYS = (CONTEXT_ENTRY_TIMEOUT, CONTEXT_ATTR_TIMEOUT, CONTEXT_NEGATIVE_TIMEOUT)
#: Every key :func:`worker_tuning_of` reads (also StorageClass parameters of the Controller).
WORKER_TUNING_KEYS = frozenset({*CACHE_TIMEOUT_KEYS, CONTEXT_BUSY_POLL, CONTEXT_MAX_BACKGROUND,
                                CONTEXT_CACHE_COHERENCE, CONTEXT_KERNEL_PASSTHROUGH, CONTEXT_FLUSH_ON_CLOSE,
                                CONTEXT_HANDLE_KILLPRIV_V2, CONTEXT_MAX_FILE_FDS, CONTEXT_MAX_DIR_FDS,
                                CONTEXT_WORKER_MEMORY_LIMIT})
#: ``volume_context`` keys kubelet adds when the CSIDriver has ``podInfoOnMount: true``.
CONTEXT_POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
CONTEXT_POD_NAME = "csi.storage.k8s.io/pod.name"
CONTEXT_POD_UID = "csi.storage.k8s.io/pod.uid"
CONTEXT_SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
#: ``volume_context`` key kubelet sets to ``"true"`` for a CSI ephemeral inline volume.
CONTEXT_EPHEMERAL = "csi.storage.k8s.io/ephemeral"

SUPPORTED_BACKENDS = frozenset({"passthrough", "memory", "null"})
#: Backend of a publish that names a ``backingPath`` but no ``backend``.
DEFAULT_BACKEND = "passthrough"
#: Backend of a publish that names neither.
DEFAULT_BACKEND_WITHOUT_BACKING_PATH = "memory"

_Mode = csi_pb2.VolumeCapability.AccessMode

#: Access modes a volume can be published with. Every publish gets its own FUSE
#: mount over a shared backing directory, so several writers (on one node or many)
#: work; "single writer" modes are enforced by the kubelet on one node
#: (SINGLE_NODE_SINGLE_WRITER = ReadWriteOncePod) and by the one-target-per-node
#: rule here. MULTI_NODE_SINGLE_WRITER is refused: nothing could enforce a single
#: writer across nodes.
SUPPORTED_ACCESS_MODES = frozenset(
    {
        _Mode.SINGLE_NODE_WRITER,
        _Mode.SINGLE_NODE_READER_ONLY,
        _Mode.MULTI_NODE_READER_ONLY,
        _Mode.MULTI_NODE_MULTI_WRITER,
        _Mode.SINGLE_NODE_SINGLE_WRITER,
        _Mode.SINGLE_NODE_MULTI_WRITER,
    }
)

#: What NodeGetCapabilities advertises. SINGLE_NODE_MULTI_WRITER is the
#: capability that lets a CO use the SINGLE_NODE_{SINGLE,MULTI}_WRITER modes.
NODE_CAPABILITIES = (
    csi_pb2.NodeServiceCapability.RPC.GET_VOLUME_STATS,
    csi_pb2.NodeServiceCapability.RPC.VOLUME_CONDITION,
    csi_pb2.NodeServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER,
)

#: Access modes that imply a read-only publish even when ``readonly`` is false.
READ_ONLY_ACCESS_MODES = frozenset(
    {
        csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY,
        csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY,
    }
)

#: Poll interval while waiting for a new mount to answer, seconds.
MOUNT_POLL_INTERVAL_S = 0.05
#: Longest single ``stat`` of a fresh mount before polling again, seconds.
MOUNT_STAT_TIMEOUT_S = 2.0
#: How much of a failed worker's log goes into the error details, bytes.
LOG_TAIL_BYTES = 2048


class CsiError(Exception):
    """A CSI call failed with a gRPC status code; ``str()`` is the status details.

    Args:
        code: the gRPC status code the spec prescribes for the failure.
        details: human-readable reason, safe to show (no secrets).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _invalid(details: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, details)


class _PublishPlan:
    """A validated NodePublishVolume request: everything needed to start the worker."""

    def __init__(
        self,
        *,
        volume_id: str,
        target_path: str,
        real_target_path: str,
        backing_dir: str,
        backing_claim: str,
        backend: str,
        readonly: bool,
        access_mode: int,
        policy_json: bytes | None,
        pod_namespace: str,
        pod_name: str,
        pod_uid: str,
        service_account: str,
        ephemeral: bool,
        tuning: WorkerTuning,
    ) -> None:
        self.volume_id = volume_id
        self.target_path = target_path
        self.real_target_path = real_target_path
        self.backing_dir = backing_dir
        self.backing_claim = backing_claim
        self.backend = backend
        self.readonly = readonly
        self.access_mode = access_mode
        self.policy_json = policy_json
        self.pod_namespace = pod_namespace
        self.pod_name = pod_name
        self.pod_uid = pod_uid
        self.service_account = service_account
        self.ephemeral = ephemeral
        self.tuning = tuning


class NodeService(csi_pb2_grpc.NodeServicer):
    """Node RPCs: NodeGetInfo, NodeGetCapabilities, NodePublishVolume,
    NodeUnpublishVolume, NodeGetVolumeStats.

    Stage/unstage and expand answer UNIMPLEMENTED and are not advertised.

    Args:
        config: the service configuration.
        launcher: starts and stops fuse-workers.
        store: persisted per-volume state.
    """

    def __init__(self, config: CsiNodeConfig, launcher: Launcher, store: StateStore) -> None:
        self._config = config
        self._launcher = launcher
        self._store = store
        # volume id → lock serializing calls for that volume. Entries are never
        # removed: one small lock per volume ever seen by this process.
        self._volume_locks: dict[str, threading.Lock] = {}
        self._volume_locks_guard = threading.Lock()

    # ------------------------------------------------------------------ RPCs

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._config.node_id, max_volumes_per_node=self._config.max_volumes_per_node
        )

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=kind))
                for kind in NODE_CAPABILITIES
            ]
        )

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        try:
            self.publish(request)
        except CsiError as exc:
            log.warning("NodePublishVolume %s failed: %s %s", request.volume_id, exc.code.name, exc.details)
            context.abort(exc.code, exc.details)
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        try:
            self.unpublish(request.volume_id, request.target_path)
        except CsiError as exc:
            log.warning("NodeUnpublishVolume %s failed: %s %s", request.volume_id, exc.code.name, exc.details)
            context.abort(exc.code, exc.details)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeStageVolume(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "NodeStageVolume: STAGE_UNSTAGE_VOLUME is not supported")

    def NodeUnstageVolume(self, request, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "NodeUnstageVolume: STAGE_UNSTAGE_VOLUME is not supported"
        )

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        try:
            return self.volume_stats(request.volume_id, request.volume_path)
        except CsiError as exc:
            log.warning("NodeGetVolumeStats %s failed: %s %s", request.volume_id, exc.code.name, exc.details)
            context.abort(exc.code, exc.details)

    def NodeExpandVolume(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "NodeExpandVolume: EXPAND_VOLUME is not supported")

    # ------------------------------------------------------------------ publish

    def publish(self, request: csi_pb2.NodePublishVolumeRequest) -> None:
        """Publish ``request.volume_id`` at ``request.target_path``; see the module docstring.

        Raises:
            CsiError: INVALID_ARGUMENT (missing or bad field or volume_context key),
                ALREADY_EXISTS (the target holds another volume or another mount, or
                this volume is already published there with a different capability,
                readonly flag, backing path or worker tuning), FAILED_PRECONDITION
                (the volume is published at another target on this node),
                DEADLINE_EXCEEDED (the mount did not answer in ``mount_timeout_s``),
                INTERNAL (the worker could not start or died; details carry its log tail).
        """
        plan = self._validate_publish(request)
        log.info(
            "NodePublishVolume volume=%s target=%s readonly=%s access_mode=%s context_keys=%s",
            plan.volume_id,
            plan.target_path,
            plan.readonly,
            csi_pb2.VolumeCapability.AccessMode.Mode.Name(plan.access_mode),
            sorted(request.volume_context),
        )
        with self.volume_lock(plan.volume_id):
            existing = self._load_state(plan.volume_id)
            if existing is not None:
                if self._reuse_existing(existing, plan):
                    return
            self._refuse_occupied_target(plan)
            self._start_worker(plan)

    def _validate_publish(self, request: csi_pb2.NodePublishVolumeRequest) -> _PublishPlan:
        volume_id = request.volume_id
        if not volume_id:
            raise _invalid("volume_id is required")
        if not is_valid_volume_id(volume_id):
            raise _invalid(f"volume_id {volume_id!r} must match {VOLUME_ID_PATTERN.pattern}")
        if not request.target_path:
            raise _invalid("target_path is required")
        if not os.path.isabs(request.target_path):
            raise _invalid(f"target_path {request.target_path!r} must be absolute")
        target_path = os.path.normpath(request.target_path)
        if not request.HasField("volume_capability"):
            raise _invalid("volume_capability is required")
        capability = request.volume_capability
        access_type = capability.WhichOneof("access_type")
        if access_type == "block":
            raise _invalid(
                "volume_capability.block is not supported: interposer volumes are file systems (use mount)"
            )
        if access_type != "mount":
            raise _invalid("volume_capability.mount is required (access_type is unset)")
        access_mode = capability.access_mode.mode
        if access_mode == csi_pb2.VolumeCapability.AccessMode.UNKNOWN:
            raise _invalid("volume_capability.access_mode.mode is required")
        if access_mode not in SUPPORTED_ACCESS_MODES:
            # The spec's code for "Exceeds capabilities" in NodePublishVolume.
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume_capability.access_mode.mode {_Mode.Mode.Name(access_mode)} is not supported "
                f"(supported: {', '.join(sorted(_Mode.Mode.Name(m) for m in SUPPORTED_ACCESS_MODES))})",
            )

        # The target itself may not exist yet; resolve only its parent.
        real_target_path = real_path_of_target(target_path)
        context = request.volume_context
        tuning = worker_tuning_of(context, "volume_context")
        backing_path = context.get(CONTEXT_BACKING_PATH, "")
        backing_claim = context.get(CONTEXT_BACKING_CLAIM, "")
        has_backing = bool(backing_path or backing_claim)
        default_backend = DEFAULT_BACKEND if has_backing else DEFAULT_BACKEND_WITHOUT_BACKING_PATH
        backend = context.get(CONTEXT_BACKEND, default_backend)
        if backend not in SUPPORTED_BACKENDS:
            raise _invalid(
                f"volume_context[{CONTEXT_BACKEND!r}] = {backend!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_BACKENDS))})"
            )
        if has_backing and backend != "passthrough":
            raise _invalid(
                f"volume_context[{CONTEXT_BACKING_PATH!r}] is only for the passthrough backend "
                f"(volume_context[{CONTEXT_BACKEND!r}] = {backend!r})"
            )
        if tuning.kernel_passthrough and backend != "passthrough":
            raise _invalid(
                f"volume_context[{CONTEXT_KERNEL_PASSTHROUGH!r}] = 'true' needs the passthrough backend, not "
                f"{backend!r}: there is no backing file to pass through to"
            )
        ephemeral = context.get(CONTEXT_EPHEMERAL, "false").lower() == "true"
        if tuning.kernel_passthrough and ephemeral:
            # An inline volume's attributes are the pod author's; this one gives the
            # worker CAP_SYS_ADMIN, which is the cluster admin's to grant (StorageClass).
            raise _invalid(
                f"volume_context[{CONTEXT_KERNEL_PASSTHROUGH!r}] is not allowed on an ephemeral inline volume: "
                "it runs the volume's worker with CAP_SYS_ADMIN, so only a StorageClass may set it"
            )
        if tuning.memory_limit is not None and getattr(self._launcher, "claim_namespace", None) is None:
            raise _invalid(
                f"volume_context[{CONTEXT_WORKER_MEMORY_LIMIT!r}] needs the Kubernetes launcher "
                "(--launcher kubernetes): a local worker is no pod with a memory limit"
            )
        if tuning.memory_limit is not None and ephemeral:
            # The worker pod runs in the driver's namespace, outside the pod author's quota.
            raise _invalid(
                f"volume_context[{CONTEXT_WORKER_MEMORY_LIMIT!r}] is not allowed on an ephemeral inline volume: "
                "the worker pod's memory counts against the driver's namespace, so only a StorageClass may set it"
            )
        policy_json = None
        if CONTEXT_POLICY in context:
            try:
                policy_json = encode_policy(decode_policy(context[CONTEXT_POLICY]))
            except PolicyError as exc:
                raise _invalid(f"volume_context[{CONTEXT_POLICY!r}]: {exc}") from None
        # The backing directory last: it may be created here, and a refused publish creates nothing.
        backing_dir = ""
        if backend == "passthrough" and backing_claim:
            backing_claim = self._validate_backing_claim(backing_claim, backing_path)
        elif backend == "passthrough":
            create = context.get(CONTEXT_CREATE_BACKING_PATH, "false").lower() == "true"
            backing_dir = self._validate_backing_dir(backing_path, real_target_path, create=create)
        return _PublishPlan(
            volume_id=volume_id,
            target_path=target_path,
            real_target_path=real_target_path,
            backing_dir=backing_dir,
            backing_claim=backing_claim,
            backend=backend,
            readonly=request.readonly or access_mode in READ_ONLY_ACCESS_MODES,
            access_mode=access_mode,
            policy_json=policy_json,
            pod_namespace=context.get(CONTEXT_POD_NAMESPACE, ""),
            pod_name=context.get(CONTEXT_POD_NAME, ""),
            pod_uid=context.get(CONTEXT_POD_UID, ""),
            service_account=context.get(CONTEXT_SERVICE_ACCOUNT, ""),
            ephemeral=ephemeral,
            tuning=tuning,
        )

    @staticmethod
    def _validate_backing_dir(backing_path: str, real_target_path: str, *, create: bool) -> str:
        """Return the resolved ``backingPath``; create it first when ``create`` (StorageClass ``backingRoot``).

        Raises:
            CsiError: INVALID_ARGUMENT if the path is missing, relative, overlaps the
                target or is not a directory (checked before creating anything);
                INTERNAL if it cannot be created.
        """
        key = f"volume_context[{CONTEXT_BACKING_PATH!r}]"
        if not backing_path:
            raise _invalid(f"{key} is required: the directory the volume passes through to")
        if not os.path.isabs(backing_path):
            raise _invalid(f"{key} = {backing_path!r} must be absolute")
        backing_dir = os.path.realpath(backing_path)
        if _is_within(backing_dir, real_target_path):
            raise _invalid(f"{key} = {backing_path!r} is inside target_path: the mount would hide it")
        if _is_within(real_target_path, backing_dir):
            raise _invalid(f"target_path is inside {key} = {backing_path!r}: the volume would contain itself")
        if create:
            try:
                os.makedirs(backing_dir, mode=0o750, exist_ok=True)
            except OSError as exc:
                details = f"cannot create {key} {backing_path}: {exc}"
                raise CsiError(grpc.StatusCode.INTERNAL, details) from None
        if not os.path.isdir(backing_dir):
            raise _invalid(f"{key} = {backing_path!r} is not an existing directory")
        return backing_dir

    def _validate_backing_claim(self, backing_claim: str, backing_path: str) -> str:
        """Return the claim name of ``backingClaim`` (``[namespace/]name``) if worker pods can mount it.

        Raises:
            CsiError: INVALID_ARGUMENT if ``backingPath`` is given too, the launcher
                runs no pods, or the claim is in another namespace than the worker
                pods (a pod mounts only claims of its own namespace).
        """
        key = f"volume_context[{CONTEXT_BACKING_CLAIM!r}]"
        if backing_path:
            raise _invalid(f"{key} and volume_context[{CONTEXT_BACKING_PATH!r}] exclude each other")
        namespace = getattr(self._launcher, "claim_namespace", None)
        if namespace is None:
            raise _invalid(f"{key} needs the Kubernetes launcher (--launcher kubernetes)")
        claim_namespace, _, name = backing_claim.rpartition("/")
        if not name or (claim_namespace and claim_namespace != namespace):
            raise _invalid(
                f"{key} = {backing_claim!r}: worker pods run in namespace {namespace!r} and a pod can "
                "only mount claims of its own namespace"
            )
        return name

    def _reuse_existing(self, existing: VolumeState, plan: _PublishPlan) -> bool:
        """Decide what to do with a volume that has state already.

        Returns:
            True if it is published as asked and healthy (nothing to do); False if
            its worker is gone and was cleaned up, so a new one must start.

        Raises:
            CsiError: FAILED_PRECONDITION or ALREADY_EXISTS as in :meth:`publish`.
        """
        if existing.target_path != plan.target_path:
            raise CsiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {plan.volume_id} is already published at {existing.target_path}; "
                "interposer publishes a volume at one target per node",
            )
        conflicts = []
        if existing.readonly != plan.readonly:
            conflicts.append(f"readonly {existing.readonly} -> {plan.readonly}")
        if existing.access_mode != plan.access_mode:
            mode_name = csi_pb2.VolumeCapability.AccessMode.Mode.Name
            conflicts.append(
                f"access_mode {mode_name(existing.access_mode)} -> {mode_name(plan.access_mode)}"
            )
        if existing.backend != plan.backend:
            conflicts.append(f"backend {existing.backend} -> {plan.backend}")
        if existing.backing_dir != plan.backing_dir:
            conflicts.append(f"backing dir {existing.backing_dir} -> {plan.backing_dir}")
        if existing.backing_claim != plan.backing_claim:
            conflicts.append(f"backing claim {existing.backing_claim} -> {plan.backing_claim}")
        if existing.tuning != plan.tuning:
            conflicts.append(f"worker tuning {_describe(existing.tuning)} -> {_describe(plan.tuning)}")
        if conflicts:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {plan.volume_id} is already published at {plan.target_path} with different "
                f"settings: {'; '.join(conflicts)}",
            )
        if self._launcher.is_running(existing.worker_pid, existing.volume_id) and self._mount_answers(
            plan.real_target_path, MOUNT_STAT_TIMEOUT_S
        ):
            log.info("volume %s already published at %s: nothing to do", plan.volume_id, plan.target_path)
            return True
        log.warning(
            "volume %s: worker pid %d or its mount at %s is gone; starting a new one",
            plan.volume_id,
            existing.worker_pid,
            plan.target_path,
        )
        self._teardown(existing, plan.real_target_path)
        self._store.delete(plan.volume_id)
        return False

    def _refuse_occupied_target(self, plan: _PublishPlan) -> None:
        other = self._store.find_by_target(plan.target_path)
        if other is not None and other.volume_id != plan.volume_id:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"target_path {plan.target_path} already holds volume {other.volume_id}",
            )
        fstype = mount_type(plan.real_target_path)
        if fstype is not None:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"target_path {plan.target_path} is already a mount point ({fstype}) not made by this driver",
            )

    def _start_worker(self, plan: _PublishPlan) -> None:
        try:
            os.makedirs(plan.target_path, mode=0o750, exist_ok=True)
        except FileExistsError:
            raise _invalid(f"target_path {plan.target_path} exists and is not a directory") from None
        except OSError as exc:
            raise CsiError(
                grpc.StatusCode.INTERNAL, f"cannot create target_path {plan.target_path}: {exc}"
            ) from None

        policy_file = ""
        if plan.policy_json is not None:
            policy_path = self._store.policy_path(plan.volume_id)
            write_atomically(policy_path, plan.policy_json)
            policy_file = str(policy_path)
        spec = WorkerSpec.of_volume(plan, nats_url=self._config.nats_url, nats_creds=self._config.nats_creds,
                                    policy_file=policy_file, node_name=self._config.node_id)
        log_path = self._store.log_path(plan.volume_id)
        try:
            pid = self._launcher.start(spec, log_path)
        except OSError as exc:
            self._store.delete(plan.volume_id)
            raise CsiError(grpc.StatusCode.INTERNAL, f"cannot start fuse-worker: {exc}") from None
        state = VolumeState(
            volume_id=plan.volume_id,
            target_path=plan.target_path,
            backing_dir=plan.backing_dir,
            backing_claim=plan.backing_claim,
            backend=plan.backend,
            readonly=plan.readonly,
            access_mode=plan.access_mode,
            worker_pid=pid,
            worker_argv=self._launcher.argv(spec),
            log_path=str(log_path),
            policy_file=policy_file,
            pod_namespace=plan.pod_namespace,
            pod_name=plan.pod_name,
            pod_uid=plan.pod_uid,
            service_account=plan.service_account,
            ephemeral=plan.ephemeral,
            tuning=plan.tuning,
        )
        # Saved before waiting, so a csi-node that dies meanwhile still finds the worker.
        self._store.save(state)
        try:
            self._wait_until_mounted(pid, plan, log_path)
        except CsiError:
            self._teardown(state, plan.real_target_path)
            self._store.delete(plan.volume_id)
            raise
        self._store.save(msgspec.structs.replace(state, published_at_s=time.time()))
        log.info("volume %s published at %s (worker pid %d)", plan.volume_id, plan.target_path, pid)

    def _wait_until_mounted(self, pid: int, plan: _PublishPlan, log_path: Path) -> None:
        timeout_s = self._config.mount_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._launcher.is_running(pid, plan.volume_id):
                status = self._launcher.exit_code(pid)
                raise CsiError(
                    grpc.StatusCode.INTERNAL,
                    f"fuse-worker for volume {plan.volume_id} exited (status {status}) before its mount "
                    f"answered; log tail:\n{_log_tail(log_path)}",
                )
            remaining_s = deadline - time.monotonic()
            if self._mount_answers(plan.real_target_path, max(0.1, min(remaining_s, MOUNT_STAT_TIMEOUT_S))):
                set_read_ahead(plan.real_target_path)  # FUSE_INIT is answered: the value sticks
                return
            if time.monotonic() >= deadline:
                raise CsiError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"mount of volume {plan.volume_id} at {plan.target_path} did not answer within "
                    f"{timeout_s:.1f} s; log tail:\n{_log_tail(log_path)}",
                )
            time.sleep(MOUNT_POLL_INTERVAL_S)

    @staticmethod
    def _mount_answers(real_target_path: str, timeout_s: float) -> bool:
        return is_fuse_mount(real_target_path) and stat_answers(real_target_path, timeout_s)

    # ------------------------------------------------------------------ stats

    def volume_stats(self, volume_id: str, volume_path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Usage and condition of ``volume_id`` published at ``volume_path`` (see ``_stats``).

        Raises:
            CsiError: INVALID_ARGUMENT (missing or relative field), NOT_FOUND (the
                volume is not published at ``volume_path`` on this node).
        """
        if not volume_id:
            raise _invalid("volume_id is required")
        if not volume_path:
            raise _invalid("volume_path is required")
        if not os.path.isabs(volume_path):
            raise _invalid(f"volume_path {volume_path!r} must be absolute")
        volume_path = os.path.normpath(volume_path)
        state = self._load_state(volume_id) if is_valid_volume_id(volume_id) else None
        if state is None or state.target_path != volume_path:
            raise CsiError(
                grpc.StatusCode.NOT_FOUND,
                f"volume {volume_id} is not published at {volume_path} on this node",
            )
        running = self._launcher.is_running(state.worker_pid, volume_id)
        real_path = real_path_of_target(volume_path)
        stats = None
        if running and is_fuse_mount(real_path):
            stats = statvfs_within(real_path, DEFAULT_STATS_TIMEOUT_S)
        return volume_stats_response(
            worker_running=running, worker_pid=state.worker_pid, stats=stats, target_path=volume_path
        )

    # ------------------------------------------------------------------ unpublish

    def unpublish(self, volume_id: str, target_path: str) -> None:
        """Unpublish ``volume_id`` from ``target_path``: stop its worker, unmount, remove the target.

        Unpublishing something that is not published is OK (the spec's idempotency).

        Args:
            volume_id: the CSI volume id.
            target_path: absolute path it was published at.

        Raises:
            CsiError: INVALID_ARGUMENT (missing or relative field), INTERNAL (the
                mount could not be removed).
        """
        if not volume_id:
            raise _invalid("volume_id is required")
        if not target_path:
            raise _invalid("target_path is required")
        if not os.path.isabs(target_path):
            raise _invalid(f"target_path {target_path!r} must be absolute")
        target_path = os.path.normpath(target_path)
        real_target_path = real_path_of_target(target_path)
        log.info("NodeUnpublishVolume volume=%s target=%s", volume_id, target_path)
        with self.volume_lock(volume_id):
            state = self._load_state(volume_id) if is_valid_volume_id(volume_id) else None
            if state is None or state.target_path != target_path:
                # Not published here by us: only clear a FUSE leftover and the empty directory.
                if is_fuse_mount(real_target_path) and not unmount_lazily(real_target_path):
                    raise CsiError(grpc.StatusCode.INTERNAL, f"cannot unmount {target_path}")
                _remove_target_dir(target_path)
                return
            self._teardown(state, real_target_path)
            _remove_target_dir(target_path)
            self._store.delete(volume_id)
        log.info("volume %s unpublished from %s", volume_id, target_path)

    def _teardown(self, state: VolumeState, real_target_path: str) -> None:
        """Stop the worker of ``state`` and make sure nothing stays mounted at its target.

        Raises:
            CsiError: INTERNAL if a mount remains after a lazy unmount.
        """
        stopped = self._launcher.stop(state.worker_pid, state.volume_id, self._config.unmount_timeout_s)
        if not stopped:
            log.error("fuse-worker pid %d of volume %s survived SIGKILL", state.worker_pid, state.volume_id)
        if is_fuse_mount(real_target_path):
            # Expected when the csi-node mounted it (fd handoff): the worker cannot unmount.
            log.info(
                "volume %s: %s still mounted after the worker stopped; unmounting lazily",
                state.volume_id,
                state.target_path,
            )
            if not unmount_lazily(real_target_path):
                raise CsiError(grpc.StatusCode.INTERNAL, f"cannot unmount {state.target_path}")

    def _load_state(self, volume_id: str) -> VolumeState | None:
        """Load the persisted state of ``volume_id``.

        Raises:
            CsiError: INTERNAL if the state file is unreadable or corrupt.
        """
        try:
            return self._store.load(volume_id)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CsiError(
                grpc.StatusCode.INTERNAL,
                f"state of volume {volume_id} is unreadable ({exc}); remove "
                f"{self._store.state_path(volume_id)} after checking the mount by hand",
            ) from None

    @contextmanager
    def volume_lock(self, volume_id: str) -> Iterator[None]:
        """Hold the lock that serializes every call (and recovery) for ``volume_id``."""
        with self._volume_locks_guard:
            lock = self._volume_locks.setdefault(volume_id, threading.Lock())
        with lock:
            yield


def worker_tuning_of(settings: Mapping[str, str], field: str) -> WorkerTuning:
    """The worker tuning that the keys :data:`WORKER_TUNING_KEYS` of ``settings`` ask for.

    Args:
        settings: a ``volume_context``, or a StorageClass's ``parameters`` (same
            keys); other keys are ignored.
        field: what error details call ``settings`` (``volume_context``, ``parameters``).

    Returns:
        The tuning; a setting no key names stays None (the worker's default).

    Raises:
        CsiError: INVALID_ARGUMENT naming the key, the reason and what is allowed: a
            timeout that is not a finite decimal number from 0 to
            ``MAX_CACHE_TIMEOUT_S`` seconds, a busy poll that is not an integer from
            0 to ``MAX_BUSY_POLL_US`` µs, a ``maxBackgroundRequests`` that is not an
            integer from 0 to ``MAX_BACKGROUND_REQUESTS``, a ``maxFileFds`` or ``maxDirFds``
            that is not an integer from 0 to ``MAX_FILE_FDS``, a ``cacheCoherence`` other than
            ``default``/``strict``, ``strict`` beside a non-zero timeout, or a
            ``kernelPassthrough`` or ``handleKillprivV2`` other than ``true``/``false``,
            or a ``flushOnClose`` other than ``auto``/``always``, or a ``workerMemoryLimit``
            that is not a Kubernetes quantity of at least 64Mi.
    """
    timeouts_s = {
        key: _setting_in_range(settings, key, field, float, "decimal seconds", MAX_CACHE_TIMEOUT_S)
        for key in CACHE_TIMEOUT_KEYS
        if key in settings
    }
    coherence = _setting_of(settings, CONTEXT_CACHE_COHERENCE, field, CACHE_COHERENCE_MODES) or "default"
    coherence_key = f"{field}[{CONTEXT_CACHE_COHERENCE!r}]"
    if coherence == "strict":
        for key, timeout_s in timeouts_s.items():
            if timeout_s:
                raise _invalid(
                    f"{coherence_key} = 'strict' sets every cache timeout to 0, but {field}[{key!r}] = "
                    f"{settings[key]!r}: set only one of them"
                )
        timeouts_s = dict.fromkeys(CACHE_TIMEOUT_KEYS, 0.0)
    busy_poll_us = None
    if CONTEXT_BUSY_POLL in settings:
        busy_poll_us = _setting_in_range(
            settings, CONTEXT_BUSY_POLL, field, int, "whole microseconds", MAX_BUSY_POLL_US
        )
    max_background = None
    if CONTEXT_MAX_BACKGROUND in settings:
        max_background = _setting_in_range(
            settings, CONTEXT_MAX_BACKGROUND, field, int, "whole requests", MAX_BACKGROUND_REQUESTS
        )
    max_fds = {
        key: _setting_in_range(settings, key, field, int, "whole fds", MAX_FILE_FDS)
        for key in (CONTEXT_MAX_FILE_FDS, CONTEXT_MAX_DIR_FDS)
        if key in settings
    }
    passthrough = _setting_of(settings, CONTEXT_KERNEL_PASSTHROUGH, field, ("true", "false"))
    flush_on_close = _setting_of(settings, CONTEXT_FLUSH_ON_CLOSE, field, FLUSH_ON_CLOSE_MODES)
    killpriv_v2 = _setting_of(settings, CONTEXT_HANDLE_KILLPRIV_V2, field, ("true", "false"))
    memory_limit = settings.get(CONTEXT_WORKER_MEMORY_LIMIT)
    if memory_limit is not None:
        key = f"{field}[{CONTEXT_WORKER_MEMORY_LIMIT!r}]"
        try:
            limit_bytes = memory_bytes(key, memory_limit)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        if limit_bytes < MIN_WORKER_MEMORY_LIMIT_BYTES:
            raise _invalid(f"{key} = {memory_limit!r} is below 64Mi: a worker uses ~44 MiB before its first request")
    return WorkerTuning(
        entry_timeout_s=timeouts_s.get(CONTEXT_ENTRY_TIMEOUT),
        attr_timeout_s=timeouts_s.get(CONTEXT_ATTR_TIMEOUT),
        negative_timeout_s=timeouts_s.get(CONTEXT_NEGATIVE_TIMEOUT),
        busy_poll_us=busy_poll_us,
        max_background=max_background,
        kernel_passthrough=None if passthrough is None else passthrough == "true",
        always_flush=None if flush_on_close is None else flush_on_close == "always",
        handle_killpriv_v2=None if killpriv_v2 is None else killpriv_v2 == "true",
        max_file_fds=max_fds.get(CONTEXT_MAX_FILE_FDS),
        max_dir_fds=max_fds.get(CONTEXT_MAX_DIR_FDS),
        memory_limit=memory_limit,
    )


def _setting_of(settings: Mapping[str, str], key: str, field: str, allowed: Sequence[str]) -> str | None:
    """``settings[key]``, one of ``allowed``; None if unset.

    Raises:
        CsiError: INVALID_ARGUMENT naming ``field[key]``, the value and what is allowed.
    """
    if key not in settings:
        return None
    text = settings[key]
    if text not in allowed:
        raise _invalid(f"{field}[{key!r}] = {text!r} is not one of: {', '.join(allowed)}")
    return text


def _setting_in_range(
    settings: Mapping[str, str],
    key: str,
    field: str,
    parse: Callable[[str], float],
    unit: str,
    maximum: float,
) -> float:
    """``parse(settings[key])`` if it is a finite number from 0 to ``maximum``.

    Raises:
        CsiError: INVALID_ARGUMENT naming ``field[key]``, why, and the allowed range in ``unit``.
    """
    text = settings[key]
    bound = f"{maximum:g}" if isinstance(maximum, float) else str(maximum)  # 3600, not 3600.0; 2147483584, not 2.1e+09
    try:
        value = parse(text)
    except ValueError:
        reason = "is not an integer" if parse is int else "is not a number"
    else:
        if not math.isfinite(value):
            reason = "is not finite"
        elif value < 0:
            reason = "is negative"
        elif value > maximum:
            reason = f"is above {bound}"
        else:
            return value
    raise _invalid(f"{field}[{key!r}] = {text!r} {reason} (allowed: {unit} from 0 to {bound})")


def _describe(tuning: WorkerTuning) -> str:
    """``tuning`` as the worker flags it sets, for error details."""
    return " ".join(tuning.arguments()) or "(worker defaults)"


def _is_within(path: str, directory: str) -> bool:
    """Return True if ``path`` is ``directory`` or below it (both absolute, normalized)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _remove_target_dir(target_path: str) -> None:
    """Remove the (empty) target directory, as the spec asks of the plugin; leave it if busy."""
    try:
        os.rmdir(target_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOTDIR):
            log.warning("leaving %s in place: %s", target_path, exc.strerror)
        else:
            raise CsiError(
                grpc.StatusCode.INTERNAL, f"cannot remove target_path {target_path}: {exc}"
            ) from None


def _log_tail(log_path: Path, limit_bytes: int = LOG_TAIL_BYTES) -> str:
    """Return the last ``limit_bytes`` of a worker log as text ('' if unreadable)."""
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - limit_bytes))
            return log_file.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
