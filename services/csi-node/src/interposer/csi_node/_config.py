"""Configuration of the csi-node service: one frozen Struct, built by ``__main__``."""

from __future__ import annotations

import socket
import sys
from typing import Annotated, Literal

import msgspec

#: The CSI driver name: ``GetPluginInfo.name``, the ``CSIDriver`` object's name and
#: the ``driver`` of every PersistentVolume / inline volume that uses interposer.
DRIVER_NAME = "fs.interposer.io"

#: Where kubelet's node-driver-registrar looks for plugin sockets by convention.
DEFAULT_ENDPOINT = f"unix:///var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock"
#: Longest unix socket path grpcio binds, bytes. ``sun_path`` holds 107 bytes plus
#: its NUL (unix(7)), but grpcio 1.85 refuses paths of 106 bytes and more (measured:
#: 105 binds, 106 fails with "Path name should not have more than 107 characters").
MAX_GRPC_UNIX_SOCKET_PATH_BYTES = 105
#: Per-volume state, policy files and worker logs.
DEFAULT_STATE_DIR = "/var/lib/interposer/csi-node"
#: How long NodePublishVolume waits for a new worker's mount to answer, seconds.
DEFAULT_MOUNT_TIMEOUT_S = 20.0
#: How long NodeUnpublishVolume waits for a worker to exit after SIGTERM, seconds.
DEFAULT_UNMOUNT_TIMEOUT_S = 10.0
#: gRPC handler threads; each in-flight CSI call holds one.
DEFAULT_GRPC_WORKERS = 8
#: How often the recovery watcher checks the published volumes' workers, seconds.
DEFAULT_WATCH_INTERVAL_S = 0.5

#: ``--mode``: which CSI services this process serves besides Identity.
MODE_NODE = "node"
MODE_CONTROLLER = "controller"
MODES = (MODE_NODE, MODE_CONTROLLER)

#: ``--launcher``: where fuse-workers run.
LAUNCHER_LOCAL = "local"
LAUNCHER_KUBERNETES = "kubernetes"
LAUNCHERS = (LAUNCHER_LOCAL, LAUNCHER_KUBERNETES)
#: The csi-node's (init) container whose image is the fuse-worker image (Kubernetes launcher).
DEFAULT_WORKER_IMAGE_CONTAINER = "fuse-worker-image"
#: How long a new worker pod may take to start and ask for its FUSE fd, seconds.
DEFAULT_POD_START_TIMEOUT_S = 60.0
#: Memory request and limit of a worker pod. The limit holds a passthrough worker that
#: knows ~3.8 million names: ~260 B each plus ~44 MiB at start (bench/datapath/inode_memory.py:
#: 290 MiB after a walk of 1,000,000 files; docs/benchmarks.md, "Worker memory per name").
DEFAULT_WORKER_MEMORY_REQUEST = "64Mi"
DEFAULT_WORKER_MEMORY_LIMIT = "1Gi"


def default_worker_command() -> tuple[str, ...]:
    """The fuse-worker started by this interpreter: ``python -m interposer.fuse_worker``."""
    return (sys.executable, "-m", "interposer.fuse_worker")


class CsiNodeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the csi-node needs to serve one node.

    Attributes:
        endpoint: gRPC listen address, ``unix:///absolute/path.sock`` (only unix
            sockets: the CSI transport between kubelet and a node plugin).
        node_id: ``NodeGetInfo.node_id``; the Kubernetes node name in a cluster.
        state_dir: directory for per-volume state (JSON), policy files and worker
            logs; created if missing. Must survive csi-node restarts.
        nats_url: NATS URL handed to every worker (``--nats-url``); empty = let the
            worker run without the bus (no live policy, no events).
        nats_creds: ``--nats-creds`` file (worker role) handed to every worker;
            only the path travels (command line, state files), never the password.
        worker_command: argv prefix that starts a fuse-worker; the per-volume flags
            are appended.
        mount_timeout_s: seconds NodePublishVolume waits for the mount to answer.
        unmount_timeout_s: seconds NodeUnpublishVolume waits for the worker to exit
            after SIGTERM before unmounting lazily and killing it.
        max_volumes_per_node: ``NodeGetInfo.max_volumes_per_node``; 0 = no limit.
        grpc_workers: gRPC handler threads.
        log_level: ``logging`` level name for the service's own logs.
        mode: ``node`` (Identity + Node, in the DaemonSet) or ``controller``
            (Identity + Controller, stateless, in a Deployment beside csi-provisioner).
        watch_interval_s: seconds between the recovery watcher's checks of the
            published volumes' workers; 0 turns recovery off.
        launcher: ``local`` (workers are child processes) or ``kubernetes`` (one
            worker pod per volume on this node; implies ``fuse_fd_handoff``).
        fuse_fd_handoff: the csi-node mounts each target and hands the
            ``/dev/fuse`` fd to the worker (``--fuse-fd-socket``), which then
            needs no ``CAP_SYS_ADMIN``; False = local workers mount themselves.
        pod_name: the csi-node's own pod (owner of its worker pods); downward API.
        pod_namespace: its namespace, where worker pods run.
        worker_image: fuse-worker image of the worker pods; empty = the image of
            the csi-node pod's container ``worker_image_container``.
        worker_image_container: see ``worker_image``.
        pod_start_timeout_s: how long a new worker pod may take to take its fd, seconds.
        worker_memory_request: memory request of each worker pod, a Kubernetes
            quantity (``64Mi``).
        worker_memory_limit: memory limit of each worker pod (``1Gi``); a passthrough
            worker needs ~260 B per name the kernel knows on top of ~44 MiB, so a
            volume whose pods walk more than ~3.8 million files needs more.
    """

    endpoint: str = DEFAULT_ENDPOINT
    node_id: str = msgspec.field(default_factory=socket.gethostname)
    state_dir: str = DEFAULT_STATE_DIR
    nats_url: str = ""
    nats_creds: str = ""
    worker_command: tuple[str, ...] = msgspec.field(default_factory=default_worker_command)
    mount_timeout_s: float = DEFAULT_MOUNT_TIMEOUT_S
    unmount_timeout_s: float = DEFAULT_UNMOUNT_TIMEOUT_S
    max_volumes_per_node: int = 0
    grpc_workers: int = DEFAULT_GRPC_WORKERS
    log_level: str = "INFO"
    mode: Literal["node", "controller"] = MODE_NODE
    watch_interval_s: Annotated[float, msgspec.Meta(ge=0)] = DEFAULT_WATCH_INTERVAL_S
    launcher: Literal["local", "kubernetes"] = LAUNCHER_LOCAL
    fuse_fd_handoff: bool = False
    pod_name: str = ""
    pod_namespace: str = ""
    worker_image: str = ""
    worker_image_container: str = DEFAULT_WORKER_IMAGE_CONTAINER
    pod_start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_POD_START_TIMEOUT_S
    worker_memory_request: str = DEFAULT_WORKER_MEMORY_REQUEST
    worker_memory_limit: str = DEFAULT_WORKER_MEMORY_LIMIT

    def __post_init__(self) -> None:
        if self.launcher == LAUNCHER_KUBERNETES and self.mode == MODE_NODE:
            if not (self.pod_name and self.pod_namespace):
                raise ValueError("launcher kubernetes needs pod_name and pod_namespace (--pod-name, --pod-namespace)")
        request = memory_bytes("worker_memory_request", self.worker_memory_request)
        limit = memory_bytes("worker_memory_limit", self.worker_memory_limit)
        if request > limit:
            raise ValueError(f"worker_memory_request {self.worker_memory_request} is above worker_memory_limit "
                             f"{self.worker_memory_limit}: Kubernetes refuses such a pod")


def memory_bytes(field: str, quantity: str) -> int:
    """Bytes of a Kubernetes memory quantity (``1Gi``, ``512M``, ``1e9``), parsed by the kubernetes client.

    Raises:
        ValueError: ``quantity`` is not a quantity, is not a whole number of bytes,
            or is below 1 MiB (no worker starts in less); the message names ``field``.
    """
    from kubernetes.utils.quantity import parse_quantity

    try:
        value = parse_quantity(quantity)
    except ValueError:
        raise ValueError(f"{field} = {quantity!r} is not a Kubernetes quantity (e.g. 1Gi, 512Mi)") from None
    if value != int(value) or value < 1 << 20:
        raise ValueError(f"{field} = {quantity!r} must be a whole number of bytes, at least 1Mi")
    return int(value)


def socket_path_of(endpoint: str) -> str:
    """Return the filesystem path of a ``unix://`` endpoint.

    Accepts ``unix:///abs/path`` and ``unix:/abs/path`` (both forms occur in CSI
    sidecar flags).

    Args:
        endpoint: the ``--endpoint`` value.

    Returns:
        The absolute socket path.

    Raises:
        ValueError: not a unix endpoint, the path is not absolute, or it is longer
            than ``MAX_GRPC_UNIX_SOCKET_PATH_BYTES``.
    """
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    else:
        raise ValueError(f"endpoint {endpoint!r} is not a unix socket (expected unix:///path/csi.sock)")
    if not path.startswith("/"):
        raise ValueError(f"endpoint {endpoint!r}: socket path must be absolute")
    if len(path.encode()) > MAX_GRPC_UNIX_SOCKET_PATH_BYTES:
        raise ValueError(f"endpoint {endpoint!r}: socket path is {len(path.encode())} bytes, "
                         f"longer than the {MAX_GRPC_UNIX_SOCKET_PATH_BYTES} a unix socket allows")
    return path
