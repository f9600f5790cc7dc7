"""The Kubernetes launcher: worker pod specs, its API calls, recovery through pods.

No API server runs here: the launcher talks to ``kube_fake.FakeCoreV1Api``, a
fake of ``kubernetes.client.CoreV1Api`` (same methods, the real client's models
and ``ApiException``), whose fake kubelet runs each created pod's container as a
real, unprivileged fuse-worker process. The pod specs themselves are validated
against the Kubernetes schema (``kubernetes-validate``). Publishing mounts real
FUSE file systems: those tests fail (never skip) where FUSE is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import kubernetes_validate
import msgspec
import pytest
from csi_support import fuse_mounts_under, mounting_volume_request, tuning_flags
from interposer.csi_node import (
    CsiError, CsiNodeConfig, KubernetesLauncher, NodeService, WorkerPodSettings, WorkerSpec, WorkerTuning,
)
from interposer.csi_node._kubernetes import (
    LABEL_INCARNATION,
    LABEL_VOLUME_ID,
    WORKER_CAPABILITIES,
    label_value,
    read_own_pod,
    worker_pod_manifest,
)
from interposer.csi_node._recovery import WorkerWatcher
from interposer.csi_node._server import make_launcher
from interposer.csi_node._state import StateStore
from interposer_testing import require_fuse
from kube_fake import FakeCoreV1Api, FakeKubelet

#: Kubernetes version whose schema the pod specs must satisfy (as tests/deploy).
KUBERNETES_VERSION = "1.33"
NAMESPACE = "interposer-system"
NODE = "node-a"
OWN_POD = "interposer-csi-node-x7k2p"
OWN_UID = "0d6f6c1e-3a2b-4c5d-8e9f-0123456789ab"
DAEMONSET_UID = "5e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7"
#: The owner of worker pods: the csi-node pod's DaemonSet (survives csi-node upgrades).
OWNER = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "interposer-csi-node", "uid": DAEMONSET_UID}
WORKER_IMAGE = "registry.example/interposer-fuse-worker:v1"
#: kubelet's id of an ephemeral inline volume: 68 characters, too long for a label value.
EPHEMERAL_ID = "csi-" + "a1" * 32


def _settings(handoff_dir: str = "/var/lib/interposer/csi-node/handoff") -> WorkerPodSettings:
    return WorkerPodSettings(
        namespace=NAMESPACE, node_name=NODE, image=WORKER_IMAGE, handoff_dir=handoff_dir,
        owner=OWNER, nats_url="nats://nats.interposer-system.svc:4222",
    )


def _validate(manifest: dict) -> None:
    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"invalid pod spec at {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize(
    "spec",
    [
        WorkerSpec(volume_id="pvc-1", backing_claim="data", mountpoint="/var/lib/kubelet/pods/u/volumes/m"),
        WorkerSpec(volume_id="vol_2", backing_dir="/var/lib/interposer/backing/x", mountpoint="/t",
                   policy_file="/state/vol_2.policy.json", pod_namespace="app", pod_name="web-0", read_only=True),
        WorkerSpec(volume_id=EPHEMERAL_ID, backend="memory", mountpoint="/t"),
    ],
    ids=["claim", "host-path-read-only", "memory-ephemeral"],
)
def test_worker_pod_spec_is_a_valid_unprivileged_pod_pinned_to_the_node(spec: WorkerSpec) -> None:
    manifest = worker_pod_manifest(spec, _settings(), 3)
    _validate(manifest)
    meta, pod = manifest["metadata"], manifest["spec"]
    assert meta["namespace"] == NAMESPACE and meta["name"].endswith("-3")
    assert meta["ownerReferences"] == [OWNER]
    labels = meta["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "interposer-csi-node"
    assert labels["app.kubernetes.io/part-of"] == "interposer"
    assert labels[LABEL_VOLUME_ID] == label_value(spec.volume_id) and labels[LABEL_INCARNATION] == "3"
    assert meta["annotations"]["interposer.io/volume-id"] == spec.volume_id
    assert pod["nodeName"] == NODE and pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "SYS_ADMIN" not in security["capabilities"]["add"]
    assert not any("fuse" in v.get("hostPath", {}).get("path", "") for v in pod["volumes"] if v["name"] != "handoff")
    assert container["resources"]["requests"] and "cpu" not in container["resources"]["limits"]
    args = container["args"]
    assert args[args.index("--fuse-fd-socket") + 1] == "/run/interposer/fuse.sock"
    assert "--mountpoint" not in args  # the target exists only on the node
    volumes = {v["name"]: v for v in pod["volumes"]}
    if spec.backing_claim:
        assert volumes["backing"]["persistentVolumeClaim"] == {"claimName": "data", "readOnly": False}
    elif spec.backing_dir:
        assert volumes["backing"]["hostPath"] == {"path": spec.backing_dir, "type": "Directory"}
        assert "--read-only" in args and args[args.index("--policy-file") + 1] == "/run/interposer/policy.json"
    else:
        assert "backing" not in volumes and args[args.index("--backend") + 1] == "memory"


def test_a_kernel_passthrough_volume_gets_the_one_capability_the_kernel_requires() -> None:
    spec = WorkerSpec(volume_id="v", backing_dir="/b", mountpoint="/t", tuning=WorkerTuning(kernel_passthrough=True))
    manifest = worker_pod_manifest(spec, _settings(), 1)
    _validate(manifest)
    (container,) = manifest["spec"]["containers"]
    assert "--kernel-passthrough" in container["args"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) - set(WORKER_CAPABILITIES) == {"SYS_ADMIN"}


def test_worker_pods_get_the_worker_nats_credentials_secret() -> None:
    spec = WorkerSpec(volume_id="v", backend="memory", mountpoint="/t")
    settings = msgspec.structs.replace(_settings(), nats_creds_secret="interposer-nats-worker")
    manifest = worker_pod_manifest(spec, settings, 1)
    _validate(manifest)
    (container,) = manifest["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--nats-creds") + 1] == "/etc/interposer/nats-worker"
    assert args[args.index("--node-name") + 1] == NODE
    volumes = {v["name"]: v for v in manifest["spec"]["volumes"]}
    assert volumes["nats-credentials"]["secret"]["secretName"] == "interposer-nats-worker"
    assert {"name": "nats-credentials", "mountPath": "/etc/interposer/nats-worker", "readOnly": True} in \
        container["volumeMounts"]
    assert "--nats-creds" not in worker_pod_manifest(spec, _settings(), 1)["spec"]["containers"][0]["args"]


def test_label_values_of_long_or_odd_ids_are_hashed() -> None:
    assert label_value("pvc-0d6f6c1e") == "pvc-0d6f6c1e"
    for odd in (EPHEMERAL_ID, "_starts-with-underscore", "ends-"):
        hashed = label_value(odd)
        assert len(hashed) == 41 and hashed.startswith("h") and hashed == label_value(odd)


# ---------------------------------------------------------------------- through pods, on real FUSE


class _Cluster:
    """A NodeService with the Kubernetes launcher over the fake API, on real FUSE."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.backing = root / "claim-data"
        self.backing.mkdir()
        (root / "pod-logs").mkdir()
        self.kubelet = FakeKubelet({"data": self.backing}, root / "pod-logs")
        self.api = FakeCoreV1Api(self.kubelet)
        self.api.add_pod({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": OWN_POD, "namespace": NAMESPACE, "uid": OWN_UID,
                         "ownerReferences": [{**OWNER, "controller": True, "blockOwnerDeletion": True}]},
            "spec": {
                "initContainers": [{"name": "fuse-worker-image", "image": WORKER_IMAGE}],
                "containers": [{"name": "csi-node", "image": "interposer-csi-node"}],
            },
        })
        self.config = CsiNodeConfig(
            endpoint=f"unix://{root}/csi.sock", node_id=NODE, state_dir=str(root / "state"),
            mount_timeout_s=15.0, unmount_timeout_s=5.0, launcher="kubernetes",
            pod_name=OWN_POD, pod_namespace=NAMESPACE, pod_start_timeout_s=15.0,
        )
        self.launcher = make_launcher(self.config, self.api)
        self.store = StateStore(self.config.state_dir)
        self.node = NodeService(self.config, self.launcher, self.store)
        self.watcher = WorkerWatcher(self.node, self.launcher, self.store, mount_timeout_s=15.0)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in (self.root / "pod-logs").iterdir())


@pytest.fixture
def cluster() -> Iterator[_Cluster]:
    root = Path(tempfile.mkdtemp(prefix="k8slaunch-"))  # in $TMPDIR, as csi_support
    cluster = _Cluster(root)
    try:
        yield cluster
    finally:
        cluster.kubelet.kill_all()
        for mountpoint in sorted(fuse_mounts_under(root), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.fuse
def test_publish_runs_a_worker_pod_over_the_claim_and_recovers_it(cluster: _Cluster) -> None:
    require_fuse()
    # The application pod, whose labels the launcher reads for selector policies.
    cluster.api.add_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "web-0", "namespace": "app",
        "labels": {"app.kubernetes.io/name": "web", "tier": "frontend"}}})
    assert isinstance(cluster.launcher, KubernetesLauncher)
    assert cluster.launcher.settings.image == WORKER_IMAGE  # read from its own pod's init container
    assert cluster.launcher.settings.owner == OWNER  # its DaemonSet, from its own pod
    target = cluster.root / "pods" / "p1" / "volumes" / "mount"
    request = mounting_volume_request(
        "pvc-1", target, None,
        extra_context={"backingClaim": f"{NAMESPACE}/data", "csi.storage.k8s.io/pod.namespace": "app",
                       "csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.uid": "uid-1",
                       "csi.storage.k8s.io/serviceAccount.name": "web"},
    )
    cluster.node.publish(request)
    (pod,) = cluster.api.worker_pods()
    _validate({k: v for k, v in pod.items() if k != "status"})
    assert pod["metadata"]["labels"][LABEL_INCARNATION] == "1"
    args = pod["spec"]["containers"][0]["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--pod-label"] == [
        "app.kubernetes.io/name=web", "tier=frontend"]  # and the real worker accepted them: it serves
    assert fuse_mounts_under(cluster.root) == {str(target): "fuse.interposer"}, cluster.logs()
    (target / "f").write_text("via the worker pod")
    assert (cluster.backing / "f").read_text() == "via the worker pod"
    state = cluster.store.load("pvc-1")
    assert state.worker_pid == 1 and state.backing_claim == "data" and state.backing_dir == ""

    cluster.node.publish(request)  # idempotent: same pod, nothing created
    assert [c[0] for c in cluster.api.calls].count("create_namespaced_pod") == 1

    # The worker container dies: the watcher replaces the pod and the mount answers again.
    cluster.kubelet.processes[pod["metadata"]["name"]].kill()
    cluster.kubelet.processes[pod["metadata"]["name"]].wait()
    assert cluster.watcher.restore_if_dead("pvc-1"), cluster.logs()
    (new_pod,) = cluster.api.worker_pods()
    assert new_pod["metadata"]["labels"][LABEL_INCARNATION] == "2"
    for worker in (pod, new_pod):  # the replacement labels its telemetry with the same pod
        args = worker["spec"]["containers"][0]["args"]
        assert [args[args.index(flag) + 1] for flag in ("--pod-namespace", "--pod-name", "--pod-uid",
                                                         "--service-account")] == ["app", "web-0", "uid-1", "web"]
    assert "tier=frontend" in new_pod["spec"]["containers"][0]["args"], "a recovered worker lost its labels"
    assert (target / "f").read_text() == "via the worker pod"
    assert cluster.store.load("pvc-1").restarts == 1
    assert list(fuse_mounts_under(cluster.root)) == [str(target)]

    # Someone deletes the pod (kubectl delete pod, node drain): recreated as incarnation 3.
    cluster.api.delete_namespaced_pod(new_pod["metadata"]["name"], NAMESPACE, grace_period_seconds=0)
    assert cluster.watcher.restore_if_dead("pvc-1"), cluster.logs()
    (third_pod,) = cluster.api.worker_pods()
    assert third_pod["metadata"]["labels"][LABEL_INCARNATION] == "3"
    assert (target / "f").read_text() == "via the worker pod"

    # A restarted csi-node (new launcher, same state dir) finds the running pod: nothing created.
    creates = [c[0] for c in cluster.api.calls].count("create_namespaced_pod")
    restarted = NodeService(cluster.config, make_launcher(cluster.config, cluster.api), cluster.store)
    restarted.publish(request)
    assert not cluster.watcher.restore_if_dead("pvc-1")
    assert [c[0] for c in cluster.api.calls].count("create_namespaced_pod") == creates

    handoff_dir = Path(cluster.config.state_dir) / "handoff" / "pvc-1"
    assert handoff_dir.is_dir()
    cluster.node.unpublish("pvc-1", str(target))
    assert cluster.api.worker_pods() == []
    assert not handoff_dir.exists()
    assert fuse_mounts_under(cluster.root) == {}
    assert not target.exists()
    # Exactly the API surface the RBAC Role grants (tests/deploy pins the Role to the code).
    assert {c[0] for c in cluster.api.calls} == {
        "read_namespaced_pod", "list_namespaced_pod", "create_namespaced_pod", "delete_namespaced_pod"
    }
    # ...all in its own namespace but the reads of the application pod's labels (ClusterRole).
    assert {c for c in cluster.api.calls if c[1] != NAMESPACE} == {("read_namespaced_pod", "app", "web-0")}


@pytest.mark.fuse
def test_worker_pods_carry_the_volume_tuning_across_restarts(cluster: _Cluster) -> None:
    """Worker tuning reaches the pod's args, and the replacement pod's (built from the state, not an argv)."""
    require_fuse()
    target = cluster.root / "pods" / "p3" / "mount"
    context = {"backend": "memory", "cacheCoherence": "strict", "busyPollMicroseconds": "0",
               "workerMemoryLimit": "3Gi"}
    request = mounting_volume_request("vol-t", target, None, extra_context=context)
    cluster.node.publish(request)
    (pod,) = cluster.api.worker_pods()
    _validate({k: v for k, v in pod.items() if k != "status"})
    flags = {"--entry-timeout": "0.0", "--attr-timeout": "0.0", "--negative-timeout": "0.0",
             "--busy-poll-us": "0"}
    assert tuning_flags(pod["spec"]["containers"][0]["args"]) == flags
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"memory": "3Gi"}
    cluster.kubelet.processes[pod["metadata"]["name"]].kill()
    cluster.kubelet.processes[pod["metadata"]["name"]].wait()
    assert cluster.watcher.restore_if_dead("vol-t"), cluster.logs()
    (new_pod,) = cluster.api.worker_pods()
    assert new_pod["metadata"]["labels"][LABEL_INCARNATION] == "2"
    assert tuning_flags(new_pod["spec"]["containers"][0]["args"]) == flags
    assert new_pod["spec"]["containers"][0]["resources"]["limits"] == {"memory": "3Gi"}
    (target / "f").write_text("served by the restored pod")

    # A restarted csi-node reads the tuning back from the state file: the same publish is a no-op.
    restarted = NodeService(cluster.config, make_launcher(cluster.config, cluster.api), cluster.store)
    restarted.publish(request)
    assert [c[0] for c in cluster.api.calls].count("create_namespaced_pod") == 2
    cluster.node.unpublish("vol-t", str(target))


@pytest.mark.fuse
def test_a_refused_pod_leaves_nothing_mounted(cluster: _Cluster) -> None:
    require_fuse()
    cluster.api.fail_create = 403
    target = cluster.root / "pods" / "p2" / "mount"
    with pytest.raises(CsiError) as failed:
        cluster.node.publish(mounting_volume_request("vol-x", target, None, extra_context={"backend": "memory"}))
    assert failed.value.code == grpc.StatusCode.INTERNAL and "403" in failed.value.details
    assert fuse_mounts_under(cluster.root) == {} and cluster.api.worker_pods() == []
    assert cluster.store.load("vol-x") is None


def test_backing_claims_must_be_in_the_worker_namespace(cluster: _Cluster, tmp_path: Path) -> None:
    target = tmp_path / "t"
    with pytest.raises(CsiError, match="only mount claims of its own namespace") as failed:
        cluster.node.publish(mounting_volume_request("v", target, None, extra_context={"backingClaim": "other/data"}))
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(CsiError, match="exclude each other"):
        cluster.node.publish(mounting_volume_request("v", target, tmp_path, extra_context={"backingClaim": "data"}))
    assert cluster.api.calls == [("read_namespaced_pod", NAMESPACE, OWN_POD)]  # validation calls no API


def test_an_inline_volume_may_not_size_its_worker_pod(cluster: _Cluster) -> None:
    # The pod's author writes an inline volume's attributes; the worker pod's memory is the driver namespace's.
    context = {"backend": "memory", "workerMemoryLimit": "64Gi", "csi.storage.k8s.io/ephemeral": "true"}
    with pytest.raises(CsiError, match="'workerMemoryLimit'] is not allowed on an ephemeral inline volume") as failed:
        cluster.node.publish(mounting_volume_request(EPHEMERAL_ID, cluster.root / "t", None, extra_context=context))
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.api.calls == [("read_namespaced_pod", NAMESPACE, OWN_POD)]  # no pod made


def test_the_local_launcher_refuses_backing_claims(tmp_path: Path) -> None:
    config = CsiNodeConfig(state_dir=str(tmp_path / "state"))
    node = NodeService(config, make_launcher(config), StateStore(config.state_dir))
    with pytest.raises(CsiError, match="needs the Kubernetes launcher") as failed:
        node.publish(mounting_volume_request("v", tmp_path / "t", None, extra_context={"backingClaim": "data"}))
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_standalone_csi_node_pod_owns_its_workers_itself() -> None:
    api = FakeCoreV1Api()
    api.add_pod({"metadata": {"name": "solo", "namespace": NAMESPACE, "uid": OWN_UID},
                 "spec": {"containers": [{"name": "fuse-worker-image", "image": WORKER_IMAGE}]}})
    assert read_own_pod(api, NAMESPACE, "solo", "fuse-worker-image") == (
        {"apiVersion": "v1", "kind": "Pod", "name": "solo", "uid": OWN_UID}, WORKER_IMAGE
    )
    with pytest.raises(OSError, match="no container 'absent'"):
        read_own_pod(api, NAMESPACE, "solo", "absent")
    with pytest.raises(OSError, match="cannot read own pod"):
        read_own_pod(api, NAMESPACE, "missing", "fuse-worker-image")


def test_worker_pods_get_the_memory_the_csi_node_is_told_to_give() -> None:
    # A walk of millions of files makes a passthrough worker hold ~260 B per name: an admin sizes it.
    api = FakeCoreV1Api()
    api.add_pod({"metadata": {"name": "solo", "namespace": NAMESPACE, "uid": OWN_UID},
                 "spec": {"containers": [{"name": "fuse-worker-image", "image": WORKER_IMAGE}]}})
    config = CsiNodeConfig(launcher="kubernetes", pod_name="solo", pod_namespace=NAMESPACE,
                           worker_memory_request="256Mi", worker_memory_limit="4Gi")
    launcher = make_launcher(config, api)
    manifest = worker_pod_manifest(WorkerSpec(volume_id="v", backend="memory", mountpoint="/t"), launcher.settings, 1)
    _validate(manifest)
    (container,) = manifest["spec"]["containers"]
    assert container["resources"]["requests"]["memory"] == "256Mi"
    assert container["resources"]["limits"] == {"memory": "4Gi"}
    assert CsiNodeConfig().worker_memory_limit == "1Gi"
    # a volume's own limit wins; a node request above it is lowered to it (else Kubernetes refuses the pod)
    small = WorkerSpec(volume_id="v", backend="memory", mountpoint="/t", tuning=WorkerTuning(memory_limit="128Mi"))
    resources = worker_pod_manifest(small, launcher.settings, 1)["spec"]["containers"][0]["resources"]
    assert resources["limits"] == {"memory": "128Mi"} and resources["requests"]["memory"] == "128Mi"


@pytest.mark.parametrize(("fields", "message"), [
    ({"worker_memory_limit": "lots"}, "worker_memory_limit = 'lots' is not a Kubernetes quantity"),
    ({"worker_memory_limit": "100k"}, "worker_memory_limit = '100k' must be a whole number of bytes, at least 1Mi"),
    ({"worker_memory_request": "2Gi"}, "worker_memory_request 2Gi is above worker_memory_limit 1Gi"),
])
def test_bad_worker_memory_settings_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CsiNodeConfig(**fields)


def test_api_errors_become_os_errors_naming_the_call() -> None:
    api = FakeCoreV1Api()
    api.fail_create = 403
    launcher = KubernetesLauncher(api, _settings())
    with pytest.raises(OSError, match="cannot create pods"):
        launcher._call("create", "x", api.create_namespaced_pod, NAMESPACE, {"metadata": {"name": "x"}})
    assert launcher.is_running(1, "absent") is False  # 404 → gone
    assert launcher.stop(1, "absent", 0.1) is True


def test_pod_labels_are_read_once_per_pod_and_never_fail_a_publish() -> None:
    api = FakeCoreV1Api()
    api.add_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "namespace": "app",
                                                                 "labels": {"tier": "frontend"}}})
    launcher = KubernetesLauncher(api, _settings())
    assert launcher.pod_labels("app", "web-0") == {"tier": "frontend"}
    assert launcher.pod_labels("app", "gone") == {}  # 404 (or 403 without the ClusterRole): no labels
    assert launcher.pod_labels("", "") == {}  # no pod info in the volume context: no call
    assert api.calls == [("read_namespaced_pod", "app", "web-0"), ("read_namespaced_pod", "app", "gone")]
    spec = WorkerSpec(volume_id="v", backend="memory", mountpoint="/t", pod_labels={"b": "2", "a": "1"})
    args = worker_pod_manifest(spec, _settings(), 1)["spec"]["containers"][0]["args"]
    first = args.index("--pod-label")
    assert args[first:first + 4] == ["--pod-label", "a=1", "--pod-label", "b=2"]
