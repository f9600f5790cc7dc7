"""The interface the adapter relies on: what every backend implements.

A backend answers the FUSE ops with pyfuse3's types and signatures (the adapter
passes the callback's arguments through unchanged). It raises ``OSError`` or
``pyfuse3.FUSEError`` with the errno the application should see; the adapter turns
``OSError`` into ``FUSEError``. Besides the ops, the adapter needs a path for every
inode and handle, for layer globs and events.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

import pyfuse3

#: An entry a ``readdir`` replied: its name and the attributes sent with it (READDIRPLUS).
Listed = tuple[bytes, pyfuse3.EntryAttributes]


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

        A backend takes a snapshot of the entries at the first readdir of a handle
        and at every rewind (:class:`OpenDir`), and answers readdir with positions
        in it as offsets. This hook is called right after ``opendir``, before any
        readdir of ``fh``: ``order`` gets the entry names without ``.`` and ``..``
        (which stay first) and returns a permutation of their positions. Every
        readdir of ``fh`` — continued, after a seekdir, or rewound while the entries
        are unchanged — sees one order; a snapshot retaken because entries changed
        is ordered by ``order`` again.

        Raises:
            ValueError: ``order`` did not return a permutation.
        """
        ...

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> list[Listed]:
        """Reply entries of ``fh`` from listing position ``start_id`` ("." and ".." are 0 and 1) until the
        kernel's buffer is full; return those replied, in order (none: the listing's end). pyfuse3 ignores
        the result; delay layers read it (pages of a listing, the names and attributes a client caches)."""
        ...

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


_Owner = TypeVar("_Owner")
_Entry = TypeVar("_Entry", bound=Hashable)


class OpenDir(Generic[_Owner, _Entry]):
    """An open directory handle: the snapshot of entries its readdir offsets index.

    ``entries[0]`` and ``entries[1]`` are ``.`` and ``..``; readdir offset ``n``
    resumes at ``entries[n]``. The snapshot is taken by a readdir at offset 0: the
    first one, or one after ``rewinddir(3)`` (or a ``seekdir`` to the start), which
    the kernel does not report otherwise. POSIX has a rewound stream "refer to the
    current state of the corresponding directory, as a call to opendir() would have
    done" (POSIX.1-2017, rewinddir), and ``os.listdir(fd)`` and ``fdopendir`` users
    rewind before reading, so a snapshot taken at ``opendir`` would show them the
    directory as it was when the fd was opened. If a rewind finds the entries
    unchanged, the snapshot and its order stay, so a rewound listing repeats itself
    as on a native fs.

    Args:
        owner: the backend's inode or node of the directory.
        name_of: an entry's name (for the order function).
    """

    __slots__ = ("owner", "entries", "_name_of", "_order")

    def __init__(self, owner: _Owner, name_of: Callable[[_Entry], bytes]) -> None:
        self.owner = owner
        self.entries: list[_Entry] | None = None
        self._name_of = name_of
        self._order: Callable[[Sequence[bytes]], list[int]] | None = None

    def reorder(self, order: Callable[[Sequence[bytes]], list[int]]) -> None:
        """Order every snapshot of this handle with ``order`` (``Backend.order_dir``).

        Raises:
            ValueError: ``order`` did not return a permutation (here, or at the
                readdir that takes the first snapshot).
        """
        self._order = order
        if self.entries is not None:
            self.entries = self._ordered(self.entries)

    def snapshot_for(self, start_id: int, list_dir: Callable[[_Owner], list[_Entry]]) -> list[_Entry]:
        """The entries a readdir at offset ``start_id`` reads, listed by ``list_dir`` at offset 0."""
        if start_id == 0 or self.entries is None:
            fresh = list_dir(self.owner)
            if self.entries is None or set(fresh) != set(self.entries):
                self.entries = self._ordered(fresh)
        return self.entries

    def _ordered(self, entries: list[_Entry]) -> list[_Entry]:
        if self._order is None:
            return entries
        rest = entries[2:]
        return entries[:2] + permuted(rest, self._order([self._name_of(entry) for entry in rest]))
