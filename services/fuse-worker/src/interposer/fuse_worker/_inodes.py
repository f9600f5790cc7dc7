"""Inode table of the passthrough backend: FUSE inode → O_PATH fd, name and lookup count."""

from __future__ import annotations

import os

import pyfuse3

#: FUSE inode number of the volume root (pyfuse3.ROOT_INODE).
ROOT_INODE = pyfuse3.ROOT_INODE


class Inode:
    """One backing file known to the kernel.

    Attributes:
        ino: FUSE inode number (stable for the life of the mount).
        fd: ``O_PATH | O_NOFOLLOW`` fd of the backing file; every access goes through it.
        key: ``(st_dev, st_ino)`` of the backing file.
        lookups: kernel lookup count (see pyfuse3 ``developer-notes/lookup_counts``).
        parent: inode of the directory it was last seen in (None for the root).
        name: its name there, bytes.
    """

    __slots__ = ("ino", "fd", "key", "lookups", "parent", "name", "_path", "_path_gen")

    def __init__(self, ino: int, fd: int, key: tuple[int, int], parent: "Inode | None", name: bytes) -> None:
        self.ino = ino
        self.fd = fd
        self.key = key
        self.lookups = 0
        self.parent = parent
        self.name = name
        self._path = ""
        self._path_gen = -1


class InodeTable:
    """Maps FUSE inodes to backing files by ``(st_dev, st_ino)``.

    Keying by the backing inode makes hard links share one FUSE inode and keeps
    numbers stable across renames. Holding an O_PATH fd per entry also pins the
    backing inode, so its number cannot be reused while the kernel knows it.

    Paths (for layer globs and events) are built from parent links and cached; a
    directory rename bumps a generation counter that invalidates every cached path.

    Args:
        root_fd: O_PATH fd of the backing root directory (owned by the table).
    """

    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        self.root = Inode(ROOT_INODE, root_fd, (st.st_dev, st.st_ino), None, b"")
        self.root.lookups = 1
        self._by_ino: dict[int, Inode] = {ROOT_INODE: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._next_ino = ROOT_INODE + 1
        self._path_gen = 0

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
            raise pyfuse3.FUSEError(116) from None  # ESTALE

    def add_or_update(self, fd: int, st: os.stat_result, parent: Inode, name: bytes) -> Inode:
        """Register the backing file opened as ``fd`` (found as ``parent``/``name``).

        Takes ownership of ``fd`` (closes it when the file is already known).
        Does not change the lookup count.
        """
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is None:
            inode = Inode(self._next_ino, fd, key, parent, name)
            self._next_ino += 1
            self._by_ino[inode.ino] = inode
            self._by_key[key] = inode
            return inode
        os.close(fd)
        if inode.parent is not parent or inode.name != name:
            self.moved(inode, parent, name)
        return inode

    def moved(self, inode: Inode, parent: Inode, name: bytes) -> None:
        """Record that ``inode`` is now ``parent``/``name``."""
        inode.parent, inode.name = parent, name
        self._path_gen += 1

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
            os.close(inode.fd)

    def path(self, inode: Inode) -> str:
        """Path of ``inode`` inside the volume (``/`` for the root, ``/a/b`` below)."""
        if inode._path_gen == self._path_gen:
            return inode._path
        if inode.parent is None:
            path = "/"
        else:
            parent_path = self.path(inode.parent)
            name = os.fsdecode(inode.name)
            path = parent_path + name if parent_path == "/" else f"{parent_path}/{name}"
        inode._path, inode._path_gen = path, self._path_gen
        return path

    def close(self) -> None:
        """Close every fd, the root's included."""
        for inode in self._by_ino.values():
            os.close(inode.fd)
        self._by_ino.clear()
        self._by_key.clear()
