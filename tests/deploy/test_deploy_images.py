"""Images: skaffold builds exactly what the manifests run; Dockerfiles build what they claim."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import pytest
from deploy_support import KUSTOMIZATIONS, REPO_ROOT, SERVICES, Manifest, containers_of

#: Services whose image must not run as root (they need no kernel or host access).
NON_ROOT_SERVICES = {"policy", "collector"}
#: Services that serve FUSE and so need the fuse3 runtime and pyfuse3's build deps.
FUSE_SERVICES = {"fuse-worker", "csi-node"}
PINNED_PYTHON = re.compile(r"python:3\.11\.\d+-slim-bookworm")
#: An image reference pinned to a version (not `latest`, not bare) or a digest.
PINNED_IMAGE = re.compile(r"^[\w.\-/:]+(:(?!latest$)[\w][\w.\-]*|@sha256:[0-9a-f]{64})$")


def _dockerfile(service: str) -> str:
    return (REPO_ROOT / "services" / service / "Dockerfile").read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, in order."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(text):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _manifest_images(all_rendered: dict[str, list[Manifest]]) -> dict[str, set[str]]:
    """image → the containers (``path: Kind/name/container``) that run it."""
    images: dict[str, set[str]] = {}
    for path, objects in all_rendered.items():
        for c in containers_of(objects):
            images.setdefault(c.spec["image"], set()).add(f"{path}: {c.owner}/{c.spec['name']}")
    return images


def test_one_artifact_per_service(skaffold_config: dict[str, Any]) -> None:
    artifacts = skaffold_config["build"]["artifacts"]
    by_image = {a["image"]: a for a in artifacts}
    assert len(by_image) == len(artifacts), "an image is built twice"
    assert set(by_image) == {f"interposer-{svc}" for svc in SERVICES}
    for svc in SERVICES:
        artifact = by_image[f"interposer-{svc}"]
        assert artifact["context"] == ".", "proto/ is shared: every image builds from the repository root"
        assert artifact["docker"]["dockerfile"] == f"services/{svc}/Dockerfile"
        assert (REPO_ROOT / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()


def test_skaffold_renders_existing_kustomizations(skaffold_config: dict[str, Any]) -> None:
    assert skaffold_config["manifests"]["kustomize"]["paths"] == ["deploy/base"]
    profiles = {p["name"]: p for p in skaffold_config["profiles"]}
    assert set(profiles) >= {"dev", "monitoring"}
    for name, profile in profiles.items():
        assert "patches" not in profile, (
            f"profile {name}: select an overlay, do not patch skaffold.yaml by list index"
        )
        paths = profile["manifests"]["kustomize"]["paths"]
        if name in {"dev", "monitoring"}:
            assert paths == [f"deploy/overlays/{name}"]
        for path in paths:
            assert path in KUSTOMIZATIONS, f"profile {name} renders {path}, which the tests do not check"
            assert (REPO_ROOT / path / "kustomization.yaml").is_file()


def test_built_images_are_deployed_and_deployed_images_built(
    skaffold_config: dict[str, Any], all_rendered: dict[str, list[Manifest]]
) -> None:
    built = {a["image"] for a in skaffold_config["build"]["artifacts"]}
    used = _manifest_images(all_rendered)
    ours = {image for image in used if image.startswith("interposer-")}
    assert ours <= built, f"manifests run images skaffold does not build: {sorted(ours - built)}"
    base_images = {c.spec["image"] for c in containers_of(all_rendered["deploy/base"])}
    assert built <= base_images, (
        f"skaffold builds images deploy/base never runs: {sorted(built - base_images)}"
    )


def test_third_party_images_are_pinned(all_rendered: dict[str, list[Manifest]]) -> None:
    for image, users in _manifest_images(all_rendered).items():
        if image.startswith("interposer-"):
            # Tagged by skaffold at deploy time; a tag here would stop skaffold from matching it.
            assert ":" not in image and "@" not in image, f"{image}: leave interposer images untagged"
            continue
        assert PINNED_IMAGE.match(image), f"{image} (used by {sorted(users)}) is not pinned to a version"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_structure(service: str) -> None:
    text = _dockerfile(service)
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    args = dict(a.split("=", 1) for k, a in _instructions(text) if k == "ARG" and "=" in a)
    for stage in stages:
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
        assert PINNED_PYTHON.fullmatch(base), f"stage FROM {base!r}: pin python:3.11.<patch>-slim-bookworm"

    runs = [a for stage in stages for k, a in stage if k == "RUN"]
    pip_installs = [r for r in runs if "pip install" in r]
    assert pip_installs, "no pip install"
    for run in pip_installs:
        assert re.search(r"-c \S*constraints\.txt", run), f"pip install without -c constraints.txt: {run}"
    installed = " ".join(pip_installs)
    assert "/proto" in installed, "the shared proto package must be installed"
    assert f"/services/{service}" in installed

    runtime = stages[-1]
    entrypoint = [a for k, a in runtime if k == "ENTRYPOINT"]
    assert entrypoint == [f'["python", "-m", "interposer.{SERVICES[service]}"]']


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_copies_existing_paths(service: str) -> None:
    """Every COPY source exists in the build context (the repository root) and is not dockerignored."""
    ignored = _dockerignore()
    for keyword, args in _instructions(_dockerfile(service)):
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert not any(fnmatch.fnmatch(source, pat.lstrip("/")) for pat in ignored), (
                f"COPY {source} is excluded by .dockerignore"
            )


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_user(service: str) -> None:
    runtime = _stages(_dockerfile(service))[-1]
    users = [a for k, a in runtime if k == "USER"]
    if service in NON_ROOT_SERVICES:
        assert users, f"{service} must run as a non-root user"
        assert users[-1].split(":")[0] not in {"0", "root"}
    else:
        assert not users or users[-1].split(":")[0] in {"0", "root"}
        assert "root" in _dockerfile(service).lower(), f"{service}: say why it must run as root"


@pytest.mark.parametrize("service", sorted(FUSE_SERVICES))
def test_fuse_images_have_fuse(service: str) -> None:
    build, *_, runtime = _stages(_dockerfile(service))
    build_runs = " ".join(a for k, a in build if k == "RUN")
    for package in ("libfuse3-dev", "pkg-config", "gcc"):
        assert package in build_runs.split(), f"build stage needs {package} to compile pyfuse3"
    runtime_runs = " ".join(a for k, a in runtime if k == "RUN")
    assert "fuse3" in runtime_runs.split(), "runtime needs the fuse3 package (libfuse3, fusermount3)"
    assert "libfuse3-dev" not in runtime_runs.split(), "headers belong in the build stage only"


def test_csi_node_image_carries_the_fuse_worker() -> None:
    """The local launcher runs fuse-worker processes inside the csi-node container."""
    installs = " ".join(
        a for k, a in _instructions(_dockerfile("csi-node")) if k == "RUN" and "pip install" in a
    )
    assert "/services/fuse-worker" in installs


def _dockerignore() -> list[str]:
    path = REPO_ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing at the repository root (the build context)"
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {p.lstrip("/") for p in _dockerignore()}
    for heavy in (".git", ".venv"):
        assert heavy in patterns, f".dockerignore must exclude {heavy}"
    for needed in ("proto", "services", "constraints.txt"):
        assert not any(fnmatch.fnmatch(needed, p) for p in patterns), f".dockerignore excludes {needed}"
