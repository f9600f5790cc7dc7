"""The public API of interposer.csi_node is exactly what __init__ re-exports."""

from __future__ import annotations

import interposer.csi_node as csi_node
import msgspec
import pytest

PUBLIC_NAMES = {
    "DRIVER_NAME",
    "CsiError",
    "CsiNodeConfig",
    "CsiNodeServer",
    "IdentityService",
    "KubernetesLauncher",
    "Launcher",
    "LocalProcessLauncher",
    "NodeService",
    "WorkerPodSettings",
    "WorkerSpec",
    "WorkerTuning",
}


def test_public_names() -> None:
    exported = {name for name in vars(csi_node) if not name.startswith("_")}
    assert exported == PUBLIC_NAMES


def test_config_rejects_unknown_fields_and_has_defaults() -> None:
    config = csi_node.CsiNodeConfig()
    assert config.endpoint.startswith("unix:///") and config.node_id and config.worker_command
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"no_such_field": 1}, csi_node.CsiNodeConfig)


def test_worker_spec_arguments_follow_the_worker_contract() -> None:
    spec = csi_node.WorkerSpec(
        volume_id="v1",
        backing_dir="/b",
        mountpoint="/m",
        nats_url="nats://x:4222",
        nats_creds="/creds/worker.json",
        policy_file="/p.json",
        pod_namespace="ns",
        pod_name="pod",
        node_name="n1",
        read_only=True,
    )
    assert spec.arguments() == [
        "--backing-dir",
        "/b",
        "--mountpoint",
        "/m",
        "--volume-id",
        "v1",
        "--nats-url",
        "nats://x:4222",
        "--nats-creds",
        "/creds/worker.json",
        "--policy-file",
        "/p.json",
        "--pod-namespace",
        "ns",
        "--pod-name",
        "pod",
        "--node-name",
        "n1",
        "--read-only",
    ]
    bare = csi_node.WorkerSpec(volume_id="v1", backing_dir="/b", mountpoint="/m")
    assert bare.arguments() == ["--backing-dir", "/b", "--mountpoint", "/m", "--volume-id", "v1"]
    memory = csi_node.WorkerSpec(volume_id="v1", mountpoint="/m", backend="memory")
    assert memory.arguments() == ["--mountpoint", "/m", "--volume-id", "v1", "--backend", "memory"]
    tuned = msgspec.structs.replace(
        bare, tuning=csi_node.WorkerTuning(attr_timeout_s=2.5, negative_timeout_s=0.0, busy_poll_us=0)
    )
    assert tuned.arguments()[len(bare.arguments()):] == [
        "--attr-timeout", "2.5", "--negative-timeout", "0.0", "--busy-poll-us", "0"
    ]
