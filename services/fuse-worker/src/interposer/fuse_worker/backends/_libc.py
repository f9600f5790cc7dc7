"""libc calls Python's ``os`` lacks: ``renameat2(2)`` with flags, ``fallocate(2)`` with a mode, ``fstatfs(2)``'s ``f_type``, ``mallopt(3)``."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def renameat2(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int) -> None:
    """Rename ``old_name`` in ``old_dir_fd`` to ``new_name`` in ``new_dir_fd`` with ``flags``.

    Raises:
        OSError: the syscall's errno (EEXIST for RENAME_NOREPLACE, EINVAL where the
            backing fs does not support the flag, ENOSYS without renameat2 in libc).
    """
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 not available in libc")
    if _renameat2(old_dir_fd, old_name, new_dir_fd, new_name, ctypes.c_uint(flags)) != 0:
        _raise_errno()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``: allocate, punch or zero ``length`` bytes at ``offset`` of ``fd`` per ``mode``.

    ``mode`` is a combination of ``FALLOC_FL_*`` (<linux/falloc.h>); 0 allocates
    and extends the file as ``posix_fallocate`` does.

    Raises:
        OSError: the syscall's errno (EOPNOTSUPP for a mode the file system lacks,
            ENOSPC, EINVAL for a bad range or combination).
    """
    if _fallocate(fd, mode, offset, length) != 0:
        _raise_errno()


#: ``struct statfs`` as 32 longs: 256 bytes, room for its 120 (64-bit Linux, asm-generic/statfs.h).
_Statfs = ctypes.c_long * 32
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def fs_type(fd: int) -> int:
    """``f_type`` of the file system holding ``fd`` (``fstatfs(2)``): a magic number of <linux/magic.h>.

    Python's ``os.fstatvfs`` leaves it out. ``f_type`` is the first member of
    ``struct statfs`` (a ``long`` on every 64-bit Linux ABI but s390x).

    Raises:
        OSError: the syscall's errno (EBADF).
    """
    buf = _Statfs()
    if _fstatfs(fd, buf) != 0:
        _raise_errno()
    return buf[0] & 0xFFFFFFFF


#: ``mallopt`` parameter: most malloc arenas (glibc <malloc.h>).
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Let glibc's malloc use at most ``arenas`` arenas (``mallopt(M_ARENA_MAX)``); call before threads start.

    Returns:
        False if the C library refused or has no ``mallopt`` (not glibc).
    """
    mallopt = getattr(_libc, "mallopt", None)
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1
