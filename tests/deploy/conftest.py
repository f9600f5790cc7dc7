"""Fixtures for the offline checks of Dockerfiles, kustomize manifests and skaffold.yaml.

No cluster and no container engine: manifests are rendered with ``kubectl kustomize``
and checked against the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``.
Nothing skips: a missing kubectl or skaffold schema fails with a message saying what
to install or where to put it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from deploy_support import (
    DEPLOY_DIR,
    KUBECTL_TIMEOUT_S,
    KUSTOMIZATIONS,
    REPO_ROOT,
    SKAFFOLD_SCHEMA,
    Manifest,
)


@pytest.fixture(scope="session")
def kubectl() -> str:
    """Path of kubectl (its built-in ``kubectl kustomize`` renders the manifests)."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is missing: the deploy tests render manifests with `kubectl kustomize`. "
            "Install kubectl (https://kubernetes.io/docs/tasks/tools/) and put it on PATH."
        )
    return path


@pytest.fixture(scope="session")
def render(kubectl: str) -> Callable[[str], list[Manifest]]:
    """A function ``render("deploy/base") -> [object, …]`` that runs ``kubectl kustomize`` (cached)."""
    cache: dict[str, list[Manifest]] = {}

    def _render(path: str) -> list[Manifest]:
        if path not in cache:
            proc = subprocess.run(
                [kubectl, "kustomize", str(REPO_ROOT / path)],
                capture_output=True,
                text=True,
                timeout=KUBECTL_TIMEOUT_S,
                check=False,
            )
            if proc.returncode != 0:
                pytest.fail(f"`kubectl kustomize {path}` failed:\n{proc.stderr}")
            cache[path] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return cache[path]

    return _render


@pytest.fixture(scope="session")
def base(render: Callable[[str], list[Manifest]]) -> list[Manifest]:
    """Objects rendered from deploy/base."""
    return render("deploy/base")


@pytest.fixture(scope="session")
def monitoring(render: Callable[[str], list[Manifest]]) -> list[Manifest]:
    """Objects rendered from deploy/overlays/monitoring."""
    return render("deploy/overlays/monitoring")


@pytest.fixture(scope="session")
def examples(render: Callable[[str], list[Manifest]]) -> list[Manifest]:
    """Objects rendered from deploy/examples."""
    return render("deploy/examples")


@pytest.fixture(scope="session")
def all_rendered(render: Callable[[str], list[Manifest]]) -> dict[str, list[Manifest]]:
    """Every kustomization in :data:`KUSTOMIZATIONS`, rendered: path → objects."""
    return {path: render(path) for path in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def skaffold_config() -> dict[str, Any]:
    """skaffold.yaml at the repository root, parsed."""
    path = REPO_ROOT / "skaffold.yaml"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def skaffold_schema() -> dict[str, Any]:
    """The skaffold v4beta13 JSON schema from ``../shared/schemas`` beside the repository."""
    if not SKAFFOLD_SCHEMA.is_file():
        pytest.fail(
            f"skaffold JSON schema not found at {SKAFFOLD_SCHEMA}: the tests expect the shared "
            "folder beside the repository (../shared/schemas/skaffold-v4beta13.json)"
        )
    return json.loads(SKAFFOLD_SCHEMA.read_text())


@pytest.fixture(scope="session")
def driver_name() -> str:
    """The CSI driver name, from its single source: deploy/base/csi-driver.yaml."""
    doc = yaml.safe_load((DEPLOY_DIR / "base" / "csi-driver.yaml").read_text())
    assert doc["kind"] == "CSIDriver", "deploy/base/csi-driver.yaml must hold the CSIDriver object"
    return doc["metadata"]["name"]
