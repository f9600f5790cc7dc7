"""Kernel FUSE passthrough on a real mount (``--kernel-passthrough``, ``_kernel_passthrough``).

A file opened in passthrough mode is read and written by the kernel straight from
the backing file: no READ or WRITE request reaches the worker. The tests tell the
two apart by stopping the worker (SIGSTOP) and reading data the mount's page cache
has never held: only the kernel can answer then. A read that needs the worker
waits until it is continued, and the helper reports it as not served.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interposer_testing import call_with_process_stopped, wait_until

pytestmark = pytest.mark.fuse

MIB = 1 << 20
PASSTHROUGH = ["--kernel-passthrough"]


def _read_with_worker_stopped(vol, fd: int, size: int, offset: int = 0,  # noqa: ANN001
                              timeout_s: float = 5.0) -> bytes | None:
    """``pread(fd, size, offset)`` while the worker is stopped; None if it did not complete within ``timeout_s``."""
    return call_with_process_stopped(vol.proc.pid, lambda: os.pread(fd, size, offset), timeout_s)


def _open_and_read_with_worker_stopped(vol, name: str, size: int = MIB, offset: int = 0,  # noqa: ANN001
                                       timeout_s: float = 5.0) -> bytes | None:
    """Open ``name`` in the mount read-only, then read as :func:`_read_with_worker_stopped`."""
    fd = os.open(vol.mountpoint / name, os.O_RDONLY)
    try:
        return _read_with_worker_stopped(vol, fd, size, offset, timeout_s)
    finally:
        os.close(fd)


def _backing_file(vol, name: str, size: int = MIB) -> bytes:  # noqa: ANN001
    data = os.urandom(size)
    (vol.backing / name).write_bytes(data)
    return data


def _writes_with_worker_stopped(vol, fd: int, timeout_s: float = 5.0) -> bool:  # noqa: ANN001
    """True if a 4 KiB ``pwrite`` through ``fd`` completed while the worker was stopped."""
    return call_with_process_stopped(vol.proc.pid, lambda: os.pwrite(fd, b"y" * 4096, 4096), timeout_s) == 4096


def test_passthrough_writes_do_not_wait_for_the_worker(mount_worker) -> None:
    # With FUSE_HANDLE_KILLPRIV_V2 the kernel stops asking the worker for
    # security.capability before each write once a write has found nothing to clear.
    vol = mount_worker(extra=PASSTHROUGH)
    fd = os.open(vol.mountpoint / "log", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"first")
        assert _writes_with_worker_stopped(vol, fd)
    finally:
        os.close(fd)
    assert (vol.backing / "log").read_bytes()[4096:] == b"y" * 4096


def test_without_killpriv_v2_every_passthrough_write_asks_the_worker(mount_worker) -> None:
    # The control for the test above: the helper does tell a write that waits for the worker.
    vol = mount_worker(extra=[*PASSTHROUGH, "--no-handle-killpriv-v2"])
    fd = os.open(vol.mountpoint / "log", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"first")
        assert not _writes_with_worker_stopped(vol, fd, timeout_s=1.0)
    finally:
        os.close(fd)
    wait_until(lambda: (vol.backing / "log").read_bytes()[4096:] == b"y" * 4096, "the write, once continued")


def test_reads_and_writes_of_an_opened_file_are_served_by_the_kernel(mount_worker) -> None:
    vol = mount_worker(extra=PASSTHROUGH)
    data = _backing_file(vol, "data")
    fd = os.open(vol.mountpoint / "data", os.O_RDWR)
    try:
        assert _read_with_worker_stopped(vol, fd, MIB) == data
        os.pwrite(fd, b"written", MIB - 3)  # extends the file: the kernel updates its size itself
        assert os.fstat(fd).st_size == MIB + 4
        assert os.pread(fd, 7, MIB - 3) == b"written"
    finally:
        os.close(fd)
    assert (vol.backing / "data").read_bytes() == data[:-3] + b"written"
    assert os.stat(vol.mountpoint / "data").st_size == MIB + 4
    assert vol.proc.poll() is None, vol.log()


def test_without_the_option_the_same_read_waits_for_the_worker(mount_worker) -> None:
    # The control for the test above: the helper does tell the two modes apart.
    vol = mount_worker()
    _backing_file(vol, "data")
    assert _open_and_read_with_worker_stopped(vol, "data", timeout_s=1.0) is None


def test_a_layer_acting_on_reads_sees_them_until_it_expires(mount_worker) -> None:
    policy = json.dumps({"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"], "path_glob": "/data",
                                     "expires_after_s": 2}]})
    vol = mount_worker(policy=policy, extra=PASSTHROUGH)
    data = _backing_file(vol, "data")
    with open(vol.mountpoint / "data", "rb", buffering=0) as f, pytest.raises(OSError) as info:
        f.read(4096)
    assert info.value.errno == errno.EIO  # passthrough did not hide the injected fault
    wait_until(lambda: "layers expired" in vol.log(), "the fault layer to expire")
    assert _open_and_read_with_worker_stopped(vol, "data") == data


def test_a_layer_on_some_paths_keeps_only_those_from_passthrough(mount_worker) -> None:
    policy = json.dumps({"layers": [{"type": "fault", "errno": "EIO", "ops": ["read"], "path_glob": "/faulty/*"}]})
    vol = mount_worker(policy=policy, extra=PASSTHROUGH)
    (vol.backing / "faulty").mkdir()
    (vol.backing / "faulty" / "x").write_bytes(b"x" * 4096)
    data = _backing_file(vol, "fast")
    with open(vol.mountpoint / "faulty" / "x", "rb", buffering=0) as f, pytest.raises(OSError) as info:
        f.read(4096)
    assert info.value.errno == errno.EIO
    assert _open_and_read_with_worker_stopped(vol, "fast") == data


def test_several_opens_of_a_file_a_layer_acts_on_close_cleanly(mount_worker) -> None:
    # Files under a read/write layer are opened with FOPEN_DIRECT_IO, not passed
    # through; closing the second of two such opens of one file once crashed the
    # worker (its per-inode record was gone after the first close).
    policy = json.dumps({"layers": [{"type": "delay", "delay_s": 0.0001, "ops": ["read", "write"]}]})
    vol = mount_worker(policy=policy, extra=PASSTHROUGH)
    data = _backing_file(vol, "data", 8192)
    first = os.open(vol.mountpoint / "data", os.O_RDWR)
    second = os.open(vol.mountpoint / "data", os.O_RDONLY)
    with open(vol.mountpoint / "data", "r+b") as f, mmap.mmap(f.fileno(), 8192) as mapping:
        mapping[:4] = b"mmap"  # shared mmap of a direct-I/O file (FUSE_DIRECT_IO_ALLOW_MMAP)
    os.close(first)
    os.close(second)
    assert (vol.mountpoint / "data").read_bytes() == b"mmap" + data[4:]
    assert vol.proc.poll() is None, vol.log()


def test_a_size_override_keeps_its_files_from_passthrough(mount_worker) -> None:
    # A metadata layer reporting 10 bytes: reads must agree with it, as through the
    # page cache (the kernel reads up to the size it was told), not with the backing
    # file's real size, which passthrough would read.
    policy = json.dumps({"layers": [{"type": "metadata", "size": 10, "path_glob": "/small"}]})
    vol = mount_worker(policy=policy, extra=PASSTHROUGH)
    data = _backing_file(vol, "small", 4096)
    _backing_file(vol, "other")
    assert _open_and_read_with_worker_stopped(vol, "small", 4096, timeout_s=1.0) is None  # not passed through
    assert _open_and_read_with_worker_stopped(vol, "other") is not None  # the rest of the volume is
    fd = os.open(vol.mountpoint / "small", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == 10
        assert os.pread(fd, 4096, 0) == data[:10]
    finally:
        os.close(fd)


def test_a_created_file_is_passed_through(mount_worker) -> None:
    vol = mount_worker(extra=PASSTHROUGH)
    fd = os.open(vol.mountpoint / "created", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        data = _backing_file(vol, "created")  # behind the kernel's back: its cached size is still 0
        assert _read_with_worker_stopped(vol, fd, MIB) == data  # a cached read would see end of file
        # Writes are the kernel's too, but each first asks the worker for
        # security.capability (file_remove_privs on the FUSE inode): not testable stopped.
        assert os.pwrite(fd, b"w" * 8, MIB) == 8
    finally:
        os.close(fd)
    st = os.stat(vol.mountpoint / "created")
    assert (st.st_size, st.st_mode & 0o777) == (MIB + 8, 0o640)
    assert (vol.backing / "created").read_bytes() == data + b"w" * 8


def test_an_inode_open_through_the_page_cache_is_not_passed_through_meanwhile(mount_worker) -> None:
    # The kernel allows one I/O mode per inode: a passthrough open of a file that is
    # open through the page cache would fail with EIO. A delay that keeps the page
    # cache (an emulated device) makes the first open a cached one.
    policy = json.dumps({"layers": [{"type": "delay", "delay_s": 0.0001, "ops": ["read"], "page_cache": "keep",
                                     "expires_after_s": 1}]})
    vol = mount_worker(policy=policy, extra=PASSTHROUGH)
    cached = os.open(vol.mountpoint / "new", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(cached, b"c" * MIB, 0)
        wait_until(lambda: "layers expired" in vol.log(), "the delay layer to expire")
        second = os.open(vol.mountpoint / "new", os.O_RDWR)
        try:
            os.pwrite(second, b"second", 0)
            assert os.pread(cached, 6, 0) == b"second"
            assert os.pread(second, 10, MIB - 10) == b"c" * 10
        finally:
            os.close(second)
    finally:
        os.close(cached)
    (vol.backing / "new").write_bytes(b"n" * MIB)
    # Nothing else open: passthrough again.
    assert _open_and_read_with_worker_stopped(vol, "new", 4096, MIB - 4096) == b"n" * 4096


def test_every_open_of_an_inode_open_in_passthrough_is_passed_through(mount_worker) -> None:
    vol = mount_worker(extra=PASSTHROUGH)
    data = _backing_file(vol, "data")
    first = os.open(vol.mountpoint / "data", os.O_RDONLY)
    try:
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_APPEND):
            fd = os.open(vol.mountpoint / "data", flags)  # would be EIO in any other mode
            os.close(fd)
        assert _read_with_worker_stopped(vol, first, MIB) == data
    finally:
        os.close(first)


def test_shared_maps_of_a_passthrough_file_write_the_backing_file(mount_worker) -> None:
    vol = mount_worker(extra=PASSTHROUGH)
    data = bytearray(_backing_file(vol, "mapped", 64 * 1024))
    with open(vol.mountpoint / "mapped", "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as mapping:
            assert mapping[:4096] == data[:4096]
            mapping[100:105] = b"hello"
            mapping.flush()
    data[100:105] = b"hello"
    assert (vol.backing / "mapped").read_bytes() == bytes(data)
    assert (vol.mountpoint / "mapped").read_bytes() == bytes(data)


def test_backing_files_on_a_stacked_fs_are_left_to_the_worker(mount_worker, tmp_path: Path) -> None:
    # overlayfs has stack depth 1 and the worker asks for max_stack_depth 1, so the
    # kernel refuses its files as backing files (ELOOP): the worker serves them, and says why once.
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for directory in dirs.values():
        directory.mkdir()
    (dirs["lower"] / "first").write_bytes(b"f" * 4096)
    (dirs["lower"] / "second").write_bytes(b"s" * 4096)
    options = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["merged"])], check=True)
    try:
        vol = mount_worker(backing=dirs["merged"], extra=PASSTHROUGH)
        assert (vol.mountpoint / "first").read_bytes() == b"f" * 4096
        fd = os.open(vol.mountpoint / "second", os.O_RDONLY)
        try:
            assert _read_with_worker_stopped(vol, fd, 4096, timeout_s=1.0) is None  # a read the worker must serve
            assert os.pread(fd, 4096, 0) == b"s" * 4096
        finally:
            os.close(fd)
        assert vol.log().count("refuses with ELOOP") == 1, vol.log()
        vol.unmount()
    finally:
        subprocess.run(["umount", str(dirs["merged"])], check=True)


def test_the_option_needs_the_passthrough_backend(mount_worker, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "interposer.fuse_worker", "--backend", "memory",
                             "--mountpoint", str(tmp_path), "--kernel-passthrough"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "kernel_passthrough needs the passthrough backend" in result.stderr
