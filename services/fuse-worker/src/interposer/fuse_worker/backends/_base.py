"""The interface the adapter relies on: what every backend implements.

A backend answers the FUSE ops with pyfuse3's types and signatures (the adapter
passes the callback's arguments through unchanged). It raises ``OSError`` or
``pyfuse3.FUSEError`` with the errno the application should see; the adapter turns
``OSError`` into ``FUSEError``. Besides the ops, the adapter needs a path for every
inode and handle, for layer globs and events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import pyfuse3


@runtime_checkable
class Backend(Protocol):
    """What :class:`~interposer.fuse_worker.InterposerOperations` calls.

    Every ``async`` method is the pyfuse3 ``Operations`` method of the same name
    (same arguments, same return type); see pyfuse3's documentation for each.
    """

    #: backend kind as given on the command line (``passthrough``, ``memory``, ``null``).
    name: str

    # ---- bookkeeping for the adapter --------------------------------------------------

    def path_of(self, ino: int) -> str:
        """Path of inode ``ino`` inside the volume; ``"?"`` if it is unknown."""
        ...

    def entry_path(self, parent_ino: int, name: bytes) -> str:
        """Path of entry ``name`` in directory ``parent_ino``."""
        ...

    def ino_of_fh(self, fh: int) -> int:
        """Inode of an open file or directory handle (0 if unknown)."""
        ...

    def close(self) -> None:
        """Release everything the backend holds (called once, after unmount)."""
        ...

    # ---- entries ----------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes: ...

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None: ...

    async def getattr(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes: ...

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes: ...

    async def readlink(self, ino: int, ctx: pyfuse3.RequestContext) -> bytes: ...

    async def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes: ...

    async def mkdir(
        self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes: ...

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes: ...

    async def link(
        self, ino: int, new_parent_ino: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes: ...

    async def unlink(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None: ...

    async def rmdir(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None: ...

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None: ...

    # ---- files ------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo: ...

    async def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]: ...

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview: ...

    async def write(self, fh: int, off: int, buf: bytes) -> int: ...

    async def flush(self, fh: int) -> None: ...

    def flush_needed(self, fh: int) -> bool:
        """Whether :meth:`flush` of open file ``fh`` can have an effect (report an error, write something back).

        False lets the adapter spare ``close(2)`` its FLUSH request (FOPEN_NOFLUSH).
        """
        ...

    async def release(self, fh: int) -> None: ...

    async def fsync(self, fh: int, datasync: bool) -> None: ...

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` with ``mode`` (``FALLOC_FL_*``) on ``length`` bytes at ``offset``.

        Raises EOPNOTSUPP for a mode the backend does not implement, as a local
        file system does.
        """
        ...

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int,
                              flags: int) -> int:
        """Copy up to ``length`` bytes between open files; returns bytes copied (0 at end of file)."""
        ...

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE`` from ``offset``; ENXIO at or past end of file."""
        ...

    # ---- directories ------------------------------------------------------------------

    async def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int: ...

    def order_dir(self, fh: int, order: Callable[[Sequence[bytes]], list[int]]) -> None:
        """Reorder the listing of open directory ``fh`` (the metadata layer's ``readdir_order``).

        A backend takes a snapshot of the entries at ``opendir`` and answers readdir
        with positions in it as offsets. This hook permutes the snapshot once, right
        after ``opendir`` and before any readdir of ``fh``: ``order`` gets the entry
        names without ``.`` and ``..`` (which stay first) and returns a permutation
        of their positions. Every later readdir of ``fh`` — continued, rewound or
        after a seekdir — sees the new order.

        Raises:
            ValueError: ``order`` did not return a permutation.
        """
        ...

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None: ...

    async def releasedir(self, fh: int) -> None: ...

    async def fsyncdir(self, fh: int, datasync: bool) -> None: ...

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData: ...

    # ---- extended attributes ----------------------------------------------------------

    async def getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes: ...

    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None: ...

    async def listxattr(self, ino: int, ctx: pyfuse3.RequestContext) -> list[bytes]: ...

    async def removexattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None: ...


_T = TypeVar("_T")


def permuted(items: list[_T], positions: list[int]) -> list[_T]:
    """``items`` in the order ``positions`` gives (``[items[i] for i in positions]``), for ``order_dir``.

    Raises:
        ValueError: ``positions`` is not a permutation of ``range(len(items))`` (an
            entry would be lost or listed twice).
    """
    if sorted(positions) != list(range(len(items))):
        raise ValueError(f"directory order is not a permutation of {len(items)} entries")
    return [items[i] for i in positions]
