"""The gRPC server of the csi-node: Identity + Node on a unix socket.

Sync grpcio with a thread pool, not grpc.aio: every Node RPC blocks on the
operating system — it spawns a worker, polls the mount table, ``stat``s a fresh
FUSE mount (which can hang if the worker hangs), runs ``fusermount3`` — so an
asyncio server would push each of them into threads anyway. Threads also make the
per-volume ``threading.Lock`` the whole concurrency story: calls for different
volumes run in parallel, calls for one volume queue. kubelet sends few,
infrequent calls, so a small pool is plenty.

Only the services of the process's ``--mode`` are registered (Identity + Node, or
Identity + Controller), so a CO asking for the other gets UNIMPLEMENTED from gRPC
itself. In node mode a watcher thread restores volumes whose worker died
(``_recovery``).
"""

from __future__ import annotations

import logging
import os
import stat
from concurrent import futures

import grpc
from interposer.proto.csi import csi_pb2_grpc

from ._config import DRIVER_NAME, LAUNCHER_KUBERNETES, MODE_CONTROLLER, CsiNodeConfig, socket_path_of
from ._controller import ControllerService
from ._identity import IdentityService
from ._launcher import Launcher, LocalProcessLauncher
from ._node import NodeService
from ._recovery import WorkerWatcher
from ._state import StateStore

log = logging.getLogger(__name__)

#: How long in-flight calls may finish after stop() is called, seconds.
DEFAULT_STOP_GRACE_S = 5.0


class CsiNodeServer:
    """A csi-node: the gRPC server, its services and their launcher.

    Args:
        config: the service configuration.

    Raises:
        ValueError: ``config.endpoint`` is not a ``unix://`` endpoint.
    """

    def __init__(self, config: CsiNodeConfig) -> None:
        self.config = config
        self.socket_path = socket_path_of(config.endpoint)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.grpc_workers, thread_name_prefix="csi")
        )
        controller = config.mode == MODE_CONTROLLER
        self.identity = IdentityService(DRIVER_NAME, controller=controller)
        csi_pb2_grpc.add_IdentityServicer_to_server(self.identity, self._server)
        self.watcher: WorkerWatcher | None = None
        if controller:
            self.store = None
            csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(), self._server)
            return
        self.store = StateStore(config.state_dir)
        self.launcher = make_launcher(config)
        self.node = NodeService(config, self.launcher, self.store)
        csi_pb2_grpc.add_NodeServicer_to_server(self.node, self._server)
        if config.watch_interval_s > 0:
            self.watcher = WorkerWatcher(
                self.node,
                self.launcher,
                self.store,
                interval_s=config.watch_interval_s,
                mount_timeout_s=config.mount_timeout_s,
            )

    def start(self) -> None:
        """Bind the unix socket (replacing a stale one) and start serving.

        Raises:
            OSError: the socket directory cannot be created, or a non-socket file
                occupies the socket path.
            RuntimeError: gRPC could not bind the socket.
        """
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise FileExistsError(f"{self.socket_path} exists and is not a socket")
            os.unlink(self.socket_path)  # left by a previous run
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()
        if self.store is None:
            log.info("csi %s controller serving on %s", DRIVER_NAME, self.socket_path)
            return
        published = self.store.all()
        log.info(
            "csi-node %s serving on %s (node %s, %d volume(s) in state)",
            DRIVER_NAME,
            self.socket_path,
            self.config.node_id,
            len(published),
        )
        if self.watcher is not None:
            self.watcher.start()

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        """Stop serving; running fuse-workers (and their mounts) are left running."""
        if self.watcher is not None:
            self.watcher.stop()
        self._server.stop(grace_s).wait()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def wait_for_termination(self) -> None:
        """Block until the server stops."""
        self._server.wait_for_termination()


#: Under ``--state-dir``: the per-volume fd-handoff sockets (and worker pods' policy files).
HANDOFF_SUBDIR = "handoff"


def make_launcher(config: CsiNodeConfig, api: object | None = None) -> Launcher:
    """The launcher ``config.launcher`` names.

    Args:
        config: the service configuration.
        api: a ``kubernetes.client.CoreV1Api`` for the Kubernetes launcher; None =
            the in-cluster one (service account token of the csi-node pod).

    Raises:
        OSError: the Kubernetes launcher cannot read its own pod.
        kubernetes.config.ConfigException: not running in a pod.
    """
    handoff_dir = os.path.join(config.state_dir, HANDOFF_SUBDIR)
    if config.launcher != LAUNCHER_KUBERNETES:
        return LocalProcessLauncher(
            config.worker_command,
            fd_handoff_dir=handoff_dir if config.fuse_fd_handoff else None,
            handoff_timeout_s=config.mount_timeout_s,
        )
    from ._kubernetes import DEFAULT_NATS_CREDS_SECRET, KubernetesLauncher, WorkerPodSettings, read_own_pod

    if api is None:
        import kubernetes

        kubernetes.config.load_incluster_config()
        api = kubernetes.client.CoreV1Api()
    owner, own_image = read_own_pod(api, config.pod_namespace, config.pod_name, config.worker_image_container)
    settings = WorkerPodSettings(
        namespace=config.pod_namespace,
        node_name=config.node_id,
        image=config.worker_image or own_image,
        handoff_dir=handoff_dir,
        owner=owner,
        nats_url=config.nats_url,
        # The worker pods mount the worker role's Secret (the csi-node's own
        # --nats-creds is the same Secret mounted in its container).
        nats_creds_secret=DEFAULT_NATS_CREDS_SECRET if config.nats_creds else "",
        termination_grace_s=max(1, int(config.unmount_timeout_s)),
        memory_request=config.worker_memory_request,
        memory_limit=config.worker_memory_limit,
    )
    return KubernetesLauncher(api, settings, pod_start_timeout_s=config.pod_start_timeout_s)
