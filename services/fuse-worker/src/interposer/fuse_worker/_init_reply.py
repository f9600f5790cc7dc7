"""Send libfuse's FUSE_INIT reply with capabilities libfuse 3.14 cannot ask for.

libfuse builds the FUSE_INIT reply from the capability bits it knows and writes
it itself. Four the worker needs are not in the reply it writes:

* ``FUSE_PARALLEL_DIROPS`` (``flags`` bit 18, Linux ≥ 4.7): lookups and
  readdirs of one directory may run at once. libfuse 3.14 turns it on by
  default, and the worker's ``conn.want`` has it after ``init`` (seen:
  ``want`` 0x14ba19), yet the reply it wrote lacked it (flags 0x4040b039), so
  the kernel took a mutex per directory around every LOOKUP and READDIR
  (``fuse_lock_inode``): 16 threads each ``stat``-ing files of one directory
  through a 1 ms lookup delay got 954 stats/s, with the bit 10,559.
* ``FUSE_HANDLE_KILLPRIV_V2`` (``flags`` bit 28, Linux ≥ 5.11): the file
  system clears set-ID bits and ``security.capability`` on write, truncate and
  chown itself, as the VFS would. The kernel then marks the mount ``SB_NOSEC``,
  so once a write has found nothing to clear on an inode it stops asking: without
  it, every cached or passthrough ``write(2)`` first sends a GETXATTR of
  ``security.capability`` (``file_remove_privs``), a round trip per write.
* ``FUSE_PASSTHROUGH`` (bit 37, so ``flags2`` bit 5, Linux ≥ 6.9) with
  ``max_stack_depth``: kernel passthrough (``_kernel_passthrough``).
* ``FUSE_DIRECT_IO_ALLOW_MMAP`` (bit 36, ``flags2`` bit 4, Linux ≥ 6.6): a file
  opened with ``FOPEN_DIRECT_IO`` (one a read or write layer acts on) may be
  mapped shared; without it ``mmap(MAP_SHARED)`` of such a file fails with
  ENODEV. Page faults of the mapping still come to the worker as READ requests,
  and its dirty pages as WRITEs, so the layers see them.

:class:`InitReply` points the session's fd (``struct fuse_session.fd``, found by
what the public ``fuse_session_fd()`` returns) at a pipe just before libfuse
replies; a task reads the reply from the pipe, puts the fd back, sets the bits
and writes it to ``/dev/fuse``. The kernel sends no other request before INIT is
answered, so nothing else can be written or read meanwhile. ABI:
``include/uapi/linux/fuse.h`` (``struct fuse_init_out``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

#: ``fuse_init_out.flags`` bit: lookups and readdirs of one directory may run concurrently.
FUSE_PARALLEL_DIROPS = 1 << 18
#: ``fuse_conn_info.capable`` bit of libfuse for the same (fuse_common.h ``FUSE_CAP_PARALLEL_DIROPS``).
FUSE_CAP_PARALLEL_DIROPS = 1 << 18
#: ``fuse_init_out.flags`` bit: the file system kills suid/sgid/caps on write, chown and truncate.
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
#: ``FUSE_INIT_EXT`` in ``fuse_init_out.flags``: without it the kernel ignores ``flags2``.
FUSE_INIT_EXT = 1 << 30
#: ``FUSE_DIRECT_IO_ALLOW_MMAP`` (1 << 36) as a bit of ``fuse_init_out.flags2``.
FLAGS2_DIRECT_IO_ALLOW_MMAP = 1 << (36 - 32)

_OUT_HEADER_BYTES = 16  # struct fuse_out_header: len, error, unique
_INIT_FLAGS = _OUT_HEADER_BYTES + 12  # fuse_init_out.flags
_INIT_FLAGS2 = _OUT_HEADER_BYTES + 32  # fuse_init_out.flags2
_INIT_MAX_STACK_DEPTH = _OUT_HEADER_BYTES + 36  # fuse_init_out.max_stack_depth
#: How far into ``struct fuse_session`` its ``fd`` is searched for, bytes.
_SESSION_FD_SEARCH = 64


class InitReplyUnavailable(RuntimeError):
    """libfuse's session did not look as expected: the reply stays libfuse's, nothing was changed."""


class InitReply:
    """Diverts one session's FUSE_INIT reply to add capability bits.

    Args:
        libfuse: the loaded libfuse (``_extra_ops._libfuse``), for ``fuse_session_fd``.
        session: address of libfuse's ``struct fuse_session``.

    Raises:
        InitReplyUnavailable: the session's ``fd`` member was not found.
    """

    def __init__(self, libfuse: ctypes.CDLL, session: int) -> None:
        self._lib = libfuse
        self._session = session
        self.fuse_fd: int = libfuse.fuse_session_fd(session)
        self._fd_address = self._find_fd_member()

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
        raise InitReplyUnavailable("the FUSE session's fd member was not found")

    def divert(self, nursery: trio.Nursery, *, flags: int = 0, flags2: int = 0, max_stack_depth: int = 0,
               sent: Callable[[int, int], None] = lambda flags, flags2: None) -> None:
        """Catch the FUSE_INIT reply libfuse is about to send, and send it with ``flags``/``flags2`` bits added.

        Call from inside libfuse's ``init`` handler (the reply follows it). A task
        in ``nursery`` forwards the reply; ``flags2`` and ``max_stack_depth`` are
        set only if the reply has them (``FUSE_INIT_EXT``). Before the reply is
        written, ``sent(flags, flags2)`` is told which of the asked bits it
        carries (0, 0 if it was an error reply or too short to patch).
        """
        read_end, write_end = os.pipe()
        nursery.start_soon(self._forward, read_end, write_end, flags, flags2, max_stack_depth, sent)
        ctypes.c_int.from_address(self._fd_address).value = write_end

    async def _forward(self, read_end: int, write_end: int, flags: int, flags2: int, max_stack_depth: int,
                       sent: Callable[[int, int], None]) -> None:
        try:
            await trio.lowlevel.wait_readable(read_end)
            reply = bytearray(os.read(read_end, 4096))
        finally:
            ctypes.c_int.from_address(self._fd_address).value = self.fuse_fd
            os.close(read_end)
            os.close(write_end)
        added = added2 = 0
        if len(reply) >= _INIT_FLAGS + 4 and struct.unpack_from("<i", reply, 4)[0] == 0:
            old = struct.unpack_from("<I", reply, _INIT_FLAGS)[0]
            struct.pack_into("<I", reply, _INIT_FLAGS, old | flags)
            added = flags
            if len(reply) >= _INIT_MAX_STACK_DEPTH + 4 and old & FUSE_INIT_EXT and flags2:
                old2 = struct.unpack_from("<I", reply, _INIT_FLAGS2)[0]
                struct.pack_into("<II", reply, _INIT_FLAGS2, old2 | flags2, max_stack_depth)
                added2 = flags2
        sent(added, added2)
        os.write(self.fuse_fd, reply)
        log.debug("FUSE_INIT reply forwarded (%d bytes, flags +%#x, flags2 +%#x)", len(reply), added, added2)
