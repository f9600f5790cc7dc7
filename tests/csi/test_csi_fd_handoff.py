"""FUSE fd handoff: the csi-node mounts, an unprivileged worker serves the passed fd.

The worker runs under ``setpriv --bounding-set=-sys_admin --no-new-privs``: it
cannot get ``CAP_SYS_ADMIN`` by any means (not even through the setuid
``fusermount3``), so a working mount proves the worker never mounted. The
control test shows the same worker cannot mount by itself. Real FUSE mounts
through the real csi-node: these fail (never skip) where FUSE is missing.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from csi_support import RPC_TIMEOUT_S, CsiNode, fuse_mounts_under, mounting_volume_request, pid_alive, running_csi_node
from interposer.csi_node._fuse_fd import FdHandoff, fuse_mount_options
from interposer.csi_node._mounts import READ_AHEAD_KIB
from interposer.fuse_worker._worker import receive_fuse_fd
from interposer.proto.csi import csi_pb2
from interposer_testing import require_fuse

#: Bit of CAP_SYS_ADMIN in /proc/<pid>/status capability masks (linux/capability.h).
CAP_SYS_ADMIN_BIT = 21
#: The worker as an unprivileged process: no CAP_SYS_ADMIN, no way to regain it.
UNPRIVILEGED_WORKER = shlex.join(
    ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all", "--no-new-privs", "--",
     sys.executable, "-m", "interposer.fuse_worker"]
)
#: A bound for the test to give up waiting for the watcher, seconds (not a speed claim).
RESTORE_WAIT_S = 20.0


def _capabilities(pid: int) -> dict[str, int]:
    """``CapEff``, ``CapPrm``, ``CapBnd``… of ``pid`` as integers."""
    caps = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cap"):
            key, value = line.split(":")
            caps[key] = int(value.strip(), 16)
    return caps


def _holds_dev_fuse(pid: int) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd_dir / name) == "/dev/fuse" for name in os.listdir(fd_dir))


def _read_ahead_kib(mountpoint: Path) -> int:
    (device,) = [line.split()[2] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if line.split()[4] == str(mountpoint)]
    return int(Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text())


def _publish(csi_node: CsiNode, volume_id: str, target: Path, backing: Path) -> dict:
    csi_node.node.NodePublishVolume(mounting_volume_request(volume_id, target, backing), timeout=RPC_TIMEOUT_S)
    return next(s for s in csi_node.volume_states() if s["volume_id"] == volume_id)


@pytest.mark.fuse
def test_unprivileged_worker_serves_the_mount_the_csi_node_made(csi_root: Path, backing_dir: Path) -> None:
    require_fuse()
    target = csi_root / "pods" / "p" / "mount"
    with running_csi_node(csi_root, worker_command=UNPRIVILEGED_WORKER, extra_args=["--fuse-fd-handoff"]) as node:
        state = _publish(node, "vol-fd", target, backing_dir)
        pid = state["worker_pid"]
        caps = _capabilities(pid)
        assert not caps["CapEff"] >> CAP_SYS_ADMIN_BIT & 1 and not caps["CapBnd"] >> CAP_SYS_ADMIN_BIT & 1, caps
        assert "--fuse-fd-socket" in state["worker_argv"]
        assert _holds_dev_fuse(pid), "the worker does not hold the /dev/fuse fd it serves"
        assert fuse_mounts_under(csi_root) == {str(target): "fuse.interposer"}
        assert _read_ahead_kib(target) == READ_AHEAD_KIB, "the csi-node sets the readahead of mounts it made"

        (target / "hello").write_text("through the passed fd")
        assert (backing_dir / "hello").read_text() == "through the passed fd"
        assert not list((node.state_dir / "handoff").glob("*.sock")), "the handoff socket outlived the handoff"

        # Recovery in handoff mode: the csi-node mounts anew and hands the new fd over.
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + RESTORE_WAIT_S
        while True:
            try:
                content = (target / "hello").read_text()
                break
            except OSError:
                assert time.monotonic() < deadline, f"not restored:\n{node.log_text()}"
                time.sleep(0.02)
        assert content == "through the passed fd"
        while not (restored := node.volume_states()[0])["last_restore_s"]:
            assert time.monotonic() < deadline, node.volume_states()
            time.sleep(0.01)
        assert restored["worker_pid"] != pid and pid_alive(restored["worker_pid"])
        assert not _capabilities(restored["worker_pid"])["CapEff"] >> CAP_SYS_ADMIN_BIT & 1
        assert list(fuse_mounts_under(csi_root)) == [str(target)]
        assert _read_ahead_kib(target) == READ_AHEAD_KIB, "and of the new mount after a recovery"
        print(f"\nfd handoff: SIGKILL → read answering again after a new mount + handoff: "
              f"{time.monotonic() - killed_at:.3f} s (watcher's restore: {restored['last_restore_s']:.3f} s)")

        node.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-fd", target_path=str(target)), timeout=RPC_TIMEOUT_S
        )
        assert fuse_mounts_under(csi_root) == {}
        assert not pid_alive(restored["worker_pid"])


@pytest.mark.fuse
def test_the_same_worker_cannot_mount_by_itself(csi_root: Path, backing_dir: Path) -> None:
    """Control: without the handoff, the worker under the same setpriv fails to mount."""
    require_fuse()
    target = csi_root / "pods" / "q" / "mount"
    with running_csi_node(csi_root, worker_command=UNPRIVILEGED_WORKER) as node:
        with pytest.raises(grpc.RpcError) as failed:
            _publish(node, "vol-nocap", target, backing_dir)
    assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value.details()
    assert fuse_mounts_under(csi_root) == {}


def test_handoff_gives_the_fd_only_to_its_volume(tmp_path: Path) -> None:
    """A worker announcing another volume id is refused; the right one gets the same open file."""
    read_end, write_end = os.pipe()  # any fd travels the same way as a /dev/fuse one
    socket_path = tmp_path / "vol-a.sock"
    with FdHandoff(socket_path) as handoff:
        assert socket_path.stat().st_mode & 0o777 == 0o600
        sender = threading.Thread(target=handoff.send, args=(write_end, "vol-a", 10.0, lambda: True))
        sender.start()
        with pytest.raises(ConnectionRefusedError, match="serves volume vol-a"):
            receive_fuse_fd(str(socket_path), "vol-b", 5.0)
        received = receive_fuse_fd(str(socket_path), "vol-a", 5.0)
        sender.join(5.0)
        assert not sender.is_alive()
    try:
        os.write(received, b"x")
        assert os.read(read_end, 1) == b"x"
    finally:
        for fd in (read_end, write_end, received):
            os.close(fd)
    assert not socket_path.exists()


def test_handoff_waits_end_when_the_worker_dies_or_never_asks(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        with FdHandoff(tmp_path / "v.sock") as handoff:
            with pytest.raises(ChildProcessError):
                handoff.send(write_end, "v", 10.0, lambda: False)
            with pytest.raises(TimeoutError):
                handoff.send(write_end, "v", 0.3, lambda: True)
        with pytest.raises(TimeoutError):
            receive_fuse_fd(str(tmp_path / "absent.sock"), "v", 0.3)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_mount_options_are_those_of_fusermount() -> None:
    assert fuse_mount_options(7, read_only=False) == [
        "fd=7", "rootmode=40000", "user_id=0", "group_id=0", "allow_other", "default_permissions", "nosuid", "nodev"
    ]
    assert fuse_mount_options(7, read_only=True)[-1] == "ro"
