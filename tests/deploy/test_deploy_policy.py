"""The InterposerPolicy CRD, the policy service's RBAC and its Deployment agree with the code."""

from __future__ import annotations

import copy
import re
import typing

import msgspec
from crd_schema import PRESERVE, storage_schema, structural_errors
from deploy_support import NAMESPACE, REPO_ROOT, Manifest, find, pod_spec_of

from interposer.proto import resource, subjects
from interposer.proto.policy import (
    MAX_LAYERS,
    MAX_SELECTOR_LABELS,
    MAX_SELECTOR_PRIORITY,
    Layer,
    Policy,
    Selector,
)
from interposer.proto.resource import ResourceSpec, ResourceTarget, decode_spec

POLICY = "interposer-policy"
CRD_NAME = f"{resource.PLURAL}.{resource.GROUP}"
POLICY_SRC = REPO_ROOT / "services" / "policy" / "src" / "interposer" / "policy"


def _crd(base: list[Manifest]) -> Manifest:
    return find(base, "CustomResourceDefinition", CRD_NAME)


def _fields(struct: type[msgspec.Struct]) -> set[str]:
    return set(struct.__struct_fields__)


def test_crd_names_are_the_contract(base: list[Manifest]) -> None:
    spec = _crd(base)["spec"]
    assert spec["group"] == resource.GROUP and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        resource.KIND, resource.PLURAL, resource.SINGULAR)
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (resource.VERSION, True, True)
    assert version["subresources"] == {"status": {}}, (
        "status must be a subresource (the service patches it alone)")


def test_crd_schema_is_structural(base: list[Manifest]) -> None:
    schema = storage_schema(_crd(base))
    assert structural_errors(schema) == []
    broken = copy.deepcopy(schema)
    del broken["properties"]["status"]["properties"]["revision"]["type"]
    broken["properties"]["spec"]["properties"]["target"]["oneOf"][0]["type"] = "object"
    assert structural_errors(broken) == [
        "spec.target.oneOf[0]: may not use ['type']", "status.revision: no type"]


def test_crd_schema_follows_the_decoder(base: list[Manifest]) -> None:
    """Field names, layer types and bounds are the decoder's, so the two cannot drift apart."""
    spec = storage_schema(_crd(base))["properties"]["spec"]
    assert set(spec["properties"]) == _fields(ResourceSpec)
    target = spec["properties"]["target"]
    assert set(target["properties"]) == _fields(ResourceTarget)
    assert target["properties"]["volume"]["pattern"] == subjects.VOLUME_ID_PATTERN.pattern
    selector = target["properties"]["selector"]
    assert set(selector["properties"]) == _fields(Selector)
    assert selector["properties"]["labels"]["maxProperties"] == MAX_SELECTOR_LABELS
    policy = spec["properties"]["policy"]
    assert set(policy["properties"]) == _fields(Policy)
    layers = policy["properties"]["layers"]
    assert layers["maxItems"] == MAX_LAYERS
    tags = {kind.__struct_config__.tag for kind in typing.get_args(Layer)}
    assert set(layers["items"]["properties"]["type"]["enum"]) == tags
    priority = spec["properties"]["priority"]
    assert (priority["minimum"], priority["maximum"]) == (-MAX_SELECTOR_PRIORITY, MAX_SELECTOR_PRIORITY)
    # Unknown fields are kept for the decoder to name, never pruned (see the CRD's comment).
    for node in (spec, target, target["properties"]["selector"], policy, layers["items"]):
        assert node.get(PRESERVE) is True


def test_example_resources_are_accepted_by_the_decoder(examples: list[Manifest]) -> None:
    policies = [o for o in examples if o["kind"] == resource.KIND]
    assert policies, "deploy/examples has no InterposerPolicy"
    for obj in policies:
        assert obj["apiVersion"] == resource.API_VERSION
        decode_spec(obj["spec"])  # raises PolicyError naming the field


#: Verb of each ``CustomObjectsApi`` method prefix, and the resource of its suffix.
API_METHOD_VERBS = {"create": "create", "get": "get", "list": "list", "delete": "delete",
                    "patch": "patch", "replace": "update"}


def _policy_api_calls() -> set[tuple[str, str]]:
    """(resource, verb) of every Kubernetes API call in the policy service's code.

    Calls are ``api.<method>`` / ``self.api.<method>`` of a ``CustomObjectsApi``
    (called or passed on); a file using ``Watch()`` also watches what it lists.
    """
    calls = set()
    for path in POLICY_SRC.glob("*.py"):
        text = path.read_text()
        for method in re.findall(r"\b(?:self\.)?api\.(\w+)", text):
            match = re.fullmatch(r"(create|get|list|delete|patch|replace)_(?:cluster|namespaced)"
                                 r"_custom_object(_status)?", method)
            assert match, f"{path.name}: unknown API method {method}: add it to this test's mapping"
            verb, status = match.groups()
            res = resource.PLURAL + ("/status" if status else "")
            calls.add((res, API_METHOD_VERBS[verb]))
            if verb == "list" and "Watch()" in text:
                calls.add((res, "watch"))
    return calls


def test_policy_rbac_grants_exactly_the_calls_of_the_code(base: list[Manifest]) -> None:
    role = find(base, "ClusterRole", POLICY)
    granted = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [resource.GROUP], f"unexpected rule {rule}"
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        granted |= {(res, verb) for res in rule["resources"] for verb in rule["verbs"]}
    called = _policy_api_calls()
    assert called, "found no API calls in the policy service: the scan is broken"
    assert called == granted, (f"code calls {sorted(called - granted)} without a rule; "
                               f"rules {sorted(granted - called)} are unused")
    binding = find(base, "ClusterRoleBinding", POLICY)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": POLICY}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": POLICY, "namespace": NAMESPACE}]
    assert not [o for o in base if o["kind"] in ("Role", "RoleBinding") and o["metadata"]["name"] == POLICY]


def test_policy_deployment_reconciles_with_its_own_token(base: list[Manifest]) -> None:
    pod = pod_spec_of(find(base, "Deployment", POLICY))
    assert pod["serviceAccountName"] == POLICY and pod["automountServiceAccountToken"] is True
    assert find(base, "ServiceAccount", POLICY).get("automountServiceAccountToken", True) is True
    (container,) = pod["containers"]
    assert "--kubernetes" in container["args"] and "--kubeconfig" not in container["args"]
