"""Kernel FUSE passthrough (Linux ≥ 6.9): the kernel serves an open file's reads and writes from the backing file.

With ``FOPEN_PASSTHROUGH`` in the reply to an OPEN, the kernel reads, writes,
splices and maps the file by calling the backing file system directly: no READ
or WRITE request reaches the worker, no data crosses ``/dev/fuse``, and the only
page cache is the backing file's. Opens, closes, fsync and all metadata still
come to the worker. Kernel side: ``fs/fuse/passthrough.c``, ``backing.c`` and
``iomode.c``; ABI: ``include/uapi/linux/fuse.h`` (protocol 7.40).

What it takes, and why each piece is here (pyfuse3 3.5 and libfuse 3.14 predate
the feature, and expose none of it):

* **FUSE_INIT**: the reply must carry ``FUSE_PASSTHROUGH`` (bit 37, so bit 5 of
  ``flags2``) and ``max_stack_depth`` ≥ 1; ``_init_reply`` adds them to the
  reply libfuse builds, and :meth:`KernelPassthrough.init_reply_sent` is told
  whether they went out.
* **Backing files**: ``FUSE_DEV_IOC_BACKING_OPEN`` on ``/dev/fuse`` registers an
  open file of the backing fs and returns its ``backing_id``;
  ``FUSE_DEV_IOC_BACKING_CLOSE`` drops it. Needs CAP_SYS_ADMIN (the kernel's
  rule until backing files show in lsof); without it the first attempt fails
  with EPERM and passthrough stays off.
* **The OPEN and CREATE replies** carry ``backing_id`` in a field libfuse's
  ``struct fuse_open_out`` calls padding, so they are written by ``_raw_reply``
  (CREATE matters most: writers mostly write files they create);
  :meth:`KernelPassthrough.open_out` gives the flags and ``backing_id`` to send.
* **One I/O mode per inode** (``iomode.c``): while a file is open in
  passthrough mode, an open of the same inode through the page cache fails with
  EIO in the kernel, and all passthrough opens of an inode must name the same
  backing file. :meth:`KernelPassthrough.opened` keeps the count of each kind per
  inode and answers accordingly: passthrough only while the inode has no cached
  opens, FOPEN_DIRECT_IO (which the kernel lets coexist) for a non-passthrough
  open while it has passthrough ones, and one ``backing_id`` per inode until its
  last passthrough open is released.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ._raw_reply import FOPEN_NOFLUSH, FOPEN_PASSTHROUGH

log = logging.getLogger(__name__)

#: ``_IOW(FUSE_DEV_IOC_MAGIC=229, 1, struct fuse_backing_map)``: {int32 fd, uint32 flags, uint64 padding}.
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
#: ``_IOW(229, 2, uint32_t)``: the backing_id to drop.
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
#: ``FUSE_PASSTHROUGH`` (1 << 37) as a bit of ``fuse_init_out.flags2``.
FLAGS2_PASSTHROUGH = 1 << (37 - 32)
#: Stacking depth answered in FUSE_INIT: backing files on a plain (depth 0) fs.
MAX_STACK_DEPTH = 1


class IoMode(Enum):
    """How the kernel serves an open file's data (``fs/fuse/iomode.c``)."""

    CACHED = "cached"  # through the page cache: reads and writes as FUSE requests
    DIRECT = "direct"  # FOPEN_DIRECT_IO: every read and write a FUSE request; coexists with either
    PASSTHROUGH = "passthrough"  # FOPEN_PASSTHROUGH: the kernel calls the backing file


@dataclass
class _InodeIo:
    cached: int = 0
    passthrough: int = 0
    backing_id: int = 0


class KernelPassthrough:
    """Backing-file registration, per-inode I/O modes and the OPEN reply's passthrough fields for one session.

    Args:
        libfuse: the loaded libfuse (``_extra_ops._libfuse``), for ``fuse_session_fd``.
        session: address of libfuse's ``struct fuse_session``.
    """

    def __init__(self, libfuse: ctypes.CDLL, session: int) -> None:
        self.fuse_fd: int = libfuse.fuse_session_fd(session)
        #: True once FUSE_INIT was answered with FUSE_PASSTHROUGH and no
        #: registration has been refused; opens pass through only then.
        self.enabled = False
        self._inodes: dict[int, _InodeIo] = {}
        #: fh → (inode, I/O mode, path it was opened at).
        self._handles: dict[int, tuple[int, IoMode, str]] = {}
        #: errnos of backing files the kernel refused (one warning each).
        self._refused: set[int] = set()

    # ---- FUSE_INIT -----------------------------------------------------------------

    def init_reply_sent(self, flags2: int) -> None:
        """Note the ``flags2`` bits the FUSE_INIT reply carried (``_init_reply``): passthrough is on if it asked."""
        self.enabled = bool(flags2 & FLAGS2_PASSTHROUGH)
        if not self.enabled:
            log.warning("kernel passthrough off: the FUSE_INIT reply had no room for it")

    # ---- opens ---------------------------------------------------------------------

    def opened(self, fh: int, ino: int, path: str, direct_io: bool, backing_fd: int | None) -> IoMode:
        """Choose the I/O mode of a file just opened, and count it against its inode.

        Args:
            fh: the new file handle.
            ino: its FUSE inode.
            path: the path it was opened at (for :meth:`passthrough_handles`).
            direct_io: whether the open would bypass the page cache without passthrough.
            backing_fd: an fd of the backing file opened for I/O, if this open may
                pass through (no layer acts on its reads or writes); None otherwise.

        Returns:
            PASSTHROUGH (reply with :meth:`reply_open`), or DIRECT/CACHED as
            ``direct_io`` says. Every open of an inode that has passthrough opens
            is PASSTHROUGH, whatever ``backing_fd`` says: the kernel fails any
            other with EIO (``fuse_file_io_open``, Linux 6.18).
        """
        # Only cached and passthrough opens are counted (they exclude each other);
        # a direct-I/O open leaves no record of its own.
        io = self._inodes.get(ino) or _InodeIo()
        mode = IoMode.DIRECT if direct_io else IoMode.CACHED
        if io.passthrough:
            mode = IoMode.PASSTHROUGH
        elif backing_fd is not None and self.enabled and not io.cached:
            io.backing_id = self._register(backing_fd)
            if io.backing_id > 0:
                mode = IoMode.PASSTHROUGH
        if mode is IoMode.PASSTHROUGH:
            io.passthrough += 1
        elif mode is IoMode.CACHED:
            io.cached += 1
        if io.passthrough or io.cached:
            self._inodes[ino] = io
        self._handles[fh] = (ino, mode, path)
        log.debug("fh %d of inode %d opened %s (backing_id %d)", fh, ino, mode.value, io.backing_id)
        return mode

    def _register(self, backing_fd: int) -> int:
        """``FUSE_DEV_IOC_BACKING_OPEN``: the new backing_id, or 0 if the kernel refused."""
        request = bytearray(struct.pack("<iIQ", backing_fd, 0, 0))
        try:
            return fcntl.ioctl(self.fuse_fd, FUSE_DEV_IOC_BACKING_OPEN, request)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY):
                self.enabled = False  # the same for every file: stop asking
                log.warning("kernel passthrough off: the kernel refused a backing file (%s%s)", exc.strerror,
                            "; it needs CAP_SYS_ADMIN" if exc.errno == errno.EPERM else "")
            elif exc.errno not in self._refused:  # these files only; said once per reason
                self._refused.add(exc.errno)
                log.warning("kernel passthrough not used for files the kernel refuses with %s%s; others are "
                            "still passed through", errno.errorcode.get(exc.errno or 0, exc.errno),
                            " (a backing fs that is itself stacked, e.g. overlayfs: the worker asks for "
                            f"max_stack_depth {MAX_STACK_DEPTH})" if exc.errno == errno.ELOOP else "")
            return 0

    def released(self, fh: int) -> None:
        """Forget handle ``fh``; drop its inode's backing file after its last passthrough open."""
        entry = self._handles.pop(fh, None)
        if entry is None:
            return
        ino, mode, _ = entry
        if mode is IoMode.DIRECT:
            return  # not counted (opened)
        io = self._inodes[ino]
        if mode is IoMode.CACHED:
            io.cached -= 1
        elif mode is IoMode.PASSTHROUGH:
            io.passthrough -= 1
            if not io.passthrough:
                fcntl.ioctl(self.fuse_fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("<I", io.backing_id)))
                io.backing_id = 0
        if not io.cached and not io.passthrough:
            del self._inodes[ino]

    def passthrough_handles(self, opened_at: Callable[[str], bool] | None = None) -> list[int]:
        """The fhs of open handles in passthrough mode; only those opened at a path ``opened_at`` accepts, if given.

        With ``Stack.acts_on_data_at``: the files whose reads and writes a layer in
        force would act on but cannot see until they are reopened. Safe to call
        from another thread (the handle table is copied in one step under the GIL).
        """
        return [fh for fh, (_, mode, path) in list(self._handles.items())
                if mode is IoMode.PASSTHROUGH and (opened_at is None or opened_at(path))]

    def open_out(self, fh: int, open_flags: int) -> tuple[int, int]:
        """``fuse_open_out``'s ``open_flags`` and ``backing_id`` for handle ``fh``, given the flags it would get otherwise.

        A passthrough open gets FOPEN_PASSTHROUGH and its inode's backing_id; of
        ``open_flags`` it keeps only FOPEN_NOFLUSH: the kernel refuses it with any
        flag but DIRECT_IO, PARALLEL_DIRECT_WRITES and NOFLUSH
        (``FOPEN_PASSTHROUGH_MASK``), and DIRECT_IO would send its reads and writes
        here after all. Any other open keeps ``open_flags`` and backing_id 0.
        """
        entry = self._handles.get(fh)
        if entry is None or entry[1] is not IoMode.PASSTHROUGH:
            return open_flags, 0
        return FOPEN_PASSTHROUGH | (open_flags & FOPEN_NOFLUSH), self._inodes[entry[0]].backing_id
