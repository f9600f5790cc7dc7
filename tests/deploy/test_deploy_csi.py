"""The CSI pieces agree with each other: driver name, node DaemonSet, RBAC, examples."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_support import DEPLOY_DIR, NAMESPACE, REPO_ROOT, Manifest, find, pod_spec_of
from interposer.csi_node import CsiError
from interposer.csi_node._controller import volume_context_for
from interposer.proto.policy import decode_policy

DAEMONSET = "interposer-csi-node"
CSI_NODE_ARGS = [
    "--endpoint",
    "unix:///csi/csi.sock",
    "--nodeid",
    "$(NODE_NAME)",
    "--nats-url",
    f"nats://nats.{NAMESPACE}.svc:4222",
]
CSI_NODE_SRC = REPO_ROOT / "services" / "csi-node" / "src" / "interposer" / "csi_node"


def _container(pod_spec: dict, name: str) -> dict:
    hits = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(hits) == 1, f"expected one container named {name}"
    return hits[0]


def _volume_source(pod_spec: dict, container: dict, mount_path: str) -> tuple[dict, dict]:
    """Return (volumeMount, volume) of the mount of ``container`` at ``mount_path``."""
    mounts = [
        m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == mount_path.rstrip("/")
    ]
    assert len(mounts) == 1, f"container {container['name']} mounts nothing at {mount_path}"
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    return mounts[0], volumes[mounts[0]["name"]]


@pytest.fixture(scope="module")
def node_pod(base: list[Manifest]) -> dict:
    return pod_spec_of(find(base, "DaemonSet", DAEMONSET))


def test_csidriver_spec(base: list[Manifest], driver_name: str) -> None:
    spec = find(base, "CSIDriver", driver_name)["spec"]
    assert driver_name == "fs.interposer.io"
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert sorted(spec["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]


def test_storageclass_uses_driver(base: list[Manifest], driver_name: str) -> None:
    assert find(base, "StorageClass", "interposer")["provisioner"] == driver_name


def test_csi_node_container(node_pod: dict, driver_name: str) -> None:
    csi = _container(node_pod, "csi-node")
    assert csi["image"] == "interposer-csi-node"
    assert csi["args"][: len(CSI_NODE_ARGS)] == CSI_NODE_ARGS
    env = {e["name"]: e for e in csi["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert csi["securityContext"]["privileged"] is True, (
        "FUSE mounts with Bidirectional propagation need privileged"
    )

    mount, volume = _volume_source(node_pod, csi, "/csi")
    assert volume["hostPath"]["path"].rstrip("/") == f"/var/lib/kubelet/plugins/{driver_name}"
    mount, volume = _volume_source(node_pod, csi, "/var/lib/kubelet")
    assert volume["hostPath"]["path"] == "/var/lib/kubelet"
    assert mount["mountPropagation"] == "Bidirectional"
    mount, volume = _volume_source(node_pod, csi, "/dev/fuse")
    assert volume["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}


def test_worker_image_is_named_in_the_pod(node_pod: dict) -> None:
    """The Kubernetes launcher finds the worker image through a container of its own pod."""
    csi = _container(node_pod, "csi-node")
    env = {e["name"]: e.get("value") for e in csi["env"]}
    holder = env["INTERPOSER_WORKER_IMAGE_CONTAINER"]
    images = {c["name"]: c["image"] for c in node_pod.get("initContainers", []) + node_pod["containers"]}
    assert images.get(holder) == "interposer-fuse-worker"


def test_registrar_sidecar(node_pod: dict, driver_name: str) -> None:
    reg = _container(node_pod, "node-driver-registrar")
    assert re.fullmatch(
        r"registry\.k8s\.io/sig-storage/csi-node-driver-registrar:v\d+\.\d+\.\d+", reg["image"]
    )
    assert "--csi-address=/csi/csi.sock" in reg["args"]
    assert f"--kubelet-registration-path=/var/lib/kubelet/plugins/{driver_name}/csi.sock" in reg["args"]
    _, volume = _volume_source(node_pod, reg, "/registration")
    assert volume["hostPath"]["path"].rstrip("/") == "/var/lib/kubelet/plugins_registry"
    _, volume = _volume_source(node_pod, reg, "/csi")
    assert volume["hostPath"]["path"].rstrip("/") == f"/var/lib/kubelet/plugins/{driver_name}"


def test_livenessprobe_sidecar_serves_the_probed_port(node_pod: dict) -> None:
    probe = _container(node_pod, "liveness-probe")
    assert re.fullmatch(r"registry\.k8s\.io/sig-storage/livenessprobe:v\d+\.\d+\.\d+", probe["image"])
    assert "--csi-address=/csi/csi.sock" in probe["args"]
    health_port = int(next(a for a in probe["args"] if a.startswith("--health-port=")).split("=", 1)[1])
    csi = _container(node_pod, "csi-node")
    ports = {p["name"]: p["containerPort"] for p in csi["ports"]}
    http_get = csi["livenessProbe"]["httpGet"]
    assert http_get["path"] == "/healthz"
    assert ports[http_get["port"]] == health_port


#: csi-provisioner's rules (its deploy/kubernetes/rbac.yaml, minus snapshots,
#: secrets, volume attachments and capacity, which interposer does not use):
#: (apiGroup, resource) → verbs. Exactly these, nothing more.
PROVISIONER_CLUSTER_RULES = {
    ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
    ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
    ("", "events"): {"list", "watch", "create", "update", "patch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
}
PROVISIONER_LEADER_RULES = {
    ("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update", "create"}
}
CONTROLLER = "interposer-csi-controller"


def _rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_controller_rbac_is_what_csi_provisioner_documents(base: list[Manifest]) -> None:
    cluster_roles = [o for o in base if o["kind"] == "ClusterRole"]
    names = sorted(r["metadata"]["name"] for r in cluster_roles)
    assert names == ["interposer-csi-node-pod-labels", "interposer-csi-provisioner", "interposer-policy"], (
        "only csi-provisioner, the policy service (InterposerPolicy in every namespace, "
        "test_deploy_policy) and the csi-node's pod label read need cluster-wide permissions"
    )
    assert _rules_of(find(base, "ClusterRole", "interposer-csi-provisioner")) == PROVISIONER_CLUSTER_RULES
    binding = find(base, "ClusterRoleBinding", "interposer-csi-provisioner")
    assert binding["roleRef"]["name"] == "interposer-csi-provisioner"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}]
    leader = find(base, "Role", "interposer-csi-provisioner-leader")
    assert _rules_of(leader) == PROVISIONER_LEADER_RULES
    leader_binding = find(base, "RoleBinding", "interposer-csi-provisioner-leader")
    assert leader_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}
    ]
    assert pod_spec_of(find(base, "Deployment", CONTROLLER))["serviceAccountName"] == CONTROLLER


def test_controller_deployment(base: list[Manifest], driver_name: str) -> None:
    pod = pod_spec_of(find(base, "Deployment", CONTROLLER))
    controller = _container(pod, "csi-controller")
    assert controller["image"] == "interposer-csi-node"
    assert controller["args"][:4] == ["--mode", "controller", "--endpoint", "unix:///csi/csi.sock"]
    provisioner = _container(pod, "csi-provisioner")
    assert provisioner["image"].startswith("registry.k8s.io/sig-storage/csi-provisioner:v")
    assert "--csi-address=/csi/csi.sock" in provisioner["args"]
    assert "--leader-election" in provisioner["args"]
    for container in (controller, provisioner):
        _volume_source(pod, container, "/csi")
    assert find(base, "StorageClass", "interposer")["parameters"]["backend"] == "hostPath"


#: Verb of each ``CoreV1Api`` method prefix (the Kubernetes API's verbs).
API_METHOD_VERBS = {"create": "create", "read": "get", "list": "list", "delete": "delete",
                    "patch": "patch", "replace": "update", "watch": "watch"}
#: Resource of each ``CoreV1Api`` method suffix.
API_METHOD_RESOURCES = {"pod": "pods"}


def _csi_node_api_calls() -> set[tuple[str, str]]:
    """(resource, verb) of every Kubernetes API call in the csi-node's code.

    Calls are ``api.<method>`` / ``self._api.<method>`` of a ``CoreV1Api``
    (called or passed on); a file using ``watch=True`` or ``Watch()`` also
    watches every resource it lists.
    """
    calls = set()
    for path in CSI_NODE_SRC.glob("*.py"):
        text = path.read_text()
        for method in re.findall(r"\b(?:self\._api|api)\.(\w+)", text):
            match = re.fullmatch(r"(create|read|list|delete|patch|replace)_namespaced_(\w+)", method)
            assert match, f"{path.name}: unknown API method {method}: add it to this test's mapping"
            verb, kind = match.groups()
            resource = API_METHOD_RESOURCES[kind]
            calls.add((resource, API_METHOD_VERBS[verb]))
            if verb == "list" and ("watch=True" in text or "Watch()" in text):
                calls.add((resource, "watch"))
    return calls


#: The ClusterRole of the csi-node's one call outside its namespace: the application pod's labels.
LABELS_ROLE = "interposer-csi-node-pod-labels"


def test_node_rbac_grants_exactly_the_calls_of_the_code(base: list[Manifest]) -> None:
    """Every API call of the csi-node has a Role rule, and every rule a call."""
    role = find(base, "Role", DAEMONSET)
    assert role["metadata"]["namespace"] == NAMESPACE
    granted = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], f"unexpected rule {rule}"
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        granted |= {(resource, verb) for resource in rule["resources"] for verb in rule["verbs"]}
    called = _csi_node_api_calls()
    assert called, "found no API calls in the csi-node: the scan is broken"
    assert called == granted, f"code calls {sorted(called - granted)} without a rule; rules {sorted(granted - called)} are unused"
    cluster_bindings = [o for o in base if o["kind"] == "ClusterRoleBinding" and any(
        s.get("name") == DAEMONSET for s in o.get("subjects", []))]
    assert [b["roleRef"]["name"] for b in cluster_bindings] == [LABELS_ROLE], (
        "the csi-node's only cluster-wide right is reading application pods' labels")
    assert cluster_bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": DAEMONSET,
                                                "namespace": NAMESPACE}]
    assert _rules_of(find(base, "ClusterRole", LABELS_ROLE)) == {("", "pods"): {"get"}}
    assert re.search(r"self\._api\.read_namespaced_pod\(name, namespace\)",
                     (CSI_NODE_SRC / "_kubernetes.py").read_text()), (
        "the cluster-wide get is for pod_labels(): read_namespaced_pod(name, namespace)")

    binding = find(base, "RoleBinding", DAEMONSET)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DAEMONSET}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": DAEMONSET, "namespace": NAMESPACE}]
    assert pod_spec_of(find(base, "DaemonSet", DAEMONSET))["serviceAccountName"] == DAEMONSET


def test_other_components_have_no_api_token(base: list[Manifest]) -> None:
    for obj in base:
        pod = pod_spec_of(obj)
        # The policy service's token is checked in test_deploy_policy.
        exempt = obj["kind"] == "DaemonSet" or obj["metadata"]["name"] in (CONTROLLER, "interposer-policy")
        if pod is None or exempt:
            continue
        assert pod.get("automountServiceAccountToken") is False, (
            f"{obj['kind']}/{obj['metadata']['name']} mounts an API token"
        )


def test_every_rbac_rule_is_explained() -> None:
    """Each RBAC rule in deploy/ is preceded by a comment saying why it is needed."""
    checked = 0
    for path in sorted(DEPLOY_DIR.rglob("*.yaml")):
        text = path.read_text()
        if not {doc.get("kind") for doc in yaml.safe_load_all(text) if doc} & {"Role", "ClusterRole"}:
            continue
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*- apiGroups:", line):
                checked += 1
                assert lines[i - 1].strip().startswith("#"), (
                    f"{path.relative_to(REPO_ROOT)}:{i + 1}: RBAC rule without a comment saying why"
                )
    assert checked, "no RBAC rules found under deploy/"


def test_examples_use_the_driver(examples: list[Manifest], driver_name: str) -> None:
    inline = []
    for obj in examples:
        pod = pod_spec_of(obj)
        for volume in (pod or {}).get("volumes", []):
            if "csi" in volume:
                inline.append(volume["csi"])
                assert volume["csi"]["driver"] == driver_name
    assert inline, "deploy/examples has no pod with an inline CSI volume"
    for csi in inline:
        attrs = csi["volumeAttributes"]
        assert attrs["backingPath"].startswith("/var/lib/interposer/"), (
            "the node plugin mounts only /var/lib/interposer"
        )
        decode_policy(attrs["policy"])  # raises PolicyError naming the field


def test_the_controller_accepts_every_storage_class(
    all_rendered: dict[str, list[Manifest]], driver_name: str
) -> None:
    """CreateVolume would turn each StorageClass of the driver into a volume context (no INVALID_ARGUMENT)."""
    classes = [
        obj for objects in all_rendered.values() for obj in objects
        if obj["kind"] == "StorageClass" and obj["provisioner"] == driver_name
    ]
    assert len(classes) >= 3, "the base StorageClass and the examples' are missing"
    for storage_class in classes:
        try:
            volume_context_for("pvc-example", storage_class["parameters"])
        except CsiError as exc:
            pytest.fail(f"StorageClass {storage_class['metadata']['name']}: {exc.details}")


def test_example_backing_paths_exist_on_every_node(examples: list[Manifest], node_pod: dict) -> None:
    """csi-node requires backingPath to be an existing directory it can see."""
    csi = _container(node_pod, "csi-node")
    _, volume = _volume_source(node_pod, csi, "/var/lib/interposer")
    assert volume["hostPath"]["path"] == "/var/lib/interposer"
    created = {
        v["hostPath"]["path"].rstrip("/")
        for v in node_pod["volumes"]
        if v.get("hostPath", {}).get("type") == "DirectoryOrCreate"
    }
    for obj in examples:
        for v in (pod_spec_of(obj) or {}).get("volumes", []):
            if "csi" in v:
                assert v["csi"]["volumeAttributes"]["backingPath"].rstrip("/") in created, (
                    "an example's backingPath must be a directory the DaemonSet creates"
                )


def test_driver_name_in_python_sources(driver_name: str) -> None:
    """Once the csi-node package exists, its sources must define the same driver name."""
    sources = sorted(CSI_NODE_SRC.rglob("*.py")) if CSI_NODE_SRC.is_dir() else []
    if not sources:
        # The csi-node package is being written; nothing to compare with yet.
        return
    assert any(driver_name in p.read_text() for p in sources), (
        f"no module under {CSI_NODE_SRC.relative_to(REPO_ROOT)} mentions {driver_name!r}; "
        "the driver name must match deploy/base/csi-driver.yaml"
    )


def test_no_other_driver_name_in_deploy(driver_name: str, base: list[Manifest]) -> None:
    """Every *.interposer.io driver-like name in deploy/ is the one driver name (or a CRD's name)."""
    crd_names = {o["metadata"]["name"] for o in base if o["kind"] == "CustomResourceDefinition"}
    for path in DEPLOY_DIR.rglob("*"):
        if path.suffix in {".yaml", ".yml"}:
            for hit in re.findall(r"\b[a-z0-9-]+\.interposer\.io\b", path.read_text()):
                assert hit in {driver_name} | crd_names, f"{path.relative_to(REPO_ROOT)} names driver {hit!r}"
