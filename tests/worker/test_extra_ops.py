"""fallocate, copy_file_range and SEEK_DATA/SEEK_HOLE on a real mount (``_extra_ops``).

pyfuse3 3.5 has no handlers for these; the worker fills their slots in libfuse's
session. Without that, the kernel gets ENOSYS once and then falls back for good:
fallocate(2) fails with EOPNOTSUPP, holes cannot be punched, SEEK_HOLE finds only
end of file. Each test below fails in that case.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from interposer.fuse_worker import _extra_ops
from interposer.fuse_worker.backends._libc import fallocate

MIB = 1 << 20
KIB = 1024
#: fallocate(2) modes (<linux/falloc.h>).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: What the worker logs when it cannot serve the three ops.
NOT_SERVED = "answered ENOSYS"


def _errno_of(call, *args) -> int:  # noqa: ANN001
    try:
        call(*args)
    except OSError as exc:
        return exc.errno
    return 0


def _copy(src: Path, dst: Path, count: int, off_in: int | None = None, off_out: int | None = None) -> int:
    """``copy_file_range(2)`` from file ``src`` into file ``dst`` (created); returns bytes copied."""
    with open(src, "rb") as source, open(dst, "wb") as target:
        return os.copy_file_range(source.fileno(), target.fileno(), count, off_in, off_out)


def _sparse_file_story(path: Path) -> list[object]:
    """Allocate, fill, punch, preallocate, zero and seek in a file; return what each step showed."""
    seen: list[object] = []
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, MIB)
        seen.append(("allocated", os.fstat(fd).st_size, os.stat(path).st_blocks * 512 >= MIB))
        os.pwrite(fd, b"x" * MIB, 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 64 * KIB, 128 * KIB)
        seen.append(("punched", os.fstat(fd).st_size, os.pread(fd, 16, 64 * KIB), os.pread(fd, 4, 0),
                     os.pread(fd, 4, 192 * KIB)))
        seen.append(("seek", os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 64 * KIB, os.SEEK_DATA),
                     _errno_of(os.lseek, fd, MIB, os.SEEK_DATA)))
        fallocate(fd, FALLOC_FL_KEEP_SIZE, MIB, MIB)
        seen.append(("kept size", os.fstat(fd).st_size))
        seen.append(("zero range", _errno_of(fallocate, fd, FALLOC_FL_ZERO_RANGE, 0, 4 * KIB),
                     os.pread(fd, 4, 0)))
        seen.append(("bad range", _errno_of(fallocate, fd, 0, 0, 0)))
    finally:
        os.close(fd)
    seen.append(("contents", path.read_bytes().count(b"x")))
    return seen


@pytest.mark.fuse
def test_fallocate_and_seek_data_through_passthrough_do_what_the_backing_fs_does(mount_worker, tmp_path) -> None:
    native = tmp_path / "native"
    native.mkdir()
    expected = _sparse_file_story(native / "f")
    assert expected[1][2] == bytes(16) and expected[2][1] == 64 * KIB, "the backing fs must punch holes"
    vol = mount_worker()
    assert _sparse_file_story(vol.mountpoint / "f") == expected
    # The hole is in the backing file, not only in what the mount answers.
    assert os.lseek(os.open(vol.backing / "f", os.O_RDONLY), 0, os.SEEK_HOLE) == 64 * KIB
    assert NOT_SERVED not in vol.log()


@pytest.mark.fuse
def test_copy_file_range_is_served_in_the_backend_and_layers_naming_it_act_on_it(mount_worker) -> None:
    policy = '{"layers": [{"type": "fault", "errno": "EIO", "ops": ["copy_file_range"], "path_glob": "/bad*"}]}'
    vol = mount_worker(policy=policy)
    m = vol.mountpoint
    data = os.urandom(3 * MIB + 17)
    (m / "src").write_bytes(data)
    assert _copy(m / "src", m / "copy", len(data) + 100, 0, 5) == len(data)
    assert (vol.backing / "copy").read_bytes() == bytes(5) + data
    # Only the worker could fail it: the kernel's own fallback has no such op.
    assert _errno_of(_copy, m / "src", m / "bad", 10) == errno.EIO
    assert NOT_SERVED not in vol.log()


@pytest.mark.fuse
def test_copy_file_range_goes_through_read_and_write_layers_while_one_is_active(mount_worker) -> None:
    # A layer acting on writes must see a copy's bytes: the worker declines the copy
    # and the kernel copies through write requests, which the fault fails. Copies
    # the layer does not match are still served by the worker (the second layer can
    # only fail a copy_file_range the worker serves).
    policy = json.dumps({"layers": [
        {"type": "fault", "errno": "ENOSPC", "ops": ["write"], "path_glob": "/full"},
        {"type": "fault", "errno": "EIO", "ops": ["copy_file_range"], "path_glob": "/served"},
    ]})
    vol = mount_worker(policy=policy)
    m = vol.mountpoint
    data = os.urandom(MIB)
    (m / "src").write_bytes(data)
    assert _errno_of(_copy, m / "src", m / "full", MIB) == errno.ENOSPC
    assert _copy(m / "src", m / "ok", MIB) == MIB
    assert (vol.backing / "ok").read_bytes() == data
    assert _errno_of(_copy, m / "src", m / "served", MIB) == errno.EIO


@pytest.mark.fuse
def test_quota_refuses_an_extending_fallocate_and_df_counts_the_allowed_one(mount_worker) -> None:
    vol = mount_worker(policy=f'{{"layers": [{{"type": "quota", "bytes": {MIB}}}]}}')
    m = vol.mountpoint
    free_before = os.statvfs(m).f_bavail * os.statvfs(m).f_frsize
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert _errno_of(os.posix_fallocate, fd, 0, 2 * MIB) == errno.ENOSPC
        assert os.fstat(fd).st_size == 0 and os.stat(vol.backing / "f").st_blocks == 0
        os.posix_fallocate(fd, 0, 512 * KIB)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 2 * MIB)  # no apparent size: not counted
    finally:
        os.close(fd)
    assert os.stat(m / "f").st_size == 512 * KIB
    assert free_before - os.statvfs(m).f_bavail * os.statvfs(m).f_frsize == 512 * KIB


@pytest.mark.fuse
def test_memory_backend_fallocate_copy_and_seek(mount_worker) -> None:
    vol = mount_worker(extra=["--backend", "memory", "--memory-size-bytes", str(MIB)])
    m = vol.mountpoint
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert _errno_of(os.posix_fallocate, fd, 0, 2 * MIB) == errno.ENOSPC
        assert os.fstat(fd).st_size == 0
        os.posix_fallocate(fd, 0, 256 * KIB)
        os.pwrite(fd, b"y" * (256 * KIB), 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * KIB, 8 * KIB)
        assert os.pread(fd, 8 * KIB + 2, 4 * KIB - 1) == b"y" + bytes(8 * KIB) + b"y"
        assert _errno_of(fallocate, fd, FALLOC_FL_ZERO_RANGE, 0, KIB) == errno.EOPNOTSUPP  # as tmpfs
        assert os.lseek(fd, 10, os.SEEK_HOLE) == 256 * KIB and os.lseek(fd, 10, os.SEEK_DATA) == 10
        assert _errno_of(os.lseek, fd, 256 * KIB, os.SEEK_DATA) == errno.ENXIO
        out = os.open(m / "g", os.O_CREAT | os.O_WRONLY, 0o644)
        assert os.copy_file_range(fd, out, MIB, 0, 1) == 256 * KIB
        os.close(out)
    finally:
        os.close(fd)
    assert (m / "g").read_bytes() == bytes(1) + (m / "f").read_bytes()
    assert NOT_SERVED not in vol.log()


def test_the_slots_are_not_written_without_a_session() -> None:
    # The layout checks pass on this pyfuse3 build; with no session (this test
    # process never called pyfuse3.init) nothing may be written anywhere.
    with pytest.raises(_extra_ops.ExtraOpsUnavailable, match="no FUSE session"):
        _extra_ops._session_op_table()


def test_elf_symbols_agree_with_the_dynamic_loader(tmp_path) -> None:
    import ctypes

    import pyfuse3

    from interposer.fuse_worker import _elf

    found = _elf.symbols(pyfuse3.__file__, ["PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "no_such_symbol"])
    assert set(found) == {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session"}
    assert found["__pyx_v_7pyfuse3_session"][1] == ctypes.sizeof(ctypes.c_void_p)
    # The loader's address of an exported symbol is the load base plus its st_value:
    # the base must be page-aligned, as every mapping is.
    exported = ctypes.cast(ctypes.CDLL(pyfuse3.__file__).PyInit_pyfuse3, ctypes.c_void_p).value
    assert (exported - found["PyInit_pyfuse3"][0]) % os.sysconf("SC_PAGE_SIZE") == 0
    (tmp_path / "not-elf").write_bytes(b"#!/bin/sh\n")
    with pytest.raises(_elf.ElfError, match="not a 64-bit"):
        _elf.symbols(str(tmp_path / "not-elf"), ["x"])


def _fio_async_read_iops(mountpoint: Path, iodepth: int, runtime_s: float) -> float:
    (mountpoint / "aio").write_bytes(os.urandom(MIB))
    out = subprocess.run(
        ["fio", "--name=aio", f"--filename={mountpoint / 'aio'}", "--rw=randread", "--bs=4k", "--direct=1",
         "--ioengine=libaio", f"--iodepth={iodepth}", "--time_based", f"--runtime={runtime_s}s",
         "--output-format=json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


@pytest.mark.fuse
@pytest.mark.parametrize("max_background", [None, 0])
def test_async_direct_reads_get_the_queue_depth_they_ask_for(mount_worker, max_background) -> None:
    # Each read is held 0.2 s, so IOPS = requests in flight / 0.2 s. The kernel's
    # default limit of 12 asynchronous requests caps that at 60 whatever the
    # application's queue depth; the worker's default (64) lets all 32 through (160).
    policy = '{"layers": [{"type": "delay", "delay_s": 0.2, "ops": ["read"]}]}'
    extra = [] if max_background is None else ["--max-background", str(max_background)]
    vol = mount_worker(policy=policy, extra=extra)
    iops = _fio_async_read_iops(vol.mountpoint, iodepth=32, runtime_s=2.0)
    if max_background is None:
        assert iops > 100, f"{iops:.0f} IOPS: fewer than 32 reads in flight"
    else:
        assert iops < 65, f"{iops:.0f} IOPS with the kernel's limit of 12"
