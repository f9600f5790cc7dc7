"""Passthrough backend: serve a backing directory, only through fds relative to its root.

Every backing file is reached by ``openat(parent_fd, name, O_PATH | O_NOFOLLOW)``
one component at a time from the root fd, so no sequence of FUSE requests can
resolve a path outside the backing directory: symlinks inside the tree are never
followed by the worker (the kernel resolves them on the client side, against the
client's own root), ``..`` is answered from the inode table, and names with ``/``
are refused. Operations on an inode go through its O_PATH fd, directly
(``fstat``) or via its ``/proc/self/fd/N`` magic link (reopen, chmod, truncate,
utimens, xattrs) as libfuse's passthrough_hp does.

Syscalls run on the event loop, except those that may block for long: reads the
page cache cannot serve, writes and flushes run in a thread while they are
measured to be slow, syncs always (``_offload``; see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence

import pyfuse3

from .._inodes import Inode, InodeTable, join_path, open_path
from ._base import Listed, OpenDir
from ._offload import BlockingCalls, BlockingIOMode
from ._libc import fallocate, fs_type, renameat2

#: Open flags never passed to the backing file: the kernel already handled them
#: (O_CREAT/O_EXCL via create, O_NOCTTY meaningless), or they need aligned user
#: buffers that Python's pread/pwrite do not give (O_DIRECT: the FUSE side of the
#: mount already bypasses the page cache for O_DIRECT opens).
#: O_NOFOLLOW is the caller's, about the path it gave, which the kernel has already
#: resolved; the worker reopens the inode through ``/proc/self/fd/N``, itself a
#: symlink, which O_NOFOLLOW would refuse with ELOOP.
_STRIPPED_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW


#: ``f_type`` of file systems whose files have no ``flush`` method (``struct
#: file_operations``, Linux 5.x-6.x): closing a duplicate fd there does nothing, so
#: the worker's flush cannot report anything. <linux/magic.h>: ext2/3/4, xfs, btrfs,
#: tmpfs, ramfs. Left out on purpose: NFS, CIFS, FUSE, overlayfs and f2fs, which
#: write back or report errors on flush.
NO_FLUSH_FS_TYPES = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0x858458F6})


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class PassthroughBackend:
    """A backing directory served as a FUSE file system.

    Args:
        root_dir: backing directory (must exist).
        entry_timeout_s: how long the kernel may cache name lookups, seconds.
        attr_timeout_s: how long the kernel may cache attributes, seconds.
        blocking_io: where reads, writes, flushes and syncs run (``adaptive``:
            on the loop while fast, in a thread once slow; ``loop``; ``thread``),
            see ``_offload``.
        max_file_fds: most ``O_PATH`` fds of non-directories held at once; others
            are reopened by name when used (``_inodes.InodeTable``). None: no limit.
        max_dir_fds: the same for directories (the root's is always held).

    Raises:
        NotADirectoryError, FileNotFoundError, PermissionError: ``root_dir`` unusable.
    """

    name = "passthrough"

    def __init__(self, root_dir: str, entry_timeout_s: float = 1.0, attr_timeout_s: float = 1.0,
                 blocking_io: BlockingIOMode = "adaptive", max_file_fds: int | None = None,
                 max_dir_fds: int | None = None) -> None:
        root_fd = os.open(root_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.inodes = InodeTable(root_fd, max_file_fds, max_dir_fds)
        self._entry_timeout_s = entry_timeout_s
        self._attr_timeout_s = attr_timeout_s
        self._am_root = os.geteuid() == 0
        self.blocking = BlockingCalls(blocking_io)
        # fh → (fd, inode) of open files; fh → the listing snapshot of open directories.
        self._files: dict[int, tuple[int, Inode]] = {}
        self._dirs: dict[int, OpenDir[Inode, bytes]] = {}
        self._next_fh = 1

    # ---- helpers -------------------------------------------------------------------

    def _attrs(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = self._entry_timeout_s
        attr.attr_timeout = self._attr_timeout_s
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    @staticmethod
    def _check_name(name: bytes) -> None:
        if b"/" in name or not name:
            raise pyfuse3.FUSEError(errno.EINVAL)

    def _find(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Open ``parent``/``name`` O_PATH and register it (lookup count unchanged)."""
        if name == b".":
            return parent, os.fstat(parent.fd)
        if name == b"..":
            up = parent.parent or parent  # the root's parent is the root: no way out
            return up, os.fstat(up.fd)
        self._check_name(name)
        fd, st = open_path(parent.fd, name)
        return self.inodes.add_or_update(fd, st, parent, name), st

    def _entry(self, parent: Inode, name: bytes) -> pyfuse3.EntryAttributes:
        inode, st = self._find(parent, name)
        inode.lookups += 1
        return self._attrs(st, inode.ino)

    def _chown_to_caller(self, parent: Inode, name: bytes, ctx: pyfuse3.RequestContext, mode: int = 0) -> None:
        """Give a file the worker just created to the caller, as the kernel would have.

        The worker runs as root, so ownership is set explicitly: the caller's uid, and
        the caller's gid unless the directory is set-group-ID (then the backing fs
        already gave it the directory's group, and a new directory the bit).
        ``chown`` clears set-user/group-ID bits of non-directories even for root, so
        those of ``mode`` (what the caller asked for) are put back.
        """
        if not self._am_root or (ctx.uid == 0 and ctx.gid == 0):
            return
        gid = -1 if os.fstat(parent.fd).st_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=parent.fd, follow_symlinks=False)
        if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(mode) and not stat.S_ISLNK(mode):
            os.chmod(name, mode & 0o7777, dir_fd=parent.fd)

    def path_of(self, ino: int) -> str:
        """Path of inode ``ino`` inside the volume; ``"?"`` if it is unknown."""
        inode = self.inodes.find(ino)
        return self.inodes.path(inode) if inode is not None else "?"

    def entry_path(self, parent_ino: int, name: bytes) -> str:
        """Path of entry ``name`` in directory ``parent_ino``."""
        return join_path(self.path_of(parent_ino), name)

    def ino_of_fh(self, fh: int) -> int:
        """Inode of an open file or directory handle (0 if unknown)."""
        entry = self._files.get(fh)
        if entry is not None:
            return entry[1].ino
        directory = self._dirs.get(fh)
        return directory.owner.ino if directory is not None else 0

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _file_fd(self, fh: int) -> int:
        try:
            return self._files[fh][0]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def backing_fd(self, fh: int) -> int:
        """The backing file's fd behind open handle ``fh`` (for kernel passthrough; the backend keeps it).

        Raises:
            pyfuse3.FUSEError: EBADF, ``fh`` is not open.
        """
        return self._file_fd(fh)

    # ---- entries -------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.inodes.get(parent_ino), name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.inodes.forget(ino, nlookup)

    async def getattr(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(os.fstat(self.inodes.get(ino).fd), ino)

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        inode = self.inodes.get(ino)
        path = _proc(inode.fd)
        if fields.update_size:
            if fh is not None and fh in self._files:
                os.ftruncate(self._files[fh][0], attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(path, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(inode.fd)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime))
        return self._attrs(os.fstat(inode.fd), ino)

    async def readlink(self, ino: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self.inodes.get(ino).fd)

    async def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_ino)
        self._check_name(name)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        self._chown_to_caller(parent, name, ctx, mode)
        return self._entry(parent, name)

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_ino)
        self._check_name(name)
        os.mkdir(name, mode, dir_fd=parent.fd)
        self._chown_to_caller(parent, name, ctx)
        return self._entry(parent, name)

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_ino)
        self._check_name(name)
        os.symlink(target, name, dir_fd=parent.fd)
        self._chown_to_caller(parent, name, ctx)
        return self._entry(parent, name)

    async def link(
        self, ino: int, new_parent_ino: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self.inodes.get(ino)
        new_parent = self.inodes.get(new_parent_ino)
        self._check_name(new_name)
        # linkat(AT_FDCWD, "/proc/self/fd/N", newdirfd, name, AT_SYMLINK_FOLLOW) links the
        # very inode the O_PATH fd holds, whatever its name is now.
        os.link(_proc(inode.fd), new_name, dst_dir_fd=new_parent.fd, follow_symlinks=True)
        return self._entry(new_parent, new_name)

    async def unlink(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.get(parent_ino)
        self._check_name(name)
        self._losing_its_name(self._check_kernel_knows(parent, name), parent, name)
        os.unlink(name, dir_fd=parent.fd)

    async def rmdir(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.get(parent_ino)
        self._check_name(name)
        self._losing_its_name(self._check_kernel_knows(parent, name), parent, name)
        os.rmdir(name, dir_fd=parent.fd)

    def _losing_its_name(self, inode: Inode | None, parent: Inode, name: bytes) -> None:
        """``parent``/``name`` is about to be unlinked or replaced: if it is the name ``inode`` is
        reopened by, keep its fd from now on (an open or hard-linked file lives on)."""
        if inode is not None and inode.parent is parent and inode.name == name:
            self.inodes.unnamed(inode)

    @staticmethod
    def _backing_key_at(parent: Inode, name: bytes) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of what is at ``parent``/``name`` now; None if nothing is.

        Raises:
            OSError: ``lstat`` failed otherwise.
        """
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _known_at(self, parent: Inode, name: bytes) -> Inode | None:
        """The inode the worker knows at ``parent``/``name`` now, if any."""
        try:
            key = self._backing_key_at(parent, name)
        except OSError:
            return None
        return self.inodes.by_key(key) if key is not None else None

    def _check_kernel_knows(self, parent: Inode, name: bytes) -> Inode | None:
        """ESTALE when what is at ``parent``/``name`` now is not an inode the kernel looked up; else that inode.

        The kernel checks an unlink, an rmdir or a rename's source (the sticky bit,
        for one) against the inode its cached entry names, which it holds, so the
        worker knows it (lookup count > 0). Anything else at the name was put there
        directly in the backing dir since; removing it as root would skip the checks
        it would get. ESTALE makes the VFS repeat the call once with LOOKUP_REVAL
        (``retry_estale`` in do_unlinkat, do_rmdir, do_renameat2), which looks the
        name up again, so its checks see what is really there.

        Raises:
            OSError: ESTALE, as above.
        """
        key = self._backing_key_at(parent, name)
        if key is None:
            return None  # the call itself answers ENOENT
        inode = self.inodes.by_key(key)
        if inode is None or inode.lookups <= 0:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return inode

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self.inodes.get(old_parent_ino)
        new_parent = self.inodes.get(new_parent_ino)
        self._check_name(old_name)
        self._check_name(new_name)
        self._check_kernel_knows(old_parent, old_name)  # the target the kernel looks up again itself
        if not flags & pyfuse3.RENAME_EXCHANGE:
            self._losing_its_name(self._known_at(new_parent, new_name), new_parent, new_name)
        if flags:
            renameat2(old_parent.fd, old_name, new_parent.fd, new_name, flags)
        else:
            os.rename(old_name, new_name, src_dir_fd=old_parent.fd, dst_dir_fd=new_parent.fd)
        # Keep paths right for layers and events: find what now sits at the new name.
        moved = self._known_at(new_parent, new_name)
        if moved is not None:
            self.inodes.moved(moved, new_parent, new_name)
        if flags & pyfuse3.RENAME_EXCHANGE:
            other = self._known_at(old_parent, old_name)
            if other is not None:
                self.inodes.moved(other, old_parent, old_name)

    # ---- files ---------------------------------------------------------------------

    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        inode = self.inodes.get(ino)
        fd = os.open(_proc(inode.fd), (flags & ~_STRIPPED_OPEN_FLAGS) | os.O_CLOEXEC)
        fh = self._new_fh()
        self._files[fh] = (fd, inode)
        return pyfuse3.FileInfo(fh=fh)

    async def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.inodes.get(parent_ino)
        self._check_name(name)
        # Always O_EXCL: the kernel sends CREATE only when it believes the name absent,
        # and has checked permissions for creating, not for opening what is there.
        open_flags = (flags & ~(os.O_DIRECT | os.O_NOCTTY)) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, open_flags, mode, dir_fd=parent.fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # The name appeared in the backing dir after the kernel's lookup (a cached
            # negative entry, or a race): opening it here, as root, would skip the
            # checks an existing file gets and give it to the caller. ESTALE makes the
            # VFS retry the open once with LOOKUP_REVAL (do_filp_open), which looks the
            # name up again and opens the existing file the normal way.
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE)) from None
        try:
            self._chown_to_caller(parent, name, ctx, stat.S_IFREG | mode)
            attrs = self._entry(parent, name)
        except BaseException:
            os.close(fd)
            raise
        fh = self._new_fh()
        self._files[fh] = (fd, self.inodes.get(attrs.st_ino))
        return pyfuse3.FileInfo(fh=fh), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        return await self.blocking.pread(self._file_fd(fh), size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.blocking.pwrite(self._file_fd(fh), buf, off)

    async def flush(self, fh: int) -> None:
        # close() of a duplicate reports the errors a close of the backing file would
        # (e.g. a network fs's deferred write errors), without closing the file.
        await self.blocking.flush(self._file_fd(fh))

    def flush_needed(self, fh: int) -> bool:
        """Whether :meth:`flush` of ``fh`` can report anything: not on a backing fs without a flush method.

        Asked of the file's own file system (a backing dir may hold other mounts),
        once per inode: a file on the same device as its directory inherits the
        directory's answer (both fds pin that one superblock), so creating files
        costs no ``fstatfs``.
        """
        entry = self._files.get(fh)
        if entry is None:
            return True
        unknown: list[Inode] = []
        inode: Inode | None = entry[1]
        dev_of = self.inodes.dev_of
        while inode is not None and inode.flush_needed is None:
            unknown.append(inode)
            parent = inode.parent
            inode = parent if parent is not None and dev_of(parent) == dev_of(inode) else None
        if inode is not None:
            needed = inode.flush_needed
        else:
            try:
                needed = fs_type(unknown[-1].fd) not in NO_FLUSH_FS_TYPES
            except OSError:
                return True
        for known in unknown:
            known.flush_needed = needed
        return bool(needed)

    async def release(self, fh: int) -> None:
        entry = self._files.pop(fh, None)
        if entry is not None:
            os.close(entry[0])

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.blocking.sync(self._file_fd(fh), datasync)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        # Can take long (zeroing, a network fs): a slow call like a write.
        await self.blocking.writes.call(fallocate, self._file_fd(fh), mode, offset, length)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int,
                              flags: int) -> int:
        if flags:  # copy_file_range(2) defines none yet; os.copy_file_range passes none
            raise pyfuse3.FUSEError(errno.EINVAL)
        fd_in, fd_out = self._file_fd(fh_in), self._file_fd(fh_out)
        # Always in a thread: one request may copy gigabytes inside the backing fs.
        return await self.blocking.hop.run(os.copy_file_range, fd_in, fd_out, length, off_in, off_out)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        # The backing fd's own position is never used (reads and writes are pread/pwrite).
        return os.lseek(self._file_fd(fh), offset, whence)

    # ---- directories ---------------------------------------------------------------

    async def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int:
        inode = self.inodes.get(ino)
        fh = self._new_fh()
        self._dirs[fh] = OpenDir(inode, name_of=bytes)
        return fh

    @staticmethod
    def _list_dir(inode: Inode) -> list[bytes]:
        fd = os.open(_proc(inode.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # "." and ".." first, as a native getdents lists them (ls -a shows them).
            return [b".", b".."] + [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)

    def order_dir(self, fh: int, order: Callable[[Sequence[bytes]], list[int]]) -> None:
        self._dirs[fh].reorder(order)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> list[Listed]:
        try:
            directory = self._dirs[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        inode, names = directory.owner, directory.snapshot_for(start_id, self._list_dir)
        replied: list[Listed] = []
        for index in range(start_id, len(names)):
            name = names[index]
            try:
                child, st = self._find(inode, name)
            except FileNotFoundError:
                continue  # removed since opendir
            if name in (b".", b".."):
                # The kernel takes no lookup reference for these (pyfuse3 readdir contract).
                attrs = self._attrs(st, child.ino)
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    return replied
                replied.append((name, attrs))
                continue
            attrs = self._attrs(st, child.ino)
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                if child.lookups == 0:
                    self.inodes.forget(child.ino, 0)
                return replied
            child.lookups += 1
            replied.append((name, attrs))
        return replied

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        try:
            inode = self._dirs[fh].owner
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        fd = os.open(_proc(inode.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            await self.blocking.sync(fd, datasync)
        finally:
            os.close(fd)

    # ---- file system -----------------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.inodes.root.fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(data, field, getattr(sv, field))
        return data

    # ---- extended attributes ---------------------------------------------------------

    async def getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.getxattr(_proc(self.inodes.get(ino).fd), name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.setxattr(_proc(self.inodes.get(ino).fd), name, value)

    async def listxattr(self, ino: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(_proc(self.inodes.get(ino).fd))]

    async def removexattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(_proc(self.inodes.get(ino).fd), name)

    def close(self) -> None:
        """Close every fd the backend holds."""
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        self._dirs.clear()
        self.inodes.close()
