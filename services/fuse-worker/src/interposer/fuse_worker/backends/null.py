"""Null backend: metadata as in the memory backend; writes are discarded, reads give zeros.

For measuring an application's own I/O cost without any storage below it: every
file, directory, link, rename, xattr and timestamp behaves as in the memory
backend, but file contents are never stored. A write succeeds and extends the
file's size; a read returns zero bytes up to that size (so a read-after-write sees
zeros, not the data). Contents do not count against the size limit; extended
attributes, which are stored, do (ENOSPC beyond it), and ``statfs`` shows them.
"""

from __future__ import annotations

from ._contents import SparseContents
from .memory import MemoryBackend, Node


class NullBackend(MemoryBackend):
    """The memory backend with file contents replaced by their size.

    Args:
        size_bytes: size reported by ``statfs``, bytes; only xattrs use it up.
        entry_timeout_s: how long the kernel may cache name lookups, seconds.
        attr_timeout_s: how long the kernel may cache attributes, seconds.
        root_uid, root_gid: owner of the root directory (default: the worker's).
    """

    name = "null"

    def _new_data(self) -> SparseContents | None:
        return None

    def _check_room(self, grow_bytes: int) -> None:
        pass

    def _resize(self, node: Node, size: int) -> None:
        node.size = size

    def _growth(self, node: Node, start: int, end: int) -> int:
        return 0

    def _hold(self, node: Node, start: int, end: int) -> None:
        pass

    def _write_data(self, node: Node, off: int, buf: bytes) -> int:
        node.size = max(node.size, off + len(buf))
        return len(buf)

    def _read_data(self, node: Node, off: int, size: int) -> bytes:
        return bytes(size)

    def _zero_data(self, node: Node, start: int, end: int) -> None:
        pass
