"""``close(2)`` and FLUSH on a real mount: spared where flushing does nothing (``--skip-needless-flush``).

The worker answers an open with FOPEN_NOFLUSH when no layer in force acts on
``flush`` at the file's path and the backend's flush cannot do anything there (a
backing fs without a flush method, such as ext4 or tmpfs; the memory and null
backends). The kernel then sends no FLUSH request when the file is closed, only
the asynchronous RELEASE. The tests tell the two apart by stopping the worker
(SIGSTOP): a close that sends FLUSH waits for the worker, one that does not
returns at once.
"""

from __future__ import annotations

import errno
import json
import mmap
import os

import pytest

from interposer_testing import call_with_process_stopped

pytestmark = pytest.mark.fuse


def _closes_with_worker_stopped(vol, fd: int, timeout_s: float = 5.0) -> bool:  # noqa: ANN001
    """True if ``close(fd)`` returned while the worker was stopped: no FLUSH request waited for it."""
    return call_with_process_stopped(vol.proc.pid, lambda: os.close(fd) or True, timeout_s) is True


def _create(vol, name: str, data: bytes = b"") -> int:  # noqa: ANN001
    fd = os.open(vol.mountpoint / name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, data)
    return fd


def test_closes_send_no_flush_on_a_backing_fs_without_one(mount_worker) -> None:
    vol = mount_worker()
    assert _closes_with_worker_stopped(vol, _create(vol, "new", b"written"))
    assert _closes_with_worker_stopped(vol, os.open(vol.mountpoint / "new", os.O_RDONLY))
    assert _closes_with_worker_stopped(vol, os.open(vol.mountpoint / "new", os.O_RDWR))
    assert (vol.backing / "new").read_bytes() == b"written"
    assert (vol.mountpoint / "new").read_bytes() == b"written"
    assert vol.proc.poll() is None, vol.log()


def test_shared_map_writes_reach_the_backing_file_without_flush(mount_worker) -> None:
    # FLUSH also wrote back a shared map's dirty pages; without it, unmapping does.
    vol = mount_worker()
    (vol.mountpoint / "mapped").write_bytes(bytes(8192))
    fd = os.open(vol.mountpoint / "mapped", os.O_RDWR)
    mapping = mmap.mmap(fd, 8192)
    assert _closes_with_worker_stopped(vol, fd)  # the map keeps the file open
    mapping[100:105] = b"hello"
    mapping.close()
    assert (vol.backing / "mapped").read_bytes()[100:105] == b"hello"


def test_always_flush_sends_one_per_close(mount_worker) -> None:
    # The control for the test above: the helper does tell a close that waits for the worker.
    vol = mount_worker(extra=["--always-flush"])
    assert not _closes_with_worker_stopped(vol, _create(vol, "new"), timeout_s=1.0)
    assert vol.proc.poll() is None, vol.log()


def test_a_layer_acting_on_flush_gets_it_where_it_matches(mount_worker) -> None:
    policy = json.dumps({"layers": [{"type": "fault", "errno": "EIO", "ops": ["flush"], "path_glob": "/faulty/*"}]})
    vol = mount_worker(policy=policy)
    (vol.mountpoint / "faulty").mkdir()
    fd = _create(vol, "faulty/f", b"x")
    with pytest.raises(OSError) as info:
        os.close(fd)  # the close still closed the descriptor, and reports the injected error
    assert info.value.errno == errno.EIO
    assert _closes_with_worker_stopped(vol, _create(vol, "elsewhere"))
    assert (vol.backing / "faulty" / "f").read_bytes() == b"x"


def test_a_layer_acting_on_every_op_keeps_flush(mount_worker) -> None:
    # ops unset = every op, flush included: a delay of 0.2 s on all of /slow/ must reach close(2) too.
    policy = json.dumps({"layers": [{"type": "delay", "delay_s": 0.2, "path_glob": "/slow/*"}]})
    vol = mount_worker(policy=policy)
    (vol.backing / "slow").mkdir()
    assert not _closes_with_worker_stopped(vol, _create(vol, "slow/f"), timeout_s=1.0)


@pytest.mark.parametrize("backend", ["memory", "null"])
def test_memory_and_null_backends_need_no_flush(mount_worker, backend: str) -> None:
    vol = mount_worker(extra=["--backend", backend])
    assert _closes_with_worker_stopped(vol, _create(vol, "new", b"abc"))
    assert os.stat(vol.mountpoint / "new").st_size == 3


def test_a_backing_fs_with_a_flush_method_gets_flush(mount_worker) -> None:
    # A FUSE mount (another worker) as the backing dir: FUSE files have a flush method,
    # which may report an error (a network fs's deferred write error, say), so the
    # upper mount must pass every close on.
    lower = mount_worker("lower")
    upper = mount_worker("upper", backing=lower.mountpoint)
    fd = _create(upper, "new", b"through two mounts")
    assert not _closes_with_worker_stopped(upper, fd, timeout_s=1.0)
    assert (lower.backing / "new").read_bytes() == b"through two mounts"
    assert _closes_with_worker_stopped(lower, os.open(lower.mountpoint / "new", os.O_RDONLY))
