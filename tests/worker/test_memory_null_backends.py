"""Memory and null backends on a real mount: size limit, statfs, ENOSPC, discarded data."""

from __future__ import annotations

import errno
import os

import pytest

from interposer.fuse_worker._op import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from interposer.fuse_worker.backends._libc import fallocate

MIB = 1 << 20
GIB = 1 << 30


@pytest.mark.fuse
def test_memory_backend_statfs_reflects_its_limit_and_refuses_writes_beyond_it(mount_worker) -> None:
    vol = mount_worker(extra=["--backend", "memory", "--memory-size-bytes", str(MIB)])
    m = vol.mountpoint
    sv = os.statvfs(m)
    assert sv.f_blocks * sv.f_frsize == MIB and sv.f_bavail == sv.f_blocks
    fd = os.open(m / "big", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        written = 0
        with pytest.raises(OSError) as info:
            while True:
                written += os.write(fd, b"x" * 65536)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert written == MIB and os.stat(m / "big").st_size == MIB
    assert os.statvfs(m).f_bavail == 0
    # Growing a file by truncation makes a hole, which takes no space (as on tmpfs),
    # even on a full volume; writing into it does.
    os.truncate(m / "big", 2 * MIB)
    assert os.stat(m / "big").st_size == 2 * MIB and os.stat(m / "big").st_blocks * 512 == MIB
    with open(m / "big", "rb") as f:
        f.seek(MIB - 1)
        assert f.read(2) == b"x\0"
    fd = os.open(m / "big", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"y", MIB + 10)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.unlink(m / "big")
    assert os.statvfs(m).f_bavail == sv.f_blocks  # freed once the kernel forgets the inode
    assert not os.listdir(vol.backing), "the memory backend must not touch a backing dir"


@pytest.mark.fuse
def test_null_backend_discards_data_but_keeps_metadata(mount_worker) -> None:
    vol = mount_worker(extra=["--backend", "null", "--memory-size-bytes", str(MIB)])
    m = vol.mountpoint
    os.mkdir(m / "d")
    (m / "d" / "f").write_bytes(b"hello" * 1000 + b"tail")
    assert os.stat(m / "d" / "f").st_size == 5004
    assert (m / "d" / "f").read_bytes() == bytes(5004)
    # More than the size limit is accepted: nothing is stored.
    with open(m / "huge", "wb") as f:
        for _ in range(3):
            f.write(bytes(MIB))
    assert os.stat(m / "huge").st_size == 3 * MIB
    with open(m / "prealloc", "wb") as f:  # nor is preallocation limited
        os.posix_fallocate(f.fileno(), 0, 3 * MIB)
    assert os.stat(m / "prealloc").st_size == 3 * MIB
    os.unlink(m / "prealloc")
    os.link(m / "d" / "f", m / "g")
    os.rename(m / "g", m / "h")
    assert os.stat(m / "h").st_nlink == 2 and os.stat(m / "h").st_ino == os.stat(m / "d" / "f").st_ino
    os.truncate(m / "h", 10)
    assert (m / "d" / "f").read_bytes() == bytes(10)
    os.setxattr(m / "h", "user.k", b"v")
    assert os.getxattr(m / "d" / "f", "user.k") == b"v"
    assert sorted(os.listdir(m)) == ["d", "h", "huge"]


@pytest.mark.fuse
@pytest.mark.parametrize("backend", ["memory", "null"])
def test_xattrs_count_against_the_size_limit(mount_worker, backend: str) -> None:
    """Extended attributes live in the worker's memory: no client may grow it past the limit."""
    vol = mount_worker(extra=["--backend", backend, "--memory-size-bytes", str(MIB)])
    m = vol.mountpoint
    (m / "f").write_bytes(b"")
    value = b"v" * 60000
    stored = 0
    with pytest.raises(OSError) as info:
        while True:
            os.setxattr(m / "f", f"user.k{stored}", value)
            stored += 1
    assert info.value.errno == errno.ENOSPC
    assert stored == MIB // (len(value) + len("user.k00"))  # names count too
    assert len(os.listxattr(m / "f")) == stored
    assert os.statvfs(m).f_bavail * os.statvfs(m).f_frsize < len(value)
    os.removexattr(m / "f", "user.k0")
    os.setxattr(m / "f", "user.k0", value)  # the room is given back
    os.unlink(m / "f")  # and all of it once the file is gone
    sv = os.statvfs(m)
    assert sv.f_bavail == sv.f_blocks
    (m / "g").write_bytes(b"")
    with pytest.raises(OSError) as info:
        os.setxattr(m / "g", "user.", b"v")  # a namespace without a name
    assert info.value.errno == errno.EINVAL


@pytest.mark.fuse
def test_hard_links_count_as_inodes(mount_worker) -> None:
    """As on tmpfs, each extra name of a file takes an inode: links cannot grow the worker's memory unbounded."""
    vol = mount_worker(extra=["--backend", "memory", "--memory-size-bytes", str(MIB)])
    m = vol.mountpoint
    (m / "f").write_bytes(b"data")
    free_before = os.statvfs(m).f_ffree
    links = 0
    with pytest.raises(OSError) as info:
        while True:
            os.link(m / "f", m / f"l{links}")
            links += 1
    assert info.value.errno == errno.ENOSPC
    assert links == free_before and os.statvfs(m).f_ffree == 0
    assert os.stat(m / "f").st_nlink == links + 1
    for i in range(links):
        os.unlink(m / f"l{i}")
    assert os.statvfs(m).f_ffree == free_before
    assert (m / "f").read_bytes() == b"data"


@pytest.mark.fuse
def test_memory_backend_keeps_holes_before_and_between_written_data(mount_worker) -> None:
    """Sparse files as tmpfs keeps them: a write far past the end of a file (a disk image, a
    database or a download written out of order) takes only the memory of what it writes, on a
    volume far smaller than the file."""
    vol = mount_worker(extra=["--backend", "memory", "--memory-size-bytes", str(4 * MIB)])
    m = vol.mountpoint
    free_before = os.statvfs(m).f_bavail
    fd = os.open(m / "sparse", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"end", GIB) == 3  # a flat buffer would need 1 GiB of zeros before it
        assert os.pwrite(fd, b"middle", 300 * MIB + 5) == 6
        assert os.fstat(fd).st_size == GIB + 3
        assert os.statvfs(m).f_bavail >= free_before - 32  # two chunks' heads, not a gigabyte
        assert os.pread(fd, 3, GIB) == b"end" and os.pread(fd, 8, 300 * MIB + 3) == b"\0\0middle"
        assert os.pread(fd, 4096, 700 * MIB) == bytes(4096)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        assert 299 * MIB < data <= 300 * MIB + 5 and os.pread(fd, 300 * MIB + 11 - data, data).endswith(b"middle")
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        assert 300 * MIB + 11 <= hole < 301 * MIB
        assert GIB - MIB < os.lseek(fd, hole, os.SEEK_DATA) <= GIB
        assert os.lseek(fd, GIB, os.SEEK_HOLE) == GIB + 3  # the end of the file is a hole
        # Filling the volume between them: a write that only partly fits is shortened.
        written = os.pwrite(fd, b"z" * (8 * MIB), 500 * MIB)
        assert 3 * MIB < written < 4 * MIB and os.statvfs(m).f_bavail == 0
        assert os.pread(fd, 3, GIB) == b"end"
        # Punching the filled range gives its space back.
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 500 * MIB, written)
        assert os.statvfs(m).f_bavail >= free_before - 32
        assert os.pread(fd, 6, 300 * MIB + 5) == b"middle" and os.pread(fd, 4, 500 * MIB) == bytes(4)
    finally:
        os.close(fd)
    os.unlink(m / "sparse")
    assert os.statvfs(m).f_bavail == free_before


@pytest.mark.fuse
def test_memory_backend_keeps_the_end_of_a_grown_file_as_a_hole(mount_worker) -> None:
    # A file preallocated by ftruncate (numpy.memmap, a disk image) larger than the
    # volume, as tmpfs allows: only what is written takes space.
    vol = mount_worker(extra=["--backend", "memory", "--memory-size-bytes", str(MIB)])
    m = vol.mountpoint
    free_before = os.statvfs(m).f_bavail
    fd = os.open(m / "image", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, 100 * MIB)
        assert os.fstat(fd).st_size == 100 * MIB and os.fstat(fd).st_blocks == 0
        assert os.pread(fd, 8, 50 * MIB) == bytes(8)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.pwrite(fd, b"header", 0) == 6
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0 and os.lseek(fd, 0, os.SEEK_HOLE) == 6
        assert os.statvfs(m).f_bavail == free_before - 1  # one 4 KiB block held
        assert os.fstat(fd).st_size == 100 * MIB
        # Allocating reserves the space, so writes there cannot fail for it.
        os.posix_fallocate(fd, 0, MIB // 2)
        assert os.statvfs(m).f_bavail == free_before - (MIB // 2) // 4096
        with pytest.raises(OSError) as info:
            os.posix_fallocate(fd, 0, 2 * MIB)
        assert info.value.errno == errno.ENOSPC
        # Punching the end of what is held frees it.
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, MIB)
        assert os.statvfs(m).f_bavail == free_before - 1
        assert os.pread(fd, 6, 0) == b"header" and os.pread(fd, 4, 8192) == bytes(4)
        os.ftruncate(fd, 3)
        assert os.pread(fd, 10, 0) == b"hea"
    finally:
        os.close(fd)
