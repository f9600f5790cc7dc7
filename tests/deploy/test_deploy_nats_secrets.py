"""The cluster install creates its own NATS Secrets: `skaffold run` needs no manual step."""

from __future__ import annotations

import re

from deploy_support import NAMESPACE, REPO_ROOT, Manifest, find, pod_spec_of
from interposer.proto.connection import NATS_ROLES, nats_secret_name

NATS_SECRETS_SRC = REPO_ROOT / "services" / "policy" / "src" / "interposer" / "policy" / "nats_secrets.py"


def _referenced_secrets(objects: list[Manifest]) -> set[str]:
    """Names of the Secrets any pod template reads, by volume or ``secretKeyRef``."""
    names = set()
    for obj in objects:
        spec = pod_spec_of(obj)
        if spec is None:
            continue
        names |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                      if "secretKeyRef" in e.get("valueFrom", {})}
    return names


def test_every_secret_the_pods_read_is_one_the_install_creates(base: list[Manifest]) -> None:
    created = {nats_secret_name(role) for role in NATS_ROLES}
    referenced = _referenced_secrets(base)
    assert referenced, "found no Secret references: the scan is broken"
    assert referenced <= created, f"pods read Secrets nobody creates: {sorted(referenced - created)}"
    assert not [o for o in base if o["kind"] == "Secret"], "no password may be committed as a manifest"


def test_nats_pod_creates_the_secrets_before_the_server_starts(base: list[Manifest]) -> None:
    spec = pod_spec_of(find(base, "StatefulSet", "nats"))
    (init,) = spec["initContainers"]
    assert init["image"] == "interposer-policy", "built by skaffold from services/policy"
    assert init["command"] == ["python", "-m", "interposer.policy.nats_secrets"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in init["env"]
    # Only the init container holds an API token; the server never does.
    assert find(base, "ServiceAccount", "nats").get("automountServiceAccountToken") is False
    token_mounts = [m for m in init["volumeMounts"] if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"]
    assert len(token_mounts) == 1
    token_volume = next(v for v in spec["volumes"] if v["name"] == token_mounts[0]["name"])
    assert any("serviceAccountToken" in s for s in token_volume["projected"]["sources"])
    server = next(c for c in spec["containers"] if c["name"] == "nats")
    assert token_mounts[0]["name"] not in {m["name"] for m in server.get("volumeMounts", [])}


def test_nats_secrets_rbac_grants_exactly_the_calls_of_the_code(base: list[Manifest]) -> None:
    calls = set(re.findall(r"\bcore_api\.(\w+)", NATS_SECRETS_SRC.read_text()))
    assert calls == {"create_namespaced_secret"}, f"update this test and the Role for {calls}"
    role = find(base, "Role", "interposer-nats-secrets")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
    binding = find(base, "RoleBinding", "interposer-nats-secrets")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nats", "namespace": NAMESPACE}]
