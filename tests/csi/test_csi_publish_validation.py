"""NodePublishVolume / NodeUnpublishVolume refuse bad requests before touching anything.

These need no FUSE: every request here fails validation, so no worker starts.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from csi_support import RPC_TIMEOUT_S, CsiNode, fuse_mounts_under, mounting_volume_request
from interposer.proto.csi import csi_pb2


@pytest.fixture
def csi_node(shared_csi_node: CsiNode) -> CsiNode:
    """The module's csi-node: nothing here publishes, so tests can share it."""
    return shared_csi_node


def publish_error(csi_node: CsiNode, request: csi_pb2.NodePublishVolumeRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)
    return caught.value


def assert_nothing_published(csi_node: CsiNode, csi_root: Path) -> None:
    assert fuse_mounts_under(csi_root) == {}
    assert csi_node.volume_states() == []


def test_missing_volume_id(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    error = publish_error(csi_node, mounting_volume_request("", csi_root / "target", backing_dir))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "volume_id" in error.details()


def test_missing_target_path(csi_node: CsiNode, backing_dir: Path) -> None:
    error = publish_error(csi_node, mounting_volume_request("vol-1", "", backing_dir))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target_path" in error.details()


def test_missing_volume_capability(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    request = mounting_volume_request("vol-1", csi_root / "target", backing_dir)
    request.ClearField("volume_capability")
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "volume_capability" in error.details()


def test_missing_access_mode(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    request = mounting_volume_request("vol-1", csi_root / "target", backing_dir)
    request.volume_capability.ClearField("access_mode")
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "access_mode" in error.details()


@pytest.mark.parametrize("volume_id", ["has.dot", "has space", "a/b", "x" * 129, "wild*card"])
def test_volume_id_outside_the_subject_pattern(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path, volume_id: str
) -> None:
    error = publish_error(csi_node, mounting_volume_request(volume_id, csi_root / "target", backing_dir))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "volume_id" in error.details()


def test_block_access_type_is_rejected(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    request = mounting_volume_request("vol-1", csi_root / "target", backing_dir)
    request.volume_capability.block.SetInParent()
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block" in error.details()
    assert_nothing_published(csi_node, csi_root)


def test_relative_target_path(csi_node: CsiNode, backing_dir: Path) -> None:
    error = publish_error(csi_node, mounting_volume_request("vol-1", "relative/target", backing_dir))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_backing_path_for_passthrough(csi_node: CsiNode, csi_root: Path) -> None:
    request = mounting_volume_request("vol-1", csi_root / "target", None, extra_context={"backend": "passthrough"})
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "backingPath" in error.details()


def test_backing_path_with_the_memory_backend(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    request = mounting_volume_request("vol-1", csi_root / "target", backing_dir, extra_context={"backend": "memory"})
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only for the passthrough backend" in error.details()


def test_backing_path_that_does_not_exist(csi_node: CsiNode, csi_root: Path) -> None:
    missing = csi_root / "no-such-dir"
    error = publish_error(csi_node, mounting_volume_request("vol-1", csi_root / "target", missing))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an existing directory" in error.details()


def test_backing_path_that_is_a_file(csi_node: CsiNode, csi_root: Path) -> None:
    a_file = csi_root / "file"
    a_file.write_text("x")
    error = publish_error(csi_node, mounting_volume_request("vol-1", csi_root / "target", a_file))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_backing_path_inside_the_target(csi_node: CsiNode, csi_root: Path) -> None:
    target = csi_root / "target"
    inside = target / "data"
    inside.mkdir(parents=True)
    error = publish_error(csi_node, mounting_volume_request("vol-1", target, inside))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inside target_path" in error.details()


def test_backing_path_reached_through_a_symlink_into_the_target(csi_node: CsiNode, csi_root: Path) -> None:
    target = csi_root / "target"
    (target / "data").mkdir(parents=True)
    link = csi_root / "link"
    link.symlink_to(target / "data")
    error = publish_error(csi_node, mounting_volume_request("vol-1", target, link))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_target_inside_the_backing_path(csi_node: CsiNode, backing_dir: Path) -> None:
    error = publish_error(csi_node, mounting_volume_request("vol-1", backing_dir / "mnt", backing_dir))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_backend(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    request = mounting_volume_request(
        "vol-1", csi_root / "target", backing_dir, extra_context={"backend": "s3"}
    )
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "backend" in error.details()


@pytest.mark.parametrize(
    ("policy", "expected_in_details"),
    [
        ("{not json", "malformed JSON"),
        ('{"layers": [{"type": "fault", "probability": 2}]}', "probability"),
        ('{"layers": [{"type": "fault", "errno": "ENOTANERRNO"}]}', "errno"),
        ('{"unknown_field": 1}', "unknown_field"),
    ],
)
def test_bad_policy_is_rejected_and_nothing_is_mounted(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path, policy: str, expected_in_details: str
) -> None:
    target = csi_root / "target"
    request = mounting_volume_request("vol-1", target, backing_dir, extra_context={"policy": policy})
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "policy" in error.details() and expected_in_details in error.details()
    assert_nothing_published(csi_node, csi_root)
    assert not target.exists()


def rejected_publish_details(csi_node: CsiNode, csi_root: Path, context: dict[str, str]) -> str:
    """Publish with ``context`` and a backing dir to create; check INVALID_ARGUMENT, nothing made; the details."""
    target = csi_root / "target"
    backing = csi_root / "backing-to-create"  # the node would create it (StorageClass backingRoot)
    request = mounting_volume_request(
        "vol-1", target, backing, extra_context={"createBackingPath": "true", **context}
    )
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_published(csi_node, csi_root)
    assert not target.exists() and not backing.exists()
    return error.details()


@pytest.mark.parametrize(
    ("context", "expected_in_details"),
    [
        ({"policy": "{not json"}, "policy"),
        ({"backend": "tape"}, "backend"),
    ],
)
def test_a_refused_publish_does_not_create_the_backing_dir(
    csi_node: CsiNode, csi_root: Path, context: dict[str, str], expected_in_details: str
) -> None:
    assert expected_in_details in rejected_publish_details(csi_node, csi_root, context)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("entryTimeoutSeconds", "soon", "is not a number"),
        ("attrTimeoutSeconds", "nan", "is not finite"),
        ("negativeTimeoutSeconds", "inf", "is not finite"),
        ("entryTimeoutSeconds", "-0.5", "is negative"),
        ("attrTimeoutSeconds", "3600.5", "is above 3600"),
        ("busyPollMicroseconds", "2.5", "is not an integer"),
        ("busyPollMicroseconds", "-1", "is negative"),
        ("busyPollMicroseconds", "10001", "is above 10000"),
        ("maxBackgroundRequests", "many", "is not an integer"),
        ("maxBackgroundRequests", "65536", "is above 65535"),
        ("maxFileFds", "1e3", "is not an integer"),
        ("maxFileFds", "-5", "is negative"),
        ("maxFileFds", "2147483585", "is above 2147483584"),
        ("maxDirFds", "1.5", "is not an integer"),
        ("maxDirFds", "2147483585", "is above 2147483584"),
    ],
)
def test_bad_worker_tuning_number(
    csi_node: CsiNode, csi_root: Path, key: str, value: str, reason: str
) -> None:
    details = rejected_publish_details(csi_node, csi_root, {key: value})
    allowed = {"busyPollMicroseconds": "microseconds from 0 to 10000",
               "maxBackgroundRequests": "requests from 0 to 65535",
               "maxFileFds": "fds from 0 to 2147483584", "maxDirFds": "fds from 0 to 2147483584"}.get(key, "seconds from 0 to 3600")
    assert f"[{key!r}] = {value!r} {reason}" in details and allowed in details


@pytest.mark.parametrize(
    ("context", "expected_in_details"),
    [
        ({"cacheCoherence": "relaxed"}, ["'cacheCoherence'", "'relaxed'", "default, strict"]),
        ({"kernelPassthrough": "yes"}, ["'kernelPassthrough'", "'yes'", "true, false"]),
        ({"flushOnClose": "never"}, ["'flushOnClose'", "'never'", "auto, always"]),
        ({"handleKillprivV2": "no"}, ["'handleKillprivV2'", "'no'", "true, false"]),
        (
            {"cacheCoherence": "strict", "negativeTimeoutSeconds": "1"},
            ["'cacheCoherence'", "'negativeTimeoutSeconds'", "every cache timeout to 0"],
        ),
        ({"workerMemoryLimit": "lots"}, ["'workerMemoryLimit'", "'lots'", "not a Kubernetes quantity"]),
        ({"workerMemoryLimit": "32Mi"}, ["'workerMemoryLimit'", "'32Mi'", "below 64Mi"]),
        ({"workerMemoryLimit": "2Gi"}, ["'workerMemoryLimit'", "needs the Kubernetes launcher"]),
    ],
    ids=["unknown", "kernel-passthrough-not-a-boolean", "flush-on-close-unknown", "killpriv-v2-not-a-boolean",
         "strict-beside-a-timeout", "memory-limit-not-a-quantity", "memory-limit-too-small",
         "memory-limit-without-pods"],
)
def test_bad_worker_tuning_value(
    csi_node: CsiNode, csi_root: Path, context: dict, expected_in_details: list
) -> None:
    details = rejected_publish_details(csi_node, csi_root, context)
    for expected in expected_in_details:
        assert expected in details


def test_kernel_passthrough_needs_a_backing_file(csi_node: CsiNode, csi_root: Path) -> None:
    request = mounting_volume_request("vol-1", csi_root / "target", None,
                                      extra_context={"backend": "memory", "kernelPassthrough": "true"})
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'kernelPassthrough'" in error.details() and "'memory'" in error.details()
    assert_nothing_published(csi_node, csi_root)


def test_kernel_passthrough_is_not_for_inline_volumes(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    # Pod authors write an inline volume's attributes; the option gives the worker CAP_SYS_ADMIN.
    request = mounting_volume_request("csi-inline", csi_root / "target", backing_dir,
                                      extra_context={"kernelPassthrough": "true",
                                                     "csi.storage.k8s.io/ephemeral": "true"})
    error = publish_error(csi_node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'kernelPassthrough'" in error.details() and "ephemeral inline volume" in error.details()
    assert_nothing_published(csi_node, csi_root)


def test_unpublish_missing_fields(csi_node: CsiNode, csi_root: Path) -> None:
    for request in (
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="", target_path=str(csi_root / "t")),
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=""),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            csi_node.node.NodeUnpublishVolume(request, timeout=RPC_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unpublish_of_something_never_published_is_ok(csi_node: CsiNode, csi_root: Path) -> None:
    target = csi_root / "never-published"
    target.mkdir()
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target))
    csi_node.node.NodeUnpublishVolume(request, timeout=RPC_TIMEOUT_S)
    csi_node.node.NodeUnpublishVolume(request, timeout=RPC_TIMEOUT_S)
    assert not target.exists()


def test_secrets_are_not_logged(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    request = mounting_volume_request(
        "vol-1", csi_root / "target", backing_dir, extra_context={"backend": "x"}
    )
    request.secrets["password"] = "hunter2-secret-value"
    request.volume_capability.mount.mount_flags.append("token=flag-secret-value")
    publish_error(csi_node, request)
    log_text = csi_node.log_text()
    assert "NodePublishVolume" in log_text
    assert "hunter2-secret-value" not in log_text and "flag-secret-value" not in log_text
