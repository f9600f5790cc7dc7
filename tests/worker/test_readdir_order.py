"""readdir order under a metadata layer (``readdir_order``): the order function, the backend hook, real mounts.

The mount tests list directories big enough to need many readdir requests
(2,000 names of 100 bytes: about 240 KB of ``dirent64`` records, against glibc's
32 KiB getdents buffer and the kernel's page-sized FUSE readdir replies), and
walk them with libc's ``readdir``/``telldir``/``seekdir``/``rewinddir`` so that
the offsets the kernel hands back to the worker are exercised as an application
uses them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from pathlib import Path

import pytest
import trio

from interposer.fuse_worker import Op, Stack
from interposer.fuse_worker.backends._base import permuted
from interposer.fuse_worker.layers import Metadata
from interposer.proto import MetadataLayer, Policy

NAMES = [f"{i:05d}-".encode() + b"n" * 94 for i in range(2000)]  # 100-byte names


# ---- the order function -------------------------------------------------------------------------

def test_shuffle_is_a_new_permutation_per_listing_and_reproducible_with_a_seed() -> None:
    first, again = Metadata(MetadataLayer(readdir_order="shuffle", seed=7)), Metadata(
        MetadataLayer(readdir_order="shuffle", seed=7))
    orders = [first.order(NAMES) for _ in range(3)]
    assert all(sorted(order) == list(range(len(NAMES))) for order in orders)
    assert orders[0] != orders[1] != orders[2] != list(range(len(NAMES)))
    assert [again.order(NAMES) for _ in range(3)] == orders  # same seed, same sequence
    other = Metadata(MetadataLayer(readdir_order="shuffle", seed=8)).order(NAMES)
    assert other != orders[0]
    assert first.statistics().reordered == 3


def test_attribute_jitter_does_not_change_the_sequence_of_listing_orders() -> None:
    import pyfuse3

    plain = Metadata(MetadataLayer(readdir_order="shuffle", seed=3))
    jittered = Metadata(MetadataLayer(readdir_order="shuffle", time_jitter_s=5, seed=3))
    jittered.alter(pyfuse3.EntryAttributes())
    assert plain.order(NAMES) == jittered.order(NAMES)


def test_hash_order_is_stable_per_seed_and_depends_only_on_the_names() -> None:
    layer = Metadata(MetadataLayer(readdir_order="hash", seed=1))
    order = layer.order(NAMES)
    listed = [NAMES[i] for i in order]
    assert layer.order(NAMES) == order and listed != NAMES
    backwards = NAMES[::-1]
    assert [backwards[i] for i in layer.order(backwards)] == listed  # the input order does not matter
    assert [NAMES[i] for i in Metadata(MetadataLayer(readdir_order="hash", seed=2)).order(NAMES)] != listed


def test_only_a_matching_opendir_gets_an_order_and_nothing_else_is_touched() -> None:
    stack = Stack(Policy(layers=[MetadataLayer(readdir_order="shuffle", path_glob="/big")]), 1)
    assert set(stack.chains) == {"opendir"} and not stack.needs_direct_io("/big")

    async def opendir(path: str) -> Op:
        op = Op("opendir", 5, path)

        async def call() -> int:
            return 17

        assert await stack.chains["opendir"](op, call) == 17
        return op

    assert trio.run(opendir, "/big").dir_order is not None
    assert trio.run(opendir, "/small").dir_order is None


def test_permuted_refuses_an_order_that_loses_or_repeats_an_entry() -> None:
    assert permuted([b"a", b"b", b"c"], [2, 0, 1]) == [b"c", b"a", b"b"]
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3], [0, 1, 2, 3]):
        with pytest.raises(ValueError, match="not a permutation of 3 entries"):
            permuted([b"a", b"b", b"c"], bad)


# ---- on a mount ---------------------------------------------------------------------------------

class _Dirent(ctypes.Structure):
    """glibc's ``struct dirent`` on 64-bit Linux."""

    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


class DirStream:
    """One ``DIR*`` (one opendir handle in the worker), read with libc."""

    def __init__(self, path: Path) -> None:
        self.dirp = _libc.opendir(os.fsencode(path))
        if not self.dirp:
            raise OSError(ctypes.get_errno(), f"opendir {path}")

    def read(self, limit: int | None = None) -> list[bytes]:
        """Up to ``limit`` names (all that are left if None), ``.`` and ``..`` included."""
        out: list[bytes] = []
        while limit is None or len(out) < limit:
            ctypes.set_errno(0)
            entry = _libc.readdir(self.dirp)
            if not entry:
                assert ctypes.get_errno() == 0, os.strerror(ctypes.get_errno())
                break
            out.append(entry.contents.d_name)
        return out

    def tell(self) -> int:
        return _libc.telldir(self.dirp)

    def seek(self, pos: int) -> None:
        _libc.seekdir(self.dirp, pos)

    def rewind(self) -> None:
        _libc.rewinddir(self.dirp)

    def close(self) -> None:
        _libc.closedir(self.dirp)


def _fill(directory: Path) -> None:
    directory.mkdir()
    for name in NAMES:
        (directory / os.fsdecode(name)).touch()


def _policy(*layers: dict) -> str:
    return json.dumps({"layers": list(layers)})


SHUFFLE = {"type": "metadata", "readdir_order": "shuffle", "seed": 11, "path_glob": "/big"}


def test_listing_a_shuffled_directory_has_the_same_entries_in_another_order(mount_worker, tmp_path) -> None:
    backing = tmp_path / "shared-backing"
    backing.mkdir()
    _fill(backing / "big")
    _fill(backing / "other")
    plain = mount_worker(backing=backing)
    unshuffled = os.listdir(plain.mountpoint / "big")
    assert unshuffled == os.listdir(backing / "big")  # without a layer: the backing store's order
    plain.unmount()

    shuffled = mount_worker(backing=backing, policy=_policy(SHUFFLE))
    first = os.listdir(shuffled.mountpoint / "big")
    second = os.listdir(shuffled.mountpoint / "big")
    assert len(first) == len(set(first)) == len(NAMES) and sorted(first) == sorted(unshuffled)
    assert first != unshuffled and second != first and sorted(second) == sorted(first)
    assert os.listdir(shuffled.mountpoint / "other") == os.listdir(backing / "other")  # glob does not match

    # The seed makes the sequence of orders reproducible: a fresh worker lists the same first order.
    again = mount_worker(backing=backing, policy=_policy(SHUFFLE))
    assert os.listdir(again.mountpoint / "big") == first


def test_one_handle_keeps_its_order_across_readdir_calls_seekdir_and_rewinddir(mount_worker) -> None:
    vol = mount_worker(policy=_policy(SHUFFLE))
    _fill(vol.backing / "big")
    stream = DirStream(vol.mountpoint / "big")
    try:
        head = stream.read(700)
        marks = [stream.tell()]
        middle = stream.read(650)
        marks.append(stream.tell())
        tail = stream.read()
        whole = head + middle + tail
        assert whole[:2] == [b".", b".."]  # . and .. stay first
        assert len(whole) == len(set(whole)) == len(NAMES) + 2 and set(whole[2:]) == set(NAMES)
        assert whole[2:] != sorted(whole[2:])
        stream.seek(marks[1])
        assert stream.read() == tail
        stream.seek(marks[0])
        assert stream.read() == middle + tail
        stream.rewind()
        assert stream.read() == whole
    finally:
        stream.close()
    # another handle: another order of the same entries
    other = DirStream(vol.mountpoint / "big")
    try:
        relisted = other.read()
    finally:
        other.close()
    assert relisted != whole and sorted(relisted) == sorted(whole)


def test_a_rewound_shuffled_stream_lists_the_directory_as_it_is_now(mount_worker) -> None:
    vol = mount_worker(policy=_policy(SHUFFLE))
    _fill(vol.backing / "big")
    stream = DirStream(vol.mountpoint / "big")
    try:
        first = stream.read()
        (vol.mountpoint / "big" / "late").touch()
        os.unlink(vol.mountpoint / "big" / os.fsdecode(NAMES[0]))
        stream.rewind()
        again = stream.read()
    finally:
        stream.close()
    assert sorted(again) == sorted([*first[:2], b"late", *(name for name in first[2:] if name != NAMES[0])])
    assert again[:2] == [b".", b".."] and again[2:] != sorted(again[2:])  # still shuffled


def test_hash_order_is_the_same_for_every_opendir_and_changes_with_the_seed(mount_worker) -> None:
    vol = mount_worker(policy=_policy(
        {"type": "metadata", "readdir_order": "hash", "seed": 1, "path_glob": "/one"},
        {"type": "metadata", "readdir_order": "hash", "seed": 2, "path_glob": "/two"},
    ))
    _fill(vol.backing / "one")
    _fill(vol.backing / "two")
    one = os.listdir(vol.mountpoint / "one")
    assert os.listdir(vol.mountpoint / "one") == one and sorted(one) == sorted(os.listdir(vol.backing / "one"))
    assert one != os.listdir(vol.backing / "one")
    assert os.listdir(vol.mountpoint / "two") != one  # same names, other seed


def test_memory_backend_reorders_too_and_skips_entries_removed_after_opendir(mount_worker) -> None:
    vol = mount_worker(extra=["--backend", "memory"], policy=_policy(
        {"type": "metadata", "readdir_order": "shuffle", "path_glob": "/d"},
        {"type": "metadata", "readdir_order": "hash", "path_glob": "/h"}))
    created = [os.fsdecode(name) for name in NAMES[:1500]]
    for directory in ("d", "h"):
        (vol.mountpoint / directory).mkdir()
        for name in created:
            (vol.mountpoint / directory / name).touch()
    listed = os.listdir(vol.mountpoint / "d")
    assert sorted(listed) == created and listed != created  # unshuffled, memory lists in creation order
    hashed = os.listdir(vol.mountpoint / "h")
    assert sorted(hashed) == created and hashed != created
    # The hash order is known in advance: remove the entry listed last after opendir, add one.
    stream = DirStream(vol.mountpoint / "h")
    try:
        head = stream.read(100)
        os.unlink(vol.mountpoint / "h" / hashed[-1])
        (vol.mountpoint / "h" / "late").touch()
        rest = stream.read()
    finally:
        stream.close()
    assert [os.fsdecode(name) for name in head[2:] + rest] == hashed[:-1]
