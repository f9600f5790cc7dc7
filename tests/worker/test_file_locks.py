"""File locks through a real mount: ``flock``, POSIX (``fcntl``/``lockf``) and OFD locks.

pyfuse3 implements no ``getlk``/``setlk``/``flock``, so the kernel keeps every lock
of a FUSE mount itself (docs/posix.md, "file locks"). These tests check what an
application relies on — a second holder is refused, a blocked ``F_SETLKW`` waits
and then gets the lock, ``F_GETLK`` names the holder, a close releases — with the
same outcomes as on the native directory, and pin the documented limit: the
backing directory does not see the mount's locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: ``struct flock`` on Linux x86-64/aarch64: l_type, l_whence (short), l_start, l_len
#: (off_t), l_pid (pid_t), padded to 32 bytes (fcntl(2), <asm-generic/fcntl.h>).
FLOCK = "hhqqi4x"

#: A process other than the test's: tries one lock on ``argv[1]`` and prints the
#: outcome (``ok``, an errno name, or for ``getlk`` whether argv[3]'s pid holds it).
CONTENDER = r"""
import errno, fcntl, os, struct, sys
path, kind = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
try:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
    elif kind == "posix-disjoint":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100)
    elif kind == "posix-wait":
        print("waiting", flush=True)
        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
    elif kind == "getlk":
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 100, 0)
        l_type, _, start, length, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
        print("unlocked" if l_type == fcntl.F_UNLCK else f"type={l_type} {start}+{length} by_holder={pid == int(sys.argv[3])}")
        sys.exit()
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def contend(path: Path, kind: str, *args: str) -> str:
    """Run one :data:`CONTENDER` lock attempt in a new process; its one-line outcome."""
    done = subprocess.run([sys.executable, "-c", CONTENDER, str(path), kind, *args],
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def ofd_lock(fd: int, start: int, length: int) -> str:
    """``F_OFD_SETLK`` a write lock on ``[start, start + length)`` of ``fd``: ``ok`` or the errno name."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def lock_outcomes(directory: Path) -> dict[str, str]:
    """The same lock scenario in ``directory``; each step's outcome by name."""
    path = directory / "locked"
    path.write_bytes(b"x" * 300)
    out: dict[str, str] = {}
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out["flock, held by us"] = contend(path, "flock")
        fcntl.flock(fd, fcntl.LOCK_UN)
        out["flock, released"] = contend(path, "flock")

        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)  # bytes 0-99
        out["posix, overlapping"] = contend(path, "posix")
        out["posix, disjoint range"] = contend(path, "posix-disjoint")
        out["getlk"] = contend(path, "getlk", str(os.getpid()))

        waiter = subprocess.Popen([sys.executable, "-c", CONTENDER, str(path), "posix-wait"],
                                  stdout=subprocess.PIPE, text=True)
        assert waiter.stdout is not None
        assert waiter.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        out["posix-wait, while held"] = "waiting" if waiter.poll() is None else "returned"
        fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
        out["posix-wait, after unlock"] = waiter.communicate(timeout=30)[0].strip()

        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
    finally:
        os.close(fd)  # closing any fd of the file drops this process's POSIX locks
    out["posix, holder closed"] = contend(path, "posix")

    first, second = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        out["ofd, first description"] = ofd_lock(first, 200, 100)
        out["ofd, second description overlapping"] = ofd_lock(second, 250, 10)
        os.close(first)
        first = -1
        out["ofd, first closed"] = ofd_lock(second, 250, 10)
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)
    return out


EXPECTED = {
    "flock, held by us": "EAGAIN",  # EWOULDBLOCK is EAGAIN on Linux
    "flock, released": "ok",
    "posix, overlapping": "EAGAIN",  # or EACCES by POSIX; Linux gives EAGAIN
    "posix, disjoint range": "ok",
    "getlk": "type=1 0+100 by_holder=True",  # F_WRLCK
    "posix-wait, while held": "waiting",
    "posix-wait, after unlock": "ok",
    "posix, holder closed": "ok",
    "ofd, first description": "ok",
    "ofd, second description overlapping": "EAGAIN",
    "ofd, first closed": "ok",
}


@pytest.mark.fuse
@pytest.mark.parametrize("backend", ["passthrough", "memory", "kernel-passthrough"])
def test_locks_through_the_mount_behave_as_on_the_native_fs(mount_worker, tmp_path: Path, backend: str) -> None:
    extra = {"passthrough": [], "memory": ["--backend", "memory"], "kernel-passthrough": ["--kernel-passthrough"]}
    vol = mount_worker(extra=extra[backend])
    native = tmp_path / "native"
    native.mkdir()
    assert lock_outcomes(native) == EXPECTED  # the scenario itself, on ext4
    assert lock_outcomes(vol.mountpoint) == EXPECTED
    assert vol.proc.poll() is None, vol.log()


@pytest.mark.fuse
def test_the_backing_directory_does_not_see_the_mounts_locks(mount_worker) -> None:
    """The documented limit (docs/posix.md): locks live in this node's kernel, on the FUSE inode."""
    vol = mount_worker()
    (vol.mountpoint / "shared").write_bytes(b"x" * 100)
    fd = os.open(vol.mountpoint / "shared", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
        assert contend(vol.mountpoint / "shared", "posix") == "EAGAIN"
        assert contend(vol.backing / "shared", "posix") == "ok"
    finally:
        os.close(fd)
