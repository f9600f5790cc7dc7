"""A fake Kubernetes API server and kubelet for the Kubernetes launcher's tests.

No API server runs here, so :class:`FakeCoreV1Api` stands in for
``kubernetes.client.CoreV1Api``: the methods the launcher calls, same
signatures, answers as the real client's models (deserialized by the real
``ApiClient``) and errors as its ``ApiException``. Every call is recorded.

:class:`FakeKubelet` runs a created pod's container as what the real kubelet
would run: a real fuse-worker process with the pod's args, its volume mounts
translated to the host paths behind them (``hostPath`` as is, a
``persistentVolumeClaim`` through a claim → directory table), under
``setpriv`` without ``CAP_SYS_ADMIN`` (the pod's securityContext grants none).
Pod status follows the process: Running while it lives, Failed/Succeeded after.
"""

from __future__ import annotations

import copy
import fnmatch
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, V1PodList
from kubernetes.client.exceptions import ApiException

#: What the worker container runs (its image's ENTRYPOINT), unprivileged.
WORKER_ENTRYPOINT = [
    "setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all", "--no-new-privs", "--",
    sys.executable, "-m", "interposer.fuse_worker",
]

_client = ApiClient()


def _model(pod: dict[str, Any]) -> Any:
    return _client._ApiClient__deserialize(copy.deepcopy(pod), "V1Pod")  # the real client's decoding


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selector (``a=b,c=d``), as the launcher uses."""
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubelet:
    """Runs pods' worker containers as local processes (see the module docstring).

    Args:
        claims: PersistentVolumeClaim name → directory standing for its volume.
        log_dir: where each pod's container output goes (``<pod name>.log``).
    """

    def __init__(self, claims: dict[str, Path], log_dir: Path) -> None:
        self.claims = claims
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def run(self, pod: dict[str, Any]) -> None:
        sources = {volume["name"]: self._host_path(volume) for volume in pod["spec"]["volumes"]}
        (container,) = pod["spec"]["containers"]
        mounts = {m["mountPath"]: sources[m["name"]] for m in container.get("volumeMounts", [])}
        args = []
        for arg in container["args"]:
            for mount_path, host_path in mounts.items():
                if arg == mount_path or arg.startswith(mount_path + "/"):
                    arg = host_path + arg[len(mount_path):]
            args.append(arg)
        name = pod["metadata"]["name"]
        with open(self.log_dir / f"{name}.log", "wb") as log_file:
            self.processes[name] = subprocess.Popen(
                [*WORKER_ENTRYPOINT, *args], stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _host_path(self, volume: dict[str, Any]) -> str:
        if "hostPath" in volume:
            assert Path(volume["hostPath"]["path"]).is_dir(), volume
            return volume["hostPath"]["path"]
        claim = volume["persistentVolumeClaim"]["claimName"]
        return str(self.claims[claim])

    def status(self, pod: dict[str, Any]) -> dict[str, Any]:
        process = self.processes.get(pod["metadata"]["name"])
        if process is None:
            return {"phase": "Pending"}
        code = process.poll()
        if code is None:
            state = {"running": {}}
            phase = "Running"
        else:
            state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
            phase = "Succeeded" if code == 0 else "Failed"
        return {"phase": phase, "containerStatuses": [
            {"name": "fuse-worker", "image": "x", "imageID": "", "ready": code is None, "restartCount": 0,
             "state": state}
        ]}

    def kill(self, name: str, grace_s: int) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=max(grace_s, 1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill_all(self) -> None:
        for name in list(self.processes):
            self.kill(name, 0)


class FakeCoreV1Api:
    """The ``CoreV1Api`` pod methods the launcher calls, over an in-memory store (no API server here).

    Attributes:
        pods: ``(namespace, name)`` → pod manifest (as created, plus uid).
        calls: ``(method, namespace, name or selector)`` in call order.
        fail_create: if set, ``create_namespaced_pod`` raises ``ApiException`` with this status.
    """

    def __init__(self, kubelet: FakeKubelet | None = None) -> None:
        self.kubelet = kubelet
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.fail_create: int | None = None

    def add_pod(self, pod: dict[str, Any]) -> None:
        """Add a pod the launcher did not create (the csi-node's own)."""
        self.pods[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = pod

    def _with_status(self, pod: dict[str, Any]) -> Any:
        pod = copy.deepcopy(pod)
        labels = pod["metadata"].get("labels", {})
        if self.kubelet is not None and labels.get("app.kubernetes.io/component") == "fuse-worker":
            pod["status"] = self.kubelet.status(pod)
        return _model(pod)

    def create_namespaced_pod(self, namespace: str, body: dict[str, Any], **kwargs: Any) -> Any:
        name = body["metadata"]["name"]
        self.calls.append(("create_namespaced_pod", namespace, name))
        if self.fail_create is not None:
            raise ApiException(status=self.fail_create, reason="Forbidden")
        if body["metadata"].get("namespace", namespace) != namespace:
            raise ApiException(status=400, reason="the namespace of the object does not match")
        if (namespace, name) in self.pods:
            raise ApiException(status=409, reason="AlreadyExists")
        pod = copy.deepcopy(body)
        pod["metadata"]["uid"] = str(uuid.uuid4())
        self.pods[(namespace, name)] = pod
        if self.kubelet is not None:
            self.kubelet.run(pod)
        return self._with_status(pod)

    def read_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self.calls.append(("read_namespaced_pod", namespace, name))
        pod = self.pods.get((namespace, name))
        if pod is None:
            raise ApiException(status=404, reason="Not Found")
        return self._with_status(pod)

    def list_namespaced_pod(self, namespace: str, label_selector: str = "", **kwargs: Any) -> Any:
        self.calls.append(("list_namespaced_pod", namespace, label_selector))
        items = [
            self._with_status(pod)
            for (ns, _name), pod in sorted(self.pods.items())
            if ns == namespace and _matches(pod["metadata"].get("labels", {}), label_selector)
        ]
        return V1PodList(items=items)

    def delete_namespaced_pod(self, name: str, namespace: str, grace_period_seconds: int | None = None,
                              **kwargs: Any) -> Any:
        self.calls.append(("delete_namespaced_pod", namespace, name))
        pod = self.pods.pop((namespace, name), None)
        if pod is None:
            raise ApiException(status=404, reason="Not Found")
        if self.kubelet is not None:
            self.kubelet.kill(name, grace_period_seconds or 0)
        return None

    def worker_pods(self) -> list[dict[str, Any]]:
        """The worker pods that exist now."""
        return [p for p in self.pods.values() if fnmatch.fnmatch(p["metadata"]["name"], "interposer-worker-*")]
