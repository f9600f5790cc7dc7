"""Conventions every manifest follows: labels, resources, security contexts, overlays."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml
from deploy_support import DEPLOY_DIR, KUSTOMIZATIONS, Manifest, containers_of, find, pod_spec_of

STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component")
#: Containers that must be privileged (FUSE mounts propagated to the host); nothing else may be.
PRIVILEGED = {("DaemonSet/interposer-csi-node", "csi-node")}
#: Pods of these workloads must run as a non-root user.
NON_ROOT_WORKLOADS = {
    "Deployment/interposer-policy",
    "Deployment/interposer-collector",
    "StatefulSet/nats",
    "Deployment/prometheus",
    "Deployment/grafana",
}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_standard_labels(path: str, all_rendered: dict[str, list[Manifest]]) -> None:
    for obj in all_rendered[path]:
        where = f"{path}: {obj['kind']}/{obj['metadata']['name']}"
        labels = obj["metadata"].get("labels", {})
        for label in STANDARD_LABELS:
            assert labels.get(label), f"{where} lacks label {label}"
        assert labels["app.kubernetes.io/part-of"] == "interposer", where
        if obj["kind"] in {"Deployment", "DaemonSet", "StatefulSet"}:
            template_labels = obj["spec"]["template"]["metadata"]["labels"]
            for label in STANDARD_LABELS:
                assert template_labels.get(label), f"{where}: pod template lacks label {label}"
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template_labels.items(), f"{where}: selector does not match its pods"
            assert "app.kubernetes.io/part-of" not in selector, (
                f"{where}: keep shared labels out of the immutable selector"
            )


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_services_select_pods(path: str, all_rendered: dict[str, list[Manifest]]) -> None:
    objects = all_rendered[path]
    pod_labels = [
        (
            o["spec"]["template"]["metadata"]["labels"] if o["kind"] != "Pod" else o["metadata"]["labels"],
            pod_spec_of(o),
        )
        for o in objects
        if pod_spec_of(o) is not None
    ]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matched = [spec for labels, spec in pod_labels if selector.items() <= labels.items()]
        assert matched, f"Service/{service['metadata']['name']} selects no pods"
        named_ports = {p["name"] for spec in matched for c in spec["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            if isinstance(port["targetPort"], str):
                assert port["targetPort"] in named_ports, (
                    f"Service/{service['metadata']['name']}: no port {port['targetPort']}"
                )


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_resources_are_bounded(path: str, all_rendered: dict[str, list[Manifest]]) -> None:
    for c in containers_of(all_rendered[path]):
        where = f"{path}: {c.owner}/{c.spec['name']}"
        resources = c.spec.get("resources", {})
        for key in ("cpu", "memory"):
            assert key in resources.get("requests", {}), f"{where}: no {key} request"
        # Memory is always limited; CPU may be left unlimited where throttling would
        # distort the I/O latency being measured (the csi-node's embedded workers).
        assert "memory" in resources.get("limits", {}), f"{where}: no memory limit"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_security_contexts_are_minimal(path: str, all_rendered: dict[str, list[Manifest]]) -> None:
    for c in containers_of(all_rendered[path]):
        where = f"{path}: {c.owner}/{c.spec['name']}"
        sc = c.spec.get("securityContext", {})
        if (c.owner, c.spec["name"]) in PRIVILEGED:
            assert sc.get("privileged") is True, f"{where} must be privileged for FUSE mount propagation"
            continue
        assert not sc.get("privileged"), f"{where} is privileged without need"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: set allowPrivilegeEscalation: false"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop all capabilities"
        assert not sc.get("capabilities", {}).get("add"), f"{where} adds capabilities"
        if c.owner in NON_ROOT_WORKLOADS:
            pod_sc = c.pod_spec.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where} may run as root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root file system should be read-only"


def test_host_access_only_in_the_node_plugin(all_rendered: dict[str, list[Manifest]]) -> None:
    for path, objects in all_rendered.items():
        for obj in objects:
            pod = pod_spec_of(obj)
            if pod is None or (obj["kind"], obj["metadata"]["name"]) == ("DaemonSet", "interposer-csi-node"):
                continue
            where = f"{path}: {obj['kind']}/{obj['metadata']['name']}"
            assert not any("hostPath" in v for v in pod.get("volumes", [])), f"{where} mounts a host path"
            assert not pod.get("hostNetwork") and not pod.get("hostPID"), f"{where} shares host namespaces"


def test_no_latest_or_missing_pull_policy(all_rendered: dict[str, list[Manifest]]) -> None:
    for path, objects in all_rendered.items():
        for c in containers_of(objects):
            assert c.spec.get("imagePullPolicy") == "IfNotPresent", (
                f"{path}: {c.owner}/{c.spec['name']}: IfNotPresent (tags are pinned or content-addressed by skaffold)"
            )


def test_dev_overlay(render: Callable[[str], list[Manifest]]) -> None:
    dev = render("deploy/overlays/dev")
    for name in ("interposer-policy", "interposer-collector"):
        deployment = find(dev, "Deployment", name)
        assert deployment["spec"]["replicas"] == 1
    for c in containers_of(dev):
        if (
            c.spec["image"] in {"interposer-policy", "interposer-collector", "interposer-csi-node"}
            and not c.init
        ):
            env = {e["name"]: e.get("value") for e in c.spec.get("env", [])}
            assert env.get("INTERPOSER_LOG_LEVEL") == "DEBUG", (
                f"{c.owner}/{c.spec['name']} not at debug level"
            )


def test_base_log_level_is_info_and_used(base: list[Manifest]) -> None:
    """Services take --log-level; the base passes it from an env var overlays can patch by name."""
    for c in containers_of(base):
        if c.spec["image"].startswith("interposer-") and not c.init:
            where = f"{c.owner}/{c.spec['name']}"
            env = {e["name"]: e.get("value") for e in c.spec.get("env", [])}
            assert env.get("INTERPOSER_LOG_LEVEL") == "INFO", where
            args = c.spec["args"]
            assert args[args.index("--log-level") + 1] == "$(INTERPOSER_LOG_LEVEL)", where


def test_overlay_patches_target_kind_and_name() -> None:
    """Overlays patch by kind + name (never by list position or an implicit match)."""
    for kustomization in sorted((DEPLOY_DIR / "overlays").glob("*/kustomization.yaml")):
        doc = yaml.safe_load(kustomization.read_text())
        assert "patchesJson6902" not in doc and "patchesStrategicMerge" not in doc, (
            f"{kustomization}: deprecated fields"
        )
        for patch in doc.get("patches", []):
            target = patch.get("target", {})
            assert target.get("kind") and target.get("name"), (
                f"{kustomization}: patch {patch} lacks a kind+name target"
            )
            if "path" in patch:
                text = (kustomization.parent / patch["path"]).read_text()
                assert "op:" not in text, (
                    f"{patch['path']}: use a strategic-merge patch, not a JSON6902 index patch"
                )
