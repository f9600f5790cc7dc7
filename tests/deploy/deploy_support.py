"""Constants and helpers shared by the deploy tests (fixtures are in conftest.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
#: The CI clone has the shared material beside the repository (``../shared``).
SKAFFOLD_SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "skaffold-v4beta13.json"
#: Kubernetes version whose schemas the manifests must satisfy (kubernetes-validate ships it).
KUBERNETES_VERSION = "1.33"
NAMESPACE = "interposer-system"
#: Every kustomization a user may apply, relative to the repository root.
KUSTOMIZATIONS = (
    "deploy/base", "deploy/overlays/dev", "deploy/overlays/monitoring", "deploy/overlays/prometheus-operator",
    "deploy/examples",
    "deploy/examples/stacked-pvc", "deploy/examples/minio-warp", "deploy/examples/shared-strict",
)
#: Python package of each service (``python -m interposer.<package>``), by folder under services/.
SERVICES = {
    "csi-node": "csi_node",
    "fuse-worker": "fuse_worker",
    "policy": "policy",
    "collector": "collector",
}
KUBECTL_TIMEOUT_S = 60

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Container:
    """One container (or init container) of a rendered workload.

    Attributes:
        owner: ``Kind/name`` of the object holding the pod template.
        init: True for an init container.
        spec: the container as rendered (``name``, ``image``, ``args``…).
        pod_spec: the pod spec it belongs to (volumes, securityContext).
    """

    owner: str
    init: bool
    spec: dict[str, Any]
    pod_spec: dict[str, Any]


def pod_spec_of(obj: Manifest) -> dict[str, Any] | None:
    """Return the pod spec of a Pod or of a workload's pod template, else None."""
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def containers_of(objects: list[Manifest]) -> Iterator[Container]:
    """Yield every container and init container of every workload in ``objects``."""
    for obj in objects:
        pod = pod_spec_of(obj)
        if pod is None:
            continue
        owner = f"{obj['kind']}/{obj['metadata']['name']}"
        for init, key in ((True, "initContainers"), (False, "containers")):
            for spec in pod.get(key) or []:
                yield Container(owner=owner, init=init, spec=spec, pod_spec=pod)


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    """Return the one object of ``kind`` named ``name``; fail the test if absent."""
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(hits) != 1:
        pytest.fail(f"expected exactly one {kind}/{name}, found {len(hits)}")
    return hits[0]


def find_by_prefix(objects: list[Manifest], kind: str, prefix: str) -> Manifest:
    """Return the one object of ``kind`` whose name starts with ``prefix`` (generated, hashed names)."""
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    if len(hits) != 1:
        pytest.fail(f"expected exactly one {kind} named {prefix}*, found {len(hits)}")
    return hits[0]


#: PromQL words that look like metric names but are not.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Strings, label matchers, range windows, grouping clauses and Grafana variables
    are removed first; what is left that is not a function, aggregation or keyword
    is a metric name.
    """
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group())
    return names
