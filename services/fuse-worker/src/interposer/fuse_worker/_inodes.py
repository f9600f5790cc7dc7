"""Inode bookkeeping shared by the backends: names, cached paths, lookup counts.

``PathTable`` keeps what every backend needs for the adapter (the path of an inode
for layer globs and events, rebuilt from parent links and cached until a rename);
``InodeTable`` adds the passthrough backend's FUSE inode → O_PATH fd mapping.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict

import pyfuse3

#: FUSE inode number of the volume root (pyfuse3.ROOT_INODE).
ROOT_INODE = pyfuse3.ROOT_INODE
#: First FUSE inode number for files of another file system mounted inside the
#: backing dir (bit 63: above any inode number ext4, xfs or btrfs hand out).
OTHER_DEVICE_INO_BASE = 1 << 63
#: How backing files are opened to be held: the inode itself, never a symlink's target.
O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def open_path(dir_fd: int, name: bytes) -> tuple[int, os.stat_result]:
    """Open entry ``name`` of directory ``dir_fd`` as an O_PATH fd (never following a symlink); with its stat.

    Raises:
        OSError: from ``openat`` or ``fstat`` (the fd is closed then).
    """
    fd = os.open(name, O_PATH_FLAGS, dir_fd=dir_fd)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def join_path(parent_path: str, name: bytes) -> str:
    """Path of entry ``name`` in the directory at ``parent_path`` (``/`` for the root)."""
    decoded = os.fsdecode(name)
    return parent_path + decoded if parent_path == "/" else f"{parent_path}/{decoded}"


class Named:
    """Something with a place in the tree: its parent and its name there.

    Attributes:
        parent: the directory it was last seen in (None for the root).
        name: its name there, bytes.
    """

    __slots__ = ("parent", "name", "_path", "_path_gen")

    def __init__(self, parent: "Named | None", name: bytes) -> None:
        self.parent = parent
        self.name = name
        self._path = ""
        self._path_gen = -1


class PathTable:
    """Paths of :class:`Named` nodes, cached; a move invalidates every cached path.

    A directory rename changes the path of everything below it, so instead of
    walking the subtree a generation counter is bumped and paths are rebuilt lazily.
    """

    def __init__(self) -> None:
        self._path_gen = 0

    def moved(self, node: Named, parent: Named, name: bytes) -> None:
        """Record that ``node`` is now ``parent``/``name``."""
        node.parent, node.name = parent, name
        self._path_gen += 1

    def path(self, node: Named) -> str:
        """Path of ``node`` inside the volume (``/`` for the root, ``/a/b`` below)."""
        if node._path_gen == self._path_gen:
            return node._path
        path = "/" if node.parent is None else join_path(self.path(node.parent), node.name)
        node._path, node._path_gen = path, self._path_gen
        return path


class Inode(Named):
    """One backing file known to the kernel.

    Attributes:
        ino: FUSE inode number (stable for the life of the mount).
        fd: ``O_PATH | O_NOFOLLOW`` fd of the backing file; every access goes
            through it. Reading it may reopen the file (:class:`InodeTable`) and
            raise ``pyfuse3.FUSEError(ESTALE)``; it stays valid until the handler
            awaits something.
        key: ``(st_dev, st_ino)`` of the backing file.
        lookups: kernel lookup count (see pyfuse3 ``developer-notes/lookup_counts``).
        parent: inode of the directory it was last seen in (None for the root).
        name: its name there, bytes.
        is_dir: whether it is a directory (directories keep their fd).
        named: whether ``parent``/``name`` still names it (False once that name was
            unlinked or replaced through the mount: its fd is then kept).
        flush_needed: whether its file system has a flush method (the passthrough
            backend's cache; None until asked).
    """

    __slots__ = ("ino", "_fd", "_table", "key", "lookups", "is_dir", "named", "flush_needed")

    def __init__(self, table: "InodeTable", ino: int, fd: int, key: tuple[int, int], parent: "Inode | None",
                 name: bytes, is_dir: bool) -> None:
        super().__init__(parent, name)
        self._table = table
        self.ino = ino
        self._fd = fd
        self.key = key
        self.lookups = 0
        self.is_dir = is_dir
        self.named = True
        self.flush_needed: bool | None = None

    @property
    def fd(self) -> int:
        fd = self._fd
        return fd if fd >= 0 else self._table.reopen(self)


class InodeTable(PathTable):
    """Maps FUSE inodes to backing files by ``(st_dev, st_ino)``.

    Keying by the backing inode makes hard links share one FUSE inode and keeps
    numbers stable across renames. An O_PATH fd per inode also pins the backing
    inode, so its number cannot be reused while the worker holds it.

    The FUSE inode number is the backing one (:meth:`ino_of`), so that a file keeps
    its ``st_ino`` after the kernel forgot it and looks it up again (memory
    pressure, ``drop_caches``): a number handed out from a counter would change,
    and tools that tell files apart by ``(st_dev, st_ino)`` would see a new file.
    Two swaps keep numbers unique: the backing root is FUSE inode 1, so a backing
    file numbered 1 gets the root's backing number; files of another file system
    mounted inside the backing dir, whose numbers may repeat the root's, get
    numbers from :data:`OTHER_DEVICE_INO_BASE` on, remembered for the mount's life.

    The kernel keeps an inode for as long as its dentry is cached — on a node with
    memory to spare, every file a tree walk ever touched — so holding an fd for
    each would run into the worker's open-file limit (EMFILE) on a dataset of more
    files than that, where the backing fs would not. So only ``max_file_fds``
    non-directories keep their fd; past that, the longest held is closed
    (first in, first out), and reopened from its directory's fd and name when next
    used (:meth:`reopen`), checked to be the same backing inode (ESTALE if
    something else is there now: the file was renamed or replaced in the backing
    dir, not through the mount). Directories always keep theirs (every lookup goes
    through them), and so does a file whose name was unlinked or replaced through
    the mount (``Inode.named``), which can then be reached by no name.

    Args:
        root_fd: O_PATH fd of the backing root directory (owned by the table).
        max_file_fds: most non-directory fds held at once (None: no limit).
    """

    def __init__(self, root_fd: int, max_file_fds: int | None = None) -> None:
        super().__init__()
        st = os.fstat(root_fd)
        self.root = Inode(self, ROOT_INODE, root_fd, (st.st_dev, st.st_ino), None, b"", is_dir=True)
        self.root.lookups = 1
        self._by_ino: dict[int, Inode] = {ROOT_INODE: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._other_device_inos: dict[tuple[int, int], int] = {}
        self.max_file_fds = max_file_fds
        #: Non-directories holding an fd that may be closed, oldest first.
        self._closable: OrderedDict[Inode, None] = OrderedDict()

    def ino_of(self, key: tuple[int, int]) -> int:
        """The FUSE inode number of backing file ``key`` = ``(st_dev, st_ino)``: the same every time."""
        dev, st_ino = key
        root_dev, root_st_ino = self.root.key
        if dev != root_dev:
            ino = self._other_device_inos.get(key)
            if ino is None:
                ino = self._other_device_inos[key] = OTHER_DEVICE_INO_BASE + len(self._other_device_inos)
            return ino
        if st_ino == root_st_ino:
            return ROOT_INODE
        return root_st_ino if st_ino == ROOT_INODE else st_ino

    def find(self, ino: int) -> Inode | None:
        """Return the inode, or None if the kernel does not know it."""
        return self._by_ino.get(ino)

    def by_key(self, key: tuple[int, int]) -> Inode | None:
        """Return the inode of backing file ``key`` = ``(st_dev, st_ino)``, or None."""
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode:
        """Return the inode.

        Raises:
            pyfuse3.FUSEError: ESTALE if the kernel names an inode we forgot.
        """
        try:
            return self._by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def add_or_update(self, fd: int, st: os.stat_result, parent: Inode, name: bytes) -> Inode:
        """Register the backing file opened as ``fd`` (found as ``parent``/``name``).

        Takes ownership of ``fd`` (closes it when the file is already known and has
        one). Does not change the lookup count.
        """
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is None:
            inode = Inode(self, self.ino_of(key), fd, key, parent, name, is_dir=stat.S_ISDIR(st.st_mode))
            self._by_ino[inode.ino] = inode
            self._by_key[key] = inode
            self._held(inode)
            return inode
        if inode.parent is not parent or inode.name != name:
            self.moved(inode, parent, name)
        if inode._fd < 0:
            # Closed, so not pinned: the number may have been reused by another file
            # since (deleted and created in the backing dir), maybe of another type.
            inode._fd = fd
            inode.is_dir = stat.S_ISDIR(st.st_mode)
            if inode.is_dir:
                self._closable.pop(inode, None)
        else:
            os.close(fd)
        if not inode.named:
            inode.named = True  # reachable by name again
        self._held(inode)
        return inode

    def unnamed(self, inode: Inode) -> None:
        """Record that ``inode``'s name was unlinked or replaced: keep its fd from now on.

        Call before the name goes: the fd is reopened now if it was closed.

        Raises:
            pyfuse3.FUSEError: ESTALE, the file cannot be reopened.
        """
        inode.fd  # noqa: B018 - reopens it while the name still leads to it
        inode.named = False
        self._closable.pop(inode, None)

    def reopen(self, inode: Inode) -> int:
        """Reopen ``inode``'s closed fd from its directory's fd and name; return it.

        Raises:
            pyfuse3.FUSEError: ESTALE when no file is at that name any more, or
                another one (renamed or replaced in the backing dir).
        """
        parent = inode.parent
        if parent is None or not inode.named:
            raise pyfuse3.FUSEError(errno.ESTALE)
        try:
            fd, st = open_path(parent.fd, inode.name)
        except (FileNotFoundError, NotADirectoryError):
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if (st.st_dev, st.st_ino) != inode.key or stat.S_ISDIR(st.st_mode) != inode.is_dir:
            os.close(fd)
            raise pyfuse3.FUSEError(errno.ESTALE)
        inode._fd = fd
        self._held(inode)
        return fd

    def _held(self, inode: Inode) -> None:
        """``inode`` holds an fd now: note it as closable (a named file), and close the oldest past the limit."""
        if inode.is_dir or not inode.named or self.max_file_fds is None:
            return
        closable = self._closable
        closable[inode] = None
        closable.move_to_end(inode)
        while len(closable) > self.max_file_fds:
            oldest, _ = closable.popitem(last=False)
            os.close(oldest._fd)
            oldest._fd = -1

    def forget(self, ino: int, nlookup: int) -> None:
        """Drop ``nlookup`` kernel references; close the fd when none remain."""
        inode = self._by_ino.get(ino)
        if inode is None or inode is self.root:
            return
        inode.lookups -= nlookup
        if inode.lookups <= 0:
            del self._by_ino[ino]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            self._closable.pop(inode, None)
            if inode._fd >= 0:
                os.close(inode._fd)
                inode._fd = -1

    def close(self) -> None:
        """Close every fd, the root's included."""
        for inode in self._by_ino.values():
            if inode._fd >= 0:
                os.close(inode._fd)
                inode._fd = -1
        self._by_ino.clear()
        self._by_key.clear()
        self._closable.clear()
