"""NodeGetVolumeStats, access modes, read-only publishes, recovery of a dead worker
and SIGTERM draining — on real FUSE mounts through the real csi-node.

These mount FUSE file systems: they fail (never skip) where FUSE is missing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
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
)
from interposer.proto.csi import csi_pb2
from interposer_testing import require_fuse

pytestmark = pytest.mark.fuse

Mode = csi_pb2.VolumeCapability.AccessMode
Usage = csi_pb2.VolumeUsage
#: How long the watcher may take to restore a killed worker in these tests, seconds
#: (a bound for the test to give up, not a speed claim).
RESTORE_WAIT_S = 20.0


@pytest.fixture(autouse=True)
def _fuse_available() -> None:
    require_fuse()


def publish(csi_node: CsiNode, volume_id: str, target: Path, backing: Path, **kwargs) -> dict:
    csi_node.node.NodePublishVolume(
        mounting_volume_request(volume_id, target, backing, **kwargs), timeout=RPC_TIMEOUT_S
    )
    return next(s for s in csi_node.volume_states() if s["volume_id"] == volume_id)


def stats(csi_node: CsiNode, volume_id: str, target: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
    return csi_node.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target)), timeout=RPC_TIMEOUT_S
    )


def test_volume_stats_report_backing_usage_and_a_normal_condition(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path
) -> None:
    target = csi_root / "pods" / "p1" / "mount"
    publish(csi_node, "vol-stats", target, backing_dir)
    reply = stats(csi_node, "vol-stats", target)

    assert reply.volume_condition.abnormal is False
    by_unit = {u.unit: u for u in reply.usage}
    assert set(by_unit) == {Usage.BYTES, Usage.INODES}
    backing = os.statvfs(backing_dir)
    # The same file system as the backing dir: same total size and inode count.
    assert by_unit[Usage.BYTES].total == backing.f_blocks * backing.f_frsize
    assert by_unit[Usage.INODES].total == backing.f_files
    for usage in by_unit.values():
        assert 0 <= usage.available <= usage.total and 0 <= usage.used <= usage.total


def test_volume_stats_abnormal_while_the_worker_is_dead(csi_root: Path, backing_dir: Path) -> None:
    # Recovery off, so the dead worker stays dead while we look.
    with running_csi_node(csi_root, extra_args=["--watch-interval-s", "0"]) as csi_node:
        target = csi_root / "pods" / "p2" / "mount"
        state = publish(csi_node, "vol-dead", target, backing_dir)
        os.kill(state["worker_pid"], signal.SIGKILL)
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while pid_alive(state["worker_pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        reply = stats(csi_node, "vol-dead", target)
        assert reply.volume_condition.abnormal is True
        assert "not running" in reply.volume_condition.message
        assert list(reply.usage) == []
        csi_node.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-dead", target_path=str(target)),
            timeout=RPC_TIMEOUT_S,
        )
        assert fuse_mounts_under(csi_root) == {}


def test_volume_stats_not_found_for_an_unknown_volume_or_path(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path
) -> None:
    target = csi_root / "pods" / "p3" / "mount"
    publish(csi_node, "vol-known", target, backing_dir)
    for volume_id, path in (("vol-unknown", target), ("vol-known", csi_root / "elsewhere")):
        with pytest.raises(grpc.RpcError) as caught:
            stats(csi_node, volume_id, path)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (volume_id, path)


@pytest.mark.parametrize(
    "mode",
    [
        Mode.SINGLE_NODE_WRITER,
        Mode.MULTI_NODE_MULTI_WRITER,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    ],
    ids=Mode.Mode.Name,
)
def test_writer_access_modes_publish_writable(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path, mode: int
) -> None:
    target = csi_root / "pods" / "w" / "mount"
    state = publish(csi_node, "vol-rw", target, backing_dir, mode=mode)
    assert state["access_mode"] == mode and state["readonly"] is False
    (target / "written").write_text("ok")
    assert (backing_dir / "written").read_text() == "ok"


@pytest.mark.parametrize(
    ("mode", "readonly"),
    [
        (Mode.SINGLE_NODE_WRITER, True),
        (Mode.MULTI_NODE_READER_ONLY, False),
        (Mode.SINGLE_NODE_READER_ONLY, False),
    ],
    ids=["readonly-flag", "MULTI_NODE_READER_ONLY", "SINGLE_NODE_READER_ONLY"],
)
def test_read_only_publish_refuses_writes_with_erofs(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path, mode: int, readonly: bool
) -> None:
    (backing_dir / "existing").write_text("visible")
    target = csi_root / "pods" / "r" / "mount"
    publish(csi_node, "vol-ro", target, backing_dir, mode=mode, readonly=readonly)
    assert (target / "existing").read_text() == "visible"
    with pytest.raises(OSError) as caught:
        (target / "new").write_text("nope")
    assert caught.value.errno == errno.EROFS
    assert not (backing_dir / "new").exists()


def test_multi_node_single_writer_is_refused(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    target = csi_root / "pods" / "x" / "mount"
    with pytest.raises(grpc.RpcError) as caught:
        publish(csi_node, "vol-mnsw", target, backing_dir, mode=Mode.MULTI_NODE_SINGLE_WRITER)
    # The spec's "Exceeds capabilities" for NodePublishVolume.
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "MULTI_NODE_SINGLE_WRITER" in caught.value.details()
    assert csi_node.volume_states() == [] and fuse_mounts_under(csi_root) == {}


def test_killed_worker_is_restored_at_the_same_target(
    csi_node: CsiNode, csi_root: Path, backing_dir: Path
) -> None:
    """SIGKILL the worker: the app sees ENOTCONN, then the watcher brings the same path back."""
    target = csi_root / "pods" / "k" / "mount"
    state = publish(csi_node, "vol-kill", target, backing_dir)
    (target / "before").write_text("kept")
    old_pid = state["worker_pid"]

    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    seen_errnos = set()
    deadline = killed_at + RESTORE_WAIT_S
    while True:
        try:
            content = (target / "before").read_text()
            break
        except OSError as exc:
            seen_errnos.add(errno.errorcode.get(exc.errno, str(exc.errno)))
        assert time.monotonic() < deadline, f"not restored in {RESTORE_WAIT_S} s:\n{csi_node.log_text()}"
        time.sleep(0.01)
    outage_s = time.monotonic() - killed_at

    assert content == "kept"
    # The watcher records the restore's duration just after the mount answers.
    while not (new_state := csi_node.volume_states()[0])["last_restore_s"]:
        assert time.monotonic() < deadline, csi_node.volume_states()
        time.sleep(0.01)
    assert new_state["worker_pid"] != old_pid and pid_alive(new_state["worker_pid"])
    assert new_state["restarts"] == 1
    assert list(fuse_mounts_under(csi_root)) == [str(target)]  # the dead mount is gone, not stacked
    assert stats(csi_node, "vol-kill", target).volume_condition.abnormal is False
    # What the application saw meanwhile: ECONNABORTED for a request the kernel
    # had queued when the connection died, ENOTCONN for later ones, ENOENT for a
    # lookup between the lazy unmount and the new mount (the bare directory).
    assert seen_errnos <= {"ECONNABORTED", "ENOTCONN", "ENOENT"}, seen_errnos
    print(
        f"\nkill → mount answering again: {outage_s:.3f} s (watcher's own restore: "
        f"{new_state['last_restore_s']:.3f} s); errors seen meanwhile: {sorted(seen_errnos)}"
    )

    (target / "after").write_text("new worker")
    assert (backing_dir / "after").read_text() == "new worker"
    csi_node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-kill", target_path=str(target)),
        timeout=RPC_TIMEOUT_S,
    )
    assert fuse_mounts_under(csi_root) == {} and not pid_alive(new_state["worker_pid"])


def test_unpublish_drains_a_read_in_flight(csi_node: CsiNode, csi_root: Path, backing_dir: Path) -> None:
    """SIGTERM (from NodeUnpublishVolume) lets a FUSE read already in the worker finish."""
    (backing_dir / "slow").write_bytes(b"x" * 4096)
    policy = {"layers": [{"type": "delay", "delay_s": 1.5, "ops": ["read"]}]}
    target = csi_root / "pods" / "d" / "mount"
    publish(csi_node, "vol-drain", target, backing_dir, extra_context={"policy": json.dumps(policy)})
    outcome: list[object] = []

    def reader() -> None:
        try:
            fd = os.open(target / "slow", os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            outcome.append(exc)
            return
        try:
            outcome.append(os.pread(fd, 4096, 0))
        except OSError as exc:
            outcome.append(exc)
        finally:
            # The close comes after the worker is gone: FLUSH/RELEASE fail
            # (ECONNABORTED); only requests already in the worker are drained.
            try:
                os.close(fd)
            except OSError:
                pass

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.5)  # the read is now sleeping in the worker's delay layer
    csi_node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-drain", target_path=str(target)),
        timeout=RPC_TIMEOUT_S,
    )
    thread.join(RPC_TIMEOUT_S)
    assert outcome == [b"x" * 4096], outcome
    assert fuse_mounts_under(csi_root) == {}
