"""Memory backend: a complete, size-limited file system held in the worker's memory.

Same op set and POSIX behaviour as the passthrough backend over a local file system:
regular files, directories, symlinks, fifos/sockets/device nodes (metadata only),
hard links (one inode, ``st_nlink``; each extra one takes an inode, as on tmpfs),
rename with ``RENAME_NOREPLACE``, ``RENAME_WHITEOUT`` and
``RENAME_EXCHANGE``, xattrs (``user.``, ``trusted.``, ``security.``), nanosecond
timestamps, owners and modes. Permission checks are the kernel's (the mount uses
``default_permissions``); this module only records ownership: new files belong to
the caller, and to the directory's group under a set-group-ID directory (which
also passes the bit on to new subdirectories), as ext4 and tmpfs do.

An inode lives while a directory entry, a kernel lookup reference or an open
handle holds it (an unlinked open file stays readable until released and
forgotten, as POSIX requires). File contents and extended attributes (name and
value bytes) count against ``size_bytes``: a write, truncate or setxattr that would
pass it fails with ENOSPC (a write that partly fits is shortened, as on a full
disk), so no client of the mount can grow the worker's memory past the limit;
``statfs`` reports the limit and what is used.
Files are sparse, as on tmpfs (``_contents.SparseContents``: 64 KiB chunks, each
holding what was written of it): what was never written, up to the file's size, is
a hole that reads as zeros and takes no memory, so ``truncate -s 10G``, a
preallocating ``ftruncate`` or a write at 10 GiB works on a 1 GiB volume;
``st_blocks`` and ``statfs`` count only what is held, and ``SEEK_DATA``/``SEEK_HOLE``
find the holes. ``fallocate`` has tmpfs's modes (allocate, keep size, punch hole);
punching frees whole chunks and chunk ends.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Sequence
from operator import itemgetter

import pyfuse3

from .._inodes import ROOT_INODE, Named, PathTable, join_path
from .._op import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from ._base import Listed, OpenDir
from ._contents import CHUNK_BYTES, SparseContents

#: Default limit of file contents held in memory, bytes (1 GiB).
DEFAULT_MEMORY_SIZE_BYTES = 1 << 30
#: Block size reported by stat/statfs, bytes (the page size, as tmpfs reports).
BLOCK_SIZE_BYTES = 4096
#: Longest file name component, bytes (Linux NAME_MAX, <linux/limits.h>).
NAME_MAX_BYTES = 255
#: Longest xattr name, bytes (Linux XATTR_NAME_MAX, <linux/limits.h>).
XATTR_NAME_MAX_BYTES = 255
#: Mode of the root directory: writable by every uid, like a Kubernetes emptyDir.
DEFAULT_ROOT_MODE = 0o777
#: Inodes allowed per byte of the size limit (one inode per 4 KiB, as tmpfs' default
#: ``nr_inodes`` of half the pages for half the RAM).
BYTES_PER_INODE = 4096
#: xattr namespaces a Linux local file system supports without ACLs.
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
#: Flags of rename(2) this backend implements (<linux/fs.h>).
RENAME_NOREPLACE = pyfuse3.RENAME_NOREPLACE
RENAME_EXCHANGE = pyfuse3.RENAME_EXCHANGE
#: renameat2(2): leave a whiteout (a character device 0:0) at the old name, for
#: overlayfs (<linux/fs.h>; pyfuse3 has no name for it).
RENAME_WHITEOUT = 1 << 2


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class Node(Named):
    """One inode of the memory file system.

    Attributes:
        ino: FUSE inode number (never reused for the life of the mount).
        mode: ``st_mode``, file type bits included.
        uid, gid: owner.
        nlink: directory entries naming it (directories: 2 + subdirectories).
        rdev: device number of device nodes.
        size: ``st_size``, bytes.
        atime_ns, mtime_ns, ctime_ns: timestamps, ns since the epoch.
        data: the held contents of a regular file (what is not held, up to
            ``size``, is a hole of zeros); None for other types, and in the null backend.
        target: symlink target.
        entries: ``dict[bytes, int]``: name → inode number, for directories.
        xattrs: ``dict[bytes, bytes]``: extended attributes.
        lookups: kernel lookup count.
        opens: open file handles.
        released: no name and no open handle hold it any more, so its contents no
            longer count against the size limit, though kept until the kernel
            forgets it (``MemoryBackend._maybe_free``).
    """

    __slots__ = ("ino", "mode", "uid", "gid", "nlink", "rdev", "size", "atime_ns", "mtime_ns", "ctime_ns",
                 "data", "target", "entries", "xattrs", "lookups", "opens", "released")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, parent: Node | None, name: bytes) -> None:
        super().__init__(parent, name)
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 1
        self.rdev = 0
        self.size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.data: SparseContents | None = None
        self.target = b""
        self.entries: dict[bytes, int] = {}
        self.xattrs: dict[bytes, bytes] = {}
        self.released = False
        self.lookups = 0
        self.opens = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class MemoryBackend(PathTable):
    """A file system in memory, served through FUSE.

    Args:
        size_bytes: most bytes of file contents held; writes beyond fail with ENOSPC.
        entry_timeout_s: how long the kernel may cache name lookups, seconds.
        attr_timeout_s: how long the kernel may cache attributes, seconds.
        root_uid, root_gid: owner of the root directory (default: the worker's).

    Raises:
        ValueError: ``size_bytes`` < one block.
    """

    name = "memory"

    def __init__(self, size_bytes: int = DEFAULT_MEMORY_SIZE_BYTES, entry_timeout_s: float = 1.0,
                 attr_timeout_s: float = 1.0, root_uid: int | None = None, root_gid: int | None = None) -> None:
        super().__init__()
        if size_bytes < BLOCK_SIZE_BYTES:
            raise ValueError(f"size_bytes = {size_bytes} must be at least {BLOCK_SIZE_BYTES}")
        self.size_bytes = size_bytes
        self.used_bytes = 0
        self.max_inodes = max(size_bytes // BYTES_PER_INODE, 64)
        # Names beyond a file's first, each counted as an inode as tmpfs does
        # (shmem_link reserves one), so hard links cannot grow memory without bound.
        self._extra_links = 0
        self._entry_timeout_s = entry_timeout_s
        self._attr_timeout_s = attr_timeout_s
        uid = os.getuid() if root_uid is None else root_uid
        gid = os.getgid() if root_gid is None else root_gid
        self.root = Node(ROOT_INODE, stat.S_IFDIR | DEFAULT_ROOT_MODE, uid, gid, None, b"")
        self.root.nlink = 2
        self.root.lookups = 1
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}
        self._next_ino = ROOT_INODE + 1
        # fh → (node, open flags) of open files; fh → the listing snapshot of open directories.
        self._files: dict[int, tuple[Node, int]] = {}
        self._dirs: dict[int, OpenDir[Node, tuple[bytes, int]]] = {}
        self._next_fh = 1

    # ---- contents (the null backend overrides these) -----------------------------------

    def _new_data(self) -> SparseContents | None:
        return SparseContents()

    def _resize(self, node: Node, size: int) -> None:
        """Set a regular file's size: growth is a hole (no memory); shrinking frees what it cuts off."""
        assert node.data is not None
        if size < node.size:
            self.used_bytes -= node.data.truncate(size)
        node.size = size

    def _growth(self, node: Node, start: int, end: int) -> int:
        """Bytes of memory holding bytes ``start:end`` of a regular file would take anew."""
        assert node.data is not None
        return node.data.growth(start, end)

    def _hold(self, node: Node, start: int, end: int) -> None:
        """Hold bytes ``start:end`` of a regular file in memory (zeros where it had a hole).

        Raises:
            pyfuse3.FUSEError: ENOSPC if that passes the size limit (nothing changes).
        """
        assert node.data is not None
        self._check_room(node.data.growth(start, end))
        self.used_bytes += node.data.hold(start, end)

    def _check_room(self, grow_bytes: int) -> None:
        """Raise ENOSPC if ``grow_bytes`` more of contents would pass the size limit."""
        if grow_bytes > self.size_bytes - self.used_bytes:
            raise _fail(errno.ENOSPC)

    def _write_data(self, node: Node, off: int, buf: bytes) -> int:
        """Write ``buf`` at ``off``; shortened to what fits. Returns bytes written.

        Raises:
            pyfuse3.FUSEError: ENOSPC if not one byte fits.
        """
        data = node.data
        assert data is not None
        room = self.size_bytes - self.used_bytes
        # A write stores at most its own bytes and the gap before it in its first chunk.
        if len(buf) + CHUNK_BYTES > room and data.growth(off, off + len(buf)) > room:
            fits = data.fitting(off, len(buf), room)
            if fits <= 0:
                raise _fail(errno.ENOSPC)
            buf = buf[:fits]
        self.used_bytes += data.write(off, buf)
        node.size = max(node.size, off + len(buf))
        return len(buf)

    def _read_data(self, node: Node, off: int, size: int) -> bytes:
        assert node.data is not None
        return node.data.read(off, size)

    def _zero_data(self, node: Node, start: int, end: int) -> None:
        """Make bytes ``start:end`` of a regular file, all within its size, a hole (punched): frees what it can."""
        assert node.data is not None
        self.used_bytes -= node.data.punch(start, end)

    def _held_bytes(self, node: Node) -> int:
        """Bytes of memory ``node``'s contents take (its apparent size where none are stored)."""
        return node.size if node.data is None else node.data.stored

    # ---- helpers ----------------------------------------------------------------------

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = self._entry_timeout_s
        attr.attr_timeout = self._attr_timeout_s
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_rdev = node.rdev
        attr.st_size = node.size
        attr.st_blksize = BLOCK_SIZE_BYTES
        # st_blocks counts 512-byte units of whole allocated blocks (a hole has none).
        attr.st_blocks = -(-self._held_bytes(node) // BLOCK_SIZE_BYTES) * (BLOCK_SIZE_BYTES // 512)
        attr.st_atime_ns = node.atime_ns
        attr.st_mtime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        return attr

    def _get(self, ino: int) -> Node:
        try:
            node = self._nodes[ino]
        except KeyError:
            raise _fail(errno.ESTALE) from None
        if node.released:
            # Reached again after its last name and handle went (an op that raced
            # the unlink): its contents count again until the kernel forgets it.
            node.released = False
            self.used_bytes += self._stored_bytes(node)
        return node

    def _dir(self, ino: int) -> Node:
        node = self._get(ino)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        return node

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or b"/" in name:
            raise _fail(errno.EINVAL)
        if len(name) > NAME_MAX_BYTES:
            raise _fail(errno.ENAMETOOLONG)

    def _child(self, parent: Node, name: bytes) -> Node:
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or parent  # type: ignore[return-value]
        self._check_name(name)
        ino = parent.entries.get(name)
        if ino is None:
            raise _fail(errno.ENOENT)
        return self._nodes[ino]

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._attrs(node)

    def _touch_dir(self, parent: Node) -> None:
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    def _add(self, parent: Node, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Node:
        """Create ``parent``/``name`` with ``mode`` (type bits included), owned by the caller.

        Raises:
            pyfuse3.FUSEError: EEXIST, ENOENT (parent removed), ENOSPC (inode limit),
                EINVAL/ENAMETOOLONG (bad name).
        """
        self._check_name(name)
        if name in parent.entries:
            raise _fail(errno.EEXIST)
        if parent.nlink == 0:
            raise _fail(errno.ENOENT)  # creating in a removed directory
        if self._inodes_used() >= self.max_inodes:
            raise _fail(errno.ENOSPC)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        node = Node(self._next_ino, mode, ctx.uid, gid, parent, name)
        self._next_ino += 1
        self._nodes[node.ino] = node
        parent.entries[name] = node.ino
        self._touch_dir(parent)
        return node

    def _inodes_used(self) -> int:
        """Inodes in use, as ``statfs`` counts them: every inode, and every extra hard link."""
        return len(self._nodes) + self._extra_links

    def _drop_link(self, node: Node) -> None:
        if not node.is_dir and node.nlink > 1:
            self._extra_links -= 1
        node.nlink = 0 if node.is_dir else node.nlink - 1
        node.ctime_ns = time.time_ns()
        self._maybe_free(node)

    def _maybe_free(self, node: Node) -> None:
        """Release ``node``'s space once no name or open handle holds it; drop it once no
        kernel reference does either.

        Its space is given back at once (``statfs`` shows it free right after the
        unlink, as tmpfs does), but the contents are kept until the kernel forgets the
        inode: an op that raced the unlink (the kernel resolved the name before it)
        may still reach the inode and must find them, as on any local fs; it makes
        them count again (:meth:`_get`). The kernel forgets an unlinked inode nobody
        has open right after the unlink, so that window is short.
        """
        if node.nlink > 0 or node.opens > 0 or node is self.root:
            return
        if not node.released:
            node.released = True
            self.used_bytes -= self._stored_bytes(node)
        if node.lookups == 0:
            node.data = None
            node.xattrs = {}
            del self._nodes[node.ino]

    def _stored_bytes(self, node: Node) -> int:
        """Bytes ``node`` holds against the size limit: held contents, xattr names and values."""
        held = node.data.stored if node.data is not None else 0
        return held + sum(len(name) + len(value) for name, value in node.xattrs.items())

    def path_of(self, ino: int) -> str:
        """Path of inode ``ino`` inside the volume; ``"?"`` if it is unknown."""
        node = self._nodes.get(ino)
        return self.path(node) if node is not None else "?"

    def entry_path(self, parent_ino: int, name: bytes) -> str:
        """Path of entry ``name`` in directory ``parent_ino``."""
        return join_path(self.path_of(parent_ino), name)

    def ino_of_fh(self, fh: int) -> int:
        """Inode of an open file or directory handle (0 if unknown)."""
        entry = self._files.get(fh)
        if entry is not None:
            return entry[0].ino
        directory = self._dirs.get(fh)
        return directory.owner.ino if directory is not None else 0

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _file(self, fh: int) -> tuple[Node, int]:
        try:
            return self._files[fh]
        except KeyError:
            raise _fail(errno.EBADF) from None

    # ---- entries ----------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._child(self._dir(parent_ino), name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            node = self._nodes.get(ino)
            if node is None or node is self.root:
                continue
            node.lookups = max(node.lookups - nlookup, 0)
            self._maybe_free(node)

    async def getattr(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._get(ino))

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._get(ino)
        now = time.time_ns()
        if fields.update_size:
            if node.is_dir:
                raise _fail(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise _fail(errno.EINVAL)
            self._resize(node, attr.st_size)
            node.mtime_ns = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | (attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            if fields.update_uid:
                node.uid = attr.st_uid
            if fields.update_gid:
                node.gid = attr.st_gid
            # chown(2) clears set-user-ID, and set-group-ID of group-executable files,
            # on non-directories even for root (the mount asks the file system to do it:
            # libfuse enables FUSE_CAP_HANDLE_KILLPRIV by default).
            if not node.is_dir and not fields.update_mode:
                node.mode &= ~stat.S_ISUID
                if node.mode & stat.S_IXGRP:
                    node.mode &= ~stat.S_ISGID
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = now
        return self._attrs(node)

    async def readlink(self, ino: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._get(ino)
        if not stat.S_ISLNK(node.mode):
            raise _fail(errno.EINVAL)
        return node.target

    async def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise _fail(errno.EINVAL)
        node = self._add(self._dir(parent_ino), name, mode, ctx)
        node.rdev = rdev
        if stat.S_ISREG(mode):
            node.data = self._new_data()
        return self._entry(node)

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_ino)
        node = self._add(parent, name, stat.S_IFDIR | (mode & 0o7777), ctx)
        node.nlink = 2
        parent.nlink += 1
        return self._entry(node)

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._add(self._dir(parent_ino), name, stat.S_IFLNK | 0o777, ctx)
        node.target = target
        node.size = len(target)
        return self._entry(node)

    async def link(
        self, ino: int, new_parent_ino: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._get(ino)
        parent = self._dir(new_parent_ino)
        if node.is_dir:
            raise _fail(errno.EPERM)
        self._check_name(new_name)
        if new_name in parent.entries:
            raise _fail(errno.EEXIST)
        if node.nlink == 0:
            raise _fail(errno.ENOENT)  # linkat of an unlinked file (without O_TMPFILE)
        if self._inodes_used() >= self.max_inodes:
            raise _fail(errno.ENOSPC)
        parent.entries[new_name] = node.ino
        node.nlink += 1
        self._extra_links += 1
        node.ctime_ns = time.time_ns()
        self._touch_dir(parent)
        self.moved(node, parent, new_name)
        return self._entry(node)

    async def unlink(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._dir(parent_ino)
        node = self._child(parent, name)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        del parent.entries[name]
        self._touch_dir(parent)
        self._drop_link(node)

    async def rmdir(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._dir(parent_ino)
        if name == b".":
            raise _fail(errno.EINVAL)
        node = self._child(parent, name)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if node.entries:
            raise _fail(errno.ENOTEMPTY)
        if node is self.root or node is parent:
            raise _fail(errno.EBUSY)
        del parent.entries[name]
        parent.nlink -= 1
        self._touch_dir(parent)
        self._drop_link(node)

    def _is_ancestor(self, node: Node, of: Node) -> bool:
        cur: Named | None = of
        while cur is not None:
            if cur is node:
                return True
            cur = cur.parent
        return False

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise _fail(errno.EINVAL)
        old_parent, new_parent = self._dir(old_parent_ino), self._dir(new_parent_ino)
        self._check_name(old_name)
        self._check_name(new_name)
        src = self._child(old_parent, old_name)
        dst_ino = new_parent.entries.get(new_name)
        dst = self._nodes[dst_ino] if dst_ino is not None else None
        now = time.time_ns()
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _fail(errno.ENOENT)
            if (src.is_dir and self._is_ancestor(src, new_parent)) or (dst.is_dir and self._is_ancestor(dst, old_parent)):
                raise _fail(errno.EINVAL)
            old_parent.entries[old_name], new_parent.entries[new_name] = dst.ino, src.ino
            if old_parent is not new_parent and src.is_dir != dst.is_dir:
                moved_dir_to_new = 1 if src.is_dir else -1
                new_parent.nlink += moved_dir_to_new
                old_parent.nlink -= moved_dir_to_new
            self.moved(src, new_parent, new_name)
            self.moved(dst, old_parent, old_name)
            src.ctime_ns = dst.ctime_ns = now
            self._touch_dir(old_parent)
            self._touch_dir(new_parent)
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise _fail(errno.EEXIST)
        if dst is src:
            return  # two names of one inode: rename(2) does nothing
        if src.is_dir and self._is_ancestor(src, new_parent):
            raise _fail(errno.EINVAL)
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise _fail(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise _fail(errno.EISDIR)
            if dst.is_dir and dst.entries:
                raise _fail(errno.ENOTEMPTY)
        if dst is not None and dst.is_dir and self._is_ancestor(dst, old_parent):
            raise _fail(errno.ENOTEMPTY)
        if flags & RENAME_WHITEOUT and self._inodes_used() >= self.max_inodes:
            raise _fail(errno.ENOSPC)  # as tmpfs: the whiteout is made before anything moves
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = src.ino
        if dst is not None:
            if dst.is_dir:
                new_parent.nlink -= 1
            self._drop_link(dst)
        if src.is_dir and old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
        self.moved(src, new_parent, new_name)
        src.ctime_ns = now
        if flags & RENAME_WHITEOUT:
            self._add(old_parent, old_name, stat.S_IFCHR, ctx).rdev = 0
        self._touch_dir(old_parent)
        self._touch_dir(new_parent)

    # ---- files ------------------------------------------------------------------------

    def _open_node(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = (node, flags)
        node.opens += 1
        return pyfuse3.FileInfo(fh=fh)

    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._get(ino)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            # FUSE_CAP_ATOMIC_O_TRUNC (libfuse's default): O_TRUNC arrives here, not as
            # setattr; with any access mode, as Linux truncates on O_RDONLY | O_TRUNC
            # (the VFS has checked write permission for it).
            self._resize(node, 0)
            node.mtime_ns = node.ctime_ns = time.time_ns()
        return self._open_node(node, flags)

    async def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._add(self._dir(parent_ino), name, stat.S_IFREG | (mode & 0o7777), ctx)
        node.data = self._new_data()
        attrs = self._entry(node)
        return self._open_node(node, flags), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node, _ = self._file(fh)
        if off >= node.size:
            return b""
        # relatime: update atime when it is not newer than mtime/ctime (mount(8)).
        if node.atime_ns <= node.mtime_ns or node.atime_ns <= node.ctime_ns:
            node.atime_ns = time.time_ns()
        return self._read_data(node, off, min(size, node.size - off))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node, flags = self._file(fh)
        if flags & os.O_APPEND:
            off = node.size
        written = self._write_data(node, off, buf)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return written

    async def flush(self, fh: int) -> None:
        self._file(fh)

    def flush_needed(self, fh: int) -> bool:
        """Never: contents live in this process, and a flush has nothing to write back or report."""
        return False

    async def release(self, fh: int) -> None:
        entry = self._files.pop(fh, None)
        if entry is not None:
            entry[0].opens -= 1
            self._maybe_free(entry[0])

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._file(fh)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """The modes tmpfs has: allocate (extending unless ``FALLOC_FL_KEEP_SIZE``) and punch holes.

        Allocating holds the range in memory (ENOSPC if that passes the size limit,
        nothing changed), so later writes there cannot fail for space; with
        ``FALLOC_FL_KEEP_SIZE`` the part past the file's size is only checked to fit.
        A punched hole reads back as zeros. ``FALLOC_FL_ZERO_RANGE`` and the rest:
        EOPNOTSUPP, as on tmpfs.
        """
        node, _ = self._file(fh)
        if offset < 0 or length <= 0:
            raise _fail(errno.EINVAL)
        end = offset + length
        if mode == 0:
            self._hold(node, offset, end)
            node.size = max(node.size, end)
        elif mode == FALLOC_FL_KEEP_SIZE:
            within = min(end, node.size)
            self._check_room((self._growth(node, offset, within) if within > offset else 0)
                             + max(end - node.size, 0))
            if within > offset:
                self._hold(node, offset, within)
        elif mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            if offset < node.size:
                self._zero_data(node, offset, min(end, node.size))
        else:
            raise _fail(errno.EOPNOTSUPP)
        node.mtime_ns = node.ctime_ns = time.time_ns()

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int,
                              flags: int) -> int:
        if flags:
            raise _fail(errno.EINVAL)
        source, _ = self._file(fh_in)
        target, _ = self._file(fh_out)
        if off_in >= source.size or length == 0:
            return 0
        copied = self._write_data(target, off_out, self._read_data(source, off_in, min(length, source.size - off_in)))
        target.mtime_ns = target.ctime_ns = time.time_ns()
        return copied

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        # Data is what is held (all of a null file); a hole is the rest, the end of the file included.
        node, _ = self._file(fh)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _fail(errno.EINVAL)
        if offset < 0 or offset >= node.size:
            raise _fail(errno.ENXIO)
        data = node.data
        if whence == os.SEEK_DATA:
            found = offset if data is None else data.next_data(offset)
            if found is None or found >= node.size:
                raise _fail(errno.ENXIO)  # only a hole lies ahead
            return found
        return node.size if data is None else min(data.next_hole(offset), node.size)

    # ---- directories ------------------------------------------------------------------

    async def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._dir(ino)
        fh = self._new_fh()
        self._dirs[fh] = OpenDir(node, name_of=itemgetter(0))
        node.opens += 1
        return fh

    @staticmethod
    def _list_dir(node: Node) -> list[tuple[bytes, int]]:
        parent = node.parent if isinstance(node.parent, Node) else node
        return [(b".", node.ino), (b"..", parent.ino), *node.entries.items()]

    def order_dir(self, fh: int, order: Callable[[Sequence[bytes]], list[int]]) -> None:
        self._dirs[fh].reorder(order)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> list[Listed]:
        try:
            directory = self._dirs[fh]
        except KeyError:
            raise _fail(errno.EBADF) from None
        node, listing = directory.owner, directory.snapshot_for(start_id, self._list_dir)
        replied: list[Listed] = []
        for index in range(start_id, len(listing)):
            name, ino = listing[index]
            child = self._nodes.get(ino)
            if child is None:
                continue
            if name in (b".", b".."):
                # The kernel takes no lookup reference for these (pyfuse3 readdir contract).
                attrs = self._attrs(child)
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    return replied
                replied.append((name, attrs))
                continue
            if node.entries.get(name) != ino:
                continue  # removed or replaced since opendir
            attrs = self._attrs(child)
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return replied
            child.lookups += 1
            replied.append((name, attrs))
        return replied

    async def releasedir(self, fh: int) -> None:
        directory = self._dirs.pop(fh, None)
        if directory is not None:
            directory.owner.opens -= 1
            self._maybe_free(directory.owner)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if fh not in self._dirs:
            raise _fail(errno.EBADF)

    def usage(self) -> tuple[int, int]:
        """``(bytes, inodes)`` in use, as the quota layer counts them: apparent sizes of
        regular files, and every linked inode but the root."""
        nbytes = inodes = 0
        for node in self._nodes.values():
            if node.nlink > 0 and node.ino != pyfuse3.ROOT_INODE:
                inodes += 1
                if stat.S_ISREG(node.mode):
                    nbytes += node.size
        return nbytes, inodes

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE_BYTES
        data.f_blocks = self.size_bytes // BLOCK_SIZE_BYTES
        data.f_bfree = data.f_bavail = (self.size_bytes - self.used_bytes) // BLOCK_SIZE_BYTES
        data.f_files = self.max_inodes
        data.f_ffree = data.f_favail = max(self.max_inodes - self._inodes_used(), 0)
        data.f_namemax = NAME_MAX_BYTES
        return data

    # ---- extended attributes ----------------------------------------------------------

    def _xattr_node(self, ino: int, name: bytes) -> Node:
        node = self._get(ino)
        if not name.startswith(XATTR_NAMESPACES):
            raise _fail(errno.EOPNOTSUPP)  # system.* (ACLs) and unknown namespaces
        if name in XATTR_NAMESPACES:
            raise _fail(errno.EINVAL)  # a namespace without a name (the VFS's xattr_resolve_name)
        if len(name) > XATTR_NAME_MAX_BYTES:
            raise _fail(errno.ERANGE)
        return node

    async def getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._xattr_node(ino, name)
        try:
            return node.xattrs[name]
        except KeyError:
            raise _fail(pyfuse3.ENOATTR) from None

    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._xattr_node(ino, name)
        if name.startswith(b"user.") and not (stat.S_ISREG(node.mode) or node.is_dir):
            raise _fail(errno.EPERM)  # user.* only on files and directories (xattr(7))
        old = node.xattrs.get(name)
        grow = len(value) - len(old) if old is not None else len(name) + len(value)
        if grow > self.size_bytes - self.used_bytes:  # not _check_room: the null backend stores xattrs too
            raise _fail(errno.ENOSPC)
        node.xattrs[name] = bytes(value)
        self.used_bytes += grow
        node.ctime_ns = time.time_ns()

    async def listxattr(self, ino: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._get(ino).xattrs)

    async def removexattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._xattr_node(ino, name)
        try:
            value = node.xattrs.pop(name)
        except KeyError:
            raise _fail(pyfuse3.ENOATTR) from None
        self.used_bytes -= len(name) + len(value)
        node.ctime_ns = time.time_ns()

    def close(self) -> None:
        """Drop every inode and handle."""
        self._files.clear()
        self._dirs.clear()
        self._nodes = {ROOT_INODE: self.root}
        self.root.entries.clear()
        self.used_bytes = 0
        self._extra_links = 0
