"""``renameat2(2)`` via libc, for RENAME_NOREPLACE / RENAME_EXCHANGE (os.rename has no flags)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def renameat2(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int) -> None:
    """Rename ``old_name`` in ``old_dir_fd`` to ``new_name`` in ``new_dir_fd`` with ``flags``.

    Raises:
        OSError: the syscall's errno (EEXIST for RENAME_NOREPLACE, EINVAL where the
            backing fs does not support the flag, ENOSYS without renameat2 in libc).
    """
    if _renameat2 is None:
        raise OSError(38, "renameat2 not available in libc")  # ENOSYS
    if _renameat2(old_dir_fd, old_name, new_dir_fd, new_name, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
