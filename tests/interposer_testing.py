"""Helpers shared by the test modules (import as ``from interposer_testing import …``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def require_fuse() -> None:
    """Fail the calling test unless FUSE mounts can be made here."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests need it (install fuse3, run as root)")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: apt-get install fuse3 (make setup does)")



class MountedVolume:
    """A fuse-worker process serving ``backing`` at ``mountpoint``."""

    def __init__(self, backing: Path, mountpoint: Path, proc: "subprocess.Popen[bytes]", log_path: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def unmount(self) -> int:
        """Unmount with fusermount3 and return the worker's exit code."""
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False, capture_output=True)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False, capture_output=True)
        return self.proc.wait()


def is_fuse_mount(path: Path) -> bool:
    """True if ``path`` is a FUSE mount point (per /proc/self/mountinfo)."""
    target = str(path.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[4] == target and fields[sep + 1].startswith("fuse"):
            return True
    return False


def wait_until(condition, what: str, timeout_s: float = 10.0, interval_s: float = 0.05) -> None:  # noqa: ANN001
    """Poll ``condition()`` until it is true; fail the test naming ``what`` after ``timeout_s`` seconds."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def read_errno(path: Path) -> int:
    """Read 4 KiB of ``path`` with ``O_DIRECT`` (so the read reaches the worker); return the errno, 0 if it worked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc.errno
    return 0


def call_with_process_stopped(pid: int, call, timeout_s: float = 5.0):  # noqa: ANN001, ANN201
    """``call()`` in a thread while process ``pid`` is stopped (SIGSTOP); None if it did not return in time.

    Tells a FUSE request the kernel answers by itself (kernel passthrough, the page
    cache) from one that needs the worker: the latter waits until ``pid`` is continued.
    """
    result: list = []
    caller = threading.Thread(target=lambda: result.append(call()), daemon=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        caller.start()
        caller.join(timeout_s)
        return result[0] if result else None
    finally:
        os.kill(pid, signal.SIGCONT)
        # a call that waited for the process ends now: it must not hold the mount busy when the test unmounts it
        caller.join(timeout_s)


def make_chain(top: Path, name: str, depth: int) -> int:
    """Create ``top/name/name/...``, ``depth`` directories deep, through directory fds (any depth).

    Returns:
        An ``O_RDONLY | O_DIRECTORY`` fd of the deepest directory (the caller closes it).
    """
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        fd, parent_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(parent_fd)
    return fd


def remove_chain(top: Path, name: str, depth: int) -> None:
    """Remove what :func:`make_chain` made (and the files in it), bottom up through fds.

    pytest's own clean-up of ``tmp_path`` recurses once per level and fails on a
    tree deeper than Python's recursion limit.
    """
    fds = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    for _ in range(depth):
        fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    while len(fds) > 1:
        fd = fds.pop()
        for entry in os.listdir(fd):  # files only: the directory below is gone already
            os.unlink(entry, dir_fd=fd)
        os.close(fd)
        os.rmdir(name, dir_fd=fds[-1])
    os.close(fds[0])
