"""`interposer mount`, the building block users start by hand, on a real FUSE mount."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

from interposer_testing import call_with_process_stopped, is_fuse_mount, require_fuse, wait_until


def _mount(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "interposer.cli", "mount", *args], stdout=out,
                                stderr=subprocess.STDOUT)


def test_mount_serves_a_backing_dir_until_unmounted(tmp_path: Path) -> None:
    require_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    proc = _mount([str(backing), str(mnt), "--volume-id", "cli"], tmp_path / "mount.log")
    try:
        wait_until(lambda: is_fuse_mount(mnt) or proc.poll() is not None, "the mount")
        assert proc.poll() is None, (tmp_path / "mount.log").read_text()
        (mnt / "hello.txt").write_text("hi")
        assert (backing / "hello.txt").read_text() == "hi"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert proc.wait(10) == 0
    assert not is_fuse_mount(mnt)


def test_mount_memory_backend_takes_only_a_mountpoint(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _mount(["--backend", "memory", str(mnt)], tmp_path / "mount.log")
    try:
        wait_until(lambda: is_fuse_mount(mnt) or proc.poll() is not None, "the mount")
        (mnt / "f").write_bytes(b"x" * 100)
        assert (mnt / "f").stat().st_size == 100
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert proc.wait(10) == 0


def test_mount_rejects_a_bad_policy_file_before_mounting(tmp_path: Path) -> None:
    require_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    policy = tmp_path / "policy.json"
    policy.write_text('{"layers": [{"type": "fault", "probability": 3}]}')
    result = subprocess.run([sys.executable, "-m", "interposer.cli", "mount", str(backing), str(mnt),
                             "--policy-file", str(policy)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "$.layers[0].probability" in result.stderr
    time.sleep(0.2)
    assert not is_fuse_mount(mnt)


def test_mount_with_kernel_passthrough_leaves_reads_to_the_kernel(tmp_path: Path) -> None:
    require_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (backing / "data").write_bytes(b"d" * 65536)
    proc = _mount([str(backing), str(mnt), "--kernel-passthrough"], tmp_path / "mount.log")
    try:
        wait_until(lambda: is_fuse_mount(mnt) or proc.poll() is not None, "the mount")
        fd = os.open(mnt / "data", os.O_RDONLY)
        try:  # answered while the worker is stopped: the kernel read the backing file itself
            assert call_with_process_stopped(proc.pid, lambda: os.pread(fd, 65536, 0)) == b"d" * 65536
        finally:
            os.close(fd)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert proc.wait(10) == 0, (tmp_path / "mount.log").read_text()


def test_mount_refuses_kernel_passthrough_without_a_backing_dir(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "interposer.cli", "mount", "--backend", "memory",
                             "--kernel-passthrough", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "kernel_passthrough needs the passthrough backend" in result.stderr
    assert not is_fuse_mount(tmp_path)


def test_mount_always_flush_sends_flush_on_every_close(tmp_path: Path) -> None:
    require_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    proc = _mount([str(backing), str(mnt), "--always-flush"], tmp_path / "mount.log")
    try:
        wait_until(lambda: is_fuse_mount(mnt) or proc.poll() is not None, "the mount")
        fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        # close(2) waits for the stopped worker: it sent a FLUSH (without the flag it would not, on ext4)
        assert call_with_process_stopped(proc.pid, lambda: os.close(fd) or True, timeout_s=1.0) is None
    finally:
        # The close finishes in its thread once the worker is continued; until then the mount is busy.
        wait_until(lambda: subprocess.run(["fusermount3", "-u", str(mnt)], check=False,
                                          capture_output=True).returncode == 0, "an unmount the close no longer holds up")
    assert proc.wait(10) == 0, (tmp_path / "mount.log").read_text()


def test_mount_says_what_it_serves_and_will_not_hide_a_running_mount(tmp_path: Path) -> None:
    """A second `mount` on the same mountpoint would hide the first volume (whose policy
    commands would then seem to do nothing): refused, naming the volume and the fix."""
    require_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    log = tmp_path / "mount.log"
    proc = _mount([str(backing), str(mnt), "--volume-id", "first"], log)
    try:
        wait_until(lambda: is_fuse_mount(mnt) or proc.poll() is not None, "the mount")
        wait_until(lambda: f"serving {mnt}" in log.read_text(), "the start message")
        second = subprocess.run([sys.executable, "-m", "interposer.cli", "mount", str(backing), str(mnt),
                                 "--volume-id", "second"], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "already an interposer mount (volume first)" in second.stderr
        assert f"fusermount3 -u {mnt}" in second.stderr
        assert Path("/proc/self/mountinfo").read_text().count(f" {mnt} ") == 1
        (mnt / "f").write_text("still served by the first")
        assert (backing / "f").read_text() == "still served by the first"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert proc.wait(10) == 0
    assert "unmounted;" in log.read_text() and "ops served" in log.read_text()


def test_mount_on_a_dead_mount_says_so_and_how_to_clear_it(tmp_path: Path) -> None:
    """A mount whose worker was killed answers ENOTCONN; "does not exist" would send the user looking
    for a directory that `ls -d` shows."""
    require_fuse()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    proc = _mount([str(backing), str(mnt)], tmp_path / "mount.log")
    try:
        wait_until(lambda: is_fuse_mount(mnt) or proc.poll() is not None, "the mount")
        proc.kill()
        proc.wait(10)
        wait_until(lambda: _stat_errno(mnt) == errno.ENOTCONN, "the kernel's cached attributes of the root to expire")
        again = subprocess.run([sys.executable, "-m", "interposer.cli", "mount", str(backing), str(mnt)],
                               capture_output=True, text=True, timeout=30)
        assert again.returncode == 2
        assert "FUSE mount whose server is gone" in again.stderr and f"fusermount3 -u {mnt}" in again.stderr
        assert "does not exist" not in again.stderr
        cleared = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
        assert cleared.returncode == 0, cleared.stderr  # the fix the message gives works
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)


def _stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or 0
    return 0
