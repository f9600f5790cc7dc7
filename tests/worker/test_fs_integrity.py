"""fsx-style data integrity: a long random mix of I/O against a shadow copy of the file.

After Apple's/Linux Test Project's ``fsx``: every op (writes, reads, truncates,
``fallocate`` that extends, keeps the size or punches a hole, ``copy_file_range``
between two ranges of the file, shared ``mmap``) is applied to the file through
the mount and to an in-memory shadow buffer; every read (``pread``, a read of an
``mmap`` mapping) must return the shadow's bytes, the size must always agree, and a
SHA-256 of the whole file is compared every few ops and at the end, after
closing and reopening it (so the kernel page cache cannot hide a lost write).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import platform
import random
import re
from pathlib import Path

import pytest

from interposer.fuse_worker.backends._libc import fallocate

#: Ops per run, largest file size, largest single I/O, bytes.
OPS_PER_RUN = 2000
MAX_FILE_SIZE_BYTES = 256 * 1024
MAX_IO_BYTES = 64 * 1024
#: A full-file checksum is compared every this many ops.
CHECKSUM_EVERY_OPS = 50
SEED = 20240607
#: fallocate(2) modes (<linux/falloc.h>).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: (major, minor) of the running kernel.
KERNEL = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
#: Every op kind :func:`run_fsx` draws from (mmap ones only with ``use_mmap``).
FSX_OPS = ("write", "read", "truncate", "ftruncate", "reopen", "allocate", "punch", "copy")
MMAP_OPS = ("mapread", "mapwrite")


def _full_read(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size + 1, 0) if size else b""


def run_fsx(path: Path, seed: int, ops: int = OPS_PER_RUN, use_mmap: bool = True) -> dict[str, int]:
    """Run ``ops`` random ops on ``path``; assert every read matches the shadow.

    Returns:
        ``dict[str, int]``: op name → how many times it ran (so the caller can check
        every kind of op was exercised).
    """
    rng = random.Random(seed)
    shadow = bytearray()
    counts: dict[str, int] = {}
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for step in range(ops):
            kinds = ["write", "read", *FSX_OPS]
            if use_mmap:
                kinds += MMAP_OPS
            kind = rng.choice(kinds)
            counts[kind] = counts.get(kind, 0) + 1
            where = f"step {step} ({kind}, seed {seed})"
            if kind == "write":
                off = rng.randrange(MAX_FILE_SIZE_BYTES)
                data = rng.randbytes(rng.randrange(1, MAX_IO_BYTES))
                data = data[: MAX_FILE_SIZE_BYTES - off]
                assert os.pwrite(fd, data, off) == len(data), where
                if off > len(shadow):
                    shadow.extend(bytes(off - len(shadow)))
                shadow[off:off + len(data)] = data
            elif kind == "read":
                off = rng.randrange(len(shadow) + 1)
                size = rng.randrange(1, MAX_IO_BYTES)
                assert os.pread(fd, size, off) == bytes(shadow[off:off + size]), where
            elif kind in ("truncate", "ftruncate"):
                size = rng.randrange(MAX_FILE_SIZE_BYTES)
                (os.ftruncate(fd, size) if kind == "ftruncate" else os.truncate(path, size))
                del shadow[size:]
                shadow.extend(bytes(size - len(shadow)))
            elif kind == "allocate":
                off = rng.randrange(MAX_FILE_SIZE_BYTES)
                size = rng.randrange(1, min(MAX_IO_BYTES, MAX_FILE_SIZE_BYTES - off) + 1)
                keep_size = rng.random() < 0.5
                fallocate(fd, FALLOC_FL_KEEP_SIZE if keep_size else 0, off, size)
                if not keep_size and off + size > len(shadow):
                    shadow.extend(bytes(off + size - len(shadow)))
            elif kind == "punch":
                off = rng.randrange(len(shadow) + 1)
                size = rng.randrange(1, MAX_IO_BYTES)
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, size)
                end = min(off + size, len(shadow))
                shadow[off:end] = bytes(max(0, end - off))
            elif kind == "copy" and shadow:
                # Two ranges of the same file must not overlap (copy_file_range(2): EINVAL).
                off_in = rng.randrange(len(shadow))
                size = rng.randrange(1, min(MAX_IO_BYTES, len(shadow) - off_in) + 1)
                off_out = rng.randrange(MAX_FILE_SIZE_BYTES - size)
                if off_out < off_in + size and off_in < off_out + size:
                    off_out = off_in + size if off_in + 2 * size <= MAX_FILE_SIZE_BYTES else max(0, off_in - size)
                if off_out < off_in + size and off_in < off_out + size:
                    continue
                copied = os.copy_file_range(fd, fd, size, off_in, off_out)
                assert 0 < copied <= size, where
                data = bytes(shadow[off_in:off_in + copied])
                if off_out > len(shadow):
                    shadow.extend(bytes(off_out - len(shadow)))
                shadow[off_out:off_out + copied] = data
            elif kind == "reopen":
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            elif kind in MMAP_OPS and shadow:
                with mmap.mmap(fd, len(shadow)) as mapping:
                    off = rng.randrange(len(shadow))
                    size = rng.randrange(1, min(MAX_IO_BYTES, len(shadow) - off) + 1)
                    if kind == "mapread":
                        assert mapping[off:off + size] == bytes(shadow[off:off + size]), where
                    else:
                        data = rng.randbytes(size)
                        mapping[off:off + size] = data
                        shadow[off:off + size] = data
                        mapping.flush()
            assert os.fstat(fd).st_size == len(shadow), where
            if step % CHECKSUM_EVERY_OPS == 0:
                assert hashlib.sha256(_full_read(fd)).hexdigest() == hashlib.sha256(shadow).hexdigest(), where
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(shadow).hexdigest(), "after close"
    return counts


@pytest.mark.fuse
@pytest.mark.parametrize("backend", ["passthrough", "memory", "kernel-passthrough"])
def test_random_io_mix_keeps_data_intact(mount_worker, backend: str) -> None:
    if backend == "kernel-passthrough":
        # The file exists before the run, so its opens are OPENs, answered with passthrough.
        vol = mount_worker(extra=["--kernel-passthrough"])
        (vol.backing / "fsx.dat").write_bytes(b"")
    else:
        vol = mount_worker(extra=["--backend", backend])
    counts = run_fsx(vol.mountpoint / "fsx.dat", SEED)
    assert set(counts) == {*FSX_OPS, *MMAP_OPS}
    if backend != "memory":
        # What the mount said is what the backing file holds.
        assert (vol.backing / "fsx.dat").read_bytes() == (vol.mountpoint / "fsx.dat").read_bytes()
    assert vol.proc.poll() is None, vol.log()


@pytest.mark.fuse
def test_random_io_mix_keeps_data_intact_under_a_delay_layer(mount_worker) -> None:
    # A delay on data ops turns on FOPEN_DIRECT_IO for the file (no page cache), the
    # path where every read and write reaches the worker. Shared mmap of such a file
    # needs FUSE_DIRECT_IO_ALLOW_MMAP (Linux >= 6.6), which the worker asks for in its
    # FUSE_INIT reply (_init_reply); older kernels refuse it with ENODEV.
    policy = '{"layers": [{"type": "delay", "delay_s": 0.0002, "ops": ["read", "write", "setattr"]}]}'
    vol = mount_worker(policy=policy)
    if KERNEL < (6, 6):
        counts = run_fsx(vol.mountpoint / "fsx.dat", SEED + 1, ops=1000, use_mmap=False)
        with open(vol.mountpoint / "fsx.dat", "r+b") as f, pytest.raises(OSError) as info:
            mmap.mmap(f.fileno(), 1)
        assert info.value.errno == errno.ENODEV
    else:
        # Direct reads and writes beside shared mappings of the same file: the kernel
        # must keep them coherent (it invalidates the mapped pages around direct I/O).
        counts = run_fsx(vol.mountpoint / "fsx.dat", SEED + 1, ops=1000)
        assert counts["mapread"] > 0 and counts["mapwrite"] > 0
    assert set(FSX_OPS) <= set(counts)  # copies here take the kernel's read/write fallback
    assert (vol.backing / "fsx.dat").read_bytes() == (vol.mountpoint / "fsx.dat").read_bytes()


@pytest.mark.fuse
def test_random_io_mix_with_mmap_under_a_delay_layer_that_keeps_the_page_cache(mount_worker) -> None:
    # `page_cache: keep` leaves the page cache in front of the delay (an emulated
    # device), so the file is opened normally and shared mmap works again.
    policy = ('{"layers": [{"type": "delay", "delay_s": 0.0002, "ops": ["read", "write", "setattr"], '
              '"page_cache": "keep"}]}')
    vol = mount_worker(policy=policy)
    counts = run_fsx(vol.mountpoint / "fsx.dat", SEED + 2, ops=1000)
    assert counts["mapread"] > 0 and counts["mapwrite"] > 0
    assert (vol.backing / "fsx.dat").read_bytes() == (vol.mountpoint / "fsx.dat").read_bytes()
