"""Every rendered object is valid Kubernetes; skaffold.yaml is valid skaffold."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from crd_schema import load_crd, storage_schema, validation_errors
from deploy_support import KUBERNETES_VERSION, KUSTOMIZATIONS, NAMESPACE, Manifest, find
from operator_schemas import SCHEMAS as OPERATOR_SCHEMAS

#: Kinds each kustomization must contain at least once (what the deployment is for).
REQUIRED_KINDS = {
    "deploy/base": {
        "Namespace",
        "CSIDriver",
        "StorageClass",
        "DaemonSet",
        "StatefulSet",
        "Deployment",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
    },
    "deploy/overlays/dev": {"CSIDriver", "DaemonSet", "StatefulSet", "Deployment"},
    "deploy/overlays/monitoring": {"CSIDriver", "DaemonSet", "StatefulSet", "Deployment", "ConfigMap"},
    "deploy/overlays/prometheus-operator": {"CSIDriver", "DaemonSet", "ServiceMonitor", "PrometheusRule", "ConfigMap"},
    "deploy/examples": {"Pod", "InterposerPolicy"},
    "deploy/examples/stacked-pvc": {"StorageClass", "PersistentVolumeClaim", "Job"},
    "deploy/examples/minio-warp": {"PersistentVolumeClaim", "Deployment", "Service", "Job", "Secret"},
    "deploy/examples/shared-strict": {"StorageClass", "PersistentVolumeClaim", "Pod"},
}
CLUSTER_SCOPED = {"Namespace", "CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition"}
#: Custom resources of this repository: (apiVersion, kind) → their CRD's schema.
_CRD = load_crd()
CUSTOM_SCHEMAS = {
    (f"{_CRD['spec']['group']}/{v['name']}", _CRD["spec"]["names"]["kind"]): v["schema"]["openAPIV3Schema"]
    for v in _CRD["spec"]["versions"] if v["served"]
} | OPERATOR_SCHEMAS


def validate_k8s(obj: Manifest) -> None:
    """Validate ``obj`` strictly (unknown fields rejected) against the Kubernetes schemas.

    Raises:
        AssertionError: the object is invalid or its kind/apiVersion has no schema.
    """
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    custom = CUSTOM_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if custom is not None:  # kubernetes-validate knows only built-in kinds: use the CRD's own schema
        errors = validation_errors(custom, obj)
        if errors:
            raise AssertionError(f"{name}: invalid at " + "; ".join(errors))
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(f"{name}: no schema, so it cannot be checked: {exc.message}") from None
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise AssertionError(f"{name}: invalid at {path or '<root>'}: {exc.message}") from None


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_renders(path: str, all_rendered: dict[str, list[Manifest]]) -> None:
    objects = all_rendered[path]
    kinds = {o["kind"] for o in objects}
    missing = REQUIRED_KINDS[path] - kinds
    assert not missing, f"{path} renders no {sorted(missing)}"
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), f"{path} renders duplicate objects"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_object_validates(path: str, all_rendered: dict[str, list[Manifest]]) -> None:
    errors = []
    for obj in all_rendered[path]:
        try:
            validate_k8s(obj)
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, f"{path}:\n" + "\n".join(errors)


def test_validator_rejects_bad_objects(base: list[Manifest]) -> None:
    """The validation above is not vacuous: a typo, a wrong type and an unknown kind all fail,
    and so do a custom resource against its CRD and an unknown field of it."""
    daemonset = copy.deepcopy(find(base, "DaemonSet", "interposer-csi-node"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["mountPropagaton"] = "Bidirectional"
    with pytest.raises(AssertionError, match="mountPropagaton"):
        validate_k8s(daemonset)
    csidriver = copy.deepcopy(find(base, "CSIDriver", "fs.interposer.io"))
    csidriver["spec"]["attachRequired"] = "no"
    with pytest.raises(AssertionError, match="invalid at spec/attachRequired"):
        validate_k8s(csidriver)
    policy = {"apiVersion": "interposer.io/v1alpha1", "kind": "InterposerPolicy", "metadata": {"name": "x"},
              "spec": {"target": {"volume": "v"}, "policy": {"layers": [{"type": "faulty"}]}}}
    with pytest.raises(AssertionError, match="spec.policy.layers.0.type: 'faulty' is not one of"):
        validate_k8s(policy)
    policy["spec"]["policy"]["layers"][0]["type"] = "fault"
    policy["status"] = {"revison": 3}
    with pytest.raises(AssertionError, match="status.revison: unknown field"):
        validate_k8s(policy)
    unknown: dict[str, Any] = {"apiVersion": "example.io/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    with pytest.raises(AssertionError, match="no schema"):
        validate_k8s(unknown)


@pytest.mark.parametrize("path", ["deploy/base", "deploy/overlays/dev", "deploy/overlays/monitoring"])
def test_namespaced_objects_in_interposer_system(path: str, all_rendered: dict[str, list[Manifest]]) -> None:
    for obj in all_rendered[path]:
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED:
            assert ns is None, f"cluster-scoped {obj['kind']}/{obj['metadata']['name']} has a namespace"
        else:
            assert ns == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']} is in {ns!r}, not {NAMESPACE}"


@pytest.mark.parametrize("path", ["deploy/overlays/dev", "deploy/overlays/monitoring"])
def test_overlays_keep_every_base_object(
    path: str, base: list[Manifest], all_rendered: dict[str, list[Manifest]]
) -> None:
    def key(o: Manifest) -> tuple[str, str]:
        # Generated ConfigMaps get a content hash suffix that patches may change.
        name = o["metadata"]["name"]
        return o["kind"], name.rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else name

    missing = {key(o) for o in base} - {key(o) for o in all_rendered[path]}
    assert not missing, f"{path} drops base objects {sorted(missing)}"


def test_skaffold_yaml_matches_schema(
    skaffold_config: dict[str, Any], skaffold_schema: dict[str, Any]
) -> None:
    validator_cls = jsonschema.validators.validator_for(skaffold_schema)
    validator_cls.check_schema(skaffold_schema)
    errors = sorted(validator_cls(skaffold_schema).iter_errors(skaffold_config), key=lambda e: list(e.path))
    assert not errors, "skaffold.yaml:\n" + "\n".join(
        f"at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors
    )
    assert skaffold_config["apiVersion"] == "skaffold/v4beta13"
    assert skaffold_config["kind"] == "Config"


def test_skaffold_schema_rejects_typos(
    skaffold_config: dict[str, Any], skaffold_schema: dict[str, Any]
) -> None:
    """The schema check is not vacuous: a misspelt key fails it."""
    bad = copy.deepcopy(skaffold_config)
    bad["build"]["artifacts"][0]["docker"]["dockerFile"] = bad["build"]["artifacts"][0]["docker"].pop(
        "dockerfile"
    )
    validator = jsonschema.validators.validator_for(skaffold_schema)(skaffold_schema)
    assert not validator.is_valid(bad)
