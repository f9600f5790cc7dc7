"""OPEN, CREATE and READ replies written to ``/dev/fuse`` by the worker: fields pyfuse3 3.5 and libfuse 3.14 cannot send, replies sent later.

libfuse builds ``struct fuse_open_out`` from ``struct fuse_file_info``, and
pyfuse3 3.5 copies only ``fh``, ``direct_io``, ``keep_cache`` and ``nonseekable``
into that: ``FOPEN_NOFLUSH`` (no FLUSH request on ``close(2)``, Linux ≥ 5.16;
libfuse's ``noflush`` bit, which pyfuse3 never sets) and the ``backing_id`` of
kernel passthrough (Linux ≥ 6.9, a field libfuse 3.14 calls padding) cannot be
asked for through them. ``_extra_ops`` therefore
serves the ``open`` and ``create`` slots itself and answers through
:class:`RawReplies`: the request's ``unique`` is read from libfuse's
``struct fuse_req`` (checked against two public facts first: its first member
is the session, and ``fuse_req_ctx()`` points 64 bytes in), the reply is
written to the session's fd in one ``write(2)``, then ``fuse_reply_none``
frees the request. READ replies are written the same way by ``_held_reads``
(any time after the request, from the timer task). ABI: ``include/uapi/linux/fuse.h``.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import struct

import pyfuse3

#: ``fuse_open_out.open_flags`` bits (uapi fuse.h).
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

_OUT_HEADER = "IiQ"  # struct fuse_out_header: len, error, unique
_OPEN_OUT = "QIi"  # struct fuse_open_out: fh, open_flags, backing_id
#: struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid (s), their ns; then struct fuse_attr:
#: ino, size, blocks, atime, mtime, ctime (s), their ns, mode, nlink, uid, gid, rdev, blksize, flags.
_ENTRY_OUT = "QQQQII" + "QQQQQQIIIIIIIIII"
_HEADER = struct.Struct("<" + _OUT_HEADER)
#: Whole replies, header included (packed in one call: these replies are on the hot path of every open).
_OPEN_REPLY = struct.Struct("<" + _OUT_HEADER + _OPEN_OUT)
_CREATE_REPLY = struct.Struct("<" + _OUT_HEADER + _ENTRY_OUT + _OPEN_OUT)
_NS = 1_000_000_000
#: Offsets in libfuse's private ``struct fuse_req`` (3.x): se, unique, ..., ctx.
_REQ_UNIQUE = 8
_REQ_CTX = 64


class FuseCtx(ctypes.Structure):
    """``struct fuse_ctx`` (fuse_lowlevel.h): who sent a request."""

    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


class RawReplyUnavailable(RuntimeError):
    """libfuse's request did not have the expected layout: replies stay libfuse's, nothing was written."""


def open_flags_of(info: pyfuse3.FileInfo) -> int:
    """``fuse_open_out.open_flags`` for ``info``, as libfuse's ``fill_open`` sets them."""
    return ((FOPEN_DIRECT_IO if info.direct_io else 0) | (FOPEN_KEEP_CACHE if info.keep_cache else 0)
            | (FOPEN_NONSEEKABLE if info.nonseekable else 0))


class RawReplies:
    """Writes OPEN, CREATE and READ replies of one libfuse session.

    Args:
        libfuse: the loaded libfuse (``_extra_ops._libfuse``), for ``fuse_session_fd``,
            ``fuse_req_ctx`` and ``fuse_reply_none``.
        session: address of libfuse's ``struct fuse_session``.
    """

    def __init__(self, libfuse: ctypes.CDLL, session: int) -> None:
        self._lib = libfuse
        self._session = session
        self.fuse_fd: int = libfuse.fuse_session_fd(session)

    def check_request(self, req: int) -> None:
        """Check that ``req`` has the ``struct fuse_req`` layout the replies rely on.

        Raises:
            RawReplyUnavailable: it does not.
        """
        session = ctypes.c_void_p.from_address(req).value
        ctx = ctypes.cast(self._lib.fuse_req_ctx(req), ctypes.c_void_p).value
        if session != self._session or ctx != req + _REQ_CTX:
            raise RawReplyUnavailable("libfuse's struct fuse_req does not have the expected layout")

    @staticmethod
    def caller(req: int) -> tuple[int, int, int]:
        """``(uid, gid, pid)`` of request ``req``: its ``struct fuse_ctx``, read in place.

        What ``fuse_req_ctx()`` returns, without a call through ctypes; valid for a
        request :meth:`check_request` accepted the layout of.
        """
        ctx = FuseCtx.from_address(req + _REQ_CTX)
        return ctx.uid, ctx.gid, ctx.pid

    def open(self, req: int, fh: int, open_flags: int, backing_id: int = 0) -> int:
        """Answer OPEN request ``req`` with handle ``fh``, ``open_flags`` (FOPEN_*) and ``backing_id``.

        Returns:
            0, or the errno of the write (ENOENT: the open was interrupted, the
            kernel forgot it and will send no RELEASE for ``fh``).
        """
        return self._reply(req, _OPEN_REPLY, fh, open_flags, backing_id)

    def create(self, req: int, attrs: pyfuse3.EntryAttributes, fh: int, open_flags: int, backing_id: int = 0) -> int:
        """Answer CREATE request ``req``: the new entry ``attrs`` and its open handle, as :meth:`open`.

        The entry is encoded as libfuse's ``fill_entry``/``convert_stat`` do
        (timeouts split into whole seconds and ns).
        """
        (entry_s, entry_ns), (attr_s, attr_ns) = _seconds_ns(attrs.entry_timeout), _seconds_ns(attrs.attr_timeout)
        return self._reply(
            req, _CREATE_REPLY,
            attrs.st_ino, attrs.generation, entry_s, attr_s, entry_ns, attr_ns,
            attrs.st_ino, attrs.st_size, attrs.st_blocks, attrs.st_atime_ns // _NS, attrs.st_mtime_ns // _NS,
            attrs.st_ctime_ns // _NS, attrs.st_atime_ns % _NS, attrs.st_mtime_ns % _NS, attrs.st_ctime_ns % _NS,
            attrs.st_mode, attrs.st_nlink, attrs.st_uid, attrs.st_gid, attrs.st_rdev, attrs.st_blksize, 0,
            fh, open_flags, backing_id)

    def data(self, req: int, payload: bytes | bytearray | memoryview) -> int:
        """Answer READ request ``req`` with ``payload`` (what ``fuse_reply_buf`` sends), free ``req``.

        Returns:
            0, or the errno of the write (ENOENT: the request was interrupted and
            the kernel forgot it; ENODEV: the file system was unmounted).
        """
        unique = ctypes.c_uint64.from_address(req + _REQ_UNIQUE).value
        try:
            os.writev(self.fuse_fd, (_HEADER.pack(_HEADER.size + len(payload), 0, unique), payload))
            return 0
        except OSError as exc:
            return exc.errno or errno.EIO
        finally:
            self._lib.fuse_reply_none(req)

    def _reply(self, req: int, layout: struct.Struct, *fields: int) -> int:
        """Write the reply to ``req`` (header, then ``fields`` as ``layout`` says; one write: the kernel takes a reply whole), free ``req``."""
        unique = ctypes.c_uint64.from_address(req + _REQ_UNIQUE).value
        try:
            os.write(self.fuse_fd, layout.pack(layout.size, 0, unique, *fields))
            return 0
        except OSError as exc:
            return exc.errno or errno.EIO
        finally:
            self._lib.fuse_reply_none(req)


def _seconds_ns(timeout_s: float) -> tuple[int, int]:
    """A kernel cache timeout as FUSE sends it: whole seconds and the ns part (libfuse's ``calc_timeout_*``)."""
    timeout_s = max(timeout_s, 0.0)
    return int(timeout_s), int((timeout_s - math.floor(timeout_s)) * 1e9)
