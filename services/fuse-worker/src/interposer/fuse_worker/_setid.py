"""The set-user-ID and set-group-ID bits a write or truncation clears, where the kernel leaves it to us.

A write by a process without CAP_FSETID clears a regular file's S_ISUID, and its
S_ISGID when the file is group-executable (or, without group-execute, when the
writer is not in the file's group): Linux ``file_remove_privs`` →
``setattr_should_drop_suidgid`` / ``setattr_should_drop_sgid`` (fs/inode.c,
fs/attr.c), POSIX ``write(2)``: "Upon successful completion ... the S_ISUID and
S_ISGID bits of the file mode may be cleared". Otherwise a user allowed to write
a set-user-ID program could change what it runs while it keeps its owner's rights.

Without ``FUSE_HANDLE_KILLPRIV_V2`` the kernel does this itself for a write
through the page cache and a truncation: it sends a SETATTR with the new mode.
For a file opened with FOPEN_DIRECT_IO it does not; it only flags the request
(``FUSE_WRITE_KILL_SUIDGID``, which pyfuse3 does not pass on). With
``FUSE_HANDLE_KILLPRIV_V2`` (the worker's default, ``_init_reply``) it leaves
every write, truncation and ``O_TRUNC`` open to the file system. The worker
writes and truncates as root, which has CAP_FSETID, so the backing file system
keeps the bits: the adapter clears them with :func:`setid_bits_to_clear`. A
truncation follows the same rule (``do_truncate`` → ``dentry_needs_remove_privs``),
and so does ``chown(2)`` of a regular file, judged on the file before the change
(``chown_common`` → ``setattr_should_drop_sgid``), except that it drops S_ISUID
even for root, as the backing fs does when the worker changes the owner.
"""

from __future__ import annotations

import stat


def setid_bits_to_clear(mode: int, file_gid: int, writer_uid: int, writer_gid: int) -> int:
    """The bits of ``mode`` that a write by (``writer_uid``, ``writer_gid``) clears; 0 = none.

    Args:
        mode: ``st_mode`` of the file written to (type and permission bits).
        file_gid: the file's group.
        writer_uid: uid of the process that opened the file for writing; uid 0 is
            taken to hold CAP_FSETID (the worker sees uids, not capabilities).
        writer_gid: that process's gid (its supplementary groups are not known
            here: a set-group-ID file without group-execute of a group the writer
            is in only through them loses the bit, where the kernel would keep it).
    """
    if writer_uid == 0 or not stat.S_ISREG(mode):
        return 0
    bits = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or writer_gid != file_gid):
        bits |= stat.S_ISGID
    return bits
