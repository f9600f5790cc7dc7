"""Which set-ID bits a write clears (the rule the worker applies to direct-I/O writes)."""

from __future__ import annotations

import stat

import pytest

from interposer.fuse_worker._setid import setid_bits_to_clear

REG = stat.S_IFREG
WRITER_UID, WRITER_GID, OTHER_GID = 1000, 1000, 2000


@pytest.mark.parametrize(
    ("mode", "file_gid", "writer_uid", "expected"),
    [
        (REG | 0o4755, WRITER_GID, WRITER_UID, stat.S_ISUID),
        (REG | 0o6775, WRITER_GID, WRITER_UID, stat.S_ISUID | stat.S_ISGID),  # group-executable: always
        (REG | 0o2664, WRITER_GID, WRITER_UID, 0),  # no group-execute, writer in the group: kept
        (REG | 0o2666, OTHER_GID, WRITER_UID, stat.S_ISGID),  # no group-execute, writer not in it
        (REG | 0o0777, WRITER_GID, WRITER_UID, 0),
        (REG | 0o6777, OTHER_GID, 0, 0),  # root holds CAP_FSETID
        (stat.S_IFDIR | 0o2775, OTHER_GID, WRITER_UID, 0),  # only regular files
    ],
)
def test_a_write_clears_the_bits_the_kernel_clears(mode: int, file_gid: int, writer_uid: int, expected: int) -> None:
    assert setid_bits_to_clear(mode, file_gid, writer_uid, WRITER_GID) == expected
