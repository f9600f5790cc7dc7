"""Publish → use → unpublish a real interposed volume through the real csi-node.

These mount FUSE file systems: they fail (never skip) where FUSE is missing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from csi_support import (
    RPC_TIMEOUT_S,
    CsiNode,
    fuse_mounts_under,
    mounting_volume_request,
    pid_alive,
    running_csi_node,
    tuning_flags,
)
from interposer.proto.csi import csi_pb2
from interposer_testing import require_fuse, wait_until  # require_fuse: fails, never skips

pytestmark = pytest.mark.fuse

VOLUME_ID = "pvc-0123-abcd"


@pytest.fixture(autouse=True)
def _fuse_available() -> None:
    require_fuse()


def unpublish(csi_node: CsiNode, volume_id: str, target: Path) -> None:
    csi_node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
        timeout=RPC_TIMEOUT_S,
    )


def mounts_at(path: Path) -> int:
    """How many mounts are stacked at ``path`` (/proc/self/mountinfo, field 5)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sum(1 for line in lines if line.split()[4] == str(path))


def test_concurrent_publishes_of_one_volume_mount_it_once(csi_node: CsiNode, csi_root: Path,
                                                          backing_dir: Path) -> None:
    # kubelet repeats a NodePublishVolume that timed out while the first may still be
    # running: every call must succeed, and the volume be mounted and served once.
    target = csi_root / "pods" / "uid-c" / "volumes" / "mount"
    request = mounting_volume_request(VOLUME_ID, target, backing_dir)
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda _: csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S), range(4)))
    assert len(replies) == 4
    assert mounts_at(target) == 1
    (state,) = csi_node.volume_states()
    assert pid_alive(state["worker_pid"])
    (target / "written-through").write_text("once")
    assert (backing_dir / "written-through").read_text() == "once"
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: unpublish(csi_node, VOLUME_ID, target), range(4)))
    assert mounts_at(target) == 0 and csi_node.volume_states() == []
    wait_until(lambda: not pid_alive(state["worker_pid"]), "the worker to exit")


def test_publish_use_unpublish_lifecycle(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    target = csi_root / "pods" / "uid-1" / "volumes" / "mount"
    request = mounting_volume_request(
        VOLUME_ID,
        target,
        backing_dir,
        extra_context={
            "csi.storage.k8s.io/pod.namespace": "default",
            "csi.storage.k8s.io/pod.name": "trainer-0",
            "policy": json.dumps({"layers": [{"type": "delay", "delay_s": 0.0, "ops": ["read"]}]}),
        },
    )
    csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)

    mounts = fuse_mounts_under(csi_root)
    assert mounts.get(str(target), "").startswith("fuse"), mounts
    (state,) = csi_node.volume_states()
    worker_pid = state["worker_pid"]
    assert pid_alive(worker_pid)
    argv = state["worker_argv"]
    assert argv[argv.index("--pod-namespace") + 1] == "default"
    assert argv[argv.index("--pod-name") + 1] == "trainer-0"
    assert "--policy-file" in argv and "--read-only" not in argv

    # Written through the mount, it lands in the backing directory; and back.
    (target / "hello.txt").write_bytes(b"through the interposer\n")
    assert (backing_dir / "hello.txt").read_bytes() == b"through the interposer\n"
    (backing_dir / "from-backing.txt").write_text("seen from the pod")
    assert (target / "from-backing.txt").read_text() == "seen from the pod"

    # Publishing the same volume at the same target again is OK and changes nothing.
    csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)
    assert [s["worker_pid"] for s in csi_node.volume_states()] == [worker_pid]

    unpublish(csi_node, VOLUME_ID, target)
    assert fuse_mounts_under(csi_root) == {}
    assert not pid_alive(worker_pid)
    assert not target.exists()
    assert csi_node.volume_states() == []
    assert (backing_dir / "hello.txt").exists()

    unpublish(csi_node, VOLUME_ID, target)  # again: still OK


#: The worker flags of ``cacheCoherence: strict``.
STRICT_FLAGS = {"--entry-timeout": "0.0", "--attr-timeout": "0.0", "--negative-timeout": "0.0"}


def tuning_flags_of(pid: int) -> dict[str, str]:
    """The tuning flags on the command line of running process ``pid`` (flag → value)."""
    return tuning_flags(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"))


def shows_at_once(target: Path, backing_dir: Path, name: str) -> bool:
    """Whether a file made in the backing dir (as another node would) shows through the mount at once.

    The name is looked up through the mount first, so the kernel may cache its absence.
    """
    assert not (target / name).exists()
    (backing_dir / name).write_text("made on another node")
    return (target / name).exists()


@pytest.mark.parametrize(
    ("context", "flags", "seen_at_once"),
    [({"cacheCoherence": "strict"}, STRICT_FLAGS, True), ({}, {}, False)],
    ids=["strict", "default"],
)
def test_cache_coherence_reaches_the_worker(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path, context: dict, flags: dict, seen_at_once: bool
) -> None:
    target = csi_root / "target"
    csi_node.node.NodePublishVolume(
        mounting_volume_request(VOLUME_ID, target, backing_dir, extra_context=context), timeout=RPC_TIMEOUT_S
    )
    (state,) = csi_node.volume_states()
    assert tuning_flags_of(state["worker_pid"]) == flags
    # By default the kernel answers "no such name" from its cache for 1 s (negative entry).
    assert shows_at_once(target, backing_dir, "made-elsewhere") is seen_at_once
    unpublish(csi_node, VOLUME_ID, target)


def test_worker_tuning_survives_a_worker_restart(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path
) -> None:
    target = csi_root / "target"
    context = {"negativeTimeoutSeconds": "0", "attrTimeoutSeconds": "2.5", "busyPollMicroseconds": "0",
               "maxBackgroundRequests": "32", "kernelPassthrough": "true", "flushOnClose": "always",
               "handleKillprivV2": "false", "maxFileFds": "100", "maxDirFds": "50"}
    request = mounting_volume_request(VOLUME_ID, target, backing_dir, extra_context=context)
    csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)
    (state,) = csi_node.volume_states()
    flags = {"--attr-timeout": "2.5", "--negative-timeout": "0.0", "--busy-poll-us": "0", "--max-background": "32",
             "--max-file-fds": "100", "--max-dir-fds": "50", "--kernel-passthrough": "", "--always-flush": "", "--no-handle-killpriv-v2": ""}
    assert tuning_flags_of(state["worker_pid"]) == flags
    assert state["tuning"] == {"attr_timeout_s": 2.5, "negative_timeout_s": 0.0, "busy_poll_us": 0,
                               "max_background": 32, "kernel_passthrough": True, "always_flush": True,
                               "handle_killpriv_v2": False, "max_file_fds": 100, "max_dir_fds": 50}

    os.kill(state["worker_pid"], signal.SIGKILL)
    wait_until(lambda: csi_node.volume_states()[0]["last_restore_s"], "the watcher to restore the worker")
    (restored,) = csi_node.volume_states()
    assert restored["worker_pid"] != state["worker_pid"]
    assert tuning_flags_of(restored["worker_pid"]) == flags
    assert shows_at_once(target, backing_dir, "made-after-the-restore")

    # The same volume asked for with other settings: the running worker does not have them.
    strict = {"cacheCoherence": "strict"}
    other_settings = mounting_volume_request(VOLUME_ID, target, backing_dir, extra_context=strict)
    with pytest.raises(grpc.RpcError) as caught:
        csi_node.node.NodePublishVolume(other_settings, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "worker tuning" in caught.value.details()
    unpublish(csi_node, VOLUME_ID, target)


def test_publish_without_volume_attributes_serves_a_memory_volume(csi_node: CsiNode, csi_root: Path) -> None:
    # Generic CSI tooling (csi-sanity, an inline volume with no attributes) names no
    # backing path: the volume is then an in-memory file system.
    target = csi_root / "target-memory"
    csi_node.node.NodePublishVolume(mounting_volume_request("vol-mem", target, None), timeout=RPC_TIMEOUT_S)
    (state,) = csi_node.volume_states()
    assert state["backend"] == "memory" and state["backing_dir"] == ""
    assert "--backing-dir" not in state["worker_argv"]
    (target / "f").write_text("in memory")
    assert (target / "f").read_text() == "in memory"
    unpublish(csi_node, "vol-mem", target)
    assert fuse_mounts_under(csi_root) == {}


def test_republish_with_conflicting_readonly_is_already_exists(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path
) -> None:
    target = csi_root / "target"
    csi_node.node.NodePublishVolume(
        mounting_volume_request(VOLUME_ID, target, backing_dir), timeout=RPC_TIMEOUT_S
    )
    with pytest.raises(grpc.RpcError) as caught:
        csi_node.node.NodePublishVolume(
            mounting_volume_request(VOLUME_ID, target, backing_dir, readonly=True), timeout=RPC_TIMEOUT_S
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    unpublish(csi_node, VOLUME_ID, target)


def test_another_volume_at_a_published_target_is_already_exists(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path
) -> None:
    target = csi_root / "target"
    csi_node.node.NodePublishVolume(
        mounting_volume_request(VOLUME_ID, target, backing_dir), timeout=RPC_TIMEOUT_S
    )
    other_backing = csi_root / "other-backing"
    other_backing.mkdir()
    with pytest.raises(grpc.RpcError) as caught:
        csi_node.node.NodePublishVolume(
            mounting_volume_request("another-volume", target, other_backing), timeout=RPC_TIMEOUT_S
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    unpublish(csi_node, VOLUME_ID, target)
    assert fuse_mounts_under(csi_root) == {}


def test_readonly_publish_refuses_writes(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    (backing_dir / "data.bin").write_bytes(b"x" * 10)
    target = csi_root / "target"
    csi_node.node.NodePublishVolume(
        mounting_volume_request(VOLUME_ID, target, backing_dir, readonly=True), timeout=RPC_TIMEOUT_S
    )
    assert "--read-only" in csi_node.volume_states()[0]["worker_argv"]
    assert (target / "data.bin").read_bytes() == b"x" * 10
    with pytest.raises(OSError):
        (target / "new.txt").write_text("nope")
    assert not (backing_dir / "new.txt").exists()
    unpublish(csi_node, VOLUME_ID, target)


def test_publish_recovers_a_volume_whose_worker_died(csi_root: Path, backing_dir: Path) -> None:
    """A republish restarts a dead worker (the path without the recovery watcher, turned off here)."""
    with running_csi_node(csi_root, extra_args=["--watch-interval-s", "0"]) as csi_node:
        target = csi_root / "target"
        request = mounting_volume_request(VOLUME_ID, target, backing_dir)
        csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)
        (dead_pid,) = [s["worker_pid"] for s in csi_node.volume_states()]
        os.kill(dead_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(dead_pid) and time.monotonic() < deadline:
            time.sleep(0.05)

        csi_node.node.NodePublishVolume(request, timeout=RPC_TIMEOUT_S)
        (state,) = csi_node.volume_states()
        assert state["worker_pid"] != dead_pid and pid_alive(state["worker_pid"]), csi_node.log_text()
        assert state["restarts"] == 0  # a new publish, not the watcher
        (target / "after-recovery.txt").write_text("ok")
        assert (backing_dir / "after-recovery.txt").read_text() == "ok"
        unpublish(csi_node, VOLUME_ID, target)
        assert fuse_mounts_under(csi_root) == {}


def test_worker_that_dies_at_start_is_internal_with_its_log(csi_root: Path, backing_dir: Path) -> None:
    with running_csi_node(
        csi_root, worker_command="sh -c 'echo worker-broke-on-purpose >&2; exit 3' --"
    ) as node:
        with pytest.raises(grpc.RpcError) as caught:
            node.node.NodePublishVolume(
                mounting_volume_request(VOLUME_ID, csi_root / "target", backing_dir), timeout=RPC_TIMEOUT_S
            )
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "worker-broke-on-purpose" in caught.value.details()
        assert node.volume_states() == []
        assert fuse_mounts_under(csi_root) == {}


def test_mount_that_never_answers_is_deadline_exceeded(csi_root: Path, backing_dir: Path) -> None:
    with running_csi_node(csi_root, worker_command="sh -c 'exec sleep 60' --", mount_timeout_s=1.0) as node:
        with pytest.raises(grpc.RpcError) as caught:
            node.node.NodePublishVolume(
                mounting_volume_request(VOLUME_ID, csi_root / "target", backing_dir), timeout=RPC_TIMEOUT_S
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert node.volume_states() == []
        assert fuse_mounts_under(csi_root) == {}
