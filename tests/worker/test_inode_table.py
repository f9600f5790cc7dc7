"""The passthrough backend's inode table: fds past the budgets are let go, never under an op using them.

Real directories on disk, no mount: these are the table's own rules, which the
mount tests (``test_passthrough_mount.py``, the ``reopening`` variants) exercise
only through whatever order the kernel's requests happen to come in.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest
from interposer_testing import make_chain, remove_chain

from interposer.fuse_worker._inodes import OTHER_DEVICE_INO_BASE, ROOT_INODE, InodeTable, open_path


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _lookup(table: InodeTable, parent, name: str):  # noqa: ANN001, ANN202 - Inode in, Inode out
    fd, st = open_path(parent.fd, name.encode())
    inode = table.add_or_update(fd, st, parent, name.encode())
    inode.lookups += 1
    return inode


@pytest.fixture
def table(tmp_path: Path):  # noqa: ANN201
    for name in ("a", "b", "c"):
        (tmp_path / name / "sub").mkdir(parents=True)
    table = InodeTable(os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), max_file_fds=1, max_dir_fds=1)
    yield table
    table.close()


def test_an_fd_the_current_op_read_stays_open_and_the_same_until_the_next_op(table: InodeTable) -> None:
    """A rename reads both directories' fds; with one directory fd allowed, reopening the second
    pushes the first out: its number must still name the first directory until the op ends."""
    a, b = _lookup(table, table.root, "a"), _lookup(table, table.root, "b")  # a's fd let go
    table.get(a.ino)  # an op starts
    a_fd = a.fd  # reopened; pushes b's out (not read in this op: closed at once)
    b_fd = b.fd  # reopened; pushes a's out, but this op read it
    assert os.fstat(a_fd).st_ino == a.key[1] and os.fstat(b_fd).st_ino == b.key[1]
    assert _fd_is_open(a_fd)
    table.get(b.ino)  # the next op: now it is closed
    assert not _fd_is_open(a_fd) or os.fstat(a_fd).st_ino != a.key[1]


def test_fds_pushed_out_that_no_op_is_using_are_closed_at_once(table: InodeTable) -> None:
    a = _lookup(table, table.root, "a")
    a_fd = a.fd
    table.get(a.ino)  # a new op, which does not read a's fd
    _lookup(table, table.root, "b")
    assert not _fd_is_open(a_fd) or os.fstat(a_fd).st_ino != a.key[1]


def test_a_chain_of_let_go_directories_is_reopened_top_down_without_holding_them_all(
        table: InodeTable, tmp_path: Path) -> None:
    depth = 2000  # deeper than Python's recursion limit
    os.close(make_chain(tmp_path / "c", "d", depth))
    try:
        _reopen_chain(table, tmp_path, depth)
    finally:
        remove_chain(tmp_path / "c", "d", depth)


def _reopen_chain(table: InodeTable, tmp_path: Path, depth: int) -> None:
    node = _lookup(table, table.root, "c")
    chain = [node]
    for _ in range(depth):
        chain.append(_lookup(table, chain[-1], "d"))
    _lookup(table, table.root, "a")  # every directory of the chain let go now
    table.get(chain[-1].ino)
    before = len(os.listdir("/proc/self/fd"))
    deepest = chain[-1].fd
    assert os.fstat(deepest).st_ino == chain[-1].key[1]
    assert len(os.listdir("/proc/self/fd")) <= before + 2  # not 2,000 fds held until the next op
    # A directory of the chain renamed in the backing dir: every one below it is stale now.
    os.rename(tmp_path / "c" / "d" / "d", tmp_path / "c" / "d" / "moved")
    _lookup(table, table.root, "a")
    table.get(chain[-1].ino)
    with pytest.raises(pyfuse3.FUSEError) as failure:
        chain[-1].fd  # noqa: B018
    assert failure.value.errno == errno.ESTALE
    os.rename(tmp_path / "c" / "d" / "moved", tmp_path / "c" / "d" / "d")


def test_fuse_numbers_and_backing_keys_map_both_ways(table: InodeTable, tmp_path: Path) -> None:
    """No key is stored per inode: the table must get ``(st_dev, st_ino)`` back from the FUSE number."""
    root = os.stat(tmp_path)
    dev = root.st_dev
    sub = _lookup(table, _lookup(table, table.root, "a"), "sub")
    assert sub.ino == os.stat(tmp_path / "a" / "sub").st_ino  # backing numbers shown as they are
    assert table.by_key((dev, sub.ino)) is sub
    assert sub.key == (dev, sub.ino)
    swapped = {(dev, root.st_ino): ROOT_INODE, (dev, 1): root.st_ino}  # the root is FUSE inode 1
    other = (dev + 1, 77)
    assert table.by_key(other) is None  # asking does not number it
    assert table.ino_of(other) == OTHER_DEVICE_INO_BASE == table.ino_of(other)
    assert table.ino_of((dev + 2, 77)) == OTHER_DEVICE_INO_BASE + 1
    for key in (*swapped, (dev, sub.ino), other, (dev + 2, 77)):
        assert table.key_of(table.ino_of(key)) == key
    assert {table.ino_of(key) for key in swapped} == set(swapped.values())


def test_paths_below_a_moved_directory_deeper_than_the_recursion_limit(table: InodeTable, tmp_path: Path) -> None:
    depth = 2000
    os.close(make_chain(tmp_path / "c", "d", depth))
    try:
        chain = [_lookup(table, table.root, "c")]
        for _ in range(depth):
            chain.append(_lookup(table, chain[-1], "d"))
        assert table.path(chain[-1]) == "/c" + "/d" * depth
        table.moved(chain[0], table.root, b"e")  # as after a rename through the mount
        assert table.path(chain[-1]) == "/e" + "/d" * depth
        assert table.path(chain[1]) == "/e/d"
    finally:
        remove_chain(tmp_path / "c", "d", depth)
