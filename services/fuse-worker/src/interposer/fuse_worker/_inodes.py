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
        """Path of ``node`` inside the volume (``/`` for the root, ``/a/b`` below).

        Only the paths of directories asked for their children's are kept: a
        walk of a million files would otherwise hold a million path strings
        (~60 B each) for what one join (~0.1 µs) rebuilds.
        """
        if node._path_gen == self._path_gen:
            return node._path
        parent = node.parent
        return "/" if parent is None else join_path(self._parent_path(parent), node.name)

    def _parent_path(self, node: Named) -> str:
        """:meth:`path` of a directory, kept until the next move (with those above it).

        A loop, not recursion: a tree may be thousands of directories deep.
        """
        generation = self._path_gen
        uncached: list[Named] = []
        above: Named | None = node
        while above is not None and above._path_gen != generation:
            uncached.append(above)
            above = above.parent
        path = "" if above is None else above._path
        for below in reversed(uncached):
            path = "/" if below.parent is None else join_path(path, below.name)
            below._path, below._path_gen = path, generation
        return node._path


class Inode(Named):
    """One backing file known to the kernel.

    Attributes:
        ino: FUSE inode number (stable for the life of the mount).
        fd: ``O_PATH | O_NOFOLLOW`` fd of the backing file; every access goes
            through it. Reading it may reopen the file (:class:`InodeTable`) and
            raise ``pyfuse3.FUSEError(ESTALE)``; it stays valid until the handler
            awaits something.
        key: ``(st_dev, st_ino)`` of the backing file (computed from ``ino``:
            :meth:`InodeTable.key_of`).
        lookups: kernel lookup count (see pyfuse3 ``developer-notes/lookup_counts``).
        parent: inode of the directory it was last seen in (None for the root).
        name: its name there, bytes.
        is_dir: whether it is a directory.
        named: whether ``parent``/``name`` still names it (False once that name was
            unlinked, removed or replaced through the mount: its fd is then kept,
            until a lookup finds it by a name again).
        flush_needed: whether its file system has a flush method (the passthrough
            backend's cache; None until asked).
    """

    __slots__ = ("ino", "_fd", "_table", "lookups", "is_dir", "named", "flush_needed", "_read_in_op")

    def __init__(self, table: "InodeTable", ino: int, fd: int, parent: "Inode | None", name: bytes,
                 is_dir: bool) -> None:
        super().__init__(parent, name)
        self._table = table
        self.ino = ino
        self._fd = fd
        self.lookups = 0
        self.is_dir = is_dir
        self.named = True
        self.flush_needed: bool | None = None
        self._read_in_op = -1  # InodeTable.op when ``fd`` was last read

    @property
    def key(self) -> tuple[int, int]:
        return self._table.key_of(self.ino)

    @property
    def fd(self) -> int:
        table = self._table
        self._read_in_op = table.op
        fd = self._fd
        if fd < 0:
            return table.reopen(self)
        if self.is_dir:
            table.used_dir(self)
        return fd


class InodeTable(PathTable):
    """Maps FUSE inodes to backing files by ``(st_dev, st_ino)``.

    Keying by the backing inode makes hard links share one FUSE inode and keeps
    numbers stable across renames. The FUSE number is a function of the backing
    key both ways (:meth:`ino_of`, :meth:`key_of`), so one dict indexes both and
    no key is stored: at ~250 B per name, a worker holds a walk of a million files
    in ~250 MiB (``bench/datapath/inode_memory.py``). An O_PATH fd per inode also pins the backing
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
    memory to spare, every file and directory a tree walk ever touched — so holding
    an fd for each would run into the worker's open-file limit (EMFILE) on a tree
    of more entries than that, where the backing fs would not. So only
    ``max_file_fds`` non-directories and ``max_dir_fds`` directories keep their fd;
    past that, a file's fd is closed first in, first out, a directory's least
    recently used first (every lookup goes through a directory's fd, so the busy
    ones stay open), and reopened from its directory's fd and name when next used
    (:meth:`reopen`, up the tree as far as needed), checked to be the same backing
    inode (ESTALE if something else is there now: it was renamed or replaced in
    the backing dir, not through the mount). The root keeps its fd, and so does
    anything whose name was unlinked, removed or replaced through the mount
    (``Inode.named``), which can then be reached by no name.

    An fd pushed out is closed at once unless the current op has read it: then
    at the next :meth:`get`, which every backend op starts with (an op reads its
    fds without awaiting anything in between). An op that reads ``a.fd`` and then
    ``b.fd`` (a rename's two directories) may reopen ``b`` and so push ``a`` out,
    and ``a``'s number must stay valid — and not be reused by another open — until
    the op is done with it.

    Args:
        root_fd: O_PATH fd of the backing root directory (owned by the table).
        max_file_fds: most non-directory fds held at once (None: no limit).
        max_dir_fds: most directory fds held at once, the root's aside (None: no limit).
    """

    def __init__(self, root_fd: int, max_file_fds: int | None = None, max_dir_fds: int | None = None) -> None:
        super().__init__()
        st = os.fstat(root_fd)
        self._root_dev, self._root_st_ino = st.st_dev, st.st_ino
        self._other_device_inos: dict[tuple[int, int], int] = {}
        self._other_device_keys: dict[int, tuple[int, int]] = {}
        self.root = Inode(self, ROOT_INODE, root_fd, None, b"", is_dir=True)
        self.root.lookups = 1
        self._by_ino: dict[int, Inode] = {ROOT_INODE: self.root}
        self.max_file_fds = max_file_fds
        self.max_dir_fds = max_dir_fds
        #: Non-directories holding an fd that may be closed, oldest first.
        self._closable_files: OrderedDict[Inode, None] = OrderedDict()
        #: Directories holding an fd that may be closed, least recently used first.
        self._closable_dirs: OrderedDict[Inode, None] = OrderedDict()
        #: fds taken from inodes the current op has read, to be closed at the next :meth:`get`.
        self._to_close: list[int] = []
        #: Number of the current op: :meth:`get` counts them.
        self.op = 0

    def ino_of(self, key: tuple[int, int]) -> int:
        """The FUSE inode number of backing file ``key`` = ``(st_dev, st_ino)``: the same every time."""
        ino = self._known_ino_of(key)
        if ino is None:
            ino = self._other_device_inos[key] = OTHER_DEVICE_INO_BASE + len(self._other_device_inos)
            self._other_device_keys[ino] = key
        return ino

    def _known_ino_of(self, key: tuple[int, int]) -> int | None:
        """:meth:`ino_of` without numbering a file of another device not seen before (None then)."""
        dev, st_ino = key
        if dev != self._root_dev:
            return self._other_device_inos.get(key)
        if st_ino == self._root_st_ino:
            return ROOT_INODE
        return self._root_st_ino if st_ino == ROOT_INODE else st_ino

    def key_of(self, ino: int) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of the backing file numbered ``ino`` (the inverse of :meth:`ino_of`).

        Raises:
            KeyError: ``ino`` is a number of another device that was never handed out.
        """
        if ino >= OTHER_DEVICE_INO_BASE:
            return self._other_device_keys[ino]
        if ino == ROOT_INODE:
            return self._root_dev, self._root_st_ino
        return self._root_dev, ROOT_INODE if ino == self._root_st_ino else ino

    def dev_of(self, inode: Inode) -> int:
        """``st_dev`` of ``inode``'s backing file."""
        return self._root_dev if inode.ino < OTHER_DEVICE_INO_BASE else self._other_device_keys[inode.ino][0]

    def find(self, ino: int) -> Inode | None:
        """Return the inode, or None if the kernel does not know it."""
        return self._by_ino.get(ino)

    def by_key(self, key: tuple[int, int]) -> Inode | None:
        """Return the inode of backing file ``key`` = ``(st_dev, st_ino)``, or None."""
        ino = self._known_ino_of(key)
        return None if ino is None else self._by_ino.get(ino)

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode:
        """Return the inode.

        Raises:
            pyfuse3.FUSEError: ESTALE if the kernel names an inode we forgot.
        """
        self.op += 1
        if self._to_close:
            self.close_released()
        try:
            return self._by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def close_released(self) -> None:
        """Close the fds taken from inodes past the limits (call where no op holds an fd number)."""
        to_close, self._to_close = self._to_close, []
        for fd in to_close:
            os.close(fd)

    def used_dir(self, inode: Inode) -> None:
        """Note that directory ``inode``'s fd was just used: it is closed last."""
        if inode.parent is not None and self.max_dir_fds is not None:
            try:
                self._closable_dirs.move_to_end(inode)
            except KeyError:
                pass  # unnamed: not closable

    def add_or_update(self, fd: int, st: os.stat_result, parent: Inode, name: bytes) -> Inode:
        """Register the backing file opened as ``fd`` (found as ``parent``/``name``).

        Takes ownership of ``fd`` (closes it when the file is already known and has
        one). Does not change the lookup count.
        """
        ino = self.ino_of((st.st_dev, st.st_ino))
        inode = self._by_ino.get(ino)
        if inode is None:
            inode = self._by_ino[ino] = Inode(self, ino, fd, parent, name, is_dir=stat.S_ISDIR(st.st_mode))
            self._held(inode)
            return inode
        if inode.parent is not parent or inode.name != name:
            self.moved(inode, parent, name)
        if inode._fd < 0:
            # Closed, so not pinned: the number may have been reused by another file
            # since (deleted and created in the backing dir), maybe of another type.
            inode._fd = fd
            self._not_closable(inode)
            inode.is_dir = stat.S_ISDIR(st.st_mode)
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
        self._not_closable(inode)

    def reopen(self, inode: Inode) -> int:
        """Reopen ``inode``'s closed fd from its directory's fd and name; return it.

        Closed directories above it are reopened first, from the nearest one that
        holds its fd down (a loop, not recursion: a tree may be thousands deep).

        Raises:
            pyfuse3.FUSEError: ESTALE when nothing is at one of those names any
                more, or something else (renamed or replaced in the backing dir).
        """
        closed = [inode]
        while (parent := closed[-1].parent) is not None and parent._fd < 0:
            closed.append(parent)
        for node in reversed(closed):
            self._reopen_one(node)
        return inode._fd

    def _reopen_one(self, inode: Inode) -> None:
        """Reopen ``inode`` from its parent's fd, open now, and its name (see :meth:`reopen`).

        The parent's fd is taken without marking it read: only this reopen needs
        it, so it may be closed at once when pushed out (a chain of a thousand
        reopened directories does not hold a thousand fds until the next op).
        """
        parent = inode.parent
        if parent is None or not inode.named:
            raise pyfuse3.FUSEError(errno.ESTALE)
        try:
            fd, st = open_path(parent._fd, inode.name)
        except (FileNotFoundError, NotADirectoryError):
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if self._known_ino_of((st.st_dev, st.st_ino)) != inode.ino or stat.S_ISDIR(st.st_mode) != inode.is_dir:
            os.close(fd)
            raise pyfuse3.FUSEError(errno.ESTALE)
        inode._fd = fd
        self._held(inode)

    def _not_closable(self, inode: Inode) -> None:
        self._closable_files.pop(inode, None)
        self._closable_dirs.pop(inode, None)

    def _held(self, inode: Inode) -> None:
        """``inode`` holds an fd now: note it as closable (if named), and release the oldest past the limit."""
        if not inode.named or inode is self.root:
            return
        if inode.is_dir:
            closable, limit = self._closable_dirs, self.max_dir_fds
        else:
            closable, limit = self._closable_files, self.max_file_fds
        if limit is None:
            return
        closable[inode] = None
        closable.move_to_end(inode)
        while len(closable) > limit:
            oldest, _ = closable.popitem(last=False)
            if oldest._read_in_op == self.op:
                self._to_close.append(oldest._fd)
            else:
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
            self._not_closable(inode)
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
        self._closable_files.clear()
        self._closable_dirs.clear()
        self.close_released()
