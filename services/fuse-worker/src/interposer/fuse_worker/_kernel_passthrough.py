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
  ``flags2``) and ``max_stack_depth`` ≥ 1. libfuse builds that reply from flags it
  knows and sends it itself, so :meth:`KernelPassthrough.divert_init_reply`
  points the session's fd (``struct fuse_session.fd``, found by what the public
  ``fuse_session_fd()`` returns) at a pipe just before libfuse replies; a task
  reads the reply from the pipe, puts the fd back, sets the two fields and
  writes it to ``/dev/fuse``. The kernel sends no other request before INIT is
  answered, so nothing else can be written or read meanwhile.
* **Backing files**: ``FUSE_DEV_IOC_BACKING_OPEN`` on ``/dev/fuse`` registers an
  open file of the backing fs and returns its ``backing_id``;
  ``FUSE_DEV_IOC_BACKING_CLOSE`` drops it. Needs CAP_SYS_ADMIN (the kernel's
  rule until backing files show in lsof); without it the first attempt fails
  with EPERM and passthrough stays off.
* **The OPEN and CREATE replies** carry ``backing_id`` in a field libfuse's
  ``struct fuse_open_out`` calls padding, so they are written here (``reply_open``,
  ``reply_create``; CREATE matters most: writers mostly write files they create):
  the request's ``unique`` is read from libfuse's ``struct fuse_req`` (checked
  against two public facts first: its first member is the session, and
  ``fuse_req_ctx()`` points 64 bytes in), then ``fuse_reply_none`` frees the
  request.
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
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import pyfuse3
import trio

log = logging.getLogger(__name__)

#: ``_IOW(FUSE_DEV_IOC_MAGIC=229, 1, struct fuse_backing_map)``: {int32 fd, uint32 flags, uint64 padding}.
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
#: ``_IOW(229, 2, uint32_t)``: the backing_id to drop.
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
#: ``fuse_open_out.open_flags`` bits (uapi fuse.h).
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_PASSTHROUGH = 1 << 7
#: ``FUSE_PASSTHROUGH`` (1 << 37) as a bit of ``fuse_init_out.flags2``.
FLAGS2_PASSTHROUGH = 1 << (37 - 32)
#: ``FUSE_INIT_EXT`` in ``fuse_init_out.flags``: without it the kernel ignores ``flags2``.
FUSE_INIT_EXT = 1 << 30
#: Stacking depth answered in FUSE_INIT: backing files on a plain (depth 0) fs.
MAX_STACK_DEPTH = 1

_OUT_HEADER = struct.Struct("<IiQ")  # struct fuse_out_header: len, error, unique
_OPEN_OUT = struct.Struct("<QIi")  # struct fuse_open_out: fh, open_flags, backing_id
#: struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid (s), their ns; then struct fuse_attr:
#: ino, size, blocks, atime, mtime, ctime (s), their ns, mode, nlink, uid, gid, rdev, blksize, flags.
_ENTRY_OUT = struct.Struct("<QQQQII" + "QQQQQQIIIIIIIIII")
_NS = 1_000_000_000
_INIT_FLAGS = _OUT_HEADER.size + 12  # fuse_init_out.flags
_INIT_FLAGS2 = _OUT_HEADER.size + 32  # fuse_init_out.flags2
_INIT_MAX_STACK_DEPTH = _OUT_HEADER.size + 36  # fuse_init_out.max_stack_depth
#: Offsets in libfuse's private ``struct fuse_req`` (3.x): se, unique, ..., ctx.
_REQ_UNIQUE = 8
_REQ_CTX = 64
#: How far into ``struct fuse_session`` its ``fd`` is searched for, bytes.
_SESSION_FD_SEARCH = 64


class PassthroughUnavailable(RuntimeError):
    """libfuse's session or request did not look as expected: passthrough stays off, nothing was changed."""


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
    """Backing-file registration, per-inode I/O modes and the raw OPEN reply for one session.

    Args:
        libfuse: the loaded libfuse (``_extra_ops._libfuse``), for ``fuse_session_fd``,
            ``fuse_req_ctx`` and ``fuse_reply_none``.
        session: address of libfuse's ``struct fuse_session``.

    Raises:
        PassthroughUnavailable: the session's ``fd`` member was not found.
    """

    def __init__(self, libfuse: ctypes.CDLL, session: int) -> None:
        self._lib = libfuse
        self._session = session
        self.fuse_fd: int = libfuse.fuse_session_fd(session)
        self._fd_address = self._find_fd_member()
        #: True once FUSE_INIT was answered with FUSE_PASSTHROUGH and no
        #: registration has been refused; opens pass through only then.
        self.enabled = False
        self._inodes: dict[int, _InodeIo] = {}
        #: fh → (inode, I/O mode, path it was opened at).
        self._handles: dict[int, tuple[int, IoMode, str]] = {}
        #: errnos of backing files the kernel refused (one warning each).
        self._refused: set[int] = set()

    def _find_fd_member(self) -> int:
        for offset in range(0, _SESSION_FD_SEARCH, 4):
            member = ctypes.c_int.from_address(self._session + offset)
            if member.value != self.fuse_fd:
                continue
            member.value = self.fuse_fd + 1  # does fuse_session_fd() read this member?
            moved = self._lib.fuse_session_fd(self._session)
            member.value = self.fuse_fd
            if moved == self.fuse_fd + 1:
                return self._session + offset
        raise PassthroughUnavailable("the FUSE session's fd member was not found")

    # ---- FUSE_INIT -----------------------------------------------------------------

    def divert_init_reply(self, nursery: trio.Nursery) -> None:
        """Catch the FUSE_INIT reply libfuse is about to send, and send it with passthrough asked for.

        Call from inside libfuse's ``init`` handler (the reply follows it). The
        reply goes to a pipe; a task in ``nursery`` forwards it to ``/dev/fuse``
        with ``FUSE_PASSTHROUGH`` and ``max_stack_depth`` set, and sets
        :attr:`enabled`. Anything unexpected forwards the reply unchanged.
        """
        read_end, write_end = os.pipe()
        nursery.start_soon(self._forward_init_reply, read_end, write_end)
        ctypes.c_int.from_address(self._fd_address).value = write_end

    async def _forward_init_reply(self, read_end: int, write_end: int) -> None:
        try:
            await trio.lowlevel.wait_readable(read_end)
            reply = bytearray(os.read(read_end, 4096))
        finally:
            ctypes.c_int.from_address(self._fd_address).value = self.fuse_fd
            os.close(read_end)
            os.close(write_end)
        patched = len(reply) >= _INIT_MAX_STACK_DEPTH + 4 and _OUT_HEADER.unpack_from(reply)[1] == 0
        patched = patched and bool(struct.unpack_from("<I", reply, _INIT_FLAGS)[0] & FUSE_INIT_EXT)
        if patched:
            flags2 = struct.unpack_from("<I", reply, _INIT_FLAGS2)[0]
            struct.pack_into("<II", reply, _INIT_FLAGS2, flags2 | FLAGS2_PASSTHROUGH, MAX_STACK_DEPTH)
        os.write(self.fuse_fd, reply)
        self.enabled = patched
        log.debug("FUSE_INIT reply forwarded (%d bytes, passthrough asked: %s)", len(reply), patched)
        if not patched:
            log.warning("kernel passthrough off: the FUSE_INIT reply had no room for it (%d bytes)", len(reply))

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
        io = self._inodes.setdefault(ino, _InodeIo())
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

    def passthrough_handles(self, opened_at: Callable[[str], bool] | None = None) -> int:
        """Open handles in passthrough mode; only those opened at a path ``opened_at`` accepts, if given.

        With ``Stack.acts_on_data_at``: the files whose reads and writes a layer in
        force would act on but cannot see until they are reopened. Safe to call
        from another thread (the handle table is copied in one step under the GIL).
        """
        return sum(1 for _, mode, path in list(self._handles.values())
                   if mode is IoMode.PASSTHROUGH and (opened_at is None or opened_at(path)))

    def check_request(self, req: int) -> None:
        """Check that ``req`` has the ``struct fuse_req`` layout :meth:`reply_open` relies on.

        Raises:
            PassthroughUnavailable: it does not.
        """
        session = ctypes.c_void_p.from_address(req).value
        ctx = ctypes.cast(self._lib.fuse_req_ctx(req), ctypes.c_void_p).value
        if session != self._session or ctx != req + _REQ_CTX:
            raise PassthroughUnavailable("libfuse's struct fuse_req does not have the expected layout")

    def reply_create(self, req: int, attrs: pyfuse3.EntryAttributes, fh: int, open_flags: int) -> int:
        """Answer CREATE request ``req``: the new entry ``attrs`` and its open handle, as :meth:`reply_open`.

        The entry is encoded as libfuse's ``fill_entry``/``convert_stat`` do
        (timeouts split into whole seconds and ns).
        """
        (entry_s, entry_ns), (attr_s, attr_ns) = _seconds_ns(attrs.entry_timeout), _seconds_ns(attrs.attr_timeout)
        entry = _ENTRY_OUT.pack(
            attrs.st_ino, attrs.generation, entry_s, attr_s, entry_ns, attr_ns,
            attrs.st_ino, attrs.st_size, attrs.st_blocks, attrs.st_atime_ns // _NS, attrs.st_mtime_ns // _NS,
            attrs.st_ctime_ns // _NS, attrs.st_atime_ns % _NS, attrs.st_mtime_ns % _NS, attrs.st_ctime_ns % _NS,
            attrs.st_mode, attrs.st_nlink, attrs.st_uid, attrs.st_gid, attrs.st_rdev, attrs.st_blksize, 0)
        return self._reply(req, entry + self._open_out(fh, open_flags))

    def reply_open(self, req: int, fh: int, open_flags: int) -> int:
        """Answer OPEN request ``req`` with handle ``fh`` and ``open_flags`` (FOPEN_*), or with passthrough.

        A passthrough open gets FOPEN_PASSTHROUGH and its inode's backing_id in
        place of ``open_flags``: the kernel refuses it with any flag but
        DIRECT_IO, PARALLEL_DIRECT_WRITES and NOFLUSH (``FOPEN_PASSTHROUGH_MASK``),
        and DIRECT_IO would send its reads and writes here after all.

        Returns:
            0, or the errno of the write (ENOENT: the open was interrupted, the
            kernel forgot it and will send no RELEASE for ``fh``).
        """
        return self._reply(req, self._open_out(fh, open_flags))

    def _open_out(self, fh: int, open_flags: int) -> bytes:
        backing_id = 0
        entry = self._handles.get(fh)
        if entry is not None and entry[1] is IoMode.PASSTHROUGH:
            open_flags = FOPEN_PASSTHROUGH
            backing_id = self._inodes[entry[0]].backing_id
        return _OPEN_OUT.pack(fh, open_flags, backing_id)

    def _reply(self, req: int, payload: bytes) -> int:
        """Write ``payload`` as the reply to ``req`` (one write: the kernel takes a reply whole), free ``req``."""
        unique = ctypes.c_uint64.from_address(req + _REQ_UNIQUE).value
        try:
            os.write(self.fuse_fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), 0, unique) + payload)
            return 0
        except OSError as exc:
            return exc.errno or errno.EIO
        finally:
            self._lib.fuse_reply_none(req)


def _seconds_ns(timeout_s: float) -> tuple[int, int]:
    """A kernel cache timeout as FUSE sends it: whole seconds and the ns part (libfuse's ``calc_timeout_*``)."""
    timeout_s = max(timeout_s, 0.0)
    return int(timeout_s), int((timeout_s - math.floor(timeout_s)) * 1e9)
