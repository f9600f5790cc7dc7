"""The Kubernetes launcher: one unprivileged fuse-worker pod per volume on this node.

The csi-node (privileged, in the DaemonSet) mounts the volume at the kubelet's
target path itself and hands the ``/dev/fuse`` fd to the worker pod over a unix
socket in a per-volume host directory (``_fuse_fd``). The worker pod therefore
needs no ``privileged``, no ``CAP_SYS_ADMIN`` (unless the volume asks for kernel
passthrough, which the kernel allows only with it), no ``/dev/fuse`` and no mount
propagation: it holds the fd, mounts the backing volume (a PersistentVolumeClaim
or a host path) and serves. The mount lives in the csi-node's mount namespace,
under the kubelet directory it shares with the host (``Bidirectional``), so it
reaches the application pod the same way as with the local launcher.

Each pod is pinned to this node (``spec.nodeName``, tolerating every taint),
carries ``app.kubernetes.io/*`` labels and ``interposer.io/{volume-id,node,incarnation}``
labels (found and removed by label selector), and an owner reference to the
csi-node pod's controller — the DaemonSet — (or to the csi-node pod itself if it has
none): uninstalling garbage-collects every worker, while a csi-node pod replaced by
a rolling update leaves them (and the application pods' mounts) running; the new
csi-node finds them through its state files. A worker handle (``VolumeState.worker_pid``) is the pod's incarnation:
the pod of incarnation *n* is ``interposer-worker-<hash>-<n>``; recovery deletes
the dead pod and creates incarnation *n + 1* (``restartPolicy: Never``, so only
the csi-node decides when a new worker mounts).

API calls (and so the RBAC Role ``interposer-csi-node``, pinned by
``tests/deploy``): pods ``create``, ``get``, ``list``, ``delete`` in the csi-node's
namespace. No ``watch``: liveness is one ``get`` per published volume per check.
One ``get`` of the application pod (any namespace: ClusterRole
``interposer-csi-node-pod-labels``) before each worker pod is created, for its
labels, which the kubelet does not pass in the CSI volume context: they become
``--pod-label`` flags, so selector policies with ``labels`` reach the volume. If
that read fails the worker starts without labels (such selectors do not match it).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import msgspec.structs
from interposer.proto.connection import nats_secret_name

from ._config import memory_bytes
from ._fuse_fd import FdHandoff, handoff_name, mount_fuse_fd
from ._launcher import WorkerSpec, label_arguments, optional_flags
from ._mounts import unmount_lazily
from ._state import VolumeState, write_atomically

log = logging.getLogger(__name__)

#: Name of the worker container in every worker pod.
WORKER_CONTAINER = "fuse-worker"
#: Where the worker pod sees its volume's handoff directory (socket + policy file).
POD_HANDOFF_DIR = "/run/interposer"
#: Where the worker pod sees its backing volume.
POD_BACKING_DIR = "/backing"
#: Where a worker pod mounts the worker role's NATS credentials Secret (``--nats-creds``).
POD_NATS_CREDS_DIR = "/etc/interposer/nats-worker"
#: The worker role's ``kubernetes.io/basic-auth`` Secret (deploy/base, docs/policy.md).
DEFAULT_NATS_CREDS_SECRET = nats_secret_name("worker")
#: The handoff socket's name inside a volume's handoff directory.
HANDOFF_SOCKET_NAME = "fuse.sock"
#: The initial policy's name inside a volume's handoff directory.
HANDOFF_POLICY_NAME = "policy.json"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
#: The volume (a label-safe form of its id, see :func:`label_value`).
LABEL_VOLUME_ID = "interposer.io/volume-id"
#: The node the worker serves (label-safe form of its name).
LABEL_NODE = "interposer.io/node"
#: Which start of the volume's worker this pod is (1, 2, …).
LABEL_INCARNATION = "interposer.io/incarnation"
#: The full volume id (labels cannot hold every valid id: ≤ 63 characters).
ANNOTATION_VOLUME_ID = "interposer.io/volume-id"
#: Where the volume is published on the node.
ANNOTATION_TARGET_PATH = "interposer.io/target-path"
MANAGED_BY = "interposer-csi-node"

#: What the worker process may still do as root: serve files of every owner
#: (``DAC_*``, ``FOWNER``), create them as the caller (``CHOWN``; ``FSETID`` keeps
#: set-id bits as the caller asked) and make device nodes (``MKNOD``). Not
#: ``SYS_ADMIN``: it never mounts.
WORKER_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "MKNOD")
#: Added for a volume with ``kernelPassthrough``: the kernel registers backing files
#: only for CAP_SYS_ADMIN (``FUSE_DEV_IOC_BACKING_OPEN``).
KERNEL_PASSTHROUGH_CAPABILITY = "SYS_ADMIN"

#: Pod phases of a worker that will not serve again.
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
#: Poll interval while waiting for a deleted worker pod to disappear, seconds.
DELETE_POLL_INTERVAL_S = 0.5
#: Shortest interval between liveness ``get``s while waiting for a pod to take its fd, seconds.
HANDOFF_LIVENESS_INTERVAL_S = 1.0
#: How long a worker pod may take to start (image present) and ask for its fd, seconds.
DEFAULT_POD_START_TIMEOUT_S = 60.0
#: Longest Kubernetes label value (``metadata.labels`` syntax).
LABEL_VALUE_MAX_LENGTH = 63
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


class WorkerPodSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How worker pods are made on this node.

    Attributes:
        namespace: where worker pods run: the csi-node's own namespace (owner
            references cannot cross namespaces).
        node_name: this node (``spec.nodeName`` of every worker pod).
        image: the fuse-worker image.
        owner: owner reference of every worker pod (``apiVersion``, ``kind``,
            ``name``, ``uid``): the csi-node pod's DaemonSet; empty = none.
        handoff_dir: host directory (mounted at the same path in the csi-node) under
            which each volume gets a handoff directory, hostPath-mounted into its pod.
        nats_url: bus URL handed to each worker; empty = none.
        nats_creds_secret: Secret with the worker role's NATS credentials
            (``username``, ``password``), mounted into each worker pod and passed
            as ``--nats-creds``; empty = none (anonymous).
        service_account: the worker pods' ServiceAccount (its token is not mounted).
        image_pull_policy: ``IfNotPresent``: the DaemonSet's init container pre-pulls it.
        cpu_request: CPU request of a worker (no limit: throttling would add latency
            nobody asked to inject).
        memory_request: memory request of a worker.
        memory_limit: memory limit of a worker.
        termination_grace_s: seconds between SIGTERM and SIGKILL of a worker pod
            (its in-flight FUSE requests drain meanwhile).
    """

    namespace: str
    node_name: str
    image: str
    handoff_dir: str
    owner: dict[str, str] = msgspec.field(default_factory=dict)
    nats_url: str = ""
    nats_creds_secret: str = ""
    service_account: str = "interposer-fuse-worker"
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    memory_limit: str = "1Gi"
    termination_grace_s: int = 10


def _resources(spec: WorkerSpec, settings: WorkerPodSettings) -> dict[str, dict[str, str]]:
    """The worker container's requests and limits: the volume's memory limit if it sets one, else the node's;
    a request above that limit is lowered to it (Kubernetes refuses a pod whose request exceeds its limit)."""
    limit = spec.tuning.memory_limit or settings.memory_limit
    request = settings.memory_request
    if memory_bytes("memory_request", request) > memory_bytes("memory_limit", limit):
        request = limit
    return {"requests": {"cpu": settings.cpu_request, "memory": request}, "limits": {"memory": limit}}


def label_value(text: str) -> str:
    """Return ``text`` if it is a valid label value, else ``h`` + 40 hex digits of its SHA-256.

    CSI volume ids may be 128 characters long and start with ``-`` or ``_``
    (kubelet's ephemeral ids are 68 characters); label values may not.
    """
    if len(text) <= LABEL_VALUE_MAX_LENGTH and _LABEL_VALUE.fullmatch(text):
        return text
    return "h" + hashlib.sha256(text.encode()).hexdigest()[:40]


def worker_pod_name(node_name: str, volume_id: str, incarnation: int) -> str:
    """``interposer-worker-<16 hex of SHA-256(node/volume)>-<incarnation>``: a valid, unique pod name.

    The node is in the hash because a multi-node volume has one worker per node,
    all in one namespace.
    """
    digest = hashlib.sha256(f"{node_name}/{volume_id}".encode()).hexdigest()[:16]
    return f"interposer-worker-{digest}-{incarnation}"


def volume_selector(node_name: str, volume_id: str | None = None) -> str:
    """Label selector of this node's worker pods (of one volume if ``volume_id`` is given)."""
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_NODE}={label_value(node_name)}"
    if volume_id is not None:
        selector += f",{LABEL_VOLUME_ID}={label_value(volume_id)}"
    return selector


def worker_pod_manifest(spec: WorkerSpec, settings: WorkerPodSettings, incarnation: int) -> dict[str, Any]:
    """The Pod object of incarnation ``incarnation`` of the worker of ``spec``.

    Args:
        spec: the volume's worker; ``backing_claim`` (a claim in ``settings.namespace``)
            or ``backing_dir`` (a host path) is mounted at ``/backing``; ``policy_file``
            non-empty means the policy is in the handoff directory.
        settings: this node's worker pod settings.
        incarnation: ≥ 1.

    Returns:
        The manifest (a ``v1`` ``Pod`` as a dict, for ``create_namespaced_pod``).
    """
    volume_label = label_value(spec.volume_id)
    args = ["--volume-id", spec.volume_id, "--fuse-fd-socket", f"{POD_HANDOFF_DIR}/{HANDOFF_SOCKET_NAME}"]
    volumes: list[dict[str, Any]] = [
        {
            "name": "handoff",
            "hostPath": {"path": handoff_dir_of(settings, spec.volume_id), "type": "Directory"},
        }
    ]
    mounts: list[dict[str, Any]] = [{"name": "handoff", "mountPath": POD_HANDOFF_DIR}]
    if spec.backend == "passthrough":
        args += ["--backing-dir", POD_BACKING_DIR]
        if spec.backing_claim:
            source: dict[str, Any] = {
                "persistentVolumeClaim": {"claimName": spec.backing_claim, "readOnly": spec.read_only}
            }
        else:
            source = {"hostPath": {"path": spec.backing_dir, "type": "Directory"}}
        volumes.append({"name": "backing", **source})
        mounts.append({"name": "backing", "mountPath": POD_BACKING_DIR, "readOnly": spec.read_only})
    else:
        args += ["--backend", spec.backend]
    optional = (
        ("--nats-url", settings.nats_url),
        ("--policy-file", f"{POD_HANDOFF_DIR}/{HANDOFF_POLICY_NAME}" if spec.policy_file else ""),
        ("--pod-namespace", spec.pod_namespace),
        ("--pod-name", spec.pod_name),
        ("--pod-uid", spec.pod_uid),
        ("--service-account", spec.service_account),
        ("--node-name", settings.node_name),
        ("--nats-creds", POD_NATS_CREDS_DIR if settings.nats_creds_secret else ""),
    )
    args += optional_flags(optional)
    args += label_arguments(spec.pod_labels)
    args += spec.tuning.arguments()
    if spec.read_only:
        args.append("--read-only")
    if settings.nats_creds_secret:
        volumes.append({"name": "nats-credentials",
                        "secret": {"secretName": settings.nats_creds_secret, "defaultMode": 0o400}})
        mounts.append({"name": "nats-credentials", "mountPath": POD_NATS_CREDS_DIR, "readOnly": True})
    metadata: dict[str, Any] = {
        "name": worker_pod_name(settings.node_name, spec.volume_id, incarnation),
        "namespace": settings.namespace,
        "labels": {
            LABEL_NAME: "interposer-fuse-worker",
            LABEL_COMPONENT: "fuse-worker",
            LABEL_PART_OF: "interposer",
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_INSTANCE: volume_label,
            LABEL_VOLUME_ID: volume_label,
            LABEL_NODE: label_value(settings.node_name),
            LABEL_INCARNATION: str(incarnation),
        },
        "annotations": {ANNOTATION_VOLUME_ID: spec.volume_id, ANNOTATION_TARGET_PATH: spec.mountpoint},
    }
    if settings.owner:
        metadata["ownerReferences"] = [dict(settings.owner)]
    container = {
        "name": WORKER_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "resources": _resources(spec, settings),
        "securityContext": {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": [*WORKER_CAPABILITIES, *(
                [KERNEL_PASSTHROUGH_CAPABILITY] if spec.tuning.kernel_passthrough else [])]},
        },
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": settings.node_name,
            "restartPolicy": "Never",
            "serviceAccountName": settings.service_account,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": settings.termination_grace_s,
            # Pinned by nodeName (no scheduler): tolerate NoExecute taints too, as the csi-node does.
            "tolerations": [{"operator": "Exists"}],
            # uid 0 without SYS_ADMIN: it serves files of every owner through the capabilities above.
            "securityContext": {"runAsUser": 0, "runAsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        },
    }


def handoff_dir_of(settings: WorkerPodSettings, volume_id: str) -> str:
    """Host directory of ``volume_id``'s handoff socket and policy file."""
    return str(Path(settings.handoff_dir) / handoff_name(volume_id))


class KubernetesLauncher:
    """Runs each volume's fuse-worker as a pod on this node (see the module docstring).

    Args:
        api: a ``kubernetes.client.CoreV1Api`` (or a fake with the same methods).
        settings: how worker pods are made.
        pod_start_timeout_s: how long a new pod may take to ask for its fd, seconds.
    """

    def __init__(
        self, api: Any, settings: WorkerPodSettings, *, pod_start_timeout_s: float = DEFAULT_POD_START_TIMEOUT_S
    ) -> None:
        self._api = api
        self.settings = settings
        self._pod_start_timeout_s = pod_start_timeout_s

    @property
    def claim_namespace(self) -> str:
        """The namespace whose PersistentVolumeClaims worker pods can mount (their own)."""
        return self.settings.namespace

    def argv(self, spec: WorkerSpec) -> list[str]:
        """The worker container's args for ``spec`` (as recorded in ``VolumeState.worker_argv``)."""
        return list(worker_pod_manifest(spec, self.settings, 1)["spec"]["containers"][0]["args"])

    def start(self, spec: WorkerSpec, log_path: Path) -> int:
        """Mount ``spec.mountpoint``, create the volume's worker pod and hand it the fd.

        Leftover pods of the volume on this node (a csi-node that died mid-publish)
        are deleted first.

        Args:
            spec: what to serve where (``mountpoint`` is the target on this node).
            log_path: unused (worker output is the pod's log: ``kubectl logs``).

        Returns:
            The pod's incarnation.

        Raises:
            OSError: the mount, an API call or the handoff failed (nothing is left behind).
        """
        leftovers = self._list_pods(spec.volume_id)
        for pod in leftovers:
            self._delete_pod(pod.metadata.name, grace_s=0)
        incarnation = 1 + max((_incarnation_of(pod) for pod in leftovers), default=0)
        return self._launch(spec, incarnation)

    def restart(self, state: VolumeState) -> int:
        """Replace the dead worker pod of ``state`` by a new incarnation (the dead mount is gone).

        Raises:
            OSError: as :meth:`start`.
        """
        self._delete_pod(worker_pod_name(self.settings.node_name, state.volume_id, state.worker_pid), grace_s=0)
        spec = WorkerSpec.of_volume(state, policy_file=state.policy_file)
        return self._launch(spec, state.worker_pid + 1)

    def pod_labels(self, namespace: str, name: str) -> dict[str, str]:
        """The labels of the application pod ``namespace/name`` (``{}`` if unknown or unreadable)."""
        if not namespace or not name:
            return {}
        try:
            pod = self._api.read_namespaced_pod(name, namespace)
        except Exception as exc:  # noqa: BLE001 - RBAC missing, pod gone, API away: serve without labels
            log.warning("cannot read the labels of pod %s/%s (%s); selectors with labels will not match it",
                        namespace, name, exc)
            return {}
        return dict(pod.metadata.labels or {})

    def _launch(self, spec: WorkerSpec, incarnation: int) -> int:
        # Read on every (re)start: a recovered worker gets the labels the pod has now.
        spec = msgspec.structs.replace(spec, pod_labels=self.pod_labels(spec.pod_namespace, spec.pod_name))
        handoff_dir = Path(handoff_dir_of(self.settings, spec.volume_id))
        handoff_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if spec.policy_file:
            write_atomically(handoff_dir / HANDOFF_POLICY_NAME, Path(spec.policy_file).read_bytes(), mode=0o644)
        manifest = worker_pod_manifest(spec, self.settings, incarnation)
        name = manifest["metadata"]["name"]
        with FdHandoff(handoff_dir / HANDOFF_SOCKET_NAME) as handoff:
            fd = mount_fuse_fd(spec.mountpoint, spec.volume_id, read_only=spec.read_only)
            try:
                self._call("create", name, self._api.create_namespaced_pod, self.settings.namespace, manifest)
                log.info("created worker pod %s for volume %s (incarnation %d)", name, spec.volume_id, incarnation)
                alive = _Throttled(lambda: self.is_running(incarnation, spec.volume_id), HANDOFF_LIVENESS_INTERVAL_S)
                try:
                    handoff.send(fd, spec.volume_id, self._pod_start_timeout_s, alive)
                except ChildProcessError:
                    return incarnation  # the caller's wait for the mount reports it
                except OSError:
                    self._delete_pod(name, grace_s=0)
                    raise
            except OSError:
                unmount_lazily(spec.mountpoint)
                raise
            finally:
                os.close(fd)  # the pod holds its own reference now
        return incarnation

    def is_running(self, pid: int, volume_id: str) -> bool:
        """Return True if the pod of incarnation ``pid`` exists, is not being deleted and may serve.

        A pod that is Pending, or Running with no terminated container, counts as running.
        An API error counts as running (the watcher must not replace a worker it cannot see).
        """
        name = worker_pod_name(self.settings.node_name, volume_id, pid)
        try:
            pod = self._api.read_namespaced_pod(name, self.settings.namespace)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return False
            log.warning("cannot read worker pod %s: %s", name, exc)
            return True
        if pod.metadata.deletion_timestamp is not None:
            return False
        if pod.status is None:
            return True  # just created
        if pod.status.phase in FINISHED_PHASES:
            return False
        for status in pod.status.container_statuses or ():
            if status.name == WORKER_CONTAINER and status.state is not None and status.state.terminated is not None:
                return False
        return True

    def exit_code(self, pid: int) -> int | None:
        """Unknown for pods (None): the pod's status and ``kubectl logs`` tell why it ended."""
        return None

    def stop(self, pid: int, volume_id: str, timeout_s: float) -> bool:
        """Delete the worker pod (SIGTERM, SIGKILL after ``timeout_s``), wait until it is gone,
        and remove the volume's handoff directory.

        Returns:
            True if the pod is gone; False if it still exists ``timeout_s`` + 5 s later.
        """
        name = worker_pod_name(self.settings.node_name, volume_id, pid)
        try:
            self._delete_pod(name, grace_s=math.ceil(timeout_s))
        except OSError as exc:
            log.warning("cannot delete worker pod %s: %s", name, exc)
            return False
        deadline = time.monotonic() + timeout_s + 5.0
        while self._pod_exists(name):
            if time.monotonic() >= deadline:
                return False
            time.sleep(DELETE_POLL_INTERVAL_S)
        # Its socket and policy copy; the next start of the volume makes them anew.
        shutil.rmtree(handoff_dir_of(self.settings, volume_id), ignore_errors=True)
        return True

    # ------------------------------------------------------------------ API helpers

    def _list_pods(self, volume_id: str) -> list[Any]:
        selector = volume_selector(self.settings.node_name, volume_id)
        result = self._call("list", selector, self._api.list_namespaced_pod, self.settings.namespace,
                            label_selector=selector)
        return list(result.items)

    def _delete_pod(self, name: str, grace_s: int) -> None:
        try:
            self._api.delete_namespaced_pod(name, self.settings.namespace, grace_period_seconds=grace_s)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return
            raise OSError(f"cannot delete pod {self.settings.namespace}/{name}: {exc}") from None

    def _pod_exists(self, name: str) -> bool:
        try:
            self._api.read_namespaced_pod(name, self.settings.namespace)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return False
            return True
        return True

    def _call(self, verb: str, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            raise OSError(f"cannot {verb} pods ({what}) in {self.settings.namespace}: {exc}") from None


class _Throttled:
    """Calls ``check`` at most every ``interval_s`` seconds; answers the last result in between."""

    def __init__(self, check: Callable[[], bool], interval_s: float) -> None:
        self._check = check
        self._interval_s = interval_s
        self._next_s = 0.0
        self._last = True

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self._next_s:
            self._last = self._check()
            self._next_s = now + self._interval_s
        return self._last


def _incarnation_of(pod: Any) -> int:
    try:
        return int((pod.metadata.labels or {}).get(LABEL_INCARNATION, "0"))
    except ValueError:
        return 0


def read_own_pod(api: Any, namespace: str, name: str, image_container: str) -> tuple[dict[str, str], str]:
    """Read the csi-node's own pod: the owner reference for its workers, and their image.

    Args:
        api: a ``CoreV1Api``.
        namespace: the csi-node pod's namespace (downward API ``POD_NAMESPACE``).
        name: its name (``POD_NAME``).
        image_container: the (init) container whose image is the fuse-worker's.

    Returns:
        ``(owner, image)``: ``owner`` is the pod's controller reference (its
        DaemonSet) as ``{apiVersion, kind, name, uid}``, or the pod itself when it
        has no controller; ``image`` is ``image_container``'s image.

    Raises:
        OSError: the pod cannot be read, or has no container ``image_container``.
    """
    try:
        pod = api.read_namespaced_pod(name, namespace)
    except Exception as exc:  # ApiException (HTTP) or urllib3 errors (connection)
        raise OSError(f"cannot read own pod {namespace}/{name}: {exc}") from None
    controllers = [ref for ref in pod.metadata.owner_references or () if ref.controller]
    if controllers:
        ref = controllers[0]
        owner = {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name, "uid": ref.uid}
    else:
        owner = {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": pod.metadata.uid}
    for container in [*(pod.spec.init_containers or ()), *pod.spec.containers]:
        if container.name == image_container:
            return owner, container.image
    raise OSError(f"own pod {namespace}/{name} has no container {image_container!r} naming the worker image")
